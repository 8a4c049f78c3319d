"""Weighted kNN (Wu et al. 2018, as used by DINO): neighbours vote with exp(cosine / T), on a worked example."""

import math

import pytest
import torch

from maskkit.errors import MaskkitError
from maskkit.nn.knn import knn_accuracy, knn_predict


def worked_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class-1 point almost on the query, three class-0 points 55-60 degrees away.

    Cosines to the query: class 1: 0.99875; class 0: 0.574, 0.5, 0.5. With k=4 and T=0.07 the votes are
    class 1: exp(0.99875 / 0.07) = 1.6e6 against class 0: exp(0.574 / 0.07) + 2 exp(0.5 / 0.07) = 6.2e3,
    so the weighted vote says 1 while a plain majority (3 against 1) says 0.
    """
    def at(degrees: float) -> list[float]:
        return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]

    train_features = torch.tensor([[1.0, 0.05], at(55), at(60), at(-60)])
    train_labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    return train_features, train_labels, query


def test_weighted_vote_beats_majority_vote():
    train_features, train_labels, query = worked_example()
    assert knn_predict(train_features, train_labels, query, k=4, temperature=0.07).tolist() == [1]
    # A huge temperature gives every neighbour weight ~1: the plain majority vote.
    assert knn_predict(train_features, train_labels, query, k=4, temperature=1e3).tolist() == [0]


def test_k_larger_than_training_set_uses_every_sample():
    train_features, train_labels, query = worked_example()
    assert knn_predict(train_features, train_labels, query, k=20, temperature=0.07).tolist() == [1]
    assert knn_predict(train_features, train_labels, query, k=20, temperature=1e3).tolist() == [0]


def test_cosine_ignores_feature_scale_and_small_temperature_does_not_overflow():
    train_features, train_labels, query = worked_example()
    scaled = train_features * torch.tensor([[100.0], [0.01], [3.0], [7.0]])
    # exp(1 / 0.001) is inf in float32; the votes must still pick the nearest class.
    assert knn_predict(scaled, train_labels, query * 5, k=4, temperature=1e-3).tolist() == [1]


def test_accuracy_and_bad_k():
    train_features, train_labels, query = worked_example()
    queries = torch.cat([query, torch.tensor([[0.5, 0.9]])])      # the second sits among class 0
    assert knn_accuracy(train_features, train_labels, queries, torch.tensor([1, 0]), k=4) == 1.0
    assert knn_accuracy(train_features, train_labels, queries, torch.tensor([0, 0]), k=4) == 0.5
    with pytest.raises(MaskkitError, match="knn_k"):
        knn_predict(train_features, train_labels, query, k=0)
