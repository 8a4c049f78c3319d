"""End-to-end fine-tuning trains a copy: the caller's backbone keeps its weights, flags and mode."""

import torch
from torch.utils.data import Subset

from maskkit.data.augment import ImageAugment
from maskkit.data.images import DataConfig, labelled_dataset
from maskkit.eval.finetune import finetune, labels_per_class
from maskkit.nn.transformer import ViT, ViTConfig


def test_finetune_learns_and_does_not_change_the_backbone():
    # Fine-tuning's own gentle crops without flips (eval.finetune_crop_scale / finetune_hflip).
    data = DataConfig(name="digits", image_size=16, crop_scale=[0.8, 1.0], hflip=False)
    train_set, test_set = labelled_dataset(data, "train"), labelled_dataset(data, "test")
    torch.manual_seed(0)
    backbone = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2))
    backbone.requires_grad_(False).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    accuracy = finetune(backbone, Subset(train_set, range(400)), Subset(test_set, range(200)), ImageAugment(data), 10,
                        epochs=10, lr=3e-3, batch_size=16, seed=0, progress=False)

    assert accuracy > 0.4                   # chance is 0.1; a head or labels out of step would stay there
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_labels_per_class_takes_that_many_of_each_class_by_the_seed_alone():
    digits = labelled_dataset(DataConfig(name="digits", image_size=8), "train")
    labels = digits.dataset.labels
    chosen = labels_per_class(digits, 10, 10, seed=3)
    assert torch.equal(torch.bincount(labels[chosen.indices], minlength=10), torch.full((10,), 10))
    assert chosen.indices == labels_per_class(digits, 10, 10, seed=3).indices
    assert chosen.indices != labels_per_class(digits, 10, 10, seed=4).indices
    assert [chosen[i]["label"] for i in range(3)] == labels[chosen.indices[:3]].tolist()
