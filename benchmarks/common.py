"""Small helpers shared by the benchmark scripts: timing, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

#: Where results go; ``RCO_BENCH_RESULTS`` redirects them (``gpu.sh`` keeps GPU runs apart).
RESULTS = Path(os.environ.get("RCO_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def timings(fn: Callable[[], Any], repeats: int = 7, warmup: int = 1) -> tuple[float, float]:
    """(median, min) wall-clock seconds of ``fn()`` (outputs blocked on), after warm-up calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def median_seconds(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()``, after warm-up calls."""
    return timings(fn, repeats, warmup)[0]


def interleaved_seconds(
    fns: dict[str, Callable[[], Any]], *, repeats: int = 9, warmup: int = 1
) -> dict[str, np.ndarray]:
    """Wall-clock seconds of every ``fn()`` per round, the functions run in turn each round.

    Ratios taken round by round (``times[a] / times[b]``, then their median) stay
    meaningful when the machine's speed drifts during the measurement.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) for name, t in times.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_json(name: str, payload: dict[str, Any], path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float))
    return out
