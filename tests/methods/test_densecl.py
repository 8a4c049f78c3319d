"""DenseCL (Wang et al. CVPR 2021): the geometric correspondence is the analytic map, the feature matching
depends on backbone tokens only, lambda = 0 is MoCo v2, and runs resume bitwise with both queues."""

import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize

from maskkit.config import config_from_dict
from maskkit.errors import MaskkitError
from maskkit.methods.densecl import DenseCL, DenseCLConfig, geometric_correspondence, match_tokens
from maskkit.methods.mae import patchify
from maskkit.methods.moco import MoCo, MoCoConfig
from maskkit.nn.transformer import ViTConfig
from maskkit.train.loop import train
from tests.helpers import (
    SUMMATION_ORDER,
    assert_bitwise_equal,
    assert_close_at_scale,
    assert_same_weights,
    resumed_and_straight,
    train_on_two_ranks,
)
from tests.methods.test_moco import moco_config_dict


def corners(x0: float, y0: float, side: float) -> torch.Tensor:
    x1, y1 = x0 + side - 1, y0 + side - 1
    return torch.tensor([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]])


@pytest.mark.parametrize("flip_key", [False, True])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_geometric_correspondence_of_a_view_shifted_by_k_patches(shift, flip_key):
    size, patch = 16, 4
    grid = size // patch
    q, k = corners(0, 0, size), corners(shift * patch, 0, size)
    truth = geometric_correspondence(q, torch.tensor([False]), k, torch.tensor([flip_key]), grid, size)[0]
    for row in range(grid):
        for col in range(grid):
            expected = -1 if col < shift else row * grid + (col - shift)
            if expected >= 0 and flip_key:
                expected = row * grid + (grid - 1 - (col - shift))
            assert int(truth[row * grid + col]) == expected
    # And it is what crop_and_resize really does: on an image whose patches are all different, the pixels
    # of each query patch reappear in the key view exactly at the matched token.
    image = torch.rand(1, 3, size, size * 2)
    view_q = crop_and_resize(image, q, (size, size))
    view_k = crop_and_resize(image, k, (size, size))
    by_content = match_tokens(patchify(view_q, patch), patchify(view_k, patch))[0]
    if flip_key:      # a flip also mirrors pixels inside each patch: match unflipped, then mirror the column
        by_content = (by_content // grid) * grid + (grid - 1 - by_content % grid)
    valid = truth >= 0
    assert valid.sum() == grid * (grid - shift)
    assert torch.equal(by_content[valid], truth[valid])


def test_matching_depends_on_backbone_tokens_not_on_the_dense_head():
    cfg = config_from_dict(moco_config_dict(method="densecl", model={"positives": "features"}))
    torch.manual_seed(0)
    model = DenseCL(cfg.model).eval()
    batch = {"images": torch.randn(4, 3, 16, 16), "images2": torch.randn(4, 3, 16, 16)}
    before = model(batch).extras["match"]
    with torch.no_grad():
        for p in [*model.dense_head.parameters(), *model.key_dense_head.parameters()]:
            p.normal_()
    assert torch.equal(model(batch).extras["match"], before)


def permuted_patches(images: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    """The image whose token t shows patch order[t] of `images`: (B, C, H, W) -> same shape."""
    b, c, h, w = images.shape
    g = h // patch
    tiles = images.view(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, patch, patch)
    return tiles[:, order].view(b, g, g, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_feature_positives_follow_content_not_grid_cells():
    # Without positions the ViT is equivariant to permuting its tokens, so when the key view shows the
    # query's patches shuffled, the position-free argmax finds each patch where it moved (Sec 3.3). With
    # the sin-cos embedding in the features (the old matching) the same grid cell wins instead.
    cfg = config_from_dict(moco_config_dict(method="densecl", model={"positives": "features"}))
    torch.manual_seed(0)
    model = DenseCL(cfg.model).eval()
    images = 0.5 + 0.1 * torch.rand(2, 3, 16, 16)      # low contrast, like the shapes world's background
    order = torch.randperm(16)
    batch = {"images": images, "images2": permuted_patches(images, 4, order)}
    match = model(batch).extras["match"]
    inverse = torch.argsort(order)                       # query token t now sits at key token inverse[t]
    assert torch.equal(match, inverse.expand(2, -1))
    with torch.no_grad():
        with_positions = match_tokens(model.encoder.patch_tokens(model.encoder(batch["images"])),
                                      model.key_encoder.patch_tokens(model.key_encoder(batch["images2"])))
    assert (with_positions == inverse).float().mean() < 0.5
    assert (with_positions == torch.arange(16)).float().mean() > 0.5


def test_geometric_positives_need_the_crop_boxes_and_unknown_positives_are_refused():
    cfg = config_from_dict(moco_config_dict(method="densecl", model={"positives": "geometric"}))
    model = DenseCL(cfg.model)
    with pytest.raises(MaskkitError, match="model.positives=geometric needs the crop boxes"):
        model({"images": torch.randn(2, 3, 16, 16), "images2": torch.randn(2, 3, 16, 16)})
    with pytest.raises(MaskkitError, match="model.positives"):
        config_from_dict(moco_config_dict(method="densecl", model={"positives": "argmax"}))


def test_geometric_positives_are_the_true_correspondence():
    # The key view is the query view shifted right by one patch: every query token outside the first
    # column has its positive one token to the left, and the dense loss uses exactly those tokens.
    cfg = config_from_dict(moco_config_dict(method="densecl", model={"positives": "geometric", "dense_weight": 1.0}))
    torch.manual_seed(0)
    model = DenseCL(cfg.model).eval()
    image = torch.rand(1, 3, 16, 20)
    q, k = corners(0, 0, 16), corners(4, 0, 16)
    batch = {"images": crop_and_resize(image, q, (16, 16)), "images2": crop_and_resize(image, k, (16, 16)),
             "boxes": q, "boxes2": k, "flips": torch.tensor([False]), "flips2": torch.tensor([False])}
    out = model(batch)
    with torch.no_grad():
        query = F.normalize(model.dense_head(model.encoder.patch_tokens(model.encoder(batch["images"]))), dim=2)[0]
        key = F.normalize(model.key_dense_head(model.key_encoder.patch_tokens(model.key_encoder(batch["images2"]))), dim=2)[0]
    tokens = torch.arange(16)
    valid = tokens % 4 > 0
    # By hand: each valid token's InfoNCE against its left neighbour and the queue; the others add 0.
    logits = torch.cat([(query[valid] * key[tokens[valid] - 1]).sum(1, keepdim=True), query[valid] @ model.dense_queue.T], 1)
    expected = F.cross_entropy(logits / cfg.model.temperature, torch.zeros(int(valid.sum()), dtype=torch.long),
                               reduction="sum") / 16
    # Same operations on the same tensors, gathered differently: float32 rounding of a loss of order 1.
    torch.testing.assert_close(out.logs["dense_loss"], expected, rtol=1e-5, atol=1e-6 * float(expected.abs()))


def test_dense_loss_is_eq3_per_token_info_nce_over_all_tokens():
    """Eq. 3: -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_k exp(q.k- / T)) per token, the queue as negatives,
    averaged over every token of the batch with the tokens without a positive adding 0; and its gradient."""
    encoder = ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2)
    densecl = DenseCL(DenseCLConfig(encoder=encoder, head_hidden=32, embed_dim=16, queue_size=32, temperature=0.2))
    query = F.normalize(torch.randn(3, 16, 16), dim=2).requires_grad_(True)
    positive = F.normalize(torch.randn(3, 16, 16), dim=2)
    valid = torch.rand(3, 16) > 0.3
    loss = densecl.dense_info_nce(query, positive, valid)
    logits = torch.cat([(query * positive).sum(2, keepdim=True), query @ densecl.dense_queue.T], dim=2) / 0.2
    per_token = F.cross_entropy(logits.flatten(0, 1), torch.zeros(48, dtype=torch.long), reduction="none")
    expected = (per_token * valid.flatten()).sum() / 48
    assert_close_at_scale(loss, expected, SUMMATION_ORDER)
    (grad,) = torch.autograd.grad(loss, query)
    (expected_grad,) = torch.autograd.grad(expected, query)
    assert_close_at_scale(grad, expected_grad, SUMMATION_ORDER)
    assert torch.all(grad[~valid] == 0) and torch.all(grad[valid].abs().sum(-1) > 0)


def test_lambda_zero_is_moco_v2():
    encoder = ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    densecl = DenseCL(DenseCLConfig(encoder=encoder, head_hidden=32, embed_dim=16, queue_size=32, dense_weight=0.0))
    moco = MoCo(MoCoConfig(encoder=encoder, head_hidden=32, embed_dim=16, queue_size=32))
    moco.load_state_dict({k: v for k, v in densecl.state_dict().items() if k in moco.state_dict()})
    batch = {"images": torch.randn(4, 3, 16, 16), "images2": torch.randn(4, 3, 16, 16)}
    a, b = densecl(batch).loss, moco(batch).loss
    assert_close_at_scale(a, b, SUMMATION_ORDER, msg="loss")
    a.backward()
    b.backward()
    moco_params = dict(moco.named_parameters())
    for name, p in densecl.named_parameters():
        if name in moco_params and moco_params[name].grad is not None:
            assert_close_at_scale(p.grad, moco_params[name].grad, SUMMATION_ORDER, msg=name)


def test_a_grid_smaller_than_2x2_is_refused():
    with pytest.raises(MaskkitError, match="token grid of at least 2x2"):
        config_from_dict(moco_config_dict(method="densecl", model={"encoder": {"patch_size": 16}}))


@pytest.mark.slow
def test_resume_is_bitwise_with_both_queues(tmp_path):
    cfg = config_from_dict(moco_config_dict(method="densecl"))
    a, b = resumed_and_straight(cfg, tmp_path)
    assert_bitwise_equal(a, b)
    assert {"queue", "dense_queue"} <= set(a)
    rows = [__import__("json").loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all("dense_loss" in r and "correspondence_accuracy" not in r for r in rows)   # geometric: no matching


def test_geometric_positives_run_the_feature_matching_only_to_log_it_when_asked(monkeypatch):
    """With geometric positives the argmax matching only feeds `correspondence_accuracy`: two forward passes a
    step that the default leaves out (`model.log_feature_match`)."""
    calls = []
    monkeypatch.setattr(DenseCL, "feature_match", lambda self, batch: calls.append(1) or torch.zeros(
        len(batch["images"]), self.encoder.grid_size ** 2, dtype=torch.long))
    image = torch.rand(1, 3, 16, 20)
    q, k = corners(0, 0, 16), corners(4, 0, 16)
    batch = {"images": crop_and_resize(image, q, (16, 16)), "images2": crop_and_resize(image, k, (16, 16)),
             "boxes": q, "boxes2": k, "flips": torch.tensor([False]), "flips2": torch.tensor([False])}
    for flag, positives, expected_calls in ((False, "geometric", 0), (True, "geometric", 1), (False, "features", 1)):
        calls.clear()
        cfg = config_from_dict(moco_config_dict(method="densecl", model={"positives": positives,
                                                                         "log_feature_match": flag}))
        out = DenseCL(cfg.model).eval()(batch)
        assert len(calls) == expected_calls and ("correspondence_accuracy" in out.logs) == bool(expected_calls)
    with pytest.raises(MaskkitError, match="model.log_feature_match' expects true or false"):
        config_from_dict(moco_config_dict(method="densecl", model={"log_feature_match": "yes"}))


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_both_queues(tmp_path):
    cfg_dict = moco_config_dict(method="densecl", train={"steps": 3, "threads": 1, "checkpoint_every": 3})
    train_on_two_ranks(cfg_dict, tmp_path / "two", tmp_path / "init")
    train(config_from_dict(cfg_dict), tmp_path / "one", progress=False)
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_dense_warmup_that_covers_the_whole_run_is_refused():
    """lambda = 0 during the warm-up: one that covers every step trains MoCo v2 while the run says DenseCL."""
    steps = moco_config_dict()["train"]["steps"]
    with pytest.raises(MaskkitError, match=rf"model.dense_warmup_steps={steps} covers the whole run"):
        config_from_dict(moco_config_dict(method="densecl", model={"dense_warmup_steps": steps}))
    config_from_dict(moco_config_dict(method="densecl", model={"dense_warmup_steps": steps - 1}))
    config_from_dict(moco_config_dict(method="densecl", model={"dense_warmup_steps": steps, "dense_weight": 0.0}))
