"""The real CLIP BPE tokenizer, built offline from the vocabulary open-clip-torch ships.

Stable Diffusion checkpoints carry `tokenizer/vocab.json` + `merges.txt` for transformers'
`CLIPTokenizer` (folders saved by transformers 5 carry only `tokenizer.json`, the same BPE model in one
file; `read_bpe_files` reads either). Both derive from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, which the open-clip-torch
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


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether `folder` holds a BPE tokenizer: vocab.json + merges.txt, or tokenizer.json."""
    folder = Path(folder)
    return (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() or (folder / "tokenizer.json").is_file()
    )


def bpe_from_tokenizer_json(path: str | Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges as "a b" lines) of the BPE model in a `tokenizers` tokenizer.json."""
    path = Path(path)
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (KeyError, TypeError):
        raise ModelLoadError(f"{path}: no tokenizer model in it") from None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelLoadError(f"{path}: not a BPE tokenizer (only CLIP's BPE is supported)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {str(k): int(v) for k, v in model["vocab"].items()}, merges


def check_clip_vocabulary(tokenizer) -> None:
    """Refuse a transformers tokenizer whose vocabulary is not CLIP's 49408 BPE tokens (the one vocabulary
    `write_clip_tokenizer` writes)."""
    if len(tokenizer) != 49408 or tokenizer.get_vocab() != clip_vocab_and_merges()[0]:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} tokens unlike CLIP's BPE vocabulary; only that vocabulary (49408) is supported"
        )


def write_tokenizer_of(tokenizer, folder: str | Path) -> Path:
    """vocab.json + merges.txt (+ configs) for a loaded CLIP tokenizer, whatever files it came from."""
    check_clip_vocabulary(tokenizer)
    return write_clip_tokenizer(folder, pad_token=str(tokenizer.pad_token))


def load_clip_tokenizer(folder: str | Path):
    """transformers `CLIPTokenizer` from a folder written by `write_clip_tokenizer` or an SD checkpoint
    (vocab.json + merges.txt, or tokenizer.json alone as transformers 5 saves it)."""
    from transformers import CLIPTokenizer

    if not has_tokenizer_files(folder):
        raise ModelLoadError(f"{folder} holds neither vocab.json + merges.txt nor tokenizer.json")
    return CLIPTokenizer.from_pretrained(str(folder))
