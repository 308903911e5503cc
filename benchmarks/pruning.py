"""Structured pruning of SmolLM2-135M: uniform vs proxy vs evolutionary vs RCO.

Every method prunes exactly the same number of FFN neuron groups (``--mode ffn``, 16 groups
per layer) or attention / MLP sub-blocks (``--mode depth``), globally or in every layer
(``--per-layer``); the evolutionary search (EvoESAP moves, EvoPress swaps in depth mode) gets
3x RCO's wall-clock. Reported per method: held-out perplexity, calibration KL, EAR, the exact
removed fraction and the seconds of the search.

Usage::

    python benchmarks/pruning.py --quick --json OUT.json            # minutes on 2 CPU cores
    python benchmarks/pruning.py --quick --per-layer --json OUT.json
    python benchmarks/pruning.py --quick --mode depth --sparsity 0.1 --json OUT.json
    python benchmarks/pruning.py --json OUT.json                    # full configuration

Output JSON: ``{"machine", "sparsity", "mode", "per_layer", "methods": {"uniform": {"ppl",
"kl", "ear", "removed_fraction", "seconds", ...}, "proxy": ..., "evolutionary": ...,
"rco": ...}, "reference", "config", "timings", "rco_history", "evolutionary_history"}``.
Default path: ``benchmarks/results/pruning[_depth][_per_layer][_quick].json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402

from rco_jax.prune import pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = pipeline.parser("python benchmarks/pruning.py")
    p.description = __doc__.split("\n\n")[0]
    args = p.parse_args(argv)
    try:
        cfg = pipeline.config_from_args(args)
    except ValueError as err:
        p.error(str(err))
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = pipeline.compare(cfg)
    results["total_seconds"] = time.perf_counter() - start
    results["load_avg_before"] = load_before
    results["load_avg_after"] = os.getloadavg()
    print()
    print(pipeline.format_table(results))
    print(
        f"\ntotal {results['total_seconds']:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {results['load_avg_after'][0]:.2f}"
    )
    name = "pruning" + ("_depth" if cfg.mode == "depth" else "")
    name += ("_per_layer" if cfg.per_layer else "") + ("_quick" if args.quick else "")
    out = write_json(name, results, args.json or str(RESULTS / f"{name}.json"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
