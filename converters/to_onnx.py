"""ONNX: static-shape export (opset 17) and onnxruntime-based fp16 / int8 lowering.

Exporter choice (torch 2.13): the TorchScript exporter (`dynamo=False`). Both exporters reproduce the
fp32 models (>120 dB SNR on every component), but onnxruntime's float16 converter and QDQ quantizer only
handle the TorchScript graphs correctly: on `dynamo=True` graphs the float16 U-Net fell to -2.6 dB SNR and
`quantize_static` refused the U-Net ("shared mode is not supported for weight"). See the registry.

fp16: `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`, so runtimes feed and
read float32 exactly as the manifest says. int8 static: `quantize_static` in QDQ format, per-channel uint8
weights, uint8 activations calibrated (MinMax) on tensors captured from real pipeline runs, then the
sensitivity pass of `converters.sensitivity` keeps the most harmful nodes in float (`nodes_to_exclude`).
int8 dynamic: `quantize_dynamic` of MatMul/Gemm weights (per-channel uint8); convolutions stay float
because onnxruntime's CPU ConvInteger only takes uint8 weights.

Why uint8 weights (`INT8_FORM`): onnxruntime's u8s8 kernels compute exactly only where the CPU has VNNI
(AVX-512 VNNI, AVX-VNNI) or on arm64. On x86-64 with AVX2 alone they multiply with `vpmaddubsw`, whose
int16 pair sums saturate, so one bundle scores differently by CPU class. The shipped model's ONNX int8
conversion on an AVX2-only AMD EPYC, by form (`benchmarks/results/int8-forms-x86-64-avx2.md`, from
`python -m benchmarks.int8_forms`; U-Net / text encoder / decoder SNR, image PSNR):

    u8 activations, s8 weights           U-Net 23.6 dB: fails the 25 dB floor (30.2 dB on AVX-512 VNNI)
    u8 / s8 with reduce_range (7 bits)   28.8 / 37.4 / 32.7 dB, 40.4 dB image
    s8 / s8                              29.1 / 34.2 / 42.9 dB, 40.1 dB image
    u8 / u8                              30.6 / 38.1 / 40.0 dB, 41.6 dB image

u8u8 products are widened to int16 before they are summed on every ISA (MLAS has no saturating u8u8
kernel), so its figures hold on AVX2, AVX-512 and arm64 alike. It costs speed where u8s8 has a dedicated
kernel: on an AVX-512 VNNI EPYC (sdxs-512 at 512x512, 2 threads; docs/benchmarks.md) ONNX int8 ran
1.18x faster than ONNX fp32 in u8u8, against 2.42x in u8s8 (an earlier run). The manifest records the
form and the CPU classes the bundle was checked on.
"""

from __future__ import annotations

import collections
import itertools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converters.base import ComponentJob, ComponentResult, Runner
from converters.sensitivity import QParams, Quantizer, QuantNode, run_pass, score_nodes, split_calibration
from converters.sensitivity_cache import content_key
from sdxs_edge.errors import SDXSError

PROTO_LIMIT = 2**31 - 2**20  # protobuf's 2 GiB cap, less headroom for the graph itself
EXTERNAL_DATA_BYTES = 64 * 2**20  # components this large keep their weights in a .data file (see _save)
DYNAMIC_OPS = ("MatMul", "Gemm")
# Static int8 quantizes the compute-heavy ops only. Measured on the tiny U-Net (parity inputs): all op
# types 27.0 dB, Conv/MatMul/Gemm 28.7 dB; every extra requantization point (Add, Mul, Concat, Softmax)
# adds noise while onnxruntime's CPU kernels gain their speed from integer Conv / MatMul.
STATIC_OPS = ("Conv", "MatMul", "Gemm")
INT8_FORM = "u8u8"  # uint8 activations x uint8 weights: exact on every CPU class (module docstring)


class OnnxConversionError(SDXSError):
    """The ONNX exporter or onnxruntime's tools failed on a component."""


def _save(model, path: Path) -> list[str]:
    """Save a ModelProto; from EXTERNAL_DATA_BYTES on, the weights go to one `<file>.data` beside the
    graph. onnxruntime then reads them straight into its tensors; from an inline file it holds the parsed
    protobuf's copy as well while the session initialises. Measured on the sdxs-512 int8 U-Net (317 MB):
    loading took +500 MB of resident memory inline, +330 MB with external data, and the peak of a load
    and a run fell from 822 to 660 MB. Returns the extra files."""
    import onnx

    path = Path(path)
    if model.ByteSize() < min(EXTERNAL_DATA_BYTES, PROTO_LIMIT):
        onnx.save(model, str(path))
        return []
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )
    return [data] if (path.parent / data).is_file() else []  # no tensor over the 1 KB threshold: nothing went out


def dynamic_axes(job: ComponentJob) -> dict[str, dict[int, str]] | None:
    """The ONNX dynamic axes of a bundle of several sizes or a dynamic batch (`sdxs_edge.sizes`): the batch
    of every tensor, and the height and width of every 4-D one (latents, images); None: static shapes."""
    cfg = job.config
    if not cfg.dynamic_shapes:
        return None
    axes = {}
    for s in [*job.inputs, *job.outputs]:
        a = {0: "batch"} if cfg.max_batch > 1 else {}
        if len(cfg.sizes) > 1 and len(s.shape) == 4:
            a.update({2: f"{s.name}_height", 3: f"{s.name}_width"})
        if a:
            axes[s.name] = a
    return axes


def export(job: ComponentJob) -> Path:
    """Stage 1: the PyTorch wrapper -> an fp32 ONNX file in the scratch directory (static shapes, or the
    `dynamic_axes` of a bundle of several sizes or batches)."""
    import warnings

    import torch

    path = job.work / f"{job.name}.fp32.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape asserts, all static here
        try:
            torch.onnx.export(
                job.module,
                tuple(job.example),
                str(path),
                input_names=[s.name for s in job.inputs],
                output_names=[s.name for s in job.outputs],
                opset_version=job.config.opset,
                do_constant_folding=True,
                dynamic_axes=dynamic_axes(job),
                dynamo=False,
            )
        except Exception as e:  # the exporter raises many kinds; name the component and keep the cause
            raise OnnxConversionError(
                f"ONNX export of {job.name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            ) from e
    return path


def lower(job: ComponentJob, fp32_path: Path) -> tuple[list[str], dict]:
    """Stage 2: write the component at the job's precision to `job.out`; returns (extra files, report)."""
    import onnx

    p = job.config.precision
    try:
        if p == "fp32":
            return _save(onnx.load(str(fp32_path)), job.out), {}
        if p == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
            return _save(model, job.out), {}
        if job.config.dynamic:
            return quantize_dynamic(job, fp32_path)
        return quantize_static(job, fp32_path)
    except SDXSError:
        raise
    except Exception as e:  # onnx / onnxruntime tools raise many kinds; name the step and keep the cause
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise OnnxConversionError(
            f"ONNX {p}{' dynamic' if job.config.dynamic else ''} lowering of {job.name} failed: {type(e).__name__}: {first}"
        ) from e


def quantize_dynamic(job: ComponentJob, fp32_path: Path) -> tuple[list[str], dict]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    big = os.path.getsize(fp32_path) >= PROTO_LIMIT
    ort_quantize_dynamic(
        str(fp32_path),
        str(job.out),
        op_types_to_quantize=list(DYNAMIC_OPS),
        per_channel=True,
        weight_type=QuantType.QUInt8,
        use_external_data_format=big,
    )
    if not big and os.path.getsize(job.out) >= EXTERNAL_DATA_BYTES:
        import onnx

        _save(onnx.load(str(job.out)), job.out)
    return _external_files(job.out), {"int8": {"mode": "dynamic", "form": INT8_FORM, "op_types": list(DYNAMIC_OPS)}}


class _Reader:
    """onnxruntime CalibrationDataReader over captured samples (a fresh one per quantize call)."""

    def __init__(self, job: ComponentJob, samples: Sequence[tuple[np.ndarray, ...]]):
        self._it = iter([job.feeds(s) for s in samples])

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return iter(self.get_next, None)


# ONNX static int8 activation ranges (`ConversionConfig.onnx_calibration`): onnxruntime's calibrators, and
# "mse": MinMax ranges each shrunk to the clipping that minimises that tensor's uint8 rounding + clipping
# error on the calibration values (`mse_ranges`), handed to quantize_static as TensorQuantOverrides.
CALIBRATION_OPTIONS = {
    "minmax": None,
    "minmax-average": {"CalibMovingAverage": True},
    "percentile": {"CalibPercentile": 99.999},
    "mse": None,
}
CALIBRATION_NAMES = {
    "minmax": "MinMax",
    "minmax-average": "MinMax, averaged over calibration samples",
    "percentile": "99.999th percentile",
    "mse": "MinMax shrunk per tensor to the least-squares clipping",
}
MSE_SAMPLES = 8  # calibration samples the "mse" ranges are fitted on (one augmented run each)
MSE_VALUES = 100_000  # values drawn per tensor and sample: the error curve of a range, not the whole tensor
MSE_SHRINK = np.linspace(0.2, 1.0, 33)  # candidate ranges: [a * min, a * max]


def uint8_error(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of onnxruntime's asymmetric uint8 quantization of `x` with range [lo, hi]
    (widened to hold 0, as the quantizer does): rounding inside the range, clipping outside it."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return float(np.mean(x.astype(np.float64) ** 2))
    scale = (hi - lo) / 255.0
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def mse_ranges(values: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """Per tensor: the range [a * min, a * max] (a in MSE_SHRINK) with the least uint8 error on the values,
    and that error's gain over the full MinMax range in dB; {name: (rmin, rmax, gain_db)}."""
    out = {}
    for name, x in values.items():
        lo, hi = float(x.min()), float(x.max())
        errs = [uint8_error(x, a * lo, a * hi) for a in MSE_SHRINK]
        b = int(np.argmin(errs))
        gain = 10 * np.log10(errs[-1] / errs[b]) if errs[b] > 0 and errs[-1] > 0 else 0.0
        out[name] = (float(MSE_SHRINK[b] * lo), float(MSE_SHRINK[b] * hi), float(gain))
    return out


def _static_activations(path: Path, excluded: Sequence[str]) -> list[str]:
    """The float activations static int8 quantizes: the non-constant inputs and the outputs of the
    STATIC_OPS nodes that are not excluded."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consts = _constant_names(m)
    skip = set(excluded)
    names: dict[str, None] = {}
    for n in m.graph.node:
        if n.op_type in STATIC_OPS and n.name not in skip:
            for t in [*n.input[:2], *n.output[:1]]:
                if t and t not in consts:
                    names[t] = None
    return list(names)


def _aug_dir(job: ComponentJob) -> Path:
    """The component's own folder for models with extra outputs: components lowered side by side share
    `job.work`, and each removes its folder when done."""
    return job.work / f"{job.name}.aug"


def _mse_overrides(pre: Path, job: ComponentJob, samples, excluded: Sequence[str]) -> tuple[dict, dict]:
    """TensorQuantOverrides for the "mse" calibration, and a summary for the manifest. The values come
    from one augmented run per sample (at most MSE_SAMPLES), each tensor subsampled to MSE_VALUES."""
    import onnx
    import onnxruntime as ort

    names = _static_activations(pre, excluded)
    m = onnx.load(str(pre))
    graph_inputs = {i.name for i in m.graph.input}
    for t in names:
        if t not in graph_inputs:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    aug_dir = _aug_dir(job)
    aug_dir.mkdir(exist_ok=True)
    aug = aug_dir / f"{pre.stem}.mse.onnx"
    _save(m, aug)
    del m
    sess = ort.InferenceSession(str(aug), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    pools: dict[str, list[np.ndarray]] = {t: [] for t in names}
    for sample in list(samples)[:MSE_SAMPLES]:
        feeds = job.feeds(sample)
        vals = dict(zip(outs, sess.run(outs, feeds)))
        vals.update(feeds)
        for t in names:
            v = np.asarray(vals[t], dtype=np.float32).ravel()
            if v.size > MSE_VALUES:  # keep the extremes: they set MinMax, the start of the search
                v = np.concatenate([v[rng.integers(0, v.size, MSE_VALUES)], [v.min(), v.max()]])
            pools[t].append(v)
        del vals
    del sess
    shutil.rmtree(aug_dir, ignore_errors=True)
    fitted = mse_ranges({t: np.concatenate(v) for t, v in pools.items()})
    overrides = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for t, (lo, hi, _) in fitted.items()}
    gains = [g for _, _, g in fitted.values()]
    summary = {
        "tensors": len(fitted),
        "clipped": sum(1 for g in gains if g > 0),
        "mean_gain_db": round(float(np.mean(gains)), 2) if gains else 0.0,
        "samples": min(len(samples), MSE_SAMPLES),
    }
    return overrides, summary


def quantize_static(job: ComponentJob, fp32_path: Path) -> tuple[list[str], dict]:
    """Static QDQ int8 with the sensitivity pass; the best model found is written to `job.out`."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(_Reader)
    big = os.path.getsize(fp32_path) >= PROTO_LIMIT
    pre = job.work / f"{job.name}.pre.onnx"
    quant_pre_process(
        str(fp32_path), str(pre), skip_symbolic_shape=True, save_as_external_data=big, all_tensors_to_one_file=True
    )
    cache = job.work / f"{job.name}.calibration.json"  # calibrate once; exclusion steps reuse the ranges
    counter = itertools.count()
    fit, sens_in, sens_ref = split_calibration(job)
    # Products of two activations (attention's Q K^T and softmax V) stay in float, as XNNPACK leaves them:
    # the softmax probabilities on a 1/255 grid and per-tensor ranges over every head cost the most SNR.
    products = _activation_products(pre)
    options, mse_summary = CALIBRATION_OPTIONS[job.config.onnx_calibration], None
    if job.config.onnx_calibration == "mse":
        overrides, mse_summary = _mse_overrides(pre, job, fit, products)
        options = {"TensorQuantOverrides": overrides}

    def quantize(excluded: list[str]) -> Path:
        out = job.work / f"{job.name}.int8-{next(counter)}.onnx"
        ort_quantize_static(
            str(pre),
            str(out),
            _Reader(job, fit),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8,  # INT8_FORM: u8s8 saturates on AVX2 without VNNI
            op_types_to_quantize=list(STATIC_OPS),
            nodes_to_exclude=[*products, *excluded],
            use_external_data_format=big,
            calibrate_method=CalibrationMethod.Percentile
            if job.config.onnx_calibration == "percentile"
            else CalibrationMethod.MinMax,
            extra_options=options,
            calibration_cache_path=str(cache),
        )
        return out

    def score(path: Path) -> float:
        return job.sensitivity_figures(runner_for(job, path), sens_in, sens_ref)["min_sample_snr_db"]

    def rank(full: Path, candidates):
        return score_nodes(candidates, _activations(pre, job, sens_in), _qparams(full))

    digest = _file_digest(pre, job.config.onnx_calibration)
    key = content_key(job, digest, __file__, fit, sens_in, job.scored_references(sens_in, sens_ref))
    best, sensitivity = run_pass(job, Quantizer(quantize, score, _quantized_nodes, rank, key))
    report: dict = {
        "mode": "static",
        "format": "QDQ",
        "op_types": list(STATIC_OPS),
        "form": INT8_FORM,
        "weights": "uint8 per-channel",
        "activations": f"uint8 per-tensor ({CALIBRATION_NAMES[job.config.onnx_calibration]})",
        "calibration_samples": len(fit),
        "sensitivity_samples": len(sens_in),
        "float_activation_products": len(products),
    }
    if mse_summary is not None:
        report["mse_clipping"] = mse_summary
    report["sensitivity"] = sensitivity
    import onnx

    extra = _save(onnx.load(str(best)), job.out)
    report["quantized_nodes"] = len(_quantized_nodes(job.out))
    shutil.rmtree(_aug_dir(job), ignore_errors=True)
    return extra, {"int8": report}


def _file_digest(path: Path, *extra: str) -> str:
    """sha256 of an ONNX file, its external data files and `extra` texts."""
    import hashlib

    h = hashlib.sha256("\0".join(extra).encode())
    for p in [path, *(path.parent / name for name in _external_files(path))]:
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _external_files(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return sorted(locs)


def _activation_products(path: Path) -> list[str]:
    """MatMul nodes whose two inputs are both computed (neither a weight nor a constant)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consts = _constant_names(m)
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input[:2])]


def _constant_names(m) -> set[str]:
    """Names of a model's weights and constants: initializers and Constant node outputs."""
    return {t.name for t in m.graph.initializer} | {
        o for n in m.graph.node if n.op_type == "Constant" for o in n.output
    }


def _quantized_nodes(path: Path) -> list[QuantNode]:
    """Quantized Conv / MatMul / Gemm nodes of a QDQ model with the float names of the activations they quantize: inputs fed
    through QuantizeLinear -> DequantizeLinear, and outputs handed to a QuantizeLinear."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    quantized = {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    nodes = []
    for n in m.graph.node:
        if n.op_type not in STATIC_OPS:  # other consumers of a shared DequantizeLinear are not quantized ops
            continue
        fed, tensors = False, []
        for i in n.input:
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                fed = True  # weights come through a DequantizeLinear of an initializer: quantized, not scored
                q = producer.get(p.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    tensors.append(q.input[0])
        tensors += [o for o in n.output if o in quantized]
        if fed:
            nodes.append(QuantNode(n.name, tuple(tensors)))
    return nodes


def _qparams(path: Path) -> dict[str, QParams]:
    """Calibrated per-tensor scale / zero point of every quantized activation of a QDQ model."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 3:
            continue
        scale, zp = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
        if scale.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        out[n.input[0]] = QParams(float(scale.reshape(())), int(zp.reshape(())), int(info.min), int(info.max))
    return out


def _activations(path: Path, job: ComponentJob, samples) -> dict[str, list[np.ndarray]]:
    """Every float intermediate tensor of a model on `samples` (for the sensitivity ranking)."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    _aug_dir(job).mkdir(exist_ok=True)
    aug = _aug_dir(job) / f"{Path(path).stem}.aug.onnx"
    modify_model_output_intermediate_tensors(
        str(path), str(aug), save_as_external_data=os.path.getsize(path) >= PROTO_LIMIT
    )
    acts = collect_activations(str(aug), _Reader(job, samples))
    aug.unlink()
    return acts


def runner_for(job: ComponentJob, path: Path) -> Runner:
    """Stage 4: an onnxruntime CPU session on `path` as a numpy callable (its output; a tuple of the
    declared outputs for a component with several)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxConversionError(
            f"onnxruntime cannot load the {job.name} model {Path(path).name}: {str(e).splitlines()[0][:300]}"
        ) from e
    names = [s.name for s in job.outputs]
    if len(names) == 1:
        return lambda sample: sess.run(names, job.feeds(sample))[0]
    return lambda sample: tuple(sess.run(names, job.feeds(sample)))


def _dtype(elem_type: int) -> str:
    """ONNX element type -> the io spec's numpy-style name ("float32", "int32", ...)."""
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def op_report(path: Path) -> dict:
    """Stage 3: what the file holds: op counts, initializer dtypes, quantized vs float compute nodes."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    dtypes = collections.Counter(_dtype(t.data_type) for t in m.graph.initializer)
    io = {
        "inputs": [
            (i.name, _dtype(i.type.tensor_type.elem_type), [d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in m.graph.input
        ],
        "outputs": [
            (o.name, _dtype(o.type.tensor_type.elem_type), [d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in m.graph.output
        ],
    }
    q = len(_quantized_nodes(path)) if ops.get("DequantizeLinear") else 0
    return {
        "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": sum(ops.values()),
        "op_counts": dict(ops.most_common()),
        "initializer_dtypes": dict(dtypes),
        "quantized_compute_nodes": q,
        **io,
    }


def check_io(job: ComponentJob, report: dict) -> None:
    """The file's input/output names, dtypes and static shapes must be exactly the io spec's (a dynamic
    axis, which the report lists as 0, where `dynamic_axes` makes one; with dynamic axes an output
    dimension the exporter left unnamed passes, as the runtimes check every output's shape)."""
    axes = dynamic_axes(job) or {}
    want = lambda s: (s.name, s.dtype, [0 if i in axes.get(s.name, {}) else d for i, d in enumerate(s.shape)])
    want_in = [want(s) for s in job.inputs]
    want_out = [want(s) for s in job.outputs]
    got_in = [tuple(x) for x in report["inputs"]]
    got_out = [tuple(x) for x in report["outputs"]]
    if axes:  # the exporter may leave other output dimensions unnamed (0) as well; runtimes check outputs
        got_out = [(n, t, [w if g == 0 else g for g, w in zip(d, o[2])]) for (n, t, d), o in zip(got_out, want_out)]
    if got_in != want_in or got_out != want_out:
        raise OnnxConversionError(
            f"{job.name}: ONNX inputs/outputs {got_in} -> {got_out} differ from the io spec {want_in} -> {want_out}"
        )


def convert_component(job: ComponentJob) -> ComponentResult:
    """export -> lower -> op report + io check -> onnxruntime runner."""
    fp32 = export(job)
    extra, lowering = lower(job, fp32)
    report = op_report(job.out)
    check_io(job, report)
    report.update(lowering)
    report["exporter"] = "torch.onnx.export(dynamo=False)"
    return ComponentResult(job.out.name, report, runner_for(job, job.out), extra_files=extra)
