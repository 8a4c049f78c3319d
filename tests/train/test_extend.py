"""`maskkit train ... --resume --extend-steps N`: a run continued on purpose for N more steps, its schedules those of
the new total, recorded so that a plain --resume after a kill continues to it, bitwise like an uninterrupted one."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from maskkit.cli import main
from maskkit.errors import MaskkitError
from maskkit.methods.mae import MAE
from maskkit.train import checkpoint
from maskkit.train.loop import resume_config, train
from maskkit.train.optim import lr_at, peak_learning_rate
from tests.conftest import tiny_config_dict


def metric_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(run):
    found = checkpoint.find_checkpoint(run)
    return {**load_file(found / "model.safetensors"), **load_file(found / "optimizer.safetensors")}


def test_a_finished_run_extended_by_4_ends_at_10_on_the_schedule_of_10_steps(tmp_path, tiny_config):
    cfg = tiny_config(train={"steps": 6})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    result = train(resume_config(run), run, resume=True, extend_steps=4, progress=False)
    assert result.final_step == 10
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    # The cosine schedule is recomputed for 10 steps: the lr of step 7 (index 6) jumps back up from min_lr.
    peak = peak_learning_rate(cfg.optim, cfg.train.batch_size)
    assert rows[5]["lr"] == lr_at(5, 6, peak, cfg.optim)
    assert rows[6]["lr"] == lr_at(6, 10, peak, cfg.optim) > rows[5]["lr"]
    assert checkpoint.read_state(checkpoint.find_checkpoint(run))["config"]["train"]["steps"] == 10
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 10
    assert resume_config(run).train.steps == 10


def test_an_extension_killed_before_its_first_checkpoint_or_after_one_resumes_bitwise(tmp_path, tiny_config,
                                                                                        monkeypatch):
    cfg = tiny_config(train={"steps": 6, "checkpoint_every": 3})
    for name in ("straight", "killed_early", "stopped"):
        train(cfg, tmp_path / name, progress=False)
    train(resume_config(tmp_path / "straight"), tmp_path / "straight", resume=True, extend_steps=4, progress=False)

    train(cfg, tmp_path / "stopped", resume=True, extend_steps=4, stop_at_step=8, progress=False)
    train(resume_config(tmp_path / "stopped"), tmp_path / "stopped", resume=True, progress=False)

    # A kill during the extension's first step: no checkpoint of it exists, yet the run knows its new total.
    original = MAE.forward

    def killed(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(MAE, "forward", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed_early", resume=True, extend_steps=4, progress=False)
    monkeypatch.setattr(MAE, "forward", original)
    assert checkpoint.find_checkpoint(tmp_path / "killed_early").name == "step_0000006"
    resumed = train(resume_config(tmp_path / "killed_early"), tmp_path / "killed_early", resume=True, progress=False)
    assert resumed.final_step == 10

    reference = tensors(tmp_path / "straight")
    for name in ("killed_early", "stopped"):
        found = tensors(tmp_path / name)
        assert found.keys() == reference.keys()
        assert all(torch.equal(found[key], reference[key]) for key in reference), name
        assert ([{k: v for k, v in r.items() if k != "samples_per_s"} for r in metric_rows(tmp_path / name)]
                == [{k: v for k, v in r.items() if k != "samples_per_s"} for r in metric_rows(tmp_path / "straight")])


def test_only_an_extension_may_change_train_steps_on_resume(tmp_path, tiny_config):
    cfg = tiny_config(train={"steps": 4})
    train(cfg, tmp_path / "run", stop_at_step=2, progress=False)
    with pytest.raises(MaskkitError, match=r"train\.steps=6 differs from the run's 4; to train it longer, "
                                           r"--resume --extend-steps N"):
        train(tiny_config(train={"steps": 6}), tmp_path / "run", resume=True, progress=False)
    # The extension is counted from the run's own total: here 4 + 3, and the config given must be the run's.
    with pytest.raises(MaskkitError, match=r"train\.steps=9 differs from the run's 7"):
        train(tiny_config(train={"steps": 6}), tmp_path / "run", resume=True, extend_steps=3, progress=False)
    with pytest.raises(MaskkitError, match=r"--extend-steps 3 continues a run: pass --resume too"):
        train(cfg, tmp_path / "new", extend_steps=3, progress=False)
    assert train(cfg, tmp_path / "run", resume=True, extend_steps=3, progress=False).final_step == 7


def test_extend_steps_from_the_command_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_dict(train={"steps": 3})))
    run = str(tmp_path / "run")
    assert main(["train", str(recipe), "--out", run, "--no-progress"]) == 0
    assert main(["train", str(recipe), "--out", run, "--resume", "--extend-steps", "2", "--no-progress"]) == 0
    assert "trained mae for 5 steps" in capsys.readouterr().out
    for argv, message in ((["--extend-steps", "2"], "--extend-steps 2 continues a run: pass --resume too"),
                          (["--resume", "--extend-steps", "0"], "--extend-steps must be an integer >= 1, got 0")):
        assert main(["train", str(recipe), "--out", run, *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"maskkit: error: {message}\n"
    assert checkpoint.find_checkpoint(run).name == "step_0000005"
