"""The data layer's one entry point: `build_data(cfg.data, split)` -> what the loop needs, whatever the modality.

The training loop and the evaluation protocols call only these three things, so a text or image-text
data set slots in without touching them:

    data.dataset   items are dicts (or `Unreadable`), asked for by index or by (index, epoch)
    data.collate   a list of items -> a batch dict on the host ("unreadable" lists dropped files)
    data.prepare   (batch, per-sample keys, device) -> the model's input on the device: moved,
                   augmented (images) or tokenised (text), with the keys as batch["seed"]
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from maskkit.data.images import DataConfig, build_image_dataset, collate


@dataclass
class Data:
    dataset: Dataset
    collate: Callable[[list], dict]
    prepare: Callable[[dict, torch.Tensor, torch.device], dict]
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None   # model input -> displayable pixels


def build_data(cfg: DataConfig, split: str = "train") -> Data:
    """split: "train" (pretraining, probe training), "test" (held out) or "all"."""
    from maskkit.data.augment import ImageAugment

    augment = ImageAugment(cfg)
    return Data(build_image_dataset(cfg, split), collate, augment.prepare, augment.denormalize)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (without blocking the host); anything else as it is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
