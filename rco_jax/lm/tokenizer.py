"""Byte-level BPE tokenizer rebuilt from a GGUF file's vocabulary and merges.

SmolLM2's tokenizer (GGUF ``tokenizer.ggml.model = "gpt2"``, ``pre = "smollm"``) is GPT-2
style byte-level BPE with one extra pre-tokenization rule: every digit is its own
pre-token. Tokens of GGUF type 3 (control: ``<|endoftext|>``, ``<|im_start|>``, ...) are
registered as special tokens, so they are matched whole in the input text and skipped by
``decode(..., skip_special_tokens=True)``. No BOS token is prepended
(``tokenizer.ggml.add_bos_token = false``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rco_jax.lm import assets
from rco_jax.lm.extras import require

_tokenizers = require("tokenizers", purpose="the SmolLM2 tokenizer")
AddedToken, Tokenizer = _tokenizers.AddedToken, _tokenizers.Tokenizer
decoders, models, pre_tokenizers = (
    _tokenizers.decoders,
    _tokenizers.models,
    _tokenizers.pre_tokenizers,
)

__all__ = ["DEFAULT_SYSTEM_PROMPT", "SmolTokenizer", "build_tokenizer", "load_tokenizer"]

_CONTROL = 3  # llama.cpp token type: control token
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclasses.dataclass(frozen=True)
class SmolTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids and chat format of the GGUF model."""

    backend: Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    special_tokens: tuple[str, ...]
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int32 (no BOS/EOS added)."""
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like :meth:`encode` for many texts (parallel in the Rust backend)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of the token ids (exact inverse of :meth:`encode` for any text)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` in the model's ChatML template.

        Mirrors ``tokenizer.chat_template`` of the GGUF file: a default system message is
        inserted when the first message is not a system message, each message is
        ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, and the generation prompt is
        ``<|im_start|>assistant\\n``.
        """
        parts = []
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            parts.append(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
        for m in messages:
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


def build_tokenizer(metadata: Mapping[str, Any]) -> SmolTokenizer:
    """Build the tokenizer from GGUF metadata (``tokenizer.ggml.*`` keys).

    Args:
      metadata: as returned by :func:`rco_jax.lm.assets.gguf_metadata`.
    """
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') tokenizers are supported, got {model_type}")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in tokenizer.ggml.tokens")
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits on "\p{N}" first, then applies the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()

    specials = tuple(t for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for t in specials:  # adding must not have created new ids
        assert tok.token_to_id(t) == vocab[t], t

    def special(key: str, default: int) -> int:
        return int(metadata.get(f"tokenizer.ggml.{key}_token_id", default))

    eos = special("eos", 0)
    template = str(metadata.get("tokenizer.chat_template", ""))
    system_prompt = DEFAULT_SYSTEM_PROMPT if DEFAULT_SYSTEM_PROMPT in template else None
    return SmolTokenizer(
        backend=tok,
        bos_id=special("bos", eos),
        eos_id=eos,
        pad_id=special("padding", eos),
        unk_id=special("unknown", 0),
        special_tokens=specials,
        system_prompt=system_prompt,
    )


@functools.lru_cache(maxsize=2)
def _load(path: str) -> SmolTokenizer:
    return build_tokenizer(assets.gguf_metadata(path))


def load_tokenizer(path: str | os.PathLike | None = None) -> SmolTokenizer:
    """The tokenizer of a GGUF file (default: the cached SmolLM2 model); cached per path."""
    return _load(str(path if path is not None else assets.model_path()))
