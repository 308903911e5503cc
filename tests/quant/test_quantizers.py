"""Tests of the RTN / GPTQ weight quantizers, their file format and the database.

Oracles are independent NumPy re-implementations written from the specification
(module docstring of ``rco_jax.quant.quantizers``), not calls into the library.
Shapes are shared between tests so that the jitted GPTQ compiles only a few times.
"""

from __future__ import annotations

import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rco_jax.quant import export as qx
from rco_jax.quant import quantizers as qz
from rco_jax.quant.quantizers import QuantizedTensor, dequantize, gptq, gptq_multi, quantize_rtn

ALL_BITS = (2, 3, 4, 5, 6, 8)


# ---------------------------------------------------------------------------
# NumPy oracles
# ---------------------------------------------------------------------------


def np_group_params(grp: np.ndarray, maxq, dtype):
    """Scale/zero per row of ``grp (rows, cols)`` as specified (incl. degenerate groups)."""
    one = dtype.type(1)
    maxq = dtype.type(maxq)
    lo, hi = grp.min(axis=1), grp.max(axis=1)
    scale = (hi - lo) * (one / maxq)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        zero = np.round(-lo / np.where(scale > 0, scale, one))
    ok = (scale > 0) & (np.abs(zero) <= 2.0**16)
    scale = np.where(ok, scale, np.where(lo != 0, np.abs(lo), one)).astype(dtype)
    zero = np.where(ok, zero, -np.sign(lo)).astype(dtype)
    return scale, zero


def np_quant(x: np.ndarray, scale, zero, maxq):
    one = x.dtype.type(1)
    code = np.clip(np.round(x * (one / scale)) + zero, 0, maxq)
    return code, scale * (code - zero)


def np_rtn(w: np.ndarray, bits: int, g: int):
    w = w.astype(np.float32)
    maxq = 2**bits - 1
    d_out, d_in = w.shape
    n_groups = -(-d_in // g)
    codes = np.zeros(w.shape, np.uint8)
    scales = np.zeros((d_out, n_groups), np.float32)
    zeros = np.zeros_like(scales)
    for j in range(n_groups):
        cols = slice(j * g, (j + 1) * g)
        s, z = np_group_params(w[:, cols], maxq, np.dtype(np.float32))
        codes[:, cols] = np_quant(w[:, cols], s[:, None], z[:, None], np.float32(maxq))[0]
        scales[:, j], zeros[:, j] = s, z
    return codes, scales, zeros


def np_gptq(w: np.ndarray, h: np.ndarray, bits: int, g: int, damp: float = 0.01):
    """Plain GPTQ column loop (no lazy blocks), float64, dead columns kept."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    d_out, d_in = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(d_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    maxq = 2**bits - 1
    codes = np.zeros(w.shape, np.uint8)
    scales = np.zeros((d_out, -(-d_in // g)))
    zeros = np.zeros_like(scales)
    for j in range(d_in):
        if j % g == 0:
            s, z = np_group_params(w[:, j : j + g], maxq, np.dtype(np.float64))
            scales[:, j // g], zeros[:, j // g] = s, z
        code, q = np_quant(w[:, j], s, z, maxq)
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
        codes[:, j] = code
    return codes, scales, zeros


def np_dequant(codes, scales, zeros, g):
    s = np.repeat(scales, g, axis=1)[:, : codes.shape[1]]
    z = np.repeat(zeros, g, axis=1)[:, : codes.shape[1]]
    return s * (codes - z)


def correlated_inputs(rng, n, d, rank=None):
    """Strongly correlated activations (a few dominant directions plus noise)."""
    rank = rank or max(2, d // 4)
    base = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
    return (base + 0.1 * rng.standard_normal((n, d))).astype(np.float32)


def hess_err(w, w_hat, h):
    d = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    return float(np.sum((d @ np.asarray(h, np.float64)) * d))


# ---------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,bits,group",
    [((8, 64), 4, 16), ((5, 80), 3, 32), ((7, 33), 2, 64), ((4, 50), 8, None), ((6, 12), 1, 5)],
)
def test_rtn_matches_numpy_oracle(shape, bits, group):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q = quantize_rtn(w, bits, group)
    g = shape[1] if group is None or group > shape[1] else group
    codes, scales, zeros = np_rtn(w, bits, g)
    assert q.group_size == g and q.bits == bits
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == shape
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.scales, scales)
    np.testing.assert_array_equal(q.zeros, zeros)
    np.testing.assert_allclose(dequantize(q), np_dequant(codes, scales, zeros, g), rtol=0, atol=0)


def _check_rtn_invariants(w: np.ndarray, q: QuantizedTensor):
    maxq = 2**q.bits - 1
    codes = np.asarray(q.codes)
    assert codes.min() >= 0 and codes.max() <= maxq
    w_hat = np.asarray(dequantize(q), np.float64)
    assert np.all(np.isfinite(w_hat))
    scale = np.repeat(np.asarray(q.scales, np.float64), q.group_size, axis=1)[:, : w.shape[1]]
    zero = np.repeat(np.asarray(q.zeros, np.float64), q.group_size, axis=1)[:, : w.shape[1]]
    # float32 rounding of w / scale and of the dequantization, relative to the grid.
    slack = scale * (np.abs(zero) + maxq + 2) * 4 * np.finfo(np.float32).eps
    assert np.all(np.abs(w - w_hat) <= scale / 2 + slack)


def test_rtn_error_bound_and_code_range():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 96)) * np.exp(rng.standard_normal((16, 1)))).astype(np.float32)
    w[3, :32] += 5.0  # a group of one sign: zero point outside [0, maxq]
    for bits in range(1, 9):
        _check_rtn_invariants(w, quantize_rtn(w, bits, 32))


def test_rtn_more_bits_lower_error():
    rng = np.random.default_rng(2)
    for _ in range(3):
        w = rng.standard_normal((32, 128)).astype(np.float32)
        errs = [
            float(qz.relative_error(w, dequantize(quantize_rtn(w, b, 32)))) for b in range(1, 9)
        ]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        # Roughly 4x less squared error per extra bit.
        assert errs[-1] < 1e-3 * errs[1]


def test_rtn_constant_groups_exact_and_finite():
    w = np.zeros((4, 64), np.float32)
    w[1] = 3.5
    w[2, :32] = -0.25
    w[2, 32:] = np.linspace(-1, 1, 32)
    w[3, :32] = 1.0 + np.float32(1e-7) * np.arange(32)  # nearly constant
    w[3, 32:] = 7.0
    for bits in (1, 2, 4, 8):
        q = quantize_rtn(w, bits, 32)
        w_hat = np.asarray(dequantize(q))
        assert np.all(np.isfinite(np.asarray(q.scales))) and np.all(np.asarray(q.scales) > 0)
        np.testing.assert_array_equal(w_hat[:3, :32], w[:3, :32])
        np.testing.assert_array_equal(w_hat[:2], w[:2])
        np.testing.assert_array_equal(w_hat[3, 32:], w[3, 32:])
        np.testing.assert_allclose(w_hat[3, :32], w[3, :32], rtol=1e-5)
        _check_rtn_invariants(w, q)


def test_group_size_options():
    w = np.random.default_rng(3).standard_normal((3, 576)).astype(np.float32)
    q = quantize_rtn(w, 4)  # default 128: ragged last group of 64
    assert q.group_size == 128 and q.scales.shape == (3, 5)
    assert qz.n_groups(576, 128) == 5 and qz.n_groups(576, None) == 1
    q64 = quantize_rtn(w, 4, 64)
    assert q64.scales.shape == (3, 9)
    np.testing.assert_array_equal(quantize_rtn(w, 4, None).codes, quantize_rtn(w, 4, 576).codes)
    np.testing.assert_array_equal(quantize_rtn(w, 4, -1).scales, quantize_rtn(w, 4, 1000).scales)
    with pytest.raises(ValueError):
        quantize_rtn(w, 9, 64)
    with pytest.raises(ValueError):
        quantize_rtn(w, 0, 64)
    with pytest.raises(ValueError):
        quantize_rtn(w, 4, 0)
    with pytest.raises(ValueError):
        quantize_rtn(w[0], 4, 64)


_finite = st.one_of(
    st.just(0.0),
    st.floats(1e-4, 1e4).flatmap(lambda x: st.sampled_from([x, -x])),
)


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 5),
    d_in=st.integers(1, 40),
    group=st.integers(1, 48),
    bits=st.integers(1, 8),
    data=st.data(),
)
def test_rtn_property(d_out, d_in, group, bits, data):
    vals = data.draw(st.lists(_finite, min_size=d_out * d_in, max_size=d_out * d_in))
    w = np.asarray(vals, np.float32).reshape(d_out, d_in)
    q = quantize_rtn(w, bits, group)
    g = min(group, d_in)
    codes, scales, zeros = np_rtn(w, bits, g)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.scales, scales)
    np.testing.assert_array_equal(q.zeros, zeros)
    assert q.scales.shape == (d_out, -(-d_in // g))
    _check_rtn_invariants(w, q)


# ---------------------------------------------------------------------------
# Hessians
# ---------------------------------------------------------------------------


def test_hessian_and_accumulation():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 50, 24)).astype(np.float32)
    flat = x.reshape(-1, 24).astype(np.float64)
    h_ref = 2 * flat.T @ flat / flat.shape[0]
    np.testing.assert_allclose(qz.hessian(x), h_ref, rtol=1e-5, atol=1e-5)
    state = qz.hessian_init(24)
    for batch in (x[0], x[1, :7], x[1, 7:], x[2]):
        state = qz.hessian_update(state, batch)
    assert int(state.count) == 150
    np.testing.assert_allclose(state.hessian, h_ref, rtol=1e-5, atol=1e-5)
    # Exactly symmetric (the Cholesky factorizations read one triangle).
    for h in (qz.hessian(x), state.hessian):
        np.testing.assert_array_equal(h, np.asarray(h).T)
    # tr(dW H dW^T) = (2/n) ||X dW^T||^2
    dw = rng.standard_normal((5, 24))
    np.testing.assert_allclose(
        qz.hessian_error(np.zeros((5, 24)), dw, h_ref),
        2 / 150 * np.sum((flat @ dw.T) ** 2),
        rtol=1e-5,
    )
    w = rng.standard_normal((5, 24))
    np.testing.assert_allclose(
        qz.relative_error(w, w + dw), np.sum(dw**2) / np.sum(w**2), rtol=1e-5
    )


def test_inverse_hessian_cholesky():
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, 200, 32)
    x[:, 5] = 0.0  # dead input
    h = np.asarray(qz.hessian(x), np.float64)
    u = np.asarray(qz.inverse_hessian_cholesky(h, 0.01), np.float64)
    hd = h.copy()
    hd[5, 5] = 1.0
    hd += 0.01 * np.mean(np.diag(hd)) * np.eye(32)
    assert np.allclose(u, np.triu(u)) and np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u @ hd, np.eye(32), atol=2e-3)
    # Singular H without dampening: retried with more dampening, with a warning.
    singular = np.asarray(qz.hessian(x[:4]), np.float32)
    with pytest.warns(UserWarning, match="damp"):
        u2 = qz.inverse_hessian_cholesky(singular, 0.0)
    assert np.all(np.isfinite(np.asarray(u2)))


# ---------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------

# (d_out, d_in) = (24, 80) with group 32: a ragged last group of 16 columns.
SMALL = (24, 80)


def test_gptq_identity_hessian_equals_rtn():
    w = np.random.default_rng(6).standard_normal(SMALL).astype(np.float32)
    eye = np.eye(SMALL[1], dtype=np.float32)
    for bits in (2, 3, 8):
        q, r = gptq(w, eye, bits, 32, block_size=64), quantize_rtn(w, bits, 32)
        np.testing.assert_array_equal(q.codes, r.codes)
        np.testing.assert_array_equal(q.scales, r.scales)
        np.testing.assert_array_equal(q.zeros, r.zeros)


def _small_problem(seed=7):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(SMALL).astype(np.float32)
    x = correlated_inputs(rng, 256, SMALL[1])
    x[:, 11] = 0.0  # dead column
    return w, np.asarray(qz.hessian(x))


@pytest.mark.parametrize("block_size", [64, 16])  # block a multiple / a divisor of the group
def test_gptq_matches_numpy_reference(block_size):
    w, h = _small_problem()
    for bits in (2, 4):
        codes, scales, zeros = np_gptq(w, h, bits, 32)
        q = gptq(w, h, bits, 32, block_size=block_size)
        # float32 vs float64: a code may flip at a near tie and change later columns a bit.
        mismatch = np.mean(np.asarray(q.codes) != codes)
        assert mismatch < 0.01, mismatch
        ref_err = hess_err(w, np_dequant(codes, scales, zeros, 32), h)
        np.testing.assert_allclose(hess_err(w, dequantize(q), h), ref_err, rtol=1e-2)
        np.testing.assert_allclose(q.scales[:, 0], scales[:, 0], rtol=1e-5)  # first group
        np.testing.assert_allclose(q.scales, scales, rtol=0.1)


@pytest.mark.parametrize("group,block_size", [(32, 64), (None, 128)])
def test_gptq_matches_numpy_reference_x64(group, block_size):
    w, h = _small_problem()
    codes, scales, zeros = np_gptq(w, h, 3, group or SMALL[1])
    with jax.enable_x64(True):
        q = gptq(w.astype(np.float64), h.astype(np.float64), 3, group, block_size=block_size)
        assert q.scales.dtype == jnp.float64
        np.testing.assert_array_equal(q.codes, codes)
        np.testing.assert_allclose(q.scales, scales, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(q.zeros, zeros)


def test_gptq_beats_rtn_on_hessian_error_all_bits():
    rng = np.random.default_rng(8)
    w = rng.standard_normal(SMALL).astype(np.float32)
    h = np.asarray(qz.hessian(correlated_inputs(rng, 512, SMALL[1])))
    qs = gptq_multi(w, h, ALL_BITS, 32)
    for b in ALL_BITS:
        e_gptq = hess_err(w, dequantize(qs[b]), h)
        e_rtn = hess_err(w, dequantize(quantize_rtn(w, b, 32)), h)
        assert e_gptq < 0.8 * e_rtn, (b, e_gptq, e_rtn)
        assert qs[b].bits == b and np.asarray(qs[b].codes).max() <= 2**b - 1
    # Batched over bit widths = one bit width at a time.
    single = gptq(w, h, 3, 32, block_size=128)
    np.testing.assert_array_equal(single.codes, qs[3].codes)
    np.testing.assert_array_equal(single.scales, qs[3].scales)


def test_gptq_input_checks():
    w, h = _small_problem()
    with pytest.raises(ValueError, match="shape"):
        gptq(w, h[:10, :10], 4, 32)
    with pytest.raises(ValueError, match="duplicate"):
        gptq_multi(w, h, (4, 4), 32)
    with pytest.raises(ValueError, match="bits"):
        gptq(w, h, 9, 32)


# ---------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------


def np_pack_oracle(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout, bit by bit: code k at stream bits [k*bits, (k+1)*bits)."""
    stream = [(int(c) >> k) & 1 for c in codes.ravel() for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return np.array(
        [sum(stream[8 * i + j] << j for j in range(8)) for i in range(len(stream) // 8)], np.uint8
    )


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(9)
    for bits in range(1, 9):
        for shape in ((1, 1), (3, 7), (5, 64), (2, 13)):
            codes = rng.integers(0, 2**bits, size=shape, dtype=np.uint8)
            packed = qx.pack_codes(codes, bits)
            assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
            np.testing.assert_array_equal(packed, np_pack_oracle(codes, bits))
            np.testing.assert_array_equal(qx.unpack_codes(packed, bits, shape), codes)
    with pytest.raises(ValueError):
        qx.pack_codes(np.array([[4]], np.uint8), 2)
    with pytest.raises(ValueError):
        qx.unpack_codes(np.zeros(3, np.uint8), 3, (2, 5))


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(10)
    tensors = {
        "model.layers.0.self_attn.q_proj": quantize_rtn(rng.standard_normal((6, 80)), 3, 32),
        "mlp.down": quantize_rtn(rng.standard_normal((4, 40)), 8, None),
        "x": quantize_rtn(rng.standard_normal((2, 9)), 1, 4),
    }
    path = tmp_path / "q.safetensors"
    qx.save_quantized(path, tensors, metadata={"note": "hi"})
    loaded, meta = qx.load_quantized(path, return_metadata=True)
    assert meta == {"note": "hi"} and list(loaded) == list(tensors)
    for name, q in tensors.items():
        r = loaded[name]
        assert (r.bits, r.group_size) == (q.bits, q.group_size)
        for a, b in ((r.codes, q.codes), (r.scales, q.scales), (r.zeros, q.zeros)):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(dequantize(r), dequantize(q))
    # Packed: a 3-bit 6x80 tensor takes 180 bytes of codes.
    from safetensors.numpy import load_file

    raw = load_file(path)
    assert raw["model.layers.0.self_attn.q_proj.codes"].nbytes == 6 * 80 * 3 // 8
    # Foreign safetensors files are rejected.
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an rco_jax"):
        qx.load_quantized(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------


def _layers(seed=11):
    rng = np.random.default_rng(seed)
    h = np.asarray(qz.hessian(correlated_inputs(rng, 256, SMALL[1])))
    weights = {f"l{i}": rng.standard_normal(SMALL).astype(np.float32) for i in range(3)}
    return weights, {n: h for n in weights}  # one shared Hessian (like q/k/v)


def test_database_gptq_cache(tmp_path, monkeypatch):
    weights, hessians = _layers()
    db = qx.build_database(weights, hessians, ALL_BITS, "gptq", 32, tmp_path, progress=False)
    assert not db.from_cache and db.cache_file is not None and db.cache_file.exists()
    assert list(db) == ["l0", "l1", "l2"] and db.bits == ALL_BITS
    for name, w in weights.items():
        direct = gptq_multi(w, hessians[name], ALL_BITS, 32)
        for b in ALL_BITS:
            assert db[name][b].dtype == np.float32 and db[name][b].shape == SMALL
            np.testing.assert_array_equal(db[name][b], dequantize(direct[b]))
            np.testing.assert_allclose(
                db.hessian_error[name][b], hess_err(w, db[name][b], hessians[name]), rtol=1e-4
            )
            np.testing.assert_allclose(
                db.rel_error[name][b],
                np.sum((w - db[name][b]) ** 2) / np.sum(w**2),
                rtol=1e-4,
            )
    names, table = db.error_table("hessian")
    assert names == ["l0", "l1", "l2"] and table.shape == (3, 6)
    assert np.all(np.diff(table, axis=1) < 0)  # more bits, less error

    # Second call: read from disk, nothing quantized.
    def boom(*a, **k):
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(qx, "gptq_multi", boom)
    db2 = qx.build_database(weights, hessians, ALL_BITS, "gptq", 32, tmp_path, progress=False)
    assert db2.from_cache and db2.key == db.key and list(db2) == list(db)
    for name in weights:
        for b in ALL_BITS:
            np.testing.assert_array_equal(db2[name][b], db[name][b])
            assert db2.hessian_error[name][b] == db.hessian_error[name][b]
            assert db2.rel_error[name][b] == db.rel_error[name][b]
            np.testing.assert_array_equal(db2.quantized[name][b].codes, db.quantized[name][b].codes)

    # Any change of inputs or configuration rebuilds (here: it must call GPTQ).
    changed_w = dict(weights, l1=weights["l1"] * 1.01)
    for kwargs in (
        dict(weights=weights, damp=0.02),
        dict(weights=weights, block_size=16),
        dict(weights=changed_w),
    ):
        with pytest.raises(AssertionError, match="quantized again"):
            qx.build_database(
                kwargs.pop("weights"), hessians, ALL_BITS, "gptq", 32, tmp_path,
                progress=False, **kwargs,
            )  # fmt: skip


def test_database_rtn_and_config_changes(tmp_path):
    weights, hessians = _layers()
    db = qx.build_database(weights, None, (2, 4), "rtn", 32, tmp_path, progress=False)
    assert np.isnan(db.hessian_error["l0"][2])
    np.testing.assert_array_equal(db["l2"][4], dequantize(quantize_rtn(weights["l2"], 4, 32)))
    again = qx.build_database(weights, None, (4, 2), "rtn", 32, tmp_path, progress=False)
    assert again.from_cache and again.bits == (2, 4)
    other = qx.build_database(weights, None, (2, 4), "rtn", 16, tmp_path, progress=False)
    assert not other.from_cache and other.key != db.key
    with_h = qx.build_database(weights, hessians, (2, 4), "rtn", 32, tmp_path, progress=False)
    assert not with_h.from_cache and np.isfinite(with_h.hessian_error["l0"][2])
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # An explicit file path: a different configuration overwrites it.
    file = tmp_path / "sub" / "db.safetensors"
    a = qx.build_database(weights, None, (2,), "rtn", 32, file, progress=False)
    b = qx.build_database(weights, None, (3,), "rtn", 32, file, progress=False)
    assert a.cache_file == b.cache_file == file and not b.from_cache
    assert json.loads(qx.read_metadata(file)["config"])["bits"] == [3]
    # A damaged cache file is rebuilt (with a warning), not trusted.
    file.write_bytes(file.read_bytes()[:-40])
    with pytest.warns(UserWarning, match="unreadable"):
        c = qx.build_database(weights, None, (3,), "rtn", 32, file, progress=False)
    assert not c.from_cache
    assert qx.build_database(weights, None, (3,), "rtn", 32, file, progress=False).from_cache
    with pytest.raises(ValueError, match="Hessian"):
        qx.build_database(weights, None, (2,), "gptq", 32, None, progress=False)
    with pytest.raises(ValueError, match="method"):
        qx.build_database(weights, None, (2,), "awq", 32, None, progress=False)


# ---------------------------------------------------------------------------
# Slow: SmolLM2 shapes
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536)])
def test_gptq_smollm2_shapes(shape):
    rng = np.random.default_rng(12)
    d_out, d_in = shape
    w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    h = np.asarray(qz.hessian(correlated_inputs(rng, 2048, d_in, rank=64)))
    qs = gptq_multi(w, h, ALL_BITS, 128)  # compiles
    t = time.perf_counter()
    qs = gptq_multi(w, h, ALL_BITS, 128)
    jax.block_until_ready([q.codes for q in qs.values()])
    elapsed = time.perf_counter() - t
    warnings.warn(f"GPTQ {shape}, 6 bit widths: {elapsed:.2f} s", stacklevel=1)
    for b in ALL_BITS:
        e_gptq = hess_err(w, dequantize(qs[b]), h)
        e_rtn = hess_err(w, dequantize(quantize_rtn(w, b, 128)), h)
        assert e_gptq < e_rtn
