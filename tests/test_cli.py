"""Bad input gets one line that names the problem and a non-zero exit, never a traceback."""

import glob
import json
import logging
import subprocess
import sys

import pytest
import yaml

from maskkit.cli import main
from maskkit.config import load_config
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
        (["train", "mae/tiny", "model.encoder.patch_size=5"], "model.encoder.patch_size must be a divisor of the image size 32, got 5"),
        (["train", "mae/tiny", "train.steps=many"], "key 'train.steps' expects int, got 'many'"),
        (["train", "mae/tiny", "optim.learning_rate=1"], "unknown key 'optim.learning_rate'; valid keys under optim: base_lr"),
        (["validate", "mae/tiny", "method=mea"], "unknown method 'mea'"),
        (["validate", "mae/tiny", "model.mask_ratio=1.0"], "model.mask_ratio must be a finite number in [0, 1), got 1.0"),
        (["validate", "mae/tiny", "model.decoder_dim=30"], "model.decoder_dim must be divisible by 4 (2D sin-cos positions), got 30"),
        (["validate", "mae/tiny", "optim.base_lr=-1e-3"], "optim.base_lr must be a finite number >= 0, got -0.001"),
        (["validate", "mae/tiny", "optim.betas=[1.5,0.9]"], "optim.betas[0] must be a finite number in [0, 1), got 1.5"),
        (["validate", "mae/tiny", "optim.base_lr=.nan"], "optim.base_lr must be a finite number >= 0, got nan"),
        (["validate", "mae/tiny", "train.checkpoint_every=0"], "train.checkpoint_every must be at least 1, got 0"),
        (["validate", "mae/tiny", "train.log_every=0"], "train.log_every must be at least 1, got 0"),
        (["validate", "mae/tiny", "model.encoder.image_size=0", "data.image_size=0"],
         "data.image_size must be an integer in [1, 4096], got 0"),
        (["validate", "mae/tiny", "model.encoder.depth=0"], "model.encoder.depth must be at least 1, got 0"),
        (["validate", "mae/tiny", "data.eval_split=1.5"], "data.eval_split must be a finite number in [0, 1), got 1.5"),
        (["validate", "mae/tiny", "data.crop_scale=[0.9,0.2]"], "data.crop_scale[1] must be a finite number in [0.9, 1]"),
        (["validate", "mae/tiny", "data.name=imagenet"], "data.name must be one of digits, photos, folder"),
        (["validate", "mae/tiny", "model.mask_ratio=0.99"], "small enough to keep at least one of the 64 patches"),
        (["eval", "/no/such/run", "--device", "cuda"], "/no/such/run does not exist"),
        (["train", "mae/tiny", "--out", "runs/x", "--resume", "--bogus"], "unrecognized arguments: --bogus"),
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


def test_resume_with_a_recipe_of_another_method_is_refused(tmp_path, tiny_yaml, capsys, caplog):
    caplog.set_level(logging.INFO, "maskkit")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", str(tiny_yaml), "--out", str(run), "--no-progress", "train.steps=1")[0] == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = run_cli(capsys, "train", "mlm/tiny", "--out", str(run), "--resume", "--no-progress")
    assert code == 2 and err == (f"maskkit: error: --resume: {run} is a mae run (tiny), but mlm/tiny trains mlm "
                                 f"(mlm-tiny); resume it with {run / 'config.yaml'}, or train mlm/tiny into another "
                                 "--out\n")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # Another recipe of the same method resumes the run's own config, and says so; the same recipe says nothing.
    code, out, _ = run_cli(capsys, "train", "mae/tiny", "--out", str(run), "--resume", "--no-progress")
    assert code == 0 and "trained mae for 1 steps" in out
    assert f"--resume: {run} continues with its saved config (tiny); the values of mae/tiny (mae-tiny) are not used" \
        in caplog.messages
    caplog.clear()
    assert run_cli(capsys, "train", str(tiny_yaml), "--out", str(run), "--resume", "--no-progress")[0] == 0
    assert not [m for m in caplog.messages if "are not used" in m]


def test_version_and_the_protocols_in_eval_help(capsys, monkeypatch):
    import maskkit

    monkeypatch.setenv("COLUMNS", "1000")           # argparse wraps to the terminal, at hyphens too

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"maskkit {maskkit.__version__}\n"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0 and "(default: knn for an image backbone, text-probe for a text model, classify for a " \
        "tinybert stage)" in help_text
    assert "An image backbone (mae, energy, moco, densecl, flip): knn, linear, finetune, dense-probe" in help_text
    assert "both towers of flip: zero-shot, retrieval" in help_text
    assert "a text model (mlm, xlnet, pmlm): text-classify, text-probe" in help_text
    assert "a classifier (tinybert stages, compressed or not): classify" in help_text


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
    ) and "must be a divisor of the image size 30" in result.stderr


def test_overrides_work_before_and_after_options(tmp_path, tiny_yaml, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", str(tiny_yaml), "--out", str(run), "--no-progress", "train.steps=3")
    assert code == 0 and "for 3 steps" in out
    code, out, _ = run_cli(capsys, "eval", str(run), "--protocol", "knn", "eval.knn_k=5", "--device", "cpu")
    assert code == 0
    assert json.loads((run / "eval.json").read_text())["knn"][-1]["overrides"] == ["eval.knn_k=5"]
    # A readable table, not raw JSON: rows for both backbones and the gain, three decimals.
    lines = out.strip().splitlines()
    assert lines[0].startswith("knn on digits (1257 train / 540 test images)")
    assert [line.split()[0] for line in lines[1:4]] == ["pretrained", "random", "gain"]
    assert lines[-1] == f"checkpoint {run / 'checkpoints' / 'step_0000003'} with eval.knn_k=5; recorded in {run / 'eval.json'}"
    assert all(len(line.split()[-1].split(".")[-1]) == 3 for line in lines[1:4])
    assert not out.lstrip().startswith("{")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_a_missing_gpu_names_the_eval_option(tmp_path, tiny_yaml, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", str(tiny_yaml), "--out", str(run), "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "eval", str(run), "--device", "cuda")
    assert code == 2 and "--device cuda but no CUDA device is visible; use --device cpu" in err
    assert "train.device" not in err


def test_without_a_terminal_progress_is_a_few_plain_lines(tmp_path, tiny_yaml):
    result = subprocess.run(
        [sys.executable, "-m", "maskkit", "train", str(tiny_yaml), "--out", str(tmp_path / "run"), "train.steps=4"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr        # no tqdm bar in a log file
    progress_lines = [line for line in result.stderr.splitlines() if "step 4/4" in line]
    assert len(progress_lines) == 1 and "loss" in progress_lines[0]


def test_every_bundled_recipe_validates(capsys):
    from maskkit.config import list_recipes

    recipes = list_recipes()
    assert {"mlm/tiny", "xlnet/tiny", "pmlm/tiny", "mlm/base", "xlnet/base", "pmlm/base"} <= set(recipes)
    for recipe in recipes:
        path = load_config(recipe).data.path
        if path and not glob.glob(path):
            # The ImageNet / LAION recipes name data that is not on this machine: validate says so, as train would.
            assert main(["validate", recipe]) == 2
            assert f"data.path: {path} does not exist" in capsys.readouterr().err
            continue
        assert main(["validate", recipe]) == 0, capsys.readouterr().err


def test_an_error_is_blamed_on_the_command_line_when_the_recipe_alone_is_valid(tmp_path, tiny_yaml, capsys):
    assert main(["validate", str(tiny_yaml), "optim.base_lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskkit: error: command line (optim.base_lr=-1): optim.base_lr must be"), err
    # A recipe that is wrong by itself is still named as the culprit, overrides or not.
    broken = tmp_path / "broken.yaml"
    values = yaml.safe_load(tiny_yaml.read_text())
    values["optim"]["base_lr"] = -1
    broken.write_text(yaml.safe_dump(values))
    assert main(["validate", str(broken), "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"maskkit: error: {broken}: optim.base_lr must be"), err


@pytest.mark.parametrize("recipe, override, message", [
    ("mlm/tiny", "data.tokenizer=/nonexistent/tok.json", "data.tokenizer: /nonexistent/tok.json does not exist; "
                                                          "for data.kind=text use wiki, minilm or"),
    ("mlm/tiny", "data.tokenizer=captions", "data.tokenizer=captions is not for data.kind=text; use wiki, minilm"),
    ("flip/tiny", "data.tokenizer=wiki", "data.tokenizer=wiki is not for data.kind=pairs; use captions"),
    ("mlm/tiny", "data.name=txt data.path=/nonexistent.txt", "data.path: /nonexistent.txt does not exist"),
    ("flip/tiny", "data.name=csv data.path=/tmp", "data.path: /tmp is a folder, not a file"),
    ("mae/tiny", "train.init_from=/nonexistent", "train.init_from: checkpoint path /nonexistent does not exist"),
])
def test_validate_refuses_what_train_refuses_in_the_same_words(recipe, override, message, tmp_path, capsys):
    """`maskkit validate` printed "ok" for each of these, and `train` then refused them."""
    overrides = override.split()
    assert main(["validate", recipe, *overrides]) == 2
    said = capsys.readouterr().err.strip()
    assert message in said and said.count("\n") == 0, said
    short = ["train.steps=1", *(["model.unmasked_steps=0"] if recipe.startswith("flip") else [])]
    assert main(["train", recipe, *overrides, *short, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == said
    assert not (tmp_path / "run").exists()
