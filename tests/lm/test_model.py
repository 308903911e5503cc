"""Tests of the SmolLM2 model, tokenizer, data and assets (rco_jax.quant).

The model is checked against an independent NumPy float64 forward pass written here, which
works on the GGUF tensors exactly as stored: (out, in) weights, q/k rows in llama.cpp's
permuted order, hence RoPE on adjacent pairs (GPT-J style). The model under test un-permutes
to the Hugging Face layout and rotates halves, so agreement checks both conventions.

Tests marked ``model`` need the real assets (``python -m rco_jax.lm.assets fetch``) and
are skipped without them; the others use a small random GGUF written by ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_fixtures import TINY_HP, TINY_SPECIALS

from rco_jax.lm import assets, data, model, tokenizer

# ------------------------------------------------------------------ NumPy reference (GGUF layout)


def reference_logits(tensors: dict[str, np.ndarray], meta: dict, tokens: np.ndarray) -> np.ndarray:
    """Llama forward in float64 NumPy on raw GGUF tensors; tokens (T,) -> logits (T, vocab)."""
    n_layers = meta["llama.block_count"]
    n_heads = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    eps = meta["llama.attention.layer_norm_rms_epsilon"]
    base = meta["llama.rope.freq_base"]
    emb = tensors["token_embd.weight"].astype(np.float64)
    x = emb[tokens]
    seq, dim = x.shape
    hd = dim // n_heads
    ang = np.arange(seq)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope_adjacent(v):  # (seq, heads, hd); rotates (v[2i], v[2i+1])
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g

    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    for i in range(n_layers):
        p = {
            k.split(".")[2]: v.astype(np.float64)
            for k, v in tensors.items()
            if k.startswith(f"blk.{i}.")
        }
        h = rms(x, p["attn_norm"])
        q = rope_adjacent((h @ p["attn_q"].T).reshape(seq, n_heads, hd))
        k = rope_adjacent((h @ p["attn_k"].T).reshape(seq, n_kv, hd))
        v = (h @ p["attn_v"].T).reshape(seq, n_kv, hd)
        heads = []
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            s = q[:, head] @ k[:, kv].T / math.sqrt(hd)
            s[future] = -np.inf
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            heads.append((s / s.sum(axis=-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ p["attn_output"].T
        h = rms(x, p["ffn_norm"])
        gate = h @ p["ffn_gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p["ffn_up"].T)) @ p["ffn_down"].T
    return rms(x, tensors["output_norm.weight"].astype(np.float64)) @ emb.T


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The q/k row permutation of llama.cpp's HF->GGUF converter (HF layout -> GGUF layout)."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------ tiny random model (no assets)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    config, weights = model.load_smollm2(tiny_gguf)
    return config, weights


def test_tiny_config_from_metadata(tiny):
    config, weights = tiny
    assert config.num_layers == TINY_HP["layers"]
    assert config.hidden_size == TINY_HP["hidden"]
    assert config.num_heads == TINY_HP["heads"] and config.num_kv_heads == TINY_HP["kv_heads"]
    assert config.head_dim == TINY_HP["hidden"] // TINY_HP["heads"]
    assert config.intermediate_size == TINY_HP["ffn"]
    assert config.rope_theta == TINY_HP["theta"]
    assert config.rms_norm_eps == pytest.approx(TINY_HP["eps"])
    assert config.tie_embeddings
    names = model.linear_names(config)
    assert len(names) == len(set(names)) == 7 * config.num_layers
    assert names[:2] == ["layers.0.attn.q", "layers.0.attn.k"]
    for name, shape in model.linear_shapes(config).items():
        assert weights[name].shape == shape
        assert weights[name].dtype == jnp.float32


def test_unpermute_inverts_llamacpp_permutation():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(model._unpermute_rope_rows(llamacpp_permute(w, 3), 3), w)


def test_tiny_logits_match_numpy_reference(tiny, tiny_gguf):
    config, weights = tiny
    ref_tensors = assets.gguf_tensors(tiny_gguf)
    meta = assets.gguf_metadata(tiny_gguf)
    toks = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 23))
    ref = np.stack([reference_logits(ref_tensors, meta, s) for s in toks])

    out = np.asarray(model.forward(weights, jnp.asarray(toks), config))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    stacked = model.stack_weights(weights, config)
    np.testing.assert_allclose(np.asarray(model.forward(stacked, toks, config)), out, atol=1e-5)

    # nnx module; its parameters are named like the flat weights
    net = model.Llama.from_gguf(tiny_gguf)
    assert set(net.weights()) == set(weights)
    np.testing.assert_allclose(np.asarray(net(jnp.asarray(toks))), out, atol=1e-5)

    # block by block, with both the pure functions and the nnx submodules
    x = model.embed_tokens(weights, jnp.asarray(toks))
    y = net.embed(jnp.asarray(toks))
    for i in range(config.num_layers):
        x = model.block_forward(stacked, i, x, config)
        y = net.layers[i](y)
    np.testing.assert_allclose(
        np.asarray(model.logits_from_hidden(weights, x, config)), out, atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(model.logits_from_hidden(weights, y, config)), out, atol=1e-4
    )


def test_tiny_nnx_split_merge_and_set_weights(tiny):
    config, weights = tiny
    net = model.Llama.from_weights(config, weights)
    graphdef, state = nnx.split(net)
    paths = {".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(state)}
    assert paths == set(weights)
    toks = jnp.arange(10)[None] % config.vocab_size
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(again(toks)), np.asarray(net(toks)))
    net.set_weights({"layers.1.mlp.down": jnp.zeros_like(weights["layers.1.mlp.down"])})
    assert float(jnp.abs(net.layers[1].mlp.down.kernel[...]).sum()) == 0.0
    with pytest.raises(KeyError):
        net.set_weights({"layers.1.mlp.nope": 0.0})
    with pytest.raises(ValueError):
        net.set_weights({"layers.1.mlp.down": jnp.zeros((2, 2))})


def test_tiny_linear_override_and_gradient(tiny):
    config, weights = tiny
    toks = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (2, 12)))
    name = "layers.1.mlp.up"
    base = model.forward(weights, toks, config)
    same = model.forward({**weights, name: weights[name] + 0.0}, toks, config)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(same))
    zeroed = model.forward({**weights, name: jnp.zeros_like(weights[name])}, toks, config)
    assert float(jnp.abs(zeroed - base).max()) > 1e-3

    # d/dt of a loss along the interpolation W(t) = (1 - t) W + t * 0.5 W, by autodiff and FD
    def loss(t):
        w = {**weights, name: (1 - t) * weights[name] + t * 0.5 * weights[name]}
        return model.nll(model.forward(w, toks, config), toks)

    g = float(jax.grad(loss)(0.3))
    eps = 1e-2
    fd = (float(loss(0.3 + eps)) - float(loss(0.3 - eps))) / (2 * eps)
    assert np.isfinite(g) and g == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_tiny_capture_inputs_and_hessians(tiny):
    config, weights = tiny
    toks = np.random.default_rng(3).integers(0, config.vocab_size, (3, 9))
    inputs = model.capture_inputs(weights, toks, config)
    assert list(inputs) == model.linear_names(config)
    shapes = model.linear_shapes(config)
    for name, x in inputs.items():
        assert x.shape == (3, 9, shapes[name][0])
    assert inputs["layers.0.attn.q"] is inputs["layers.0.attn.v"]
    assert inputs["layers.1.mlp.gate"] is inputs["layers.1.mlp.up"]

    # layer 0 q/k/v input is the normalized embedding
    emb = np.asarray(weights["embed"])[toks]
    g = np.asarray(weights["layers.0.attn_norm"])
    want = emb / np.sqrt(np.mean(emb**2, -1, keepdims=True) + config.rms_norm_eps) * g
    np.testing.assert_allclose(np.asarray(inputs["layers.0.attn.q"]), want, rtol=1e-5, atol=1e-5)
    # the block output is reproduced from the captured inputs of the last linears
    stacked = model.stack_weights(weights, config)
    x0 = model.embed_tokens(weights, toks)
    x1 = model.block_forward(stacked, 0, x0, config)
    w = {k: np.asarray(v) for k, v in weights.items()}
    mid = x0 + inputs["layers.0.attn.o"] @ w["layers.0.attn.o"]
    np.testing.assert_allclose(
        np.asarray(mid + inputs["layers.0.mlp.down"] @ w["layers.0.mlp.down"]),
        np.asarray(x1),
        rtol=1e-4,
        atol=1e-4,
    )

    hess, n = model.input_hessians(weights, toks, config, batch_size=2, progress=False)
    assert n == 27 and list(hess) == model.linear_names(config)
    for name in ("layers.0.attn.k", "layers.1.attn.o", "layers.1.mlp.down"):
        x = np.asarray(inputs[name], np.float64).reshape(-1, shapes[name][0])
        np.testing.assert_allclose(hess[name], x.T @ x / n, rtol=1e-4, atol=1e-5)


def test_tiny_generate_and_perplexity(tiny):
    config, weights = tiny
    fwd = functools.partial(model.forward, model.stack_weights(weights, config), config=config)
    prompt = [5, 6, 7]
    out = model.generate(fwd, prompt, 5)
    assert len(out) == 5
    # greedy: each new token is the argmax given everything before it
    seq = jnp.asarray([prompt + out])
    logits = fwd(seq)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, 2:-1], -1)), out)
    toks = np.random.default_rng(4).integers(0, config.vocab_size, (5, 16))
    ppl = model.perplexity(fwd, toks, batch_size=2, progress=False)
    want = math.exp(float(model.nll(fwd(jnp.asarray(toks)), jnp.asarray(toks))))
    assert ppl == pytest.approx(want, rel=1e-5)


def test_tiny_tokenizer(tiny_gguf):
    tok = tokenizer.load_tokenizer(tiny_gguf)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.special_tokens == tuple(TINY_SPECIALS)
    for text in ["the and the", "Tschüß, naïve café — 東京 🤖!\n\n\tend  ", "x12345y", ""]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert tok.decode(ids) == text
    ids = tok.encode(" the and")
    assert [tok.backend.id_to_token(int(i)) for i in ids] == ["Ġthe", "Ġand"]
    assert list(tok.encode("<|im_start|>hi<|im_end|>"))[::3] == [1, 2]
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_missing_assets_error(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path))
    assert assets.cache_dir() == tmp_path
    assert assets.missing_assets() == ["model", "text"]
    with pytest.raises(assets.AssetsNotFoundError, match="rco_jax.lm.assets fetch"):
        assets.model_path()
    with pytest.raises(FileNotFoundError, match="rco_jax.lm.assets fetch"):
        data.play_text("hamlet")
    assert assets.main(["status"]) == 1


# ------------------------------------------------------------------ real SmolLM2 (assets needed)


@pytest.mark.model
def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (1536, 49152, 64)
    assert c.rope_theta == 1e5 and c.tie_embeddings
    assert len(model.linear_names(c)) == 210
    n_params = sum(int(np.prod(w.shape)) for w in smollm2.weights.values())
    assert n_params == 134_515_008


@pytest.mark.model
def test_smollm2_logits_match_numpy_reference(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("To be, or not to be, that is the question:")
    meta = assets.gguf_metadata()
    ref = reference_logits(assets.gguf_tensors(), meta, ids)
    out = np.asarray(model.forward(smollm2.stacked, jnp.asarray(ids)[None], smollm2.config))[0]
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() < 1e-3 * scale
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.model
def test_smollm2_greedy_paris(smollm2):
    tok = smollm2.tokenizer
    fwd = functools.partial(model.forward, smollm2.stacked, config=smollm2.config)
    # plain text completion
    out = model.generate(fwd, tok.encode("The capital of France is"), 3)
    assert tok.decode(out).strip().startswith("Paris"), tok.decode(out)
    # chat template (the model is instruction-tuned)
    prompt = tok.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(fwd, tok.encode(prompt), 8, stop_ids=[tok.eos_id])
    assert "Paris" in tok.decode(out), tok.decode(out)


@pytest.mark.model
def test_smollm2_tokenizer(smollm2):
    tok = smollm2.tokenizer
    meta = assets.gguf_metadata()
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.special_tokens[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    for text in [
        "To be, or not to be: that is the question.",
        "Ünïcödé — “quotes”, 東京タワー, emoji 🤖👍, tabs\tand\n\nnewlines  ",
        "digits 1234567890 and 3.14159",
        "<|im_start|>user\nHi<|im_end|>\n",
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.backend.id_to_token(int(i)) for i in tok.encode("The capital of France")] == [
        "The",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
    ]
    assert len(tok.encode("2024")) == 4  # digits are split individually
    assert list(tok.encode("<|im_start|>assistant\n"))[0] == 1
    rendered = tok.chat_prompt([{"role": "user", "content": "Hi"}])
    assert rendered == (
        "<|im_start|>system\n"
        + tokenizer.DEFAULT_SYSTEM_PROMPT
        + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.DEFAULT_SYSTEM_PROMPT in meta["tokenizer.chat_template"]


@pytest.mark.model
def test_shakespeare_data(require_assets):
    assert not set(data.EVAL_PLAYS) & set(data.CALIBRATION_PLAYS)
    assert len(data.EVAL_PLAYS) + len(data.CALIBRATION_PLAYS) == len(data.PLAYS) == 37
    for play in data.PLAYS:
        assert len(data.play_text(play)) > 50_000
    calib = data.calibration_tokens(6, 64, seed=1)
    assert calib.shape == (6, 64) and calib.dtype == np.int32
    np.testing.assert_array_equal(calib, data.calibration_tokens(6, 64, seed=1))
    assert not np.array_equal(calib, data.calibration_tokens(6, 64, seed=2))
    ev = data.eval_tokens(5, 128)
    assert ev.shape == (5, 128) and ev.dtype == np.int32
    full = data.eval_tokens(seq_len=128)
    assert len(full) == sum(len(data.play_tokens(p)) // 128 for p in data.EVAL_PLAYS)
    np.testing.assert_array_equal(ev[0], full[0])
    tok = tokenizer.load_tokenizer()
    assert "Hamlet" in tok.decode(np.concatenate(list(full[:8])))
    assert 0 < ev.min() and ev.max() < 49152


@pytest.mark.model
def test_smollm2_eval_perplexity(smollm2):
    tokens = data.eval_tokens(8, 128)
    fwd = functools.partial(model.forward, smollm2.stacked, config=smollm2.config)
    ppl = model.perplexity(fwd, tokens, batch_size=8, progress=False)
    print(f"SmolLM2-135M-Instruct held-out perplexity (8 x 128 tokens): {ppl:.2f}")
    assert 5.0 < ppl < 80.0


@pytest.mark.model
def test_smollm2_input_hessians(smollm2):
    config = smollm2.config
    toks = data.calibration_tokens(2, 16)
    hess, n = model.input_hessians(smollm2.stacked, toks, config, progress=False)
    assert n == 32 and len(hess) == 210
    for name, (n_in, _) in model.linear_shapes(config).items():
        h = hess[name]
        assert h.shape == (n_in, n_in)
        np.testing.assert_allclose(h, h.T, rtol=1e-5, atol=1e-6)
        assert np.all(np.diag(h) >= 0) and np.all(np.isfinite(h))


def test_tiny_removed_attention_equals_zero_gate(tiny):
    """A layer without attention weights runs as if its attention gate were 0."""
    config, weights = tiny
    toks = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (2, 9)))
    present = tuple(i != 0 for i in range(config.num_layers))
    gates = {"attn": jnp.asarray(present, jnp.float32)}
    gated = model.forward(model.stack_weights(weights, config), toks, config, gates)
    cfg = dataclasses.replace(config, attention_layers=present)
    dropped = {"attn_norm", "attn.q", "attn.k", "attn.v", "attn.o"}
    flat = {k: v for k, v in weights.items() if k.removeprefix("layers.0.") not in dropped}
    assert len(flat) == len(weights) - 5 and not cfg.stackable
    assert not any(n.startswith("layers.0.attn") for n in model.linear_names(cfg))
    np.testing.assert_allclose(model.forward(flat, toks, cfg), gated, atol=1e-5)
    net = model.Llama.from_weights(cfg, flat)
    assert set(net.weights()) == set(flat)
    np.testing.assert_allclose(net(toks), gated, atol=1e-5)
    with pytest.raises(ValueError, match="flat weights"):
        model.stack_weights(flat, cfg)
    with pytest.raises(ValueError, match="attention_layers must be"):
        dataclasses.replace(config, attention_layers=(True,))
