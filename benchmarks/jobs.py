"""What the orchestrator (`benchmarks.bench`) hands a worker process, and the small helpers both share.

A job is a frozen dataclass written as JSON; the worker (`python -m benchmarks.worker JOB.json`) writes
its result JSON next to it. Only the standard library and numpy are imported here.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdxs_edge.errors import SDXSError

# One fixed SHAPES-64 caption: every path tokenizes and encodes the same text.
PROMPT = "a large cyan triangle at the bottom left on a black background"
# Random-weight presets get a short int8 sensitivity pass: 3 nodes re-scored, at most 2% kept in float.
# At 512x512 every re-score re-quantizes a 316M-parameter U-Net; int8 accuracy proper is judged on the
# trained shapes model, which gets the full pass.
PRESET_SENSITIVITY = {"sensitivity_shortlist": 3, "max_float_fraction": 0.02}
# ONNX int8 ranges of random-weight presets: per-tensor least-squares clipping ("mse"). Measured on the
# sdxs-512 U-Net at 512x512: MinMax 23.7 dB, MinMax averaged 25.0 dB, mse 25.5 dB (floor 25). Trained
# models keep the converter's MinMax default: on the shapes model it scores 40.2 dB image PSNR, mse 39.9.
PRESET_ONNX_CALIBRATION = "mse"


class BenchError(SDXSError):
    """A benchmark request that cannot run (unknown runtime, bad resolution, missing extra, ...)."""


@dataclass(frozen=True)
class ConversionJob:
    """One bundle to produce.

    Args:
        target: "onnx", "executorch" or "openvino" (OpenVINO IR built from the ONNX fp32 bundle).
        precision: "fp32", "fp16" or "int8".
        out: directory the bundle (or OpenVINO IR folder) is written to.
        source_bundle: for "openvino", the ONNX fp32 bundle it is converted from.
    """

    target: str
    precision: str
    out: str
    source_bundle: str | None = None


@dataclass(frozen=True)
class Job:
    """One worker process's task.

    Args:
        kind: "convert" (every `conversions` in order), "torch" (eager PyTorch of `model` on CPU),
            "gpu" (CUDA fp16 eager and torch.compile of `model`), "teacher" (per-component eager PyTorch
            of the baseline architecture `model`) or "session" (a bundle on `runtime`).
        model: preset name or absolute model folder.
        resolution: image side in pixels.
        threads: intra-op threads every backend is pinned to.
        runs: measured repetitions (after `warmup`).
        warmup: unmeasured repetitions first (the first one's time is reported as the cold run).
        result: where the worker writes its result JSON.
        runtime: for "session": "onnxruntime", "executorch", "executorch-native", "executorch-capi" or
            "openvino".
        precision: the precision of the path (reported).
        bundle: for "session": the bundle directory (for openvino: the ONNX fp32 bundle giving the
            manifest and tokenizer).
        ir_dir: for openvino: the folder of {component}.xml OpenVINO IR files.
        conversions: for "convert": the bundles to produce.
        teacher_steps: for "teacher": the multi-step count the total is projected for.
        seed: weight seed of presets (the converters' default, so bundles and eager runs agree).
        attention: for "convert": the attention layout of the sdxs-edge bundles.
    """

    kind: str
    model: str
    resolution: int
    threads: int
    runs: int
    warmup: int
    result: str
    runtime: str | None = None
    precision: str | None = None
    bundle: str | None = None
    ir_dir: str | None = None
    conversions: tuple[ConversionJob, ...] = field(default_factory=tuple)
    teacher_steps: int = 25
    seed: int = 0
    attention: str = "standard"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        d["conversions"] = tuple(ConversionJob(**c) for c in d.get("conversions", ()))
        return cls(**d)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    On Linux, VmHWM of /proc/self/status: the high-water mark of this program's own memory. ru_maxrss
    is not that: at exec Linux carries the parent's high-water mark over into the child's, so a worker
    started by a 1.3 GB process reported 1.3 GB whatever it did. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1 << 20) if platform.system() == "Darwin" else r / 1024, 1)


def stats_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, p90 (numpy linear interpolation) and min of per-run times, in milliseconds."""
    import numpy as np

    a = np.asarray(seconds, np.float64) * 1000
    return {
        "median_ms": round(float(np.median(a)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "min_ms": round(float(a.min()), 3),
        "runs": int(a.size),
        "samples_ms": [round(float(x), 3) for x in a],
    }


def stats_e2e(seconds: Sequence[float], batch: int = 1) -> dict[str, Any]:
    """End-to-end seconds per image batch: median, p90, min, and images per second at the median."""
    import numpy as np

    a = np.asarray(seconds, np.float64)
    med = float(np.median(a))
    return {
        "median_s": round(med, 6),
        "p90_s": round(float(np.percentile(a, 90)), 6),
        "min_s": round(float(a.min()), 6),
        "images_per_s": round(batch / med, 4) if med > 0 else None,
        "batch": batch,
        "runs": int(a.size),
        "samples_s": [round(float(x), 6) for x in a],
    }


def dir_mb(path: str | os.PathLike) -> float:
    """Size on disk of a file or of every file under a directory, in MB (10^6 bytes)."""
    p = Path(path)
    n = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return round(n / 1e6, 3)
