"""Mixed-precision quantization of a real pretrained LM (SmolLM2-135M-Instruct).

Submodules: ``quantizers`` (RTN/GPTQ kernels), ``search`` (the bit-width search space and
methods), ``export`` / ``materialize`` (files), ``pipeline`` (the ``quantize`` command). The
model, tokenizer, assets and text data they use live in :mod:`rco_jax.lm`.
"""
