"""Optional dependencies of the applications, with an error that says what to install.

The core (``rco_jax``) needs JAX, Optax and Flax only. The language-model applications read
GGUF files (``gguf``), tokenize text (``tokenizers``) and write safetensors (``safetensors``):
the ``quant`` extra; checking exported GGUF files in llama.cpp needs ``xllamacpp``: the
``llamacpp`` extra. A module that needs one of them imports it through :func:`require`, so a
missing package raises :class:`MissingExtraError` naming the ``pip install`` command instead
of a bare ``ModuleNotFoundError``::

    tokenizers = require("tokenizers")          # the module, or MissingExtraError
    check_extra("quant")                        # all of an extra's packages at once
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "check_extra", "install_command", "require"]

#: Each extra (pyproject ``[project.optional-dependencies]``) -> its import names.
EXTRAS: dict[str, tuple[str, ...]] = {
    "quant": ("gguf", "tokenizers", "safetensors"),
    "llamacpp": ("xllamacpp",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message gives the ``pip`` command."""


def install_command(extra: str) -> str:
    """``pip install 'rco_jax[<extra>]'``."""
    return f"pip install 'rco_jax[{extra}]'"


def _extra_of(module: str) -> str:
    top = module.split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return extra
    raise KeyError(f"{module!r} is not an optional dependency of rco_jax")


def require(module: str, *, purpose: str | None = None) -> ModuleType:
    """Imports ``module`` (an optional dependency); raises :class:`MissingExtraError` with the
    install command of its extra when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        # Only the package itself missing is our message; a broken install re-raises as is.
        if err.name not in (None, module) and not module.startswith(f"{err.name}."):
            raise
        extra = _extra_of(module)
        what = f" for {purpose}" if purpose else ""
        raise MissingExtraError(
            f"the optional dependency {module!r} is not installed{what}. "
            f"Install the {extra!r} extra:\n    {install_command(extra)}\n"
            f"(from a source checkout: pip install -e '.[{extra}]')"
        ) from err


def check_extra(extra: str, *, purpose: str | None = None) -> None:
    """Raises :class:`MissingExtraError` unless every package of ``extra`` imports."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    for module in EXTRAS[extra]:
        require(module, purpose=purpose)
