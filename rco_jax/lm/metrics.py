"""Fidelity of a compressed model to its reference, per token position.

* :func:`kl_divergence`: mean ``KL(r || q)``, the calibration loss of every application;
* :func:`ear`: the expected acceptance rate ``mean_t sum_v min(r_v, q_v)``, the probability
  that a speculative-decoding verifier with the reference ``r`` accepts a token drawn from
  ``q`` (1 for identical distributions, 1 - total variation in general).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def kl_divergence(ref_log_probs: Array, logits: Array) -> Array:
    """Mean over positions of ``KL(r || q) = sum_v r_v (log r_v - log q_v)``, ``q =
    softmax(logits)``."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    r = jnp.exp(ref_log_probs)
    return jnp.mean(jnp.sum(r * (ref_log_probs - log_q), axis=-1))


def ear(ref_log_probs: Array, logits: Array) -> Array:
    """Expected acceptance rate ``mean over positions of sum_v min(r_v, q_v)``, in [0, 1].

    Example::

        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[0.0, 1.0, 2.0]])
        >>> float(ear(jax.nn.log_softmax(x), x))  # identical distributions
        1.0
    """
    q = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    r = jnp.exp(ref_log_probs.astype(jnp.float32))
    return jnp.mean(jnp.sum(jnp.minimum(r, q), axis=-1))
