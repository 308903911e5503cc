"""discretize and gumbel_ste against brute force and autodiff oracles."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import BudgetConstraint, discretize, gumbel_ste
from rco_jax.discrete import assignment_cost, one_hot


def brute_force_best(values: np.ndarray, costs: np.ndarray, budget: float):
    """Oracle: enumerate every assignment; best value within the budget."""
    n, k = values.shape
    best, best_a = -np.inf, None
    for a in itertools.product(range(k), repeat=n):
        if costs[np.arange(n), a].sum() <= budget + 1e-9:
            v = values[np.arange(n), a].sum()
            if v > best:
                best, best_a = v, np.array(a)
    return best, best_a


@pytest.mark.parametrize("seed", range(6))
def test_discretize_is_most_probable_feasible(seed):
    rng = np.random.default_rng(seed)
    n, k = 5, 3
    costs = rng.integers(1, 6, size=k).astype(np.float64)
    weights = rng.integers(1, 4, size=n).astype(np.float64)
    full = weights[:, None] * costs
    lo, hi = full.min(1).sum(), full.max(1).sum()
    c = BudgetConstraint(
        jnp.asarray(costs), float(np.floor(lo + 0.4 * (hi - lo))) + 0.5, jnp.asarray(weights)
    )
    logits = rng.normal(size=(n, k)) * 2
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1), np.float64)
    best, _ = brute_force_best(logp, full, float(c.budget))
    a = np.asarray(discretize(jnp.asarray(logits, jnp.float32), c))
    assert full[np.arange(n), a].sum() <= float(c.budget)
    np.testing.assert_allclose(logp[np.arange(n), a].sum(), best, rtol=1e-5)


def test_discretize_pytree_matches_stacked():
    rng = np.random.default_rng(0)
    costs = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([[0.0, 4.0], [1.0, 2.0]])}
    weights = {"a": jnp.array([1.0, 2.0, 1.0]), "b": jnp.array([1.0, 1.0])}
    c = BudgetConstraint(costs, 9.0, weights)
    logits = {"a": jnp.asarray(rng.normal(size=(3, 3))), "b": jnp.asarray(rng.normal(size=(2, 2)))}
    a = discretize(logits, c)
    assert a["a"].shape == (3,) and a["b"].shape == (2,)
    assert float(assignment_cost(a, c)) <= 9.0
    # brute force over the joint space
    full = [np.asarray(g) for g in c.group_costs()]
    logp = [np.asarray(jax.nn.log_softmax(logits[k], -1)) for k in ("a", "b")]
    best = -np.inf
    for xa in itertools.product(range(3), repeat=3):
        for xb in itertools.product(range(2), repeat=2):
            cost = full[0][np.arange(3), xa].sum() + full[1][np.arange(2), xb].sum()
            if cost <= 9.0:
                best = max(best, logp[0][np.arange(3), xa].sum() + logp[1][np.arange(2), xb].sum())
    got = logp[0][np.arange(3), a["a"]].sum() + logp[1][np.arange(2), a["b"]].sum()
    np.testing.assert_allclose(got, best, rtol=1e-5)


def _problem():
    costs = jnp.array([2.0, 3.0, 4.0, 8.0])
    c = BudgetConstraint(costs, 22.0, jnp.ones(6))
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    return c, logits


def test_gumbel_ste_forward_one_hot_and_feasible():
    c, logits = _problem()
    sample = jax.jit(lambda k, x: gumbel_ste(k, x, c, 0.5))
    for i in range(10):
        w = np.asarray(sample(jax.random.key(i), logits))
        np.testing.assert_array_equal(w.sum(1), 1.0)
        assert set(np.unique(w)) <= {0.0, 1.0}
        assert float(jnp.sum(w * np.asarray(c.group_costs()[0]))) <= 22.0


def test_gumbel_ste_gradient_is_softmax_jacobian():
    c, logits = _problem()
    key, tau = jax.random.key(3), 0.7
    probe = jax.random.normal(jax.random.key(4), (6, 4))
    noise = jax.random.gumbel(key, (6, 4))
    g_ste = jax.grad(lambda x: jnp.sum(probe * gumbel_ste(key, x, c, tau)))(logits)
    g_soft = jax.grad(lambda x: jnp.sum(probe * jax.nn.softmax((x + noise) / tau, -1)))(logits)
    np.testing.assert_allclose(g_ste, g_soft, rtol=1e-5, atol=1e-6)


def test_gumbel_ste_noise_depends_only_on_key():
    c, logits = _problem()
    a = gumbel_ste(jax.random.key(1), logits, c, 1.0)
    b = gumbel_ste(jax.random.key(1), logits, c, 1.0)
    np.testing.assert_array_equal(a, b)
    draws = [np.argmax(gumbel_ste(jax.random.key(i), logits, c, 1.0), 1) for i in range(8)]
    many = {tuple(d.tolist()) for d in draws}
    assert len(many) > 1


def test_gumbel_ste_low_temperature_equals_discretize_of_noisy_logits():
    """As the noise is fixed, the forward sample is the DP on (logits + G)."""
    c, logits = _problem()
    key = jax.random.key(5)
    noise = jax.random.gumbel(key, (6, 4))
    w = gumbel_ste(key, logits, c, 0.3)
    # discretize maximizes log-softmax, which differs from z by a per-row constant
    a = discretize((logits + noise) / 0.3, c)
    np.testing.assert_array_equal(np.argmax(w, 1), a)
    np.testing.assert_array_equal(one_hot(a, c), w)
