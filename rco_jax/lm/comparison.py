"""What the quantization and pruning comparisons share: their search settings and checks.

Both applications compare RCO against an evolutionary search given a multiple of RCO's
wall-clock, on windows of the same model, and report held-out metrics. Their configurations
(:class:`rco_jax.quant.pipeline.QuantizeConfig`, :class:`rco_jax.prune.pipeline.PruneConfig`)
extend :class:`SearchSettings` with what is specific to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["SEARCH_ARG_FIELDS", "SearchSettings", "overrides_from_args", "write_results"]


@dataclasses.dataclass
class SearchSettings:
    """RCO's and the evolutionary search's settings, and the held-out evaluation.

    Attributes:
      eval_seqs, eval_seq_len: held-out windows (perplexity, EAR).
      steps, learning_rate, tau: RCO (Adam steps, learning rate, temperature start/end).
      init_confidence: probability of RCO's start on its initial answer.
      evo_time_factor: the evolutionary search's wall-clock, in multiples of RCO's.
      evo_seconds: its wall-clock when RCO does not run.
      evo_offspring: offspring per generation.
      seed: data windows, Gumbel noise, mutations.
      model_path: GGUF file (default: the cached SmolLM2-135M-Instruct).
      progress: progress bars.
    """

    eval_seqs: int = 16
    eval_seq_len: int = 512
    steps: int = 200
    learning_rate: float = 0.1
    tau: tuple[float, float] = (1.0, 0.05)
    init_confidence: float = 0.8
    evo_time_factor: float = 3.0
    evo_seconds: float = 600.0
    evo_offspring: int = 16
    seed: int = 0
    model_path: str | None = None
    progress: bool = True

    def check_search(
        self,
        *,
        counts: Iterable[str] = (),
        lengths: Iterable[str] = (),
        min_confidence: float,
        min_offspring: int = 1,
    ) -> None:
        """``ValueError`` with what is valid for the shared fields, plus the window ``counts``
        (``>= 1``) and token ``lengths`` (``>= 2``) named by the subclass; ``min_confidence``
        is ``1 / K`` for ``K`` options (the start's probability on its answer is the largest)."""
        for name in ("steps", "eval_seqs", *counts):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("eval_seq_len", *lengths):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2; got {getattr(self, name)}")
        if self.evo_offspring < min_offspring:
            raise ValueError(f"evo_offspring must be >= {min_offspring}; got {self.evo_offspring}")
        if not min_confidence <= self.init_confidence < 1:
            raise ValueError(
                f"init confidence must be in [{min_confidence:g}, 1); got {self.init_confidence}"
            )
        if min(self.learning_rate, self.evo_time_factor, self.evo_seconds, *self.tau) <= 0:
            raise ValueError("learning rate, tau, evo time factor and evo seconds must be positive")


#: Command-line flags (argparse destinations) of the shared fields.
SEARCH_ARG_FIELDS: dict[str, str] = {
    "steps": "steps",
    "lr": "learning_rate",
    "init_confidence": "init_confidence",
    "eval_seqs": "eval_seqs",
    "eval_len": "eval_seq_len",
    "evo_factor": "evo_time_factor",
    "offspring": "evo_offspring",
    "model": "model_path",
}


def overrides_from_args(args: argparse.Namespace, fields: Mapping[str, str]) -> dict[str, Any]:
    """Configuration fields from the flags that were given: ``{field: value}`` for every
    ``flag -> field`` of ``fields`` and :data:`SEARCH_ARG_FIELDS` whose value is not ``None``."""
    both = {**SEARCH_ARG_FIELDS, **fields}
    out = {field: getattr(args, flag) for flag, field in both.items()}
    out = {field: value for field, value in out.items() if value is not None}
    if getattr(args, "tau", None) is not None:
        out["tau"] = tuple(args.tau)
    out.update(seed=args.seed, progress=not args.no_progress)
    return out


def write_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Writes a comparison's results as JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))
    return path
