"""rco_jax: optimization under exact budget constraints (Riemannian Constrained Optimization).

Modules, in the order of the method: ``constraint`` (one budget or several) ->
``manifold`` (geometry and the retraction's solver) -> ``projection`` (Birkhoff and
balanced softmax) and ``transforms`` (optax) -> ``knapsack``/``discrete`` (feasible
assignments) -> ``local_search`` (exact-budget polish) -> ``solve`` (end-to-end search).
``baselines``, ``layers``, ``lm``, ``quant`` and ``prune`` are built on top; the core never
imports them.
"""

from rco_jax.constraint import BudgetConstraint, MultiBudget
from rco_jax.discrete import assignment_cost, discretize, gumbel_ste, one_hot
from rco_jax.knapsack import knapsack, knapsack_batch, knapsack_blocks, knapsack_multi
from rco_jax.local_search import PolishResult, polish
from rco_jax.manifold import (
    RetractionInfo,
    SoftmaxStats,
    budget_normal,
    expected_cost,
    init_logits,
    project_descent,
    project_tangent,
    retract,
    retract_with_info,
    softmax_stats,
)
from rco_jax.projection import balanced_softmax, birkhoff_projection
from rco_jax.solve import SolverDivergedError, SolveResult, solve
from rco_jax.sweep import SweepResult, sweep
from rco_jax.transforms import (
    RCOState,
    RetractionState,
    rco,
    retraction,
    skip_not_finite,
    tangent_projection,
    transport_moments,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetConstraint",
    "MultiBudget",
    "RetractionInfo",
    "RCOState",
    "RetractionState",
    "SoftmaxStats",
    "SolveResult",
    "SolverDivergedError",
    "SweepResult",
    "assignment_cost",
    "balanced_softmax",
    "birkhoff_projection",
    "budget_normal",
    "discretize",
    "expected_cost",
    "gumbel_ste",
    "init_logits",
    "knapsack",
    "knapsack_batch",
    "knapsack_blocks",
    "knapsack_multi",
    "one_hot",
    "polish",
    "PolishResult",
    "project_descent",
    "project_tangent",
    "rco",
    "retract",
    "retract_with_info",
    "softmax_stats",
    "retraction",
    "skip_not_finite",
    "solve",
    "sweep",
    "tangent_projection",
    "transport_moments",
]
