"""Batched image augmentation with kornia, with per-sample parameters drawn from per-sample seeds.

kornia's augmentation modules draw their parameters from the global generator, which a resume or a
different number of ranks would change; here the parameters of sample b are a pure function of
seeds[b], and kornia does the batched crop-and-resize.
"""

import math

import torch
from kornia.geometry.transform import crop_and_resize

from maskkit.rng import Stream, uniform


class ImageAugment:
    """Random resized crop + horizontal flip, then normalisation with the data set's mean and std."""

    def __init__(self, cfg):
        self.size = cfg.image_size
        self.scale = tuple(cfg.crop_scale)
        self.log_ratio = (math.log(3 / 4), math.log(4 / 3))
        self.hflip = cfg.hflip
        self.mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, -1, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.std.to(images.device) + self.mean.to(images.device)

    def boxes(self, seeds: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4, 2) crop corners (x, y: top-left, top-right, bottom-right, bottom-left) and (B,) flips."""
        u = uniform(seeds, (5,), Stream.CROP)                                   # (B, 5)
        area = height * width * (self.scale[0] + u[:, 0] * (self.scale[1] - self.scale[0]))
        ratio = torch.exp(self.log_ratio[0] + u[:, 1] * (self.log_ratio[1] - self.log_ratio[0]))
        crop_w = torch.sqrt(area * ratio).clamp(1, width)
        crop_h = torch.sqrt(area / ratio).clamp(1, height)
        x0 = u[:, 2] * (width - crop_w)
        y0 = u[:, 3] * (height - crop_h)
        x1, y1 = x0 + crop_w - 1, y0 + crop_h - 1
        corners = torch.stack(
            [torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)],
            dim=1,
        )
        return corners, u[:, 4] < 0.5

    def prepare(self, batch: dict, keys: torch.Tensor, device: torch.device) -> dict:
        """The data layer's `prepare`: move the batch to `device`, crop, flip and normalise its images there."""
        from maskkit.data import to_device

        batch = to_device(batch, device)
        # A segmentation mask is for evaluating on un-augmented images: a crop would misalign it.
        batch.pop("mask", None)
        batch["seed"] = keys
        batch["images"] = self(batch["images"], keys)
        return batch

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> augmented, normalised (B, C, size, size)."""
        corners, flip = self.boxes(seeds, images.shape[-2], images.shape[-1])
        out = crop_and_resize(images, corners.to(images.device, images.dtype), (self.size, self.size))
        if self.hflip:
            out = torch.where(flip.to(images.device).view(-1, 1, 1, 1), out.flip(-1), out)
        return self.normalize(out)
