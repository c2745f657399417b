"""The shared training loop: resumable safetensors checkpoints, a JSONL log, a progress bar and the
wall-clock budget, the same in one process and under `torchrun` / `accelerate launch` (`training.dist`).

Every stage supplies a `step(batch_index) -> dict of floats` closure and the modules/optimizers to
checkpoint; the loop owns everything else. Checkpoints are written to a temporary folder and renamed
into place, so a kill mid-write never leaves a half checkpoint; `resume` picks the newest complete one.
Optimizer state goes through safetensors too (tensors) + JSON (scalars): nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdxs_edge.atomic import atomic_dir, write_atomic


@dataclass(frozen=True)
class LoopConfig:
    """Settings shared by every stage's loop.

    Args:
        steps: optimizer steps to run in total (a resumed run continues up to this number).
        log_every: steps between JSONL log lines.
        ckpt_every: steps between checkpoints (the final step is always checkpointed).
        keep: how many checkpoints to keep on disk.
        max_seconds: wall-clock budget of this run; when it is spent the loop checkpoints and stops
            early (the stage's result then says so). None = no limit.
    """

    steps: int
    log_every: int = 25
    ckpt_every: int = 250
    keep: int = 2
    max_seconds: float | None = None


class Progress:
    """Fraction of a stage done: the larger of the steps done and the wall-clock budget spent.

    Schedules (learning rate, annealed weights) follow it, so a stage that runs out of time still
    completes its schedule rather than stopping half-way up a warm learning rate.

    Under N processes the clock is the slowest rank's (`d`), so every rank follows the same schedule.
    """

    def __init__(self, steps: int, max_seconds: float | None = None, d=None):
        self.steps, self.max_seconds, self.t0, self.d = steps, max_seconds, None, d

    def __call__(self, step: int) -> float:
        if self.t0 is None:
            self.t0 = time.time()
        p = step / max(1, self.steps - 1)
        if self.max_seconds:
            elapsed = time.time() - self.t0
            p = max(p, (self.d.max(elapsed) if self.d else elapsed) / self.max_seconds)
        return min(1.0, p)


def cosine_lr(base: float, step: int, progress: float, warm: int = 100, floor: float = 0.1) -> float:
    """Linear warm-up over the first `warm` steps, then cosine decay from `base` to `floor * base` as
    `progress` goes from 0 to 1."""
    if step < warm:
        return base * (step + 1) / warm
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict (parameters keyed by index, or by name for a sharded model) as tensors
    (`KEY.field`) and JSON scalars."""
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars["state"].setdefault(str(idx), {})[k] = v
    return tensors, scalars


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    key = lambda idx: int(idx) if idx.isdigit() else idx  # noqa: E731
    state: dict = {}
    for name, v in tensors.items():
        idx, k = name.rsplit(".", 1)
        state.setdefault(key(idx), {})[k] = v
    for idx, st in scalars["state"].items():
        state.setdefault(key(idx), {}).update(st)
    return {"state": state, "param_groups": scalars["param_groups"]}


def _owner(modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> torch.nn.Module | None:
    """The checkpointed module whose parameters `opt` trains (None when they belong to none)."""
    first = id(opt.param_groups[0]["params"][0])
    return next((m for m in modules.values() if any(id(p) == first for p in m.parameters())), None)


class Checkpointer:
    """Resumable checkpoints under `root/checkpoints/step-XXXXXXX/`: one safetensors file per module and
    per optimizer plus state.json. Under N processes every rank calls `save` (a sharded model is gathered)
    and rank 0 (`is_main`) writes."""

    def __init__(self, root: str | Path, keep: int = 2, is_main: bool = True):
        self.dir = Path(root) / "checkpoints"
        self.keep = keep
        self.is_main = is_main

    def latest(self) -> Path | None:
        done = sorted(p for p in self.dir.glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def save(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        extra: dict | None = None,
    ) -> Path:
        from training import dist

        final = self.dir / f"step-{step:07d}"
        owners = {name: _owner(modules, o) for name, o in optimizers.items()}
        gather = lambda m: self.is_main or (m is not None and dist.is_sharded(m))  # noqa: E731
        states = {name: dist.module_state(m) for name, m in modules.items() if gather(m)}
        opt_states = {
            name: dist.optimizer_state(owners[name], o) for name, o in optimizers.items() if gather(owners[name])
        }
        if not self.is_main:
            return final
        with atomic_dir(final, overwrite=True) as tmp:
            for name, sd in states.items():
                save_file(sd, str(tmp / f"{name}.safetensors"))
            opt_scalars = {}
            for name, sd in opt_states.items():
                tensors, opt_scalars[name] = _optimizer_to_tensors(sd)
                save_file(tensors, str(tmp / f"optim-{name}.safetensors"))
            state = {
                "step": step,
                "optimizers": opt_scalars,
                "rng": torch.get_rng_state().tolist(),
                "extra": extra or {},
            }
            (tmp / "state.json").write_text(json.dumps(state))
        for old in sorted(p for p in self.dir.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(
        self, path: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
    ) -> dict:
        """Every rank loads the full tensors (a sharded module keeps its own shard)."""
        from training import dist

        state = json.loads((path / "state.json").read_text())
        for name, m in modules.items():
            dist.load_module_state(m, load_file(str(path / f"{name}.safetensors")))
        for name, opt in optimizers.items():
            sd = _optimizer_from_tensors(load_file(str(path / f"optim-{name}.safetensors")), state["optimizers"][name])
            dist.load_optimizer_state(_owner(modules, opt), opt, sd)
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        return state


class JsonlLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_loop(
    name: str,
    out: str | Path,
    cfg: LoopConfig,
    step_fn: Callable[[int], dict[str, float]],
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra_state: Callable[[], dict] | None = None,
    d=None,
) -> dict:
    """Run `step_fn(step)` from the last checkpoint up to `cfg.steps`, logging and checkpointing.

    Args:
        name: stage name, shown on the progress bar and in the log.
        out: the stage's run folder (checkpoints/ and log.jsonl live there).
        cfg: loop settings.
        step_fn: does one optimizer step for global step index `step`; returns scalars to log.
        modules: what to checkpoint, by file name.
        optimizers: optimizers to checkpoint, by name.
        extra_state: returns JSON-able state saved with each checkpoint (e.g. an annealed weight).
        d: the `training.dist.DistInfo` of a multi-process run: every rank checkpoints together (a
            sharded model is gathered), rank 0 writes checkpoints and logs, and all stop at the budget
            together. None: one process.

    Returns:
        the checkpoint state it resumed from ({} for a fresh start), plus "last" (the final log record).
    """
    from tqdm.auto import tqdm

    from training.dist import DistInfo

    d = d or DistInfo()
    is_main = d.is_main
    ckpt = Checkpointer(out, cfg.keep, is_main)
    log = JsonlLog(Path(out) / "log.jsonl")
    start, resumed = 0, {}
    latest = ckpt.latest()
    if latest is not None:
        resumed = ckpt.load(latest, modules, optimizers)
        start = resumed["step"]
        if is_main:
            print(f"[{name}] resuming from {latest} (step {start})", flush=True)
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not is_main, dynamic_ncols=True, mininterval=2.0)
    t0, record = time.time(), {}
    for step in range(start, cfg.steps):
        metrics = step_fn(step)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {
                "stage": name,
                "step": step + 1,
                "time": round(time.time() - t0, 3),
                **{k: float(v) for k, v in metrics.items()},
            }
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            if is_main:
                log.write(record)
        over = cfg.max_seconds is not None and d.max(time.time() - t0) > cfg.max_seconds
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or over:
            ckpt.save(step + 1, modules, optimizers, extra_state() if extra_state else None)
        if over and step + 1 < cfg.steps:
            print(
                f"[{name}] wall-clock budget of {cfg.max_seconds:.0f} s spent: stopped at step {step + 1} of {cfg.steps}",
                flush=True,
            )
            if is_main:
                log.write({"stage": name, "step": step + 1, "stopped_early": True, "budget_s": cfg.max_seconds})
            record = {**record, "stopped_at": step + 1}
            break
    bar.close()
    return {**resumed, "last": record}


class StageClock:
    """Wall-clock seconds per stage of a resumable run, kept in a JSON file and added to across resumes.

    Args:
        path: the JSON file (e.g. out/times.json); read if present, rewritten atomically at every lap.
        write: False on all but one process of a multi-process run.
    """

    def __init__(self, path: str | Path, write: bool = True):
        self.path, self.write = Path(path), write
        self.times: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self._stamp = time.time()

    def lap(self, name: str) -> None:
        """Add the seconds since the last lap (or the start) to stage `name`."""
        now = time.time()
        self.times[name] = round(self.times.get(name, 0.0) + now - self._stamp, 1)
        self._stamp = now
        if self.write:
            write_atomic(self.path, json.dumps(self.times, indent=2))
