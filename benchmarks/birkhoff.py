"""Birkhoff projection: accuracy, time and backward memory against Sinkhorn, same run.

Methods (float32):
* ours: ``rco_jax.birkhoff_projection`` (Sinkhorn warm start, Newton on the
  ``n - 1`` column shifts, implicit gradients);
* Sinkhorn-Knopp unrolled in JAX, 20 iterations (mHC's default) and 10 (DeepSeek's
  kernels), differentiated by unrolling;
* ott-jax ``Sinkhorn`` (implicit differentiation, with ridges 1e-6 in its linear
  solve: without them it returns NaN gradients on some inputs) at its defaults
  (threshold 1e-3) and at threshold 1e-6 (our accuracy), if ``ott-jax`` is
  installed (``pip install 'rco_jax[bench]'``);
* Wang & Qiu (arXiv 2606.07574), CUDA Newton for n=4: their published errors, cited.

Error: ``||T 1 - 1||_1 + ||T^T 1 - 1||_1`` per matrix over 10,000 random 4x4
matrices with N(0,1) and N(0,10^2) logits. Time (median): forward, and forward +
backward (the gradient of a random linear functional of T), at batches of 4x4
matrices from 512 to 131,072, and n in {8, 32} at batch 4096. Memory: XLA's
temporary allocation of the compiled forward+backward at batch 4096.

Usage: python benchmarks/birkhoff.py [--quick] [--json OUT] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, median_seconds, write_json  # noqa: E402

from rco_jax import birkhoff_projection  # noqa: E402

WANG_QIU = {  # Table of Wang & Qiu (CUDA kernel, n=4), not re-run here.
    "N(0,1)": {"mean": 6.5e-7, "max": 2.5e-6},
    "N(0,100)": {"mean": 1.6e-3, "median": 9e-7, "max": 9.1e-2},
}
SINKHORN_PAPER = {
    "N(0,1)": {"mean": 8.3e-6, "max": 1.4e-3},
    "N(0,100)": {"mean": 7.3e-2, "max": 0.83},
}


def sinkhorn(x: jax.Array, iters: int) -> jax.Array:
    """Unrolled Sinkhorn-Knopp: exp, then alternating column and row normalisation."""
    t = jnp.exp(x - jnp.max(x, axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        t = t / jnp.sum(t, axis=-2, keepdims=True)
        t = t / jnp.sum(t, axis=-1, keepdims=True)
    return t


def ott_sinkhorn(threshold: float, max_iterations: int):
    try:
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import implicit_differentiation as implicit
        from ott.solvers.linear import sinkhorn as ott_sk
    except ImportError:
        return None
    # Without ridges its implicit linear solve returns NaN on some 4x4 inputs (batch 512).
    ridges = dict(ridge_kernel=1e-6, ridge_identity=1e-6)
    solver = ott_sk.Sinkhorn(
        threshold=threshold,
        max_iterations=max_iterations,
        implicit_diff=implicit.ImplicitDiff(solver_kwargs=ridges),
    )

    def one(x):
        n = x.shape[-1]
        geom = geometry.Geometry(cost_matrix=-x, epsilon=1.0)
        return n * solver(linear_problem.LinearProblem(geom)).matrix

    return lambda x: jax.vmap(one)(x.reshape(-1, *x.shape[-2:])).reshape(x.shape)


def methods(quick: bool) -> dict:
    out = {
        "ours": birkhoff_projection,
        "sinkhorn-20": lambda x: sinkhorn(x, 20),
        "sinkhorn-10": lambda x: sinkhorn(x, 10),
    }
    default = ott_sinkhorn(1e-3, 2000)
    if default is not None:
        out["ott-jax (default, 1e-3)"] = default
        out["ott-jax (1e-6)"] = ott_sinkhorn(1e-6, 10000)
    return out


def errors(t: jax.Array) -> np.ndarray:
    t = np.asarray(t, np.float64)
    return np.abs(t.sum(-1) - 1).sum(-1) + np.abs(t.sum(-2) - 1).sum(-1)


def accuracy(fns: dict, count: int) -> dict:
    out = {}
    for family, std in (("N(0,1)", 1.0), ("N(0,100)", 10.0)):
        x = std * jax.random.normal(jax.random.key(0), (count, 4, 4))
        for name, f in fns.items():
            e = errors(jax.jit(f)(x))
            e = np.where(np.isfinite(e), e, np.inf)
            out.setdefault(name, {})[family] = {
                "mean": float(e.mean()),
                "median": float(np.median(e)),
                "max": float(e.max()),
            }
    return out


def _fwd_bwd(f, w):
    return jax.jit(jax.grad(lambda x: jnp.sum(w * f(x))))


def timing(fns: dict, shapes: list[tuple[int, int]], quick: bool) -> list[dict]:
    rows = []
    for batch, n in shapes:
        x = jax.random.normal(jax.random.key(1), (batch, n, n))
        w = jax.random.normal(jax.random.key(2), (batch, n, n))
        for name, f in fns.items():
            if name.startswith("ott") and batch * n * n > 4096 * 16 * (1 if quick else 8):
                continue  # minutes per call at the largest batches
            fwd, fb = jax.jit(f), _fwd_bwd(f, w)
            reps = 3 if batch * n * n >= 2**20 else 5
            row = dict(method=name, batch=batch, n=n)
            for key, fn in (("forward_ms", fwd), ("forward_backward_ms", fb)):
                try:
                    row[key] = 1e3 * median_seconds(lambda fn=fn, x=x: fn(x), repeats=reps)
                except Exception as err:  # e.g. ott-jax's implicit solve failing
                    row[key] = float("nan")
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            rows.append(row)
            print(f"  {name:26s} batch {batch:6d} n {n:2d}: {row['forward_backward_ms']:.1f} ms")
    return rows


def memory(fns: dict) -> dict:
    x = jax.random.normal(jax.random.key(1), (4096, 4, 4))
    w = jax.random.normal(jax.random.key(2), (4096, 4, 4))
    variants = dict(fns)
    variants["ours (max_iter=8)"] = lambda z: birkhoff_projection(z, max_iter=8)
    variants["ours (max_iter=256)"] = lambda z: birkhoff_projection(z, max_iter=256)
    variants["sinkhorn-40"] = lambda z: sinkhorn(z, 40)
    out = {}
    for name, f in variants.items():
        mem = _fwd_bwd(f, w).lower(x).compile().memory_analysis()
        out[name] = None if mem is None else int(mem.temp_size_in_bytes)
    return out


def plot(acc: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(acc)
    pos = np.arange(len(names))
    for i, (family, marker) in enumerate((("N(0,1)", "o"), ("N(0,100)", "s"))):
        med = [acc[m][family]["median"] for m in names]
        mx = [acc[m][family]["max"] for m in names]
        ax1.scatter(pos + 0.15 * i, med, marker=marker, label=f"{family} median")
        ax1.scatter(
            pos + 0.15 * i,
            mx,
            marker=marker,
            facecolors="none",
            edgecolors="k",
            label=f"{family} max",
        )
    ax1.set_xticks(pos, names, rotation=25, ha="right")
    ax1.set_yscale("log")
    ax1.set_ylabel("marginal error per matrix (L1)")
    ax1.set_title("accuracy, 10,000 random 4x4 (float32)")
    ax1.legend(fontsize=8)
    for i, name in enumerate(names):
        color = f"C{i}"
        for key, style, what in (
            ("forward_backward_ms", "-", "fwd+bwd"),
            ("forward_ms", ":", "fwd"),
        ):
            pts = sorted(
                (r["batch"], r[key])
                for r in rows
                if r["method"] == name and r["n"] == 4 and np.isfinite(r[key])
            )
            if pts:
                ax2.plot(*zip(*pts), style, color=color, marker="o", ms=4, label=f"{name} {what}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("batch of 4x4 matrices")
    ax2.set_ylabel("median ms (solid: fwd+bwd, dotted: fwd)")
    ax2.set_title(f"time on {jax.default_backend().upper()}")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer matrices and batch sizes")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    ap.add_argument("--plot", default=str(RESULTS / "birkhoff.png"))
    ap.add_argument("--replot", default=None, help="only redraw the plot from this JSON")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["accuracy"], saved["timing"], Path(args.plot))
        return
    fns = methods(args.quick)
    acc = accuracy(fns, 2000 if args.quick else 10_000)
    print("## Marginal error ||T1 - 1||_1 + ||T^T 1 - 1||_1 per 4x4 matrix (float32)\n")
    table = [
        [
            name,
            *(
                f"{v[f]['mean']:.1e} / {v[f]['median']:.1e} / {v[f]['max']:.1e}"
                for f in ("N(0,1)", "N(0,100)")
            ),
        ]
        for name, v in acc.items()
    ]
    table.append(["Wang & Qiu, CUDA (cited)", "6.5e-07 / - / 2.5e-06", "1.6e-03 / 9e-07 / 9.1e-02"])
    table.append(["Sinkhorn-20 as cited there", "8.3e-06 / - / 1.4e-03", "7.3e-02 / - / 8.3e-01"])
    print(
        markdown_table(
            ["method", "N(0,1) mean / median / max", "N(0,100) mean / median / max"], table
        )
    )
    batches = [512, 8192, 131072] if args.quick else [512, 2048, 8192, 32768, 131072]
    shapes = [(b, 4) for b in batches] + [(4096, 8), (4096, 32)]
    print("\n## Time (forward + backward)")
    rows = timing(fns, shapes, args.quick)
    print()
    print(
        markdown_table(
            ["method", "batch", "n", "forward ms", "forward+backward ms"],
            [
                [r["method"], r["batch"], r["n"], r["forward_ms"], r["forward_backward_ms"]]
                for r in rows
            ],
        )
    )
    mem = memory(fns)
    print("\n## XLA temporary memory of forward+backward, batch 4096 x 4x4\n")
    print(
        markdown_table(
            ["method", "temp MiB"], [[k, "n/a" if v is None else v / 2**20] for k, v in mem.items()]
        )
    )
    plot(acc, rows, Path(args.plot))
    out = write_json(
        "birkhoff",
        {
            "accuracy": acc,
            "timing": rows,
            "memory_bytes": mem,
            "cited": {"wang_qiu_cuda": WANG_QIU, "sinkhorn20_as_cited": SINKHORN_PAPER},
        },
        args.json,
    )
    print(f"\nwrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
