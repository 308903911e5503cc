"""llama.cpp tensor types as search options, and the mixed-precision GGUF files they make.

Types. A ggml type stores a row in blocks of ``block_size`` weights, ``type_size`` bytes each,
so it costs exactly ``8 type_size / block_size`` bits per weight:

====== ===== ===== =====
type   block bytes bits
====== ===== ===== =====
MXFP4  32    17    4.25
Q4_0   32    18    4.5
Q4_1   32    20    5.0
Q5_0   32    22    5.5
Q5_1   32    24    6.0
Q8_0   32    34    8.5
====== ===== ===== =====

These are :data:`QUANTIZABLE`: the ``gguf`` package quantizes them byte for byte as llama.cpp
does (round to nearest, no importance matrix). K-quants (``Q2_K`` .. ``Q6_K``, block 256) and
IQ types are dequantize-only there, so they are not options here. A type fits a tensor when its
block size divides the row length (:func:`fits`); a search space with per-tensor option sets
would handle block-256 types on SmolLM2's ``ffn_down`` only.

Search space. For every linear ``n`` and type ``k`` the candidate is
``W_nk = dequantize(quantize(W_n, k))`` (:func:`build_database`), the cost of type ``k`` is
its bits per weight times ``P_n``, and the budget is the average bits per weight of the
linears, so the file's size is known exactly before it is written. Rows are quantized
independently, so the candidates do not depend on llama.cpp's q/k row permutation.

Files. :func:`write_gguf` copies a source GGUF (metadata, tokenizer, every other tensor byte for
byte) and re-quantizes each linear from the source's dequantized values to its assigned
type; :func:`tensor_types` and :func:`linear_bits_per_weight` read a file back.

Example::

    db = build_database({"layers.0.mlp.down": w}, types=("Q4_0", "Q8_0"))
    db["layers.0.mlp.down"]["Q4_0"]                      # float32, what llama.cpp computes with
    write_gguf(src, "out.gguf", {"blk.0.ffn_down.weight": "Q4_0"})
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rco_jax.lm import assets
from rco_jax.lm import model as lm
from rco_jax.lm.extras import require
from rco_jax.quant.export import QuantDatabase, database_key, layer_errors

__all__ = [
    "DEFAULT_TYPES",
    "QUANTIZABLE",
    "GGMLType",
    "build_database",
    "dequantize",
    "fits",
    "gguf_assignment",
    "linear_bits_per_weight",
    "quantize",
    "tensor_types",
    "type_info",
    "write_gguf",
]

#: Types that the ``gguf`` package quantizes byte-identically to llama.cpp (ascending bits).
QUANTIZABLE: tuple[str, ...] = ("MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
#: The options of ``--format gguf`` (all of :data:`QUANTIZABLE`).
DEFAULT_TYPES: tuple[str, ...] = QUANTIZABLE


class GGMLType(NamedTuple):
    """A ggml tensor type: ``name``, ``block_size`` weights per block, ``type_size`` bytes per
    block, and its exact ``bits_per_weight`` (``8 type_size / block_size``)."""

    name: str
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    @property
    def quant_type(self) -> Any:
        return getattr(require("gguf").GGMLQuantizationType, self.name)


def type_info(name: str) -> GGMLType:
    """The :class:`GGMLType` of a type name (e.g. ``"Q5_0"``); ``ValueError`` listing the
    searchable types if it is unknown or cannot be quantized here."""
    gguf = require("gguf", purpose="llama.cpp tensor types")
    if name not in QUANTIZABLE:
        known = name in gguf.GGMLQuantizationType.__members__
        why = (
            "llama.cpp knows it, but the gguf package cannot quantize it byte-identically"
            if known
            else "not a ggml type"
        )
        raise ValueError(
            f"type {name!r} cannot be searched ({why}); choose from {', '.join(QUANTIZABLE)}"
        )
    qt = getattr(gguf.GGMLQuantizationType, name)
    block, size = gguf.constants.GGML_QUANT_SIZES[qt]
    return GGMLType(name, int(block), int(size))


def fits(name: str, shape: Sequence[int]) -> bool:
    """Whether type ``name`` can store a ``(rows, row_length)`` tensor (its block size divides
    the row length)."""
    return shape[-1] % type_info(name).block_size == 0


def _check_fits(name: str, shape: Sequence[int], tensor: str) -> None:
    if not fits(name, shape):
        raise ValueError(
            f"{tensor}: rows of {shape[-1]} weights do not split into {name}'s blocks of "
            f"{type_info(name).block_size}"
        )


def quantize(w: Any, name: str) -> np.ndarray:
    """llama.cpp's ``name`` quantization of a ``(rows, row_length)`` float tensor: ``uint8``
    ``(rows, row_length / block_size * type_size)``."""
    w = np.ascontiguousarray(np.asarray(w, np.float32))
    _check_fits(name, w.shape, "tensor")
    return require("gguf").quants.quantize(w, type_info(name).quant_type)


def dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    """The float32 values of :func:`quantize`'s bytes (what llama.cpp computes with)."""
    out = require("gguf").quants.dequantize(raw, type_info(name).quant_type)
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------- database


def _cache_entry(name: str, t: str) -> str:
    return f"{name}@{t}"


def _load_cached(file: Path, key: str, names: list[str], types: tuple[str, ...], config):
    st = require("safetensors")
    try:
        with st.safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            raw = {n: {t: f.get_tensor(_cache_entry(n, t)) for t in types} for n in names}
        errors = json.loads(meta["errors"])
    except Exception as exc:  # unreadable or truncated cache: rebuild it
        warnings.warn(f"ignoring unreadable GGUF database cache {file}: {exc}", stacklevel=3)
        return None
    dequant = {n: {t: dequantize(raw[n][t], t) for t in types} for n in names}
    rel = {n: {t: float(errors[n]["relative"][t]) for t in types} for n in names}
    hes = {n: {t: float(errors[n]["hessian"][t]) for t in types} for n in names}
    return QuantDatabase(dequant, raw, rel, hes, types, config, key, file, True, names)


def _save_cache(file: Path, key: str, db: QuantDatabase) -> None:
    errors = {n: {"relative": db.rel_error[n], "hessian": db.hessian_error[n]} for n in db.names}
    arrays = {_cache_entry(n, t): q for n, per in db.quantized.items() for t, q in per.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
    os.close(fd)
    try:
        meta = {"key": key, "errors": json.dumps(errors, sort_keys=True)}
        require("safetensors.numpy").save_file(arrays, tmp, metadata=meta)
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_database(
    weights: Mapping[str, Any],
    hessians: Mapping[str, Any] | None = None,
    types: Sequence[str] = DEFAULT_TYPES,
    progress: bool = True,
    cache_path: str | os.PathLike | None = None,
) -> QuantDatabase:
    """Every ``(d_out, d_in)`` weight quantized to every type, with per-layer errors.

    The same :class:`~rco_jax.quant.export.QuantDatabase` as the bit-width database, keyed by
    type name: ``db[name][type]`` is the dequantized float32 weight, ``db.quantized[name][type]``
    the llama.cpp bytes, ``db.bits`` the type names (in the given, ascending-cost order).
    With ``cache_path`` (a directory) the bytes and errors are cached in one safetensors file
    keyed by a hash of the weights, Hessians, types and the ``gguf`` version (SmolLM2: ~30 s
    to build, a few seconds to read back).
    """
    types = tuple(types)
    infos = [type_info(t) for t in types]
    bpw = [i.bits_per_weight for i in infos]
    if list(bpw) != sorted(set(bpw)):
        raise ValueError(f"types must have strictly increasing bits per weight; got {types}")
    hessians = dict(hessians or {})
    names = list(weights)
    require("gguf")
    config = {"format": "gguf", "types": list(types), "gguf": importlib.metadata.version("gguf")}
    file = key = None
    if cache_path is not None:
        w32 = {n: np.ascontiguousarray(np.asarray(weights[n], np.float32)) for n in names}
        h32 = {n: np.asarray(h, np.float32) for n, h in hessians.items() if h is not None}
        key = database_key(w32, h32, config)
        file = Path(cache_path) / f"ggufdb-{key[:20]}.safetensors"
        if file.exists():
            db = _load_cached(file, key, names, types, config)
            if db is not None:
                return db
    dequant: dict[str, dict[str, np.ndarray]] = {}
    raw: dict[str, dict[str, np.ndarray]] = {}
    rel: dict[str, dict[str, float]] = {}
    hes: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc=f"GGUF {len(types)} types", disable=not progress):
        w = np.ascontiguousarray(np.asarray(weights[name], np.float32))
        for t in types:
            _check_fits(t, w.shape, name)
        raw[name] = {t: quantize(w, t) for t in types}
        dequant[name] = {t: dequantize(raw[name][t], t).reshape(w.shape) for t in types}
        h = hessians.get(name)
        r, e = layer_errors(
            jnp.asarray(w),
            jnp.asarray(np.stack([dequant[name][t] for t in types])),
            None if h is None else jnp.asarray(h),
        )
        r, e = np.asarray(r, np.float64), np.asarray(e, np.float64)
        rel[name] = {t: float(r[k]) for k, t in enumerate(types)}
        hes[name] = {t: float(e[k]) for k, t in enumerate(types)}
    db = QuantDatabase(dequant, raw, rel, hes, types, config, key or "", file, False, names)
    if file is not None:
        _save_cache(file, key, db)
    return db


# ----------------------------------------------------------------------------- files


def gguf_assignment(types_by_linear: Mapping[str, str]) -> dict[str, str]:
    """``{linear name: type}`` (``"layers.3.mlp.down"``) -> ``{GGUF tensor name: type}``
    (``"blk.3.ffn_down.weight"``)."""
    return {lm.gguf_tensor_name(n): t for n, t in types_by_linear.items()}


def write_gguf(
    source: str | os.PathLike | None,
    path: str | os.PathLike,
    types: Mapping[str, str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a copy of the ``source`` GGUF (default: the cached SmolLM2) with each tensor of
    ``types`` (``{GGUF tensor name: type name}``) re-quantized to its type from the source's
    dequantized values; everything else (metadata, tokenizer, other tensors) is copied as is.
    ``metadata`` adds string keys (e.g. ``{"rco_jax.method": "rco"}``). The file is written
    to a temporary name and renamed, so a failure never leaves a partial file."""
    gguf = require("gguf", purpose="writing GGUF files")
    reader = assets.gguf_reader(source)
    by_name = {t.name: t for t in reader.tensors}
    unknown = sorted(set(types) - set(by_name))
    if unknown:
        raise KeyError(f"{unknown[:3]} are not tensors of {source or assets.model_path()}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = reader.fields["general.architecture"].contents()
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        for key, value in (metadata or {}).items():
            writer.add_string(key, str(value))
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if t.name in types:
                src = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
                _check_fits(types[t.name], shape, t.name)
                q = quantize(src, types[t.name])
                writer.add_tensor(t.name, q, raw_dtype=type_info(types[t.name]).quant_type)
            elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(t.name, np.array(t.data).reshape(shape))
            else:
                writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: type name}`` of a GGUF file."""
    return {t.name: t.tensor_type.name for t in assets.gguf_reader(path).tensors}


def linear_bits_per_weight(path: str | os.PathLike, config: lm.LlamaConfig) -> float:
    """Exact average bits per weight of a GGUF file's linear layers (their bytes, as stored)."""
    by_name = {t.name: t for t in assets.gguf_reader(path).tensors}
    bits = weights = 0
    for name in lm.linear_names(config):
        t = by_name[lm.gguf_tensor_name(name)]
        bits += 8 * int(t.n_bytes)
        weights += int(t.n_elements)
    return bits / weights
