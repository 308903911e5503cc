"""The budget constraint: costs, budget and group weights, as a JAX pytree.

A constraint describes "pick one of K options for each of N groups" with a total
cost budget. Choosing option ``k`` in group ``i`` costs ``w_i * c_ik``; the
relaxed (softmax) problem asks the *expected* cost to equal the budget ``B``::

    C(alpha) = sum_i w_i sum_k softmax(alpha_i)_k c_ik = B,

or, with ``inequality=True``, to stay at or under it (``C(alpha) <= B``): the
budget manifold is then the boundary of the feasible set, and the iterate moves
freely inside it.

Logits may be a single ``(N, K)`` array or any pytree of ``(n_j, K_j)`` arrays
(e.g. one leaf per layer of a Flax model) under one global budget; the costs
(and weights) are then a pytree with one leaf per logits leaf, matched in
flattening order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["BudgetConstraint"]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_float(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


@jax.tree_util.register_pytree_node_class
class BudgetConstraint:
    """A total-cost budget over ``N`` groups with ``K`` options each.

    Args:
      costs: ``(K,)`` costs shared by all groups, or ``(N, K)`` per-group costs;
        or a pytree of such arrays, one leaf per logits leaf.
      budget: the total budget ``B`` in the units of ``sum_i w_i c_ik``.
      weights: ``(N,)`` positive group weights (a matching pytree for pytree
        costs), or ``None`` for all ones.
      num_groups: number of groups ``N`` (or a matching pytree of ints). Needed
        only when it cannot be read from ``costs`` ``(N, K)`` or ``weights``
        ``(N,)``, i.e. shared ``(K,)`` costs without weights.
      inequality: relax to ``C(alpha) <= B`` instead of ``C(alpha) = B``. Use it
        when the loss need not prefer spending the whole budget (then the best
        assignment may cost less than ``B``); keep the default equality when
        more budget always helps (more bits, more experts), the paper's setting.
        The discrete answers are ``<= B`` either way. Static: it is not a leaf.

    All of ``costs``, ``budget`` and ``weights`` are pytree leaves, so a
    constraint can be passed through ``jit`` and mapped over with ``vmap``
    (e.g. a batch of budgets). Construction with concrete values validates them
    and raises ``ValueError`` with the valid range; with traced values
    (inside ``jit``/``vmap``) nothing is checked.

    Example::

      >>> import jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint
      >>> bits = jnp.array([2., 3., 4., 8.])
      >>> params = jnp.array([1e6, 4e6, 4e6])          # parameters per layer
      >>> c = BudgetConstraint(bits, budget=3.0 * params.sum(), weights=params)
      >>> c.num_groups, c.num_options
      (3, 4)
    """

    def __init__(
        self,
        costs: PyTree,
        budget: Any,
        weights: PyTree | None = None,
        *,
        num_groups: int | PyTree | None = None,
        inequality: bool = False,
    ):
        cost_leaves, treedef = jax.tree.flatten(costs)
        if not cost_leaves:
            raise ValueError("BudgetConstraint: `costs` has no arrays.")
        cost_leaves = [_as_float(c) for c in cost_leaves]
        if weights is None:
            weight_leaves: list[jax.Array | None] = [None] * len(cost_leaves)
        else:
            weight_leaves = jax.tree.leaves(weights)
            if len(weight_leaves) != len(cost_leaves):
                raise ValueError(
                    f"BudgetConstraint: `weights` has {len(weight_leaves)} arrays but `costs` has "
                    f"{len(cost_leaves)}; give one (n_j,) weight array per costs leaf."
                )
            weight_leaves = [_as_float(w) for w in weight_leaves]
        if num_groups is None:
            group_leaves: list[int | None] = [None] * len(cost_leaves)
        else:
            group_leaves = [int(n) for n in jax.tree.leaves(num_groups)]
            if len(group_leaves) != len(cost_leaves):
                raise ValueError(
                    "BudgetConstraint: `num_groups` must match the structure of `costs`."
                )

        sizes = []
        for j, (c, w, n) in enumerate(zip(cost_leaves, weight_leaves, group_leaves)):
            where = "" if len(cost_leaves) == 1 else f" (leaf {j})"
            if c.ndim not in (1, 2) or c.shape[-1] < 1:
                raise ValueError(
                    f"BudgetConstraint: costs{where} must have shape (K,) or (N, K); got {c.shape}."
                )
            candidates = {}
            if c.ndim == 2:
                candidates["costs (N, K)"] = c.shape[0]
            if w is not None:
                if w.ndim != 1:
                    raise ValueError(
                        f"BudgetConstraint: weights{where} must have shape (N,); got {w.shape}."
                    )
                candidates["weights (N,)"] = w.shape[0]
            if n is not None:
                candidates["num_groups"] = n
            if not candidates:
                raise ValueError(
                    f"BudgetConstraint: the number of groups N{where} is undetermined with shared "
                    f"costs of shape {c.shape} and no weights; pass weights=jnp.ones(N), per-group "
                    "costs of shape (N, K), or num_groups=N."
                )
            if len(set(candidates.values())) != 1:
                raise ValueError(f"BudgetConstraint: mismatched shapes{where}: {candidates}.")
            sizes.append(next(iter(candidates.values())))
        self.costs = jax.tree.unflatten(treedef, cost_leaves)
        self.weights = None if weights is None else jax.tree.unflatten(treedef, weight_leaves)
        self.budget = _as_float(budget)
        self._sizes = tuple(sizes)
        self.inequality = bool(inequality)
        if self.budget.ndim != 0:
            raise ValueError(
                f"BudgetConstraint: budget must be a scalar; got shape {self.budget.shape}. "
                "For a batch of budgets, build the constraint inside jax.vmap."
            )
        leaves = cost_leaves + [w for w in weight_leaves if w is not None] + [self.budget]
        if all(_is_concrete(x) for x in leaves):
            self._validate()

    # --- pytree protocol -------------------------------------------------------
    def tree_flatten(self):
        return (self.costs, self.budget, self.weights), (self._sizes, self.inequality)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.costs, obj.budget, obj.weights = children
        obj._sizes, obj.inequality = aux
        return obj

    def replace(self, **fields: Any) -> BudgetConstraint:
        """A copy with ``costs``, ``budget`` or ``weights`` replaced, unvalidated.

        Useful to batch a leaf for ``vmap`` or to build an ``in_axes`` prefix::

            batched = c.replace(budget=jnp.array([8.0, 12.0]))
            jax.vmap(f, in_axes=(c.replace(costs=None, budget=0, weights=None),))(batched)
        """
        unknown = set(fields) - {"costs", "budget", "weights"}
        if unknown:
            raise TypeError(f"BudgetConstraint.replace: unknown fields {sorted(unknown)}.")
        children = tuple(fields.get(k, getattr(self, k)) for k in ("costs", "budget", "weights"))
        return BudgetConstraint.tree_unflatten((self._sizes, self.inequality), children)

    def __repr__(self) -> str:
        return (
            f"BudgetConstraint(num_groups={self.num_groups}, num_options={self.num_options}, "
            f"budget={self.budget!r}{', inequality=True' if self.inequality else ''})"
        )

    # --- structure ---------------------------------------------------------------
    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Number of groups in each leaf, in flattening order."""
        return self._sizes

    @property
    def num_groups(self) -> int:
        """Total number of groups ``N`` over all leaves."""
        return int(sum(self._sizes))

    @property
    def num_options(self) -> int | tuple[int, ...]:
        """``K`` (or one ``K_j`` per leaf when they differ)."""
        ks = tuple(int(c.shape[-1]) for c in self.cost_leaves())
        return ks[0] if len(set(ks)) == 1 else ks

    def cost_leaves(self) -> list[jax.Array]:
        """The cost arrays, one per logits leaf (``(K,)`` or ``(n_j, K)``)."""
        return jax.tree.leaves(self.costs)

    def weight_leaves(self) -> list[jax.Array | None]:
        """The weight arrays (or ``None``), one per logits leaf."""
        if self.weights is None:
            return [None] * len(self._sizes)
        return jax.tree.leaves(self.weights)

    def group_costs(self) -> list[jax.Array]:
        """Discrete costs ``w_i * c_ik`` as dense ``(n_j, K)`` arrays, one per leaf."""
        out = []
        for c, w, n in zip(self.cost_leaves(), self.weight_leaves(), self._sizes):
            c = jnp.broadcast_to(c, (n, c.shape[-1]))
            out.append(c if w is None else w[:, None] * c)
        return out

    def host_group_costs(self) -> list[np.ndarray]:
        """:meth:`group_costs` as float64 NumPy arrays (concrete costs/weights only).

        Computed on the host, so it works under ``jit`` when the constraint is
        closed over; this is what the knapsack DP needs to size its table.
        """
        out = []
        for c, w, n in zip(self.cost_leaves(), self.weight_leaves(), self._sizes):
            if not (_is_concrete(c) and (w is None or _is_concrete(w))):
                raise TypeError(
                    "BudgetConstraint: the discrete side (knapsack DP) needs concrete costs and "
                    "weights; close over the constraint (or its costs) instead of passing them "
                    "through jit/vmap as traced arguments. Only the budget may be traced."
                )
            c = np.broadcast_to(np.asarray(c, np.float64), (n, c.shape[-1]))
            out.append(c if w is None else np.asarray(w, np.float64)[:, None] * c)
        return out

    def cost_range(self) -> tuple[jax.Array, jax.Array]:
        """``(sum_i w_i min_k c_ik, sum_i w_i max_k c_ik)``: the achievable costs."""
        lo = hi = 0.0
        for c, w, n in zip(self.cost_leaves(), self.weight_leaves(), self._sizes):
            c_min, c_max = jnp.min(c, axis=-1), jnp.max(c, axis=-1)
            if c.ndim == 1:  # shared costs: no (N, K) broadcast needed
                total = n if w is None else jnp.sum(w)
                lo, hi = lo + total * c_min, hi + total * c_max
            else:
                lo = lo + (jnp.sum(c_min) if w is None else jnp.sum(w * c_min))
                hi = hi + (jnp.sum(c_max) if w is None else jnp.sum(w * c_max))
        return jnp.asarray(lo), jnp.asarray(hi)

    def check_logits(self, logits: PyTree) -> list[jax.Array]:
        """Returns the logits leaves after checking they match the constraint."""
        leaves = jax.tree.leaves(logits)
        if len(leaves) != len(self._sizes):
            raise ValueError(
                f"logits have {len(leaves)} arrays but the constraint has {len(self._sizes)} cost "
                "leaves; give costs (and weights) with one leaf per logits leaf."
            )
        for j, (x, c, n) in enumerate(zip(leaves, self.cost_leaves(), self._sizes)):
            if x.shape != (n, c.shape[-1]):
                where = "" if len(leaves) == 1 else f" (leaf {j})"
                raise ValueError(
                    f"logits{where} have shape {x.shape}; the constraint expects (N, K) = "
                    f"{(n, c.shape[-1])}."
                )
        return leaves

    # --- validation ----------------------------------------------------------------
    def _validate(self) -> None:
        costs = [np.asarray(c, np.float64) for c in self.cost_leaves()]
        weights = [None if w is None else np.asarray(w, np.float64) for w in self.weight_leaves()]
        for j, (c, w) in enumerate(zip(costs, weights)):
            where = "" if len(costs) == 1 else f" (leaf {j})"
            if not np.all(np.isfinite(c)) or np.any(c < 0):
                raise ValueError(f"BudgetConstraint: costs{where} must be finite and non-negative.")
            if w is not None and (not np.all(np.isfinite(w)) or np.any(w <= 0)):
                raise ValueError(
                    f"BudgetConstraint: weights{where} must be finite and strictly positive "
                    f"(min is {np.min(w) if w.size else 'n/a'})."
                )
        spans = [
            np.broadcast_to(np.ptp(c, axis=-1), (n,)) * (1.0 if w is None else w)
            for c, w, n in zip(costs, weights, self._sizes)
        ]
        if not any(np.any(s > 0) for s in spans):
            raise ValueError(
                "BudgetConstraint: all options cost the same in every group, so the budget "
                "manifold is degenerate (every assignment has the same cost); give at least one "
                "group options of different cost."
            )
        lo, hi = (float(v) for v in self.cost_range())
        budget = float(self.budget)
        if self.inequality:
            if not np.isfinite(budget) or not lo < budget:
                raise ValueError(
                    f"BudgetConstraint: budget {budget:.6g} leaves no room: with "
                    f"inequality=True it must be finite and above the minimum total cost "
                    f"{lo:.6g} (softmax probabilities never reach a vertex)."
                )
            return
        if not np.isfinite(budget) or not lo < budget < hi:
            raise ValueError(
                f"BudgetConstraint: budget {budget:.6g} is not reachable by the relaxation; it "
                f"must lie strictly between the minimum total cost {lo:.6g} and the maximum "
                f"{hi:.6g} (softmax probabilities never reach a vertex). For a budget that "
                "need not be spent exactly, pass inequality=True."
            )
