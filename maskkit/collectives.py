"""Collectives: everything that exchanges tensors or values across ranks, for the loop and the methods alike.

A leaf module (it imports nothing of maskkit), so a contrastive loss can gather its features without
depending on the training loop. Without an initialised process group, or with one rank, every function
returns its input: single-process code calls them unconditionally.
"""

import torch
import torch.distributed as dist


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0; gradients flow back to each rank's own slice.

    Built on the functional collectives (the autograd-aware `all_gather_single_autograd`), which
    replace the deprecated `torch.distributed.nn.functional.all_gather` and `all_gather_tensor_autograd`.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    return wait_tensor(all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD))


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
