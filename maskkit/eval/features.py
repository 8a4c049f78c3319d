"""Frozen-backbone features, the input of the kNN classifier and the linear probe (MAE Sec 4).

Features are computed once per backbone, from un-augmented normalised images, so both protocols then
train on a fixed (N, D) matrix in seconds instead of running the ViT every epoch.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from maskkit.data.common import batch_size_of, collate, report_unreadable
from maskkit.errors import MaskkitError


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    pool: str = "cls",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on the CPU, labels (N,)) from `backbone.features(images, pool)`.

    `backbone` must already be on `device`; it runs in eval mode and its mode is restored afterwards.
    Unreadable images (a folder data set) are dropped, so N can be smaller than len(dataset).
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
            for path in batch["unreadable"]:
                report_unreadable(path, "cannot be decoded")
            if not batch_size_of(batch):
                continue  # every image of this batch was unreadable
            images = normalize(batch["images"].to(device))                     # (B, C, H, W)
            features.append(backbone.features(images, pool).float().cpu())     # (B, D)
            labels.append(batch["label"])
    finally:
        backbone.train(was_training)
    if not features:
        raise MaskkitError(f"no readable images among the {len(dataset)} items of the evaluation set")
    return torch.cat(features), torch.cat(labels)
