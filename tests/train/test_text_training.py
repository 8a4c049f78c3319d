"""Text recipes through the one loop: the loss falls, resume is bitwise across epoch boundaries, two ranks
train what one does, and the text protocols evaluate the result."""

import json

import pytest

from maskkit.cli import main
from maskkit.config import config_from_dict, load_config
from maskkit.errors import MaskkitError
from maskkit.train.loop import train
from tests.helpers import (
    assert_bitwise_equal,
    assert_same_weights,
    final_weights,
    resumed_and_straight,
    train_on_two_ranks,
)

# The bundled recipes, shrunk: 12 documents make ~60 blocks of 32 tokens, so batch 16 crosses an epoch
# boundary every ~4 steps.
SMALL = {
    "mlm": ["model.text.dim=32", "model.text.depth=2", "model.text.num_heads=2", "model.text.context_length=32"],
    "pmlm": ["model.text.dim=32", "model.text.depth=2", "model.text.num_heads=2", "model.text.context_length=32"],
    "xlnet": ["model.dim=32", "model.depth=2", "model.num_heads=2", "model.context_length=32", "model.mem_len=16"],
}
DATA = ["data.block_length=32", "data.max_documents=12", "train.batch_size=16", "train.log_every=1",
        "optim.warmup_steps=2"]


def small_config(method: str, *overrides: str):
    return load_config(f"{method}/tiny", [*SMALL[method], *DATA, *overrides])


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["mlm", "xlnet", "pmlm"])
def test_resume_is_bitwise_across_epoch_boundaries(method, tmp_path):
    cfg = small_config(method, "train.steps=10", "train.checkpoint_every=5")
    num_blocks = 60
    assert 10 * 16 > 2 * num_blocks // 1.2            # the run spans more than two epochs of ~60 blocks
    straight, resumed = resumed_and_straight(cfg, tmp_path, stop_at=5)
    assert_bitwise_equal(straight, resumed)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] > 2.0, rows[-1]["epoch"]
    assert [r["step"] for r in rows] == list(range(1, 11))


@pytest.mark.parametrize("method", ["mlm", "xlnet", "pmlm"])
def test_short_pretraining_lowers_the_loss(method, tmp_path):
    cfg = small_config(method, "train.steps=40", "train.checkpoint_every=40", "optim.base_lr=0.1")
    train(cfg, tmp_path / "run", progress=False)
    curve = losses(tmp_path / "run")
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    # From ~ln(4096) = 8.3 (uniform over the vocabulary) to well below: at least the token frequencies are learnt.
    assert first > 7.0 and last < first - 1.5, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mlm", "xlnet", "pmlm"])
def test_two_ranks_train_what_one_rank_trains(method, tmp_path):
    # Samples have different numbers of predicted tokens: the per-sample mean loss makes 2 x 8 equal 1 x 16.
    cfg = small_config(method, "train.steps=3", "train.checkpoint_every=3", "train.threads=1")
    from maskkit.config import config_to_dict

    train_on_two_ranks(config_to_dict(cfg), tmp_path / "two", tmp_path / "init")
    train(cfg, tmp_path / "one", progress=False)
    # The key part of the qkv bias has a gradient of exactly 0 in exact arithmetic, so Adam turns float
    # noise of ~1e-12 into steps of the learning rate (assert_same_weights; measured 1.4e-5 here).
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def classify_train_count(recorded: dict) -> int:
    return recorded["text-classify"][0]["num_train"]


def test_text_protocols_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [*SMALL["mlm"], "data.block_length=32", "data.max_documents=150", "train.batch_size=16",
                 "train.steps=3", "optim.warmup_steps=1"]
    assert main(["train", "mlm/tiny", *overrides, "--out", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run), "--protocol", "text-classify", "eval.text_epochs=1", "eval.text_max_length=24"]) == 0
    out = capsys.readouterr().out
    assert "text-classify on wiki" in out and "majority class" in out
    assert main(["eval", str(run), "--protocol", "seq2seq", "eval.seq2seq_epochs=1", "eval.seq2seq_source_length=12",
                 "eval.seq2seq_target_length=4", "eval.seq2seq_test_documents=3", "eval.beam_size=2"]) == 0
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "exact match" in out
    assert main(["eval", str(run), "--protocol", "text-probe", "eval.probe_epochs=5", "eval.text_max_length=24"]) == 0
    assert "text-probe on wiki" in capsys.readouterr().out
    recorded = json.loads((run / "eval.json").read_text())
    assert set(recorded) == {"text-classify", "text-probe", "seq2seq"}
    (probe,) = recorded["text-probe"]
    assert probe["num_train"] == classify_train_count(recorded) and 0 <= probe["random_init"] <= 1
    (classify,) = recorded["text-classify"]
    assert classify["num_test"] > 5 and 0 <= classify["pretrained"] <= 1 and len(classify["classes"]) == 11
    assert recorded["seq2seq"][0]["num_test"] == 3 and 0 <= recorded["seq2seq"][0]["pretrained"] <= 1
    # An image protocol on a text run, and a text protocol on a bad split, fail in one line.
    assert main(["eval", str(run), "--protocol", "knn"]) == 2
    assert main(["eval", str(run), "--protocol", "text-classify", "eval.text_max_length=2"]) == 2
    assert "eval.text_max_length" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "key"), [("mlm", "model.text.context_length"), ("pmlm", "model.text.context_length"),
                                             ("xlnet", "model.context_length")])
def test_blocks_longer_than_the_model_and_image_data_are_refused_in_one_line(method, key, capsys):
    assert main(["validate", f"{method}/tiny", "data.block_length=256"]) == 2
    err = capsys.readouterr().err
    assert key in err and "data.block_length=256" in err and err.count("\n") == 1
    with pytest.raises(MaskkitError, match="data.kind"):       # a text method on an image data set
        config_from_dict({"method": method, "data": {"kind": "image", "name": "digits"}})


def test_a_run_keeps_its_vocabulary_when_the_tokenizer_file_changes(tmp_path):
    from maskkit.data.text import TextDataConfig, train_tokenizer

    vocab = tmp_path / "vocab.json"
    train_tokenizer(TextDataConfig(max_documents=100), 300, vocab)
    cfg = small_config("mlm", f"data.tokenizer={vocab}", "model.text.vocab_size=300", "train.steps=6",
                       "train.checkpoint_every=3")
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", stop_at_step=3, progress=False)
    assert (tmp_path / "resumed" / "tokenizer.json").is_file()
    train_tokenizer(TextDataConfig(max_documents=100, split_seed=5), 200, vocab)    # other ids at the same path
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
