"""`maskkit distill`: every TinyBERT stage from a Hugging Face teacher directory, the student and the task teacher
written as BertForSequenceClassification directories a `transformers` pipeline runs with their label names, an
interrupted distillation resumed to the weights of an uninterrupted one, and bad teachers refused in one line."""

import json

import pytest
import torch

from maskkit import distill as distill_module
from maskkit.cli import main
from maskkit.data.text import WIKI_TOPICS
from maskkit.data.tokenizer import Tokenizer
from maskkit.distill import distill
from maskkit.errors import MaskkitError
from maskkit.interop.hf_bert import load_hf_bert, save_hf_bert
from maskkit.methods.tinybert import load_teacher
from tests.helpers import final_weights

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random 4-layer BertModel with the bundled wiki WordPiece, saved as Hugging Face saves one."""
    from maskkit.data.tokenizer import build_text_tokenizer

    tokenizer = build_text_tokenizer("wiki", 32)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("teacher") / "bert"
    save_hf_bert(load_hf_bert(transformers.BertModel(config)), directory, tokenizer=tokenizer)
    return directory


def overrides(teacher_dir) -> list[str]:
    student = ("{vocab_size: 4096, context_length: 64, dim: 16, depth: 2, num_heads: 4, norm_eps: 1.0e-12, "
               "embedding_norm: true, post_norm: true, type_vocab_size: 2, padding_idx: 0, pooler: true}")
    return [f"model.teacher={teacher_dir}", f"data.tokenizer={teacher_dir / 'tokenizer.json'}", f"model.student={student}",
            "model.teacher_steps=4", "model.general_steps=3", "model.intermediate_steps=4", "model.prediction_steps=4",
            "model.augment_copies=1", "data.max_documents=150", "data.block_length=32", "train.batch_size=8",
            "train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=1"]


def test_distill_writes_a_student_and_a_task_teacher_that_run_in_a_pipeline(tmp_path, teacher_dir, capsys):
    run = tmp_path / "run"
    assert main(["distill", "tinybert/tiny", *overrides(teacher_dir), "--out", str(run), "--no-progress"]) == 0
    assert "% of the teacher" in capsys.readouterr().out
    summary = json.loads((run / "distill.json").read_text())
    assert summary["labels"] == list(WIKI_TOPICS) and summary["num_test"] > 0
    assert 0 <= summary["student_test_accuracy"] <= 1 and summary["augmented_documents"] > 100
    for stage in ("teacher-finetune", "general", "intermediate", "prediction"):
        assert (run / stage / "checkpoints" / "latest").is_file(), stage
    pipe = transformers.pipeline("text-classification", model=str(run / "hf"), top_k=None, device="cpu")
    text = "The painter moved to Paris, where she studied colour and light."
    found = {row["label"]: row["score"] for row in pipe([text])[0]}
    assert set(found) == set(WIKI_TOPICS)
    student = load_hf_bert(run / "hf")
    ids, mask = Tokenizer.from_file(run / "hf" / "tokenizer.json", 32).encode([text])
    with torch.no_grad():
        probabilities = student(ids, mask).softmax(-1)[0]
    assert max(abs(found[name] - float(p)) for name, p in zip(student.labels, probabilities, strict=True)) < 1e-5
    teacher = load_hf_bert(run / "teacher_hf")
    assert teacher.labels == list(WIKI_TOPICS) and teacher.backbone.cfg.depth == 4
    # The task teacher is the fine-tuned one, not the given encoder with a fresh head.
    task, _ = load_teacher(run / "teacher" / "task.safetensors")
    assert all(torch.equal(task.state_dict()[k], teacher.state_dict()[k]) for k in task.state_dict())
    # `maskkit eval --protocol classify` scores a stage's classifier on the test.jsonl distill wrote: the numbers
    # distill.json reports; the general stage has no trained classifier and the default (an image protocol)
    # points to classify, one line each.
    capsys.readouterr()
    for stage, key in (("prediction", "student_test_accuracy"), ("teacher-finetune", "teacher_test_accuracy")):
        assert main(["eval", str(run / stage), "--protocol", "classify"]) == 0
        recorded = json.loads((run / stage / "eval.json").read_text())["classify"][-1]
        assert recorded["accuracy"] == pytest.approx(summary[key], abs=1e-9) and recorded["num_test"] == summary["num_test"]
        assert f"classifier       {summary[key]:.3f}" in capsys.readouterr().out
    subset = tmp_path / "two.jsonl"
    subset.write_text("".join((run / "test.jsonl").read_text().splitlines(keepends=True)[:2]), encoding="utf-8")
    assert main(["eval", str(run / "prediction"), f"eval.test_documents={subset}"]) == 0     # classify: the default
    assert "classify on" in (out := capsys.readouterr().out) and "(2 test documents)" in out
    for args, message in (([str(run / "general"), "--protocol", "classify"], "without a trained classifier"),
                          ([str(run / "prediction"), "--protocol", "knn"], "evaluate it with --protocol classify"),
                          ([str(run / "prediction"), "--protocol", "classify", f"eval.test_documents={tmp_path}/no.jsonl"],
                           "no.jsonl: no test documents for this classifier")):
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # Nothing left to do: a resumed finished distillation keeps every stage and gives the same summary.
    again = distill("tinybert/tiny", overrides(teacher_dir), run, resume=True, progress=False)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_weights(tmp_path, teacher_dir, monkeypatch):
    few = [*overrides(teacher_dir), "model.task_documents=50"]          # a low-resource task: 50 labelled documents
    summary = distill("tinybert/tiny", few, tmp_path / "straight", progress=False)
    task = [json.loads(line) for line in (tmp_path / "straight" / "task.jsonl").read_text().splitlines()]
    assert summary["task_documents"] == len(task) == 50 and len({row["label"] for row in task}) >= 5
    real_train = distill_module.train
    interrupted = []

    def train_then_die(cfg, run_dir, resume=False, progress=True):
        if cfg.model.stage == "intermediate" and not interrupted:
            interrupted.append(run_dir)
            real_train(cfg, run_dir, stop_at_step=2, progress=progress)
            raise KeyboardInterrupt             # killed between two checkpoints of the stage
        return real_train(cfg, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(distill_module, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill("tinybert/tiny", few, tmp_path / "resumed", progress=False)
    with pytest.raises(MaskkitError, match=r"already holds a distillation; continue it with --resume"):
        distill("tinybert/tiny", few, tmp_path / "resumed", progress=False)
    distill("tinybert/tiny", few, tmp_path / "resumed", resume=True, progress=False)
    assert interrupted
    straight, resumed = final_weights(tmp_path / "straight" / "prediction"), final_weights(tmp_path / "resumed" / "prediction")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_what_cannot_be_distilled_fails_in_one_line(tmp_path, teacher_dir, capsys):
    cases = [
        (["mlm/tiny"], "maskkit distill runs a tinybert recipe"),
        (["tinybert/tiny", f"model.teacher={tmp_path}"], "is not minilm, a Hugging Face BERT directory"),
        (["tinybert/tiny", f"model.teacher={teacher_dir}"], "data.tokenizer=minilm is not the teacher's tokenizer"),
        (["tinybert/tiny", "model.stage=final"], "model.stage must be one of teacher, general, intermediate, prediction"),
    ]
    for index, (arguments, message) in enumerate(cases):
        assert main(["distill", *arguments, "--out", str(tmp_path / f"run{index}")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["distill", "tinybert/tiny", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no distillation to resume" in capsys.readouterr().err
