"""Hypothesis: random problems, 50+ RCO steps, every iterate on the manifold (or within an
inequality budget), loss down."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rco_jax import BudgetConstraint, expected_cost, init_logits, project_descent, rco

STEPS = 60


@partial(jax.jit, static_argnames="inequality")
def _run(costs, weights, budget, lin, quad, alpha0, inequality=False):
    c = BudgetConstraint(costs, budget, weights, inequality=inequality)

    def loss(a):
        p = jax.nn.softmax(a, -1).ravel()
        return jnp.dot(lin, p) + p @ quad @ p

    opt = rco(0.05, c)

    def step(carry, _):
        a, s = carry
        u, s = opt.update(jax.grad(loss)(a), s, a)
        a = optax.apply_updates(a, u)
        return (a, s), (expected_cost(a, c) - c.budget, loss(a))

    a0 = init_logits(c, alpha0)
    (_, _), (res, losses) = jax.lax.scan(step, (a0, opt.init(a0)), length=STEPS)
    rgrad = project_descent(jax.grad(loss)(a0), a0, c)
    return expected_cost(a0, c) - c.budget, res, loss(a0), losses, jnp.linalg.norm(rgrad)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 10))
    k = draw(st.integers(2, 5))
    shared = draw(st.booleans())  # costs (K,) or (N, K)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (k,) if shared else (n, k)
    # Small integer costs make ties and constant groups likely; weights span 3 decades.
    costs = rng.integers(0, 9, size=shape).astype(np.float32)
    full = np.broadcast_to(costs, (n, k))
    weights = (10.0 ** rng.uniform(-1, 2, size=n)).astype(np.float32)
    lo, hi = np.sum(weights * full.min(1)), np.sum(weights * full.max(1))
    if hi - lo < 1e-3 * max(hi, 1.0):
        costs = costs + np.eye(k, dtype=np.float32)[0] * (1 + costs.max())  # break degeneracy
        full = np.broadcast_to(costs, (n, k))
        lo, hi = np.sum(weights * full.min(1)), np.sum(weights * full.max(1))
    frac = draw(st.floats(0.02, 0.98))
    budget = np.float32(lo + frac * (hi - lo))
    lin = rng.normal(size=n * k).astype(np.float32)
    a = rng.normal(size=(n * k, n * k)).astype(np.float32)
    quad = (a + a.T) / (2 * np.sqrt(n * k))
    alpha0 = rng.normal(size=(n, k)).astype(np.float32)
    return costs, weights, budget, lin, quad, alpha0


def _check(problem, inequality=False):
    costs, weights, budget, lin, quad, alpha0 = problem
    c = BudgetConstraint(costs, budget, weights, inequality=inequality)  # concrete: validated
    scale = float(c.cost_range()[1])
    r0, res, loss0, losses, rgrad = _run(costs, weights, budget, lin, quad, alpha0, inequality)
    tol = 16 * np.finfo(np.float32).eps * scale
    res = np.asarray(res)
    assert np.all(np.isfinite(res)) and np.all(np.isfinite(np.asarray(losses)))
    if inequality:  # within the budget (up to the retraction's few ulps), not on it
        assert float(r0) <= tol
        assert res.max() <= tol, (res.max(), tol)
    else:
        assert abs(float(r0)) <= tol
        assert np.abs(res).max() <= tol, (np.abs(res).max(), tol)
    if float(rgrad) > 1e-3:
        assert float(losses[-1]) < float(loss0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_rco_random_problems_stay_on_manifold(problem):
    _check(problem)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_rco_random_problems_stay_within_inequality_budget(problem):
    _check(problem, inequality=True)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_rco_random_problems_stay_on_manifold_many(problem):
    _check(problem)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_rco_random_problems_stay_within_inequality_budget_many(problem):
    _check(problem, inequality=True)
