"""The README's Python examples run as written."""

import re
from pathlib import Path

import jax.numpy as jnp

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_execute():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones
        exec(compile(block, str(README), "exec"), namespace)
    res, c = namespace["res"], namespace["c"]
    assert float(res.cost) <= float(c.budget)
    gap = abs(float(namespace["expected_cost"](namespace["alpha"], c) - c.budget))
    assert gap <= 1e-5 * float(c.cost_range()[1])
    both, res2 = namespace["both"], namespace["res2"]
    assert bool(jnp.all(res2.cost <= both.budget))
    kept = jnp.bincount(namespace["layers"].blocks, weights=namespace["res3"].assignment)
    assert kept.tolist() == [2.0, 3.0]
    mixing = namespace["mixing"]
    assert float(abs(mixing.sum(-2) - 1).max()) < 1e-5
