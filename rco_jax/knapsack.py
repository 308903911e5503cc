r"""Multiple-choice knapsack by dynamic programming, jit- and vmap-able.

Given ``N`` groups with ``K`` options each, values ``v`` and costs ``c``, pick one option
``a_i`` per group to solve

.. math::

  \max_{a}\ \sum_i v_{i, a_i} \quad \text{s.t.} \quad \sum_i c_{i, a_i} \le B.

This is the discrete step of RCO (Helcig & Alistarh, 2026, "Budget Constraints as
Riemannian Manifolds", arXiv:2605.00649): the hard, budget-feasible assignment used in the
forward pass and for the final answer. The solver is the textbook multiple-choice knapsack
dynamic program over integer cost units ``j = 0 .. B_units``:

.. math::

  d_0[0] = 0, \quad d_0[j > 0] = -\infty, \qquad
  d_i[j] = \max_k\ d_{i-1}[j - u_{ik}] + v_{ik},

followed by a backtrack through the stored per-cell argmax. Work is ``O(N K B_units)``,
memory ``N (B_units + 1)`` bytes for the choice table (int8 when ``K <= 127``).

Costs are preprocessed on the host in float64 (they fix the table's static size):

* per-group minimum costs are subtracted first, so every group has a zero-unit option and
  the table only spans the *range* of the costs;
* integer-valued costs are solved exactly, after dividing by the gcd of the differences;
* real-valued costs are rounded *up* to units of ``1 / resolution`` and the budget *down*,
  with a margin for float rounding, so the returned assignment always satisfies the real
  budget (checked in float64, in any summation order). The DP's answer then leaves up to
  about ``N`` units of real slack unspent; a greedy *fill* spends it (below).

The fill works in *fine units*: costs rounded up to ``2**29`` units over the cost range
(int32, exact integer sums on the device), the budget rounded down by the same rules. While
some single-group option change gains value and keeps the fine total within the budget, it
applies the one of largest gain per fine unit spent (the LP-greedy order), in a
``lax.while_loop`` bounded by ``4 N + 64`` moves. On unseen real-cost problems (N <= 1000,
default resolution) this brings the DP's gap to the optimum from up to 9% down to below
0.3% (``benchmarks/README.md``).

Several budgets: :func:`knapsack_multi` (an exact two-dimensional DP for two budgets, a
Lagrangian heuristic for more) and :func:`knapsack_blocks` (one budget per block of groups,
exact).

On the device, the DP is a ``lax.scan`` over groups carrying one ``(B_units + 1,)`` row; each
step takes ``K`` shifted windows of the ``-inf``-padded row (``dynamic_slice``), and a
pairwise max tree yields the new row and the int8 choices; a reverse ``lax.scan`` backtracks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax

__all__ = ["knapsack", "knapsack_batch", "knapsack_blocks", "knapsack_multi"]

_EPS = float(np.finfo(np.float64).eps)
# Largest float64 below which every integer is representable (exact integer arithmetic).
_EXACT_INT = 2.0**53


def default_resolution_units(n_groups: int) -> int:
    """Table width (cost units) that ``resolution=None`` targets for real-valued costs.

    ``max(64, min(2**22 // N, 256 * N))``: a choice table of at most ~4 MiB (N x units
    bytes), and no more than 256 units per group for small problems. Rounding costs up then
    loses at most ``N / units`` of the cost range in budget: 1/256 (0.4%) for ``N <= 128``,
    ``N**2 / 2**22`` beyond (1.5% at N=252, 24% at N=1000), which the fill after the DP
    then mostly recovers (see :func:`knapsack`).
    """
    n = max(int(n_groups), 1)
    return max(64, min(2**22 // n, 256 * n))


@dataclasses.dataclass(frozen=True)
class _Thresholds:
    """Cell ``j`` (a total of ``j`` units) is admissible iff ``budget >= threshold(j)``.

    Integer costs: ``threshold(j) = base + j * step`` in exact integers (``step`` = gcd).
    Real costs: ``threshold(j) = base + (j / step + extra)`` for ``j >= 1`` and ``base`` for
    ``j = 0``, in float64 (``step`` = resolution; ``base`` and ``extra`` include the margins).
    """

    exact: bool
    base: float | int
    step: float | int
    extra: float = 0.0

    def at(self, j: int) -> float | int:
        if self.exact:
            return self.base + j * self.step
        return self.base + (j / self.step + self.extra) if j > 0 else self.base

    def array(self, capacity: int) -> np.ndarray:
        j = np.arange(capacity + 1)
        if self.exact:
            if abs(self.base) + capacity * self.step < _EXACT_INT:
                return float(self.base) + j.astype(np.float64) * float(self.step)
            return np.array([float(self.at(int(i))) for i in j])
        return np.where(j > 0, self.base + (j / self.step + self.extra), self.base)

    def units(self, budget, limit: int) -> int:
        """Largest admissible cell for a concrete budget, capped at ``limit``; -1 if none."""
        if isinstance(budget, (int, np.integer)):
            b = int(budget)
        else:
            b = float(budget)
            if math.isnan(b):
                raise ValueError("knapsack: budget is NaN.")
            if math.isinf(b):
                return limit if b > 0 else -1
        if self.at(limit) <= b:
            return limit
        if self.exact:
            return max((math.floor(b) - self.base) // self.step, -1)
        j = math.floor((b - self.base - self.extra) * self.step)  # Off by a unit or two.
        j = max(min(j, limit + 1), -1)
        while j >= 0 and self.at(j) > b:
            j -= 1
        while j < limit and self.at(j + 1) <= b:
            j += 1
        return min(j, limit)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Host-side discretisation of the costs (everything static about one problem)."""

    units: np.ndarray  # (N, K) int32 unit costs, clipped to capacity + 1.
    capacity: int  # The table has capacity + 1 cells (0 .. capacity units).
    pad: int  # Largest unit cost kept: the row is padded by this many -inf cells.
    segments: tuple[tuple[int, int, int, int], ...]  # See `_segments`.
    exact: bool  # Integer costs solved exactly.
    resolution: float  # Units per cost unit.
    rule: _Thresholds  # Which budgets admit which cells.


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _concrete(x) -> np.ndarray | None:
    """``np.asarray(x)`` if ``x`` is concrete, ``None`` if it is a tracer."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _table_dtype(k: int):
    if k <= np.iinfo(np.int8).max:
        return jnp.int8
    if k <= np.iinfo(np.int16).max:
        return jnp.int16
    return jnp.int32


def _host_costs(costs, n: int, k: int) -> np.ndarray:
    c = _concrete(costs)
    if c is None:
        raise TypeError(
            "knapsack: `costs` must be concrete (NumPy-convertible), because they fix the static "
            "size of the DP table. Close over the costs instead of passing them as a traced "
            "argument, e.g. `jax.jit(lambda v, b: knapsack(v, costs, b))`. Only `values` and "
            "`budget` may be traced."
        )
    c = np.asarray(c, dtype=np.float64)
    if c.shape == (k,):
        c = np.broadcast_to(c, (n, k))
    if c.shape != (n, k):
        raise ValueError(f"knapsack: costs must have shape ({k},) or ({n}, {k}); got {c.shape}.")
    if not np.all(np.isfinite(c)):
        raise ValueError("knapsack: costs must be finite (forbid an option with value -inf).")
    return c


def _discretise(
    costs: np.ndarray, resolution: float | None, target_units: int | None = None
) -> tuple[np.ndarray, _Thresholds, bool, float]:
    """Unit costs ``(N, K)`` int64 (>= 0, 0 at each group's cheapest option) and their rule.

    Returns ``(units, rule, exact, resolution)``. Integer costs with ``resolution=None`` are
    exact (gcd-reduced); otherwise costs are rounded up to ``1 / resolution`` units, where
    ``resolution=None`` spans the cost range with ``target_units`` units (default
    :func:`default_resolution_units`).
    """
    n, k = costs.shape
    lo = costs.min(axis=1) if n else np.zeros((0,))
    diff = costs - lo[:, None]  # >= 0; exactly 0 at each group's cheapest option.
    is_int = (
        resolution is None
        and bool(np.all(costs == np.round(costs)))
        and bool(np.all(np.abs(costs) < _EXACT_INT))
    )
    if is_int:
        lo_i = lo.astype(np.int64)
        d_i = costs.astype(np.int64) - lo_i[:, None]
        g = int(np.gcd.reduce(d_i.ravel())) if d_i.size else 0
        g = max(g, 1)
        rule = _Thresholds(exact=True, base=sum(int(x) for x in lo_i), step=g)
        return d_i // g, rule, True, 1 / g
    span = float(np.sum(diff.max(axis=1))) if n else 0.0
    if resolution is None:
        target = default_resolution_units(n) if target_units is None else target_units
        res = target / span if span > 0 else 1.0
    else:
        res = float(resolution)
        if not (res > 0 and math.isfinite(res)):
            raise ValueError(f"knapsack: resolution must be a positive number; got {resolution}.")
    # Units beyond 2**62 never fit in any table; clipping them only avoids overflow.
    units = np.minimum(np.ceil(diff * res), 2.0**62).astype(np.int64)
    # Margins (cost units) so that the float64 sum of the chosen costs, in any order, stays
    # within the budget: the user's summation error, at most (N - 1) u sum|c| with u = eps / 2
    # (doubled), and for cells j >= 1 the rounding in `diff`, `scaled` and the thresholds
    # themselves. Both are ~1e-12 of the cost scale: they only bite when the budget sits
    # exactly on a cost total.
    s_abs = float(np.sum(np.abs(costs).max(axis=1))) if n else 0.0
    rule = _Thresholds(
        exact=False,
        base=math.fsum(lo.tolist()) + 2.0 * max(n - 1, 0) * _EPS * s_abs,
        step=res,
        extra=4.0 * _EPS * (s_abs + span + (n + 1) / res),
    )
    return units, rule, False, res


def _plan(
    costs: np.ndarray,
    budgets: np.ndarray | None,
    resolution: float | None,
    max_table_bytes: int,
    *,
    target_units: int | None = None,
    raise_infeasible: bool = True,
) -> tuple[_Plan, np.ndarray | None]:
    """Discretises costs; returns the plan and per-problem budget units (concrete budgets).

    With ``raise_infeasible=False`` budgets below the cheapest total get ``-1`` units (the
    device then reports the problem infeasible) instead of a ``ValueError``.
    """
    n, k = costs.shape
    lo = costs.min(axis=1) if n else np.zeros((0,))
    diff = costs - lo[:, None]
    units, rule, is_int, res = _discretise(costs, resolution, target_units)
    total_units = sum(int(u) for u in units.max(axis=1)) if n else 0  # Python ints: no overflow.

    budget_units = None
    capacity = total_units
    if budgets is not None:
        budget_units = np.array([rule.units(b, total_units) for b in budgets.ravel()])
        bad = np.flatnonzero(budget_units < 0)
        if bad.size and raise_infeasible:
            b0 = float(budgets.ravel()[bad[0]])
            which = "" if budgets.size == 1 else f" (problems {bad[:8].tolist()})"
            margin = (
                ""
                if is_int
                else f" (plus a float-rounding margin of {_fmt(rule.base - math.fsum(lo))}, "
                "so that the float64 sum never exceeds the budget)"
            )
            raise ValueError(
                f"knapsack: infeasible budget {_fmt(b0)}{which}: even the cheapest option in "
                f"every group costs {_fmt(math.fsum(lo))} in total{margin}."
            )
        capacity = min(total_units, max(int(budget_units.max()), 0))
        budget_units = np.minimum(budget_units, capacity)

    tdtype = _table_dtype(k)
    table_bytes = n * (capacity + 1) * np.dtype(tdtype).itemsize
    if table_bytes > max_table_bytes:
        target = max(64, (max_table_bytes // max(n, 1)) // 2)
        span = float(np.sum(diff.max(axis=1)))
        hint = f"e.g. resolution={_fmt(target / span)}" if span > 0 else "a coarser resolution"
        kind = "exact integer costs" if is_int else f"resolution={_fmt(res)}"
        raise ValueError(
            f"knapsack: the choice table would need {table_bytes / 2**20:.1f} MiB "
            f"({n} groups x {capacity + 1} cost units, {kind}), more than "
            f"max_table_bytes={max_table_bytes}. Pass a coarser `resolution` ({hint} units per "
            "cost unit; the result stays feasible, with an optimality gap of at most "
            "(N + 2) / resolution in budget) or raise `max_table_bytes`."
            + (
                " A traced budget sizes the table to the whole cost range; a concrete one "
                "only up to itself."
                if budgets is None
                else ""
            )
        )

    units = np.minimum(units, capacity + 1).astype(np.int32)
    pad = int(units.max()) if units.size else 0
    plan = _Plan(
        units=units,
        capacity=capacity,
        pad=pad,
        segments=_segments(units, capacity, pad),
        exact=is_int,
        resolution=res,
        rule=rule,
    )
    return plan, budget_units


def _segments(
    units: np.ndarray, capacity: int, pad: int, pieces: int = 4
) -> tuple[tuple[int, int, int, int], ...]:
    """Splits the groups into ``(start, stop, width, pad)`` scans of growing row width.

    After group ``i`` no cell above ``sum_{i' <= i} max_k u_i'k`` is reachable, so the first
    groups only need a narrower row. The ramp is cut where it crosses ``1/pieces, 2/pieces,
    ...`` of the full width; each piece runs at the largest width it reaches. Used only for
    tables of at least 2**22 cells and if it saves 15% of the cell updates, since every piece
    is one more scan to compile. Typical gains: ~35% with a traced budget (the table spans
    the whole cost range), little with a concrete budget well below the cost range.
    """
    n, width = units.shape[0], capacity + 1
    whole = ((0, n, width, pad),)
    if n * width < 2**22:
        return whole
    reach = np.minimum(np.cumsum(units.max(axis=1)), capacity) + 1  # Row width after group i.
    piece = np.searchsorted(np.ceil(width * np.arange(1, pieces + 1) / pieces), reach)
    out, start = [], 0
    for p in np.unique(piece):
        stop = start + int(np.sum(piece == p))
        w = int(reach[stop - 1])
        out.append((start, stop, w, min(pad, w)))
        start = stop
    if sum((b - a) * w for a, b, w, _ in out) > 0.85 * n * width:
        return whole
    return tuple(out)


def _thresholds(plan: _Plan, dtype) -> tuple[np.ndarray, int]:
    """Per-cell minimum budgets, rounded up into ``dtype``; and how many are attainable."""
    t = plan.rule.array(plan.capacity)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        attainable = int(np.sum(t <= info.max))
        t = np.clip(np.ceil(t), info.min, info.max).astype(dtype)
        return t, attainable
    tt = t.astype(dtype)
    low = tt.astype(np.float64) < t
    tt[low] = np.nextafter(tt[low], np.asarray(np.inf, dtype))
    return tt, plan.capacity + 1


def _traced_budget_units(budget, plan: _Plan) -> jax.Array:
    """On-device budget units for a traced budget (exact w.r.t. the host thresholds)."""
    budget = jnp.asarray(budget)
    if jnp.issubdtype(budget.dtype, jnp.floating) and jnp.finfo(budget.dtype).bits < 32:
        budget = budget.astype(jnp.float32)
    t, attainable = _thresholds(plan, budget.dtype)
    count = jnp.sum(jnp.asarray(t) <= budget[..., None], axis=-1)
    return jnp.minimum(count, attainable).astype(jnp.int32) - 1


# ------------------------------------------------------------------------------------------
# Fine units: exact integer feasibility checks on the device (fill, repair, Lagrangian).

# Fine units spanning one budget's cost range. Totals stay below 2**29 + N and moves change
# them by at most 2**29 + 1, so no int32 sum or difference can overflow.
_FINE_SPAN = 2**29


@dataclasses.dataclass(frozen=True)
class _Fine:
    """Costs of ``q`` budgets in fine integer units, for exact feasibility checks on device.

    ``units[d]`` rounds the costs of budget ``d`` up to ``_FINE_SPAN`` units over the cost
    range (or keeps integer costs exact when their gcd-reduced range fits); ``rules[d]``
    maps a budget to its largest admissible fine total, as in the DP: a fine total at most
    that never exceeds the real budget in float64. ``totals[d] = sum_i max_k units[d, i, k]``.
    """

    units: np.ndarray  # (q, N, K) int32.
    rules: tuple[_Thresholds, ...]
    totals: tuple[int, ...]

    def budget_units(self, budgets) -> np.ndarray | jax.Array:
        """Per-budget largest admissible fine total (``-1``: infeasible); concrete or traced."""
        host = _concrete(budgets)
        if host is not None:
            rows = np.asarray(host).reshape(-1, len(self.rules)).tolist()
            out = [[r.units(b, t) for r, t, b in zip(self.rules, self.totals, row)] for row in rows]
            return np.array(out, dtype=np.int32).reshape(np.shape(host))
        budgets = jnp.asarray(budgets)
        return jnp.stack(
            [
                _device_units(r, t, budgets[..., d])
                for d, (r, t) in enumerate(zip(self.rules, self.totals))
            ],
            axis=-1,
        )


def _fine(costs: np.ndarray) -> _Fine:
    """Fine units for ``(q, N, K)`` float64 costs."""
    units, rules, totals = [], [], []
    for c in costs:
        u, rule, _, _ = _discretise(c, None, _FINE_SPAN)
        if int(u.max(axis=1).sum()) > _FINE_SPAN:  # Integer costs with a very wide range.
            span = float(np.sum(c.max(axis=1) - c.min(axis=1)))
            u, rule, _, _ = _discretise(c, _FINE_SPAN / span)
        units.append(u.astype(np.int32))
        rules.append(rule)
        totals.append(int(u.max(axis=1).sum()) if u.size else 0)
    return _Fine(np.stack(units), tuple(rules), tuple(totals))


def _device_units(rule: _Thresholds, total: int, budget) -> jax.Array:
    """Largest admissible fine total for a traced budget (``-1`` if none), conservatively.

    Integer rules whose totals are exactly representable in the budget's float type are
    exact (``floor((floor(b) - base) / step)``, every operand an exactly represented
    integer). Otherwise ``floor((b - base - extra) / unit - m)``, where the margin ``m``
    (units) bounds the rounding of every operation by 8 ulps of the magnitudes involved,
    plus one unit: never above the host rule, at most a few units (float32: ~1e-6 of the
    budget's magnitude) below it.
    """
    dtype = jnp.promote_types(jnp.asarray(budget).dtype, jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    b = jnp.asarray(budget).astype(dtype)
    info = np.finfo(dtype)
    base_up = np.asarray(float(rule.base), np.float64).astype(dtype)
    if float(base_up) < float(rule.base):
        base_up = np.nextafter(base_up, np.asarray(np.inf, dtype))
    if rule.exact:
        top = rule.base + (total + 1) * rule.step
        exact = max(abs(rule.base), abs(top)) < 2.0 ** (info.nmant - 1)
    else:
        exact = False
    if exact:
        bb = jnp.clip(jnp.floor(b), rule.base - rule.step, rule.base + total * rule.step)
        j = jnp.floor((bb - rule.base) / rule.step)
    else:
        per_unit = float(rule.step) if not rule.exact else 1.0 / float(rule.step)
        eps = float(info.eps)
        x = (b - float(rule.base)) * per_unit - float(rule.extra) * per_unit
        m = 8 * eps * ((jnp.abs(b) + abs(float(rule.base))) * per_unit + jnp.abs(x)) + 1
        j = jnp.where(jnp.isposinf(b), total, jnp.floor(x - m))
        j = jnp.maximum(j, 0.0)  # Cell 0 is decided by the comparison with the base below.
    j = jnp.clip(j, -1.0, float(total)).astype(jnp.int32)
    j = jnp.minimum(j, total)
    return jnp.where(b >= base_up, j, -1)  # NaN budgets: -1.


# Choice tables alive at once when an accelerator solves a batch of problems together.
_BATCH_TABLE_BYTES = 2**30


def _chunk_size(axis_size: int, table_bytes: int) -> int:
    """How many problems ``vmap`` of a solver runs side by side: 1 (in turn) on CPU; on
    accelerators as many as fit ``_BATCH_TABLE_BYTES`` of choice tables."""
    if jax.default_backend() == "cpu":
        return 1
    return max(1, min(axis_size, _BATCH_TABLE_BYTES // max(table_bytes, 1)))


def _sequential(fn, table_bytes: Callable[[int, int], int]):
    """``fn`` whose ``vmap`` solves the problems in turn on CPU, in vmapped chunks elsewhere.

    On CPU one problem's DP row stays in L1 cache and a batch of rows does not (a
    ``vmap``-batched DP is 1.6-2x slower per problem there), so the problems run one after
    another (``lax.map``). On a GPU a single DP is a scan of tiny kernels, bound by their
    launches: 64 problems side by side were 66x faster per problem than in turn (H200,
    ``benchmarks/knapsack.py``). There ``lax.map`` runs chunks of as many problems as fit
    ``_BATCH_TABLE_BYTES`` of choice tables (``table_bytes(N, K)``: one problem's).
    The arguments that are not batched are closed over, not broadcast. The answers are the
    same either way.
    """

    @custom_batching.custom_vmap
    def f(*args):
        return fn(*args)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        batched = [x for x, b in zip(args, in_batched) if b]
        chunk = _chunk_size(axis_size, table_bytes(*args[0].shape[-2:]))
        # In chunks the plain ``fn`` is vmapped (``f`` would come back to this rule).
        solver = f if chunk == 1 else fn

        def one(xs):
            it = iter(xs)
            return solver(*[next(it) if b else x for x, b in zip(args, in_batched)])

        out = lax.map(one, batched, batch_size=None if chunk == 1 else chunk)
        return out, jax.tree.map(lambda _: True, out)

    return f


def _segment_bytes(segments) -> Callable[[int, int], int]:
    """One problem's choice-table bytes for the DP over ``segments``, given ``(N, K)``."""
    cells = sum((b - a) * w for a, b, w, _ in segments)
    return lambda n, k: cells * jnp.dtype(_table_dtype(k)).itemsize


def _fill(values, fine, b_fine, assignment, max_moves: int):
    """Spends the slack of a feasible assignment greedily, in fine units (exact).

    Repeats the single-group option change of largest value gain per unit of budget spent,
    ``gain / sum_d max(delta_d, 0) / s_d`` with ``s_d`` the slack of budget ``d`` when the
    fill starts (a change spending nothing counts as spending ``2**-30``), among the changes
    with a positive gain that keep every fine total within ``b_fine``, at most ``max_moves``
    times. Assignments that are infeasible (``-1`` or over a fine budget) come back
    unchanged. ``values`` (N, K), ``fine`` (q, N, K) int32, ``b_fine`` (q,) int32.

    The carry holds every change's ratio and cost deltas, so that a step only rescores the
    group it moved: one masked max over ``(N, K)`` per move.
    """
    q, n, k = fine.shape
    fine = jnp.asarray(fine)
    options = jnp.arange(k)
    flat = jnp.arange(n * k, dtype=jnp.int32).reshape(n, k)
    start = jnp.maximum(assignment, 0)
    chosen = options == start[:, None]
    cur_v = jnp.max(jnp.where(chosen, values, -jnp.inf), axis=1)
    cur_f = jnp.sum(jnp.where(chosen, fine, 0), axis=-1)  # (q, N)
    t0 = jnp.sum(cur_f, axis=1)
    feasible = jnp.all(assignment >= 0) & jnp.all(t0 <= b_fine)
    inv_slack = 1.0 / jnp.maximum(b_fine - t0, 1).astype(values.dtype)

    def rescore(v, f, cur_v, cur_f):
        """Ratios and fine-unit deltas of the changes away from the current options."""
        gain = v - cur_v[..., None]
        delta = f - cur_f[..., None]
        w = inv_slack.reshape((q,) + (1,) * (delta.ndim - 1))
        spend = jnp.sum(jnp.maximum(delta, 0).astype(v.dtype) * w, axis=0)
        return jnp.where(gain > 0, gain / jnp.maximum(spend, 2.0**-30), -jnp.inf), delta

    def cond(c):
        return c[5] & (c[4] < max_moves)

    def body(c):
        a, ratio, delta, t, count, _ = c
        fits = jnp.all(delta <= (b_fine - t)[:, None, None], axis=0)
        masked = jnp.where(fits, ratio, -jnp.inf)
        best = jnp.max(masked)
        go = best > -jnp.inf
        j = jnp.min(jnp.where(masked == best, flat, n * k - 1))  # First maximum.
        i = j // k
        o = jnp.where(go, j % k, a[i])
        v_i, f_i = values[i], fine[:, i]
        r_i, d_i = rescore(v_i, f_i, v_i[o], f_i[:, o])
        t = t + delta[:, i, o]  # Zero if not `go` (o is the current option).
        return a.at[i].set(o), ratio.at[i].set(r_i), delta.at[:, i].set(d_i), t, count + 1, go

    ratio, delta = rescore(values, fine, cur_v, cur_f)
    init = (start, ratio, delta, t0, jnp.int32(0), feasible)
    a = lax.while_loop(cond, body, init)[0]
    return jnp.where(feasible, a, assignment)


def _fill_moves(n: int) -> int:
    """Bound on the fill's moves (each is one ``O(q N K)`` step)."""
    return 4 * n + 64


# ------------------------------------------------------------------------------------------
# Device kernels.


def _best_and_choice(cands: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Elementwise max over the list and the lowest index attaining it (pairwise tree)."""
    items = [(c, jnp.full(c.shape, i, jnp.int32)) for i, c in enumerate(cands)]
    while len(items) > 1:
        merged = []
        for a in range(0, len(items) - 1, 2):
            (va, ia), (vb, ib) = items[a], items[a + 1]
            take_b = vb > va  # Strict: ties keep the lower index.
            merged.append((jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)))
        if len(items) % 2:
            merged.append(items[-1])
        items = merged
    return items[0]


def _forward(values, units, segments, table_dtype):
    """DP over the groups of one problem: (last row, choice tables, one per segment)."""
    neg = jnp.asarray(-jnp.inf, values.dtype)
    row = jnp.full((segments[0][2],), neg).at[0].set(0)
    tables = []
    for start, stop, width, pad in segments:
        if row.shape[0] < width:
            row = jnp.concatenate([row, jnp.full((width - row.shape[0],), neg)])
        pad_block = jnp.full((pad,), neg)

        def step(row, x, width=width, pad=pad, pad_block=pad_block):
            v_i, u_i = x
            # Materialising the padded row once per step (rather than masking each window)
            # keeps the windows plain contiguous loads, which XLA:CPU vectorises.
            padded = jnp.concatenate([pad_block, row])
            cands = [
                lax.dynamic_slice_in_dim(padded, pad - u_i[o], width) + v_i[o]
                for o in range(values.shape[-1])
            ]
            best, choice = _best_and_choice(cands)
            return best, choice.astype(table_dtype)

        # Costs above the row width never fit; clipping them keeps the windows in range.
        seg_units = jnp.minimum(units[start:stop], pad)
        row, table = lax.scan(step, row, (values[start:stop], seg_units))
        tables.append(table)
    return row, tables


def _backtrack(tables, units, segments, cell):
    """Reverse scans from ``cell`` through the per-segment choice tables."""

    def step(j, x):
        t_i, u_i = x
        choice = t_i[j].astype(jnp.int32)
        return j - u_i[choice], choice

    parts = []
    for (start, stop, _, _), table in zip(reversed(segments), reversed(tables)):
        cell, part = lax.scan(step, cell, (table, units[start:stop]), reverse=True)
        parts.append(part)
    return jnp.concatenate(parts[::-1])


def _finish(row, b_units, capacity: int):
    cells = jnp.arange(capacity + 1)
    masked = jnp.where(cells <= b_units, row, -jnp.inf)
    cell = jnp.argmax(masked).astype(jnp.int32)  # First maximum: least cost among optima.
    return cell, masked[cell] > -jnp.inf


@functools.partial(jax.jit, static_argnames=("segments",))
def _solve_one(values, units, b_units, *, segments):
    row, tables = _forward(values, units, segments, _table_dtype(values.shape[-1]))
    cell, feasible = _finish(row, b_units, segments[-1][2] - 1)
    assignment = _backtrack(tables, units, segments, cell)
    return jnp.where(feasible, assignment, -1)


@functools.lru_cache(maxsize=256)
def _solver(segments, moves: int):
    """DP, then (``moves > 0``) the fill; its ``vmap`` runs the problems in sequence."""

    def solve(values, units, b_units, *fill_args):
        assignment = _solve_one(values, units, b_units, segments=segments)
        if moves:
            fine, b_fine = fill_args
            assignment = _fill(values, fine, b_fine, assignment, moves)
        return assignment

    return _sequential(solve, _segment_bytes(segments))


@functools.partial(jax.jit, static_argnames=("segments", "moves"))
def _run_one(values, units, b_units, fill_args=(), *, segments, moves=0):
    assignment = _solver(segments, moves)(_dp_values(values), units, b_units, *fill_args)
    return assignment, _total(values, assignment)


@functools.partial(jax.jit, static_argnames=("segments", "moves"))
def _run_many(values, units, b_units, fill_args=(), *, segments, moves=0):
    solve = _solver(segments, moves)
    in_axes = (0, None, 0) + ((None, 0) if moves else ())
    assignment = jax.vmap(solve, in_axes=in_axes)(_dp_values(values), units, b_units, *fill_args)
    return assignment, _total(values, assignment)


def _fill_args(costs: np.ndarray, plan: _Plan, budgets) -> tuple[tuple, int]:
    """The fill's arguments and move bound for a rounded (non-exact) plan; none if exact."""
    if plan.exact:
        return (), 0
    fine = _fine(costs[None])
    return (fine.units, fine.budget_units(budgets)), _fill_moves(costs.shape[0])


def _dp_values(values):
    # No gradient through the DP (the total's gradient is the one-hot of the assignment);
    # half-precision values are summed in float32.
    return lax.stop_gradient(values).astype(jnp.promote_types(values.dtype, jnp.float32))


def _prepare_values(values):
    """Floating values: NumPy stays NumPy (cheaper to pass to jit), anything else JAX."""
    if not isinstance(values, (np.ndarray, jax.Array)):
        values = np.asarray(values) if _concrete(values) is not None else jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.result_type(float))
    return values


def _total(values, assignment):
    picked = jnp.take_along_axis(values, jnp.maximum(assignment, 0)[..., None], axis=-1)
    picked = picked[..., 0].astype(jnp.promote_types(values.dtype, jnp.float32))
    total = jnp.sum(picked, axis=-1)
    return jnp.where(jnp.all(assignment >= 0, axis=-1), total, -jnp.inf).astype(values.dtype)


_total_jit = jax.jit(_total)


def knapsack(
    values,
    costs,
    budget,
    *,
    resolution: float | None = None,
    max_table_bytes: int = 2**30,
) -> tuple[jax.Array, jax.Array]:
    r"""Best assignment of one option per group under a total-cost budget.

    Solves the multiple-choice knapsack problem

    .. math::

      \max_{a \in \{0..K-1\}^N} \sum_i v_{i, a_i}
      \quad \text{s.t.} \quad \sum_i c_{i, a_i} \le B

    by dynamic programming over discretised costs, in ``O(N K B_units)`` time (see the module
    docstring for the recurrence). The costs are preprocessed on the host (NumPy, float64),
    which is why they must be concrete:

    * the cheapest option of each group is subtracted first, so the table spans only
      :math:`\sum_i (\max_k c_{ik} - \min_k c_{ik})` and every group has a zero-unit option;
    * **integer-valued costs** (with ``resolution=None``): exact optimum, after dividing the
      cost differences by their gcd;
    * **real-valued costs**, or any explicit ``resolution``: costs are rounded *up* to units
      of ``1 / resolution`` and the budget *down*, keeping a tiny margin (~1e-12 relative) for
      float rounding. The returned assignment always satisfies
      ``sum_i costs[i, a_i] <= budget`` evaluated in float64, in any summation order; its
      value is at least the exact optimum for the reduced budget
      ``budget - (N + 2) / resolution`` (each group loses less than one unit). Table size
      and time grow linearly with ``resolution``, the gap shrinks as ``1 / resolution``. The
      default spans the cost range with :func:`default_resolution_units` units (a table of
      at most ~4 MiB): a budget loss of at most 0.4% of the cost range for ``N <= 128``,
      1.5% at N=252 and 24% at N=1000.
    * **the fill** (real costs, or any explicit ``resolution``): the DP's answer rarely uses
      its real slack, so a greedy pass then spends it: while some single-group option
      change gains value and keeps the budget, apply the one of largest value gain per cost
      spent (at most ``4 N + 64`` changes). Feasibility is checked in exact integer
      arithmetic on fine units (costs rounded up to ``2**29`` units over the cost range,
      the budget down, with the margins above; for a traced budget, a conservative on-device
      formula a few fine units lower), so the guarantee above stands and the value only
      grows. Measured on unseen problems with bit-width-like costs (``benchmarks/``): within
      0.3% of the optimum at N <= 1000 with the default resolution, where the DP alone was
      up to 9% below.

    Memory: the choice table has ``N x (B_units + 1)`` entries of one byte (int8; int16 if
    ``K > 127``), where ``B_units`` is the budget in units for a concrete budget and the
    whole cost range in units for a traced one (and never more than that range).

    Tie-breaking (deterministic): among optimal assignments, the one using the fewest cost
    units; among those, the lexicographically smallest ``(a_{N-1}, ..., a_0)`` (the last
    group takes the lowest option index it can, then the one before, ...). Optimality is
    with respect to the float sums that the DP forms in group order. With rounded costs
    this is the DP's answer, which the fill may then change (first best move in
    ``(group, option)`` order).

    Args:
      values: ``(N, K)`` floats, may be traced; ``-inf`` forbids an option, NaN is not
        supported. Integer values are promoted to floats.
      costs: ``(N, K)`` or shared ``(K,)`` finite costs. Must be concrete (not traced).
      budget: scalar, may be traced. A concrete budget sizes the table up to itself; a traced
        one sizes it to the whole cost range and masks the cells above the budget.
      resolution: units per cost unit. ``None``: exact for integer costs, the default above
        for real-valued costs.
      max_table_bytes: raise ``ValueError`` (suggesting a resolution) rather than allocate a
        larger choice table.

    Returns:
      ``(assignment, total_value)``: int32 ``(N,)`` option indices, and the scalar
      ``sum_i values[i, assignment[i]]`` in ``values``' dtype, whose gradient with respect to
      ``values`` is ``onehot(assignment)``. Infeasible problems (budget below the cheapest
      total, or every assignment within budget uses a forbidden option): if the budget is
      concrete and the cost side is infeasible, or budget and values are both concrete, a
      ``ValueError`` is raised; otherwise (under ``jit``/``vmap``) ``assignment`` is ``-1``
      everywhere and ``total_value`` is ``-inf``.

    Raises:
      TypeError: if ``costs`` are traced.
      ValueError: on bad shapes or resolution, infeasible concrete problems (see above), or a
        choice table larger than ``max_table_bytes``.

    Under :func:`jax.vmap` over ``values`` and/or ``budget`` (costs are always shared), the
    problems are solved in one compiled loop (as :func:`knapsack_batch`): one after another
    on CPU, which beats a ``vmap``-batched DP by about 2x per problem there, and in batched
    chunks on GPU/TPU, where a lone DP is bound by kernel launches.

    Example:

      >>> import jax.numpy as jnp
      >>> values = jnp.array([[0.0, 1.0, 1.5], [0.0, 2.0, 2.5]])
      >>> costs = jnp.array([[1, 2, 3], [1, 3, 4]])
      >>> assignment, total = knapsack(values, costs, 5)
      >>> assignment.tolist(), float(total)
      ([1, 1], 3.0)

    References:
      Helcig & Alistarh, "Budget Constraints as Riemannian Manifolds" (2026),
      arXiv:2605.00649 (the discrete step of RCO). The multiple-choice knapsack DP: e.g.
      Kellerer, Pferschy & Pisinger, "Knapsack Problems" (2004), ch. 11.
    """
    values = _prepare_values(values)
    if values.ndim != 2:
        raise ValueError(f"knapsack: values must be (N, K); got shape {values.shape}.")
    n, k = values.shape
    host_costs = _host_costs(costs, n, k)
    if np.ndim(budget) != 0:
        raise ValueError(f"knapsack: budget must be a scalar; got shape {np.shape(budget)}.")
    b_host = _concrete(budget)
    plan, b_units = _plan(
        host_costs,
        None if b_host is None else b_host.reshape(1),
        resolution,
        max_table_bytes,
    )
    if b_units is None:
        b_dev = _traced_budget_units(budget, plan)
    else:
        b_dev = np.int32(b_units[0])
    b_fill = jnp.reshape(budget, (1,)) if b_host is None else np.reshape(b_host, (1,))
    fill_args, moves = _fill_args(host_costs, plan, b_fill)
    assignment, total = _run_one(
        values, plan.units, b_dev, fill_args, segments=plan.segments, moves=moves
    )
    if b_host is not None and _concrete(values) is not None:
        if not np.asarray(total) > -np.inf:
            raise ValueError(
                "knapsack: no feasible assignment: every assignment within the budget uses an "
                "option whose value is -inf (forbidden)."
            )
    return assignment, total


def knapsack_batch(
    values,
    costs,
    budgets,
    *,
    resolution: float | None = None,
    max_table_bytes: int = 2**30,
) -> tuple[jax.Array, jax.Array]:
    """:func:`knapsack` for ``M`` problems that share the costs, in one compiled loop.

    Equal to ``M`` separate :func:`knapsack` calls (same assignments, same tie-breaking); with
    a concrete budget array the table is sized to the largest budget and each problem masks
    the cells above its own. On CPU the problems run one after another inside a
    ``lax.map``: a ``vmap``-batched DP is about 2x slower per problem there, because a single
    problem's row stays in L1 cache while a batch of rows does not. On GPU/TPU they run in
    vmapped chunks of up to 1 GiB of choice tables (one DP alone is a scan of tiny kernels,
    bound by their launches). ``jax.vmap(knapsack)`` dispatches here.

    Args:
      values: ``(M, N, K)`` floats, may be traced.
      costs: ``(N, K)`` or ``(K,)`` concrete costs, shared by all problems.
      budgets: scalar or ``(M,)``, concrete or traced.
      resolution: as in :func:`knapsack`.
      max_table_bytes: bounds the choice table of one problem (on CPU one is live at a
        time; on accelerators a chunk's, up to 1 GiB together).

    Returns:
      int32 ``(M, N)`` assignments and ``(M,)`` totals; infeasible problems follow
      :func:`knapsack`'s rules, per problem (the ``ValueError`` names them).

    Example:

      >>> import numpy as np
      >>> values = np.random.default_rng(0).normal(size=(64, 252, 7))
      >>> costs = np.arange(7)  # shared (K,) costs
      >>> assignments, totals = knapsack_batch(values, costs, np.full(64, 600))
      >>> assignments.shape, totals.shape
      ((64, 252), (64,))
    """
    values = _prepare_values(values)
    if values.ndim != 3:
        raise ValueError(f"knapsack_batch: values must be (M, N, K); got shape {values.shape}.")
    m, n, k = values.shape
    host_costs = _host_costs(costs, n, k)
    if np.shape(budgets) not in ((), (m,)):
        raise ValueError(
            f"knapsack_batch: budgets must be scalar or ({m},); got {np.shape(budgets)}."
        )
    b_host = _concrete(budgets)
    if b_host is not None:
        b_host = np.broadcast_to(b_host, (m,))
    plan, b_units = _plan(host_costs, b_host, resolution, max_table_bytes)
    if b_units is None:
        b_dev = jnp.broadcast_to(_traced_budget_units(budgets, plan), (m,))
    else:
        b_dev = b_units.astype(np.int32)
    b_fill = jnp.broadcast_to(budgets, (m,)) if b_host is None else b_host
    fill_args, moves = _fill_args(host_costs, plan, b_fill[:, None])
    assignment, total = _run_many(
        values, plan.units, b_dev, fill_args, segments=plan.segments, moves=moves
    )
    if b_host is not None and _concrete(values) is not None:
        bad = np.flatnonzero(~(np.asarray(total) > -np.inf))
        if bad.size:
            raise ValueError(
                f"knapsack_batch: no feasible assignment for problems {bad[:8].tolist()}: every "
                "assignment within the budget uses an option whose value is -inf (forbidden)."
            )
    return assignment, total


# ------------------------------------------------------------------------------------------
# Several budgets.

_METHODS = ("auto", "exact", "lagrangian")
_DP2_DEFAULT_BYTES = 2**26  # Default two-budget table for real costs: at most 64 MiB.
_LAGRANGIAN_ITERS = 32
_LAGRANGIAN_CELLS = 2**20  # Default 1-D table of the Lagrangian's DP (real costs): ~1 MiB.


def _integer_costs(costs: np.ndarray) -> bool:
    return bool(np.all(costs == np.round(costs))) and bool(np.all(np.abs(costs) < _EXACT_INT))


def _host_multi_costs(costs, q: int, n: int, k: int, name: str) -> np.ndarray:
    c = _concrete(costs)
    if c is None:
        raise TypeError(
            f"{name}: `costs` must be concrete (NumPy-convertible): they fix the static sizes "
            "of the tables. Close over them instead of passing them as a traced argument; "
            "only `values` and `budgets` may be traced."
        )
    c = np.asarray(c, dtype=np.float64)
    if c.shape == (q, k):
        c = np.broadcast_to(c[:, None, :], (q, n, k))
    if c.shape != (q, n, k):
        raise ValueError(
            f"{name}: costs must have shape ({q}, {k}) or ({q}, {n}, {k}) for {q} budgets; "
            f"got {c.shape}."
        )
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name}: costs must be finite (forbid an option with value -inf).")
    return c


def _per_budget(resolution, q: int, name: str) -> tuple[float | None, ...]:
    if resolution is None or np.ndim(resolution) == 0:
        return (resolution,) * q
    res = tuple(resolution)
    if len(res) != q:
        raise ValueError(f"{name}: resolution must be a scalar or have {q} entries; got {res}.")
    return res


def _budget_range(costs: np.ndarray, budget) -> float:
    """Cost range a table needs for one budget: up to a concrete budget, else the whole span."""
    lo = math.fsum(costs.min(axis=1).tolist())
    span = float(np.sum(costs.max(axis=1) - costs.min(axis=1)))
    if budget is not None and math.isfinite(float(budget)) and float(budget) - lo > 0:
        return min(span, float(budget) - lo)
    return span


def _fitting_resolution(costs: np.ndarray, budget, units: int) -> float:
    """Resolution giving a table of about ``units`` cells for one budget.

    Up to a concrete budget below the cost range, ``units`` over that range. Over the whole
    range (a traced budget, or one above it) every group's range rounds up by less than one
    unit, so ``units`` less the number of groups (at least half of ``units``) are spread.
    """
    rng = _budget_range(costs, budget)
    if rng <= 0:
        return 1.0
    span = float(np.sum(costs.max(axis=1) - costs.min(axis=1)))
    if rng < span:
        return units / rng
    moving = int(np.sum(costs.max(axis=1) > costs.min(axis=1)))
    return max(units - moving, units // 2) / span


def _infeasible_cost_error(name: str, costs: np.ndarray, budgets: np.ndarray, bad) -> ValueError:
    d = int(bad[0])
    lo = math.fsum(costs[d].min(axis=1).tolist())
    return ValueError(
        f"{name}: infeasible budget {d} ({_fmt(float(budgets[d]))}): even the cheapest option "
        f"in every group costs {_fmt(lo)} in total under it (plus a float-rounding margin for "
        "real costs)."
    )


def _pair_plans(
    costs: np.ndarray, b_host, resolution, max_table_bytes: int, name: str
) -> tuple[tuple[_Plan, _Plan], np.ndarray | None]:
    """Per-budget discretisation of a two-budget problem; checks the joint table size."""
    n, k = costs.shape[1:]
    res = _per_budget(resolution, 2, name)
    itemsize = np.dtype(_table_dtype(k)).itemsize
    b = [None, None] if b_host is None else list(b_host)
    exact = [res[d] is None and _integer_costs(costs[d]) for d in range(2)]
    plans: list = [None, None]
    units: list = [None, None]

    def plan(d, r):
        p, u = _plan(
            costs[d],
            None if b_host is None else b_host[d : d + 1],
            r,
            2**62,
            raise_infeasible=False,
        )
        plans[d], units[d] = p, u

    for d in range(2):
        if exact[d] or res[d] is not None:
            plan(d, res[d])
    fixed = math.prod(p.capacity + 1 for p in plans if p is not None)
    free = [d for d in range(2) if plans[d] is None]
    if free:
        cells = _DP2_DEFAULT_BYTES // max(n * itemsize, 1)
        per = max(16, int((cells / fixed) ** (1 / len(free))) - 1)
        # Small problems need no more than ~64 units per group (rounding loses < 1/64 of
        # the range per group, which the fill then recovers); a 64 MiB table would make
        # every solve of a 5-group problem take 0.3 s.
        per = min(per, max(64, 64 * n))
        for d in free:
            plan(d, _fitting_resolution(costs[d], b[d], per))
    if b_host is not None:
        bad = [d for d in range(2) if units[d][0] < 0]
        if bad:
            raise _infeasible_cost_error(name, costs, b_host, bad)
    caps = [p.capacity for p in plans]
    table = n * (caps[0] + 1) * (caps[1] + 1) * itemsize
    if table > max_table_bytes:
        per = max(16, int(math.sqrt(max_table_bytes / 2 / max(n * itemsize, 1))))
        spans = [_budget_range(costs[d], b[d]) for d in range(2)]
        hint = ", ".join(_fmt(per / s) if s > 0 else "1" for s in spans)
        raise ValueError(
            f"{name}: the two-budget choice table would need {table / 2**20:.1f} MiB ({n} "
            f"groups x {caps[0] + 1} x {caps[1] + 1} cost units), more than max_table_bytes="
            f"{max_table_bytes}. Pass a coarser `resolution` per budget (e.g. resolution=("
            f"{hint}) units per cost unit; the result stays feasible), raise `max_table_bytes`, "
            "or use method='lagrangian' (approximate, small tables)."
            + (
                " With traced budgets the table spans the whole cost range, at least one unit "
                "per group that has a range: for many groups, method='lagrangian' is the way."
                if b_host is None
                else ""
            )
        )
    b_units = None if b_host is None else np.array([units[0][0], units[1][0]], np.int32)
    return (plans[0], plans[1]), b_units


def _forward2(values, u0, u1, w0: int, w1: int, p0: int, p1: int):
    """Two-budget DP over the groups: (last (w0, w1) row, (N, w0, w1) choice table)."""
    neg = jnp.asarray(-jnp.inf, values.dtype)
    row = jnp.full((w0, w1), neg).at[0, 0].set(0)

    def step(row, x):
        v_i, a_i, b_i = x
        padded = jnp.pad(row, ((p0, 0), (p1, 0)), constant_values=neg)
        cands = [
            lax.dynamic_slice(padded, (p0 - a_i[o], p1 - b_i[o]), (w0, w1)) + v_i[o]
            for o in range(values.shape[-1])
        ]
        best, choice = _best_and_choice(cands)
        return best, choice.astype(_table_dtype(values.shape[-1]))

    return lax.scan(step, row, (values, jnp.minimum(u0, p0), jnp.minimum(u1, p1)))


@functools.lru_cache(maxsize=64)
def _pair_solver(shape: tuple[int, int, int, int], moves: int):
    """Two-budget DP (+ fill) for tables of ``(w0, w1)`` cells padded by ``(p0, p1)``."""
    w0, w1, p0, p1 = shape

    def solve(values, u0, u1, b_units, *fill_args):
        row, table = _forward2(values, u0, u1, w0, w1, p0, p1)
        j0 = jnp.arange(w0)[:, None]
        j1 = jnp.arange(w1)[None, :]
        masked = jnp.where((j0 <= b_units[0]) & (j1 <= b_units[1]), row, -jnp.inf)
        flat = jnp.argmax(masked.ravel()).astype(jnp.int32)  # Fewest units of budget 0 first.
        feasible = masked.ravel()[flat] > -jnp.inf

        def back(cell, x):
            t_i, a_i, b_i = x
            choice = t_i[cell[0], cell[1]].astype(jnp.int32)
            return cell - jnp.stack([a_i[choice], b_i[choice]]), choice

        cell = jnp.stack([flat // w1, flat % w1])
        _, assignment = lax.scan(back, cell, (table, u0, u1), reverse=True)
        assignment = jnp.where(feasible, assignment, -1)
        if moves:
            fine, b_fine = fill_args
            assignment = _fill(values, fine, b_fine, assignment, moves)
        return assignment

    return _sequential(solve, lambda n, k: n * w0 * w1 * jnp.dtype(_table_dtype(k)).itemsize)


@functools.partial(jax.jit, static_argnames=("shape", "moves"))
def _run_pair(values, u0, u1, b_units, fill_args=(), *, shape, moves=0):
    assignment = _pair_solver(shape, moves)(_dp_values(values), u0, u1, b_units, *fill_args)
    return assignment, _total(values, assignment)


def _repair(values, fine, b_fine, assignment, inv_range, max_moves: int):
    """Moves an assignment towards feasibility: while it exceeds a fine budget, applies the
    single-group change that strictly reduces the total scaled excess
    ``sum_d max(0, t_d - b_d) / range_d`` with the best value change per unit of excess
    removed. Returns the assignment (``-1`` in, ``-1`` out) and whether it now fits."""
    q, n, k = fine.shape
    fine = jnp.asarray(fine)
    flat = jnp.arange(n * k, dtype=jnp.int32).reshape(n, k)
    start = jnp.maximum(assignment, 0)

    def totals(a):
        return jnp.sum(jnp.take_along_axis(fine, a[None, :, None], axis=2)[..., 0], axis=1)

    def cond(c):
        a, t, count = c
        return jnp.any(t > b_fine) & (count < max_moves)

    def body(c):
        a, t, count = c
        cur_v = jnp.take_along_axis(values, a[:, None], axis=1)
        cur_f = jnp.take_along_axis(fine, a[None, :, None], axis=2)
        new_t = t[:, None, None] + (fine - cur_f)
        excess = jnp.sum(jnp.maximum(t - b_fine, 0).astype(inv_range.dtype) * inv_range)
        new_excess = jnp.sum(
            jnp.maximum(new_t - b_fine[:, None, None], 0).astype(inv_range.dtype)
            * inv_range[:, None, None],
            axis=0,
        )
        drop = excess - new_excess
        gain = values - cur_v
        gain = jnp.where(jnp.isnan(gain), -jnp.inf, gain)
        score = jnp.where(drop > 0, gain / jnp.where(drop > 0, drop, 1), -jnp.inf)
        best = jnp.max(score)
        go = best > -jnp.inf
        j = jnp.min(jnp.where(score == best, flat, n * k - 1))
        i = j // k
        o = jnp.where(go, j % k, a[i])
        t = jnp.where(go, new_t[:, i, o], t)
        return a.at[i].set(o), t, jnp.where(go, count + 1, max_moves)

    a, t, _ = lax.while_loop(cond, body, (start, totals(start), jnp.int32(0)))
    ok = jnp.all(assignment >= 0) & jnp.all(t <= b_fine)
    return jnp.where(ok, a, -1), ok


@functools.lru_cache(maxsize=64)
def _lagrangian_solver(segments, iters: int, repair_moves: int, fill_moves: int):
    """Lagrangian heuristic for ``q >= 2`` budgets (budget 0 in the DP, the others priced)."""

    def solve(values, units0, b0_units, fine, b_fine):
        q, n, k = fine.shape
        fine = jnp.asarray(fine)
        dtype = values.dtype
        rows = jnp.arange(n)
        span = jnp.sum(jnp.max(fine, axis=2), axis=1)
        inv_range = 1.0 / jnp.maximum(span, 1).astype(dtype)
        scaled = fine[1:].astype(dtype) * inv_range[1:, None, None]  # (q - 1, N, K) in [0, 1].
        finite = jnp.isfinite(values)
        hi = jnp.max(jnp.where(finite, values, -jnp.inf), axis=1)
        lo = jnp.min(jnp.where(finite, values, jnp.inf), axis=1)
        vspan = jnp.sum(jnp.where(jnp.isfinite(hi) & jnp.isfinite(lo), hi - lo, 0))
        vspan = jnp.maximum(vspan, jnp.finfo(dtype).tiny)
        b_scaled = b_fine[1:].astype(dtype) * inv_range[1:]

        def value(a):
            return jnp.sum(values[rows, jnp.maximum(a, 0)])

        def totals(a):
            return jnp.sum(jnp.take_along_axis(fine, a[None, :, None], axis=2)[..., 0], axis=1)

        # Start: the option of least total scaled cost in every group, repaired.
        cheap = jnp.argmin(jnp.sum(fine.astype(dtype) * inv_range[:, None, None], axis=0), 1)
        cheap = jnp.where(finite[rows, cheap], cheap, jnp.argmax(values, axis=1))
        a0, ok0 = _repair(values, fine, b_fine, cheap.astype(jnp.int32), inv_range, repair_moves)
        best_v = jnp.where(ok0, value(a0), -jnp.inf)

        def body(it, c):
            lam, best_a, best_v, theta, dual_best, stall = c
            shaded = values - jnp.tensordot(lam, scaled, 1)
            a = _solve_one(shaded, units0, b0_units, segments=segments)
            solved = jnp.all(a >= 0)
            g = (totals(jnp.maximum(a, 0))[1:] - b_fine[1:]).astype(dtype) * inv_range[1:]
            dual = jnp.sum(shaded[rows, jnp.maximum(a, 0)]) + jnp.dot(lam, b_scaled)
            cand, ok = _repair(values, fine, b_fine, a, inv_range, repair_moves)
            v = jnp.where(ok & solved, value(cand), -jnp.inf)
            better = v > best_v
            best_a = jnp.where(better, cand, best_a)
            best_v = jnp.maximum(best_v, v)
            # Polyak step towards the best value found, theta halved after 3 stalled steps.
            improved = dual < dual_best
            stall = jnp.where(improved, 0, stall + 1)
            theta = jnp.where(stall >= 3, theta / 2, theta)
            stall = jnp.where(stall >= 3, 0, stall)
            target = jnp.where(jnp.isfinite(best_v), best_v, dual - 0.05 * vspan)
            gap = jnp.maximum(dual - target, 1e-4 * vspan)
            step = theta * gap / jnp.maximum(jnp.sum(g * g), jnp.finfo(dtype).tiny)
            new_lam = jnp.maximum(lam + step * g, 0)
            lam = jnp.where(solved, new_lam, lam)
            return lam, best_a, best_v, theta, jnp.minimum(dual_best, dual), stall

        init = (
            jnp.zeros(q - 1, dtype),
            a0,
            best_v,
            jnp.asarray(1.0, dtype),
            jnp.asarray(jnp.inf, dtype),
            jnp.int32(0),
        )
        _, best_a, best_v, _, _, _ = lax.fori_loop(0, iters, body, init)
        found = best_v > -jnp.inf
        best_a = jnp.where(found, best_a, -1)
        return _fill(values, fine, b_fine, best_a, fill_moves)

    return _sequential(solve, _segment_bytes(segments))


@functools.partial(jax.jit, static_argnames=("segments", "iters", "repair_moves", "fill_moves"))
def _run_lagrangian(
    values, units0, b0_units, fine, b_fine, *, segments, iters, repair_moves, fill_moves
):
    solve = _lagrangian_solver(segments, iters, repair_moves, fill_moves)
    assignment = solve(_dp_values(values), units0, b0_units, fine, b_fine)
    return assignment, _total(values, assignment)


def _lagrangian_units(n: int) -> int:
    """Default table width of the Lagrangian's DP over budget 0 (real costs): ~1 MiB."""
    n = max(int(n), 1)
    return max(64, min(_LAGRANGIAN_CELLS // n, 256 * n))


def knapsack_multi(
    values,
    costs,
    budgets,
    *,
    resolution=None,
    max_table_bytes: int = 2**30,
    method: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""Best assignment of one option per group under ``q`` budgets at once.

    Solves the multiple-choice knapsack problem with ``q`` knapsack constraints

    .. math::

      \max_{a \in \{0..K-1\}^N} \sum_i v_{i, a_i}
      \quad \text{s.t.} \quad \sum_i c^{(d)}_{i, a_i} \le B_d, \quad d = 0 .. q - 1.

    * ``q == 1``: :func:`knapsack`.
    * ``q == 2``, ``method="auto"`` or ``"exact"``: the two-dimensional DP
      :math:`d_i[j_0, j_1] = \max_k d_{i-1}[j_0 - u^{(0)}_{ik}, j_1 - u^{(1)}_{ik}] + v_{ik}`
      over unit costs of both budgets (a ``lax.scan`` over groups taking ``K`` shifted 2-D
      windows, an int8 choice table ``(N, U_0 + 1, U_1 + 1)``, a reverse scan to
      backtrack). Each budget is discretised as in :func:`knapsack`: integer costs exactly
      (gcd-reduced), real costs rounded up per budget, so the answer is the exact optimum
      for integer costs. For real costs without ``resolution``, each budget's range (up
      to a concrete budget, else the whole cost range) gets the same number of units, sized
      so that the table stays within 64 MiB; then the fill of :func:`knapsack` (both budgets
      checked) spends the leftover slack. Time ``O(N K U_0 U_1)``. A traced budget spans
      the whole range with at least one unit per group: beyond a few hundred groups with
      real costs, prefer concrete budgets or ``method="lagrangian"``.
    * ``q >= 3`` (``"auto"``) or ``method="lagrangian"`` (any ``q >= 2``): an approximate
      Lagrangian heuristic. Budget 0 stays exact in a 1-D DP (:func:`knapsack`'s, on a
      table of about 1 MiB for real costs; put the most binding budget first); budgets
      ``1 .. q-1`` are priced: the DP maximises
      :math:`\sum_i v_{i a_i} - \sum_{d \ge 1} \lambda_d \hat c^{(d)}_{i a_i}` (costs scaled
      by their range), and the prices follow projected subgradient steps
      :math:`\lambda \leftarrow \max(0, \lambda + s_t g_t)`, :math:`g_t` the scaled excess
      of each budget, with Polyak step sizes :math:`s_t = \theta_t (L_t - V^*) / \|g_t\|^2`
      (:math:`L_t` the Lagrangian bound, :math:`V^*` the best value found, :math:`\theta`
      halved after 3 steps without a better bound), for 32 iterations in a
      ``lax.fori_loop``. Each iterate is *repaired* (single-group changes that strictly
      reduce the total scaled excess, best value change per excess removed) and the best
      feasible one by value is kept, then filled. Measured gaps: ``benchmarks/README.md``
      (q in {3, 4}, N = 50..200: within a few tenths of a percent of CP-SAT on average);
      no bound is guaranteed, and the heuristic can miss a feasible assignment when the
      budgets leave very few (the result is then infeasible, see below).

    Every returned assignment satisfies *every* budget, for every method: feasibility is
    checked in exact integer arithmetic on costs rounded up (fine units, as in
    :func:`knapsack`'s fill), so ``sum_i costs[d, i, a_i] <= budgets[d]`` holds in float64
    in any summation order.

    Args:
      values: ``(N, K)`` floats, may be traced; ``-inf`` forbids an option.
      costs: ``(q, N, K)``, or ``(q, K)`` shared by all groups, per budget. Concrete.
      budgets: ``(q,)``, may be traced.
      resolution: ``None``, a scalar, or one entry per budget (``None`` entries allowed):
        units per cost unit of the DP tables, as in :func:`knapsack`. The Lagrangian method
        only discretises budget 0 this way.
      max_table_bytes: raise ``ValueError`` rather than allocate a larger choice table.
      method: ``"auto"``, ``"exact"`` (``q <= 2``) or ``"lagrangian"``.

    Returns:
      ``(assignment, total_value)`` as in :func:`knapsack`. Infeasible (no assignment
      found that fits every budget; for real costs rounded up, or for the Lagrangian
      heuristic, one may exist that was missed): ``ValueError`` if budgets and values are
      concrete (or a budget is below its cheapest total), otherwise assignment ``-1``
      everywhere and total ``-inf``. ``jax.vmap`` over values and budgets solves the
      problems one after another.

    Raises:
      TypeError: traced costs.
      ValueError: bad shapes, method or resolution; infeasible concrete problems; a table
        larger than ``max_table_bytes`` (with a suggested ``resolution``).

    Example:

      >>> import numpy as np
      >>> values = np.array([[0.0, 2.0, 3.0], [0.0, 1.0, 4.0]])
      >>> costs = np.array([[1, 2, 3], [3, 1, 2]])  # (q, K), shared by the groups
      >>> assignment, total = knapsack_multi(values, costs, np.array([4, 4]))
      >>> assignment.tolist(), float(total)  # (0, 2) is worth 4 but needs 5 of budget 1
      ([1, 1], 3.0)

    References:
      Kellerer, Pferschy & Pisinger, "Knapsack Problems" (2004), ch. 9 (multidimensional
      knapsack: DP, Lagrangian relaxation) and ch. 11 (multiple-choice). Held, Wolfe &
      Crowder, "Validation of subgradient optimization", Math. Programming 6 (1974) (the
      Polyak-type step). RCO: Helcig & Alistarh (2026), arXiv:2605.00649.
    """
    name = "knapsack_multi"
    values = _prepare_values(values)
    if values.ndim != 2:
        raise ValueError(f"{name}: values must be (N, K); got shape {values.shape}.")
    n, k = values.shape
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}; got {method!r}.")
    if np.ndim(budgets) != 1 or np.shape(budgets)[0] < 1:
        raise ValueError(f"{name}: budgets must have shape (q,), q >= 1; got {np.shape(budgets)}.")
    q = int(np.shape(budgets)[0])
    host = _host_multi_costs(costs, q, n, k, name)
    b_host = _concrete(budgets)
    if b_host is not None:
        b_host = np.asarray(b_host).reshape(q)
        if np.issubdtype(b_host.dtype, np.floating) and np.any(np.isnan(b_host)):
            raise ValueError(f"{name}: budgets contain NaN.")
    b_any = b_host if b_host is not None else jnp.asarray(budgets)
    if q == 1:
        return knapsack(
            values,
            host[0],
            b_any[0],
            resolution=_per_budget(resolution, 1, name)[0],
            max_table_bytes=max_table_bytes,
        )
    if n == 0:  # No groups: every budget must admit the empty sum.
        if b_host is not None and np.any(b_host < 0):
            bad = np.flatnonzero(b_host < 0)
            raise _infeasible_cost_error(name, np.zeros((q, 0, k)), b_host, bad)
        assignment = jnp.zeros((0,), jnp.int32)
        total = _total_jit(values, assignment)
        return assignment, jnp.where(jnp.all(jnp.asarray(b_any) >= 0), total, -jnp.inf)
    if method == "exact" and q > 2:
        raise ValueError(
            f"{name}: method='exact' solves at most two budgets (a (q)-dimensional table grows "
            f"as the product of the budgets' units); got q={q}. Use method='lagrangian'."
        )
    fine = _fine(host)
    if q == 2 and method != "lagrangian":
        plans, b_units = _pair_plans(host, b_host, resolution, max_table_bytes, name)
        if b_units is None:
            b_dev = jnp.stack([_traced_budget_units(b_any[d], plans[d]) for d in range(2)])
        else:
            b_dev = b_units
        fill_args, moves = (), 0
        if not all(p.exact for p in plans):
            fill_args, moves = (fine.units, fine.budget_units(b_any)), _fill_moves(n)
        shape = tuple(p.capacity + 1 for p in plans) + tuple(p.pad for p in plans)
        assignment, total = _run_pair(
            values, plans[0].units, plans[1].units, b_dev, fill_args, shape=shape, moves=moves
        )
    else:
        b_fine = fine.budget_units(b_any)
        if b_host is not None and np.any(b_fine < 0):
            raise _infeasible_cost_error(name, host, b_host, np.flatnonzero(b_fine < 0))
        res0 = _per_budget(resolution, q, name)[0]
        plan0, b0 = _plan(
            host[0],
            None if b_host is None else b_host[:1],
            res0,
            max_table_bytes,
            target_units=_lagrangian_units(n),
            raise_infeasible=False,
        )
        b0_dev = _traced_budget_units(b_any[0], plan0) if b0 is None else np.int32(b0[0])
        assignment, total = _run_lagrangian(
            values,
            plan0.units,
            b0_dev,
            fine.units,
            b_fine,
            segments=plan0.segments,
            iters=_LAGRANGIAN_ITERS,
            repair_moves=n + 64,
            fill_moves=_fill_moves(n),
        )
    if b_host is not None and _concrete(values) is not None and not np.asarray(total) > -np.inf:
        hint = (
            " (the Lagrangian heuristic found none; one may exist: try method='exact' for two "
            "budgets)"
            if q > 2 or method == "lagrangian"
            else " (with real costs rounded up; a finer `resolution` may find one)"
            if not all(r.exact for r in fine.rules)
            else ""
        )
        raise ValueError(
            f"{name}: no feasible assignment: no assignment of finite-valued options fits "
            f"every budget{hint}."
        )
    return assignment, total


def knapsack_blocks(
    values,
    costs,
    budgets,
    blocks,
    *,
    resolution: float | None = None,
    max_table_bytes: int = 2**30,
) -> tuple[jax.Array, jax.Array]:
    r"""Best assignment under one budget per block of groups (exact).

    Each group belongs to one block ``blocks[i]`` in ``0 .. q-1``, and budget ``j``
    constrains only its own block:

    .. math::

      \max_a \sum_i v_{i, a_i} \quad \text{s.t.} \quad
      \sum_{i:\ \mathrm{blocks}_i = j} c_{i, a_i} \le B_j, \quad j = 0 .. q - 1.

    The problem separates into one :func:`knapsack` per block. Blocks with the same number
    of groups and the same cost table (e.g. "keep ``r`` of ``E`` experts in every layer")
    are solved together in one :func:`knapsack_batch` call, the others one call per
    distinct table. Same guarantees as :func:`knapsack` per block: exact for integer costs,
    never over any budget for real ones (and filled).

    Args:
      values: ``(N, K)`` floats, may be traced.
      costs: ``(N, K)`` or ``(K,)``, concrete, including any per-group weights.
      budgets: ``(q,)``, may be traced.
      blocks: ``(N,)`` concrete integers in ``[0, q)``. An empty block's budget must be
        at least 0.
      resolution, max_table_bytes: as in :func:`knapsack`, per block.

    Returns:
      ``(assignment, total_value)`` as in :func:`knapsack`. If any block is infeasible:
      ``ValueError`` naming the blocks when budgets (and, for forbidden options, values)
      are concrete, otherwise assignment ``-1`` everywhere and total ``-inf``.

    Example:

      >>> import numpy as np
      >>> values = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [0.0, 5.0]])
      >>> costs = np.array([0, 1])  # keep (1) or drop (0) each of 2 experts per layer
      >>> assignment, total = knapsack_blocks(values, costs, np.array([1, 1]), [0, 0, 1, 1])
      >>> assignment.tolist(), float(total)
      ([0, 1, 0, 1], 8.0)

    References:
      Kellerer, Pferschy & Pisinger, "Knapsack Problems" (2004), ch. 11.
    """
    name = "knapsack_blocks"
    values = _prepare_values(values)
    if values.ndim != 2:
        raise ValueError(f"{name}: values must be (N, K); got shape {values.shape}.")
    n, k = values.shape
    host_costs = _host_costs(costs, n, k)
    blk = _concrete(blocks)
    if blk is None:
        raise TypeError(f"{name}: `blocks` must be concrete (they fix the problems' shapes).")
    blk = np.asarray(blk)
    if blk.shape != (n,) or (blk.size and not np.issubdtype(blk.dtype, np.integer)):
        raise ValueError(f"{name}: blocks must be ({n},) integers; got {blk.shape} {blk.dtype}.")
    if np.ndim(budgets) != 1:
        raise ValueError(f"{name}: budgets must have shape (q,); got {np.shape(budgets)}.")
    q = int(np.shape(budgets)[0])
    if blk.size and (blk.min() < 0 or blk.max() >= q):
        raise ValueError(f"{name}: blocks must lie in [0, {q}) for {q} budgets.")
    b_host = _concrete(budgets)
    b_any = np.asarray(b_host).reshape(q) if b_host is not None else jnp.asarray(budgets)
    members = [np.flatnonzero(blk == j) for j in range(q)]
    classes: dict[tuple, list[int]] = {}
    for j in range(q):
        key = (members[j].size, host_costs[members[j]].tobytes())
        classes.setdefault(key, []).append(j)

    assignment = jnp.full((n,), -1, jnp.int32)
    ok = jnp.asarray(True)
    bad_costs, solved = [], []
    for ids in classes.values():
        ids_arr = np.array(ids)
        size = members[ids[0]].size
        b_class = b_any[ids_arr]
        if size == 0:  # Empty blocks: the empty sum must fit.
            if b_host is not None:
                bad_costs += [j for j in ids if not b_any[j] >= 0]
            else:
                ok = ok & jnp.all(b_class >= 0)
            continue
        rows = np.stack([members[j] for j in ids])  # (M, size)
        c = host_costs[rows[0]]
        plan, b_units = _plan(
            c,
            None if b_host is None else b_class,
            resolution,
            max_table_bytes,
            raise_infeasible=False,
        )
        if b_units is None:
            b_dev = _traced_budget_units(b_class, plan)
        else:
            bad_costs += [j for j, u in zip(ids, b_units) if u < 0]
            b_dev = b_units.astype(np.int32)
        fill_args, moves = _fill_args(c, plan, b_class[:, None])
        a, _ = _run_many(
            values[rows], plan.units, b_dev, fill_args, segments=plan.segments, moves=moves
        )
        assignment = assignment.at[rows.ravel()].set(a.ravel())
        solved.append((ids, a))
    if bad_costs:
        bad_costs.sort()
        raise ValueError(
            f"{name}: infeasible budgets for blocks {bad_costs[:8]}: below the cheapest "
            "total of their groups (plus a float-rounding margin for real costs)."
        )
    ok = ok & jnp.all(assignment >= 0)
    assignment = jnp.where(ok, assignment, -1)
    total = _total_jit(values, assignment)
    if b_host is not None and _concrete(values) is not None and not np.asarray(total) > -np.inf:
        bad = sorted(j for ids, a in solved for j, row in zip(ids, np.asarray(a)) if row[0] < 0)
        raise ValueError(
            f"{name}: no feasible assignment for blocks {bad[:8]}: every assignment within "
            "their budgets uses an option whose value is -inf (forbidden)."
        )
    return assignment, total
