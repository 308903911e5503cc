"""Geometry of the budget manifold ``M = {alpha : C_j(alpha) = B_j, j = 1..q}``.

With ``p_i = softmax(alpha_i)`` and ``mu^(j)_i = sum_k p_ik c^(j)_ik`` the expected
costs are ``C_j(alpha) = sum_i w_i mu^(j)_i``. Everything here is closed form and
``O(q NK)`` per pass:

* normals (the Euclidean gradients of the ``C_j``)::

      n^(j)_ik = w_i p_ik (c^(j)_ik - mu^(j)_i)

* tangent projection: ``P(v) = v - N G^{-1} N^T v`` with ``G = [<n_j, n_l>]`` the
  ``q x q`` Gram matrix (``q = 1``: ``v - (<v, n> / <n, n>) n``);
* retraction: ``R(alpha) = alpha + sum_j t_j c^(j)``. The shift ``t*`` minimises
  the convex dual ``F(t) = sum_i w_i logsumexp(alpha_i + sum_j t_j c^(j)_i) - <t, B>``,
  whose gradient is ``C(t) - B`` and whose Hessian is the weighted covariance
  Gram ``H_jl = sum_i w_i Cov_{p_i(t)}(c^(j)_i, c^(l)_i)``;
* the retraction is differentiable (``jax.grad``/``jax.jvp``) by the implicit
  function theorem, ``dt*/dalpha = -H^{-1} N^T``: no unrolled iterations are stored.

One solver per structure of ``H`` (the root finder is the *solver*, this module's
normals and Gram matrices the *geometry*):

* separable budgets (a :class:`~rco_jax.BudgetConstraint`, or
  ``MultiBudget.per_block``: each group in exactly one budget) have a diagonal
  ``H``: ``q`` independent scalar problems, solved together by a safeguarded
  Halley/Newton iteration with a bracketing fallback (closed-form cumulants:
  ``dC/dt`` = weighted variance, ``d2C/dt2`` = weighted third central moment);
* coupled budgets (``MultiBudget([c1, ..., cq])``) take damped
  (Levenberg-Marquardt) Newton steps on the dual with a backtracking line search
  on the scaled residual norm: global convergence, quadratic near the root.

For an inequality budget (``C_j(alpha) <= B_j``, single or per block) the
retraction is the identity inside the set and the same shift onto its boundary
outside; :func:`project_descent` projects a gradient only on the budgets where
the point is on the boundary and the step would leave the set.

Every function accepts logits as one ``(N, K)`` array or as a pytree of
``(n_j, K_j)`` arrays matching the constraint's cost leaves. For a
``BudgetConstraint`` the budget quantities are scalars, for a ``MultiBudget``
``(q,)`` vectors (normals get a leading ``q`` axis).

Reference: Helcig & Alistarh, "Model Compression with Exact Budget Constraints
via Riemannian Manifolds", 2026 (arXiv 2605.00649), Section 3 and appendix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax.constraint import BudgetConstraint, Constraint

PyTree = Any

__all__ = [
    "RetractionInfo",
    "budget_normal",
    "expected_cost",
    "init_logits",
    "project_descent",
    "project_tangent",
    "retract",
    "retract_update",
    "retract_update_with_stats",
    "retract_with_info",
    "softmax_stats",
    "SoftmaxStats",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the geometry is evaluated in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


# --- the constraint as the geometry sees it ------------------------------------------


class _Leaf(NamedTuple):
    """One logits leaf with its cost tables, in the compute dtype.

    ``c`` has a leading *table* axis ``T`` and a group axis that is ``1`` for
    shared costs: ``(T, n | 1, K)``. Coupled budgets have ``T = q`` tables that
    all act on every group; separable ones a single table (``T = 1``) whose
    group ``i`` counts towards budget ``b[i]`` (all budget 0 when ``b`` is None).
    ``columns``: the tables are indicators ``c^(j)_k = [k == j]`` (column budgets),
    whose moments need no ``(T, n, K)`` intermediates.
    """

    x: jax.Array | None
    c: jax.Array
    w: jax.Array | None
    b: jax.Array | None
    columns: bool = False


def _templates(constraint: Constraint, dtype: Any) -> list[_Leaf]:
    """The constraint's leaves (without logits) in the compute dtype."""
    out = []
    for c, w, b in zip(
        constraint.cost_leaves(), constraint.weight_leaves(), constraint.block_leaves()
    ):
        c = c.astype(dtype)
        if not constraint.coupled:
            c = c[None]
        if c.ndim == 2:  # shared (T, K)
            c = c[:, None, :]
        w = None if w is None else w.astype(dtype)
        out.append(_Leaf(None, c, w, b, constraint.structure == "columns"))
    return out


def _geometry(
    logits: PyTree, constraint: Constraint
) -> tuple[list[_Leaf], list[jax.Array], jnp.dtype]:
    """The logits leaves (as given) and the geometry's leaves in compute dtype."""
    leaves = constraint.check_logits(logits)
    dtype = compute_dtype(jnp.result_type(*leaves))
    geo = _with_points(_templates(constraint, dtype), [x.astype(dtype) for x in leaves])
    return geo, leaves, dtype


def _with_points(geo: list[_Leaf], xs: list[jax.Array]) -> list[_Leaf]:
    return [g._replace(x=x) for g, x in zip(geo, xs)]


def _products_sum() -> bool:
    """Whether sums over the options axis are ones-vector products (XLA:CPU, see
    :func:`_row_sum`); elsewhere they are plain reductions."""
    return jax.default_backend() == "cpu"


def _row_sum(a: jax.Array, keepdims: bool = False) -> jax.Array:
    """Sum over the options (last) axis.

    XLA:CPU reduces short minor axes (a few options per row) several times slower
    than it computes a matrix-vector product with a ones vector, so on CPU the sum
    is that product (exact float32 accumulation); elsewhere a plain reduction.
    """
    if _products_sum() and jnp.issubdtype(a.dtype, jnp.floating):
        out = jnp.matmul(a, jnp.ones(a.shape[-1], a.dtype), precision=_HIGHEST)
    else:
        out = jnp.sum(a, -1)
    return out[..., None] if keepdims else out


def total(a: jax.Array) -> jax.Array:
    """The sum of all entries of ``a``; on CPU row sums first (:func:`_row_sum`)."""
    return jnp.sum(_row_sum(a)) if a.ndim >= 2 and _products_sum() else jnp.sum(a)


@jax.custom_batching.custom_vmap
def fast_path_ok(pred: jax.Array) -> jax.Array:
    """``pred`` for a ``lax.cond`` between a fast and an always-valid path.

    Under ``vmap`` it is ``all(pred)`` over the batch and not batched, so the
    conditional stays a branch (a batched predicate would turn it into a select
    that computes both paths): the fast path runs when every member may take it.
    """
    return pred


@fast_path_ok.def_vmap
def _fast_path_ok_vmap(axis_size, in_batched, pred):
    del axis_size
    return (jnp.all(pred) if in_batched[0] else pred), False


def _softmax(x: jax.Array) -> jax.Array:
    """Row softmax over the options axis (see :func:`_row_sum`)."""
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return e / _row_sum(e, keepdims=True)


def _per_budget(a: jax.Array, leaf: _Leaf, q: int) -> jax.Array:
    """Sums per-table, per-group values ``(T, n)`` into the ``(q,)`` budgets."""
    if leaf.b is None:
        return jnp.sum(a, -1)
    return jax.ops.segment_sum(a[0], leaf.b, q)


def _sum_rows(a: jax.Array, leaf: _Leaf, q: int) -> jax.Array:
    """Sums per-table ``(T, n, K)`` values into the ``(q,)`` budgets.

    Rows first (:func:`_row_sum`), then groups: XLA:CPU reduces a whole ``(n, K)``
    array about 3x slower than it forms the row sums as a product and adds those.
    """
    if leaf.b is None:
        return jnp.sum(_row_sum(a), -1)
    return jax.ops.segment_sum(_row_sum(a[0]), leaf.b, q)


def _combine(coef: jax.Array, arrays: jax.Array, leaf: _Leaf) -> jax.Array:
    """``sum_j coef_j A^(j)`` for per-table arrays ``(T, n | 1, K)`` -> ``(n | 1, K)``."""
    if arrays.shape[0] > 1:  # coupled: every budget acts on every group
        return jnp.tensordot(coef, arrays, axes=1, precision=_HIGHEST)
    if leaf.b is None:
        return coef[0] * arrays[0]
    return coef[leaf.b][:, None] * arrays[0]


def _shifted(leaf: _Leaf, t: jax.Array) -> jax.Array:
    """The logits ``alpha + sum_j t_j c^(j)`` of one leaf."""
    return leaf.x + _combine(t, leaf.c, leaf)


class _Moments(NamedTuple):
    p: jax.Array  # (n, K) probabilities
    mu: jax.Array  # (T, n) expected cost per table and group
    dev: jax.Array  # (T, n, K) c_ik - mu_i


def _softmax_lse(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row softmax and log-sum-exp from one ``exp`` pass.

    ``p`` is formed from ``x - max``, never from ``x - lse``: with large logits the
    latter loses ``ulp(max)`` of every probability's exponent.
    """
    top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    e = jnp.exp(x - top)
    total = _row_sum(e, keepdims=True)
    return e / total, (top + jnp.log(total))[:, 0]


class SoftmaxStats(NamedTuple):
    """What the geometry needs of a point, from its softmax; kept between optimizer steps.

    See :func:`softmax_stats`. All in the compute dtype.

    Attributes:
      normals: the budget normals ``n^(j)_ik = w_i p_ik (c^(j)_ik - mu^(j)_i)`` per
        leaf, ``(T, n, K)`` with ``T`` the leaf's cost tables (``1`` unless the budgets
        are coupled; :func:`budget_normal` gives them in the public layout).
      cost: the expected costs ``C(logits)``, ``(q,)``.
      lse: the row log-normalizers ``logsumexp(logits_i)``, ``(n,)`` per leaf.
    """

    normals: PyTree
    cost: jax.Array
    lse: PyTree


def softmax_stats(logits: PyTree, constraint: Constraint) -> SoftmaxStats:
    """The budget normals, expected costs and row log-normalizers of ``logits``, from
    one ``exp`` pass.

    :func:`project_tangent`, :func:`project_descent` and
    :func:`retract_update_with_stats` accept them (``stats=``) instead of
    recomputing them; :func:`retract_update_with_stats` returns them for the new
    point, which is how :func:`rco_jax.rco` spends one ``exp`` pass per step (and
    forms every normal once).
    """
    geo, _, _ = _geometry(logits, constraint)
    q = constraint.num_budgets
    p_lse = [_softmax_lse(g.x) for g in geo]
    normals, cost = _normals_and_costs(geo, q, [p for p, _ in p_lse])
    return _stats_tree(logits, normals, cost, [lse for _, lse in p_lse])


def _stats_tree(
    logits: PyTree, normals: list[jax.Array], cost: jax.Array, lse: list[jax.Array]
) -> SoftmaxStats:
    treedef = jax.tree.structure(logits)
    return SoftmaxStats(
        jax.tree.unflatten(treedef, normals), cost, jax.tree.unflatten(treedef, lse)
    )


def _given(stats: SoftmaxStats, geo: list[_Leaf], q: int) -> tuple[list[jax.Array], jax.Array]:
    """The normals and costs held by ``stats``, checked against the geometry."""
    normals = _stats_leaves(stats, len(geo), "normals")
    for n, g in zip(normals, geo):
        want = (g.c.shape[0], *g.x.shape)
        if n.shape != want:
            raise ValueError(
                f"stats.normals has an array of shape {n.shape} where {want} was expected; "
                "pass the softmax_stats of these logits under this constraint."
            )
    cost = jnp.reshape(stats.cost, (q,))
    return [n.astype(g.x.dtype) for n, g in zip(normals, geo)], cost.astype(geo[0].x.dtype)


def _stats_leaves(stats: SoftmaxStats | None, n: int, field: str) -> list[jax.Array | None]:
    if stats is None:
        return [None] * n
    leaves = jax.tree.leaves(getattr(stats, field))
    if len(leaves) != n:
        raise ValueError(f"stats.{field} has {len(leaves)} arrays but the logits have {n}.")
    return leaves


def _moments(leaf: _Leaf, p: jax.Array | None = None) -> _Moments:
    """Softmax statistics (``p`` may be given when already computed)."""
    p = _softmax(leaf.x) if p is None else p
    if leaf.columns:  # mu^(j)_i = p_ij; the deviations are formed only if needed
        return _Moments(p, p[:, : leaf.c.shape[0]].T, None)
    if leaf.c.shape[:2] == (1, 1) and _products_sum():  # one product, no (n, K) temporary
        mu = jnp.matmul(p, leaf.c[0, 0], precision=_HIGHEST)[None]
    else:
        mu = _row_sum(p * leaf.c)
    return _Moments(p, mu, leaf.c - mu[..., None])


def _dev(m: _Moments, leaf: _Leaf) -> jax.Array:
    """``c^(j)_ik - mu^(j)_i``, ``(T, n, K)``."""
    return leaf.c - m.mu[..., None] if m.dev is None else m.dev


def _weighted(a: jax.Array, leaf: _Leaf) -> jax.Array:
    return a if leaf.w is None else a * leaf.w


def _weighted_rows(a: jax.Array, leaf: _Leaf) -> jax.Array:
    """``w_i a_ik`` for per-group rows ``(..., n, K)``."""
    return a if leaf.w is None else leaf.w[:, None] * a


def _costs(geo: list[_Leaf], q: int) -> jax.Array:
    """``C(alpha)``, ``(q,)``."""
    return _cost_of([_moments(g) for g in geo], geo, q)


def _normals_and_costs(
    geo: list[_Leaf], q: int, probs: list[jax.Array | None] | None = None
) -> tuple[list[jax.Array], jax.Array]:
    """Per-table normals ``(T, n, K)`` per leaf and ``C`` ``(q,)``, from one softmax pass
    (none when ``probs`` are given)."""
    probs = [None] * len(geo) if probs is None else probs
    ms = [_moments(g, p) for g, p in zip(geo, probs)]
    return [_normal(m, g) for m, g in zip(ms, geo)], _cost_of(ms, geo, q)


def _normal(m: _Moments, leaf: _Leaf) -> jax.Array:
    """The leaf's budget normals ``w_i p_ik (c^(j)_ik - mu^(j)_i)``, ``(T, n, K)``."""
    return _weighted_rows(m.p * _dev(m, leaf), leaf)


def _inner(vs: list[jax.Array], normals: list[jax.Array], geo: list[_Leaf], q: int) -> jax.Array:
    """``N^T v``: ``<v, n_j>`` for every budget, ``(q,)``."""
    # Elementwise product + sum, not a dot: TPU matmul units default to bf16 passes.
    return sum(_sum_rows(v * n, g, q) for v, n, g in zip(vs, normals, geo))


def _gram(normals: list[jax.Array], geo: list[_Leaf], q: int, coupled: bool) -> jax.Array:
    """``G = [<n_j, n_l>]``: ``(q, q)`` if coupled, else its diagonal ``(q,)``."""
    if coupled:
        return sum(jnp.einsum("tnk,snk->ts", n, n, precision=_HIGHEST) for n in normals)
    return sum(_sum_rows(n * n, g, q) for n, g in zip(normals, geo))


def _cost_of(ms: list[_Moments], geo: list[_Leaf], q: int) -> jax.Array:
    return sum(_per_budget(_weighted(m.mu, g), g, q) for m, g in zip(ms, geo))


def _covariance(ms: list[_Moments], geo: list[_Leaf], q: int, coupled: bool) -> jax.Array:
    """The weighted covariance Gram ``H_jl = sum_i w_i Cov_{p_i}(c^(j)_i, c^(l)_i)``.

    ``(q, q)`` if coupled, else its diagonal ``(q,)``.
    """
    hess = 0.0
    for m, g in zip(ms, geo):
        wp = _weighted_rows(m.p, g)
        if g.columns:  # Cov(1[k=j], 1[k=l]) = p_j [j = l] - p_j p_l
            t = g.c.shape[0]
            pq, wpq = m.p[:, :t], wp[:, :t]
            cov = -jnp.einsum("it,is->ts", wpq, pq, precision=_HIGHEST)
            # The diagonal is sum_i w p (1 - p); for a row's largest entry 1 - p is the sum
            # of the others (it rounds to 0 when p rounds to 1).
            top = jnp.argmax(m.p, axis=-1)[:, None]
            is_top = jnp.arange(m.p.shape[-1])[None, :] == top
            rest = jnp.sum(jnp.where(is_top, 0, m.p), axis=-1, keepdims=True)
            diag = jnp.sum(wpq * jnp.where(is_top[:, :t], rest, 1 - pq), axis=0)
            hess = hess + jnp.where(jnp.eye(t, dtype=bool), jnp.diag(diag), cov)
        elif coupled:  # one (q, nK) x (nK, q) product
            dev = _dev(m, g)
            hess = hess + jnp.einsum("tnk,snk->ts", dev * wp, dev, precision=_HIGHEST)
        else:
            hess = hess + _per_budget(_row_sum(wp * _dev(m, g)[0] ** 2)[None], g, q)
    return hess


def _spd_solve(a: jax.Array, r: jax.Array) -> jax.Array:
    """``a^{-1} r`` for a symmetric positive (semi-)definite ``(q, q)`` matrix.

    Small systems use an unrolled Cholesky factorisation (elementwise ops that
    vectorise under ``vmap``, unlike a batched LAPACK call); a tiny ridge keeps
    semi-definite matrices solvable.
    """
    q = a.shape[-1]
    ridge = 16 * jnp.finfo(a.dtype).eps * jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(a))), 1e-30)
    a = a + ridge * jnp.eye(q, dtype=a.dtype)
    if q > 8:
        return jnp.linalg.solve(a, r)
    low = [[None] * q for _ in range(q)]
    for i in range(q):
        for j in range(i + 1):
            s = a[i, j] - sum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                low[i][i] = jnp.sqrt(jnp.maximum(s, ridge))
            else:
                low[i][j] = s / low[j][j]
    y = []
    for i in range(q):
        y.append((r[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i])
    x = [None] * q
    for i in reversed(range(q)):
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, q))) / low[i][i]
    return jnp.stack(x)


def _solve_budgets(gram: jax.Array, r: jax.Array, coupled: bool) -> jax.Array:
    """``G^{-1} r`` (``G`` full if coupled, else diagonal); zero where ``G`` vanishes."""
    if coupled:
        x = _spd_solve(gram, r)
        # One step of iterative refinement removes the bias of the solver's tiny ridge.
        return x + _spd_solve(gram, r - jnp.matmul(gram, x, precision=_HIGHEST))
    return jnp.where(gram > 0, r / jnp.where(gram > 0, gram, 1), 0)


# --- public geometry ---------------------------------------------------------------


def _squeeze(value: jax.Array, constraint: Constraint) -> jax.Array:
    """Budget-space values: scalar for a ``BudgetConstraint``, ``(q,)`` for a ``MultiBudget``."""
    return value[0] if isinstance(constraint, BudgetConstraint) else value


def expected_cost(logits: PyTree, constraint: Constraint) -> jax.Array:
    """Expected cost ``C(alpha) = sum_i w_i sum_k softmax(alpha_i)_k c_ik``.

    A scalar for a :class:`~rco_jax.BudgetConstraint`, ``(q,)`` for a
    :class:`~rco_jax.MultiBudget`.

    Example::

      >>> import jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, expected_cost
      >>> c = BudgetConstraint(jnp.array([0., 1.]), budget=1.0, num_groups=3)
      >>> float(expected_cost(jnp.zeros((3, 2)), c))
      1.5
    """
    geo, _, _ = _geometry(logits, constraint)
    return _squeeze(_costs(geo, constraint.num_budgets), constraint)


def budget_normal(logits: PyTree, constraint: Constraint) -> PyTree:
    """Closed-form normals ``n^(j)_ik = w_i p_ik (c^(j)_ik - mu^(j)_i)`` (``= grad C_j``).

    For a ``BudgetConstraint`` the normal has the logits' structure; for a
    ``MultiBudget`` every leaf gets a leading ``q`` axis (the ``q`` normals;
    per-block normals are zero outside their block).
    """
    geo, leaves, _ = _geometry(logits, constraint)
    normals, _ = _normals_and_costs(geo, constraint.num_budgets)
    out = []
    for n, g, x in zip(normals, geo, leaves):
        if isinstance(constraint, BudgetConstraint):
            n = n[0]
        elif g.b is not None:
            mask = jnp.arange(constraint.num_budgets)[:, None] == g.b[None, :]
            n = jnp.where(mask[:, :, None], n, 0)
        out.append(n.astype(x.dtype))
    return jax.tree.unflatten(jax.tree.structure(logits), out)


def _vector_leaves(vectors: PyTree, xs: list[jax.Array]):
    v_leaves, v_def = jax.tree.flatten(vectors)
    if len(v_leaves) != len(xs):
        raise ValueError(
            f"vectors have {len(v_leaves)} arrays but logits have {len(xs)}; "
            "they must share the logits' structure."
        )
    return v_leaves, v_def


def _project(vectors, logits, constraint: Constraint, mask=None, stats=None):
    """Projects ``vectors`` off the normals (of the budgets in ``mask``, default all)."""
    geo, _, dtype = _geometry(logits, constraint)
    v_leaves, v_def = _vector_leaves(vectors, [g.x for g in geo])
    vs = [v.astype(dtype) for v in v_leaves]
    q = constraint.num_budgets
    normals, cost = _normals_and_costs(geo, q) if stats is None else _given(stats, geo, q)
    vn = _inner(vs, normals, geo, q)
    gram = _gram(normals, geo, q, constraint.coupled)
    coef = _solve_budgets(
        gram, vn if mask is None else jnp.where(mask(cost, vn), vn, 0), constraint.coupled
    )
    out = [
        (v - _combine(coef, n, g)).astype(v0.dtype)
        for v, n, g, v0 in zip(vs, normals, geo, v_leaves)
    ]
    return jax.tree.unflatten(v_def, out)


def project_tangent(
    vectors: PyTree, logits: PyTree, constraint: Constraint, *, stats: SoftmaxStats | None = None
) -> PyTree:
    """Orthogonal projection onto the tangent space at ``logits``.

    ``P(v) = v - N G^{-1} N^T v`` with ``N`` the budget normals and ``G`` their
    Gram matrix (for one budget ``v - (<v, n> / <n, n>) n``). It is the
    Riemannian gradient when ``v`` is a Euclidean gradient, and the vector
    transport of ``v`` when ``v`` is tangent at another point. ``stats``:
    :func:`softmax_stats` of ``logits`` when already known (saves the softmax).
    """
    return _project(vectors, logits, constraint, stats=stats)


def _boundary_tol(constraint: Constraint, dtype: Any) -> jax.Array:
    """Points with ``C_j >= B_j - tol_j`` are on the boundary (retractions land within 4 ulps)."""
    return 64 * jnp.finfo(dtype).eps * constraint.budget_ranges()[1].astype(dtype)


def project_descent(
    vectors: PyTree, logits: PyTree, constraint: Constraint, *, stats: SoftmaxStats | None = None
) -> PyTree:
    """Projects a gradient-like ``v`` (the step is ``-v``) so the step keeps the budgets.

    For equality budgets this is :func:`project_tangent`. For inequality
    budgets (``C_j <= B_j``, single or per block) ``v`` is projected off the
    normal of budget ``j`` only where the point is on its boundary
    (``C_j >= B_j - tol``) and the step ``-v`` points out of the feasible set
    (``<v, n_j> < 0``): the projection onto the tangent cone (exact for
    per-block budgets, whose normals are orthogonal). ``stats`` as in
    :func:`project_tangent`.
    """
    if not constraint.inequality:
        return project_tangent(vectors, logits, constraint, stats=stats)
    geo_dtype = compute_dtype(jnp.result_type(*constraint.check_logits(logits)))
    budgets = constraint.budgets.astype(geo_dtype)
    tol = _boundary_tol(constraint, geo_dtype)

    def active(cost, vn):
        return (cost >= budgets - tol) & (vn < 0)

    return _project(vectors, logits, constraint, mask=active, stats=stats)


# --- the retraction: the solver ------------------------------------------------------


class RetractionInfo(NamedTuple):
    """Diagnostics of one retraction.

    Attributes:
      shift: the shift ``t*`` along the costs (scalar for a ``BudgetConstraint``,
        ``(q,)`` for a ``MultiBudget``).
      residual: ``C(R(alpha)) - B`` at the returned point (same shape).
      num_evals: evaluations used (one softmax pass over the logits each).
      converged: whether every ``|residual_j| <= tol_j``; ``False`` when a budget
        is unreachable (then the logits are returned unchanged).
    """

    shift: jax.Array
    residual: jax.Array
    num_evals: jax.Array
    converged: jax.Array


# Above this logit shift |t| * (max c - min c) the cached-exponential evaluation could
# underflow (its normalizer is >= exp(-|t| span)); the direct softmax takes over.
_FAST_SHIFT_LIMIT = 60.0


# A row-shift hint is used only when no row of exp(x - shift) sums below this: the
# largest entry of every row is then a normal float even after the cached
# evaluation's factor exp(-_FAST_SHIFT_LIMIT).
_HINT_MIN_ROW_SUM = 2.0**-20
# ... and none above this, which bounds every entry (no maximum is subtracted: XLA:CPU reduces
# a whole (n, K) array slowly). A step that raises a row's log-normalizer by more than
# log(256) ~ 5.5 takes the exact path.
_HINT_MAX_ROW_SUM = 2.0**8


class _Base(NamedTuple):
    """``e = exp(y - s)`` of a base point ``y`` with a per-row shift ``s`` ``(n,)``.

    Usable (``ok``) when every row of ``e`` sums to a value in
    ``[_HINT_MIN_ROW_SUM, _HINT_MAX_ROW_SUM]`` (its largest entry is 1 for the exact
    shift, the row maximum); the shift cancels in every softmax statistic. Where ``ok``
    is false, whoever needs the exponentials recomputes them with the exact shift
    (:func:`_exact_base`): the same numbers as an exact base, without passing a large
    array through a conditional.
    """

    e: jax.Array
    shift: jax.Array
    ok: jax.Array | bool = True


def _exact_base(x: jax.Array) -> _Base:
    """One ``exp`` pass over ``x``, shifted by the row maxima."""
    top = jax.lax.stop_gradient(jnp.max(x, -1))
    return _Base(jnp.exp(x - top[:, None]), top)


def _hinted_base(x: jax.Array, hint: jax.Array) -> _Base:
    """One ``exp`` pass over ``x``, shifted by approximate row log-normalizers ``hint``.

    E.g. those of the previous iterate, when ``x`` is that point plus a small step.
    This avoids the row maximum, which XLA:CPU computes slowly. The base is usable
    only when :func:`_sums_ok` accepts its row sums (a large step or a stale hint can
    make them too small or too large); :func:`_shift_leaves` checks that.
    """
    hint = hint.astype(x.dtype)
    return _Base(jnp.exp(x - hint[:, None]), hint)


def _sums_ok(sums: jax.Array) -> jax.Array:
    """Whether hinted row sums are in range (false for NaN and inf too)."""
    return (jnp.min(sums) >= _HINT_MIN_ROW_SUM) & (jnp.max(sums) <= _HINT_MAX_ROW_SUM)


class _Sums(NamedTuple):
    """The fast leaves' row sums ``e @ g(t)`` and row means of the centred costs at an
    evaluated shift (see :func:`_stats_at`).

    One array each for all fast leaves (concatenated in leaf order), so a root finder
    carries and selects them however many leaves there are. ``valid[j]`` is false when
    fast leaf ``j``'s evaluation took the direct softmax (a large shift).
    """

    s0: jax.Array  # (sum of the fast leaves' n,)
    m1: jax.Array  # (sum of the fast leaves' n,)
    valid: jax.Array  # (number of fast leaves,)


def _fast(g: _Leaf, coupled: bool) -> bool:
    """Whether a leaf takes the cached-exponential evaluation (one budget, shared costs)."""
    return not coupled and g.b is None and g.c.shape[1] == 1


def _centred_costs(g: _Leaf) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shared costs ``c`` as ``(c - mid, mid, span)``."""
    c = g.c[0, 0]
    hi, lo = jnp.max(c), jnp.min(c)
    return c - 0.5 * (hi + lo), 0.5 * (hi + lo), hi - lo


def _tilt(t: jax.Array, cc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``g(t) = exp(t cc - top)`` and ``top = max_k t cc_k``: the factor that moves a fast
    leaf's base exponentials to ``y + t c`` (the evaluator and :func:`_stats_at` share it,
    so the row sums of one are the normalizers of the other)."""
    a = t[0] * cc
    top = jnp.max(a)
    return jnp.exp(a - top), top


def _bases(geo: list[_Leaf], coupled: bool) -> list[_Base | None]:
    """The exponentials of every fast leaf's base point (``None`` for the others)."""
    return [_exact_base(g.x) if _fast(g, coupled) else None for g in geo]


def _stats_at(
    geo: list[_Leaf], bases: list[_Base | None], t: jax.Array, sums: _Sums | None
) -> list[tuple[jax.Array, jax.Array]]:
    """Budget normals and log-normalizers at ``alpha + t c`` per leaf.

    For a fast leaf from its base exponentials and the root finder's row sums and
    means at ``t`` (no ``exp`` over ``N K`` entries, no further pass to sum them):
    ``softmax(y + t c) = e g(t) / s0`` with ``g(t) = exp(t (c - mid) - top)`` and
    ``s0 = e @ g(t)``, and ``c - mu = (c - mid) - m1``, so the normal is
    ``(w / s0) e g(t) ((c - mid) - m1)``, one pass that writes nothing else.
    """
    out, start, j = [], 0, 0
    for g, base in zip(geo, bases):

        def direct(t, s0, m1, g=g):
            moved = g._replace(x=_shifted(g, t))
            p, lse = _softmax_lse(moved.x)
            return _normal(_moments(moved, p), moved), lse

        if base is None:
            out.append(direct(t, None, None))
            continue
        cc, mid, _ = _centred_costs(g)
        n = base.e.shape[0]
        s0, m1, valid = sums.s0[start : start + n], sums.m1[start : start + n], sums.valid[j]
        start, j = start + n, j + 1

        def cached(t, s0, m1, base=base, cc=cc, mid=mid, w=g.w):
            gk, top = _tilt(t, cc)
            scale = 1 / s0 if w is None else w.astype(s0.dtype) / s0
            normal = base.e * (gk * (cc - m1[:, None])) * scale[:, None]
            return normal[None], base.shift + top + t[0] * mid + jnp.log(s0)

        exact = lambda t, s0, m1, x=g.x, cached=cached: cached(t, s0, m1, _exact_base(x))
        out.append(_pick(fast_path_ok(valid), base.ok, cached, exact, direct, t, s0, m1))
    return out


def _pick(small: jax.Array, usable: jax.Array | bool, cached, exact, direct, *args):
    """The cached form on ``e`` when usable, on recomputed exact exponentials when not
    (both only for small shifts), else the direct softmax; one branch runs."""
    if usable is True:  # an exact base: no fallback to compile
        return jax.lax.cond(small, cached, direct, *args)
    fallback = lambda *args: jax.lax.cond(small, exact, direct, *args)
    return jax.lax.cond(small & usable, cached, fallback, *args)


def _separable_evaluator(
    geo: list[_Leaf], q: int, bases: list[_Base | None] | None = None
) -> Callable:
    """``t -> (C, dC/dt, d2C/dt2, sums)`` at ``alpha + t c`` (separable budgets).

    The first three are ``(q,)``; ``sums`` are the fast leaves' :class:`_Sums`
    (``None`` without fast leaves), which :func:`_stats_at` turns into the normals.

    ``dC_j/dt_j`` is the weighted variance of the costs of block ``j``'s groups and
    ``d2C_j/dt_j^2`` the weighted third central moment (the derivative of a
    variance along an exponential tilt).

    For a single budget with shared ``(K,)`` costs the exponentials of the base
    point are computed once: ``softmax(y + t c)_ik`` is proportional to
    ``e_ik g_k(t)`` with ``e = exp(y - max_k y)`` and ``g(t) = exp(t c)``, so each
    evaluation is one ``(N, K) @ (K, 4)`` product instead of an ``exp`` over all
    ``N K`` entries. Costs are centred so ``E[c^2] - E[c]^2`` does not cancel.
    ``bases``: those exponentials when already computed (:func:`_bases`).
    """
    if bases is None:
        bases = _bases(geo, coupled=False)
    terms = []
    for g, base in zip(geo, bases):
        if base is None:
            terms.append((g, None))
        else:
            cc, mid, span = _centred_costs(g)
            terms.append((g, (base.e, cc, mid, span, base.ok)))

    def direct(g: _Leaf, t):
        y = _shifted(g, t)
        p = _softmax(y)
        c = g.c[0]
        mu = _row_sum(p * c)
        dev = c - mu[:, None]
        d2 = dev * dev
        stats = jnp.stack([mu, _row_sum(p * d2), _row_sum(p * d2 * dev)], 1)  # (n, 3)
        stats = _weighted(stats.T, g)  # (3, n)
        return tuple(_per_budget(s[None], g, q) for s in stats)

    def cached(e, cc, mid, w, t):
        gk, _ = _tilt(t, cc)
        basis = jnp.stack([gk, gk * cc, gk * cc * cc, gk * cc * cc * cc])
        # (4, n), not (n, 4): XLA:CPU divides strided columns several times slower.
        s = jnp.einsum("jk,nk->jn", basis, e, precision=_HIGHEST)
        m1, m2, m3 = s[1] / s[0], s[2] / s[0], s[3] / s[0]
        var = jnp.maximum(m2 - m1 * m1, 0)
        skew = m3 - 3 * m1 * m2 + 2 * m1 * m1 * m1  # third central moment
        # Summed as one product: XLA:CPU fuses a plain sum with the divisions above
        # into a reduction several times slower.
        ones = jnp.ones_like(m1) if w is None else w.astype(m1.dtype)
        f, df, d2f = jnp.matmul(jnp.stack([m1, var, skew]), ones, precision=_HIGHEST)
        return (f + jnp.sum(ones) * mid)[None], df[None], d2f[None], s[0], m1

    def evaluate(t, at_zero: bool = False):
        """``at_zero``: ``t`` is known to be 0, where the cached form always applies."""
        f = df = d2f = jnp.zeros((q,), t.dtype)
        s0s, m1s, valid = [], [], []
        for g, fast in terms:
            if fast is None:
                fi, dfi, d2fi = direct(g, t)
            elif at_zero:
                e, cc, mid, _, _ = fast
                fi, dfi, d2fi, s0, m1 = cached(e, cc, mid, g.w, t)
                s0s.append(s0)
                m1s.append(m1)
                valid.append(jnp.array(True))
            else:
                e, cc, mid, span, usable = fast
                small = fast_path_ok(jnp.abs(t[0]) * span <= _FAST_SHIFT_LIMIT)
                zeros = jnp.zeros((e.shape[0],), t.dtype)
                fi, dfi, d2fi, s0, m1 = _pick(
                    small,
                    usable,
                    lambda t, e=e, cc=cc, mid=mid, w=g.w: cached(e, cc, mid, w, t),
                    lambda t, g=g, cc=cc, mid=mid: cached(_exact_base(g.x).e, cc, mid, g.w, t),
                    lambda t, g=g, zeros=zeros: (*direct(g, t), zeros, zeros),
                    t,
                )
                s0s.append(s0)
                m1s.append(m1)
                valid.append(small)
            f, df, d2f = f + fi, df + dfi, d2f + d2fi
        sums = _Sums(jnp.concatenate(s0s), jnp.concatenate(m1s), jnp.stack(valid)) if s0s else None
        return f, df, d2f, sums

    return evaluate


class _Problem(NamedTuple):
    """What both root finders need, in the compute dtype."""

    budgets: jax.Array  # (q,)
    lo: jax.Array  # (q,) smallest achievable totals
    hi: jax.Array  # (q,) largest achievable totals
    tol: jax.Array  # (q,) stop when |C_j - B_j| <= tol_j
    reachable: jax.Array  # (q,) the relaxation can meet budget j
    inequality: bool


def _problem(constraint: Constraint, dtype: Any, rtol: float | None) -> _Problem:
    budgets = constraint.budgets.astype(dtype)
    lo, hi = (b.astype(dtype) for b in constraint.budget_ranges())
    scale = jnp.maximum(jnp.abs(hi), jnp.abs(lo))
    tol = (4 * jnp.finfo(dtype).eps if rtol is None else rtol) * scale
    inequality = constraint.inequality
    reachable = (lo < budgets) & (inequality | (budgets < hi))
    return _Problem(budgets, lo, hi, tol, reachable, inequality)


def _separable_root(
    geo: list[_Leaf], pb: _Problem, t0: jax.Array, max_evals: int, bases=None, first=None
):
    """Solves ``C_j(alpha + t c) = B_j`` for every budget (each monotone in its ``t_j``).

    ``first``: the evaluator's output at ``t0`` when already computed. Returns the
    diagnostics and the fast leaves' :class:`_Sums` at the returned shift.
    """
    q = pb.budgets.shape[0]
    dtype = pb.budgets.dtype
    spans = [jnp.max(jnp.max(g.c, -1) - jnp.min(g.c, -1)) for g in geo]
    span = jnp.max(jnp.stack(spans))
    base_step = 1.0 / jnp.where(span > 0, span, 1.0)
    cost_and_slope = _separable_evaluator(geo, q, bases)

    def evaluate(t):
        return shifted(cost_and_slope(t))

    def shifted(out):
        f, df, d2f, sums = out
        return f - pb.budgets, df, d2f, sums

    class Carry(NamedTuple):
        t: jax.Array
        f: jax.Array
        df: jax.Array
        d2f: jax.Array
        lo: jax.Array
        hi: jax.Array
        best_t: jax.Array
        best_f: jax.Array
        best_sums: _Sums | None
        evals: jax.Array
        done: jax.Array

    def next_point(s: Carry) -> tuple[jax.Array, jax.Array, jax.Array]:
        lo = jnp.where(s.f < 0, s.t, s.lo)
        hi = jnp.where(s.f > 0, s.t, s.hi)
        # Halley's step (cubic convergence) when its correction factor is moderate,
        # else Newton's; both fall back to bisection/expansion below.
        ratio = s.f * s.d2f / (s.df * s.df)
        halley = jnp.where(jnp.abs(ratio) <= 1.0, 1.0 / (1.0 - 0.5 * ratio), 1.0)
        newton = s.t - halley * s.f / s.df
        bounded = jnp.isfinite(lo) & jnp.isfinite(hi)
        inside = (newton > lo) & (newton < hi)
        # Unbounded side: Newton step, but at most doubling |t| per iteration.
        limit = jnp.maximum(base_step, 2 * jnp.abs(s.t))
        direction = jnp.where(s.f < 0, 1.0, -1.0).astype(dtype)
        step = jnp.where(jnp.isfinite(newton), newton - s.t, direction * limit)
        expand = s.t + jnp.clip(step, -limit, limit)
        t_new = jnp.where(inside, newton, jnp.where(bounded, lo + 0.5 * (hi - lo), expand))
        return t_new, lo, hi

    def body(s: Carry) -> Carry:
        t_new, lo, hi = next_point(s)
        t_new = jnp.where(s.done, s.t, t_new)  # finished budgets stay put
        stalled = (t_new == s.t) | (t_new <= lo) | (t_new >= hi)
        f, df, d2f, sums = evaluate(t_new)
        better = ~s.done & (jnp.abs(f) < jnp.abs(s.best_f))
        # Fast leaves exist only with one budget, so `better` has one entry then.
        take = jnp.all(better)
        done = s.done | (jnp.abs(f) <= pb.tol) | stalled | ~jnp.isfinite(f)
        keep = lambda new, old: jnp.where(s.done, old, new)
        return Carry(
            t=t_new,
            f=keep(f, s.f),
            df=keep(df, s.df),
            d2f=keep(d2f, s.d2f),
            lo=keep(lo, s.lo),
            hi=keep(hi, s.hi),
            best_t=jnp.where(better, t_new, s.best_t),
            best_f=jnp.where(better, f, s.best_f),
            best_sums=jax.tree.map(lambda a, b: jnp.where(take, a, b), sums, s.best_sums),
            evals=s.evals + 1,
            done=done,
        )

    f0, df0, d2f0, sums0 = evaluate(t0) if first is None else shifted(first)
    inf = jnp.full((q,), jnp.inf, dtype)
    init = Carry(
        t=t0,
        f=f0,
        df=df0,
        d2f=d2f0,
        lo=-inf,
        hi=inf,
        best_t=t0,
        best_f=f0,
        best_sums=sums0,
        evals=jnp.ones((), jnp.int32),
        # Inside an inequality budget there is nothing to do: the shift stays 0.
        done=(jnp.abs(f0) <= pb.tol)
        | ~pb.reachable
        | ~jnp.isfinite(f0)
        | (pb.inequality & (f0 <= 0) & (t0 == 0)),
    )
    out = jax.lax.while_loop(lambda s: jnp.any(~s.done) & (s.evals < max_evals), body, init)
    zero = jnp.zeros_like(t0)
    shift = jnp.where(pb.reachable, out.best_t, zero)
    residual = jnp.where(pb.reachable, out.best_f, f0)
    within = (residual if pb.inequality else jnp.abs(residual)) <= pb.tol
    info = RetractionInfo(
        shift=shift,
        residual=residual,
        num_evals=out.evals,
        converged=jnp.all(pb.reachable & within),
    )
    # An unreachable budget returns the shift 0, not the best one evaluated.
    reachable = jnp.all(pb.reachable)
    sums = out.best_sums
    return info, (None if sums is None else sums._replace(valid=sums.valid & reachable))


def _coupled_root(
    geo: list[_Leaf], pb: _Problem, t0: jax.Array, max_evals: int, bases=None, first=None
):
    """Damped Newton on the convex dual ``F(t)`` for coupled budgets.

    In scaled coordinates ``t = D s`` with ``D = diag(1 / scale_j)`` the scaled
    residual ``r~ = D (C - B)`` has the symmetric positive semi-definite Jacobian
    ``H~ = D H D``. Each step solves ``(H~ + lam I) d = -r~`` with
    ``lam = ||r~|| max(diag H~)`` (Levenberg-Marquardt: a gradient step far away,
    Newton's step near the root, where ``lam -> 0``), a descent direction of
    ``F``, and backtracks until ``F`` decreases by Armijo's rule. ``F`` is
    coercive when the budgets are reachable, so the iterates cannot run off to
    the saturated (one-hot) region where ``H`` vanishes. Near the root the
    decrease of ``F`` drops below its rounding error; there a step is taken
    when it reduces ``||r~||`` instead. One evaluation per loop iteration.
    """
    q = pb.budgets.shape[0]
    dtype = pb.budgets.dtype
    eps = jnp.finfo(dtype).eps
    scale = jnp.maximum(jnp.maximum(jnp.abs(pb.hi), jnp.abs(pb.lo)), jnp.finfo(dtype).tiny)
    d_scale = 1.0 / scale
    tol = pb.tol * d_scale
    merit = lambda r: jnp.sum(r * r)

    def converged(r):
        return jnp.all(jnp.abs(r) <= tol)

    def evaluate(t):
        """``(r~, H~, F, rounding error of F)`` at ``t``."""
        moved = [g._replace(x=_shifted(g, t)) for g in geo]
        p_lse = [_softmax_lse(g.x) for g in moved]
        lse = [z for _, z in p_lse]
        ms = [_moments(g, p) for g, (p, _) in zip(moved, p_lse)]
        r = (_cost_of(ms, moved, q) - pb.budgets) * d_scale
        # The Hessian is needed only for another step (q^2 N K work, the bulk of a pass).
        h = jax.lax.cond(
            converged(r),
            lambda ms: jnp.zeros((q, q), dtype),
            lambda ms: _covariance(ms, moved, q, True),
            ms,
        )
        tb = jnp.sum(t * pb.budgets)
        f = sum(jnp.sum(_weighted(z, g)) for z, g in zip(lse, moved)) - tb
        f_err = (
            32
            * eps
            * (sum(jnp.sum(_weighted(jnp.abs(z), g)) for z, g in zip(lse, moved)) + jnp.abs(tb))
        )
        return r, h * d_scale[:, None] * d_scale[None, :], f, f_err

    def direction(r, h):
        lam = jnp.sqrt(merit(r)) * jnp.max(jnp.diagonal(h))
        d = -_spd_solve(h + lam * jnp.eye(q, dtype=dtype), r)
        return jnp.where(jnp.all(jnp.isfinite(d)), d, -r) * d_scale  # back to t units

    class Carry(NamedTuple):
        t: jax.Array
        r: jax.Array
        f: jax.Array
        d: jax.Array
        step: jax.Array
        evals: jax.Array
        done: jax.Array

    def body(s: Carry) -> Carry:
        trial = s.t + s.step * s.d
        r, h, f, f_err = evaluate(trial)
        slope = jnp.sum(s.r * scale * s.d)  # <grad F, d> < 0
        # Armijo counts only when the decrease of F is above its rounding error;
        # below it (near the root) the residual must decrease instead.
        armijo = (f <= s.f + 1e-4 * s.step * slope) & (s.f - f > f_err)
        flat = (jnp.abs(f - s.f) <= f_err) & (merit(r) <= (1 - 1e-4 * s.step) * merit(s.r))
        ok = jnp.isfinite(f) & jnp.all(jnp.isfinite(r)) & (armijo | flat)
        stalled = ~ok & (s.step < 2.0**-16)
        return Carry(
            t=jnp.where(ok, trial, s.t),
            r=jnp.where(ok, r, s.r),
            f=jnp.where(ok, f, s.f),
            d=jnp.where(ok, direction(r, h), s.d),
            step=jnp.where(ok, 1.0, 0.5 * s.step).astype(dtype),
            evals=s.evals + 1,
            done=(ok & converged(r)) | stalled,
        )

    r0, h0, f0, _ = evaluate(t0)
    reachable = jnp.all(pb.reachable)
    init = Carry(
        t=t0,
        r=r0,
        f=f0,
        d=direction(r0, h0),
        step=jnp.ones((), dtype),
        evals=jnp.ones((), jnp.int32),
        done=converged(r0) | ~reachable | ~jnp.isfinite(merit(r0)),
    )
    out = jax.lax.while_loop(lambda s: ~s.done & (s.evals < max_evals), body, init)
    good = reachable & jnp.all(jnp.isfinite(out.t))
    info = RetractionInfo(
        shift=jnp.where(good, out.t, jnp.zeros_like(t0)),
        residual=jnp.where(good, out.r, r0) * scale,
        num_evals=out.evals,
        converged=good & converged(out.r),
    )
    return info, None  # coupled leaves are never fast


@jax.custom_jvp
def _root(
    xs: list[jax.Array], constraint: Constraint, t0: jax.Array, rtol, max_evals, bases, first
):
    """The retraction's shift for base points ``xs`` (compute dtype), with diagnostics.

    ``bases``: :func:`_bases` of ``xs``; ``first``: the evaluation at ``t0`` or ``None``
    (computational aids: functions of ``xs``, so their tangents are not used).
    Returns ``(info, sums)``: the diagnostics and the fast leaves' :class:`_Sums`.
    """
    dtype = xs[0].dtype
    geo = _with_points(_templates(constraint, dtype), xs)
    pb = _problem(constraint, dtype, rtol)
    solver = _coupled_root if constraint.coupled else _separable_root
    return solver(geo, pb, t0.astype(dtype), max_evals, bases, first)


@_root.defjvp
def _root_jvp(primals, tangents):
    """Implicit function theorem: ``H dt = dB - dC|_t`` at the root, one ``q x q`` solve.

    ``dC|_t`` is the change of ``C(alpha + sum_j t_j c^(j))`` at fixed ``t`` under
    the input tangents (logits, costs, weights), computed by ``jax.jvp``; nothing
    of the solver's iterations is differentiated or stored.
    """
    xs, constraint, t0, rtol, max_evals, bases, first = primals
    dxs, dconstraint = tangents[:2]  # the warm start and the tolerances move nothing
    info, sums = _root(xs, constraint, t0, rtol, max_evals, bases, first)
    t = info.shift
    q = constraint.num_budgets

    def residual(xs, constraint):
        geo = [
            g._replace(x=_shifted(g, t))
            for g in _with_points(_templates(constraint, xs[0].dtype), xs)
        ]
        return _costs(geo, q) - constraint.budgets.astype(xs[0].dtype), geo

    (_, geo), (dr, _) = jax.jvp(residual, (xs, constraint), (dxs, dconstraint))
    hess = _covariance([_moments(g) for g in geo], geo, q, constraint.coupled)
    dt = -_solve_budgets(hess, dr, constraint.coupled)
    if constraint.inequality:  # budgets strictly inside do not move: t stays 0
        pb = _problem(constraint, xs[0].dtype, rtol)
        active = info.residual >= -_boundary_tol(constraint, xs[0].dtype)
        dt = jnp.where(active & pb.reachable, dt, 0)
    dt = dt.astype(t.dtype)
    zeros = RetractionInfo(
        shift=dt,
        residual=jnp.zeros_like(info.residual),
        num_evals=np.zeros(info.num_evals.shape, jax.dtypes.float0),
        converged=np.zeros(info.converged.shape, jax.dtypes.float0),
    )
    no_sums = (
        None
        if sums is None
        else _Sums(jnp.zeros_like(sums.s0), jnp.zeros_like(sums.m1), _no_tangent(sums.valid))
    )
    return (info, sums), (zeros, no_sums)


def _no_tangent(a: jax.Array) -> np.ndarray:
    return np.zeros(np.shape(a), jax.dtypes.float0)


def _shift_leaves(
    xs: list[jax.Array],
    constraint: Constraint,
    rtol,
    max_evals,
    init_shift,
    hints=None,
    with_stats: bool = False,
) -> tuple[RetractionInfo, list[tuple[jax.Array, jax.Array]] | None]:
    """The shift for base points ``xs``; with ``with_stats`` also the normals and
    log-normalizers there (:func:`_stats_at`).

    ``hints``: approximate row log-normalizers per leaf (e.g. the previous iterate's),
    used to shift the exponentials (:func:`_hinted_base`); they need ``init_shift``
    ``None``. Their row sums are then the first evaluation's (at ``t = 0``), so checking
    them costs no pass of its own; when they are out of range the first evaluation is
    redone and every later one recomputes the exponentials with the exact row maxima
    (slower, the same numbers as without hints).
    """
    q = constraint.num_budgets
    t0 = jnp.zeros((q,), xs[0].dtype) if init_shift is None else jnp.reshape(init_shift, (q,))
    geo = _with_points(_templates(constraint, xs[0].dtype), xs)
    fast = [_fast(g, constraint.coupled) for g in geo]
    hints = [h if f else None for h, f in zip(hints or [None] * len(xs), fast)]

    def solve(bases, first=None):
        info, sums = _root(xs, constraint, t0, rtol, max_evals, bases, first)
        return info, (_stats_at(geo, bases, info.shift, sums) if with_stats else None)

    if all(h is None for h in hints):
        return solve(_bases(geo, constraint.coupled))
    if init_shift is not None:
        raise ValueError("row log-normalizer hints need the initial shift 0")
    bases = [
        _hinted_base(g.x, h) if h is not None else (_exact_base(g.x) if f else None)
        for g, h, f in zip(geo, hints, fast)
    ]
    first = _separable_evaluator(geo, q, bases)(t0, at_zero=True)
    # Every fast leaf's row sums (an unhinted one's exact sums are in [1, K] anyway).
    ok = fast_path_ok(_sums_ok(first[3].s0))
    bases = [b if b is None else b._replace(ok=ok) for b in bases]
    # No conditional around the solve (XLA:CPU runs a conditional's thunks in turn,
    # much slower for many small leaves) and none passing the large exponentials through
    # (XLA would copy them): when the hints are out of range the first evaluation is
    # redone and every later one recomputes the exact exponentials (:func:`_pick`).
    first = jax.lax.cond(ok, lambda: first, lambda: _separable_evaluator(geo, q, bases)(t0))
    return solve(bases, first)


def _public_info(info: RetractionInfo, constraint: Constraint) -> RetractionInfo:
    return info._replace(
        shift=_squeeze(info.shift, constraint), residual=_squeeze(info.residual, constraint)
    )


def retract_with_info(
    logits: PyTree,
    constraint: Constraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
    init_shift: jax.Array | None = None,
) -> tuple[PyTree, RetractionInfo]:
    """Retraction onto the manifold, with diagnostics.

    Args:
      logits: ``(N, K)`` logits (or a pytree of them), anywhere in logit space.
      constraint: the budget(s).
      rtol: stop when every ``|C_j - B_j| <= rtol * max(|lo_j|, |hi_j|)`` (the
        budget's achievable range); default four machine epsilons of the
        compute dtype (float32 at least).
      max_evals: cap on evaluations (softmax passes).
      init_shift: warm start for the shift ``t`` (scalar or ``(q,)``), e.g. the
        previous step's; default zero.

    Returns:
      ``(alpha + sum_j t*_j c^(j), info)``. With an unreachable budget (only
      possible with traced budgets, concrete ones are validated) the logits come
      back unchanged and ``info.converged`` is ``False``; never NaN or inf.
      Differentiable: forward and reverse mode use the implicit function
      theorem (no unrolled iterations).
    """
    constraint.check_logits(logits)
    return _retract(logits, constraint, init_shift, rtol=rtol, max_evals=max_evals)


@jax.jit
def _retract(logits, constraint, init_shift, *, rtol, max_evals):
    # rtol and max_evals are traced (inject_hyperparams may make them so); None is static.
    # Jitted so that eager calls (notebooks, tests) reuse one compiled solver.
    geo, leaves, _ = _geometry(logits, constraint)
    info, _ = _shift_leaves([g.x for g in geo], constraint, rtol, max_evals, init_shift)
    out = [_shifted(g, info.shift).astype(x.dtype) for g, x in zip(geo, leaves)]
    return jax.tree.unflatten(jax.tree.structure(logits), out), _public_info(info, constraint)


def retract(
    logits: PyTree,
    constraint: Constraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
) -> PyTree:
    """Retraction ``R(alpha) = alpha + sum_j t*_j c^(j)`` with ``C(R(alpha)) = B``.

    For an inequality budget, logits already within ``C <= B`` come back
    unchanged (``t* = 0``). Differentiable (implicit function theorem): a
    model may contain it as a layer.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, expected_cost, retract
      >>> c = BudgetConstraint(jnp.array([2., 4., 8.]), budget=12.0, num_groups=3)
      >>> alpha = retract(jax.random.normal(jax.random.key(0), (3, 3)), c)
      >>> bool(abs(expected_cost(alpha, c) - 12.0) < 1e-5)
      True
    """
    return retract_with_info(logits, constraint, rtol=rtol, max_evals=max_evals)[0]


def retract_update(
    params: PyTree,
    updates: PyTree,
    constraint: Constraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
    stats: SoftmaxStats | None = None,
) -> tuple[PyTree, RetractionInfo]:
    """Updates ``u + sum_j t*_j c^(j)`` such that ``params + updates`` lies on the manifold.

    The root is found for the point exactly as ``optax.apply_updates`` will form
    it, so applying the returned updates lands on the manifold without a
    rounding step in between. ``stats``: :func:`softmax_stats` of ``params``, if
    known; their log-normalizers make a cheaper stable shift for the exponentials.
    """
    constraint.check_logits(params)
    hints = _stats_leaves(stats, len(jax.tree.leaves(params)), "lse")
    return _retract_update(
        params, updates, constraint, hints, rtol=rtol, max_evals=max_evals, with_stats=False
    )


def retract_update_with_stats(
    params: PyTree,
    updates: PyTree,
    constraint: Constraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
    stats: SoftmaxStats | None = None,
) -> tuple[PyTree, RetractionInfo, SoftmaxStats]:
    """:func:`retract_update`, plus the :func:`softmax_stats` of the new point.

    For a single budget with shared costs the new point's normals come from the
    retraction's own exponentials and row sums (no further ``exp`` over the logits,
    one pass that writes them), so a step that passes them on to the next projection
    needs one ``exp`` pass in all. The statistics belong to ``params + updates`` up to
    rounding; their costs are the budgets plus the residual the solver measured.
    """
    constraint.check_logits(params)
    hints = _stats_leaves(stats, len(jax.tree.leaves(params)), "lse")
    return _retract_update(
        params, updates, constraint, hints, rtol=rtol, max_evals=max_evals, with_stats=True
    )


@functools.partial(jax.jit, static_argnames=("with_stats",))
def _retract_update(params, updates, constraint, hints, *, rtol, max_evals, with_stats):
    p_leaves = jax.tree.leaves(params)
    u_leaves, u_def = jax.tree.flatten(updates)
    pdtype = jnp.result_type(*p_leaves)
    dtype = compute_dtype(pdtype)
    us = [u.astype(x.dtype) for u, x in zip(u_leaves, p_leaves)]
    base = [(x + u).astype(dtype) for x, u in zip(p_leaves, us)]
    info, stats = _shift_leaves(base, constraint, rtol, max_evals, None, hints, with_stats)
    # The shift in the parameters' dtype, so that params + updates is formed as solved.
    t = info.shift.astype(pdtype)
    out = [
        u + _combine(t, g.c, g).astype(u.dtype) for u, g in zip(us, _templates(constraint, pdtype))
    ]
    new_updates, info_out = jax.tree.unflatten(u_def, out), _public_info(info, constraint)
    if not with_stats:
        return new_updates, info_out
    # The costs at the new point are the budgets plus the residual the solver measured there.
    cost = constraint.budgets.astype(dtype) + info.residual
    normals, lse = zip(*stats)
    return new_updates, info_out, _stats_tree(params, list(normals), cost, list(lse))


def init_logits(
    constraint: Constraint,
    logits: PyTree | None = None,
    *,
    dtype: Any = None,
) -> PyTree:
    """Logits on the manifold: ``R(logits)``, uniform (zeros) by default.

    For an inequality budget: the logits themselves when they are within it,
    else their retraction onto the boundary.

    For a single-leaf constraint the result is an ``(N, K)`` array; for pytree
    costs it has the costs' structure.
    """
    if logits is None:
        dtype = dtype or jnp.result_type(float)
        zeros = [
            jnp.zeros((n, c.shape[-1]), dtype)
            for n, c in zip(constraint.group_sizes, constraint.cost_leaves())
        ]
        logits = jax.tree.unflatten(jax.tree.structure(constraint.costs), zeros)
    return retract(logits, constraint)
