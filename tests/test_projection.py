"""Birkhoff projection and balanced softmax against a float64 Sinkhorn oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import balanced_softmax, birkhoff_projection


def marginal_error(t, capacities=None) -> np.ndarray:
    """``||T 1 - 1||_1 + ||T^T 1 - cap||_1`` per matrix, in float64."""
    t = np.asarray(t, np.float64)
    cap = np.ones(t.shape[-1]) if capacities is None else np.asarray(capacities, np.float64)
    return np.abs(t.sum(-1) - 1).sum(-1) + np.abs(t.sum(-2) - cap).sum(-1)


def sinkhorn_oracle(x, capacities=None, tol=1e-14, max_iter=200_000) -> np.ndarray:
    """Float64 log-domain Sinkhorn run to convergence (independent of the Newton solver)."""
    x = np.asarray(x, np.float64)
    n, k = x.shape
    log_cap = np.log(np.ones(k) if capacities is None else np.asarray(capacities, np.float64))
    g = np.zeros(k)
    for _ in range(max_iter):
        y = x + g
        log_p = y - np.logaddexp.reduce(y, axis=1, keepdims=True)
        log_col = np.logaddexp.reduce(log_p, axis=0)
        if np.abs(np.exp(log_col) - np.exp(log_cap)).sum() < tol:
            break
        g = g + log_cap - log_col
    y = x + g
    return np.exp(y - np.logaddexp.reduce(y, axis=1, keepdims=True))


@pytest.mark.parametrize("std", [1.0, 10.0])
def test_doubly_stochastic_float32(std):
    x = std * jax.random.normal(jax.random.key(0), (2000, 4, 4))
    t, info = jax.jit(lambda x: birkhoff_projection(x, return_info=True))(x)
    err = marginal_error(t)
    assert err.max() <= 1e-5, (err.max(), np.median(err))
    assert bool(jnp.all(info.converged))
    assert np.all(np.asarray(t) >= 0)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda k: 50.0 * jnp.eye(4)[jnp.array([2, 0, 3, 1])], id="permutation"),
        pytest.param(
            lambda k: 30.0 * jnp.eye(5)[::-1] + jax.random.normal(k, (5, 5)), id="near-permutation"
        ),
        pytest.param(lambda k: 1e4 * jax.random.normal(k, (4, 4)), id="huge"),
        pytest.param(lambda k: jnp.full((4, 4), 7.0), id="constant"),
        pytest.param(
            lambda k: jnp.arange(4.0)[:, None] * 3 + jnp.arange(4.0)[None, :] * 5, id="rank-one"
        ),
        pytest.param(lambda k: jax.random.normal(k, (8, 8)) * 20, id="n=8 hard"),
    ],
)
def test_adversarial_inputs(make):
    x = make(jax.random.key(3))
    t = birkhoff_projection(x)
    assert np.all(np.isfinite(np.asarray(t)))
    assert marginal_error(t) <= 1e-5 * x.shape[-1] / 4


def test_separable_logits_give_the_uniform_matrix():
    x = jnp.arange(4.0)[:, None] * 3 + jnp.arange(4.0)[None, :] * 5
    np.testing.assert_allclose(birkhoff_projection(x), jnp.full((4, 4), 0.25), atol=1e-6)


@pytest.mark.parametrize("std", [1.0, 5.0])
def test_equals_float64_sinkhorn(std):
    x = std * jax.random.normal(jax.random.key(1), (20, 4, 4))
    t = np.asarray(birkhoff_projection(x), np.float64)
    for xi, ti in zip(np.asarray(x), t):
        np.testing.assert_allclose(ti, sinkhorn_oracle(xi), atol=2e-6)


def test_float64_equals_oracle_to_1e12(x64):
    x = jax.random.normal(jax.random.key(2), (5, 6, 6), jnp.float64) * 3
    t = birkhoff_projection(x)
    assert t.dtype == jnp.float64
    for xi, ti in zip(np.asarray(x), np.asarray(t)):
        np.testing.assert_allclose(ti, sinkhorn_oracle(xi, tol=1e-15), atol=1e-12)
    assert marginal_error(t).max() <= 1e-12


@pytest.mark.parametrize("which", ["birkhoff", "balanced"])
def test_implicit_gradient_matches_finite_differences(x64, which):
    key = jax.random.key(4)
    if which == "birkhoff":
        x = 2.0 * jax.random.normal(key, (3, 4, 4), jnp.float64)
        f = birkhoff_projection
    else:
        x = 2.0 * jax.random.normal(key, (2, 6, 3), jnp.float64)
        cap = jnp.array([3.0, 2.0, 1.0], jnp.float64)
        f = lambda z: balanced_softmax(z, cap)
    w = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)
    loss = lambda z: jnp.sum(w * f(z))
    g = jax.grad(loss)(x)
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = jnp.asarray(rng.normal(size=x.shape))
        fd = (loss(x + 1e-6 * d) - loss(x - 1e-6 * d)) / 2e-6
        np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(jax.jvp(loss, (x,), (d,))[1], jnp.vdot(g, d), rtol=1e-9)


def test_backward_memory_does_not_depend_on_the_iterations():
    x = 5.0 * jax.random.normal(jax.random.key(6), (64, 4, 4))
    sizes = []
    for max_iter in (8, 64):
        g = jax.grad(lambda z, m=max_iter: jnp.sum(birkhoff_projection(z, max_iter=m)[..., 0]))
        mem = jax.jit(g).lower(x).compile().memory_analysis()
        sizes.append(None if mem is None else mem.temp_size_in_bytes)
    assert sizes[0] == sizes[1]


def test_jit_vmap_and_batch_shapes():
    x = jax.random.normal(jax.random.key(7), (2, 3, 4, 4))
    f = jax.jit(birkhoff_projection)
    t = f(x)
    assert t.shape == x.shape and t.dtype == x.dtype
    f(x + 1.0)
    assert f._cache_size() == 1
    np.testing.assert_allclose(t[1, 2], birkhoff_projection(x[1, 2]), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(birkhoff_projection)(x[0]), t[0], atol=1e-6)


def test_a_nan_stays_in_its_matrix():
    x = jax.random.normal(jax.random.key(8), (6, 4, 4))
    bad = x.at[2, 1, 3].set(jnp.nan)
    t_bad, t = birkhoff_projection(bad), birkhoff_projection(x)
    assert np.all(np.isnan(np.asarray(t_bad[2])))
    others = np.array([0, 1, 3, 4, 5])
    np.testing.assert_allclose(t_bad[others], t[others], atol=1e-6)
    g = jax.grad(lambda z: jnp.sum(birkhoff_projection(z)[..., 0, 0]))(bad)
    assert np.all(np.isfinite(np.asarray(g[others])))


def test_balanced_softmax_rows_columns_and_oracle():
    cap = jnp.array([3.0, 2.0, 1.0, 0.5, 1.5])
    x = 3.0 * jax.random.normal(jax.random.key(9), (4, 8, 5))
    t = balanced_softmax(x, cap)
    assert marginal_error(t, cap).max() <= 1e-5
    for xi, ti in zip(np.asarray(x), np.asarray(t, np.float64)):
        np.testing.assert_allclose(ti, sinkhorn_oracle(xi, cap), atol=2e-6)


@pytest.mark.parametrize(
    "cap, match",
    [
        (jnp.array([3.0, 3.0, 0.0]), "positive and sum"),
        (jnp.array([3.0, 3.0, -1.0]), "positive and sum"),
        (jnp.array([3.0, 3.0, 3.0]), "sum to the number of rows N=6"),
        (jnp.array([3.0, 3.0]), r"shape \(K,\) = \(3,\)"),
    ],
)
def test_balanced_softmax_errors(cap, match):
    with pytest.raises(ValueError, match=match):
        balanced_softmax(jnp.zeros((6, 3)), cap)


def test_birkhoff_requires_square_matrices():
    with pytest.raises(ValueError, match="square"):
        birkhoff_projection(jnp.zeros((4, 3)))
