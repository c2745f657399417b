"""Load run against `sdxs-edge serve` on loopback: throughput, latency percentiles, errors by code, server RSS.

    python -m benchmarks.load [BUNDLE ...] [--clients 1,4,16] [--seconds 60] --out benchmarks/results/serve-load-CPU

Starts the server (`python -m sdxs_edge.cli serve ... --port 0`; with no bundle, the default server: the
embedded model as int8 ExecuTorch from the cache, converted first if the cache lacks it), warms it up, then for each client count
runs that many closed-loop clients (each sends its next request when the last one is answered, over one
kept-alive connection) for `--seconds`, bounded also by `--max-requests` per phase. One client is
back-to-back single requests, the baseline the queue must not slow down. Writes results.json,
results.md and chart.png into `--out`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from sdxs_edge.atomic import atomic_file, write_atomic

PROMPTS = (
    "a large cyan triangle at the bottom left on a black background",
    "a small red circle at the top right on a white background",
)


def start_server(bundles: list[str]) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxs_edge.cli", "serve", *bundles, "--port", "0", "--queue", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    host, port = line.split()[2].removeprefix("http://").rstrip("/").rsplit(":", 1)
    return proc, host, int(port)


def cpu_s(pid: int) -> float:
    """CPU seconds the server process has used (user + system, every thread)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def client(
    host: str, port: int, stop_at: float, budget: list[int], lock: threading.Lock, out: list, seed0: int
) -> None:
    """Closed loop: POST, read, record (latency s, status) until the deadline or the shared budget is spent."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    i = 0
    while time.perf_counter() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        body = json.dumps({"prompt": PROMPTS[i % 2], "seed": seed0 + i})
        t = time.perf_counter()
        try:
            conn.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            status = r.status
        except (OSError, http.client.HTTPException):
            status = 0  # connection error
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
        out.append((time.perf_counter() - t, status))
        i += 1
    conn.close()


def phase(host: str, port: int, clients: int, seconds: float, max_requests: int) -> dict:
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    budget = [max_requests]
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    threads = [
        threading.Thread(target=client, args=(host, port, stop_at, budget, lock, results, 1000 * k))
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results if r[1] == 200]) * 1000
    codes = Counter(str(r[1]) for r in results)
    ok = int(codes.get("200", 0))
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(results),
        "ok": ok,
        "throughput_rps": round(ok / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if ok else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 2) if ok else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if ok else None,
        "errors_by_code": {k: v for k, v in codes.items() if k != "200"},
    }


def markdown(rep: dict) -> str:
    lines = [
        "# Load: `sdxs-edge serve` on loopback",
        "",
        f"Server: {', '.join(rep['models'])} on {rep['runtime']} ({rep['target']} {rep['precision']}, {rep['resolution']}x{rep['resolution']}), "
        f"`POST /v1/images/generations` with one image per request. Client: {rep['client']}.",
        "",
        f"Machine: {rep['machine']['cpu']}, {rep['machine']['cores']} cores; ISA {rep['machine']['isa']}. Load average (1, 5, 15 min) "
        f"{rep['machine']['load_average_start']} at the start, {rep['machine']['load_average_end']} at the end "
        f"(above {rep['machine']['cores']}: other processes competed for the cores, and every figure includes that contention). {rep['machine']['note']}",
        "",
        f"{rep['seconds_per_phase']} s per phase (at most {rep['max_requests_per_phase']} requests), after {rep['warmup_requests']} warm-up requests.",
        "",
        "| clients | requests | throughput (img/s) | p50 ms | p95 ms | p99 ms | errors by code | server CPU ms per image | server CPU cores used |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for p in rep["phases"]:
        errors = ", ".join(f"{k}: {v}" for k, v in p["errors_by_code"].items()) or "none"
        lines.append(
            f"| {p['clients']} | {p['requests']} | {p['throughput_rps']:.1f} | {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | {errors} "
            f"| {p['server_cpu_ms_per_image']} | {p['server_cpu_cores']} |"
        )
    g = rep["goals"]
    lines += [
        "",
        f"Server RSS: {rep['rss_mb']['start']:.1f} MB at start, {rep['rss_mb']['end']:.1f} MB at the end ({g['rss_change_pct']:+.1f}%; per phase: "
        + ", ".join(f"{x:.1f}" for x in rep["rss_mb"]["after_phase"])
        + " MB).",
        "",
        "Goals: "
        + "; ".join(
            [
                f"zero 5xx: {'met' if g['zero_5xx'] else 'NOT met'}",
                f"RSS flat within 10%: {'met' if g['rss_flat_10pct'] else 'NOT met'}",
                f"throughput at 4 clients >= 1 client ({g['throughput_4_over_1']:.2f}x): {'met' if g['throughput_4_ge_1'] else 'NOT met'}",
            ]
        )
        + ".",
        "",
        "![throughput and latency by client count](chart.png)",
        "",
    ]
    return "\n".join(lines)


def chart(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = rep["phases"]
    x = [p["clients"] for p in ph]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar([str(c) for c in x], [p["throughput_rps"] for p in ph], color="#4c72b0")
    a.set_xlabel("concurrent clients")
    a.set_ylabel("images per second")
    a.set_title("throughput")
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        b.plot([str(c) for c in x], [p[key] for p in ph], style, label=key.removesuffix("_ms"))
    b.set_xlabel("concurrent clients")
    b.set_ylabel("latency ms")
    b.set_yscale("log")
    b.set_title("latency")
    b.legend()
    fig.suptitle(
        f"sdxs-edge serve, {rep['target']} {rep['precision']} on {rep['runtime']}, {rep['machine']['cores']} cores ({rep['machine']['isa']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def cpu_description() -> tuple[str, int]:
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name, os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    p.add_argument(
        "bundles", nargs="*", help="bundle folders to serve (default: what `sdxs-edge serve` serves with no arguments)"
    )
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per phase (default 60)")
    p.add_argument("--max-requests", type=int, default=50_000, help="request cap per phase (default 50000)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up requests before the first phase")
    p.add_argument("--isa", default="AVX2+FMA, no AVX-512", help="the CPU's vector ISA, written beside the figures")
    p.add_argument("--note", default="", help="what else ran on the machine during the run")
    p.add_argument("--out", type=Path, required=True, help="results folder, named with the CPU class")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    proc, host, port = start_server(args.bundles)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]
        conn.close()
        phase(host, port, 1, 60.0, args.warmup)
        load_start = os.getloadavg()
        rss_start = rss_mb(proc.pid)
        phases, rss_after = [], []
        for c in counts:
            cpu0 = cpu_s(proc.pid)
            phases.append(phase(host, port, c, args.seconds, args.max_requests))
            ok = phases[-1]["ok"]
            phases[-1]["server_cpu_ms_per_image"] = round((cpu_s(proc.pid) - cpu0) / ok * 1000, 2) if ok else None
            phases[-1]["server_cpu_cores"] = round((cpu_s(proc.pid) - cpu0) / phases[-1]["seconds"], 2)
            rss_after.append(rss_mb(proc.pid))
            print(json.dumps(phases[-1]), flush=True)
        rss_end = rss_mb(proc.pid)
        load_end = os.getloadavg()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    cpu, cores = cpu_description()
    by = {ph["clients"]: ph for ph in phases}
    ratio = by[4]["throughput_rps"] / by[1]["throughput_rps"] if 1 in by and 4 in by else float("nan")
    rep = {
        "models": [model["id"]],
        "runtime": model["runtime"],
        "target": model["target"],
        "precision": model["precision"],
        "resolution": model["resolution"],
        "client": "closed-loop Python threads, one kept-alive HTTP/1.1 connection each, on the same machine",
        "seconds_per_phase": args.seconds,
        "max_requests_per_phase": args.max_requests,
        "warmup_requests": args.warmup,
        "machine": {
            "cpu": cpu,
            "cores": cores,
            "isa": args.isa,
            "note": args.note,
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
        },
        "phases": phases,
        "rss_mb": {
            "start": round(rss_start, 1),
            "after_phase": [round(x, 1) for x in rss_after],
            "end": round(rss_end, 1),
        },
    }
    change = (rss_end - rss_start) / rss_start * 100
    rep["goals"] = {
        "zero_5xx": not any(k.startswith("5") or k == "0" for ph in phases for k in ph["errors_by_code"]),
        "rss_change_pct": round(change, 2),
        "rss_flat_10pct": abs(change) <= 10 and all(abs(x - rss_start) / rss_start <= 0.10 for x in rss_after),
        "throughput_4_over_1": round(ratio, 3),
        "throughput_4_ge_1": bool(ratio >= 1.0),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "results.json", json.dumps(rep, indent=2) + "\n")
    write_atomic(args.out / "results.md", markdown(rep))
    with atomic_file(args.out / "chart.png") as tmp:
        chart(rep, tmp)
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
