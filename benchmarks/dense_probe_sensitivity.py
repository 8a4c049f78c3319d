"""Can the dense probe see a better backbone? Random init against a ViT trained supervised per token.

The reference backbone is the densecl/tiny ViT trained for --steps steps (batch 64, AdamW 1.5e-3, 40
warm-up steps) with a per-token linear classifier on the pretraining split of the shapes world (token
label = the class at the patch centre, as the probe's), on the images as drawn (its own colours). The
probe then sees that frozen backbone and the random one (same seed) exactly as it sees a pretrained
method's. Target: supervised >= 0.45 mIoU, random <= 0.35. The first line is the probe on each patch's
mean colour alone (3 numbers a token): what the colour cue gives without any shape information.

    python benchmarks/dense_probe_sensitivity.py --steps 300        # ~10 minutes on 1 busy CPU thread
"""

import argparse
import time

import torch
import torch.nn.functional as F

from maskkit.config import load_config
from maskkit.data.augment import ImageAugment
from maskkit.data.shapes import ShapesWorld
from maskkit.eval.dense_probe import NUM_CLASSES, dense_probe, token_labels
from maskkit.nn.transformer import ViT


class PatchColours(torch.nn.Module):
    """A stand-in backbone whose token is its patch's mean colour: what the colour cue alone scores."""

    def __init__(self, vit_cfg):
        super().__init__()
        self.cfg, self.grid_size = vit_cfg, vit_cfg.image_size // vit_cfg.patch_size
        self.pool = torch.nn.AvgPool2d(vit_cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(images).flatten(2).transpose(1, 2)                                       # (B, N, C)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def supervised_backbone(cfg, steps: int, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    backbone = ViT(cfg.model.encoder)
    head = torch.nn.Linear(backbone.cfg.dim, NUM_CLASSES)
    world = ShapesWorld("train", cfg.data.shapes, cfg.data.image_size, backbone.cfg.in_channels, seed=0)
    items = [world[i] for i in range(len(world))]
    images = torch.stack([item["images"] for item in items])
    labels = token_labels(torch.stack([item["mask"] for item in items]), backbone.grid_size)     # (S, N)
    normalize = ImageAugment(cfg.data).normalize
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=1.5e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1.5e-3 * min(1.0, (step + 1) / 40)
        index = torch.randint(0, len(images), (64,), generator=generator)
        logits = head(backbone.patch_tokens(backbone(normalize(images[index]))))                  # (64, N, classes)
        loss = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("densecl/tiny", [])
    normalize = ImageAugment(cfg.data).normalize
    tic = time.perf_counter()
    supervised = supervised_backbone(cfg, args.steps)
    print(f"supervised training: {args.steps} steps, {time.perf_counter() - tic:.0f} s", flush=True)
    torch.manual_seed(0)
    random_init = ViT(cfg.model.encoder)
    for name, backbone in (("patch colour only", PatchColours(cfg.model.encoder)), ("random init", random_init),
                           (f"supervised {args.steps} steps", supervised)):
        scores = dense_probe(backbone, normalize)
        print(f"{name:<22} dense-probe mIoU {scores['miou']:.3f}  pixel accuracy {scores['pixel_accuracy']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
