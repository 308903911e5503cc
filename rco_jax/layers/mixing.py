"""Residual-stream mixing by doubly-stochastic matrices (manifold-constrained hyper-connections)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rco_jax.projection import birkhoff_projection

__all__ = ["BirkhoffMixing"]


class BirkhoffMixing(nnx.Module):
    r"""Mixes ``n`` residual streams with a doubly-stochastic ``n x n`` matrix per token.

    As in manifold-constrained hyper-connections (mHC), the mixing matrix of a
    token is ``H = P_Birkhoff(R)`` with ``R = R_static + tanh(alpha) * W x``: a
    learned static part plus a part computed from the token's streams. Rows and
    columns of ``H`` sum to one, so mixing preserves the mean of the streams
    and the layer's gain is bounded (``||H||_2 = 1``). The projection is
    :func:`rco_jax.birkhoff_projection`: Newton's method to float precision,
    implicit gradients (no unrolled Sinkhorn iterations in the backward pass).

    Args:
      num_streams: ``n``.
      features: width of each stream.
      rngs: ``nnx.Rngs``.
      dynamic: add the token-dependent part ``tanh(alpha) * W x``.
      identity_bias: initial diagonal of ``R_static`` (large: start near the
        identity mixing, i.e. near plain residual streams).

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from rco_jax.layers import BirkhoffMixing
      >>> mix = BirkhoffMixing(4, 8, rngs=nnx.Rngs(0))
      >>> streams = jax.random.normal(jax.random.key(1), (2, 5, 4, 8))  # batch, tokens, n, d
      >>> mix(streams).shape
      (2, 5, 4, 8)

    Reference: Xie et al., "mHC: Manifold-Constrained Hyper-Connections" (2025);
    Wang & Qiu (2026, arXiv 2606.07574) for Newton with implicit differentiation.
    """

    def __init__(
        self,
        num_streams: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        dynamic: bool = True,
        identity_bias: float = 2.0,
    ):
        n = num_streams
        self.num_streams = n
        self.static = nnx.Param(identity_bias * jnp.eye(n))
        self.dynamic = dynamic
        if dynamic:
            self.proj = nnx.Linear(
                n * features, n * n, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs
            )
            # A concrete dtype: a weakly typed scalar would turn strong after the first
            # optimizer step, and a jitted train step would compile again (twice, with Adam).
            self.gate = nnx.Param(jnp.full((), 0.01, jnp.result_type(float)))

    def matrices(self, streams: jax.Array) -> jax.Array:
        """The doubly-stochastic mixing matrices ``(..., n, n)`` for ``(..., n, d)`` streams."""
        n = self.num_streams
        logits = jnp.broadcast_to(self.static[...], streams.shape[:-2] + (n, n))
        if self.dynamic:
            flat = streams.reshape(streams.shape[:-2] + (-1,))
            logits = logits + jnp.tanh(self.gate[...]) * self.proj(flat).reshape(logits.shape)
        return birkhoff_projection(logits)

    def __call__(self, streams: jax.Array) -> jax.Array:
        """``H @ streams`` per token: ``(..., n, d) -> (..., n, d)``."""
        return jnp.einsum("...ij,...jd->...id", self.matrices(streams), streams)
