"""ONNX: static-shape export (opset 17) and onnxruntime-based fp16 / int8 lowering.

Exporter choice (torch 2.13): the TorchScript exporter (`dynamo=False`). Both exporters reproduce the
fp32 models (>120 dB SNR on every component), but onnxruntime's float16 converter and QDQ quantizer only
handle the TorchScript graphs correctly: on `dynamo=True` graphs the float16 U-Net fell to -2.6 dB SNR and
`quantize_static` refused the U-Net ("shared mode is not supported for weight"). See the registry.

fp16: `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`, so runtimes feed and
read float32 exactly as the manifest says. int8 static: `quantize_static` in QDQ format, per-channel int8
weights, uint8 activations calibrated (MinMax) on tensors captured from real pipeline runs, then the
sensitivity pass of `converters.sensitivity` keeps the most harmful nodes in float (`nodes_to_exclude`).
int8 dynamic: `quantize_dynamic` of MatMul/Gemm weights (per-channel); convolutions stay float because
onnxruntime's CPU ConvInteger only takes uint8 weights.
"""
from __future__ import annotations

import collections
import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from converters.base import ComponentJob, ComponentResult, Runner
from converters.sensitivity import QParams, QuantNode, keep_sensitive_in_float, score_nodes, split_calibration
from sdxs_edge.errors import SDXSError

PROTO_LIMIT = 2**31 - 2**20  # protobuf's 2 GiB cap, less headroom for the graph itself
DYNAMIC_OPS = ("MatMul", "Gemm")
# Static int8 quantizes the compute-heavy ops only. Measured on the tiny U-Net (parity inputs): all op
# types 27.0 dB, Conv/MatMul/Gemm 28.7 dB; every extra requantization point (Add, Mul, Concat, Softmax)
# adds noise while onnxruntime's CPU kernels gain their speed from integer Conv / MatMul.
STATIC_OPS = ("Conv", "MatMul", "Gemm")


class OnnxConversionError(SDXSError):
    """The ONNX exporter or onnxruntime's tools failed on a component."""


def _save(model, path: Path) -> list[str]:
    """Save a ModelProto; over the protobuf limit, weights go to one `<file>.data` beside it."""
    import onnx

    path = Path(path)
    if model.ByteSize() < PROTO_LIMIT:
        onnx.save(model, str(path))
        return []
    data = path.name + ".data"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [data]


def export(job: ComponentJob) -> Path:
    """Stage 1: the PyTorch wrapper -> an fp32 ONNX file in the scratch directory (static shapes)."""
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
                dynamo=False,
            )
        except Exception as e:  # the exporter raises many kinds; name the component and keep the cause
            raise OnnxConversionError(f"ONNX export of {job.name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from e
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
        raise OnnxConversionError(f"ONNX {p}{' dynamic' if job.config.dynamic else ''} lowering of {job.name} failed: {type(e).__name__}: {first}") from e


def quantize_dynamic(job: ComponentJob, fp32_path: Path) -> tuple[list[str], dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

    big = os.path.getsize(fp32_path) >= PROTO_LIMIT
    ort_quantize_dynamic(str(fp32_path), str(job.out), op_types_to_quantize=list(DYNAMIC_OPS), per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=big)
    return _external_files(job.out), {"int8": {"mode": "dynamic", "op_types": list(DYNAMIC_OPS)}}


class _Reader:
    """onnxruntime CalibrationDataReader over captured samples (a fresh one per quantize call)."""

    def __init__(self, job: ComponentJob, samples: Sequence[tuple[np.ndarray, ...]]):
        self._it = iter([job.feeds(s) for s in samples])

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return iter(self.get_next, None)


# ONNX static int8 activation ranges (`ConversionConfig.onnx_calibration`): onnxruntime's calibrators.
CALIBRATION_OPTIONS = {"minmax": None, "minmax-average": {"CalibMovingAverage": True}, "percentile": {"CalibPercentile": 99.999}}
CALIBRATION_NAMES = {"minmax": "MinMax", "minmax-average": "MinMax, averaged over calibration samples", "percentile": "99.999th percentile"}


def quantize_static(job: ComponentJob, fp32_path: Path) -> tuple[list[str], dict]:
    """Static QDQ int8 with the sensitivity pass; the best model found is written to `job.out`."""
    import shutil

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(_Reader)
    big = os.path.getsize(fp32_path) >= PROTO_LIMIT
    pre = job.work / f"{job.name}.pre.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True, save_as_external_data=big, all_tensors_to_one_file=True)
    cache = job.work / f"{job.name}.calibration.json"  # calibrate once; exclusion steps reuse the ranges
    counter = itertools.count()
    fit, sens_in, sens_ref = split_calibration(job)
    # Products of two activations (attention's Q K^T and softmax V) stay in float, as XNNPACK leaves them:
    # the softmax probabilities on a 1/255 grid and per-tensor ranges over every head cost the most SNR.
    products = _activation_products(pre)

    def quantize(excluded: list[str]) -> Path:
        out = job.work / f"{job.name}.int8-{next(counter)}.onnx"
        ort_quantize_static(
            str(pre),
            str(out),
            _Reader(job, fit),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # onnxruntime's recommendation for x86 and ARM CPUs alike
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(STATIC_OPS),
            nodes_to_exclude=[*products, *excluded],
            use_external_data_format=big,
            calibrate_method=CalibrationMethod.Percentile if job.config.onnx_calibration == "percentile" else CalibrationMethod.MinMax,
            extra_options=CALIBRATION_OPTIONS[job.config.onnx_calibration],
            calibration_cache_path=str(cache),
        )
        return out


    def evaluate(excluded: list[str]) -> tuple[float, Path]:
        path = quantize(excluded)
        return job.sensitivity_figures(runner_for(job, path), sens_in, sens_ref)["min_sample_snr_db"], path

    first = evaluate([])
    report: dict = {
        "mode": "static",
        "format": "QDQ",
        "op_types": list(STATIC_OPS),
        "weights": "int8 per-channel",
        "activations": f"uint8 per-tensor ({CALIBRATION_NAMES[job.config.onnx_calibration]})",
        "calibration_samples": len(fit),
        "sensitivity_samples": len(sens_in),
        "float_activation_products": len(products),
    }
    candidates = _quantized_nodes(first[1])
    rank = lambda: score_nodes(candidates, _activations(pre, job, sens_in), _qparams(first[1]))
    best, report["sensitivity"] = keep_sensitive_in_float(job, candidates, rank, evaluate, first)
    import onnx

    extra = _save(onnx.load(str(best)), job.out)
    report["quantized_nodes"] = len(_quantized_nodes(job.out))
    shutil.rmtree(job.work / "aug", ignore_errors=True)
    return extra, {"int8": report}


def _external_files(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return sorted(locs)


def _activation_products(path: Path) -> list[str]:
    """MatMul nodes whose two inputs are both computed (neither a weight nor a constant)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consts = {t.name for t in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input[:2])]


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

    aug_dir = job.work / "aug"
    aug_dir.mkdir(exist_ok=True)
    aug = aug_dir / f"{Path(path).stem}.aug.onnx"
    modify_model_output_intermediate_tensors(str(path), str(aug), save_as_external_data=os.path.getsize(path) >= PROTO_LIMIT)
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
        raise OnnxConversionError(f"onnxruntime cannot load the {job.name} model {Path(path).name}: {str(e).splitlines()[0][:300]}") from e
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
        "inputs": [(i.name, _dtype(i.type.tensor_type.elem_type), [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input],
        "outputs": [(o.name, _dtype(o.type.tensor_type.elem_type), [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in m.graph.output],
    }
    q = len(_quantized_nodes(path)) if ops.get("DequantizeLinear") else 0
    return {"opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), "nodes": sum(ops.values()), "op_counts": dict(ops.most_common()), "initializer_dtypes": dict(dtypes), "quantized_compute_nodes": q, **io}


def check_io(job: ComponentJob, report: dict) -> None:
    """The file's input/output names, dtypes and static shapes must be exactly the io spec's."""
    want_in = [(s.name, s.dtype, list(s.shape)) for s in job.inputs]
    want_out = [(s.name, s.dtype, list(s.shape)) for s in job.outputs]
    got_in = [tuple(x) for x in report["inputs"]]
    got_out = [tuple(x) for x in report["outputs"]]
    if got_in != want_in or got_out != want_out:
        raise OnnxConversionError(f"{job.name}: ONNX inputs/outputs {got_in} -> {got_out} differ from the io spec {want_in} -> {want_out}")


def convert_component(job: ComponentJob) -> ComponentResult:
    """export -> lower -> op report + io check -> onnxruntime runner."""
    fp32 = export(job)
    extra, lowering = lower(job, fp32)
    report = op_report(job.out)
    check_io(job, report)
    report.update(lowering)
    report["exporter"] = "torch.onnx.export(dynamo=False)"
    return ComponentResult(job.out.name, report, runner_for(job, job.out), extra_files=extra)
