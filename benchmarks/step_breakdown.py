"""Where the time of a bare RCO update goes (N=10000, K=8, inside lax.scan, per step).

Usage: python benchmarks/step_breakdown.py [--rounds R] [--leaves L] [--json OUT]
(~40 s; prints a table, writes JSON)

``--leaves L`` splits the logits into a pytree of L layers of N/L groups each (one
global budget), the shape of a per-layer search, where many small arrays make the
step's fixed costs count.

Every variant runs in turn in each round (21 rounds by default); times are medians per
step and ratios medians of the per-round ratios to Adam, so a machine whose speed drifts
still gives comparable ratios. The quartiles of those per-round ratios show the noise.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import interleaved_seconds, markdown_table, write_json  # noqa: E402
from manifold import BITS, make_constraint  # noqa: E402

from rco_jax import (  # noqa: E402
    BudgetConstraint,
    init_logits,
    rco,
    retraction,
    skip_not_finite,
    tangent_projection,
    transport_moments,
)


def variants(c) -> dict[str, optax.GradientTransformation]:
    uncached = optax.chain(
        tangent_projection(c, check_finite=False),
        transport_moments(optax.scale_by_adam(), c),
        optax.scale_by_learning_rate(0.05),
        retraction(c, check_finite=False),
    )
    return {
        "adam": optax.adam(0.05),
        "projection + adam": optax.chain(tangent_projection(c), optax.adam(0.05)),
        "adam + retraction": optax.chain(optax.adam(0.05), retraction(c)),
        "rco without the cache (two exp passes)": skip_not_finite(uncached),
        "rco (normal cached in the state: one exp pass)": rco(0.05, c),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="rounds of interleaved runs")
    ap.add_argument("--leaves", type=int, default=1, help="logits as a pytree of L layers")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = ap.parse_args()
    n, steps = 10000, 100
    c = make_constraint(n)
    if args.leaves > 1:
        w = jnp.split(c.weights[: n - n % args.leaves], args.leaves)
        c = BudgetConstraint([BITS] * args.leaves, c.budget * sum(map(len, w)) / n, w)
    a0 = init_logits(c)
    grads = jax.tree.map(
        lambda x: 0.01 * jax.random.normal(jax.random.key(5), (steps, *x.shape)), a0
    )

    def scanned(body, carry):
        run = jax.jit(lambda carry: jax.lax.scan(body, carry, grads)[0])
        return lambda: run(carry)

    fns = {}
    for name, opt in variants(c).items():

        def body(carry, g, opt=opt):
            a, s = carry
            u, s = opt.update(g, s, a)
            return (optax.apply_updates(a, u), s), None

        fns[name] = scanned(body, (a0, opt.init(a0)))
    softmax_step = lambda a, g: a + 1e-3 * jax.nn.softmax(a + g, -1)
    fns["one softmax pass (no optimizer)"] = scanned(
        lambda a, g: (jax.tree.map(softmax_step, a, g), None), a0
    )
    times = interleaved_seconds(fns, repeats=args.rounds)
    adam = times["adam"]
    rows = {}
    for name, t in times.items():
        q1, q2, q3 = np.percentile(t / adam, [25, 50, 75])
        rows[name] = {
            "us": 1e6 * float(np.median(t)) / steps,
            "ratio": float(q2),
            "ratio_quartiles": [float(q1), float(q3)],
        }
    table = [
        [k, r["us"], r["ratio"], "{:.2f}-{:.2f}".format(*r["ratio_quartiles"])]
        for k, r in rows.items()
    ]
    print(markdown_table(["step", "us", "/ adam", "quartiles of / adam"], table))
    payload = {"n": n, "k": 8, "leaves": args.leaves, "rounds": args.rounds, "rows": rows}
    name = "step_breakdown" if args.leaves == 1 else f"step_breakdown_{args.leaves}_leaves"
    print(f"wrote {write_json(name, payload, args.json)}")


if __name__ == "__main__":
    main()
