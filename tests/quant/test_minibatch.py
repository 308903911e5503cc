"""RCO with a fresh calibration minibatch per step (issue 13, part 1), on the tiny GGUF model.

Oracles: the loss of step 0 recomputed by hand (the minibatch of the pool that step drew, the
Gumbel sample at the retracted initial logits) and a full-batch reference table against the
per-step reference forward.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import expected_cost, gumbel_ste, init_logits
from rco_jax.lm import model as lm
from rco_jax.quant import pipeline, search
from rco_jax.quant.quantizers import dequantize, quantize_rtn

BITS = (2, 4, 8)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    config, weights = lm.load_smollm2(tiny_gguf)
    quantized = {
        n: {b: np.asarray(dequantize(quantize_rtn(np.asarray(weights[n]).T, b))) for b in BITS}
        for n in lm.linear_names(config)
    }
    space = search.SearchSpace.build(weights, quantized, config, bits=BITS)
    pool = np.random.default_rng(1).integers(0, config.vocab_size, (6, 12))
    ref = search.reference_log_probs(space.reference_weights(), pool, config)
    return space, pool, ref


KEY, STEPS, BATCH = 3, 6, 2


@pytest.fixture(scope="module")
def run(tiny):
    """One minibatch run (on-the-fly reference log-probs, checkpoints every 2 steps)."""
    space, pool, ref = tiny
    calls = []

    def checkpoint(a):
        calls.append(np.asarray(a))
        return search.calibration_kl(space, pool, ref, a)

    res = search.run_rco(
        space, pool, None, 3.5, key=jax.random.key(KEY), num_steps=STEPS, learning_rate=0.2,
        batch_seqs=BATCH, checkpoint_every=2, checkpoint_fn=checkpoint, progress=False,
    )  # fmt: skip
    return res, calls


def test_minibatch_rco_feasible_on_manifold(tiny, run):
    space, pool, ref = tiny
    res, calls = run
    a = np.asarray(res.assignment)
    assert space.within_budget(a, 3.5)
    c = space.constraint(3.5)
    err = np.abs(np.asarray(res.history["budget_error"])) / float(c.budget)
    assert err.max() < 1e-5
    assert abs(float(expected_cost(res.logits, c)) / float(c.budget) - 1) < 1e-5
    assert np.all(np.asarray(res.history["sample_cost"]) <= float(c.budget))
    assert np.all(np.isfinite(np.asarray(res.history["loss"])))
    assert res.history["loss"].shape == (STEPS,)
    # The reported loss is the answer's KL on the first batch_seqs windows of the pool.
    np.testing.assert_allclose(
        float(res.loss), search.calibration_kl(space, pool[:BATCH], ref[:BATCH], a), rtol=1e-4
    )
    # Checkpoints: every 2 steps, feasible assignments, times increasing; the last one is the
    # answer (both are the discretized final logits).
    assert len(calls) == STEPS // 2 and all(space.within_budget(x, 3.5) for x in calls)
    np.testing.assert_array_equal(calls[-1], a)
    assert np.all(np.diff(res.history["trace_seconds"]) > 0)
    np.testing.assert_allclose(
        res.history["trace_value"][-1], search.calibration_kl(space, pool, ref, a), rtol=1e-6
    )


@pytest.mark.slow
def test_reference_table_gives_the_same_run(tiny, run):
    """Gathering reference log-probs from a table = the per-step reference forward."""
    space, pool, ref = tiny
    table = search.run_rco(
        space, pool, ref, 3.5, key=jax.random.key(KEY), num_steps=STEPS, learning_rate=0.2,
        batch_seqs=BATCH, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(table.assignment), np.asarray(run[0].assignment))
    np.testing.assert_allclose(table.history["loss"], run[0].history["loss"], rtol=1e-4)


def test_step_zero_uses_a_fresh_minibatch_of_the_pool(tiny, run):
    space, pool, ref = tiny
    key, b = jax.random.key(KEY), BATCH
    # Oracle: the step's minibatch and Gumbel sample, drawn as documented.
    c = space.constraint(3.5)
    k_batch, k_noise = jax.random.split(jax.random.fold_in(key, 0))
    idx = np.asarray(jax.random.choice(k_batch, len(pool), (b,), replace=False))
    tau0 = 1.0
    w = gumbel_ste(k_noise, init_logits(c, None), c, tau0)
    a = np.asarray(jnp.argmax(w, -1))
    kls = {
        s: search.calibration_kl(space, pool[np.array(s)], ref[np.array(s)], a)
        for s in itertools.combinations(range(len(pool)), b)
    }
    loss0 = float(run[0].history["loss"][0])
    np.testing.assert_allclose(loss0, kls[tuple(sorted(idx))], rtol=1e-4)
    # ... and not the KL of the first windows of the pool (unless those were drawn).
    if tuple(sorted(idx)) != (0, 1):
        assert not np.isclose(loss0, kls[(0, 1)], rtol=1e-4)


def test_minibatches_differ_between_steps(tiny):
    """Over 8 steps the drawn minibatches are not all the same (fresh every step)."""
    key, n = jax.random.key(0), len(tiny[1])
    batches = {
        tuple(sorted(np.asarray(jax.random.choice(
            jax.random.split(jax.random.fold_in(key, t))[0], n, (2,), replace=False
        )).tolist()))
        for t in range(8)
    }  # fmt: skip
    assert len(batches) > 1


@pytest.mark.slow
def test_batch_at_least_pool_is_full_batch(tiny):
    space, pool, ref = tiny
    kw = dict(key=jax.random.key(1), num_steps=3, progress=False)
    full = search.run_rco(space, pool, ref, 3.5, **kw)
    same = search.run_rco(space, pool, None, 3.5, batch_seqs=len(pool), **kw)
    np.testing.assert_array_equal(np.asarray(full.assignment), np.asarray(same.assignment))
    np.testing.assert_allclose(full.history["loss"], same.history["loss"], rtol=1e-4)
    with pytest.raises(ValueError, match="batch_seqs"):
        search.run_rco(space, pool, ref, 3.5, batch_seqs=0, **kw)


def test_pipeline_pool_contains_the_calibration_windows():
    cfg = pipeline.QuantizeConfig.quick()
    assert cfg.pool_seqs > cfg.batch_seqs and cfg.pool_seqs >= cfg.calib_seqs
    full = pipeline.QuantizeConfig.full()
    assert full.pool_seqs == 256 and full.batch_seqs < full.pool_seqs
    with pytest.raises(ValueError, match="pool-seqs"):
        pipeline.QuantizeConfig.quick(pool_seqs=1, calib_seqs=2).validate()
