"""torch.fx node provenance, shared instead of copied: the same history at a fraction of the cost.

Every pass that makes a node from another records where it came from: the new node's
`meta["from_node"]` holds a `NodeSource` of its origin, which carries `copy.deepcopy` of the origin's own
`from_node` list (torch/fx/traceback.py). Each pass thus copies every node's whole history again, and a
conversion runs dozens of passes (export, quantization, the edge dialect's and XNNPACK's passes), so
the copies grow with the square of the pass count: a third of the shipped U-Net's ExecuTorch int8
lowering went into them. `NodeSource` objects are never changed once made, so a new node can hold the
origin's list entries themselves: `shared_provenance` makes that copy a shallow one while it is active.
The histories read the same (same names, passes and order) and the programs written are byte for byte
the same (`tests/test_converters.py`).
"""

from __future__ import annotations

import contextlib
import copy
import types


class _ShallowHistoryCopy(types.ModuleType):
    """Stands in for the `copy` module inside torch.fx.traceback: `deepcopy` of a list of `NodeSource`
    (a node's history) is a new list of the same entries; anything else is copied as before."""

    def __init__(self, node_source: type):
        super().__init__("copy")
        self._node_source = node_source

    def __getattr__(self, name: str):
        return getattr(copy, name)

    def deepcopy(self, x, memo=None):
        if isinstance(x, list) and all(isinstance(e, self._node_source) for e in x):
            return list(x)
        return copy.deepcopy(x, memo)


@contextlib.contextmanager
def shared_provenance():
    """While active, torch.fx shares node histories between a node and the nodes made from it."""
    from torch.fx import traceback as fx_traceback

    if getattr(fx_traceback, "copy", None) is not copy or not hasattr(fx_traceback, "NodeSource"):
        yield  # another torch layout (or already active): nothing to share
        return
    fx_traceback.copy = _ShallowHistoryCopy(fx_traceback.NodeSource)
    try:
        yield
    finally:
        fx_traceback.copy = copy
