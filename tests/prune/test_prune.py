"""Structured pruning (rco_jax.prune) on the tiny random GGUF Llama, against independent oracles.

* the masked forward equals the physically pruned model (export, reload, nnx Llama);
* keeping everything equals the reference model;
* the straight-through gradient of the keep logits equals the chain rule through the softmax
  of the finite-difference gradient of the relaxed loss (float64);
* exact-count sampling equals brute-force enumeration;
* exact removed fractions and per-layer counts for every method;
* EAR of the evaluation equals a NumPy oracle;
* bad input raises ``ValueError`` saying what is valid; the CLI end to end.

Tests marked ``model`` use the real SmolLM2 (skipped without the assets).
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax.lm import assets
from rco_jax.lm import model as lm
from rco_jax.prune import export, pipeline, search

E = 8  # groups per FFN of the tiny model (96 neurons -> groups of 12)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    config, weights = lm.load_smollm2(tiny_gguf)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (4, 12)).astype(np.int32)
    scores = search.ffn_neuron_scores(weights, tokens, config)
    space = search.PruneSpace.build(config, weights, scores, num_experts=E)
    ref = search.reference_log_probs(space.weights, tokens, config)
    dscores = search.depth_scores(weights, tokens, ref, config)
    depth = search.PruneSpace.build(config, weights, dscores, mode="depth")
    return config, weights, tokens, space, depth, ref


def _random_assignment(space, n_prune, seed=0):
    a = np.zeros(space.num_groups, np.int32)
    a[np.random.default_rng(seed).choice(space.num_groups, n_prune, replace=False)] = 1
    return a


@pytest.mark.parametrize("mode", ["ffn", "depth"])
def test_masked_forward_equals_pruned_model(tiny, tmp_path, mode):
    config, weights, tokens, space, depth, _ = tiny
    sp = space if mode == "ffn" else depth
    a = _random_assignment(sp, 5 if mode == "ffn" else 2)
    masked = sp.logits(jax.nn.one_hot(a, 2), jnp.asarray(tokens))
    export.save(tmp_path, export.mask_dict(sp, a), config, weights, {"method": "test"})
    cfg2, w2 = export.load_model(tmp_path)
    keep = sp.keep_mask(a)
    if mode == "ffn":
        assert cfg2.intermediate_sizes == tuple(keep.sum(1).tolist())
        assert export.load_mask(tmp_path)["layers.0.mlp"] == np.flatnonzero(keep[0]).tolist()
    else:
        assert cfg2.intermediate_sizes == tuple(int(k) * 96 for k in keep[:, 1])
        assert cfg2.attention_layers == tuple(bool(k) for k in keep[:, 0])
        assert not keep[:, 0].all()  # the draw drops an attention sub-block: it is gone
        for layer, kept in enumerate(keep[:, 0]):
            names = {f"layers.{layer}.{k}" for k in ("attn_norm", "attn.q", "attn.o")}
            assert (names <= set(w2)) == bool(kept)
    model = lm.Llama.from_weights(cfg2, w2)
    assert set(model.weights()) == set(w2)
    np.testing.assert_allclose(model(jnp.asarray(tokens)), masked, atol=2e-5, rtol=1e-5)
    # The FFN parameters really are gone.
    n_ffn = sum(np.asarray(w2[f"layers.{i}.mlp.down"]).size for i in range(config.num_layers))
    assert n_ffn == (keep[:, 1].sum() * 96 * 64 if mode == "depth" else keep.sum() * 64)


def test_keep_all_equals_reference(tiny):
    config, weights, tokens, space, depth, _ = tiny
    ref = lm.forward(weights, jnp.asarray(tokens), config)
    for sp in (space, depth):
        keep_all = jax.nn.one_hot(np.zeros(sp.num_groups, np.int32), 2)
        np.testing.assert_allclose(sp.logits(keep_all, jnp.asarray(tokens)), ref, atol=1e-5)


def test_ste_gradient_equals_finite_differences_of_relaxed_loss(tiny):
    config, weights, tokens, space, _, _ = tiny
    config = dataclasses.replace(config, num_layers=1)  # the first block only: faster compile
    with jax.enable_x64(True):
        w64 = {
            k: jnp.asarray(v, jnp.float64)
            for k, v in weights.items()
            if not k.startswith("layers.") or k.startswith("layers.0.")
        }
        sp = search.PruneSpace.build(config, w64, space.order[:1] * 1.0, num_experts=4)
        toks = jnp.asarray(tokens[:2, :8])
        ref = jax.nn.log_softmax(lm.forward(sp.weights, toks, config))

        def relaxed(w):  # float64 KL of the masked model at (fractional) W
            log_q = jax.nn.log_softmax(sp.logits(w, toks))
            return jnp.mean(jnp.sum(jnp.exp(ref) * (ref - log_q), -1))

        blocks, counts, tau = np.zeros(sp.num_groups, int), np.array([3]), 0.7
        key = jax.random.key(3)
        alpha = jnp.asarray(np.random.default_rng(1).normal(size=(sp.num_groups, 2)))
        ste = lambda a: search.exact_count_ste(key, a, blocks, counts, tau)  # noqa: E731
        grad = np.asarray(jax.grad(lambda a: relaxed(ste(a)))(alpha))
        hard = np.asarray(ste(alpha))
        assert set(np.unique(hard).tolist()) == {0.0, 1.0} and hard[:, 1].sum() == 3
        # Oracle: the chain rule grad = J^T dL/dW|_hard with J the tempered softmax's Jacobian
        # (d s_k / d alpha_j = s_k (d_kj - s_j) / tau), so grad . u = dL/dW . (J u): a central
        # difference of the relaxed loss at the hard sample in the direction J u.
        g = np.asarray(jax.random.gumbel(key, alpha.shape, alpha.dtype))
        z = (np.asarray(alpha) + g) / tau
        s = np.exp(z - z.max(1, keepdims=True))
        s /= s.sum(1, keepdims=True)
        f, h = jax.jit(relaxed), 1e-4
        for u in np.random.default_rng(2).normal(size=(3, *alpha.shape)):
            ju = s * (u - np.sum(u * s, 1, keepdims=True)) / tau
            fd = (float(f(hard + h * ju)) - float(f(hard - h * ju))) / (2 * h)
            assert float(np.sum(grad * u)) == pytest.approx(fd, rel=1e-5, abs=1e-15)


def test_top_counts_is_the_exact_count_optimum():
    rng = np.random.default_rng(0)
    blocks = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    counts = np.array([2, 3])
    for _ in range(5):
        z = rng.normal(size=(9, 2))
        a = np.asarray(search.top_counts(jnp.asarray(z[:, 1] - z[:, 0]), blocks, counts))
        best = max(
            (
                sum(z[i, int(i in c0 or i in c1)] for i in range(9)),
                (c0, c1),
            )
            for c0 in itertools.combinations(range(4), 2)
            for c1 in itertools.combinations(range(4, 9), 3)
        )
        assert np.flatnonzero(a).tolist() == sorted(best[1][0] + best[1][1])


def test_exact_total_dp_is_the_exact_count_optimum(tiny):
    rng = np.random.default_rng(0)
    for total in (0, 4, 9):
        v = rng.normal(size=(3, 4))
        got = np.asarray(search.exact_total_dp(jnp.asarray(v), total))
        best = max(
            (sum(v[i, k[i]] for i in range(3)), k)
            for k in itertools.product(range(4), repeat=3)
            if sum(k) == total
        )
        assert got.sum() == total and tuple(got) == best[1]
    # Count weights -> groups: exactly `count` lowest-score groups of each layer pruned.
    space = tiny[3]
    k = np.array([3, 1])
    w = np.asarray(search.groups_from_counts(space, jax.nn.one_hot(k, E + 1)))
    np.testing.assert_array_equal(search.layer_counts(space, w[:, 1]), k)
    for layer in range(2):
        s = space.scores.reshape(2, E)[layer]
        assert (
            s[w.reshape(2, E, 2)[layer, :, 1] == 1].max()
            <= s[w.reshape(2, E, 2)[layer, :, 1] == 0].min()
        )


@pytest.mark.parametrize(
    "per_layer",
    [pytest.param(False, marks=pytest.mark.slow, id="global"), pytest.param(True, id="per-layer")],
)
def test_budgets_exact_for_every_method(tiny, per_layer):
    _, _, tokens, space, _, ref = tiny
    counts = search.budget_counts(space, 0.25, per_layer)
    answers = {
        "uniform": search.uniform_assignment(space, 0.25),
        "proxy": search.proxy_assignment(space, 0.25, per_layer),
    }
    res = search.run_rco(
        space, tokens, ref, 0.25, per_layer=per_layer, key=jax.random.key(0), num_steps=3,
        batch_seqs=2, chunk_size=3, progress=False,
    )  # fmt: skip
    answers["rco"] = np.asarray(res.assignment)
    np.testing.assert_allclose(res.history["budget_error"], 0.0, atol=1e-4)
    assert np.all(np.isfinite(res.history["loss"]))
    evo = search.run_evolutionary(
        space, tokens, ref, 0.25, per_layer=per_layer, key=jax.random.key(1), num_generations=2,
        offspring=2, progress=False,
    )  # fmt: skip
    answers["evolutionary"] = np.asarray(evo.assignment)
    for name, a in answers.items():
        assert space.removed_fraction(a) == 0.25, name
        np.testing.assert_array_equal(space.per_block_pruned(a, per_layer), counts, err_msg=name)
    # The proxy keeps the highest-scoring groups (globally or per layer).
    kept = space.scores[answers["proxy"] == 0]
    assert kept.min() >= space.scores[answers["proxy"] == 1].max() or per_layer


def test_rco_returns_the_best_checkpoint_on_the_pool(tiny, monkeypatch):
    _, _, tokens, space, _, ref = tiny
    start = search.uniform_assignment(space, 0.25)
    seen = []  # every candidate run_rco evaluates, and at which step it was taken
    real_mode = search.exact_total_dp

    def spy(values, total):
        out = real_mode(values, total)
        if not isinstance(values, jax.core.Tracer):
            seen.append(np.asarray(out))
        return out

    monkeypatch.setattr(search, "exact_total_dp", spy)
    res = search.run_rco(
        space, tokens, ref, 0.25, key=jax.random.key(3), num_steps=6, batch_seqs=2,
        learning_rate=0.5, chunk_size=2, checkpoint_every=2, init=start, progress=False,
    )  # fmt: skip
    assert len(seen) == 3  # the mode after steps 2, 4 and 6
    # Oracle: each candidate's KL on the whole pool, computed here; the answer is the lowest.
    rank = search._rank_in_layer(space)
    cands = [start] + [(rank < c[:, None]).reshape(-1).astype(np.int32) for c in seen]
    kls = [search.calibration_kl(space, tokens, ref, c) for c in cands]
    assert float(res.loss) == pytest.approx(min(kls), rel=1e-6)
    assert float(res.loss) <= kls[-1] and float(res.loss) <= kls[0]
    step = int(res.history["selected_step"])
    assert step in (-1, 2, 4, 6)
    np.testing.assert_array_equal(res.assignment, cands[(step // 2) if step > 0 else 0])
    assert bool(res.from_sample) == (step != 6)
    assert space.removed_fraction(res.assignment) == 0.25
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        search.run_rco(space, tokens, ref, 0.25, key=jax.random.key(0), checkpoint_every=-1)


@pytest.mark.slow
def test_depth_per_kind_counts(tiny):
    _, _, tokens, _, depth, ref = tiny
    a = search.proxy_assignment(depth, 0.5, True)
    np.testing.assert_array_equal(depth.per_block_pruned(a, True), [1, 1])
    res = search.run_rco(
        depth, tokens, ref, 0.5, per_layer=True, key=jax.random.key(0), num_steps=2,
        batch_seqs=1, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(depth.per_block_pruned(res.assignment, True), [1, 1])


def test_evaluation_ear_matches_numpy(tiny):
    config, weights, tokens, space, _, ref = tiny
    a = _random_assignment(space, 4)
    ppl, acc = pipeline.evaluate(space, tokens, ref, a, batch=3)
    logits = np.asarray(space.logits(jax.nn.one_hot(a, 2), jnp.asarray(tokens)), np.float64)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    r = np.exp(np.asarray(ref, np.float64))
    assert acc == pytest.approx(np.mean(np.minimum(r, q).sum(-1)), rel=1e-5)
    nll = -np.log(np.take_along_axis(q[:, :-1], tokens[:, 1:, None], -1)).mean()
    assert ppl == pytest.approx(np.exp(nll), rel=1e-4)


def test_bad_input(tiny, monkeypatch, tmp_path, capsys):
    _, _, _, space, depth, _ = tiny
    for s in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            search.budget_counts(space, s, False)
    with pytest.raises(ValueError, match=r"multiples of 1/8"):
        search.budget_counts(space, 0.3, True)  # 2.4 groups per layer
    with pytest.raises(ValueError, match=r"multiples of 1/2"):
        search.budget_counts(depth, 0.25, True)  # half a sub-block per kind
    with pytest.raises(ValueError, match="choose from ffn, depth"):
        pipeline.PruneConfig(mode="width").validate()
    with pytest.raises(ValueError, match="divisor of the FFN width 96"):
        search.PruneSpace.build(space.config, space.weights, np.ones((2, 96)), num_experts=7)
    for argv, what in (
        (["--sparsity", "1.5"], "strictly between 0 and 1"),
        (["--mode", "width"], "choose from ffn, depth"),
        (["--method", "rco,magic"], "choose from"),
        (["--per-layer", "--sparsity", "0.3"], "multiples of 1/16"),
    ):
        with pytest.raises(SystemExit) as err:
            pipeline.main(argv)
        assert err.value.code == 2 and what in capsys.readouterr().err
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path))
    assert pipeline.main(["--quick", "--no-progress"]) == 2
    assert assets.FETCH_COMMAND in capsys.readouterr().err


def test_cli_end_to_end(tiny_gguf, tmp_path):
    out, js = tmp_path / "out", tmp_path / "r.json"
    argv = [
        "--model", str(tiny_gguf), "--dataset", "random", "--quick", "--experts", "8",
        "--steps", "2", "--method", "uniform,proxy,rco", "--calib-seqs", "4",
        "--calib-len", "8", "--eval-seqs", "2", "--eval-len", "8", "--score-seqs", "2",
        "--score-len", "8", "--evo-seqs", "2", "--output", str(out),
        "--json", str(js), "--no-progress",
    ]  # fmt: skip
    assert pipeline.main(argv) == 0
    res = json.loads(js.read_text())
    assert (res["sparsity"], res["mode"], res["per_layer"]) == (0.25, "ffn", False)
    assert set(res["methods"]) == {"uniform", "proxy", "rco"}  # evolutionary: budgets test
    for r in res["methods"].values():
        assert {"ppl", "kl", "ear", "removed_fraction", "seconds"} <= set(r)
        assert r["removed_fraction"] == 0.25 and sum(r["pruned_per_block"]) == 4
        assert all(np.isfinite([r["ppl"], r["kl"], r["ear"]]))
    mask = export.load_mask(out)
    assert sum(len(v) for v in mask.values()) == 144
    assert json.loads((out / "masks" / "rco.json").read_text()) == mask
    config, weights = export.load_model(out)
    assert config.intermediate_sizes == tuple(len(v) for v in mask.values())


@pytest.mark.slow
@pytest.mark.model
def test_real_model_masked_equals_pruned(smollm2, tmp_path):
    config, weights = smollm2.config, smollm2.weights
    tokens = jnp.asarray(np.arange(1, 17, dtype=np.int32)[None] * 37)
    scores = np.random.default_rng(0).random((config.num_layers, config.intermediate_size))
    space = search.PruneSpace.build(config, smollm2.stacked, scores, num_experts=16)
    ref = lm.forward(smollm2.stacked, tokens, config)
    keep_all = jax.nn.one_hot(np.zeros(space.num_groups, np.int32), 2)
    np.testing.assert_allclose(space.logits(keep_all, tokens), ref, atol=1e-4)
    a = search.uniform_assignment(space, 0.25)
    _, w2 = export.pruned_weights(config, weights, export.mask_dict(space, a))
    cfg2 = export.pruned_weights(config, weights, export.mask_dict(space, a))[0]
    assert cfg2.intermediate_sizes == (1152,) * config.num_layers
    np.testing.assert_allclose(
        lm.forward(w2, tokens, cfg2), space.logits(jax.nn.one_hot(a, 2), tokens), atol=2e-4
    )
