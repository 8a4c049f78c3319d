"""Contextualization through MiniLM's layers (Kobayashi et al. 2021, 2024) on bundled Wikipedia summaries.

Per layer, the mean over the texts of the mixing ratio after attention + residual + norm (the 2021 paper: 18.8% for
BERT-base, fewer-layer models mixing more), and the contextualization change of the feed-forward layer alone against
that of the whole feed-forward block (the 2024 paper's cancellation: the residual and norm after the feed-forward
layer undo most of its change); seconds per text.

    python benchmarks/contextualization.py                       # 200 summaries through MiniLM, ~3 minutes
    python benchmarks/contextualization.py --texts 20 --model runs/mlm-bert   # any model maskkit analyze reads
    python benchmarks/contextualization.py --vit runs/mae-tiny --texts 100    # a ViT run: 100 of its images
"""

import argparse
import math
import tempfile
import time

import torch

from maskkit.analysis.contextualization import (
    contextualization_change,
    decompose_layers,
    image_inputs,
    mixing_ratio,
    token_map,
)
from maskkit.analyze import PRE_NORM_CHANGES, analyze
from maskkit.data.text import read_wiki


def vit_contrast(run: str, count: int) -> None:
    """The same measures on a maskkit ViT run's encoder (pre-norm blocks), on `count` images of its own data."""
    from maskkit.data import build_data
    from maskkit.eval.run import method_from_checkpoint
    from maskkit.train.checkpoint import find_checkpoint

    method, cfg = method_from_checkpoint(find_checkpoint(run))
    vit = method.backbone.eval()
    data = build_data(cfg.data)
    mean, std = torch.tensor(cfg.data.mean).view(-1, 1, 1), torch.tensor(cfg.data.std).view(-1, 1, 1)
    rows, started = [], time.perf_counter()
    for index in range(count):
        image = (data.dataset[index]["images"] - mean) / std                   # as the run was trained
        layers = decompose_layers(vit.blocks, image_inputs(vit, image))
        rows.append([(mixing_ratio(layer.stages["residual"]),
                      *(contextualization_change(token_map(layer.stages[a]), token_map(layer.stages[b]))
                        for a, b in (PRE_NORM_CHANGES["ffn"], PRE_NORM_CHANGES["feed-forward block"])))
                     for layer in layers])
    seconds = (time.perf_counter() - started) / count
    print(f"{cfg.method} ViT {run}: {count} images of {cfg.data.name}, {vit.num_patches + 1} tokens, "
          f"{seconds:.2f} s per image")
    print(f"{'layer':>5} {'mixing ratio':>12} {'FF change':>10} {'FF block change':>16}")
    for layer in range(len(vit.blocks)):
        means = [sum(r[layer][k] for r in rows) / count for k in range(3)]
        print(f"{layer + 1:>5} " + " ".join(f"{m:{w}.3f}" if not math.isnan(m) else f"{'-':>{w}}"
                                            for m, w in zip(means, (12, 10, 16), strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--max-words", type=int, default=60, help="each summary cut to its first words")
    parser.add_argument("--vit", help="a maskkit image run instead: its encoder on --texts of its images")
    args = parser.parse_args()
    if args.vit:
        vit_contrast(args.vit, args.texts)
        return
    texts = [" ".join(d.text.split()[: args.max_words]) for d in read_wiki().documents[: args.texts]]
    with tempfile.TemporaryDirectory() as tmp:
        summary = analyze(args.model, texts, f"{tmp}/out", progress=True, heatmaps=0)
    stage = "norm" if summary["post_norm"] else "residual"
    block = "feed-forward block"
    print(f"{summary['model']}: {len(texts)} texts of at most {args.max_words} words, "
          f"{summary['seconds_per_text']:.2f} s per text")
    print(f"{'layer':>5} {'mixing ratio':>12} {'FF change':>10} {'FF block change':>16}")
    for index, (mixing, change) in enumerate(zip(summary["mixing_ratio"], summary["contextualization_change"],
                                                 strict=True)):
        print(f"{index + 1:>5} {mixing[stage]:12.3f} {change['ffn']:10.3f} {change[block]:16.3f}")
    mean = sum(row[stage] for row in summary["mixing_ratio"]) / len(summary["mixing_ratio"])
    print(f"mean mixing ratio {mean:.3f}; top amplified pairs:",
          ", ".join(f"{p['target_token']}<-{p['source_token']} x{p['factor']:.1f}" for p in summary["ffn_amplified_pairs"][:8]))


if __name__ == "__main__":
    main()
