"""Every notebook executes top to bottom in its small configuration, so none can rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    if path.name.startswith("02_"):
        from rco_jax.lm import assets

        if not assets.assets_available():
            pytest.skip("SmolLM2 assets missing: run `python -m rco_jax.lm.assets fetch`")
    nb = nbformat.read(path, as_version=4)
    os.environ["RCO_NOTEBOOK_SMALL"] = "1"
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
