"""The debiasing projection (Chuang et al. 2023) against its definitions: P0 the orthogonal projection off the
spurious span, the calibrated P the minimiser of the calibration objective, and the effect on a planted bias."""

import pytest
import torch
import torch.nn.functional as F

from maskkit.analysis.debias import (
    apply,
    calibrated_projection,
    calibration_objective,
    debias_matrix,
    fraction_in_span,
    group_accuracy,
    pair_matrix,
    random_projection,
    spurious_basis,
    spurious_projection,
    zero_shot_predictions,
)
from maskkit.errors import MaskkitError

# float64 throughout: identities hold to ~1e-15 per element; 1e-12 leaves room for d = 64 sums.
EXACT = {"atol": 1e-12, "rtol": 0}


def random_embeddings(count: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_p0_is_the_orthogonal_projection_off_the_spurious_span():
    b = random_embeddings(5, 24, 0)
    p0 = spurious_projection(b)
    torch.testing.assert_close(p0 @ p0, p0, **EXACT)                         # idempotent
    torch.testing.assert_close(p0, p0.T, **EXACT)                             # symmetric
    torch.testing.assert_close(p0 @ b.T, torch.zeros(24, 5, dtype=torch.float64), **EXACT)   # P0 B = 0
    columns = b.T                                                              # the paper's I - B (B^T B)^-1 B^T
    formula = torch.eye(24, dtype=torch.float64) - columns @ torch.linalg.inv(columns.T @ columns) @ columns.T
    torch.testing.assert_close(p0, formula, **EXACT)
    assert torch.linalg.matrix_rank(p0) == 24 - 5
    other = random_embeddings(1, 24, 1)[0]                    # a vector off the span keeps its part orthogonal to it
    inside = spurious_basis(b) @ (spurious_basis(b).T @ other)
    torch.testing.assert_close(p0 @ other, other - inside, **EXACT)


def test_lambda_zero_gives_p0_and_a_large_lambda_pulls_pairs_together():
    b, z = random_embeddings(3, 16, 2), random_embeddings(6, 16, 3)
    pairs = [(0, 1), (2, 3), (4, 5)]
    p0, m = spurious_projection(b), pair_matrix(z, pairs)
    torch.testing.assert_close(calibrated_projection(p0, m, 0.0), p0, **EXACT)
    distances = []
    for lam in (0.0, 1.0, 100.0, 1e4, 1e8):
        p = calibrated_projection(p0, m, lam)
        distances.append(max((p @ (z[i] - z[j])).norm().item() for i, j in pairs))
    assert all(later < earlier for earlier, later in zip(distances, distances[1:], strict=False)), distances
    assert distances[-1] < 1e-6 * distances[0]


def test_the_closed_form_minimises_the_calibration_objective():
    b, z = random_embeddings(4, 12, 4), random_embeddings(8, 12, 5)
    p0, m, lam = spurious_projection(b), pair_matrix(z, [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2)]), 7.0
    closed = calibrated_projection(p0, m, lam)
    p = torch.zeros(12, 12, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([p], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = calibration_objective(p, p0, m, lam)
        loss.backward()
        return loss

    optimizer.step(closure)
    # A strictly convex quadratic: L-BFGS converges to its minimiser; 1e-8 is far above its float64 stopping point.
    torch.testing.assert_close(p.detach(), closed, atol=1e-8, rtol=0)
    assert calibration_objective(closed, p0, m, lam) <= calibration_objective(closed + 1e-3 * torch.randn(12, 12, dtype=torch.float64), p0, m, lam)


def test_the_pair_matrix_is_the_mean_outer_product_of_pair_differences():
    z = random_embeddings(4, 6, 6)
    expected = (torch.outer(z[0] - z[1], z[0] - z[1]) + torch.outer(z[2] - z[3], z[2] - z[3])) / 2
    torch.testing.assert_close(pair_matrix(z * 3.0, [(0, 1), (2, 3)]), expected, **EXACT)   # normalised first


def test_modes():
    b, z = random_embeddings(2, 8, 7), random_embeddings(2, 8, 8)
    p0, m = spurious_projection(b), pair_matrix(z, [(0, 1)])
    torch.testing.assert_close(debias_matrix("projection", p0, None, 5.0), p0, **EXACT)
    torch.testing.assert_close(debias_matrix("calibration", p0, m, 5.0),
                               torch.linalg.inv(5.0 * m + torch.eye(8, dtype=torch.float64)), **EXACT)
    with pytest.raises(MaskkitError, match="needs positive pairs"):
        debias_matrix("calibrated", p0, None, 5.0)
    with pytest.raises(MaskkitError, match="unknown debias mode"):
        debias_matrix("both", p0, m, 5.0)
    with pytest.raises(MaskkitError, match="must be >= 0"):
        calibrated_projection(p0, m, -1.0)


def test_rank_deficient_and_empty_prompt_sets_are_refused_naming_the_prompt():
    b = random_embeddings(3, 10, 9)
    repeated = torch.cat([b, (b[0] + b[1])[None]])
    with pytest.raises(MaskkitError, match=r"rank-deficient \(rank 3 of 4 prompts\): prompt 4 \('d'\)"):
        spurious_basis(repeated, ["a", "b", "c", "d"])
    with pytest.raises(MaskkitError, match="empty"):
        spurious_basis(torch.zeros(0, 10))
    with pytest.raises(MaskkitError, match="10 spurious prompts in a 10-dimensional"):
        spurious_basis(random_embeddings(10, 10, 10))
    with pytest.raises(MaskkitError, match="no positive pairs"):
        pair_matrix(b, [])


def test_random_projection_has_the_rank_and_is_a_projection():
    p = random_projection(20, 4, seed=3)
    torch.testing.assert_close(p @ p, p, **EXACT)
    assert torch.linalg.matrix_rank(p) == 16
    assert not torch.equal(p, random_projection(20, 4, seed=4))
    torch.testing.assert_close(p, random_projection(20, 4, seed=3), atol=0, rtol=0)


def test_fraction_in_span():
    basis = torch.eye(6, dtype=torch.float64)[:, :2]                 # span(e0, e1)
    classes = torch.tensor([[1.0, 0, 1, 0, 0, 0], [-1.0, 0, -1, 0, 0, 0]], dtype=torch.float64)
    assert fraction_in_span(classes, basis) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(MaskkitError, match="identical"):
        fraction_in_span(classes[:1].repeat(2, 1), basis)


def test_group_accuracy():
    labels, groups = torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    predictions = torch.tensor([0, 1, 1, 1, 0, 0])
    result = group_accuracy(predictions, labels, groups, ["circle", "square"], ["green", "blue"])
    assert result.groups == {"circle / green": 1.0, "circle / blue": 0.0, "square / green": 1.0, "square / blue": 0.5}
    assert result.average == pytest.approx(4 / 6) and result.worst_group == 0.0
    assert result.gap == pytest.approx(4 / 6)


def planted_world(dim: int = 32, seed: int = 0):
    """Images (y, a) = class sign on c + attribute sign on s + noise; class prompts lean to their usual attribute."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    c, s = basis[:, 0], basis[:, 1]
    labels, groups = torch.arange(400) % 2, (torch.arange(400) // 2) % 2
    sign = lambda v: 2.0 * v.double() - 1.0                                  # noqa: E731
    images = sign(labels)[:, None] * c + sign(groups)[:, None] * s \
        + 0.3 * torch.randn(400, dim, generator=generator, dtype=torch.float64)
    classes = torch.stack([-0.5 * c - 0.8 * s, 0.5 * c + 0.8 * s])          # class y's prompt leans to a = y
    spurious = torch.stack([s + 0.05 * torch.randn(dim, generator=generator, dtype=torch.float64) for _ in range(3)]
                           + [-s + 0.05 * torch.randn(dim, generator=generator, dtype=torch.float64) for _ in range(3)])
    # Paired prompts: a class's prompt on either attribute (they differ along s).
    candidates = torch.stack([sign(torch.tensor(y)) * c + sign(torch.tensor(a)) * s for y in (0, 1) for a in (0, 1)])
    return images, labels, groups, classes, spurious, candidates


def test_a_planted_spurious_direction_is_removed_and_the_random_control_is_not():
    images, labels, groups, classes, spurious, candidates = planted_world()
    names, attributes = ["circle", "square"], ["green", "blue"]

    def worst(p):
        predictions = zero_shot_predictions(images, apply(classes, p))
        return group_accuracy(predictions, labels, groups, names, attributes).worst_group

    identity = torch.eye(32, dtype=torch.float64)
    before = worst(identity)
    p0 = spurious_projection(spurious)
    m = pair_matrix(candidates, [(0, 1), (2, 3)])
    control = random_projection(32, 6, seed=0)
    assert before < 0.2                                         # the planted bias: minority groups misclassified
    assert worst(p0) > 0.9 and worst(calibrated_projection(p0, m, 1000.0)) > 0.9
    assert worst(debias_matrix("calibration", p0, m, 1000.0)) > 0.9
    assert worst(control) < 0.3                                 # a random subspace of the same rank leaves the bias
    assert fraction_in_span(classes, spurious_basis(spurious)) > 0.6    # s carries most of the class difference
