"""Reshapes that cost nothing in XNNPACK's channels-last layout, lowered without the copies ExecuTorch adds.

Inside the XNNPACK delegate, convolution outputs live as (N, H, W, C) while the graph's shapes stay
(N, C, H, W). ExecuTorch's `ChannelsLastTaggedReshapePass` keeps a tensor channels-last through
layout-agnostic ops, but it sends every `view_copy` back to channels-first first: a transpose before the
view and usually another after it, each a full copy of the tensor. Two kinds of view need neither:

- a 4-D view that keeps N and C and only regroups the spatial positions, (N, C, H, W) -> (N, C, H', W')
  with H W = H' W': in (N, H, W, C) memory it is the same bytes, so it is done channels-last;
- channels to width, (N, 2C, H, W) -> view (N, 2, C, H, W) -> permute (0, 2, 3, 4, 1) -> (N, C, H, 2W),
  which interleaves the two channel halves column by column: in (N, H, W, 2C) memory the two halves of
  each pixel already sit next to each other as two pixels of (N, H, 2W, C), so the three ops fold into
  one channels-last reshape.

`SubpixelUpsampleConv` (converters.xnnpack_rewrites) interleaves its four output phases with exactly these
two, so with this pass its upsampling moves no more bytes than the slices and concatenations themselves.

`transient_indirection_buffers()` sets XNNPACK's transient-indirection flag on every convolution of the
serialized graph. An XNNPACK convolution (IGEMM) reads its input through a table of row pointers, one
per output pixel and kernel tap: by default each convolution keeps its own table for the life of the
program, built once. For the TAESD decoder at 512x512 that is 8 bytes x 9 taps x 262,144 pixels = 19 MB
per 3x3 convolution at full resolution, and the tables of all its convolutions stay resident after the
first image. With the flag the table is built per call in XNNPACK's workspace, which the operators share:
the decoder's peak resident memory in the native runner (int8, 512x512, 2 threads) went from 187 MB
to 77 MB, at the same speed (175.7 ms and 174.6 ms per call, medians of 3).

`free_channels_last_reshapes()` swaps the pass for `ChannelsLastFreeReshapes` in the pass list of
ExecuTorch's XNNPACK preprocessing while lowering. It is written against executorch 1.5.1 (pinned); the
tests check that the folded graph runs and matches PyTorch.

The same pass manager also skips each XNNPACK pass that has nothing to act on in the graph as it stands
(`_has_work`): every pass re-traces the whole graph with fake tensors even when it changes nothing, and
eight of the seventeen look for ops the project's models do not hold (batch norm, PReLU, padding, max pooling,
1-D convolution, the decomposed bilinear upsampling and attention patterns). Skipping them leaves the
.pte byte for byte the same (tests/test_converters.py) and saves 0.5-2 s per pass per delegate partition.
Of the passes that run, each ends in that re-trace whether it changed anything or not; it is done only
when the pass changed a node (`_retracing_on_change`): in the shipped U-Net's int8 lowering, 2 of 27 pass
runs (nine passes over three delegate partitions).
"""

from __future__ import annotations

import contextlib
import functools

from executorch.backends.xnnpack._passes.channels_last_tagged_reshape_pass import ChannelsLastTaggedReshapePass
from executorch.backends.xnnpack.utils.quant_utils import (
    is_dequant,
    is_quant,
    is_tagged_as_implicit_q_dq,
    tag_as_implicit_q_dq,
)
from executorch.exir.dialects._ops import ops as exir_ops
from executorch.exir.program._program import _transform

VIEW = exir_ops.edge.aten.view_copy.default
PERMUTE = exir_ops.edge.aten.permute_copy.default
CHANNELS_TO_WIDTH = "sdxs_channels_to_width"  # node meta flag of a folded channels-to-width view


def _through_qdq(node):
    """The producer of `node` when `node` is the dequantize of a quantize (the int8 wrapping of an op)."""
    if is_dequant(node) and node.args and is_quant(node.args[0]):
        return node.args[0].args[0]
    return node


def fold_channels_to_width(graph_module) -> int:
    """Folds each view (N, 2, C, H, W) -> permute (0, 2, 3, 4, 1) -> view (N, C, H, 2W) into one flagged
    view of the (N, 2C, H, W) input; returns how many were folded. The flagged view is only right in
    channels-last memory: `ChannelsLastFreeReshapes` always gives it a channels-last input."""
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target != VIEW or len(node.args[1]) != 4:
            continue
        perm = _through_qdq(node.args[0])
        if perm.op != "call_function" or perm.target != PERMUTE or list(perm.args[1]) != [0, 2, 3, 4, 1]:
            continue
        view5 = _through_qdq(perm.args[0])
        if view5.op != "call_function" or view5.target != VIEW or len(view5.args[1]) != 5:
            continue
        n, two, c, h, w = view5.args[1]
        if two != 2 or list(node.args[1]) != [n, c, h, 2 * w]:
            continue
        node.args = (view5.args[0], node.args[1])
        node.meta[CHANNELS_TO_WIDTH] = True
        if is_tagged_as_implicit_q_dq(node.args[0]):
            # int8 in: keep it int8 out. The partitioner left the quantize after the last view explicit (a
            # float -> int8 conversion), the permute before it having run in float.
            for user in node.users:
                if is_quant(user):
                    tag_as_implicit_q_dq(user)
        folded += 1
    if folded:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return folded


class ChannelsLastFreeReshapes(ChannelsLastTaggedReshapePass):
    """ExecuTorch's channels-last pass, with the two reshapes of the module docstring done channels-last."""

    def _keeps_batch_and_channels(self, node) -> bool:
        src = node.args[0]
        if "val" not in src.meta or "val" not in node.meta:
            return False
        a, b = tuple(src.meta["val"].shape), tuple(node.meta["val"].shape)
        return len(a) == 4 and len(b) == 4 and a[:2] == b[:2]

    def requires_nhwc_input(self, node) -> bool:
        if node.op == "call_function" and node.target == VIEW:
            if node.meta.get(CHANNELS_TO_WIDTH):
                return True
            # Only where the input is channels-last already: elsewhere the plain view is as cheap.
            if self._keeps_batch_and_channels(node) and self.is_nhwc_node(node.args[0]):
                return True
        return super().requires_nhwc_input(node)

    def call(self, graph_module):
        fold_channels_to_width(graph_module)
        return super().call(graph_module)


def _op_name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _op_names(graph_module) -> set[str]:
    return {_op_name(n) for n in graph_module.graph.nodes if n.op == "call_function"}


def _has_work(pass_, graph_module) -> bool:
    """False only for a pass of `_triggers()` that finds nothing in `graph_module`: none of its ops, no
    pattern whose ops are all there (a `SubgraphMatcher` needs every one), or its predicate false. Such
    a pass cannot change the graph. Every other pass runs."""
    trigger = _triggers().get(pass_)
    if trigger is None:
        return True
    if callable(trigger):
        return trigger(graph_module)
    names = _op_names(graph_module)
    if isinstance(trigger, tuple):
        return any(pattern <= names for pattern in trigger)
    return bool(names & trigger)


def _has_conv1d(graph_module) -> bool:
    """A convolution with a 3-D kernel (through a weight dequantize): what `Conv1dUnsqueezePass` rewrites."""
    from executorch.backends.transforms import get_shape

    for n in graph_module.graph.nodes:
        if n.op == "call_function" and _op_name(n) == "aten.convolution.default":
            kernel = n.args[1]
            if is_dequant(kernel) and not is_quant(kernel.args[0]):
                kernel = kernel.args[0]
            if len(get_shape(kernel)) == 3:
                return True
    return False


@functools.cache
def _triggers() -> dict:
    """pass -> what it acts on: a set of op names (any present), a tuple of the op-name sets of the
    patterns it matches, or a predicate on the graph. Read off each pass's `call` in executorch 1.5.1."""
    from executorch.backends.transforms.remove_getitem_op import RemoveGetItemPass
    from executorch.backends.xnnpack._passes.conv1d_unsqueeze_pass import Conv1dUnsqueezePass
    from executorch.backends.xnnpack._passes.convert_to_sdpa import ConvertToSDPAPass
    from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import ConvertToUpsampleBilinear2d
    from executorch.backends.xnnpack._passes.decompose_batch_norm import DecomposeBatchNorm
    from executorch.backends.xnnpack._passes.fuse_batch_norm import FuseBatchNormPass
    from executorch.backends.xnnpack._passes.insert_pad_qdq import InsertPadQDQPass
    from executorch.backends.xnnpack._passes.prelu_reshape_pass import PReLUReshapePass
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    batch_norm = {"aten.native_batch_norm.default", "aten._native_batch_norm_legit_no_training.default"}
    return {
        FuseBatchNormPass: batch_norm,
        DecomposeBatchNorm: batch_norm,
        PReLUReshapePass: {"aten._prelu_kernel.default"},
        InsertPadQDQPass: {"aten.constant_pad_nd.default"},
        RemoveGetItemPass: {"aten.max_pool2d_with_indices.default", "aten.max.dim"},
        Conv1dUnsqueezePass: _has_conv1d,
        ConvertToUpsampleBilinear2d: tuple(frozenset(_op_names(p)) for p in bilinear_2d.get_graphs()),
        ConvertToSDPAPass: tuple(frozenset(_op_names(p)) for p in sdpa.get_graphs()),
    }


def _snapshot(graph_module) -> list:
    """Each node with its op, target, args, kwargs and metadata values: what a pass changes when it acts."""
    return [(n, n.op, n.target, n.args, n.kwargs, dict(n.meta)) for n in graph_module.graph.nodes]


def _unchanged(before: list, after: list) -> bool:
    """Whether the same nodes hold the same objects (a pass that edits a node assigns new ones)."""

    def same(a, b) -> bool:
        return (
            a[0] is b[0]
            and a[1] == b[1]
            and all(x is y for x, y in zip(a[2:5], b[2:5]))
            and (a[5].keys() == b[5].keys() and all(a[5][k] is b[5][k] for k in a[5]))
        )

    return len(before) == len(after) and all(same(a, b) for a, b in zip(before, after))


@functools.cache
def _retracing_on_change(pass_):
    """`pass_` with its closing re-trace (`ExportPass.call`, which runs every node again on fake tensors
    to renew the metadata) done only when the pass changed a node; when it changed none, the graph comes
    back as it was, as the re-trace would return it. Most XNNPACK passes re-trace unconditionally."""
    from executorch.exir.pass_base import ExportPass, PassResult

    class Retrace(ExportPass):
        def call(self, graph_module):
            if _unchanged(self._before, _snapshot(graph_module)):
                return PassResult(graph_module, False)
            return super().call(graph_module)

    class OnChange(pass_, Retrace):
        def call(self, graph_module):
            self._before = _snapshot(graph_module)
            try:
                return super().call(graph_module)
            finally:
                del self._before

    OnChange.__name__ = OnChange.__qualname__ = pass_.__name__
    return OnChange


@contextlib.contextmanager
def free_channels_last_reshapes():
    """While active, ExecuTorch's XNNPACK preprocessing runs `ChannelsLastFreeReshapes` in place of its
    own channels-last pass and skips the passes with nothing to act on (`_has_work`); wrap
    `to_edge_transform_and_lower` with it."""
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.backends.xnnpack._passes import XNNPACKPass
    from executorch.exir.pass_base import ExportPass

    base = xnnpack_preprocess.XNNPACKPassManager

    class PassManager(base):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            self.passes = [ChannelsLastFreeReshapes if p is ChannelsLastTaggedReshapePass else p for p in self.passes]

        def transform(self):
            """`XNNPACKPassManager.transform` (executorch 1.5.1), less the passes without work, each
            re-tracing only when it changed the graph (`_retracing_on_change`)."""
            ep = self.exported_program
            for pass_ in self.passes:
                if not _has_work(pass_, ep.graph_module):
                    continue
                pass_ = _retracing_on_change(pass_)
                if issubclass(pass_, XNNPACKPass):
                    ep = _transform(ep, pass_(ep))
                elif issubclass(pass_, ExportPass):
                    ep = _transform(ep, pass_())
                else:
                    raise RuntimeError(f"expected an ExportPass, got {pass_!r}")
            return ep

    xnnpack_preprocess.XNNPACKPassManager = PassManager
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = base


def flag_transient_indirection(graph) -> int:
    """Sets `XNN_FLAG_TRANSIENT_INDIRECTION_BUFFER` on every convolution and depthwise convolution node
    of a serialized XNNPACK graph (`XNNGraph`); returns how many nodes carry it."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNConv2d, XNNDepthwiseConv2d
    from executorch.backends.xnnpack.utils.xnnpack_constants import XNN_FLAG_TRANSIENT_INDIRECTION_BUFFER

    flagged = 0
    for node in graph.xnodes:
        if isinstance(node.xnode_union, (XNNConv2d, XNNDepthwiseConv2d)):
            node.xnode_union.flags |= XNN_FLAG_TRANSIENT_INDIRECTION_BUFFER
            flagged += 1
    return flagged


@contextlib.contextmanager
def transient_indirection_buffers():
    """While active, ExecuTorch's XNNPACK preprocessing serializes every convolution with a per-call
    indirection table (`flag_transient_indirection`, module docstring); wrap `to_edge_transform_and_lower`
    with it. Yields a list that receives the number of convolutions flagged in each delegate partition."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    base = xnnpack_preprocess.serialize_xnnpack_binary
    flagged: list[int] = []

    def serialize(graph, constant_data):
        flagged.append(flag_transient_indirection(graph))
        return base(graph, constant_data)

    xnnpack_preprocess.serialize_xnnpack_binary = serialize
    try:
        yield flagged
    finally:
        xnnpack_preprocess.serialize_xnnpack_binary = base
