"""The loop's side of running on several ranks: joining the process group, the device, the DDP wrapper,
gradient synchronisation and clipping. The collectives themselves (gathers, reductions) are in
`maskkit.collectives`, which methods use too.

`torchrun --nproc_per_node N -m maskkit train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
maskkit runs as a single process and every function here is a no-op.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """`setting` names where the choice came from (a config key or a command-line option) for the error."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from maskkit.errors import MaskkitError

            joiner = " " if setting.startswith("--") else "="
            raise MaskkitError(f"{setting}{joiner}cuda but no CUDA device is visible; use {setting}{joiner}cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX (Intel's bf16 matrix units, Sapphire Rapids on), without which bf16 matrix
    products on the CPU are emulated and run many times slower than fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)    # torch's own check (it also asks the kernel)
    if probe is not None:
        return bool(probe())
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def slow_precision(precision: str, device: torch.device) -> str | None:
    """A one-line warning when `precision` will be much slower than fp32 on `device`, else None."""
    if precision != "bf16" or device.type != "cpu" or cpu_has_amx():
        return None
    return ("train.precision=bf16 on a CPU without AMX (Intel's bf16 matrix units): bf16 matrix products are "
            "emulated there, about 13x slower than fp32; use train.precision=fp32 (bf16 pays on CUDA or an AMX CPU)")


def setup(device_preference: str = "auto") -> DistInfo:
    """Join the process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(method: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The module the loop calls: DDP around the method when there are several ranks, else the method."""
    if not info.enabled:
        return method
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=device_ids)


def no_sync(model: torch.nn.Module, sync: bool):
    """A context in which backward accumulates gradients without the all-reduce (all but the last micro-batch)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of the wrapped model's parameters (after DDP's all-reduce every rank
    holds the same gradients, so every rank clips alike); returns the norm before clipping."""
    module = model.module if hasattr(model, "module") else model
    return torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
