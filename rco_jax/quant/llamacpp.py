"""llama.cpp as the reference runtime of exported GGUF files (the ``llamacpp`` extra).

:class:`LlamaCpp` loads one GGUF file into llama.cpp (through the ``xllamacpp`` bindings,
imported lazily via :func:`rco_jax.lm.extras.require`) and answers three questions about it::

    with LlamaCpp(path, n_threads=1) as llm:
        llm.token_log_probs(ids)        # teacher-forced log p(t_i | t_<i), i = 1..T-1
        llm.perplexity(windows)         # exp(mean NLL) over windows (n, T)
        llm.generate("The capital of France is")   # greedy text

How the log-probs are obtained. ``xllamacpp`` exposes llama.cpp's own server (in process; it
also listens on a loopback port), not a logits API, so teacher forcing goes through its
completion endpoint, one request per position ``i``: the prompt is ``t_0..t_{i-1}`` (the
server's prompt cache holds the window's prefix, so each request decodes one new token) and
a logit bias of +1e9 on ``t_i`` makes greedy decoding emit ``t_i``. With ``n_probs`` and
``post_sampling_probs: false`` the server reports the emitted token's probability under the
softmax of the *raw* logits, before any sampler (the bias included): the model's unconstrained
distribution. (``post_sampling_probs: true`` would report the sampler's distribution, in which
the forced token has probability 1.)

A GBNF grammar of token-id literals (``root ::= <[t_1]> <[t_2]> ...``) forces a whole window
in one request and gives the same numbers, but llama.cpp rejects it for end-of-generation
tokens (a grammar admits those only where it is complete) and for tokens that end inside a
UTF-8 character; the bias works for every token. The server reports nothing for a token whose
text ends inside a UTF-8 character (239 of SmolLM2's 49152 tokens, none in the Shakespeare
evaluation text); at such a position the log-prob is read from the full next-token
distribution (``n_probs`` = the vocabulary) of a request that emits a complete token instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from rco_jax.lm.assets import GGUFFileError
from rco_jax.lm.extras import require

__all__ = ["LlamaCpp", "check_gguf"]

_GGUF_MAGIC = b"GGUF"
# llama.cpp verbosity thresholds (common/log.h): 1 = errors only, 3 = info.
_QUIET, _VERBOSE = 1, 3
_FORCE_BIAS = 1e9  # added to the forced token's logit (the reported log-probs exclude it)
_ALL = 1 << 30  # n_probs: the whole vocabulary


def check_gguf(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is a file that starts with the GGUF magic;
    :class:`FileNotFoundError` or :class:`~rco_jax.lm.assets.GGUFFileError` (a ValueError)
    saying what to pass instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file not found: {path}; pass the path of a .gguf file (the SmolLM2 model "
            "is fetched by `python -m rco_jax.lm.assets fetch`)"
        )
    with open(path, "rb") as f:
        magic = f.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        raise GGUFFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}); pass a "
            "file written by llama.cpp, gguf.GGUFWriter or rco_jax.quant.export"
        )
    return path


class LlamaCpp:
    """One GGUF model loaded in llama.cpp; a context manager (:meth:`close` frees it).

    Args:
      path: the GGUF file.
      n_ctx: context length in tokens; bounds a window of :meth:`token_log_probs` and a
        prompt plus generation of :meth:`generate`.
      n_threads: CPU threads of llama.cpp (``None``: its default, the physical cores). On a
        machine shared with other work, 1 thread is often faster than several spinning ones.
      verbose: show llama.cpp's info logs; by default it prints errors only.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        verbose: bool = False,
    ):
        self.path = check_gguf(path)
        if n_ctx < 2:
            raise ValueError(f"n_ctx must be >= 2, got {n_ctx}")
        self.n_ctx = int(n_ctx)
        xllamacpp = require("xllamacpp", purpose="running GGUF files with llama.cpp")
        params = xllamacpp.CommonParams()
        params.model.path = str(self.path)
        params.n_ctx = self.n_ctx
        params.n_parallel = 1  # one slot: requests run one after the other, n_ctx each
        params.warmup = False
        params.cache_ram_mib = 0  # no host-memory prompt cache across requests
        params.verbosity = _VERBOSE if verbose else _QUIET
        params.endpoint_metrics = True  # see below
        if n_threads is not None:
            params.cpuparams.n_threads = int(n_threads)
            params.cpuparams_batch.n_threads = int(n_threads)
        try:
            self._server = xllamacpp.Server(params)
        except RuntimeError as err:
            raise GGUFFileError(
                f"llama.cpp could not load {self.path} ({err}); the file may be truncated or "
                "use a tensor type or architecture this llama.cpp does not know "
                "(run with verbose=True for its log)"
            ) from err
        # A round trip through the server's task loop: the server cannot be stopped (its
        # destructor waits forever) if it is freed before that loop has started.
        self._server.handle_metrics()

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Frees the model and stops llama.cpp's server thread (idempotent)."""
        self._server = None  # the C++ destructor joins the server loop

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._server is None else f"n_ctx={self.n_ctx}"
        return f"LlamaCpp({str(self.path)!r}, {state})"

    def _complete(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One completion request; RuntimeError with llama.cpp's message if it fails."""
        if self._server is None:
            raise RuntimeError("this LlamaCpp is closed")
        out = self._server.handle_completions(dict(request))
        err = out.get("error", out if "code" in out else None)
        if err is not None:
            message = err.get("message", err) if isinstance(err, Mapping) else err
            raise RuntimeError(f"llama.cpp completion failed: {message}")
        return out

    # ------------------------------------------------------------------ scoring

    def token_log_probs(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Teacher-forced ``log p(t_i | t_<i)`` for ``i = 1..T-1`` under llama.cpp's model.

        Args:
          token_ids: one window ``t_0..t_{T-1}`` (T >= 2, at most ``n_ctx``); ``t_0`` is
            context only. Evaluated from a fresh context (the prompt cache is reset).

        Returns:
          float64 array (T-1,) of natural-log probabilities under the unconstrained
          next-token distribution (softmax of llama.cpp's logits, in its float32); ``-inf``
          where that underflows.
        """
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or len(ids) < 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be 1-D integers of length >= 2, got {ids.shape}")
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit n_ctx={self.n_ctx}")
        ids = [int(t) for t in ids]
        out = np.full(len(ids) - 1, np.nan)
        for i in range(1, len(ids)):
            entry = self._next_token(ids[:i], force=ids[i], fresh=i == 1)
            if entry is not None:
                if int(entry["id"]) != ids[i]:
                    raise RuntimeError(f"llama.cpp emitted token {entry['id']}, not {ids[i]}")
                out[i - 1] = _logprob(entry)
        missing = np.flatnonzero(np.isnan(out))
        if len(missing):  # tokens that end inside a UTF-8 character: see the module docstring
            complete = [t for t, lp in zip(ids[1:], out) if not np.isnan(lp)]
            for j in missing:
                entry = self._next_token(
                    ids[: j + 1], force=complete[0] if complete else None, n_probs=_ALL
                )
                if entry is None:
                    raise RuntimeError(f"llama.cpp reported no probabilities at position {j + 1}")
                top = {int(e["id"]): e for e in entry["top_logprobs"]}
                out[j] = _logprob(top[ids[j + 1]])
        return out

    def _next_token(
        self, prompt: list[int], *, force: int | None, fresh: bool = False, n_probs: int = 1
    ) -> dict[str, Any] | None:
        """The report of one greedy step after ``prompt`` (``force`` biased to win), or
        ``None`` when the server leaves it out (text ending inside a UTF-8 character)."""
        request: dict[str, Any] = {
            "prompt": prompt,
            "n_predict": 1,
            "temperature": 0.0,
            "n_probs": n_probs,
            "post_sampling_probs": False,
            "cache_prompt": not fresh,
        }
        if force is not None:
            request["logit_bias"] = [[force, _FORCE_BIAS]]
        content = (self._complete(request)["choices"][0].get("logprobs") or {}).get("content")
        return content[0] if content else None

    def perplexity(self, windows: np.ndarray) -> float:
        """``exp`` of the mean NLL over all predicted positions of ``windows`` (n, T).

        Every window is scored independently from a fresh context (as
        :func:`rco_jax.lm.model.perplexity` does): its first token is context only.
        """
        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
            raise ValueError(f"windows must be (n >= 1, T >= 2), got {windows.shape}")
        nll = -sum(float(np.sum(self.token_log_probs(w))) for w in windows)
        return float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str, max_tokens: int = 8) -> str:
        """Greedy (temperature 0) continuation of ``prompt``, at most ``max_tokens`` tokens,
        stopping early at an end-of-generation token. The prompt is tokenized by llama.cpp
        as plain text (apply a chat template first for a chat model's reply)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        out = self._complete(
            {
                "prompt": prompt,
                "n_predict": int(max_tokens),
                "temperature": 0.0,
                "cache_prompt": False,
            }
        )
        return out["choices"][0]["text"]


def _logprob(entry: Mapping[str, Any]) -> float:
    # JSON has no infinity: llama.cpp writes log(0) as null.
    return -np.inf if entry["logprob"] is None else float(entry["logprob"])
