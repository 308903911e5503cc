"""Command line: ``python -m rco_jax {demo,quantize,prune} ...``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["quantize"]:
        # Imported only here: it needs the `quant` extra (gguf, tokenizers, safetensors).
        from rco_jax.lm.extras import MissingExtraError, check_extra

        try:
            check_extra("quant", purpose="`python -m rco_jax quantize`")
        except MissingExtraError as err:
            print(f"python -m rco_jax quantize: error: {err}", file=sys.stderr)
            return 2
        from rco_jax.quant.pipeline import main as quantize

        return quantize(argv[1:], prog="python -m rco_jax quantize")
    if argv[:1] == ["prune"]:
        from rco_jax.prune.pipeline import main as prune

        return prune(argv[1:], prog="python -m rco_jax prune")
    parser = argparse.ArgumentParser(prog="python -m rco_jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="RCO vs penalty vs evolutionary on a toy problem (<1 min)")
    demo.add_argument("--layers", type=int, default=10, help="number of groups N (default 10)")
    demo.add_argument("--bits", type=float, default=3.5, help="average-bits budget (default 3.5)")
    demo.add_argument("--steps", type=int, default=200, help="RCO / penalty steps (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser(
        "quantize",
        add_help=False,
        help="mixed-precision SmolLM2-135M: uniform vs proxy DP vs evolutionary vs RCO "
        "(`python -m rco_jax quantize --help`)",
    )
    sub.add_parser(
        "prune",
        add_help=False,
        help="structured pruning of SmolLM2-135M (FFN neuron groups or sub-blocks): uniform vs "
        "proxy vs evolutionary vs RCO (`python -m rco_jax prune --help`)",
    )
    args = parser.parse_args(argv)

    if args.command == "demo":
        from rco_jax.demo import run_demo

        run_demo(n=args.layers, avg_bits=args.bits, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
