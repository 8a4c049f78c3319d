"""DenseCL's cost over MoCo v2: one train step (forward, backward, AdamW, EMA and enqueue) of each on the
same ViT and batch, interleaved in one process, with the analytic FLOP overhead of the dense parts.

    python benchmarks/densecl_overhead.py          # ~1 minute on 2 CPU cores

DenseCL runs with both kinds of positives: `geometric` (the default: the crop boxes give each token's
partner, nothing more to compute) and `features` (two more no-grad forward passes for the matching features).
The batch's crop boxes are the whole image, which costs what any other box does. A fourth model is DenseCL
with the dense loss as it was before 2026-12-03 (a cross-entropy over the concatenated positive and queue logits),
patched onto a copy of the same weights: the A/B of that change.
"""

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F

from maskkit.config import OptimConfig
from maskkit.methods.densecl import DenseCL, DenseCLConfig
from maskkit.methods.moco import MoCo, MoCoConfig
from maskkit.nn.transformer import ViTConfig
from maskkit.train.optim import build_optimizer

ENCODER = ViTConfig(image_size=32, patch_size=4, dim=128, depth=4, num_heads=4)      # moco/tiny, densecl/tiny


def concatenated_dense_loss(self, query, positive, valid):
    """DenseCL.dense_info_nce before 2026-12-03: the same value, through a (B*N, 1+K) cross-entropy."""
    positive_logit = (query * positive).sum(2, keepdim=True)
    logits = torch.cat([positive_logit, query @ self.dense_queue.T], dim=2).flatten(0, 1) / self.cfg.temperature
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return (F.cross_entropy(logits, labels, reduction="none") * valid.flatten()).sum() / valid.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queue", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(args.batch, 3, 32, 32, generator=generator),
             "images2": torch.randn(args.batch, 3, 32, 32, generator=generator)}
    whole = torch.tensor([[0.0, 0.0], [31.0, 0.0], [31.0, 31.0], [0.0, 31.0]]).expand(args.batch, 4, 2)
    no_flip = torch.zeros(args.batch, dtype=torch.bool)
    batch.update(boxes=whole, boxes2=whole, flips=no_flip, flips2=no_flip)
    common = dict(encoder=ENCODER, head_hidden=512, embed_dim=128, queue_size=args.queue)
    torch.manual_seed(0)
    models = {"MoCo v2": MoCo(MoCoConfig(**common)),
              "DenseCL": DenseCL(DenseCLConfig(**common, positives="geometric")),
              "DenseCL, features": DenseCL(DenseCLConfig(**common, positives="features")),
              "DenseCL, cat loss": DenseCL(DenseCLConfig(**common, positives="geometric"))}
    models["DenseCL, cat loss"].load_state_dict(models["DenseCL"].state_dict())
    models["DenseCL, cat loss"].dense_info_nce = types.MethodType(concatenated_dense_loss, models["DenseCL, cat loss"])
    with torch.no_grad():
        same = models["DenseCL"](batch).loss.item(), models["DenseCL, cat loss"](batch).loss.item()
    print(f"dense loss now {same[0]:.6f}, before {same[1]:.6f}")
    steps = {}
    for name, model in models.items():
        optimizer = build_optimizer(model, OptimConfig(), peak_lr=1e-4)

        def step(model=model, optimizer=optimizer):
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.after_step(0, 1)

        step()
        steps[name] = step
    times = {name: [] for name in models}
    for round_index in range(args.rounds):
        names = list(models)[round_index % len(models):] + list(models)[: round_index % len(models)]
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    # Analytic: the dense head on N tokens (+ its key copy) and the dense logits against the queue, over
    # the query encoder's forward+backward (3x forward) and the key encoder's forward.
    tokens, dim, hidden, embed = (32 // 4) ** 2, ENCODER.dim, 512, 128
    block = 24 * (tokens + 1) * dim**2 + 4 * (tokens + 1) ** 2 * dim           # one block's forward MACs x2
    backbone = ENCODER.depth * block * args.batch
    head = 2 * (dim * hidden + hidden * embed) * args.batch
    dense_head = tokens * head
    dense_logits = 2 * tokens * (args.queue + 1) * embed * args.batch
    moco_flops = 3 * backbone + backbone + 3 * head + head + 3 * 2 * (args.queue + 1) * embed * args.batch
    dense_flops = 3 * dense_head + dense_head + 3 * dense_logits
    matching_flops = 2 * backbone                                                 # two no-grad forwards
    analytic = {"DenseCL": dense_flops, "DenseCL, features": dense_flops + matching_flops,
                "DenseCL, cat loss": dense_flops}
    print(f"batch {args.batch}, queue {args.queue}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name in models:
        line = f"{name:<18} {statistics.median(times[name]) * 1000:8.1f} ms/step"
        if name in analytic:
            overhead = statistics.median(d / m for d, m in zip(times[name], times["MoCo v2"], strict=True)) - 1
            line += f"   overhead over MoCo v2: measured {overhead * 100:+.1f}%, analytic FLOPs " \
                    f"{analytic[name] / moco_flops * 100:+.1f}%"
        print(line)


if __name__ == "__main__":
    main()
