"""Shared fixtures: small random budget problems in every cost/weight layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import BudgetConstraint


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
