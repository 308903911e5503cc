"""Export of a mixed-precision assignment, and the quantized model it describes.

Two files describe a quantized model:

* the **assignment** JSON: ``{layer name: bits}`` for every linear (:func:`save_assignment`,
  :func:`load_assignment`);
* the **weights**: for every linear its integer codes (bit-packed), scales and zeros at its
  chosen bit width, in the safetensors format of :mod:`rco_jax.quant.export`
  (:func:`save_quantized_model`); the header's user metadata repeats the assignment.

:func:`load_quantized_model` reads the weights back and returns the fake-quantized model as flat
weights (name -> float32 array, the input of :func:`rco_jax.lm.model.forward`): the
reference model's embedding and norms with every linear replaced by
``dequantize(codes, scales, zeros)``, transposed to the model's ``(in, out)`` kernels.
:func:`quantized_llama` wraps that in a :class:`rco_jax.lm.model.Llama` nnx module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from rco_jax.lm import model as lm
from rco_jax.quant.export import load_quantized, read_metadata, save_quantized
from rco_jax.quant.quantizers import QuantizedTensor, dequantize

__all__ = [
    "average_bits",
    "load_assignment",
    "load_quantized_model",
    "quantized_llama",
    "quantized_weights",
    "save_assignment",
    "save_quantized_model",
]

_ASSIGNMENT_KEY = "assignment"


def average_bits(bits_by_name: Mapping[str, int], config: lm.LlamaConfig) -> float:
    """Parameter-weighted average bit width ``sum_n b_n P_n / sum_n P_n`` over all linears."""
    shapes = lm.linear_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    return sum(int(bits_by_name[n]) * int(np.prod(s)) for n, s in shapes.items()) / total


def _check_assignment(bits_by_name: Mapping[str, int], config: lm.LlamaConfig | None) -> None:
    if config is None:
        return
    names = set(lm.linear_names(config))
    missing, extra = names - set(bits_by_name), set(bits_by_name) - names
    if missing or extra:
        raise ValueError(
            f"assignment does not match the model's linears: missing {sorted(missing)[:3]}, "
            f"unknown {sorted(extra)[:3]}"
        )


def save_assignment(
    path: str | os.PathLike, bits_by_name: Mapping[str, int], config: lm.LlamaConfig | None = None
) -> Path:
    """Writes ``{layer name: bits}`` as JSON (layer order kept); checks the names against
    ``config`` when given."""
    _check_assignment(bits_by_name, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({n: int(b) for n, b in bits_by_name.items()}, indent=1) + "\n")
    return path


def load_assignment(
    path: str | os.PathLike, config: lm.LlamaConfig | None = None
) -> dict[str, int]:
    """Reads :func:`save_assignment`'s JSON."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(b, int) for b in data.values()):
        raise ValueError(f"{path}: expected a JSON object {{layer name: bits}}")
    _check_assignment(data, config)
    return data


def save_quantized_model(
    path: str | os.PathLike,
    bits_by_name: Mapping[str, int],
    quantized: Mapping[str, Mapping[int, QuantizedTensor]],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes the chosen ``quantized[name][bits]`` (codes, scales, zeros) of every layer.

    ``quantized`` is e.g. ``QuantDatabase.quantized`` (quantizers' ``(d_out, d_in)``
    convention). The assignment is stored in the header (key ``"assignment"``) beside the
    optional user ``metadata``.
    """
    tensors = {}
    for name, b in bits_by_name.items():
        if name not in quantized or int(b) not in quantized[name]:
            raise KeyError(f"no {b}-bit quantization of {name!r}")
        tensors[name] = quantized[name][int(b)]
    meta = dict(metadata or {})
    meta[_ASSIGNMENT_KEY] = json.dumps({n: int(b) for n, b in bits_by_name.items()})
    save_quantized(path, tensors, meta)
    return Path(path)


def quantized_weights(
    tensors: Mapping[str, QuantizedTensor], reference: Mapping[str, Any]
) -> dict[str, jnp.ndarray]:
    """Flat fake-quantized weights: ``reference`` with each named linear replaced by its
    dequantized ``(d_out, d_in)`` tensor, transposed to the model's ``(in, out)`` kernel."""
    out = dict(reference)
    for name, q in tensors.items():
        if name not in reference:
            raise KeyError(f"{name!r} is not a weight of the reference model")
        w = dequantize(q).T
        if w.shape != reference[name].shape:
            raise ValueError(f"{name}: quantized shape {w.shape} != {reference[name].shape}")
        out[name] = w
    return out


def load_quantized_model(
    path: str | os.PathLike, reference: Mapping[str, Any]
) -> tuple[dict[str, jnp.ndarray], dict[str, int]]:
    """Reads :func:`save_quantized_model`'s file: ``(flat fake-quantized weights,
    {layer name: bits})``. The embedding and norms come from ``reference``."""
    tensors = load_quantized(path)
    assignment = json.loads(read_metadata(path).get(_ASSIGNMENT_KEY, "{}"))
    if not assignment:
        assignment = {n: int(q.bits) for n, q in tensors.items()}
    return quantized_weights(tensors, reference), assignment


def quantized_llama(
    path: str | os.PathLike, config: lm.LlamaConfig, reference: Mapping[str, Any]
) -> lm.Llama:
    """The fake-quantized model of :func:`save_quantized_model`'s file as an nnx module."""
    weights, _ = load_quantized_model(path, reference)
    return lm.Llama.from_weights(config, weights)
