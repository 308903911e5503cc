"""End-to-end RCO search: ``solve(loss_fn, constraint, key=...)``.

Each step draws a budget-feasible Gumbel straight-through sample ``W`` (forward:
one-hot of a feasible assignment; backward: tempered softmax), evaluates
``loss_fn(W)``, and takes one :func:`rco_jax.rco` step on the logits, so the
relaxed iterate keeps ``C(alpha) = B`` exactly. The temperature is annealed
exponentially (1.0 -> 0.05 by default). The answer is the better (lower loss)
of :func:`rco_jax.discretize` of the final logits and the best sample seen.

The loop runs as jitted ``lax.scan`` chunks with a progress bar; ``solve`` is
also traceable, so ``jax.vmap`` over keys, budgets or learning rates runs a
whole sweep in one call (:func:`rco_jax.sweep` does that over every device).

Sharded losses: arrays that ``loss_fn`` closes over and that live on several
devices (model weights replicated, tokens split over a data axis, across
processes too) are passed to the jitted chunks as arguments, keeping their
sharding, instead of being embedded in the program as constants (which would
copy them to one host). Between chunks only per-step scalar losses come to the
host (the divergence check and the progress bar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from tqdm.auto import tqdm

from rco_jax.constraint import Constraint
from rco_jax.discrete import assignment_cost, discretize, gumbel_ste, one_hot
from rco_jax.local_search import polish as polish_assignment
from rco_jax.manifold import expected_cost, init_logits
from rco_jax.transforms import rco

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = ["SolveResult", "SolverDivergedError", "default_tau_schedule", "solve"]


class SolveResult(NamedTuple):
    """Outcome of a search (``solve`` and the baselines share it).

    Attributes:
      assignment: ``int32`` option per group (pytree for pytree constraints);
        always feasible: ``sum_i w_i c_{i, a_i} <= B``.
      logits: final relaxed logits (on the manifold for RCO).
      loss: ``loss_fn`` at the one-hot of ``assignment``.
      cost: real cost of ``assignment``.
      history: per-step arrays: ``loss`` (loss of the step's best sample),
        ``mean_loss`` (mean over the step's samples),
        ``expected_cost`` and ``budget_error`` (``C(alpha) - B`` after the step;
        negative inside an inequality budget),
        ``sample_cost`` (real cost of the step's sample), ``tau``.
      from_sample: whether the answer is the best sample seen (``True``) or the
        discretized final logits (``False``), before any polish.
      polish_evaluations: loss evaluations spent by the exact-budget polish
        (:func:`rco_jax.local_search.polish`; 0 when it did not run).
    """

    assignment: PyTree
    logits: PyTree
    loss: jax.Array
    cost: jax.Array
    history: dict[str, jax.Array]
    from_sample: jax.Array
    polish_evaluations: Any = 0


class SolverDivergedError(FloatingPointError):
    """``loss_fn`` produced a non-finite value; ``.result`` holds the best answer so far."""

    def __init__(self, message: str, result: SolveResult | None = None):
        super().__init__(message)
        self.result = result


def default_tau_schedule(num_steps: int, start: float = 1.0, end: float = 0.05):
    """Exponential annealing ``tau_t = start * (end / start) ** (t / (T - 1))``."""
    return optax.exponential_decay(start, max(num_steps - 1, 1), end / start)


def _is_traced(*trees: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


class _Carry(NamedTuple):
    logits: PyTree
    opt_state: Any
    aux: Any  # method-specific state (e.g. Lagrange multiplier)
    best_loss: jax.Array
    best_assignment: PyTree


def _check_loss_fn(loss_fn: LossFn, logits: PyTree, shape: Any = None) -> None:
    shape = jax.eval_shape(loss_fn, logits) if shape is None else shape
    if not (hasattr(shape, "shape") and shape.shape == ()):
        got = getattr(shape, "shape", type(shape).__name__)
        raise ValueError(
            f"loss_fn must return a scalar (the loss to minimize); it returned {got}. "
            "Reduce it, e.g. with jnp.mean or jnp.sum."
        )


def _on_several_devices(x: Any) -> bool:
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and len(x.sharding.device_set) > 1
    )


def split_sharded_closure(
    loss_fn: LossFn, example: PyTree
) -> tuple[Callable[[tuple, PyTree], jax.Array], tuple]:
    """Separates the multi-device arrays ``loss_fn`` closes over: ``(pure, args)``.

    ``pure(args, W) == loss_fn(W)``, with the closed-over ``jax.Array`` s that
    span several devices (sharded or replicated over a mesh) taken from
    ``args`` instead. Pass ``args`` to a jitted function as arguments: they keep
    their sharding, whereas closed-over arrays are embedded in the compiled
    program as constants (copied to one host; an error for arrays that span
    other processes' devices). Anything else stays closed over. Without such
    arrays ``pure`` calls ``loss_fn`` itself and ``args`` is empty. Also checks
    that ``loss_fn`` returns a scalar.

    Args:
      loss_fn: ``loss_fn(W) -> scalar``.
      example: an argument of ``W``'s structure, shapes and dtypes (arrays or
        ``jax.ShapeDtypeStruct`` s).
    """
    closed, shape = jax.make_jaxpr(loss_fn, return_shape=True)(example)
    _check_loss_fn(loss_fn, example, shape)
    hoist = [_on_several_devices(c) for c in closed.consts]
    if not any(hoist):
        return (lambda args, w: loss_fn(w)), ()
    args = tuple(c for c, h in zip(closed.consts, hoist) if h)

    def pure(args: tuple, w: PyTree) -> jax.Array:
        given = iter(args)
        consts = [next(given) if h else c for c, h in zip(closed.consts, hoist)]
        (out,) = jaxpr_as_fun(ClosedJaxpr(closed.jaxpr, consts))(*jax.tree.leaves(w))
        return out

    return pure, args


def select_best(loss: jax.Array, cost: jax.Array, budget: jax.Array, valid: jax.Array):
    """``(feasible, best_index, any_feasible)``: lowest finite loss within its own budget.

    ``cost`` and ``budget`` are ``(M,)`` or ``(M, q)``; ``valid`` masks the padding,
    whose loss is replaced by ``+inf`` so that it never wins.
    """
    m = loss.shape[0]
    within = jnp.all(jnp.reshape(cost <= budget, (m, -1)), axis=-1)
    feasible = valid & within & jnp.isfinite(loss)
    masked = jnp.where(feasible, loss, jnp.inf)
    return feasible, jnp.argmin(masked).astype(jnp.int32), jnp.any(feasible)


def gumbel_search(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    num_steps: int,
    optimizer: optax.GradientTransformation,
    tau: optax.Schedule,
    init: PyTree | None,
    feasible_samples: bool,
    penalty: Callable[[PyTree, Any], jax.Array] | None = None,
    aux_init: Any = (),
    aux_update: Callable[[PyTree, Any], Any] | None = None,
    num_samples: int = 1,
    chunk_size: int = 50,
    progress: bool | None = None,
    resolution: float | None = None,
    desc: str = "search",
) -> SolveResult:
    """The Gumbel straight-through loop shared by :func:`solve` and the baselines.

    ``feasible_samples`` selects the forward sample: the budget-feasible DP
    (RCO) or the unconstrained per-group argmax (penalty methods). ``penalty``
    adds ``penalty(logits, aux)`` to the objective; ``aux_update`` updates the
    method's state after each step (e.g. a multiplier).
    """
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}.")
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
    logits0 = init_logits(constraint, init)
    traced = _is_traced(key, constraint, logits0)
    if traced:  # inside jit/vmap: closed-over arrays are arguments of the outer trace already
        _check_loss_fn(loss_fn, logits0)
        pure, loss_args = (lambda args, w: loss_fn(w)), ()
    else:
        pure, loss_args = split_sharded_closure(loss_fn, logits0)
    budget = constraint.budget

    def sample(k, alpha, t):
        if feasible_samples:
            return gumbel_ste(k, alpha, constraint, tau(t), resolution=resolution)

        def free(x, kk):
            z = (x + jax.random.gumbel(kk, x.shape, x.dtype)) / tau(t)
            soft = jax.nn.softmax(z, -1)
            hard = jax.nn.one_hot(jnp.argmax(z, -1), x.shape[-1], dtype=x.dtype)
            return hard + (soft - jax.lax.stop_gradient(soft))

        leaves, treedef = jax.tree.flatten(alpha)
        keys = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(treedef, [free(x, kk) for x, kk in zip(leaves, keys)])

    def step(args, carry: _Carry, t):
        keys = jax.random.split(jax.random.fold_in(key, t), num_samples)

        def objective(alpha):
            # The gradient averages the straight-through estimates of num_samples draws.
            ws = jax.vmap(lambda k: sample(k, alpha, t))(keys)
            values = jax.vmap(lambda w: pure(args, w))(ws)
            extra = 0.0 if penalty is None else penalty(alpha, carry.aux)
            return jnp.mean(values) + extra, (values, ws)

        (_, (values, ws)), grads = jax.value_and_grad(objective, has_aux=True)(carry.logits)
        chosen_all = jax.tree.map(lambda x: jnp.argmax(x, -1).astype(jnp.int32), ws)
        costs_all = jax.vmap(lambda a: assignment_cost(a, constraint))(chosen_all)
        within = jnp.reshape(costs_all <= budget, (num_samples, -1)).all(-1)  # every budget
        ok = jnp.isfinite(values) & (feasible_samples | within)
        pick = jnp.argmin(jnp.where(ok, values, jnp.inf))
        value, s_cost = values[pick], costs_all[pick]
        chosen = jax.tree.map(lambda a: a[pick], chosen_all)
        better = ok[pick] & (value < carry.best_loss)
        updates, opt_state = optimizer.update(grads, carry.opt_state, carry.logits)
        logits = optax.apply_updates(carry.logits, updates)
        aux = carry.aux if aux_update is None else aux_update(logits, carry.aux)
        new = _Carry(
            logits=logits,
            opt_state=opt_state,
            aux=aux,
            best_loss=jnp.where(better, value, carry.best_loss),
            best_assignment=jax.tree.map(
                lambda a, b: jnp.where(better, a, b), chosen, carry.best_assignment
            ),
        )
        cost = expected_cost(logits, constraint)
        hist = dict(
            loss=value,
            mean_loss=jnp.mean(values),
            expected_cost=cost,
            budget_error=cost - budget,
            sample_cost=s_cost,
            tau=jnp.asarray(tau(t), jnp.float32),
        )
        # Steps past num_steps (padding of the last chunk) leave the carry unchanged.
        valid = t < num_steps
        new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, carry)
        return new, hist

    chunk = min(chunk_size, num_steps)
    run_chunk = jax.jit(lambda args, c, ts: jax.lax.scan(lambda c_, t: step(args, c_, t), c, ts))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape[:-1], jnp.int32), logits0)
    carry = _Carry(
        logits=logits0,
        opt_state=optimizer.init(logits0),
        aux=aux_init,
        best_loss=jnp.asarray(jnp.inf, jnp.result_type(float)),
        best_assignment=zeros,
    )
    final_loss_fn = loss_fn
    if loss_args:  # the final evaluation runs jitted too, the sharded arrays as arguments
        jitted_loss = jax.jit(pure)
        final_loss_fn = lambda w: jitted_loss(loss_args, w)
    show = (not traced) if progress is None else (progress and not traced)
    bar = tqdm(total=num_steps, desc=desc, disable=not show, leave=False)
    histories = []
    for start in range(0, num_steps, chunk):
        carry, hist = run_chunk(loss_args, carry, jnp.arange(start, start + chunk))
        histories.append(hist)
        if not traced:
            done = min(chunk, num_steps - start)
            # The only host transfer per chunk: the steps' scalar losses and the best one.
            losses, best = jax.device_get((hist["loss"], carry.best_loss))
            losses = np.asarray(losses)[:done]
            if not np.all(np.isfinite(losses)):
                bad = start + int(np.argmin(np.isfinite(losses)))
                bar.close()
                partial = _finish(
                    final_loss_fn, constraint, carry, histories, start + done, resolution
                )
                raise SolverDivergedError(
                    f"loss_fn returned a non-finite value at step {bad}; check the loss for "
                    "log(0), division by zero or overflow. `err.result` holds the best "
                    "feasible answer found before that step.",
                    partial,
                )
            bar.update(done)
            bar.set_postfix(loss=f"{float(losses[-1]):.4g}", best=f"{float(best):.4g}")
    bar.close()
    return _finish(final_loss_fn, constraint, carry, histories, num_steps, resolution)


def _finish(loss_fn, constraint, carry: _Carry, histories, num_steps: int, resolution):
    history = {
        k: jnp.concatenate([h[k] for h in histories])[:num_steps] for k in histories[0].keys()
    }
    final = discretize(carry.logits, constraint, resolution=resolution)
    final_loss = loss_fn(
        one_hot(final, constraint, jnp.result_type(*jax.tree.leaves(carry.logits)))
    )
    use_best = carry.best_loss < final_loss
    assignment = jax.tree.map(lambda a, b: jnp.where(use_best, a, b), carry.best_assignment, final)
    return SolveResult(
        assignment=assignment,
        logits=carry.logits,
        loss=jnp.where(use_best, carry.best_loss, final_loss),
        cost=assignment_cost(assignment, constraint),
        history=history,
        from_sample=use_best,
        polish_evaluations=jnp.asarray(0, jnp.int32),
    )


def solve(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    num_steps: int = 200,
    learning_rate: optax.ScalarOrSchedule = 0.05,
    tau: optax.Schedule | tuple[float, float] = (1.0, 0.05),
    init: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 1,
    chunk_size: int = 50,
    progress: bool | None = None,
    resolution: float | None = None,
    num_restarts: int = 1,
    polish: bool | None = None,
    polish_evals: int = 256,
) -> SolveResult:
    """Minimizes ``loss_fn`` over assignments within the budget, by RCO.

    Args:
      loss_fn: ``loss_fn(W) -> scalar`` where ``W`` is ``(N, K)`` (a pytree
        matching ``constraint`` for pytree constraints): in the forward pass
        the one-hot of a budget-feasible assignment, with straight-through
        gradients. Any differentiable JAX function; it need not decompose over
        groups.
      constraint: the :class:`~rco_jax.BudgetConstraint` (concrete costs). With
        ``inequality=True`` the relaxation may leave budget unspent.
      key: PRNG key for the Gumbel noise.
      num_steps: number of RCO steps.
      learning_rate: Adam learning rate (scalar or optax schedule).
      tau: ``(start, end)`` of the exponential temperature annealing, or an
        optax schedule ``t -> tau``.
      init: initial logits (retracted onto the manifold); default uniform.
      optimizer: replaces ``rco(learning_rate, constraint)``; must keep the
        logits on the manifold for the guarantees to hold.
      num_samples: Gumbel samples per step; their straight-through gradients
        are averaged and the best feasible one is kept (costs ``num_samples``
        loss evaluations and DP solves per step).
      chunk_size: steps per jitted ``lax.scan`` call (progress granularity).
      progress: show a tqdm bar (default: when not traced).
      resolution: cost discretization of the knapsack DP for real costs.
      num_restarts: independent searches (keys split from ``key``), run as one
        ``vmap``; the best feasible answer is kept (its ``history`` too).
      polish: finish with :func:`rco_jax.local_search.polish`, a steepest-descent
        walk over budget-keeping single and pair moves on the true loss, of at
        most ``polish_evals`` loss evaluations. ``None`` (default): polish when
        the loss is cheap, i.e. when ``polish_evals`` evaluations cost at most
        :data:`CHEAP_POLISH_FLOPS` (1e9) floating-point operations by XLA's cost
        analysis of the jitted loss (deterministic: the same on every machine);
        never inside ``jit``/``vmap`` (pass ``True`` there).
        ``result.polish_evaluations`` reports the cost.
      polish_evals: bound on the polish's loss evaluations.

    Returns:
      A :class:`SolveResult`; ``result.assignment`` is always feasible.

    Raises:
      ValueError: ``num_steps <= 0`` or ``loss_fn`` not returning a scalar.
      SolverDivergedError: ``loss_fn`` returned NaN/inf (eager calls only).

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, solve
      >>> c = BudgetConstraint(jnp.array([1., 2., 3.]), budget=8.0, num_groups=4)
      >>> value = jnp.array([[0., 1., 1.5], [0., 2., 2.5], [0., .5, .6], [0., 1., 3.]])
      >>> res = solve(lambda w: -jnp.sum(w * value), c, key=jax.random.key(0),
      ...             num_steps=100, progress=False)
      >>> float(res.cost) <= 8.0
      True
    """
    if isinstance(tau, tuple):
        if len(tau) != 2 or not all(t > 0 for t in tau):
            raise ValueError(f"tau must be (start, end) with positive values; got {tau}.")
        tau = default_tau_schedule(num_steps if isinstance(num_steps, int) else 1, *tau)
    if not isinstance(num_restarts, int) or num_restarts < 1:
        raise ValueError(f"num_restarts must be a positive integer; got {num_restarts!r}.")
    if not isinstance(polish_evals, int) or polish_evals < 0:
        raise ValueError(f"polish_evals must be a non-negative integer; got {polish_evals!r}.")
    opt = optimizer if optimizer is not None else rco(learning_rate, constraint)

    def search(k: jax.Array, show: bool | None) -> SolveResult:
        return gumbel_search(
            loss_fn,
            constraint,
            key=k,
            num_steps=num_steps,
            optimizer=opt,
            tau=tau,
            init=init,
            feasible_samples=True,
            num_samples=num_samples,
            chunk_size=chunk_size,
            progress=show,
            resolution=resolution,
            desc="rco",
        )

    if num_restarts == 1:
        result = search(key, progress)
    else:
        runs = jax.vmap(lambda k: search(k, False))(jax.random.split(key, num_restarts))
        every = jnp.ones(num_restarts, bool)
        _, best, _ = select_best(runs.loss, runs.cost, constraint.budget, every)
        result = jax.tree.map(lambda x: x[best], runs)
    if polish is False or polish_evals == 0:
        return result
    if _is_traced(key, constraint, result.loss):  # inside jit/vmap: only when asked
        if not polish:
            return result
        out = polish_assignment(
            loss_fn, constraint, result.assignment, max_evals=polish_evals, loss=result.loss
        )
    else:
        # Sharded arrays the loss closes over stay arguments (as in the search).
        pure, loss_args = split_sharded_closure(loss_fn, result.logits)
        if polish is None and not _loss_is_cheap(pure, loss_args, result.logits, polish_evals):
            return result
        run = jax.jit(
            lambda args, a, value: polish_assignment(
                lambda w: pure(args, w), constraint, a, max_evals=polish_evals, loss=value
            )
        )
        out = run(loss_args, result.assignment, result.loss)
    return result._replace(
        assignment=out.assignment,
        loss=out.loss,
        cost=assignment_cost(out.assignment, constraint),
        polish_evaluations=out.evaluations,
    )


#: ``polish=None`` polishes when ``polish_evals`` evaluations of the loss cost at most this
#: many floating-point operations (XLA's cost analysis): well under a second on one CPU core.
CHEAP_POLISH_FLOPS = 1e9


def _loss_is_cheap(pure: Callable, loss_args: tuple, example: PyTree, evals: int) -> bool:
    """Whether ``evals`` evaluations of the loss fit in :data:`CHEAP_POLISH_FLOPS`.

    Decided from the compiled program's FLOP count, not from a timing, so the choice (and the
    answer) is the same on every machine and run.
    """
    lowered = jax.jit(pure).lower(loss_args, example)
    costs = lowered.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    flops = float((costs or {}).get("flops", np.inf))
    return evals * max(flops, 1.0) <= CHEAP_POLISH_FLOPS
