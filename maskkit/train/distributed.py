"""The loop's side of running on several ranks: joining the process group, the device, the DDP wrapper or
FSDP2's sharding, gradient synchronisation and clipping. The collectives themselves (gathers, reductions) are in
`maskkit.collectives`, which methods use too.

`torchrun --nproc_per_node N -m maskkit train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
maskkit runs as a single process and every function here is a no-op.
"""

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from maskkit import collectives


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


def checkpoint_activations(method: torch.nn.Module) -> None:
    """train.activation_checkpointing: every Transformer block of the method recomputes its activations in
    the backward (frozen parts too: they keep no activations for a backward anyway)."""
    from maskkit.nn.transformer import Block

    for module in method.modules():
        if isinstance(module, Block):
            module.checkpoint_activations = True


def shard(method, info: DistInfo, bf16: bool = False) -> list[torch.nn.Parameter]:
    """FSDP2 (torch's `fully_shard`, Zhao et al. 2023 "PyTorch FSDP"), in place: each trainable Transformer block
    is one unit whose parameters, gradients and optimizer state are split over the ranks and gathered for its
    forward and backward only; the method itself is the root unit holding the rest (embeddings, heads).

    A momentum encoder's blocks (MoCo, DenseCL) are units like their online twins', so the EMA update is
    shard-local: each rank updates its own slices. Frozen parts (a teacher, a frozen LM) stay whole on every
    rank and out of FSDP: nothing of theirs is reduced. `fully_shard` cannot shard 0-d parameters (FLIP's
    logit scale, say); they stay whole too, and the loop averages their gradients (`average_gradients`),
    which are returned. With `bf16` (train.precision=bf16 on CUDA), units compute in bf16 and reduce
    gradients in fp32 (`MixedPrecisionPolicy`), in place of autocast.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from maskkit.nn.transformer import Block

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    frozen = method.__dict__.get("_frozen_modules", [])
    inside_frozen = {id(module) for part in frozen for module in part.modules()}
    frozen_parameters = [p for part in frozen for p in part.parameters()]
    frozen_ids = {id(p) for p in frozen_parameters}       # ids: a tensor's == is elementwise
    for module in list(method.modules()):
        if isinstance(module, Block) and id(module) not in inside_frozen:
            fully_shard(module, mesh=mesh, mp_policy=policy)
            for name in Block.forward_methods:
                register_fsdp_forward_method(module, name)
    replicated = [p for p in method.parameters() if p.dim() == 0 and id(p) not in frozen_ids]
    fully_shard(method, mesh=mesh, mp_policy=policy, ignored_params={*frozen_parameters, *replicated})
    # The root warns that a method's output holds views (its detached logs): an in-place op on one would skip
    # the pre-backward hook. The loop only reads them (`step_loss += loss.detach()` adds into its own tensor).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor")
    return replicated


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """The mean over ranks of these parameters' gradients (what DDP or FSDP would reduce), in place."""
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.copy_(collectives.all_reduce_mean(parameter.grad))


def full_state_dict(method) -> dict[str, torch.Tensor]:
    """The method's trainable state dict with every sharded tensor gathered whole; every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {name: value.full_tensor() if isinstance(value, DTensor) else value
            for name, value in method.trainable_state_dict().items()}


def wrap(method: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The module the loop calls: DDP around the method when there are several ranks, else the method (also
    when `shard` made it an FSDP2 root, which does its own synchronisation)."""
    from torch.distributed.fsdp import FSDPModule

    if not info.enabled or isinstance(method, FSDPModule):
        return method
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=device_ids)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: torch.nn.Module, sync: bool):
    """A context in which backward accumulates gradients without the all-reduce (all but the last micro-batch):
    DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)` (unreduced gradients, unsharded meanwhile)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    if not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of the wrapped model's parameters (after DDP's all-reduce every rank
    holds the same gradients, so every rank clips alike; under FSDP2 the norm of the sharded gradients is
    reduced over the ranks, so it is the global one too); returns the norm before clipping."""
    module = model.module if hasattr(model, "module") else model
    norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
