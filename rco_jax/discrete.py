"""The discrete side: budget-feasible assignments and the Gumbel straight-through estimator.

* :func:`discretize` -- the most probable assignment whose real cost
  ``sum_i w_i c_{i, a_i}`` fits the budget: the multiple-choice knapsack
  (:func:`rco_jax.knapsack`) on ``log softmax(alpha)``.
* :func:`gumbel_ste` -- a relaxed sample whose forward value is the one-hot of
  a budget-feasible assignment and whose gradient is that of the tempered
  softmax (straight-through)::

      z = (alpha + G) / tau,          G ~ Gumbel(0, 1)
      hard = argmax_{a feasible} sum_i z_{i, a_i}          (knapsack DP)
      W = onehot(hard) + (softmax(z) - stop_gradient(softmax(z)))

Both accept logits as one ``(N, K)`` array or a pytree matching the
constraint; leaves are solved as one problem under the global budget. With a
:class:`~rco_jax.MultiBudget` the assignment fits every budget: one exact DP per
block for per-block budgets, an exact two-dimensional DP for two coupled
budgets, and a Lagrangian-relaxed DP with feasibility repair beyond
(:func:`rco_jax.knapsack.knapsack_multi`).

Reference: Helcig & Alistarh 2026 (arXiv 2605.00649), Section 4; Jang et al.
2017 and Bengio et al. 2013 for Gumbel-softmax and straight-through.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax import knapsack as dp
from rco_jax.constraint import BudgetConstraint, Constraint
from rco_jax.knapsack import knapsack

PyTree = Any

__all__ = ["assignment_cost", "discretize", "gumbel_ste", "one_hot"]


def stack_groups(values: list[jax.Array], costs: list[np.ndarray]):
    """Concatenates leaves into one (N, K_max) problem; padded options get value -inf.

    ``costs`` are ``(n_j, K_j)`` per leaf, or ``(q, n_j, K_j)`` for several budgets.
    """
    k_max = max(v.shape[-1] for v in values)
    pad_v = [
        jnp.pad(v, ((0, 0), (0, k_max - v.shape[-1])), constant_values=-jnp.inf) for v in values
    ]
    # Padded options repeat the row's largest cost: never chosen (value -inf), and they
    # do not widen the DP table the way an extra cost of 0 would.
    pad_c = [
        np.concatenate([c, np.repeat(c.max(-1, keepdims=True), k_max - c.shape[-1], -1)], -1)
        for c in costs
    ]
    return jnp.concatenate(pad_v), np.concatenate(pad_c, axis=-2)


def split_groups(assignment: jax.Array, constraint: Constraint, like: PyTree) -> PyTree:
    bounds = [0]
    for n in constraint.group_sizes:
        bounds.append(bounds[-1] + n)
    parts = [assignment[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return jax.tree.unflatten(jax.tree.structure(like), parts)


def _solve(values: list[jax.Array], constraint: Constraint, resolution) -> jax.Array:
    """The best feasible assignment for ``values``, by the knapsack that fits the budgets.

    One budget: the multiple-choice knapsack DP. Per-block budgets: one exact DP
    per block, batched. Coupled budgets: :func:`rco_jax.knapsack.knapsack_multi`
    (exact 2-D DP for two budgets, Lagrangian relaxation with repair beyond).
    """
    costs = constraint.host_group_costs()
    v, c = (values[0], costs[0]) if len(values) == 1 else stack_groups(values, costs)
    if isinstance(constraint, BudgetConstraint):
        return knapsack(v, c, constraint.budget, resolution=resolution)[0]
    if constraint.coupled:
        return dp.knapsack_multi(v, c, constraint.budget, resolution=resolution)[0]
    if constraint.blocks is None:  # a single budget
        return knapsack(v, c[0], constraint.budget[0], resolution=resolution)[0]
    blocks = np.asarray(constraint.blocks)
    # Budget j's table is zero outside block j: each group's costs are in its block's row.
    block_costs = np.take_along_axis(c, blocks[None, :, None], axis=0)[0]
    return dp.knapsack_blocks(v, block_costs, constraint.budget, blocks, resolution=resolution)[0]


def discretize(
    logits: PyTree, constraint: Constraint, *, resolution: float | None = None
) -> PyTree:
    """Most probable assignment within the budget(s).

    Maximizes ``sum_i log softmax(alpha_i)_{a_i}`` subject to
    ``sum_i w_i c_{i, a_i} <= B`` (for every budget of a ``MultiBudget``). The
    constraint's costs must be concrete (close over them under ``jit``);
    logits and budgets may be traced.

    Args:
      logits: ``(N, K)`` logits or a pytree matching ``constraint``.
      constraint: the budget(s); discrete costs are ``w_i * c_ik``.
      resolution: cost discretization for real-valued costs (see
        :func:`rco_jax.knapsack`); integer costs are solved exactly.

    Returns:
      ``int32`` assignment ``(N,)`` (a pytree of ``(n_j,)`` for pytree logits).

    Example::

      >>> import jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, discretize
      >>> c = BudgetConstraint(jnp.array([1., 2., 4.]), budget=7.0, num_groups=3)
      >>> logits = jnp.log(jnp.array([[.1, .2, .7]] * 3))   # each wants option 2
      >>> discretize(logits, c).tolist()                    # only one 4 fits
      [1, 1, 2]
    """
    leaves = constraint.check_logits(logits)
    values = [
        jax.nn.log_softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)), -1) for x in leaves
    ]
    return split_groups(_solve(values, constraint, resolution), constraint, logits)


def one_hot(assignment: PyTree, constraint: Constraint, dtype: Any = None) -> PyTree:
    """One-hot ``(n_j, K_j)`` arrays of an assignment, matching the constraint."""
    parts = jax.tree.leaves(assignment)
    ks = [c.shape[-1] for c in constraint.cost_leaves()]
    dtype = dtype or jnp.result_type(float)
    out = [jax.nn.one_hot(a, k, dtype=dtype) for a, k in zip(parts, ks)]
    return jax.tree.unflatten(jax.tree.structure(assignment), out)


def assignment_cost(assignment: PyTree, constraint: Constraint) -> jax.Array:
    """Real cost ``sum_i w_i c_{i, a_i}`` of an assignment (``(q,)`` for a ``MultiBudget``)."""
    parts = jax.tree.leaves(assignment)
    total = 0.0
    for g, a in zip(constraint.group_costs(), parts):
        idx = jnp.broadcast_to(a[:, None], g.shape[:-1] + (1,))
        total = total + jnp.sum(jnp.take_along_axis(g, idx, axis=-1), axis=(-2, -1))
    return total


def gumbel_ste(
    key: jax.Array,
    logits: PyTree,
    constraint: Constraint,
    tau: float | jax.Array,
    *,
    resolution: float | None = None,
) -> PyTree:
    """Budget-feasible Gumbel straight-through sample.

    The forward value is the one-hot of the feasible assignment maximizing
    ``sum_i z_{i, a_i}`` with ``z = (alpha + G) / tau``; the gradient is that of
    ``softmax(z)``. The noise ``G`` depends only on ``key`` (one
    ``jax.random.gumbel`` draw of the stacked ``(N, K_max)`` shape).

    Args:
      key: PRNG key.
      logits: ``(N, K)`` logits or a pytree matching ``constraint``.
      constraint: the budget (concrete costs).
      tau: temperature (> 0).
      resolution: see :func:`discretize`.

    Returns:
      ``(N, K)`` weights (pytree of ``(n_j, K_j)``) in the logits' dtype.
    """
    leaves = constraint.check_logits(logits)
    n_total = sum(x.shape[0] for x in leaves)
    k_max = max(x.shape[-1] for x in leaves)
    dtype = jnp.result_type(*leaves)
    noise = jax.random.gumbel(key, (n_total, k_max), jnp.promote_types(dtype, jnp.float32))
    zs, start = [], 0
    for x in leaves:
        n, k = x.shape
        zs.append((x + noise[start : start + n, :k]) / tau)
        start += n
    hard = _solve(jax.lax.stop_gradient(zs), constraint, resolution)
    hard_leaves = jax.tree.leaves(split_groups(hard, constraint, logits))
    out = []
    for z, a, x in zip(zs, hard_leaves, leaves):
        soft = jax.nn.softmax(z, -1)
        onehot = jax.nn.one_hot(a, z.shape[-1], dtype=soft.dtype)
        # Parenthesized so the forward value is exactly the one-hot (soft - soft == 0).
        out.append((onehot + (soft - jax.lax.stop_gradient(soft))).astype(x.dtype))
    return jax.tree.unflatten(jax.tree.structure(logits), out)
