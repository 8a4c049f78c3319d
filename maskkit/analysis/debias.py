"""Debiasing a two-tower model's zero-shot classifier by projecting biased directions out of its text embeddings
(Chuang, Jampani, Li, Torralba, Jegelka 2023, "Debiasing Vision-Language Models via Biased Prompts").

The embeddings of prompts that describe only the spurious attribute ("a photo of a water background") span
the biased directions B = [b_1 ... b_k] (d, k). The paper's orthogonal projection removes them from a class
prompt's embedding q:

    P0 = I - B (B^T B)^-1 B^T,                                   (the projection step)

and its calibration keeps prompts that differ only in the spurious attribute together: over positive pairs
(z_i, z_j) ("a landbird on land" / "a landbird on water"),

    min_P ||P - P0||_F^2 + lambda / |S| sum_(i,j) ||P z_i - P z_j||^2   =>   P* = P0 (lambda M + I)^-1,
    M = 1/|S| sum_(i,j) (z_i - z_j)(z_i - z_j)^T,                 (the calibrated projection, closed form)

with P0 = I in the paper's generative experiments (calibration only). The debiased classifier is
q <- normalize(q P^T), for the class prompts only; image embeddings are untouched. Everything here is float64
and deterministic, as in the authors' code (chingyaoc/debias_vl, discriminative/main.py), from which maskkit
differs in that

- B's span is taken from an SVD of the prompt embeddings themselves (the reference fits sklearn's randomized
  TruncatedSVD with k components, the same span), and a set whose rank is below its size is refused instead of
  inverting a near-singular B^T B;
- a class embedding may be a CLIP-style ensemble over templates (the normalised mean of the normalised prompt
  embeddings); P is applied to the ensemble, as to the reference's single prompt.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkit.errors import MaskkitError

MODES = ("projection", "calibrated", "calibration")
RANK_TOLERANCE = 1e-6    # a singular value below this fraction of the largest makes a prompt set rank-deficient


def spurious_basis(spurious: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """(d, k) orthonormal basis of the span of the k spurious prompt embeddings (k, d), after normalising each.

    A set whose rank is below k (a repeated prompt, more prompts than dimensions) has no (B^T B)^-1: refused,
    naming the prompt that adds no direction.
    """
    if spurious.ndim != 2 or spurious.shape[0] == 0:
        raise MaskkitError("the spurious prompt set is empty: give at least one prompt that describes only the "
                           "spurious attribute (--spurious \"a photo of a water background\" ...)")
    embeddings = F.normalize(spurious.double(), dim=-1)
    k, d = embeddings.shape
    if k >= d:
        raise MaskkitError(f"{k} spurious prompts in a {d}-dimensional embedding span all of it or nearly: "
                           f"projecting them out leaves nothing; give fewer than {d}")
    singular = torch.linalg.svdvals(embeddings)
    if singular[-1] < RANK_TOLERANCE * singular[0]:
        which = "a prompt"
        for count in range(2, k + 1):      # the first prompt that adds no direction to those before it
            values = torch.linalg.svdvals(embeddings[:count])
            if values[-1] < RANK_TOLERANCE * values[0]:
                which = f"prompt {count}" + (f" ({names[count - 1]!r})" if names else "")
                break
        raise MaskkitError(f"the spurious prompt set is rank-deficient (rank {int((singular >= RANK_TOLERANCE * singular[0]).sum())} "
                           f"of {k} prompts): {which} lies in the span of the ones before it; drop or reword it")
    basis, _ = torch.linalg.qr(embeddings.T)                   # (d, k), columns orthonormal, span(B)
    return basis


def projection_from_basis(basis: torch.Tensor) -> torch.Tensor:
    """P0 = I - U U^T for an orthonormal basis U of span(B): equal to I - B (B^T B)^-1 B^T."""
    return torch.eye(basis.shape[0], dtype=torch.float64) - basis @ basis.T


def spurious_projection(spurious: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """P0 (d, d) of the spurious prompt embeddings (k, d)."""
    return projection_from_basis(spurious_basis(spurious, names))


def pair_matrix(embeddings: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """M = mean over positive pairs of (z_i - z_j)(z_i - z_j)^T, the z's normalised (the calibration's matrix)."""
    if not pairs:
        raise MaskkitError("the calibration has no positive pairs: give --pairs F (or attributes to build them)")
    z = F.normalize(embeddings.double(), dim=-1)
    first, second = torch.tensor(pairs).T
    difference = z[first] - z[second]                          # (|S|, d)
    return difference.T @ difference / len(pairs)


def calibrated_projection(p0: torch.Tensor, m: torch.Tensor, lam: float) -> torch.Tensor:
    """P* = P0 (lambda M + I)^-1, the minimiser of ||P - P0||_F^2 + lambda tr(P M P^T).

    lambda M + I is symmetric positive definite (never singular), so P*^T = (lambda M + I)^-1 P0^T is one linear
    solve, without forming the inverse.
    """
    if lam < 0:
        raise MaskkitError(f"--lam {lam:g}: the calibration weight lambda must be >= 0")
    gram = lam * m + torch.eye(m.shape[0], dtype=torch.float64)
    return torch.linalg.solve(gram, p0.T).T


def calibration_objective(p: torch.Tensor, p0: torch.Tensor, m: torch.Tensor, lam: float) -> torch.Tensor:
    """||P - P0||_F^2 + lambda / |S| sum ||P (z_i - z_j)||^2, written with M: the calibration's loss."""
    return (p - p0).square().sum() + lam * torch.trace(p @ m @ p.T)


def debias_matrix(mode: str, p0: torch.Tensor, m: torch.Tensor | None, lam: float) -> torch.Tensor:
    """The P of a mode: projection P0, calibrated P0 (lambda M + I)^-1, calibration (lambda M + I)^-1."""
    if mode == "projection":
        return p0
    if m is None:
        raise MaskkitError(f"mode {mode!r} needs positive pairs (--pairs F)")
    if mode == "calibrated":
        return calibrated_projection(p0, m, lam)
    if mode == "calibration":
        return calibrated_projection(torch.eye(p0.shape[0], dtype=torch.float64), m, lam)
    raise MaskkitError(f"unknown debias mode {mode!r}; choose from {', '.join(MODES)}")


def apply(classes: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """q <- normalize(q P^T) for the (K, d) class embeddings."""
    return F.normalize(classes.double() @ p.T, dim=-1)


def random_projection(dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    """I - R R^T for a uniformly random rank-`rank` subspace: the control of the same rank as the spurious span."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(gaussian)
    return projection_from_basis(basis)


def fraction_in_span(classes: torch.Tensor, basis: torch.Tensor) -> float:
    """The fraction of the class prompts' differences (each class embedding minus their mean) that lies in
    span(B): what projecting B out removes from the very signal the classifier needs. A random direction puts
    k/d of itself there."""
    q = F.normalize(classes.double(), dim=-1)
    differences = q - q.mean(0, keepdim=True)                  # (K, d)
    total = differences.square().sum()
    if total <= 0:
        raise MaskkitError("the class prompts have identical embeddings: the classifier cannot tell them apart")
    return ((differences @ basis).square().sum() / total).item()


@dataclass
class GroupAccuracy:
    groups: dict[str, float]        # "class / attribute" -> accuracy
    counts: dict[str, int]
    average: float                  # over all images (a group-balanced set: the mean of the groups)
    worst_group: float
    gap: float                      # average - worst group, the paper's "Gap"

    def as_dict(self) -> dict:
        return {"average": self.average, "worst_group": self.worst_group, "gap": self.gap, "groups": self.groups,
                "counts": self.counts}


def zero_shot_predictions(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N,) argmax of cosine similarity between the normalised image embeddings and class embeddings."""
    return (F.normalize(images.double(), dim=-1) @ F.normalize(classes.double(), dim=-1).T).argmax(1)


def group_accuracy(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                   class_names: list[str], group_names: list[str]) -> GroupAccuracy:
    """Accuracy per (class, attribute) group present in the set, their average over images, the worst, the gap."""
    correct = (predictions == labels).double()
    accuracies, counts = {}, {}
    for y, class_name in enumerate(class_names):
        for a, group_name in enumerate(group_names):
            members = (labels == y) & (groups == a)
            if members.any():
                accuracies[f"{class_name} / {group_name}"] = correct[members].mean().item()
                counts[f"{class_name} / {group_name}"] = int(members.sum())
    if not accuracies:
        raise MaskkitError("the evaluation set is empty")
    average = correct.mean().item()
    worst = min(accuracies.values())
    return GroupAccuracy(accuracies, counts, average, worst, average - worst)
