"""RCO steps per second of the quantization search, on a SmolLM2-135M-shaped model.

The weights are random (same shapes as SmolLM2-135M-Instruct: 30 layers, 210 linears,
134M parameters) and the candidates are the weights plus per-bit-width noise, so no model
file is needed (a GPU machine without network can run it). The step cost does not depend on
the weights' values: one step is a forward and backward pass of the model on a calibration
minibatch, mixing every linear's K candidates, plus the RCO update and the budget DP.
Baseline in the same run: a bare forward+backward of the reference model on the same batch.

Usage: python benchmarks/quant_steps.py [--steps 40] [--batch 4] [--seq 128] [--small]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, median_seconds, write_json  # noqa: E402

from rco_jax.lm import model as lm  # noqa: E402

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
SMALL = dict(SMOLLM2, vocab_size=512, num_layers=2, intermediate_size=256)
BITS = (2, 3, 4, 5, 6, 8)


def synthetic_space(config: lm.LlamaConfig, seed: int = 0):
    from rco_jax.quant.search import SearchSpace

    rng = np.random.default_rng(seed)
    weights = lm.Llama(config, rngs=nnx.Rngs(seed)).weights()
    weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    shapes = lm.linear_shapes(config)
    quantized = {}
    for name in lm.linear_names(config):
        w = weights[name].T if weights[name].shape == shapes[name] else weights[name]
        scale = float(np.std(w))
        quantized[name] = {
            b: w + (scale * 2.0 ** (1 - b)) * rng.standard_normal(w.shape).astype(np.float32)
            for b in BITS
        }
    return SearchSpace.build(weights, quantized, config, BITS), weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--small", action="store_true", help="a 2-layer model (smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from rco_jax.quant import search

    config = lm.LlamaConfig(**(SMALL if args.small else SMOLLM2))
    t0 = time.perf_counter()
    space, weights = synthetic_space(config)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    pool = rng.integers(0, config.vocab_size, size=(8 * args.batch, args.seq))
    ref = search.reference_log_probs(weights, pool, config)

    flat = {k: jnp.asarray(v) for k, v in weights.items()}
    toks = jnp.asarray(pool[: args.batch])

    @jax.jit
    def fwd_bwd(p):
        return jax.grad(lambda p: jnp.mean(lm.forward(p, toks, config)[..., 0]))(p)

    base_s = median_seconds(lambda: fwd_bwd(flat), repeats=5)

    def run():
        return search.run_rco(
            space,
            pool,
            ref,
            4.0,
            key=jax.random.key(0),
            num_steps=args.steps,
            batch_seqs=args.batch,
            progress=False,
        )

    t0 = time.perf_counter()
    jax.block_until_ready(run().loss)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = run()
    jax.block_until_ready(res.loss)
    run_s = time.perf_counter() - t0
    step_s = run_s / args.steps
    row = {
        "model": "2-layer (smoke)" if args.small else "SmolLM2-135M shape",
        "device": str(jax.devices()[0].device_kind),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "build_s": build_s,
        "first_call_s": first_s,
        "run_s": run_s,
        "steps_per_s": 1 / step_s,
        "model_fwd_bwd_ms": 1e3 * base_s,
        "step_over_fwd_bwd": step_s / base_s,
        "avg_bits": float(
            np.sum(np.asarray(space.bits)[np.asarray(res.assignment)] * space.params)
            / space.total_params
        ),
    }
    assert row["avg_bits"] <= 4.0 + 1e-9, row
    print(markdown_table(list(row), [list(row.values())]))
    print("wrote", write_json("quant_steps" + ("_small" if args.small else ""), row, args.json))


if __name__ == "__main__":
    main()
