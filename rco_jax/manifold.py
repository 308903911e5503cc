"""Geometry of the budget manifold ``M = {alpha : C(alpha) = B}``.

With ``p_i = softmax(alpha_i)`` and ``mu_i = sum_k p_ik c_ik`` the expected cost
is ``C(alpha) = sum_i w_i mu_i``. Everything here is closed form and ``O(NK)``:

* normal (the Euclidean gradient of ``C``)::

      n_ik = w_i p_ik (c_ik - mu_i)

* tangent projection: ``P(v) = v - (<v, n> / <n, n>) n``;
* shift along the costs: ``C(alpha + t c)`` is non-decreasing in ``t`` with::

      d/dt C(alpha + t c) = sum_i w_i Var_{p_i(t)}(c_i) >= 0

* retraction: ``R(alpha) = alpha + t* c`` with ``t*`` the root of
  ``C(alpha + t c) = B``, found by a safeguarded Halley/Newton iteration
  (closed-form derivatives, bracketing bisection fallback) inside ``lax.while_loop``.

For an inequality budget (``BudgetConstraint(..., inequality=True)``, feasible
set ``C(alpha) <= B``) the retraction is the identity inside the set and the
same shift onto its boundary ``M`` outside it; :func:`project_descent` projects
a gradient only where the point is on ``M`` and the step would leave the set.

Every function accepts logits as one ``(N, K)`` array or as a pytree of
``(n_j, K_j)`` arrays matching the constraint's cost leaves.

Reference: Helcig & Alistarh, "Model Compression with Exact Budget Constraints
via Riemannian Manifolds", 2026 (arXiv 2605.00649), Section 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rco_jax.constraint import BudgetConstraint

PyTree = Any

__all__ = [
    "RetractionInfo",
    "budget_normal",
    "expected_cost",
    "init_logits",
    "project_descent",
    "project_tangent",
    "retract",
    "retract_with_info",
]


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the geometry is evaluated in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


class _Moments(NamedTuple):
    """Per-leaf softmax statistics."""

    p: jax.Array  # (n, K) probabilities
    mu: jax.Array  # (n,) expected cost per group
    dev: jax.Array  # (n, K) c_ik - mu_i


def _moments(x: jax.Array, c: jax.Array) -> _Moments:
    p = jax.nn.softmax(x, axis=-1)
    mu = jnp.sum(p * c, axis=-1)
    return _Moments(p, mu, c - mu[:, None])


def _weighted_sum(values: jax.Array, w: jax.Array | None) -> jax.Array:
    return jnp.sum(values) if w is None else jnp.sum(w * values)


def _leaves(logits: PyTree, constraint: BudgetConstraint):
    """Logits leaves (in compute dtype) zipped with cost and weight leaves."""
    leaves = constraint.check_logits(logits)
    dtype = compute_dtype(jnp.result_type(*leaves))
    costs = [c.astype(dtype) for c in constraint.cost_leaves()]
    weights = [None if w is None else w.astype(dtype) for w in constraint.weight_leaves()]
    return [x.astype(dtype) for x in leaves], costs, weights, dtype


def expected_cost(logits: PyTree, constraint: BudgetConstraint) -> jax.Array:
    """Expected cost ``C(alpha) = sum_i w_i sum_k softmax(alpha_i)_k c_ik``.

    Example::

      >>> import jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, expected_cost
      >>> c = BudgetConstraint(jnp.array([0., 1.]), budget=1.0, num_groups=3)
      >>> float(expected_cost(jnp.zeros((3, 2)), c))
      1.5
    """
    xs, cs, ws, _ = _leaves(logits, constraint)
    return sum(_weighted_sum(_moments(x, c).mu, w) for x, c, w in zip(xs, cs, ws))


def _normals_and_cost(xs, cs, ws) -> tuple[list[jax.Array], jax.Array]:
    """The normal's leaves and ``C``, from one softmax pass."""
    out, cost = [], 0.0
    for x, c, w in zip(xs, cs, ws):
        m = _moments(x, c)
        n = m.p * m.dev
        out.append(n if w is None else w[:, None] * n)
        cost = cost + _weighted_sum(m.mu, w)
    return out, cost


def _normals(xs, cs, ws) -> list[jax.Array]:
    return _normals_and_cost(xs, cs, ws)[0]


def budget_normal(logits: PyTree, constraint: BudgetConstraint) -> PyTree:
    """Closed-form normal ``n_ik = w_i p_ik (c_ik - mu_i)`` (equals ``grad C``)."""
    leaves = constraint.check_logits(logits)
    xs, cs, ws, _ = _leaves(logits, constraint)
    normals = [n.astype(x.dtype) for n, x in zip(_normals(xs, cs, ws), leaves)]
    return jax.tree.unflatten(jax.tree.structure(logits), normals)


def _vdot(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    # Elementwise product + sum, not jnp.vdot: TPU matmul units default to bf16 passes.
    return sum(jnp.sum(x * y) for x, y in zip(a, b))


def _vector_leaves(vectors: PyTree, xs: list[jax.Array]):
    v_leaves, v_def = jax.tree.flatten(vectors)
    if len(v_leaves) != len(xs):
        raise ValueError(
            f"vectors have {len(v_leaves)} arrays but logits have {len(xs)}; "
            "they must share the logits' structure."
        )
    return v_leaves, v_def


def project_tangent(vectors: PyTree, logits: PyTree, constraint: BudgetConstraint) -> PyTree:
    """Orthogonal projection onto the tangent space at ``logits``.

    ``P(v) = v - (<v, n> / <n, n>) n`` with ``n`` the budget normal. It is the
    Riemannian gradient when ``v`` is a Euclidean gradient, and the vector
    transport of ``v`` when ``v`` is tangent at another point.
    """
    xs, cs, ws, dtype = _leaves(logits, constraint)
    v_leaves, v_def = _vector_leaves(vectors, xs)
    vs = [v.astype(dtype) for v in v_leaves]
    out, _ = _project(vs, _normals(xs, cs, ws))
    return jax.tree.unflatten(v_def, [v.astype(v0.dtype) for v, v0 in zip(out, v_leaves)])


def _project(vs: list[jax.Array], normals: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    """``v - (<v, n> / <n, n>) n`` leafwise, and ``<v, n>``."""
    nn, vn = _vdot(normals, normals), _vdot(vs, normals)
    coef = jnp.where(nn > 0, vn / jnp.where(nn > 0, nn, 1), 0)
    return [v - coef * n for v, n in zip(vs, normals)], vn


def _boundary_tol(constraint: BudgetConstraint, dtype: Any) -> jax.Array:
    """Points with ``C >= B - tol`` count as on the boundary (retractions land within 4 ulps)."""
    return 64 * jnp.finfo(dtype).eps * constraint.cost_range()[1].astype(dtype)


def project_descent(vectors: PyTree, logits: PyTree, constraint: BudgetConstraint) -> PyTree:
    """Projects a gradient-like ``v`` (the step is ``-v``) so the step keeps the budget.

    For an equality budget this is :func:`project_tangent`. For an inequality
    budget (``C <= B``) ``v`` is projected only where the point is on the
    boundary (``C >= B - tol``) and the step ``-v`` points out of the feasible
    set (``<v, n> < 0``); elsewhere it is returned unchanged. This is the
    projection onto the tangent cone of the feasible set at a boundary point.
    """
    if not constraint.inequality:
        return project_tangent(vectors, logits, constraint)
    xs, cs, ws, dtype = _leaves(logits, constraint)
    v_leaves, v_def = _vector_leaves(vectors, xs)
    normals, cost = _normals_and_cost(xs, cs, ws)
    projected, vn = _project([v.astype(dtype) for v in v_leaves], normals)
    active = (cost >= constraint.budget.astype(dtype) - _boundary_tol(constraint, dtype)) & (vn < 0)
    out = [jnp.where(active, p.astype(v.dtype), v) for p, v in zip(projected, v_leaves)]
    return jax.tree.unflatten(v_def, out)


class RetractionInfo(NamedTuple):
    """Diagnostics of one retraction.

    Attributes:
      shift: the shift ``t*`` along the costs.
      residual: ``C(R(alpha)) - B`` as evaluated at the returned point.
      num_evals: evaluations of ``(C, dC/dt)`` used (one softmax each).
      converged: whether ``|residual| <= tol``; ``False`` when the budget is
        unreachable (then the logits are returned unchanged).
    """

    shift: jax.Array
    residual: jax.Array
    num_evals: jax.Array
    converged: jax.Array


# Above this logit shift |t| * (max c - min c) the cached-exponential evaluation could
# underflow (its normalizer is >= exp(-|t| span)); the direct softmax takes over.
_FAST_SHIFT_LIMIT = 60.0


def _shift_evaluator(
    base: list[jax.Array], cs: list[jax.Array], ws: list[jax.Array | None]
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``t -> (C, dC/dt, d2C/dt2)`` at ``base + t c``: cumulants of the costs.

    ``dC/dt = sum_i w_i Var_{p_i(t)}(c_i)`` and ``d2C/dt2`` is the weighted sum of
    third central moments (the derivative of a variance along an exponential tilt).

    For shared ``(K,)`` costs the exponentials of ``base`` are computed once:
    ``softmax(y + t c)_ik`` is proportional to ``e_ik g_k(t)`` with
    ``e = exp(y - max_k y)`` and ``g(t) = exp(t c)``, so each evaluation is one
    ``(N, K) @ (K, 3)`` product instead of an ``exp`` over all ``N K`` entries.
    Costs are centred per leaf so the variance ``E[c^2] - E[c]^2`` does not cancel.
    """
    terms = []
    for y, c, w in zip(base, cs, ws):
        if c.ndim == 1:
            mid = 0.5 * (jnp.max(c) + jnp.min(c))
            cc = c - mid
            span = jnp.max(c) - jnp.min(c)
            e = jnp.exp(y - jnp.max(y, -1, keepdims=True))
            terms.append((y, c, w, (e, cc, mid, span)))
        else:
            terms.append((y, c, w, None))

    def direct(y, c, w, t):
        m = _moments(y + t * c, c)
        d2 = m.dev * m.dev
        return (
            _weighted_sum(m.mu, w),
            _weighted_sum(jnp.sum(m.p * d2, -1), w),
            _weighted_sum(jnp.sum(m.p * d2 * m.dev, -1), w),
        )

    def cached(e, cc, mid, w, t):
        a = t * cc
        g = jnp.exp(a - jnp.max(a))
        basis = jnp.stack([g, g * cc, g * cc * cc, g * cc * cc * cc], 1)
        s = jnp.matmul(e, basis, precision="highest")
        m1, m2, m3 = s[:, 1] / s[:, 0], s[:, 2] / s[:, 0], s[:, 3] / s[:, 0]
        var = jnp.maximum(m2 - m1 * m1, 0)
        skew = m3 - 3 * m1 * m2 + 2 * m1 * m1 * m1  # third central moment
        return _weighted_sum(m1 + mid, w), _weighted_sum(var, w), _weighted_sum(skew, w)

    def evaluate(t):
        f = df = d2f = jnp.zeros((), t.dtype)
        for y, c, w, fast in terms:
            if fast is None:
                fi, dfi, d2fi = direct(y, c, w, t)
            else:
                e, cc, mid, span = fast
                fi, dfi, d2fi = jax.lax.cond(
                    jnp.abs(t) * span <= _FAST_SHIFT_LIMIT,
                    lambda t, e=e, cc=cc, mid=mid, w=w: cached(e, cc, mid, w, t),
                    lambda t, y=y, c=c, w=w: direct(y, c, w, t),
                    t,
                )
            f, df, d2f = f + fi, df + dfi, d2f + d2fi
        return f, df, d2f

    return evaluate


def _root_shift(
    base: list[jax.Array],
    cs: list[jax.Array],
    ws: list[jax.Array | None],
    constraint: BudgetConstraint,
    dtype: Any,
    rtol: float | None,
    max_evals: int,
) -> RetractionInfo:
    """Solves ``C(base + t c) = B`` for the shift ``t`` (monotone in ``t``)."""
    budget = constraint.budget.astype(dtype)
    lo_cost, hi_cost = (b.astype(dtype) for b in constraint.cost_range())
    eps = jnp.finfo(dtype).eps
    tol = (4 * eps if rtol is None else rtol) * hi_cost
    inequality = constraint.inequality
    reachable = (lo_cost < budget) & (inequality | (budget < hi_cost))
    span = jnp.max(jnp.stack([jnp.max(jnp.max(c, -1) - jnp.min(c, -1)) for c in cs]))
    base_step = 1.0 / jnp.where(span > 0, span, 1.0)

    cost_and_slope = _shift_evaluator(base, cs, ws)

    def evaluate(t):
        f, df, d2f = cost_and_slope(t)
        return f - budget, df, d2f

    class Carry(NamedTuple):
        t: jax.Array
        f: jax.Array
        df: jax.Array
        d2f: jax.Array
        lo: jax.Array
        hi: jax.Array
        best_t: jax.Array
        best_f: jax.Array
        evals: jax.Array
        done: jax.Array

    def next_point(s: Carry) -> tuple[jax.Array, jax.Array]:
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
        return t_new, (lo, hi)

    def body(s: Carry) -> Carry:
        t_new, (lo, hi) = next_point(s)
        stalled = (t_new == s.t) | (t_new <= lo) | (t_new >= hi)
        f, df, d2f = evaluate(t_new)
        better = jnp.abs(f) < jnp.abs(s.best_f)
        done = (jnp.abs(f) <= tol) | stalled | ~jnp.isfinite(f)
        return Carry(
            t=t_new,
            f=f,
            df=df,
            d2f=d2f,
            lo=lo,
            hi=hi,
            best_t=jnp.where(better, t_new, s.best_t),
            best_f=jnp.where(better, f, s.best_f),
            evals=s.evals + 1,
            done=done,
        )

    zero = jnp.zeros((), dtype)
    f0, df0, d2f0 = evaluate(zero)
    inf = jnp.asarray(jnp.inf, dtype)
    init = Carry(
        t=zero,
        f=f0,
        df=df0,
        d2f=d2f0,
        lo=-inf,
        hi=inf,
        best_t=zero,
        best_f=f0,
        evals=jnp.ones((), jnp.int32),
        # Inside an inequality budget there is nothing to do: the shift stays 0.
        done=(jnp.abs(f0) <= tol) | ~reachable | ~jnp.isfinite(f0) | (inequality & (f0 <= 0)),
    )
    out = jax.lax.while_loop(lambda s: ~s.done & (s.evals < max_evals), body, init)
    shift = jnp.where(reachable, out.best_t, zero)
    residual = jnp.where(reachable, out.best_f, f0)
    return RetractionInfo(
        shift=shift,
        residual=residual,
        num_evals=out.evals,
        converged=reachable & ((residual if inequality else jnp.abs(residual)) <= tol),
    )


def retract_with_info(
    logits: PyTree,
    constraint: BudgetConstraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
) -> tuple[PyTree, RetractionInfo]:
    """Retraction onto the manifold, with diagnostics.

    Args:
      logits: ``(N, K)`` logits (or a pytree of them), anywhere in logit space.
      constraint: the budget.
      rtol: stop when ``|C - B| <= rtol * sum_i w_i max_k c_ik``; default four
        machine epsilons of the compute dtype (float32 at least).
      max_evals: cap on evaluations of ``(C, dC/dt)``.

    Returns:
      ``(alpha + t* c, info)``. With an unreachable budget (only possible with
      traced budgets, concrete ones are validated) the logits come back
      unchanged and ``info.converged`` is ``False``; never NaN or inf.
    """
    leaves = constraint.check_logits(logits)
    xs, cs, ws, dtype = _leaves(logits, constraint)
    info = _root_shift(xs, cs, ws, constraint, dtype, rtol, max_evals)
    out = [(y + info.shift * c).astype(x.dtype) for y, c, x in zip(xs, cs, leaves)]
    return jax.tree.unflatten(jax.tree.structure(logits), out), info


def retract(
    logits: PyTree,
    constraint: BudgetConstraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
) -> PyTree:
    """Retraction ``R(alpha) = alpha + t* c`` with ``C(R(alpha)) = B``.

    For an inequality budget, logits already within ``C <= B`` come back
    unchanged (``t* = 0``).

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
    constraint: BudgetConstraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
) -> tuple[PyTree, RetractionInfo]:
    """Updates ``u + t* c`` such that ``params + (u + t* c)`` lies on the manifold.

    The root is found for the point exactly as ``optax.apply_updates`` will form
    it, so applying the returned updates lands on the manifold without a
    rounding step in between.
    """
    p_leaves = constraint.check_logits(params)
    u_leaves, u_def = jax.tree.flatten(updates)
    dtype = compute_dtype(jnp.result_type(*p_leaves))
    cs = [c.astype(x.dtype) for c, x in zip(constraint.cost_leaves(), p_leaves)]
    ws = [None if w is None else w.astype(dtype) for w in constraint.weight_leaves()]
    us = [u.astype(x.dtype) for u, x in zip(u_leaves, p_leaves)]

    base = [(x + u).astype(dtype) for x, u in zip(p_leaves, us)]
    info = _root_shift(base, [c.astype(dtype) for c in cs], ws, constraint, dtype, rtol, max_evals)
    t = info.shift.astype(jnp.result_type(*p_leaves))
    out = [u + t * c for u, c in zip(us, cs)]
    return jax.tree.unflatten(u_def, out), info


def init_logits(
    constraint: BudgetConstraint,
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
