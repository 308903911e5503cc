"""Mixed-precision quantization of SmolLM2-135M: uniform vs proxy DP vs evolutionary vs RCO.

Every method gets the same quantized-weight database (every linear at 2, 3, 4, 5, 6, 8 bits),
the same calibration tokens (the KL to the reference model is the search objective) and the
same exact average-bits budget (default 3.0); the evolutionary search (EvoPress-style) gets 3x
RCO's wall-clock. Reported per method: held-out perplexity (evaluation plays), calibration KL,
achieved average bits (asserted <= budget), wall-clock seconds, share of parameters per bit
width, and the assignment.

Usage::

    python benchmarks/quantization.py --quick --json OUT.json     # ~8 min on a 2-core CPU
    python benchmarks/quantization.py --json OUT.json             # full configuration
    python benchmarks/quantization.py --bits 2.5 --init proxy_dp  # any `quantize` option
    python benchmarks/quantization.py --format gguf --quick --json OUT.json   # llama.cpp types

With ``--format gguf`` the options are llama.cpp tensor types (budget default 4.6 bits per
weight), every method's GGUF file is written (to ``--export DIR`` or a temporary directory)
and its held-out perplexity computed by llama.cpp itself (``llamacpp_ppl``; needs the
``llamacpp`` extra).

Output JSON: ``{"machine", "budget_bits", "methods": {"uniform": {"ppl", "kl", "avg_bits",
"seconds", ...}, "proxy_dp": ..., "evolutionary": ..., "rco": ...}, "reference", "config",
"timings", "rco_history", "evolutionary_history"}``, plus ``ear``, ``held_out_kl`` and (gguf)
``llamacpp_ppl``, ``file_bits_per_weight`` per method. Default path:
``benchmarks/results/quantization[_gguf][_quick].json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402

from rco_jax.lm.extras import MissingExtraError, check_extra  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        check_extra("quant", purpose="the quantization benchmark")
    except MissingExtraError as err:
        print(f"benchmarks/quantization.py: error: {err}", file=sys.stderr)
        return 2
    from rco_jax.quant import pipeline

    p = pipeline.parser("python benchmarks/quantization.py")
    p.description = __doc__.split("\n\n")[0]
    args = p.parse_args(argv)
    if args.evo_factor is None:
        args.evo_factor = 3.0  # the benchmark gives evolutionary search 3x RCO's time (quick too)
    if args.format == "gguf":
        args.llamacpp = True  # each file's perplexity as llama.cpp computes it
    try:
        cfg = pipeline.config_from_args(args)
    except ValueError as err:
        p.error(str(err))
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        results = pipeline.compare(cfg)
    except pipeline.USER_ERRORS as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    results["total_seconds"] = time.perf_counter() - start
    results["load_avg_before"] = load_before
    results["load_avg_after"] = os.getloadavg()
    print()
    print(pipeline.format_table(results))
    print(
        f"\ntotal {results['total_seconds']:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {results['load_avg_after'][0]:.2f}"
    )
    stem = "quantization" + ("_gguf" if args.format == "gguf" else "")
    default = RESULTS / (stem + ("_quick.json" if args.quick else ".json"))
    out = write_json("quantization", results, args.json or str(default))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
