"""Linear probing on frozen features (MAE, He et al. 2021, Sec 4 and Appendix A.1 "Linear probing").

MAE puts a BatchNorm without affine parameters in front of the linear classifier: MAE features have
very different scales per channel, and normalising them lets one learning rate suit every channel.
The BatchNorm is still linear at test time (it folds into the classifier's weights), so this remains a
linear probe. MAE trains it with LARS, momentum 0.9, no weight decay and a cosine learning rate; here
plain SGD with momentum stands in for LARS, and the features are computed once without augmentation
(MAE crops and flips during probing), which makes the probe take seconds.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maskkit.config import OptimConfig
from maskkit.errors import MaskkitError
from maskkit.train.optim import lr_at


@dataclass
class ProbeResult:
    test_accuracy: float
    train_accuracy: float


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False) + Linear: (B, D) features -> (B, num_classes) logits."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        # MAE's linear-probe code initialises the head this way (following MoCo v3).
        nn.init.trunc_normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


@torch.no_grad()
def accuracy(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = probe.training
    probe.eval()  # BatchNorm uses its running statistics, as at test time
    correct = (probe(features).argmax(dim=1) == labels).float().mean().item()
    probe.train(was_training)
    return correct


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> ProbeResult:
    """Train a LinearProbe on (N, D) train features for `epochs`; its accuracy on the test and train sets.

    `lr` is the peak learning rate itself (no batch-size scaling); it follows a half cosine to 0 per step.
    """
    if len(train_features) < 2:
        raise MaskkitError(f"the linear probe needs at least 2 training samples, got {len(train_features)}")
    train_features, train_labels = train_features.float(), train_labels.long()
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbe(train_features.shape[1], num_classes, generator)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    schedule = OptimConfig(warmup_steps=0, min_lr=0.0)
    # Incomplete batches are dropped (as MAE's loader does): BatchNorm cannot train on one sample, and
    # the next epoch's permutation puts the left-out samples in a full batch.
    batch_size = min(batch_size, len(train_features))
    steps_per_epoch = len(train_features) // batch_size
    total_steps = epochs * steps_per_epoch
    probe.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_features), generator=generator)
        for position in range(steps_per_epoch):
            step = epoch * steps_per_epoch + position
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, lr, schedule)
            chosen = order[position * batch_size : (position + 1) * batch_size]
            loss = F.cross_entropy(probe(train_features[chosen]), train_labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return ProbeResult(
        test_accuracy=accuracy(probe, test_features.float(), test_labels.long()),
        train_accuracy=accuracy(probe, train_features, train_labels),
    )
