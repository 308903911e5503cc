"""sweep(): grid semantics, best feasible run, errors; SPMD on 8 devices and on 2 processes.

The multi-device checks run in subprocesses (``tests/spmd_checks.py``), since the device
count is fixed when JAX starts: 8 simulated CPU devices in one process, and two processes
of 4 devices joined by ``jax.distributed`` over 127.0.0.1. Their results are compared with
single-device runs of the same problems in this process.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rco_jax import BudgetConstraint, MultiBudget, SolverDivergedError, SweepResult, solve, sweep
from rco_jax.solve import select_best as _select_best

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import spmd_checks as sc  # noqa: E402

SCRIPT = HERE / "spmd_checks.py"
TIMEOUT_S = 420  # per subprocess; normally ~40-60 s on 2 busy cores


@functools.cache
def reference(name: str):
    """Single-device results of the problems the subprocesses run (cached per worker)."""
    if name == "grid":
        loss_fn, c = sc.sweep_problem()
        return sweep(loss_fn, c, key=jax.random.key(0), **sc.GRID, **sc.SWEEP_KW)
    if name == "padded":
        loss_fn, c = sc.sweep_problem()
        return sweep(loss_fn, c, key=jax.random.key(0), **sc.PADDED_GRID, **sc.SWEEP_KW)
    if name == "dp_sweep":
        loss_fn = sc.data_loss(jnp.asarray(sc.tokens()))
        return sweep(loss_fn, sc.data_constraint(), key=jax.random.key(1), **sc.DP_GRID)
    if name == "solve":
        loss_fn = sc.data_loss(jnp.asarray(sc.tokens()))
        return solve(
            loss_fn, sc.data_constraint(), key=jax.random.key(5), progress=False, **sc.SOLVE_KW
        )
    raise KeyError(name)


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def _last_json(stdout: str, what: str, stderr: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        pytest.fail(
            f"{what} printed no result.\n--- stdout ---\n{stdout[-3000:]}\n"
            f"--- stderr ---\n{stderr[-6000:]}"
        )
    return json.loads(lines[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one device: semantics ---------------------------------------------------------------------


def test_grid_coordinates_and_best_feasible_run():
    out = reference("grid")
    assert isinstance(out, SweepResult)
    n, q = sc.N, 8  # 2 restarts x 2 learning rates x 2 budgets
    assert out.loss.shape == (q,) and out.assignment.shape == (q, n)
    assert out.logits.shape == (q, n, sc.K) and out.history["loss"].shape == (q, 20)
    # restart-major, budget fastest
    np.testing.assert_array_equal(out.restart, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(out.learning_rate, [0.05, 0.05, 0.2, 0.2] * 2)
    np.testing.assert_allclose(out.budget, [18.0, 24.0] * 4)
    cost, budget, loss = (np.asarray(x) for x in (out.cost, out.budget, out.loss))
    assert np.all(cost <= budget) and np.all(np.asarray(out.feasible))
    i = int(out.best_index)
    assert loss[i] == loss.min()
    for field in ("assignment", "logits", "loss", "cost", "from_sample"):
        np.testing.assert_array_equal(getattr(out.best, field), getattr(out, field)[i])
    np.testing.assert_array_equal(out.best.history["loss"], out.history["loss"][i])


def test_runs_equal_vmapped_solve_with_fold_in_keys():
    out = reference("grid")
    loss_fn, c = sc.sweep_problem()
    base = jax.random.key(0)

    def run(r, lr, b):
        key = jax.random.fold_in(base, r)
        return solve(
            loss_fn, c.replace(budget=b), key=key, learning_rate=lr, progress=False, **sc.SWEEP_KW
        )

    ref = jax.vmap(run)(out.restart, out.learning_rate, out.budget)
    np.testing.assert_array_equal(out.assignment, ref.assignment)
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_select_best_masks_padding_and_judges_each_run_by_its_own_budget():
    loss = jnp.array([3.0, 1.0, 2.0, jnp.nan, 0.5, 0.1])
    cost = jnp.array([10.0, 12.0, 9.0, 5.0, 9.0, 5.0])
    budget = jnp.array([10.0, 11.0, 9.0, 10.0, 10.0, 10.0])  # run 1 is over its own budget
    valid = jnp.array([True, True, True, True, True, False])  # run 5 is padding
    feasible, best, any_ok = _select_best(loss, cost, budget, valid)
    np.testing.assert_array_equal(feasible, [True, False, True, False, True, False])
    assert int(best) == 4 and bool(any_ok)
    # several budgets: a run must fit every one
    cost2 = jnp.array([[1.0, 5.0], [1.0, 2.0]])
    feasible2, best2, _ = _select_best(
        jnp.array([0.0, 1.0]), cost2, jnp.full((2, 2), 3.0), jnp.array([True, True])
    )
    np.testing.assert_array_equal(feasible2, [False, True])
    assert int(best2) == 1
    _, _, none_ok = _select_best(loss[:1], cost[:1], budget[:1], jnp.array([False]))
    assert not bool(none_ok)


def test_multibudget_grid_of_budget_vectors():
    costs = jnp.array([0.0, 1.0])  # keep (1) or drop (0) a group
    blocks = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
    mb = MultiBudget.per_block(costs, jnp.array([2.0, 2.0]), blocks)
    gain = 1 + jnp.arange(8.0) % 4
    grid = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    out = sweep(
        lambda w: -jnp.sum(w[:, 1] * gain),
        mb,
        key=jax.random.key(0),
        budgets=grid,
        num_steps=15,
        chunk_size=15,
    )
    np.testing.assert_allclose(out.budget, grid)
    assert out.cost.shape == (3, 2)
    np.testing.assert_array_equal(out.cost, np.asarray(grid))  # equality budgets: met exactly
    assert np.isnan(np.asarray(out.learning_rate)).sum() == 0
    np.testing.assert_allclose(out.learning_rate, 0.05)
    np.testing.assert_array_equal(out.best.cost, out.cost[int(out.best_index)])


def test_no_feasible_run_raises_with_the_results():
    c = BudgetConstraint(jnp.array([1.0, 2.0, 3.0]), 8.0, num_groups=4)
    with pytest.raises(SolverDivergedError, match="none of the 2 runs") as err:
        sweep(
            lambda w: jnp.sum(w) * jnp.nan,
            c,
            key=jax.random.key(0),
            num_restarts=2,
            num_steps=5,
            learning_rate=0.1,
        )
    res = err.value.result
    assert isinstance(res, SweepResult) and not np.any(np.asarray(res.feasible))
    np.testing.assert_allclose(res.learning_rate, [0.1, 0.1])  # the fixed learning rate
    np.testing.assert_allclose(res.budget, [8.0, 8.0])  # the constraint's own budget


def test_bad_arguments():
    c = BudgetConstraint(jnp.array([1.0, 2.0, 3.0]), 8.0, num_groups=4)
    loss = lambda w: jnp.sum(w)
    key = jax.random.key(0)
    cases = [
        (dict(learning_rates=[]), "grid is empty"),
        (dict(budgets=[]), "grid is empty"),
        (dict(num_restarts=0), "grid is empty"),
        (dict(num_restarts=1.5), "positive integer"),
        (dict(learning_rates=[0.1, -0.1]), "finite and positive"),
        (dict(learning_rates=[[0.1]]), "1-D"),
        (dict(learning_rates=[0.1], learning_rate=0.2), "learning_rate"),
        (dict(budgets=[[6.0, 7.0]]), r"sequence of scalars.*shape \(B,\)"),
        (dict(budgets=[2.0]), "not reachable"),
        (dict(mesh=[]), "empty list of devices"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sweep(loss, c, key=key, **kwargs)
    with pytest.raises(ValueError, match="one PRNG key"):
        sweep(loss, c, key=jax.random.split(key, 2))
    mb = MultiBudget([c, BudgetConstraint(jnp.array([[1.0, 0.5, 0.2]] * 4), 2.0)])
    with pytest.raises(ValueError, match=r"\(2,\) vectors"):
        sweep(loss, mb, key=key, budgets=[8.0, 9.0])


# --- several devices and processes ---------------------------------------------------------


def test_eight_devices_sharded_sweep_data_parallel_solve_and_knapsack():
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "devices"], env=_env(8), stdout=out, stderr=err
        )
        try:
            names = ("grid", "padded", "dp_sweep", "solve")
            refs = {k: reference(k) for k in names}  # meanwhile, here
            rc = proc.wait(timeout=TIMEOUT_S)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
    assert rc == 0, f"8-device script failed (rc={rc}):\n{stderr[-6000:]}"
    checks = _last_json(stdout, "8-device script", stderr)["checks"]
    failed = {k: v["result"] for k, v in checks.items() if not v["ok"]}
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    # Sharded results equal this process's single-device results.
    sc.same(checks["sweep_sharded"]["result"], sc.summary(refs["grid"]), what="sweep: ")
    sc.same(checks["sweep_padded"]["result"], sc.summary(refs["padded"]), what="padded: ")
    sc.same(
        checks["sweep_data_parallel"]["result"],
        sc.summary(refs["dp_sweep"]),
        rtol=1e-6,
        atol=1e-6,
        what="sweep on a (grid, data) mesh: ",
    )
    for how in ("closure", "argument"):
        sc.same(
            checks["data_parallel_solve"]["result"][how],
            sc.summary(refs["solve"]),
            rtol=1e-6,
            atol=1e-6,
            what=f"data-parallel solve ({how}): ",
        )


def test_two_processes_jax_distributed():
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp) / f"p{i}.out", Path(tmp) / f"p{i}.err") for i in range(2)]
        procs = []
        for i, (o, e) in enumerate(logs):
            with open(o, "w") as fo, open(e, "w") as fe:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(SCRIPT), "process", str(i), str(port)],
                        env=_env(4),
                        stdout=fo,
                        stderr=fe,
                    )
                )
        try:
            refs = {k: reference(k) for k in ("grid", "solve")}  # meanwhile, here
            rcs = [p.wait(timeout=TIMEOUT_S) for p in procs]
        except BaseException:
            for p in procs:
                p.kill()
                p.wait()
            raise
        texts = [(o.read_text(), e.read_text()) for o, e in logs]
    for i, (rc, (stdout, stderr)) in enumerate(zip(rcs, texts)):
        assert rc == 0, f"process {i} failed (rc={rc}):\n{stderr[-6000:]}"
        res = _last_json(stdout, f"process {i}", stderr)
        assert res["process"] == i
        sc.same(res["sweep"], sc.summary(refs["grid"]), what=f"process {i} sweep: ")
        sc.same(
            res["solve"],
            sc.summary(refs["solve"]),
            rtol=1e-6,
            atol=1e-6,
            what=f"process {i} data-parallel solve: ",
        )
