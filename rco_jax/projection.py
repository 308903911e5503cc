r"""Doubly-stochastic and capacity-balanced softmax: the column-budget retraction as a layer.

A row-softmax whose column sums are fixed is a multiple-budget manifold
(:meth:`rco_jax.MultiBudget.columns`): ``N`` rows with ``K`` options, costs
``c^(j)_ik = [k == j]`` and budgets ``B_j = capacity_j`` for ``K - 1`` columns
(the last follows). Its retraction shifts the columns,
``T_ik = softmax_k(alpha_ik + g_k)``, and the shifts minimise the convex dual

.. math::

    F(g) = \sum_i \operatorname{logsumexp}_k(\alpha_{ik} + g_k) - \sum_k g_k\,\mathrm{cap}_k,

so ``T`` is the entropic (KL) projection of ``exp(alpha)`` onto the matrices with
unit row sums and the given column sums: the Birkhoff polytope for a square
matrix with unit capacities, which Sinkhorn-Knopp approximates by alternating
normalisations. Here:

* a few Sinkhorn sweeps in the log domain warm-start the shifts (an initializer);
* the damped Newton solver of :mod:`rco_jax.manifold` finishes to float precision
  (``K - 1`` unknowns; quadratic convergence; a line search on ``F``);
* gradients come from the implicit function theorem (one ``(K-1) x (K-1)``
  solve), never from unrolled iterations: the backward pass stores only the
  result, whatever the number of iterations.

Everything is batched over leading axes (``vmap``), works under ``jit`` and
``grad``, in float32 and float64. A matrix with non-finite logits comes back as
NaN; the rest of the batch is unaffected.

References: Sinkhorn & Knopp (1967); Cuturi, "Sinkhorn distances" (2013);
Wang & Qiu, "Accelerating Birkhoff projection for manifold-constrained
hyper-connections" (2026, arXiv 2606.07574), Newton with implicit
differentiation for ``n = 4``; Helcig & Alistarh (2026) for the budget manifold.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax.constraint import MultiBudget
from rco_jax.manifold import compute_dtype, retract_with_info

__all__ = ["balanced_softmax", "birkhoff_projection", "sinkhorn_shifts"]


def sinkhorn_shifts(logits: jax.Array, capacities: jax.Array, sweeps: int) -> jax.Array:
    """Column shifts ``g`` (``(K,)``) after ``sweeps`` log-domain Sinkhorn sweeps.

    Each sweep normalises the rows (implicitly, by the softmax) and then moves
    every column's shift so its sum matches its capacity:
    ``g_k += log cap_k - log sum_i softmax(alpha_i + g)_k``. An initializer for
    the Newton solver, differentiated by nobody.
    """
    log_cap = jnp.log(capacities)
    g = jnp.zeros_like(log_cap)
    for _ in range(sweeps):
        y = logits + g
        log_p = y - jax.nn.logsumexp(y, axis=-1, keepdims=True)
        g = g + log_cap - jax.nn.logsumexp(log_p, axis=-2)
    return g


# Logit spreads above this are solved by continuation from a higher temperature.
_SPREAD = 100.0
_COOLING = 4.0


def _balanced(x: jax.Array, capacities: jax.Array, rtol, max_iter: int, sweeps: int):
    """One ``(N, K)`` matrix: ``(T, info)``.

    Near-permutation inputs (a logit spread of hundreds or more) have one-hot
    rows in float precision, where the Hessian vanishes: the shifts are then
    found by continuation (epsilon scaling): solve for ``alpha / s`` with
    ``s = 4^m, ..., 4`` and warm-start each temperature from the previous
    shifts, before the solve at ``s = 1``. Ordinary inputs skip it.
    """
    n, k = x.shape
    mb = MultiBudget.columns(capacities, n)
    finite = jnp.isfinite(x)
    spread = jnp.max(jnp.where(finite, x, -jnp.inf)) - jnp.min(jnp.where(finite, x, jnp.inf))
    stages = jnp.where(
        spread > _SPREAD, jnp.ceil(jnp.log(spread / _SPREAD) / jnp.log(_COOLING)), 0
    ).astype(jnp.int32)

    def solve(s, g, cap_iter):
        """Shifts (original units) at temperature ``s``, warm-started from ``g``."""
        xs = x / s
        h = g / s + sinkhorn_shifts(xs + g / s, capacities, sweeps)
        init = jnp.where(jnp.isfinite(h), h - h[-1], 0)[: k - 1]
        y, info = retract_with_info(xs, mb, rtol=rtol, max_evals=cap_iter, init_shift=init)
        return jnp.concatenate([info.shift, jnp.zeros((1,), x.dtype)]) * s, (y, info)

    def stage(carry):
        i, g = carry
        s = _COOLING ** (stages - i).astype(x.dtype)
        return i + 1, solve(s, g, max_iter)[0]

    _, g = jax.lax.while_loop(
        lambda c: c[0] < stages, stage, (jnp.zeros((), jnp.int32), jnp.zeros((k,), x.dtype))
    )
    g = jax.lax.stop_gradient(g)
    _, (y, info) = solve(jnp.ones((), x.dtype), g, max_iter)
    # A matrix with a non-finite logit has no projection: all of it is NaN.
    return jnp.where(jnp.all(finite), jax.nn.softmax(y, axis=-1), jnp.nan), info


@functools.partial(jax.jit, static_argnames=("rtol", "max_iter", "sweeps"))
def _batched(x, capacities, *, rtol, max_iter, sweeps):
    return jax.vmap(lambda m: _balanced(m, capacities, rtol, max_iter, sweeps))(x)


def balanced_softmax(
    logits: jax.Array,
    capacities: Any,
    *,
    tol: float | None = None,
    max_iter: int = 64,
    warm_start: int = 3,
    return_info: bool = False,
):
    """Row-softmax with fixed column sums: ``T_ik = exp(logits_ik + f_i + g_k)``.

    Every row of ``T`` is on the simplex and column ``k`` sums to
    ``capacities[k]`` (e.g. tokens routed to experts with fixed expert
    capacity). ``T`` is the KL projection of ``exp(logits)`` onto that set.

    Args:
      logits: ``(..., N, K)``; leading axes are a batch.
      capacities: ``(K,)`` positive, summing to ``N``.
      tol: largest ``|column sum - capacity|`` accepted, per column; default
        ``2 N`` machine epsilons of the compute dtype (float32 at least).
      max_iter: cap on Newton evaluations per matrix.
      warm_start: log-domain Sinkhorn sweeps before Newton.
      return_info: also return the per-matrix
        :class:`~rco_jax.RetractionInfo` (``converged``, ``num_evals``, ...).

    Returns:
      ``T`` with the logits' shape and dtype (and the info if asked).

    Raises:
      ValueError: on a shape other than ``(..., N, K)``, or (concrete)
        capacities that are not positive or do not sum to ``N``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from rco_jax import balanced_softmax
      >>> logits = jax.random.normal(jax.random.key(0), (6, 3))   # 6 tokens, 3 experts
      >>> t = balanced_softmax(logits, jnp.array([3.0, 2.0, 1.0]))
      >>> [round(float(s), 5) for s in t.sum(0)]
      [3.0, 2.0, 1.0]
    """
    logits = jnp.asarray(logits)
    if logits.ndim < 2:
        raise ValueError(
            f"balanced_softmax: logits must have shape (..., N, K); got {logits.shape}."
        )
    n, k = logits.shape[-2:]
    dtype = compute_dtype(logits.dtype)
    cap = jnp.asarray(capacities, dtype)
    if cap.shape != (k,):
        raise ValueError(
            f"balanced_softmax: capacities must have shape (K,) = ({k},); got {cap.shape}."
        )
    MultiBudget.columns(cap, n)  # validates concrete capacities
    # The column budgets' scale is N: tol = 2 N eps by default.
    rtol = 2 * float(np.finfo(dtype).eps) if tol is None else float(tol) / n
    x = logits.astype(dtype).reshape(-1, n, k)
    t, info = _batched(x, cap, rtol=rtol, max_iter=max_iter, sweeps=warm_start)
    t = t.reshape(logits.shape).astype(logits.dtype)
    if return_info:
        batch = logits.shape[:-2]
        return t, jax.tree.map(lambda a: a.reshape(batch + a.shape[1:]), info)
    return t


def birkhoff_projection(
    logits: jax.Array,
    *,
    tol: float | None = None,
    max_iter: int = 64,
    warm_start: int = 3,
    return_info: bool = False,
):
    """Doubly-stochastic matrix ``T_ij = exp(logits_ij + f_i + g_j)``: rows and columns sum to 1.

    The entropic projection onto the Birkhoff polytope (what Sinkhorn-Knopp
    iterates towards), solved to float precision by Newton's method on the
    ``n - 1`` column shifts, with implicit gradients. See
    :func:`balanced_softmax` (``capacities = 1``) for the arguments.

    Example::

      >>> import jax
      >>> from rco_jax import birkhoff_projection
      >>> t = birkhoff_projection(10.0 * jax.random.normal(jax.random.key(0), (128, 4, 4)))
      >>> bool(abs(t.sum(-1) - 1).max() < 1e-5 and abs(t.sum(-2) - 1).max() < 1e-5)
      True
    """
    logits = jnp.asarray(logits)
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"birkhoff_projection: logits must be square matrices (..., n, n); got "
            f"{logits.shape}. For N x K with column capacities use balanced_softmax."
        )
    n = logits.shape[-1]
    return balanced_softmax(
        logits,
        jnp.ones((n,), compute_dtype(logits.dtype)),
        tol=tol,
        max_iter=max_iter,
        warm_start=warm_start,
        return_info=return_info,
    )
