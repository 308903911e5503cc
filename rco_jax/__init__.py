"""rco_jax: optimization under exact budget constraints (Riemannian Constrained Optimization)."""

from rco_jax.constraint import BudgetConstraint
from rco_jax.manifold import (
    RetractionInfo,
    budget_normal,
    expected_cost,
    init_logits,
    project_tangent,
    retract,
    retract_with_info,
)

__version__ = "0.1.0"
from rco_jax.transforms import (
    RetractionState,
    rco,
    retraction,
    skip_not_finite,
    tangent_projection,
    transport_moments,
)

__all__ = [
    "BudgetConstraint",
    "RetractionInfo",
    "RetractionState",
    "budget_normal",
    "expected_cost",
    "init_logits",
    "project_tangent",
    "rco",
    "retract",
    "retract_with_info",
    "retraction",
    "skip_not_finite",
    "tangent_projection",
    "transport_moments",
]
