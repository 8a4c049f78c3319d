"""Validation during training (train.eval_every, train.keep_best): the held-out loss (and, for image backbones,
the kNN protocol's accuracy) is measured on the held-out split, the same way every time, without touching
what training computes; resume stays bitwise; the best checkpoint survives the rotation of the others; two
ranks do not wait for each other forever."""

import json

import pytest
import torch
from safetensors.torch import load_file

from maskkit.config import config_from_dict
from maskkit.data import build_data
from maskkit.errors import MaskkitError
from maskkit.methods import build_method
from maskkit.train import checkpoint, loop
from maskkit.train.loop import HeldOut, train
from maskkit.train.metrics import plot_loss_curve
from tests.conftest import tiny_config_dict
from tests.helpers import train_on_two_ranks
from tests.methods.test_energy import energy_config_dict


def rows(run, key):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def tensors(run):
    found = checkpoint.find_checkpoint(run)
    return {**load_file(found / "model.safetensors"), **load_file(found / "optimizer.safetensors")}


def test_validation_changes_no_weight_and_a_resumed_run_measures_what_a_straight_one_does(tmp_path, tiny_config):
    plain = tiny_config(train={"steps": 6})
    validated = tiny_config(train={"steps": 6, "eval_every": 2, "eval_samples": 40})
    train(plain, tmp_path / "plain", progress=False)
    train(validated, tmp_path / "straight", progress=False)
    train(validated, tmp_path / "resumed", stop_at_step=3, progress=False)
    train(validated, tmp_path / "resumed", resume=True, progress=False)

    reference = tensors(tmp_path / "plain")
    for run in ("straight", "resumed"):   # weights, optimizer moments and RNG states, bit for bit
        found = tensors(tmp_path / run)
        assert found.keys() == reference.keys()
        assert all(torch.equal(found[key], reference[key]) for key in reference), run
    straight, resumed = rows(tmp_path / "straight", "val_loss"), rows(tmp_path / "resumed", "val_loss")
    assert [r["step"] for r in straight] == [2, 4, 6] and straight == resumed
    assert straight[-1]["val_loss"] < straight[0]["val_loss"]      # it measures the training's progress
    assert all(0 < r["val_knn"] <= 1 for r in straight)            # an image backbone: kNN too, by default
    assert rows(tmp_path / "plain", "val_loss") == []
    # Training rows are unchanged: the losses of the run with validation are the plain run's.
    assert [r["loss"] for r in rows(tmp_path / "straight", "loss")] == [r["loss"] for r in rows(tmp_path / "plain", "loss")]


def test_the_held_out_loss_reads_the_held_out_split_and_is_the_same_measurement_every_time(tiny_config):
    cfg = tiny_config(train={"eval_every": 1, "eval_samples": 20, "batch_size": 8})
    held_out = HeldOut(cfg.data, cfg.train)
    test_split = build_data(cfg.data, "test").dataset
    assert [len(b["index"]) for b in held_out.batches] == [8, 8]           # full batches only
    assert torch.equal(held_out.batches[0]["images"], torch.stack([test_split[i]["images"] for i in range(8)]))
    method = build_method(cfg)
    before = torch.get_rng_state()
    first = held_out.loss(method, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert torch.equal(torch.get_rng_state(), before) and method.training   # training's generator untouched
    torch.rand(5)                                                          # whatever the training drew since
    assert held_out.loss(method, torch.device("cpu"), torch.autocast("cpu", enabled=False)) == first


def test_text_runs_measure_the_val_split():
    from maskkit.config import load_config

    cfg = load_config("mlm/tiny", ["data.max_documents=30", "data.block_length=32", "train.eval_every=1",
                                   "train.eval_samples=1000", "train.batch_size=4"])
    held_out = HeldOut(cfg.data, cfg.train)
    val = build_data(cfg.data, "val").dataset           # 11 blocks (test: 17, train: 107)
    assert [len(b["index"]) for b in held_out.batches] == [4, 4]
    assert torch.equal(torch.cat([b["ids"] for b in held_out.batches]), torch.stack([val[i]["ids"] for i in range(8)]))


def test_energy_restoration_runs_under_the_held_out_loss_no_grad():
    cfg = config_from_dict(energy_config_dict(model={"inner_steps": 2}, data={"name": "digits"},
                                              train={"eval_every": 1, "eval_samples": 8, "batch_size": 8}))
    method = build_method(cfg)
    loss = HeldOut(cfg.data, cfg.train).loss(method, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert loss > 0 and all(p.grad is None for p in method.parameters())


def test_keep_best_keeps_the_lowest_val_loss_through_rotation_and_resume(tmp_path, tiny_config, monkeypatch):
    # Scripted measurements (one per step), so that the best is an early step the rotation would delete.
    measured = iter([3.0, 1.0, 2.0, 1.5, 2.0, 2.5])
    monkeypatch.setattr(HeldOut, "loss", lambda self, *args: next(measured))
    cfg = tiny_config(train={"steps": 6, "eval_every": 1, "keep_best": True, "checkpoint_every": 3,
                             "keep_checkpoints": 1})
    run = tmp_path / "run"
    train(cfg, run, stop_at_step=3, progress=False)
    train(cfg, run, resume=True, progress=False)      # 1.5 at step 4 does not beat step 2's 1.0 from before
    assert (run / "checkpoints" / "best").read_text() == "step_0000002\n"
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_0000002", "step_0000006"]
    assert checkpoint.read_state(run / "checkpoints" / "step_0000002")["val_loss"] == 1.0
    # The best is a checkpoint like the others: a run resumes from it, and evaluation reads it.
    assert checkpoint.find_checkpoint(run / "checkpoints" / "step_0000002").name == "step_0000002"
    assert [r["val_loss"] for r in rows(run, "val_loss")] == [3.0, 1.0, 2.0, 1.5, 2.0, 2.5]


def test_the_knn_accuracy_at_validation_is_the_knn_protocol_of_maskkit_eval(tmp_path, tiny_config):
    """With a bank and a query set as large as the labelled splits, the val_knn of the last step is exactly what
    `maskkit eval --protocol knn` reports for that checkpoint (same features, same k and T, same votes)."""
    from maskkit.eval.run import evaluate

    cfg = tiny_config(train={"steps": 4, "eval_every": 4, "eval_samples": 10_000, "knn_bank": 10_000},
                      eval={"knn_k": 5})
    train(cfg, tmp_path / "run", progress=False)
    measured = rows(tmp_path / "run", "val_knn")
    assert [r["step"] for r in measured] == [4]
    result = evaluate(tmp_path / "run", "knn")
    assert result["num_train"] == 1257 and result["num_test"] == 540
    assert measured[0]["val_knn"] == result["pretrained"]
    # A smaller bank votes with fewer neighbours to choose from: another (cheaper) measurement.
    held_out = HeldOut(cfg.data, tiny_config(train={"eval_every": 1, "knn_bank": 50, "eval_samples": 30}).train,
                       cfg.eval)
    assert [sum(len(b["label"]) for b in batches) for batches in held_out.knn_sets] == [50, 30]


def test_keep_best_by_knn_keeps_the_highest_accuracy_through_resume(tmp_path, tiny_config, monkeypatch):
    measured = iter([0.2, 0.5, 0.4, 0.45, 0.6, 0.3])
    monkeypatch.setattr(HeldOut, "knn", lambda self, *args: next(measured))
    cfg = tiny_config(train={"steps": 6, "eval_every": 1, "keep_best": True, "best_by": "val_knn",
                             "checkpoint_every": 3, "keep_checkpoints": 1})
    run = tmp_path / "run"
    train(cfg, run, stop_at_step=3, progress=False)
    assert (run / "checkpoints" / "best").read_text() == "step_0000002\n"
    train(cfg, run, resume=True, progress=False)       # 0.45 at step 4 does not beat step 2's 0.5; 0.6 does
    assert (run / "checkpoints" / "best").read_text() == "step_0000005\n"
    assert checkpoint.read_state(run / "checkpoints" / "step_0000005")["val_knn"] == 0.6
    assert [r["val_knn"] for r in rows(run, "val_knn")] == [0.2, 0.5, 0.4, 0.45, 0.6, 0.3]


def test_text_runs_measure_no_knn_and_knn_settings_fail_in_one_line(tmp_path, tiny_config):
    from maskkit.config import load_config

    cfg = load_config("mlm/tiny", ["data.max_documents=30", "data.block_length=32", "train.eval_every=1",
                                   "train.batch_size=4", "train.steps=1"])
    train(cfg, tmp_path / "text", progress=False)
    assert [sorted(r) for r in rows(tmp_path / "text", "val_loss")] == [["step", "val_loss"]]
    with pytest.raises(MaskkitError, match=r"train\.best_by must be val_loss: kNN accuracy is measured on image "
                                           r"backbones only \(data\.kind=text\), got 'val_knn'"):
        load_config("mlm/tiny", ["train.eval_every=1", "train.keep_best=true", "train.best_by=val_knn"])
    with pytest.raises(MaskkitError, match=r"train\.best_by must be val_loss or val_knn, got 'knn'"):
        tiny_config(train={"best_by": "knn"})
    with pytest.raises(MaskkitError, match=r"train\.knn_bank must be at least 0, got -1"):
        tiny_config(train={"knn_bank": -1})
    with pytest.raises(MaskkitError, match=r"train\.best_by must be val_loss while train\.knn_bank=0"):
        tiny_config(train={"knn_bank": 0, "best_by": "val_knn"})
    # knn_bank=0: the held-out loss alone.
    train(tiny_config(train={"steps": 2, "eval_every": 2, "knn_bank": 0}), tmp_path / "off", progress=False)
    assert [sorted(r) for r in rows(tmp_path / "off", "val_loss")] == [["step", "val_loss"]]


def test_the_loss_curve_draws_the_held_out_loss(tmp_path):
    train_rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 7)]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                train_rows + [{"step": 3, "val_loss": 1.0}, {"step": 6, "val_loss": 0.5}]))
    (tmp_path / "knn.jsonl").write_text((tmp_path / "val.jsonl").read_text() + json.dumps({"step": 6, "val_knn": 0.7}))
    for name in ("plain", "val", "knn"):
        plot_loss_curve(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.png")
    drawn = {(tmp_path / f"{name}.png").read_bytes() for name in ("plain", "val", "knn")}
    assert len(drawn) == 3


def test_validation_settings_and_data_without_a_held_out_split_fail_in_one_line(tmp_path, tiny_config):
    with pytest.raises(MaskkitError, match=r"train\.eval_every must be at least 0"):
        tiny_config(train={"eval_every": -1})
    with pytest.raises(MaskkitError, match=r"train\.keep_best must be false while train\.eval_every=0"):
        tiny_config(train={"keep_best": True})
    with pytest.raises(MaskkitError, match=r"train\.eval_samples must be at least 1"):
        tiny_config(train={"eval_samples": 0})
    folder = tmp_path / "unlabelled"          # images at the top level only: all of them train
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / f"{i}.png")
    cfg = tiny_config(data={"name": "folder", "path": str(folder), "image_size": 16},
                      train={"eval_every": 1, "batch_size": 4})
    with pytest.raises(MaskkitError, match=r"^train\.eval_every: data\.name=folder holds nothing out of training "
                                           r"\(.*set train\.eval_every=0$"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(MaskkitError, match=r"^train\.eval_every: data\.name=photos holds nothing out of training"):
        train(tiny_config(data={"name": "photos"}, train={"eval_every": 1}), tmp_path / "run", progress=False)


def test_a_mixture_validates_on_its_members_that_hold_samples_out(tiny_config):
    cfg = tiny_config(data={"name": "photos+digits"}, train={"eval_every": 1, "eval_samples": 1000})
    held_out = HeldOut(cfg.data, cfg.train)
    digits_test = build_data(tiny_config().data, "test").dataset          # the tiny config trains on digits
    assert len(held_out.data.dataset) == len(digits_test) == 540


@pytest.mark.slow
def test_two_ranks_validate_on_rank_0_without_waiting_forever(tmp_path):
    values = tiny_config_dict(train={"steps": 4, "eval_every": 2, "keep_best": True, "threads": 1,
                                     "eval_samples": 32})
    train_on_two_ranks(values, tmp_path / "two", tmp_path / "init")
    loop.train(config_from_dict(values), tmp_path / "one", progress=False)
    two, one = rows(tmp_path / "two", "val_loss"), rows(tmp_path / "one", "val_loss")
    assert [r["step"] for r in two] == [2, 4]
    # The same measurement of weights that differ by float noise only (another summation order).
    assert all(abs(a["val_loss"] - b["val_loss"]) < 1e-4 * abs(b["val_loss"]) for a, b in zip(two, one, strict=True))
    assert (tmp_path / "two" / "checkpoints" / "best").is_file()


def test_a_method_with_a_queue_trains_the_same_with_validation(tmp_path):
    """MoCo queues its keys in forward for after_step: the held-out forwards (eval mode) must queue nothing."""
    from tests.methods.test_moco import moco_config_dict

    values = moco_config_dict(data={"name": "digits"}, train={"steps": 3, "checkpoint_every": 3})
    train(config_from_dict(values), tmp_path / "plain", progress=False)
    values["train"].update(eval_every=1, eval_samples=32)
    train(config_from_dict(values), tmp_path / "validated", progress=False)
    plain, validated = tensors(tmp_path / "plain"), tensors(tmp_path / "validated")
    assert all(torch.equal(plain[key], validated[key]) for key in plain) and "queue" in plain
    assert len(rows(tmp_path / "validated", "val_loss")) == 3
