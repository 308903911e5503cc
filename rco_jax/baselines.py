"""Baselines in :func:`rco_jax.solve`'s calling convention, for side-by-side comparisons.

* :func:`penalty` -- Gumbel straight-through + Adam on unconstrained logits with
  a quadratic budget penalty ``lam * ((C(alpha) - B) / B)^2`` (only the excess
  over ``B`` for an inequality budget). The forward sample is the plain
  per-group argmax, so it may violate the budget.
* :func:`augmented_lagrangian` -- the same with ``lam * g + rho / 2 * g^2``,
  ``g = (C - B) / B``, and dual ascent ``lam <- lam + rho * g`` every step.
* :func:`evolutionary` -- EvoPress-style search on assignments: budget-keeping
  "level switch" mutations, selection on the true loss (optionally in stages
  with cheaper losses first), a given number of generations or seconds.

All return a :class:`rco_jax.SolveResult` whose assignment is feasible: the
gradient methods end with the knapsack :func:`rco_jax.discretize` of their
logits (or the best feasible sample seen). The core never imports this module.

References: EvoPress (Sieberling et al., ICML 2025); the penalty and
augmented-Lagrangian baselines of Helcig & Alistarh 2026, Section 5.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from rco_jax.constraint import BudgetConstraint, Constraint
from rco_jax.discrete import assignment_cost, discretize, one_hot, split_groups
from rco_jax.manifold import expected_cost, init_logits
from rco_jax.solve import LossFn, SolveResult, default_tau_schedule, gumbel_search

PyTree = Any

__all__ = ["augmented_lagrangian", "evolutionary", "penalty"]


def _relative_gap(logits: PyTree, constraint: Constraint) -> jax.Array:
    return (expected_cost(logits, constraint) - constraint.budget) / constraint.budget


def _violation(logits: PyTree, constraint: Constraint) -> jax.Array:
    """The penalized gap: ``g`` for an equality budget, ``max(g, 0)`` for ``C <= B``."""
    g = _relative_gap(logits, constraint)
    return jnp.maximum(g, 0.0) if constraint.inequality else g


def _penalized(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    num_steps: int,
    learning_rate: optax.ScalarOrSchedule,
    tau: tuple[float, float],
    init: PyTree | None,
    chunk_size: int,
    progress: bool | None,
    resolution: float | None,
    **method: Any,
) -> SolveResult:
    """Adam on unconstrained logits with free (per-group argmax) samples and a penalty."""
    return gumbel_search(
        loss_fn,
        constraint,
        key=key,
        num_steps=num_steps,
        optimizer=optax.adam(learning_rate),
        tau=default_tau_schedule(num_steps, *tau),
        init=init,
        feasible_samples=False,
        chunk_size=chunk_size,
        progress=progress,
        resolution=resolution,
        **method,
    )


def penalty(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    lam: float = 10.0,
    num_steps: int = 200,
    learning_rate: optax.ScalarOrSchedule = 0.05,
    tau: tuple[float, float] = (1.0, 0.05),
    init: PyTree | None = None,
    chunk_size: int = 50,
    progress: bool | None = None,
    resolution: float | None = None,
) -> SolveResult:
    """Quadratic-penalty baseline: minimizes ``loss + lam * ((C - B) / B)^2`` with Adam.

    Same arguments as :func:`rco_jax.solve` plus ``lam``, the penalty weight
    (the hyperparameter RCO does not have).
    """
    return _penalized(
        loss_fn,
        constraint,
        key=key,
        num_steps=num_steps,
        learning_rate=learning_rate,
        tau=tau,
        init=init,
        chunk_size=chunk_size,
        progress=progress,
        resolution=resolution,
        penalty=lambda a, _: lam * jnp.sum(_violation(a, constraint) ** 2),
        desc=f"penalty(lam={lam:g})",
    )


def augmented_lagrangian(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    rho: float = 10.0,
    num_steps: int = 200,
    learning_rate: optax.ScalarOrSchedule = 0.05,
    tau: tuple[float, float] = (1.0, 0.05),
    init: PyTree | None = None,
    chunk_size: int = 50,
    progress: bool | None = None,
    resolution: float | None = None,
) -> SolveResult:
    """Augmented Lagrangian: ``loss + lam * g + rho / 2 * g^2``, ``lam += rho * g`` per step.

    For an inequality budget the standard form for ``g <= 0``:
    ``(max(0, lam + rho g)^2 - lam^2) / (2 rho)`` and ``lam <- max(0, lam + rho g)``.
    """

    def lagrangian(a, lam):
        g = _relative_gap(a, constraint)
        if constraint.inequality:
            return jnp.sum(jnp.maximum(lam + rho * g, 0.0) ** 2 - lam**2) / (2 * rho)
        return jnp.sum(lam * g + 0.5 * rho * g**2)

    def dual_ascent(a, lam):
        lam = lam + rho * _relative_gap(a, constraint)
        return jnp.maximum(lam, 0.0) if constraint.inequality else lam

    return _penalized(
        loss_fn,
        constraint,
        key=key,
        num_steps=num_steps,
        learning_rate=learning_rate,
        tau=tau,
        init=init,
        chunk_size=chunk_size,
        progress=progress,
        resolution=resolution,
        penalty=lagrangian,
        aux_init=jnp.zeros(constraint.budget.shape, jnp.result_type(float)),
        aux_update=dual_ascent,
        desc=f"aug-lagrangian(rho={rho:g})",
    )


# --- evolutionary search ---------------------------------------------------------------


def _totals(costs: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Per-budget totals ``(q,)`` of an assignment; ``costs`` is ``(q, N, K)``."""
    return costs[:, np.arange(len(a)), a].sum(-1)


def _random_feasible(
    rng: np.random.Generator, costs: np.ndarray, rank: np.ndarray, budgets: np.ndarray
) -> np.ndarray | None:
    """Cheapest option everywhere, then random upgrades while every budget allows.

    ``None`` when the cheapest start does not fit (possible with coupled budgets).
    """
    a = np.argmin(rank, axis=1)
    total = _totals(costs, a)
    if np.any(total > budgets):
        return None
    for i in rng.permutation(len(a)):
        after = total[:, None] - costs[:, i, a[i], None] + costs[:, i, :]  # (q, K)
        options = np.flatnonzero(np.all(after <= budgets[:, None], axis=0))
        if options.size:
            k = rng.choice(options)
            total = after[:, k]
            a[i] = k
    return a


def _moved_option(
    rng: np.random.Generator, rank_i: np.ndarray, current: int, kind: str
) -> int | None:
    """Group's new option: ``"level"`` the next more expensive, ``"random"`` any other."""
    finite = np.isfinite(rank_i)
    if kind == "level":
        higher = np.flatnonzero(finite & (rank_i > rank_i[current]))
        return int(higher[np.argmin(rank_i[higher])]) if higher.size else None
    others = np.flatnonzero(finite & (np.arange(rank_i.size) != current))
    return int(rng.choice(others)) if others.size else None


def _mutate(
    rng: np.random.Generator,
    a: np.ndarray,
    costs: np.ndarray,
    rank: np.ndarray,
    budgets: np.ndarray,
    max_flips: int,
    kind: str,
) -> np.ndarray:
    """Raise 1..max_flips groups, then lower other groups one level until it fits.

    ``kind="level"`` (EvoPress) raises a group to its next more expensive
    option (by ``rank``, the cost scaled by the budgets); ``kind="random"``
    switches it to any other option (cheaper ones included), which explores
    better when option value is not monotone in cost. Groups are lowered, one
    level of the most violated budget at a time, until every budget holds; a
    mutant that cannot be repaired is dropped (the parent is returned).
    """
    parent, a = a, a.copy()
    rows = np.arange(len(a))
    flips = min(rng.integers(1, max_flips + 1), rng.integers(1, max_flips + 1))
    raised = set()
    for _ in range(flips):
        if kind == "random":
            i = int(rng.integers(len(a)))
        else:
            cur = rank[rows, a]
            up = np.flatnonzero((rank > cur[:, None]).any(1) & np.isfinite(cur))
            if up.size == 0:
                break
            i = int(rng.choice(up))
        new = _moved_option(rng, rank[i], a[i], kind)
        if new is not None:
            a[i] = new
            raised.add(i)
    for _ in range(4 * len(a) + 4):
        over = (_totals(costs, a) - budgets) / np.maximum(np.abs(budgets), 1e-300)
        if np.all(over <= 0):
            return a
        c = costs[int(np.argmax(over))]
        cur = c[rows, a]
        can = np.flatnonzero((c < cur[:, None]).any(1))
        down = [i for i in can if i not in raised] or list(can)
        if not down:
            break
        i = rng.choice(down)
        lower = np.flatnonzero(c[i] < cur[i])
        a[i] = lower[np.argmax(c[i, lower])]  # one level down
    return parent


def _swap_mutate(
    rng: np.random.Generator,
    a: np.ndarray,
    costs: np.ndarray,
    rank: np.ndarray,
    budgets: np.ndarray,
    max_flips: int,
    kind: str,
    labels: np.ndarray,
    max_tries: int = 32,
) -> np.ndarray:
    """Cost-neutral level switches between groups that share a label.

    Each flip moves one group ``i`` (``kind="level"``: to its next more
    expensive option; ``"random"``: to any other option), changing the costs by
    ``delta`` (one entry per budget), and moves a partner ``j != i`` with
    ``labels[j] == labels[i]`` to the option that changes its costs by exactly
    ``-delta``. The totals are therefore unchanged (EvoPress's
    ``group_rule=size`` when the labels are the layer sizes and the costs are
    ``bits x size``). A flip without any matching partner is retried with
    another ``i`` (up to ``max_tries`` times).
    """
    a = a.copy()
    rows = np.arange(len(a))
    finite = np.all(np.isfinite(costs), axis=0)
    flips = min(rng.integers(1, max_flips + 1), rng.integers(1, max_flips + 1))
    for _ in range(flips):
        for _ in range(max_tries):
            i = int(rng.integers(len(a)))
            new = _moved_option(rng, rank[i], a[i], kind)
            if new is None:
                continue
            delta = costs[:, i, new] - costs[:, i, a[i]]  # (q,)
            partners = np.flatnonzero((labels == labels[i]) & (rows != i))
            target = costs[:, partners, a[partners]] - delta[:, None]  # (q, P)
            # Exact for integer-valued costs; the totals are re-checked below for real ones.
            match = finite[partners] & np.all(
                np.isclose(costs[:, partners], target[:, :, None], rtol=1e-12, atol=0.0), axis=0
            )
            ok = np.flatnonzero(match.any(1))
            if ok.size == 0:
                continue
            m = rng.choice(ok)
            trial = a.copy()
            trial[i] = new
            trial[partners[m]] = np.flatnonzero(match[m])[0]
            if np.all(_totals(costs, trial) <= budgets):
                a = trial
                break
    return a


def evolutionary(
    loss_fn: LossFn,
    constraint: Constraint,
    *,
    key: jax.Array,
    num_generations: int = 100,
    offspring: int = 32,
    max_flips: int = 3,
    mutation: str = "level",
    selection: Sequence[tuple[LossFn, int]] | None = None,
    init: PyTree | None = None,
    time_limit: float | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    swap_groups: Any | None = None,
    loss_args: Sequence[Any] = (),
) -> SolveResult:
    """EvoPress-style evolutionary search over budget-feasible assignments.

    One parent; each generation makes ``offspring`` mutants (level switches:
    ``min(U{1..3}, U{1..3})`` groups raised one cost level, then randomly chosen
    other groups lowered one level until the budget holds), ranks them, and
    replaces the parent by the best survivor if it is better. No gradients.

    With ``swap_groups`` every switch is cost-neutral instead: a group moves
    (one level up for ``"level"``) and a partner *with the same label* moves by
    exactly the opposite cost, so the total cost of the start is kept exactly
    (EvoPress's ``group_rule=size``: label the layers by their parameter count,
    start from the uniform assignment at the budget).

    Args:
      loss_fn: ``loss_fn(W) -> scalar`` on one-hot ``(N, K)`` weights.
      constraint: the budget (concrete).
      key: PRNG key (seeds NumPy's generator).
      num_generations: generations to run (at most).
      offspring: mutants per generation.
      max_flips: most raises per mutation.
      mutation: ``"level"`` (EvoPress: one cost level up, then others one level
        down until it fits) or ``"random"`` (switch to any option, then repair).
      selection: multi-stage selection ``[(stage_loss, survivors), ...]``, e.g.
        cheaper losses on fewer tokens first; the last stage's loss decides
        against the parent. Default ``[(loss_fn, 1)]``.
      init: starting assignment; default the fittest of ``offspring`` random
        feasible assignments.
      time_limit: stop after this many seconds (equal wall-clock comparisons).
      batch_size: offspring evaluated per vmapped call (default all).
      progress: tqdm bar (default on).
      swap_groups: optional labels, one per group (``(N,)`` over the groups of
        all leaves in order): switch only between groups with equal labels,
        keeping the cost constant (see above). Labels must be given for every
        group; groups alone in their label never change.
      loss_args: extra arguments of every loss, called as ``loss(W, *loss_args)``
        (not batched). Pass large arrays (model weights) here instead of closing
        over them: closed-over arrays become constants of the compiled program,
        which for gigabytes makes XLA compilation take minutes.

    Returns:
      A :class:`~rco_jax.SolveResult` (``logits`` is the one-hot of the answer;
      ``history['loss']`` the parent's loss per generation and
      ``history['evaluations']`` the cumulative loss evaluations).
    """
    if num_generations <= 0 or offspring <= 0:
        raise ValueError("num_generations and offspring must be positive.")
    if mutation not in ("level", "random"):
        raise ValueError(f"mutation must be 'level' or 'random'; got {mutation!r}.")
    stages = list(selection) if selection is not None else [(loss_fn, 1)]
    # One (q, N, K_max) float64 table; padded options cost inf so they are never chosen.
    costs_list = [np.asarray(g, np.float64) for g in constraint.group_costs()]
    if isinstance(constraint, BudgetConstraint):
        costs_list = [c[None] for c in costs_list]
    k_leaves = [c.shape[-1] for c in costs_list]
    costs = np.concatenate(
        [
            np.pad(c, ((0, 0), (0, 0), (0, max(k_leaves) - c.shape[-1])), constant_values=np.inf)
            for c in costs_list
        ],
        axis=1,
    )
    budgets = np.atleast_1d(np.asarray(constraint.budget, np.float64))
    # Options ordered by their cost relative to the budgets (for one budget: by cost).
    rank = np.sum(costs / np.maximum(np.abs(budgets), 1e-300)[:, None, None], axis=0)
    labels = None
    if swap_groups is not None:
        labels = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(swap_groups)])
        if labels.shape != (costs.shape[1],):
            raise ValueError(
                f"swap_groups must give one label per group ({costs.shape[1]}); "
                f"got {labels.shape[0]}."
            )
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    dtype = jnp.result_type(float)

    def weights(batch: np.ndarray) -> PyTree:
        parts = split_groups(jnp.asarray(batch.T), constraint, constraint.costs)
        return jax.tree.map(
            lambda a, k: jax.nn.one_hot(a.T, k, dtype=dtype),
            parts,
            jax.tree.unflatten(jax.tree.structure(constraint.costs), k_leaves),
        )

    loss_args = tuple(loss_args)
    in_axes = (0,) + (None,) * len(loss_args)
    evaluators = [jax.jit(jax.vmap(f, in_axes=in_axes)) for f, _ in stages]
    n_evals = 0

    def evaluate(stage: int, batch: np.ndarray) -> np.ndarray:
        nonlocal n_evals
        size = batch_size or len(batch)
        out = [
            np.asarray(evaluators[stage](weights(batch[i : i + size]), *loss_args))
            for i in range(0, len(batch), size)
        ]
        n_evals += len(batch)
        return np.concatenate(out)

    if init is None:
        cands = [_random_feasible(rng, costs, rank, budgets) for _ in range(offspring)]
        if cands[0] is None:  # coupled budgets: start from the knapsack of uniform logits
            start = discretize(init_logits(constraint), constraint)
            cands = [np.concatenate([np.asarray(x) for x in jax.tree.leaves(start)])]
        cands = np.stack(cands)
        losses = evaluate(len(stages) - 1, cands)
        parent, parent_loss = cands[np.argmin(losses)], float(np.min(losses))
    else:
        parent = np.concatenate([np.asarray(a) for a in jax.tree.leaves(init)]).astype(np.int64)
        if np.any(_totals(costs, parent) > budgets):
            raise ValueError("evolutionary: `init` is over the budget.")
        parent_loss = float(evaluate(len(stages) - 1, parent[None])[0])

    start_time = time.perf_counter()
    history_loss, history_evals = [], []
    # With a time limit the bar counts seconds (the generation count is then only a cap).
    timed = time_limit is not None
    bar = tqdm(
        total=round(time_limit) if timed else num_generations,
        desc="evolutionary",
        unit="s" if timed else "gen",
        disable=progress is False,
        leave=False,
    )
    for _ in range(num_generations):
        elapsed = time.perf_counter() - start_time
        if timed and elapsed > time_limit:
            break
        if labels is None:
            mutants = [
                _mutate(rng, parent, costs, rank, budgets, max_flips, mutation)
                for _ in range(offspring)
            ]
        else:
            mutants = [
                _swap_mutate(rng, parent, costs, rank, budgets, max_flips, mutation, labels)
                for _ in range(offspring)
            ]
        pool = np.stack(mutants)
        for s, (_, survivors) in enumerate(stages):
            scores = evaluate(s, pool)
            pool = pool[np.argsort(scores, kind="stable")[: max(survivors, 1)]]
        best_loss = float(np.sort(scores)[0])
        if best_loss < parent_loss:
            parent, parent_loss = pool[0], best_loss
        history_loss.append(parent_loss)
        history_evals.append(n_evals)
        if timed:
            bar.n = min(round(time.perf_counter() - start_time), bar.total)
            bar.refresh()
        else:
            bar.update(1)
        bar.set_postfix(loss=f"{parent_loss:.4g}", gen=len(history_loss), refresh=False)
    bar.close()

    assignment = split_groups(jnp.asarray(parent, jnp.int32), constraint, constraint.costs)
    final_loss = loss_fn(one_hot(assignment, constraint, dtype), *loss_args)
    cost = assignment_cost(assignment, constraint)
    sample_cost = jnp.broadcast_to(cost, (len(history_loss),) + jnp.shape(cost))
    return SolveResult(
        assignment=assignment,
        logits=one_hot(assignment, constraint, dtype),
        loss=final_loss,
        cost=cost,
        history=dict(
            loss=jnp.asarray(history_loss),
            evaluations=jnp.asarray(history_evals),
            sample_cost=sample_cost,
            budget_error=sample_cost - constraint.budget,
        ),
        from_sample=jnp.asarray(True),
    )
