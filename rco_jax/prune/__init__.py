"""Structured pruning of a Llama (SmolLM2-135M) under exact budgets: the second application.

Submodules: ``search`` (the search space of FFN neuron groups or sub-blocks, the KL loss and
the methods: uniform, proxy, evolutionary, RCO), ``export`` (``mask.json`` and the physically
smaller model), ``pipeline`` (the side-by-side comparison and ``python -m rco_jax prune``).
"""
