"""Side-by-side mixed-precision quantization of SmolLM2-135M: uniform, proxy DPs, EvoPress, RCO.

``python -m rco_jax quantize --bits 3.0 [--method uniform,fisher_dp,evolutionary,rco] [--quick]``
runs :func:`compare`:

1. model and data: the reference model (dequantized GGUF), calibration windows for the
   Hessians / Fisher and for the KL loss (disjoint seeds, calibration plays), held-out windows
   from the evaluation plays (:mod:`rco_jax.lm.data`);
2. quantized-weight database: every linear at every bit width (GPTQ with the input Hessians,
   or RTN), with per-layer errors, cached on disk (:func:`rco_jax.quant.export.build_database`;
   the Hessians are cached too, keyed by the weights and tokens);
3. the methods, all on the same calibration data and database, at the same budget:

   * ``uniform``: every layer at the budget bit width (the largest width below it when the
     budget is not a width);
   * ``output_error_dp`` (formerly ``proxy_dp``): exact knapsack on the per-layer output
     errors ``tr(dW H dW^T)`` (layers assumed independent; not comparable across layers);
   * ``fisher_dp``: exact knapsack on the Fisher loss sensitivity
     ``sum (dL/dW)^2 (W_b - W)^2`` (:func:`rco_jax.quant.search.fisher_errors`);
   * ``rco``: RCO on the calibration KL, a fresh minibatch of ``batch_seqs`` windows from a
     pool of ``pool_seqs`` every step (:func:`rco_jax.quant.search.run_rco`);
   * ``evolutionary``: EvoPress-style search on the KL of the ``calib_seqs`` calibration
     windows, given ``evo_time_factor`` times RCO's wall-clock;

4. for every answer: held-out perplexity, EAR and KL to the reference on held-out text,
   calibration KL, exact average bits (asserted ``<=`` the budget) and the wall-clock seconds
   of the search.

Formats (``--format``): ``safetensors`` searches bit widths 2-8 (GPTQ or RTN codes, exported
bit-packed); ``gguf`` searches llama.cpp's tensor types (:mod:`rco_jax.quant.ggml`: MXFP4 4.25
.. Q8_0 8.5 bits per weight) under an average bits-per-weight budget and exports GGUF files
that llama.cpp runs (``--export DIR``: ``DIR/model.gguf`` and ``DIR/assignment.json`` for
RCO, ``DIR/<method>.gguf`` for every method; ``--llamacpp``: each file's held-out perplexity
as llama.cpp computes it).

Presets: :meth:`QuantizeConfig.quick` (RTN, few tokens and steps, the evolutionary search at
1x RCO's time: minutes on a 2-core CPU; what ``make demo`` runs) and
:meth:`QuantizeConfig.full` (GPTQ, more tokens and steps, 3x). See ``benchmarks/README.md``
for measured runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax.lm import assets, data, metrics
from rco_jax.lm import model as lm
from rco_jax.lm.comparison import SearchSettings, overrides_from_args, write_results
from rco_jax.lm.extras import MissingExtraError, check_extra
from rco_jax.quant import export, ggml, materialize, search

Array = jax.Array

__all__ = ["METHODS", "QuantizeConfig", "compare", "format_table", "main", "parser"]

#: The methods of the comparison, in the order they run (evolutionary needs RCO's time).
METHODS: tuple[str, ...] = ("uniform", "output_error_dp", "fisher_dp", "rco", "evolutionary")
#: Earlier names still accepted (``--method`` / ``--init``): ``proxy_dp`` is ``output_error_dp``.
ALIASES: dict[str, str] = {"proxy_dp": "output_error_dp"}
#: RCO initializations (see :class:`QuantizeConfig`).
INITS: tuple[str, ...] = ("auto", "flat", "uniform", "output_error_dp", "fisher_dp", "proxy_dp")
#: The proxy DPs: method -> what the per-layer error is.
PROXIES: dict[str, str] = {
    "output_error_dp": "layer-output error (Hessian-weighted, or relative), exact knapsack",
    "fisher_dp": "Fisher loss sensitivity sum (dL/dW)^2 (W_b - W)^2, exact knapsack",
}
_HESSIAN_CACHE_VERSION = 1
#: The default ``--bits`` of each format.
DEFAULT_BUDGET: dict[str, float] = {"safetensors": 3.0, "gguf": 4.6}
#: Output formats (``--format``) -> what the options are.
FORMATS: dict[str, str] = {
    "safetensors": "bit widths (GPTQ or RTN codes), bit-packed safetensors",
    "gguf": "llama.cpp tensor types, a GGUF file llama.cpp runs",
}


@dataclasses.dataclass
class QuantizeConfig(SearchSettings):
    """Everything that defines a comparison run (defaults: the full configuration).

    The search settings and held-out windows are those of
    :class:`~rco_jax.lm.comparison.SearchSettings`; the quantization problem's own fields:

    Attributes:
      budget_bits: average bits per linear-layer parameter (the budget); ``None``: the
        format's default (:data:`DEFAULT_BUDGET`: gguf 4.6, safetensors 3.0).
      methods: subset of :data:`METHODS`.
      format: ``"gguf"`` (the options are llama.cpp ``types``; the default) or
        ``"safetensors"`` (the options are ``bits``).
      bits: the bit widths (options of the safetensors format).
      types: llama.cpp types (options of the gguf format; ascending bits per weight).
      llamacpp: also compute each GGUF file's held-out perplexity with llama.cpp itself
        (``llamacpp_ppl``; needs the ``llamacpp`` extra).
      quantizer: ``"gptq"`` or ``"rtn"`` for the bit-width database (GGUF types are
        quantized as llama.cpp does).
      group_size: quantization group size (columns).
      proxy: per-layer error of the proxy DP: ``"hessian"`` (layer-output error
        ``tr(dW H dW^T)``; needs ``hessian_seqs > 0``) or ``"relative"`` (``|dW|^2/|W|^2``).
      hessian_seqs, hessian_seq_len: calibration windows for the input Hessians (GPTQ, proxy).
      calib_seqs, calib_seq_len: calibration windows of the KL loss (the evolutionary
        search's fitness and the reported calibration KL): the first ``calib_seqs`` windows of
        the pool.
      pool_seqs: calibration pool (windows of ``calib_seq_len`` tokens, seeded by ``seed``)
        from which RCO draws a fresh minibatch of ``batch_seqs`` windows every step (the
        reference implementation: one random batch per step out of 256 sequences).
      batch_seqs: RCO's minibatch (``>= pool_seqs``: the whole pool every step).
      init: RCO's initial logits: ``"flat"`` (zeros, retracted onto the budget: ``solve``'s
        default), ``"uniform"`` or ``"proxy_dp"`` (probability ``init_confidence`` on the
        uniform / proxy DP assignment), or ``"auto"``: ``"uniform"`` when the budget is a bit
        width (the evolutionary search's start too), else ``"proxy_dp"``.
      trace_points: time-to-quality checkpoints of RCO (calibration KL of the discretized
        logits every ``steps / trace_points`` steps; 0: none).
      ties: tied groups (:data:`rco_jax.quant.search.TIES`: ``"qkv"``, ``"gate_up"``): the
        linears of a tie share one bit width within each layer, e.g. for fused kernels.
      cache_dir: database / Hessian cache (default ``<asset cache>/quantdb``).
      export_dir: if set, each method's assignment JSON and quantized safetensors go there.
    """

    budget_bits: float | None = None
    methods: tuple[str, ...] = METHODS
    format: str = "gguf"
    bits: tuple[int, ...] = search.DEFAULT_BITS
    types: tuple[str, ...] = ggml.DEFAULT_TYPES
    llamacpp: bool = False
    quantizer: str = "gptq"
    group_size: int = 128
    proxy: str = "hessian"
    hessian_seqs: int = 32
    hessian_seq_len: int = 256
    calib_seqs: int = 4
    calib_seq_len: int = 128
    pool_seqs: int = 256
    batch_seqs: int = 4
    init: str = "auto"
    trace_points: int = 10
    ties: tuple[str, ...] = ()
    cache_dir: str | None = None
    export_dir: str | None = None

    def __post_init__(self) -> None:
        if self.budget_bits is None:
            self.budget_bits = DEFAULT_BUDGET.get(self.format, DEFAULT_BUDGET["gguf"])

    @classmethod
    def full(cls, **overrides: Any) -> QuantizeConfig:
        """GPTQ database (Hessians from 32 x 256 tokens), Hessian / Fisher proxies, RCO 200 steps
        at learning rate 0.1 on a fresh minibatch of 4 x 128 tokens per step out of a pool of
        256 windows, the evolutionary search's fitness on 4 x 128 tokens with 3x RCO's
        wall-clock, 16 x 512 held-out tokens (the defaults)."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> QuantizeConfig:
        """Minutes on a 2-core CPU (``make demo``): RTN database (safetensors), Hessian /
        Fisher proxies from 8 x 128 tokens, RCO 20 steps (gguf; 60 for safetensors' harder
        3-bit problem) at learning rate 0.2 on a fresh minibatch of 8 x 64 tokens per step
        out of a pool of 128 windows, 4 time-to-quality checkpoints, the evolutionary
        search's fitness on 2 x 64 tokens with the same wall-clock as RCO
        (``evo_time_factor=1``; the benchmark's ``--quick`` keeps 3x), 4 x 256 held-out
        tokens."""
        base = dict(
            quantizer="rtn",
            hessian_seqs=8,
            hessian_seq_len=128,
            calib_seqs=2,
            calib_seq_len=64,
            pool_seqs=128,
            batch_seqs=8,
            eval_seqs=4,
            eval_seq_len=256,
            steps=20 if overrides.get("format", cls.format) == "gguf" else 60,
            learning_rate=0.2,
            evo_time_factor=1.0,
            trace_points=4,
        )
        return cls(**{**base, **overrides})

    @property
    def options(self) -> tuple[int | str, ...]:
        """The options of the format: bit widths or llama.cpp type names."""
        return self.types if self.format == "gguf" else self.bits

    def option_bits(self) -> tuple[float, ...]:
        """Bits per parameter of each option."""
        if self.format == "gguf":
            return tuple(ggml.type_info(t).bits_per_weight for t in self.types)
        return tuple(float(b) for b in self.bits)

    def validate(self) -> None:
        """Raises ``ValueError`` with a readable message on an invalid configuration."""
        if self.format not in FORMATS:
            raise ValueError(f"unknown --format {self.format!r}; choose from {', '.join(FORMATS)}")
        self.types = tuple(self.types)
        if self.llamacpp and self.format != "gguf":
            raise ValueError("--llamacpp evaluates GGUF files: use it with --format gguf")
        costs = self.option_bits()  # unknown type names raise here, listing the valid ones
        if list(costs) != sorted(set(costs)):
            raise ValueError(
                f"the options must have strictly increasing bits per weight; got "
                f"{dict(zip(self.options, costs))}"
            )
        lo, hi = costs[0], costs[-1]
        if not lo < self.budget_bits < hi:
            what = (
                f"bits per weight of {self.types[0]} and {self.types[-1]}"
                if self.format == "gguf"
                else "bit widths"
            )
            example = 4.6 if self.format == "gguf" else 3.0
            raise ValueError(
                f"--bits must lie strictly between {lo:g} and {hi:g} (the smallest and largest "
                f"{what}: at either end only one assignment fits and there is nothing to "
                f"search); got {self.budget_bits}. Pick a budget inside, e.g. --bits {example}"
            )
        self.methods = tuple(ALIASES.get(m, m) for m in self.methods)
        self.init = ALIASES.get(self.init, self.init)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
        if self.quantizer not in ("gptq", "rtn"):
            raise ValueError(f"quantizer must be gptq or rtn; got {self.quantizer!r}")
        if self.proxy not in ("hessian", "relative"):
            raise ValueError(f"proxy must be hessian or relative; got {self.proxy!r}")
        if needs_h(self) and self.hessian_seqs < 1:
            raise ValueError("GPTQ and the Hessian proxy need --hessian-seqs >= 1")
        unknown_ties = [t for t in self.ties if t not in search.TIES]
        if unknown_ties:
            raise ValueError(
                f"unknown --tie name(s) {unknown_ties}; choose from "
                f"{', '.join(search.TIES)} (comma-separated, e.g. --tie qkv,gate_up)"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}; got {self.init!r}")
        if self.pool_seqs < self.calib_seqs:
            raise ValueError(
                f"--pool-seqs ({self.pool_seqs}) must be >= --calib-seqs ({self.calib_seqs}): "
                "the calibration windows are the first windows of the pool"
            )
        self.check_search(
            counts=("calib_seqs", "pool_seqs", "batch_seqs"),
            lengths=("calib_seq_len", "hessian_seq_len"),
            min_confidence=1 / len(self.options),
        )


# ------------------------------------------------------------------------------- building


def needs_h(cfg: QuantizeConfig) -> bool:
    """Whether the configuration needs input Hessians (GPTQ, or the Hessian proxy)."""
    gptq = cfg.format == "safetensors" and cfg.quantizer == "gptq"
    return gptq or (cfg.proxy == "hessian" and "output_error_dp" in cfg.methods)


def _cache_root(cfg: QuantizeConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else assets.cache_dir() / "quantdb"


def _digest(arrays: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def cached_hessians(
    weights: Mapping[str, Any],
    tokens: np.ndarray,
    config: lm.LlamaConfig,
    cache_dir: Path | None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """:func:`~rco_jax.lm.model.input_hessians` ``H = X^T X / n``, cached as ``.npz`` keyed
    by a hash of the weights and tokens. Linears sharing their input share one array object
    (the database then reuses its factorization)."""
    names = lm.linear_names(config)
    key = _digest([tokens, *(weights[k] for k in sorted(weights))])[:24]
    file = (
        None if cache_dir is None else cache_dir / f"hessians-v{_HESSIAN_CACHE_VERSION}-{key}.npz"
    )
    # One representative linear per shared input: q (for q/k/v), o, gate (for gate/up), down.
    leaders = {"attn.q": "attn.q", "attn.k": "attn.q", "attn.v": "attn.q", "attn.o": "attn.o",
               "mlp.gate": "mlp.gate", "mlp.up": "mlp.gate", "mlp.down": "mlp.down"}  # fmt: skip
    unique: dict[str, np.ndarray] = {}
    if file is not None and file.exists():
        with np.load(file) as f:
            unique = {k: f[k] for k in f.files}
    else:
        hess, _ = lm.input_hessians(weights, tokens, config, progress=progress)
        for i in range(config.num_layers):
            for lead in set(leaders.values()):
                unique[f"layers.{i}.{lead}"] = np.asarray(hess[f"layers.{i}.{lead}"])
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(file.stem + f".{id(unique)}.tmp.npz")
            np.savez(tmp, **unique)
            tmp.replace(file)
    out = {}
    for name in names:
        prefix, kind = name.rsplit(".", 2)[0], name.split(".", 2)[2]
        out[name] = unique[f"{prefix}.{leaders[kind]}"]
    return out


@dataclasses.dataclass
class Problem:
    """What every method shares: search space, tokens, reference log-probs, proxy errors
    (``errors``: the layer-output error table; the Fisher table is computed by ``compare``
    on ``fisher_tokens``, timed as part of its method)."""

    space: search.SearchSpace
    quantized: dict[str, dict[int, Any]]
    errors: np.ndarray
    calib_tokens: np.ndarray
    pool_tokens: np.ndarray
    fisher_tokens: np.ndarray
    eval_tokens: np.ndarray
    ref_log_probs: jax.Array
    reference: dict[str, Any]
    timings: dict[str, float]


def build_problem(
    cfg: QuantizeConfig,
    *,
    model: tuple[lm.LlamaConfig, Mapping[str, Any]] | None = None,
    calib_tokens: np.ndarray | None = None,
    eval_tokens: np.ndarray | None = None,
    hessian_tokens: np.ndarray | None = None,
    pool_tokens: np.ndarray | None = None,
    log: Callable[[str], None] = print,
) -> Problem:
    """Loads the model and data, builds (or reads) the database, the search space and the
    reference log-probabilities. ``model`` and the token arrays override the defaults
    (SmolLM2 and Shakespeare windows), e.g. for a tiny test model; the pool defaults to the
    calibration tokens when only those are given."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    config, weights = model if model is not None else lm.load_smollm2(cfg.model_path)
    weights = {k: jnp.asarray(v) for k, v in weights.items()}
    timings["load_model"] = time.perf_counter() - t
    names = lm.linear_names(config)
    if calib_tokens is None:
        if pool_tokens is None:
            pool_tokens = data.calibration_tokens(
                max(cfg.pool_seqs, cfg.calib_seqs), cfg.calib_seq_len, seed=cfg.seed
            )
        calib_tokens = pool_tokens[: cfg.calib_seqs]
    if pool_tokens is None:
        pool_tokens = calib_tokens
    if eval_tokens is None:
        eval_tokens = data.eval_tokens(cfg.eval_seqs, cfg.eval_seq_len)
    cache = _cache_root(cfg)
    if hessian_tokens is None:
        hessian_tokens = data.calibration_tokens(
            cfg.hessian_seqs, cfg.hessian_seq_len, seed=cfg.seed + 1
        )
    hessians = None
    if needs_h(cfg) and cfg.hessian_seqs > 0:
        t = time.perf_counter()
        hessians = cached_hessians(weights, np.asarray(hessian_tokens), config, cache, cfg.progress)
        timings["hessians"] = time.perf_counter() - t
    t = time.perf_counter()
    kernels = {n: np.asarray(weights[n]).T for n in names}
    if cfg.format == "gguf":
        db = ggml.build_database(
            kernels, hessians, cfg.types, progress=cfg.progress, cache_path=cache
        )
        what = f"llama.cpp types {','.join(cfg.types)}"
    else:
        db = export.build_database(
            kernels,
            hessians,
            bits=cfg.bits,
            method=cfg.quantizer,
            group_size=cfg.group_size,
            cache_path=cache,
            progress=cfg.progress,
        )
        what = f"{cfg.quantizer.upper()} x {len(cfg.bits)} bit widths"
    del kernels
    timings["database"] = time.perf_counter() - t
    log(
        f"database: {what}, {len(names)} linears, "
        f"{'read from cache' if db.from_cache else 'built'} in {timings['database']:.0f} s"
    )
    proxy = cfg.proxy if hessians is not None else "relative"
    _, errors = db.error_table(proxy)
    t = time.perf_counter()
    costs = cfg.option_bits() if cfg.format == "gguf" else None
    space = search.SearchSpace.build(weights, db, config, cfg.options, costs=costs)
    space = space.tied(cfg.ties)
    quantized = db.quantized
    del db  # the dequantized copies now live in the search space
    stacked = space.reference_weights()
    ref = search.reference_log_probs(stacked, calib_tokens, config)
    jax.block_until_ready(ref)
    timings["search_space"] = time.perf_counter() - t
    return Problem(
        space=space,
        quantized=quantized,
        errors=errors,
        calib_tokens=np.asarray(calib_tokens),
        pool_tokens=np.asarray(pool_tokens),
        fisher_tokens=np.asarray(hessian_tokens),
        eval_tokens=np.asarray(eval_tokens),
        ref_log_probs=ref,
        reference=weights,
        timings=timings,
    )


# ------------------------------------------------------------------------------- running


def _perplexity(space: search.SearchSpace, stacked: Any, tokens: np.ndarray, progress: bool):
    fn = functools.partial(lm.forward, stacked, config=space.config)
    return lm.perplexity(fn, tokens, progress=progress)


@functools.partial(jax.jit, static_argnames="config")
def _fidelity_sums(ref_w: Any, q_w: Any, tokens: Array, config: lm.LlamaConfig):
    ref_lp = jax.nn.log_softmax(lm.forward(ref_w, tokens, config).astype(jnp.float32))
    logits = lm.forward(q_w, tokens, config)
    n = tokens.shape[0] * tokens.shape[1]
    nll = lm.nll(logits, tokens) * (tokens.shape[0] * (tokens.shape[1] - 1))
    return metrics.ear(ref_lp, logits) * n, metrics.kl_divergence(ref_lp, logits) * n, nll


def held_out_fidelity(
    space: search.SearchSpace, stacked: Any, tokens: np.ndarray, *, batch_size: int = 4
) -> dict[str, float]:
    """Perplexity (:func:`rco_jax.lm.model.perplexity`'s), EAR
    (:func:`rco_jax.lm.metrics.ear`, ``mean_t sum_v min(r, q)``) and KL to the reference model
    on held-out windows, from one forward per batch (no full log-prob table)."""
    tokens = np.asarray(tokens)
    ref_w = space.reference_weights()
    ear_sum = kl_sum = nll_sum = 0.0
    for s in range(0, len(tokens), batch_size):
        batch = jnp.asarray(tokens[s : s + batch_size])
        e, k, nll = _fidelity_sums(ref_w, stacked, batch, space.config)
        ear_sum, kl_sum, nll_sum = ear_sum + float(e), kl_sum + float(k), nll_sum + float(nll)
    predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    return {
        "ppl": math.exp(nll_sum / predicted),
        "ear": ear_sum / tokens.size,
        "held_out_kl": kl_sum / tokens.size,
    }


def _histogram(space: search.SearchSpace, assignment: np.ndarray) -> dict[str, float]:
    """Share of the linear-layer parameters at each option."""
    share = np.zeros(space.num_options)
    np.add.at(share, space.expand(np.asarray(assignment)), space.params)
    share /= space.total_params
    return {str(b): float(s) for b, s in zip(space.options, share)}


def compare(
    cfg: QuantizeConfig,
    *,
    problem: Problem | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the configured methods side by side; returns the results as a JSON-able dict::

    {"budget_bits", "config", "timings", "reference": {"ppl"},
     "methods": {name: {"ppl", "kl", "avg_bits", "seconds", "bits_histogram",
                        "assignment": {layer: bits}, ...}},
     "rco_history": {"loss", "budget_error", "expected_bits", "sample_bits", "tau"},
     "evolutionary_history": {"loss", "evaluations"}}
    """
    cfg.validate()
    if cfg.llamacpp:  # before any work: say what to install
        check_extra("llamacpp", purpose="llama.cpp perplexities (--llamacpp)")
    problem = problem or build_problem(cfg, log=log)
    space, avg = problem.space, cfg.budget_bits
    key = jax.random.key(cfg.seed)
    out: dict[str, Any] = {
        "budget_bits": avg,
        "config": dataclasses.asdict(cfg),
        "model": {
            "linears": space.num_layers,
            "groups": space.num_groups,
            "ties": list(cfg.ties),
            "linear_params": space.total_params,
            "calib_tokens": int(problem.calib_tokens.size),
            "pool_tokens": int(problem.pool_tokens.size),
            "eval_tokens": int(problem.eval_tokens.size),
        },
        "timings": dict(problem.timings),
        "methods": {},
    }
    ref_ppl = _perplexity(space, space.reference_weights(), problem.eval_tokens, cfg.progress)
    out["reference"] = {"ppl": ref_ppl, "kl": 0.0, "ear": 1.0, "avg_bits": None}
    log(f"reference model: held-out perplexity {ref_ppl:.3f}")
    if cfg.llamacpp:
        from rco_jax.quant import llamacpp

        with llamacpp.LlamaCpp(cfg.model_path or assets.model_path(), n_threads=1) as runtime:
            out["reference"]["llamacpp_ppl"] = runtime.perplexity(problem.eval_tokens)
        log(f"reference model: llama.cpp perplexity {out['reference']['llamacpp_ppl']:.3f}")

    results: dict[str, tuple[np.ndarray, float, dict[str, Any]]] = {}

    def calib_kl(a: Any) -> float:
        return search.calibration_kl(space, problem.calib_tokens, problem.ref_log_probs, a)

    dp_cache: dict[str, tuple[np.ndarray, float]] = {}

    def proxy_assignment(method: str) -> tuple[np.ndarray, float]:
        """The proxy DP's answer and its seconds (the Fisher backward passes included)."""
        if method not in dp_cache:
            t = time.perf_counter()
            if method == "fisher_dp":
                errors = search.fisher_errors(space, problem.fisher_tokens)
            else:
                errors = problem.errors
            dp_cache[method] = (search.proxy_dp(space, errors, avg), time.perf_counter() - t)
        return dp_cache[method]

    for method in [m for m in METHODS if m in cfg.methods]:
        extra: dict[str, Any] = {}
        if method == "uniform":
            t = time.perf_counter()
            a = search.uniform_assignment(space, avg)
            secs = time.perf_counter() - t
            top = space.options[a[0]]
            extra["note"] = "" if avg in space.bits else f"budget between options: all {top}"
        elif method == "output_error_dp":
            a, secs = proxy_assignment(method)
            extra["proxy"] = cfg.proxy if "hessians" in problem.timings else "relative"
        elif method == "fisher_dp":
            a, secs = proxy_assignment(method)
            extra["fisher_tokens"] = int(problem.fisher_tokens.size)
        elif method == "rco":
            init, start = None, cfg.init
            if start == "auto":
                start = "uniform" if avg in space.bits else "output_error_dp"
            if start == "uniform":
                start_a = search.uniform_assignment(space, avg)
            elif start in PROXIES:
                start_a, _ = proxy_assignment(start)
            if start != "flat":
                init = search.logits_from_assignment(space, start_a, cfg.init_confidence)
            extra["init"] = start
            t = time.perf_counter()
            res = search.run_rco(
                space,
                problem.pool_tokens,
                None,  # the reference log-probs of each minibatch are computed per step
                avg,
                key=jax.random.fold_in(key, 1),
                num_steps=cfg.steps,
                learning_rate=cfg.learning_rate,
                tau=cfg.tau,
                init=init,
                batch_seqs=cfg.batch_seqs,
                checkpoint_every=-(-cfg.steps // cfg.trace_points) if cfg.trace_points else None,
                checkpoint_fn=calib_kl if cfg.trace_points else None,
                progress=cfg.progress,
            )
            secs = time.perf_counter() - t
            a = np.asarray(res.assignment)
            h = res.history
            total = space.total_params
            out["rco_history"] = {
                "loss": np.asarray(h["loss"]).tolist(),
                "budget_error": (np.asarray(h["budget_error"], np.float64) / total).tolist(),
                "expected_bits": (np.asarray(h["expected_cost"], np.float64) / total).tolist(),
                "sample_bits": (np.asarray(h["sample_cost"], np.float64) / total).tolist(),
                "tau": np.asarray(h["tau"]).tolist(),
            }
            if "trace_seconds" in h:
                out["rco_history"]["trace_seconds"] = h["trace_seconds"].tolist()
                out["rco_history"]["trace_kl"] = h["trace_value"].tolist()
                secs = float(h["trace_seconds"][-1])  # the search alone, checkpoints not counted
            extra["from_sample"] = bool(res.from_sample)
            extra["steps"] = cfg.steps
        else:  # evolutionary
            limit = cfg.evo_time_factor * results["rco"][1] if "rco" in results else cfg.evo_seconds
            t = time.perf_counter()
            res = search.run_evolutionary(
                space,
                problem.calib_tokens,
                problem.ref_log_probs,
                avg,
                key=jax.random.fold_in(key, 2),
                offspring=cfg.evo_offspring,
                time_limit=limit,
                progress=cfg.progress,
            )
            secs = time.perf_counter() - t
            a = np.asarray(res.assignment)
            out["evolutionary_history"] = {
                "loss": np.asarray(res.history["loss"]).tolist(),
                "evaluations": np.asarray(res.history["evaluations"]).tolist(),
            }
            extra["generations"] = len(res.history["loss"])
            extra["time_limit"] = limit
        results[method] = (a, secs, extra)
        if not space.within_budget(a, avg):
            raise AssertionError(f"{method}: {space.average_bits(a)} bits is over the budget {avg}")
        log(f"{method}: {space.average_bits(a):.4f} average bits, {secs:.1f} s")

    for method, (a, secs, extra) in results.items():
        kl = search.calibration_kl(space, problem.calib_tokens, problem.ref_log_probs, a)
        fidelity = held_out_fidelity(space, space.hard_weights(a), problem.eval_tokens)
        chosen = space.options_of(a)
        out["methods"][method] = {
            "kl": kl,
            **fidelity,
            "avg_bits": space.average_bits(a),
            "seconds": secs,
            "bits_histogram": _histogram(space, a),
            **extra,
            "assignment": chosen,
        }
        if cfg.format == "gguf" and (cfg.export_dir or cfg.llamacpp):
            out["methods"][method].update(_export_gguf(cfg, space, method, chosen, problem))
        elif cfg.export_dir:
            d = Path(cfg.export_dir)
            materialize.save_assignment(d / f"{method}.json", chosen, space.config)
            materialize.save_quantized_model(
                d / f"{method}.safetensors",
                chosen,
                problem.quantized,
                {"method": method, "budget_bits": str(avg)},
            )
    if "rco" in out["methods"] and "evolutionary" in out["methods"]:
        out["time_to_quality"] = time_to_quality(out)
    return out


def _export_gguf(
    cfg: QuantizeConfig,
    space: search.SearchSpace,
    method: str,
    chosen: Mapping[str, str],
    problem: Problem,
) -> dict[str, Any]:
    """Writes ``<method>.gguf`` (RCO's also as ``model.gguf``, with ``assignment.json``) into
    ``cfg.export_dir`` (a temporary directory when only ``cfg.llamacpp`` asks for files); returns
    the file's facts and, with ``cfg.llamacpp``, llama.cpp's held-out perplexity."""
    d = Path(cfg.export_dir) if cfg.export_dir else Path(tempfile.mkdtemp(prefix="rco-gguf-"))
    types = ggml.gguf_assignment(chosen)
    path = ggml.write_gguf(
        cfg.model_path,
        d / f"{method}.gguf",
        types,
        metadata={"rco_jax.method": method, "rco_jax.budget_bits": str(cfg.budget_bits)},
    )
    facts: dict[str, Any] = {
        "file_bits_per_weight": ggml.linear_bits_per_weight(path, space.config),
        "file_bytes": path.stat().st_size,
    }
    if cfg.llamacpp:
        from rco_jax.quant import llamacpp

        # one thread: the perplexity does not depend on it, and on a busy 2-core machine it ran
        # ~10x faster than two spinning ones
        with llamacpp.LlamaCpp(path, n_threads=1) as runtime:
            facts["llamacpp_ppl"] = runtime.perplexity(problem.eval_tokens)
    if not cfg.export_dir:
        shutil.rmtree(d, ignore_errors=True)
    elif method == "rco":
        shutil.copyfile(path, d / "model.gguf")
        (d / "assignment.json").write_text(json.dumps(types, indent=1) + "\n")
    if cfg.export_dir:
        facts["file"] = str(path)
    return facts


def time_to_quality(out: Mapping[str, Any]) -> dict[str, Any]:
    """Best calibration KL so far over wall-clock for RCO and the evolutionary search, and how
    long the evolutionary search takes to first reach RCO's final calibration KL.

    RCO's curve: its checkpoints (calibration KL of the discretized logits, search time
    without the checkpoints). The evolutionary curve: the parent's fitness (the KL on the same
    calibration windows) per generation, placed in time by its cumulative loss evaluations
    (``seconds * evaluations / total evaluations``; every generation costs the same number of
    forwards). ``evo_over_rco``: the evolutionary time to reach RCO's final KL divided by RCO's
    time, or ``None`` when it never did within its budget (``evo_time_factor`` x RCO's).
    """
    rco_m, evo_m = out["methods"]["rco"], out["methods"]["evolutionary"]
    target = rco_m["kl"]
    rh, eh = out.get("rco_history", {}), out.get("evolutionary_history", {})
    rco_s = np.asarray(rh.get("trace_seconds", [rco_m["seconds"]]), np.float64)
    rco_kl = np.minimum.accumulate(np.asarray(rh.get("trace_kl", [target]), np.float64))
    evals = np.asarray(eh.get("evaluations", []), np.float64)
    evo_kl = np.minimum.accumulate(np.asarray(eh.get("loss", []), np.float64))
    evo_s = evo_m["seconds"] * evals / evals[-1] if evals.size else evals
    reached = np.nonzero(evo_kl <= target)[0]
    t_evo = float(evo_s[reached[0]]) if reached.size else None
    return {
        "rco_final_kl": target,
        "rco_seconds": rco_m["seconds"],
        "rco": {"seconds": rco_s.tolist(), "best_kl": rco_kl.tolist()},
        "evolutionary": {"seconds": evo_s.tolist(), "best_kl": evo_kl.tolist()},
        "evolutionary_seconds_to_rco_kl": t_evo,
        "evo_over_rco": None if t_evo is None else t_evo / rco_m["seconds"],
        "evolutionary_budget_factor": evo_m["seconds"] / rco_m["seconds"],
    }


def format_table(results: Mapping[str, Any]) -> str:
    """The comparison as a markdown table."""
    ref = results["reference"]
    rows = [
        ("reference (dequantized Q4_1)", ref["ppl"], 0.0, 1.0, None, None, "",
         ref.get("llamacpp_ppl")),
    ]  # fmt: skip
    for name, r in results["methods"].items():
        hist = " ".join(f"{b}:{100 * s:.0f}%" for b, s in r["bits_histogram"].items() if s > 0)
        cpp = r.get("llamacpp_ppl")
        rows.append((name, r["ppl"], r["kl"], r.get("ear"), r["avg_bits"], r["seconds"], hist, cpp))
    with_cpp = any(row[-1] is not None for row in rows)
    lines = [
        f"Budget {results['budget_bits']} average bits; held-out perplexity and EAR on "
        f"{results['model']['eval_tokens']} tokens, KL on {results['model']['calib_tokens']} "
        "calibration tokens.",
        "",
        "| method | held-out ppl | "
        + ("llama.cpp ppl | " if with_cpp else "")
        + "calib KL | held-out EAR | avg bits | seconds | options (share of params) |",
        "|---|---|---|---|---|---|---|" + ("---|" if with_cpp else ""),
    ]
    for name, ppl, kl, ear, bits, secs, hist, cpp in rows:
        b = "" if bits is None else f"{bits:.4f}"
        s = "" if secs is None else f"{secs:.1f}"
        e = "" if ear is None else f"{ear:.4f}"
        c = ("" if cpp is None else f"{cpp:.3f} | ") if with_cpp else ""
        lines.append(f"| {name} | {ppl:.3f} | {c}{kl:.4f} | {e} | {b} | {s} | {hist} |")
    ttq = results.get("time_to_quality")
    if ttq:
        ratio = ttq["evo_over_rco"]
        reach = (
            f"first reached it after {ratio:.2f}x RCO's time"
            if ratio is not None
            else f"did not reach it within {ttq['evolutionary_budget_factor']:.1f}x RCO's time"
        )
        lines += ["", f"Time to quality: RCO's calibration KL {ttq['rco_final_kl']:.4f} in "
                  f"{ttq['rco_seconds']:.0f} s; the evolutionary search {reach}."]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------- command line


def parser(prog: str = "python -m rco_jax quantize") -> argparse.ArgumentParser:
    """The ``quantize`` command's argument parser (also used by the benchmark script)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``quantize`` options to ``p`` (a parser or subparser)."""
    d = QuantizeConfig()
    p.add_argument("--bits", type=float, help="average bits per weight (safetensors 3.0, gguf 4.6)")
    p.add_argument(
        "--method",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default all)",
    )
    p.add_argument("--quick", action="store_true", help="small preset: minutes on a 2-core CPU")
    p.add_argument(
        "--format",
        choices=tuple(FORMATS),
        default=d.format,
        help="gguf (default): llama.cpp types, GGUF files; safetensors: bit widths 2-8",
    )
    p.add_argument(
        "--types",
        help=f"gguf options, comma-separated, ascending bits (default {','.join(d.types)})",
    )
    p.add_argument(
        "--llamacpp",
        action="store_true",
        help="gguf: also each file's held-out perplexity as llama.cpp computes it",
    )
    p.add_argument("--steps", type=int, help="RCO steps (full 200, quick 20 gguf / 60 safetensors)")
    p.add_argument("--lr", type=float, help="RCO learning rate (full 0.1, quick 0.2)")
    p.add_argument("--tau", type=float, nargs=2, metavar=("START", "END"), help="temperature")
    p.add_argument("--init", choices=INITS, help="RCO initial logits (auto)")
    p.add_argument("--init-confidence", type=float, help="RCO init probability (0.8)")
    p.add_argument("--quantizer", choices=("gptq", "rtn"), help="database (full gptq, quick rtn)")
    p.add_argument("--proxy", choices=("hessian", "relative"), help="proxy DP error")
    p.add_argument("--calib-seqs", type=int, help="KL calibration windows (full 4, quick 2)")
    p.add_argument("--calib-len", type=int, help="their length (full 128, quick 64)")
    p.add_argument("--pool-seqs", type=int, help="RCO's calibration pool (full 256, quick 128)")
    p.add_argument("--batch-seqs", type=int, help="RCO's minibatch per step (full 4, quick 8)")
    p.add_argument("--eval-seqs", type=int, help="held-out windows (full 16, quick 4)")
    p.add_argument("--eval-len", type=int, help="their length (full 512, quick 256)")
    p.add_argument("--hessian-seqs", type=int, help="Hessian windows (full 32, quick 8)")
    p.add_argument("--hessian-len", type=int, help="their length (full 256, quick 128)")
    p.add_argument(
        "--evo-factor", type=float, help="evolutionary wall-clock / RCO's (full 3, quick 1)"
    )
    p.add_argument("--offspring", type=int, help="evolutionary offspring per generation (16)")
    p.add_argument(
        "--tie",
        default="",
        help="tied groups sharing one bit width per layer: comma-separated subset of "
        f"{','.join(search.TIES)} (default none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--export", metavar="DIR", help="write assignments and quantized weights")
    p.add_argument("--model", metavar="GGUF", help="Llama GGUF file (default: cached SmolLM2)")
    p.add_argument("--cache-dir", help="database / Hessian cache directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_ARG_FIELDS = {  # beside comparison.SEARCH_ARG_FIELDS
    "init": "init",
    "quantizer": "quantizer",
    "proxy": "proxy",
    "calib_seqs": "calib_seqs",
    "calib_len": "calib_seq_len",
    "pool_seqs": "pool_seqs",
    "batch_seqs": "batch_seqs",
    "hessian_seqs": "hessian_seqs",
    "hessian_len": "hessian_seq_len",
    "cache_dir": "cache_dir",
}


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    """A validated :class:`QuantizeConfig` from parsed arguments (``ValueError`` if invalid)."""
    overrides = overrides_from_args(args, _ARG_FIELDS)
    methods = tuple(m.strip() for m in args.method.split(",") if m.strip())
    if args.types:
        overrides["types"] = tuple(t.strip() for t in args.types.split(",") if t.strip())
    overrides.update(
        format=args.format,
        llamacpp=args.llamacpp,
        ties=tuple(t.strip() for t in args.tie.split(",") if t.strip()),
        budget_bits=args.bits,
        methods=methods,
        export_dir=args.export,
    )
    cfg = (QuantizeConfig.quick if args.quick else QuantizeConfig.full)(**overrides)
    if args.tau is not None and not all(t > 0 for t in cfg.tau):
        raise ValueError(f"--tau values must be positive; got {cfg.tau}")
    cfg.validate()
    return cfg


#: Errors whose message says what to do (install an extra, fetch the assets, fix a file): the
#: command line prints them without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    MissingExtraError,
    assets.AssetsNotFoundError,
    assets.GGUFFileError,
)


def run_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, Any]:
    """Runs the comparison for parsed arguments; prints the table, writes ``--json``.

    Invalid arguments and :data:`USER_ERRORS` exit with status 2 and the message (no
    traceback)."""
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        p.error(str(err))
    try:
        results = compare(cfg)
    except USER_ERRORS as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    print()
    print(format_table(results))
    if args.json:
        print(f"\nwrote {write_results(results, args.json)}")
    return results


def main(argv: list[str] | None = None, prog: str = "python -m rco_jax.quant.pipeline") -> int:
    """The ``quantize`` command (``python -m rco_jax quantize`` dispatches here)."""
    p = parser(prog)
    run_from_args(p.parse_args(argv), p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
