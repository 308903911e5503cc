"""Geometry of the budget manifold against independent oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_problem

from rco_jax import (
    BudgetConstraint,
    budget_normal,
    expected_cost,
    init_logits,
    project_tangent,
    retract,
    retract_with_info,
)


def numpy_expected_cost(logits, constraint) -> float:
    """Oracle: float64 NumPy expected cost, written from the definition."""
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    c = np.broadcast_to(np.asarray(constraint.costs, np.float64), x.shape)
    w = 1.0 if constraint.weights is None else np.asarray(constraint.weights, np.float64)
    return float(np.sum(w * np.sum(p * c, 1)))


def cost_scale(constraint) -> float:
    return float(constraint.cost_range()[1])


def test_expected_cost_matches_numpy(problem):
    c, x = problem
    np.testing.assert_allclose(expected_cost(x, c), numpy_expected_cost(x, c), rtol=1e-6)


def test_normal_equals_autodiff_gradient(problem):
    c, x = problem
    np.testing.assert_allclose(
        budget_normal(x, c), jax.grad(expected_cost)(x, c), rtol=1e-5, atol=1e-6
    )


def test_normal_finite_differences(x64):
    c, x = make_problem(3, layout="per_group", dtype=jnp.float64)
    n = budget_normal(x, c)
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = jnp.asarray(rng.normal(size=x.shape))
        h = 1e-6
        fd = (expected_cost(x + h * d, c) - expected_cost(x - h * d, c)) / (2 * h)
        np.testing.assert_allclose(jnp.vdot(n, d), fd, rtol=1e-7)


def test_projection_idempotent_and_orthogonal(problem):
    c, x = problem
    v = jax.random.normal(jax.random.key(1), x.shape)
    pv = project_tangent(v, x, c)
    n = budget_normal(x, c)
    assert abs(float(jnp.vdot(pv, n))) <= 1e-5 * float(jnp.linalg.norm(v) * jnp.linalg.norm(n))
    np.testing.assert_allclose(project_tangent(pv, x, c), pv, rtol=1e-5, atol=1e-6)
    # P(v) is the closest tangent vector: v - P(v) is parallel to n.
    r = v - pv
    np.testing.assert_allclose(
        abs(jnp.vdot(r, n)), jnp.linalg.norm(r) * jnp.linalg.norm(n), rtol=1e-4
    )


def test_retraction_feasible_to_ulps(problem):
    c, x = problem
    y, info = retract_with_info(3.0 * x, c)
    assert bool(info.converged)
    eps = np.finfo(np.float32).eps
    assert abs(numpy_expected_cost(y, c) - float(c.budget)) <= 8 * eps * cost_scale(c)
    assert abs(float(info.residual)) <= 4 * eps * cost_scale(c)
    # R moves along the cost direction only: y - x is a multiple of the (broadcast) costs.
    d = np.asarray(y - 3.0 * x)
    cb = np.broadcast_to(np.asarray(c.costs), d.shape)
    np.testing.assert_allclose(d, float(info.shift) * cb, rtol=1e-4, atol=1e-5)


def test_retraction_float64_precision(x64):
    c, x = make_problem(5, n=50, k=6, dtype=jnp.float64)
    y, info = retract_with_info(4.0 * x, c)
    assert y.dtype == jnp.float64
    assert abs(numpy_expected_cost(y, c) - float(c.budget)) <= 1e-12 * cost_scale(c)
    assert int(info.num_evals) <= 12


def test_retraction_is_centred(problem):
    c, x = problem
    on = retract(x, c)
    again, info = retract_with_info(on, c)
    assert int(info.num_evals) == 1  # already within tolerance: no Newton step taken
    np.testing.assert_array_equal(again, on)


def test_retraction_first_order_rigid(x64):
    """d/dt R(alpha + t xi) at t=0 equals xi for tangent xi (finite differences)."""
    c, x = make_problem(7, layout="per_group", weighted=True, dtype=jnp.float64)
    alpha = retract(x, c)
    xi = project_tangent(jax.random.normal(jax.random.key(2), x.shape, jnp.float64), alpha, c)
    for h in (1e-4, 1e-5):
        deriv = (retract(alpha + h * xi, c) - retract(alpha - h * xi, c)) / (2 * h)
        np.testing.assert_allclose(deriv, xi, atol=50 * h**2 + 1e-8)


def test_transported_moment_is_tangent(problem):
    c, x = problem
    a = retract(x, c)
    m = project_tangent(jax.random.normal(jax.random.key(3), x.shape), a, c)
    b = retract(a + 0.3 * m, c)
    moved = project_tangent(m, b, c)
    n = budget_normal(b, c)
    assert abs(float(jnp.vdot(moved, n))) <= 1e-5 * float(jnp.linalg.norm(m) * jnp.linalg.norm(n))


@pytest.mark.parametrize("frac", [1e-3, 0.5, 1 - 1e-3])
def test_retraction_extreme_budgets_and_far_start(frac):
    c, x = make_problem(11, n=20, k=5, frac=frac)
    y, info = retract_with_info(20.0 * x, c)
    assert bool(info.converged) and bool(jnp.all(jnp.isfinite(y)))
    tol = 8 * np.finfo(np.float32).eps * cost_scale(c)
    assert abs(numpy_expected_cost(y, c) - float(c.budget)) <= tol


def test_unreachable_traced_budget_no_nan():
    c, x = make_problem(0)
    lo, hi = (float(v) for v in c.cost_range())
    for budget in (lo - 1.0, lo, hi, hi + 1.0, jnp.inf):
        y, info = jax.jit(retract_with_info)(x, c.replace(budget=jnp.asarray(budget)))
        assert not bool(info.converged)
        np.testing.assert_array_equal(y, x)  # unchanged, finite


def test_init_logits_uniform_on_manifold(problem):
    c, _ = problem
    a = init_logits(c)
    assert a.shape == (c.num_groups, c.num_options)
    assert abs(numpy_expected_cost(a, c) - float(c.budget)) <= 1e-6 * cost_scale(c)


def test_pytree_logits_equal_concatenated_problem():
    """A dict of leaves under one budget behaves exactly like the stacked array."""
    c_full, x = make_problem(4, n=6, k=4, layout="per_group", weighted=True)
    costs, w = c_full.costs, c_full.weights
    tree_c = BudgetConstraint(
        {"a": costs[:2], "b": costs[2:]}, c_full.budget, {"a": w[:2], "b": w[2:]}
    )
    tx = {"a": x[:2], "b": x[2:]}
    np.testing.assert_allclose(expected_cost(tx, tree_c), expected_cost(x, c_full), rtol=1e-6)
    n = budget_normal(tx, tree_c)
    np.testing.assert_allclose(jnp.concatenate([n["a"], n["b"]]), budget_normal(x, c_full))
    v = jax.random.normal(jax.random.key(0), x.shape)
    pv = project_tangent({"a": v[:2], "b": v[2:]}, tx, tree_c)
    np.testing.assert_allclose(
        jnp.concatenate([pv["a"], pv["b"]]), project_tangent(v, x, c_full), rtol=1e-5, atol=1e-6
    )
    r = retract(tx, tree_c)
    np.testing.assert_allclose(
        jnp.concatenate([r["a"], r["b"]]), retract(x, c_full), rtol=1e-5, atol=1e-5
    )


def test_pytree_leaves_with_different_k():
    c = BudgetConstraint(
        {"bits": jnp.array([2.0, 4.0, 8.0]), "keep": jnp.array([0.0, 1.0])},
        budget=30.0,
        weights={"bits": jnp.array([1.0, 2.0, 3.0]), "keep": jnp.array([4.0, 4.0])},
    )
    logits = {"bits": jnp.zeros((3, 3)), "keep": jnp.zeros((2, 2))}
    a = retract(logits, c)
    assert abs(float(expected_cost(a, c)) - 30.0) <= 1e-5 * 30
