"""Pruning results on disk: ``mask.json`` and the physically smaller model.

``DIR/mask.json``:

* FFN mode: ``{"layers.<l>.mlp": [kept intermediate neuron indices, ascending]}``;
* depth mode: ``{"layers.<l>.attn": bool, "layers.<l>.mlp": bool}`` (true: kept).

``DIR/model.safetensors`` + ``DIR/config.json``: the pruned model. Layer ``l`` keeps the
columns ``K_l`` of gate/up and the rows ``K_l`` of down (``(D, |K_l|)``, ``(|K_l|, D)``), so its
FFN width is ``|K_l|``, recorded in ``LlamaConfig.intermediate_sizes``; the nnx
:class:`~rco_jax.lm.model.Llama` built from it gives the masked model's logits, since
``W_down(m * h) = W_down[K] h[K]`` for a 0/1 mask ``m`` with support ``K``. Depth mode: a
dropped MLP has width 0 (it adds exactly zero); a dropped attention sub-block loses its
weights (``attn_norm``, ``attn.q/k/v/o``) and is marked in ``LlamaConfig.attention_layers``.

Usage::

    save(out_dir, mask_dict(space, assignment), config, weights, {"method": "rco"})
    config, weights = load_model(out_dir)
    llama = lm.Llama.from_weights(config, weights)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rco_jax.lm import model as lm

__all__ = [
    "CONFIG_FILE",
    "MASK_FILE",
    "MODEL_FILE",
    "load_mask",
    "load_model",
    "mask_dict",
    "pruned_weights",
    "save",
]

MASK_FILE = "mask.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def mask_dict(space: Any, assignment: Any) -> dict[str, Any]:
    """The ``mask.json`` content of an assignment of a :class:`~rco_jax.prune.search.PruneSpace`."""
    keep = space.keep_mask(assignment)
    if space.mode == "depth":
        out: dict[str, Any] = {}
        for layer, (attn, mlp) in enumerate(keep):
            out[f"layers.{layer}.attn"] = bool(attn)
            out[f"layers.{layer}.mlp"] = bool(mlp)
        return out
    return {f"layers.{i}.mlp": np.flatnonzero(row).tolist() for i, row in enumerate(keep)}


def _check_mask(mask: Mapping[str, Any], config: lm.LlamaConfig) -> str:
    """The mask's mode (``"ffn"`` or ``"depth"``); ``ValueError`` if it does not fit ``config``."""
    n_layers, f = config.num_layers, config.intermediate_size
    ffn_keys = {f"layers.{i}.mlp" for i in range(n_layers)}
    depth_keys = ffn_keys | {f"layers.{i}.attn" for i in range(n_layers)}
    if set(mask) == depth_keys and all(isinstance(v, bool) for v in mask.values()):
        return "depth"
    if set(mask) != ffn_keys:
        raise ValueError(
            f"mask keys must be layers.<l>.mlp (FFN mode) or layers.<l>.attn/mlp (depth mode) "
            f"for l < {n_layers}"
        )
    for key, kept in mask.items():
        idx = np.asarray(kept)
        if idx.ndim != 1 or (idx.size and (idx.dtype.kind not in "iu")):
            raise ValueError(f"{key}: expected a list of neuron indices")
        if idx.size and (idx.min() < 0 or idx.max() >= f or np.any(np.diff(idx) <= 0)):
            raise ValueError(f"{key}: indices must be ascending, unique and in [0, {f})")
    return "ffn"


def pruned_weights(
    config: lm.LlamaConfig, weights: Mapping[str, Any], mask: Mapping[str, Any]
) -> tuple[lm.LlamaConfig, dict[str, np.ndarray]]:
    """The physically pruned model: config with per-layer FFN widths, flat float32 weights."""
    mode = _check_mask(mask, config)
    flat = lm.unstack_weights(weights, config) if "blocks" in weights else dict(weights)
    out = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    widths, attention = [], []
    for layer in range(config.num_layers):
        prefix = f"layers.{layer}."
        if mode == "ffn":
            kept = np.asarray(mask[f"{prefix}mlp"], np.int64)
        else:
            kept = np.arange(config.intermediate_size if mask[f"{prefix}mlp"] else 0)
            attention.append(mask[f"{prefix}attn"])
            if not attention[-1]:
                for key in ("attn_norm", "attn.q", "attn.k", "attn.v", "attn.o"):
                    del out[prefix + key]
        out[f"{prefix}mlp.gate"] = np.ascontiguousarray(out[f"{prefix}mlp.gate"][:, kept])
        out[f"{prefix}mlp.up"] = np.ascontiguousarray(out[f"{prefix}mlp.up"][:, kept])
        out[f"{prefix}mlp.down"] = np.ascontiguousarray(out[f"{prefix}mlp.down"][kept, :])
        widths.append(int(kept.size))
    new_config = dataclasses.replace(
        config,
        intermediate_sizes=tuple(widths),
        attention_layers=tuple(attention) if mode == "depth" else config.attention_layers,
    )
    return new_config, out


def save(
    directory: str | os.PathLike,
    mask: Mapping[str, Any],
    config: lm.LlamaConfig,
    weights: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes ``mask.json``, ``model.safetensors`` (pruned) and ``config.json`` to
    ``directory``; returns it."""
    from safetensors.numpy import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    new_config, new_weights = pruned_weights(config, weights, mask)
    (d / MASK_FILE).write_text(json.dumps(dict(mask), indent=1))
    (d / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(new_config), indent=1))
    save_file(
        new_weights, str(d / MODEL_FILE), metadata={k: str(v) for k, v in (metadata or {}).items()}
    )
    return d


def load_mask(directory: str | os.PathLike) -> dict[str, Any]:
    """``mask.json`` of an export directory."""
    return json.loads((Path(directory) / MASK_FILE).read_text())


def load_model(directory: str | os.PathLike) -> tuple[lm.LlamaConfig, dict[str, np.ndarray]]:
    """Config (with per-layer FFN widths) and flat weights of an exported pruned model."""
    from safetensors.numpy import load_file

    d = Path(directory)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} not found: not a pruning export directory")
    raw = json.loads((d / CONFIG_FILE).read_text())
    for key in ("intermediate_sizes", "attention_layers"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    config = lm.LlamaConfig(**raw)
    weights = load_file(str(d / MODEL_FILE))
    shapes = lm.linear_shapes(config)
    for name, shape in shapes.items():
        if weights[name].shape != shape:
            raise ValueError(f"{name}: stored shape {weights[name].shape} != config's {shape}")
    return config, weights
