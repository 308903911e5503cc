"""Side-by-side structured pruning of SmolLM2-135M: uniform, proxy, evolutionary, RCO.

``python -m rco_jax prune --sparsity 0.25 [--per-layer] [--mode ffn|depth] [--quick]
[--output DIR]`` runs :func:`compare`:

1. model and data: the reference model (dequantized GGUF); calibration windows (the pool of
   the KL loss, and separate windows for the scores) from the calibration plays, held-out
   windows from the evaluation plays (:mod:`rco_jax.lm.data`);
2. scores: Wanda-style neuron scores (FFN mode) or single-drop KL (depth mode), and the
   :class:`~rco_jax.prune.search.PruneSpace`;
3. the methods, at the same exact budget:

   * ``uniform``: the same count in every layer (depth: per kind), lowest scores pruned;
   * ``proxy``: exact knapsack (top-k) on the scores, globally or per layer;
   * ``rco``: RCO on the calibration KL, a fresh minibatch of the pool each step;
   * ``evolutionary``: EvoESAP / EvoPress moves on the KL of fixed calibration windows,
     given ``evo_time_factor`` (3) times RCO's wall-clock;

4. for every answer: held-out perplexity, calibration KL (the whole pool), EAR on the
   held-out windows, the exact removed fraction, pruned groups per block, seconds.

``--output DIR`` writes RCO's answer (else the first method's) as ``DIR/mask.json`` plus the
physically smaller model (:mod:`rco_jax.prune.export`), and every method's mask as
``DIR/masks/<method>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax.lm import assets, data
from rco_jax.lm import model as lm
from rco_jax.lm.comparison import SearchSettings, overrides_from_args, write_results
from rco_jax.lm.metrics import ear
from rco_jax.prune import export, search

__all__ = ["METHODS", "PruneConfig", "Problem", "build_problem", "compare", "format_table", "main"]

#: The methods, in the order they run (evolutionary needs RCO's time).
METHODS: tuple[str, ...] = ("uniform", "proxy", "rco", "evolutionary")
#: RCO's initial logits.
INITS: tuple[str, ...] = ("uniform", "proxy", "flat")
#: Where the token windows come from.
DATASETS: tuple[str, ...] = ("shakespeare", "random")


@dataclasses.dataclass
class PruneConfig(SearchSettings):
    """Everything that defines a comparison (defaults: the full configuration).

    The search settings and held-out windows are those of
    :class:`~rco_jax.lm.comparison.SearchSettings`; the pruning problem's own fields:

    Attributes:
      sparsity: fraction of FFN groups (depth: sub-blocks) to remove, in (0, 1).
      mode: ``"ffn"`` (neuron groups) or ``"depth"`` (attention / MLP sub-blocks).
      per_layer: the same count in every layer (depth: of each kind); else one global count.
      methods: subset of :data:`METHODS`.
      num_experts: groups per FFN (``E``); must divide the FFN width.
      grouping: ``"score"`` (neurons sorted by score, then split) or ``"contiguous"``.
      score_seqs, score_seq_len: windows for the scores.
      calib_seqs, calib_seq_len: the calibration pool (RCO's minibatches, the reported KL).
      batch_seqs: RCO's minibatch (windows per step).
      evo_seqs: the evolutionary search's fitness windows (the first of the pool).
      init: RCO's start (probability ``init_confidence`` on the uniform or proxy answer, or
        flat logits).
      checkpoint_every: RCO's answer is the best on the pool of its logits' mode every this
        many steps, at the end and its start (0: the end and the start).
      output_dir: export directory (or ``None``).
      dataset: ``"shakespeare"`` or ``"random"`` (uniform random token ids: smoke tests of a
        synthetic model).
    """

    sparsity: float = 0.25
    mode: str = "ffn"
    per_layer: bool = False
    methods: tuple[str, ...] = METHODS
    num_experts: int = 16
    grouping: str = "score"
    score_seqs: int = 8
    score_seq_len: int = 128
    calib_seqs: int = 32
    calib_seq_len: int = 128
    batch_seqs: int = 4
    evo_seqs: int = 8
    init: str = "uniform"
    checkpoint_every: int = 20
    learning_rate: float = 0.05
    tau: tuple[float, float] = (1.0, 0.2)
    output_dir: str | None = None
    dataset: str = "shakespeare"

    @classmethod
    def full(cls, **overrides: Any) -> PruneConfig:
        """32 x 128-token calibration pool, minibatches of 4, 200 RCO steps at learning rate
        0.05 (tau 1 -> 0.2), 16 x 512 held-out tokens (the defaults)."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> PruneConfig:
        """Minutes on a 2-core CPU: 16 x 64-token pool, minibatches of 2, 30 RCO steps at
        learning rate 0.2 (tau 1 -> 0.05), 4 x 256 held-out tokens, evolutionary fitness on 4
        windows."""
        base = dict(
            score_seqs=4,
            score_seq_len=64,
            calib_seqs=16,
            calib_seq_len=64,
            batch_seqs=2,
            evo_seqs=4,
            eval_seqs=4,
            eval_seq_len=256,
            steps=30,
            learning_rate=0.2,
            tau=(1.0, 0.05),
            evo_offspring=8,
        )
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        """``ValueError`` with what is valid, for any bad field."""
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in (0, 1); got {self.sparsity!r}")
        if not 0.0 < float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie strictly between 0 and 1; got {self.sparsity}")
        search.check_mode(self.mode)
        per = self.sparsity * self.num_experts
        if self.mode == "ffn" and self.per_layer and abs(per - round(per)) > 1e-9:
            raise ValueError(
                f"--per-layer needs an integer count per layer: sparsity {self.sparsity} of "
                f"{self.num_experts} groups is {per:g}; valid sparsities are the multiples of "
                f"1/{self.num_experts}"
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
        if self.grouping not in search.GROUPINGS:
            raise ValueError(f"grouping must be one of {search.GROUPINGS}; got {self.grouping!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}; got {self.init!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}; got {self.dataset!r}")
        self.check_search(
            counts=("calib_seqs", "score_seqs", "batch_seqs"),
            lengths=("calib_seq_len", "score_seq_len"),
            min_confidence=0.5,
            min_offspring=2,
        )
        if not 1 <= self.batch_seqs <= self.calib_seqs:
            raise ValueError(f"batch_seqs must be in [1, calib_seqs={self.calib_seqs}]")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0; got {self.checkpoint_every}")
        if not 1 <= self.evo_seqs <= self.calib_seqs:
            raise ValueError(f"evo_seqs must be in [1, calib_seqs={self.calib_seqs}]")


@dataclasses.dataclass
class Problem:
    """What every method shares."""

    space: search.PruneSpace
    reference: dict[str, Any]
    calib_tokens: np.ndarray
    eval_tokens: np.ndarray
    ref_log_probs: jax.Array
    eval_ref_log_probs: jax.Array
    timings: dict[str, float]


def _windows(cfg: PruneConfig, config: lm.LlamaConfig, n: int, length: int, kind: str, seed: int):
    if cfg.dataset == "random":
        rng = np.random.default_rng([seed, {"calib": 0, "score": 1, "eval": 2}[kind]])
        return rng.integers(0, config.vocab_size, (n, length)).astype(np.int32)
    if kind == "eval":
        return data.eval_tokens(n, length)
    return data.calibration_tokens(n, length, seed=seed + (kind == "score"))


def build_problem(
    cfg: PruneConfig,
    *,
    model: tuple[lm.LlamaConfig, Mapping[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> Problem:
    """Loads the model and data, the scores and the reference log-probabilities."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    config, weights = model if model is not None else lm.load_smollm2(cfg.model_path)
    weights = {k: jnp.asarray(v) for k, v in weights.items()}
    stacked = lm.stack_weights(weights, config)
    calib = _windows(cfg, config, cfg.calib_seqs, cfg.calib_seq_len, "calib", cfg.seed)
    score_tokens = _windows(cfg, config, cfg.score_seqs, cfg.score_seq_len, "score", cfg.seed)
    evals = _windows(cfg, config, cfg.eval_seqs, cfg.eval_seq_len, "eval", cfg.seed)
    timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = search.reference_log_probs(stacked, calib, config)
    eval_ref = search.reference_log_probs(stacked, evals, config)
    timings["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.mode == "ffn":
        scores = search.ffn_neuron_scores(weights, score_tokens, config)
    else:
        score_ref = search.reference_log_probs(stacked, score_tokens, config)
        scores = search.depth_scores(stacked, score_tokens, score_ref, config)
    space = search.PruneSpace.build(
        config, stacked, scores, mode=cfg.mode, num_experts=cfg.num_experts, grouping=cfg.grouping
    )
    search.budget_counts(space, cfg.sparsity, cfg.per_layer)  # bad counts fail early
    timings["scores"] = time.perf_counter() - t
    log(f"scores ({cfg.mode}, {space.num_groups} groups) in {timings['scores']:.1f} s")
    return Problem(space, weights, calib, evals, ref, eval_ref, timings)


@jax.jit
def _eval_batch(space: search.PruneSpace, tokens: jax.Array, ref: jax.Array, a: jax.Array):
    logits = space.logits(jax.nn.one_hot(a, 2), tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return nll, ear(ref, logits) * tokens.size


def evaluate(
    space: search.PruneSpace, tokens: np.ndarray, ref: jax.Array, assignment: Any, batch: int = 4
) -> tuple[float, float]:
    """Held-out ``(perplexity, EAR)`` of an assignment."""
    a = jnp.asarray(assignment, jnp.int32)
    nll = acc = 0.0
    for s in range(0, len(tokens), batch):
        t = jnp.asarray(tokens[s : s + batch])
        n, e = _eval_batch(space, t, ref[s : s + batch], a)
        nll, acc = nll + float(n), acc + float(e)
    return math.exp(nll / (tokens.shape[0] * (tokens.shape[1] - 1))), acc / tokens.size


def compare(
    cfg: PruneConfig, *, problem: Problem | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the configured methods; returns a JSON-able dict::

    {"sparsity", "mode", "per_layer", "config", "model", "timings", "reference": {"ppl"},
     "methods": {name: {"ppl", "kl", "ear", "removed_fraction", "seconds",
                        "pruned_per_block", "kept_per_layer", ...}},
     "rco_history": {"loss", "expected_pruned", "budget_error", "sample_pruned", "tau"},
     "evolutionary_history": {"loss", "evaluations"}}
    """
    cfg.validate()
    problem = problem or build_problem(cfg, log=log)
    space, s, per = problem.space, float(cfg.sparsity), cfg.per_layer
    counts = search.budget_counts(space, s, per)
    key = jax.random.key(cfg.seed)
    ref_ppl, _ = evaluate(
        space, problem.eval_tokens, problem.eval_ref_log_probs, np.zeros(space.num_groups)
    )
    out: dict[str, Any] = {
        "sparsity": s,
        "mode": cfg.mode,
        "per_layer": per,
        "config": dataclasses.asdict(cfg),
        "model": {
            "groups": space.num_groups,
            "group_size": space.group_size if cfg.mode == "ffn" else None,
            "pruned_per_block": counts.tolist(),
            "calib_tokens": int(problem.calib_tokens.size),
            "eval_tokens": int(problem.eval_tokens.size),
        },
        "timings": dict(problem.timings),
        "reference": {"ppl": ref_ppl},
        "methods": {},
    }
    log(f"reference: held-out perplexity {ref_ppl:.3f}")
    results: dict[str, tuple[np.ndarray, float, dict[str, Any]]] = {}
    for method in [m for m in METHODS if m in cfg.methods]:
        extra: dict[str, Any] = {}
        t = time.perf_counter()
        if method == "uniform":
            a = search.uniform_assignment(space, s)
        elif method == "proxy":
            a = search.proxy_assignment(space, s, per)
        elif method == "rco":
            init = None
            if cfg.init != "flat":
                start = (
                    search.uniform_assignment(space, s)
                    if cfg.init == "uniform"
                    else search.proxy_assignment(space, s, per)
                )
                init = start
            res = search.run_rco(
                space,
                problem.calib_tokens,
                problem.ref_log_probs,
                s,
                per_layer=per,
                key=jax.random.fold_in(key, 1),
                num_steps=cfg.steps,
                batch_seqs=cfg.batch_seqs,
                learning_rate=cfg.learning_rate,
                tau=cfg.tau,
                init=init,
                init_confidence=cfg.init_confidence,
                checkpoint_every=cfg.checkpoint_every,
                progress=cfg.progress,
            )
            a = np.asarray(res.assignment)
            hist = dict(res.history)
            selected = int(hist.pop("selected_step"))
            out["rco_history"] = {k: np.asarray(v).tolist() for k, v in hist.items()}
            extra.update(
                init=cfg.init, steps=cfg.steps, selected_step=selected, from_start=selected == -1
            )
        else:
            limit = cfg.evo_time_factor * results["rco"][1] if "rco" in results else cfg.evo_seconds
            res = search.run_evolutionary(
                space,
                problem.calib_tokens[: cfg.evo_seqs],
                problem.ref_log_probs[: cfg.evo_seqs],
                s,
                per_layer=per,
                key=jax.random.fold_in(key, 2),
                offspring=cfg.evo_offspring,
                time_limit=limit,
                progress=cfg.progress,
            )
            a = np.asarray(res.assignment)
            out["evolutionary_history"] = {
                "loss": np.asarray(res.history["loss"]).tolist(),
                "evaluations": np.asarray(res.history["evaluations"]).tolist(),
            }
            extra.update(generations=len(res.history["loss"]), time_limit=limit)
        secs = time.perf_counter() - t
        got = space.per_block_pruned(a, per)
        if not np.array_equal(got, counts):
            raise AssertionError(f"{method}: pruned {got.tolist()} per block, not {counts}")
        results[method] = (np.asarray(a, np.int32), secs, extra)
        log(f"{method}: {secs:.1f} s")

    for method, (a, secs, extra) in results.items():
        ppl, acc = evaluate(space, problem.eval_tokens, problem.eval_ref_log_probs, a)
        kl = search.calibration_kl(space, problem.calib_tokens, problem.ref_log_probs, a)
        out["methods"][method] = {
            "ppl": ppl,
            "kl": kl,
            "ear": acc,
            "removed_fraction": space.removed_fraction(a),
            "seconds": secs,
            "pruned_per_block": space.per_block_pruned(a, True).astype(int).tolist(),
            "kept_per_layer": space.kept_per_layer(a).tolist(),
            **extra,
            "assignment": a.tolist(),
        }
    if cfg.output_dir:
        d = Path(cfg.output_dir)
        main_method = "rco" if "rco" in results else next(iter(results))
        for method, (a, _, _) in results.items():
            (d / "masks").mkdir(parents=True, exist_ok=True)
            mask = export.mask_dict(space, a)
            (d / "masks" / f"{method}.json").write_text(json.dumps(mask))
        export.save(
            d,
            export.mask_dict(space, results[main_method][0]),
            space.config,
            problem.reference,
            {"method": main_method, "mode": cfg.mode, "sparsity": str(s)},
        )
        out["export"] = {"dir": str(d), "method": main_method}
        log(f"exported {main_method} to {d}")
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """The comparison as a markdown table."""
    what = "FFN parameters" if results["mode"] == "ffn" else "sub-blocks"
    scope = "in every layer" if results["per_layer"] else "globally"
    lines = [
        f"Sparsity {results['sparsity']} of {what} ({results['mode']} mode, {scope}); held-out "
        f"perplexity and EAR on {results['model']['eval_tokens']} tokens, KL on "
        f"{results['model']['calib_tokens']} calibration tokens; reference perplexity "
        f"{results['reference']['ppl']:.3f}.",
        "",
        "| method | ppl | KL | EAR | removed fraction | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['ear']:.4f} | "
            f"{r['removed_fraction']:.6g} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``prune`` options (shared by the benchmark script)."""
    p.add_argument("--sparsity", type=float, default=0.25, help="fraction removed, in (0, 1)")
    p.add_argument("--per-layer", action="store_true", help="exactly the same count per layer")
    p.add_argument("--mode", default="ffn", help="ffn (neuron groups) or depth (sub-blocks)")
    p.add_argument("--method", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--quick", action="store_true", help="small preset: minutes on a 2-core CPU")
    p.add_argument("--experts", type=int, help="neuron groups per FFN (16)")
    p.add_argument("--grouping", help="score (default) or contiguous")
    p.add_argument("--steps", type=int, help="RCO steps (full 200, quick 30)")
    p.add_argument("--lr", type=float, help="RCO learning rate (full 0.05, quick 0.2)")
    p.add_argument(
        "--tau", type=float, nargs=2, metavar=("START", "END"),
        help="RCO temperature, annealed exponentially (full 1 0.2, quick 1 0.05)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int,
        help="RCO's answer: the best on the pool of its mode every this many steps (20; 0: end)",
    )  # fmt: skip
    p.add_argument("--init", help="RCO start: uniform (default), proxy or flat")
    p.add_argument("--init-confidence", type=float, help="RCO start's probability (0.8)")
    p.add_argument("--calib-seqs", type=int, help="calibration pool windows (full 32, quick 16)")
    p.add_argument("--calib-len", type=int, help="their length (full 128, quick 64)")
    p.add_argument("--batch-seqs", type=int, help="RCO minibatch windows (full 4, quick 2)")
    p.add_argument("--eval-seqs", type=int, help="held-out windows (full 16, quick 4)")
    p.add_argument("--eval-len", type=int, help="their length (full 512, quick 256)")
    p.add_argument("--score-seqs", type=int, help="score windows (full 8, quick 4)")
    p.add_argument("--score-len", type=int, help="their length (full 128, quick 64)")
    p.add_argument("--evo-seqs", type=int, help="evolutionary fitness windows (full 8, quick 4)")
    p.add_argument("--evo-factor", type=float, help="evolutionary wall-clock / RCO's (3)")
    p.add_argument("--offspring", type=int, help="evolutionary offspring (full 16, quick 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="DIR", help="write mask.json and the pruned model")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--model", metavar="GGUF", help="Llama GGUF file (default: cached SmolLM2)")
    p.add_argument("--dataset", help="shakespeare (default) or random token ids")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_ARG_FIELDS = {  # beside comparison.SEARCH_ARG_FIELDS
    "experts": "num_experts",
    "grouping": "grouping",
    "init": "init",
    "checkpoint_every": "checkpoint_every",
    "calib_seqs": "calib_seqs",
    "calib_len": "calib_seq_len",
    "batch_seqs": "batch_seqs",
    "score_seqs": "score_seqs",
    "score_len": "score_seq_len",
    "evo_seqs": "evo_seqs",
    "dataset": "dataset",
}


def parser(prog: str = "python -m rco_jax prune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """A validated :class:`PruneConfig` (``ValueError`` says what is valid)."""
    overrides = overrides_from_args(args, _ARG_FIELDS)
    overrides.update(
        sparsity=args.sparsity,
        mode=args.mode,
        per_layer=args.per_layer,
        methods=tuple(m.strip() for m in args.method.split(",") if m.strip()),
        output_dir=args.output,
    )
    cfg = (PruneConfig.quick if args.quick else PruneConfig.full)(**overrides)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None, prog: str = "python -m rco_jax prune") -> int:
    """Command line; bad arguments and missing assets exit with status 2 and a message."""
    p = parser(prog)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        p.error(str(err))
    try:
        results = compare(cfg)
    except (ValueError, assets.AssetsNotFoundError, assets.GGUFFileError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print()
    print(format_table(results))
    if args.json:
        print(f"wrote {write_results(results, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
