"""``python -m rco_jax demo``: the point of the library in under a minute on a CPU.

A toy mixed-precision problem: give each of N "layers" a bitwidth in {2, 3, 4, 8}
under an exact average-bits budget. Quantization error shrinks 4x per bit, and
errors of different layers *compound* (a pairwise coupling term), so the loss
does not decompose over layers and a per-layer knapsack cannot see it. Three
methods get the same problem: RCO (exact budget, gradients), a quadratic
penalty (gradients, approximate budget), and EvoPress-style evolutionary search
(exact budget, no gradients). The exhaustive optimum is printed for reference.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax.constraint import BudgetConstraint
from rco_jax.solve import solve

BITS = np.array([2.0, 3.0, 4.0, 8.0])


def toy_problem(n: int = 10, avg_bits: float = 3.5, seed: int = 0):
    """Returns ``(loss_fn, constraint, sizes)`` for the toy mixed-precision problem."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1.0, 2.0, 4.0], size=n)  # parameters per layer (millions)
    sensitivity = rng.lognormal(0.0, 1.0, size=n)
    coupling = rng.uniform(0.0, 1.0, size=(n, n)) * (rng.uniform(size=(n, n)) < 0.3)
    coupling = jnp.asarray(np.triu(coupling, 1) + np.triu(coupling, 1).T, jnp.float32)
    err = jnp.asarray(4.0 ** (-(BITS - 2)), jnp.float32)  # relative error per bitwidth
    sens = jnp.asarray(sensitivity, jnp.float32)

    def loss_fn(w: jax.Array) -> jax.Array:
        e = w @ err  # (N,) error of each layer's chosen bitwidth
        return jnp.dot(sens, e) + 4.0 * e @ coupling @ e

    constraint = BudgetConstraint(BITS, avg_bits * sizes.sum(), jnp.asarray(sizes, jnp.float32))
    return loss_fn, constraint, sizes


def enumerate_optimum(loss_fn, constraint: BudgetConstraint, chunk: int = 65536):
    """Exhaustive minimum over all K^N assignments within the budget."""
    costs = constraint.host_group_costs()[0]
    n, k = costs.shape
    batch_loss = jax.jit(jax.vmap(lambda a: loss_fn(jax.nn.one_hot(a, k))))
    best, best_a = np.inf, None
    all_a = np.array(list(itertools.product(range(k), repeat=n)), np.int32)
    feasible = all_a[costs[np.arange(n), all_a].sum(1) <= float(constraint.budget)]
    for i in range(0, len(feasible), chunk):
        part = feasible[i : i + chunk]
        if len(part) < chunk:  # keep one compiled shape
            part = np.concatenate([part, np.repeat(part[:1], chunk - len(part), 0)])
        vals = np.asarray(batch_loss(part))
        j = int(np.argmin(vals))
        if vals[j] < best:
            best, best_a = float(vals[j]), part[j]
    return best, best_a


def run_demo(n: int = 10, avg_bits: float = 3.5, steps: int = 200, seed: int = 0) -> dict:
    from rco_jax.baselines import evolutionary, penalty

    loss_fn, c, sizes = toy_problem(n, avg_bits, seed)
    key = jax.random.key(seed)
    total = float(sizes.sum())
    print(__doc__.strip().split("\n\n")[1].replace("\n", " "), "\n")
    print(f"N={n} layers, bitwidths {BITS.astype(int).tolist()}, budget {avg_bits} average bits\n")

    rows = []

    def record(name, fn):
        start = time.perf_counter()
        res = fn()
        jax.block_until_ready(res.loss)
        secs = time.perf_counter() - start
        bits = float(res.cost) / total
        rows.append((name, float(res.loss), bits, secs, res))

    record(
        "RCO (exact budget)", lambda: solve(loss_fn, c, key=key, num_steps=steps, learning_rate=0.1)
    )
    for lam in (1.0, 100.0):
        record(
            f"penalty lam={lam:g}",
            lambda lam=lam: penalty(
                loss_fn, c, key=key, lam=lam, num_steps=steps, learning_rate=0.1
            ),
        )
    rco_secs = rows[0][3]
    record(
        "evolutionary (same time)",
        lambda: evolutionary(
            loss_fn, c, key=key, num_generations=10**6, offspring=16, time_limit=rco_secs
        ),
    )
    start = time.perf_counter()
    best, _ = enumerate_optimum(loss_fn, c)
    enum_secs = time.perf_counter() - start

    print(f"{'method':<26}{'loss':>10}{'gap to opt':>12}{'avg bits':>10}{'budget ok':>11}{'s':>7}")
    for name, loss, bits, secs, _ in rows:
        gap = (loss - best) / abs(best)
        ok = "yes" if bits <= avg_bits + 1e-9 else "NO"
        print(f"{name:<26}{loss:>10.4f}{gap:>11.1%} {bits:>10.3f}{ok:>11}{secs:>7.1f}")
    print(f"{'exhaustive optimum':<26}{best:>10.4f}{'':>12}{'':>10}{'':>11}{enum_secs:>7.1f}")
    pen = rows[1][4].history["budget_error"]
    rco_err = rows[0][4].history["budget_error"]
    print(
        f"\nRelaxed budget error max |C - B| over the run: RCO {float(jnp.abs(rco_err).max()):.2e}"
        f", penalty(lam=1) {float(jnp.abs(pen).max()):.2e} (in parameter-bits)."
    )
    return {
        name: dict(loss=loss, avg_bits=bits, seconds=secs) for name, loss, bits, secs, _ in rows
    }
