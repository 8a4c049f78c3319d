"""Would hand-written second derivatives make the energy step cheaper? An A/B of one energy train step (K = 2,
the energy/tiny ViT, batch 64, fp32) with PyTorch's own double backward of LayerNorm and GELU against closed forms
written here, in one process, the same weights and batch.

The profile of `benchmarks/energy_step.py --profile` puts a third of the energy step in elementwise work, much of
it in the double backward of LayerNorm (~70 ops per layer and inner step) and of GELU (~12). Below, each of the two
is an autograd Function whose forward and first backward are PyTorch's fused kernels and whose backward of the
backward is a closed form with fewer passes over the activations:

- GELU, y = x Phi(x): y' = Phi(x) + x phi(x), y'' = phi(x) (2 - x^2).
- LayerNorm, per row of width N, xhat = (x - mean) rstd, u = w * gy, dx = rstd P u with the projection
  P v = v - mean(v) - xhat mean(v xhat) (symmetric). For an incoming gradient v of dx:
  d/dgy = w * t and d/dw = sum over rows of gy * t, with t = rstd P v (one fused LayerNorm backward), and
  d/dx = -rstd (t mean(u xhat) + dx mean(v xhat) + xhat mean(v dx)); plus the terms of the weight and bias
  gradients' own incoming gradients (d/dgy += ggw xhat + ggb, d/dx += rstd P(gy ggw)).

Both are checked against PyTorch's with torch.autograd.gradcheck and gradgradcheck in float64 before timing, and
the two models' losses and gradients are checked equal. The answer (README, "The cost of the double backward"):
the step gets 1-3% faster, because the elementwise work is passes over whole activations bound by memory
bandwidth, not the number of ops; only a kernel that fuses each double backward into one pass would remove it.

    python benchmarks/energy_second_order.py            # ~2 minutes on 2 CPU cores
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from maskkit.config import OptimConfig
from maskkit.methods.energy import Energy, EnergyConfig
from maskkit.nn.transformer import ViTConfig
from maskkit.train.optim import build_optimizer

ENCODER = ViTConfig(image_size=32, patch_size=4, dim=128, depth=4, num_heads=4)     # energy/tiny
aten = torch.ops.aten
INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


class LayerNormFunction(torch.autograd.Function):
    """F.layer_norm over the last dimension, PyTorch's kernels forward and backward, LayerNormBackward's closed
    form for the backward of the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = aten.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        wanted = (True, weight is not None and ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        gx, gw, gb = LayerNormBackward.apply(gy, x, weight, bias, mean, rstd, wanted)
        return gx, gw, gb, None


class LayerNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, weight, bias, mean, rstd, wanted):
        gx, gw, gb = aten.native_layer_norm_backward(gy, x, (x.shape[-1],), mean, rstd, weight, bias, list(wanted))
        ctx.save_for_backward(gy, x, weight, mean, rstd, gx)
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, mean, rstd, gx = ctx.saved_tensors
        width = x.shape[-1]
        project = lambda v: aten.native_layer_norm_backward(v, x, (width,), mean, rstd, None, None,  # noqa: E731
                                                            [True, False, False])[0]             # rstd P v
        xhat = (x - mean) * rstd
        d_gy = d_x = d_w = None
        if ggx is not None:
            t = project(ggx)
            u = gy if weight is None else gy * weight
            d_x = (t * (u * xhat).mean(-1, keepdim=True)).add_(gx * (ggx * xhat).mean(-1, keepdim=True))
            d_x = d_x.add_(xhat * (ggx * gx).mean(-1, keepdim=True)).mul_(-rstd)
            d_gy = t if weight is None else t * weight
            if weight is not None and ctx.needs_input_grad[2]:
                d_w = (gy * t).reshape(-1, width).sum(0)
        if ggw is not None:
            d_gy = ggw * xhat if d_gy is None else d_gy.add_(ggw * xhat)
            d_x = project(gy * ggw) if d_x is None else d_x.add_(project(gy * ggw))
        if ggb is not None:
            d_gy = ggb.expand_as(gy).clone() if d_gy is None else d_gy.add_(ggb)
        return d_gy, d_x, d_w, None, None, None, None


class GELUFunction(torch.autograd.Function):
    """Exact GELU, PyTorch's kernels forward and backward, GELUBackward's closed form for the backward of the
    backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return aten.gelu(x)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        return GELUBackward.apply(gy, x)


class GELUBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x):
        ctx.save_for_backward(gy, x)
        return aten.gelu_backward(gy, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx):
        gy, x = ctx.saved_tensors
        d_gy = aten.gelu_backward(ggx, x) if ctx.needs_input_grad[0] else None
        d_x = None
        if ctx.needs_input_grad[1]:
            square = x * x                     # y'' = phi(x) (2 - x^2), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
            curvature = torch.add(torch.tensor(2 * INV_SQRT_2PI), square, alpha=-INV_SQRT_2PI)
            d_x = square.mul_(-0.5).exp_().mul_(curvature).mul_(ggx).mul_(gy)
        return d_gy, d_x


NATIVE = (F.layer_norm, F.gelu)


def closed_forms(on: bool) -> None:
    """Route nn.LayerNorm and the ViT's GELU (both call torch.nn.functional) through the Functions above."""
    if on:
        F.layer_norm = lambda x, shape, weight=None, bias=None, eps=1e-5: LayerNormFunction.apply(x, weight, bias, eps)
        F.gelu = lambda x, approximate="none": GELUFunction.apply(x)
    else:
        F.layer_norm, F.gelu = NATIVE


def check() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    layer_norm = lambda x, w, b: LayerNormFunction.apply(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(layer_norm, (x, weight, bias))
    assert torch.autograd.gradgradcheck(layer_norm, (x, weight, bias))
    assert torch.autograd.gradcheck(GELUFunction.apply, (x,)) and torch.autograd.gradgradcheck(GELUFunction.apply, (x,))
    print("closed forms: gradcheck and gradgradcheck pass (LayerNorm with weight and bias, GELU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    check()
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(args.batch, 3, 32, 32, generator=generator), "seed": torch.arange(args.batch)}
    runs = []
    for on in (False, True):
        torch.manual_seed(0)
        model = Energy(EnergyConfig(encoder=ENCODER, inner_steps=2)).train()
        runs.append((on, model, build_optimizer(model, OptimConfig(), peak_lr=1e-4)))
    gradients = []
    for on, model, _ in runs:
        closed_forms(on)
        loss = model(batch).loss
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = gradients
    worst = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads_a, grads_b, strict=True))
    print(f"loss PyTorch {loss_a.item():.6f}, closed forms {loss_b.item():.6f}; largest relative gradient difference "
          f"{worst:.1e} over {len(grads_a)} tensors")
    assert torch.equal(loss_a, loss_b) and worst < 1e-3

    seconds = {False: [], True: []}
    for round_index in range(args.rounds + 2):
        for on, model, optimizer in (runs if round_index % 2 else runs[::-1]):
            closed_forms(on)
            start = time.perf_counter()
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index >= 2:    # two warm-up rounds
                seconds[on].append(time.perf_counter() - start)
    closed_forms(False)
    native, closed = statistics.median(seconds[False]), statistics.median(seconds[True])
    paired = statistics.median(a / b for a, b in zip(seconds[False], seconds[True], strict=True))
    print(f"energy K = 2 step, batch {args.batch}, {torch.get_num_threads()} threads, {args.rounds} rounds: PyTorch's "
          f"double backward {1e3 * native:.0f} ms, closed forms {1e3 * closed:.0f} ms; speed-up {paired:.3f}x "
          "(median of within-round ratios)")


if __name__ == "__main__":
    main()
