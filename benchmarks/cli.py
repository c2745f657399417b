"""`sdxs-edge bench`: the benchmarks' subcommand, added by `sdxs_edge.cli` through `add_parsers`.

    sdxs-edge bench MODEL_OR_PRESET [--runtimes torch,onnxruntime,executorch,executorch-native]
        [--precisions fp32,fp16,int8] [--resolution N] [--runs N] [--warmup N] [--rounds N] [--threads N]
        [--out DIR] [--work DIR]
        [--teacher PRESET] [--teacher-steps N] [--reuse-bundles] [--no-baselines] [--no-openvino]
        [--attention {standard,split-heads}]

`python -m benchmarks.bench` takes the same flags. The handler raises SDXSError (BenchError for a bad
request), which the main CLI prints as one line with exit code 2; it returns 1 when some path failed
(the table says which and why) and 0 when every path ran.
"""

from __future__ import annotations

import argparse
import sys

from sdxs_edge.cli_args import at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags, shared by `sdxs-edge bench` and `python -m benchmarks.bench`.

    Args:
        p: the parser to add them to.
    """
    from benchmarks.bench import DEFAULT_RUNTIMES, PRECISIONS
    from sdxs_edge.attention import ATTENTION_VARIANTS

    p.add_argument("model", help="preset name (e.g. sdxs-512, tiny), diffusers folder or hub id")
    p.add_argument(
        "--runtimes",
        default=",".join(DEFAULT_RUNTIMES),
        help=f"comma-separated runtimes (default {','.join(DEFAULT_RUNTIMES)})",
    )
    p.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help=f"comma-separated precisions (default {','.join(PRECISIONS)})",
    )
    p.add_argument("--resolution", type=at_least("--resolution", 8), help="image side in pixels (default: the model's)")
    p.add_argument("--runs", type=at_least("--runs"), default=5, help="measured runs per path (default 5)")
    p.add_argument("--warmup", type=at_least("--warmup", 0), default=1, help="unmeasured runs first (default 1)")
    p.add_argument(
        "--rounds",
        type=at_least("--rounds"),
        default=1,
        help="measure every path this many times, round-robin, each time in a fresh process, and pool the runs (default 1; more evens out a shared machine's bursts)",
    )
    p.add_argument(
        "--threads", type=at_least("--threads"), help="threads every backend is pinned to (default: the usable cores)"
    )
    p.add_argument("--out", help="results folder (default benchmarks/results/<model>-<resolution>/)")
    p.add_argument("--work", help="bundles, job files and worker logs (default out/bench/<model>-<resolution>/)")
    p.add_argument(
        "--teacher", default="sd21-base", help="multi-step baseline architecture (default sd21-base, random weights)"
    )
    p.add_argument(
        "--teacher-steps",
        type=at_least("--teacher-steps"),
        default=25,
        help="steps of the guided teacher total (default 25)",
    )
    p.add_argument(
        "--reuse-bundles", action="store_true", help="reuse matching bundles under --work instead of converting again"
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip torch eager fp32 (unless in --runtimes) and the teacher baseline",
    )
    p.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO fp32 / NNCF int8 baseline")
    p.add_argument("--seed", type=int, default=0, help="weight seed when MODEL is a preset")
    p.add_argument(
        "--attention",
        choices=ATTENTION_VARIANTS,
        default="standard",
        help="attention layout of the sdxs-edge bundles (split-heads: one head at a time, smaller peak memory)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the final table")


def add_parsers(subparsers) -> None:
    """Register `bench` on the main CLI's subparsers (the hook `sdxs_edge.cli.build_parser` calls).

    Args:
        subparsers: the object `ArgumentParser.add_subparsers` returned.
    """
    p = subparsers.add_parser(
        "bench",
        help="benchmark every runtime x precision path and the baselines (latency, memory, size, parity)",
        description="Convert where needed, then measure each runtime x precision path in its own process, with torch eager fp32, "
        "the SD-2.1-base architecture (1 and 25 guided steps) and OpenVINO as baselines; writes JSON, markdown and a chart.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Handler of `sdxs-edge bench`: run, print the markdown report, return 1 if any path failed."""
    from benchmarks import report as R
    from benchmarks.bench import run_bench

    rep = run_bench(
        args.model,
        runtimes=args.runtimes,
        precisions=args.precisions,
        resolution=args.resolution,
        runs=args.runs,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        out_dir=args.out,
        baselines=not args.no_baselines,
        openvino=not args.no_openvino,
        teacher=args.teacher,
        teacher_steps=args.teacher_steps,
        work_dir=args.work,
        reuse_bundles=args.reuse_bundles,
        seed=args.seed,
        attention=args.attention,
        progress=not args.quiet,
    )
    print(R.markdown(rep))
    if rep["failed"]:
        print(f"{len(rep['failed'])} failed: {', '.join(rep['failed'])} (reasons in the table above)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.bench MODEL ...`: the same command as `sdxs-edge bench`, same error handling."""
    from sdxs_edge.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
