"""ExecuTorch bundles on an emulated Arm64 CPU: the native runner under qemu user-mode emulation.

Each component call writes its inputs as SDXT files (`runtimes.native_io`) to a temporary folder and
runs

    qemu-aarch64-static -cpu cortex-a76 -L /usr/aarch64-linux-gnu build/arm64/sdxs_runner \
        --model <bundle>/<component>.pte --io <tmp> --method forward

with LD_LIBRARY_PATH at the aarch64 ExecuTorch libraries extracted from the executorch wheel, then
reads the outputs back. The same Arm64 machine code a phone runs executes here (XNNPACK picks its
kernels from the CPU features qemu reports for a Cortex-A76, the big core of many phones), so
numerical parity measured this way carries to devices; timings do not: emulation is about 150x
slower than the real core. `make arm64-runner`
(runtimes/native/build_arm64.sh) builds everything this needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from runtimes.native_io import RunnerError, failure_line, parse_timing, read_outputs, write_inputs
from sdxs_edge import sizes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNNER = REPO / "build" / "arm64" / "sdxs_runner"
DEFAULT_LIB_DIR = REPO / "build" / "arm64" / "executorch" / "lib"
DEFAULT_SYSROOT = Path("/usr/aarch64-linux-gnu")
BUILD_HINT = "run `make arm64-runner` (runtimes/native/build_arm64.sh)"


class Arm64EmulatedSession(Session):
    """A bundle's .pte programs run by the aarch64 sdxs_runner under qemu-aarch64-static.

    Args:
        bundle: an "executorch" target bundle.
        runner: the aarch64 Linux runner (default build/arm64/sdxs_runner).
        lib_dir: folder with the aarch64 libexecutorch*.so (default build/arm64/executorch/lib).
        qemu: the qemu user-mode emulator binary, a name on PATH or a path.
        cpu: the CPU model qemu emulates (`qemu-aarch64-static -cpu help` lists them); cortex-a76 has
            the fp16 arithmetic and dot-product instructions XNNPACK picks on recent phones.
        sysroot: the aarch64 glibc root qemu resolves the dynamic loader in (Debian's cross toolchain).
        method: the program method to run.
        timeout_s: limit for one component run, seconds.
        verify: check every component file's sha256 against the manifest.
    """

    name = "arm64-emulated"
    cpu_class = "arm64"
    targets = ("executorch",)

    def __init__(
        self,
        bundle: str | Path,
        *,
        runner: str | Path | None = None,
        lib_dir: str | Path | None = None,
        qemu: str = "qemu-aarch64-static",
        cpu: str = "cortex-a76",
        sysroot: str | Path = DEFAULT_SYSROOT,
        method: str = "forward",
        timeout_s: float = 600.0,
        verify: bool = True,
    ):
        super().__init__(bundle, verify=verify)
        qemu_path = shutil.which(qemu)
        if qemu_path is None:
            raise BackendMissingError(f"{qemu} not found (apt-get install qemu-user-static, or {BUILD_HINT})")
        self.runner = Path(runner) if runner is not None else DEFAULT_RUNNER
        self.lib_dir = Path(lib_dir) if lib_dir is not None else DEFAULT_LIB_DIR
        self.sysroot = Path(sysroot)
        if not self.runner.is_file():
            raise BackendMissingError(f"the arm64 runner {self.runner} is not built; {BUILD_HINT}")
        if not (self.lib_dir / "libexecutorch.so").is_file():
            raise BackendMissingError(f"the aarch64 ExecuTorch libraries are missing from {self.lib_dir}; {BUILD_HINT}")
        if not (self.sysroot / "lib" / "ld-linux-aarch64.so.1").exists():
            raise BackendMissingError(
                f"no aarch64 glibc under {self.sysroot} (apt-get install g++-aarch64-linux-gnu, or {BUILD_HINT})"
            )
        self.command = [qemu_path, "-cpu", cpu, "-L", str(self.sysroot), str(self.runner)]
        self.method = method
        self.timeout_s = float(timeout_s)
        # The runner's own measurements per component (load_ms, run_ms), emulated time.
        self.native_timings: dict[str, dict] = {}

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        what = f"{component} on {self.name}"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
        with tempfile.TemporaryDirectory(prefix=f"sdxs-{component}-") as io:
            write_inputs(io, [inputs[s.name] for s in spec.inputs])
            method = sizes.method_name(self.sizes, self.shape_of(component, inputs)[1], self.method)
            cmd = [*self.command, "--model", str(self.bundle / spec.file), "--io", io, "--method", method]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise RunnerError(
                    f"{what}: the emulated runner took over {self.timeout_s:g} s (pass timeout_s= to allow more)"
                ) from None
            if proc.returncode != 0:
                raise RunnerError(f"{what}: {failure_line(proc.stderr, proc.returncode)}")
            self.native_timings[component] = parse_timing(proc.stdout)
            outputs = read_outputs(io, len(spec.outputs), what)
        return {s.name: a for s, a in zip(spec.outputs, outputs)}
