"""ExecuTorch bundles through the native runner on this machine: one long-lived process, no PyTorch.

The `executorch` runtime runs the .pte programs through ExecuTorch's Python bindings, which link
libtorch: that process carries about 360 MB of imports before any weights. This runtime runs the same
programs the way an app embeds ExecuTorch: `build/host/sdxs_runner` (runtimes/native/runner.cpp, built
by `make host-runner` against the executorch wheel's runtime libraries) started once with

    sdxs_runner --serve --program text_encoder=<bundle>/text_encoder.pte --program unet=... \
        --program decoder=... --threads N --workspace-sharing global

holds every program loaded, and answers one `run NAME DIR` line per component call: the Python side
writes the inputs as SDXT files (`runtimes.native_io`) to a private folder (in /dev/shm when there is
one, so the files never touch a disk), the runner executes and writes the outputs back. The Python
side is numpy only (tokenizer, noise, the one-step update). With "global" workspace sharing the three
programs share one XNNPACK activation arena, since they run one at a time.

`runner_timings` keeps the runner's own figures per component (`run_ms` of `Method::execute`) next to
the Session's timings (which include the file round trip); `peak_rss_mb()` is the runner's
high-water mark (VmHWM) as of its last reply.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from runtimes.native_io import RunnerError, failure_line, read_outputs, write_inputs
from sdxs_edge import sizes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNNER = REPO / "build" / "host" / "sdxs_runner"
BUILD_HINT = "run `make host-runner` (runtimes/native/build_host.sh)"
WORKSPACE_SHARING = ("disabled", "per-model", "global")
READY, TIMING, ERROR = "SDXS_READY ", "SDXS_TIMING ", "SDXS_ERROR "


class NativeSession(Session):
    """A bundle's .pte programs held by one `sdxs_runner --serve` process on this machine.

    Args:
        bundle: an "executorch" target bundle (XNNPACK-delegated programs; Core ML ones need an Apple
            device).
        runner: the host runner (default build/host/sdxs_runner).
        threads: ExecuTorch threadpool size (XNNPACK runs on it); default one per core.
        workspace_sharing: XNNPACK activation arenas: "global" (one for all programs, the default),
            "per-model" or "disabled".
        method: the program method to run ("<method>_<W>x<H>" at the other sizes of a bundle of several:
            `sdxs_edge.sizes.method_name`, which the runner loads on first use).
        timeout_s: limit for loading the programs, and for one component run, seconds.
        verify: check every component file's sha256 against the manifest.
    """

    name = "executorch-native"
    targets = ("executorch",)

    def __init__(
        self,
        bundle: str | Path,
        *,
        runner: str | Path | None = None,
        threads: int | None = None,
        workspace_sharing: str = "global",
        method: str = "forward",
        timeout_s: float = 600.0,
        verify: bool = True,
    ):
        self._proc = None
        self._io = None
        super().__init__(bundle, verify=verify)
        delegate = self.manifest.get("conversion", {}).get("config", {}).get("delegate", "xnnpack")
        if delegate != "xnnpack":
            raise BackendMissingError(
                f"{self.bundle} holds {delegate} programs; the host runner executes XNNPACK ones (run Core ML bundles on an Apple device)"
            )
        self.runner = Path(runner) if runner is not None else DEFAULT_RUNNER
        if not self.runner.is_file():
            raise BackendMissingError(f"the host runner {self.runner} is not built; {BUILD_HINT}")
        if workspace_sharing not in WORKSPACE_SHARING:
            raise ValueError(
                f"workspace_sharing must be one of {', '.join(WORKSPACE_SHARING)}; got {workspace_sharing!r}"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.timeout_s = float(timeout_s)
        self.method = method
        self.runner_timings: dict[str, dict] = {}
        cmd = [str(self.runner), "--serve", "--method", method, "--workspace-sharing", workspace_sharing]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        for comp, spec in self.specs.items():
            cmd += ["--program", f"{comp}={self.bundle / spec.file}"]
        shm = Path("/dev/shm")
        self._io = Path(
            tempfile.mkdtemp(prefix="sdxs-native-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
        )
        # ExecuTorch logs to stderr: a file, so a chatty runner can never block on a full pipe.
        self._stderr = open(self._io / "stderr.log", "w+b")
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        except OSError as e:
            self._stderr.close()
            shutil.rmtree(self._io, ignore_errors=True)
            self._io = None
            raise BackendMissingError(f"cannot start the host runner {self.runner}: {e}; {BUILD_HINT}") from None
        self._buf = b""
        self._peak_kb = -1
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._proc.stdout, selectors.EVENT_READ)
        try:
            ready = self._reply(READY, f"loading {self.bundle.name} in the host runner")
        except BaseException:
            self.close()
            raise
        self.load_ms: dict[str, float] = ready["load_ms"]
        self.load_order: list[str] = ready["load_order"]  # largest program first: the lowest load peak
        self.threads: int = ready["threads"]
        self.workspace_sharing: str = ready["workspace_sharing"]

    # ---- the runner process ---------------------------------------------------------------------------
    def _failed(self, what: str) -> RunnerError:
        code = self._proc.poll()
        if code is None:
            self._proc.kill()
            code = self._proc.wait()
        self._stderr.seek(0)
        return RunnerError(f"{what}: {failure_line(self._stderr.read().decode(errors='replace'), code)}")

    def _reply(self, prefix: str, what: str) -> dict:
        """The runner's next protocol line (skipping anything else it prints), parsed; SDXS_ERROR raises."""
        deadline = time.monotonic() + self.timeout_s
        fd = self._proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if line.startswith(ERROR):
                    raise RunnerError(f"{what}: {json.loads(line[len(ERROR) :])['message']}")
                if line.startswith(prefix):
                    reply = json.loads(line[len(prefix) :])
                    self._peak_kb = max(self._peak_kb, reply.get("peak_rss_kb", -1))
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                self._proc.kill()
                raise RunnerError(
                    f"{what}: the host runner gave no answer in {self.timeout_s:g} s (pass timeout_s= to allow more)"
                )
            if not self._sel.select(timeout=left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the runner exited
                raise self._failed(what)
            self._buf += chunk

    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._proc is None:
            raise RunnerError(f"{self.name} session on {self.bundle} is closed")
        spec = self.specs[component]
        what = f"{component} on {self.name}"
        # One folder per component, reused: outputs are read only after the runner's SDXS_TIMING reply,
        # which it sends after writing them (each via a temporary file renamed into place).
        io = self._io / component
        io.mkdir(exist_ok=True)
        write_inputs(io, [inputs[s.name] for s in spec.inputs])
        method = sizes.method_name(self.sizes, self.shape_of(component, inputs)[1], self.method)
        request = f"run {component} {io}" if method == self.method else f"run-method {component} {method} {io}"
        try:
            self._proc.stdin.write(f"{request}\n".encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failed(what) from None
        self.runner_timings[component] = self._reply(TIMING, what)
        outputs = read_outputs(io, len(spec.outputs), what)
        return {s.name: a for s, a in zip(spec.outputs, outputs)}

    def peak_rss_mb(self) -> float:
        """The runner process's peak resident memory (its VmHWM, which it reports with every reply) as of
        its last reply, MB; -1 where it has no /proc to read it from."""
        kb = self._peak_kb
        return round(kb / 1024, 1) if kb >= 0 else -1.0

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
            self._sel.close()
            self._stderr.close()
        if self._io is not None:
            shutil.rmtree(self._io, ignore_errors=True)
            self._io = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
