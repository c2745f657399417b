"""LoRA fusing for deployment: fold a U-Net LoRA into the base weights, W <- W + scale * (alpha / r) * B @ A.

A fused U-Net is an ordinary U-Net: it exports, lowers and runs like the base model, at no extra cost
per step. Files are read from safetensors only (never pickle), in the diffusers / peft U-Net layout:

    unet.<module>.lora_A.weight  (r, in) or (r, in, k, k)     peft; the "unet." prefix is optional
    unet.<module>.lora_B.weight  (out, r) or (out, r, 1, 1)
    <module>.lora.down.weight / <module>.lora.up.weight       the older diffusers naming (A / B)
    <module>.alpha                                            optional, a scalar per module

where <module> is a Linear or Conv2d path inside `UNet2DConditionModel` (e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). Heavy libraries are imported inside
functions so the CLIs can import this module cheaply.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sdxs_edge.errors import LoRAError, ModelLoadError

if TYPE_CHECKING:
    import torch

FOLDER_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in a folder
# key suffix -> role; the normalized form `load_lora` returns uses the first three
_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".alpha", "alpha"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
)
_NORMAL = {"A": ".lora_A.weight", "B": ".lora_B.weight", "alpha": ".alpha"}
_OTHER_MODELS = ("text_encoder.", "text_encoder_2.", "te.", "lora_te")


def resolve_lora_path(path: str | os.PathLike) -> Path:
    """The LoRA file a path names: the file itself, or `pytorch_lora_weights.safetensors` in a folder.

    Args:
        path: a .safetensors file, or a folder written by diffusers' `save_lora_weights`.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / FOLDER_FILE).is_file():
            raise LoRAError(f"LoRA folder {p} has no {FOLDER_FILE}; pass the .safetensors file itself")
        return p / FOLDER_FILE
    if not p.exists():
        raise LoRAError(f"LoRA file {p} does not exist")
    return p


def _split(key: str) -> tuple[str, str] | None:
    """A file key -> (U-Net module path, role "A" / "B" / "alpha"), or None if it is no LoRA key."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return (module[len("unet.") :] if module.startswith("unet.") else module), role
    return None


def _group(lora: Mapping[str, torch.Tensor], where: str = "LoRA") -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": ..., "B": ..., optional "alpha": ...}; rejects foreign keys and unpaired halves."""
    import torch

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        if key.startswith(_OTHER_MODELS):
            raise LoRAError(f"{where} holds text-encoder weights ({key!r}); only U-Net LoRAs can be fused here")
        parsed = _split(key)
        if parsed is None:
            continue
        module, role = parsed
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        if role in groups.setdefault(module, {}):
            raise LoRAError(
                f"{where} gives module {module!r} two {role} tensors (with and without the 'unet.' prefix, or both namings)"
            )
        groups[module][role] = value
    if not any({"A", "B"} & g.keys() for g in groups.values()):
        raise LoRAError(
            f"{where} has no LoRA keys (expected <module>.lora_A.weight / <module>.lora_B.weight, or <module>.lora.down.weight / .lora.up.weight)"
        )
    unknown = [k for k in lora if _split(k) is None]
    if unknown:
        raise LoRAError(
            f"{where} has a key that is not a U-Net LoRA weight: {unknown[0]!r} ({len(unknown)} such key{'s' * (len(unknown) > 1)})"
        )
    for module, g in groups.items():
        for half, other in (("A", "B"), ("B", "A")):
            if half in g and other not in g:
                raise LoRAError(f"{where} for module {module!r} has lora_{half} but no lora_{other}")
        if "A" not in g:
            raise LoRAError(f"{where} has an alpha for module {module!r} but no lora_A / lora_B")
        if "alpha" in g and g["alpha"].numel() != 1:
            raise LoRAError(f"{where} alpha of module {module!r} must be a scalar, got shape {tuple(g['alpha'].shape)}")
        for role, t in g.items():
            if not (t.is_floating_point() or role == "alpha"):
                raise LoRAError(
                    f"{where} lora_{role} of module {module!r} has dtype {t.dtype}; expected floating point"
                )
            if not torch.isfinite(t.float()).all():
                raise LoRAError(f"{where} for module {module!r} holds NaN or Inf values")
    return groups


def load_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a U-Net LoRA from a safetensors file; returns it in the normalized peft form.

    Args:
        path: a .safetensors file (or a folder holding `pytorch_lora_weights.safetensors`).

    Returns:
        `{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B, ["<module>.alpha": alpha]}` with module
        paths relative to the U-Net (no "unet." prefix), ready for `fuse_lora`.
    """
    from sdxs_edge.weights import check_safetensors

    f = resolve_lora_path(path)
    if not f.is_file():
        raise LoRAError(f"LoRA path {f} is not a file")
    try:
        check_safetensors(f)
    except ModelLoadError as e:
        detail = re.search(r"\(([^()]*)\)$", str(e))  # "(0 bytes, no header)", "(unreadable header)", ...
        why = detail.group(1) if detail else str(e).removeprefix(f"{f}: ")
        raise LoRAError(
            f"{f} is not a safetensors file ({why}); LoRAs are read from safetensors only, pickled .bin/.pt/.ckpt files are refused"
        ) from None
    try:
        from safetensors.torch import load_file

        state = load_file(str(f), device="cpu")
    except Exception as e:  # safetensors raises its own error kinds for a header that parses but lies
        first = str(e).splitlines()[0] if str(e) else ""
        raise LoRAError(f"{f}: cannot read the safetensors file ({type(e).__name__}: {first})") from e
    groups = _group(state, where=f"LoRA file {f}")
    return {module + _NORMAL[role]: t for module, g in groups.items() for role, t in g.items()}


def fuse_lora(unet, lora: Mapping[str, torch.Tensor], scale: float = 1.0, alpha: float | None = None) -> list[str]:
    """Add scale * (alpha / rank) * B @ A into the U-Net's Linear and Conv2d weights, in place.

    Every target is checked before any weight changes, so a LoRA that does not fit leaves the U-Net as it was.
    A conv LoRA has A (r, in, k, k) and B (out, r, 1, 1) and is fused as B.flatten(1) @ A.flatten(1),
    reshaped to the conv weight.

    Args:
        unet: the `UNet2DConditionModel` (or any module) to modify.
        lora: `load_lora`'s result, or a state dict in any layout `load_lora` reads.
        scale: strength; 0 leaves the weights bit-identical.
        alpha: LoRA alpha for every module; default each module's own alpha key, else its rank (factor 1).

    Returns:
        the fused module names, in the U-Net's module order.
    """
    import torch

    if isinstance(scale, bool) or not math.isfinite(float(scale)):
        raise LoRAError(f"LoRA scale must be a finite number, got {scale!r}")
    if alpha is not None and not math.isfinite(float(alpha)):
        raise LoRAError(f"LoRA alpha must be a finite number, got {alpha!r}")
    groups = _group(lora)
    modules = dict(unet.named_modules())
    deltas: dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        m = modules.get(name)
        if m is None:
            raise LoRAError(f"LoRA targets module {name!r} which this U-Net does not have")
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            raise LoRAError(
                f"LoRA targets module {name!r}, a {type(m).__name__}; only Linear and Conv2d layers can be fused"
            )
        a, b, w = g["A"], g["B"], m.weight
        if a.dim() not in (2, 4) or b.dim() not in (2, 4) or (b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
            raise LoRAError(
                f"LoRA for module {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected (r, in[, k, k]) and (out, r[, 1, 1])"
            )
        a2, b2 = a.flatten(1), b.flatten(1)
        if b2.shape[1] != a2.shape[0]:
            raise LoRAError(
                f"LoRA for module {name!r} has rank {a2.shape[0]} in lora_A {tuple(a.shape)} but {b2.shape[1]} in lora_B {tuple(b.shape)}"
            )
        if (b2.shape[0], a2.shape[1]) != (w.shape[0], w[0].numel()) or (
            a.dim() == 4 and tuple(a.shape[1:]) != tuple(w.shape[1:])
        ):
            raise LoRAError(
                f"LoRA for module {name!r} does not fit: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} "
                f"against a {type(m).__name__} weight of shape {tuple(w.shape)}"
            )
        rank = a2.shape[0]
        a_ = float(alpha) if alpha is not None else (float(g["alpha"].item()) if "alpha" in g else float(rank))
        factor = float(scale) * a_ / rank
        deltas[name] = (factor * (b2.double() @ a2.double())).reshape(w.shape)
    fused = [n for n in modules if n in deltas]
    with torch.no_grad():
        for name in fused:
            w = modules[name].weight
            w.add_(deltas[name].to(device=w.device, dtype=w.dtype))
    return fused


def save_lora(path: str | os.PathLike, unet_lora_state: Mapping[str, torch.Tensor | float]) -> Path:
    """Write a LoRA state dict to a safetensors file, atomically (temporary file + rename).

    Args:
        path: the .safetensors file to write (its folder is created).
        unet_lora_state: key -> tensor, in the layout `load_lora` reads (e.g. `unet.<module>.lora_A.weight`);
            plain numbers (alphas) become scalar tensors.

    Returns:
        the path written.
    """
    import torch
    from safetensors.torch import save_file

    from sdxs_edge.atomic import atomic_file

    path = Path(path)
    tensors = {
        k: (v.detach().to("cpu").contiguous() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
        for k, v in unet_lora_state.items()
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path
