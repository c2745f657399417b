"""Core ML: one ML Program .mlpackage per component (coremltools 9, iOS17, static shapes).

Tracers per component come from the registry (TorchScript for the text encoder, torch.export for the
U-Net and decoder; coremltools 9 fails on the other one with torch 2.13). fp16 is float16 compute precision
with float32 inputs and outputs; int8 is float16 compute with weights linearly quantized to int8
(`coremltools.optimize.coreml.linear_quantize_weights`, per-channel symmetric), or k-means palettized to
6 or 4 bits with `palettize`. Core ML cannot predict on Linux, so the check here is structural: the saved
package's inputs and outputs (names, shapes, dtypes) must be the io spec's and its weights must be stored
in the requested form.
"""

from __future__ import annotations

import collections
from pathlib import Path

from converters.base import ComponentJob, ComponentResult, export_dims
from sdxs_edge.errors import SDXSError

# Core ML's FeatureType.ArrayFeatureType.ArrayDataType values.
ARRAY_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}
COMPRESSED_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")
WEIGHT_THRESHOLD = 2048  # coremltools' default: tensors of up to 2048 elements (biases, norms) stay float
# int8 compresses the weights of these MIL ops only; other large constants (CLIP's causal mask, with its
# -3e4 fill and all-zero rows) would only lose precision and gain nothing.
WEIGHT_OPS = ("conv", "conv_transpose", "linear", "matmul", "gather")


class CoreMLConversionError(SDXSError):
    """Tracing or coremltools conversion failed, or the package is not what was asked for."""


def _err(job: ComponentJob, stage: str, e: Exception) -> CoreMLConversionError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return CoreMLConversionError(f"Core ML {stage} of {job.name} failed: {type(e).__name__}: {first}")


def export(job: ComponentJob):
    """Stage 1: a TorchScript trace or a decomposed torch.export program, as the registry says."""
    import warnings

    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape asserts, all static here
            if job.export.tracer == "torchscript":
                return torch.jit.trace(job.module, tuple(job.example), strict=False)
            dims = export_dims(job) if job.config.dynamic_shapes else None  # several sizes: symbolic H, W
            ep = torch.export.export(job.module, tuple(job.example), dynamic_shapes=dims, strict=False)
            return ep.run_decompositions({})
    except Exception as e:
        raise _err(job, f"{job.export.tracer} tracing", e) from e


def lower(job: ComponentJob, traced):
    """Stage 2: coremltools conversion (+ weight compression for int8); returns the MLModel."""
    import coremltools as ct
    import numpy as np

    inputs = None
    # An ExportedProgram carries its own input names and dtypes; one of several sizes enumerates them.
    if job.export.tracer == "torchscript" or job.config.dynamic_shapes:
        inputs = [
            ct.TensorType(name=s.name, shape=_shape(job, s), dtype=np.int32 if s.dtype == "int32" else np.float32)
            for s in job.inputs
        ]
    precision = ct.precision.FLOAT32 if job.config.precision == "fp32" else ct.precision.FLOAT16
    try:
        model = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name=s.name, dtype=np.float32) for s in job.outputs],  # float32 io as the spec says
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=precision,
            skip_model_load=True,  # no Core ML framework on Linux; the package is checked structurally
        )
    except Exception as e:
        raise _err(job, "conversion", e) from e
    model = _rename_inputs(job, model)
    if job.config.precision != "int8":
        return model
    from coremltools.optimize import coreml as cto

    try:
        if job.config.palettize:
            op = cto.OpPalettizerConfig(mode="kmeans", nbits=job.config.palettize, weight_threshold=WEIGHT_THRESHOLD)
            return cto.palettize_weights(model, cto.OptimizationConfig(op_type_configs={t: op for t in WEIGHT_OPS}))
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD
        )
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(op_type_configs={t: op for t in WEIGHT_OPS}))
    except Exception as e:
        raise _err(job, "weight compression", e) from e


def enumerated(job: ComponentJob, spec) -> list[list[int]]:
    """The shapes a 4-D input takes in a bundle of several sizes (one per size, the default first)."""
    from sdxs_edge.sizes import shape_at

    return [list(shape_at(spec.shape, job.config.sizes[0], size, spec.shape[0])) for size in job.config.sizes]


def _shape(job: ComponentJob, spec):
    """An input's Core ML shape: fixed, or `ct.EnumeratedShapes` (what the Neural Engine prefers to
    ranges) of a 4-D input of a bundle of several sizes."""
    import coremltools as ct

    if len(job.config.sizes) <= 1 or len(spec.shape) != 4:
        return spec.shape
    return ct.EnumeratedShapes(shapes=enumerated(job, spec), default=spec.shape)


def _rename_inputs(job: ComponentJob, model):
    """Give the package the io spec's input names. An ExportedProgram names its inputs after the forward
    signature, so the controlled U-Net's variadic residuals arrive as residuals_0, residuals_1, ...; they
    are renamed by position (a count mismatch is left for `check_structure` to report)."""
    import coremltools as ct

    spec = model.get_spec()
    got = [f.name for f in spec.description.input]
    want = [s.name for s in job.inputs]
    if got == want or len(got) != len(want):
        return model
    try:
        for old, new in zip(got, want):
            if old != new:
                ct.utils.rename_feature(spec, old, new, rename_outputs=False)
        return ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)
    except Exception as e:
        raise _err(job, "input renaming", e) from e


def structure(path: Path) -> dict:
    """Stage 3: what the saved package holds: io, op counts and weight storage dtypes."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(path))

    def io(features):
        return [
            [
                f.name,
                ARRAY_DTYPES.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType)),
                list(f.type.multiArrayType.shape),
            ]
            for f in features
        ]

    enumerated_shapes = {
        f.name: [list(e.shape) for e in f.type.multiArrayType.enumeratedShapes.shapes]
        for f in spec.description.input
        if f.type.multiArrayType.WhichOneof("ShapeFlexibility") == "enumeratedShapes"
    }

    ops: collections.Counter = collections.Counter()
    weights: collections.Counter = collections.Counter()  # uncompressed weight-sized constants of WEIGHT_OPS
    others: collections.Counter = collections.Counter()  # other large constants (masks, tables)
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            consumers: dict[str, set[str]] = collections.defaultdict(set)
            for op in block.operations:
                for arg in op.inputs.values():
                    for a in arg.arguments:
                        if a.WhichOneof("binding") == "name":
                            consumers[a.name].add(op.type)
            for op in block.operations:
                ops[op.type] += 1
                if op.type != "const":
                    continue
                for val in op.attributes.values():
                    t = val.type.tensorType
                    n = 1
                    for d in t.dimensions:
                        n *= d.constant.size
                    if n > WEIGHT_THRESHOLD and len(t.dimensions) > 1:  # coremltools' own rule for what it compresses
                        is_weight = consumers[op.outputs[0].name] & set(WEIGHT_OPS)
                        (weights if is_weight else others)[MIL_pb2.DataType.Name(t.dataType).lower()] += n
    return {
        "spec_version": spec.specificationVersion,
        "model_type": spec.WhichOneof("Type"),
        "inputs": io(spec.description.input),
        "outputs": io(spec.description.output),
        **({"enumerated_shapes": enumerated_shapes} if enumerated_shapes else {}),
        "op_counts": dict(ops.most_common()),
        "compressed_ops": {o: ops[o] for o in COMPRESSED_OPS if ops[o]},
        "uncompressed_weight_elements": dict(weights),
        "other_constant_elements": dict(others),
    }


def check_structure(job: ComponentJob, s: dict) -> dict:
    """Raise if the package's io or weight storage is not what the io spec and precision ask for."""
    want_in = [[t.name, t.dtype, list(t.shape)] for t in job.inputs]
    want_out = [[t.name, t.dtype, list(t.shape)] for t in job.outputs]
    if len(job.config.sizes) > 1:  # of several sizes, Core ML may leave an output's shape open ([])
        want_out = [w if got[2] else [*w[:2], []] for w, got in zip(want_out, s["outputs"])]
    if s["model_type"] != "mlProgram":
        raise CoreMLConversionError(f"{job.name}: expected an ML Program, got {s['model_type']}")
    if s["inputs"] != want_in or s["outputs"] != want_out:
        raise CoreMLConversionError(
            f"{job.name}: Core ML inputs/outputs {s['inputs']} -> {s['outputs']} differ from the io spec {want_in} -> {want_out}"
        )
    want_sizes = {t.name: enumerated(job, t) for t in job.inputs if len(t.shape) == 4 and len(job.config.sizes) > 1}
    if s.get("enumerated_shapes", {}) != want_sizes:
        raise CoreMLConversionError(
            f"{job.name}: Core ML enumerated shapes {s.get('enumerated_shapes', {})} differ from the sizes' {want_sizes}"
        )
    w = s["uncompressed_weight_elements"]
    p = job.config.precision
    if p == "fp16" and w.get("float32"):
        raise CoreMLConversionError(f"{job.name}: fp16 package still stores {w['float32']} float32 weight elements")
    if p == "fp32" and w.get("float16"):
        raise CoreMLConversionError(f"{job.name}: fp32 package stores {w['float16']} float16 weight elements")
    if p == "int8":
        op = "constexpr_lut_to_dense" if job.config.palettize else "constexpr_affine_dequantize"
        left = sum(n for d, n in w.items() if d.startswith("float"))
        if left:
            raise CoreMLConversionError(
                f"{job.name}: int8 package still stores {left} float weight elements of tensors over {WEIGHT_THRESHOLD} elements"
            )
        if set(s["compressed_ops"]) - {op}:
            raise CoreMLConversionError(f"{job.name}: expected {op} weights, found {s['compressed_ops']}")
    return {
        "why": "Core ML prediction needs macOS; checked: ML Program, io names/shapes/dtypes (enumerated shapes of several sizes), weight storage",
        "compressed_ops": s["compressed_ops"],
        "uncompressed_weight_elements": w,
        "compression_threshold_elements": WEIGHT_THRESHOLD,
    }


def convert_component(job: ComponentJob) -> ComponentResult:
    """trace -> convert (-> compress) -> save -> structural check. No runner: Core ML cannot run here."""
    traced = export(job)
    model = lower(job, traced)
    try:
        model.save(str(job.out))
    except Exception as e:
        raise _err(job, "saving", e) from e
    s = structure(job.out)
    structural = check_structure(job, s)
    report = {
        **s,
        "compute_precision": "float32" if job.config.precision == "fp32" else "float16",
        "minimum_deployment_target": "iOS17",
    }
    if job.config.precision == "int8":
        report["weights"] = (
            f"{job.config.palettize}-bit k-means palettes"
            if job.config.palettize
            else "int8 linear symmetric per-channel"
        )
    return ComponentResult(job.out.name, report, None, structural=structural)
