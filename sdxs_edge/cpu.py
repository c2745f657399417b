"""CPU classes: int8 kernels differ by instruction set, so a bundle's accuracy is a property of the class
of CPU it runs on, not of the bundle alone.

    x86-64-avx2          AVX2 + FMA, no VNNI: most laptops (AMD before Zen 4, Intel client before Alder Lake)
    x86-64-avx-vnni      AVX-VNNI without AVX-512 (Intel client from Alder Lake)
    x86-64-avx512-vnni   AVX-512 with VNNI (servers; AMD from Zen 4)
    x86-64-sse           neither AVX2 nor VNNI
    arm64                aarch64 (phones, Apple silicon, Arm servers)

An x86-64 machine can run a bundle as an AVX2-only CPU would under `qemu-x86_64-static -cpu Haswell`
(QEMU 7.2 emulates AVX2 but no AVX-512), and as an arm64 CPU would under `qemu-aarch64-static` (the
`arm64-emulated` runtime). Emulated numerics are what real CPUs of that class compute; emulated timings
mean nothing. Standard library only.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

from sdxs_edge.errors import SDXSError

CLASSES = ("x86-64-avx2", "x86-64-avx-vnni", "x86-64-avx512-vnni", "x86-64-sse", "arm64")
# The classes a conversion can check on any x86-64 host: emulated where the host is of another class.
EMULATED = {"x86-64-avx2": ("qemu-x86_64-static", "Haswell"), "arm64": ("qemu-aarch64-static", "cortex-a76")}
EMULATOR_PACKAGE = "qemu-user-static"
# qemu's complaints about CPUID bits of the named model that TCG cannot emulate (none is an ISA extension
# the kernels use); dropped from the output it hands on
QEMU_NOISE = "TCG doesn't support requested feature"


class CpuClassError(SDXSError):
    """An unknown CPU class, or a class this host can neither run nor emulate."""


def _flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return set()


def classify(machine: str, flags: set[str]) -> str:
    """The class of a CPU from `platform.machine()` and its /proc/cpuinfo flags."""
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    if "avx512_vnni" in flags:
        return "x86-64-avx512-vnni"
    if "avx_vnni" in flags:
        return "x86-64-avx-vnni"
    return "x86-64-avx2" if {"avx2", "fma"} <= flags else "x86-64-sse"


def host_class() -> str:
    """The class of the CPU this process runs on."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = _flags(cpuinfo.read_text()) if cpuinfo.is_file() else set()
    return classify(platform.machine(), flags)


def parse_classes(text: str) -> tuple[str, ...]:
    """A comma-separated list of classes ("host" names this machine's) -> unique class names, in order."""
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        name = host_class() if item == "host" else item
        if name not in CLASSES:
            raise CpuClassError(f"unknown CPU class {item!r}; known: host, {', '.join(CLASSES)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def emulator(cls: str) -> list[str]:
    """The command prefix that runs a host program as a CPU of class `cls` would; [] for the host's own
    class. A one-line error when the class cannot be emulated here or the emulator is not installed."""
    if cls == host_class():
        return []
    if cls not in EMULATED:
        raise CpuClassError(
            f"CPU class {cls} can only be checked on such a machine (this one is {host_class()}; emulated: {', '.join(EMULATED)})"
        )
    binary, model = EMULATED[cls]
    if cls.startswith("x86-64") and not host_class().startswith("x86-64"):
        raise CpuClassError(f"CPU class {cls} is emulated on x86-64 hosts only (this one is {host_class()})")
    path = shutil.which(binary)
    if path is None:
        raise CpuClassError(f"checking CPU class {cls} needs {binary}: apt-get install {EMULATOR_PACKAGE}")
    return [path, "-cpu", model]


def checked_classes(manifest: dict) -> list[str]:
    """The CPU classes a bundle's conversion checked it on (empty for bundles written before the record)."""
    return [r["class"] for r in manifest.get("parity", {}).get("cpu_classes", []) if r.get("passed")]
