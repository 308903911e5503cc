"""Language-model fixtures shared by the application tests (registered in conftest.py).

* ``tiny_gguf``: a small random Llama written as a GGUF file (quantized and float tensors, a
  byte-level BPE vocabulary); needs no download.
* ``smollm2``: the real SmolLM2-135M-Instruct; tests using it are skipped (with the command
  to fetch it) when the assets are not in the cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rco_jax.lm import assets


def byte_chars() -> list[str]:
    """GPT-2 byte-level alphabet: byte b -> printable character (index b)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "n d", "Ġa nd"]


def tiny_vocab() -> list[str]:
    merged = ["".join(m.split(" ")) for m in TINY_MERGES]
    return [*TINY_SPECIALS, *byte_chars(), *merged]


TINY_HP = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, eps=1e-5, theta=10000.0)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama GGUF: Q8_0 embedding, Q4_1 and F32 linears, F32 norms."""
    import gguf

    hp = TINY_HP
    d, f, nh, nkv = hp["hidden"], hp["ffn"], hp["heads"], hp["kv_heads"]
    hd = d // nh
    vocab = tiny_vocab()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hp["layers"])
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(hp["theta"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(TINY_SPECIALS) + [1] * (len(vocab) - len(TINY_SPECIALS)))
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    Q = gguf.GGMLQuantizationType

    def add(name: str, arr: np.ndarray, qtype=None):
        arr = arr.astype(np.float32)
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    def lin(n_out: int, n_in: int) -> np.ndarray:
        return rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)

    add("token_embd.weight", rng.standard_normal((len(vocab), d)), Q.Q8_0)
    for i in range(hp["layers"]):
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(d))
        add(f"blk.{i}.attn_q.weight", lin(nh * hd, d), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", lin(nkv * hd, d), Q.Q4_1)
        add(f"blk.{i}.attn_v.weight", lin(nkv * hd, d))
        add(f"blk.{i}.attn_output.weight", lin(d, nh * hd))
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(d))
        add(f"blk.{i}.ffn_gate.weight", lin(f, d), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", lin(f, d))
        add(f"blk.{i}.ffn_down.weight", lin(d, f))
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@dataclasses.dataclass
class RealModel:
    config: Any
    weights: dict[str, Any]
    stacked: dict[str, Any]
    tokenizer: Any


@pytest.fixture(scope="session")
def require_assets() -> None:
    missing = assets.missing_assets()
    if missing:
        pytest.skip(
            f"assets {missing} not in {assets.cache_dir()}; fetch with `{assets.FETCH_COMMAND}`"
        )


@pytest.fixture(scope="session")
def smollm2(require_assets) -> RealModel:
    from rco_jax.lm import model, tokenizer

    config, weights = model.load_smollm2()
    return RealModel(
        config, weights, model.stack_weights(weights, config), tokenizer.load_tokenizer()
    )
