"""OpenVINO as a benchmark baseline: IR from the ONNX fp32 bundle (fp32) or NNCF static int8, and a
`runtimes.base.Session` that runs it, so its timings go through the same checked `generate_arrays`.

OpenVINO and NNCF are the optional `bench` extra (pip install '.[bench]'); they are imported only inside
these functions. The int8 IR is calibrated on real one-step pipeline inputs (the converters' own
`calibration.capture` with the default SHAPES-64 captions) and checked against PyTorch on the parity
prompts with the converters' own figures, so its quality is reported beside its speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from sdxs_edge.atomic import atomic_dir
from sdxs_edge.bundle import REQUIRED_COMPONENTS, BundleError, load_manifest

META_FILE = "openvino.json"


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise BackendMissingError("openvino: not installed (pip install '.[bench]')") from None
    return ov


def _db(x: float) -> float | None:
    """JSON has no infinity: an exact match is stored as null, as the converters' manifests do."""
    return None if np.isinf(x) else round(float(x), 3)


def _core_config(threads: int | None) -> dict:
    # f32 inference precision: on CPUs with bf16 / AMX OpenVINO would otherwise silently run fp32 IR in
    # bf16, and the fp32 row would not be fp32.
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


class OpenVINOSession(Session):
    """A bundle's three components on OpenVINO's CPU plugin.

    Args:
        bundle: an ONNX bundle (fp32): its manifest and tokenizer are used, and its .onnx programs when
            `ir_dir` is not given.
        ir_dir: folder of `{component}.xml` OpenVINO IR (e.g. NNCF int8) with the same inputs/outputs.
        threads: INFERENCE_NUM_THREADS (None: OpenVINO's default).
        verify: check every component file's sha256 against the manifest.
    """

    name = "openvino"
    targets = ("onnx",)

    def __init__(
        self, bundle: str | Path, *, ir_dir: str | Path | None = None, threads: int | None = None, verify: bool = True
    ):
        super().__init__(bundle, verify=verify)
        ov = _openvino()
        core = ov.Core()
        cfg = _core_config(threads)
        self.compiled, self.requests = {}, {}
        for comp, spec in self.specs.items():
            path = Path(ir_dir) / f"{comp}.xml" if ir_dir is not None else self.bundle / spec.file
            if not path.is_file():
                raise BundleError(f"OpenVINO program {path} is missing")
            compiled = core.compile_model(str(path), "CPU", cfg)
            names = {n for port in compiled.inputs for n in port.get_names()}
            missing = [s.name for s in spec.inputs if s.name not in names]
            if missing:
                raise BundleError(f"{path}: inputs {sorted(names)} lack the manifest's {missing}")
            self.compiled[comp] = compiled
            self.requests[comp] = compiled.create_infer_request()
        self.threads = int(self.compiled["unet"].get_property("INFERENCE_NUM_THREADS"))

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        compiled, req = self.compiled[component], self.requests[component]
        res = req.infer(inputs)
        # The request reuses its output buffers: copy before the next call overwrites them.
        return {s.name: np.array(res[compiled.output(s.name)], copy=True) for s in self.specs[component].outputs}

    def close(self) -> None:
        self.compiled, self.requests = {}, {}


def convert(
    onnx_bundle: str | Path, precision: str, out: str | Path, model: str, resolution: int, seed: int = 0
) -> Path:
    """OpenVINO IR of an ONNX fp32 bundle's components: fp32 as is, or NNCF static int8, checked against PyTorch.

    Args:
        onnx_bundle: an ONNX fp32 bundle of `model` at `resolution`.
        precision: "fp32" or "int8".
        out: folder to write `{component}.xml/.bin` and openvino.json into (replaced atomically).
        model: the bundle's source model (preset or folder), for calibration and parity inputs.
        resolution: image side in pixels.
        seed: weight seed of a preset (as the bundle was converted with).

    Returns:
        the output folder.
    """
    t_start = time.perf_counter()
    onnx_bundle, out = Path(onnx_bundle), Path(out)
    ov, nncf, manifest = _check_source(onnx_bundle, precision)

    from converters import calibration, parity
    from sdxs_edge import sampler
    from sdxs_edge.components import wrappers
    from sdxs_edge.pipeline import SDXSPipeline

    stages: dict[str, float] = {}
    t = time.perf_counter()
    pipe = SDXSPipeline.load(model, seed=seed)
    modules = wrappers(pipe)
    check = calibration.capture(
        pipe, modules, calibration.PARITY_PROMPTS, seed0=calibration.PARITY_SEED0, resolution=resolution
    )
    calib = (
        calibration.capture(pipe, modules, calibration.default_calibration_prompts(), seed0=0, resolution=resolution)
        if precision == "int8"
        else None
    )
    stages["capture"] = round(time.perf_counter() - t, 3)

    core = ov.Core()
    figures, runners = {}, {}
    with atomic_dir(out, overwrite=True) as tmp:
        for comp in REQUIRED_COMPONENTS:
            t = time.perf_counter()
            run = _lower(
                ov,
                core,
                nncf,
                onnx_bundle / manifest["components"][comp]["file"],
                manifest["components"][comp],
                comp,
                calib,
                Path(tmp),
            )
            figs = parity.component_figures(run, check.inputs[comp], check.outputs[comp])
            figures[comp] = {
                "snr_db": _db(figs["snr_db"]),
                "min_sample_snr_db": _db(figs["min_sample_snr_db"]),
                "max_abs_error": float(figs["max_abs_error"]),
                "samples": figs["samples"],
            }
            runners[comp] = run
            stages[comp] = round(time.perf_counter() - t, 3)
        e2e = parity.end_to_end(runners, check, sampler.OneStepConstants(**manifest["sampler"]))
        stages_record = {"stage_seconds": stages, "seconds": round(time.perf_counter() - t_start, 3)}
        meta = _meta(onnx_bundle, precision, model, resolution, figures, e2e, stages_record)
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _check_source(onnx_bundle: Path, precision: str):
    """(openvino, nncf or None, the ONNX fp32 bundle's manifest); a one-line error for anything else."""
    if precision not in ("fp32", "int8"):
        raise BackendMissingError(f"OpenVINO baseline precisions are fp32 and int8, not {precision}")
    ov = _openvino()
    nncf = None
    if precision == "int8":
        try:
            import nncf
        except ImportError:
            raise BackendMissingError("nncf: not installed, OpenVINO int8 needs it (pip install '.[bench]')") from None
    manifest = load_manifest(onnx_bundle)
    if manifest["target"] != "onnx" or manifest["precision"] != "fp32":
        raise BundleError(
            f"{onnx_bundle}: OpenVINO IR is built from an ONNX fp32 bundle, got {manifest['target']}/{manifest['precision']}"
        )
    if "controlnet" in manifest["components"]:
        raise BundleError(f"{onnx_bundle}: the OpenVINO baseline is built for bundles without a ControlNet")
    return ov, nncf, manifest


def _lower(ov, core, nncf, onnx_file: Path, spec: dict, comp: str, calib, tmp: Path):
    """One component's IR (NNCF int8 when `calib` is given) written into `tmp`; returns it as a runner."""
    names = [s["name"] for s in spec["inputs"]]
    ov_model = ov.convert_model(str(onnx_file))
    if calib is not None:
        items = [dict(zip(names, x)) for x in calib.inputs[comp]]
        # Attention blocks (text encoder, U-Net) get NNCF's transformer scheme (SmoothQuant,
        # attention-aware patterns); the conv-only decoder the default CNN scheme.
        kind = nncf.ModelType.TRANSFORMER if comp != "decoder" else None
        ov_model = nncf.quantize(ov_model, nncf.Dataset(items), subset_size=len(items), model_type=kind)
    ov.save_model(ov_model, str(tmp / f"{comp}.xml"), compress_to_fp16=False)
    compiled = core.compile_model(str(tmp / f"{comp}.xml"), "CPU", _core_config(None))
    outname = spec["outputs"][0]["name"]

    def run(x, compiled=compiled, names=names, outname=outname):
        return np.array(compiled(dict(zip(names, x)))[compiled.output(outname)], copy=True)

    return run


def _meta(
    onnx_bundle: Path, precision: str, model: str, resolution: int, figures: dict, e2e: dict, conversion: dict
) -> dict:
    """openvino.json: what the IR is, its parity against PyTorch, versions and timings."""
    from importlib.metadata import version

    return {
        "target": "openvino",
        "precision": precision,
        "source_bundle": str(onnx_bundle),
        "model": model,
        "resolution": resolution,
        "scheme": "OpenVINO IR converted from the ONNX fp32 bundle"
        + (
            ", NNCF post-training static int8 (TRANSFORMER model type for text encoder and U-Net), 32 calibration captions"
            if precision == "int8"
            else ""
        ),
        "parity": {
            "checked": "numeric",
            "reference": "PyTorch float32 wrappers (sdxs_edge.components) on the converters' parity prompts",
            "null_db_means": "exact match (infinite SNR / PSNR)",
            "components": figures,
            "end_to_end": {
                "image_psnr_db": _db(e2e["image_psnr_db"]),
                "min_image_psnr_db": _db(e2e["min_image_psnr_db"]),
                "images": e2e["images"],
            },
        },
        "versions": {"openvino": version("openvino"), **({"nncf": version("nncf")} if precision == "int8" else {})},
        "conversion": conversion,
    }
