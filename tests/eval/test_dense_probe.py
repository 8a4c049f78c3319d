"""The dense probe: mIoU by hand, token labels at patch centres, and the protocol end to end."""

import torch

from maskkit.data.augment import ImageAugment
from maskkit.data.images import DataConfig
from maskkit.eval.dense_probe import dense_probe, mean_iou, token_labels
from maskkit.nn.transformer import ViT, ViTConfig


def test_mean_iou_worked_example():
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    predicted = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    # class 0: 4 / 5; class 1: 3 / 4; the others absent from both
    assert abs(mean_iou(predicted, truth) - (4 / 5 + 3 / 4) / 2) < 1e-9
    assert mean_iou(truth, truth) == 1.0


def test_token_labels_are_the_patch_centres():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, 4:, 4:] = 3                     # bottom-right patch of a 2x2 grid
    masks[0, 1, 1] = 2                       # off-centre in the top-left patch: ignored
    assert token_labels(masks, 2).tolist() == [[0, 0, 0, 3]]


def test_dense_probe_on_a_random_backbone_beats_predicting_background_everywhere():
    torch.manual_seed(0)
    backbone = ViT(ViTConfig(image_size=32, patch_size=4, dim=32, depth=1, num_heads=2))
    normalize = ImageAugment(DataConfig(image_size=32)).normalize
    scores = dense_probe(backbone, normalize, train_images=128, test_images=64, epochs=10)
    # All-background would score mIoU = (background share) / (number of classes seen) < 0.2 here.
    assert scores["miou"] > 0.2 and scores["pixel_accuracy"] > 0.5
