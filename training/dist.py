"""torch.distributed plumbing for the trainers: launched by `torchrun` / `accelerate launch`, a no-op
in a single process.

Data parallelism keeps every stage's maths identical to one process: each step draws the *global*
batch from a step-seeded generator on every rank, and each rank trains on its contiguous shard; DDP
averages gradients, so N processes follow the same loss curve as one process with the same global batch.

`Parallel` is a stage's choice of how: DDP (every rank holds the whole trainable model) or FSDP
(`torch.distributed.fsdp.fully_shard`: the trainable model's weights, gradients and optimizer state are
split across ranks, one shard unit per U-Net block, see `fsdp_units`), gradient accumulation, bf16
autocast and gradient checkpointing. Checkpoints of a sharded model are gathered to full tensors and
written by rank 0 into one safetensors file per module, so a run saved on N ranks resumes on any number.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Parallel:
    """How a stage trains on N processes.

    Args:
        fsdp: shard the trainable U-Nets (FSDP) instead of replicating them (DDP); no effect in one process.
        grad_accum: micro-batches per optimizer step (each rank's shard of the global batch is split).
        precision: "bf16" (autocast on CUDA; CPU runs stay fp32) or "fp32".
        checkpointing: gradient checkpointing of the trainable U-Nets (recompute activations in backward).
    """

    fsdp: bool = False
    grad_accum: int = 1
    precision: str = "bf16"
    checkpointing: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")


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

    def micro(self, tensors: list[torch.Tensor], accum: int) -> list[list[torch.Tensor]]:
        """This rank's shard of each global-batch tensor, split into `accum` micro-batches."""
        local = [self.shard(t) for t in tensors]
        if local[0].shape[0] % accum:
            raise ValueError(f"per-process batch {local[0].shape[0]} does not divide into {accum} micro-batches")
        return [list(parts) for parts in zip(*(t.chunk(accum) for t in local))]

    def wrap(self, module: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
        """DDP wrapper (train through the returned module, checkpoint the original), or FSDP sharding in
        place (the returned module is `module`, now sharded); `module` itself in one process."""
        if self.world == 1:
            return module
        if fsdp:
            return shard_fsdp(module)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def mean(self, value: float) -> float:
        """Average a scalar over ranks (for logging the global loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / self.world)

    def max(self, value: float) -> float:
        """The largest of a scalar over ranks (so every rank takes the same decision)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Average every scalar of a dict over ranks (one all-reduce)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def accumulate(
        self,
        modules: list[torch.nn.Module],
        micro: list[list[torch.Tensor]],
        loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]],
        dev: torch.device,
        precision: str = "bf16",
    ) -> dict[str, float]:
        """Forward (under `autocast`) and backward of each micro-batch, gradients of `modules` reduced on
        the last one only; `loss_fn(*micro_batch)` returns (loss, scalars). Returns "loss" and the scalars
        averaged over the micro-batches and the ranks (the global batch's values)."""
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            with ExitStack() as stack:
                for m in modules:
                    stack.enter_context(self.no_sync(m, i == len(micro) - 1))
                with autocast(dev, precision):
                    loss, scalars = loss_fn(*batch)
                (loss / len(micro)).backward()
            for k, v in {"loss": loss.item(), **scalars}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(micro)
        return self.mean_dict(sums)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, fn: Callable[[], object]):
        """`fn()` on rank 0, then on the other ranks once it is done (build a file once, read it
        everywhere)."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()

    def no_sync(self, module: torch.nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation (DDP); an FSDP
        module reduce-scatters only on the last one."""
        if self.world == 1:
            return nullcontext()
        if is_sharded(module):
            module.set_requires_gradient_sync(last)
            return nullcontext()
        return module.no_sync() if (hasattr(module, "no_sync") and not last) else nullcontext()


def init() -> DistInfo:
    """Join the process group torchrun / accelerate launch set up (gloo on CPU, nccl on GPU); single
    process otherwise."""
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


def autocast(dev: torch.device, precision: str = "bf16"):
    """bf16 mixed precision on GPU when the stage asks for it; full fp32 on CPU."""
    if dev.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def trainable(d: DistInfo, module: torch.nn.Module, par: Parallel) -> torch.nn.Module:
    """Gradient checkpointing when `par` asks (diffusers models), then DDP / FSDP: train through the
    result; checkpoint `module`."""
    if par.checkpointing and hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    return d.wrap(module, par.fsdp)


def released(module: torch.nn.Module) -> torch.nn.Module:
    """A trained module back as a plain, unsharded model without gradient checkpointing (`plain_copy`)."""
    module = plain_copy(module)
    if getattr(module, "is_gradient_checkpointing", False):
        module.disable_gradient_checkpointing()
    return module


# ---- FSDP ------------------------------------------------------------------------------------------------
FSDP_BLOCKS = ("down_blocks", "up_blocks")  # ModuleLists whose items are each one shard unit
FSDP_SINGLE = ("mid_block",)  # single blocks that are one shard unit


def fsdp_units(module: torch.nn.Module) -> list[str]:
    """The wrapping policy: the names of the sub-modules sharded as their own FSDP units (each U-Net down
    / up block and the mid block); the root holds the rest (conv_in, time embedding, conv_out)."""
    names = []
    for attr in FSDP_BLOCKS:
        names += [f"{attr}.{i}" for i in range(len(getattr(module, attr, [])))]
    names += [attr for attr in FSDP_SINGLE if getattr(module, attr, None) is not None]
    return names


def shard_fsdp(module: torch.nn.Module) -> torch.nn.Module:
    """`fully_shard` each unit of `fsdp_units`, then the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    subs = dict(module.named_modules())
    for name in fsdp_units(module):
        fully_shard(subs[name])
    fully_shard(module)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _full_options(every_rank: bool = False):
    """Full (unsharded) tensors: on rank 0's CPU only, or on every rank's device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a module's state; for a sharded module a collective call whose full result is
    on rank 0 (other ranks get {})."""
    if not is_sharded(module):
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.contiguous() for k, v in get_model_state_dict(module, options=_full_options()).items()}


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (every rank passes the whole state) into a plain or sharded module."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_full_options())


def optimizer_state(module: torch.nn.Module | None, opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()`; for the optimizer of a sharded module its full state keyed by parameter name
    (collective; complete on rank 0)."""
    if module is None or not is_sharded(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=_full_options())


def load_optimizer_state(module: torch.nn.Module | None, opt: torch.optim.Optimizer, state: dict) -> None:
    if module is None or not is_sharded(module):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=_full_options())


def plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A sharded diffusers model gathered into an unsharded copy on every rank (collective); `module`
    itself when it is not sharded."""
    if not is_sharded(module):
        return module
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    full = get_model_state_dict(module, options=_full_options(every_rank=True))
    plain = cls.from_config(module.config)
    plain.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in full.items()})
    return plain.to(next(iter(full.values())).device)
