"""Pytree logits owned by Flax nnx layers, one global budget, nnx.Optimizer + optax.partition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rco_jax import BudgetConstraint, expected_cost, rco, retract

BITS = jnp.array([2.0, 4.0, 8.0])
LEVELS = [2.0 ** (b - 1) for b in (2, 4, 8)]


class Logits(nnx.Param):
    """Marks the relaxed choice logits, so filters can tell them from weights."""


class MixedLayer(nnx.Module):
    """A linear layer that blends K fake-quantized copies of its kernel by softmax(logits)."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)) / d_in**0.5)
        self.logits = Logits(jnp.zeros((1, BITS.shape[0])))  # one group per layer

    def __call__(self, x):
        p = jax.nn.softmax(self.logits[...], -1)[0]
        w = self.kernel[...]
        # K fake-quantized copies (straight-through to the kernel), blended by p.
        quant = jnp.stack([w + jax.lax.stop_gradient(jnp.round(w * s) / s - w) for s in LEVELS])
        return x @ jnp.tensordot(p, quant, 1)


class Net(nnx.Module):
    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List([MixedLayer(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jnp.tanh(x)
        return x


def test_nnx_optimizer_with_partition_one_global_budget():
    sizes = (8, 16, 16, 4)
    model = Net(sizes, rngs=nnx.Rngs(0))
    # Costs: bits x parameter count of each layer, as a pytree over the logits leaves.
    logit_state = nnx.state(model, Logits)
    params_per_layer = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    costs = jax.tree.map(lambda _: BITS, nnx.to_pure_dict(logit_state))
    weights = {"layers": {i: jnp.array([float(n)]) for i, n in enumerate(params_per_layer)}}
    budget = 3.0 * sum(params_per_layer)  # 3 average bits
    constraint = BudgetConstraint(costs, budget, weights)

    # Start on the manifold.
    start = retract(nnx.to_pure_dict(logit_state), constraint)
    nnx.update(model, start)

    def labels(state):
        is_logits = lambda path: any(getattr(k, "key", None) == "logits" for k in path)
        return jax.tree.map_with_path(lambda p, _: "rco" if is_logits(p) else "adam", state)

    tx = optax.partition({"rco": rco(0.05, constraint), "adam": optax.adam(1e-2)}, labels)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jax.random.normal(jax.random.key(2), (32, 4))

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    kernel0 = np.asarray(model.layers[0].kernel[...])
    losses = [float(train_step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert not np.allclose(model.layers[0].kernel[...], kernel0)  # kernels trained by Adam
    logits = nnx.to_pure_dict(nnx.state(model, Logits))
    got = float(expected_cost(logits, constraint))
    assert abs(got - budget) <= 8 * np.finfo(np.float32).eps * float(8 * sum(params_per_layer))
