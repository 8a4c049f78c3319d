"""`maskkit export RUN --to hf DIR`: each method with a Hugging Face twin writes a directory that
`transformers` loads and runs as maskkit does; the others, and bad destinations, fail in one line."""

import pytest
import torch

from maskkit.cli import main
from maskkit.config import load_config
from maskkit.data.tokenizer import Tokenizer
from maskkit.eval.run import method_from_checkpoint
from maskkit.train.checkpoint import find_checkpoint
from maskkit.train.loop import train
from tests.helpers import FLOAT32_PARITY, assert_close_at_scale

transformers = pytest.importorskip("transformers")
SMALL_TEXT = ["data.max_documents=30", "data.block_length=32", "model.text.dim=32", "model.text.depth=1",
              "model.text.num_heads=2", "train.steps=2", "train.batch_size=4"]


def text_run(tmp_path, recipe: str, name: str):
    run = tmp_path / name
    train(load_config(recipe, SMALL_TEXT), run, progress=False)
    return run


def test_a_bert_mlm_run_exports_as_bert_for_masked_lm_and_fill_mask_gives_maskkits_probabilities(tmp_path, capsys):
    run = text_run(tmp_path, "mlm/bert-tiny", "mlm")
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "as a Hugging Face BertForMaskedLM" in capsys.readouterr().out
    method, cfg = method_from_checkpoint(find_checkpoint(run))
    tokenizer = Tokenizer.from_file(run / "tokenizer.json", 32)
    text = "the river flows into the [MASK] sea."
    pipe = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), top_k=5, device="cpu")
    found = pipe(text)
    ids, mask = tokenizer.encode([text])
    position = int((ids[0] == tokenizer.special_ids().mask).nonzero()[0, 0])
    method.eval()
    with torch.no_grad():
        probabilities = method.head(method.encoder(ids, mask)[0, position]).softmax(-1)
    top = probabilities.topk(5)
    assert [row["token"] for row in found] == top.indices.tolist()
    assert_close_at_scale(torch.tensor([row["score"] for row in found]), top.values, FLOAT32_PARITY)


def test_pmlm_exports_without_its_pseudo_mask_row(tmp_path):
    run = text_run(tmp_path, "pmlm/tiny", "pmlm")
    method, _ = method_from_checkpoint(find_checkpoint(run))
    # The recipe is pre-norm: refused, naming the switches.
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    overrides = [*SMALL_TEXT, "model.text.post_norm=true", "model.text.type_vocab_size=2"]
    run = tmp_path / "bert-pmlm"
    train(load_config("pmlm/tiny", overrides), run, progress=False)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    method, _ = method_from_checkpoint(find_checkpoint(run))
    assert hf.config.vocab_size == method.cfg.text.vocab_size - 1 == 4096
    assert torch.equal(hf.bert.embeddings.word_embeddings.weight, method.encoder.token_embedding.weight[:4096])


def test_a_mae_run_exports_as_vitmae(tmp_path, tiny_config):
    train(tiny_config(train={"steps": 2}), tmp_path / "mae", progress=False)
    assert main(["export", str(tmp_path / "mae"), "--to", "hf", str(tmp_path / "hf")]) == 0
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", local_files_only=True)
    method, _ = method_from_checkpoint(find_checkpoint(tmp_path / "mae"))
    assert torch.equal(hf.vit.embeddings.patch_embeddings.projection.weight, method.encoder.patch_embed.weight)


def test_what_cannot_be_exported_fails_in_one_line_and_writes_nothing(tmp_path, tiny_config, capsys):
    pre_norm = text_run(tmp_path, "mlm/tiny", "pre-norm")
    assert main(["export", str(pre_norm), "--to", "hf", str(tmp_path / "a")]) == 2
    assert "is not a BERT (post_norm=False" in capsys.readouterr().err and not (tmp_path / "a").exists()
    train(tiny_config(train={"steps": 2}), tmp_path / "mae", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    cases = [(["--to", "onnx", str(tmp_path / "b")], "--to onnx: the export formats are hf"),
             (["--to", "hf", str(tmp_path / "full")], "exists and is not an empty folder"),
             (["--to", "hf"], "expected 2 arguments")]
    for arguments, message in cases:
        assert main(["export", str(tmp_path / "mae"), *arguments]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and not (tmp_path / "b").exists()
    from maskkit.config import config_from_dict
    from tests.methods.test_moco import moco_config_dict

    train(config_from_dict(moco_config_dict(data={"name": "digits"}, train={"steps": 1})), tmp_path / "moco",
          progress=False)
    assert main(["export", str(tmp_path / "moco"), "--to", "hf", str(tmp_path / "c")]) == 2
    assert "moco has no Hugging Face twin to export to" in capsys.readouterr().err


def test_a_tinybert_run_exports_as_bert_for_sequence_classification_with_its_class_names(tmp_path):
    from maskkit.config import config_from_dict
    from tests.methods.test_tinybert import teacher_file, tinybert_values

    run = tmp_path / "teacher-finetune"
    train(config_from_dict(tinybert_values(teacher_file(tmp_path), "teacher", train={"steps": 2})), run, progress=False)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    method, _ = method_from_checkpoint(find_checkpoint(run))
    classifier = method.model.eval()
    text = "The painting hangs in a museum in Paris."
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "hf"), top_k=None, device="cpu")
    found = {row["label"]: row["score"] for row in pipe([text])[0]}
    ids, mask = Tokenizer.from_file(run / "tokenizer.json", 64).encode([text])
    with torch.no_grad():
        probabilities = classifier(ids, mask)[0].softmax(-1)
    assert sorted(found) == sorted(classifier.labels)
    assert_close_at_scale(torch.tensor([found[name] for name in classifier.labels]), probabilities, FLOAT32_PARITY)
