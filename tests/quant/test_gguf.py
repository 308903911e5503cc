"""llama.cpp types as options, and the GGUF files they make (rco_jax.quant.ggml).

Oracles: NumPy re-implementations of llama.cpp's reference Q8_0 / Q4_0 quantizers (the
formulas of ggml's ``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``), exact arithmetic
for the file's bits per weight, and the source file itself (everything not re-quantized must
come back byte for byte).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from rco_jax.lm import assets  # noqa: E402
from rco_jax.lm import model as lm  # noqa: E402
from rco_jax.quant import ggml, pipeline  # noqa: E402

BUDGET = 4.6


def q8_0_oracle(x: np.ndarray) -> np.ndarray:
    """llama.cpp Q8_0: per block of 32, ``d = max|x| / 127`` (stored as fp16),
    ``q = round(x / d)`` half away from zero; value ``q * fp16(d)``."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.max(np.abs(b), axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def q4_0_oracle(x: np.ndarray) -> np.ndarray:
    """llama.cpp Q4_0: per block of 32, ``m`` = the entry of largest magnitude (signed),
    ``d = m / -8`` (fp16), ``q = min(15, trunc(x / d + 8.5))``; value ``(q - 8) fp16(d)``."""
    b = x.reshape(-1, 32).astype(np.float32)
    m = np.take_along_axis(b, np.argmax(np.abs(b), axis=1)[:, None], axis=1)
    d = m / np.float32(-8)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc(b * inv + np.float32(8.5)))
    return ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 3),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantizers_match_llamacpp_reference_formulas(rows, blocks, scale, seed):
    x = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(
        np.float32
    )
    x[0, :32] = 0.0 if rows > 1 else x[0, :32]  # an all-zero block: no division by zero
    for name, oracle in (("Q8_0", q8_0_oracle), ("Q4_0", q4_0_oracle)):
        raw = ggml.quantize(x, name)
        info = ggml.type_info(name)
        assert raw.dtype == np.uint8 and raw.shape == (rows, blocks * info.type_size)
        np.testing.assert_array_equal(ggml.dequantize(raw, name).reshape(x.shape), oracle(x))


def test_type_table_and_errors():
    bits = {t: ggml.type_info(t).bits_per_weight for t in ggml.QUANTIZABLE}
    assert bits == {"MXFP4": 4.25, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5}
    with pytest.raises(ValueError, match="cannot quantize it byte-identically"):
        ggml.type_info("Q4_K")
    with pytest.raises(ValueError, match="not a ggml type.*Q4_0"):
        ggml.type_info("Q9_9")
    assert ggml.fits("Q4_0", (3, 64)) and not ggml.fits("Q4_0", (3, 48))
    with pytest.raises(ValueError, match="blocks of 32"):
        ggml.quantize(np.zeros((2, 48)), "Q4_0")


def test_more_bits_smaller_error_on_gaussian_weights():
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    db = ggml.build_database({"w": w}, progress=False)
    rel = [db.rel_error["w"][t] for t in ggml.QUANTIZABLE]
    # Gaussian weights: Q4_0 < MXFP4 in error, and each step up in bits lowers it.
    assert all(a > b for a, b in zip(rel, rel[1:])), rel
    for t in ggml.QUANTIZABLE:
        np.testing.assert_array_equal(db["w"][t], ggml.dequantize(ggml.quantize(w, t), t))
    assert db.bits == ggml.QUANTIZABLE and np.isnan(db.hessian_error["w"]["Q4_0"])


def test_database_cache_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    weights = {"a": rng.standard_normal((8, 64)), "b": rng.standard_normal((4, 32))}
    hess = {"a": np.eye(64)}
    db = ggml.build_database(weights, hess, ("Q4_0", "Q8_0"), False, cache_path=tmp_path)
    again = ggml.build_database(weights, hess, ("Q4_0", "Q8_0"), False, cache_path=tmp_path)
    assert not db.from_cache and again.from_cache and again.names == ["a", "b"]
    for n in weights:
        for t in ("Q4_0", "Q8_0"):
            np.testing.assert_array_equal(again[n][t], db[n][t])
            np.testing.assert_array_equal(again.quantized[n][t], db.quantized[n][t])
    assert again.rel_error == db.rel_error and again.hessian_error["a"] == db.hessian_error["a"]
    # Other types: another file. A corrupt file: a warning and a rebuild, never a wrong answer.
    ggml.build_database(weights, None, ("Q4_1",), False, cache_path=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2
    for f in files:
        f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = ggml.build_database(weights, hess, ("Q4_0", "Q8_0"), False, cache_path=tmp_path)
    assert not rebuilt.from_cache
    np.testing.assert_array_equal(rebuilt["a"]["Q4_0"], db["a"]["Q4_0"])


def _random_types(config, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {n: str(rng.choice(ggml.QUANTIZABLE)) for n in lm.linear_names(config)}


def test_written_file_reads_back(tiny_gguf, tmp_path):
    config, weights = lm.load_smollm2(tiny_gguf)
    chosen = _random_types(config, 1)
    out = ggml.write_gguf(tiny_gguf, tmp_path / "m.gguf", ggml.gguf_assignment(chosen),
                          metadata={"rco_jax.method": "test"})  # fmt: skip
    src, new = assets.gguf_reader(tiny_gguf), assets.gguf_reader(out)
    types = ggml.tensor_types(out)
    for name, t in chosen.items():
        assert types[lm.gguf_tensor_name(name)] == t
    linear = {lm.gguf_tensor_name(n) for n in chosen}
    new_t = {t.name: t for t in new.tensors}
    for t in src.tensors:  # everything else byte for byte, same type
        if t.name not in linear:
            assert new_t[t.name].tensor_type == t.tensor_type
            np.testing.assert_array_equal(np.asarray(new_t[t.name].data), np.asarray(t.data))
    for key, field in src.fields.items():
        if not key.startswith("GGUF."):
            assert new.fields[key].contents() == field.contents(), key
    assert new.fields["rco_jax.method"].contents() == "test"
    # Exact bits per weight: bytes as stored == the types' bits times the weights.
    shapes = lm.linear_shapes(config)
    p = {n: int(np.prod(shapes[n])) for n in chosen}
    expected = sum(ggml.type_info(chosen[n]).bits_per_weight * p[n] for n in p) / sum(p.values())
    assert ggml.linear_bits_per_weight(out, config) == expected
    # The file holds exactly the database's candidates (q/k rows un-permuted on loading).
    _, w_new = lm.load_smollm2(out)
    db = ggml.build_database({n: np.asarray(weights[n]).T for n in chosen}, progress=False)
    for n, t in chosen.items():
        np.testing.assert_array_equal(np.asarray(w_new[n]), db[n][t].T)


def test_failed_write_loses_nothing(tiny_gguf, tmp_path):
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"previous contents")
    with pytest.raises(KeyError, match="not tensors"):
        ggml.write_gguf(tiny_gguf, target, {"blk.0.nope.weight": "Q4_0"})
    with pytest.raises(ValueError, match="cannot be searched"):
        ggml.write_gguf(tiny_gguf, target, {"blk.0.ffn_up.weight": "Q4_K"})
    assert target.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gguf"]


def test_pipeline_gguf_end_to_end_tiny(tiny_gguf, tmp_path):
    config, weights = lm.load_smollm2(tiny_gguf)
    rng = np.random.default_rng(5)
    v = config.vocab_size
    export = tmp_path / "export"
    cfg = pipeline.QuantizeConfig.quick(
        format="gguf", budget_bits=BUDGET, steps=4, trace_points=0, batch_seqs=2,
        methods=("uniform", "output_error_dp", "rco"), model_path=str(tiny_gguf),
        export_dir=str(export), progress=False, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    pool = rng.integers(0, v, (6, 16))
    problem = pipeline.build_problem(
        cfg, model=(config, weights), pool_tokens=pool, calib_tokens=pool[:4],
        eval_tokens=rng.integers(0, v, (2, 16)), hessian_tokens=rng.integers(0, v, (2, 16)),
        log=lambda s: None,
    )  # fmt: skip
    out = pipeline.compare(cfg, problem=problem, log=lambda s: None)
    assert set(out["methods"]) == {"uniform", "output_error_dp", "rco"}
    assert set(out["methods"]["uniform"]["assignment"].values()) == {"Q4_0"}
    for name, r in out["methods"].items():
        assert r["avg_bits"] <= BUDGET and r["file_bits_per_weight"] == r["avg_bits"], name
        types = ggml.tensor_types(export / f"{name}.gguf")
        assert all(types[lm.gguf_tensor_name(n)] == t for n, t in r["assignment"].items())
    chosen = json.loads((export / "assignment.json").read_text())
    assert chosen == ggml.gguf_assignment(out["methods"]["rco"]["assignment"])
    assert (export / "model.gguf").read_bytes() == (export / "rco.gguf").read_bytes()
    assert "Q4_0:100%" in pipeline.format_table(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "gguf", "--bits", "4.0"], "strictly between 4.25 and 8.5"),
        (["--format", "gguf", "--bits", "8.5"], "strictly between 4.25 and 8.5"),
        (["--format", "gguf", "--types", "Q4_0,Q4_K"], "cannot be searched"),
        (["--format", "gguf", "--types", "Q8_0,Q4_0"], "strictly increasing"),
        (["--format", "safetensors", "--llamacpp"], "--format gguf"),
        (["--format", "ggml"], "invalid choice"),
    ],
)
def test_cli_gguf_argument_errors(argv, message, capsys):
    from rco_jax.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["quantize", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_gguf_default_budget():
    args = pipeline.parser().parse_args(["--format", "gguf", "--quick"])
    cfg = pipeline.config_from_args(args)
    assert cfg.budget_bits == 4.6 and cfg.options == ggml.DEFAULT_TYPES


# ------------------------------------------------------------ real SmolLM2, run by llama.cpp


def _feasible_mixture(config, budget: float, seed: int) -> dict[str, str]:
    """A random type per linear, then linears in random order lowered to MXFP4 until the
    linears' average bits per weight is within ``budget``."""
    shapes = lm.linear_shapes(config)
    chosen = _random_types(config, seed)
    p = {n: int(np.prod(shapes[n])) for n in chosen}

    def avg() -> float:
        return sum(ggml.type_info(chosen[n]).bits_per_weight * p[n] for n in p) / sum(p.values())

    for n in np.random.default_rng(seed).permutation(list(chosen)):
        if avg() <= budget:
            break
        chosen[n] = "MXFP4"
    assert avg() <= budget
    return chosen


@pytest.fixture(scope="module")
def mixed_gguf(require_assets, tmp_path_factory):
    config = lm.config_from_gguf(assets.gguf_metadata(), assets.gguf_tensors())
    chosen = _feasible_mixture(config, BUDGET, seed=3)
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    ggml.write_gguf(None, path, ggml.gguf_assignment(chosen))
    return config, chosen, path


@pytest.mark.model
def test_mixed_file_types_and_budget(mixed_gguf):
    config, chosen, path = mixed_gguf
    types = ggml.tensor_types(path)
    assert all(types[lm.gguf_tensor_name(n)] == t for n, t in chosen.items())
    assert set(chosen.values()) == set(ggml.QUANTIZABLE)
    assert ggml.linear_bits_per_weight(path, config) <= BUDGET


@pytest.mark.model
def test_llamacpp_runs_the_mixed_file_as_the_jax_model_does(mixed_gguf):
    """llama.cpp on the exported file vs the JAX model with the same assignment (the file's
    dequantized tensors), per token: mean |diff| < 0.2 and max < 1.0 nats (as in
    tests/quant/test_llamacpp.py); the mean difference (log of the perplexity ratio) < 0.1;
    and greedy decoding still says Paris.

    Measured (xllamacpp 2026.10.11549) on this 64-token window: mean |diff| ~0.09, mean diff
    0.061 (perplexity 77.1 vs 72.5). Files of one type, two windows: mean diff -0.013..+0.019
    per type (MXFP4 .. Q8_0), so each type's dequantized values are what llama.cpp computes
    with; the rest is llama.cpp's Q8 activations and f16 KV cache."""
    pytest.importorskip("xllamacpp", reason="pip install 'rco_jax[llamacpp]'")
    import jax
    import jax.numpy as jnp

    from rco_jax.lm import data
    from rco_jax.quant.llamacpp import LlamaCpp

    config, _, path = mixed_gguf
    _, weights = lm.load_smollm2(path)
    window = data.eval_tokens(1, 64)[0]
    toks = jnp.asarray(window)[None]
    logp = jax.nn.log_softmax(lm.forward(weights, toks, config)[0, :-1], axis=-1)
    ref = np.asarray(jnp.take_along_axis(logp, toks[0, 1:, None], axis=-1)[:, 0], np.float64)
    with LlamaCpp(path, n_ctx=256, n_threads=1) as llm:
        got = llm.token_log_probs(window)
        assert "Paris" in llm.generate("The capital of France is", max_tokens=4)
    diff = np.abs(got - ref)
    assert diff.mean() < 0.2 and diff.max() < 1.0, (diff.mean(), diff.max())
    assert abs(got.mean() - ref.mean()) < 0.1
