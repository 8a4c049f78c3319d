"""MAE train-step throughput: maskkit vs Hugging Face `ViTMAEForPreTraining`, in one process.

One train step = forward + backward + AdamW step on one batch. Both models have the same size
(image 32, patch 4, width 192, depth 6, 3 heads, MLP 768; decoder 128 wide, depth 2, 4 heads, MLP 512),
the same weights (maskkit's are copied into HF, and the losses are checked equal), the same images and
the same masking noise. HF runs with attn_implementation="sdpa", its fastest path that trains on CPU
("eager" is no faster here, flash_attention_2 needs CUDA, flex_attention has no CPU backward in torch 2.13).

The machine is noisy, so each round times every model once, the order rotating between rounds; rounds
during which other processes kept the CPU busy (from /proc/stat) are left out, and the table reports
medians over the rest, ratios (vs HF, speed-up vs mask 0) as medians of ratios within a round. The
FLOP-ideal speed-up of a mask ratio is FLOPs(mask 0) / FLOPs(mask r) of forward + backward, counted
with FlopCounterMode.

    python benchmarks/mae_throughput.py                 # fp32 on CPU, ~3 minutes on 2 quiet cores
    python benchmarks/mae_throughput.py --device cuda   # bf16 autocast
    python benchmarks/mae_throughput.py --compile --mask-ratios 0.75   # + both models under torch.compile

With --compile every model also runs compiled in place (Module.compile(), what train.compile=true does), and
the compilation's seconds (the first steps) are printed: the price a run pays once.
"""

import argparse
import copy
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maskkit.config import OptimConfig
from maskkit.interop.hf import hf_config_from_mae, mae_to_hf_state_dict
from maskkit.methods.mae import MAE, MAEConfig, normalize_patches
from maskkit.nn.transformer import ViTConfig
from maskkit.train.optim import build_optimizer

MASK_RATIOS = (0.0, 0.5, 0.75)
ENCODER = ViTConfig(image_size=32, patch_size=4, dim=192, depth=6, num_heads=3, mlp_ratio=4.0, norm_eps=1e-6)
DECODER = dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=4.0)


def build_maskkit(mask_ratio: float) -> MAE:
    torch.manual_seed(0)  # the same weights at every mask ratio
    return MAE(MAEConfig(encoder=ENCODER, mask_ratio=mask_ratio, norm_pix_loss=True, **DECODER))


def build_hf(mae: MAE):
    """ViTMAEForPreTraining of the same config and weights as `mae`, on PyTorch's sdpa attention."""
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining(hf_config_from_mae(mae.cfg))
    model.set_attn_implementation("sdpa")
    model.load_state_dict(mae_to_hf_state_dict(mae.state_dict(), mae.cfg), strict=True)
    return model


def hf_loss(model, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=images, noise=noise)
    if model.config.mask_ratio > 0:
        return out.loss
    # At mask 0 HF's loss is 0/0 (mask.sum() == 0); use maskkit's convention, the mean over all patches.
    return ((out.logits - normalize_patches(model.patchify(images))) ** 2).mean()


def cpu_seconds_elsewhere() -> float:
    """CPU seconds the whole machine has spent busy (or stolen by the hypervisor) minus this process's,
    since boot; the difference over a timed interval is the load other processes put on our cores.
    NaN where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / ticks - time.process_time()


def count_flops(loss_fn) -> int:
    """Forward + backward FLOPs. The math attention kernel is used because FlopCounterMode has no
    formula for the CPU flash kernel (it would count attention as 0); the math kernel's matmuls are
    the same attention FLOPs."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1, help="timed train steps per model per round")
    parser.add_argument("--rounds", type=int, default=30, help="quiet rounds wanted (medians are reported)")
    parser.add_argument("--max-seconds", type=float, default=200, help="stop timing after this long regardless")
    parser.add_argument("--warmup", type=int, default=3, help="untimed train steps per model before round 1")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="leave out rounds in which other processes kept more than this many cores busy",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=list(MASK_RATIOS))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, ENCODER.image_size, ENCODER.image_size, generator=generator).to(device)
    num_patches = (ENCODER.image_size // ENCODER.patch_size) ** 2
    noise = torch.rand(args.batch, num_patches, generator=generator).to(device)  # shared by every model

    mask_ratios = sorted(set([0.0, *args.mask_ratios]))
    frameworks = ["maskkit", "hf"] + (["maskkit compiled", "hf compiled"] if args.compile else [])
    runs = []  # (framework, mask_ratio, model, loss_fn)
    for mask_ratio in mask_ratios:
        mk = build_maskkit(mask_ratio)
        hf = build_hf(mk)
        mk, hf = mk.to(device), hf.to(device)
        runs.append(("maskkit", mask_ratio, mk, lambda m=mk: m({"images": images, "noise": noise}).loss))
        runs.append(("hf", mask_ratio, hf, lambda m=hf: hf_loss(m, images, noise)))
    if args.compile:
        for framework, mask_ratio, model, _ in list(runs):
            twin = copy.deepcopy(model)
            twin.compile()
            loss_fn = ((lambda m=twin: m({"images": images, "noise": noise}).loss) if framework == "maskkit"
                       else (lambda m=twin: hf_loss(m, images, noise)))
            runs.append((f"{framework} compiled", mask_ratio, twin, loss_fn))

    # Same computation: equal losses from the same weights, images and noise.
    with torch.no_grad():
        for i in range(0, 2 * len(mask_ratios), 2):
            (_, mask_ratio, _, mk_loss), (_, _, _, hf_loss_fn) = runs[i], runs[i + 1]
            a, b = mk_loss().item(), hf_loss_fn().item()
            print(f"parity mask {mask_ratio:.2f}: loss maskkit {a:.6f}  hf {b:.6f}  |diff| {abs(a - b):.1e}")

    flops = {(fw, r): count_flops(fn) for fw, r, _, fn in runs[: 2 * len(mask_ratios)]}
    for (fw, r, _, _) in runs[2 * len(mask_ratios):]:
        flops[(fw, r)] = flops[(fw.removesuffix(" compiled"), r)]   # the same model, compiled
    for _, _, model, _ in runs:
        model.zero_grad(set_to_none=True)

    steps = []
    for _, _, model, loss_fn in runs:
        model.train()
        # maskkit's optimizer for both (it takes any module): AdamW, no decay on norms, biases and tokens.
        optimizer = build_optimizer(model, OptimConfig(), peak_lr=1.5e-4)

        def step(model=model, loss_fn=loss_fn, optimizer=optimizer):
            with autocast:
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps.append(step)

    print(
        f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"hf attention {runs[1][2].config._attn_implementation}, "
        f"{args.steps} step(s) per measurement, torch {torch.__version__}"
    )
    for (framework, mask_ratio, _, _), step in zip(runs, steps, strict=True):
        start = time.perf_counter()
        for _ in range(args.warmup if "compiled" not in framework else max(args.warmup, 3)):
            step()
        sync()
        if "compiled" in framework:
            print(f"{framework} at mask {mask_ratio:.2f}: warm-up incl. compilation {time.perf_counter() - start:.1f} s")

    # Two threads on two cores: another process on either core stalls every parallel op (10x slower
    # here), so a round during which other processes kept a core busy says nothing about the models
    # and is left out. Quiet rounds still jitter by +-15% from step to step (the host), so ratios are
    # taken between measurements of the same round, which are seconds apart, and the median reported.
    rounds = []  # per quiet round: images/s of each run
    timing_start, round_index = time.perf_counter(), 0
    while len(rounds) < args.rounds:
        if time.perf_counter() - timing_start > args.max_seconds:
            print(f"WARNING: time is up with {len(rounds)} quiet rounds of {args.rounds} wanted")
            break
        order = list(range(len(runs)))
        shift = round_index % len(order)
        order = order[shift:] + order[:shift]
        if round_index % 2:
            order.reverse()
        speeds, loads = [0.0] * len(runs), [0.0] * len(runs)
        for i in order:
            sync()
            start, elsewhere = time.perf_counter(), cpu_seconds_elsewhere()
            for _ in range(args.steps):
                steps[i]()
            sync()
            seconds = time.perf_counter() - start
            speeds[i] = args.batch * args.steps / seconds
            loads[i] = (cpu_seconds_elsewhere() - elsewhere) / seconds
        round_index += 1
        busy = max(loads) > args.max_other_load
        if not busy:
            rounds.append(speeds)
        print(
            f"round {round_index:2d}{' (busy, left out)' if busy else ''}: "
            + "  ".join(f"{fw}@{r:.2f}={speeds[j]:.0f}" for j, (fw, r, _, _) in enumerate(runs))
        )
    if len(rounds) < 3:
        raise SystemExit(f"only {len(rounds)} quiet rounds; rerun on a quieter machine or raise --max-seconds")

    index = {(fw, r): j for j, (fw, r, _, _) in enumerate(runs)}
    column = lambda key: [speeds[index[key]] for speeds in rounds]
    paired = lambda a, b: statistics.median(x / y for x, y in zip(column(a), column(b), strict=True)) if a != b else 1.0
    results = []
    header = (
        f"{'model':16} {'mask':>5} {'images/s':>9} {'p25-p75':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} "
        f"{'vs HF':>6} {'speed-up':>8} {'ideal':>6} {'meas/ideal':>10}"
    )
    print(
        f"\nmedians over {len(rounds)} quiet rounds of {round_index}; 'vs HF' and 'speed-up' are medians of "
        "ratios within a round\n" + header + "\n" + "-" * len(header)
    )
    for framework in frameworks:
        for mask_ratio in mask_ratios:
            key = (framework, mask_ratio)
            quartiles = statistics.quantiles(column(key), n=4)
            row = {
                "model": framework,
                "mask_ratio": mask_ratio,
                "images_per_s": statistics.median(column(key)),
                "images_per_s_p25": quartiles[0],
                "images_per_s_p75": quartiles[2],
                "gflop_per_step": flops[key] / 1e9,
                "achieved_gflop_per_s": flops[key] / 1e9 * statistics.median(column(key)) / args.batch,
                "vs_hf": paired(key, ("hf", mask_ratio)),
                "speedup_vs_mask0": paired(key, (framework, 0.0)),
                "flop_ideal_speedup": flops[(framework, 0.0)] / flops[key],
            }
            row["measured_over_ideal"] = row["speedup_vs_mask0"] / row["flop_ideal_speedup"]
            results.append(row)
            print(
                f"{framework:16} {mask_ratio:5.2f} {row['images_per_s']:9.1f} {quartiles[0]:4.0f}-{quartiles[2]:<4.0f} "
                f"{row['gflop_per_step']:10.2f} {row['achieved_gflop_per_s']:8.1f} {row['vs_hf']:5.2f}x "
                f"{row['speedup_vs_mask0']:7.2f}x {row['flop_ideal_speedup']:5.2f}x {row['measured_over_ideal']:9.0%}"
            )

    if args.compile and 0.75 in mask_ratios:
        print(f"compiled: maskkit compiled / HF eager at mask 0.75 = "
              f"{paired(('maskkit compiled', 0.75), ('hf', 0.75)):.2f}x, maskkit compiled / HF compiled = "
              f"{paired(('maskkit compiled', 0.75), ('hf compiled', 0.75)):.2f}x, maskkit compiled / maskkit eager = "
              f"{paired(('maskkit compiled', 0.75), ('maskkit', 0.75)):.2f}x")
    vs_hf = paired(("maskkit", 0.75), ("hf", 0.75))
    of_ideal = next(r["measured_over_ideal"] for r in results if r["model"] == "maskkit" and r["mask_ratio"] == 0.75)
    verdict = lambda ok: "PASS" if ok else "MISS"
    print(
        f"\ntargets: maskkit/HF at mask 0.75 = {vs_hf:.2f}x (>= 1.15x: {verdict(vs_hf >= 1.15)}); "
        f"maskkit mask-0.75/mask-0 speed-up = {of_ideal:.0%} of FLOP-ideal (>= 90%: {verdict(of_ideal >= 0.9)})"
    )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "device": str(device),
                    "results": results,
                    "quiet_rounds": [
                        {f"{fw}@{r}": v for (fw, r, _, _), v in zip(runs, speeds, strict=True)} for speeds in rounds
                    ],
                    "targets": {"maskkit_over_hf_at_0.75": vs_hf, "speedup_0.75_over_ideal": of_ideal},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
