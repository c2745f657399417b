"""torch.distributed plumbing for the trainers: launched by `torchrun` / `accelerate launch`, a no-op
in a single process.

Data parallelism keeps every stage's maths identical to one process: each step draws the *global*
batch from a step-seeded generator on every rank, and each rank trains on its contiguous shard; DDP
averages gradients, so N processes follow the same loss curve as one process with the same global batch.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (the batch must divide by the world size)."""
        if self.world == 1:
            return x
        if x.shape[0] % self.world:
            raise ValueError(f"global batch {x.shape[0]} does not divide by {self.world} processes")
        return x.chunk(self.world)[self.rank]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def mean(self, value: float) -> float:
        """Average a scalar over ranks (for logging the global loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / self.world)

    def no_sync(self, module: torch.nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        return module.no_sync() if (self.world > 1 and not last) else nullcontext()


def init() -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); single process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def device() -> torch.device:
    """CUDA (this rank's GPU) when present, else CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def autocast(dev: torch.device):
    """bf16 mixed precision on GPU; full fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
