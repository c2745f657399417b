"""ExecuTorch's lowering to the edge dialect with fewer whole-program traces, the .pte byte for byte the same.

`to_edge_transform_and_lower` (executorch 1.5.1, pinned) re-traces the whole program many times before
the delegate sees it. Two kinds of trace compute nothing for the programs this project lowers:

- **Decomposition.** It traces the program once to functionalize it (`run_decompositions({})`) and once
  more to decompose it with the default table less the ops the partitioner keeps whole. Where the
  partitioner gives no per-node check (`ops_to_not_decompose` returns `None` for it, as
  `converters.to_executorch._one_decomposition_partitioner` does), that second table is known up front,
  so `fewer_traces` decomposes each program with it in one trace (a trace functionalizes as it
  decomposes) and answers the functionalizing call on that program with the program itself. ExecuTorch
  then finds no op of the table left and skips its second trace, as it does for any such program.
- **Edge passes with nothing to act on.** Each of ExecuTorch's ATen-to-edge passes re-traces the whole
  program through fake tensors. Five of them rewrite only ops the project's programs seldom hold: the
  `t` transpose, view ops left after the view-copy pass, Python scalars given for tensor arguments,
  symbolic sizes, and ops that take a memory format. `fewer_traces` runs each of them only when its op is
  in the graph (`_edge_triggers`).

On the shipped U-Net's int8 lowering (one process, AVX-512 VNNI host) the two together took the lowering
from about 47 s to about 33 s. tests/test_converters.py lowers a model with and without them and compares
the program bytes.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator


def _calls(graph_module) -> Iterator:
    return (n for n in graph_module.graph.nodes if n.op == "call_function")


def _has_transpose(graph_module) -> bool:
    import torch

    return any(n.target == torch.ops.aten.t.default for n in _calls(graph_module))


def _has_view(graph_module) -> bool:
    """A view op (or a target without a schema, which may be one): what the broken-ops pass replaces."""
    for n in _calls(graph_module):
        if n.target is operator.getitem:
            continue
        if not hasattr(n.target, "is_view") or n.target.is_view:
            return True
    return False


def _has_scalar_for_tensor(graph_module) -> bool:
    """A Python number given where the op's schema takes a tensor: what `ScalarToTensorPass` converts."""
    import torch
    from executorch.exir.pass_base import map_args

    found: list[bool] = []

    def probe(value, arg):
        if isinstance(value, (float, int, bool)) and isinstance(arg.type, torch.TensorType):
            found.append(True)
        return value

    for n in _calls(graph_module):
        if n.target is operator.getitem:
            continue
        if not hasattr(n.target, "_schema"):
            return True
        map_args(n.target, probe, tuple(n.args), dict(n.kwargs))
        if found:
            return True
    return False


def _has_symbol(graph_module) -> bool:
    import torch

    return any(
        isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)) for n in graph_module.graph.nodes
    )


def _has_memory_format_op(graph_module) -> bool:
    from executorch.exir.passes.dim_order_ops_registry import DimOrderOpsMap

    return any(n.target in DimOrderOpsMap for n in _calls(graph_module))


@functools.cache
def _edge_triggers() -> dict:
    """ATen-to-edge pass -> predicate on the graph: false only where the pass finds nothing to rewrite.
    Read off each pass's `call_operator` in executorch 1.5.1."""
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsPass
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import ReplaceBrokenOpsWithFunctionalOpsPass
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass
    from executorch.exir.passes.sym_to_tensor_pass import SymToTensorPass

    return {
        NormalizeTransposePass: _has_transpose,
        ReplaceBrokenOpsWithFunctionalOpsPass: _has_view,
        ScalarToTensorPass: _has_scalar_for_tensor,
        SymToTensorPass: _has_symbol,
        MemoryFormatOpsPass: _has_memory_format_op,
    }


def _when_it_has_work(pass_, skipped: list[str]):
    """`pass_` (a pass or ExecuTorch's wrapper of one), run only where its trigger finds work; each skip is
    named in `skipped`."""
    from torch.fx.passes.infra.pass_base import PassResult

    inner = getattr(pass_, "__wrapped__", pass_)
    trigger = _edge_triggers().get(type(inner))
    if trigger is None:
        return pass_

    def run(graph_module):
        if trigger(graph_module):
            return pass_(graph_module)
        skipped.append(type(inner).__name__)
        return PassResult(graph_module, False)

    return run


def decomposed(programs: dict, partitioner) -> dict:
    """Each program decomposed in one trace, where `partitioner` keeps ops whole without a per-node check
    and has no transform of its own to run before decompositions; the others as they were."""
    from executorch.exir.backend.partitioner import Partitioner
    from executorch.exir.program._program import _default_decomposition_table

    if type(partitioner).transform_for_pre_decomposition is not Partitioner.transform_for_pre_decomposition:
        return dict(programs)
    out = {}
    for name, program in programs.items():
        keep, check = partitioner.ops_to_not_decompose(program)
        if check is None:
            table = _default_decomposition_table()
            for op in keep:
                table.pop(op, None)
            program = program.run_decompositions(table)
        out[name] = program
    return out


@contextlib.contextmanager
def fewer_traces(programs, partitioner) -> Iterator[tuple[dict, list[str]]]:
    """While active, `to_edge_transform_and_lower` skips the traces of the module docstring. Yields (the
    programs to hand it, decomposed where that is known up front; the names of the edge passes skipped)."""
    from executorch.exir.program import _program
    from torch.export import ExportedProgram

    given = programs if isinstance(programs, dict) else {"forward": programs}
    ready = decomposed(given, partitioner)
    done = {id(p) for name, p in ready.items() if p is not given[name]}
    skipped: list[str] = []
    run_decompositions, edge_passes = ExportedProgram.run_decompositions, _program._get_aten_to_edge_passes
    memory_format_pass = _program.MemoryFormatOpsPass

    def functionalized(self, decomp_table=None, *args, **kwargs):
        if id(self) in done and decomp_table == {} and not args and not kwargs:
            return self  # decomposed in one trace above, which functionalized it
        return run_decompositions(self, decomp_table, *args, **kwargs)

    def passes(config):
        pre, post = edge_passes(config)
        return [_when_it_has_work(p, skipped) for p in pre], post

    ExportedProgram.run_decompositions = functionalized
    _program._get_aten_to_edge_passes = passes
    _program.MemoryFormatOpsPass = lambda: _when_it_has_work(memory_format_pass(), skipped)
    try:
        yield ready, skipped
    finally:
        ExportedProgram.run_decompositions = run_decompositions
        _program._get_aten_to_edge_passes = edge_passes
        _program.MemoryFormatOpsPass = memory_format_pass
