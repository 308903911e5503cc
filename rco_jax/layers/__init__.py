"""Differentiable layers built on the budget geometry (Flax nnx).

* :class:`BirkhoffMixing` -- mHC-style mixing of ``n`` residual streams by a
  doubly-stochastic matrix per token (:func:`rco_jax.birkhoff_projection`).

The layers carry no solver logic of their own; the core never imports them.
"""

from rco_jax.layers.mixing import BirkhoffMixing

__all__ = ["BirkhoffMixing"]
