"""Inequality budgets ``C(alpha) <= B``: identity inside, RCO on the boundary."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rco_jax import (
    BudgetConstraint,
    budget_normal,
    expected_cost,
    init_logits,
    project_descent,
    project_tangent,
    rco,
    retract,
    retract_with_info,
    solve,
)

COSTS = jnp.array([1.0, 2.0, 4.0])


def _le(budget, n=5):
    return BudgetConstraint(COSTS, budget, num_groups=n, inequality=True)


def test_validation_and_messages():
    _le(100.0)  # above the maximum: never binds, still valid
    with pytest.raises(ValueError, match="minimum total cost"):
        _le(5.0)  # = the minimum: no interior
    with pytest.raises(ValueError, match="inequality=True"):
        BudgetConstraint(COSTS, 100.0, num_groups=5)


def test_flag_survives_pytree_jit_and_replace():
    c = _le(9.5)
    assert jax.tree.unflatten(*reversed(jax.tree.flatten(c))).inequality
    assert jax.jit(lambda c: c)(c).inequality
    assert c.replace(budget=jnp.asarray(8.0)).inequality
    assert "inequality=True" in repr(c)
    assert not BudgetConstraint(COSTS, 9.5, num_groups=5).inequality


def test_retraction_is_identity_inside_and_equality_retraction_outside():
    x = jax.random.normal(jax.random.key(0), (5, 3))
    cost = float(expected_cost(x, _le(9.5)))
    inside = _le(cost + 1.0)
    y, info = retract_with_info(x, inside)
    assert np.array_equal(np.asarray(y), np.asarray(x))
    assert bool(info.converged) and float(info.shift) == 0.0 and int(info.num_evals) == 1
    outside = _le(cost - 1.0)
    eq = BudgetConstraint(COSTS, cost - 1.0, num_groups=5)
    np.testing.assert_array_equal(np.asarray(retract(x, outside)), np.asarray(retract(x, eq)))
    assert abs(float(expected_cost(retract(x, outside), outside)) - (cost - 1.0)) < 1e-5


def test_init_logits_uniform_when_feasible():
    assert np.array_equal(np.asarray(init_logits(_le(20.0))), np.zeros((5, 3)))
    a = init_logits(_le(8.0))  # uniform costs 11.67 > 8: onto the boundary
    assert abs(float(expected_cost(a, _le(8.0))) - 8.0) < 1e-5


def test_project_descent_is_the_tangent_cone_projection():
    x = jax.random.normal(jax.random.key(1), (5, 3))
    on = _le(float(expected_cost(x, _le(9.5))))  # x lies on this boundary
    inside = _le(float(expected_cost(x, _le(9.5))) + 0.5)
    eq = BudgetConstraint(COSTS, on.budget, num_groups=5)
    n = budget_normal(x, on)
    outward = -n + 0.3 * jax.random.normal(jax.random.key(2), (5, 3))  # step -v raises C
    inward = n + 0.3 * jax.random.normal(jax.random.key(3), (5, 3))
    assert float(jnp.vdot(outward, n)) < 0 < float(jnp.vdot(inward, n))
    np.testing.assert_allclose(project_descent(outward, x, on), project_tangent(outward, x, on))
    assert abs(float(jnp.vdot(project_descent(outward, x, on), n))) < 1e-5
    assert np.array_equal(np.asarray(project_descent(inward, x, on)), np.asarray(inward))
    assert np.array_equal(np.asarray(project_descent(outward, x, inside)), np.asarray(outward))
    np.testing.assert_array_equal(project_descent(outward, x, eq), project_tangent(outward, x, eq))


def _trajectory(opt, loss, a, c, steps):
    """``steps`` optimizer steps in one scan: final logits and the expected cost after each."""

    def step(carry, _):
        a, s = carry
        u, s = opt.update(jax.grad(loss)(a), s, a)
        a = optax.apply_updates(a, u)
        return (a, s), expected_cost(a, c)

    (a, _), costs = jax.jit(lambda a: jax.lax.scan(step, (a, opt.init(a)), length=steps))(a)
    return a, costs


def test_rco_inside_the_budget_is_plain_adam():
    c = _le(20.0)  # the uniform start costs 11.67 and the minimum below stays inside
    target = jnp.array([[0.6, 0.3, 0.1]] * 5)
    loss = lambda a: jnp.sum((jax.nn.softmax(a) - target) ** 2)  # noqa: E731
    a0 = init_logits(c)
    a, costs = _trajectory(rco(0.05, c), loss, a0, c, 30)
    b, _ = _trajectory(optax.adam(0.05), loss, a0, c, 30)
    # Equal up to XLA's fusion choices (ulps); a projection would move it by ~1e-2.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(costs.max()) < 20.0
    assert float(expected_cost(a, c)) < 20.0


def test_rco_never_leaves_the_budget_and_settles_on_its_boundary():
    c = _le(9.5)
    # Value concave in cost: the best relaxed point spends the budget on middle options.
    loss = lambda a: -jnp.sum(jax.nn.softmax(a) * jnp.array([0.0, 1.5, 2.0]))  # noqa: E731
    a, costs = _trajectory(rco(0.1, c), loss, init_logits(c), c, 100)
    assert float(costs.max()) <= 9.5 + 16 * np.finfo(np.float32).eps * 20
    assert float(costs[-1]) > 9.5 - 1e-3
    assert float(loss(a)) < float(loss(init_logits(c)))


def _enumerate(loss, n, k, budget):
    every = np.array(list(itertools.product(range(k), repeat=n)))
    feasible = every[np.asarray(COSTS)[every].sum(1) <= budget]
    return float(jnp.min(jax.vmap(lambda a: loss(jax.nn.one_hot(a, k)))(feasible)))


def test_solve_reaches_an_optimum_that_leaves_budget_unspent():
    # The cheapest options are best in most groups, so the optimum costs well under B.
    rng = np.random.default_rng(0)
    n, k, budget = 6, 3, 17.5
    lin = jnp.asarray(rng.normal(size=(n, k)) + np.array([-1.0, 0.0, 0.5]), jnp.float32)
    q = rng.normal(size=(n * k, n * k)) / np.sqrt(n * k)
    q = jnp.asarray((q + q.T) / 2 * (1 - np.kron(np.eye(n), np.ones((k, k)))), jnp.float32)

    def loss(w):
        v = w.reshape(-1)
        return jnp.sum(lin * w) + v @ q @ v

    best = _enumerate(loss, n, k, budget)
    c = BudgetConstraint(COSTS, budget, num_groups=n, inequality=True)
    res = solve(loss, c, key=jax.random.key(0), num_steps=200, learning_rate=0.05, progress=False)
    assert float(res.cost) <= budget
    assert float(res.loss) == pytest.approx(best, abs=1e-5)
    assert float(res.cost) < budget - 1.0  # the budget does not bind at the optimum
    assert np.all(np.asarray(res.history["budget_error"]) <= 1e-4)
    assert float(expected_cost(res.logits, c)) < budget - 0.5  # the relaxation left it too


def test_penalty_baselines_charge_only_the_excess():
    from rco_jax.baselines import _violation, augmented_lagrangian, penalty

    x = jax.random.normal(jax.random.key(4), (5, 3))
    cost = float(expected_cost(x, _le(9.5)))
    assert float(_violation(x, _le(cost + 1.0))) == 0.0
    assert float(_violation(x, _le(cost - 1.0))) == pytest.approx(1.0 / (cost - 1.0), rel=1e-5)
    eq = BudgetConstraint(COSTS, cost + 1.0, num_groups=5)
    assert float(_violation(x, eq)) == pytest.approx(-1.0 / (cost + 1.0), rel=1e-5)
    # Option 0 (the cheapest) is best in every group: the optimum costs 5 << B = 12.5.
    value = jnp.array([1.0, 0.2, 0.1])
    loss = lambda w: -jnp.sum(w * value)  # noqa: E731
    for method in (penalty, augmented_lagrangian):
        res = method(loss, _le(12.5), key=jax.random.key(0), num_steps=60, progress=False)
        assert np.array_equal(np.asarray(res.assignment), np.zeros(5, np.int32))
