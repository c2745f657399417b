"""CLIP byte-level BPE in pure Python (plus the `regex` package), so runtimes need no PyTorch or transformers.

The algorithm of OpenAI CLIP's `simple_tokenizer.py`, with the text normalisation transformers'
`CLIPTokenizer` (the one every SD pipeline tokenizes with) applies: Unicode NFC, every whitespace run
to one space, lowercase. (CLIP's own `basic_clean` also runs ftfy and html.unescape; transformers does
not, and a runtime must give the ids the model was trained on, so neither do we.) Then CLIP's split
regex (then GPT-2's, as transformers' ByteLevel step does), bytes -> printable unicode, BPE with "</w>" closing each word, `<|startoftext|>` ... `<|endoftext|>`,
truncation to `max_length` (with a warning) and padding with the pad token of the tokenizer folder
(`<|endoftext|>` for CLIP ViT-L, "!" for OpenCLIP-H checkpoints).
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import regex

from sdxs_edge.errors import SDXSError
from sdxs_edge.tokenizer import bpe_from_tokenizer_json, bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's split pattern (clip/simple_tokenizer.py; identical in transformers' CLIPTokenizer).
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
# transformers' ByteLevel pre-tokenizer splits every CLIP piece again with GPT-2's pattern; that only
# changes pieces CLIP's pattern keeps whole but GPT-2's does not (a lowercased "<|endoftext|>" typed
# in a prompt: "<|", "endoftext", "|>"), and we follow it to give the same ids.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")
_BYTE_ENCODER = bytes_to_unicode()


class TokenizerError(SDXSError):
    """The tokenizer folder is missing or malformed."""


def _normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()


def _read_vocab_merges(vocab_f: Path, merges_f: Path) -> tuple[dict[str, int], list[str]]:
    for f in (vocab_f, merges_f):
        if not f.is_file():
            raise TokenizerError(f"tokenizer file {f} is missing")
    encoder = _read_json(vocab_f)
    if not isinstance(encoder, dict) or not all(type(v) is int for v in encoder.values()):
        raise TokenizerError(f"{vocab_f}: not a vocabulary (a JSON object of token -> id)")
    try:
        lines = merges_f.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise TokenizerError(f"{merges_f}: not UTF-8 text") from None
    return encoder, lines[1:] if lines and lines[0].startswith("#version") else lines


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word, word[1:])}


def _read_json(f: Path):
    """A tokenizer JSON file; one TokenizerError for bad UTF-8, bad JSON or nesting too deep."""
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{f}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (UnicodeDecodeError, RecursionError):
        raise TokenizerError(f"{f}: not readable JSON text") from None


@dataclass(frozen=True)
class CLIPBPETokenizer:
    """CLIP BPE tokenizer over a `vocab.json` + `merges.txt` folder.

    Args:
        encoder: token string -> id (vocab.json).
        ranks: merge pair -> priority, lower merges first (merges.txt order).
        pad_token: token used after `<|endoftext|>` to fill `max_length`.
        max_length: ids per prompt including the start and end tokens (77 for CLIP).
    """

    encoder: dict[str, int]
    ranks: dict[tuple[str, str], int]
    pad_token: str = EOS
    max_length: int = 77
    _cache: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, folder: str | Path, max_length: int = 77) -> CLIPBPETokenizer:
        """Read vocab.json + merges.txt (or tokenizer.json alone, as transformers 5 saves it) and the pad
        token (special_tokens_map.json, else tokenizer_config.json).

        Args:
            folder: a tokenizer folder as SD checkpoints and bundles carry it.
            max_length: ids per prompt including the start and end tokens.
        """
        folder = Path(folder)
        vocab_f, merges_f = folder / "vocab.json", folder / "merges.txt"
        if not vocab_f.is_file() and (folder / "tokenizer.json").is_file():  # as transformers 5 saves it
            vocab_f = folder / "tokenizer.json"
            try:
                encoder, lines = bpe_from_tokenizer_json(vocab_f)
            except SDXSError as e:
                raise TokenizerError(str(e)) from None
        else:
            encoder, lines = _read_vocab_merges(vocab_f, merges_f)
        ranks = {}
        for i, line in enumerate(l for l in lines if l.strip()):
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{merges_f}: malformed merge line {line!r}")
            ranks[(parts[0], parts[1])] = i
        pad = EOS
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = folder / name
            if f.is_file():
                conf = _read_json(f)
                value = conf.get("pad_token") if isinstance(conf, dict) else None
                if value is not None:
                    pad = value.get("content") if isinstance(value, dict) else value
                    if not isinstance(pad, str) or not pad:
                        raise TokenizerError(f"{f}: pad_token is not a token")
                    break
        for tok in (BOS, EOS, pad):
            if tok not in encoder:
                raise TokenizerError(f"{vocab_f}: special token {tok!r} is not in the vocabulary")
        return cls(encoder, ranks, pad, int(max_length))

    @cached_property
    def _special_re(self) -> regex.Pattern:
        specials = sorted({BOS, EOS, self.pad_token}, key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")

    @property
    def bos_id(self) -> int:
        return self.encoder[BOS]

    @property
    def eos_id(self) -> int:
        return self.encoder[EOS]

    @property
    def pad_id(self) -> int:
        return self.encoder[self.pad_token]

    def _bpe(self, token: str) -> tuple[str, ...]:
        """Merge a word's byte-symbols by merge rank, lowest first (CLIP's `SimpleTokenizer.bpe`)."""
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        while pairs:
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            pairs = _pairs(word) if len(word) > 1 else set()
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Content token ids of `text` (no start/end tokens, no truncation).

        The special tokens (start, end, pad) are cut out of the raw text first, case-sensitively and
        before normalisation, each becoming its own id, as transformers' added tokens are (so with the
        OpenCLIP pad token "!", a "!" in a prompt is the pad id, exactly as SD-2.x pipelines see it).
        """
        ids: list[int] = []
        for k, segment in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self.encoder[segment])
                continue
            for piece in (
                p for clip_piece in PATTERN.findall(_normalize(segment)) for p in GPT2_PATTERN.findall(clip_piece)
            ):
                symbols = "".join(_BYTE_ENCODER[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Ids int64 (B, max_length): start, content (truncated with a warning), end, pad.

        Args:
            prompts: the texts.
        """
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts")
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        room = self.max_length - 2
        for row, text in enumerate(prompts):
            ids = self.encode(text)
            if len(ids) > room:
                warnings.warn(
                    f"prompt is {len(ids) + 2} tokens; CLIP takes {self.max_length}, the rest is truncated: {text[:60]!r}...",
                    stacklevel=2,
                )
                ids = ids[:room]
            seq = [self.bos_id, *ids, self.eos_id]
            out[row, : len(seq)] = seq
        return out
