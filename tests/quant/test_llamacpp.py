"""llama.cpp (the ``xllamacpp`` bindings) as the runtime of GGUF files: rco_jax.quant.llamacpp.

The oracle is our JAX model, ``log_softmax(forward(...))`` at the next tokens (it agrees with a
float64 NumPy reference in tests/lm/test_model.py). llama.cpp computes in its own precision:
Q4_1 / Q8_0 weights times activations quantized to Q8 on the fly, an f16 KV cache. So the
per-token log-probs differ by quantization noise, of either sign and larger for unlikely
tokens, not by a bias. Measured with xllamacpp 2026.10.11549 (CPU wheel):

* SmolLM2-135M-Instruct (Q4_1), the first 64-token Shakespeare evaluation window: max |diff|
  0.34 and mean |diff| 0.081 nats per token; mean NLL 3.744 (llama.cpp) vs 3.722 (JAX), i.e.
  perplexity +2.2%. Four windows: max 0.30..0.90, mean 0.081..0.108, mean NLL within 0.022.
  A 28-token chat text with two emojis (tokens split inside a UTF-8 character) and
  ``<|im_start|>`` / ``<|im_end|>`` inside: max 0.41, mean 0.091.
* the tiny random GGUF, 32 ids with control and split UTF-8 tokens: max 0.21, mean 0.062.

Tolerances asserted: mean |diff| < 0.2, max |diff| < 1.0, perplexities within 5%.
Tests marked ``model`` need the SmolLM2 assets; all but the error cases need ``xllamacpp``.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_fixtures import TINY_SPECIALS

from rco_jax.lm import assets, data
from rco_jax.lm import model as lm
from rco_jax.lm.extras import MissingExtraError
from rco_jax.quant.llamacpp import LlamaCpp, check_gguf

MEAN_TOL, MAX_TOL, PPL_RTOL = 0.2, 1.0, 0.05


def jax_log_probs(weights, tokens: np.ndarray, config) -> np.ndarray:
    """``log p(t_i | t_<i)``, i = 1..T-1, of our JAX model."""
    toks = jnp.asarray(tokens)[None]
    logp = jax.nn.log_softmax(lm.forward(weights, toks, config)[0, :-1], axis=-1)
    return np.asarray(jnp.take_along_axis(logp, toks[0, 1:, None], axis=-1)[:, 0], np.float64)


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float64 and got.shape == ref.shape
    assert np.all(np.isfinite(got))
    diff = np.abs(got - ref)
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (diff.mean(), diff.max())


@pytest.fixture(scope="module")
def xllamacpp():
    return pytest.importorskip("xllamacpp", reason="pip install 'rco_jax[llamacpp]'")


@pytest.fixture(scope="module")
def llm(xllamacpp, require_assets):
    with LlamaCpp(assets.model_path(), n_ctx=256, n_threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def tiny_llm(xllamacpp, tiny_gguf):
    with LlamaCpp(tiny_gguf, n_ctx=64, n_threads=1) as model:
        yield model


# ------------------------------------------------------------------ real SmolLM2


@pytest.mark.model
def test_greedy_paris(llm):
    # Plain text completion, no chat template: the instruct model continues " Paris."
    text = llm.generate("The capital of France is", max_tokens=4)
    assert "Paris" in text, text


@pytest.mark.model
def test_log_probs_and_perplexity_match_jax(llm, smollm2):
    window = data.eval_tokens(1, 64)[0]
    got = llm.token_log_probs(window)
    ref = jax_log_probs(smollm2.stacked, window, smollm2.config)
    assert_close(got, ref)
    ppl = llm.perplexity(window[None])
    np.testing.assert_allclose(ppl, np.exp(-got.mean()), rtol=1e-6)  # fresh context each time
    np.testing.assert_allclose(ppl, np.exp(-ref.mean()), rtol=PPL_RTOL)


@pytest.mark.model
def test_chat_text_with_split_utf8_and_control_tokens(llm, smollm2):
    # Each "🤖" is three tokens, the first ending inside the character (the server reports
    # nothing for it: read from the full distribution); <|im_end|> ends generation.
    tok = smollm2.tokenizer
    ids = tok.encode(
        "<|im_start|>user\nDraw me a robot 🤖 please!<|im_end|>\n"
        "<|im_start|>assistant\nHere is a robot: 🤖<|im_end|>\n"
    )
    assert tok.eos_id in ids[1:-2] and tok.bos_id in ids[1:]
    assert_close(llm.token_log_probs(ids), jax_log_probs(smollm2.stacked, ids, smollm2.config))


# ------------------------------------------------------------------ tiny GGUF (no download)


def test_tiny_gguf_log_probs_match_jax(tiny_llm, tiny_gguf):
    config, weights = lm.load_smollm2(tiny_gguf)
    ids = np.random.default_rng(0).integers(len(TINY_SPECIALS), config.vocab_size, 32)
    ids[[5, 9, 20]] = [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|>
    ids[[12, 25]] = 3 + 0xE2  # the byte 0xE2 alone: text ending inside a UTF-8 character
    assert_close(tiny_llm.token_log_probs(ids), jax_log_probs(weights, ids, config))


def test_bad_inputs(tiny_llm):
    with pytest.raises(ValueError, match="length >= 2"):
        tiny_llm.token_log_probs([5])
    with pytest.raises(ValueError, match="n_ctx=64"):
        tiny_llm.token_log_probs(np.arange(3, 70))
    with pytest.raises(ValueError, match=r"\(n >= 1, T >= 2\)"):
        tiny_llm.perplexity(np.arange(3, 10))
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_llm.generate("the", max_tokens=0)


def test_closed(xllamacpp, tiny_gguf):
    with LlamaCpp(tiny_gguf, n_ctx=16, n_threads=1) as model:
        assert "n_ctx=16" in repr(model)
    assert "closed" in repr(model)
    with pytest.raises(RuntimeError, match="closed"):
        model.generate("the")


# ------------------------------------------------------------------ clear errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found.*rco_jax.lm.assets fetch"):
        LlamaCpp(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        LlamaCpp(path)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        check_gguf(path)


def test_corrupt_gguf_file(xllamacpp, tiny_gguf, tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:1000])
    with pytest.raises(ValueError, match="llama.cpp could not load"):
        LlamaCpp(path)


def test_without_extra(monkeypatch, tiny_gguf):
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'rco_jax\[llamacpp\]'"):
        LlamaCpp(tiny_gguf)
