"""What the double backward of energy-based pretraining costs: one train step (forward, backward, AdamW)
of the energy method with K = 1, 2, 3 inner steps, against an MAE step (mask 0.75) and a plain supervised
step (the ViT, a linear head, cross-entropy) on the same backbone, in one process.

Reported: images/s (medians over rounds that time every model in turn), FLOPs per step (counted by
torch.utils.flop_counter on the math attention kernel, which the energy method must use for its second
derivative anyway), and both as ratios to the supervised step.

    python benchmarks/energy_step.py                 # ~2 minutes on 2 CPU cores
    python benchmarks/energy_step.py --profile       # + where the time goes: supervised vs energy K = 2

--profile runs one more step of the supervised model (on the math attention kernel too, so attention is
counted alike) and of energy K = 2 under torch.profiler, and splits each step's CPU time by kind of op: the
matrix multiplies (whose time should follow the FLOP ratio) and everything that FLOP counting does not see.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from maskkit.config import OptimConfig
from maskkit.methods.energy import Energy, EnergyConfig
from maskkit.methods.mae import MAE, MAEConfig
from maskkit.nn.transformer import ViT, ViTConfig
from maskkit.train.optim import build_optimizer

ENCODER = ViTConfig(image_size=32, patch_size=4, dim=128, depth=4, num_heads=4)     # mae/tiny, energy/tiny


class CountFlops(TorchDispatchMode):
    """FLOPs of every op with a formula in torch.utils.flop_counter. FlopCounterMode itself cannot be used:
    its module tracker hooks break torch.autograd.grad, which the energy step calls inside its forward."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


class Supervised(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ViT(ENCODER)
        self.head = torch.nn.Linear(ENCODER.dim, 10)

    def forward(self, batch):
        return F.cross_entropy(self.head(self.encoder.features(batch["images"], "mean")), batch["label"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="split supervised and energy K = 2 by kind of op")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(args.batch, 3, 32, 32, generator=generator),
             "label": torch.randint(0, 10, (args.batch,), generator=generator),
             "seed": torch.arange(args.batch)}
    torch.manual_seed(0)
    models = {"supervised (ViT + linear head)": (Supervised(), lambda m: m(batch))}
    models["MAE, mask 0.75"] = (MAE(MAEConfig(encoder=ENCODER, decoder_dim=128, decoder_depth=2, decoder_num_heads=4)),
                                lambda m: m(batch).loss)
    for k in (1, 2, 3):
        models[f"energy, K = {k}"] = (Energy(EnergyConfig(encoder=ENCODER, inner_steps=k)), lambda m: m(batch).loss)

    steps, flops = {}, {}
    for name, (model, loss_fn) in models.items():
        model.train()
        with sdpa_kernel(SDPBackend.MATH), CountFlops() as counter:
            loss_fn(model).backward()
        flops[name] = counter.total
        model.zero_grad(set_to_none=True)
        optimizer = build_optimizer(model, OptimConfig(), peak_lr=1e-4)

        def step(model=model, loss_fn=loss_fn, optimizer=optimizer):
            loss_fn(model).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        steps[name] = step

    speeds = {name: [] for name in models}
    for round_index in range(args.rounds):
        names = list(models)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            speeds[name].append(args.batch / (time.perf_counter() - start))
    base = "supervised (ViT + linear head)"
    print(f"batch {args.batch}, fp32, {torch.get_num_threads()} threads, {args.rounds} rounds, torch {torch.__version__}")
    print(f"{'step':<32} {'images/s':>9} {'time vs sup.':>12} {'GFLOP':>8} {'FLOPs vs sup.':>13}")
    for name in models:
        speed = statistics.median(speeds[name])
        slowdown = statistics.median(b / a for a, b in zip(speeds[name], speeds[base], strict=True))
        print(f"{name:<32} {speed:>9.1f} {slowdown:>11.2f}x {flops[name] / 1e9:>8.2f} {flops[name] / flops[base]:>12.2f}x")
    if args.profile:
        profile_kinds(steps, base, "energy, K = 2", flops)


KINDS = {  # aten op name -> kind; ops not listed are "other elementwise / reductions"
    "matrix multiplies": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_convolution_mode",
                          "aten::mkldnn_convolution", "aten::convolution_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "LayerNorm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "copies / layout": ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::_to_copy",
                        "aten::index_select", "aten::gather", "aten::scatter_add_", "aten::fill_", "aten::zero_"),
    "optimizer": ("aten::_fused_adamw_",),
}


def profile_kinds(steps: dict, base: str, energy: str, flops: dict, repeats: int = 3) -> None:
    """Self CPU time per kind of op, per step (median-free: the mean of `repeats` profiled steps)."""
    from torch.profiler import ProfilerActivity, profile

    kind_of = {op: kind for kind, ops in KINDS.items() for op in ops}
    split, top_ops = {}, {}
    for name in (base, energy):
        with sdpa_kernel(SDPBackend.MATH):   # the energy step runs on it; so does the baseline here
            steps[name]()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(repeats):
                    steps[name]()
        totals, ops = {}, {}
        for event in prof.key_averages():
            if event.key.startswith("aten::") or event.key.startswith("autograd::"):
                kind = kind_of.get(event.key, "other elementwise / reductions")
                totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e3 / repeats
                ops[event.key] = (event.self_cpu_time_total / 1e3 / repeats, event.count // repeats)
        split[name], top_ops[name] = totals, ops
    kinds = sorted({k for t in split.values() for k in t}, key=lambda k: -split[energy].get(k, 0.0))
    print(f"\nself CPU ms per step (torch.profiler, {repeats} steps each, both on the math attention kernel)")
    print(f"{'kind of op':<32} {'supervised':>11} {'energy K=2':>11} {'ratio':>7}")
    for kind in kinds:
        a, b = split[base].get(kind, 0.0), split[energy].get(kind, 0.0)
        print(f"{kind:<32} {a:>11.1f} {b:>11.1f} {b / a if a else float('nan'):>6.2f}x")
    a, b = sum(split[base].values()), sum(split[energy].values())
    print(f"{'total':<32} {a:>11.1f} {b:>11.1f} {b / a:>6.2f}x   (FLOPs {flops[energy] / flops[base]:.2f}x)")
    print("\nthe energy step's 12 costliest ops (self CPU ms per step, calls per step; supervised alongside)")
    for op, (ms, calls) in sorted(top_ops[energy].items(), key=lambda item: -item[1][0])[:12]:
        base_ms, base_calls = top_ops[base].get(op, (0.0, 0))
        print(f"  {op:<40} {ms:8.1f} ms {calls:6d} calls    supervised {base_ms:7.1f} ms {base_calls:5d} calls")


if __name__ == "__main__":
    main()
