"""Bad input gives a clear error that says what to do (issue 13, part 4).

* the application's entry points without the ``quant`` extra: ``pip install 'rco_jax[quant]'``;
* a budget outside the range the options allow;
* a missing or corrupt GGUF file (``--model`` or the cached one).
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import pytest

from rco_jax.lm import assets
from rco_jax.lm.extras import MissingExtraError, check_extra, install_command, require

INSTALL = "pip install 'rco_jax[quant]'"
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "quantization.py"


@pytest.fixture
def without(monkeypatch):
    """``without("tokenizers")``: the package behaves as not installed (``None`` in
    ``sys.modules`` makes ``import`` raise ``ModuleNotFoundError``); modules that imported it
    are dropped so that they import again."""

    def hide(package: str) -> None:
        monkeypatch.setitem(sys.modules, package, None)
        for name in [m for m in sys.modules if m.startswith(("rco_jax.lm.", "rco_jax.quant"))]:
            if name == "rco_jax.lm.extras":
                continue
            # ``from rco_jax.lm import data`` reads the package attribute first: drop it too
            # (monkeypatch restores both afterwards).
            parent, _, child = name.rpartition(".")
            if hasattr(sys.modules.get(parent), child):
                monkeypatch.delattr(sys.modules[parent], child)
            monkeypatch.delitem(sys.modules, name)

    return hide


def test_install_command_names_the_extra():
    assert install_command("quant") == INSTALL


@pytest.mark.parametrize("package", ["tokenizers", "gguf", "safetensors"])
def test_quantize_command_without_extra(package, without, capsys):
    from rco_jax.__main__ import main

    without(package)
    assert main(["quantize", "--quick"]) == 2
    err = capsys.readouterr().err
    assert INSTALL in err and repr(package) in err
    assert "Traceback" not in err


def test_benchmark_without_extra(without, capsys, monkeypatch):
    without("tokenizers")
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--quick"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert exit_.value.code == 2
    assert INSTALL in capsys.readouterr().err


@pytest.mark.parametrize(
    "module, package",
    [
        ("rco_jax.lm.tokenizer", "tokenizers"),
        ("rco_jax.lm.data", "tokenizers"),
        ("rco_jax.quant.pipeline", "tokenizers"),
    ],
)
def test_importing_an_application_module_without_extra(module, package, without):
    without(package)
    with pytest.raises(MissingExtraError, match=r"pip install 'rco_jax\[quant\]'"):
        importlib.import_module(module)


def test_reading_gguf_without_extra(without, tiny_gguf):
    without("gguf")
    fresh = importlib.import_module("rco_jax.lm.assets")
    with pytest.raises(MissingExtraError, match="reading GGUF files"):
        fresh.gguf_metadata(tiny_gguf)


def test_require_and_check_extra():
    assert require("gguf").__name__ == "gguf"
    check_extra("quant")
    with pytest.raises(KeyError, match="unknown extra"):
        check_extra("nope")


# ------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("bits", ["2", "8", "1.5", "9"])
def test_budget_outside_the_range(bits, capsys):
    from rco_jax.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["quantize", "--format", "safetensors", "--bits", bits])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "strictly between 2 and 8" in msg and "e.g. --bits 3.0" in msg


# -------------------------------------------------------------------------------------- GGUF


def _quantize_exit(argv: list[str], capsys) -> str:
    from rco_jax.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["quantize", "--quick", "--no-progress", *argv])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "Traceback" not in msg
    return msg


def test_missing_gguf(tmp_path, capsys):
    msg = _quantize_exit(["--model", str(tmp_path / "nope.gguf")], capsys)
    assert "GGUF file not found" in msg and "nope.gguf" in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gguf(damage, tiny_gguf, tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    raw = tiny_gguf.read_bytes()
    bad.write_bytes(b"not a gguf file at all" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    msg = _quantize_exit(["--model", str(bad)], capsys)
    assert "is not a valid GGUF file" in msg and "bad.gguf" in msg


def test_corrupt_cached_model_says_fetch_again(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path))
    path = assets._model_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(assets.GGUFFileError, match="fetch --force"):
        assets.gguf_metadata()


# --------------------------------------------------------------------------------------- tie


def test_unknown_tie_name(capsys):
    from rco_jax.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["quantize", "--tie", "qkv,attn"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "unknown --tie name(s) ['attn']" in msg and "qkv, gate_up" in msg


def test_llamacpp_flag_without_extra(without, capsys):
    """``--llamacpp`` without xllamacpp: the install command, before any model is loaded."""
    without("xllamacpp")
    from rco_jax.quant import pipeline

    with pytest.raises(SystemExit) as err:
        pipeline.main(["--quick", "--llamacpp", "--no-progress", "--model", "/nonexistent.gguf"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "pip install 'rco_jax[llamacpp]'" in msg and "Traceback" not in msg
