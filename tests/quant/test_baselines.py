"""Baselines and metrics of the comparison (issue 13, part 3), on the tiny GGUF model.

* the Fisher proxy ``sum_s (dL_s/dW)^2 (W_b - W)^2`` against per-sequence gradients taken on
  the flat (unstacked) weights and summed in NumPy;
* its knapsack is feasible and optimal for the proxy (brute force);
* held-out EAR / KL against :mod:`rco_jax.lm.metrics` on the whole batch at once.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax.lm import metrics
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
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (3, 10))
    return config, weights, quantized, space, tokens


def test_fisher_errors_match_per_sequence_gradients(tiny):
    config, weights, quantized, space, tokens = tiny
    got = search.fisher_errors(space, tokens)
    names = lm.linear_names(config)

    def nll(lin, seq):
        return lm.nll(lm.forward({**weights, **lin}, seq, config), seq)

    fisher = {n: np.zeros(np.shape(weights[n]), np.float64) for n in names}
    for s in range(len(tokens)):
        g = jax.grad(nll)({n: weights[n] for n in names}, jnp.asarray(tokens[s : s + 1]))
        for n in names:
            fisher[n] += np.asarray(g[n], np.float64) ** 2
    want = np.array(
        [
            [
                np.sum(fisher[n] * (quantized[n][b].T - np.asarray(weights[n], np.float64)) ** 2)
                for b in BITS
            ]
            for n in names
        ]
    )
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-12)
    assert got.shape == (space.num_layers, len(BITS)) and np.all(np.isfinite(got))
    assert np.all(got[:, 0] > got[:, -1])  # 2 bits costs more loss than 8 bits, every layer


def test_fisher_dp_feasible_and_optimal_for_the_proxy(tiny):
    *_, space, tokens = tiny
    e = search.fisher_errors(space, tokens)
    # 14 layers x 3 options is too many to enumerate: fix all but 6 layers at 4 bits.
    free = np.arange(6)
    sub = np.full(space.num_layers, 1, np.int32)
    a = search.proxy_dp(space, e, 4.0)
    assert space.within_budget(a, 4.0)
    best = np.inf
    for choice in itertools.product(range(len(BITS)), repeat=len(free)):
        sub[free] = choice
        if space.within_budget(sub, 4.0):
            best = min(best, e[np.arange(space.num_layers), sub].sum())
    assert e[np.arange(space.num_layers), a].sum() <= best + 1e-12


def test_held_out_fidelity_matches_metrics(tiny):
    config, weights, _, space, tokens = tiny
    a = np.zeros(space.num_layers, np.int32)  # all 2 bits
    got = pipeline.held_out_fidelity(space, space.hard_weights(a), tokens, batch_size=2)
    ref_lp = jax.nn.log_softmax(lm.forward(space.reference_weights(), jnp.asarray(tokens), config))
    logits = lm.forward(space.hard_weights(a), jnp.asarray(tokens), config)
    np.testing.assert_allclose(got["ear"], float(metrics.ear(ref_lp, logits)), rtol=1e-5)
    np.testing.assert_allclose(
        got["held_out_kl"], float(metrics.kl_divergence(ref_lp, logits)), rtol=1e-4
    )
    assert 0 < got["ear"] < 1 and got["held_out_kl"] > 0
    # Perplexity from the same forward pass == a NumPy NLL of the logits.
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    t = np.asarray(tokens)
    nll = -np.take_along_axis(lp[:, :-1], t[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(got["ppl"], np.exp(nll), rtol=1e-4)
    same = pipeline.held_out_fidelity(space, space.reference_weights(), tokens)
    np.testing.assert_allclose(same["ear"], 1.0, rtol=1e-5)
    assert abs(same["held_out_kl"]) < 1e-5


def test_proxy_dp_alias():
    cfg = pipeline.QuantizeConfig(methods=("uniform", "proxy_dp"), init="proxy_dp")
    cfg.validate()
    assert cfg.methods == ("uniform", "output_error_dp") and cfg.init == "output_error_dp"


# -------------------------------------------------------------------------------------- ties


def test_tied_space_groups_costs_and_weights(tiny):
    config, _, _, space, tokens = tiny
    tied = space.tied(("qkv", "gate_up"))
    assert tied.num_groups == 4 * config.num_layers  # qkv, o, gate_up, down per layer
    assert tied.group_params.sum() == space.total_params
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, len(BITS), tied.num_groups).astype(np.int32)
        full = tied.expand(a)
        bits = tied.bits_of(a)
        for layer in range(config.num_layers):
            p = f"layers.{layer}."
            assert bits[p + "attn.q"] == bits[p + "attn.k"] == bits[p + "attn.v"]
            assert bits[p + "mlp.gate"] == bits[p + "mlp.up"]
        # Oracle: the untied space at the expanded assignment.
        assert tied.cost_bits(a) == space.cost_bits(full)
        for k, v in tied.hard_weights(a)["blocks"].items():
            np.testing.assert_array_equal(v, space.hard_weights(full)["blocks"][k])
        np.testing.assert_array_equal(tied.assignment_from_bits(bits), a)
    with pytest.raises(ValueError, match="tied linears"):
        tied.assignment_from_bits(
            {**bits, "layers.0.attn.k": 8 if bits["layers.0.attn.q"] != 8 else 2}
        )
    with pytest.raises(ValueError, match="unknown tie"):
        space.tied(("qkv", "up_down"))
    assert space.tied(()).group_of is None


def test_tied_methods_keep_ties_and_budget(tiny):
    *_, space, tokens = tiny
    tied = space.tied(("qkv",))
    e = search.fisher_errors(space, tokens)
    a = search.proxy_dp(tied, e, 4.0)
    assert a.shape == (tied.num_groups,) and tied.within_budget(a, 4.0)
    # The tied DP's objective is the untied proxy summed over the expanded assignment.
    full = tied.expand(a)
    np.testing.assert_allclose(
        tied.group_sum(e)[np.arange(tied.num_groups), a].sum(),
        e[np.arange(space.num_layers), full].sum(),
    )
    # Relaxed weights: one row per group, its probabilities applied to every tied linear.
    p = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(tied.num_groups, 3))))
    got, want = tied.weights(p)["blocks"], space.weights(tied.expand(p))["blocks"]
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])
    c = tied.constraint(4.0)
    assert c.weights.shape == (tied.num_groups,)
    # RCO and the evolutionary search on a tied space: tests/quant/test_search.py end to end.


# --------------------------------------------------------------------------- time to quality


def test_time_to_quality_from_histories():
    out = {
        "methods": {"rco": {"kl": 0.5, "seconds": 10.0}, "evolutionary": {"seconds": 30.0}},
        "rco_history": {"trace_seconds": [5.0, 10.0], "trace_kl": [0.7, 0.5]},
        # 6 generations, 10 evaluations each: generation g ends at 5 (g + 1) seconds.
        "evolutionary_history": {
            "loss": [0.9, 0.8, 0.6, 0.55, 0.5, 0.45],
            "evaluations": [10, 20, 30, 40, 50, 60],
        },
    }
    ttq = pipeline.time_to_quality(out)
    assert ttq["evolutionary_seconds_to_rco_kl"] == 25.0 and ttq["evo_over_rco"] == 2.5
    assert ttq["evolutionary"]["seconds"] == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    out["evolutionary_history"]["loss"] = [0.9] * 6
    ttq = pipeline.time_to_quality(out)
    assert ttq["evo_over_rco"] is None and ttq["evolutionary_budget_factor"] == 3.0
