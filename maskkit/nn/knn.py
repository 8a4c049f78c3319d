"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018, Sec 3.4; as used by DINO).

Features are L2-normalised, so a dot product is the cosine similarity s_i. Each test feature takes its
k most similar training features; neighbour i adds exp(s_i / T) to the score of its class, and the
class with the highest score wins. With a small T (0.07) a few close neighbours outvote many distant
ones, unlike a plain majority vote.
"""

import torch
import torch.nn.functional as F

from maskkit.errors import MaskkitError


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(M,) predicted classes of the M test features. k=20, T=0.07 are DINO's values (Wu et al. used k=200)."""
    if k < 1:
        raise MaskkitError(f"eval.knn_k must be at least 1, got {k}")
    if temperature <= 0:
        raise MaskkitError(f"eval.knn_temperature must be positive, got {temperature}")
    train_features = F.normalize(train_features.float(), dim=1)            # (N, D), unit length
    test_features = F.normalize(test_features.float(), dim=1)              # (M, D)
    train_labels = train_labels.to(train_features.device)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_features))  # fewer training samples than k: all of them vote
    predictions = []
    # Chunks bound the (chunk, N) similarity matrix, which for a large training set would not fit.
    for chunk in test_features.split(chunk_size):
        similarity = chunk @ train_features.T                               # (m, N) cosine similarities
        top_similarity, top_index = similarity.topk(k, dim=1)               # (m, k), most similar first
        # exp(s / T) up to a per-row factor: subtracting the row's best s keeps a small T from
        # overflowing float32 (exp(1 / 0.01) does) and leaves the argmax unchanged.
        weights = ((top_similarity - top_similarity[:, :1]) / temperature).exp()          # (m, k)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[top_index], weights)             # (m, C) summed per class
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier on the test set, in [0, 1]."""
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return (predictions.cpu() == test_labels.cpu()).float().mean().item()
