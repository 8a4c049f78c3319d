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
    """Random resized crop + horizontal flip (+ MoCo v2's colour augmentation when `data.color`), then
    normalisation with the data set's mean and std. With `data.views=2` a second view is drawn from its
    own random stream (two-view methods: MoCo, DenseCL), and each view's crop box and flip are kept."""

    def __init__(self, cfg):
        self.size = cfg.image_size
        self.scale = tuple(cfg.crop_scale)
        self.log_ratio = (math.log(3 / 4), math.log(4 / 3))
        self.hflip = cfg.hflip
        self.views = getattr(cfg, "views", 1)
        self.color = getattr(cfg, "color", False)
        self.mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, -1, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.std.to(images.device) + self.mean.to(images.device)

    def boxes(self, seeds: torch.Tensor, height: int, width: int, stream: Stream = Stream.CROP):
        """(B, 4, 2) crop corners (x, y: top-left, top-right, bottom-right, bottom-left) and (B,) flips."""
        u = uniform(seeds, (5,), stream)                                        # (B, 5)
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
        from maskkit.data.common import to_device

        batch = to_device(batch, device)
        # A segmentation mask is for evaluating on un-augmented images: a crop would misalign it.
        batch.pop("mask", None)
        batch["seed"] = keys
        raw = batch["images"]
        if self.views == 2:
            batch["images"], batch["boxes"], batch["flips"] = self.view(raw, keys, Stream.CROP)
            batch["images2"], batch["boxes2"], batch["flips2"] = self.view(raw, keys, Stream.SECOND_VIEW)
        else:
            batch["images"] = self(raw, keys)
        return batch

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> augmented, normalised (B, C, size, size)."""
        return self.view(images, seeds, Stream.CROP)[0]

    def view(self, images: torch.Tensor, seeds: torch.Tensor, stream: Stream):
        """(augmented normalised view, (B, 4, 2) crop corners in input pixels, (B,) flipped) from `stream`."""
        corners, flip = self.boxes(seeds, images.shape[-2], images.shape[-1], stream)
        flip = flip.to(images.device) & self.hflip
        out = crop_and_resize(images, corners.to(images.device, images.dtype), (self.size, self.size))
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        if self.color:
            out = self.color_augment(out, seeds, stream)
        return self.normalize(out), corners, flip

    def color_augment(self, images: torch.Tensor, seeds: torch.Tensor, stream: Stream) -> torch.Tensor:
        """MoCo v2 (Chen et al. 2020): colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2,
        Gaussian blur sigma in [0.1, 2] px at 224 (scaled to the image size) with p 0.5."""
        from kornia.enhance import adjust_contrast_with_mean_subtraction, adjust_hue, adjust_saturation
        from kornia.filters import gaussian_blur2d

        u = uniform(seeds, (8,), Stream.COLOR if stream == Stream.CROP else Stream.SECOND_COLOR)   # (B, 8)
        u = u.to(images.device, images.dtype)
        images_now = images
        if images.shape[1] == 3:
            jitter = u[:, 0] < 0.8
            # Brightness, contrast and saturation factors in [0.6, 1.4]; hue shift in [-0.1, 0.1] of a turn.
            factors = (0.6 + 0.8 * u[:, 1], 0.6 + 0.8 * u[:, 2], 0.6 + 0.8 * u[:, 3], (u[:, 4] - 0.5) * 0.4 * math.pi)
            brightened = (images_now * factors[0].view(-1, 1, 1, 1)).clamp(0, 1)
            jittered = adjust_hue(adjust_saturation(adjust_contrast_with_mean_subtraction(
                brightened, factors[1]), factors[2]), factors[3])
            images_now = torch.where(jitter.view(-1, 1, 1, 1), jittered, images_now)
            gray = images_now.mul(torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1))
            gray = gray.sum(1, keepdim=True).expand_as(images_now)
            images_now = torch.where((u[:, 5] < 0.2).view(-1, 1, 1, 1), gray, images_now)
        sigma = (0.1 + 1.9 * u[:, 6]) * self.size / 224
        kernel = 2 * max(1, round(3 * 2.0 * self.size / 224)) + 1
        blurred = gaussian_blur2d(images_now, kernel, torch.stack([sigma, sigma], -1))
        images_now = torch.where((u[:, 7] < 0.5).view(-1, 1, 1, 1), blurred, images_now)
        return images_now.clamp(0, 1)
