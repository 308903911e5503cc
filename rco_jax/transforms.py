"""RCO as composable Optax gradient transformations.

One RCO step (Algorithm 1 of the paper) is the chain::

    optax.chain(
        tangent_projection(c),                     # g <- P_alpha(g)
        transport_moments(optax.scale_by_adam(), c),  # m <- P_alpha(m), then Adam
        optax.scale_by_learning_rate(lr),
        retraction(c),                             # alpha + u -> R(alpha + u)
    )

which :func:`rco` builds (plus a guard that skips non-finite steps).

Rules for custom chains:

* :func:`tangent_projection` goes first, so every later transformation sees
  the Riemannian gradient.
* :func:`retraction` must be **last**: it turns the proposed step ``u`` into
  ``R(alpha + u) - alpha``; any transformation after it (a scaling, clipping,
  weight decay) would move the iterate off the manifold again.
* Momentum transport happens in :func:`transport_moments`, which wraps the
  inner optimizer and projects its first-moment buffers (state fields named
  ``mu``, ``trace``, ...) onto the tangent space at the current point before
  the inner update. Without it the chain still stays exactly on the manifold
  (the retraction guarantees that); the moment is then simply not transported.
  Second moments (``nu``) have no direction and are left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rco_jax.constraint import Constraint
from rco_jax.manifold import (
    SoftmaxStats,
    fast_path_ok,
    project_descent,
    retract_update_with_stats,
    softmax_stats,
    total,
)

PyTree = Any

__all__ = [
    "RCOState",
    "RetractionState",
    "rco",
    "retraction",
    "skip_not_finite",
    "tangent_projection",
    "transport_moments",
]

_NO_PARAMS = (
    "{name} needs the current parameters (the logits): call "
    "`update(grads, state, params)`; the budget geometry is evaluated at `params`."
)


def _require_params(params: PyTree | None, name: str) -> None:
    if params is None:
        raise ValueError(_NO_PARAMS.format(name=name))


def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every entry is finite, as one sum per leaf (at least float32).

    A sum with an inf or NaN entry is inf or NaN; finite entries whose sum overflows
    (beyond 3e38) count as non-finite too. A full boolean reduction is several times
    slower on XLA:CPU.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    sums = [total(x.astype(jnp.promote_types(x.dtype, jnp.float32))) for x in leaves]
    return jnp.isfinite(sum(sums, jnp.float32(0)))


def _is_state_field(path, value) -> bool:
    """Matches NamedTuple fields only (not user parameter names inside them)."""
    del value
    return bool(path) and isinstance(path[-1], optax.tree_utils.NamedTupleKey)


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def tangent_projection(
    constraint: Constraint, *, check_finite: bool = True
) -> optax.GradientTransformationExtraArgs:
    """Projects updates onto the tangent space of the budget manifold at ``params``.

    ``g <- g - (<g, n> / <n, n>) n`` with ``n`` the budget normal at ``params``:
    the Riemannian gradient. Put it first in a chain. For an inequality budget
    the projection applies only on the boundary and only when the step ``-g``
    would leave the feasible set (:func:`rco_jax.manifold.project_descent`).

    Non-finite updates (a NaN/inf entry, or entries so large that their float32
    sum overflows) are replaced by zeros, so they never
    reach the logits; wrap the whole chain in :func:`skip_not_finite` to also
    leave the inner optimizer's state untouched on such steps.

    Extra argument ``softmax_stats``: :func:`rco_jax.manifold.softmax_stats` of
    ``params`` when the caller has them (saves the softmax pass and the normals).

    Args:
      constraint: the budget.
      check_finite: zero non-finite updates (one extra pass over them); turn off
        only when an outer :func:`skip_not_finite` already guards the chain.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state.
    """

    def update_fn(updates, state, params=None, **extra_args):
        _require_params(params, "tangent_projection")
        stats = extra_args.get("softmax_stats")
        projected = project_descent(updates, params, constraint, stats=stats)
        if not check_finite:
            return projected, state
        zeros = jax.tree.map(jnp.zeros_like, updates)
        return _select(_all_finite(updates), projected, zeros), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def transport_moments(
    inner: optax.GradientTransformation,
    constraint: Constraint,
    moments: Sequence[str] = ("mu", "trace"),
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so its first moments are transported before each update.

    Before ``inner.update`` runs, every state field named in ``moments`` (Adam's
    and Lion's ``mu``, SGD-momentum's ``trace``) is projected onto the tangent
    space at the current ``params``: the vector transport from the previous
    iterate, which is one inner product on this manifold (for an inequality
    budget, only on the boundary and when the moment points outward). The state structure
    is exactly ``inner``'s, so ``optax.tree.get(state, "mu")`` keeps working.

    Args:
      inner: the optimizer whose moments are transported.
      constraint: the budget.
      moments: names of the state fields holding first moments. Fields not
        present are ignored; a name present more than once raises ``KeyError``.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        _require_params(params, "transport_moments")
        stats = extra_args.get("softmax_stats")
        move = lambda m: project_descent(m, params, constraint, stats=stats)
        state = _transport(state, moments, move)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _transport(state, moments: Sequence[str], move) -> Any:
    """Applies ``move`` to every first-moment field of ``state`` named in ``moments``."""
    for name in moments:
        moment = optax.tree.get(state, name, filtering=_is_state_field)
        if moment is not None:
            state = optax.tree.set(state, _is_state_field, **{name: move(moment)})
    return state


class RetractionState(NamedTuple):
    """State of :func:`retraction`: diagnostics of the last retraction.

    Attributes:
      residual: ``C - B`` at the new iterate (zero up to a few ulps); ``(q,)`` for
        a :class:`~rco_jax.MultiBudget`.
      num_evals: evaluations the root finder used.
      stats: with ``keep_stats``, the :class:`~rco_jax.SoftmaxStats` of the new iterate
        (its budget normals, costs and log-normalizers; ``None`` otherwise).
    """

    residual: jax.Array
    num_evals: jax.Array
    stats: SoftmaxStats | None = None


def retraction(
    constraint: Constraint,
    *,
    rtol: float | None = None,
    max_evals: int = 64,
    check_finite: bool = True,
    keep_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Turns a proposed step ``u`` into ``R(params + u) - params``. Must be last.

    ``R(alpha) = alpha + t* c`` with ``C(R(alpha)) = B`` (see
    :func:`rco_jax.retract`); for an inequality budget, steps that stay inside
    ``C <= B`` are left as they are. The root is solved for the point exactly as
    ``optax.apply_updates(params, updates)`` forms it, so the next iterate is on
    the manifold to a few ulps. A non-finite step is replaced by zeros.

    Args:
      constraint: the budget.
      rtol: relative tolerance of the root finder (default: 4 ulps).
      max_evals: cap on root-finder evaluations.
      check_finite: replace a non-finite step by zeros (see
        :func:`tangent_projection`).
      keep_stats: record the softmax statistics of the new iterate in the state
        (``RetractionState.stats``), for the next step's projection.

    Extra argument ``softmax_stats``: the softmax statistics of ``params``, if
    known; the retraction then shifts its exponentials by their log-normalizers.
    """

    def init_fn(params):
        return RetractionState(
            residual=jnp.zeros(constraint.budget.shape, _dtype(params)),
            num_evals=jnp.zeros((), jnp.int32),
            stats=softmax_stats(params, constraint) if keep_stats else None,
        )

    def update_fn(updates, state, params=None, **extra_args):
        _require_params(params, "retraction")
        if check_finite:
            zeros = jax.tree.map(jnp.zeros_like, updates)
            updates = _select(_all_finite(updates), updates, zeros)
        new_updates, info, stats = retract_update_with_stats(
            params,
            updates,
            constraint,
            rtol=rtol,
            max_evals=max_evals,
            stats=extra_args.get("softmax_stats"),
        )
        new_state = RetractionState(
            residual=info.residual.astype(state.residual.dtype),
            num_evals=info.num_evals.astype(jnp.int32),
            stats=stats if keep_stats else None,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _dtype(params: PyTree) -> jnp.dtype:
    leaves = jax.tree.leaves(params)
    return jnp.promote_types(jnp.result_type(*leaves) if leaves else float, jnp.float32)


def skip_not_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Skips steps whose gradients contain NaN or inf.

    The test is one sum of the entries (in at least float32): finite gradients so
    large that their sum overflows (beyond 3e38) are skipped too.

    On such a step the updates are zero and ``inner``'s state is returned
    unchanged (step counts included), so one bad batch neither moves the logits
    nor poisons Adam's moments. The state structure is ``inner``'s own.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        step = lambda u, s: inner.update(u, s, params, **extra_args)
        out_updates, _ = jax.eval_shape(step, updates, state)

        def skip(u, s):
            return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_updates), s

        # A conditional, not a select: a finite step does not copy the whole state.
        return jax.lax.cond(_all_finite(updates), step, skip, updates, state)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


class RCOState(NamedTuple):
    """State of :func:`rco`.

    Attributes:
      inner: the state of the chain (projection, Adam, retraction); its
        ``RetractionState.stats`` hold the budget normal (and costs, log-normalizers)
        of ``point``.
      point: the iterate those belong to, ``params + updates`` of the last step as
        ``optax.apply_updates`` forms it. When ``update`` is called with other
        parameters (a checkpoint restore, an outside edit) they are recomputed.
    """

    inner: optax.OptState
    point: PyTree


def _all_equal(a: PyTree, b: PyTree) -> jax.Array:
    """Whether two float trees are equal entry by entry (NaN never equals anything)."""
    # A sum of |x - y| is 0 exactly when every difference is (or is below the smallest
    # normal float, where the softmax cannot tell the two apart either).
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: total(jnp.abs(x - y)), a, b))
    return sum(diffs, jnp.float32(0)) == 0


def _recompute_if(pred: jax.Array, fn: Callable[[], PyTree], value: PyTree) -> PyTree:
    """``fn()`` if ``pred`` else ``value``, as a while loop of zero or one trip.

    A conditional whose branch returns an operand unchanged copies it on XLA:CPU (an
    ``(N, K)`` copy every step on the common path); a loop leaves its carry in place.
    """
    return jax.lax.while_loop(
        lambda carry: carry[0], lambda carry: (jnp.zeros_like(pred), fn()), (pred, value)
    )[1]


def rco(
    learning_rate: optax.ScalarOrSchedule,
    constraint: Constraint,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    nesterov: bool = False,
    rtol: float | None = None,
    max_retraction_evals: int = 64,
) -> optax.GradientTransformationExtraArgs:
    r"""RCO-Adam: Adam on the budget manifold ``{alpha : C(alpha) = B}``.

    Each step (Algorithm 1 of the reference)::

        g     = P_alpha(grad)                 tangent projection
        m     = P_alpha(m)                    momentum transport
        m, v  = Adam moments of g; u = -lr * m_hat / (sqrt(v_hat) + eps)
        alpha <- R(alpha + u)                 retraction: C(alpha) = B again

    with ``P`` the projection orthogonal to the closed-form normal
    ``n_ik = w_i p_ik (c_ik - mu_i)`` and ``R`` the shift along the costs. There
    is no penalty weight or multiplier: the budget holds at every iterate to a
    few ulps. Steps with non-finite gradients are skipped
    (:func:`skip_not_finite`). With ``BudgetConstraint(..., inequality=True)``
    this is plain Adam inside ``C(alpha) < B`` and RCO on the boundary: the
    projection and transport act only on outward directions there, and a step
    that would leave the set is retracted onto the boundary.

    One ``exp`` pass over the logits per step: the retraction forms the normal at
    the new iterate from its own exponentials and keeps it in the state
    (:class:`RCOState`) for the next step's projections. The state therefore holds,
    besides Adam's two moments, the iterate and its normal; ``update`` with
    parameters other than that iterate recomputes the normal, so restoring a
    checkpoint is always correct.

    Args:
      learning_rate: a scalar or an optax schedule.
      constraint: the :class:`~rco_jax.BudgetConstraint`.
      b1, b2, eps, eps_root, nesterov: as in ``optax.scale_by_adam``.
      rtol, max_retraction_evals: root-finder settings of :func:`retraction`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires
      ``params``.

    Example::

      >>> import jax, jax.numpy as jnp, optax
      >>> from rco_jax import BudgetConstraint, expected_cost, init_logits, rco
      >>> c = BudgetConstraint(jnp.array([2., 4., 8.]), budget=16.0, num_groups=4)
      >>> target = jnp.array([[0., 0., 1.]] * 4)         # wants 8 bits everywhere
      >>> loss = lambda a: jnp.sum((jax.nn.softmax(a) - target) ** 2)
      >>> alpha = init_logits(c)
      >>> opt = rco(0.1, c)
      >>> state = opt.init(alpha)
      >>> for _ in range(20):
      ...   updates, state = opt.update(jax.grad(loss)(alpha), state, alpha)
      ...   alpha = optax.apply_updates(alpha, updates)
      >>> bool(abs(expected_cost(alpha, c) - 16.0) < 1e-4)
      True

    References:
      Helcig & Alistarh, *Model Compression with Exact Budget Constraints via
      Riemannian Manifolds*, 2026 (arXiv 2605.00649).
    """
    tx = skip_not_finite(
        optax.chain(
            tangent_projection(constraint, check_finite=False),
            transport_moments(
                optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov),
                constraint,
            ),
            optax.scale_by_learning_rate(learning_rate),
            retraction(
                constraint,
                rtol=rtol,
                max_evals=max_retraction_evals,
                check_finite=False,
                keep_stats=True,
            ),
        )
    )

    def init_fn(params):
        return RCOState(inner=tx.init(params), point=params)

    def step_fn(grads, state, params):
        cached = optax.tree.get(state.inner, "stats", filtering=_is_state_field)
        stale = ~fast_path_ok(_all_equal(params, state.point))
        stats = _recompute_if(stale, lambda: softmax_stats(params, constraint), cached)
        # Stored before the step, so a skipped (non-finite) step keeps the right normal.
        inner = optax.tree.set(state.inner, _is_state_field, stats=stats)
        updates, inner = tx.update(grads, inner, params, softmax_stats=stats)
        return updates, RCOState(inner, optax.apply_updates(params, updates))

    # One compiled step, reused across calls: called eagerly (a plain Python loop), the
    # chain's conditional and root finder would otherwise be re-traced and re-compiled on
    # every step (about a second each). Under an outer jit this is simply inlined.
    step = jax.jit(step_fn)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # no transformation of the chain reads them
        _require_params(params, "rco")
        return step(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
