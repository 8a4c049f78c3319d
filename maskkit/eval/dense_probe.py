"""Dense (segmentation) probe: how well frozen patch tokens separate the shapes world's per-pixel classes.

DenseCL (Wang et al. CVPR 2021) is judged by dense tasks; here, a per-token linear classifier on frozen
backbone tokens of shapes-world images (classes: background and the four shape kinds) is trained on one
split and its prediction, upsampled to pixels (each token's class on its patch), scored by mean IoU
against the exact masks of held-out images. Tokens are labelled by the class of their centre pixel.

What it can tell apart (`benchmarks/dense_probe_sensitivity.py`): the patch's mean colour alone scores
0.295 (background is dark, and each colour lacks one held-out kind), the random ViT 0.346, the same ViT
trained supervised per token for 300 steps 0.528; labelling tokens perfectly was reported at 0.693 (the
4 px patches cut the shapes' edges). The shape kinds need the shape around a token, which colour does
not carry, so a backbone that encodes shape moves the score; a supervised reference trained for 150
steps (reported at 0.408) had had half the training.
"""

import torch
import torch.nn.functional as F
from torch import nn

from maskkit.data.shapes import KINDS, ShapesWorld
from maskkit.nn.transformer import ViT

NUM_CLASSES = 1 + len(KINDS)


@torch.no_grad()
def token_features(backbone: ViT, world: ShapesWorld, count: int, normalize, device, batch_size: int = 128):
    """(count, N, D) frozen patch tokens and (count, H, W) masks of the first `count` images."""
    was_training = backbone.training
    backbone.eval()
    features, masks = [], []
    for start in range(0, count, batch_size):
        items = [world[i] for i in range(start, min(count, start + batch_size))]
        images = normalize(torch.stack([item["images"] for item in items]).to(device))
        features.append(backbone.patch_tokens(backbone(images)).float().cpu())
        masks.append(torch.stack([item["mask"] for item in items]))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(masks)


def token_labels(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) pixel classes -> (B, grid*grid): the class at each patch's centre pixel."""
    patch = masks.shape[-1] // grid
    centre = torch.arange(grid) * patch + patch // 2
    return masks[:, centre][:, :, centre].flatten(1)


def mean_iou(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Mean over classes present in `truth` or `predicted` of |P and T| / |P or T|, over all pixels."""
    ious = []
    for c in range(num_classes):
        p, t = predicted == c, truth == c
        union = (p | t).sum()
        if union > 0:
            ious.append(float((p & t).sum()) / float(union))
    return sum(ious) / len(ious)


def dense_probe(backbone: ViT, normalize, *, train_images: int = 1024, test_images: int = 512, epochs: int = 30,
                lr: float = 1e-2, seed: int = 0, device="cpu") -> dict:
    """{"miou", "pixel_accuracy"} of a per-token linear probe on frozen `backbone`, on held-out shapes images."""
    size, grid = backbone.cfg.image_size, backbone.grid_size
    train_world = ShapesWorld("train", train_images, size, backbone.cfg.in_channels, seed=1)
    test_world = ShapesWorld("val", test_images * 4, size, backbone.cfg.in_channels, seed=1)
    train_f, train_masks = token_features(backbone, train_world, train_images, normalize, device)
    test_f, test_masks = token_features(backbone, test_world, test_images, normalize, device)
    x, y = train_f.flatten(0, 1), token_labels(train_masks, grid).flatten()                  # (B*N, D), (B*N,)
    mean, std = x.mean(0), x.std(0) + 1e-6                                                   # as a BatchNorm would
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], NUM_CLASSES)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    # Background dominates the tokens; weighting classes by inverse frequency keeps shapes from being ignored.
    counts = torch.bincount(y, minlength=NUM_CLASSES).float().clamp_min(1)
    weights = counts.sum() / (NUM_CLASSES * counts)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for chunk in order.split(4096):
            loss = F.cross_entropy(head((x[chunk] - mean) / std), y[chunk], weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = head((test_f - mean) / std)                                                  # (B, N, classes)
        tokens = logits.argmax(-1).view(-1, grid, grid)
        pixels = tokens.repeat_interleave(size // grid, 1).repeat_interleave(size // grid, 2)
    return {"miou": mean_iou(pixels, test_masks), "pixel_accuracy": float((pixels == test_masks).float().mean())}
