"""BirkhoffMixing (nnx): doubly-stochastic mixing, gradients, a few training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rco_jax.layers import BirkhoffMixing


def test_mixing_matrices_are_doubly_stochastic_and_preserve_the_stream_mean():
    mix = BirkhoffMixing(4, 8, rngs=nnx.Rngs(0))
    mix.gate[...] = jnp.asarray(1.0)
    mix.proj.kernel[...] = 0.3 * jax.random.normal(jax.random.key(2), mix.proj.kernel.shape)
    s = jax.random.normal(jax.random.key(1), (3, 5, 4, 8))
    h = mix.matrices(s)
    assert h.shape == (3, 5, 4, 4)
    np.testing.assert_allclose(h.sum(-1), 1.0, atol=2e-6)
    np.testing.assert_allclose(h.sum(-2), 1.0, atol=2e-6)
    out = mix(s)
    np.testing.assert_allclose(out.mean(-2), s.mean(-2), atol=1e-5)  # columns sum to one


def test_gradient_of_the_static_logits_matches_finite_differences(x64):
    mix = BirkhoffMixing(3, 4, rngs=nnx.Rngs(0), dynamic=False, identity_bias=1.0)
    s = jax.random.normal(jax.random.key(3), (6, 3, 4), jnp.float64)
    target = jax.random.normal(jax.random.key(4), (6, 3, 4), jnp.float64)
    loss = lambda m: jnp.sum((m(s) - target) ** 2)
    r = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)))
    d = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    mix.static[...] = r
    g = nnx.grad(loss)(mix).static[...]
    values = []
    for sign in (1, -1):
        mix.static[...] = r + sign * 1e-6 * d
        values.append(loss(mix))
    fd = (values[0] - values[1]) / 2e-6
    np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6)


def test_a_few_training_steps_reduce_the_loss():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(2, 4 * 8, rngs=rngs)
            self.mix = BirkhoffMixing(4, 8, rngs=rngs)
            self.mlp = nnx.Linear(8, 8, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            h = self.inp(x).reshape(x.shape[:-1] + (4, 8))
            h = self.mix(h)
            h = h + jnp.tanh(self.mlp(h))
            return self.out(h.mean(-2))[..., 0]

    model = Tiny(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (64, 2))
    y = jnp.sin(2 * x[:, 0]) * x[:, 1]
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    traces = []

    @nnx.jit
    def step(model, opt):
        traces.append(None)  # runs when (re)traced only
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(losses))
    assert len(traces) == 1  # parameters and optimizer state keep their types: one compile
