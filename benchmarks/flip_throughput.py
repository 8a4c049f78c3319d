"""FLIP train-step throughput and activation memory at mask 0 / 0.5 / 0.75, next to Hugging Face CLIPModel.

One process, the recipe flip/tiny's sizes (ViT 32 px / patch 4 / width 128 / depth 4, text width 128 /
depth 2, context 24, batch 128), fp32, forward + backward + AdamW. HF's CLIPModel of the same widths and
depths runs unmasked (its own architecture: learned positions, causal text tower, QuickGELU). Reported:
pairs/s (medians over rounds; each round times every model once, in a rotating order, and ratios are
taken within a round), FLOPs per step (torch.utils.flop_counter, math attention kernel), the FLOP-ideal
speed-up of masking, and activation memory: bytes autograd saves for the backward pass (a device-neutral
measure; on CUDA also the peak allocated memory).

    python benchmarks/flip_throughput.py                   # ~2 minutes on 2 quiet CPU cores
    python benchmarks/flip_throughput.py --device cuda --size base --batch 256   # ViT-B/16, bf16 autocast
    python benchmarks/flip_throughput.py --compile   # + unmasked FLIP and CLIPModel under torch.compile

With --compile, unmasked FLIP and HF's CLIPModel also run compiled in place (Module.compile(), what
train.compile=true does); their FLOPs and activation memory are the eager twins' ("vs HF" stays against eager HF).
"""

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maskkit.config import OptimConfig
from maskkit.methods.flip import FLIP, FLIPConfig
from maskkit.nn.transformer import TextConfig, ViTConfig
from maskkit.train.optim import build_optimizer

SIZES = {
    # recipe flip/tiny
    "tiny": (ViTConfig(image_size=32, patch_size=4, dim=128, depth=4, num_heads=4),
             TextConfig(vocab_size=256, context_length=24, dim=128, depth=2, num_heads=4), 128),
    # recipe flip/vit_b16 (FLIP's ViT-B/16 with CLIP's 12-layer, 512-wide text tower), for a GPU
    "base": (ViTConfig(image_size=224, patch_size=16, dim=768, depth=12, num_heads=12),
             TextConfig(vocab_size=30522, context_length=32, dim=512, depth=12, num_heads=8), 512),
}
ENCODER, TEXT, EMBED = SIZES["tiny"]


def build_flip(mask_ratio: float) -> FLIP:
    torch.manual_seed(0)
    return FLIP(FLIPConfig(encoder=ENCODER, text=TEXT, embed_dim=EMBED, mask_ratio=mask_ratio))


def build_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=TEXT.vocab_size, hidden_size=TEXT.dim, intermediate_size=4 * TEXT.dim,
                         num_hidden_layers=TEXT.depth, num_attention_heads=TEXT.num_heads,
                         max_position_embeddings=TEXT.context_length, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=ENCODER.dim, intermediate_size=4 * ENCODER.dim, num_hidden_layers=ENCODER.depth,
                           num_attention_heads=ENCODER.num_heads, image_size=ENCODER.image_size,
                           patch_size=ENCODER.patch_size),
        projection_dim=EMBED,
    )
    model = CLIPModel(config)
    model.set_attn_implementation("sdpa")
    return model


def _autocast_call(fn, autocast):
    with autocast:
        return fn()


def saved_bytes(model, loss_fn) -> int:
    """Bytes of the activations autograd keeps for the backward pass of one step (weights it saves, which
    are the same at every mask ratio, left out)."""
    total, weights = 0, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in weights:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    return total


def count_flops(loss_fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--compile", action="store_true", help="also time unmasked FLIP and CLIPModel compiled")
    args = parser.parse_args()
    global ENCODER, TEXT, EMBED
    ENCODER, TEXT, EMBED = SIZES[args.size]
    # bf16 autocast on a GPU, as the GPU recipes train; fp32 on the CPU.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda")
                else contextlib.nullcontext())
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    side = ENCODER.image_size
    images = torch.randn(args.batch, 3, side, side, generator=generator).to(device)
    lengths = torch.randint(5, TEXT.context_length, (args.batch,), generator=generator)
    attention_mask = (torch.arange(TEXT.context_length)[None] < lengths[:, None]).long().to(device)
    ids = (torch.randint(5, TEXT.vocab_size, (args.batch, TEXT.context_length), generator=generator).to(device)
           * attention_mask)
    keys = torch.arange(args.batch, device=device)

    runs = []
    for ratio in (0.0, 0.5, 0.75):
        model = build_flip(ratio).to(device).train()
        batch = {"images": images, "ids": ids, "attention_mask": attention_mask, "seed": keys}
        runs.append((f"maskkit FLIP mask {ratio:.2f}", model, lambda m=model, b=batch: m(b).loss))
    hf = build_hf_clip().to(device).train()
    runs.append(("HF CLIPModel (unmasked)", hf,
                 lambda m=hf: m(input_ids=ids, pixel_values=images, attention_mask=attention_mask, return_loss=True).loss))
    runs = [(name, model, lambda fn=fn: _autocast_call(fn, autocast)) for name, model, fn in runs]

    flops = [count_flops(fn) for _, _, fn in runs]
    memory = []
    for _, model, fn in runs:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        saved = saved_bytes(model, fn)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
        memory.append((saved, peak))
        model.zero_grad(set_to_none=True)
    hf_index = len(runs) - 1
    if args.compile:
        flip0, hf_model = copy.deepcopy(runs[0][1]), copy.deepcopy(hf)
        flip0.compile()
        hf_model.compile()
        batch = {"images": images, "ids": ids, "attention_mask": attention_mask, "seed": keys}
        runs.append(("maskkit FLIP 0.00 compiled", flip0, lambda: _autocast_call(lambda: flip0(batch).loss, autocast)))
        runs.append(("HF CLIPModel compiled", hf_model, lambda: _autocast_call(
            lambda: hf_model(input_ids=ids, pixel_values=images, attention_mask=attention_mask, return_loss=True).loss,
            autocast)))
        flops += [flops[0], flops[hf_index]]
        memory += [memory[0], memory[hf_index]]

    steps = []
    for name, model, fn in runs:
        optimizer = build_optimizer(model, OptimConfig(), peak_lr=1e-4)

        def step(fn=fn, optimizer=optimizer):
            fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(3 if "compiled" in name else 2):
            step()
        if "compiled" in name:
            print(f"{name}: warm-up incl. compilation {time.perf_counter() - start:.1f} s")
        steps.append(step)
    sync()

    speeds = [[] for _ in runs]
    for round_index in range(args.rounds):
        order = list(range(len(runs)))
        order = order[round_index % len(order):] + order[: round_index % len(order)]
        for i in order:
            start = time.perf_counter()
            steps[i]()
            sync()
            speeds[i].append(args.batch / (time.perf_counter() - start))
    base_speed = speeds[0]
    hf_speed = speeds[hf_index]
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.rounds} rounds, "
          f"torch {torch.__version__}")
    print(f"{'model':<26} {'pairs/s':>8} {'vs HF':>7} {'speed-up':>9} {'ideal':>6} {'GFLOP':>7} "
          f"{'act. MB':>9} {'vs mask 0':>9} {'peak MB':>8}")
    for i, (name, _, _) in enumerate(runs):
        median = statistics.median(speeds[i])
        vs_hf = statistics.median(a / b for a, b in zip(speeds[i], hf_speed, strict=True))
        speed_up = statistics.median(a / b for a, b in zip(speeds[i], base_speed, strict=True))
        ideal = flops[0] / flops[i]
        saved, peak = memory[i]
        print(f"{name:<26} {median:>8.1f} {vs_hf:>6.2f}x {speed_up:>8.2f}x {ideal:>5.2f}x {flops[i] / 1e9:>7.2f} "
              f"{saved / 2**20:>9.1f} {saved / memory[0][0]:>8.2f}x {peak / 2**20:>8.1f}")


if __name__ == "__main__":
    main()
