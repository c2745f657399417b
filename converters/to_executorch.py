"""ExecuTorch: torch.export -> (PT2E int8) -> edge dialect -> XNNPACK (or Core ML) delegate -> .pte.

fp32: the exported program lowered with `XnnpackPartitioner`. fp16: the same on a float16 copy of the
module that casts its float inputs to float16 and its output back to float32, so the .pte keeps the io
spec's float32 interface. int8: PT2E static quantization with the XNNPACK quantizer (symmetric per-channel
int8 weights, int8 per-tensor activations from a histogram observer), calibrated on tensors captured from
real pipeline runs, then the sensitivity pass of `converters.sensitivity` (kept-in-float nodes are left
out of the quantizer's annotation). Only convolutions (transposed ones too: the upsampling of
`converters.xnnpack_rewrites`) and linears (with a fused ReLU) are quantized, plus the decoder's residual
adds: measured on the tiny U-Net, quantizing every annotatable op (add, mul, cat too) gives 19.3 dB, conv
and linear only 28.5 dB, and XNNPACK's speed-up comes from the integer conv / GEMM kernels. The decoder's
adds sit between int8 convolutions at full image size, where the float round trip costs more
(`_quantizable_targets`).

The delegation report (share of operators inside delegates, and which ops run on the portable CPU
kernels instead) goes into the manifest. `delegate="coreml"` lowers to the Core ML delegate, which
lowers on Linux but only runs on Apple devices, so its check is structural.
"""

from __future__ import annotations

import collections
import copy
import warnings
from pathlib import Path

import numpy as np

from converters import observers
from converters.base import ComponentJob, ComponentResult, Runner, export_dims
from converters.sensitivity import QParams, Quantizer, QuantNode, run_pass, score_nodes, split_calibration
from converters.sensitivity_cache import content_key
from sdxs_edge.errors import SDXSError

NOT_OPS = ("getitem", "executorch_call_delegate")  # plumbing, not operators
QDQ_OPS = (
    "quantize_per_tensor",
    "dequantize_per_tensor",
    "quantize_per_channel",
    "dequantize_per_channel",
    "choose_qparams",
)


class ExecuTorchConversionError(SDXSError):
    """torch.export, quantization or ExecuTorch lowering failed on a component."""


def _quantizable_targets(component: str | None = None):
    """The ops PT2E may quantize in `component`: convolutions and linears (with a fused ReLU) everywhere;
    in the decoder also the residual adds (TAESD's relu(conv(x) + x)), which then run as XNNPACK int8 adds
    with the ReLU fused instead of dequantize -> float add -> clamp -> quantize at full image size
    (sdxs-512 decoder at 512x512: 92.3 -> 87.2 ms, SNR against float 61.6 -> 60.9 dB, random weights)."""
    import torch

    a = torch.ops.aten
    ops = {
        a.conv2d.default,
        a.conv_transpose2d.input,
        a.linear.default,
        a.relu.default,
        a.relu_.default,
        a.hardtanh.default,
        a.hardtanh_.default,
    }
    if component == "decoder":
        ops |= {a.add.Tensor, a.add_.Tensor}
    return ops


def _share_moved_cat_qparams(gm) -> None:
    """Ties each concatenation whose inputs all come from one tensor (through slices, reshapes and
    permutes: the interleaving of `SubpixelUpsampleConv`) to that tensor's quantization.

    The XNNPACK quantizer gives a concatenation its own observer on its first input. Here that observer
    would requantize values that only move, and XNNPACK refuses a reshape whose input and output
    quantization differ (xnn_status_invalid_parameter at load)."""
    import torch
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    a = torch.ops.aten
    moves = {a.slice.Tensor, a.view.default, a.reshape.default, a.permute.default}

    def source(n):
        """The tensor `n` moves values of: through slices, reshapes, permutes, and concatenations of moves
        of one tensor; `n` itself otherwise."""
        while n.op == "call_function":
            if n.target in moves:
                n = n.args[0]
            elif n.target == a.cat.default and len({source(i) for i in n.args[0]}) == 1:
                n = n.args[0][0]
            else:
                break
        return n

    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != a.cat.default:
            continue
        inputs = list(n.args[0])
        # A source kept in float (sensitivity pass) leaves the moves in float: the default (quantize at the cat) holds.
        if (
            len(inputs) < 2
            or len({source(i) for i in inputs}) != 1
            or not all(i.meta.get("quantization_annotation") for i in inputs)
        ):
            continue
        shared = SharedQuantizationSpec(inputs[0])  # the first input's output: its reshape shares the source's
        n.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={i: shared for i in inputs}, output_qspec=shared, _annotated=True
        )


def _no_bn_patterns() -> list:
    """XNNPACK's annotation patterns without the conv + batch-norm ones. Each of those traces its pattern
    graph with torch.export on every annotation (13-22 s per `prepare_pt2e` of the shipped U-Net or
    decoder, once per candidate of the sensitivity pass); a graph without batch norm has nothing for them
    to match, so leaving them out annotates it the same."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    return [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]


def _quantizer(filter_fn):
    """The XNNPACK quantizer (symmetric, per-channel weights) with `filter_fn` and the concatenation tie
    of `_share_moved_cat_qparams`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    class Quantizer(XNNPACKQuantizer):
        def annotate(self, model):
            if not any(_is_op(n, ("batch_norm",)) for n in model.graph.nodes):
                self.SUPPORTED_PATTERNS = _no_bn_patterns()  # nothing for them to match; each costs seconds
            model = super().annotate(model)
            _share_moved_cat_qparams(model)
            return model

    return Quantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)).set_filter_function(filter_fn)


def half_precision(module):
    """A float16 copy of a wrapper with the float32 interface of the io spec (XNNPACK fp16)."""
    import torch

    class Half(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = copy.deepcopy(inner).half().eval()

        def forward(self, *args):
            out = self.inner(*[a.half() if a.is_floating_point() else a for a in args])
            return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()

    return Half(module)


def _err(job: ComponentJob, stage: str, e: Exception) -> ExecuTorchConversionError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return ExecuTorchConversionError(
        f"ExecuTorch {stage} of {job.name} ({job.config.precision}, {job.config.delegate}) failed: {type(e).__name__}: {first}"
    )


def export(job: ComponentJob) -> tuple[object, dict[str, int]]:
    """Stage 1: torch.export of the wrapper; returns the program and the XNNPACK rewrites made.

    On XNNPACK, fp32 and int8 export a copy with `converters.xnnpack_rewrites` applied (group norm,
    nearest upsampling and GEGLU in ops XNNPACK runs); fp16 exports a float16 copy without them (the
    group norm rewrite takes E[x^2] - E[x]^2, which float16 cannot hold safely).
    """
    import torch

    from converters.xnnpack_rewrites import rewrite_for_xnnpack

    module, rewrites = job.module, {}
    if job.config.delegate == "xnnpack":
        if job.config.precision == "fp16":
            module = half_precision(module)
        else:
            module, rewrites = rewrite_for_xnnpack(module, tuple(job.example))
    try:
        with torch.no_grad():
            return _export(job, module, tuple(job.example), all_sizes=True), rewrites
    except Exception as e:
        raise _err(job, "export", e) from e


# ---- several sizes and batches (sdxs_edge.sizes) --------------------------------------------------------
def method_name(job: ComponentJob, size: tuple[int, int]) -> str:
    """The program method of one image size (`sdxs_edge.sizes.method_name`)."""
    from sdxs_edge.sizes import method_name as name

    return name(job.config.sizes, size)


def _batched(job: ComponentJob, example: tuple) -> tuple:
    """Examples at batch 2 when the batch is dynamic (torch.export specializes a dimension of size 1)."""
    import torch

    return tuple(torch.cat([x, x]) for x in example) if job.config.max_batch > 1 else tuple(example)


def _export(job: ComponentJob, module, example: tuple, all_sizes: bool):
    """torch.export at `example`: static for a bundle of one size and batch; else with `_dims`."""
    import inspect

    import torch

    if not job.config.dynamic_shapes:
        return torch.export.export(module, example, strict=False)
    dims = export_dims(job, all_sizes)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # forward(*args): one entry holding them all
        dims = (dims,)
    return torch.export.export(module, _batched(job, example), dynamic_shapes=dims, strict=False)


def programs(job: ComponentJob, exported) -> dict:
    """The methods of the component's program: "forward" alone for one size, else one static-size
    method per size (`method_name`), each re-exported from the one graph (quantized once, on every size)."""
    if len(job.config.sizes) <= 1:
        return {"forward": exported}  # static, or with the dynamic batch already
    module = exported.module()
    try:
        return {method_name(job, size): _export(job, module, tuple(ex), False) for size, ex in job.size_examples}
    except Exception as e:
        raise _err(job, "export per size", e) from e


def _tensors(sample) -> list:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(x)) for x in sample]


def _numpy(out):
    """A module's or method's output as numpy: one array, or a tuple for several outputs (the ControlNet)."""
    if isinstance(out, (tuple, list)):
        return out[0].numpy() if len(out) == 1 else tuple(o.numpy() for o in out)
    return out.numpy()


def quantize(job: ComponentJob, exported) -> tuple[object, dict]:
    """Stage 1b (int8): PT2E prepare -> calibrate -> convert, with the sensitivity pass; re-exported.

    The graph calibrates once: each candidate of the sensitivity pass takes its observers from that
    calibration (`converters.observers`), and calibrates only where one has no exact match."""
    import torch

    graph = exported.module()
    allowed = _quantizable_targets(job.name)
    fit, sens_in, sens_ref = split_calibration(job)
    quantized = _quantize_with(job, graph, allowed, fit)

    def score(m) -> float:
        with torch.no_grad():
            return job.sensitivity_figures(lambda s: _numpy(m(*_tensors(s))), sens_in, sens_ref)["min_sample_snr_db"]

    def rank(full, candidates):
        return score_nodes(
            candidates, _record(graph, sens_in, {t for n in candidates for t in n.tensors}), _qparams(full)
        )

    key = content_key(job, _program_digest(exported), __file__, fit, sens_in, job.scored_references(sens_in, sens_ref))
    q = Quantizer(quantized, score, lambda full: _float_candidates(full, allowed), rank, key, forkable=True)
    try:
        with warnings.catch_warnings():  # torch deprecates its own LeafSpec use, once per graph copy
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            best, sensitivity = run_pass(job, q)
        best = _finished(best)
        report: dict = {
            "mode": "static",
            "quantizer": "XNNPACKQuantizer(get_symmetric_quantization_config(is_per_channel=True)); a concatenation of moves of one tensor shares its quantization",
            "op_types": ["conv2d", "conv_transpose2d", "linear (+ fused relu)"]
            + (["add (+ fused relu)"] if job.name == "decoder" else []),
            "weights": "int8 symmetric per-channel",
            "activations": "int8 per-tensor (histogram observer)",
            "calibration_samples": len(fit),
            "sensitivity_samples": len(sens_in),
            "sensitivity": sensitivity,
            "quantized_nodes": len(_quantized_nodes(best, allowed)),
        }
        with torch.no_grad():
            return _export(job, best, tuple(job.example), all_sizes=True), report
    except SDXSError:
        raise
    except Exception as e:
        raise _err(job, "int8 quantization", e) from e


def _quantize_with(job: ComponentJob, graph, allowed, fit):
    """excluded node names -> the converted PT2E graph with those nodes left in float, as the sensitivity
    pass scores it (`_unfinished`). Each graph that calibrates lends its observers to the later ones
    (`converters.observers.reuse`), which calibrate only the observers none had; an observer's parameters
    are computed once per calibrated state (`converters.observers.memoized_qparams`)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    calibrated: dict = {}
    qparams: dict = {}  # calibrated observer states -> their parameters (`observers.memoized_qparams`)

    def quantized(excluded: list[str]):
        skip = set(excluded)
        # The filter sees every node of a pattern (weights too); call_function nodes must be conv/linear(+relu).
        q = _quantizer(lambda n: n.op != "call_function" or (n.target in allowed and n.name not in skip))
        prepared = prepare_pt2e(copy.deepcopy(graph), q)
        missing = observers.reuse(prepared, calibrated)
        if missing:
            with torch.no_grad(), observers.calibrating_only(prepared, missing):
                for s in fit:
                    prepared(*_tensors(s))
            observers.lend(prepared, calibrated)
        with observers.memoized_qparams(qparams):
            return _unfinished(prepared)

    return quantized


def _unfinished(prepared):
    """`convert_pt2e` less two of its closing passes (`_finished`): they give each user of a dequantize
    its own copy and copy node metadata onto the quantize and dequantize ops, which changes no value the
    graph computes. They took 0.5 s of each 0.9 s conversion of the shipped U-Net, once per candidate of
    the sensitivity pass, which keeps one. The weights' quantize ops are folded, as `convert_pt2e` does
    after those passes (unfolded, every forward would quantize every weight again)."""
    from torchao.quantization.pt2e.constant_fold import constant_fold
    from torchao.quantization.pt2e.convert import _convert_to_reference_decomposed_fx
    from torchao.quantization.pt2e.qat_utils import _fold_conv_bn_qat
    from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint

    meta = prepared.meta  # convert_pt2e restores this dict's entries at its end
    model = _fold_conv_bn_qat(_convert_to_reference_decomposed_fx(prepared))
    constant_fold(model, _quant_node_constraint)
    model._sdxs_unfinished_meta = meta
    return model


def _finished(model):
    """An `_unfinished` graph as `convert_pt2e` returns it, changed in place (a finished graph is returned
    as it is)."""
    from torch.fx.passes.infra.pass_manager import PassManager
    from torchao.quantization.pt2e.quantizer import DuplicateDQPass, PortNodeMetaForQDQ
    from torchao.quantization.pt2e.utils import _disallow_eval_train

    meta = model.__dict__.pop("_sdxs_unfinished_meta", None)
    if meta is None:
        return model
    model = PassManager([DuplicateDQPass()])(model).graph_module
    model = PassManager([PortNodeMetaForQDQ()])(model).graph_module
    model.meta.update(meta)
    return _disallow_eval_train(model)


def _program_digest(exported) -> str:
    """sha256 of an exported program as the quantizer sees it: its graph and every tensor it holds."""
    import hashlib

    import torch

    h = hashlib.sha256(exported.graph_module.code.encode())
    tensors = {**exported.state_dict, **exported.constants}
    for name in sorted(tensors):
        t = tensors[name]
        if hasattr(t, "detach"):
            a = t.detach().contiguous().cpu()
            h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
        else:
            h.update(f"{name}:{t!r}".encode())
    return h.hexdigest()


def _is_op(node, names: tuple[str, ...]) -> bool:
    return node.op == "call_function" and any(n in str(node.target) for n in names)


def _quantized_nodes(gm, allowed) -> list[QuantNode]:
    """Quantized nodes (of the `allowed` targets) of a converted PT2E graph, fed by a dequantize of a
    quantized activation; the tensors they quantize are named by the float graph's node names."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in allowed:
            continue
        tensors, fed = [], False
        for a in n.all_input_nodes:
            if _is_op(a, ("dequantize_per_tensor",)):
                q = a.args[0]
                if hasattr(q, "op") and _is_op(q, ("quantize_per_tensor",)) and hasattr(q.args[0], "name"):
                    fed = True
                    tensors.append(q.args[0].name)
        for u in n.users:
            if _is_op(u, ("quantize_per_tensor",)):
                tensors.append(n.name)
        if fed:
            nodes.append(QuantNode(n.name, tuple(tensors)))
    return nodes


def _float_candidates(gm, allowed) -> list[QuantNode]:
    """The quantized nodes the sensitivity pass may keep in float: all but those that quantize a
    concatenation. XNNPACK mislowers such a float node beside the int8 graph: the shipped U-Net's 1x1
    shortcut convolution over a skip concatenation (up_blocks.2.resnets.1) lowered, then every run failed
    with "Propagating input shapes failed" (xnn_status_invalid_parameter); in a small model of the same
    pattern it runs and computes a wrong output (tests/test_converters.py)."""
    cats = {n.name for n in gm.graph.nodes if _is_op(n, ("aten.cat",))}
    return [n for n in _quantized_nodes(gm, allowed) if not cats & set(n.tensors)]


def _qparams(gm) -> dict[str, QParams]:
    out = {}
    for n in gm.graph.nodes:
        if _is_op(n, ("quantize_per_tensor",)) and hasattr(n.args[0], "name"):
            scale, zp, qmin, qmax = (_const(gm, a) for a in n.args[1:5])
            out[n.args[0].name] = QParams(float(scale), int(zp), int(qmin), int(qmax))
    return out


def _const(gm, a):
    if hasattr(a, "op") and a.op == "get_attr":
        return getattr(gm, a.target).item()
    return a


def _record(gm, samples, names: set[str]) -> dict[str, list[np.ndarray]]:
    """Values of the named nodes of the float graph on `samples` (fx Interpreter)."""
    import torch

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                values.setdefault(n.name, []).append(out.detach().float().numpy().copy())
            return out

    values: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for s in samples:
            Recorder(gm).run(*_tensors(s))
    return values


def lower(job: ComponentJob, exported):
    """Stage 2: edge dialect + delegate partitioning; on XNNPACK with the channels-last reshapes and the
    per-call convolution indirection tables of `converters.xnnpack_layout`, one decomposition pass
    (`_one_decomposition_partitioner`) in one trace, the edge passes without work left out
    (`converters.edge_lowering`), and ExecuTorch's IR verifier off (it re-checks every node's dtypes, 11 s
    of the shipped U-Net's lowering; the bundle's parity check runs the program itself). `exported` is one
    program or {method: program} (`programs`)."""
    try:
        if job.config.delegate != "xnnpack":
            return _to_edge(exported, _partitioner(job))
        try:
            return _to_edge(exported, _one_decomposition_partitioner())
        except RuntimeError as e:  # a kept node XNNPACK refused (ExecuTorch's own check): lower as it does
            if "was not decomposed or delegated" not in str(e):
                raise
        return _to_edge(exported, _partitioner(job))
    except SDXSError:
        raise
    except Exception as e:
        if job.config.delegate == "coreml":
            raise ExecuTorchConversionError(
                f"the Core ML delegate cannot lower {job.name} on this machine ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                "lower on macOS or use target coreml"
            ) from e
        raise _err(job, "lowering", e) from e


def _to_edge(exported, partitioner):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from converters.edge_lowering import fewer_traces
    from converters.xnnpack_layout import free_channels_last_reshapes, transient_indirection_buffers

    if not isinstance(partitioner, XnnpackPartitioner):
        return to_edge_transform_and_lower(exported, partitioner=[partitioner])
    with (
        free_channels_last_reshapes(),
        transient_indirection_buffers(),
        fewer_traces(exported, partitioner) as (ready, _),
    ):
        return to_edge_transform_and_lower(
            ready, partitioner=[partitioner], compile_config=EdgeCompileConfig(_check_ir_validity=False)
        )


def _one_decomposition_partitioner():
    """An `XnnpackPartitioner` with which `to_edge_transform_and_lower` traces the program through two
    decompositions instead of three (about 6 s each on the shipped U-Net).

    XNNPACK asks for some ops to be kept whole (linear, hardswish, bilinear upsampling, ...) when it
    takes each node of them (its `check_op_support`). Given that check, ExecuTorch decomposes with the
    ops kept, renames the nodes XNNPACK takes, decomposes the rest, and restores them; without it, it keeps
    every node of those ops in one decomposition. So where every such node of the program passes the
    check, the check is left out: the same nodes are kept and the .pte is the same, byte for byte. A node
    of those ops that a decomposition makes and XNNPACK then refuses stays outside the delegate
    undecomposed, which ExecuTorch's check after partitioning refuses: `lower` then lowers again the
    usual way."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class OneDecomposition(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            nodes = (n for n in ep.graph_module.graph.nodes if n.op == "call_function" and n.target in ops)
            return ops, (None if all(check(n) for n in nodes) else check)

    return OneDecomposition()


def _partitioner(job: ComponentJob):
    if job.config.delegate == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return XnnpackPartitioner()
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except Exception as e:  # the Core ML delegate's Python side is an optional part of executorch
        raise ExecuTorchConversionError(
            f"the ExecuTorch Core ML delegate is not usable here ({type(e).__name__}: {e}); lower on macOS or use target coreml"
        ) from e
    precision = ct.precision.FLOAT16 if job.config.precision == "fp16" else ct.precision.FLOAT32
    specs = CoreMLBackend.generate_compile_specs(minimum_deployment_target=ct.target.iOS17, compute_precision=precision)
    return CoreMLPartitioner(compile_specs=specs)


def delegation_report(edge, delegate: str = "xnnpack") -> dict:
    """Stage 3: operators inside delegates vs left to the portable kernels (q/dq plumbing not counted)."""
    ep = edge.exported_program()
    gm = ep.graph_module

    def op_name(n) -> str:
        name = n.target.name() if hasattr(n.target, "name") else getattr(n.target, "__name__", str(n.target))
        return name.replace("::", ".")

    outside = collections.Counter(
        op_name(n) for n in gm.graph.nodes if n.op == "call_function" and not _is_op(n, NOT_OPS + QDQ_OPS)
    )
    inside: collections.Counter = collections.Counter()
    partitions = 0
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target.startswith("lowered_module"):
            lowered = getattr(gm, n.target)
            partitions += 1
            inside.update(
                op_name(m)
                for m in lowered.original_module.graph_module.graph.nodes
                if m.op == "call_function" and not _is_op(m, NOT_OPS + QDQ_OPS)
            )
    total = sum(inside.values()) + sum(outside.values())
    return {
        "delegate": delegate,
        "partitions": partitions,
        "delegated_ops": sum(inside.values()),
        "non_delegated_ops": sum(outside.values()),
        "delegated_share": round(sum(inside.values()) / total, 4) if total else 1.0,
        "not_delegated": dict(outside.most_common()),
        "delegated": dict(inside.most_common()),
    }


def write(job: ComponentJob, edge) -> None:
    try:
        program = edge.to_executorch()
    except Exception as e:
        raise _err(job, "serialization", e) from e
    Path(job.out).write_bytes(program.buffer)


def runner_for(job: ComponentJob, path: Path) -> Runner:
    """Stage 4: the ExecuTorch Python runtime on `path` (XNNPACK is registered in the pip wheel)."""
    from executorch.runtime import Runtime

    from sdxs_edge.quiet import filtered_stderr
    from sdxs_edge.sizes import size_of

    sizes = [tuple(sz) for sz in job.config.sizes] or [None]
    try:
        with filtered_stderr():  # ExecuTorch's CPU probe logs on every method load
            program = Runtime.get().load_program(str(path))
            methods = {sz: program.load_method(method_name(job, sz) if sz else "forward") for sz in sizes}
    except Exception as e:
        raise _err(job, "loading in the ExecuTorch runtime", e) from e
    dtypes = [s.dtype for s in job.inputs]
    four_d = next((i for i, s in enumerate(job.inputs) if len(s.shape) == 4), None)

    def run(sample):
        size = sizes[0]
        if four_d is not None and len(sizes) > 1:
            size = size_of(np.shape(sample[four_d]), job.inputs[four_d].shape, sizes[0])
        return _numpy(methods[size].execute(_tensors([np.asarray(x, d) for x, d in zip(sample, dtypes)])))

    return run


def convert_component(job: ComponentJob) -> ComponentResult:
    """export -> (quantize) -> lower -> delegation report -> .pte -> runtime runner, with node histories
    shared between passes (`converters.provenance`)."""
    from converters.provenance import shared_provenance

    with shared_provenance():
        return _convert_component(job)


def _convert_component(job: ComponentJob) -> ComponentResult:
    exported, rewrites = export(job)
    report: dict = {"xnnpack_rewrites": rewrites} if rewrites else {}
    if job.config.precision == "int8":
        exported, report["int8"] = quantize(job, exported)
    methods = programs(job, exported)
    if len(methods) > 1:
        report["methods"] = sorted(methods)
    edge = lower(job, methods)
    report["delegation"] = delegation_report(edge, job.config.delegate)
    write(job, edge)
    if job.config.delegate != "xnnpack":
        structural = {
            "why": "the Core ML delegate runs only on Apple devices; the Linux ExecuTorch runtime has no CoreMLBackend",
            "delegated_share": report["delegation"]["delegated_share"],
            "partitions": report["delegation"]["partitions"],
        }
        return ComponentResult(job.out.name, report, None, structural=structural)
    return ComponentResult(job.out.name, report, runner_for(job, job.out))
