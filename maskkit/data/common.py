"""What every data kind (images, pairs, text) shares: the per-sample index wrapper, unreadable items and
their report, the fixed held-out split, collation, and the checks of normalisation and crop settings.

It imports nothing of the data layer, so `images.py`, `pairs.py` and `text.py` depend on it and not on
one another for these.
"""

import logging
import math
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from maskkit.errors import require, require_float

log = logging.getLogger("maskkit")


class Unreadable(NamedTuple):
    """What a data set returns for a file it cannot decode; `collate` drops it and lists its path."""

    path: str
    reason: str


_REPORTED: set[str] = set()   # unreadable files already reported by this process: each is named once


def report_unreadable(path: str, reason: str) -> None:
    if path not in _REPORTED:
        _REPORTED.add(path)
        log.warning("skipping unreadable image %s: %s", path, reason)


def held_out(count: int, fraction: float) -> list[bool]:
    """Which of `count` items (in order) are held out: exactly round(count * fraction), spread evenly."""
    return [math.floor((r + 1) * fraction + 0.5) > math.floor(r * fraction + 0.5) for r in range(count)]


def take_split(items: list, fraction: float, split: str) -> list:
    """The items of `split` ("train", "test" = the held-out `fraction`, or "all"), in their order."""
    if split == "all":
        return list(items)
    return [item for item, out in zip(items, held_out(len(items), fraction), strict=True) if out == (split == "test")]


class Indexed(Dataset):
    """Adds "index" and "epoch" to every item, so randomness can be seeded per sample.

    Items are asked for by index, or by (index, epoch) as `StepSampler` yields them (epoch 0 otherwise).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | Unreadable:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.dataset[index]
        if isinstance(item, Unreadable):
            return item
        return {**item, "index": torch.tensor(index), "epoch": torch.tensor(epoch)}


def collate(items: list[dict | Unreadable]) -> dict:
    """Stack items into a batch dict; unreadable items are dropped and their paths listed in "unreadable".

    A batch of only unreadable items has no tensors at all, just "unreadable".
    """
    kept = [item for item in items if not isinstance(item, Unreadable)]
    # A mixture's members can carry different extras (a shapes image has a mask, a photo has none):
    # the batch keeps what every item has.
    keys = [key for key in kept[0] if all(key in item for item in kept)] if kept else []
    batch = {key: torch.stack([item[key] for item in kept]) for key in keys}
    batch["unreadable"] = [item.path for item in items if isinstance(item, Unreadable)]
    return batch


def batch_size_of(batch: dict) -> int:
    """The number of readable samples in a collated batch."""
    return len(batch["index"]) if "index" in batch else 0


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(c, H, W) -> (channels, H, W): grey is repeated, alpha dropped."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1).contiguous()
    if channels == 1:
        return image[:3].mean(0, keepdim=True)
    return image[:channels]


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (without blocking the host); anything else as it is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_normalisation(d, source: str) -> None:
    """data.mean / data.std: one finite value per channel, positive deviations."""
    for key in ("mean", "std"):
        values = getattr(d, key)
        require(len(values) == d.in_channels, source, f"data.{key}", values,
                f"one value per channel (data.in_channels={d.in_channels})")
    for i, (mean, std) in enumerate(zip(d.mean, d.std, strict=True)):
        require(math.isfinite(mean), source, f"data.mean[{i}]", mean, "a finite number")
        require_float(source, f"data.std[{i}]", std, 0.0, low_open=True)


def check_crop_scale(source: str, key: str, scale: list[float]) -> None:
    require(len(scale) == 2, source, key, scale, "two area fractions [low, high]")
    low, high = scale
    require_float(source, f"{key}[0]", low, 0.0, 1.0, low_open=True)
    require_float(source, f"{key}[1]", high, low, 1.0)
