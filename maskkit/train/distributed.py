"""Everything that talks across ranks, in one place.

`torchrun --nproc_per_node N -m maskkit train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
maskkit runs as a single process and every function here is a no-op.
"""

import contextlib
import os
from dataclasses import dataclass

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


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0; gradients flow back to each rank's own slice.

    Built on the functional collectives (the autograd-aware `all_gather_tensor_autograd`), which
    replace the deprecated `torch.distributed.nn.functional.all_gather`.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd, wait_tensor

    return wait_tensor(all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD))


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0, in rank order, without gradient (keys for a queue)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, without gradient (for logging and agreeing on a decision)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return all_reduce_sum(x) / dist.get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, without gradient (e.g. sample counts that every rank must agree on)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def union_of_sets(items: set[str]) -> set[str]:
    """The union of a set of strings over ranks (e.g. the paths of unreadable files each rank met)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return set(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*gathered)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
