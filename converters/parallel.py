"""The components of a bundle lowered side by side: the largest in a forked process, the rest here.

Lowering is mostly single-threaded Python (torch.export, PT2E quantization and its sensitivity pass,
the edge dialect's and the delegate's graph passes), so one conversion keeps one core busy, and the U-Net
takes most of it (about 70 % of the shipped model's ExecuTorch int8 conversion). With two cores or more
and two components or more, the largest component (by layers) is lowered in a child process forked
after capture, which shares every input read-only, while this process lowers the others. The child
runs torch on one thread and this process on the rest: GNU OpenMP (torch's thread pool on Linux) is not
fork-safe, and a forked child that runs a parallel region on more than one thread, after its parent ran
one, waits forever on pool threads it does not have. The child writes its file into the bundle's
temporary folder and sends back its report; this process then opens the file for the parity checks as
it would its own. Errors in the child reach the caller as the same one-line error; a child that dies
(killed, out of memory) is an error naming the component.

Lowering keeps the child on a core, so a child that has used no CPU time for `STALL_S` seconds is stuck:
waiting on a lock that another thread of this process held at the fork (a library's progress-bar monitor,
a thread pool's mutex), which nothing in the child will ever release. It is then killed, a warning names
the component, and the component is lowered here instead, so a conversion never waits forever.

That child may fork once more (`map_apart`): the scores of the sensitivity pass's shortlist are
independent, and the parent's core is idle once it has lowered the other components.

Linux only (fork is the only way to hand a loaded model over without copying it), for the ONNX and
ExecuTorch targets; `jobs=1` (`--jobs 1`) lowers one component after another. Models with a component
over `MAX_SIDE_BY_SIDE_PARAMS` parameters are lowered one component after another too: there the
calibration runs of the model are much of the work, and one thread in the child costs more than the
second process saves: sdxs-512 (U-Net 0.32B) to ExecuTorch int8 on 2 cores (AVX-512 VNNI) took 922 s
side by side, the U-Net 789 s of it in the child on one thread; one after another (and with the
sensitivity pass's later savings), its U-Net took 376 s on both threads, every score measured
(docs/converting.md). The shipped model (every component under 0.1B) gains from the second process.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from converters.base import ComponentJob, ComponentResult
from sdxs_edge.errors import SDXSError

TARGETS = ("onnx", "executorch")
MAX_SIDE_BY_SIDE_PARAMS = 100_000_000  # a larger component: one after another (module docstring)
STALL_S = 120.0  # seconds without CPU time after which the child is taken as stuck (module docstring)
POLL_S = 1.0


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side(target: str, components: int, jobs: int, largest_params: int = 0) -> bool:
    """Whether to lower one component in a child process: `jobs` 0 means as the machine allows;
    `largest_params`, the parameter count of the model's largest component (`MAX_SIDE_BY_SIDE_PARAMS`)."""
    if jobs == 1 or components < 2 or target not in TARGETS or not sys.platform.startswith("linux"):
        return False
    return usable_cores() >= 2 and largest_params <= MAX_SIDE_BY_SIDE_PARAMS


def parameters(job: ComponentJob) -> int:
    """The component's parameter count, what `side_by_side` compares with `MAX_SIDE_BY_SIDE_PARAMS`."""
    return sum(p.numel() for p in job.module.parameters())


def _layers(job: ComponentJob) -> int:
    """Lowering time follows the graph's size, which follows the number of layers, not of parameters
    (the shipped model's text encoder has twice the U-Net's parameters and a ninth of its layers)."""
    return len(list(job.module.modules()))


def _child(lower: Callable[[ComponentJob], ComponentResult], job: ComponentJob, conn) -> None:
    import torch

    global _LOWERING_CHILD
    _LOWERING_CHILD = True
    torch.set_num_threads(1)  # never more in a forked child: the module docstring says why
    t = time.perf_counter()
    try:
        r = lower(job)
        msg = ("ok", r.file, r.report, r.extra_files, r.structural, r.runner is not None, time.perf_counter() - t)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        msg = ("error", type(e).__module__, type(e).__qualname__, str(e))
    conn.send(msg)
    conn.close()


_LOWERING_CHILD = False  # True in the child process `lower_all` forks (`map_apart`)


def map_apart(fn: Callable[[object], float], items: list) -> list[float]:
    """`[fn(x) for x in items]`, every other item computed in a second process forked for it, when this
    is the child process `lower_all` forked and there are two items or more; else here, in order.

    That child lowers the largest component, and its parent is left with nothing to do once it has
    lowered the others: the second process takes that core for the child's independent measurements (the
    scores of the sensitivity pass's shortlist). The child holds no thread but its own (a fork copies
    only the calling thread), so forking it again cannot inherit a held lock; the grandchild runs torch
    on one thread, as the child does, and sends its numbers back as JSON. Where the grandchild fails,
    dies or stalls (`STALL_S`), a warning says so and its items are computed here: an error they raise is
    raised here, as it would be without it."""
    if not _LOWERING_CHILD or len(items) < 2 or usable_cores() < 2:
        return [fn(x) for x in items]
    there = items[1::2]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the grandchild: measure, send, and leave without running the parent's clean-up
        os.close(read)
        _measure(fn, there, write)
    os.close(write)
    theirs = None
    try:
        here = [fn(x) for x in items[::2]]
        theirs, why = _read_measurements(read, pid, len(there))
    finally:
        os.close(read)
        if theirs is None:
            _kill(pid)
        os.waitpid(pid, 0)
    if theirs is None:
        warnings.warn(
            f"measuring {len(there)} scores in a second process failed ({why}); measuring them here", stacklevel=2
        )
        theirs = [fn(x) for x in there]
    out: list = [None] * len(items)
    out[::2], out[1::2] = here, theirs
    return out


def _measure(fn: Callable[[object], float], items: list, fd: int) -> None:
    """The grandchild of `map_apart`: its measurements, or its error, as one JSON document on `fd`."""
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        msg = {"ok": [fn(x) for x in items]}
    except BaseException as e:  # noqa: BLE001 - the parent measures these items again and raises it there
        msg, code = {"error": f"{type(e).__name__}: {e}"}, 1
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(msg, f)
    finally:
        os._exit(code)


def _read_measurements(fd: int, pid: int, n: int) -> tuple[list[float] | None, str]:
    """(the grandchild's `n` numbers, "") or (None, why not): it failed, ended without them, or stalled
    before sending them (`_waited`)."""
    chunks: list[bytes] = []
    while _waited(lambda: bool(select.select([fd], [], [], POLL_S)[0]), pid):
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    else:
        return None, f"no CPU time for {STALL_S:.0f} s"
    try:
        msg = json.loads(b"".join(chunks))
    except ValueError:
        return None, "it ended without a result"
    if "ok" not in msg or len(msg["ok"]) != n:
        return None, msg.get("error", "a malformed result")
    return [float(v) for v in msg["ok"]], ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of process `pid` in clock ticks (/proc/PID/stat); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)


def _waited(ready: Callable[[], bool], pid: int) -> bool:
    """Calls `ready` (which waits up to `POLL_S` itself) until it is true: True; False once process
    `pid` has used no CPU time for `STALL_S` seconds (never when its CPU time cannot be read)."""
    ticks, since = _cpu_ticks(pid), time.monotonic()
    while not ready():
        now = _cpu_ticks(pid)
        if now != ticks:
            ticks, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= STALL_S:
            return False
    return True


def _receive(conn, pid: int):
    """The child's message, or None once the child has stalled (`_waited`)."""
    return conn.recv() if _waited(lambda: conn.poll(POLL_S), pid) else None


def _raise(job: ComponentJob, module: str, qualname: str, message: str):
    """The child's error as the same class with the same message (an SDXSError stays a one-line error);
    a class that cannot be rebuilt from its message becomes an SDXSError naming it."""
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        cls = None
    err = None
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            err = cls(message) if message else cls()
        except Exception:
            err = None
    raise err or SDXSError(f"lowering {job.name} failed: {qualname}: {message}")


def lower_all(
    jobs: dict[str, ComponentJob],
    lower: Callable[[ComponentJob], ComponentResult],
    runner_for: Callable | None,
    parallel: bool,
    on_done: Callable[[str, float], None],
) -> dict[str, ComponentResult]:
    """Every job lowered by `lower`, in `jobs` order, the largest in a child process when `parallel`.

    Args:
        jobs: component name -> its job (built after capture).
        lower: the backend's `convert_component`.
        runner_for: the backend's (job, path) -> runner, to open the child's file here; None when the
            backend has no runner.
        parallel: `side_by_side(...)`.
        on_done: called with (component, its own lowering seconds) as each finishes.
    """

    def here(names) -> dict[str, ComponentResult]:
        out = {}
        for name in names:
            t = time.perf_counter()
            out[name] = lower(jobs[name])
            on_done(name, time.perf_counter() - t)
        return out

    if not parallel:
        return here(jobs)
    import multiprocessing

    import torch

    big = max(jobs, key=lambda n: _layers(jobs[n]))
    threads = torch.get_num_threads()
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(lower, jobs[big], send), daemon=True)
    torch.set_num_threads(max(1, threads - 1))  # the child takes the other one
    child.start()
    send.close()
    try:
        out = here([n for n in jobs if n != big])
        try:
            msg = _receive(recv, child.pid)
        except EOFError:
            child.join()
            raise SDXSError(
                f"lowering {big} in its own process failed: the process ended with code {child.exitcode} "
                "without a result (killed, or out of memory?); --jobs 1 lowers one component at a time"
            ) from None
        if msg is not None:
            child.join()
    finally:
        torch.set_num_threads(threads)
        if child.is_alive():
            child.kill()
            child.join()
    if msg is None:
        warnings.warn(
            f"lowering {big} in its own process stalled (no CPU time for {STALL_S:.0f} s: a lock held at the "
            "fork); lowering it in this process instead",
            stacklevel=2,
        )
        out.update(here([big]))
        return {name: out[name] for name in jobs}
    if msg[0] == "error":
        _raise(jobs[big], *msg[1:])
    _, file, report, extra, structural, runs, seconds = msg
    job = jobs[big]
    runner = runner_for(job, job.out) if runs and runner_for is not None else None
    out[big] = ComponentResult(file, report, runner, extra_files=extra, structural=structural)
    on_done(big, seconds)
    return {name: out[name] for name in jobs}
