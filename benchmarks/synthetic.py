"""The paper's synthetic benchmarks: RCO vs penalty vs evolutionary search.

1. Decomposable multiple-choice knapsack with a known optimum (the exact DP):
   N in {100, 1000}, K=8, random values in [0, 1), integer costs in [1, 20],
   budget at 30-70% of the cost range. The optimizers only see gradients of
   ``loss(W) = -sum(W * values)``. Reported: fraction of the optimal value
   reached, feasibility, wall-clock; penalty across several lambdas;
   evolutionary search given RCO's wall-clock.
2. Non-decomposable: ``loss(W) = <lin, W> + vec(W)^T Q vec(W)`` with a random
   symmetric coupling Q between all groups, N=12, K=3 (531,441 assignments),
   optimum by exhaustive enumeration, 20 seeds (solved in one vmapped call), in
   three families: slack budget, binding budget, weaker coupling. RCO with the
   equality and the inequality budget, best of 8 restarts, penalty, and
   evolutionary search given the restarts' wall-clock.
3. The relaxed budget error |C(alpha) - B| / B over the steps, RCO vs penalty
   (PNG plot).

Usage: python benchmarks/synthetic.py [--quick] [--json OUT] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_json  # noqa: E402

from rco_jax import BudgetConstraint, knapsack, solve  # noqa: E402
from rco_jax.baselines import evolutionary, penalty  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.loss)
    return out, time.perf_counter() - start


def knapsack_instance(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 21, size=(n, k)).astype(np.float32)
    values = rng.uniform(0, 1, size=(n, k)).astype(np.float32)
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    frac = rng.uniform(0.3, 0.7)
    budget = float(np.floor(lo + frac * (hi - lo)))
    return costs, values, budget, frac


def decomposable(n: int, steps: int, lams, seed: int = 0) -> dict:
    costs, values, budget, frac = knapsack_instance(n, 8, seed)
    c = BudgetConstraint(costs, budget)
    _, opt = knapsack(values, costs, budget)
    opt = float(opt)
    loss = lambda w: -jnp.sum(w * values)
    key = jax.random.key(seed)
    rows = {}

    def row(name, res, secs):
        rows[name] = dict(
            fraction_of_optimum=float(-res.loss) / opt,
            cost=float(res.cost),
            feasible=bool(float(res.cost) <= budget),
            seconds=secs,
            max_rel_budget_error=float(jnp.max(jnp.abs(res.history["budget_error"]))) / budget,
            budget_error=np.abs(np.asarray(res.history["budget_error"])) / budget,
        )

    res, secs = timed(
        lambda: solve(loss, c, key=key, num_steps=steps, learning_rate=0.1, progress=False)
    )
    row("rco", res, secs)
    rco_secs = secs
    for lam in lams:
        res, secs = timed(
            lambda lam=lam: penalty(
                loss, c, key=key, lam=lam, num_steps=steps, learning_rate=0.1, progress=False
            )
        )
        row(f"penalty lam={lam:g}", res, secs)
        # The plain penalty answer: per-group argmax of the final logits, no DP repair.
        plain = jnp.argmax(res.logits, -1)
        p_cost = float(jnp.sum(jnp.take_along_axis(jnp.asarray(costs), plain[:, None], 1)))
        rows[f"penalty lam={lam:g}"].update(
            argmax_fraction=float(jnp.sum(jnp.take_along_axis(values, plain[:, None], 1))) / opt,
            argmax_cost=p_cost,
            argmax_feasible=p_cost <= budget,
        )
    for mutation in ("level", "random"):
        res, secs = timed(
            lambda m=mutation: evolutionary(
                loss,
                c,
                key=key,
                num_generations=10**7,
                offspring=32,
                mutation=m,
                time_limit=rco_secs,
                progress=False,
            )
        )
        row(f"evolutionary ({mutation}, = RCO time)", res, secs)
        rows[f"evolutionary ({mutation}, = RCO time)"]["evaluations"] = int(
            res.history["evaluations"][-1]
        )
    return dict(n=n, k=8, budget=budget, budget_fraction=frac, optimum=opt, methods=rows)


FAMILIES = (
    # name, coupling scale, cost bias of the linear term, note
    ("slack budget", 1.0, 0.0, "random linear terms: the budget is slack at most optima"),
    ("binding budget", 1.0, 0.5, "dearer options pay off (as with bits): the budget binds"),
    ("weak coupling", 0.5, 0.0, "the slack family with half the coupling"),
)


def quadratic_instance(seed: int, n: int, k: int, costs: np.ndarray, coupling=1.0, bias=0.0):
    """``lin`` (N, K), symmetric cross-group ``q`` (NK, NK), budget fraction of the range.

    ``bias`` > 0 subtracts ``bias * cost`` from the linear term (dearer options
    are better, so the budget binds); ``coupling`` scales ``q``.
    """
    rng = np.random.default_rng(1000 + seed)
    lin = rng.normal(size=(n, k)) - bias * np.asarray(costs)[:k]
    q = rng.normal(size=(n * k, n * k)) / np.sqrt(n * k)
    # Interactions between different groups only: within a group a one-hot row
    # makes every cross term vanish, so those entries would only bias the gradient.
    q = coupling * (q + q.T) / 2 * (1 - np.kron(np.eye(n), np.ones((k, k))))
    budget = float(rng.uniform(0.35, 0.65))
    return lin.astype(np.float32), q.astype(np.float32), budget


def quad_loss(w, lin, q):
    v = w.reshape(-1)
    return jnp.sum(lin * w) + v @ q @ v


@functools.lru_cache(maxsize=4)
def _all_assignments(n: int, k: int) -> np.ndarray:
    return np.array(list(itertools.product(range(k), repeat=n)), np.int32)


@jax.jit
def _batch_quad_loss(assignments, lin, q):
    k = lin.shape[-1]
    return jax.vmap(lambda a: quad_loss(jax.nn.one_hot(a, k), lin, q))(assignments)


def enumerate_optimum(lin, q, costs: np.ndarray, budget: float) -> tuple[float, float]:
    """(minimum within the budget, minimum over all assignments), by enumeration."""
    n, k = lin.shape
    all_a = _all_assignments(n, k)
    ok = costs[np.arange(n), all_a].sum(1) <= budget
    # lin and q are arguments, not constants, so every seed reuses one compilation.
    vals = np.concatenate(
        [
            np.asarray(_batch_quad_loss(all_a[i : i + (1 << 16)], lin, q))
            for i in range(0, len(all_a), 1 << 16)
        ]
    )
    return float(vals[ok].min()), float(vals.min())


def _scores(losses, optima) -> dict:
    losses = [float(x) for x in losses]
    return dict(
        loss=losses,
        hit=[abs(a - o) <= 1e-4 * max(1.0, abs(o)) for a, o in zip(losses, optima)],
        rel_gap=[(a - o) / abs(o) for a, o in zip(losses, optima)],
    )


def non_decomposable_family(
    family: tuple,
    seeds: int,
    steps: int,
    lr: float,
    n: int = 12,
    k: int = 3,
    restarts: int = 8,
    first_seed: int = 0,
) -> dict:
    """All methods on one instance family; RCO runs every seed in one vmapped call."""
    name, coupling, bias, note = family
    costs_k = np.array([1.0, 2.0, 4.0, 8.0], np.float32)[:k]
    full = np.broadcast_to(costs_k, (n, k))
    lo, hi = full.min(1).sum(), full.max(1).sum()
    inst = [quadratic_instance(first_seed + s, n, k, costs_k, coupling, bias) for s in range(seeds)]
    lins = jnp.asarray(np.stack([i[0] for i in inst]))
    qs = jnp.asarray(np.stack([i[1] for i in inst]))
    budgets = jnp.asarray([np.floor(lo + i[2] * (hi - lo)) + 0.5 for i in inst], jnp.float32)
    start = time.perf_counter()
    enum = [enumerate_optimum(lins[s], qs[s], full, float(budgets[s])) for s in range(seeds)]
    enum_secs = time.perf_counter() - start
    optima = [e[0] for e in enum]
    binds = [e[0] > e[1] + 1e-6 for e in enum]

    def run(lin, q, b, key, inequality):
        c = BudgetConstraint(costs_k, b, num_groups=n, inequality=inequality)
        loss = lambda w: quad_loss(w, lin, q)  # noqa: E731
        return solve(loss, c, key=key, num_steps=steps, learning_rate=lr, progress=False)

    methods = {}
    keys = jax.random.split(jax.random.key(0), seeds)
    for label, ineq in (("RCO, C = B", False), ("RCO, C <= B", True)):
        start = time.perf_counter()
        res = jax.vmap(lambda *a, i=ineq: run(*a, i))(lins, qs, budgets, keys)
        jax.block_until_ready(res.loss)
        secs = time.perf_counter() - start
        methods[label] = dict(
            _scores(res.loss, optima),
            seconds_all_seeds=secs,
            feasible=[bool(x <= b) for x, b in zip(np.asarray(res.cost), np.asarray(budgets))],
        )

    # Restarts are one `solve` call (`num_restarts`: one vmap, the best feasible run kept),
    # vmapped over the seeds like the single runs; no polish, to measure restarts alone.
    def run_restarts(lin, q, b, key):
        c = BudgetConstraint(costs_k, b, num_groups=n, inequality=True)
        loss = lambda w: quad_loss(w, lin, q)  # noqa: E731
        return solve(
            loss, c, key=key, num_steps=steps, learning_rate=lr, num_restarts=restarts,
            polish=False, progress=False,
        )  # fmt: skip

    start = time.perf_counter()
    swept = jax.vmap(run_restarts)(lins, qs, budgets, jax.random.split(jax.random.key(1), seeds))
    jax.block_until_ready(swept.loss)
    sweep_secs = time.perf_counter() - start
    methods[f"RCO, C <= B, best of {restarts} restarts"] = dict(
        _scores(swept.loss, optima),
        seconds_all_seeds=sweep_secs,
        feasible=[bool(x <= b) for x, b in zip(np.asarray(swept.cost), np.asarray(budgets))],
    )

    pen, evo, pen_secs = [], [], 0.0
    for s in range(seeds):
        c = BudgetConstraint(costs_k, float(budgets[s]), num_groups=n, inequality=True)
        loss = lambda w, s=s: quad_loss(w, lins[s], qs[s])  # noqa: E731
        start = time.perf_counter()
        pen.append(
            penalty(
                loss, c, key=keys[s], lam=10.0, num_steps=steps, learning_rate=lr, progress=False
            ).loss
        )
        pen_secs += time.perf_counter() - start
        evo.append(
            evolutionary(
                loss,
                c,
                key=keys[s],
                num_generations=10**7,
                offspring=16,
                mutation="random",
                time_limit=sweep_secs / seeds,
                progress=False,
            ).loss
        )
    methods["penalty lam=10 (C <= B hinge, + DP repair)"] = dict(
        _scores(pen, optima), seconds_all_seeds=pen_secs
    )
    methods["evolutionary, random moves, = restarts' time"] = dict(
        _scores(evo, optima), seconds_all_seeds=sweep_secs
    )
    return dict(
        family=name,
        note=note,
        coupling=coupling,
        cost_bias=bias,
        n=n,
        k=k,
        seeds=seeds,
        first_seed=first_seed,
        steps=steps,
        learning_rate=lr,
        budget_binds=binds,
        optimum=optima,
        enumeration_seconds=enum_secs,
        methods=methods,
    )


def plot(decomp: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(decomp), figsize=(6 * len(decomp), 4), squeeze=False)
    for ax, d in zip(axes[0], decomp):
        for name, m in d["methods"].items():
            if name.startswith("evolutionary"):
                continue
            err = np.maximum(m["budget_error"], 1e-12)
            ax.semilogy(err, label=name, lw=2 if name == "rco" else 1)
        ax.set_title(f"relaxed budget error, N={d['n']}, K=8")
        ax.set_xlabel("step")
        ax.set_ylabel("|C(alpha) - B| / B  (floored at 1e-12)")
        ax.axhline(np.finfo(np.float32).eps, color="gray", ls=":", lw=1, label="float32 eps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=100 only, 8 seeds, fewer steps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=str(RESULTS / "synthetic_budget_error.png"))
    ap.add_argument("--nd-lr", type=float, default=0.03, help="RCO/penalty lr, non-decomposable")
    ap.add_argument("--nd-first-seed", type=int, default=0, help="first non-decomposable seed")
    args = ap.parse_args()
    sizes, steps, seeds = ((100,), 200, 8) if args.quick else ((100, 1000), 300, 20)
    lams = (0.1, 1.0, 10.0, 100.0)

    decomp = [decomposable(n, steps, lams) for n in sizes]
    print("## Decomposable multiple-choice knapsack (K=8), fraction of the DP optimum\n")
    table = []
    for d in decomp:
        for name, m in d["methods"].items():
            extra = ""
            if "argmax_fraction" in m:
                ok = "feasible" if m["argmax_feasible"] else "OVER budget"
                extra = f"plain argmax: {m['argmax_fraction']:.3f} ({ok})"
            table.append(
                [
                    d["n"],
                    name,
                    f"{m['fraction_of_optimum']:.4f}",
                    "yes" if m["feasible"] else "NO",
                    f"{m['max_rel_budget_error']:.1e}",
                    f"{m['seconds']:.1f}",
                    extra,
                ]
            )
    print(
        markdown_table(
            ["N", "method", "value / optimum", "feasible", "max relaxed |C-B|/B", "s", "note"],
            table,
        )
    )

    nd = [
        non_decomposable_family(f, seeds, steps, args.nd_lr, first_seed=args.nd_first_seed)
        for f in FAMILIES
    ]
    print(
        f"\n## Non-decomposable quadratic, N={nd[0]['n']}, K={nd[0]['k']}, seeds "
        f"{args.nd_first_seed}..{args.nd_first_seed + seeds - 1}, "
        f"{steps} steps, lr {args.nd_lr} (optimum by enumeration)\n"
    )
    rows = []
    for fam in nd:
        binds = sum(fam["budget_binds"])
        for name, r in fam["methods"].items():
            extra = ""
            if "single_run_hit_rate" in r:
                extra = f"single runs: {r['single_run_hit_rate']:.0%}"
            rows.append(
                [
                    f"{fam['family']} (binds in {binds}/{seeds})",
                    name,
                    f"{sum(r['hit'])}/{seeds}",
                    f"{np.median(r['rel_gap']):.1e}",
                    f"{np.max(r['rel_gap']):.1e}",
                    f"{r['seconds_all_seeds']:.1f}",
                    extra,
                ]
            )
    print(
        markdown_table(
            ["family", "method", "hit optimum", "median gap", "worst gap", "s (all seeds)", ""],
            rows,
        )
    )

    plot(decomp, Path(args.plot))
    for d in decomp:
        for m in d["methods"].values():
            m["budget_error"] = m["budget_error"][:: max(1, steps // 100)].tolist()
    out = write_json("synthetic", {"decomposable": decomp, "non_decomposable": nd}, args.json)
    print(f"\nwrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
