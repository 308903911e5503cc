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

Several budgets at once (``q`` cost tables ``c^(j)``, each with its own budget
``B_j``) are a :class:`MultiBudget`: either ``q`` general budgets over the same
groups (``MultiBudget([c1, c2, ...])``), or one budget per block of groups
(``MultiBudget.per_block``), which separates into ``q`` independent problems.
Both kinds are accepted wherever a ``BudgetConstraint`` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["BudgetConstraint", "MultiBudget"]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_float(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_logits(logits: PyTree, sizes, cost_leaves) -> list[jax.Array]:
    leaves = jax.tree.leaves(logits)
    if len(leaves) != len(sizes):
        raise ValueError(
            f"logits have {len(leaves)} arrays but the constraint has {len(sizes)} cost "
            "leaves; give costs (and weights) with one leaf per logits leaf."
        )
    for j, (x, c, n) in enumerate(zip(leaves, cost_leaves, sizes)):
        if x.shape != (n, c.shape[-1]):
            where = "" if len(leaves) == 1 else f" (leaf {j})"
            raise ValueError(
                f"logits{where} have shape {x.shape}; the constraint expects (N, K) = "
                f"{(n, c.shape[-1])}."
            )
    return leaves


class _Groups:
    """What both constraint kinds share: groups, options and the per-leaf arrays."""

    costs: PyTree
    weights: PyTree | None

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Number of groups in each leaf, in flattening order."""
        raise NotImplementedError

    @property
    def num_groups(self) -> int:
        """Total number of groups ``N`` over all leaves."""
        return int(sum(self.group_sizes))

    @property
    def num_options(self) -> int | tuple[int, ...]:
        """``K`` (or one ``K_j`` per leaf when they differ)."""
        ks = tuple(int(c.shape[-1]) for c in self.cost_leaves())
        return ks[0] if len(set(ks)) == 1 else ks

    def cost_leaves(self) -> list[jax.Array]:
        """The cost arrays, one per logits leaf (with a leading ``q`` axis if coupled)."""
        return jax.tree.leaves(self.costs)

    def weight_leaves(self) -> list[jax.Array | None]:
        """The weight arrays (or ``None``), one per logits leaf."""
        if self.weights is None:
            return [None] * len(self.group_sizes)
        return jax.tree.leaves(self.weights)

    def check_logits(self, logits: PyTree) -> list[jax.Array]:
        """Returns the logits leaves after checking they match the constraint."""
        return _check_logits(logits, self.group_sizes, self.cost_leaves())


@jax.tree_util.register_pytree_node_class
class BudgetConstraint(_Groups):
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

    # --- the geometry's view (shared with MultiBudget) -----------------------------
    num_budgets = 1
    coupled = False
    structure = None

    @property
    def budgets(self) -> jax.Array:
        """The budget as a ``(1,)`` vector (``MultiBudget.budgets`` is ``(q,)``)."""
        return self.budget[None]

    def block_leaves(self) -> list[jax.Array | None]:
        """Block ids per leaf; ``None``: every group belongs to the single budget."""
        return [None] * len(self._sizes)

    def budget_ranges(self) -> tuple[jax.Array, jax.Array]:
        """:meth:`cost_range` as ``(1,)`` vectors."""
        lo, hi = self.cost_range()
        return lo[None], hi[None]

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


def _same_weights(cons: Sequence[BudgetConstraint]) -> bool:
    """Whether every constraint has the same weights (identical arrays or equal values)."""
    first = cons[0].weight_leaves()
    for c in cons[1:]:
        for a, b in zip(first, c.weight_leaves()):
            if a is b:
                continue
            if a is None or b is None or not (_is_concrete(a) and _is_concrete(b)):
                return False
            if a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b)):
                return False
    return True


@jax.tree_util.register_pytree_node_class
class MultiBudget(_Groups):
    """``q`` budgets ``C_j(alpha) = B_j`` on the same logits: general or one per block.

    Two kinds, accepted by every function that takes a constraint:

    * ``MultiBudget([c_1, ..., c_q])``: ``q`` :class:`BudgetConstraint` s over the
      same groups (same ``N``, ``K`` and pytree structure), e.g. average bits
      *and* a latency table. Their normals are coupled; the projection solves a
      ``q x q`` Gram system and the retraction a ``q``-dimensional Newton
      iteration. Equality budgets only (``inequality=True`` is supported per
      block, see below).
    * ``MultiBudget.per_block(costs, budgets, blocks)``: every group belongs to
      exactly one of ``q`` budgets ("prune exactly r experts in every layer").
      The problem separates into ``q`` independent scalar problems, solved
      vectorised in ``O(NK)`` per evaluation.

    The retraction shifts logits along the cost tables,
    ``R(alpha) = alpha + sum_j t_j c^(j)``, with ``t`` the minimiser of the
    convex dual ``F(t) = sum_i w_i logsumexp(alpha_i + sum_j t_j c^(j)_i) - <t, B>``.
    The group weights ``w`` of the dual are the constraints' common weights;
    when the constraints have different weights, each one's weights are folded
    into its costs (``w_i c_ik`` per group) and ``w = 1``.

    A ``MultiBudget`` is a JAX pytree whose leaves are the cost tables (with a
    leading ``q`` axis for the general kind), the ``(q,)`` budgets, the common
    weights and the block ids, so budgets can be traced and vmapped
    (``mb.replace(budget=...)``). Concrete input is validated: every budget
    within its range, the budgets jointly reachable by the relaxation (a linear
    program) and linearly independent; otherwise ``ValueError`` says which.

    Example::

      >>> import jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, MultiBudget
      >>> bits = jnp.array([2., 4., 8.])
      >>> latency = jnp.array([[1., 1.5, 3.], [2., 2.5, 4.], [1., 2., 2.5]])
      >>> mb = MultiBudget([BudgetConstraint(bits, 12.0, num_groups=3),
      ...                   BudgetConstraint(latency, 6.0)])
      >>> mb.num_budgets, mb.budget.tolist()
      (2, [12.0, 6.0])
    """

    def __init__(self, constraints: Sequence[BudgetConstraint]):
        cons = list(constraints) if not isinstance(constraints, BudgetConstraint) else []
        if not cons or not all(isinstance(c, BudgetConstraint) for c in cons):
            raise TypeError(
                "MultiBudget: pass a non-empty list of BudgetConstraint objects "
                "(or use MultiBudget.per_block for one budget per block of groups)."
            )
        first = cons[0]
        treedef = jax.tree.structure(first.costs)
        ks = [c.shape[-1] for c in first.cost_leaves()]
        for j, c in enumerate(cons[1:], 1):
            if (
                c.group_sizes != first.group_sizes
                or jax.tree.structure(c.costs) != treedef
                or [x.shape[-1] for x in c.cost_leaves()] != ks
            ):
                raise ValueError(
                    f"MultiBudget: constraint {j} does not match constraint 0: all budgets must "
                    f"cover the same groups with the same options (group sizes "
                    f"{c.group_sizes} vs {first.group_sizes}, options "
                    f"{[x.shape[-1] for x in c.cost_leaves()]} vs {ks})."
                )
        q = len(cons)
        if q == 1:  # one budget: exactly the BudgetConstraint's geometry
            self.costs, self.weights, self.blocks = first.costs, first.weights, None
            self.budget = first.budget[None]
            self._aux = (first.group_sizes, first.inequality, False, 1, None)
            return
        if any(c.inequality for c in cons):
            raise ValueError(
                "MultiBudget: inequality budgets are supported per block only "
                "(MultiBudget.per_block(..., inequality=True)); general budgets over the same "
                "groups must be equalities. Drop inequality=True, or split the groups into "
                "blocks."
            )
        fold = not _same_weights(cons)
        leaves = []
        for li, n in enumerate(first.group_sizes):
            tables = []
            for c in cons:
                cost, w = c.cost_leaves()[li], c.weight_leaves()[li]
                if fold and w is not None:
                    cost = w[:, None] * jnp.broadcast_to(cost, (n, cost.shape[-1]))
                tables.append(cost)
            if any(t.ndim == 2 for t in tables):
                tables = [jnp.broadcast_to(t, (n, t.shape[-1])) for t in tables]
            dtype = jnp.result_type(*tables)
            leaves.append(jnp.stack([t.astype(dtype) for t in tables]))
        self.costs = jax.tree.unflatten(treedef, leaves)
        self.weights = None if fold else first.weights
        self.blocks = None
        self.budget = jnp.stack([jnp.asarray(c.budget, jnp.result_type(*leaves)) for c in cons])
        self._aux = (first.group_sizes, False, True, q, None)
        if all(_is_concrete(x) for x in jax.tree.leaves(self)):
            _validate_independent(self.host_group_costs())
            _validate_reachable(self)

    @classmethod
    def per_block(
        cls,
        costs: Any,
        budgets: Any,
        blocks: Any,
        weights: Any | None = None,
        *,
        inequality: bool = False,
    ) -> MultiBudget:
        """One budget per block of groups: ``sum_{i in block j} w_i c_{i, a_i} = B_j``.

        Args:
          costs: ``(K,)`` shared or ``(N, K)`` per-group costs.
          budgets: ``(q,)`` budgets, one per block.
          blocks: ``(N,)`` ints in ``[0, q)``: the block (budget) of each group.
          weights: ``(N,)`` positive group weights, or ``None`` for ones.
          inequality: relax every block to ``C_j(alpha) <= B_j``.

        Example ("keep exactly 2 of 4 experts in each of 3 layers")::

          >>> import jax.numpy as jnp
          >>> from rco_jax import MultiBudget
          >>> mb = MultiBudget.per_block(jnp.array([0., 1.]), jnp.full(3, 2.0),
          ...                            jnp.repeat(jnp.arange(3), 4))
          >>> mb.num_budgets, mb.num_groups
          (3, 12)
        """
        c = _as_float(costs)
        budget = _as_float(budgets)
        b = jnp.asarray(blocks)
        if c.ndim not in (1, 2) or c.shape[-1] < 1:
            raise ValueError(f"MultiBudget.per_block: costs must be (K,) or (N, K); got {c.shape}.")
        if budget.ndim != 1 or budget.shape[0] < 1:
            raise ValueError(
                f"MultiBudget.per_block: budgets must be a (q,) vector; got shape {budget.shape}."
            )
        if b.ndim != 1 or not jnp.issubdtype(b.dtype, jnp.integer):
            raise ValueError(
                "MultiBudget.per_block: blocks must be an (N,) integer array giving each group's "
                f"block; got shape {b.shape} and dtype {b.dtype}."
            )
        n = b.shape[0]
        sizes = {"blocks (N,)": n}
        if c.ndim == 2:
            sizes["costs (N, K)"] = c.shape[0]
        if weights is not None:
            weights = _as_float(weights)
            if weights.ndim != 1:
                raise ValueError(
                    f"MultiBudget.per_block: weights must have shape (N,); got {weights.shape}."
                )
            sizes["weights (N,)"] = weights.shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(f"MultiBudget.per_block: mismatched shapes: {sizes}.")
        obj = object.__new__(cls)
        obj.costs, obj.budget, obj.weights = c, budget, weights
        obj.blocks = b.astype(jnp.int32)
        obj._aux = ((n,), bool(inequality), False, int(budget.shape[0]), None)
        if all(_is_concrete(x) for x in jax.tree.leaves(obj)):
            obj._validate_blocks()
        return obj

    @classmethod
    def columns(cls, capacities: Any, num_rows: int) -> MultiBudget:
        """Column budgets on ``(N, K)`` row-softmaxes: column ``k`` sums to ``capacities[k]``.

        Costs ``c^(j)_ik = [k == j]`` with budgets ``B_j = capacities[j]`` for the
        first ``K - 1`` columns; the last column's sum follows, since every row
        sums to one (the ``K``-th budget would be linearly dependent). The
        retraction is the entropic (KL) projection of ``exp(alpha)`` onto the
        matrices with unit row sums and these column sums: the Birkhoff polytope
        for ``N = K`` and unit capacities.

        Args:
          capacities: ``(K,)`` positive, summing to ``N``; may be traced.
          num_rows: ``N``.
        """
        cap = _as_float(capacities)
        if cap.ndim != 1 or cap.shape[0] < 2:
            raise ValueError(
                f"MultiBudget.columns: capacities must be a (K,) vector with K >= 2; got shape "
                f"{cap.shape}."
            )
        k = cap.shape[0]
        if _is_concrete(cap):
            c = np.asarray(cap, np.float64)
            if (
                not np.all(np.isfinite(c))
                or np.any(c <= 0)
                or abs(c.sum() - num_rows) > 1e-6 * max(num_rows, 1)
            ):
                raise ValueError(
                    f"MultiBudget.columns: capacities must be positive and sum to the number of "
                    f"rows N={num_rows} (every row is a probability vector); got {c.tolist()} "
                    f"(sum {c.sum():.6g}). E.g. pass N / K for every column."
                )
        costs = jnp.eye(k, dtype=cap.dtype)[: k - 1]
        return cls.tree_unflatten(
            ((int(num_rows),), False, True, k - 1, "columns"), (costs, cap[: k - 1], None, None)
        )

    # --- pytree protocol -------------------------------------------------------
    def tree_flatten(self):
        return (self.costs, self.budget, self.weights, self.blocks), self._aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.costs, obj.budget, obj.weights, obj.blocks = children
        obj._aux = aux
        return obj

    def replace(self, **fields: Any) -> MultiBudget:
        """A copy with ``costs``, ``budget``, ``weights`` or ``blocks`` replaced, unvalidated."""
        names = ("costs", "budget", "weights", "blocks")
        unknown = set(fields) - set(names)
        if unknown:
            raise TypeError(f"MultiBudget.replace: unknown fields {sorted(unknown)}.")
        children = tuple(fields.get(k, getattr(self, k)) for k in names)
        return MultiBudget.tree_unflatten(self._aux, children)

    def __repr__(self) -> str:
        kind = "coupled" if self.coupled else ("per_block" if self.blocks is not None else "single")
        return (
            f"MultiBudget({kind}, num_budgets={self.num_budgets}, num_groups={self.num_groups}, "
            f"num_options={self.num_options}, budget={self.budget!r}"
            f"{', inequality=True' if self.inequality else ''})"
        )

    # --- structure ---------------------------------------------------------------
    @property
    def group_sizes(self) -> tuple[int, ...]:
        return self._aux[0]

    @property
    def inequality(self) -> bool:
        return self._aux[1]

    @property
    def coupled(self) -> bool:
        """Whether the budgets share groups (a ``q x q`` system) rather than separate."""
        return self._aux[2]

    @property
    def num_budgets(self) -> int:
        """``q``."""
        return self._aux[3]

    @property
    def structure(self) -> str | None:
        """``"columns"`` for :meth:`columns` (indicator cost tables: faster moments)."""
        return self._aux[4]

    @property
    def budgets(self) -> jax.Array:
        return self.budget

    def block_leaves(self) -> list[jax.Array | None]:
        return [self.blocks] if self.blocks is not None else [None] * len(self.group_sizes)

    def _dense(self, xp, costs, weights, blocks, n, k):
        """Real costs ``(q, n, K)`` of one leaf: ``w_i c^(j)_ik`` (zero outside block j)."""
        if self.coupled:
            c = xp.broadcast_to(
                costs if costs.ndim == 3 else costs[:, None, :], (self.num_budgets, n, k)
            )
        else:
            c = xp.broadcast_to(costs, (n, k))[None]
            if blocks is not None:
                mask = xp.arange(self.num_budgets)[:, None] == blocks[None, :]
                c = xp.where(mask[:, :, None], c, 0.0)
        return c if weights is None else c * weights[None, :, None]

    def group_costs(self) -> list[jax.Array]:
        """Discrete costs ``(q, n_j, K)`` per leaf: budget ``j``'s cost of each option."""
        return [
            self._dense(jnp, c, w, b, n, c.shape[-1])
            for c, w, b, n in zip(
                self.cost_leaves(), self.weight_leaves(), self.block_leaves(), self.group_sizes
            )
        ]

    def host_group_costs(self) -> list[np.ndarray]:
        """:meth:`group_costs` as float64 NumPy (concrete costs, weights and blocks only)."""
        out = []
        for c, w, b, n in zip(
            self.cost_leaves(), self.weight_leaves(), self.block_leaves(), self.group_sizes
        ):
            if not all(_is_concrete(x) for x in (c, w, b) if x is not None):
                raise TypeError(
                    "MultiBudget: the discrete side needs concrete costs, weights and blocks; "
                    "close over the constraint instead of passing it through jit/vmap as a "
                    "traced argument. Only the budgets may be traced."
                )
            as64 = lambda x: None if x is None else np.asarray(x, np.float64)
            out.append(
                self._dense(
                    np, as64(c), as64(w), None if b is None else np.asarray(b), n, c.shape[-1]
                )
            )
        return out

    def budget_ranges(self) -> tuple[jax.Array, jax.Array]:
        """Per-budget ``(min, max)`` achievable totals, each ``(q,)``."""
        q = self.num_budgets
        out = []
        for reduce in (jnp.min, jnp.max):
            total = jnp.zeros((q,), self.budget.dtype)
            for c, w, b, n in zip(
                self.cost_leaves(), self.weight_leaves(), self.block_leaves(), self.group_sizes
            ):
                per_group = reduce(c, axis=-1)
                per_group = jnp.broadcast_to(
                    per_group if per_group.ndim == 2 or not self.coupled else per_group[:, None],
                    (q, n) if self.coupled else (n,),
                )
                if w is not None:
                    per_group = per_group * w
                if self.coupled:
                    total = total + jnp.sum(per_group, -1)
                elif b is None:
                    total = total + jnp.sum(per_group)
                else:
                    total = total + jax.ops.segment_sum(per_group, b, q)
            out.append(total)
        return out[0], out[1]

    # --- validation ----------------------------------------------------------------
    def _validate_blocks(self) -> None:
        c = np.asarray(self.costs, np.float64)
        w = None if self.weights is None else np.asarray(self.weights, np.float64)
        blocks = np.asarray(self.blocks)
        budgets = np.asarray(self.budget, np.float64)
        q, n = self.num_budgets, blocks.shape[0]
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("MultiBudget.per_block: costs must be finite and non-negative.")
        if w is not None and (not np.all(np.isfinite(w)) or np.any(w <= 0)):
            raise ValueError("MultiBudget.per_block: weights must be finite and strictly positive.")
        if n and (blocks.min() < 0 or blocks.max() >= q):
            raise ValueError(
                f"MultiBudget.per_block: blocks must lie in [0, {q}) (one id per budget); got ids "
                f"from {blocks.min()} to {blocks.max()}."
            )
        empty = np.setdiff1d(np.arange(q), blocks)
        if empty.size:
            raise ValueError(
                f"MultiBudget.per_block: blocks {empty[:8].tolist()} have no groups; every budget "
                "needs at least one group (drop those budgets)."
            )
        span = np.broadcast_to(np.ptp(c, axis=-1), (n,)) * (1.0 if w is None else w)
        flat = np.flatnonzero(np.bincount(blocks, weights=span > 0, minlength=q) == 0)
        if flat.size:
            raise ValueError(
                f"MultiBudget.per_block: in blocks {flat[:8].tolist()} every option costs the "
                "same, so their budgets are degenerate; give each block at least one group with "
                "options of different cost."
            )
        lo, hi = (np.asarray(x, np.float64) for x in self.budget_ranges())
        bad = ~np.isfinite(budgets) | ~(lo < budgets) | (~(budgets < hi) & (not self.inequality))
        if np.any(bad):
            j = int(np.flatnonzero(bad)[0])
            rule = (
                f"above the minimum {lo[j]:.6g}"
                if self.inequality
                else f"strictly between {lo[j]:.6g} and {hi[j]:.6g}"
            )
            raise ValueError(
                f"MultiBudget.per_block: budget {budgets[j]:.6g} of block {j} (of "
                f"{int(np.sum(bad))} unreachable) must be {rule}: the block's minimum and maximum "
                "total cost (softmax probabilities never reach a vertex)."
            )


def _validate_independent(tables: list[np.ndarray]) -> None:
    """Raises ``ValueError`` if the ``q`` budgets are linearly dependent.

    ``tables`` are the real costs ``(q, n, K)`` per leaf. Dependent: some
    combination ``sum_j a_j w c^(j)`` is the same for every option of every group,
    so ``sum_j a_j C_j`` is constant and the Gram matrix is singular.
    """
    q = tables[0].shape[0]
    diffs = np.concatenate([(t - t[..., :1]).reshape(q, -1) for t in tables], axis=1)
    d = diffs / np.maximum(np.abs(diffs).max(axis=1, keepdims=True), 1e-300)
    evals, evecs = np.linalg.eigh(d @ d.T)
    if evals[0] <= 1e-10 * max(evals[-1], 1e-300):
        combo = evecs[:, 0]
        idx = np.flatnonzero(np.abs(combo) > 1e-6 * np.abs(combo).max())
        raise ValueError(
            f"MultiBudget: budgets {idx.tolist()} are linearly dependent: a combination of their "
            "cost tables is the same for every option of every group, so that combination of "
            "expected costs is constant (e.g. two identical budgets, or column budgets that sum "
            "to the row count). Drop one of them."
        )


def _validate_reachable(mb: MultiBudget) -> None:
    """Raises ``ValueError`` unless the relaxation can meet every budget at once.

    The budgets are jointly reachable exactly when the retraction's convex dual
    ``F(t) = sum_i w_i logsumexp(sum_j t_j c^(j)_i) - <t, B>`` has a minimum, so the
    retraction of the uniform logits is run: it converges iff they are. When it
    does not, the budgets it cannot meet are named.
    """
    from rco_jax.manifold import retract_with_info  # the solver answers for its problem

    dtype = jnp.result_type(*mb.cost_leaves())
    zeros = [jnp.zeros((n, c.shape[-1]), dtype) for n, c in zip(mb.group_sizes, mb.cost_leaves())]
    tol = 1e-5 if jnp.finfo(dtype).bits < 64 else 1e-10
    _, info = retract_with_info(
        jax.tree.unflatten(jax.tree.structure(mb.costs), zeros), mb, rtol=tol, max_evals=256
    )
    if bool(info.converged):
        return
    lo, hi = (np.asarray(x, np.float64) for x in mb.budget_ranges())
    gap = np.abs(np.asarray(info.residual, np.float64)) / np.maximum(np.abs(lo), np.abs(hi))
    idx = np.flatnonzero(gap > tol)
    reached = np.asarray(info.residual, np.float64) + np.asarray(mb.budget, np.float64)
    raise ValueError(
        f"MultiBudget: the budgets are not jointly reachable by the relaxation: budgets "
        f"{idx.tolist()} conflict (each is within its own range, but no mix of options with "
        f"every probability positive meets them all; the closest expected costs found are "
        f"{np.array2string(reached[idx], precision=6)} for budgets "
        f"{np.array2string(np.asarray(mb.budget)[idx], precision=6)}). Loosen or tighten them."
    )


Constraint = BudgetConstraint | MultiBudget
"""Anything the geometry, the transforms and the discrete side accept."""
