"""What `solve`'s defaults reach on fresh instances, and what each part contributes.

Families (instances never used for tuning: seeds from 100 on):
1. decomposable multiple-choice knapsack: N in {100, 300, 1000}, K=6, per-group integer
   costs in [1, 20], values U[0, 1), budget at 45% of the cost range; the optimum is the
   exact DP. Score: fraction of the optimal value.
2. small non-decomposable quadratics ``<lin, W> + vec(W)^T Q vec(W)`` (as in
   ``synthetic.py``), N=8, K=3, costs (1, 2, 4), 20 instances; the optimum by enumeration.
   Score: how many reach it.

Configurations: ``solve`` as called with its defaults, then each part alone and together:
restarts (``num_restarts``), the exact-budget polish (``polish``).

Usage: python benchmarks/defaults.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402
from synthetic import enumerate_optimum, quad_loss, quadratic_instance  # noqa: E402

from rco_jax import BudgetConstraint, knapsack, solve  # noqa: E402

COSTS_K = np.array([1.0, 2.0, 4.0], np.float32)


def knapsack_instance(n: int, seed: int):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 21, size=(n, 6)).astype(np.float32)
    values = rng.uniform(0, 1, size=(n, 6)).astype(np.float32)
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    return costs, values, float(np.floor(lo + 0.45 * (hi - lo)))


def quad_instances(seeds):
    full = np.broadcast_to(COSTS_K, (8, 3))
    lo, hi = full.min(1).sum(), full.max(1).sum()
    out = []
    for s in seeds:
        lin, q, frac = quadratic_instance(s, 8, 3, COSTS_K)
        b = float(np.floor(lo + frac * (hi - lo)) + 0.5)
        out.append((lin, q, b, enumerate_optimum(lin, q, full, b)[0]))
    return out


def run_decomposable(configs: dict, sizes, seeds) -> list[dict]:
    rows = []
    for n in sizes:
        for seed in seeds:
            costs, values, budget = knapsack_instance(n, seed)
            opt = float(knapsack(values, costs, budget)[1])
            c = BudgetConstraint(costs, budget)
            loss = lambda w, v=values: -jnp.sum(w * v)  # noqa: E731
            for name, kw in configs.items():
                start = time.perf_counter()
                res = solve(loss, c, key=jax.random.key(seed), progress=False, **kw)
                jax.block_until_ready(res.loss)
                secs = time.perf_counter() - start
                assert float(res.cost) <= budget, (name, float(res.cost), budget)
                rows.append(
                    dict(config=name, n=n, seed=seed, fraction=-float(res.loss) / opt, seconds=secs)
                )
                print(
                    f"  N={n} seed={seed} {name}: {rows[-1]['fraction']:.5f} ({secs:.1f} s)",
                    flush=True,
                )
    return rows


def run_quadratics(configs: dict, seeds) -> dict:
    inst = quad_instances(seeds)
    out = {}
    for name, kw in configs.items():
        hits, secs = 0, 0.0
        for s, (lin, q, b, opt) in zip(seeds, inst):
            c = BudgetConstraint(COSTS_K, b, num_groups=8)
            start = time.perf_counter()
            res = solve(
                lambda w, lin=lin, q=q: quad_loss(w, lin, q),
                c,
                key=jax.random.key(s),
                progress=False,
                **kw,
            )
            loss = float(res.loss)
            secs += time.perf_counter() - start
            assert float(res.cost) <= b
            hits += abs(loss - opt) <= 1e-4 * max(1.0, abs(opt))
        out[name] = dict(hits=int(hits), of=len(seeds), seconds=secs)
        print(f"  quadratics {name}: {hits}/{len(seeds)} ({secs:.1f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default=None, help="indices of the configs to run, e.g. 01")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = {
        "defaults (1 run, polish when cheap)": {},
        "polish off": dict(polish=False),
        "4 restarts, polish off": dict(num_restarts=4, polish=False),
        "4 restarts + polish": dict(num_restarts=4),
    }
    if args.configs:
        configs = {k: v for i, (k, v) in enumerate(configs.items()) if str(i) in args.configs}
    sizes = (100, 1000) if args.quick else (100, 300, 1000)
    dseeds = range(100, 102) if args.quick else range(100, 105)
    qseeds = range(100, 120)
    print("## decomposable knapsack")
    dec = run_decomposable(configs, sizes, dseeds)
    print("## non-decomposable quadratics")
    quad = run_quadratics(configs, qseeds)
    table = []
    for name in configs:
        fr = [r["fraction"] for r in dec if r["config"] == name]
        sec = [r["seconds"] for r in dec if r["config"] == name]
        table.append(
            [
                name,
                f"{min(fr):.4%}",
                f"{np.median(fr):.4%}",
                f"{np.median(sec):.2f}",
                f"{quad[name]['hits']}/{quad[name]['of']}",
                f"{quad[name]['seconds']:.1f}",
            ]
        )
    print(
        markdown_table(
            [
                "config",
                "knapsack min",
                "knapsack median",
                "knapsack s (median)",
                "quadratics at optimum",
                "quadratics s (all)",
            ],
            table,
        )
    )
    print(
        "wrote",
        write_json(
            "defaults" + ("_quick" if args.quick else ""),
            dict(decomposable=dec, quadratics=quad),
            args.json,
        ),
    )


if __name__ == "__main__":
    main()
