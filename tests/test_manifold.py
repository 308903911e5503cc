"""Geometry of the budget manifold against independent oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from rco_jax import (
    BudgetConstraint,
    budget_normal,
    expected_cost,
    init_logits,
    project_tangent,
    retract,
    retract_with_info,
    softmax_stats,
)
from rco_jax.manifold import retract_update, retract_update_with_stats

EPS32 = float(np.finfo(np.float32).eps)


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


def numpy_softmax_lse(logits):
    x = np.asarray(logits, np.float64)
    top = x.max(1, keepdims=True)
    e = np.exp(x - top)
    return e / e.sum(1, keepdims=True), (top + np.log(e.sum(1, keepdims=True)))[:, 0]


def numpy_normal(logits, constraint) -> np.ndarray:
    """Oracle: the budget normal w_i p_ik (c_ik - mu_i) in float64, from the definition."""
    x = np.asarray(logits, np.float64)
    p, _ = numpy_softmax_lse(x)
    c = np.broadcast_to(np.asarray(constraint.costs, np.float64), x.shape)
    w = 1.0 if constraint.weights is None else np.asarray(constraint.weights, np.float64)
    mu = np.sum(p * c, 1, keepdims=True)
    return np.reshape(w, (-1, 1)) * p * (c - mu)


@pytest.mark.parametrize("layout", ["shared", "per_group"])
def test_softmax_stats_and_projection_with_them(layout):
    c, x = make_problem(11, layout=layout)
    x = 3.0 * x
    stats = softmax_stats(x, c)
    _, lse = numpy_softmax_lse(x)
    assert stats.normals.shape == (1, *x.shape)
    np.testing.assert_allclose(stats.normals[0], numpy_normal(x, c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.cost, [numpy_expected_cost(x, c)], rtol=1e-6)
    np.testing.assert_allclose(stats.lse, lse, rtol=1e-6, atol=1e-6)
    v = jax.random.normal(jax.random.key(3), x.shape)
    np.testing.assert_allclose(
        project_tangent(v, x, c, stats=stats), project_tangent(v, x, c), atol=1e-6
    )
    with pytest.raises(ValueError, match="stats.normals has 2 arrays"):
        project_tangent(v, x, c, stats=stats._replace(normals=[stats.normals] * 2))
    with pytest.raises(ValueError, match=r"stats.normals has an array of shape \(6, 4\)"):
        project_tangent(v, x, c, stats=stats._replace(normals=stats.normals[0]))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["shared", "per_group"]),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0, 400.0]),
    stale=st.sampled_from([0.0, 200.0]),
)
def test_retract_update_with_stats_matches_plain_and_returns_the_new_softmax(
    seed, layout, scale, stale
):
    """The hinted retraction finds the same point, whatever the hint's quality (a large
    step or a stale hint falls back to the direct softmax); its statistics are the
    new point's normal, costs and log-normalizers (NumPy oracle)."""
    c, x = make_problem(seed, n=7, k=5, layout=layout)
    a = init_logits(c, x)
    u = scale * jax.random.normal(jax.random.key(seed), a.shape)
    stats = softmax_stats(a, c)
    offsets = stale * jax.random.normal(jax.random.key(seed + 1), (a.shape[0],))
    stats = stats._replace(lse=stats.lse + offsets)
    u_plain, info_plain = retract_update(a, u, c)
    u_hint, info, new = retract_update_with_stats(a, u, c, stats=stats)
    point = a + u_hint
    tol = 8 * EPS32 * cost_scale(c)
    # Logits of size ~1000 can be too coarse in float32 to meet 4 ulps: then both stop.
    assert bool(info.converged) == bool(info_plain.converged)
    np.testing.assert_allclose(info.residual, info_plain.residual, atol=tol)
    if bool(info.converged):
        assert abs(numpy_expected_cost(point, c) - float(c.budget)) <= 2 * tol
        assert abs(float(new.cost[0]) - numpy_expected_cost(point, c)) <= 2 * tol
    np.testing.assert_allclose(u_hint, u_plain, rtol=1e-5, atol=1e-5 * (1 + scale))
    _, lse = numpy_softmax_lse(point)
    # The statistics are those of the solved point before its rounding to float32; a
    # normal entry is w p (c - mu) with w <= 2 and costs in [0.5, 8].
    ulp_point = EPS32 * float(np.max(np.abs(np.asarray(point))))
    np.testing.assert_allclose(
        new.normals[0], numpy_normal(point, c), atol=50 * (2e-6 + 2 * ulp_point)
    )
    assert new.cost.shape == (1,)
    np.testing.assert_allclose(new.lse, lse, rtol=1e-5, atol=1e-5 * (1 + scale))
    assert np.all(np.isfinite(np.asarray(new.normals)))


def test_hinted_retraction_under_vmap_with_one_member_falling_back():
    """vmap keeps the hinted path a branch: taken only when every member may take it."""
    c, x = make_problem(21, n=7, k=5, layout="shared")
    a = init_logits(c, x)
    stats = softmax_stats(a, c)
    u = jax.random.normal(jax.random.key(0), a.shape)
    steps = jnp.stack([0.01 * u, 300.0 * u])  # the second one falls back
    f = lambda v: retract_update_with_stats(a, v, c, stats=stats)
    got_u, _, got_stats = jax.jit(jax.vmap(f))(steps)
    for i in range(2):
        want_u, _, want_stats = f(steps[i])
        np.testing.assert_allclose(got_u[i], want_u, rtol=1e-6, atol=1e-6)
        # Member 0 alone takes the hinted path, under vmap the direct one: a few ulps apart.
        np.testing.assert_allclose(got_stats.normals[i], want_stats.normals, atol=1e-5)
