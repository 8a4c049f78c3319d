"""MAE's linear probe (BatchNorm without affine + Linear, SGD, cosine lr) on synthetic features."""

import torch

from maskkit.eval.linear_probe import linear_probe


def separable_features(num_samples: int = 400, dim: int = 16, num_classes: int = 4):
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_samples) % num_classes
    features = centres[labels] + 0.5 * torch.randn(num_samples, dim, generator=generator)
    # Channels on scales 1e-2 .. 1e2, as MAE features can be: the BatchNorm must make one lr fit all.
    return features * torch.logspace(-2, 2, dim), labels


def test_probe_separates_linearly_separable_features():
    features, labels = separable_features()
    result = linear_probe(features[:300], labels[:300], features[300:], labels[300:], 4,
                          epochs=20, lr=0.1, batch_size=64, seed=0)
    assert result.train_accuracy >= 0.99
    assert result.test_accuracy >= 0.99


def test_probe_is_seeded():
    features, labels = separable_features(num_samples=64)
    runs = [linear_probe(features[:48], labels[:48], features[48:], labels[48:], 4,
                         epochs=2, lr=0.5, batch_size=10, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]
