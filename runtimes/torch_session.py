"""The PyTorch reference runtime: the bundle's source model through `sdxs_edge.components` wrappers.

It runs whatever the bundle was converted from (manifest["source"]["model"]: a preset name, a model
folder or a hub id), or an explicit `reference=` model, in float32 on CUDA when present, else CPU, and
takes the same checked inputs as every other runtime, so parity compares like with like.

For a bundle converted with a LoRA (`convert --lora`) it fuses the LoRA file the manifest records
(manifest["conversion"]["config"]["lora"], checked against the recorded sha256) at the recorded scale
into its U-Net (a copy of it, for a pipeline passed in), so the reference is the model the bundle lowered.

The source model is never downloaded here: a hub id loads from the local Hugging Face cache only
(`sdxs-edge --allow-download` fills it), and the loaded weights must hash to the manifest's
`source.sha256` (the hash `converters.api.weights_sha256` recorded), or the session refuses to start.

For a bundle with a ControlNet it loads the ControlNet the manifest records (manifest["source"]
["controlnet"]["model"], a folder, checked against the recorded weights sha256), or an explicit
`controlnet=`, with the recorded conditioning scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from sdxs_edge.bundle import BundleError


def resolve_source(bundle: Path, source: str) -> str:
    """A manifest's source model as `SDXSPipeline.load` takes it: a relative folder is tried against the
    working directory, then the bundle's parent; presets and hub ids pass through."""
    p = Path(source).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    beside = bundle.parent / p
    return str(beside) if beside.exists() else source


class TorchSession(Session):
    """Runs the bundle's source model (or `reference`) in PyTorch.

    Args:
        bundle: the bundle directory (any target: the reference does not read the lowered files).
        reference: model to run instead of manifest["source"]["model"]: a preset name, a model folder,
            a hub id, or a loaded `SDXSPipeline` (whose attached ControlNet, if any, is used for a
            ControlNet bundle unless `controlnet` is given).
        controlnet: for a ControlNet bundle, the ControlNet to run instead of the recorded folder: a
            folder or a loaded diffusers `ControlNetModel` (not checked against the recorded sha256).
        device: "cpu" or "cuda"; default CUDA when available.
        verify: check every component file's sha256 against the manifest.
    """

    name = "torch"
    cpu_class = None
    targets = ()

    def __init__(
        self, bundle: str | Path, *, reference=None, controlnet=None, device: str | None = None, verify: bool = True
    ):
        super().__init__(bundle, verify=verify)
        try:
            import torch
        except ImportError:
            raise BackendMissingError("the torch reference runtime needs PyTorch (pip install torch==2.13.0)") from None
        from sdxs_edge.components import wrappers
        from sdxs_edge.pipeline import SDXSPipeline

        self._torch = torch
        if isinstance(reference, SDXSPipeline):
            pipe = reference
        elif reference is not None:
            pipe = SDXSPipeline.load(str(reference))
        else:
            pipe = self._load_source()
        pipe = self._with_lora(pipe, reference)
        self.pipeline = pipe
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.controlnet = None
        scale = 1.0
        if "controlnet" in self.specs:
            record = self.manifest["source"].get("controlnet") or {}
            scale = float(
                record.get("control_scale", self.manifest["conversion"].get("config", {}).get("control_scale") or 1.0)
            )
            if controlnet is None and isinstance(reference, SDXSPipeline):
                controlnet = reference.controlnet
            self.controlnet = self._load_controlnet(controlnet, record, pipe)
        elif controlnet is not None:
            raise BundleError(f"{self.bundle} has no ControlNet; controlnet= applies to bundles converted with one")
        self.modules = {
            k: m.to(self.device) for k, m in wrappers(pipe, self.controlnet, scale, "encoder" in self.specs).items()
        }

    def _load_source(self):
        """The manifest's source model, loaded only from a preset, a local folder or the local hub cache
        (never downloaded here), and checked against `source.sha256` before anything runs."""
        from sdxs_edge.pipeline import SDXSPipeline
        from sdxs_edge.weights import modules_sha256

        source = self.manifest["source"]
        src = resolve_source(self.bundle, source["model"])
        pipe = SDXSPipeline.load(src, seed=int(source.get("preset_seed") or 0))
        if modules_sha256(pipe.c.modules()) != source["sha256"]:
            where = (
                f"{src}/{{text_encoder,unet,vae}}/*.safetensors"
                if Path(src).is_dir()
                else f"preset {src} (seed {source.get('preset_seed') or 0})"
            )
            raise BundleError(
                f"the source model's weights ({where}) differ from those {self.bundle} was converted from (source.sha256 mismatch); pass reference= (--reference) to compare with it anyway"
            )
        return pipe

    def _with_lora(self, pipe, reference):
        """`pipe` with the bundle's recorded LoRA fused into its U-Net (unchanged when there is none)."""
        cfg = self.manifest.get("conversion", {}).get("config", {})
        if not cfg.get("lora"):
            return pipe
        import copy
        import dataclasses

        from sdxs_edge.bundle import sha256_path
        from sdxs_edge.lora import fuse_lora, load_lora, resolve_lora_path
        from sdxs_edge.pipeline import SDXSPipeline

        f = resolve_lora_path(resolve_source(self.bundle, cfg["lora"]))
        if cfg.get("lora_sha256") and sha256_path(f) != cfg["lora_sha256"]:
            raise BundleError(f"the LoRA {f} has changed since {self.bundle} was converted (sha256 mismatch)")
        if pipe is reference:  # never modify the caller's pipeline
            base = pipe
            pipe = SDXSPipeline(dataclasses.replace(base.c, unet=copy.deepcopy(base.c.unet)), name=base.name)
            pipe.default_steps, pipe.default_guidance = base.default_steps, base.default_guidance
            pipe.controlnet = base.controlnet
        fuse_lora(pipe.c.unet, load_lora(f), scale=float(cfg.get("lora_scale") or 1.0))
        return pipe

    def _load_controlnet(self, controlnet, record: dict, pipe):
        """The ControlNet to run: `controlnet` (folder or module) or the folder the manifest records."""
        from sdxs_edge.controlnet import check_controlnet, load_controlnet

        if controlnet is not None:
            cn = load_controlnet(controlnet, pipe.c.unet) if isinstance(controlnet, (str, Path)) else controlnet
            check_controlnet(cn, pipe.c.unet)
            return cn
        if not record.get("model"):
            raise BundleError(
                f"{self.bundle}: the ControlNet was converted from a module, so the manifest names no folder to load; "
                "pass controlnet= (a folder or ControlNetModel) or reference= a pipeline with it attached"
            )
        cn = load_controlnet(resolve_source(self.bundle, record["model"]), pipe.c.unet)
        if record.get("weights_sha256"):
            from sdxs_edge.weights import modules_sha256

            if modules_sha256({"controlnet": cn}) != record["weights_sha256"]:
                raise BundleError(
                    f"the ControlNet {record['model']} has changed since {self.bundle} was converted (weights sha256 mismatch); pass controlnet= to compare with it anyway"
                )
        return cn

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        spec = self.specs[component]
        args = []
        for s in spec.inputs:
            t = torch.from_numpy(inputs[s.name]).to(self.device)
            args.append(t.float() if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.modules[component](*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {s.name: o.detach().float().cpu().numpy() for s, o in zip(spec.outputs, outs)}
