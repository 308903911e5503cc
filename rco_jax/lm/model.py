"""Llama-architecture language model (SmolLM2-135M) in Flax nnx, with a pure-functional forward.

Parameters are addressed by stable flat names, identical to the model's nnx paths without the
leaf attribute::

    embed                      (vocab, hidden)            token embedding (tied output head)
    layers.{l}.attn_norm       (hidden,)                  RMSNorm scale before attention
    layers.{l}.attn.q          (hidden, heads * head_dim)
    layers.{l}.attn.k          (hidden, kv_heads * head_dim)
    layers.{l}.attn.v          (hidden, kv_heads * head_dim)
    layers.{l}.attn.o          (heads * head_dim, hidden)
    layers.{l}.mlp_norm        (hidden,)                  RMSNorm scale before the MLP
    layers.{l}.mlp.gate        (hidden, ffn)
    layers.{l}.mlp.up          (hidden, ffn)
    layers.{l}.mlp.down        (ffn, hidden)
    norm                       (hidden,)                  final RMSNorm scale
    lm_head                    (hidden, vocab)            only when embeddings are untied

Linear weights are Flax-style kernels of shape ``(in_features, out_features)``: ``y = x @ W``
(the transpose of the PyTorch/GGUF ``(out, in)`` layout). :func:`linear_names` lists the
``7 * num_layers`` linears (210 for SmolLM2-135M).

Maths (per block, ``x`` of shape (batch, seq, hidden))::

    rms(x; g)  = g * x / sqrt(mean(x^2) + eps)
    h  = x + Attn(rms(x; g_attn))       Attn: causal grouped-query attention with RoPE
    x' = h + W_down(silu(W_gate h') * (W_up h')),   h' = rms(h; g_mlp)
    logits = rms(x_L; g_norm) @ embed^T

RoPE uses the Hugging Face "rotate-half" convention: for head dimension d, dimension i < d/2 is
rotated together with i + d/2 by the angle ``pos * theta^(-2i/d)``. llama.cpp's converter
permuted the q/k rows of each head so that these pairs are adjacent in the GGUF file (rotated
GPT-J style there); :func:`weights_from_gguf` undoes that permutation, so the weights here are in
the original Hugging Face layout.

Usage::

    config, weights = load_smollm2()                        # flat name -> float32 array
    logits = forward(weights, tokens, config)               # jitted, pure, differentiable
    logits = forward({**weights, "layers.3.mlp.down": w}, tokens, config)   # swap one linear
    stacked = stack_weights(weights, config)                # {"blocks": {"mlp.down": (L, in,
    logits = forward(stacked, tokens, config)               #   out), ...}}: faster repeats
    inputs = capture_inputs(weights, tokens, config)        # name -> (batch, seq, in)
    hessians, n = input_hessians(weights, tokens, config)   # name -> X^T X / n, (in, in)
    ppl = perplexity(functools.partial(forward, stacked, config=config), tokens)
    model = Llama.from_weights(config, weights)             # nnx module; model(tokens)

For a search over per-layer choices, build the stacked blocks directly, e.g.
``blocks["mlp.down"] = jnp.einsum("lk,lkio->lio", probs, candidates)`` with candidates
(L, K, in, out), and differentiate ``forward({**stacked, "blocks": blocks}, tokens, config)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rco_jax.lm import assets

__all__ = [
    "BLOCK_KEYS",
    "LINEAR_KINDS",
    "Attention",
    "Block",
    "Linear",
    "Llama",
    "LlamaConfig",
    "MLP",
    "RMSNorm",
    "apply_rope",
    "block_forward",
    "capture_inputs",
    "config_from_gguf",
    "gguf_tensor_name",
    "embed_tokens",
    "forward",
    "generate",
    "input_hessians",
    "linear_names",
    "linear_shapes",
    "load_smollm2",
    "log_probs",
    "logits_from_hidden",
    "nll",
    "perplexity",
    "rms_norm",
    "rope_tables",
    "stack_weights",
    "unstack_weights",
    "weights_from_gguf",
]

Array = jax.Array
Weights = Mapping[str, Array]

#: The linears of one block, as name suffixes after ``layers.{l}.``.
LINEAR_KINDS: tuple[str, ...] = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "mlp.gate",
    "mlp.up",
    "mlp.down",
)
#: All parameters of one block, as name suffixes after ``layers.{l}.``.
BLOCK_KEYS: tuple[str, ...] = ("attn_norm", *LINEAR_KINDS[:4], "mlp_norm", *LINEAR_KINDS[4:])
# Linears reading the same input: their input activations (and Hessians) are shared.
_INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("attn.q", "attn.k", "attn.v"),
    "attn_out": ("attn.o",),
    "mlp_in": ("mlp.gate", "mlp.up"),
    "mlp_hidden": ("mlp.down",),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-architecture model (hashable: a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int = 8192
    tie_embeddings: bool = True
    #: Per-layer FFN widths (e.g. after structured pruning); ``None``: all
    #: ``intermediate_size``. Variable widths run the blocks unrolled (no stacking).
    intermediate_sizes: tuple[int, ...] | None = None
    #: Per-layer presence of the attention sub-block (``False``: removed, e.g. by depth
    #: pruning; the layer has no ``attn_norm``/``attn.*`` weights); ``None``: all present.
    attention_layers: tuple[bool, ...] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.intermediate_sizes is not None:
            sizes = tuple(int(f) for f in self.intermediate_sizes)
            if len(sizes) != self.num_layers or min(sizes, default=0) < 0:
                raise ValueError(
                    f"intermediate_sizes must be {self.num_layers} non-negative widths; "
                    f"got {self.intermediate_sizes}"
                )
            object.__setattr__(self, "intermediate_sizes", sizes)
        if self.attention_layers is not None:
            present = tuple(bool(a) for a in self.attention_layers)
            if len(present) != self.num_layers:
                raise ValueError(
                    f"attention_layers must be {self.num_layers} booleans; "
                    f"got {self.attention_layers}"
                )
            object.__setattr__(self, "attention_layers", present)

    def has_attention(self, layer: int) -> bool:
        """Whether ``layer`` has its attention sub-block."""
        return self.attention_layers is None or self.attention_layers[layer]

    def ffn_size(self, layer: int) -> int:
        """FFN width of ``layer``."""
        if self.intermediate_sizes is None:
            return self.intermediate_size
        return self.intermediate_sizes[layer]

    @property
    def uniform_ffn(self) -> bool:
        """Whether every layer has the same FFN width (the blocks can be stacked)."""
        return self.intermediate_sizes is None or len(set(self.intermediate_sizes)) <= 1

    @property
    def stackable(self) -> bool:
        """Whether all blocks have the same weights' shapes (they can run in a ``lax.scan``)."""
        return self.uniform_ffn and (self.attention_layers is None or all(self.attention_layers))


def linear_names(config: LlamaConfig) -> list[str]:
    """Stable names of all linears, layer-major: ``layers.0.attn.q, ..., layers.L-1.mlp.down``
    (a removed attention sub-block has none)."""
    return list(linear_shapes(config))


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of every linear, by name."""
    d = config.hidden_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def per_kind(f: int) -> dict[str, tuple[int, int]]:
        return {
            "attn.q": (d, q),
            "attn.k": (d, kv),
            "attn.v": (d, kv),
            "attn.o": (q, d),
            "mlp.gate": (d, f),
            "mlp.up": (d, f),
            "mlp.down": (f, d),
        }

    return {
        f"layers.{i}.{k}": per_kind(config.ffn_size(i))[k]
        for i in range(config.num_layers)
        for k in LINEAR_KINDS
        if config.has_attention(i) or not k.startswith("attn.")
    }


# ------------------------------------------------------------------------------ pure functions


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """``scale * x / sqrt(mean(x^2, -1) + eps)``."""
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * scale


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Array, Array]:
    """``cos, sin`` of the angles ``pos * theta^(-2i/head_dim)``, each (seq_len, head_dim/2)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on ``x`` (batch, seq, heads, head_dim): pairs (i, i + head_dim/2)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _sub(p: Weights, prefix: str) -> dict[str, Array]:
    return {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}


def _attention(
    p: Weights, x: Array, cos: Array, sin: Array, config: LlamaConfig
) -> tuple[Array, Array]:
    """Causal GQA self-attention; returns the output and the input of the ``o`` projection."""
    b, t, _ = x.shape
    nh, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    q = apply_rope((x @ p["q"]).reshape(b, t, nh, hd), cos, sin)
    k = apply_rope((x @ p["k"]).reshape(b, t, nkv, hd), cos, sin)
    v = (x @ p["v"]).reshape(b, t, nkv, hd)
    # q head h attends with kv head h // (nh // nkv), as in HF's repeat_kv.
    q = q.reshape(b, t, nkv, nh // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, nh * hd)
    return ctx @ p["o"], ctx


def _mlp(p: Weights, x: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """SwiGLU MLP; returns the output and the input of the ``down`` projection.

    ``mask`` (ffn,) scales the intermediate neurons: ``down(mask * silu(gate x) * up x)``,
    which equals zeroing the masked columns of gate/up and rows of down where ``mask`` is 0.
    """
    hidden = jax.nn.silu(x @ p["gate"]) * (x @ p["up"])
    if mask is not None:
        hidden = hidden * mask.astype(hidden.dtype)
    return hidden @ p["down"], hidden


def _block(
    p: Weights,
    x: Array,
    cos: Array,
    sin: Array,
    config: LlamaConfig,
    gates: Mapping[str, Array] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """One decoder block; also returns the inputs of its linears, by input group.

    ``gates`` (optional, see :func:`forward`): ``"ffn"`` (ffn,) neuron mask, ``"attn"`` and
    ``"mlp"`` scalars multiplying the sub-blocks' residual updates (0: dropped).
    """
    gates = gates or {}
    eps = config.rms_norm_eps
    inputs = {}
    if "attn_norm" in p:  # absent: the attention sub-block was removed
        attn_in = rms_norm(x, p["attn_norm"], eps)
        attn, attn_out = _attention(_sub(p, "attn."), attn_in, cos, sin, config)
        if "attn" in gates:
            attn = attn * gates["attn"].astype(attn.dtype)
        x = x + attn
        inputs = {"attn_in": attn_in, "attn_out": attn_out}
    mlp_in = rms_norm(x, p["mlp_norm"], eps)
    mlp, mlp_hidden = _mlp(_sub(p, "mlp."), mlp_in, gates.get("ffn"))
    if "mlp" in gates:
        mlp = mlp * gates["mlp"].astype(mlp.dtype)
    return x + mlp, {**inputs, "mlp_in": mlp_in, "mlp_hidden": mlp_hidden}


def embed_tokens(weights: Weights, tokens: Array) -> Array:
    """Embedding lookup: (batch, seq) int -> (batch, seq, hidden)."""
    return jnp.take(weights["embed"], tokens, axis=0)


def block_forward(weights: Weights, layer: int, x: Array, config: LlamaConfig) -> Array:
    """Apply decoder block ``layer`` to hidden states ``x`` (batch, seq, hidden).

    For layer-by-layer (sequential) processing, e.g. GPTQ with already quantized earlier
    layers: ``x = embed_tokens(w, tokens)``, then ``x = block_forward(w, l, x, config)``.
    """
    cos, sin = rope_tables(x.shape[1], config.head_dim, config.rope_theta)
    if "blocks" in weights:
        p = {k: v[layer] for k, v in weights["blocks"].items()}
    else:
        p = _sub(weights, f"layers.{layer}.")
    return _block(p, x, cos, sin, config)[0]


def logits_from_hidden(weights: Weights, x: Array, config: LlamaConfig) -> Array:
    """Final RMSNorm and output head: (batch, seq, hidden) -> (batch, seq, vocab)."""
    x = rms_norm(x, weights["norm"], config.rms_norm_eps)
    if config.tie_embeddings:
        return x @ weights["embed"].T
    return x @ weights["lm_head"]


def stack_weights(weights: Weights, config: LlamaConfig) -> dict[str, Any]:
    """Stacked form of flat weights: ``{"embed", "norm", ["lm_head"], "blocks": {key: (L, ...)}}``.

    ``blocks[key][l]`` is ``weights[f"layers.{l}.{key}"]`` for ``key`` in :data:`BLOCK_KEYS`.
    :func:`forward` accepts either form; stacking once outside repeated calls saves copying
    all block weights (~0.4 GB for SmolLM2) on every call. Already stacked input is returned
    as is.
    """
    if "blocks" in weights:
        return dict(weights)
    if not config.stackable:
        raise ValueError(
            "per-layer FFN widths or removed attention sub-blocks cannot be stacked; use the "
            "flat weights (forward accepts them)"
        )
    out: dict[str, Any] = {k: weights[k] for k in ("embed", "norm", "lm_head") if k in weights}
    out["blocks"] = {
        k: jnp.stack([weights[f"layers.{i}.{k}"] for i in range(config.num_layers)])
        for k in BLOCK_KEYS
    }
    return out


def unstack_weights(stacked: Mapping[str, Any], config: LlamaConfig) -> dict[str, Array]:
    """Inverse of :func:`stack_weights`: flat name -> array."""
    out = {k: v for k, v in stacked.items() if k != "blocks"}
    for k, v in stacked["blocks"].items():
        for i in range(config.num_layers):
            out[f"layers.{i}.{k}"] = v[i]
    return out


def _run_blocks(weights: Weights, tokens: Array, config: LlamaConfig, emit: Callable | None):
    """Embed and run all blocks with ``lax.scan``; ``emit(inputs)`` gives per-layer outputs."""
    stacked = stack_weights(weights, config)
    x = embed_tokens(stacked, tokens)
    cos, sin = rope_tables(tokens.shape[-1], config.head_dim, config.rope_theta)

    def step(x, p):
        x, inputs = _block(p, x, cos, sin, config)
        return x, (emit(inputs) if emit is not None else None)

    x, ys = jax.lax.scan(step, x, stacked["blocks"])
    return x, ys, stacked


def _run_gated(weights: Weights, tokens: Array, config: LlamaConfig, gates) -> tuple[Array, Any]:
    """Hidden states after all blocks; scanned when the widths allow it, else unrolled."""
    if config.stackable:
        stacked = stack_weights(weights, config)
        x = embed_tokens(stacked, tokens)
        cos, sin = rope_tables(tokens.shape[-1], config.head_dim, config.rope_theta)

        def step(x, pg):
            p, g = pg
            return _block(p, x, cos, sin, config, g)[0], None

        x, _ = jax.lax.scan(step, x, (stacked["blocks"], gates or {}))
        return x, stacked
    if "blocks" in weights:
        raise ValueError("per-layer FFN widths or removed attention need flat weights")
    x = embed_tokens(weights, tokens)
    cos, sin = rope_tables(tokens.shape[-1], config.head_dim, config.rope_theta)
    for layer in range(config.num_layers):
        g = None if gates is None else {k: v[layer] for k, v in gates.items()}
        x = _block(_sub(weights, f"layers.{layer}."), x, cos, sin, config, g)[0]
    return x, weights


@functools.partial(jax.jit, static_argnames="config")
def forward(
    weights: Weights,
    tokens: Array,
    config: LlamaConfig,
    gates: Mapping[str, Array] | None = None,
) -> Array:
    """Logits (batch, seq, vocab) of ``tokens`` (batch, seq), float32, pure and jitted.

    ``weights``: flat name -> array (see the module docstring; swap linears with
    ``{**weights, **new_linears}``), or the stacked form of :func:`stack_weights` (faster for
    repeated calls). Differentiable w.r.t. ``weights``. The blocks run in a ``lax.scan``,
    which keeps compile times short; per-layer FFN widths (``config.intermediate_sizes``) and
    removed attention sub-blocks (``config.attention_layers``) run unrolled on flat weights.

    ``gates`` (optional; structured pruning), any subset of, stacked over layers::

        "ffn":  (L, ffn)  neuron mask:  x' = h + W_down(m * silu(W_gate h') * (W_up h'))
        "attn": (L,)      x <- x + g_attn * Attn(...)       (0: the sub-block is dropped)
        "mlp":  (L,)      x <- x + g_mlp * MLP(...)

    Differentiable w.r.t. the gates (fractional values interpolate).
    """
    x, base = _run_gated(weights, tokens, config, None if gates is None else dict(gates))
    return logits_from_hidden(base, x, config)


@functools.partial(jax.jit, static_argnames="config")
def _capture(weights: Weights, tokens: Array, config: LlamaConfig):
    return _run_blocks(weights, tokens, config, emit=lambda inputs: inputs)[1]


def capture_inputs(weights: Weights, tokens: Array, config: LlamaConfig) -> dict[str, Array]:
    """Input activations of every linear on ``tokens``: name -> (batch, seq, in_features).

    Linears sharing an input (q/k/v; gate/up) map to the same array. Memory is
    ``batch * seq * num_layers * (3 * hidden + ffn)`` floats; use :func:`input_hessians` to
    accumulate ``X^T X`` over many tokens instead.
    """
    per_group = _capture(weights, jnp.asarray(tokens), config)
    out = {}
    for i in range(config.num_layers):
        for group, kinds in _INPUT_GROUPS.items():
            arr = per_group[group][i]
            for k in kinds:
                out[f"layers.{i}.{k}"] = arr
    return {name: out[name] for name in linear_names(config)}


@functools.partial(jax.jit, static_argnames="config")
def _gram(weights: Weights, tokens: Array, config: LlamaConfig):
    def emit(inputs):
        return {
            g: jnp.einsum("...i,...j->ij", v, v, precision="highest") for g, v in inputs.items()
        }

    return _run_blocks(weights, tokens, config, emit)[1]


def input_hessians(
    weights: Weights,
    tokens: Array | np.ndarray,
    config: LlamaConfig,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], int]:
    """GPTQ Hessians ``H = X^T X / n`` of every linear's input over all ``n`` tokens.

    ``X`` stacks the input rows (one per token position) of a linear, so ``H`` is
    (in_features, in_features), symmetric PSD; multiply by 2 for GPTQ's ``2 X^T X`` convention.
    Accumulated in float64 over batches of ``batch_size`` sequences (progress bar if
    ``progress``). Linears sharing an input (q/k/v; gate/up) map to the same array.

    Args:
      weights: model weights (e.g. with already quantized linears swapped in).
      tokens: (n_seq, seq_len) int token windows.

    Returns:
      ``(hessians, n_tokens)`` with ``hessians`` name -> float32 (in, in) array.
    """
    from tqdm.auto import tqdm

    tokens = np.asarray(tokens)
    sums: dict[str, np.ndarray] | None = None
    starts = range(0, tokens.shape[0], batch_size)
    for s in tqdm(starts, desc="input Hessians", disable=not progress, leave=False):
        grams = jax.device_get(_gram(weights, jnp.asarray(tokens[s : s + batch_size]), config))
        if sums is None:
            sums = {g: np.asarray(v, np.float64) for g, v in grams.items()}
        else:
            for g, v in grams.items():
                sums[g] += v
    if sums is None:
        raise ValueError("no tokens")
    n = int(tokens.shape[0] * tokens.shape[1])
    out = {}
    for group, kinds in _INPUT_GROUPS.items():
        mean = (sums[group] / n).astype(np.float32)
        for i in range(config.num_layers):
            for k in kinds:
                out[f"layers.{i}.{k}"] = mean[i]
    return {name: out[name] for name in linear_names(config)}, n


@jax.jit
def _token_nll(logits: Array, tokens: Array) -> Array:
    """Per-sequence sum of ``-log p(tokens[t+1] | tokens[:t+1])``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(tgt, axis=-1)


def nll(logits: Array, tokens: Array) -> Array:
    """Mean next-token negative log-likelihood (nats) of ``tokens`` (batch, seq) under logits."""
    return jnp.sum(_token_nll(logits, tokens)) / (tokens.shape[0] * (tokens.shape[1] - 1))


def log_probs(weights: Any, tokens: Any, config: LlamaConfig, *, batch_size: int = 8) -> Array:
    """``log_softmax`` of the model's logits, ``(n_seq, seq_len, vocab)`` float32, computed
    ``batch_size`` sequences at a time (e.g. a reference model's ``log r`` for a KL loss)."""
    tokens = np.asarray(tokens)
    out = [
        jax.nn.log_softmax(forward(weights, jnp.asarray(tokens[s : s + batch_size]), config))
        for s in range(0, len(tokens), batch_size)
    ]
    return jnp.concatenate(out)


def perplexity(
    model: Callable[[Array], Array],
    tokens: Array | np.ndarray,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Perplexity ``exp(mean NLL)`` of ``model`` on token windows (n_seq, seq_len).

    Every window is scored independently: the first token of a window is context only, the
    remaining ``seq_len - 1`` are predicted. ``model`` maps tokens (batch, seq) to logits,
    e.g. a :class:`Llama` or ``functools.partial(forward, weights, config=config)``.
    """
    from tqdm.auto import tqdm

    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (n_seq, seq_len >= 2), got {tokens.shape}")
    total = 0.0
    starts = range(0, tokens.shape[0], batch_size)
    for s in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        batch = jnp.asarray(tokens[s : s + batch_size])
        total += float(jnp.sum(_token_nll(model(batch), batch)))
    return math.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1)))


def generate(
    model: Callable[[Array], Array],
    prompt: Iterable[int],
    max_new_tokens: int,
    *,
    stop_ids: Iterable[int] = (),
    buffer_len: int | None = None,
) -> list[int]:
    """Greedy decoding; returns the new token ids (without the prompt).

    No KV cache: each step reruns the model on a fixed-length buffer (so it compiles once),
    reading the logits at the last real position; causality makes the padding irrelevant.
    """
    ids = [int(i) for i in prompt]
    n_prompt = len(ids)
    length = buffer_len or 1 << max(4, math.ceil(math.log2(n_prompt + max_new_tokens)))
    if n_prompt + max_new_tokens > length:
        raise ValueError("buffer_len too short for prompt + max_new_tokens")
    stop = set(int(i) for i in stop_ids)
    buf = np.zeros((1, length), np.int32)
    buf[0, :n_prompt] = ids
    for pos in range(n_prompt, n_prompt + max_new_tokens):
        logits = model(jnp.asarray(buf))
        nxt = int(jnp.argmax(logits[0, pos - 1]))
        ids.append(nxt)
        buf[0, pos] = nxt
        if nxt in stop:
            break
    return ids[n_prompt:]


# ------------------------------------------------------------------------------ nnx modules


def _flat(module: nnx.Module) -> dict[str, Array]:
    """Params of ``module`` by flat name: nnx path without its leaf attribute, dot-joined."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(str(p) for p in path[:-1]): var.get_value() for path, var in flat}


class Linear(nnx.Module):
    """Bias-free linear layer ``y = x @ kernel`` with ``kernel`` (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0 / math.sqrt(max(in_features, 1)))
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))

    def __call__(self, x: Array) -> Array:
        return x @ self.kernel[...]


class RMSNorm(nnx.Module):
    """``scale * x / sqrt(mean(x^2) + eps)`` over the last axis."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (linears ``q, k, v, o``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, hd = config.hidden_size, config.head_dim
        self.q = Linear(d, config.num_heads * hd, rngs=rngs)
        self.k = Linear(d, config.num_kv_heads * hd, rngs=rngs)
        self.v = Linear(d, config.num_kv_heads * hd, rngs=rngs)
        self.o = Linear(config.num_heads * hd, d, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        cos, sin = rope_tables(x.shape[1], self.config.head_dim, self.config.rope_theta)
        return _attention(_flat(self), x, cos, sin, self.config)[0]


class MLP(nnx.Module):
    """SwiGLU MLP ``down(silu(gate x) * up x)`` of width ``ffn_size`` (default the config's)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, ffn_size: int | None = None):
        d = config.hidden_size
        f = config.intermediate_size if ffn_size is None else ffn_size
        self.gate = Linear(d, f, rngs=rngs)
        self.up = Linear(d, f, rngs=rngs)
        self.down = Linear(f, d, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return _mlp(_flat(self), x)[0]


class Block(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, layer: int = 0):
        self.config = config
        if config.has_attention(layer):  # else the block is x + mlp(norm(x)) alone
            self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs=rngs, ffn_size=config.ffn_size(layer))

    def __call__(self, x: Array) -> Array:
        cos, sin = rope_tables(x.shape[1], self.config.head_dim, self.config.rope_theta)
        return _block(_flat(self), x, cos, sin, self.config)[0]


class Llama(nnx.Module):
    """Llama decoder-only LM. ``model(tokens)`` -> logits; params named as in the module doc.

    ``model.weights()`` gives the flat name -> array dict for the pure :func:`forward`;
    ``nnx.split``/``nnx.merge`` work as usual (the nnx paths are the names, plus the leaf
    attribute ``kernel``/``scale``/``embedding``).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [Block(config, rngs=rngs, layer=i) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: Array) -> Array:
        return forward(self.weights(), tokens, self.config)

    def weights(self) -> dict[str, Array]:
        """All parameters by flat name (shares the arrays, no copy)."""
        return _flat(self)

    def set_weights(self, weights: Mapping[str, Any]) -> None:
        """Replace parameters by flat name (any subset); shapes must match."""
        state = nnx.state(self, nnx.Param)
        variables = {
            ".".join(str(p) for p in path[:-1]): var for path, var in nnx.to_flat_state(state)
        }
        for name, value in weights.items():
            if name not in variables:
                raise KeyError(f"unknown parameter {name!r}")
            var = variables[name]
            value = jnp.asarray(value, jnp.float32)
            if value.shape != var.shape:
                raise ValueError(f"{name}: shape {value.shape} != {var.shape}")
            var.set_value(value)
        nnx.update(self, state)

    @classmethod
    def from_weights(cls, config: LlamaConfig, weights: Mapping[str, Any]) -> Llama:
        """A model holding ``weights`` (all names required)."""
        # Abstract construction: no random initialization of parameters we overwrite anyway.
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        missing = set(model.weights()) - set(weights)
        if missing:
            raise KeyError(f"missing weights: {sorted(missing)[:5]}...")
        model.set_weights(weights)
        return model

    @classmethod
    def from_gguf(cls, path: str | os.PathLike | None = None) -> Llama:
        """Load a GGUF Llama (default: the cached SmolLM2-135M-Instruct)."""
        return cls.from_weights(*load_smollm2(path))


# ------------------------------------------------------------------------------ GGUF loading


def config_from_gguf(metadata: Mapping[str, Any], tensor_names: Iterable[str] = ()) -> LlamaConfig:
    """Model hyperparameters from GGUF metadata (``llama.*`` keys); tied unless ``output.weight``
    is among ``tensor_names``."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")

    def get(key: str):
        return metadata[f"llama.{key}"]

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial RoPE ({rope_dim} of {head_dim}) is not supported")
    vocab = metadata.get("llama.vocab_size", None)
    if vocab is None:
        vocab = len(metadata["tokenizer.ggml.tokens"])
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(metadata.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        max_position=int(metadata.get("llama.context_length", 8192)),
        tie_embeddings="output.weight" not in set(tensor_names),
    )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of an (out, in) weight.

    Within each head the converter stores HF row ``j * d/2 + i`` (half ``j``, index ``i``) at
    row ``2 i + j``; this puts it back.
    """
    out, n_in = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, n_in).transpose(0, 2, 1, 3).reshape(out, n_in)


_GGUF_BLOCK = {
    "attn_norm": "attn_norm",
    "attn.q": "attn_q",
    "attn.k": "attn_k",
    "attn.v": "attn_v",
    "attn.o": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}


def gguf_tensor_name(name: str) -> str:
    """GGUF name of a block weight: ``"layers.3.mlp.down"`` -> ``"blk.3.ffn_down.weight"``."""
    try:
        _, layer, key = name.split(".", 2)
        return f"blk.{int(layer)}.{_GGUF_BLOCK[key]}.weight"
    except (ValueError, KeyError):
        raise ValueError(f"{name!r} is not a block weight (e.g. 'layers.0.attn.q')") from None


def weights_from_gguf(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig
) -> dict[str, np.ndarray]:
    """Map dequantized GGUF tensors (``assets.gguf_tensors``) to named float32 weights.

    Linears are transposed to (in, out) kernels; q/k rows are un-permuted to the HF layout.
    """
    w: dict[str, np.ndarray] = {
        "embed": tensors["token_embd.weight"],
        "norm": tensors["output_norm.weight"],
    }
    if not config.tie_embeddings:
        w["lm_head"] = tensors["output.weight"].T
    for i in range(config.num_layers):
        for key in _GGUF_BLOCK:
            t = tensors[gguf_tensor_name(f"layers.{i}.{key}")]
            if key == "attn.q":
                t = _unpermute_rope_rows(t, config.num_heads)
            elif key == "attn.k":
                t = _unpermute_rope_rows(t, config.num_kv_heads)
            w[f"layers.{i}.{key}"] = t.T if t.ndim == 2 else t
    shapes = linear_shapes(config)
    for name, shape in shapes.items():
        if w[name].shape != shape:
            raise ValueError(f"{name}: GGUF shape {w[name].shape} != expected {shape}")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in w.items()}


def load_smollm2(path: str | os.PathLike | None = None) -> tuple[LlamaConfig, dict[str, Array]]:
    """Config and float32 weights (name -> jax array) of a GGUF Llama.

    Default path: the cached SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embedding, dequantized;
    these dequantized values are the model's "full precision" reference). Takes ~10 s.
    """
    metadata = assets.gguf_metadata(path)
    tensors = assets.gguf_tensors(path)
    config = config_from_gguf(metadata, tensors)
    weights = weights_from_gguf(tensors, config)
    return config, {k: jnp.asarray(v) for k, v in weights.items()}
