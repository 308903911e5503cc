"""Checks that need several devices or processes, run as a subprocess by tests/test_sweep.py.

The device count is fixed when JAX starts, so these run in their own interpreter:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/spmd_checks.py devices
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/spmd_checks.py process I PORT

``devices``: 8 simulated CPU devices in one process; runs each check (sharded sweeps, one
of them on a ``("grid", "data")`` mesh with the tokens split over "data", a data-parallel
``solve``, ``knapsack_batch`` on sharded inputs), asserts what it can see
inside (shardings, shapes) and prints ``{"checks": {name: {"ok": bool, "result": ...}}}`` as
the last line of stdout; the parent compares the results with its single-device runs.

``process I PORT``: process ``I`` of two, joined at ``127.0.0.1:PORT`` by
``jax.distributed.initialize``, 4 devices each; runs one ``sweep`` on all 8 devices and one
data-parallel ``solve`` with the tokens split over all 8 devices, and prints the results
(gathered / replicated) as JSON for the parent test to compare with its own single-device
run. Both modes import the problems below, as does the test.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from rco_jax import BudgetConstraint, knapsack_batch, solve, sweep

N, K, T = 6, 4, 64  # groups, options, calibration tokens
BITS = np.array([2.0, 3.0, 4.0, 8.0], np.float32)
SWEEP_KW = dict(num_steps=20, chunk_size=20)
SOLVE_KW = dict(num_steps=20, chunk_size=10)  # two chunks: the host check runs between them
GRID = dict(num_restarts=2, learning_rates=[0.05, 0.2], budgets=[3.0 * N, 4.0 * N])  # 8 runs
PADDED_GRID = dict(num_restarts=3, learning_rates=[0.1], budgets=[3.5 * N, 4.0 * N])  # 6 runs
DP_GRID = dict(num_restarts=4, learning_rates=[0.05, 0.2], num_steps=10, chunk_size=10)  # 8 runs


def sweep_problem():
    """A small non-decomposable bit-allocation problem: ``(loss_fn, constraint)``."""
    rng = np.random.default_rng(0)
    sens = jnp.asarray(rng.uniform(0.5, 2.0, size=N), jnp.float32)
    err = jnp.asarray(4.0 ** -(BITS - 2), jnp.float32)
    mix = jnp.asarray(rng.uniform(0.0, 0.3, size=(N, N)), jnp.float32)

    def loss_fn(w):
        e = sens * (w @ err)
        return jnp.sum(e) + e @ mix @ e

    return loss_fn, BudgetConstraint(jnp.asarray(BITS), 4.0 * N, num_groups=N)


def tokens() -> np.ndarray:
    """Calibration "tokens": small integers, so every partial sum over them is exact."""
    return np.random.default_rng(1).integers(-3, 4, size=(T, N)).astype(np.float32)


def data_loss(x):
    """A loss over a batch of tokens ``x`` (T, N): mean squared error of the chosen scales.

    Dyadic scales and integer tokens keep every sum exact in float32, so a sharded sum over
    the tokens equals the one-device sum bit for bit and the two searches cannot drift.
    """
    scale = jnp.asarray([0.25, 0.5, 1.0, 1.0], jnp.float32)  # error shrinks with the bits
    target = jnp.sum(x, axis=1)

    def loss_fn(w):
        return jnp.mean((x @ (w @ scale) - target) ** 2)

    return loss_fn


def data_constraint():
    return BudgetConstraint(jnp.asarray(BITS), 3.5 * N, num_groups=N)


def summary(res) -> dict:
    """JSON-able view of a SolveResult / SweepResult."""
    out = {
        "assignment": np.asarray(res.assignment).tolist(),
        "loss": np.asarray(res.loss, np.float64).tolist(),
        "cost": np.asarray(res.cost, np.float64).tolist(),
        "logits": np.asarray(res.logits, np.float64).tolist(),
    }
    if hasattr(res, "best"):
        out["best_index"] = int(res.best_index)
        out["best"] = summary(res.best)
    return out


def same(a, b, *, rtol=1e-5, atol=1e-5, what="") -> None:
    """Raises AssertionError unless two summaries agree (assignments exactly)."""
    assert a["assignment"] == b["assignment"], f"{what}assignments differ"
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=rtol, atol=atol, err_msg=what + "loss")
    np.testing.assert_allclose(a["cost"], b["cost"], rtol=1e-6, err_msg=what + "cost")
    np.testing.assert_allclose(
        a["logits"], b["logits"], rtol=1e-3, atol=1e-3, err_msg=what + "logits"
    )
    if "best" in a:
        assert a["best_index"] == b["best_index"], f"{what}best_index differs"
        same(a["best"], b["best"], rtol=rtol, atol=atol, what=what + "best.")


# --- 8 simulated devices, one process -------------------------------------------------------
# Each check asserts what it can see inside the process (shardings, shapes) and returns the
# results; the parent test compares them with its own single-device runs of the same problems.


def check_sweep_sharded():
    from jax.sharding import PartitionSpec as P

    loss_fn, c = sweep_problem()
    out = sweep(loss_fn, c, key=jax.random.key(0), **GRID, **SWEEP_KW)
    sh = out.loss.sharding
    assert sh.spec == P("grid") and len(sh.device_set) == 8, f"loss sharding {sh}"
    shards = {s.data.shape for s in out.loss.addressable_shards}
    assert shards == {(1,)}, f"loss shards {shards}: one run per device expected"
    best = out.best.logits.sharding
    assert len(best.device_set) == 8 and best.is_fully_replicated, f"best sharding {best}"
    assert np.all(np.asarray(out.feasible)), "every run should be feasible"
    return summary(out)


def check_sweep_padded():
    loss_fn, c = sweep_problem()
    out = sweep(loss_fn, c, key=jax.random.key(0), **PADDED_GRID, **SWEEP_KW)
    assert out.loss.shape == (6,) and out.budget.shape == (6,), out.loss.shape
    assert out.history["loss"].shape == (6, SWEEP_KW["num_steps"])
    assert 0 <= int(out.best_index) < 6
    np.testing.assert_array_equal(out.restart, [0, 0, 1, 1, 2, 2])
    return summary(out)


def check_sweep_data_parallel():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("grid", "data"))
    sharded = jax.device_put(tokens(), NamedSharding(mesh, P("data")))
    out = sweep(data_loss(sharded), data_constraint(), key=jax.random.key(1), mesh=mesh, **DP_GRID)
    sh = out.loss.sharding
    assert sh.spec == P("grid") and len(sh.device_set) == 8, f"loss sharding {sh}"
    shards = {s.data.shape for s in out.loss.addressable_shards}
    assert shards == {(2,)}, f"loss shards {shards}: 2 runs per grid row expected"
    return summary(out)


def check_data_parallel_solve():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharded = jax.device_put(tokens(), NamedSharding(mesh, P("data")))
    c = data_constraint()
    kw = dict(key=jax.random.key(5), progress=False, **SOLVE_KW)
    by_closure = solve(data_loss(sharded), c, **kw)
    # Under jit the polish runs only when asked; eager calls polish this cheap loss by default.
    by_argument = jax.jit(lambda t: solve(data_loss(t), c, polish=True, **kw))(sharded)
    # The closed-over tokens were passed to the chunks as a sharded argument, not embedded as a
    # constant (that would have computed everything on one device).
    for name, r in (("closure", by_closure), ("argument", by_argument)):
        devices = r.logits.sharding.device_set
        assert len(devices) == 8, f"{name}: logits on {len(devices)} devices"
    return {"closure": summary(by_closure), "argument": summary(by_argument)}


def check_knapsack_batch_sharded():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()), ("grid",))
    rng = np.random.default_rng(2)
    m, n, k = 16, 12, 5
    values = rng.normal(size=(m, n, k)).astype(np.float32)
    costs = rng.integers(0, 9, size=(n, k)).astype(np.float32)
    budgets = (costs.min(1).sum() + rng.integers(5, 40, size=m)).astype(np.float32)
    ref_a, ref_t = knapsack_batch(values, costs, budgets)
    v = jax.device_put(values, NamedSharding(mesh, P("grid")))
    b = jax.device_put(budgets, NamedSharding(mesh, P("grid")))
    eager_a, eager_t = knapsack_batch(v, costs, b)
    jit_a, jit_t = jax.jit(lambda vv, bb: knapsack_batch(vv, costs, bb))(v, b)
    for name, (a, t) in (("eager", (eager_a, eager_t)), ("jit", (jit_a, jit_t))):
        np.testing.assert_array_equal(a, ref_a, err_msg=f"{name} assignments")
        np.testing.assert_allclose(t, ref_t, rtol=1e-6, err_msg=f"{name} totals")
    return f"{m} problems sharded over 8 devices equal the unsharded ones"


def run_devices() -> dict:
    assert len(jax.devices()) == 8, f"expected 8 devices, got {jax.devices()}"
    checks = {}
    for name, fn in [
        ("sweep_sharded", check_sweep_sharded),
        ("sweep_padded", check_sweep_padded),
        ("sweep_data_parallel", check_sweep_data_parallel),
        ("data_parallel_solve", check_data_parallel_solve),
        ("knapsack_batch_sharded", check_knapsack_batch_sharded),
    ]:
        try:
            checks[name] = {"ok": True, "result": fn()}
        except Exception:  # report every check, not only the first failure
            checks[name] = {"ok": False, "result": traceback.format_exc(limit=-6)}
    return {"checks": checks}


# --- two processes ----------------------------------------------------------------------------


def run_process(process_id: int, port: int) -> dict:
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    try:
        assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()
        loss_fn, c = sweep_problem()
        out = sweep(loss_fn, c, key=jax.random.key(0), **GRID, **SWEEP_KW)
        assert not out.loss.is_fully_addressable  # really spread over both processes
        gathered = multihost_utils.process_allgather(
            (out.assignment, out.loss, out.cost, out.logits), tiled=True
        )
        result = {
            "assignment": np.asarray(gathered[0]).tolist(),
            "loss": np.asarray(gathered[1], np.float64).tolist(),
            "cost": np.asarray(gathered[2], np.float64).tolist(),
            "logits": np.asarray(gathered[3], np.float64).tolist(),
            "best_index": int(out.best_index),
            "best": summary(out.best),  # replicated: readable in every process
        }
        # Data parallel: the tokens split over all 8 devices, half of them in each process. A
        # host transfer of the sharded tokens (or closing over them in a jitted program) would
        # raise here, since no process can address the other's shards.
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        x = tokens()
        sharded = jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, P("data")), lambda i: x[i]
        )
        assert not sharded.is_fully_addressable
        dp = solve(
            data_loss(sharded), data_constraint(), key=jax.random.key(5), progress=False, **SOLVE_KW
        )
        return {"process": process_id, "sweep": result, "solve": summary(dp)}
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "devices":
        payload = run_devices()
    elif mode == "process":
        payload = run_process(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: use 'devices' or 'process I PORT'")
    print(json.dumps(payload), flush=True)
