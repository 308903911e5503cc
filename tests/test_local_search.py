"""The exact-budget polish against a brute-force oracle of its neighbourhood, and in solve()."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_multi, make_problem
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rco_jax import BudgetConstraint, assignment_cost, discretize, polish, solve


def _coupled_loss(seed: int, n: int, k: int):
    """A non-decomposable quadratic on the one-hot ``W`` (cross-group couplings)."""
    rng = np.random.default_rng(seed)
    lin = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
    q = rng.normal(size=(n * k, n * k)) / np.sqrt(n * k)
    q = jnp.asarray((q + q.T) / 2, jnp.float32)
    return lambda w: jnp.sum(lin * w) + w.reshape(-1) @ q @ w.reshape(-1)


def _neighbours(a: np.ndarray, k: int):
    """Every assignment at most two groups away from ``a`` (brute force)."""
    n = len(a)
    for i, b in itertools.product(range(n), range(k)):
        if b != a[i]:
            yield np.where(np.arange(n) == i, b, a)
    for i, j in itertools.combinations(range(n), 2):
        for b, d in itertools.product(range(k), range(k)):
            if b != a[i] and d != a[j]:
                out = a.copy()
                out[i], out[j] = b, d
                yield out


def _fits(c, a) -> bool:
    return bool(np.all(np.asarray(assignment_cost(jnp.asarray(a), c)) <= np.asarray(c.budget)))


def _any_feasible(c, n: int, k: int) -> bool:
    """Whether some assignment fits every budget (enumeration; budgets drawn at an interior
    point of the relaxation can leave the discrete problem with none, e.g. two coupled ones)."""
    every = jnp.asarray(list(itertools.product(range(k), repeat=n)))
    costs = np.asarray(jax.vmap(lambda a: assignment_cost(a, c))(every))
    return bool(np.all(costs <= np.asarray(c.budget), axis=-1).any())


def _assert_local_optimum(loss, c, a, value, k):
    """No feasible assignment within two groups is better (the oracle: enumeration)."""
    one = lambda x: float(loss(jax.nn.one_hot(jnp.asarray(x), k)))  # noqa: E731
    tol = 1e-5 * max(1.0, abs(value))
    better = [x for x in _neighbours(a, k) if _fits(c, x) and one(x) < value - tol]
    assert not better, f"a feasible neighbour improves: {better[0]}"


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 6),
    k=st.integers(2, 4),
    kind=st.sampled_from(["single", "coupled", "blocks"]),
)
def test_polish_reaches_a_feasible_local_optimum(seed, n, k, kind):
    if kind == "single":
        c, logits = make_problem(seed, n, k, frac=0.35)
    else:
        c, logits = make_multi(seed, q=2, n=n, k=k, kind=kind)
        assume(_any_feasible(c, n, k))
    loss = _coupled_loss(seed, n, k)
    start = discretize(logits, c)
    start_loss = float(loss(jax.nn.one_hot(start, k)))
    out = polish(loss, c, start, max_evals=10_000)
    a = np.asarray(out.assignment)
    assert _fits(c, a)
    value = float(out.loss)
    np.testing.assert_allclose(value, float(loss(jax.nn.one_hot(a, k))), rtol=1e-5, atol=1e-6)
    assert value <= start_loss + 1e-6
    assert int(out.evaluations) <= 10_000
    _assert_local_optimum(loss, c, a, value, k)


def test_polish_respects_the_evaluation_bound_and_known_loss():
    c, logits = make_problem(3, 8, 4, frac=0.3)
    loss = _coupled_loss(3, 8, 4)
    start = discretize(logits, c)
    capped = polish(loss, c, start, max_evals=20, batch=8)
    assert int(capped.evaluations) <= 20  # one round (8 + 1), twice, then no room
    none = polish(loss, c, start, max_evals=0, loss=loss(jax.nn.one_hot(start, 4)))
    assert int(none.evaluations) == 0 and np.array_equal(none.assignment, start)


def test_polish_large_problem_uses_pools_and_improves_linear_loss():
    # N K = 600 > 2 * pool: candidate pairs come from the gain and the budget-freeing pools.
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 21, size=(100, 6)).astype(np.float32)
    values = jnp.asarray(rng.uniform(size=(100, 6)), jnp.float32)
    budget = float(np.floor(costs.min(1).sum() + 0.45 * (costs.max(1).sum() - costs.min(1).sum())))
    c = BudgetConstraint(costs, budget)
    loss = lambda w: -jnp.sum(w * values)  # noqa: E731
    start = jnp.asarray(np.argmin(costs, 1), jnp.int32)  # cheapest: far from optimal
    out = polish(loss, c, start, max_evals=2000)
    assert _fits(c, np.asarray(out.assignment))
    assert float(out.loss) < float(loss(jax.nn.one_hot(start, 6))) - 1.0
    assert int(out.moves) > 10


def test_polish_on_a_pytree_constraint():
    costs = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([[1.0, 4.0]] * 2)}
    c = BudgetConstraint(costs, budget=7.5, num_groups={"a": 3, "b": 2}, inequality=True)
    rng = np.random.default_rng(1)
    va = jnp.asarray(rng.uniform(size=(3, 3)), jnp.float32)
    vb = jnp.asarray(rng.uniform(size=(2, 2)), jnp.float32)
    loss = lambda w: -jnp.sum(w["a"] * va) - jnp.sum(w["b"] * vb) - w["a"][0, 2] * w["b"][1, 1]  # noqa: E731
    start = {"a": jnp.zeros(3, jnp.int32), "b": jnp.zeros(2, jnp.int32)}
    out = polish(loss, c, start, max_evals=5000)
    assert set(out.assignment) == {"a", "b"}
    assert float(assignment_cost(out.assignment, c)) <= 7.5
    # Oracle: enumerate all 3^3 * 2^2 assignments; a local optimum of this size is checked
    # against every feasible one within two groups.
    flat = np.concatenate([np.asarray(out.assignment["a"]), np.asarray(out.assignment["b"])])

    def value(x):
        w = {"a": jax.nn.one_hot(x[:3], 3), "b": jax.nn.one_hot(x[3:], 2)}
        return float(loss(w))

    def fits(x):
        return float(assignment_cost({"a": jnp.asarray(x[:3]), "b": jnp.asarray(x[3:])}, c)) <= 7.5

    for x in _neighbours(flat, 3):
        if np.all(x[3:] < 2) and fits(x):
            assert value(x) >= float(out.loss) - 1e-5


def test_solve_polishes_cheap_losses_and_restarts_keep_the_best():
    c, _ = make_problem(5, 6, 3, frac=0.4)
    loss = _coupled_loss(5, 6, 3)
    key = jax.random.key(2)
    kw = dict(num_steps=15, progress=False)
    plain = solve(loss, c, key=key, polish=False, **kw)
    auto = solve(loss, c, key=key, **kw)
    assert int(plain.polish_evaluations) == 0 and int(auto.polish_evaluations) > 0
    assert float(auto.loss) <= float(plain.loss) + 1e-6
    assert _fits(c, np.asarray(auto.assignment))
    # The independent runs, one at a time; one jitted function compiles once for all keys.
    one = jax.jit(lambda k: solve(loss, c, key=k, polish=False, **kw))
    runs = [one(k) for k in jax.random.split(key, 3)]
    best = solve(loss, c, key=key, num_restarts=3, polish=False, **kw)
    assert float(best.loss) <= min(float(r.loss) for r in runs) + 1e-5
    assert _fits(c, np.asarray(best.assignment))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(num_restarts=0), "num_restarts"), (dict(polish_evals=-1), "polish_evals")],
)
def test_solve_rejects_bad_restart_and_polish_arguments(kwargs, match):
    c, _ = make_problem(0, 4, 3)
    with pytest.raises(ValueError, match=match):
        solve(lambda w: jnp.sum(w), c, key=jax.random.key(0), num_steps=2, **kwargs)
