"""Bad input gets one line that names the problem and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest
import yaml

from maskkit.cli import main
from tests.conftest import tiny_config_dict


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(train={"steps": 2, "checkpoint_every": 1})))
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "no/such/recipe.yaml"], "'no/such/recipe.yaml' is neither a file nor a bundled recipe"),
        (["train", "mae/tiny", "data.name=folder", "data.path=/no/such/dir"], "data.path: /no/such/dir does not exist"),
        (["train", "mae/tiny", "model.encoder.patch_size=5"], "not divisible by model.encoder.patch_size=5"),
        (["train", "mae/tiny", "train.steps=many"], "key 'train.steps' expects int, got 'many'"),
        (["train", "mae/tiny", "optim.learning_rate=1"], "unknown key 'optim.learning_rate'; valid keys under optim: base_lr"),
        (["validate", "mae/tiny", "method=mea"], "unknown method 'mea'"),
        (["validate", "mae/tiny", "model.mask_ratio=1.0"], "model.mask_ratio must be in [0, 1), got 1.0"),
        (["validate", "mae/tiny", "model.decoder_dim=30"], "model.decoder_dim=30 must be divisible by 4"),
        (["eval", "/no/such/run"], "/no/such/run does not exist"),
    ],
)
def test_bad_input_is_one_line(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("maskkit: error: ")
    assert message in err


def test_checkpoint_from_another_method_is_refused(tmp_path, tiny_yaml, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", str(tiny_yaml), "--out", str(run), "--no-progress")[0] == 0
    state_path = next((run / "checkpoints").glob("step_0000002")) / "state.json"
    state = json.loads(state_path.read_text())
    state["method"] = "densecl"
    state_path.write_text(json.dumps(state))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = run_cli(capsys, "train", str(tiny_yaml), "--out", str(run), "--resume", "--no-progress")
    assert code == 2 and "is a 'densecl' checkpoint, but the config trains 'mae'" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before   # nothing lost


def test_recipe_commands(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "ls")
    assert code == 0 and "mae/tiny" in out.split()
    target = tmp_path / "mine.yaml"
    assert run_cli(capsys, "cp", "mae/tiny", str(target))[0] == 0
    code, out, _ = run_cli(capsys, "validate", str(target), "train.steps=7")
    assert code == 0 and "7 steps" in out
    code, _, err = run_cli(capsys, "cp", "mae/tiny", str(target))
    assert code == 2 and "already exists" in err


def test_module_entry_point_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskkit", "train", "mae/tiny", "model.encoder.image_size=30", "data.image_size=30"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "maskkit: error: " + result.stderr.strip().split("maskkit: error: ", 1)[1]
    ) and "not divisible" in result.stderr
