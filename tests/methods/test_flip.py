"""FLIP (Li et al. 2022): masking in training only, unmasked tuning, the symmetric InfoNCE, 2 ranks == 1 rank,
bitwise resume across the switch to unmasked tuning."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from maskkit.config import config_from_dict
from maskkit.data import build_data
from maskkit.errors import MaskkitError
from maskkit.methods.flip import FLIP
from maskkit.rng import sample_keys
from maskkit.train import distributed
from maskkit.train.loop import train
from tests.helpers import SUMMATION_ORDER, assert_bitwise_equal, assert_close_at_scale, resumed_and_straight


def flip_config_dict(**sections) -> dict:
    from tests.conftest import deep_update

    values = {
        "name": "flip-test",
        "method": "flip",
        "model": {"encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "num_heads": 2},
                  "text": {"vocab_size": 128, "context_length": 16, "dim": 32, "depth": 1, "num_heads": 2},
                  "embed_dim": 16, "mask_ratio": 0.5, "unmasked_steps": 2},
        "data": {"kind": "pairs", "name": "shapes", "image_size": 16, "num_samples": 64, "vocab_size": 128,
                 "context_length": 16},
        "optim": {"base_lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5},
    }
    return deep_update(values, sections)


def batch_of(cfg, size: int = 8) -> dict:
    data = build_data(cfg.data, "train")
    batch = data.collate([data.dataset[i] for i in range(size)])
    keys = sample_keys(0, batch["epoch"], batch["index"])
    return data.prepare(batch, keys, torch.device("cpu"))


def tokens_seen_by_encoder(model: FLIP, batch: dict) -> int:
    seen = {}
    handle = model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(n=args[0].shape[1]))
    model(batch)
    handle.remove()
    return seen["n"]


def test_masking_in_training_only_and_not_during_unmasked_tuning():
    cfg = config_from_dict(flip_config_dict())
    model = FLIP(cfg.model)
    batch = batch_of(cfg)
    num_patches = model.encoder.num_patches                       # 16, plus the CLS token
    model.train()
    assert tokens_seen_by_encoder(model, {**batch, "step": 0, "total_steps": 6}) == 1 + num_patches // 2
    assert tokens_seen_by_encoder(model, {**batch, "step": 3, "total_steps": 6}) == 1 + num_patches // 2
    assert tokens_seen_by_encoder(model, {**batch, "step": 4, "total_steps": 6}) == 1 + num_patches   # last 2
    model.eval()
    assert tokens_seen_by_encoder(model, {**batch, "step": 0, "total_steps": 6}) == 1 + num_patches


def test_symmetric_infonce_by_hand():
    cfg = config_from_dict(flip_config_dict())
    model = FLIP(cfg.model)
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    text = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    loss, _ = model.contrastive_loss(image, text)
    logits = (1 / 0.07) * image @ text.T
    by_hand = 0.0
    for i in range(4):
        by_hand += -torch.log_softmax(logits[i], 0)[i] / 8 - torch.log_softmax(logits[:, i], 0)[i] / 8
    torch.testing.assert_close(loss, by_hand)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))                   # clamped at 100
    loss_clamped, _ = model.contrastive_loss(image, text)
    expected = (F.cross_entropy(100 * image @ text.T, torch.arange(4)) + F.cross_entropy(100 * text @ image.T, torch.arange(4))) / 2
    torch.testing.assert_close(loss_clamped, expected)


def test_flip_refuses_image_data_and_a_small_vocabulary(tmp_path):
    values = flip_config_dict()
    values["data"] = {"name": "digits", "image_size": 16}
    with pytest.raises(MaskkitError, match="data.kind must be pairs for method flip"):
        config_from_dict(values)
    cfg = config_from_dict(flip_config_dict(model={"text": {"vocab_size": 20}}))
    with pytest.raises(MaskkitError, match="model.text.vocab_size"):
        train(cfg, tmp_path / "run", progress=False)


def gradients(cfg, batch: dict, world_size: int, rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    method = FLIP(cfg.model)
    model = distributed.wrap(method, distributed.DistInfo(rank=rank, world_size=world_size))
    share = len(batch["images"]) // world_size
    mine = {k: (v[rank * share : (rank + 1) * share] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in batch.items()}
    model(mine).loss.backward()
    return {name: p.grad.clone() for name, p in method.named_parameters()}


def _rank_main(rank, world_size, init_file, out_dir, cfg_dict, batch_file, detached_gather=False):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    if detached_gather:           # the negative control: the bug a contrastive loss's gather must not have
        import maskkit.methods.flip as flip_module
        from maskkit import collectives

        flip_module.all_gather_with_grad = collectives.all_gather_no_grad
    batch = load_file(batch_file)
    batch.update(step=0, total_steps=6)
    grads = gradients(config_from_dict(cfg_dict), batch, world_size, rank)
    if rank == 0:
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))
    distributed.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("detached_gather", [False, True])
def test_two_ranks_give_the_gradients_of_the_global_batch(tmp_path, detached_gather):
    """Each rank's rows against every rank's columns (features gathered with gradients) == one big batch; with
    the gather detached (the negative control) the comparison catches the missing gradients."""
    cfg_dict = flip_config_dict()
    cfg = config_from_dict(cfg_dict)
    batch = {k: v for k, v in batch_of(cfg, 8).items() if torch.is_tensor(v)}
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), cfg_dict, str(tmp_path / "batch.safetensors"),
                               detached_gather), nprocs=2, join=True)
    two = load_file(tmp_path / "grads.safetensors")
    one = gradients(cfg, {**batch, "step": 0, "total_steps": 6}, 1, 0)
    assert one.keys() == two.keys()
    if detached_gather:
        with pytest.raises(AssertionError):
            for name in one:
                assert_close_at_scale(two[name], one[name], SUMMATION_ORDER, msg=name)
        return
    for name in one:
        assert_close_at_scale(two[name], one[name], SUMMATION_ORDER, msg=name)
    # Without the gather each rank would contrast only its own 4 pairs: a different gradient.
    assert one["logit_scale"].abs() > 0


@pytest.mark.slow
def test_resumed_flip_run_is_bitwise_identical_across_the_switch_to_unmasked_tuning(tmp_path):
    cfg = config_from_dict(flip_config_dict())               # steps 4 and 5 are unmasked
    a, b = resumed_and_straight(cfg, tmp_path)
    assert_bitwise_equal(a, b)
    rows = [__import__("json").loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mask_ratio"] for r in rows] == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    for name in ("backbone.safetensors", "text.safetensors"):
        assert (tmp_path / "straight" / name).is_file()


def test_text_token_dropping_removes_real_tokens_but_never_cls_or_padding():
    cfg = config_from_dict(flip_config_dict(model={"text_mask_ratio": 0.5}))
    model = FLIP(cfg.model).train()
    batch = batch_of(cfg)
    seen = {}

    def record(module, args):
        seen["mask"] = args[1].clone()

    handle = model.text.register_forward_pre_hook(record)
    model({**batch, "step": 0, "total_steps": 6})
    dropped_in_training = seen["mask"]
    model.eval()
    model(batch)
    handle.remove()
    original = batch["attention_mask"]
    assert torch.equal(seen["mask"], original)                              # no dropping at evaluation
    assert (dropped_in_training <= original).all() and (dropped_in_training[:, 0] == 1).all()
    fraction = 1 - dropped_in_training[:, 1:].sum() / original[:, 1:].sum()
    assert 0.3 < float(fraction) < 0.7


def test_zero_shot_on_captioned_digits_runs_on_a_flip_checkpoint(tmp_path):
    from maskkit.eval.run import evaluate

    cfg = config_from_dict(flip_config_dict(data={"name": "digits"}, train={"steps": 3}))
    train(cfg, tmp_path / "run", progress=False)
    result = evaluate(tmp_path / "run", "zero-shot", progress=False)
    assert result["dataset"] == "digits" and result["chance"] == 0.1 and result["num_test"] == 450   # 25% held out
    assert {"pretrained", "random_init"} <= set(result)
    from maskkit.cli import format_eval

    # Zero-shot trains nothing: no count of training images, in the result or in the table.
    assert "num_train" not in result
    assert format_eval(result).startswith("zero-shot on digits (450 test images) -- accuracy\n")


def test_unmasked_tuning_that_covers_the_whole_run_is_refused():
    """FLIP Sec 3: unmasked tuning is a short phase at the end; covering every step would train plain CLIP
    while the run is called FLIP (flip/tiny's 100 unmasked steps with train.steps=15 logged mask_ratio 0)."""
    with pytest.raises(MaskkitError, match=r"model.unmasked_steps=6 covers the whole run \(train.steps=6\)"):
        config_from_dict(flip_config_dict(model={"unmasked_steps": 6}))
    config_from_dict(flip_config_dict(model={"unmasked_steps": 5}))                          # one masked step
    config_from_dict(flip_config_dict(model={"unmasked_steps": 6, "mask_ratio": 0.0}))       # CLIP on purpose
