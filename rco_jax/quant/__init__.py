"""Mixed-precision quantization of a real pretrained LM (SmolLM2-135M-Instruct).

Submodules: ``assets`` (download/cache, GGUF reading), ``tokenizer``, ``model`` (Flax nnx
Llama with a pure-functional forward), ``data`` (Shakespeare calibration/evaluation tokens).
They are imported explicitly, e.g. ``from rco_jax.quant import model``.
"""
