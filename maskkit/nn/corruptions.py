"""Image corruptions for restoration pretexts (energy-based pretraining, Wang et al. ICLR 2023, Sec 3.2).

Each takes a batch of normalised images (B, C, H, W), the samples' keys and the data set's per-channel
mean and std, and returns (corrupted images, (B, 1, H, W) map of the corrupted pixels). Every random
choice comes from the sample's own key (stream CORRUPTION), so a sample is corrupted the same way in
any batch, on any number of ranks, after a resume. The paper names the pretexts; where it does not fix a
value, the one chosen here is written next to it.
"""

import math

import torch
import torch.nn.functional as F

from maskkit.nn.masking import random_masking
from maskkit.rng import Stream, uniform

CORRUPTIONS = ("mim", "shuffle", "sr", "noise", "gray", "mix")
MIX_OF = ("mim", "shuffle", "sr", "noise", "gray")       # "mix": one of these per sample

SHUFFLE_FRACTION = 0.5   # share of patch positions whose contents are permuted (our choice)
NOISE_STD = 0.5          # Gaussian noise std in [0, 1] pixel units (our choice; the paper only names denoising)
SR_FACTOR = 2            # x2 down (area), bicubic up


def _patch_grid(images: torch.Tensor, patch: int) -> tuple[int, int]:
    return images.shape[-2] // patch, images.shape[-1] // patch


def _patch_map(selected: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, rows, cols) -> (B, 1, rows*patch, cols*patch) float map."""
    return selected.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


def mim(images, keys, mean, std, patch: int, mask_ratio: float = 0.75):
    """Masked image modelling: round(ratio * N) patches per image filled with the data set's mean
    (0 in normalised units), chosen like MAE's masks (same count per sample)."""
    rows, cols = _patch_grid(images, patch)
    noise = uniform(keys, (rows * cols,), Stream.CORRUPTION)
    removed = random_masking(noise, mask_ratio).mask.view(-1, rows, cols)                 # 1 = removed
    where = _patch_map(removed, patch)
    return images * (1 - where), where


def shuffle(images, keys, mean, std, patch: int, fraction: float = SHUFFLE_FRACTION):
    """Patch sorting: a random `fraction` of the patch positions exchange their contents (a random
    permutation among themselves); the other patches stay in place."""
    batch, channels, height, width = images.shape
    rows, cols = _patch_grid(images, patch)
    count = rows * cols
    u = uniform(keys, (2, count), Stream.CORRUPTION)                                      # (B, 2, N)
    chosen_count = max(2, round(fraction * count))
    chosen = u[:, 0].argsort(dim=1)[:, :chosen_count]                                     # (B, M) positions
    order = u[:, 1, :chosen_count].argsort(dim=1)                                         # permutation of them
    source = torch.arange(count, device=images.device).expand(batch, -1).clone()
    source.scatter_(1, chosen, chosen.gather(1, order))                                   # (B, N) which patch lands where
    patches = images.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, count, channels, patch, patch)
    moved = patches.gather(1, source[:, :, None, None, None].expand_as(patches))
    out = moved.reshape(batch, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    changed = (source != torch.arange(count, device=images.device)).view(batch, rows, cols)
    return out.reshape(batch, channels, height, width), _patch_map(changed, patch), source


def sr(images, keys, mean, std, patch: int):
    """Super-resolution: x2 down (area average), then bicubic back up; every pixel counts as corrupted."""
    small = F.avg_pool2d(images, SR_FACTOR)
    up = F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False)
    return up, torch.ones_like(images[:, :1])


def noise(images, keys, mean, std, patch: int, sigma: float = NOISE_STD):
    """Denoising: additive Gaussian noise of std `sigma` in pixel units (Box-Muller on the sample's numbers)."""
    u = uniform(keys, (2, *images.shape[1:]), Stream.CORRUPTION)                          # (B, 2, C, H, W)
    gaussian = torch.sqrt(-2 * torch.log1p(-u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])
    return images + sigma * gaussian / std, torch.ones_like(images[:, :1])


def gray(images, keys, mean, std, patch: int):
    """Colorization: the image's luma (ITU-R BT.601 weights) in every channel; grey inputs stay as they are."""
    if images.shape[1] != 3:
        return images, torch.zeros_like(images[:, :1])
    pixels = images * std + mean
    luma = (0.299 * pixels[:, 0:1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:3]).expand_as(pixels)
    return (luma - mean) / std, torch.ones_like(images[:, :1])


def corrupt(name: str, images: torch.Tensor, keys: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
            patch: int, mask_ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted, corrupted-pixel map) for corruption `name`; "mix" picks one corruption per sample."""
    mean, std = mean.view(1, -1, 1, 1).to(images), std.view(1, -1, 1, 1).to(images)
    if name == "mix":
        which = (uniform(keys, (1,), Stream.CORRUPTION_KIND)[:, 0] * len(MIX_OF)).long()  # (B,)
        out, where = images.clone(), torch.zeros_like(images[:, :1])
        for index, kind in enumerate(MIX_OF):
            rows = (which == index).nonzero().flatten()
            if len(rows):
                out[rows], where[rows] = corrupt(kind, images[rows], keys[rows], mean, std, patch, mask_ratio)
        return out, where
    if name == "mim":
        return mim(images, keys, mean, std, patch, mask_ratio)
    if name == "shuffle":
        return shuffle(images, keys, mean, std, patch)[:2]
    return {"sr": sr, "noise": noise, "gray": gray}[name](images, keys, mean, std, patch)
