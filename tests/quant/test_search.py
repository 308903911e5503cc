"""Mixed-precision search (rco_jax.quant.search / materialize / pipeline).

Fast tests run on the tiny random GGUF model of ``conftest.py`` (2 layers, 14 linears). Tests
marked ``model`` use the real SmolLM2-135M on a handful of tokens (RTN, two bit widths).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import expected_cost
from rco_jax.baselines import _swap_mutate, evolutionary
from rco_jax.lm import model as lm
from rco_jax.quant import export, materialize, pipeline, search
from rco_jax.quant.quantizers import dequantize, quantize_rtn

BUDGET = 3.0


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    config, weights = lm.load_smollm2(tiny_gguf)
    names = lm.linear_names(config)
    rng = np.random.default_rng(0)
    h_tokens = rng.integers(0, config.vocab_size, (4, 32))
    hess, _ = lm.input_hessians(weights, h_tokens, config, progress=False)
    db = export.build_database(
        {n: np.asarray(weights[n]).T for n in names}, hess, method="rtn", progress=False
    )
    space = search.SearchSpace.build(weights, db, config)
    tokens = rng.integers(0, config.vocab_size, (4, 16))
    ref = search.reference_log_probs(space.reference_weights(), tokens, config)
    return dict(config=config, weights=weights, db=db, space=space, tokens=tokens, ref=ref)


def random_feasible(space: search.SearchSpace, rng, avg_bits: float = BUDGET) -> np.ndarray:
    """Lowest bit width everywhere, then random upgrades (random order) while they fit."""
    a = np.zeros(space.num_layers, np.int32)
    for n in rng.permutation(space.num_layers):
        for k in rng.permutation(space.num_options):
            b = a.copy()
            b[n] = k
            if space.within_budget(b, avg_bits):
                a = b
                break
    return a


# ------------------------------------------------------------------------------ search space


def test_space_shapes_and_costs(tiny):
    space, config = tiny["space"], tiny["config"]
    assert space.num_layers == 7 * config.num_layers and space.num_options == 6
    shapes = lm.linear_shapes(config)
    assert space.params.tolist() == [int(np.prod(shapes[n])) for n in space.names]
    for kind, cand in space.candidates.items():
        d_in, d_out = shapes[f"layers.0.{kind}"]
        assert cand.shape == (config.num_layers, 6, d_in, d_out)
    c = space.constraint(BUDGET)
    assert float(c.budget) == BUDGET * space.total_params
    np.testing.assert_array_equal(np.asarray(c.weights), space.params)
    uniform = search.uniform_assignment(space, BUDGET)
    assert space.average_bits(uniform) == BUDGET and space.within_budget(uniform, BUDGET)
    assert not space.within_budget(uniform + 1, BUDGET)
    # A float32 budget is never above the real one.
    big = search.SearchSpace(**{**space.__dict__, "param_counts": (2**24 + 1,) * 14})
    assert big.budget(2.9) <= 2.9 * (2**24 + 1) * 14
    with pytest.raises(ValueError, match="strictly between 2 and 8"):
        space.constraint(8.0)


def test_one_hot_reproduces_quantized_weights_exactly(tiny):
    space, db = tiny["space"], tiny["db"]
    a = random_feasible(space, np.random.default_rng(1))
    relaxed = jax.jit(space.weights)(jax.nn.one_hot(a, 6))
    hard = space.hard_weights(a)
    flat = space.flat_weights(a)
    for n, name in enumerate(space.names):
        layer, kind = int(name.split(".")[1]), name.split(".", 2)[2]
        expected = db[name][space.bits[a[n]]].T
        np.testing.assert_array_equal(np.asarray(relaxed["blocks"][kind][layer]), expected)
        np.testing.assert_array_equal(np.asarray(hard["blocks"][kind][layer]), expected)
        np.testing.assert_array_equal(np.asarray(flat[name]), expected)
    # Non-linear parameters are the reference ones.
    np.testing.assert_array_equal(np.asarray(flat["embed"]), np.asarray(tiny["weights"]["embed"]))


def test_interpolation_is_reference_plus_weighted_deltas(tiny):
    space = tiny["space"]
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (space.num_layers, 6)), -1)
    w = space.weights(p)
    for kind, cand in space.candidates.items():
        ref = space.reference[kind]
        pk = p.reshape(-1, 7, 6)[:, lm.LINEAR_KINDS.index(kind)]
        expected = ref + jnp.einsum("lk,lkio->lio", pk, cand - ref[:, None])
        np.testing.assert_allclose(w["blocks"][kind], expected, rtol=1e-5, atol=1e-6)


def test_kl_loss_zero_at_reference_and_positive_when_quantized(tiny):
    space, tokens, ref = tiny["space"], tiny["tokens"], tiny["ref"]
    logits = lm.forward(space.reference_weights(), jnp.asarray(tokens), space.config)
    assert abs(float(search.kl_divergence(ref, logits))) < 1e-5
    a2 = np.zeros(space.num_layers, np.int32)  # 2 bits everywhere
    a8 = np.full(space.num_layers, 5, np.int32)  # 8 bits everywhere
    kl2 = search.calibration_kl(space, tokens, ref, a2)
    kl8 = search.calibration_kl(space, tokens, ref, a8)
    assert kl2 > kl8 > 0
    relaxed = search.kl_loss(space, tokens, ref)
    hard = search.kl_loss(space, tokens, ref, relaxed=False)
    w = jax.nn.one_hot(a2, 6)
    np.testing.assert_allclose(float(relaxed(w)), kl2, rtol=1e-5)
    np.testing.assert_allclose(float(hard(w)), kl2, rtol=1e-5)
    # Gradients flow to p in the relaxed loss (non-zero, finite).
    g = jax.grad(relaxed)(jax.nn.softmax(jnp.zeros((space.num_layers, 6))))
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_proxy_dp_feasible_and_optimal_for_the_proxy(tiny):
    space, db = tiny["space"], tiny["db"]
    rng = np.random.default_rng(2)
    for kind in ("hessian", "relative"):
        _, errors = db.error_table(kind)
        for budget in (2.5, 3.0, 4.25):
            a = search.proxy_dp(space, errors, budget)
            assert space.within_budget(a, budget)
            proxy = errors[np.arange(space.num_layers), a].sum()
            for _ in range(200):  # no random feasible assignment beats the exact DP
                b = random_feasible(space, rng, budget)
                assert proxy <= errors[np.arange(space.num_layers), b].sum() + 1e-12
    with pytest.raises(ValueError, match="finite"):
        search.proxy_dp(space, np.full((space.num_layers, 6), np.nan), 3.0)


def test_logits_from_assignment(tiny):
    space = tiny["space"]
    a = search.uniform_assignment(space, 4.0)
    logits = search.logits_from_assignment(space, a, 0.7)
    np.testing.assert_allclose(jax.nn.softmax(logits)[np.arange(14), a], 0.7, rtol=1e-6)
    with pytest.raises(ValueError):
        search.logits_from_assignment(space, a, 1.0)


# ------------------------------------------------------------------------------ methods


def test_swap_mutations_keep_cost_exactly():
    rng = np.random.default_rng(0)
    bits = np.array([2, 3, 4, 5, 6, 8], np.float64)
    sizes = rng.choice([100.0, 300.0, 700.0], size=40)
    costs = sizes[:, None] * bits
    a = np.ones(40, np.int64)  # 3 bits
    start = costs[np.arange(40), a].sum()
    changed = 0
    for kind in ("level", "random"):
        for _ in range(300):
            b = _swap_mutate(rng, a, costs[None], costs, np.array([start]), 3, kind, sizes)
            assert costs[np.arange(40), b].sum() == start
            moved = np.flatnonzero(b != a)
            changed += moved.size > 0
            # Moves pair up within one size class.
            for s in np.unique(sizes[moved]):
                assert (sizes[moved] == s).sum() >= 2
            a = b
    assert changed > 500


def test_evolutionary_swap_groups_exact_budget_and_default_unchanged():
    rng = np.random.default_rng(3)
    n, bits = 12, jnp.array([2.0, 3.0, 4.0, 8.0])
    sizes = rng.choice([1.0, 2.0], size=n)
    values = jnp.asarray(rng.uniform(size=(n, 4)) * np.array([0, 1, 1.5, 2]))
    from rco_jax import BudgetConstraint

    c = BudgetConstraint(bits, 3.0 * sizes.sum(), jnp.asarray(sizes, jnp.float32))
    loss = lambda w: -jnp.sum(w * values)
    init = jnp.ones(n, jnp.int32)
    res = evolutionary(
        loss, c, key=jax.random.key(0), num_generations=40, offspring=8, init=init,
        swap_groups=sizes, progress=False,
    )  # fmt: skip
    assert float(res.cost) == 3.0 * sizes.sum()  # swaps keep the start's cost exactly
    assert float(res.loss) < float(loss(jax.nn.one_hot(init, 4)))
    with pytest.raises(ValueError, match="one label per group"):
        evolutionary(loss, c, key=jax.random.key(0), num_generations=2, swap_groups=sizes[:3])
    # Extra loss arguments are passed through (not batched).
    res2 = evolutionary(
        lambda w, v: -jnp.sum(w * v), c, key=jax.random.key(0), num_generations=40,
        offspring=8, init=init, swap_groups=sizes, progress=False, loss_args=(values,),
    )  # fmt: skip
    np.testing.assert_array_equal(res2.assignment, res.assignment)


def test_rco_and_evolutionary_on_tiny_model(tiny):
    space, tokens, ref = tiny["space"], tiny["tokens"], tiny["ref"]
    res = search.run_rco(
        space, tokens, ref, 2.75, key=jax.random.key(0), num_steps=12, learning_rate=0.1,
        progress=False,
    )  # fmt: skip
    a = np.asarray(res.assignment)
    assert space.within_budget(a, 2.75)
    err = np.abs(np.asarray(res.history["budget_error"])) / float(space.constraint(2.75).budget)
    assert err.max() < 1e-5  # the relaxed iterate stays on the budget manifold
    np.testing.assert_allclose(
        float(res.loss), search.calibration_kl(space, tokens, ref, a), rtol=1e-4
    )
    c = space.constraint(2.75)
    assert abs(float(expected_cost(res.logits, c)) / float(c.budget) - 1) < 1e-5

    evo = search.run_evolutionary(
        space, tokens, ref, 3.0, key=jax.random.key(0), num_generations=5, offspring=4,
        progress=False,
    )  # fmt: skip
    a = np.asarray(evo.assignment)
    assert space.average_bits(a) == 3.0  # uniform start, cost-neutral swaps
    h = np.asarray(evo.history["loss"])
    assert np.all(np.diff(h) <= 0)
    with pytest.raises(ValueError, match="stages"):
        search.run_evolutionary(space, tokens, ref, 3.0, key=jax.random.key(0), stages=[(2, 1)])


# ------------------------------------------------------------------------------ export


def test_export_round_trip(tiny, tmp_path):
    space, db, config, weights = tiny["space"], tiny["db"], tiny["config"], tiny["weights"]
    a = random_feasible(space, np.random.default_rng(4))
    bits = space.bits_of(a)
    path = materialize.save_assignment(tmp_path / "a.json", bits, config)
    assert materialize.load_assignment(path, config) == bits
    np.testing.assert_array_equal(space.assignment_from_bits(bits), a)
    assert materialize.average_bits(bits, config) == space.average_bits(a)
    st = materialize.save_quantized_model(tmp_path / "q.safetensors", bits, db.quantized)
    loaded, bits2 = materialize.load_quantized_model(st, weights)
    assert bits2 == bits
    expected = space.flat_weights(a)
    assert set(loaded) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(expected[name]))
    tensors = export.load_quantized(st)
    for name, q in tensors.items():  # integer codes within the bit width
        assert q.bits == bits[name] and int(np.max(q.codes)) < 2**q.bits
    model = materialize.quantized_llama(st, config, weights)
    tokens = jnp.asarray(tiny["tokens"])
    np.testing.assert_allclose(
        model(tokens), lm.forward(space.hard_weights(a), tokens, config), rtol=1e-5, atol=1e-5
    )
    bad = dict(bits)
    bad.pop(space.names[0])
    with pytest.raises(ValueError, match="missing"):
        materialize.save_assignment(tmp_path / "b.json", bad, config)
    with pytest.raises(KeyError):
        materialize.save_quantized_model(tmp_path / "b.safetensors", {"x": 3}, db.quantized)
    (tmp_path / "c.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError):
        materialize.load_assignment(tmp_path / "c.json")


def test_pipeline_end_to_end_tiny(tiny_gguf, tmp_path):
    config, weights = lm.load_smollm2(tiny_gguf)
    rng = np.random.default_rng(5)
    v = config.vocab_size
    cfg = pipeline.QuantizeConfig.quick(
        format="safetensors", steps=8, evo_time_factor=0.5, cache_dir=str(tmp_path / "cache"),
        export_dir=str(tmp_path / "export"), progress=False, batch_seqs=2, trace_points=4,
        ties=("gate_up",),
    )  # fmt: skip
    pool = rng.integers(0, v, (6, 16))
    problem = pipeline.build_problem(
        cfg,
        model=(config, weights),
        pool_tokens=pool,
        calib_tokens=pool[:4],
        eval_tokens=rng.integers(0, v, (2, 16)),
        hessian_tokens=rng.integers(0, v, (2, 16)),
        log=lambda s: None,
    )
    out = pipeline.compare(cfg, problem=problem, log=lambda s: None)
    assert set(out["methods"]) == set(pipeline.METHODS)
    for name, r in out["methods"].items():
        assert r["avg_bits"] <= 3.0 and {"ppl", "kl", "seconds"} <= set(r)
        assert materialize.load_assignment(tmp_path / "export" / f"{name}.json") == r["assignment"]
    assert out["methods"]["uniform"]["avg_bits"] == 3.0
    assert len(out["rco_history"]["loss"]) == 8
    for name, r in out["methods"].items():  # tied: gate and up share their bit width
        assert all(
            r["assignment"][f"layers.{i}.mlp.gate"] == r["assignment"][f"layers.{i}.mlp.up"]
            for i in range(config.num_layers)
        ), name
        assert 0 < r["ear"] <= 1 and r["held_out_kl"] >= 0 and np.isfinite(r["ppl"])
    assert out["model"]["groups"] == 6 * config.num_layers
    ttq = out["time_to_quality"]
    assert len(ttq["rco"]["seconds"]) == 4 and np.all(np.diff(ttq["rco"]["best_kl"]) <= 0)
    assert ttq["rco_seconds"] == ttq["rco"]["seconds"][-1]
    table = pipeline.format_table(out)
    assert table.count("\n| ") == 2 + len(pipeline.METHODS)  # header, reference, methods
    json.dumps(out)  # JSON-able
    # The Hessians were cached: a second build reads them.
    assert any(p.name.startswith("hessians-") for p in (tmp_path / "cache").iterdir())


# ------------------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "8"], "strictly between 2 and 8"),
        (["--bits", "1.5"], "strictly between"),
        (["--method", "rco,foo"], "unknown method"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--lr", "-1"], "positive"),
        (["--tau", "1", "0"], "tau"),
        (["--quantizer", "gptq", "--hessian-seqs", "0"], "hessian-seqs"),
        (["--calib-len", "1"], "calib_seq_len"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    from rco_jax.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["quantize", "--format", "safetensors", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_help_and_config(capsys):
    from rco_jax.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["quantize", "--help"])
    assert err.value.code == 0 and "--bits" in capsys.readouterr().out
    p = pipeline.parser()
    cfg = pipeline.config_from_args(p.parse_args(["--quick", "--steps", "7", "--method", "rco"]))
    assert cfg.steps == 7 and cfg.methods == ("rco",) and cfg.quantizer == "rtn"
    assert cfg.format == "gguf" and cfg.budget_bits == 4.6  # the default format and budget
    argv = ["--format", "safetensors", "--bits", "2.5", "--init", "proxy_dp"]
    cfg = pipeline.config_from_args(p.parse_args(argv))
    assert cfg.budget_bits == 2.5 and cfg.init == "output_error_dp" and cfg.quantizer == "gptq"
    assert pipeline.config_from_args(p.parse_args(["--format", "safetensors"])).budget_bits == 3.0


# ------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def real_space(smollm2):
    config, weights = smollm2.config, smollm2.weights
    names = lm.linear_names(config)
    quantized = {}
    for n in names:  # RTN at two bit widths: a small, fast database
        w = np.asarray(weights[n]).T
        quantized[n] = {b: np.asarray(dequantize(quantize_rtn(w, b))) for b in (2, 4)}
    space = search.SearchSpace.build(weights, quantized, config, bits=(2, 4))
    from rco_jax.lm import data

    tokens = data.calibration_tokens(1, 32, seed=0)
    ref = search.reference_log_probs(space.reference_weights(), tokens, config)
    return space, tokens, ref


@pytest.mark.model
def test_smollm2_kl_orders_bit_widths(real_space):
    space, tokens, ref = real_space
    kl2 = search.calibration_kl(space, tokens, ref, np.zeros(space.num_layers, np.int32))
    kl4 = search.calibration_kl(space, tokens, ref, np.ones(space.num_layers, np.int32))
    assert 0 < kl4 < kl2
    assert space.num_layers == 210 and space.total_params == 106_168_320


@pytest.mark.model
def test_smollm2_rco_few_steps_feasible(real_space):
    space, tokens, ref = real_space
    res = search.run_rco(
        space, tokens, ref, 3.0, key=jax.random.key(0), num_steps=3, progress=False
    )
    a = np.asarray(res.assignment)
    assert space.within_budget(a, 3.0)
    assert np.all(np.isfinite(np.asarray(res.history["loss"])))
