"""Shared fixtures: small random budget problems in every cost/weight layout.

The tests compile many small programs and run each for milliseconds, so compilation is most of
their time: XLA's CPU backend (LLVM) runs at optimization level 0 here, which compiles about a
third faster; what XLA computes (the HLO, its fusions, IEEE float semantics without fast math)
is unchanged, only the machine code is less optimized. Set
``XLA_FLAGS=--xla_backend_optimization_level=3`` (XLA's default) to test the optimized code;
subprocesses (notebook kernels, multi-device checks) inherit the setting.
"""

from __future__ import annotations

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402  (after XLA_FLAGS: read when the backend starts)
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from lm_fixtures import require_assets, smollm2, tiny_gguf  # noqa: F401  (fixtures)

from rco_jax import BudgetConstraint

# Property tests draw fixed examples by default, so a run passes or fails for the code and
# not for the draw; HYPOTHESIS_PROFILE=explore draws fresh ones (and keeps failures found).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


def make_problem(
    seed: int,
    n: int = 6,
    k: int = 4,
    *,
    layout: str = "per_group",
    weighted: bool = True,
    frac: float = 0.4,
    dtype=None,
) -> tuple[BudgetConstraint, jax.Array]:
    """A random constraint with budget at ``frac`` of the cost range, and random logits."""
    rng = np.random.default_rng(seed)
    dtype = dtype or jnp.result_type(float)
    if layout == "shared":
        costs = np.sort(rng.uniform(0.5, 8.0, size=k))
        full = np.broadcast_to(costs, (n, k))
    else:
        costs = rng.uniform(0.0, 5.0, size=(n, k))
        full = costs
    weights = rng.uniform(0.5, 2.0, size=n) if weighted else None
    w = 1.0 if weights is None else weights
    lo = float(np.sum(w * full.min(1)))
    hi = float(np.sum(w * full.max(1)))
    budget = lo + frac * (hi - lo)
    c = BudgetConstraint(
        jnp.asarray(costs, dtype),
        budget,
        None if weights is None else jnp.asarray(weights, dtype),
        num_groups=n if (layout == "shared" and weights is None) else None,
    )
    logits = jnp.asarray(rng.normal(size=(n, k)), dtype)
    return c, logits


LAYOUTS = [
    pytest.param(("shared", False), id="shared-unweighted"),
    pytest.param(("shared", True), id="shared-weighted"),
    pytest.param(("per_group", False), id="pergroup-unweighted"),
    pytest.param(("per_group", True), id="pergroup-weighted"),
]


@pytest.fixture(params=LAYOUTS)
def problem(request):
    layout, weighted = request.param
    return make_problem(0, layout=layout, weighted=weighted)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_multi(
    seed: int,
    q: int = 3,
    n: int = 6,
    k: int = 4,
    *,
    kind: str = "coupled",
    weighted: bool = True,
    same_weights: bool = True,
    inequality: bool = False,
    dtype=None,
):
    """A random reachable MultiBudget (budgets = expected costs at a random interior point).

    ``kind``: ``"coupled"`` (q general budgets), ``"blocks"`` (per_block) or
    ``"single"`` (``MultiBudget([c])``). Returns ``(constraint, logits)``.
    """
    from rco_jax import MultiBudget

    rng = np.random.default_rng(seed)
    dtype = dtype or jnp.result_type(float)
    p = _softmax(rng.normal(size=(n, k)))
    as_j = lambda a: None if a is None else jnp.asarray(a, dtype)
    if kind == "blocks":
        blocks = rng.permutation(np.arange(n) % q)
        costs = rng.uniform(0.0, 5.0, size=(n, k))
        w = rng.uniform(0.5, 2.0, size=n) if weighted else None
        per_group = (1.0 if w is None else w) * np.sum(p * costs, -1)
        budgets = np.bincount(blocks, weights=per_group, minlength=q)
        if inequality:
            budgets = budgets + 0.5 * rng.uniform(-1, 1, size=q)
        mb = MultiBudget.per_block(
            as_j(costs), as_j(budgets), jnp.asarray(blocks), as_j(w), inequality=inequality
        )
    else:
        q = 1 if kind == "single" else q
        shared_w = rng.uniform(0.5, 2.0, size=n) if weighted else None
        cons = []
        for j in range(q):
            # One shared (K,) table (only K - 1 of them can be independent), the rest per group.
            shared = j == 1 and k >= 3
            costs = np.sort(rng.uniform(0.5, 8.0, size=k)) if shared else rng.uniform(0, 5, (n, k))
            w = shared_w if (same_weights or shared_w is None) else rng.uniform(0.5, 2.0, size=n)
            full = np.broadcast_to(costs, (n, k))
            budget = float(np.sum((1.0 if w is None else w) * np.sum(p * full, -1)))
            cons.append(
                BudgetConstraint(as_j(costs), budget, as_j(w), num_groups=n, inequality=inequality)
            )
        mb = MultiBudget(cons)
    logits = jnp.asarray(rng.normal(size=(n, k)), dtype)
    return mb, logits


MULTI_KINDS = ["coupled", "blocks", "coupled-mixed-weights"]


@pytest.fixture(params=MULTI_KINDS)
def multi(request):
    kind = request.param
    if kind == "coupled-mixed-weights":
        return make_multi(0, kind="coupled", same_weights=False)
    return make_multi(0, kind=kind)
