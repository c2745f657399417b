"""Bundle layouts: where the write stage puts a bundle's files, so that a peer's runtime can open the folder.

    sdxs-edge  the bundle as the converter writes it (`sdxs_edge.bundle`): text_encoder.<ext>, unet.<ext>,
               decoder.<ext>, tokenizer/, manifest.json
    optimum    ONNX only: the folder optimum's ONNX Runtime diffusion pipeline
               (`optimum.onnxruntime.ORTStableDiffusionPipeline.from_pretrained`) loads:
                 model_index.json                   StableDiffusionPipeline, EulerDiscreteScheduler, CLIPTokenizer
                 text_encoder/model.onnx + config   input_ids -> last_hidden_state
                 unet/model.onnx + config           sample, encoder_hidden_states, timestep -> out_sample
                 vae_decoder/model.onnx + config    latent_sample -> sample
                 tokenizer/                         the bundle's CLIP BPE files
                 scheduler/scheduler_config.json    EulerDiscreteScheduler, "trailing" spacing (one step: t = 999)
               plus manifest.json, which names these files and tensors, so `run`, `parity` and `serve` open
               the folder as any bundle.
    react-native-executorch
               ExecuTorch (XNNPACK, fp32) only: the sdxs-edge bundle as it is, plus react-native-executorch/
               with the five sources react-native-executorch's `useTextToImage` hook loads (tokenizer.json,
               scheduler_config.json, text_encoder.pte, unet.pte, decoder.pte): adapter programs that make
               the hook's fixed PNDM + guidance 7.5 loop draw the bundle's one-step image when the app passes
               numSteps = 2 (`converters.rne_layout`). The manifest records their sha256.

The optimum programs are the lowered and checked ones, renamed (optimum's exporter names: its
`CLIPTextOnnxConfig`, `UNetOnnxConfig`, `VaeDecoderOnnxConfig`), with two changes that keep every value
bit for bit: the U-Net takes optimum's `timestep` input, float32 [1], and returns NaN for any timestep
other than the bundle's one-step timestep (a one-step program asked for another step fails loudly instead
of drawing a wrong image); and the decoder keeps dividing by the VAE's latent scaling itself, so
vae_decoder/config.json says `scaling_factor` 1.0 (diffusers' pipeline divides by it before the decoder).
"""

from __future__ import annotations

import json
from pathlib import Path

from converters.registry import UnsupportedConversion
from sdxs_edge.bundle import sha256_path
from sdxs_edge.errors import SDXSError

LAYOUTS = ("sdxs-edge", "optimum", "react-native-executorch")
LAYOUT_TARGETS = {"optimum": ("onnx",), "react-native-executorch": ("executorch",)}

# component -> (optimum subfolder, {our tensor name: optimum's}), from optimum's exporter configs.
OPTIMUM_PARTS = {
    "text_encoder": ("text_encoder", {"input_ids": "input_ids", "hidden_states": "last_hidden_state"}),
    "unet": ("unet", {"latent": "sample", "context": "encoder_hidden_states", "noise_pred": "out_sample"}),
    "decoder": ("vae_decoder", {"latent": "latent_sample", "image": "sample"}),
}
OPTIMUM_WEIGHTS = "model.onnx"  # optimum's ONNX_WEIGHTS_NAME
TIMESTEP = "timestep"


def check_layout(
    layout: str, target: str, components, controlnet, precision: str = "fp32", delegate: str = "xnnpack"
) -> None:
    """Refuse, before any model loads, a layout this request cannot have."""
    if layout not in LAYOUTS:
        raise UnsupportedConversion(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    targets = LAYOUT_TARGETS.get(layout)
    if targets and target not in targets:
        raise UnsupportedConversion(f"layout {layout} is for target {', '.join(targets)} bundles, not {target}")
    if layout == "optimum" and (controlnet is not None or set(components) != set(OPTIMUM_PARTS)):
        raise UnsupportedConversion(
            "layout optimum holds exactly text_encoder, unet and decoder (optimum's pipeline has no ControlNet part)"
        )
    if layout == "react-native-executorch":
        if controlnet is not None or not {"text_encoder", "unet", "decoder"} <= set(components):
            raise UnsupportedConversion(
                "layout react-native-executorch needs text_encoder, unet and decoder and takes no ControlNet (the hook has no control input)"
            )
        if (precision, delegate) != ("fp32", "xnnpack"):
            raise UnsupportedConversion(
                f"layout react-native-executorch is for fp32 XNNPACK bundles (its adapter programs are lowered in float32), not {precision} {delegate}"
            )


def apply_layout(layout: str, pipe, manifest: dict, bundle: Path) -> list[str]:
    """Rearrange the written bundle into `layout`; returns the top-level names the layout adds."""
    if layout == "sdxs-edge":
        return []
    if layout == "react-native-executorch":
        from converters.rne_layout import write_layout

        return write_layout(pipe, manifest, bundle)
    for comp, (folder, names) in OPTIMUM_PARTS.items():
        _optimum_program(manifest["components"][comp], names, bundle, folder, manifest["sampler"]["timestep"])
    _optimum_configs(pipe, manifest, bundle)
    manifest.setdefault("conversion", {})["layout"] = layout
    return ["model_index.json", "scheduler", *(f for f, _ in OPTIMUM_PARTS.values())]


def _optimum_program(entry: dict, names: dict, bundle: Path, folder: str, timestep: int) -> None:
    """One component's program renamed to optimum's tensor names (the U-Net with its timestep input),
    saved as FOLDER/model.onnx; the manifest entry updated to name it."""
    import onnx

    src = bundle / entry["file"]
    model = onnx.load(str(src), load_external_data=True)
    _rename(model.graph, names)
    if TIMESTEP not in {i.name for i in model.graph.input} and folder == "unet":
        _add_timestep_guard(model, names["noise_pred"], timestep)
    (bundle / folder).mkdir()
    out = bundle / folder / OPTIMUM_WEIGHTS
    external = bool(entry.get("external_data"))
    onnx.save(model, str(out), save_as_external_data=external, location=OPTIMUM_WEIGHTS + ".data")
    for old in [entry["file"], *(x["file"] for x in entry.get("external_data", []))]:
        (bundle / old).unlink()
    entry["file"] = f"{folder}/{OPTIMUM_WEIGHTS}"
    entry["sha256"] = sha256_path(out)
    if external:
        data = f"{folder}/{OPTIMUM_WEIGHTS}.data"
        entry["external_data"] = [{"file": data, "sha256": sha256_path(bundle / data)}]
    for t in entry["inputs"] + entry["outputs"]:
        t["name"] = names[t["name"]]
    if folder == "unet":
        entry["inputs"].append({"name": TIMESTEP, "shape": [1], "dtype": "float32"})


def _rename(graph, names: dict) -> None:
    """Rename graph inputs and outputs (and every node reference to them); a clash is an error."""
    taken = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    for old, new in names.items():
        if old != new and new in taken:
            raise SDXSError(f"cannot rename {old} to {new}: the program already has a value named {new}")
    for v in (*graph.input, *graph.output):
        v.name = names.get(v.name, v.name)
    for n in graph.node:
        n.input[:] = [names.get(x, x) for x in n.input]
        n.output[:] = [names.get(x, x) for x in n.output]


def _add_timestep_guard(model, output: str, timestep: int) -> None:
    """out = U-Net output * (1 if timestep == T else NaN): a timestep input the one-step program checks."""
    from onnx import TensorProto, helper

    g = model.graph
    raw = f"{output}_unguarded"
    for n in g.node:
        n.output[:] = [raw if x == output else x for x in n.output]
        n.input[:] = [raw if x == output else x for x in n.input]
    g.input.append(helper.make_tensor_value_info(TIMESTEP, TensorProto.FLOAT, [1]))
    consts = {
        "sdxs_timestep": float(timestep),
        "sdxs_one": 1.0,
        "sdxs_nan": float("nan"),
    }
    for name, value in consts.items():
        g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [1], [value]))
    g.node.extend(
        [
            helper.make_node("Equal", [TIMESTEP, "sdxs_timestep"], ["sdxs_is_t"]),
            helper.make_node("Where", ["sdxs_is_t", "sdxs_one", "sdxs_nan"], ["sdxs_guard"]),
            helper.make_node("Mul", [raw, "sdxs_guard"], [output]),
        ]
    )


def _config_json(module, **changes) -> str:
    """A diffusers or transformers module's config as JSON, with `changes` applied."""
    cfg = json.loads(module.config.to_json_string() if hasattr(module.config, "to_json_string") else "{}")
    if not cfg:
        cfg = json.loads(module.to_json_string())
    cfg.update(changes)
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def scheduler_config(pipe) -> dict:
    """The one-step Euler scheduler: the model's betas and prediction type, "trailing" spacing."""
    src = dict(pipe.c.scheduler_config)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset")
    return {
        "_class_name": "EulerDiscreteScheduler",
        **{k: src[k] for k in keep if k in src},
        "timestep_spacing": "trailing",
        "interpolation_type": "linear",
        "final_sigmas_type": "zero",
        "use_karras_sigmas": False,
    }


def _optimum_configs(pipe, manifest: dict, bundle: Path) -> None:
    """model_index.json, scheduler/ and each part's config.json (what optimum and diffusers read)."""
    import diffusers

    c = pipe.c
    res = manifest["resolution"]
    (bundle / "text_encoder" / "config.json").write_text(c.text_encoder.config.to_json_string())
    (bundle / "unet" / "config.json").write_text(_config_json(c.unet, sample_size=res // 8))
    (bundle / "vae_decoder" / "config.json").write_text(_config_json(c.vae, scaling_factor=1.0))
    (bundle / "scheduler").mkdir()
    (bundle / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(pipe), indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", type(c.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", type(c.unet).__name__],
        "vae": ["diffusers", type(c.vae).__name__],
    }
    (bundle / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
