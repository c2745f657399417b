"""What one PT2E `prepare_pt2e` costs per component of the shipped model, with XNNPACK's stock quantizer
and with the converter's (`converters.to_executorch._quantizer`: no conv + batch-norm patterns on a graph
without batch norm), side by side in one run. The ExecuTorch int8 sensitivity pass prepares each
component once per candidate, so this cost is paid per candidate.

    python -m benchmarks.int8_prepare [--model sdxs_edge/default_model] [--rounds 3] [--out DIR]

Writes int8-prepare-<cpu class>.json and .md under --out (default benchmarks/results): the fastest and
median seconds per round of each quantizer, the number of observers each inserts (they must be equal),
the torch threads and the load average beside them (the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

from sdxs_edge import cpu
from sdxs_edge.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("text_encoder", "unet", "decoder")


def _time_prepare(graph, make_quantizer, rounds: int) -> tuple[list[float], int]:
    """Seconds of `rounds` prepare_pt2e calls on copies of `graph`, and the observers the last inserted."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    times, observers = [], 0
    for _ in range(rounds):
        g = copy.deepcopy(graph)
        t = time.perf_counter()
        prepared = prepare_pt2e(g, make_quantizer())
        times.append(time.perf_counter() - t)
        observers = sum(1 for n in prepared.graph.nodes if n.op == "call_module" and "activation_post" in str(n.target))
    return times, observers


def measure(model: str, rounds: int) -> dict:
    """Per component: stock and converter quantizer timings (seconds) and observer counts."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from converters.to_executorch import _quantizer
    from sdxs_edge import components as C
    from sdxs_edge.pipeline import SDXSPipeline

    pipe = SDXSPipeline.load(model)
    modules = C.wrappers(pipe, None, 1.0, False)
    quantizers = {
        "stock": lambda: XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)),
        "converter": lambda: _quantizer(lambda n: True),
    }
    out = {}
    for name in COMPONENTS:
        example = tuple(C.example_inputs(pipe, name))
        graph = torch.export.export(modules[name], example, strict=False).module()
        row = {}
        for label, make in quantizers.items():
            times, observers = _time_prepare(graph, make, rounds)
            row[label] = {"fastest_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}
            row[label]["observers"] = observers
        row["speedup_fastest"] = round(row["stock"]["fastest_s"] / max(row["converter"]["fastest_s"], 1e-9), 1)
        out[name] = row
    return out


def to_markdown(result: dict) -> str:
    lines = [
        f"# prepare_pt2e per component: stock XNNPACK quantizer vs the converter's ({result['cpu_class']})",
        "",
        f"`{result['command']}`; {result['rounds']} rounds each, torch threads {result['torch_threads']}, "
        f"load average {result['load_average']} at the start (a shared machine inflates both columns alike).",
        "",
        "| component | stock fastest s | converter fastest s | speed-up | observers (stock / converter) |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["components"].items():
        s, c = r["stock"], r["converter"]
        lines.append(
            f"| {name} | {s['fastest_s']} | {c['fastest_s']} | {r['speedup_fastest']}x | {s['observers']} / {c['observers']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sdxs_edge/default_model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    load = round(os.getloadavg()[0], 2)
    result = {
        "command": "python -m benchmarks.int8_prepare" + (f" --rounds {args.rounds}" if args.rounds != 3 else ""),
        "model": args.model,
        "cpu_class": cpu.host_class(),
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "load_average": load,
        "components": measure(args.model, args.rounds),
    }
    stem = args.out / f"int8-prepare-{result['cpu_class']}"
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
