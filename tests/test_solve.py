"""solve(): optimum recovery against enumeration, vmap sweeps, feasibility, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import BudgetConstraint, SolverDivergedError, knapsack, solve
from rco_jax.baselines import augmented_lagrangian, evolutionary, penalty


def enumerate_min(loss, costs: np.ndarray, budget: float, n: int, k: int):
    """Oracle: minimum of ``loss`` over every feasible assignment (exhaustive)."""
    best = np.inf
    for a in itertools.product(range(k), repeat=n):
        if costs[np.arange(n), a].sum() <= budget:
            best = min(best, float(loss(jax.nn.one_hot(jnp.array(a), k))))
    return best


def decomposable(seed, n=6, k=3):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 8, size=(n, k)).astype(np.float32)
    values = rng.uniform(0, 1, size=(n, k)).astype(np.float32)
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    budget = float(np.floor(lo + 0.5 * (hi - lo)))
    return BudgetConstraint(costs, budget), values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_dp_optimum_decomposable(seed):
    c, values = decomposable(seed)
    _, opt = knapsack(values, np.asarray(c.costs), float(c.budget))
    res = solve(
        lambda w: -jnp.sum(w * values),
        c,
        key=jax.random.key(0),
        num_steps=120,
        learning_rate=0.1,
        progress=False,
    )
    assert float(res.cost) <= float(c.budget)
    np.testing.assert_allclose(-float(res.loss), float(opt), rtol=1e-5)


def coupled_quadratic(seed, n=6, k=3):
    rng = np.random.default_rng(seed)
    lin = rng.normal(size=(n, k))
    q = rng.normal(size=(n * k, n * k)) / np.sqrt(n * k)
    q = jnp.asarray((q + q.T) / 2, jnp.float32)
    lin = jnp.asarray(lin, jnp.float32)
    return lambda w: jnp.sum(lin * w) + w.ravel() @ q @ w.ravel()


def test_reaches_enumerated_optimum_non_decomposable():
    n, k = 6, 3
    costs = np.array([1.0, 2.0, 4.0], np.float32)
    c = BudgetConstraint(costs, 13.0, num_groups=n)
    loss = coupled_quadratic(3, n, k)
    best = enumerate_min(loss, np.broadcast_to(costs, (n, k)), 13.0, n, k)
    res = solve(loss, c, key=jax.random.key(1), num_steps=150, learning_rate=0.1, progress=False)
    assert float(res.cost) <= 13.0
    np.testing.assert_allclose(float(res.loss), best, rtol=1e-5, atol=1e-5)


def test_vmap_over_keys_equals_separate_calls():
    c, values = decomposable(4)
    loss = lambda w: -jnp.sum(w * values) + 0.1 * jnp.sum(w[:, 0] * w[:, 1].sum())
    keys = jax.random.split(jax.random.key(7), 4)
    # polish=False: under vmap the polish is off by default, eager calls would polish.
    run = lambda k: solve(loss, c, key=k, num_steps=30, progress=False, polish=False)
    batched = jax.vmap(run)(keys)
    for i in range(4):
        single = run(keys[i])
        np.testing.assert_array_equal(batched.assignment[i], single.assignment)
        np.testing.assert_allclose(batched.loss[i], single.loss, rtol=1e-6)
        np.testing.assert_allclose(batched.logits[i], single.logits, rtol=1e-4, atol=1e-5)


def test_vmap_over_budgets_and_learning_rates_all_feasible():
    costs = np.array([2.0, 3.0, 4.0, 8.0], np.float32)
    values = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 4)), jnp.float32)
    budgets = jnp.array([13.0, 18.0, 25.0])
    lrs = jnp.array([0.03, 0.1, 0.3])

    def run(b, lr):
        c = BudgetConstraint(costs, b, jnp.ones(5))
        return solve(
            lambda w: -jnp.sum(w * values),
            c,
            key=jax.random.key(0),
            num_steps=25,
            learning_rate=lr,
            progress=False,
        )

    res = jax.vmap(run)(budgets, lrs)
    assert np.all(np.asarray(res.cost) <= np.asarray(budgets))
    np.testing.assert_allclose(
        res.history["expected_cost"][:, -1], budgets, rtol=1e-5
    )  # relaxed iterate exactly on each budget


def test_history_budget_error_exact_and_tau_annealed():
    c, values = decomposable(5)
    res = solve(
        lambda w: -jnp.sum(w * values),
        c,
        key=jax.random.key(2),
        num_steps=60,
        chunk_size=25,
        progress=False,
    )
    h = res.history
    assert h["loss"].shape == (60,)  # 3 chunks, the last one padded
    scale = float(c.cost_range()[1])
    assert np.abs(np.asarray(h["budget_error"])).max() <= 8 * 1.2e-7 * scale
    np.testing.assert_allclose(np.asarray(h["tau"])[[0, -1]], [1.0, 0.05], rtol=1e-5)
    assert np.all(np.asarray(h["sample_cost"]) <= float(c.budget))


def test_bad_arguments():
    c, values = decomposable(0)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        solve(lambda w: -jnp.sum(w), c, key=key, num_steps=0)
    with pytest.raises(ValueError, match="must return a scalar"):
        solve(lambda w: w.sum(0), c, key=key, num_steps=5)
    with pytest.raises(SolverDivergedError, match="non-finite value at step 0") as err:
        solve(lambda w: jnp.log(jnp.sum(w) - 6.0), c, key=key, num_steps=5, progress=False)
    assert float(err.value.result.cost) <= float(c.budget)


def test_baselines_same_convention_and_feasible():
    c, values = decomposable(6, n=8, k=4)
    loss = lambda w: -jnp.sum(w * values)
    key = jax.random.key(0)
    for res in (
        penalty(loss, c, key=key, num_steps=40, lam=10.0, progress=False),
        augmented_lagrangian(loss, c, key=key, num_steps=40, progress=False),
        evolutionary(loss, c, key=key, num_generations=20, offspring=8, progress=False),
    ):
        assert res.assignment.shape == (8,) and res.assignment.dtype == jnp.int32
        assert float(res.cost) <= float(c.budget)
        np.testing.assert_allclose(
            float(res.loss), float(loss(jax.nn.one_hot(res.assignment, 4))), rtol=1e-6
        )


def test_evolutionary_improves_and_respects_time_limit():
    c, values = decomposable(7, n=10, k=4)
    loss = lambda w: -jnp.sum(w * values)
    _, opt = knapsack(values, np.asarray(c.costs), float(c.budget))
    res = evolutionary(
        loss,
        c,
        key=jax.random.key(1),
        num_generations=60,
        offspring=16,
        mutation="random",
        progress=False,
    )
    h = np.asarray(res.history["loss"])
    assert np.all(np.diff(h) <= 0) and h[-1] < h[0]  # monotone, and it does improve
    assert -float(res.loss) >= 0.9 * float(opt)
    quick = evolutionary(
        loss,
        c,
        key=jax.random.key(1),
        num_generations=10**6,
        offspring=4,
        time_limit=0.5,
        progress=False,
    )
    assert len(quick.history["loss"]) < 10**6
