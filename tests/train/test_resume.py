import json

import pytest
import torch
from safetensors.torch import load_file

from maskkit.errors import MaskkitError
from maskkit.methods.mae import MAE
from maskkit.train import checkpoint
from maskkit.train.loop import StepSampler, train


def final_tensors(run):
    found = checkpoint.find_checkpoint(run)
    return load_file(found / "model.safetensors"), load_file(found / "optimizer.safetensors")


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, tiny_config):
    cfg = tiny_config(train={"steps": 6, "accumulation_steps": 2})
    train(cfg, tmp_path / "straight", progress=False)
    partial = train(cfg, tmp_path / "resumed", stop_at_step=3, progress=False)
    assert partial.final_step == 3 and not (tmp_path / "resumed" / "backbone.safetensors").exists()
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.final_step == 6
    weights_a, optim_a = final_tensors(tmp_path / "straight")
    weights_b, optim_b = final_tensors(tmp_path / "resumed")
    assert weights_a.keys() == weights_b.keys() and optim_a.keys() == optim_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for key in optim_a:
        assert torch.equal(optim_a[key], optim_b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # Training actually changed the weights.
    fresh = MAE(cfg.model).trainable_state_dict()
    assert not torch.equal(fresh["encoder.blocks.0.attn.qkv.weight"], weights_a["encoder.blocks.0.attn.qkv.weight"])


def test_run_directory_holds_what_a_user_needs(tmp_path, tiny_config):
    cfg = tiny_config(train={"steps": 4})
    train(cfg, tmp_path / "run", progress=False)
    for name in ("config.yaml", "metrics.jsonl", "backbone.safetensors", "loss_curve.png", "reconstruction.png"):
        assert (tmp_path / "run" / name).is_file(), name
    backbone = load_file(tmp_path / "run" / "backbone.safetensors")
    assert all(not key.startswith("decoder") for key in backbone) and "patch_embed.weight" in backbone
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_0000003", "step_0000004"]


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path, tiny_config):
    cfg = tiny_config(train={"steps": 3})
    with pytest.raises(MaskkitError, match="no checkpoint"):
        (tmp_path / "empty").mkdir()
        train(cfg, tmp_path / "empty", resume=True, progress=False)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(MaskkitError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(train={"steps": 6, "checkpoint_every": 2})
    original, calls = MAE.forward, {"n": 0}

    def forward_that_diverges(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", forward_that_diverges)
    with pytest.raises(MaskkitError, match=r"non-finite loss .* at step 3.*step_0000002"):
        train(cfg, tmp_path / "run", progress=False)
    found = checkpoint.find_checkpoint(tmp_path / "run")
    assert found.name == "step_0000002"
    assert all(torch.isfinite(t).all() for t in load_file(found / "model.safetensors").values())


def test_ranks_and_micro_batches_cover_the_same_global_batch():
    def global_batches(world_size, accumulation, steps=5):
        per_step = []
        streams = [iter(StepSampler(50, 8, r, world_size, accumulation, seed=3)) for r in range(world_size)]
        for _ in range(steps):
            per_step.append(sorted(i for s in streams for _ in range(accumulation) for i in next(s)))
        return per_step

    one = global_batches(1, 1)
    assert one == global_batches(2, 1) == global_batches(2, 2) == global_batches(1, 4)
    assert all(len(b) == 8 and len({i for i, _ in b}) == 8 for b in one)
    # Resuming at step 3 continues with the same batches.
    resumed = iter(StepSampler(50, 8, 0, 1, 1, seed=3, start_step=3))
    assert sorted(next(resumed)) == one[3]


@pytest.mark.parametrize("world_size, accumulation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_epoch_covers_the_data_set_exactly_once_in_its_own_order(world_size, accumulation):
    num_samples, global_batch = 50, 8                   # 50 is not a multiple of 8: batches straddle epochs
    steps = 4 * num_samples // global_batch             # 25 steps = 4 epochs
    streams = [iter(StepSampler(num_samples, global_batch, r, world_size, accumulation, seed=3))
               for r in range(world_size)]
    seen = [item for _ in range(steps) for s in streams for _ in range(accumulation) for item in next(s)]
    orders = []
    for epoch in range(4):
        indices = [i for i, e in seen if e == epoch]
        assert sorted(indices) == list(range(num_samples)), f"epoch {epoch}"
        orders.append(indices)
    # Each epoch has its own permutation (a sampler that replays epoch 0 fails here).
    assert len({tuple(order) for order in orders}) == 4


@pytest.mark.slow
def test_resume_is_bitwise_exact_across_epoch_boundaries(tmp_path, tiny_config):
    """40 samples, batch 16: 9 steps cross 3 epoch boundaries (after 2.5, 5 and 7.5 steps)."""
    cfg = tiny_config(data={"name": "photos", "photo_crops": 40, "image_size": 16},
                      train={"steps": 9, "checkpoint_every": 1, "keep_checkpoints": 20})
    train(cfg, tmp_path / "straight", progress=False)
    weights_a, optim_a = final_tensors(tmp_path / "straight")
    # Step 3: inside epoch 1; step 5: exactly on the boundary of epochs 1 and 2; step 8: two epochs in.
    for stop in (3, 5, 8):
        run = tmp_path / f"resumed_at_{stop}"
        train(cfg, run, stop_at_step=stop, progress=False)
        assert train(cfg, run, resume=True, progress=False).final_step == 9
        weights_b, optim_b = final_tensors(run)
        for key in weights_a:
            assert torch.equal(weights_a[key], weights_b[key]), (stop, key)
        for key in optim_a:
            assert torch.equal(optim_a[key], optim_b[key]), (stop, key)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 10))
        assert [r["epoch"] for r in rows][-1] == pytest.approx(9 * 16 / 40)


def test_a_run_saved_before_a_config_key_existed_resumes_and_a_changed_key_is_still_refused(tmp_path, tiny_config):
    """A later maskkit adds keys (at defaults that keep the earlier behaviour): the older run's state.json
    lacks them, and --resume must neither refuse it nor let a real change through."""
    cfg = tiny_config()
    run = tmp_path / "run"
    train(cfg, run, stop_at_step=3, progress=False)
    state_file = checkpoint.find_checkpoint(run) / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["eval"]["finetune_labels_per_class"]        # as a run from before that key was added
    state_file.write_text(json.dumps(state))
    assert train(cfg, run, resume=True, progress=False).final_step == 6
    with pytest.raises(MaskkitError, match="optim.base_lr"):
        train(tiny_config(optim={"base_lr": 0.5}), tmp_path / "run", resume=True, progress=False)
