"""RCO as optax transformations: manifold invariants and optax conformance."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem

from rco_jax import (
    BudgetConstraint,
    RCOState,
    budget_normal,
    expected_cost,
    init_logits,
    rco,
    retraction,
    skip_not_finite,
    softmax_stats,
    tangent_projection,
    transport_moments,
)

EPS32 = float(np.finfo(np.float32).eps)


def quad_loss(target):
    """A smooth non-decomposable loss: coupled quadratic in the probabilities."""

    def loss(alpha):
        p = jax.nn.softmax(alpha, -1)
        d = (p - target).ravel()
        return jnp.sum(d**2) + 0.5 * jnp.sum(d) ** 2

    return loss


def run(opt, alpha, loss, steps):
    """Runs ``steps`` optimizer steps under one jitted lax.scan; returns all iterates."""

    def step(carry, _):
        a, s = carry
        u, s = opt.update(jax.grad(loss)(a), s, a)
        a = optax.apply_updates(a, u)
        return (a, s), a

    (a, s), path = jax.jit(lambda a, s: jax.lax.scan(step, (a, s), length=steps))(
        alpha, opt.init(alpha)
    )
    return a, s, path


def residuals(path, c):
    return jax.vmap(lambda a: expected_cost(a, c) - c.budget)(path)


def assert_on_manifold(path, c, ulps=8):
    r = np.abs(np.asarray(residuals(path, c)))
    assert np.all(np.isfinite(r))
    assert r.max() <= ulps * np.finfo(np.asarray(path).dtype).eps * float(c.cost_range()[1])


def test_rco_stays_on_manifold_and_decreases_loss(problem):
    c, x = problem
    target = jax.nn.one_hot(jnp.arange(c.num_groups) % c.num_options, c.num_options)
    loss = quad_loss(target)
    a0 = init_logits(c)
    a, state, path = run(rco(0.1, c), a0, loss, 60)
    assert_on_manifold(path, c)
    assert float(loss(a)) < float(loss(a0))


@pytest.mark.parametrize(
    "inner",
    [
        pytest.param(lambda: optax.sgd(0.5), id="sgd"),
        pytest.param(lambda: optax.sgd(0.3, momentum=0.9), id="sgd-momentum"),
        pytest.param(lambda: optax.adam(0.1), id="adam"),
        pytest.param(lambda: optax.lion(0.02), id="lion"),
    ],
)
def test_chain_with_any_optimizer_stays_on_manifold(inner):
    c, x = make_problem(2, n=8, k=4)
    loss = quad_loss(jax.nn.one_hot(jnp.arange(8) % 4, 4))
    opt = optax.chain(tangent_projection(c), transport_moments(inner(), c), retraction(c))
    a0 = init_logits(c, x)
    a, _, path = run(opt, a0, loss, 40)
    assert_on_manifold(path, c)
    assert float(loss(a)) < float(loss(a0))


def test_transport_makes_first_moment_tangent():
    c, x = make_problem(3)
    a = init_logits(c, x)
    opt = rco(0.1, c)
    state = opt.init(a)
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    update = jax.jit(opt.update)
    for _ in range(3):
        u, state = update(jax.grad(loss)(a), state, a)
        a = optax.apply_updates(a, u)
    mu = optax.tree.get(state, "mu")
    n = budget_normal(a, c)
    # The stored moment was made tangent at the previous point; at the current
    # point it is not (that is what transport is for) ...
    before = abs(float(jnp.vdot(mu, n)))
    # ... and the wrapper's projection fixes it: check on a fresh update call.
    wrapper = transport_moments(optax.scale_by_adam(), c)
    inner_state = optax.tree.get(state, "ScaleByAdamState")
    zeros = jnp.zeros_like(a)
    _, new_state = jax.jit(wrapper.update)(zeros, inner_state, a)
    after = abs(float(jnp.vdot(new_state.mu, n)))
    assert after <= 1e-5 * float(jnp.linalg.norm(mu) * jnp.linalg.norm(n))
    assert before > 10 * after


def test_update_requires_params():
    c, x = make_problem(0)
    for opt in (rco(0.1, c), tangent_projection(c), retraction(c)):
        with pytest.raises(ValueError, match="needs the current parameters"):
            opt.update(x, opt.init(x))


def test_jit_does_not_recompile_across_steps():
    c, x = make_problem(1)
    opt = rco(0.05, c)
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])

    @jax.jit
    def step(a, s):
        u, s = opt.update(jax.grad(loss)(a), s, a)
        return optax.apply_updates(a, u), s

    a, s = init_logits(c, x), opt.init(x)
    for _ in range(5):
        a, s = step(a, s)
    assert step._cache_size() == 1


def test_vmap_over_independent_problems():
    """Logits and budgets batched: B independent RCO runs in one vmapped scan."""
    costs = jnp.array([2.0, 3.0, 4.0, 8.0])
    budgets = jnp.array([14.0, 20.0, 30.0])
    keys = jax.random.split(jax.random.key(0), 3)

    def one(budget, key):
        c = BudgetConstraint(costs, budget, jnp.ones(6))
        target = jax.random.uniform(key, (6, 4))
        a, _, path = run(rco(0.1, c), init_logits(c), quad_loss(target), 25)
        return a, residuals(path, c)

    a, r = jax.jit(jax.vmap(one))(budgets, keys)
    assert np.abs(np.asarray(r)).max() <= 8 * EPS32 * 8 * 6
    one = jax.jit(one)
    for i in range(3):  # equals the unbatched run
        ai, _ = one(budgets[i], keys[i])
        np.testing.assert_allclose(a[i], ai, rtol=1e-4, atol=1e-4)


def test_float64(x64):
    c, x = make_problem(9, dtype=jnp.float64)
    a, state, path = run(
        rco(0.1, c), init_logits(c, x), quad_loss(jnp.eye(4)[jnp.arange(6) % 4]), 30
    )
    assert a.dtype == jnp.float64
    assert_on_manifold(path, c, ulps=16)
    assert np.abs(np.asarray(residuals(path, c))).max() < 1e-12 * float(c.cost_range()[1])


def test_param_dtype_preserved_and_state_stable_under_cond():
    c, x = make_problem(4)
    opt = rco(0.1, c)
    a = init_logits(c, x)
    s0 = opt.init(a)
    g = jnp.ones_like(a)
    u, s1 = opt.update(g, s0, a)
    assert u.dtype == a.dtype
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    assert [x.dtype for x in jax.tree.leaves(s0)] == [x.dtype for x in jax.tree.leaves(s1)]
    # Structure and dtypes are stable, so a step can live in a lax.cond branch.
    s2 = jax.lax.cond(True, lambda s: opt.update(g, s, a)[1], lambda s: s, s0)
    assert jax.tree.structure(s2) == jax.tree.structure(s0)


def test_learning_rate_schedule_and_inject_hyperparams():
    c, x = make_problem(5)
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    sched = optax.exponential_decay(0.2, transition_steps=10, decay_rate=0.5)
    a, _, path = run(rco(sched, c), init_logits(c, x), loss, 20)
    assert_on_manifold(path, c)

    opt = optax.inject_hyperparams(rco)(learning_rate=0.1, constraint=c)
    a0 = init_logits(c, x)
    state = opt.init(a0)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, state = jax.jit(opt.update)(jax.grad(loss)(a0), state, a0)
    np.testing.assert_allclose(u, 0.0, atol=1e-6)  # lr 0 => no move (retraction centred)
    state.hyperparams["learning_rate"] = jnp.asarray(0.1)
    a1, _, path = run(opt, a0, loss, 10)
    assert_on_manifold(path, c)
    assert float(loss(a1)) < float(loss(a0))


def test_multisteps_accumulates_and_stays_on_manifold():
    c, x = make_problem(6)
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    opt = optax.MultiSteps(rco(0.1, c), every_k_schedule=3)
    a0 = init_logits(c, x)
    a, _, path = run(opt, a0, loss, 9)
    assert_on_manifold(path, c)
    moved = np.abs(np.diff(np.asarray(path), axis=0)).max(axis=(1, 2)) > 0
    # Only every third step applies an update.
    np.testing.assert_array_equal(moved, [False, True, False, False, True, False, False, True])


def test_non_finite_gradients_never_reach_logits():
    c, x = make_problem(7)
    a = init_logits(c, x)
    for opt in (rco(0.1, c), optax.apply_if_finite(rco(0.1, c), 2)):
        state = opt.init(a)
        good = jnp.ones_like(a)
        update = jax.jit(opt.update)
        u, state = update(good, state, a)
        a1 = optax.apply_updates(a, u)
        for bad in (good.at[0, 0].set(jnp.nan), good.at[1, 2].set(jnp.inf)):
            u, state2 = update(bad, state, a1)
            assert bool(jnp.all(jnp.isfinite(u))) and bool(jnp.all(u == 0))
            # rco's own guard keeps Adam's state unchanged on a skipped step.
            mu_after = optax.tree.get(state2, "mu")
            np.testing.assert_array_equal(mu_after, optax.tree.get(state, "mu"))
    # The standalone projection zeroes a non-finite update instead of passing it on.
    chain = optax.chain(tangent_projection(c), optax.sgd(0.1), retraction(c))
    s = chain.init(a)
    u, _ = jax.jit(chain.update)(jnp.full_like(a, jnp.nan), s, a)
    assert bool(jnp.all(u == 0))


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    "values, dtype, finite",
    [
        ([1.0, -2.0, 0.0, 5e-39], jnp.float32, True),
        ([1e30, 1e30, -1e30, 1e30], jnp.float32, True),
        ([1.0, jnp.nan, 0.0, 0.0], jnp.float32, False),
        ([jnp.inf, 0.0, 0.0, 0.0], jnp.float32, False),
        ([-jnp.inf, 0.0, 0.0, 0.0], jnp.float32, False),
        ([jnp.inf, -jnp.inf, 0.0, 0.0], jnp.float32, False),
        # The documented exception: finite entries whose sum overflows count as non-finite.
        ([F32_MAX, F32_MAX, 0.0, 0.0], jnp.float32, False),
        # Half precision is summed in float32: 60000 + 60000 overflows float16 itself.
        ([60000.0, 60000.0, 0.0, 0.0], jnp.float16, True),
        ([60000.0, jnp.inf, 0.0, 0.0], jnp.float16, False),
    ],
)
def test_finiteness_check_is_one_sum(values, dtype, finite):
    from rco_jax.transforms import _all_finite

    x = jnp.zeros((6, 4), dtype).at[2].set(jnp.asarray(values, dtype))
    tree = {"a": x, "steps": jnp.arange(3), "b": jnp.ones(5, dtype)}
    assert bool(jax.jit(_all_finite)(tree)) is finite
    # The oracle (numpy's entrywise test) agrees wherever the sum does not overflow.
    if values[:2] != [F32_MAX, F32_MAX]:
        assert bool(np.all(np.isfinite(np.asarray(x)))) is finite


@pytest.mark.parametrize("seed", range(4))
def test_equality_check_matches_entrywise_equality(seed):
    from rco_jax.transforms import _all_equal

    rng = np.random.default_rng(seed)
    a = {"x": rng.normal(size=(7, 5)).astype(np.float32), "y": rng.normal(size=3)}
    a["y"] = a["y"].astype(np.float32)
    check = jax.jit(_all_equal)
    assert bool(check(a, a))
    i, j = rng.integers(7), rng.integers(5)
    for edit in (
        np.nextafter(a["x"][i, j], np.float32(np.inf)),  # one ulp
        -a["x"][i, j],
        np.float32(np.nan),
    ):
        b = {"x": a["x"].copy(), "y": a["y"]}
        b["x"][i, j] = edit
        assert bool(check(a, b)) is bool(np.array_equal(a["x"], b["x"])) is False
    # -0.0 == 0.0, as with ==.
    z = {"x": np.zeros((2, 2), np.float32), "y": np.zeros(3, np.float32)}
    assert bool(check(z, jax.tree.map(np.negative, z)))


def test_state_save_restore_continues_bit_for_bit(tmp_path):
    c, x = make_problem(8)
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    opt = rco(optax.cosine_decay_schedule(0.1, 20), c)

    @jax.jit
    def step(a, s):
        u, s = opt.update(jax.grad(loss)(a), s, a)
        return optax.apply_updates(a, u), s

    a, s = init_logits(c, x), opt.init(x)
    for _ in range(4):
        a, s = step(a, s)
    blob = flax.serialization.to_bytes({"params": a, "opt_state": s})
    (tmp_path / "ckpt.msgpack").write_bytes(blob)
    a_ref, s_ref = a, s
    for _ in range(4):
        a_ref, s_ref = step(a_ref, s_ref)
    template = {"params": jnp.zeros_like(a), "opt_state": opt.init(x)}
    restored = flax.serialization.from_bytes(template, (tmp_path / "ckpt.msgpack").read_bytes())
    a2, s2 = restored["params"], restored["opt_state"]
    for _ in range(4):
        a2, s2 = step(a2, s2)
    np.testing.assert_array_equal(a2, a_ref)
    for l1, l2 in zip(jax.tree.leaves(s2), jax.tree.leaves(s_ref)):
        np.testing.assert_array_equal(l1, l2)


def uncached_rco(lr, c):
    """The same chain as ``rco`` with every softmax recomputed from the parameters."""
    return skip_not_finite(
        optax.chain(
            tangent_projection(c, check_finite=False),
            transport_moments(optax.scale_by_adam(), c),
            optax.scale_by_learning_rate(lr),
            retraction(c, check_finite=False),
        )
    )


@pytest.mark.parametrize("layout", ["shared", "per_group"])
def test_cached_normal_follows_the_uncached_chain(layout):
    c, x = make_problem(12, layout=layout)
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    a0 = init_logits(c, x)
    a, s, path = run(rco(0.1, c), a0, loss, 25)
    _, _, ref = run(uncached_rco(0.1, c), a0, loss, 25)
    assert_on_manifold(path, c)
    np.testing.assert_allclose(path, ref, atol=2e-5)
    kept = optax.tree.get(s, "stats")
    np.testing.assert_allclose(kept.normals[0], budget_normal(a, c), atol=1e-5)
    np.testing.assert_allclose(kept.cost, [expected_cost(a, c)], rtol=1e-6)
    np.testing.assert_array_equal(s.point, a)


@pytest.mark.parametrize("inequality", [False, True])
def test_cached_normal_on_mixed_layers_follows_the_uncached_chain(inequality):
    """A pytree with a shared-cost layer (normal formed from the retraction's sums) and a
    per-group layer (normal from its softmax), equality and inequality budgets."""
    rng = np.random.default_rng(3)
    costs = {"a": jnp.array([2.0, 4.0, 8.0]), "b": jnp.asarray(rng.uniform(1, 6, (4, 3)))}
    weights = {"a": jnp.asarray(rng.uniform(0.5, 2, 5)), "b": jnp.asarray(rng.uniform(0.5, 2, 4))}
    c = BudgetConstraint(costs, 30.0, weights, inequality=inequality)
    target = {"a": jnp.eye(3)[jnp.array([2, 2, 1, 2, 0])], "b": jnp.eye(3)[jnp.array([2, 2, 2, 1])]}

    def loss(alpha):
        return sum(jnp.sum((jax.nn.softmax(alpha[k], -1) - target[k]) ** 2) for k in ("a", "b"))

    x = {"a": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(rng.normal(size=(4, 3)))}
    a0 = init_logits(c, x)
    a, s, path = run(rco(0.1, c), a0, loss, 25)
    _, _, ref = run(uncached_rco(0.1, c), a0, loss, 25)
    for k in ("a", "b"):
        np.testing.assert_allclose(path[k], ref[k], atol=2e-5)
    costs_path = np.asarray(jax.vmap(lambda z: expected_cost(z, c))(path))
    tol = 8 * EPS32 * float(c.cost_range()[1])
    assert np.all(costs_path <= 30.0 + tol)
    if not inequality:
        assert np.max(np.abs(costs_path - 30.0)) <= tol
    kept = optax.tree.get(s, "stats")
    for k in ("a", "b"):
        np.testing.assert_allclose(kept.normals[k][0], budget_normal(a, c)[k], atol=1e-5)
    np.testing.assert_allclose(kept.cost, [expected_cost(a, c)], rtol=1e-6)


def test_params_changed_outside_recompute_the_normal():
    """A checkpoint restore or an outside edit of the logits between steps: the
    update is the one for the new parameters, also after a skipped step."""
    c, x = make_problem(13, layout="shared")
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    opt = rco(0.1, c)
    update = jax.jit(opt.update)
    a = init_logits(c, x)
    s = opt.init(a)
    for _ in range(3):
        u, s = update(jax.grad(loss)(a), s, a)
        a = optax.apply_updates(a, u)
    other = init_logits(c, x[::-1])
    g = jax.grad(loss)(other)

    def with_stats_of(point, state):
        inner = optax.tree.set(state.inner, stats=softmax_stats(point, c))
        return RCOState(inner, point)

    want, _ = update(g, with_stats_of(other, s), other)
    got, s2 = update(g, s, other)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The check matters: the previous iterate's softmax gives a different step.
    stale, _ = update(g, s._replace(point=other), other)
    assert float(jnp.max(jnp.abs(stale - want))) > 1e-3
    # A skipped step at the new parameters leaves the softmax of those parameters behind.
    zero, s3 = update(jnp.full_like(g, jnp.nan), s, other)
    assert bool(jnp.all(zero == 0))
    got, _ = update(g, s3, other)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_vmapped_members_with_and_without_a_valid_cache_equal_single_steps():
    c, x = make_problem(14, layout="shared")
    loss = quad_loss(jnp.eye(4)[jnp.arange(6) % 4])
    opt = rco(0.1, c)
    a = init_logits(c, x)
    s = opt.init(a)
    u, s = opt.update(jax.grad(loss)(a), s, a)
    a = optax.apply_updates(a, u)
    params = jnp.stack([a, init_logits(c, x[::-1])])  # member 1 was changed outside
    grads = jax.vmap(jax.grad(loss))(params)
    states = jax.tree.map(lambda z: jnp.stack([z, z]), s)
    got, _ = jax.jit(jax.vmap(opt.update))(grads, states, params)
    for i in range(2):
        want, _ = opt.update(grads[i], s, params[i])
        np.testing.assert_allclose(got[i], want, atol=1e-6)
