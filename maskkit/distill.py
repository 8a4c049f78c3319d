"""`maskkit distill CONFIG`: TinyBERT's whole procedure (Jiao et al. 2020, Sec 3.2-3.3) as runs of maskkit's loop.

RUN/
  teacher/pretrained.safetensors   the teacher as given (minilm, a Hugging Face BERT directory, a maskkit run)
  teacher-finetune/                stage teacher: the teacher fine-tuned on the task (skipped for a classifier)
  teacher/task.safetensors         the task teacher, and teacher_hf/ (BertForSequenceClassification + tokenizer)
  general/                         stage general: general distillation on the unlabelled corpus
  task.jsonl                       the task's labelled training documents (all, or model.task_documents of them)
  augment/part-*.jsonl             the task's training documents and their augmented copies (Sec 3.3)
  intermediate/                    stage intermediate: task distillation of the layers, on the augmented data
  prediction/                      stage prediction: task distillation of the prediction layer
  hf/                              the student: BertForSequenceClassification + tokenizer + label names
  distill.json                     test accuracy of the task teacher and the student, and what each stage ran

Every stage is a run of its own (checkpoints, metrics.jsonl, --resume); `--resume` continues the first
unfinished one, and a finished stage is never run again. The augmentation is written in parts, each atomically,
so a resumed augmentation starts at the first missing part.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from maskkit.config import Config, load_config
from maskkit.data.text import build_document_dataset
from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.eval.text import task_accuracy
from maskkit.files import atomic_write_text, writing
from maskkit.methods.tinybert import augment_documents, load_teacher, save_teacher
from maskkit.nn.transformer import SequenceClassifier, TextTransformer
from maskkit.train.checkpoint import find_checkpoint, read_state
from maskkit.train.loop import train

log = logging.getLogger("maskkit")
AUGMENT_PART = 256          # documents per augmentation part


def distill(recipe: str, overrides: list[str], run_dir: str | Path, resume: bool = False,
            progress: bool = True) -> dict:
    """Run every stage of `recipe` (a tinybert config) into `run_dir`; returns the summary also in distill.json."""
    base = load_config(recipe, overrides)
    if base.method != "tinybert":
        raise MaskkitError(f"maskkit distill runs a tinybert recipe (e.g. tinybert/tiny); {recipe} is method {base.method}")
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists() and not resume and any(run_dir.iterdir()):
        raise MaskkitError(f"{run_dir} already holds a distillation; continue it with --resume, or distill into "
                           "another --out")
    if resume and not (run_dir / "teacher" / "pretrained.safetensors").is_file():
        raise MaskkitError(f"{run_dir} holds no distillation to resume; start it without --resume")
    started = time.perf_counter()
    tokenizer_path = prepare_teacher(base.model.teacher, run_dir, base)
    stage = lambda name, extra=(): _stage_config(recipe, overrides, name, tokenizer_path, extra)   # noqa: E731
    task_file, labels = task_documents(stage("teacher"), run_dir / "task.jsonl")
    on_task = ["data.name=jsonl", f"data.path={task_file}", "data.label_field=label", "data.split=[1.0,0.0,0.0]"]
    pretrained = run_dir / "teacher" / "pretrained.safetensors"
    label_list = "[" + ",".join(json.dumps(name) for name in labels) + "]"
    common = [f"model.labels={label_list}"]

    teacher_model, _ = load_teacher(pretrained)
    task_teacher = run_dir / "teacher" / "task.safetensors"
    if isinstance(teacher_model, SequenceClassifier):
        missing = [name for name in labels if name not in teacher_model.labels]
        if missing:
            raise MaskkitError(f"model.teacher is a classifier of {teacher_model.labels}, which lacks the task's class "
                               f"{missing[0]!r}; give a pre-trained encoder (it is fine-tuned first) or a teacher of this task")
        common = ["model.labels=[" + ",".join(json.dumps(n) for n in teacher_model.labels) + "]"]
        if not task_teacher.is_file():
            save_teacher(teacher_model, task_teacher, f"{base.model.teacher} (already a classifier)")
    elif not task_teacher.is_file():
        finetune = _run_stage(stage("teacher", [*common, *on_task, f"model.teacher={pretrained}"]),
                              run_dir / "teacher-finetune", progress)
        save_teacher(finetune.model, task_teacher, f"{base.model.teacher} fine-tuned in {run_dir / 'teacher-finetune'}")
    task_model, _ = load_teacher(task_teacher)
    if not (run_dir / "teacher_hf" / "config.json").is_file():
        _save_hf(task_model, run_dir / "teacher_hf", tokenizer_path)

    # General distillation reads the pre-trained teacher (its encoder); the task stages the task teacher.
    general_teacher = pretrained
    if isinstance(teacher_model, SequenceClassifier):
        general_teacher = run_dir / "teacher" / "pretrained-encoder.safetensors"
        if not general_teacher.is_file():
            save_teacher(teacher_model.backbone, general_teacher, f"the encoder of {base.model.teacher}")
    _run_stage(stage("general", [*common, f"model.teacher={general_teacher}"]), run_dir / "general", progress)
    augmented = augment(stage("intermediate", on_task), task_model, tokenizer_path, run_dir / "augment")
    task_data = [f"model.teacher={task_teacher}", "data.name=jsonl", f"data.path={augmented}",
                 "data.label_field=label", "data.split=[1.0,0.0,0.0]", "data.examples=documents"]
    _run_stage(stage("intermediate", [*common, *task_data, f"train.init_from={run_dir / 'general'}"]),
               run_dir / "intermediate", progress)
    student = _run_stage(stage("prediction", [*common, *task_data, f"train.init_from={run_dir / 'intermediate'}"]),
                         run_dir / "prediction", progress)
    if not (run_dir / "hf" / "config.json").is_file():
        _save_hf(student.model, run_dir / "hf", tokenizer_path)

    test, test_labels = test_documents(stage("teacher"))
    write_test_documents(stage("teacher"), run_dir / "test.jsonl")
    summary = {"teacher": str(base.model.teacher), "labels": list(task_model.labels),
               "task_documents": _count_lines(task_file),
               "teacher_test_accuracy": task_accuracy(task_model, test, task_model.labels, test_labels),
               "student_test_accuracy": task_accuracy(student.model, test, student.model.labels, test_labels),
               "num_test": len(test.labels), "augmented_documents": _count_lines(augmented),
               "seconds": round(time.perf_counter() - started, 1), "student_hf": str(run_dir / "hf"),
               "teacher_hf": str(run_dir / "teacher_hf")}
    with writing(run_dir / "distill.json"):
        atomic_write_text(run_dir / "distill.json", json.dumps(summary, indent=1))
    return summary


def prepare_teacher(teacher: str, run_dir: Path, cfg: Config) -> str:
    """Write RUN/teacher/pretrained.safetensors from model.teacher (once) and return the teacher's tokenizer.json,
    which the student and every stage's data read. A data.tokenizer other than the teacher's is refused before
    anything is written."""
    from maskkit.interop.hf_bert import load_hf_bert, minilm_dir

    target = run_dir / "teacher" / "pretrained.safetensors"
    tokenizer_record = run_dir / "teacher" / "tokenizer.json"
    if target.is_file():
        return str(tokenizer_record)
    if teacher == "minilm":
        model, tokenizer = load_hf_bert(minilm_dir()), minilm_tokenizer_file()
    else:
        path = Path(teacher).expanduser()
        if (path / "config.json").is_file():                      # a Hugging Face BERT directory
            model, tokenizer = load_hf_bert(path), path / "tokenizer.json"
        elif (path / "checkpoints").is_dir():                     # a maskkit run of a text method
            model, tokenizer = _model_of_run(path), path / "tokenizer.json"
        else:
            raise MaskkitError(f"model.teacher: {teacher} is not minilm, a Hugging Face BERT directory (with "
                               "config.json) or a maskkit text run")
        if not Path(tokenizer).is_file():
            raise MaskkitError(f"model.teacher: {teacher} comes without its tokenizer.json, which the student must share")
    wanted = cfg.data.tokenizer
    given = minilm_tokenizer_file() if wanted == "minilm" else Path(wanted).expanduser()
    teacher_vocabulary = Path(tokenizer).read_text(encoding="utf-8")
    if not given.is_file() or given.read_text(encoding="utf-8") != teacher_vocabulary:
        raise MaskkitError(f"data.tokenizer={wanted} is not the teacher's tokenizer ({teacher}): the student reads the "
                           f"teacher's; set data.tokenizer={tokenizer}")
    if hasattr(model, "encoder"):                                 # an MLM: its encoder is the teacher
        model = model.encoder
    with writing(run_dir / "teacher"):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tokenizer_record, teacher_vocabulary)
        save_teacher(model, target, str(teacher))
    return str(tokenizer_record)


def _model_of_run(path: Path):
    from maskkit.eval.run import method_from_checkpoint

    method, cfg = method_from_checkpoint(find_checkpoint(path))
    if cfg.method == "tinybert":
        return method.model
    if not isinstance(getattr(method, "backbone", None), TextTransformer):
        raise MaskkitError(f"model.teacher: {path} is a {cfg.method} run; a teacher is a BERT-like text model "
                           "(mlm, pmlm or tinybert runs)")
    return method.backbone


def _stage_config(recipe: str, overrides: list[str], stage: str, tokenizer: str, extra=()) -> Config:
    """The recipe with the user's overrides, then what the stage sets: its model.stage, steps and lr (from the
    model's *_steps / *_lr), its examples, and the teacher's tokenizer."""
    cfg = load_config(recipe, overrides)
    m = cfg.model
    examples = "blocks" if stage == "general" else "documents"
    return load_config(recipe, [*overrides, f"model.stage={stage}", f"train.steps={getattr(m, f'{stage}_steps')}",
                                f"optim.base_lr={getattr(m, f'{stage}_lr')}", f"data.examples={examples}",
                                f"data.tokenizer={tokenizer}", *extra])


def task_documents(cfg: Config, path: Path) -> tuple[Path, list[str]]:
    """RUN/task.jsonl: the task's labelled training documents ({"text", "label" name}), model.task_documents of them
    when set (class-stratified); every stage that reads the task reads this file. Returns (it, the class names)."""
    from maskkit.data.text import read_corpus, split_documents
    from maskkit.eval.text import stratified_subset

    corpus = read_corpus(cfg.data)
    documents = [d for d in split_documents(corpus.documents, cfg.data.split, cfg.data.split_seed, "train")
                 if d.label >= 0]
    if not documents:
        raise MaskkitError(f"data.name={cfg.data.name}: the training split has no labelled document for the task"
                           + ("" if cfg.data.name == "wiki" else " (data.label_field names the label)"))
    if cfg.model.task_documents:
        chosen = stratified_subset(torch.tensor([d.label for d in documents]), cfg.model.task_documents,
                                   cfg.data.split_seed)
        documents = [documents[i] for i in chosen.tolist()]
    names = sorted({corpus.label_names[d.label] for d in documents})
    if not path.is_file():
        lines = [json.dumps({"text": d.text, "label": corpus.label_names[d.label]}) for d in documents]
        with writing(path):
            atomic_write_text(path, "\n".join(lines) + "\n")
    return path, names


def _run_stage(cfg: Config, run_dir: Path, progress: bool):
    """Train the stage into run_dir (continuing it when it was interrupted) and return its method with the final
    weights; a finished stage is loaded, not run again."""
    from maskkit.eval.run import method_from_checkpoint

    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file() and read_state(find_checkpoint(run_dir)).get("step") == cfg.train.steps:
        log.info("%s: finished earlier, kept", run_dir)
    else:
        log.info("%s: stage %s, %d steps", run_dir, cfg.model.stage, cfg.train.steps)
        train(cfg, run_dir, resume=latest.is_file(), progress=progress)
    method, _ = method_from_checkpoint(find_checkpoint(run_dir))
    return method.eval()


def augment(cfg: Config, teacher: SequenceClassifier, tokenizer_path: str, out_dir: Path) -> Path:
    """The task's training documents, each followed by its augmented copies (Sec 3.3), as one jsonl of
    {"text", "label"}: written in parts of AUGMENT_PART documents (resumable), then joined."""
    m = cfg.model
    joined = out_dir / "augmented.jsonl"
    if joined.is_file():
        return joined
    from maskkit.data.text import read_corpus, split_documents

    corpus = read_corpus(cfg.data)                  # the task file: every document trains
    documents = [d for d in split_documents(corpus.documents, cfg.data.split, cfg.data.split_seed, "train")
                 if d.label >= 0]
    tokenizer = Tokenizer.from_file(tokenizer_path, cfg.data.block_length)
    embedding = teacher.backbone.token_embedding.weight.detach()
    predict = _masked_lm(m.augment_mlm, tokenizer) if m.augment_mlm else None
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    started, done = time.perf_counter(), 0
    parts = []
    for first in range(0, len(documents), AUGMENT_PART):
        part = out_dir / f"part-{first // AUGMENT_PART:05d}.jsonl"
        parts.append(part)
        if part.is_file():
            continue
        chunk = documents[first:first + AUGMENT_PART]
        variants = augment_documents([d.text for d in chunk], tokenizer, embedding, m.augment_copies,
                                     m.augment_probability, m.augment_candidates, cfg.train.seed, predict, first)
        lines = [json.dumps({"text": text, "label": corpus.label_names[d.label]})
                 for d, texts in zip(chunk, variants, strict=True) for text in texts]
        with writing(part):
            atomic_write_text(part, "\n".join(lines) + "\n")
        done += len(chunk)
        log.info("augmented %d / %d documents (%.0f documents/s)", first + len(chunk), len(documents),
                 done / (time.perf_counter() - started))
    with writing(joined):
        atomic_write_text(joined, "".join(p.read_text(encoding="utf-8") for p in parts))
    return joined


def _masked_lm(path: str, tokenizer: Tokenizer):
    """predict_masked of a BertForMaskedLM directory with the teacher's vocabulary (Sec 3.3's BERT)."""
    from maskkit.interop.hf_bert import load_hf_bert

    mlm = load_hf_bert(path)
    if not hasattr(mlm, "head"):
        raise MaskkitError(f"model.augment_mlm: {path} is not a BertForMaskedLM (it has no masked-LM head)")
    if mlm.encoder.cfg.vocab_size < tokenizer.vocab_size:
        raise MaskkitError(f"model.augment_mlm: {path} has {mlm.encoder.cfg.vocab_size} tokens, the teacher's "
                           f"tokenizer {tokenizer.vocab_size}")

    @torch.no_grad()
    def predict(ids, attention_mask, positions):
        hidden = mlm.encoder(ids, attention_mask)                                  # (B, L, D)
        return mlm.head(hidden[torch.arange(len(ids)), positions])                 # (B, V)

    return predict


def _save_hf(model: SequenceClassifier, directory: Path, tokenizer_path: str) -> None:
    from maskkit.interop.hf_bert import save_hf_bert

    tmp = directory.with_name(f".{directory.name}.tmp")
    with writing(directory):
        save_hf_bert(model, tmp, tokenizer=tokenizer_path)
        tmp.rename(directory)


def test_documents(cfg: Config):
    """(the labelled documents of the data's test split, their class names)."""
    dataset, _, names = build_document_dataset(dataclasses.replace(cfg.data, examples="documents"), "test")
    return dataset.dataset, names


def write_test_documents(cfg: Config, path: Path) -> None:
    """RUN/test.jsonl: the labelled test documents the accuracies are measured on ({"text", "label" name}), which
    `maskkit compress` and `maskkit pareto` measure a stage's model on."""
    from maskkit.data.text import read_corpus, split_documents

    if path.is_file():
        return
    corpus = read_corpus(cfg.data)
    documents = [d for d in split_documents(corpus.documents, cfg.data.split, cfg.data.split_seed, "test")
                 if d.label >= 0]
    lines = [json.dumps({"text": d.text, "label": corpus.label_names[d.label]}) for d in documents]
    with writing(path):
        atomic_write_text(path, "\n".join(lines) + "\n")


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as file:
        return sum(1 for _ in file)
