"""MAE train-step throughput: maskkit vs Hugging Face `ViTMAEForPreTraining`, in one process.

One train step = forward + backward + AdamW step on one batch. Both models have the same size
(image 32, patch 4, width 192, depth 6, 3 heads, MLP 768; decoder 128 wide, depth 2, 4 heads, MLP 512),
the same weights (maskkit's are copied into HF, and the losses are checked equal), the same images and
the same masking noise. HF runs with attn_implementation="sdpa", its fastest path on CPU
(flash_attention_2 needs CUDA; flex_attention without torch.compile is slower than sdpa).

The machine is noisy, so each round times every model once, the order rotating between rounds, and
the table reports the median over rounds. The FLOP-ideal speed-up of a mask ratio is
FLOPs(mask 0) / FLOPs(mask r) of maskkit's forward + backward, counted with FlopCounterMode.

    PYTHONPATH=. python benchmarks/mae_throughput.py                # fp32 on CPU, ~3 minutes on 2 cores
    PYTHONPATH=. python benchmarks/mae_throughput.py --device cuda  # bf16 autocast
"""

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maskkit.methods.mae import MAE, MAEConfig, normalize_patches
from maskkit.nn.transformer import ViTConfig

MASK_RATIOS = (0.0, 0.5, 0.75)
ENCODER = ViTConfig(image_size=32, patch_size=4, dim=192, depth=6, num_heads=3, mlp_ratio=4.0, norm_eps=1e-6)
DECODER = dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=4.0)


def build_maskkit(mask_ratio: float) -> MAE:
    torch.manual_seed(0)   # the same weights at every mask ratio
    return MAE(MAEConfig(encoder=ENCODER, mask_ratio=mask_ratio, norm_pix_loss=True, **DECODER))


def build_hf(mask_ratio: float, weights_from: MAE):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=ENCODER.image_size, patch_size=ENCODER.patch_size, hidden_size=ENCODER.dim,
        num_hidden_layers=ENCODER.depth, num_attention_heads=ENCODER.num_heads,
        intermediate_size=int(ENCODER.dim * ENCODER.mlp_ratio), qkv_bias=ENCODER.qkv_bias,
        decoder_hidden_size=DECODER["decoder_dim"], decoder_num_hidden_layers=DECODER["decoder_depth"],
        decoder_num_attention_heads=DECODER["decoder_num_heads"],
        decoder_intermediate_size=int(DECODER["decoder_dim"] * DECODER["decoder_mlp_ratio"]),
        layer_norm_eps=ENCODER.norm_eps, mask_ratio=mask_ratio, norm_pix_loss=True,
    )
    model = ViTMAEForPreTraining._from_config(config, attn_implementation="sdpa")
    model.load_state_dict(hf_state_dict(weights_from))
    return model


def hf_state_dict(mae: MAE) -> dict[str, torch.Tensor]:
    """maskkit MAE weights under ViTMAEForPreTraining's names; the fused qkv is split into q, k, v."""
    renames = [
        ("encoder.patch_embed.", "vit.embeddings.patch_embeddings.projection."),
        ("encoder.cls_token", "vit.embeddings.cls_token"),
        ("encoder.blocks.", "vit.layers."),
        ("encoder.norm.", "vit.layernorm."),
        ("decoder_blocks.", "decoder.decoder_layers."),
        ("decoder_", "decoder.decoder_"),
        ("mask_token", "decoder.mask_token"),
        (".norm1.", ".layernorm_before."),
        (".norm2.", ".layernorm_after."),
        (".attn.proj.", ".attention.o_proj."),
    ]
    out = {}
    for key, value in mae.state_dict().items():
        for old, new in renames:
            if key.startswith(old) or (old.startswith(".") and old in key):
                key = key.replace(old, new, 1)
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[key.replace(".attn.qkv.", f".attention.{name}_proj.")] = part.clone()
        else:
            out[key] = value.clone()
    # The fixed sin-cos tables too: transformers 5.24 leaves them all-zero in a randomly initialised model.
    cls_position = torch.zeros_like(mae.encoder.pos_embed[:, :1])
    out["vit.embeddings.position_embeddings"] = torch.cat([cls_position, mae.encoder.pos_embed], dim=1)
    out["decoder.decoder_pos_embed"] = mae.decoder_pos_embed.clone()
    return out


def hf_loss(model, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=images, noise=noise)
    if model.config.mask_ratio > 0:
        return out.loss
    # At mask 0 HF's loss is 0/0 (mask.sum() == 0); use maskkit's convention, the mean over all patches.
    return ((out.logits - normalize_patches(model.patchify(images))) ** 2).mean()


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
    parser.add_argument("--steps", type=int, default=4, help="timed train steps per model per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median round is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed train steps per model before round 1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, ENCODER.image_size, ENCODER.image_size, generator=generator).to(device)
    num_patches = (ENCODER.image_size // ENCODER.patch_size) ** 2
    noise = torch.rand(args.batch, num_patches, generator=generator).to(device)   # shared by every model

    runs = []   # (framework, mask_ratio, model, loss_fn)
    for mask_ratio in MASK_RATIOS:
        mk = build_maskkit(mask_ratio)
        hf = build_hf(mask_ratio, weights_from=mk)
        mk, hf = mk.to(device), hf.to(device)
        runs.append(("maskkit", mask_ratio, mk, lambda m=mk: m({"images": images, "noise": noise}).loss))
        runs.append(("hf", mask_ratio, hf, lambda m=hf: hf_loss(m, images, noise)))

    # Same computation: equal losses from the same weights, images and noise.
    with torch.no_grad():
        for i in range(0, len(runs), 2):
            (_, mask_ratio, _, mk_loss), (_, _, _, hf_loss_fn) = runs[i], runs[i + 1]
            a, b = mk_loss().item(), hf_loss_fn().item()
            print(f"parity mask {mask_ratio:.2f}: loss maskkit {a:.6f}  hf {b:.6f}  |diff| {abs(a - b):.1e}")

    flops = {(fw, r): count_flops(fn) for fw, r, _, fn in runs}
    for _, _, model, _ in runs:
        model.zero_grad(set_to_none=True)

    steps = []
    for _, _, model, loss_fn in runs:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)

        def step(model=model, loss_fn=loss_fn, optimizer=optimizer):
            with autocast:
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps.append(step)

    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps, torch {torch.__version__}")
    for step in steps:
        for _ in range(args.warmup):
            step()
    sync()

    per_round = [[] for _ in runs]   # images/s of each run in each round
    for round_index in range(args.rounds):
        order = list(range(len(runs)))
        shift = round_index % len(order)
        order = order[shift:] + order[:shift]
        if round_index % 2:
            order.reverse()
        for i in order:
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[i]()
            sync()
            per_round[i].append(args.batch * args.steps / (time.perf_counter() - start))
        print(f"round {round_index + 1}: " + "  ".join(
            f"{fw}@{r:.2f}={per_round[j][-1]:.0f}" for j, (fw, r, _, _) in enumerate(runs)))

    speed = {(fw, r): statistics.median(per_round[j]) for j, (fw, r, _, _) in enumerate(runs)}
    spread = {(fw, r): (min(per_round[j]), max(per_round[j])) for j, (fw, r, _, _) in enumerate(runs)}
    results = []
    header = (f"{'model':8} {'mask':>5} {'images/s':>9} {'min-max':>11} {'GFLOP/step':>10} {'GFLOP/s':>8} "
              f"{'vs HF':>6} {'speed-up':>8} {'ideal':>6} {'meas/ideal':>10}")
    print("\n" + header + "\n" + "-" * len(header))
    for framework in ("maskkit", "hf"):
        for mask_ratio in MASK_RATIOS:
            key = (framework, mask_ratio)
            ips = speed[key]
            row = {
                "model": framework, "mask_ratio": mask_ratio, "images_per_s": ips,
                "images_per_s_min": spread[key][0], "images_per_s_max": spread[key][1],
                "vs_hf": ips / speed[("hf", mask_ratio)],
                "speedup_vs_mask0": ips / speed[(framework, 0.0)],
            }
            if key in flops:
                row["gflop_per_step"] = flops[key] / 1e9
                row["achieved_gflop_per_s"] = flops[key] / 1e9 * ips / args.batch
                row["flop_ideal_speedup"] = flops[(framework, 0.0)] / flops[key]
                row["measured_over_ideal"] = row["speedup_vs_mask0"] / row["flop_ideal_speedup"]
            results.append(row)
            fmt = lambda name, spec: format(row[name], spec) if name in row else "-"  # noqa: E731
            print(f"{framework:8} {mask_ratio:5.2f} {ips:9.1f} {spread[key][0]:5.0f}-{spread[key][1]:<5.0f} "
                  f"{fmt('gflop_per_step', '10.2f')} {fmt('achieved_gflop_per_s', '8.1f')} "
                  f"{row['vs_hf']:5.2f}x {row['speedup_vs_mask0']:7.2f}x {fmt('flop_ideal_speedup', '5.2f')}x "
                  f"{fmt('measured_over_ideal', '9.0%')}")

    vs_hf = speed[("maskkit", 0.75)] / speed[("hf", 0.75)]
    of_ideal = next(r["measured_over_ideal"] for r in results if r["model"] == "maskkit" and r["mask_ratio"] == 0.75)
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    print(f"\ntargets: maskkit/HF at mask 0.75 = {vs_hf:.2f}x (>= 1.15x: {verdict(vs_hf >= 1.15)}); "
          f"maskkit mask-0.75/mask-0 speed-up = {of_ideal:.0%} of FLOP-ideal (>= 90%: {verdict(of_ideal >= 0.9)})")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "results": results, "per_round": {f"{fw}@{r}": per_round[j] for j, (fw, r, _, _) in enumerate(runs)},
                       "targets": {"maskkit_over_hf_at_0.75": vs_hf, "speedup_0.75_over_ideal": of_ideal}}, f, indent=2)


if __name__ == "__main__":
    main()
