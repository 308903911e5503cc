"""Sweeps of :func:`rco_jax.solve` over restarts, learning rates and budgets, on every device.

``sweep`` builds the grid ``restarts x learning_rates x budgets``, shards its runs over
the devices of a mesh (by default every device of every process, ``jax.devices()``) and
runs it as one jitted call. There is no communication code here: the grid's coordinates
are global ``jax.Array`` s with a ``NamedSharding`` on their leading axis, each device runs
its own runs as a ``vmap`` of :func:`rco_jax.solve` inside ``jax.shard_map`` (manual over
the grid axis only, so the sequential loops inside ``solve``, e.g. the knapsack DP's
``lax.map``, are never split across devices), and the other mesh axes, such as a data axis
of the loss's arrays, are left to XLA's SPMD partitioner. The same code runs on one host or
many (``jax.distributed``). The best feasible run is chosen on the device and returned
replicated, so every process can read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rco_jax.constraint import BudgetConstraint, Constraint, MultiBudget, _validate_reachable
from rco_jax.manifold import init_logits
from rco_jax.solve import (
    LossFn,
    SolverDivergedError,
    SolveResult,
    select_best,
    solve,
    split_sharded_closure,
)

PyTree = Any

__all__ = ["GRID_AXIS", "SweepResult", "sweep"]

GRID_AXIS = "grid"
"""Mesh axis the grid is sharded over when a given mesh has one (else all its axes)."""


class SweepResult(NamedTuple):
    """Every run of a :func:`sweep`, along a leading grid axis of length ``R * L * B``.

    Run ``i`` has grid coordinates ``(r, l, b)`` with ``i = (r * L + l) * B + b``
    (restart-major, budget fastest) and equals
    ``solve(loss_fn, constraint.replace(budget=budgets[b]), key=jax.random.fold_in(key, r),
    learning_rate=learning_rates[l], **solve_kwargs)`` (traced, as under ``jax.vmap``).

    Attributes:
      assignment, logits, loss, cost, history, from_sample, polish_evaluations: the
        :class:`~rco_jax.SolveResult` fields of every run, each with the leading
        grid axis (``history`` values are ``(R * L * B, num_steps)``).
      restart: ``int32`` restart index ``r`` of every run (its key is
        ``jax.random.fold_in(key, r)``).
      learning_rate: learning rate of every run (``nan`` when the sweep used a
        schedule or an ``optimizer`` instead).
      budget: budget of every run, ``(R * L * B,)`` for a ``BudgetConstraint``,
        ``(R * L * B, q)`` for a ``MultiBudget``.
      feasible: whether the run's loss is finite and its cost within its own
        budget (every budget, for a ``MultiBudget``).
      best_index: ``int32`` index of the best run: the lowest loss among the
        feasible runs.
      best: that run as a :class:`~rco_jax.SolveResult`, replicated on every
        device of the mesh.

    Sharding: with a grid size that is a multiple of the mesh's device count the
    per-run fields stay sharded over the mesh's grid axis (across processes,
    read them with ``jax.experimental.multihost_utils.process_allgather``);
    otherwise the grid was padded and the per-run fields, with the padding
    dropped, come back replicated.
    """

    assignment: PyTree
    logits: PyTree
    loss: jax.Array
    cost: jax.Array
    history: dict[str, jax.Array]
    from_sample: jax.Array
    polish_evaluations: jax.Array
    restart: jax.Array
    learning_rate: jax.Array
    budget: jax.Array
    feasible: jax.Array
    best_index: jax.Array
    best: SolveResult


def _grid_mesh(mesh: Mesh | Sequence[jax.Device] | None) -> tuple[Mesh, Any]:
    """The mesh and the axis (or axes) the grid's leading dimension is sharded over."""
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), (GRID_AXIS,))
    elif not isinstance(mesh, Mesh):
        devices = list(mesh)
        if not devices:
            raise ValueError("sweep: `mesh` is an empty list of devices.")
        mesh = Mesh(np.asarray(devices), (GRID_AXIS,))
    if GRID_AXIS in mesh.axis_names:
        return mesh, GRID_AXIS
    names = tuple(mesh.axis_names)
    return mesh, names[0] if len(names) == 1 else names


def _axis_size(mesh: Mesh, axis: Any) -> int:
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in axes)


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from identical host data in every process (each fills its shards)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _check_learning_rates(learning_rates: Any) -> np.ndarray:
    try:
        lrs = np.asarray(learning_rates, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"sweep: learning_rates must be a sequence of positive numbers; got {learning_rates!r}."
        ) from e
    if lrs.ndim != 1:
        raise ValueError(
            f"sweep: learning_rates must be a 1-D sequence of scalars; got shape {lrs.shape}."
        )
    if lrs.size == 0:
        raise ValueError("sweep: the grid is empty: learning_rates has no entries.")
    bad = ~(np.isfinite(lrs) & (lrs > 0))
    if np.any(bad):
        raise ValueError(
            f"sweep: learning_rates must be finite and positive; got {lrs[bad].tolist()}."
        )
    return lrs


def _check_budgets(budgets: Any, constraint: Constraint) -> np.ndarray:
    """``(B,)`` or ``(B, q)`` float64 budgets, each checked like a concrete constraint's."""
    shape = tuple(np.shape(constraint.budget))
    what = "scalars" if not shape else f"({shape[0]},) vectors (one entry per budget)"
    kind = type(constraint).__name__
    try:
        b = np.asarray(budgets, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sweep: budgets must be a sequence of {what} for this {kind}.") from e
    if b.ndim >= 1 and b.shape[0] == 0:
        raise ValueError("sweep: the grid is empty: budgets has no entries.")
    if b.shape[1:] != shape or b.ndim != 1 + len(shape):
        raise ValueError(
            f"sweep: budgets must be a sequence of {what} for this {kind}, i.e. of shape "
            f"(B,{' ' + str(shape[0]) if shape else ''}); got shape {b.shape}."
        )
    lo, hi = (np.asarray(x, np.float64).reshape(shape) for x in constraint.budget_ranges())
    ok = np.isfinite(b) & (lo < b) & ((b < hi) | constraint.inequality)
    bad = np.flatnonzero(~ok.reshape(len(b), -1).all(-1))
    if bad.size:
        rule = "above the minimum total cost" if constraint.inequality else "strictly between"
        raise ValueError(
            f"sweep: budgets {bad[:8].tolist()} (e.g. {b[bad[0]].tolist()}) are not reachable by "
            f"the relaxation: each must be {rule} the minimum {lo.tolist()} and the maximum "
            f"{hi.tolist()} total cost."
        )
    if isinstance(constraint, MultiBudget) and constraint.coupled:
        for i, bi in enumerate(b):
            try:
                _validate_reachable(
                    constraint.replace(budget=jnp.asarray(bi, constraint.budget.dtype))
                )
            except ValueError as e:
                raise ValueError(f"sweep: budgets[{i}] = {bi.tolist()}: {e}") from e
    return b


def sweep(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    num_restarts: int = 1,
    learning_rates: Sequence[float] | np.ndarray | None = None,
    budgets: Sequence[Any] | np.ndarray | None = None,
    mesh: Mesh | Sequence[jax.Device] | None = None,
    **solve_kwargs: Any,
) -> SweepResult:
    """Runs :func:`rco_jax.solve` over a grid of restarts, learning rates and budgets.

    The grid is ``restarts x learning_rates x budgets`` (``R * L * B`` runs); run
    ``(r, l, b)`` minimizes ``loss_fn`` under budget ``budgets[b]`` with Adam
    learning rate ``learning_rates[l]`` and PRNG key ``jax.random.fold_in(key, r)``.
    The runs are sharded over the mesh's grid axis (padded up to a multiple of its
    size with copies of run 0 that are masked out) and computed in one jitted
    call, each device a ``vmap`` of ``solve`` over its runs (traced: no progress
    bar, no eager divergence check; a run whose loss is not finite is simply not
    feasible). The best run is ``argmin_i {loss_i : cost_i <= budget_i, loss_i
    finite}``, each run judged against its own budget.

    Arrays that ``loss_fn`` closes over and that span several devices (weights
    replicated, a calibration batch split over a ``"data"`` axis of the same
    devices) are passed to the jitted call as arguments. Give ``mesh`` an axis named
    ``"grid"`` (e.g. a ``("grid", "data")`` mesh) to shard the grid over that axis
    only: the other axes keep the arrays' sharding (each grid row then evaluates the
    loss data-parallel over its ``"data"`` devices). A mesh without a ``"grid"``
    axis is used whole for the grid, and such arrays are replicated onto every
    device. Across processes (``jax.distributed``) every process calls ``sweep``
    with the same arguments.

    Args:
      loss_fn: ``loss_fn(W) -> scalar``, as for :func:`rco_jax.solve`.
      constraint: a :class:`~rco_jax.BudgetConstraint` or
        :class:`~rco_jax.MultiBudget` with concrete costs.
      key: one PRNG key (typed or raw ``uint32``).
      num_restarts: ``R``, independent restarts (different Gumbel noise).
      learning_rates: ``L`` positive learning rates; default one run with
        ``solve_kwargs.get("learning_rate", 0.05)`` (which may then be a schedule).
      budgets: ``B`` budgets: scalars for a ``BudgetConstraint``, ``(q,)`` vectors
        for a ``MultiBudget``, each within the constraint's range; default the
        constraint's own. They are traced, so the knapsack DP sizes its table to
        the whole cost range.
      mesh: a ``jax.sharding.Mesh`` or a list of devices; default ``jax.devices()``
        (every device of every process) on one axis ``"grid"``.
      **solve_kwargs: passed to :func:`rco_jax.solve` (``num_steps``, ``tau``,
        ``num_samples``, ``chunk_size``, ``init``, ``optimizer``, ``resolution``,
        ``learning_rate``); ``progress`` is ignored.

    Returns:
      A :class:`SweepResult`: the runs along a leading grid axis, their grid
      coordinates and ``.best``, the best feasible run.

    Raises:
      ValueError: an empty grid, ``num_restarts < 1``, learning rates that are not
        positive, budgets of the wrong shape or out of range, or
        ``learning_rates`` together with ``learning_rate`` or ``optimizer``.
      SolverDivergedError: no run is feasible with a finite loss; ``err.result``
        holds the :class:`SweepResult`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from rco_jax import BudgetConstraint, sweep
      >>> c = BudgetConstraint(jnp.array([1., 2., 3.]), budget=8.0, num_groups=4)
      >>> value = jnp.array([[0., 1., 1.5], [0., 2., 2.5], [0., .5, .6], [0., 1., 3.]])
      >>> out = sweep(lambda w: -jnp.sum(w * value), c, key=jax.random.key(0),
      ...             num_restarts=2, learning_rates=[0.05, 0.2], budgets=[6.0, 8.0],
      ...             num_steps=30)
      >>> out.loss.shape, out.budget.tolist()[:4]
      ((8,), [6.0, 8.0, 6.0, 8.0])
      >>> bool(out.best.cost <= out.budget[out.best_index])
      True
    """
    run_grid, args, num_runs = _build_sweep(
        loss_fn, constraint, key, num_restarts, learning_rates, budgets, mesh, solve_kwargs
    )
    return _assemble(run_grid(*args), num_runs)


def _build_sweep(loss_fn, constraint, key, num_restarts, learning_rates, budgets, mesh, kwargs):
    """Validates the arguments; returns the jitted grid function, its arguments, the run count.

    Separate from :func:`sweep` so that a benchmark can time the compiled call alone.
    """
    if not isinstance(constraint, BudgetConstraint | MultiBudget):
        raise TypeError(
            f"sweep: constraint must be a BudgetConstraint or MultiBudget; got "
            f"{type(constraint).__name__}."
        )
    if isinstance(num_restarts, bool) or not isinstance(num_restarts, int | np.integer):
        raise ValueError(f"sweep: num_restarts must be a positive integer; got {num_restarts!r}.")
    if num_restarts < 1:
        raise ValueError(f"sweep: the grid is empty: num_restarts is {num_restarts}.")
    kwargs = dict(kwargs)
    kwargs.pop("progress", None)
    if learning_rates is not None:
        clash = [k for k in ("learning_rate", "optimizer") if k in kwargs]
        if clash:
            raise ValueError(
                f"sweep: learning_rates is given, so {clash[0]!r} must not be: the grid sets "
                "each run's learning rate (for one fixed value pass learning_rate alone)."
            )
        lrs = _check_learning_rates(learning_rates)
        lr_coord = lrs
    else:
        lrs = None
        fixed = kwargs.get("learning_rate", 0.05)
        plain = "optimizer" not in kwargs and isinstance(fixed, int | float | np.number)
        lr_coord = np.array([float(fixed) if plain else np.nan])
    budget_grid = None if budgets is None else _check_budgets(budgets, constraint)
    b_coord = (
        np.asarray(constraint.budget, np.float64)[None] if budget_grid is None else budget_grid
    )

    mesh, axis = _grid_mesh(mesh)
    size = _axis_size(mesh, axis)
    num_l, num_b = len(lr_coord), len(b_coord)
    num_runs = num_restarts * num_l * num_b
    padded = -(-num_runs // size) * size
    r_idx, l_idx, b_idx = np.unravel_index(np.arange(num_runs), (num_restarts, num_l, num_b))
    fill = np.zeros(padded - num_runs, np.int64)  # padding: copies of run 0, masked out
    r_idx, l_idx, b_idx = (np.concatenate([a, fill]) for a in (r_idx, l_idx, b_idx))

    float_dtype = jnp.result_type(float)
    budget_dtype = constraint.budget.dtype
    grid_sharding = NamedSharding(mesh, P(axis))
    replicated = NamedSharding(mesh, P())
    restart = _global(r_idx.astype(np.int32), grid_sharding)
    lr = _global(lr_coord[l_idx].astype(float_dtype), grid_sharding)
    budget = _global(b_coord[b_idx].astype(budget_dtype), grid_sharding)
    valid = _global(np.arange(padded) < num_runs, grid_sharding)

    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if (typed and key.shape != ()) or (not typed and key.ndim != 1):
        raise ValueError(
            f"sweep: key must be one PRNG key (e.g. jax.random.key(0)); got shape {key.shape}. "
            "The restarts' keys are derived from it with jax.random.fold_in."
        )
    impl = jax.random.key_impl(key) if typed else None
    key_data = _global(np.asarray(jax.random.key_data(key) if typed else key), replicated)

    example = jax.eval_shape(lambda: init_logits(constraint, kwargs.get("init")))
    pure, loss_args = split_sharded_closure(loss_fn, example)

    def one_run(args, base_key, r, lr_i, budget_i):
        c = constraint if budget_grid is None else constraint.replace(budget=budget_i)
        run_kwargs = kwargs if lrs is None else {**kwargs, "learning_rate": lr_i}
        return solve(
            lambda w: pure(args, w),
            c,
            key=jax.random.fold_in(base_key, r),
            progress=False,
            **run_kwargs,
        )

    out_runs = grid_sharding if padded == num_runs else replicated

    # Each device runs its own slice of the grid (manual over the grid axes, so no loop
    # inside solve is partitioned across runs); other mesh axes stay automatic, e.g. a
    # "data" axis that the loss's closed-over arrays are sharded over.
    manual = set(axis) if isinstance(axis, tuple) else {axis}

    def local_runs(args, key_data, restart, lr, budget):
        base_key = key_data if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
        return jax.vmap(one_run, in_axes=(None, None, 0, 0, 0))(args, base_key, restart, lr, budget)

    @jax.jit
    def run_grid(args, key_data, restart, lr, budget, valid):
        res = jax.shard_map(
            local_runs,
            mesh=mesh,
            in_specs=(P(), P(), P(axis), P(axis), P(axis)),
            out_specs=P(axis),
            axis_names=manual,
            check_vma=False,  # solve's loops start from grid-invariant values (init_logits)
        )(args, key_data, restart, lr, budget)
        feasible, best_index, any_feasible = select_best(res.loss, res.cost, budget, valid)
        best = jax.tree.map(lambda x: x[best_index], res)
        runs = jax.tree.map(lambda x: x[:num_runs], (res, restart, lr, budget, feasible))
        runs = jax.lax.with_sharding_constraint(runs, out_runs)
        best = jax.lax.with_sharding_constraint((best, best_index, any_feasible), replicated)
        return runs, best

    args = (loss_args, key_data, restart, lr, budget, valid)
    return run_grid, args, num_runs


def _assemble(outputs, num_runs: int) -> SweepResult:
    (res, restart, lr, budget, feasible), (best, best_index, any_feasible) = outputs
    out = SweepResult(
        *res,
        restart=restart,
        learning_rate=lr,
        budget=budget,
        feasible=feasible,
        best_index=best_index,
        best=best,
    )
    if not bool(any_feasible):  # a replicated scalar: readable in every process
        raise SolverDivergedError(
            f"sweep: none of the {num_runs} runs is feasible with a finite loss (loss_fn returned "
            "NaN/inf in every run?); `err.result` holds the SweepResult.",
            out,
        )
    return out
