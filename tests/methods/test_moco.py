"""MoCo v2 on the spine: the queue is FIFO and wraps, the key encoder is an EMA updated once per step,
gradient accumulation changes nothing (gradients, queue, key encoder), resume is bitwise with the queue,
and 2 ranks equal 1."""

import pytest
import torch

from maskkit.config import config_from_dict
from maskkit.errors import MaskkitError
from maskkit.methods.moco import MoCo, MoCoConfig
from maskkit.nn.transformer import ViTConfig
from maskkit.train.loop import train
from tests.conftest import deep_update
from tests.helpers import (
    SUMMATION_ORDER,
    assert_bitwise_equal,
    assert_close_at_scale,
    assert_same_weights,
    first_step,
    resumed_and_straight,
    train_on_two_ranks,
)


def moco_config_dict(method: str = "moco", **sections) -> dict:
    values = {
        "name": f"{method}-test",
        "method": method,
        "model": {"encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "num_heads": 2},
                  "head_hidden": 32, "embed_dim": 16, "queue_size": 32, "momentum": 0.9},
        "data": {"name": "photos", "image_size": 16, "photo_crops": 40, "views": 2, "color": True},
        "optim": {"base_lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 10},
    }
    return deep_update(values, sections)


def tiny_moco(queue_size: int = 8) -> MoCo:
    torch.manual_seed(0)
    return MoCo(MoCoConfig(encoder=ViTConfig(image_size=8, patch_size=4, dim=8, depth=1, num_heads=2),
                           head_hidden=8, embed_dim=4, queue_size=queue_size, momentum=0.9))


def test_queue_is_fifo_and_wraps_around():
    model = tiny_moco(queue_size=6)
    batches = [torch.full((2, 4), float(i)) for i in range(1, 5)]
    for keys in batches[:3]:
        model.enqueue(keys)
    assert model.queue[:, 0].tolist() == [1, 1, 2, 2, 3, 3] and int(model.queue_pointer) == 0
    model.enqueue(batches[3])                                      # wraps: the oldest keys go first
    assert model.queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3] and int(model.queue_pointer) == 2
    with pytest.raises(MaskkitError, match="not a multiple"):
        model.enqueue(torch.zeros(4, 4))


def test_key_encoder_is_an_ema_of_the_query_encoder_updated_once_per_step():
    model = tiny_moco()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in model.key_encoder.named_parameters()}
    query = dict(model.encoder.named_parameters())
    model.after_step(0, 10)
    for name, p in model.key_encoder.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * query[name])
    assert not any(p.requires_grad for p in model.key_encoder.parameters())


def test_four_micro_batches_give_the_gradients_queue_and_key_encoder_of_one_batch(tmp_path, monkeypatch):
    whole = first_step(config_from_dict(moco_config_dict()), tmp_path / "whole", monkeypatch)
    micro = first_step(config_from_dict(moco_config_dict(train={"accumulation_steps": 4})), tmp_path / "micro",
                       monkeypatch)
    for name in whole[0]:
        assert_close_at_scale(micro[0][name], whole[0][name], SUMMATION_ORDER, msg=name)
    for name in ("queue", "queue_pointer", "key_encoder.blocks.0.attn.qkv.weight", "key_head.0.weight"):
        assert_close_at_scale(micro[1][name], whole[1][name], SUMMATION_ORDER, msg=name)
    assert int(whole[1]["queue_pointer"]) == 16           # all four micro-batches' keys, after the step


@pytest.mark.slow
def test_resume_is_bitwise_with_the_queue_across_epochs(tmp_path):
    cfg = config_from_dict(moco_config_dict())             # 40 samples, batch 16: 6 steps cross 2 epochs
    a, b = resumed_and_straight(cfg, tmp_path)
    assert_bitwise_equal(a, b)
    assert "queue" in a
    assert int(a["queue_pointer"]) == (6 * 16) % 32


@pytest.mark.slow
def test_two_ranks_match_one_rank_weights_and_queue(tmp_path):
    cfg_dict = moco_config_dict(train={"steps": 3, "threads": 1, "checkpoint_every": 3})
    train_on_two_ranks(cfg_dict, tmp_path / "two", tmp_path / "init")
    train(config_from_dict(cfg_dict), tmp_path / "one", progress=False)
    assert_same_weights(tmp_path / "one", tmp_path / "two")        # the queue and the key encoder included


def test_bad_values_fail_in_one_line():
    with pytest.raises(MaskkitError, match="data.views must be 2"):
        config_from_dict(moco_config_dict(data={"views": 1}))
    with pytest.raises(MaskkitError, match="model.queue_size must be a multiple of train.batch_size=16"):
        config_from_dict(moco_config_dict(model={"queue_size": 40}))


def test_two_views_are_different_reproducible_and_keep_their_boxes():
    from maskkit.data.augment import ImageAugment
    from maskkit.data.images import DataConfig

    augment = ImageAugment(DataConfig(image_size=16, views=2, color=True))
    raw = {"images": torch.rand(4, 3, 24, 24), "index": torch.arange(4), "epoch": torch.zeros(4, dtype=torch.long)}
    a = augment.prepare(dict(raw), torch.arange(4), torch.device("cpu"))
    b = augment.prepare(dict(raw), torch.arange(4), torch.device("cpu"))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["images2"], b["images2"])
    assert not torch.allclose(a["images"], a["images2"]) and not torch.equal(a["boxes"], a["boxes2"])
    assert a["boxes"].shape == (4, 4, 2) and a["flips"].dtype == torch.bool
