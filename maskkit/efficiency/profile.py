"""A model's footprint, measured the way the Efficient Deep Learning survey asks (Menghani 2021, Sec 2 and its
"footprint" metrics): parameters, size, FLOPs, latency, throughput and peak memory, next to its quality.

`profile_model(model, example)` measures any module that maps an example batch to an output:

  parameters          total, trainable, and without the vocabulary table (the rows a text model looks up, not
                      multiplies: they cost memory, no FLOPs)
  size_bytes          the state dict written as safetensors (what `maskkit export` writes), header included
  flops_per_example   torch.utils.flop_counter over one forward at the throughput batch, divided by it (a
                      multiply-add counts 2)
  latency_ms          batch 1: median and 90th percentile of `repeats` timed forwards after `warmup` untimed ones
  throughput          examples per second at `batch`, from the median forward time
  peak_memory_bytes   the weights plus the largest total of activation tensors alive at once during a forward at
                      `batch` (counted by a dispatch mode that sees every tensor an operator returns, on any
                      device; on CUDA torch.cuda.max_memory_allocated is reported beside it)

Inference runs in eval mode under torch.inference_mode, in the model's dtype, with `torch.get_num_threads()`
threads (reported: latency depends on them).
"""

import contextlib
import re
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from maskkit.compiling import separate_cache_per_kernel_set
from maskkit.errors import MaskkitError
from maskkit.nn.quantized import Int8Linear


@dataclass
class Footprint:
    parameters: int
    trainable_parameters: int
    parameters_without_embeddings: int
    size_bytes: int
    flops_per_example: float
    latency_ms_median: float
    latency_ms_p90: float
    throughput_per_s: float
    batch: int
    peak_memory_bytes: int
    activation_peak_bytes: int
    cuda_max_allocated_bytes: int | None
    threads: int
    device: str
    dtype: str
    compiled: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def parameter_counts(model: nn.Module, embedding_tables: list[nn.Parameter] = ()) -> tuple[int, int, int]:
    """(total, trainable, total minus the given lookup tables); a parameter shared by two modules counts once."""
    unique = {id(p): p for p in model.parameters()}
    # An int8 layer's weights are buffers (maskkit.nn.quantized), but they are still the model's parameters.
    int8 = sum(m.weight_int8.numel() + m.weight_scale.numel() + (0 if m.bias is None else m.bias.numel())
               for m in model.modules() if isinstance(m, Int8Linear))
    total = sum(p.numel() for p in unique.values()) + int8
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    tables = sum(t.numel() for t in {id(t): t for t in embedding_tables}.values() if id(t) in unique)
    return total, trainable, total - tables


def safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as a safetensors file (shared tensors stored once, as safetensors does)."""
    from safetensors.torch import save

    state = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().cpu().contiguous()
    return len(save(state))


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def flops_per_example(model: Callable, example: tuple, batch: int) -> float:
    """FLOPs of one forward at `batch`, per example. torch's counter has no formula for the CPU flash-attention
    kernel that scaled_dot_product_attention runs on CPU (it would count attention as 0); it gets the one the
    GPU kernels use, 4 * B * H * Lq * Lk * d."""
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_attention: _attention_flops} if cpu_attention is not None else {}
    mapping[torch.ops.aten._int_mm] = _int_mm_flops         # int8 layers: a multiply-add counts 2 as in float
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(*example)
    return counter.get_total_flops() / batch


class LiveActivations(TorchDispatchMode):
    """Tracks the bytes of the storages that operators return while they are alive; `peak` is the most at once.

    A storage is counted once however many views of it exist, and released when the last tensor that this mode
    saw holding it is freed. Tensors that existed before the mode (weights, the input) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.holders: dict[int, int] = {}      # storage pointer -> tensors alive on it
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.holders[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in inputs and key not in self.holders):
                continue                       # an empty tensor, or a view of a tensor from outside the mode
            if key not in self.holders:
                self.holders[key], self.sizes[key] = 0, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.holders[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def activation_peak(model: Callable, example: tuple) -> int:
    mode = LiveActivations()
    with mode:
        output = model(*example)
    del output
    return mode.peak


def timed(model: Callable, example: tuple, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` forwards after `warmup` untimed ones (CUDA: synchronised)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        model(*example)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*example)
        sync()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], fraction: float) -> float:
    """The linear-interpolated percentile (numpy's default) of `values`."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text \
        or isinstance(error, MemoryError)


def _allocation(error: BaseException) -> str:
    """The allocation that failed, in GiB or TiB where the allocator says how many bytes (CPU: "you tried to allocate
    N bytes", CUDA: "Tried to allocate N GiB"), else the error's first line."""
    found = re.search(r"allocate (\d+) bytes", str(error))
    if found:
        gib = int(found.group(1)) / 2**30
        size = f"{gib:.1f} GiB" if gib < 1024 else f"{gib / 1024:.1f} TiB"
        return f"one tensor of {size} could not be allocated"
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def profile_model(model: nn.Module, make_example: Callable[[int], tuple], batch: int = 32, warmup: int = 3,
                  repeats: int = 20, embedding_tables: list[nn.Parameter] = (), forward: Callable | None = None,
                  compile: bool = False) -> Footprint:
    """The footprint of `model`: `make_example(n)` gives the positional inputs of a batch of n examples (on the
    model's device), `forward(*inputs)` runs it (default: the model itself). With `compile` the latency and
    throughput are those of torch.compile(forward) (compiled before the warm-up; FLOPs and memory are counted
    eagerly, as they are the same computation)."""
    if batch < 1 or warmup < 0 or repeats < 1:
        raise MaskkitError(f"profile needs batch >= 1, warmup >= 0 and repeats >= 1 (got {batch}, {warmup}, {repeats})")
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise MaskkitError(f"a {type(model).__name__} has no parameters: nothing to profile")
    device, dtype = parameter.device, parameter.dtype
    run = forward or model
    timed_run = torch.compile(run, dynamic=False) if compile else run
    was_training = model.training
    model.eval()
    total, trainable, without_tables = parameter_counts(model, embedding_tables)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    # Compiled for inference as it is deployed: with inductor's freezing, which folds the weights in as constants
    # (an int8 model's weights are then prepacked for the CPU's int8 matrix kernels: 1.97x fp32 compiled instead of
    # 1.46x without, benchmarks/int8_throughput.py). The weights do not change while they are timed.
    if compile:
        from torch._inductor import config as inductor_config

        separate_cache_per_kernel_set()

        frozen = inductor_config.patch(freezing=True)
    else:
        frozen = contextlib.nullcontext()
    try:
        with torch.inference_mode(), frozen:
            one, many = make_example(1), make_example(batch)
            latency = timed(timed_run, one, max(warmup, 2 if compile else 0), repeats, device)
            flops = flops_per_example(run, many, batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            throughput_times = timed(timed_run, many, max(min(warmup, 2), 2 if compile else 0), max(3, repeats // 4), device)
            cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            activations = activation_peak(run, many)
    except (RuntimeError, MemoryError) as error:
        if _out_of_memory(error):
            raise MaskkitError(f"--batch {batch} does not fit in memory on {device} ({_allocation(error)}); "
                               "give a smaller --batch") from None
        raise
    finally:
        model.train(was_training)
    return Footprint(
        parameters=total, trainable_parameters=trainable, parameters_without_embeddings=without_tables,
        size_bytes=safetensors_bytes(model), flops_per_example=flops,
        latency_ms_median=1000 * statistics.median(latency), latency_ms_p90=1000 * percentile(latency, 0.9),
        throughput_per_s=batch / statistics.median(throughput_times), batch=batch,
        peak_memory_bytes=weight_bytes + activations, activation_peak_bytes=activations,
        cuda_max_allocated_bytes=cuda_peak, threads=torch.get_num_threads(), device=str(device),
        dtype=str(dtype).removeprefix("torch."), compiled=compile)


def format_table(rows: list[tuple[str, Footprint]]) -> str:
    """A plain-text table of footprints, one row per named model."""
    header = ("model", "params", "w/o emb", "size MB", "GFLOP/ex", "lat ms (p50/p90)", "thru /s", "peak MB")
    lines = [header]
    for name, f in rows:
        lines.append((name, f"{f.parameters / 1e6:.2f}M", f"{f.parameters_without_embeddings / 1e6:.2f}M",
                      f"{f.size_bytes / 2**20:.1f}", f"{f.flops_per_example / 1e9:.3f}",
                      f"{f.latency_ms_median:.2f}/{f.latency_ms_p90:.2f}", f"{f.throughput_per_s:.0f} (b{f.batch})",
                      f"{f.peak_memory_bytes / 2**20:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)

