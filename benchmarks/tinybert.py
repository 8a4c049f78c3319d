"""TinyBERT on the wiki topics against its task teacher, in one process: accuracy, size and speed (Jiao et al. 2020).

For each label setting (every labelled training document, and 1,000 of them, class-stratified) the rows are
  teacher                     all-MiniLM-L6-v2 fine-tuned on the task (stage teacher of `maskkit distill`)
  TinyBERT                    general distillation, then task distillation on the augmented task data
  without augmentation        the same, task distillation on the task documents alone (model.augment_copies=0)
  general distillation only   the general student fine-tuned on the labels (cross-entropy), no task distillation
  no distillation             the student's architecture from random init, fine-tuned on the labels
The general distillation (labels play no part in it) is run once and shared by every row that uses it. The
fine-tuned rows train for intermediate_steps + prediction_steps at intermediate_lr, the budget of the task
distillation they replace. Accuracy is on the wiki test split; speed is the student's against the teacher's
forward pass in eval mode on this CPU: latency at batch 1 and throughput at batch 32, both 128 tokens.

    python benchmarks/tinybert.py --out runs/tinybert-bench            # ~1 h on a 2-core CPU
    python benchmarks/tinybert.py --out runs/b --settings 1000 -- model.general_steps=100   # recipe overrides
    python benchmarks/tinybert.py --shapes 3x192h12 3x144h6 2x192h12    # student shapes' size and speed only, ~1 min

--shapes trains nothing: it builds the teacher's architecture and each student (DEPTHxWIDTHhHEADS, the recipe's
student otherwise) with random weights, which do not change the speed, and prints the ratios of the table.
"""

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import time
from pathlib import Path

import torch

from maskkit.config import load_config
from maskkit.distill import distill, test_documents
from maskkit.errors import MaskkitError
from maskkit.eval.text import task_accuracy
from maskkit.methods.tinybert import load_teacher, save_teacher
from maskkit.nn.transformer import SequenceClassifier, TextTransformer
from maskkit.train.checkpoint import find_checkpoint
from maskkit.train.loop import train

RECIPE = "tinybert/tiny"


def copy_stages(source: Path, target: Path, names: list[str]) -> None:
    """Start `target` with `source`'s finished stages (a shared general distillation, a shared teacher)."""
    for name in names:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, dirs_exist_ok=True)
        elif (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def finetune_student(start: SequenceClassifier, run_dir: Path, overrides: list[str], task_file: Path, seed: int):
    """Cross-entropy fine-tuning of `start` on the task file, with the task distillation's step budget."""
    cfg = load_config(RECIPE, overrides)
    m = cfg.model
    if not (run_dir / "checkpoints" / "latest").is_file():
        teacher_file = save_teacher(start, run_dir.parent / f"{run_dir.name}-start.safetensors", "benchmark start")
        stage = load_config(RECIPE, [*overrides, "model.stage=teacher", f"model.teacher={teacher_file}",
                                     f"train.steps={m.intermediate_steps + m.prediction_steps}",
                                     f"optim.base_lr={m.intermediate_lr}", f"train.seed={seed}",
                                     "data.name=jsonl", f"data.path={task_file}", "data.label_field=label",
                                     "data.split=[1.0,0.0,0.0]", "data.examples=documents",
                                     f"data.tokenizer={run_dir.parent / 'full' / 'teacher' / 'tokenizer.json'}"])
        train(stage, run_dir, progress=False)
    from maskkit.eval.run import method_from_checkpoint

    method, _ = method_from_checkpoint(find_checkpoint(run_dir))
    return method.model.eval()


def parameters(model: SequenceClassifier) -> tuple[int, int]:
    """(all parameters, those outside the embedding tables: token, position and token-type embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    backbone = model.backbone
    embedding = backbone.token_embedding.weight.numel() + backbone.position_embedding.numel()
    if backbone.token_type_embedding is not None:
        embedding += backbone.token_type_embedding.weight.numel()
    return total, total - embedding


@torch.no_grad()
def speed(model: SequenceClassifier, batch: int, length: int = 128, repeats: int = 10) -> float:
    """Median seconds of one forward pass of (batch, length) real tokens."""
    model.eval()
    ids = torch.randint(1000, 2000, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    model(ids, mask)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tinybert-bench")
    parser.add_argument("--settings", nargs="*", default=["all", "1000"], help="label settings: all and/or a count")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. model.general_steps=100")
    parser.add_argument("--shapes", nargs="*", default=None, metavar="DxWhH",
                        help="only the size and speed of these student shapes, e.g. 3x192h12 2x192h6")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shapes is not None:
        shape_speeds(args.shapes, args.overrides)
        return
    out = Path(args.out)
    shared = None
    rows, results = [], {}
    for setting in args.settings:
        base = [*args.overrides] + ([] if setting == "all" else [f"model.task_documents={int(setting)}"])
        root = out / setting
        full = root / "full"
        if shared is not None and not full.exists():
            copy_stages(shared, full, ["teacher/pretrained.safetensors", "teacher/tokenizer.json", "general"])
        start = time.perf_counter()
        summary = distill(RECIPE, base, full, resume=full.exists(), progress=False)
        shared = shared or full
        no_aug = root / "without-augmentation"
        if not no_aug.exists():
            copy_stages(full, no_aug, ["teacher", "teacher-finetune", "teacher_hf", "general", "task.jsonl"])
        no_aug_summary = distill(RECIPE, [*base, "model.augment_copies=0"], no_aug, resume=True, progress=False)
        teacher, _ = load_teacher(full / "teacher" / "task.safetensors")
        student, _ = load_teacher_from_run(full / "prediction")
        general, _ = load_teacher_from_run(full / "general")
        cfg = load_config(RECIPE, base)
        torch.manual_seed(cfg.train.seed)
        scratch = SequenceClassifier(TextTransformer(cfg.model.student), len(teacher.labels), teacher.labels)
        gd_only = finetune_student(general, root / "general-only", base, full / "task.jsonl", cfg.train.seed)
        no_distill = finetune_student(scratch, root / "no-distillation", base, full / "task.jsonl", cfg.train.seed)
        test, names = test_documents(load_config(RECIPE, [*base, "model.stage=teacher", "data.examples=documents"]))
        models = {"teacher": teacher, "TinyBERT": student,
                  "without augmentation": load_teacher_from_run(no_aug / "prediction")[0],
                  "general distillation only": gd_only, "no distillation": no_distill}
        accuracies = {name: task_accuracy(model, test, model.labels, names) for name, model in models.items()}
        results[setting] = {"accuracy": accuracies, "task_documents": summary["task_documents"],
                            "augmented_documents": summary["augmented_documents"],
                            "augmented_documents_without": no_aug_summary["augmented_documents"],
                            "seconds": round(time.perf_counter() - start)}
        for name, value in accuracies.items():
            rows.append((setting, name, value, value / accuracies["teacher"]))
    teacher_total, teacher_inner = parameters(teacher)
    student_total, student_inner = parameters(student)
    latency = speed(teacher, 1) / speed(student, 1)
    throughput = speed(teacher, 32, repeats=3) / speed(student, 32, repeats=3)
    results["size_and_speed"] = {"teacher_parameters": teacher_total, "student_parameters": student_total,
                                 "teacher_parameters_without_embeddings": teacher_inner,
                                 "student_parameters_without_embeddings": student_inner,
                                 "latency_ratio_batch_1": latency, "throughput_ratio_batch_32x128": throughput,
                                 "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{'labels':<8} {'model':<27} {'test accuracy':>13} {'% of teacher':>12}")
    for setting, name, value, share in rows:
        print(f"{setting:<8} {name:<27} {value:13.3f} {100 * share:11.1f}%")
    print(f"parameters: teacher {teacher_total / 1e6:.2f}M, student {student_total / 1e6:.2f}M "
          f"({teacher_total / student_total:.1f}x fewer); without the embedding tables {teacher_inner / 1e6:.2f}M vs "
          f"{student_inner / 1e6:.2f}M ({teacher_inner / student_inner:.1f}x fewer)")
    print(f"speed on this CPU ({torch.get_num_threads()} threads): {latency:.1f}x lower latency at batch 1 x 128, "
          f"{throughput:.1f}x the throughput at batch 32 x 128")


def shape_speeds(shapes: list[str], overrides: list[str], rounds: int = 10) -> None:
    """Parameter, latency and throughput ratios of student shapes against the teacher's architecture (MiniLM:
    6 layers, width 384, 12 heads), all with random weights, in this process. Each round times every model once
    in a rotating order (a forward at batch 32 x 128, and the median of 5 at batch 1); a ratio is the median over
    rounds of the ratio within a round, so that the machine's drift between models cancels."""
    student = load_config(RECIPE, overrides).model.student
    labels = [str(i) for i in range(11)]
    torch.manual_seed(0)
    models = [SequenceClassifier(TextTransformer(dataclasses.replace(student, depth=6, dim=384, num_heads=12)),
                                 len(labels), labels)]
    for shape in shapes:
        match = re.fullmatch(r"(\d+)x(\d+)h(\d+)", shape)
        if match is None:
            raise SystemExit(f"--shapes: {shape!r} is not DEPTHxWIDTHhHEADS, e.g. 3x192h12")
        depth, dim, heads = (int(g) for g in match.groups())
        shaped = dataclasses.replace(student, depth=depth, dim=dim, num_heads=heads)
        try:
            shaped.check(f"--shapes {shape}", "model.student")
        except MaskkitError as error:
            raise SystemExit(str(error)) from None
        models.append(SequenceClassifier(TextTransformer(shaped), len(labels), labels))
    latency, batch = [[] for _ in models], [[] for _ in models]
    for round_index in range(rounds):
        order = list(range(len(models)))
        for i in order[round_index % len(order):] + order[: round_index % len(order)]:
            latency[i].append(speed(models[i], 1, repeats=5))
            batch[i].append(speed(models[i], 32, repeats=1))
    teacher_inner = parameters(models[0])[1]
    print(f"{'student':<10} {'params w/o embeddings':>22} {'latency, batch 1':>17} {'throughput, 32 x 128':>21}"
          f"   ({rounds} rounds, {torch.get_num_threads()} threads)")
    for i, shape in enumerate(shapes, start=1):
        lat = statistics.median(t / s for t, s in zip(latency[0], latency[i], strict=True))
        thr = statistics.median(t / s for t, s in zip(batch[0], batch[i], strict=True))
        print(f"{shape:<10} {teacher_inner / parameters(models[i])[1]:21.1f}x {lat:16.1f}x {thr:20.1f}x")


def load_teacher_from_run(run: Path):
    """The SequenceClassifier a TinyBERT stage run trained (its student)."""
    from maskkit.eval.run import method_from_checkpoint

    method, cfg = method_from_checkpoint(find_checkpoint(run))
    return method.model.eval(), cfg


if __name__ == "__main__":
    main()
