"""The language model shared by the applications (quantization, pruning).

Submodules: ``assets`` (download/cache, GGUF reading), ``tokenizer``, ``model`` (Flax nnx
Llama with a pure-functional forward), ``data`` (Shakespeare calibration/evaluation tokens).
They are imported explicitly, e.g. ``from rco_jax.lm import model``.
"""
