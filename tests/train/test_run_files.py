"""What a run directory says after crashes and resumes: the config it was started with, metrics that
match the checkpoints, no stale temporaries, the real final loss, ordinary file modes; what a write
that fails (a full disk, a read-only folder) says and keeps; where a run's name may put it."""

import errno
import json
import os
import stat
import subprocess

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from maskkit.cli import main
from maskkit.errors import MaskkitError
from maskkit.train import checkpoint
from maskkit.train.loop import train
from tests.conftest import tiny_config_dict


def metric_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_keeps_metrics_true_to_the_checkpoint(tmp_path, tiny_config):
    """Killed at step 5 with the last checkpoint at 3, while writing a metrics line."""
    cfg = tiny_config(train={"steps": 6, "checkpoint_every": 3})
    run = tmp_path / "run"
    train(cfg, run, stop_at_step=5, progress=False)
    # What a kill -9 after step 5 but before its checkpoint leaves: `latest` at step 3, and a torn line.
    checkpoint.atomic_write_text(run / "checkpoints" / "latest", "step_0000003\n")
    for name in ("step_0000005",):
        for file in (run / "checkpoints" / name).iterdir():
            file.unlink()
        (run / "checkpoints" / name).rmdir()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss": 0.7')
    assert (run / "metrics.jsonl").read_text().count("\n") == 5      # steps 1-5, then the torn line
    result = train(cfg, run, resume=True, progress=False)
    assert result.final_step == 6 and (run / "loss_curve.png").is_file()
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]


def test_fresh_run_removes_stale_temporaries_and_starts_empty_metrics(tmp_path, tiny_config):
    run = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / "checkpoints" / f".tmp-step_0000003-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    (run / "checkpoints" / f".latest.tmp-{dead.pid}").write_text("step_0000003")
    alive = run / "checkpoints" / f".tmp-step_0000009-{os.getppid()}"   # a live writer's: left alone
    alive.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    train(tiny_config(train={"steps": 2}), run, progress=False)
    assert not stale.exists() and not (run / "checkpoints" / f".latest.tmp-{dead.pid}").exists()
    assert alive.exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] != 9.0 for r in rows)


def test_resuming_a_finished_run_reports_its_final_loss(tmp_path, tiny_config):
    cfg = tiny_config(train={"steps": 3})
    first = train(cfg, tmp_path / "run", progress=False)
    again = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert again.final_step == 3 and again.final_loss == first.final_loss
    assert first.final_loss == json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]


def test_every_file_of_a_run_has_the_same_ordinary_mode(tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config(train={"steps": 2}), run, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert any(str(p).endswith(".safetensors") for p in modes)
    assert {p: m for p, m in modes.items() if m != 0o666 & ~umask} == {}


def write_yaml(path, **sections):
    path.write_text(yaml.safe_dump(tiny_config_dict(**sections)))
    return str(path)


def test_resume_trains_the_config_the_run_was_started_with(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    started = tiny_config(train={"steps": 4}, optim={"base_lr": 3e-4})
    train(started, run, stop_at_step=2, progress=False)
    config_before = (run / "config.yaml").read_bytes()
    recipe = write_yaml(tmp_path / "recipe.yaml", train={"steps": 6})    # the recipe says 6 steps and lr 1e-3

    code = main(["train", recipe, "--out", str(run), "--resume", "--no-progress"])
    assert code == 0 and "for 4 steps" in capsys.readouterr().out
    assert (run / "config.yaml").read_bytes() == config_before
    state = checkpoint.read_state(checkpoint.find_checkpoint(run))
    assert state["step"] == 4 and state["config"]["optim"]["base_lr"] == 3e-4

    for override, key in (("optim.base_lr=1e-3", "optim.base_lr"), ("data.name=photos", "data.name"),
                          ("train.steps=600", "train.steps")):
        code = main(["train", recipe, "--out", str(run), "--resume", override])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"{key}=" in err and "train.init_from=" in err
    assert (run / "config.yaml").read_bytes() == config_before
    # Settings that do not change what is computed may differ.
    assert main(["train", recipe, "--out", str(run), "--resume", "train.threads=1", "--no-progress"]) == 0


def test_resume_through_the_api_refuses_another_config(tmp_path, tiny_config):
    train(tiny_config(train={"steps": 4}), tmp_path / "run", stop_at_step=2, progress=False)
    with pytest.raises(MaskkitError, match=r"model.mask_ratio=0.5 differs from the run's 0.75"):
        train(tiny_config(train={"steps": 4}, model={"mask_ratio": 0.5}), tmp_path / "run", resume=True)


def test_init_from_starts_a_new_run_from_trained_weights(tmp_path, tiny_config):
    train(tiny_config(train={"steps": 3}), tmp_path / "source", progress=False)
    source = load_file(checkpoint.find_checkpoint(tmp_path / "source") / "model.safetensors")
    # With a learning rate of 0 one step changes nothing, so the new run's weights are the source's.
    cfg = tiny_config(train={"steps": 2, "init_from": str(tmp_path / "source")}, optim={"base_lr": 0.0})
    train(cfg, tmp_path / "new", progress=False)
    new = load_file(checkpoint.find_checkpoint(tmp_path / "new") / "model.safetensors")
    assert all(torch.equal(source[k], new[k]) for k in source)
    with pytest.raises(MaskkitError, match="does not exist"):
        train(tiny_config(train={"init_from": str(tmp_path / "nope")}), tmp_path / "other", progress=False)


def test_an_undecodable_file_met_every_epoch_is_reported_and_counted_once(tmp_path, tiny_config, caplog):
    from tests.data.test_images import truncated_png, write_folder

    root = write_folder(tmp_path / "images", corrupt=False)
    for image in root.glob("*/*.png"):
        image.rename(root / f"{image.parent.name}-{image.name}")         # unlabelled: all 9 files train
    for folder in ("cats", "dogs"):
        (root / folder).rmdir()
    truncated_png(root / "truncated.png")
    cfg = tiny_config(data={"name": "folder", "path": str(root), "image_size": 16},
                      train={"steps": 6, "batch_size": 4})                 # 9 files: 6 steps = 2.7 epochs
    train(cfg, tmp_path / "run", progress=False)
    messages = [r.getMessage() for r in caplog.records if "truncated.png" in r.getMessage()]
    assert len(messages) == 1, messages
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["unreadable_files"] == 1
    assert "skipped 1 unreadable image file" in caplog.text


def test_unusable_data_fails_before_the_run_directory_is_created(tmp_path, tiny_config):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(data={"name": "folder", "path": str(tmp_path / "empty"), "image_size": 16})
    with pytest.raises(MaskkitError, match="no images"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


FULL = "No space left on device"


def disk_full_at(monkeypatch, module, function: str, when):
    """Make `module.function` fail as on a full disk when `when(path)`: safetensors' error for save_file."""
    original = getattr(module, function)

    def write(*args, **kwargs):
        path = args[1] if function == "save_file" else args[0]
        if when(path):
            if function == "save_file":
                raise SafetensorError(f"Error while serializing: I/O error: {FULL} (os error 28)")
            raise OSError(errno.ENOSPC, FULL, str(path))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, write)


@pytest.mark.parametrize("where", ["model.safetensors", "latest"])
def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_intact(tmp_path, tiny_config, monkeypatch,
                                                                           where):
    run, cfg = tmp_path / "run", tiny_config(train={"steps": 6, "checkpoint_every": 3})
    if where == "latest":       # everything written and renamed, then `latest` cannot be replaced
        disk_full_at(monkeypatch, checkpoint, "atomic_write_text",
                     lambda path: path.name == "latest" and path.parent.joinpath("step_0000006").exists())
    else:
        disk_full_at(monkeypatch, checkpoint, "save_file", lambda path: "step_0000006" in str(path))
    with pytest.raises(MaskkitError) as error:
        train(cfg, run, progress=False)
    assert str(error.value) == (f"cannot write {run / 'checkpoints' / 'step_0000006'}: {FULL}; "
                                f"the previous checkpoint {run / 'checkpoints' / 'step_0000003'} is intact")
    assert checkpoint.find_checkpoint(run) == run / "checkpoints" / "step_0000003"
    assert not [p for p in run.rglob("*") if "tmp-" in p.name]
    monkeypatch.undo()                                   # space freed: the run continues from step 3
    assert train(cfg, run, resume=True, progress=False).final_step == 6


def test_exports_that_cannot_be_written_are_written_again_by_resume(tmp_path, tiny_config, monkeypatch):
    run, cfg = tmp_path / "run", tiny_config(train={"steps": 2})
    disk_full_at(monkeypatch, checkpoint, "save_file", lambda path: "backbone" in str(path))
    with pytest.raises(MaskkitError, match=rf"^cannot write {run}: {FULL}; the last good checkpoint is .*step_0000002 "
                                           r"\(--resume writes"):
        train(cfg, run, progress=False)
    assert not (run / "backbone.safetensors").exists() and not [p for p in run.iterdir() if "tmp-" in p.name]
    monkeypatch.undo()
    assert train(cfg, run, resume=True, progress=False).backbone_path == run / "backbone.safetensors"


def test_a_run_directory_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"                       # a read-only folder would do the same, but not as root
    recipe = write_yaml(tmp_path / "recipe.yaml", train={"steps": 2})
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"maskkit: error: cannot write {out}: Not a directory\n"


@pytest.mark.parametrize("name", ["../../escape", "", "..", "a/b"])
def test_a_run_name_is_one_folder_under_runs(tmp_path, monkeypatch, capsys, name):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    recipe = write_yaml(tmp_path / "recipe.yaml", train={"steps": 2})
    assert main(["train", recipe, f"name={name}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name must be one folder name" in err and repr(name) in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "recipe.yaml"]
