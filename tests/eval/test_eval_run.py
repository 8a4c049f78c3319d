"""Loading a backbone from a run, and `evaluate` end to end, on a 2-step training run of a tiny MAE."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskkit.cli import main
from maskkit.config import config_from_dict, config_to_dict
from maskkit.data.augment import ImageAugment
from maskkit.data.images import labelled_dataset
from maskkit.errors import MaskkitError
from maskkit.eval import evaluate, evaluate_backbones, load_backbone
from maskkit.eval import run as eval_run
from maskkit.methods import build_method
from maskkit.nn.transformer import ViT, ViTConfig
from maskkit.runlock import RunLock
from maskkit.train.checkpoint import find_checkpoint
from maskkit.train.loop import train

TINY = {
    "method": "mae",
    "model": {"encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "num_heads": 2},
              "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
    "data": {"name": "digits", "image_size": 16},
    "train": {"steps": 2, "batch_size": 16},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(config_from_dict(TINY), run, progress=False)
    return run


def some_images(cfg) -> torch.Tensor:
    test_set = labelled_dataset(cfg.data, "test")
    return ImageAugment(cfg.data).normalize(torch.stack([test_set[i]["images"] for i in range(8)]))


@torch.no_grad()
def features_of(backbone: ViT, images: torch.Tensor) -> torch.Tensor:
    return backbone.eval().features(images, "cls")


def test_load_backbone_round_trip(run_dir, tmp_path):
    cfg = config_from_dict(TINY)
    images = some_images(cfg)
    # The encoder as training exported it, loaded without maskkit.eval.
    trained = ViT(cfg.model.encoder)
    trained.load_state_dict(load_file(run_dir / "backbone.safetensors"))
    expected = features_of(trained, images)

    bare = tmp_path / "bare"                                  # a lone backbone file: config from its metadata
    bare.mkdir()
    shutil.copy(run_dir / "backbone.safetensors", bare)
    exported = tmp_path / "exported"                          # a run without checkpoints: backbone + config.yaml
    exported.mkdir()
    shutil.copy(run_dir / "backbone.safetensors", exported)
    shutil.copy(run_dir / "config.yaml", exported)
    for path in (run_dir, find_checkpoint(run_dir), run_dir / "backbone.safetensors",
                 bare / "backbone.safetensors", exported):
        backbone, loaded_cfg = load_backbone(path)
        assert torch.equal(features_of(backbone, images), expected), path
        assert loaded_cfg.data.image_size == 16 and loaded_cfg.model.encoder == cfg.model.encoder
    assert config_to_dict(load_backbone(run_dir)[1]) == config_to_dict(cfg)

    # The weights did move in training, so the check above could tell a fresh init from a loaded one.
    torch.manual_seed(cfg.train.seed)
    assert not torch.equal(features_of(build_method(cfg).backbone, images), expected)


def test_evaluate_knn_writes_eval_json(run_dir):
    result = evaluate(run_dir, "knn", overrides=["eval.knn_k=10"], progress=False)
    # Even a barely trained tiny ViT's features separate digits well above chance (0.1): a kNN that mixed up
    # labels and features, or test and train, would not.
    assert result["pretrained"] > 0.3 and result["random_init"] > 0.3
    assert (result["protocol"], result["dataset"]) == ("knn", "digits")
    assert (result["num_train"], result["num_test"]) == (1257, 540)
    assert result["checkpoint"] == str(find_checkpoint(run_dir))
    assert result["overrides"] == ["eval.knn_k=10"]
    assert result["settings"]["eval.knn_k"] == 10 and result["settings"]["data.eval_split"] == 0.3
    assert json.loads((run_dir / "eval.json").read_text())["knn"][-1] == result


def test_eval_json_keeps_the_results_of_other_settings(own_run):
    first = evaluate(own_run, "knn", overrides=["eval.knn_k=10"], progress=False)
    other = evaluate(own_run, "knn", overrides=["eval.knn_k=3"], progress=False)
    again = evaluate(own_run, "knn", overrides=["eval.knn_k=10"], progress=False)
    recorded = json.loads((own_run / "eval.json").read_text())["knn"]
    # The rerun of k=10 replaces the first one; the k=3 result stays.
    assert recorded == [other, again] and first["settings"] == again["settings"]
    assert [r["settings"]["eval.knn_k"] for r in recorded] == [3, 10]


def test_an_eval_json_of_one_result_per_protocol_stays_readable(own_run):
    old = {"knn": {"protocol": "knn", "dataset": "digits", "pretrained": 0.5, "random_init": 0.4,
                   "num_train": 1257, "num_test": 540, "checkpoint": "x"},
           "linear": {"protocol": "linear", "dataset": "digits", "pretrained": 0.6, "random_init": 0.5,
                      "num_train": 1257, "num_test": 540, "checkpoint": "x"}}
    (own_run / "eval.json").write_text(json.dumps(old))
    assert eval_run.read_results(own_run / "eval.json") == {"knn": [old["knn"]], "linear": [old["linear"]]}
    result = evaluate(own_run, "knn", progress=False)
    assert json.loads((own_run / "eval.json").read_text()) == {"knn": [old["knn"], result], "linear": [old["linear"]]}


def test_overrides_a_protocol_does_not_read_are_refused(run_dir, monkeypatch):
    monkeypatch.setattr(eval_run, "evaluate_backbones", lambda *a, **k: pytest.fail("evaluated with a useless override"))
    # Pretraining's crop does not touch the un-augmented images kNN reads.
    with pytest.raises(MaskkitError, match=r"^override data.crop_scale has no effect on knn, which reads only "
                                           r"data.name, .*eval.knn_k, eval.knn_temperature, train.threads$"):
        evaluate(run_dir, "knn", overrides=["data.crop_scale=[0.5,1.0]"])
    with pytest.raises(MaskkitError, match="eval.probe_epochs has no effect on knn"):
        evaluate(run_dir, "knn", overrides=["eval.probe_epochs=3"])
    # The text protocols read the run's own vocabulary, whatever data.tokenizer says.
    with pytest.raises(MaskkitError, match=r"data.tokenizer has no effect on text-classify, which reads only .*"
                                           r"eval.text_epochs"):
        eval_run.check_overrides("text-classify", ["data.max_documents=300", "data.tokenizer=minilm"])
    eval_run.check_overrides("text-classify", ["data.max_documents=300", "eval.text_epochs=1", "train.threads=1"])
    eval_run.check_overrides("linear", ["eval.probe_epochs=3", "data.eval_split=0.5"])


def test_every_key_a_protocol_reads_exists():
    from maskkit.config import EvalConfig
    from maskkit.data.images import DataConfig
    from maskkit.data.pairs import PairDataConfig
    from maskkit.data.text import TextDataConfig

    data_kind = {**dict.fromkeys(eval_run.TWO_TOWER_PROTOCOLS, PairDataConfig),
                 **dict.fromkeys((*eval_run.TEXT_PROTOCOLS, "classify"), TextDataConfig)}
    assert set(eval_run.READS) == set(eval_run.PROTOCOLS)
    for protocol, keys in eval_run.READS.items():
        fields = {"data": data_kind.get(protocol, DataConfig), "eval": EvalConfig}
        for key in keys:
            section, name = key.split(".")
            assert name in {f.name for f in dataclasses.fields(fields[section])}, (protocol, key)


def test_finetune_protocol_leaves_the_backbone_alone(run_dir):
    backbone, cfg = load_backbone(run_dir)
    cfg.eval.finetune_epochs, cfg.eval.finetune_batch_size = 1, 256
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = evaluate_backbones(backbone, cfg, ["finetune"], progress=False)["finetune"]
    assert set(result) >= {"pretrained", "random_init", "num_train", "num_test"}
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_errors_name_what_is_wrong(run_dir, tmp_path):
    with pytest.raises(MaskkitError, match="bogus.*linear, knn, finetune"):
        evaluate(run_dir, "bogus")
    with pytest.raises(MaskkitError, match="no_such_run"):
        evaluate(tmp_path / "no_such_run", "knn")
    with pytest.raises(MaskkitError, match="model.encoder.dim"):
        evaluate(run_dir, "knn", overrides=["model.encoder.dim=64"])

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(MaskkitError, match="garbage.safetensors"):
        load_backbone(garbage)

    # Weights of a 16-wide ViT under the metadata of a 32-wide one.
    small = ViTConfig(image_size=16, dim=16, depth=1, num_heads=2)
    wrong = tmp_path / "wrong.safetensors"
    metadata = {"config": json.dumps(dataclasses.asdict(dataclasses.replace(small, dim=32)))}
    save_file(ViT(small).state_dict(), wrong, metadata=metadata)
    with pytest.raises(MaskkitError, match="wrong.safetensors.*shape"):
        load_backbone(wrong)


def test_evaluation_counts_and_names_undecodable_test_images(tmp_path, caplog):
    from tests.data.test_images import truncated_png, write_folder

    root = write_folder(tmp_path / "images", corrupt=False)
    truncated_png(root / "cats" / "-truncated.png")          # sorts first: a held-out position
    cfg = config_from_dict({**TINY, "data": {"name": "folder", "path": str(root), "image_size": 16,
                                              "eval_split": 0.5}})
    result = evaluate_backbones(ViT(cfg.model.encoder), cfg, ["knn"], progress=False)["knn"]
    # Held out: 3 of the 5 cats (the broken one among them) and 2 of the 4 dogs: 4 readable test images.
    assert (result["num_train"], result["num_test"]) == (4, 4)
    assert "-truncated.png" in caplog.text


def test_a_run_without_a_held_out_split_is_evaluated_only_on_one_named(tmp_path):
    from tests.data.test_images import write_folder

    root = write_folder(tmp_path / "images", corrupt=False)
    run = tmp_path / "run"
    train(config_from_dict({**TINY, "data": {"name": "folder", "path": str(root), "image_size": 16, "eval_split": 0},
                            "train": {"steps": 1, "batch_size": 8}}), run, progress=False)
    for protocol in ("knn", "linear", "finetune"):
        with pytest.raises(MaskkitError, match=rf"^{protocol}: the run has no held-out split \(data.eval_split=0: it "
                                               r"pretrained on every image of folder\); evaluate on another"):
            evaluate(run, protocol)
    result = evaluate(run, "knn", overrides=["data.eval_split=0.5", "eval.knn_k=2"], progress=False)
    assert (result["num_train"], result["num_test"]) == (4, 4)


@pytest.fixture
def own_run(run_dir, tmp_path):
    """A copy of the trained run that a test may lock or break."""
    return shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))


def test_eval_of_a_run_another_writer_holds_is_refused_before_its_work(own_run, monkeypatch):
    monkeypatch.setattr(eval_run, "RECORD_WAIT_S", 0.0)
    monkeypatch.setattr(eval_run, "evaluate_backbones", lambda *a, **k: pytest.fail("evaluated a run it cannot record"))
    with RunLock(own_run, ""):                           # a `maskkit train --resume` of it, say
        with pytest.raises(MaskkitError, match=rf"{own_run} is in use by .*; eval records its result in "
                                               rf"{own_run / 'eval.json'}"):
            evaluate(own_run, "knn")


def test_eval_prints_its_result_when_eval_json_cannot_be_written(own_run, capsys):
    (own_run / "eval.json").mkdir()                      # as root, chmod cannot make a file unwritable
    code = main(["eval", str(own_run), "--protocol", "knn"])
    out, err = capsys.readouterr()
    assert code == 2 and "knn on digits" in out and "pretrained" in out and "; not recorded" in out
    assert err == (f"maskkit: error: the result above is not recorded: cannot write {own_run / 'eval.json'}: "
                   "Is a directory\n")
    assert not [p for p in own_run.iterdir() if "tmp-" in p.name]


def test_eval_returns_its_result_when_a_writer_took_the_run_while_it_worked(own_run, monkeypatch):
    monkeypatch.setattr(eval_run, "RECORD_WAIT_S", 0.0)
    trainer = RunLock(own_run, "")
    evaluate_backbones = eval_run.evaluate_backbones

    def a_resume_starts_meanwhile(*args, **kwargs):
        trainer.acquire()
        return evaluate_backbones(*args, **kwargs)

    monkeypatch.setattr(eval_run, "evaluate_backbones", a_resume_starts_meanwhile)
    try:
        result = evaluate(own_run, "knn", progress=False)
    finally:
        trainer.release()
    assert result["pretrained"] > 0.3 and result["eval_json"] is None and "is in use by" in result["not_recorded"]
    assert not (own_run / "eval.json").exists()


@pytest.mark.parametrize("method, protocol", [("mae", "knn"), ("flip", "knn"), ("mlm", "text-probe"),
                                              ("pmlm", "text-probe"), ("tinybert", "classify")])
def test_the_default_protocol_fits_the_run(tmp_path, method, protocol):
    from maskkit.train.checkpoint import FORMAT_VERSION

    checkpoint = tmp_path / "step_0000001"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text(json.dumps({"format": FORMAT_VERSION, "config": {"method": method}}))
    assert eval_run.default_protocol(checkpoint) == protocol
    assert eval_run.default_protocol(tmp_path / "backbone.safetensors") == "knn"     # a file: an image backbone
