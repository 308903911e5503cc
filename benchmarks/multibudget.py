"""Multiple budgets: the retraction's Newton solver against generic and cyclic solvers.

1. The paper's validation size, q=16 general budgets, N=500, K=32 (random costs,
   budgets at the expected costs of a random interior point), float32: evaluations
   (softmax passes) and time to ``|C_j - B_j| <= 1e-6`` of each budget's scale, from
   a cold start (random logits, std 3) and after an Adam-sized step (+-0.05 per
   logit from a point on the manifold). Same points, same run:
   * rco_jax's damped Newton on the dual (``retract_with_info``);
   * a generic solver on the same dual: optax L-BFGS (zoom line search);
   * cyclic per-budget bisection (one budget at a time, the reference's style).
2. Per-block budgets, q=30 blocks (30 layers x 16 groups, K=2 keep/prune and K=6
   bit widths): the vectorised per-block retraction against 30 separate scalar
   retractions in one jitted program.
3. One budget (N in {252, 10000}, K=8, the manifold benchmark's problem): today's
   retraction against the single-budget retraction before multiple budgets existed
   (loaded from git commit ``7e162ec``), same points, same run.

Usage: python benchmarks/multibudget.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, median_seconds, write_json  # noqa: E402

from rco_jax import BudgetConstraint, MultiBudget, init_logits, retract_with_info  # noqa: E402

REL = 1e-6
OLD_COMMIT = "7e162ec"


def paper_problem(q: int, n: int, k: int, seed: int = 0, tilt: float = 0.0):
    """Random costs in [0, 5]; budgets at the expected costs of a random interior point.

    The point is ``p ~ Dirichlet(1)`` for ``tilt=0``; otherwise
    ``p = softmax(tilt * sum_j u_j c^(j))`` with random ``u``: the dual minimum is
    then at ``t* = tilt * u`` from the uniform logits, far out, with
    near-vertex probabilities (the budgets near the boundary of the reachable set),
    the hard case for a solver.
    """
    rng = np.random.default_rng(seed)
    tables = rng.uniform(0.0, 5.0, size=(q, n, k))
    if tilt:
        z = tilt * np.tensordot(rng.normal(size=q) / np.sqrt(q), tables, axes=1)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        p = rng.dirichlet(np.ones(k), size=n)
    w = rng.uniform(0.5, 2.0, size=n)
    cons = []
    for c in tables:
        budget = float(np.sum(w * np.sum(p * c, 1)))
        cons.append(
            BudgetConstraint(jnp.asarray(c, jnp.float32), budget, jnp.asarray(w, jnp.float32))
        )
    return MultiBudget(cons)


def starts(mb, n, k, count, seed=1):
    keys = jax.random.split(jax.random.key(seed), count)
    cold = [3.0 * jax.random.normal(kk, (n, k)) for kk in keys]
    on = init_logits(mb, jax.random.normal(jax.random.key(seed + 1), (n, k)))
    step = [on + 0.05 * jnp.sign(jax.random.normal(kk, (n, k))) for kk in keys]
    return {"step": step, "cold": cold}


def _scale(mb):
    lo, hi = mb.budget_ranges()
    return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _dual(x, mb):
    """``F(t)`` and the shifted costs: the same dual the Newton solver minimises."""
    (c,) = mb.cost_leaves()  # (q, n, K)
    w = mb.weights

    def f(t):
        y = x + jnp.tensordot(t, c, axes=1)
        return jnp.sum(w * jax.nn.logsumexp(y, -1)) - jnp.dot(t, mb.budget)

    return f


def lbfgs_solver(mb, max_iter: int):
    scale = _scale(mb)

    def solve(x):
        f = _dual(x, mb)
        opt = optax.lbfgs()
        vg = optax.value_and_grad_from_state(f)

        def body(carry):
            t, state, it, evals, _ = carry
            value, grad = vg(t, state=state)  # reuses the line search's last evaluation
            updates, state = opt.update(grad, state, t, value=value, grad=grad, value_fn=f)
            info = optax.tree.get(state, "info")
            t = optax.apply_updates(t, updates)
            res = optax.tree.get(state, "grad")  # C - B at the accepted point
            return t, state, it + 1, evals + info.num_linesearch_steps, res

        t0 = jnp.zeros((mb.num_budgets,), jnp.float32)
        res0 = jax.grad(f)(t0)
        init = (t0, opt.init(t0), 0, 1, res0)
        out = jax.lax.while_loop(
            lambda s: (jnp.max(jnp.abs(s[4]) / scale) > REL) & (s[2] < max_iter), body, init
        )
        return out[3], jnp.max(jnp.abs(out[4]) / scale)

    return jax.jit(solve)


def cyclic_bisection_solver(mb, max_evals: int):
    """One budget at a time: bisection on ``t_j`` with the others fixed, sweeps until all hold."""
    scale = _scale(mb)
    q = mb.num_budgets
    (c,) = mb.cost_leaves()
    span = jnp.max(jnp.max(c, -1) - jnp.min(c, -1), axis=1)  # (q,)

    def solve(x):
        f = jax.grad(_dual(x, mb))  # C(t) - B

        def one_budget(j, carry):
            t, evals = carry
            g = lambda tj: f(t.at[j].set(tj))[j]

            def grow(s):
                lo, hi, e = s
                width = hi - lo
                return lo - width, hi + width, e + 2

            lo, hi, e = jax.lax.while_loop(
                lambda s: ((g(s[0]) > 0) | (g(s[1]) < 0)) & (s[2] < 200),
                grow,
                (t[j] - 1.0 / span[j], t[j] + 1.0 / span[j], 2),
            )

            def halve(s):
                lo, hi, e = s
                mid = 0.5 * (lo + hi)
                below = g(mid) < 0
                return jnp.where(below, mid, lo), jnp.where(below, hi, mid), e + 1

            lo, hi, e = jax.lax.while_loop(
                lambda s: (
                    (jnp.abs(g(0.5 * (s[0] + s[1]))) > REL * scale[j])
                    & (s[1] - s[0] > 1e-7 * (1 + jnp.abs(s[0])))
                    & (s[2] < 200)
                ),
                halve,
                (lo, hi, e),
            )
            return t.at[j].set(0.5 * (lo + hi)), evals + e + 1

        def sweep(carry):
            t, evals, _ = carry
            t, evals = jax.lax.fori_loop(0, q, one_budget, (t, evals))
            return t, evals + 1, jnp.max(jnp.abs(f(t)) / scale)

        t0 = jnp.zeros((q,), jnp.float32)
        init = (t0, 1, jnp.max(jnp.abs(f(t0)) / scale))
        out = jax.lax.while_loop(lambda s: (s[2] > REL) & (s[1] < max_evals), sweep, init)
        return out[1], out[2]

    return jax.jit(solve)


def coupled_rows(quick: bool):
    q, n, k = 16, 500, 32
    count = 5 if quick else 20
    rows = []
    for family, tilt in (("random", 0.0), ("tilted x3", 3.0), ("tilted x10", 10.0)):
        mb = paper_problem(q, n, k, tilt=tilt)
        rows += _coupled_family(mb, family, n, k, count, quick)
    return dict(q=q, n=n, k=k, rel_tol=REL, rows=rows)


def _coupled_family(mb, family, n, k, count, quick):
    points = starts(mb, n, k, count)
    newton = jax.jit(lambda x: retract_with_info(x, mb, rtol=REL, max_evals=200))
    lbfgs = lbfgs_solver(mb, max_iter=300 if quick else 1000)
    cyclic = cyclic_bisection_solver(mb, max_evals=5000 if quick else 20000)
    scale = np.asarray(_scale(mb))
    rows = []
    for kind, xs in points.items():
        infos = [newton(x)[1] for x in xs]
        ev = [int(i.num_evals) for i in infos]
        res = max(float(np.max(np.abs(np.asarray(i.residual)) / scale)) for i in infos)
        few = xs[: 3 if quick else 5]  # the baselines are slow: fewer points
        lb = [lbfgs(x) for x in few]
        cy = [cyclic(x) for x in few]
        x0 = xs[0]
        rows.append(
            dict(
                family=family,
                start=kind,
                newton_evals_median=float(np.median(ev)),
                newton_evals_max=int(np.max(ev)),
                newton_converged=all(bool(i.converged) for i in infos),
                newton_max_rel_residual=res,
                newton_ms=1e3 * median_seconds(lambda x0=x0: newton(x0), repeats=9),
                lbfgs_evals_median=float(np.median([int(e) for e, _ in lb])),
                lbfgs_max_rel_residual=max(float(r) for _, r in lb),
                lbfgs_ms=1e3 * median_seconds(lambda x0=x0: lbfgs(x0), repeats=3),
                cyclic_evals_median=float(np.median([int(e) for e, _ in cy])),
                cyclic_max_rel_residual=max(float(r) for _, r in cy),
                cyclic_ms=1e3 * median_seconds(lambda x0=x0: cyclic(x0), repeats=3),
            )
        )
        r = rows[-1]
        r["evals_ratio_lbfgs"] = r["lbfgs_evals_median"] / r["newton_evals_median"]
    return rows


def block_rows(quick: bool):
    layers, experts = 30, 16
    n = layers * experts
    blocks = np.repeat(np.arange(layers), experts)
    rng = np.random.default_rng(0)
    out = []
    for name, costs, frac in (
        ("keep/prune K=2", np.array([0.0, 1.0]), 0.25),
        ("bits K=6", np.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0]), 0.45),
    ):
        k = costs.size
        budget = costs.min() * experts + frac * (costs.max() - costs.min()) * experts
        budgets = np.full(layers, budget) + rng.uniform(-0.2, 0.2, size=layers)
        mb = MultiBudget.per_block(
            jnp.asarray(costs, jnp.float32), jnp.asarray(budgets, jnp.float32), jnp.asarray(blocks)
        )
        separate = [
            BudgetConstraint(jnp.asarray(costs, jnp.float32), float(b), num_groups=experts)
            for b in budgets
        ]
        x = 0.05 * jnp.sign(jax.random.normal(jax.random.key(0), (n, k))) + init_logits(mb)
        together = jax.jit(lambda x, mb=mb: retract_with_info(x, mb)[0])

        def apart(x, separate=separate):
            parts = [
                retract_with_info(x[j * experts : (j + 1) * experts], c)[0]
                for j, c in enumerate(separate)
            ]
            return jnp.concatenate(parts)

        apart = jax.jit(apart)
        np.testing.assert_allclose(together(x), apart(x), rtol=1e-4, atol=1e-4)
        t_tog = median_seconds(lambda f=together, x=x: f(x), repeats=9)
        t_apart = median_seconds(lambda f=apart, x=x: f(x), repeats=9)
        out.append(
            dict(
                problem=name,
                q=layers,
                n=n,
                per_block_ms=1e3 * t_tog,
                separate_ms=1e3 * t_apart,
                speedup=t_apart / t_tog,
                evals=int(retract_with_info(x, mb)[1].num_evals),
            )
        )
    return out


def _old_module():
    """The single-budget manifold module as of ``OLD_COMMIT`` (before multiple budgets)."""
    root = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:rco_jax/manifold.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    path = Path(tempfile.mkdtemp()) / "manifold_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("manifold_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def single_rows(quick: bool):
    old = _old_module()
    if old is None:
        return []
    bits = jnp.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0])
    rows = []
    for n in (252, 10000):
        params = jax.random.uniform(jax.random.key(1), (n,), minval=0.2, maxval=4.0)
        c = BudgetConstraint(bits, 4.5 * float(params.sum()), params)
        on = init_logits(c, jax.random.normal(jax.random.key(2), (n, 8)))
        pts = {
            "step": on + 0.05 * jnp.sign(jax.random.normal(jax.random.key(3), (n, 8))),
            "cold": 3.0 * jax.random.normal(jax.random.key(4), (n, 8)),
        }
        new = jax.jit(lambda x, c=c: retract_with_info(x, c))
        prev = jax.jit(lambda x, c=c: old.retract_with_info(x, c))
        for kind, x in pts.items():
            y1, i1 = new(x)
            y0, i0 = prev(x)
            # Same root to the solvers' tolerance (a few ulps of the logits on any backend).
            np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
            # Interleaved repeats so load changes hit both alike.
            t_new, t_old = [], []
            for _ in range(5 if quick else 15):
                t_new.append(median_seconds(lambda f=new, x=x: f(x), repeats=3, warmup=1))
                t_old.append(median_seconds(lambda f=prev, x=x: f(x), repeats=3, warmup=1))
            rows.append(
                dict(
                    n=n,
                    start=kind,
                    evals_new=int(i1.num_evals),
                    evals_old=int(i0.num_evals),
                    new_ms=1e3 * float(np.median(t_new)),
                    old_ms=1e3 * float(np.median(t_old)),
                    ratio=float(np.median(t_new) / np.median(t_old)),
                )
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer starts and repeats")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = ap.parse_args()

    coupled = coupled_rows(args.quick)
    print(
        f"## q={coupled['q']} coupled budgets, N={coupled['n']}, K={coupled['k']}: "
        f"evaluations to |C_j - B_j| <= {REL:g} x scale_j\n"
    )
    print(
        markdown_table(
            [
                "budgets",
                "start",
                "Newton evals (median/max)",
                "Newton ms",
                "L-BFGS evals (median)",
                "L-BFGS ms",
                "L-BFGS / Newton evals",
                "cyclic bisection evals (median)",
                "cyclic ms",
                "max rel. residual Newton / L-BFGS / cyclic",
            ],
            [
                [
                    r["family"],
                    r["start"],
                    f"{r['newton_evals_median']:.0f} / {r['newton_evals_max']}",
                    r["newton_ms"],
                    r["lbfgs_evals_median"],
                    r["lbfgs_ms"],
                    r["evals_ratio_lbfgs"],
                    r["cyclic_evals_median"],
                    r["cyclic_ms"],
                    f"{r['newton_max_rel_residual']:.1e} / {r['lbfgs_max_rel_residual']:.1e}"
                    f" / {r['cyclic_max_rel_residual']:.1e}",
                ]
                for r in coupled["rows"]
            ],
        )
    )
    blocks = block_rows(args.quick)
    print("\n## Per-block budgets (30 blocks of 16 groups): one vectorised retraction vs 30\n")
    print(
        markdown_table(
            ["problem", "evals", "per-block ms", "30 separate ms", "speed-up"],
            [
                [r["problem"], r["evals"], r["per_block_ms"], r["separate_ms"], r["speedup"]]
                for r in blocks
            ],
        )
    )
    single = single_rows(args.quick)
    if single:
        print(f"\n## One budget (K=8): today's retraction vs commit {OLD_COMMIT}\n")
        print(
            markdown_table(
                ["N", "start", "evals new / old", "new ms", "old ms", "new / old"],
                [
                    [
                        r["n"],
                        r["start"],
                        f"{r['evals_new']} / {r['evals_old']}",
                        r["new_ms"],
                        r["old_ms"],
                        r["ratio"],
                    ]
                    for r in single
                ],
            )
        )
    out = write_json(
        "multibudget", {"coupled": coupled, "per_block": blocks, "single": single}, args.json
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
