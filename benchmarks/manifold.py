"""Retraction cost and RCO step time.

1. Retraction: evaluations of (C, dC/dt) and time to reach |C - B| <= 4 ulps of
   the cost scale, for N in {252, 10000}, K=8: RCO's safeguarded Newton against a
   plain bisection (doubling bracket, then halving; the reference's scheme) to
   the same tolerance, measured in the same run on the same points. Two kinds
   of start: after an Adam-sized step from the manifold ("step", what RCO does
   every iteration) and from random logits far off it ("cold").
2. Step time inside ``lax.scan`` at N=10000, K=8: ``rco`` against
   ``optax.adam`` on the same logits, (a) the optimizer update alone with a
   fixed gradient stream, (b) a training step with the gradient of a cheap
   softmax loss, (c) a training step whose loss runs a small model (a
   256 x N x 64 matmul through the softmax-mixed layer), the setting RCO is
   used in.

Usage: python benchmarks/manifold.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_seconds, markdown_table, median_seconds, write_json  # noqa: E402

from rco_jax import BudgetConstraint, expected_cost, init_logits, rco  # noqa: E402
from rco_jax.manifold import compute_dtype, retract_with_info  # noqa: E402

BITS = jnp.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0])


def make_constraint(n: int) -> BudgetConstraint:
    params = jax.random.uniform(jax.random.key(1), (n,), minval=0.2, maxval=4.0)
    return BudgetConstraint(BITS, 4.5 * float(params.sum()), params)


def bisection(logits, c: BudgetConstraint, max_evals: int = 200):
    """Baseline: bracket by doubling from [-1, 1]/span, then bisect to the same tolerance."""
    dtype = compute_dtype(logits.dtype)
    tol = 4 * jnp.finfo(dtype).eps * c.cost_range()[1]
    span = jnp.max(BITS) - jnp.min(BITS)
    f = lambda t: expected_cost(logits + t * BITS, c) - c.budget

    def grow(s):
        lo, hi, n = s
        return 2 * lo, 2 * hi, n + 2

    lo, hi, n = jax.lax.while_loop(
        lambda s: ((f(s[0]) > 0) | (f(s[1]) < 0)) & (s[2] < max_evals),
        grow,
        (-1.0 / span, 1.0 / span, jnp.int32(2)),
    )

    def halve(s):
        lo, hi, mid, fm, n = s
        lo, hi = jnp.where(fm < 0, mid, lo), jnp.where(fm < 0, hi, mid)
        mid = 0.5 * (lo + hi)
        return lo, hi, mid, f(mid), n + 1

    mid = 0.5 * (lo + hi)
    out = jax.lax.while_loop(
        lambda s: (jnp.abs(s[3]) > tol) & (s[4] < max_evals) & (s[1] - s[0] > 0),
        halve,
        (lo, hi, mid, f(mid), n + 1),
    )
    return logits + out[2] * BITS, out[4], out[3]


def retraction_rows(n: int, starts: int):
    c = make_constraint(n)
    on = init_logits(c, jax.random.normal(jax.random.key(2), (n, 8)))
    keys = jax.random.split(jax.random.key(3), starts)
    step = jax.vmap(lambda k: on + 0.05 * jnp.sign(jax.random.normal(k, (n, 8))))(keys)
    cold = jax.vmap(lambda k: 3.0 * jax.random.normal(k, (n, 8)))(keys)
    newton = jax.jit(lambda x: retract_with_info(x, c))
    bisect = jax.jit(lambda x: bisection(x, c))
    rows = []
    scale = float(c.cost_range()[1])
    for kind, points in (("step", step), ("cold", cold)):
        n_ev = [int(newton(x)[1].num_evals) for x in points]
        b_ev = [int(bisect(x)[1]) for x in points]
        n_res = max(abs(float(newton(x)[1].residual)) for x in points) / scale
        b_res = max(abs(float(bisect(x)[2])) for x in points) / scale
        x0 = points[0]
        t_n = median_seconds(lambda x0=x0: newton(x0), repeats=9)
        t_b = median_seconds(lambda x0=x0: bisect(x0), repeats=9)
        rows.append(
            dict(
                n=n,
                start=kind,
                newton_evals_median=float(np.median(n_ev)),
                newton_evals_max=int(np.max(n_ev)),
                bisection_evals_median=float(np.median(b_ev)),
                newton_ms=1e3 * t_n,
                bisection_ms=1e3 * t_b,
                speedup=t_b / t_n,
                newton_max_rel_residual=n_res,
                bisection_max_rel_residual=b_res,
            )
        )
    return rows


def step_rows(n: int, steps: int):
    c = make_constraint(n)
    target = jax.random.normal(jax.random.key(4), (n, 8))
    feats = jax.random.normal(jax.random.key(6), (8, 64)) / 8
    batch = jax.random.normal(jax.random.key(7), (256, n)) / n**0.5

    def softmax_loss(a):
        p = jax.nn.softmax(a, -1)
        mu = jnp.sum(p * target, -1)
        return jnp.sum(mu) + 0.1 * jnp.sum(mu**2)

    def model_loss(a):
        # A small model whose (N, 64) layer is mixed from K candidates by softmax(a):
        # 256 x N x 64 matmul forward and backward, like a compression search step.
        w = jax.nn.softmax(a, -1) @ feats
        return jnp.mean(jnp.tanh(batch @ w) ** 2)

    grads = 0.01 * jax.random.normal(jax.random.key(5), (steps, n, 8))
    a0 = init_logits(c)
    modes = {
        "update only": None,
        "softmax loss + update": softmax_loss,
        "model loss + update": model_loss,
    }
    rows = {}
    for mode, loss in modes.items():
        fns = {}
        for name, opt in (("adam", optax.adam(0.05)), ("rco", rco(0.05, c))):

            def body(carry, g, opt=opt, loss=loss):
                a, s = carry
                if loss is not None:
                    g = jax.grad(loss)(a)
                u, s = opt.update(g, s, a)
                return (optax.apply_updates(a, u), s), None

            run = jax.jit(lambda a, s, body=body: jax.lax.scan(body, (a, s), grads)[0])
            s0 = opt.init(a0)
            fns[name] = lambda run=run, s0=s0: run(a0, s0)
        t = interleaved_seconds(fns, repeats=7)  # adam and rco in turn: paired ratios
        rows[mode] = dict(
            adam_us=1e6 * float(np.median(t["adam"])) / steps,
            rco_us=1e6 * float(np.median(t["rco"])) / steps,
            ratio=float(np.median(t["rco"] / t["adam"])),
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer starts and steps")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = ap.parse_args()
    starts, steps = (10, 20) if args.quick else (50, 100)

    retr = [r for n in (252, 10000) for r in retraction_rows(n, starts)]
    print("## Retraction (K=8): evaluations and time to |C - B| <= 4 ulps\n")
    headers = [
        "N",
        "start",
        "Newton evals (median/max)",
        "bisection evals (median)",
        "Newton ms",
        "bisection ms",
        "speed-up",
        "max |C-B|/scale N / B",
    ]
    print(
        markdown_table(
            headers,
            [
                [
                    r["n"],
                    r["start"],
                    f"{r['newton_evals_median']:.0f} / {r['newton_evals_max']}",
                    r["bisection_evals_median"],
                    r["newton_ms"],
                    r["bisection_ms"],
                    r["speedup"],
                    f"{r['newton_max_rel_residual']:.1e} / {r['bisection_max_rel_residual']:.1e}",
                ]
                for r in retr
            ],
        )
    )

    step = step_rows(10000, steps)
    print(f"\n## Step time in lax.scan (N=10000, K=8, {steps} steps, median per step)\n")
    print(
        markdown_table(
            ["step", "optax.adam us", "rco us", "rco / adam"],
            [[mode, r["adam_us"], r["rco_us"], r["ratio"]] for mode, r in step.items()],
        )
    )
    out = write_json("manifold", {"retraction": retr, "step": step, "steps": steps}, args.json)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
