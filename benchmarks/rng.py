"""Per-sample random numbers: maskkit's vectorised counter-based hash against `torch.rand` of the same shape.

The draw MAE makes per micro-batch (a mask noise per patch) at ImageNet scale: 4096 samples x 196 patches,
from the samples' (epoch, index) to the numbers, on one device. Also timed: the per-sample generator
loop maskkit used before (one torch.Generator per sample, seeded in Python), for the record.

    python benchmarks/rng.py                      # CPU
    python benchmarks/rng.py --device cuda
"""

import argparse
import statistics
import time

import torch

from maskkit import rng
from maskkit.rng import Stream

_MASK64 = (1 << 64) - 1


def per_sample_generators(seed: int, epochs: torch.Tensor, indices: torch.Tensor, count: int) -> torch.Tensor:
    """The old way: a Python seed per sample, then one generator per sample, copied to the device."""
    rows, generator = [], torch.Generator()
    for epoch, index in zip(epochs.tolist(), indices.tolist(), strict=True):
        generator.manual_seed(rng.scalar_seed(seed, epoch, index, Stream.MASK))
        rows.append(torch.rand(count, generator=generator))
    return torch.stack(rows).to(epochs.device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after two warm-ups."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--count", type=int, default=196)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    epochs = torch.full((args.batch,), 3, dtype=torch.long, device=device)
    indices = torch.randperm(100_000, device=device)[: args.batch]

    def maskkit_draw():
        return rng.uniform(rng.sample_keys(0, epochs, indices), (args.count,), Stream.MASK)

    results = {
        "torch.rand (global generator, not per-sample)": timed(
            lambda: torch.rand(args.batch, args.count, device=device), device, args.repeats),
        "maskkit rng: sample_keys + uniform": timed(maskkit_draw, device, args.repeats),
        "  of which sample_keys": timed(lambda: rng.sample_keys(0, epochs, indices), device, args.repeats),
        "per-sample torch.Generator loop (before)": timed(
            lambda: per_sample_generators(0, epochs, indices, args.count), device, max(3, args.repeats // 10)),
    }
    baseline = results["torch.rand (global generator, not per-sample)"]
    print(f"{args.batch} x {args.count} uniform draw on {device} ({torch.get_num_threads()} threads), median ms")
    for name, ms in results.items():
        print(f"{name:<48} {ms:8.2f} ms  {ms / baseline:6.1f}x torch.rand")


if __name__ == "__main__":
    main()
