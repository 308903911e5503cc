"""Group-wise weight quantizers: round-to-nearest (RTN) and GPTQ.

Conventions. A linear layer weight ``W`` has shape ``(d_out, d_in)`` and acts as
``y = x @ W.T``. Quantization groups are contiguous runs of ``group_size`` input
columns inside one row; group ``j`` of a row covers columns
``[j * group_size, (j + 1) * group_size)``. When ``group_size`` does not divide
``d_in`` the last group is shorter (ragged): with the default ``group_size=128``
SmolLM2's ``d_in = 576`` gives groups of 128, 128, 128, 128 and 64 columns.
``group_size=None`` means one group per row (per-channel quantization).

Asymmetric ``b``-bit quantization of a group with minimum ``lo`` and maximum ``hi``
(``maxq = 2^b - 1``)::

    scale = (hi - lo) / maxq
    zero  = round(-lo / scale)                  (an integer, stored as float)
    code  = clip(round(w / scale) + zero, 0, maxq)
    w_hat = scale * (code - zero)

``round`` is round-half-to-even. The divisions by ``maxq`` and by ``scale`` are
evaluated as multiplications by the reciprocal (``x * (1 / maxq)``,
``w * (1 / scale)``), which XLA substitutes for a division by a broadcast value
anyway; writing it explicitly makes RTN and GPTQ bit-identical on the same group
and reproducible by a NumPy oracle (it can differ from a true division by one
ulp, i.e. a code at an exact tie). The range is the group's own ``[lo, hi]``
(it is not widened to contain 0), so ``zero`` may lie outside ``[0, maxq]`` for a
group of one sign. Every entry then satisfies ``|w - w_hat| <= scale / 2`` (up to
float rounding). A constant group (``hi == lo``, scale 0) -- or one so nearly
constant that ``|zero|`` would exceed ``2^16`` -- gets ``scale = |lo|`` (1 if
``lo == 0``) and ``zero = -sign(lo)``, so that code 0 reproduces ``lo`` exactly;
no NaN or infinity is produced.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023) quantizes the
columns one at a time and spreads each column's error onto the columns not yet
quantized so as to minimise the layer-output error ``||X W^T - X W_hat^T||^2``
(see :func:`gptq`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "HessianState",
    "QuantizedTensor",
    "as_numpy",
    "dequantize",
    "gptq",
    "gptq_multi",
    "hessian",
    "hessian_error",
    "hessian_init",
    "hessian_update",
    "inverse_hessian_cholesky",
    "n_groups",
    "quantize_rtn",
    "relative_error",
    "resolve_group_size",
]

# Beyond this |zero| the rounding ``round(w / scale) + zero`` loses precision in
# float32; such a group is (relative to its offset) constant and treated as one.
_MAX_ZERO = 2.0**16
_HIGHEST = lax.Precision.HIGHEST
# Width of the innermost eagerly updated run of columns in GPTQ (speed only).
_SUB_BLOCK = 32


class QuantizedTensor(NamedTuple):
    """A group-wise asymmetrically quantized weight matrix.

    Attributes:
      codes: ``(d_out, d_in)`` uint8 integer codes in ``[0, 2^bits - 1]``.
      scales: ``(d_out, n_groups)`` float scale per (row, group).
      zeros: ``(d_out, n_groups)`` float zero point per (row, group); integer valued.
      bits: bit width ``b`` (1..8).
      group_size: columns per group (the last group may be shorter).

    ``n_groups = ceil(d_in / group_size)``; the weight is
    ``W_hat[r, c] = scales[r, c // group_size] * (codes[r, c] - zeros[r, c // group_size])``
    (see :func:`dequantize`).
    """

    codes: Any
    scales: Any
    zeros: Any
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def resolve_group_size(group_size: int | None, d_in: int) -> int:
    """The group size actually used: ``None`` or ``-1`` mean one group per row."""
    if group_size is None or group_size == -1:
        return d_in
    group_size = int(group_size)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive (or None/-1), got {group_size}")
    return min(group_size, d_in)


def _check_bits(bits: int) -> int:
    if int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8 (codes are uint8), got {bits}")
    return int(bits)


def _check_weight(w: Any) -> jax.Array:
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be a (d_out, d_in) matrix, got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    return w.astype(jnp.promote_types(w.dtype, jnp.float32))


def _group_params(w: jax.Array, valid: jax.Array, maxq: jax.Array):
    """Scale and zero point of groups ``w (..., g)`` over the entries where ``valid``.

    Returns ``(scale, zero)`` of shape ``w.shape[:-1]``.
    """
    inf = jnp.asarray(jnp.inf, w.dtype)
    lo = jnp.min(jnp.where(valid, w, inf), axis=-1)
    hi = jnp.max(jnp.where(valid, w, -inf), axis=-1)
    nonempty = jnp.any(valid, axis=-1)
    lo = jnp.where(nonempty, lo, 0)
    hi = jnp.where(nonempty, hi, 0)
    scale = (hi - lo) * (1 / maxq)
    zero = jnp.round(-lo / jnp.where(scale > 0, scale, 1))
    ok = (scale > 0) & (jnp.abs(zero) <= _MAX_ZERO)
    # Degenerate group: code 0 must reproduce ``lo`` exactly.
    scale = jnp.where(ok, scale, jnp.where(lo != 0, jnp.abs(lo), 1))
    zero = jnp.where(ok, zero, -jnp.sign(lo))
    return scale, zero


def _codes(w: jax.Array, inv_scale: jax.Array, zero: jax.Array, maxq: jax.Array) -> jax.Array:
    """Integer codes (as floats) ``clip(round(w * (1 / scale)) + zero, 0, maxq)``."""
    return jnp.clip(jnp.round(w * inv_scale) + zero, 0, maxq)


def _expand_groups(x: jax.Array, group_size: int, d_in: int) -> jax.Array:
    """``(d_out, n_groups) -> (d_out, d_in)``: repeat each group's value over its columns."""
    return jnp.repeat(x, group_size, axis=-1, total_repeat_length=x.shape[-1] * group_size)[
        ..., :d_in
    ]


def dequantize(q: QuantizedTensor, dtype: Any = jnp.float32) -> jax.Array:
    """Reconstructs ``W_hat = scale * (code - zero)`` with per-group scale/zero.

    Args:
      q: the quantized tensor.
      dtype: output dtype (the arithmetic runs in at least float32).
    """
    return _dequantize(
        jnp.asarray(q.codes), jnp.asarray(q.scales), jnp.asarray(q.zeros), int(q.group_size)
    ).astype(dtype)


@partial(jax.jit, static_argnames=("group_size",))
def _dequantize(codes: jax.Array, scales: jax.Array, zeros: jax.Array, group_size: int):
    d_in = codes.shape[-1]
    ct = jnp.promote_types(scales.dtype, jnp.float32)
    s = _expand_groups(scales.astype(ct), group_size, d_in)
    z = _expand_groups(zeros.astype(ct), group_size, d_in)
    return s * (codes.astype(ct) - z)


# ---------------------------------------------------------------------------
# Round to nearest
# ---------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("group_size",))
def _rtn(w: jax.Array, maxq: jax.Array, group_size: int):
    d_out, d_in = w.shape
    n_groups = -(-d_in // group_size)
    pad = n_groups * group_size - d_in
    wg = jnp.pad(w, ((0, 0), (0, pad))).reshape(d_out, n_groups, group_size)
    valid = (jnp.arange(n_groups * group_size) < d_in).reshape(n_groups, group_size)
    maxq = maxq.astype(w.dtype)
    scale, zero = _group_params(wg, valid, maxq)
    codes = _codes(wg, (1 / scale)[..., None], zero[..., None], maxq)
    codes = codes.reshape(d_out, -1)[:, :d_in].astype(jnp.uint8)
    return codes, scale, zero


def quantize_rtn(w: Any, bits: int, group_size: int | None = 128) -> QuantizedTensor:
    """Asymmetric group-wise round-to-nearest quantization.

    For each (row, group) with minimum ``lo`` and maximum ``hi``:
    ``scale = (hi - lo) / (2^b - 1)``, ``zero = round(-lo / scale)``,
    ``code = clip(round(w / scale) + zero, 0, 2^b - 1)``. Every entry satisfies
    ``|w - dequantize(q)| <= scale / 2``. See the module docstring for groups
    (ragged last group) and constant groups.

    Args:
      w: ``(d_out, d_in)`` weight (rows are output features).
      bits: bit width in 1..8.
      group_size: columns per group along ``d_in``; ``None``/``-1``: one group per row.

    Returns:
      A :class:`QuantizedTensor` (``codes`` uint8, ``scales``/``zeros`` in the
      weight's float dtype, at least float32).
    """
    bits = _check_bits(bits)
    w = _check_weight(w)
    g = resolve_group_size(group_size, w.shape[1])
    codes, scales, zeros = _rtn(w, jnp.asarray(2**bits - 1, w.dtype), g)
    return QuantizedTensor(codes, scales, zeros, bits, g)


# ---------------------------------------------------------------------------
# Hessians and reconstruction errors
# ---------------------------------------------------------------------------


def _flat_inputs(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("activations must have a trailing feature axis d_in")
    x = x.reshape(-1, x.shape[-1])
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _symmetrize(a: jax.Array) -> jax.Array:
    """Mirrors the upper triangle onto the lower one.

    A blocked matmul need not return ``X^T X`` exactly symmetric, and averaging
    ``(A + A^T) / 2`` is not exact either once XLA contracts it into FMAs; the
    Cholesky factorizations read one triangle, so make both identical.
    """
    i = jnp.arange(a.shape[0])
    return jnp.where(i[:, None] <= i[None, :], a, a.T)


@jax.jit
def hessian(x: Any) -> jax.Array:
    """GPTQ layer Hessian ``H = 2 X^T X / n`` of calibration inputs ``X``.

    ``X`` has shape ``(..., d_in)``; all leading axes are flattened into the ``n``
    samples (tokens). ``tr(dW H dW^T) = (2/n) ||X dW^T||_F^2`` is then the
    layer-output squared error of a weight perturbation ``dW`` (per sample, times 2).
    """
    x = _flat_inputs(x)
    return _symmetrize(2.0 * jnp.matmul(x.T, x, precision=_HIGHEST) / x.shape[0])


class HessianState(NamedTuple):
    """Running ``H = 2 X^T X / n`` over the batches seen so far.

    Attributes:
      hessian: ``(d_in, d_in)`` current average (zeros before any batch).
      count: number of samples ``n`` seen (int32 scalar).
    """

    hessian: jax.Array
    count: jax.Array


def hessian_init(d_in: int, dtype: Any = jnp.float32) -> HessianState:
    """An empty accumulator for inputs with ``d_in`` features."""
    return HessianState(jnp.zeros((d_in, d_in), dtype), jnp.zeros((), jnp.int32))


@jax.jit
def hessian_update(state: HessianState, x: Any) -> HessianState:
    """Adds a batch ``x (..., d_in)`` to the running Hessian.

    Kept as a running mean, ``H <- H n / (n + m) + 2 X_b^T X_b / (n + m)``, so the
    entries stay O(1) however many tokens are accumulated. After the batches
    ``X_1..X_k``, ``state.hessian`` equals ``hessian(concat(X_1..X_k))``.
    """
    x = _flat_inputs(x)
    m = x.shape[0]
    n = state.count
    total = n + m
    dtype = state.hessian.dtype
    keep = (n / jnp.maximum(total, 1)).astype(dtype)
    xtx = jnp.matmul(x.T, x, precision=_HIGHEST).astype(dtype)
    h = state.hessian * keep + (2.0 / jnp.maximum(total, 1)).astype(dtype) * xtx
    return HessianState(_symmetrize(h), total.astype(jnp.int32))


@jax.jit
def relative_error(w: Any, w_hat: Any) -> jax.Array:
    """Relative squared Frobenius error ``||W - W_hat||^2 / ||W||^2`` (0 if ``W = 0``)."""
    w = jnp.asarray(w, jnp.float32)
    d = jnp.asarray(w_hat, jnp.float32) - w
    den = jnp.sum(w * w)
    return jnp.where(den > 0, jnp.sum(d * d) / jnp.where(den > 0, den, 1), jnp.sum(d * d))


@jax.jit
def hessian_error(w: Any, w_hat: Any, h: Any) -> jax.Array:
    """Hessian-weighted error ``tr((W - W_hat) H (W - W_hat)^T)``.

    With ``H = 2 X^T X / n`` this is ``(2/n) ||X (W - W_hat)^T||_F^2``, the
    layer-output error that GPTQ minimises; use the undamped ``H``.
    """
    w = jnp.asarray(w, jnp.float32)
    d = jnp.asarray(w_hat, jnp.float32) - w
    return jnp.sum(jnp.matmul(d, jnp.asarray(h, jnp.float32), precision=_HIGHEST) * d)


# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------


@jax.jit
def _inverse_hessian_cholesky(h: jax.Array, damp: jax.Array) -> jax.Array:
    """See :func:`inverse_hessian_cholesky`; NaNs if ``H_d`` is not positive definite."""
    h = _symmetrize(h)
    diag = jnp.diagonal(h)
    h = h + jnp.diag(jnp.where(diag == 0, 1, 0).astype(h.dtype))
    mu = jnp.mean(jnp.diagonal(h))
    h = h + (damp * mu) * jnp.eye(h.shape[0], dtype=h.dtype)
    low = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    low_inv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
    return low_inv[::-1, ::-1]


def _effective_block(block_size: int, group_size: int) -> int:
    """Block size aligned with the groups: a multiple or a divisor of ``group_size``.

    Then every group starts after all earlier columns' errors have reached its
    columns, so its scale/zero are taken from the fully error-updated weights,
    exactly as in the plain column-by-column algorithm.
    """
    block_size = int(block_size)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if block_size >= group_size:
        return (block_size // group_size) * group_size
    return max(d for d in range(1, block_size + 1) if group_size % d == 0)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


@partial(jax.jit, static_argnames=("d_in", "group_size", "block_size", "sub_block"))
def _gptq_core(
    w: jax.Array,
    u: jax.Array,
    maxq: jax.Array,
    *,
    d_in: int,
    group_size: int,
    block_size: int,
    sub_block: int,
):
    """GPTQ on padded ``w (d_out, D)`` and ``u (D, D)`` (``D`` a multiple of the block
    and group sizes), ``maxq`` a scalar or per row.

    Two levels of lazy updates: a column's error is applied eagerly only inside its
    sub-block; a finished sub-block updates the rest of its block, and a finished
    block the rest of the matrix (one matrix product each). Every group starts at a
    sub-block start, when all earlier errors have reached the whole current block.
    """
    d_out, d_pad = w.shape
    g, bs, sb = group_size, block_size, sub_block
    dtype = w.dtype
    maxq = maxq.astype(dtype)
    valid_cols = jnp.arange(d_pad) < d_in
    n_groups = d_pad // g
    codes = jnp.zeros((d_out, d_pad), dtype)
    scales = jnp.ones((d_out, n_groups), dtype)
    zeros = jnp.zeros((d_out, n_groups), dtype)

    def block_body(b, carry):
        w, codes, scales, zeros = carry
        i1 = b * bs
        w1 = lax.dynamic_slice_in_dim(w, i1, bs, axis=1)
        u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))
        err1 = jnp.zeros((d_out, bs), dtype)

        def sub_body(k, c):
            w1, err1, codes, scales, zeros = c
            j1 = k * sb
            col0 = i1 + j1

            def new_group(_):
                # bs >= g: the group lies inside this block (fully updated here);
                # bs < g: the group starts at this block's start, where w is current.
                if bs >= g:
                    src = lax.dynamic_slice_in_dim(w1, j1, g, axis=1)
                else:
                    src = lax.dynamic_slice_in_dim(w, i1, g, axis=1)
                s, z = _group_params(src, lax.dynamic_slice_in_dim(valid_cols, col0, g), maxq)
                return (
                    lax.dynamic_update_slice_in_dim(scales, s[:, None], col0 // g, axis=1),
                    lax.dynamic_update_slice_in_dim(zeros, z[:, None], col0 // g, axis=1),
                )

            scales, zeros = lax.cond(
                col0 % g == 0, new_group, lambda _: (scales, zeros), operand=None
            )
            # Sub-blocks never straddle groups: one scale/zero for all their columns.
            s = lax.dynamic_index_in_dim(scales, col0 // g, axis=1, keepdims=False)
            z = lax.dynamic_index_in_dim(zeros, col0 // g, axis=1, keepdims=False)
            inv_s = 1 / s
            w2 = lax.dynamic_slice_in_dim(w1, j1, sb, axis=1)
            u2 = lax.dynamic_slice(u1, (j1, j1), (sb, sb))

            def col_body(i, c2):
                w2, err2, codes2 = c2
                x = lax.dynamic_index_in_dim(w2, i, axis=1, keepdims=False)
                urow = lax.dynamic_index_in_dim(u2, i, axis=0, keepdims=False)
                code = _codes(x, inv_s, z, maxq)
                e = (x - s * (code - z)) / urow[i]
                # U is upper triangular: columns < i are left untouched.
                w2 = w2 - e[:, None] * urow[None, :]
                err2 = lax.dynamic_update_slice_in_dim(err2, e[:, None], i, axis=1)
                codes2 = lax.dynamic_update_slice_in_dim(codes2, code[:, None], i, axis=1)
                return w2, err2, codes2

            empty = jnp.zeros((d_out, sb), dtype)
            _, err2, codes2 = lax.fori_loop(0, sb, col_body, (w2, empty, empty))
            rows = lax.dynamic_slice_in_dim(u1, j1, sb, axis=0)
            w1 = w1 - jnp.matmul(err2, rows, precision=_HIGHEST)
            err1 = lax.dynamic_update_slice_in_dim(err1, err2, j1, axis=1)
            codes = lax.dynamic_update_slice_in_dim(codes, codes2, col0, axis=1)
            return w1, err1, codes, scales, zeros

        _, err1, codes, scales, zeros = lax.fori_loop(
            0, bs // sb, sub_body, (w1, err1, codes, scales, zeros)
        )
        rows = lax.dynamic_slice_in_dim(u, i1, bs, axis=0)
        w = w - jnp.matmul(err1, rows, precision=_HIGHEST)
        return w, codes, scales, zeros

    w, codes, scales, zeros = lax.fori_loop(0, d_pad // bs, block_body, (w, codes, scales, zeros))
    n_real = -(-d_in // g)
    return codes[:, :d_in].astype(jnp.uint8), scales[:, :n_real], zeros[:, :n_real]


@partial(jax.jit, static_argnames=("d_in", "group_size", "block_size"))
def _gptq_batched(w, u, maxqs, *, d_in, group_size, block_size):
    """``_gptq_core`` for each entry of ``maxqs``; returns arrays with a leading bits axis."""
    unit = group_size if block_size >= group_size else block_size
    core = partial(
        _gptq_core,
        d_in=d_in,
        group_size=group_size,
        block_size=block_size,
        sub_block=_largest_divisor(unit, _SUB_BLOCK),
    )
    # A sequential map, not vmap: on CPU the per-bit working set stays in cache, and
    # the loops are overhead-bound either way (measured faster than vmap).
    return lax.map(lambda m: core(w, u, m), maxqs)


def _pad_to(w: jax.Array, u: jax.Array, d_pad: int) -> tuple[jax.Array, jax.Array]:
    pad = d_pad - w.shape[1]
    if pad == 0:
        return w, u
    w = jnp.pad(w, ((0, 0), (0, pad)))
    # Padding columns are decoupled (identity block), so they never feed back.
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros(u.shape[0], u.dtype), jnp.ones(pad, u.dtype)])
    )
    return w, u


def inverse_hessian_cholesky(h: Any, damp: float = 0.01) -> jax.Array:
    """Upper Cholesky factor ``U`` of the damped inverse Hessian, ``H_d^{-1} = U^T U``.

    ``H_d = H + diag(dead) + damp * mean(diag(H + diag(dead))) I`` where ``dead``
    marks the columns with ``H_ii = 0`` (inputs that are always zero; their weights
    do not affect the layer output). Row ``i`` of ``U`` holds GPTQ's error-feedback
    coefficients: after quantizing column ``i`` with error ``e``, the remaining
    weights move by ``-(e / U_ii) U_ij`` for ``j > i``.

    Computed without forming ``H^{-1}``: with ``J`` the reversal permutation,
    ``J H_d J = L L^T`` (Cholesky) gives ``H_d = V V^T`` with ``V = J L J`` upper
    triangular, hence ``H_d^{-1} = V^{-T} V^{-1}`` and ``U = V^{-1}``.

    If ``H_d`` is numerically not positive definite, ``damp`` is raised tenfold
    (up to three times, with a warning) before giving up with ``ValueError``.
    Not jitted as a whole (it checks the result on the host).
    """
    h = jnp.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"Hessian must be a square matrix, got shape {h.shape}")
    h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    d = float(damp)
    for attempt in range(4):
        u = _inverse_hessian_cholesky(h, jnp.asarray(d, h.dtype))
        if bool(jnp.all(jnp.isfinite(u))):
            if attempt:
                warnings.warn(
                    f"GPTQ: damped Hessian not positive definite; used damp={d:g}", stacklevel=2
                )
            return u
        d = d * 10 if d > 0 else 1e-4
    raise ValueError("GPTQ: Hessian is not positive definite even with strong dampening")


def gptq_multi(
    w: Any,
    h: Any,
    bits: Sequence[int],
    group_size: int | None = 128,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    inverse_cholesky: Any | None = None,
) -> dict[int, QuantizedTensor]:
    """GPTQ of one weight at several bit widths in one jitted call (one shared ``H``).

    Same algorithm and arguments as :func:`gptq`; returns ``{bits: QuantizedTensor}``.
    The Hessian factorization is done once, and the bit widths run as a ``lax.map``
    inside one compiled program (one compilation per shape and number of bit widths).
    ``inverse_cholesky`` may pass a precomputed ``inverse_hessian_cholesky(h, damp)``
    (e.g. shared by layers with the same inputs); ``h`` is then only shape-checked.
    """
    bits_list = [_check_bits(b) for b in bits]
    if len(set(bits_list)) != len(bits_list):
        raise ValueError(f"duplicate bit widths in {bits}")
    w = _check_weight(w)
    d_out, d_in = w.shape
    g = resolve_group_size(group_size, d_in)
    bs = _effective_block(block_size, g)
    if inverse_cholesky is None:
        if np.shape(h) != (d_in, d_in):
            raise ValueError(f"Hessian must have shape {(d_in, d_in)}, got {np.shape(h)}")
        u = inverse_hessian_cholesky(jnp.asarray(h, w.dtype), damp)
    else:
        u = jnp.asarray(inverse_cholesky, w.dtype)
        if u.shape != (d_in, d_in):
            raise ValueError(f"inverse_cholesky must have shape {(d_in, d_in)}, got {u.shape}")
    period = max(bs, g)
    d_pad = -(-d_in // period) * period
    wp, up = _pad_to(w, u, d_pad)
    maxqs = jnp.asarray([2**b - 1 for b in bits_list], w.dtype)
    codes, scales, zeros = _gptq_batched(wp, up, maxqs, d_in=d_in, group_size=g, block_size=bs)
    return {
        b: QuantizedTensor(codes[k], scales[k], zeros[k], b, g) for k, b in enumerate(bits_list)
    }


def gptq(
    w: Any,
    h: Any,
    bits: int,
    group_size: int | None = 128,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedTensor:
    """GPTQ quantization of ``w (d_out, d_in)`` given the layer Hessian ``h``.

    Minimises ``tr((W - W_hat) H (W - W_hat)^T)`` (the layer-output error for
    ``H = 2 X^T X / n``, see :func:`hessian`) greedily, one input column at a time
    (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023):

    1. dead columns (``H_ii = 0``) get ``H_ii = 1``; ``H += damp * mean(diag H) I``;
       ``U`` = upper Cholesky factor of ``H^{-1}`` (:func:`inverse_hessian_cholesky`).
    2. for columns ``i = 0..d_in-1``: when a group starts at ``i``, its scale and
       zero are set from the min/max of the group's *current* (error-updated)
       weights; column ``i`` is quantized (round to nearest, as in
       :func:`quantize_rtn`), and its error ``e = (w_i - q_i) / U_ii`` is
       propagated to the later columns, ``w_j -= e U_ij`` for ``j > i`` (the optimal
       update of the remaining weights, OBS).
    3. updates are applied lazily: a column's error eagerly only within its run of
       (at most 32) columns, a finished run to the rest of its block of
       ``block_size`` columns, a finished block to the rest of the matrix (matrix
       products). Blocks and runs are aligned with the groups (``block_size`` is
       rounded to a multiple or a divisor of ``group_size``), so every group's
       scale is taken from fully updated weights and the result equals the plain
       column loop up to float rounding.

    Unlike the reference implementation, dead columns keep their weights (they
    are rounded like RTN and, being decoupled, feed no error back) instead of
    being zeroed; on inputs whose feature is always 0 both give the same output.

    Args:
      w: ``(d_out, d_in)`` weight.
      h: ``(d_in, d_in)`` Hessian, e.g. from :func:`hessian` / :func:`hessian_update`.
      bits: bit width in 1..8.
      group_size: columns per group (ragged last group allowed); ``None``: per row.
      damp: relative dampening (fraction of the mean diagonal). If the damped
        Hessian is still not positive definite it is raised tenfold (with a warning).
      block_size: lazy-update block size (speed only).

    Returns:
      A :class:`QuantizedTensor`; ``dequantize`` gives ``W_hat``.
    """
    return gptq_multi(w, h, (bits,), group_size, damp=damp, block_size=block_size)[bits]


def n_groups(d_in: int, group_size: int | None) -> int:
    """Number of groups per row, ``ceil(d_in / group_size)``."""
    return math.ceil(d_in / resolve_group_size(group_size, d_in))


def as_numpy(q: QuantizedTensor) -> QuantizedTensor:
    """The same tensor with NumPy arrays (host memory)."""
    return QuantizedTensor(
        np.asarray(q.codes),
        np.asarray(q.scales),
        np.asarray(q.zeros),
        int(q.bits),
        int(q.group_size),
    )
