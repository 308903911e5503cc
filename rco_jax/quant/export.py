"""On-disk format of quantized weights, and the quantized-weight database.

File format (safetensors, never pickle). For every tensor ``name``:

* ``{name}.codes``: uint8, the ``d_out * d_in`` codes bit-packed at ``bits``
  bits each (row-major, little-endian bit order, last byte zero-padded);
* ``{name}.scales``, ``{name}.zeros``: ``(d_out, n_groups)`` as stored in the
  :class:`~rco_jax.quant.quantizers.QuantizedTensor` (float32 by default).

The header metadata key ``rco_jax.quant`` holds JSON
``{"format": "rco_jax.quant/1", "tensors": {name: {"bits", "group_size", "shape"}}}``;
``user`` metadata (str -> str) is stored beside it. Loading reproduces the
tensors bit for bit.

The database (:func:`build_database`) quantizes every layer at every bit width,
records the per-layer reconstruction errors (relative Frobenius and
Hessian-weighted) and caches the result in one such file whose name carries a
hash of the inputs and the configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rco_jax.lm.extras import require
from rco_jax.quant.quantizers import (
    QuantizedTensor,
    as_numpy,
    dequantize,
    gptq_multi,
    inverse_hessian_cholesky,
    quantize_rtn,
)

__all__ = [
    "FORMAT",
    "QuantDatabase",
    "build_database",
    "database_key",
    "layer_errors",
    "load_quantized",
    "pack_codes",
    "read_metadata",
    "save_quantized",
    "unpack_codes",
]

FORMAT = "rco_jax.quant/1"
_META_KEY = "rco_jax.quant"
_USER_KEY = "user"
# Bump when the quantizers' results change, so that stale caches are not reused.
_ALGORITHM_VERSION = 1
_DB_PREFIX = "quantdb"


# ---------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------


def pack_codes(codes: Any, bits: int) -> np.ndarray:
    """Packs integer codes in ``[0, 2^bits)`` into a flat uint8 array.

    The codes are taken in C order; code ``k`` occupies bits
    ``[k * bits, (k + 1) * bits)`` of the stream, least significant bit first,
    and stream bit ``m`` is bit ``m % 8`` of byte ``m // 8``. Size:
    ``ceil(codes.size * bits / 8)`` bytes.
    """
    if int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = np.ascontiguousarray(np.asarray(codes, dtype=np.uint8)).reshape(-1)
    if bits < 8 and codes.size and int(codes.max()) >> bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    n = codes.size
    if bits == 8:
        return codes.copy()
    # Eight codes fill exactly ``bits`` bytes: build them as one little-endian uint64.
    padded = np.zeros(-(-n // 8) * 8, np.uint64)
    padded[:n] = codes
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(padded.reshape(-1, 8) << shifts, axis=1)
    stream = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return np.ascontiguousarray(stream[: -(-n * bits // 8)])


def unpack_codes(packed: Any, bits: int, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 codes of the given ``shape``."""
    if int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = int(np.prod(shape, dtype=np.int64))
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size != -(-n * bits // 8):
        raise ValueError(f"{packed.size} bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.copy().reshape(tuple(shape))
    n_words = -(-n // 8)
    body = np.zeros(n_words * bits, np.uint8)
    body[: packed.size] = packed
    raw = np.zeros((n_words, 8), np.uint8)
    raw[:, :bits] = body.reshape(n_words, bits)
    words = raw.view("<u8").reshape(-1, 1)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (words >> shifts) & np.uint64((1 << bits) - 1)
    return codes.reshape(-1)[:n].astype(np.uint8).reshape(tuple(shape))


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _tensor_arrays(name: str, q: QuantizedTensor) -> dict[str, np.ndarray]:
    codes = np.asarray(q.codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"{name}: codes must be 2-D uint8, got {codes.dtype} {codes.shape}")
    return {
        f"{name}.codes": pack_codes(codes, int(q.bits)),
        f"{name}.scales": np.ascontiguousarray(np.asarray(q.scales)),
        f"{name}.zeros": np.ascontiguousarray(np.asarray(q.zeros)),
    }


def save_quantized(
    path: str | os.PathLike,
    tensors: Mapping[str, QuantizedTensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes quantized tensors to a safetensors file (atomically: temp file + rename).

    Args:
      path: destination file.
      tensors: ``{name: QuantizedTensor}``; names must be unique and non-empty.
      metadata: optional ``str -> str`` user metadata (read back by
        :func:`load_quantized` with ``return_metadata=True``).
    """
    arrays: dict[str, np.ndarray] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, q in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        arrays.update(_tensor_arrays(name, q))
        info[name] = {
            "bits": int(q.bits),
            "group_size": int(q.group_size),
            "shape": [int(s) for s in np.shape(q.codes)],
        }
    if len(arrays) != 3 * len(info):
        raise ValueError("tensor names collide after adding the .codes/.scales/.zeros suffixes")
    header = {_META_KEY: json.dumps({"format": FORMAT, "tensors": info})}
    if metadata is not None:
        user = dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
            raise TypeError("metadata must map str to str")
        header[_USER_KEY] = json.dumps(user, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        require("safetensors.numpy").save_file(arrays, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    with require("safetensors").safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not an rco_jax quantized-weights file")
    info = json.loads(meta[_META_KEY])
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {info.get('format')!r} (expected {FORMAT})")
    user = json.loads(meta[_USER_KEY]) if _USER_KEY in meta else {}
    return info["tensors"], user


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The user metadata of a quantized-weights file (without reading the tensors)."""
    return _read_header(path)[1]


def load_quantized(
    path: str | os.PathLike, *, return_metadata: bool = False
) -> dict[str, QuantizedTensor] | tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """Reads a file written by :func:`save_quantized`.

    Returns ``{name: QuantizedTensor}`` with NumPy arrays (and the user metadata
    if ``return_metadata``).
    """
    info, user = _read_header(path)
    out: dict[str, QuantizedTensor] = {}
    with require("safetensors").safe_open(str(path), framework="numpy") as f:
        for name, meta in info.items():
            bits = int(meta["bits"])
            codes = unpack_codes(f.get_tensor(f"{name}.codes"), bits, meta["shape"])
            out[name] = QuantizedTensor(
                codes,
                f.get_tensor(f"{name}.scales"),
                f.get_tensor(f"{name}.zeros"),
                bits,
                int(meta["group_size"]),
            )
    return (out, user) if return_metadata else out


# ---------------------------------------------------------------------------
# Quantized-weight database
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class QuantDatabase(Mapping):
    """Every layer quantized at every bit width, with per-layer errors.

    Behaves as a read-only mapping ``db[name][bits] -> W_b`` (float32 NumPy,
    ``(d_out, d_in)``), in the order the weights were given.

    Attributes:
      weights: ``{name: {bits: W_b}}`` dequantized weights.
      quantized: ``{name: {bits: QuantizedTensor}}`` (NumPy arrays).
      rel_error: ``{name: {bits: ||W - W_b||^2 / ||W||^2}}``.
      hessian_error: ``{name: {bits: tr((W - W_b) H (W - W_b)^T)}}``; NaN when no
        Hessian was given for the layer.
      bits: the bit widths, ascending.
      config: method, group size, dampening, block size.
      key: hash of inputs and configuration (names the cache file).
      cache_file: where the database is cached (None if not cached).
      from_cache: whether this database was read from the cache.
    """

    weights: dict[str, dict[int, np.ndarray]]
    quantized: dict[str, dict[int, QuantizedTensor]]
    rel_error: dict[str, dict[int, float]]
    hessian_error: dict[str, dict[int, float]]
    bits: tuple[int, ...]
    config: dict[str, Any]
    key: str
    cache_file: Path | None = None
    from_cache: bool = False
    names: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> dict[int, np.ndarray]:
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names or self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def error_table(self, kind: str = "hessian") -> tuple[list[str], np.ndarray]:
        """Errors as an array ``(n_layers, n_bits)`` (rows in layer order, columns
        in ``self.bits`` order); ``kind`` is ``"hessian"`` or ``"relative"``."""
        table = {"hessian": self.hessian_error, "relative": self.rel_error}.get(kind)
        if table is None:
            raise ValueError(f"kind must be 'hessian' or 'relative', got {kind!r}")
        names = list(self)
        return names, np.array([[table[n][b] for b in self.bits] for n in names], np.float64)


def _as_float32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).astype(np.float32, copy=False))


def _digest(x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def database_key(
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dict(config), sort_keys=True).encode())
    seen: dict[int, str] = {}
    for name, w in weights.items():
        h.update(json.dumps(name).encode())
        h.update(_digest(w).encode())
        hess = hessians.get(name)
        if hess is None:
            h.update(b"no-hessian")
        else:
            if id(hess) not in seen:
                seen[id(hess)] = _digest(hess)
            h.update(seen[id(hess)].encode())
    return h.hexdigest()


@jax.jit
def layer_errors(w: jax.Array, w_hats: jax.Array, h: jax.Array | None):
    """``(||W_k - W||^2 / ||W||^2, tr((W_k - W) H (W_k - W)^T))`` for each candidate ``W_k`` of
    ``w_hats (K, d_out, d_in)``; the second is NaN without a Hessian ``h``."""
    d = w_hats - w[None]
    den = jnp.sum(w * w)
    num = jnp.sum(d * d, axis=(1, 2))
    rel = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), num)
    if h is None:
        return rel, jnp.full(rel.shape, jnp.nan, rel.dtype)
    dh = jnp.einsum("koi,ij->koj", d, h, precision=jax.lax.Precision.HIGHEST)
    return rel, jnp.sum(dh * d, axis=(1, 2))


def _cache_file(cache_path: str | os.PathLike, method: str, key: str) -> Path:
    p = Path(cache_path)
    if p.suffix == ".safetensors":
        return p
    return p / f"{_DB_PREFIX}-{method}-{key[:20]}.safetensors"


def _entry(name: str, bits: int) -> str:
    return f"{name}@{bits}"


def _load_database(
    file: Path, key: str, names: list[str], bits: tuple[int, ...]
) -> QuantDatabase | None:
    try:
        if read_metadata(file).get("key") != key:
            return None
        tensors, user = load_quantized(file, return_metadata=True)
        errors = json.loads(user["errors"])
        config = json.loads(user["config"])
        quantized = {n: {b: tensors[_entry(n, b)] for b in bits} for n in names}
        rel = {n: {b: float(errors[n]["relative"][str(b)]) for b in bits} for n in names}
        hes = {n: {b: float(errors[n]["hessian"][str(b)]) for b in bits} for n in names}
    except Exception as exc:  # unreadable or truncated cache: rebuild it
        warnings.warn(f"ignoring unreadable quantization cache {file}: {exc}", stacklevel=3)
        return None
    weights = {
        n: {b: np.asarray(dequantize(q)) for b, q in per_bits.items()}
        for n, per_bits in quantized.items()
    }
    return QuantDatabase(weights, quantized, rel, hes, bits, config, key, file, True, names)


def build_database(
    weights: Mapping[str, Any],
    hessians: Mapping[str, Any] | None = None,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    method: str = "gptq",
    group_size: int | None = 128,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantDatabase:
    """Quantizes every layer at every bit width; cached on disk.

    For each ``name`` and ``b`` in ``bits`` the weight ``W`` is quantized
    (``method="gptq"``: :func:`~rco_jax.quant.quantizers.gptq` with
    ``hessians[name]``, all bit widths in one jitted call; ``"rtn"``:
    :func:`~rco_jax.quant.quantizers.quantize_rtn`) and the errors
    ``||W - W_b||^2 / ||W||^2`` and ``tr((W - W_b) H (W - W_b)^T)`` are recorded
    (the latter is the per-layer proxy of the dynamic-programming baseline; NaN
    without a Hessian).

    Caching: with ``cache_path`` (a directory, or a ``.safetensors`` file path)
    the quantized tensors and errors are stored in one safetensors file, keyed by
    a SHA-256 hash of the weights, Hessians, layer names and the configuration
    (method, bits, group size, dampening, block size, algorithm version). A later
    call with identical inputs reads the file instead of quantizing; any change
    gives another key and a rebuild (in a directory a new file, so configurations
    coexist; an explicit file path is overwritten).

    Args:
      weights: ``{name: (d_out, d_in) array}`` (any float dtype; used as float32).
      hessians: ``{name: (d_in, d_in) array}``, required for GPTQ; layers sharing
        their inputs may share one array object (its factorization is reused).
      bits: bit widths (1..8).
      method: ``"gptq"`` or ``"rtn"``.
      group_size: columns per group (``None``: per row); see the quantizers.
      cache_path: cache directory or file; ``None`` disables caching.
      progress: show a tqdm progress bar while quantizing.
      damp, block_size: GPTQ options.

    Returns:
      A :class:`QuantDatabase` (``db[name][bits]`` is the dequantized float32 weight).
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    bits = tuple(sorted({int(b) for b in bits}))
    hessians = dict(hessians or {})
    if method == "gptq":
        missing = [n for n in weights if n not in hessians]
        if missing:
            raise ValueError(f"GPTQ needs a Hessian for every layer; missing: {missing[:5]}")
    names = list(weights)
    w32 = {n: _as_float32(weights[n]) for n in names}
    h32: dict[str, np.ndarray] = {}
    by_id: dict[int, np.ndarray] = {}
    for n in names:
        if n in hessians and hessians[n] is not None:
            src = hessians[n]
            if id(src) not in by_id:
                by_id[id(src)] = _as_float32(src)
            h32[n] = by_id[id(src)]
    config = {
        "algorithm_version": _ALGORITHM_VERSION,
        "format": FORMAT,
        "method": method,
        "bits": list(bits),
        "group_size": group_size,
        "damp": float(damp) if method == "gptq" else None,
        "block_size": int(block_size) if method == "gptq" else None,
    }
    key = database_key(w32, h32, config)
    file = None if cache_path is None else _cache_file(cache_path, method, key)
    if file is not None and file.exists():
        db = _load_database(file, key, names, bits)
        if db is not None:
            return db

    quantized: dict[str, dict[int, QuantizedTensor]] = {}
    dequant: dict[str, dict[int, np.ndarray]] = {}
    rel: dict[str, dict[int, float]] = {}
    hes: dict[str, dict[int, float]] = {}
    factors: dict[int, jax.Array] = {}
    bar = tqdm(names, desc=f"{method.upper()} {len(bits)} bit widths", disable=not progress)
    for name in bar:
        w = w32[name]
        h = h32.get(name)
        if method == "gptq":
            hid = id(h)
            if hid not in factors:
                factors.clear()  # consecutive layers share inputs; keep one factor
                factors[hid] = inverse_hessian_cholesky(h, damp)
            qs = gptq_multi(
                w, h, bits, group_size, damp=damp, block_size=block_size,
                inverse_cholesky=factors[hid],
            )  # fmt: skip
        else:
            qs = {b: quantize_rtn(w, b, group_size) for b in bits}
        w_hats = jnp.stack([dequantize(qs[b]) for b in bits])
        r, e = layer_errors(jnp.asarray(w), w_hats, None if h is None else jnp.asarray(h))
        quantized[name] = {b: as_numpy(qs[b]) for b in bits}
        w_np = np.asarray(w_hats)
        dequant[name] = {b: w_np[k] for k, b in enumerate(bits)}
        r, e = np.asarray(r, np.float64), np.asarray(e, np.float64)
        rel[name] = {b: float(r[k]) for k, b in enumerate(bits)}
        hes[name] = {b: float(e[k]) for k, b in enumerate(bits)}
    bar.close()

    db = QuantDatabase(dequant, quantized, rel, hes, bits, config, key, file, False, names)
    if file is not None:
        errors = {
            n: {
                "relative": {str(b): rel[n][b] for b in bits},
                "hessian": {str(b): hes[n][b] for b in bits},
            }
            for n in names
        }
        save_quantized(
            file,
            {_entry(n, b): quantized[n][b] for n in names for b in bits},
            metadata={
                "key": key,
                "config": json.dumps(config, sort_keys=True),
                "errors": json.dumps(errors, sort_keys=True),
                "names": json.dumps(names),
            },
        )
    return db
