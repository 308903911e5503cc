"""Where the time of a bare RCO update goes (N=10000, K=8, inside lax.scan, per step).

Usage: python benchmarks/step_breakdown.py   (~1 min; prints a table, writes JSON)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import optax  # noqa: E402
from common import median_seconds, write_json  # noqa: E402
from manifold import make_constraint  # noqa: E402

from rco_jax import (  # noqa: E402
    init_logits,
    rco,
    retraction,
    tangent_projection,
    transport_moments,
)

n, steps = 10000, 100
c = make_constraint(n)
grads = 0.01 * jax.random.normal(jax.random.key(5), (steps, n, 8))
a0 = init_logits(c)
opts = {
    "adam": optax.adam(0.05),
    "projection + adam": optax.chain(tangent_projection(c), optax.adam(0.05)),
    "adam + retraction": optax.chain(optax.adam(0.05), retraction(c)),
    "projection + adam + retraction": optax.chain(
        tangent_projection(c), optax.adam(0.05), retraction(c)
    ),
    "rco as a chain (+ moment transport, two exp passes)": optax.chain(
        tangent_projection(c),
        transport_moments(optax.scale_by_adam(), c),
        optax.scale_by_learning_rate(0.05),
        retraction(c),
    ),
    "rco (the chain above, skip_not_finite as a conditional)": rco(0.05, c),
}


def time_scan(body, carry) -> float:
    run = jax.jit(lambda carry: jax.lax.scan(body, carry, grads)[0])
    return median_seconds(lambda: run(carry), repeats=7) / steps


rows = {}
for name, opt in opts.items():

    def body(carry, g, opt=opt):
        a, s = carry
        u, s = opt.update(g, s, a)
        return (optax.apply_updates(a, u), s), None

    rows[name] = time_scan(body, (a0, opt.init(a0)))
rows["one softmax pass (no optimizer)"] = time_scan(
    lambda a, g: (a + 1e-3 * jax.nn.softmax(a + g, -1), None), a0
)
adam = rows["adam"]
print("| step | us | / adam |\n|---|---|---|")
for name, t in rows.items():
    print(f"| {name} | {1e6 * t:.0f} | {t / adam:.1f} |")
write_json("step_breakdown", {k: {"us": 1e6 * t, "ratio": t / adam} for k, t in rows.items()})
