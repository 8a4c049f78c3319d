"""Where pretraining changed what a linear classifier can read: a probe on every block's output of a ViT run.

For a run's backbone and for its random init (the ViT of the same config and seed, the one the run started
from), each block's output tokens on the digits are pooled two ways ([CLS], mean of the patch tokens),
read by maskkit's linear probe (`maskkit.eval.linear_probe`, the `--protocol linear` probe: BatchNorm + linear,
eval.probe_* settings) fitted on the digits training split; the table is the test accuracy per block. `--reset PREFIX ...` first puts the parameters whose names start with a prefix back to
their init (`patch_embed`, `blocks.0.`), to see which parts carry a change.

Used for the energy method (README, energy section): its loss reaches the weights only through dE/dx, so the
first layers, which the forward pass uses as an encoder, are also the last layers of the backward pass that
restores the pixels. MAE (a separate decoder) is the comparison.

    python benchmarks/layer_probe.py runs/ef600/seed2/energy --seed 2
    python benchmarks/layer_probe.py runs/ef600/seed2/energy --seed 2 --reset patch_embed
"""

import argparse

import torch

from maskkit.data.augment import ImageAugment
from maskkit.data.images import labelled_dataset
from maskkit.eval.linear_probe import linear_probe
from maskkit.eval.run import load_backbone, random_backbone
from maskkit.nn.transformer import ViT


def digits(cfg, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, labels) of the first `limit` labelled images of a split."""
    dataset = labelled_dataset(cfg.data, split)
    items = [dataset[i] for i in range(min(limit, len(dataset)))]
    images = torch.stack([item["images"] for item in items]).float()
    return ImageAugment(cfg.data).normalize(images), torch.tensor([int(item["label"]) for item in items])


@torch.no_grad()
def block_features(vit: ViT, images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{block name: {"cls": (B, D), "mean": (B, D)}} for each block's output and the final-norm tokens."""
    outputs = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: outputs.append(output)) for block in vit.blocks]
    try:
        final = vit.eval()(images)                                      # (B, 1 + N, D)
    finally:
        for hook in hooks:
            hook.remove()
    named = {f"block {k}": tokens for k, tokens in enumerate(outputs)} | {"final norm": final}
    return {name: {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1)} for name, tokens in named.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--seed", type=int, required=True, help="the run's train.seed (draws its random init)")
    parser.add_argument("--reset", nargs="*", default=[], help="parameter-name prefixes put back to their init")
    parser.add_argument("--train-images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone, cfg = load_backbone(args.run)
    if cfg.data.eval_split == 0:
        raise SystemExit(f"{args.run}: the run pretrained on every image (data.eval_split=0); no held-out split to test on")
    random_init = random_backbone(cfg, args.seed)                      # the ViT the run started from
    if backbone.cls_token is None:
        raise SystemExit(f"{args.run}: the ViT has no [CLS] token; this probe reads [CLS] and the mean token")
    if args.reset:
        initial = {k: v for k, v in random_init.state_dict().items() if k.startswith(tuple(args.reset))}
        if not initial:
            raise SystemExit(f"--reset {' '.join(args.reset)}: no parameter of the ViT starts with that")
        backbone.load_state_dict(initial, strict=False)
        print("reset to init:", ", ".join(initial))
    train_images, train_labels = digits(cfg, "train", args.train_images)
    test_images, test_labels = digits(cfg, "test", 10**9)
    rows = {}
    for name, vit in (("pretrained", backbone), ("random init", random_init)):
        train_features, test_features = block_features(vit, train_images), block_features(vit, test_images)
        rows[name] = {(block, pool): linear_probe(train_features[block][pool], train_labels, test_features[block][pool],
                                                  test_labels, int(train_labels.max()) + 1, epochs=cfg.eval.probe_epochs,
                                                  lr=cfg.eval.probe_lr, batch_size=cfg.eval.probe_batch_size,
                                                  seed=args.seed).test_accuracy
                      for block in train_features for pool in ("cls", "mean")}
    columns = list(rows["pretrained"])
    print(f"digits test accuracy of a linear probe ({len(train_labels)} train / {len(test_labels)} test images)")
    print(f"{'':<12}" + "".join(f"{block + ' ' + pool:>16}" for block, pool in columns))
    for name, row in rows.items():
        print(f"{name:<12}" + "".join(f"{row[column]:>16.3f}" for column in columns))


if __name__ == "__main__":
    main()
