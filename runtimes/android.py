"""ExecuTorch bundles on an Android phone or emulator over adb, run by the native runner.

`AndroidSession` pushes the runner (built with the Android NDK, see runtimes/native/README.md) and the
bundle's .pte programs to `device_dir` once, then for each component call pushes the SDXT input files
(`runtimes.native_io`), runs `sdxs_runner --model ... --io ...` in `adb shell`, and pulls the outputs.

The Arm64 *Linux* runner from `make arm64-runner` cannot be used here: it is linked against glibc
(/lib/ld-linux-aarch64.so.1) and the executorch wheel's glibc libraries, and Android's C library is
bionic (/system/bin/linker64). The session checks the runner's ELF interpreter and says so.

Timings in `native_timings` are the device's own (program load, method run), without adb transfers.
"""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from runtimes.base import BackendMissingError, Session
from runtimes.native_io import RunnerError, failure_line, parse_timing, read_outputs, write_inputs
from sdxs_edge.errors import SDXSError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNNER = REPO / "build" / "android" / "sdxs_runner"
README = "runtimes/native/README.md"
GLIBC_INTERP_PREFIXES = ("/lib/ld-linux", "/lib64/ld-linux", "/usr/lib/ld-linux")


class AdbError(SDXSError):
    """An adb command failed (device gone, permission denied, full storage)."""


def elf_interpreter(path: Path) -> tuple[int, str | None]:
    """(e_machine, PT_INTERP path or None for a static binary) of a 64-bit little-endian ELF file.

    Args:
        path: the executable.
    """
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BackendMissingError(
            f"{path} is not a 64-bit little-endian ELF executable; build the Android runner as {README} describes"
        )
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        off = phoff + i * phentsize
        if struct.unpack_from("<I", data, off)[0] == 3:  # PT_INTERP
            p_offset = struct.unpack_from("<Q", data, off + 8)[0]
            p_filesz = struct.unpack_from("<Q", data, off + 32)[0]
            return machine, data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    return machine, None


def check_android_runner(path: Path) -> None:
    """Raise BackendMissingError unless `path` is an arm64 executable for Android (bionic) or static."""
    if not path.is_file():
        raise BackendMissingError(
            f"the Android runner {path} is not built; build it with the Android NDK as {README} describes (arm64-v8a)"
        )
    machine, interp = elf_interpreter(path)
    if machine != 183:  # EM_AARCH64
        raise BackendMissingError(
            f"{path} is not an arm64 (aarch64) executable (ELF machine {machine}); build it for ABI arm64-v8a ({README})"
        )
    if interp is not None and interp.startswith(GLIBC_INTERP_PREFIXES):
        raise BackendMissingError(
            f"{path} is a glibc Linux binary (interpreter {interp}); Android's C library is bionic, so build the runner with the NDK ({README})"
        )


class AndroidSession(Session):
    """A bundle's .pte programs run by sdxs_runner on an adb-connected Android device or emulator.

    Args:
        bundle: an "executorch" target bundle.
        runner: the runner built with the Android NDK for arm64-v8a (default build/android/sdxs_runner).
        lib_dir: folder of shared libraries the runner needs on the device (pushed, then on
            LD_LIBRARY_PATH); None for a runner linked statically against ExecuTorch, as the README's
            NDK build makes it.
        serial: the device's adb serial (`adb devices`); required when more than one is connected.
        device_dir: working folder on the device (must allow executables: /data/local/tmp does).
        adb: the adb binary, a name on PATH or a path.
        method: the program method to run.
        timeout_s: limit for one adb command, seconds.
        verify: check every component file's sha256 against the manifest.
    """

    name = "android"
    cpu_class = "arm64"
    targets = ("executorch",)

    def __init__(
        self,
        bundle: str | Path,
        *,
        runner: str | Path | None = None,
        lib_dir: str | Path | None = None,
        serial: str | None = None,
        device_dir: str = "/data/local/tmp/sdxs",
        adb: str = "adb",
        method: str = "forward",
        timeout_s: float = 600.0,
        verify: bool = True,
    ):
        super().__init__(bundle, verify=verify)
        adb_path = shutil.which(adb)
        if adb_path is None:
            raise BackendMissingError("adb not found (apt-get install adb)")
        self.adb_path = adb_path
        self.timeout_s = float(timeout_s)
        self.serial = self._pick_device(serial)
        self.runner = Path(runner) if runner is not None else DEFAULT_RUNNER
        self.check_runner()
        self.lib_dir = Path(lib_dir) if lib_dir is not None else None
        if self.lib_dir is not None and not any(self.lib_dir.glob("*.so")):
            raise BackendMissingError(f"lib_dir {self.lib_dir} holds no .so files")
        self.device_dir = device_dir.rstrip("/")
        self.method = method
        self.native_timings: dict[str, dict] = {}
        self.remote_programs: dict[str, str] = {}
        self._push_once()

    # ---- adb -----------------------------------------------------------------------------------------
    def _adb(self, *args: str, what: str) -> str:
        cmd = [self.adb_path, *(["-s", self.serial] if getattr(self, "serial", None) else []), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise AdbError(f"adb {what}: no answer within {self.timeout_s:g} s") from None
        if proc.returncode != 0:
            msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
            raise AdbError(f"adb {what} failed: {msg}")
        return proc.stdout

    def _shell(self, command: str, what: str) -> str:
        return self._adb("shell", command, what=what)

    def _pick_device(self, serial: str | None) -> str:
        out = self._adb("devices", what="devices")
        ready = [ln.split("\t")[0] for ln in out.splitlines()[1:] if ln.strip().endswith("\tdevice")]
        others = [ln.strip() for ln in out.splitlines()[1:] if ln.strip() and not ln.strip().endswith("\tdevice")]
        if serial is not None:
            if serial not in ready:
                raise BackendMissingError(
                    f"Android device {serial!r} is not connected and ready (adb devices: {', '.join(ready + others) or 'none'})"
                )
            return serial
        if not ready:
            state = f"; not ready: {', '.join(others)}" if others else ""
            raise BackendMissingError(f"no Android device or emulator connected (adb devices){state}")
        if len(ready) > 1:
            raise BackendMissingError(
                f"{len(ready)} Android devices connected ({', '.join(ready)}); pass serial= to pick one"
            )
        return ready[0]

    def check_runner(self) -> None:
        """Raise BackendMissingError unless the runner is an arm64 Android (or static) executable."""
        check_android_runner(self.runner)

    def _push_once(self) -> None:
        """Runner, libraries and programs to `device_dir`; a program is pushed only when the device lacks
        that exact file (named by its sha256), so reopening a bundle of large programs costs nothing."""
        d = shlex.quote(self.device_dir)
        self._shell(f"mkdir -p {d}", "mkdir")
        self._adb("push", str(self.runner), f"{self.device_dir}/sdxs_runner", what="push runner")
        self._shell(f"chmod 755 {d}/sdxs_runner", "chmod")
        if self.lib_dir is not None:
            self._shell(f"mkdir -p {d}/lib", "mkdir lib")
            self._adb(
                "push", *map(str, sorted(self.lib_dir.glob("*.so"))), f"{self.device_dir}/lib/", what="push libraries"
            )
        present = set(self._shell(f"ls {d}", "ls").split())
        for comp, spec in self.specs.items():
            sha = self.manifest["components"][comp]["sha256"]
            name = f"{comp}-{sha[:16]}.pte"
            if name not in present:
                self._adb("push", str(self.bundle / spec.file), f"{self.device_dir}/{name}", what=f"push {spec.file}")
            self.remote_programs[comp] = f"{self.device_dir}/{name}"

    # ---- running -------------------------------------------------------------------------------------
    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        what = f"{component} on {self.name} ({self.serial})"
        remote_io = f"{self.device_dir}/io-{component}"
        q_io = shlex.quote(remote_io)
        with tempfile.TemporaryDirectory(prefix=f"sdxs-{component}-") as io:
            files = write_inputs(io, [inputs[s.name] for s in spec.inputs])
            self._shell(f"rm -rf {q_io} && mkdir -p {q_io}", "prepare io folder")
            self._adb("push", *map(str, files), f"{remote_io}/", what="push inputs")
            env = f"LD_LIBRARY_PATH={shlex.quote(self.device_dir + '/lib')} " if self.lib_dir is not None else ""
            run = (
                f"cd {shlex.quote(self.device_dir)} && {env}./sdxs_runner --model {shlex.quote(self.remote_programs[component])} "
                f"--io {q_io} --method {shlex.quote(self.method)} 2>&1; echo SDXS_RC=$?"
            )
            # stderr is folded into stdout and the status echoed: adb shell on older devices drops both.
            out = self._shell(run, f"run {component}")
            rc_lines = [ln for ln in out.splitlines() if ln.startswith("SDXS_RC=")]
            if not rc_lines:
                raise RunnerError(f"{what}: the device printed no exit status (output: {out.strip()[-200:]!r})")
            rc = int(rc_lines[-1].split("=", 1)[1])
            if rc != 0:
                raise RunnerError(f"{what}: {failure_line(out.replace(rc_lines[-1], ''), rc)}")
            self.native_timings[component] = parse_timing(out)
            for i in range(len(spec.outputs)):
                self._adb("pull", f"{remote_io}/out{i}.bin", str(Path(io) / f"out{i}.bin"), what=f"pull out{i}.bin")
            extra = self._shell(f"ls {q_io}", "ls io").split()
            if f"out{len(spec.outputs)}.bin" in extra:
                raise RunnerError(f"{what}: the program has more outputs than the manifest's {len(spec.outputs)}")
            outputs = read_outputs(io, len(spec.outputs), what)
        return {s.name: a for s, a in zip(spec.outputs, outputs)}

    def close(self) -> None:
        """Remove the per-call io folders from the device (programs and runner stay, for the next session)."""
        if getattr(self, "remote_programs", None):
            self.remote_programs = {}
            self._shell(f"rm -rf {shlex.quote(self.device_dir)}/io-*", "cleanup")
