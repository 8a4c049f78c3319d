"""End-to-end fine-tuning trains a copy: the caller's backbone keeps its weights, flags and mode."""

import torch
from torch.utils.data import Subset

from maskkit.data.augment import ImageAugment
from maskkit.data.images import DataConfig, labelled_dataset
from maskkit.eval.finetune import finetune
from maskkit.nn.transformer import ViT, ViTConfig


def test_finetune_does_not_change_the_backbone():
    data = DataConfig(name="digits", image_size=16)
    train_set, test_set = labelled_dataset(data, "train"), labelled_dataset(data, "test")
    torch.manual_seed(0)
    backbone = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2))
    backbone.requires_grad_(False).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    accuracy = finetune(backbone, Subset(train_set, range(48)), Subset(test_set, range(16)), ImageAugment(data), 10,
                        epochs=2, lr=1e-3, batch_size=16, seed=0, progress=False)

    assert 0.0 <= accuracy <= 1.0
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training
