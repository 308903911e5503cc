"""KL and EAR against NumPy oracles (EAR = 1 - total variation, an independent closed form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rco_jax.lm.metrics import ear, kl_divergence


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 9)),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_ear_and_kl_match_numpy(seed, shape, scale):
    rng = np.random.default_rng(seed)
    a, b = scale * rng.standard_normal(shape), scale * rng.standard_normal(shape)
    p, q = _softmax(a), _softmax(b)
    ref = jnp.asarray(jax.nn.log_softmax(jnp.asarray(a)), jnp.float32)
    tv = 0.5 * np.abs(p - q).sum(-1)
    np.testing.assert_allclose(float(ear(ref, jnp.asarray(b))), np.mean(1 - tv), atol=2e-6)
    kl = np.sum(p * (np.log(p) - np.log(q)), -1).mean()
    np.testing.assert_allclose(float(kl_divergence(ref, jnp.asarray(b))), kl, atol=1e-5, rtol=1e-4)


def test_ear_bounds():
    x = jnp.array([[[0.0, 50.0], [3.0, -1.0]]])
    assert float(ear(jax.nn.log_softmax(x), x)) == 1.0
    far = float(ear(jax.nn.log_softmax(x), -x))
    assert 0.0 <= far < 0.05
