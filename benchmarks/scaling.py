"""Sweep throughput on 1/2/4/8 devices: ``rco_jax.sweep`` over 64 problems.

One grid of 64 runs (16 restarts x 2 learning rates x 2 budgets) of a non-decomposable
bit-allocation problem (N = 64 groups, K = 6 bitwidths, 50 RCO steps per run), sharded over
``d`` simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=d``). The
device count is fixed when JAX starts, so each ``d`` runs in its own subprocess.

Reported per device count: the first ``sweep`` call (trace + compile + run, what one call
costs), the compiled grid function alone (median over repeats), runs per second from the
latter, and the best loss (it must not depend on ``d``: the runs are the same, only placed
differently). The 1-device row is the baseline for the speed-up column.

On a machine with few cores this measures the overhead of the SPMD partitioning (simulated
devices share the same cores), not a speed-up: on 2 cores, 8 simulated devices cannot run
more than ~2x faster than 1 (one device's program runs mostly on one core, so 2 devices can
use both). On real accelerators each device runs ``64 / d`` runs.

`--accelerator` adds a row for JAX's default backend (e.g. every GPU of the machine), run
the same way, so a GPU's throughput is compared with the CPU rows of the same run.

Usage: python benchmarks/scaling.py [--devices 1,2,4,8] [--accelerator] [--steps 50]
                                    [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = 64  # 16 restarts x 2 learning rates x 2 budgets
N, BITS = 64, (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)


def child(steps: int, repeats: int) -> dict:
    """Runs in a subprocess with the device count set by XLA_FLAGS; returns the timings."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rco_jax import BudgetConstraint, sweep
    from rco_jax.sweep import _build_sweep

    rng = np.random.default_rng(0)
    bits = jnp.asarray(BITS, jnp.float32)
    params = jnp.asarray(rng.uniform(0.5, 4.0, size=N), jnp.float32)  # weight of each layer
    sens = jnp.asarray(rng.uniform(0.2, 2.0, size=N), jnp.float32)
    mix = jnp.asarray(rng.uniform(0.0, 0.05, size=(N, N)), jnp.float32)
    c = BudgetConstraint(bits, 3.5 * params.sum(), params)

    def loss_fn(w):  # per-layer error, compounding across layers
        e = sens * (w @ 4.0 ** -(bits - 2))
        return jnp.sum(e) + e @ mix @ e

    total = float(params.sum())
    grid = dict(
        num_restarts=RUNS // 4, learning_rates=[0.03, 0.1], budgets=[3.0 * total, 3.5 * total]
    )
    solve_kw = dict(num_steps=steps, chunk_size=steps)
    key = jax.random.key(0)
    start = time.perf_counter()
    out = sweep(loss_fn, c, key=key, **grid, **solve_kw)
    jax.block_until_ready(out)
    first = time.perf_counter() - start
    assert out.loss.shape == (RUNS,)

    # The same grid function, compiled once, to time the call alone.
    run_grid, args, _ = _build_sweep(loss_fn, c, key, *grid.values(), None, solve_kw)
    compiled = run_grid.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    warm = float(np.median(times))
    return {
        "devices": len(jax.devices()),
        "device_kind": jax.devices()[0].device_kind,
        "runs": RUNS,
        "steps": steps,
        "first_call_s": first,
        "compiled_s": warm,
        "runs_per_s": RUNS / warm,
        "best_loss": float(out.best.loss),
        "best_index": int(out.best_index),
        "loss_sharding": str(out.loss.sharding.spec),
        "load_avg_1m": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--accelerator", action="store_true", help="add a row on the default backend (GPU/TPU)"
    )
    ap.add_argument("--json", default=None, help="output path (default results/scaling.json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.steps, a.repeats)), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from common import markdown_table, write_json

    rows = []
    runs: list[tuple[str, dict]] = []
    for d in (int(x) for x in a.devices.split(",")):
        env = dict(os.environ)
        flag = f"--xla_force_host_platform_device_count={d}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        runs.append((f"{d} CPU", env))
    if a.accelerator:
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        runs.append(("default backend", env))
    for label, env in runs:
        cmd = [sys.executable, __file__, "--child", "--steps", str(a.steps)]
        cmd += ["--repeats", str(a.repeats)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{label}: {rows[-1]['runs_per_s']:.1f} runs/s", file=sys.stderr, flush=True)

    base = rows[0]["runs_per_s"]
    table = markdown_table(
        [
            "devices",
            "kind",
            "first call s",
            "compiled call s",
            "runs/s",
            "vs 1 device",
            "best loss",
            "load",
        ],
        [
            [
                r["devices"],
                r.get("device_kind", "cpu"),
                r["first_call_s"],
                r["compiled_s"],
                r["runs_per_s"],
                r["runs_per_s"] / base,
                r["best_loss"],
                r["load_avg_1m"],
            ]
            for r in rows
        ],
    )
    print(
        f"\n{RUNS} runs (N={N}, K={len(BITS)}, {a.steps} steps each), simulated CPU devices, "
        f"{os.cpu_count()} cores: overhead, not speed-up, when devices share cores.\n"
    )
    print(table)
    ref = rows[0]
    same_run = all(r["best_index"] == ref["best_index"] for r in rows)
    rel = max(abs(r["best_loss"] - ref["best_loss"]) / abs(ref["best_loss"]) for r in rows)
    print(
        f"\nsame best run on every device count: {same_run}; best losses agree to {rel:.1e} "
        "(relative; float32 rounding of different vmap batch sizes)"
    )
    payload = {"rows": rows, "same_best_run": same_run, "best_loss_max_rel_diff": rel}
    path = write_json("scaling", payload, a.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
