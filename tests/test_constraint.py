"""BudgetConstraint: validation, pytree behaviour, traced construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import BudgetConstraint, expected_cost, retract

COSTS = jnp.array([2.0, 3.0, 4.0, 8.0])


def test_shapes_and_ranges():
    c = BudgetConstraint(COSTS, 10.0, jnp.ones(3))
    assert (c.num_groups, c.num_options) == (3, 4)
    lo, hi = c.cost_range()
    assert float(lo) == 6.0 and float(hi) == 24.0
    per_group = BudgetConstraint(jnp.tile(COSTS, (5, 1)), 20.0)
    assert per_group.num_groups == 5
    shared = BudgetConstraint(COSTS, 20.0, num_groups=5)
    np.testing.assert_allclose(shared.group_costs()[0], per_group.group_costs()[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(costs=COSTS, budget=6.0, weights=jnp.ones(3)), "strictly between"),
        (dict(costs=COSTS, budget=24.0, weights=jnp.ones(3)), "strictly between"),
        (dict(costs=COSTS, budget=float("nan"), weights=jnp.ones(3)), "not reachable"),
        (dict(costs=jnp.ones((3, 4)), budget=3.0), "degenerate"),
        (dict(costs=COSTS, budget=10.0, weights=jnp.array([1.0, 0.0, 1.0])), "strictly positive"),
        (dict(costs=COSTS, budget=10.0, weights=jnp.array([1.0, jnp.inf, 1.0])), "finite"),
        (dict(costs=COSTS.at[0].set(-1.0), budget=10.0, weights=jnp.ones(3)), "non-negative"),
        (dict(costs=COSTS.at[0].set(jnp.nan), budget=10.0, weights=jnp.ones(3)), "finite"),
        (dict(costs=jnp.ones((3, 4)), budget=10.0, weights=jnp.ones(2)), "mismatched"),
        (dict(costs=jnp.ones((2, 3, 4)), budget=10.0), r"\(K,\) or \(N, K\)"),
        (dict(costs=COSTS, budget=10.0), "undetermined"),
        (dict(costs=COSTS, budget=jnp.ones(2), weights=jnp.ones(3)), "scalar"),
        (dict(costs=COSTS, budget=10.0, weights=jnp.ones((3, 1))), r"shape \(N,\)"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetConstraint(**kwargs)


def test_error_message_gives_valid_range():
    with pytest.raises(ValueError, match="minimum total cost 6 and the maximum 24"):
        BudgetConstraint(COSTS, 30.0, jnp.ones(3))


def test_traced_construction_does_not_validate_or_branch():
    # Inside jit nothing is checked (an unreachable budget must not raise).
    @jax.jit
    def f(budget):
        c = BudgetConstraint(COSTS, budget, jnp.ones(3))
        return expected_cost(retract(jnp.zeros((3, 4)), c), c)

    np.testing.assert_allclose(f(10.0), 10.0, rtol=1e-5)
    assert np.isfinite(f(100.0))  # unreachable: finite, not NaN


def test_is_a_pytree_with_three_leaf_fields():
    c = BudgetConstraint(COSTS, 10.0, jnp.ones(3))
    leaves, treedef = jax.tree.flatten(c)
    assert len(leaves) == 3
    c2 = jax.tree.unflatten(treedef, leaves)
    assert isinstance(c2, BudgetConstraint) and c2.group_sizes == (3,)
    doubled = jax.tree.map(lambda x: 2 * x, c)
    assert float(doubled.budget) == 20.0


def test_vmap_over_batch_of_budgets():
    budgets = jnp.array([8.0, 12.0, 20.0])
    run = lambda c: expected_cost(retract(jnp.zeros((3, 4)), c), c)
    # Built inside vmap (traced budget) ...
    out = jax.vmap(lambda b: run(BudgetConstraint(COSTS, b, jnp.ones(3))))(budgets)
    np.testing.assert_allclose(out, budgets, rtol=1e-5)
    # ... or a constraint whose budget leaf is batched, mapped with an in_axes prefix.
    c = BudgetConstraint(COSTS, 10.0, jnp.ones(3)).replace(budget=budgets)
    axes = c.replace(costs=None, budget=0, weights=None)
    np.testing.assert_allclose(jax.vmap(run, in_axes=(axes,))(c), budgets, rtol=1e-5)


def test_pytree_costs_one_budget():
    costs = {"a": COSTS, "b": jnp.array([[1.0, 5.0], [0.0, 2.0]])}
    weights = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 1.0])}
    c = BudgetConstraint(costs, 20.0, weights)
    assert c.group_sizes == (2, 2) and c.num_options == (4, 2)
    lo, hi = c.cost_range()
    assert float(lo) == 2 + 4 + 3 + 0 and float(hi) == 8 + 16 + 15 + 2
    with pytest.raises(ValueError, match="one .* weight array per costs leaf"):
        BudgetConstraint(costs, 20.0, {"a": jnp.ones(2)})


def test_logits_shape_checked():
    c = BudgetConstraint(COSTS, 10.0, jnp.ones(3))
    with pytest.raises(ValueError, match=r"expects \(N, K\) = \(3, 4\)"):
        expected_cost(jnp.zeros((4, 3)), c)
