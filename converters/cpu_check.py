"""The conversion check on other CPU classes: a written bundle's components run as each class's CPU runs
them, on the parity samples the host check used, against the same PyTorch reference and floors.

    host class             the figures of the host check itself ("native")
    x86-64-avx2            `qemu-x86_64-static -cpu Haswell` running this Python on the bundle's runtime
                           (`python -m converters.cpu_check`): onnxruntime and ExecuTorch pick their AVX2
                           kernels from the CPUID qemu reports
    arm64                  ExecuTorch bundles: the `arm64-emulated` runtime (the aarch64 runner under
                           qemu-aarch64-static, Cortex-A76); no aarch64 onnxruntime runs here, so ONNX
                           bundles cannot be checked as arm64

Every record goes to the manifest's `parity.cpu_classes`; a class below a floor fails the conversion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from converters.parity import check_component, component_figures
from sdxs_edge import cpu
from sdxs_edge.errors import SDXSError

RUNTIME_OF_TARGET = {"onnx": "onnxruntime", "executorch": "executorch"}
EMULATED_TIMEOUT_S = 1800  # one emulated run of every component on the parity samples (the shipped model: minutes)


def check_classes(
    bundle: Path, classes: Sequence[str], host_figures: dict, inputs: dict, reference: dict, tolerance, label: str
) -> list[dict]:
    """One record per class: how it was run and its per-component figures; raises ParityError when a
    class falls below a floor (the message names the class).

    Args:
        bundle: the written bundle (before it is moved into place).
        classes: CPU class names (`sdxs_edge.cpu.CLASSES`).
        host_figures: the host check's per-component records.
        inputs / reference: the parity samples per component and their PyTorch outputs.
    """
    target = json.loads((bundle / "manifest.json").read_text())["target"]
    records = []
    for cls in classes:
        prefix = cpu.emulator(cls)  # raises for a class that cannot be emulated here
        if not prefix:
            records.append({"class": cls, "how": "native", "passed": True, "components": host_figures})
            continue
        how = " ".join([Path(prefix[0]).name, *prefix[1:]])
        outputs = _emulated_outputs(bundle, target, cls, prefix, {n: inputs[n] for n in host_figures})
        comps = {}
        for name, outs in outputs.items():
            figs = component_figures(_replay(outs), inputs[name], reference[name])
            comps[name] = check_component(name, figs, tolerance, f"{label} as {cls} ({how})")
        records.append({"class": cls, "how": how, "passed": True, "components": comps})
    return records


def _replay(outputs: list):
    """A runner that hands back the emulated process's outputs, one sample per call, in order."""
    it = iter(outputs)
    return lambda _sample: next(it)


def _emulated_outputs(bundle: Path, target: str, cls: str, prefix: list[str], inputs: dict) -> dict[str, list]:
    if cls == "arm64":
        if target != "executorch":
            raise cpu.CpuClassError(
                f"arm64 checks run ExecuTorch bundles (the aarch64 runner); a {target} bundle cannot be checked as arm64 here"
            )
        from runtimes.arm64_emulated import Arm64EmulatedSession

        with Arm64EmulatedSession(bundle, verify=False) as s:
            return run_components(s, inputs)
    with tempfile.TemporaryDirectory(prefix="sdxs-cpu-check-") as tmp:
        np.savez(Path(tmp) / "inputs.npz", **_flatten(inputs))
        cmd = [*prefix, sys.executable, "-m", "converters.cpu_check", str(bundle), RUNTIME_OF_TARGET[target], tmp]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=EMULATED_TIMEOUT_S, env=env)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and cpu.QEMU_NOISE not in ln]
            raise SDXSError(
                f"the {cls} check ({' '.join(prefix)}) failed: {lines[-1] if lines else f'exit code {proc.returncode}'}"
            )
        with np.load(Path(tmp) / "outputs.npz") as z:
            return _unflatten(dict(z))


def run_components(session, inputs: dict[str, list[tuple[np.ndarray, ...]]]) -> dict[str, list]:
    """Each component of an open session on its parity samples: {name: [outputs per sample]}, outputs a
    tuple of arrays in the manifest's order."""
    out = {}
    for name, samples in inputs.items():
        names = [s.name for s in session.specs[name].inputs]
        order = [s.name for s in session.specs[name].outputs]
        out[name] = [tuple(session.run(name, dict(zip(names, x)))[o] for o in order) for x in samples]
    return out


def _flatten(tree: dict[str, list[tuple[np.ndarray, ...]]]) -> dict[str, np.ndarray]:
    return {
        f"{name}/{i}/{j}": a for name, samples in tree.items() for i, x in enumerate(samples) for j, a in enumerate(x)
    }


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, list]:
    tree: dict[str, dict[int, dict[int, np.ndarray]]] = {}
    for key, a in flat.items():
        name, i, j = key.split("/")
        tree.setdefault(name, {}).setdefault(int(i), {})[int(j)] = a
    return {
        name: [tuple(x[j] for j in sorted(x)) for _, x in sorted(samples.items())] for name, samples in tree.items()
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m converters.cpu_check BUNDLE RUNTIME DIR`: run the components on DIR/inputs.npz and write
    DIR/outputs.npz (the emulated side of `check_classes`; imports numpy and the runtime only)."""
    import runtimes

    bundle, runtime, folder = (argv if argv is not None else sys.argv[1:])[:3]
    with np.load(Path(folder) / "inputs.npz") as z:
        inputs = _unflatten(dict(z))
    with runtimes.load(bundle, runtime, verify=False) as s:
        outputs = run_components(s, inputs)
    np.savez(Path(folder) / "outputs.npz", **_flatten(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
