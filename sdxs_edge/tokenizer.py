"""The real CLIP BPE tokenizer, built offline from the vocabulary open-clip-torch ships.

Stable Diffusion checkpoints carry `tokenizer/vocab.json` + `merges.txt` for transformers'
`CLIPTokenizer`. Both derive from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, which the open-clip-torch
wheel ships. We rebuild the two files from it exactly as OpenAI's / open_clip's `SimpleTokenizer` lays
out its vocabulary, so a model folder written here tokenizes like any SD checkpoint. The package is
located without importing it (importing open_clip pulls torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from sdxs_edge.errors import ModelLoadError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77


def bpe_vocab_path() -> Path:
    """Path of open_clip's shipped BPE vocabulary file (`pip install --no-deps open-clip-torch`)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "open-clip-torch is not installed; it ships the CLIP BPE vocabulary (pip install --no-deps open-clip-torch)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the open-clip-torch install")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode map (clip/simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) in the order of CLIP's SimpleTokenizer: 49408 tokens, 48894 merges."""
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write transformers `CLIPTokenizer` files (vocab.json, merges.txt, configs) into `folder`.

    Each file goes to a temporary name and is renamed into place, so a reader never sees half a file:
    the ranks of a distributed run all write the same files and then read them back."""
    from sdxs_edge.atomic import write_atomic

    folder = Path(folder)

    def put(name: str, text: str) -> None:
        write_atomic(folder / name, text)

    vocab, merges = clip_vocab_and_merges()
    put("vocab.json", json.dumps(vocab, ensure_ascii=False))
    put("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    put("special_tokens_map.json", json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    put("tokenizer_config.json", json.dumps(config, indent=2))
    return folder


def load_clip_tokenizer(folder: str | Path):
    """transformers `CLIPTokenizer` from a folder written by `write_clip_tokenizer` or an SD checkpoint."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
