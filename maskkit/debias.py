"""`maskkit debias MODEL --out DIR`: debias a two-tower model's zero-shot classifier by projecting the directions of
biased prompts out of its class embeddings (Chuang et al. 2023; the method is maskkit/analysis/debias.py), and
measure what it does to each group.

MODEL is a maskkit FLIP run or a Hugging Face CLIP directory. The classes (--classes NAME ..., read through
--template "a photo of a {}."; several templates make a CLIP-style ensemble), the spurious prompts (--spurious
TEXT ...) and the positive pairs of the calibration (--pairs F, or built from --attributes PHRASE ...: each class
with each attribute, the pairs those of one class and template) are the user's; the evaluation set is a folder
whose metadata.csv has the columns filepath, class and group (--eval DIR), or the biased shapes world
(--eval biased-shapes), whose classes, prompts and attributes are then the defaults. DIR receives

  report.json              before and after each mode (projection, calibrated, calibration) and the random control:
                           per-group accuracy, average, worst group and gap; the lambda sweep; the fraction of the
                           class-prompt difference inside the spurious span; the balanced linear probe's worst group
                           (biased-shapes)
  projection.safetensors   P of --mode at --lam (float64, (d, d)), to apply as q <- normalize(q P^T)
  accuracy.png             per-group accuracy before and after, one bar per mode and group
  lambda_sweep.png         average and worst-group accuracy against lambda (calibrated and calibration)
"""

import csv
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from maskkit.analysis.debias import (
    MODES,
    apply,
    debias_matrix,
    fraction_in_span,
    group_accuracy,
    pair_matrix,
    projection_from_basis,
    random_projection,
    spurious_basis,
    zero_shot_predictions,
)
from maskkit.data.common import read_text
from maskkit.data.images import ImageFolder
from maskkit.data.shapes import BACKGROUNDS, BIAS_CLASSES, BIAS_SHAPE_COLOURS, BiasedShapes
from maskkit.errors import MaskkitError
from maskkit.files import atomic_write_text, pyplot, writing

log = logging.getLogger("maskkit")

LAMBDA_SWEEP = (0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0)
WORLD = "biased-shapes"
# The biased world's prompts, in its captions' words ("a small red circle on a green background").
WORLD_TEMPLATES = tuple(f"a {size} {colour} {{}}" for size in ("small", "large") for colour in BIAS_SHAPE_COLOURS)
WORLD_SPURIOUS = tuple(t.format(bg) for bg in BACKGROUNDS for t in ("a {} background", "on a {} background",
                                                                     "{} background"))
WORLD_ATTRIBUTES = tuple(f"on a {bg} background" for bg in BACKGROUNDS)
LARGE_FRACTION = 0.3     # above this much of the class difference in the spurious span, projection costs accuracy


@dataclass
class TwoTowers:
    description: str
    encode_texts: Callable[[list[str]], torch.Tensor]       # texts -> (n, E) normalised, float64
    encode_images: Callable[[torch.Tensor], torch.Tensor]   # (N, C, H, W) pixels in [0, 1] -> (N, E) normalised
    image_size: int
    channels: int
    data_name: str = ""                                     # a maskkit run's data.name (its world, if biased)
    world_seed: int = 0                                     # and its data.world_seed


def load_two_towers(source: str) -> TwoTowers:
    """A maskkit FLIP run or a Hugging Face CLIP directory, as text and image encoders."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return _hf_clip(path)
    if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        return _flip_run(path)
    raise MaskkitError(f"{source}: not a two-tower model (a maskkit flip run with checkpoints/, or a Hugging Face CLIP "
                       "directory with config.json)")


def _normalised(encode, mean: list[float], std: list[float]):
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    @torch.no_grad()
    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode((pixels - mean_t) / std_t).double(), dim=-1)
    return encode_images


def _flip_run(path: Path) -> TwoTowers:
    from maskkit.data.pairs import pair_tokenizer
    from maskkit.data.text import run_vocabulary
    from maskkit.eval.run import method_from_checkpoint
    from maskkit.train.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(path)
    method, cfg = method_from_checkpoint(checkpoint)
    if not hasattr(method, "encode_text"):
        raise MaskkitError(f"{path}: a {cfg.method} run has no text tower; debias needs a two-tower model (a flip run, "
                           "or a Hugging Face CLIP directory)")
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else path
    # The vocabulary pinned in the run (RUN/tokenizer.json); a run from before pinning learns its captions' again.
    tokenizer = pair_tokenizer(run_vocabulary(cfg.data, run))
    method.eval()

    @torch.no_grad()
    def encode_texts(texts: list[str]) -> torch.Tensor:
        ids, mask = tokenizer.encode(texts)
        return F.normalize(method.encode_text(ids, mask).double(), dim=-1)

    encoder = method.encoder.cfg
    return TwoTowers(f"maskkit flip run {run}", encode_texts, _normalised(method.encode_image, cfg.data.mean,
                     cfg.data.std), encoder.image_size, encoder.in_channels, cfg.data.name,
                     getattr(cfg.data, "world_seed", 0))


def _hf_clip(path: Path) -> TwoTowers:
    from maskkit.interop.hf import hf_model_type, hf_normalisation, load_hf_tokenizer, quiet_transformers
    from maskkit.interop.hf_clip import load_hf_clip

    family = hf_model_type(path)
    if family != "clip":
        raise MaskkitError(f"{path}: a Hugging Face {family or 'model'} directory has no text and image towers; debias "
                           "needs a two-tower model (CLIP, or a maskkit flip run)")
    tokenizer = load_hf_tokenizer(path)
    clip = load_hf_clip(path).eval()

    @torch.no_grad()
    def encode_texts(texts: list[str]) -> torch.Tensor:
        with quiet_transformers():
            batch = tokenizer(texts, padding=True, truncation=True, max_length=clip.text.cfg.context_length,
                              return_tensors="pt")
        return F.normalize(clip.encode_text(batch["input_ids"], batch["attention_mask"]).double(), dim=-1)

    mean, std = hf_normalisation(path, "clip")
    encoder = clip.encoder.cfg
    return TwoTowers(f"Hugging Face CLIP {path}", encode_texts, _normalised(clip.encode_image, mean, std),
                     encoder.image_size, encoder.in_channels)


@dataclass
class GroupedImages:
    """Pixels (N, C, H, W) in [0, 1] with class labels and group (spurious attribute) labels."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    class_names: list[str]
    group_names: list[str]
    description: str


def world_images(split: str, size: int, channels: int, count: int = 1024, seed: int = 0) -> GroupedImages:
    world = BiasedShapes(split, 4 * count, size, channels, seed=seed)
    items = [world[i] for i in range(len(world))]
    return GroupedImages(torch.stack([it["images"] for it in items]), torch.stack([it["label"] for it in items]),
                         torch.stack([it["group"] for it in items]), list(BIAS_CLASSES), list(BACKGROUNDS),
                         f"biased shapes world, {split} split (group-balanced), {len(items)} images")


def folder_images(folder: str, class_names: list[str], size: int, channels: int) -> GroupedImages:
    """DIR/metadata.csv (columns filepath, class, group; paths relative to DIR) and its images; unreadable images
    are named and left out."""
    root = Path(folder).expanduser()
    metadata = root / "metadata.csv"
    if not root.is_dir():
        raise MaskkitError(f"--eval {folder}: not a folder (give a folder with metadata.csv, or biased-shapes)")
    if not metadata.is_file():
        raise MaskkitError(f"--eval {folder}: no metadata.csv with the columns filepath, class, group (the group "
                           "labels the evaluation needs)")
    text = read_text(metadata)
    header = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=header.count)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    columns = [c.strip() for c in rows[0]] if rows else []
    missing = [c for c in ("filepath", "class", "group") if c not in columns]
    if missing:
        what = "no group labels" if missing == ["group"] else f"no column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        raise MaskkitError(f"{metadata}: {what}; its columns are {columns}, debias needs filepath, class and group")
    at = {c: columns.index(c) for c in ("filepath", "class", "group")}
    filled = [r for r in rows[1:] if any(field.strip() for field in r)]          # blank lines left out
    entries = [(r[at["filepath"]], r[at["class"]].strip(), r[at["group"]].strip()) for r in filled
               if len(r) >= len(columns)]
    if len(entries) < len(filled):
        log.warning("%s: %d rows with fewer fields than its %d columns left out", metadata,
                                             len(filled) - len(entries), len(columns))
    unknown = sorted({c for _, c, _ in entries} - set(class_names))
    if unknown:
        raise MaskkitError(f"{metadata}: class {unknown[0]!r} is not among --classes ({', '.join(class_names)})")
    group_names = sorted({g for _, _, g in entries})
    if not entries or any(not g for _, _, g in entries):
        raise MaskkitError(f"{metadata}: {'no rows' if not entries else 'rows with an empty group'}; every image needs "
                           "a class and a group")
    images, labels, groups, skipped = [], [], [], []
    for file, name, group in entries:
        image = ImageFolder.load(root / file, size, channels)
        if isinstance(image, torch.Tensor):
            images.append(image)
            labels.append(class_names.index(name))
            groups.append(group_names.index(group))
        else:
            skipped.append(f"{image.path} ({image.reason})")
    if skipped:
        log.warning("%d unreadable images left out, e.g. %s", len(skipped), skipped[0])
    if not images:
        raise MaskkitError(f"{metadata}: none of its {len(entries)} images can be read")
    return GroupedImages(torch.stack(images), torch.tensor(labels), torch.tensor(groups), class_names, group_names,
                         f"{root} ({len(images)} images)")


def read_pairs(file: str) -> tuple[list[str], list[tuple[int, int]]]:
    """--pairs F: JSON {"prompts": [text, ...], "pairs": [[i, j] or [text, text], ...]}; a pair names prompts of the
    list, by index or by text."""
    path = Path(file).expanduser()
    try:
        content = json.loads(read_text(path))
    except ValueError as error:
        raise MaskkitError(f"--pairs {file}: not valid JSON ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("prompts"), list) or not isinstance(
            content.get("pairs"), list):
        raise MaskkitError(f"--pairs {file}: needs {{\"prompts\": [text, ...], \"pairs\": [[i, j], ...]}}")
    prompts = content["prompts"]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise MaskkitError(f"--pairs {file}: \"prompts\" must be a non-empty list of non-empty texts")
    pairs = []
    for number, pair in enumerate(content["pairs"]):
        if not isinstance(pair, list) or len(pair) != 2:
            raise MaskkitError(f"--pairs {file}: pair {number + 1} is {pair!r}, not a list of two prompts")
        ends = []
        for end in pair:
            if isinstance(end, int) and not isinstance(end, bool) and 0 <= end < len(prompts):
                ends.append(end)
            elif isinstance(end, str) and end in prompts:
                ends.append(prompts.index(end))
            else:
                raise MaskkitError(f"--pairs {file}: pair {number + 1} names {end!r}, which is not one of its "
                                   f"{len(prompts)} prompts (an index 0-{len(prompts) - 1} or a prompt's exact text)")
        if ends[0] == ends[1]:
            raise MaskkitError(f"--pairs {file}: pair {number + 1} pairs prompt {ends[0]} with itself")
        pairs.append((ends[0], ends[1]))
    if not pairs:
        raise MaskkitError(f"--pairs {file}: \"pairs\" is empty")
    return prompts, pairs


def attribute_pairs(classes: list[str], templates: list[str], attributes: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """Each class with each attribute in each template; the pairs: one class and template, two attributes."""
    prompts, pairs = [], []
    for name in classes:
        for template in templates:
            first = len(prompts)
            prompts += [template.format(f"{name} {attribute}") for attribute in attributes]
            pairs += [(first + i, first + j) for i in range(len(attributes)) for j in range(i + 1, len(attributes))]
    return prompts, pairs


def _check_templates(templates: list[str]) -> None:
    for template in templates:
        if template.count("{}") != 1:
            raise MaskkitError(f"--template {template!r}: needs exactly one {{}} where the class name goes")


def class_embeddings(towers: TwoTowers, classes: list[str], templates: list[str]) -> torch.Tensor:
    """(K, E): the normalised mean of each class's normalised template embeddings."""
    return torch.stack([F.normalize(towers.encode_texts([t.format(name) for t in templates]).mean(0), dim=-1)
                        for name in classes])


def balanced_probe(train: GroupedImages, test: GroupedImages, towers: TwoTowers) -> dict:
    """Logistic regression on the image embeddings, trained on a group-balanced set: is the class there at all?

    The embeddings are standardised first (the training set's mean and scale per dimension), as MAE's linear probe
    puts a BatchNorm before its classifier: unit vectors spread their classes over small per-dimension scales,
    and a regularised probe on them underfits (seed 1 of the benchmark: worst group 0.85 raw, 0.95 standardised).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = towers.encode_images(train.images).numpy(), towers.encode_images(test.images).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=10.0))
    probe.fit(x_train, train.labels.numpy())
    predictions = torch.from_numpy(probe.predict(x_test))
    return group_accuracy(predictions, test.labels, test.groups, test.class_names, test.group_names).as_dict()


def debias(source: str, out_dir: str | Path, classes: list[str] | None = None, templates: list[str] | None = None,
           spurious: list[str] | None = None, attributes: list[str] | None = None, pairs_file: str | None = None,
           evaluation: str | None = None, mode: str = "calibrated", lam: float = 1000.0, seed: int = 0) -> dict:
    """Run the debiasing of `source` and write DIR (see the module docstring); returns the report."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MaskkitError(f"{out_dir} exists and is not empty; debias into a new --out")
    if mode not in MODES:
        raise MaskkitError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    if not lam >= 0 or lam == float("inf"):
        raise MaskkitError(f"--lam {lam}: the calibration weight lambda must be a finite number >= 0")
    if templates:
        _check_templates(templates)
    file_pairs = read_pairs(pairs_file) if pairs_file else None           # a bad file fails before any model loads
    towers = load_two_towers(source)
    evaluation = evaluation or (WORLD if towers.data_name == WORLD else None)
    if evaluation is None:
        raise MaskkitError(f"{source}: give the evaluation set, --eval DIR (a folder with metadata.csv: filepath, "
                           f"class, group) or --eval {WORLD}")
    world = evaluation == WORLD
    if world:
        classes, templates = classes or list(BIAS_CLASSES), templates or list(WORLD_TEMPLATES)
        spurious, attributes = spurious or list(WORLD_SPURIOUS), attributes or list(WORLD_ATTRIBUTES)
    templates = templates or ["a photo of a {}."]
    if not classes or len(classes) < 2 or len(set(classes)) != len(classes):
        raise MaskkitError(f"--classes {classes}: give two or more distinct class names")
    if not spurious:
        raise MaskkitError("the spurious prompt set is empty: give --spurious TEXT ... (prompts that describe only the "
                           "spurious attribute, e.g. \"a photo of a water background.\")")
    if mode != "projection" and not (pairs_file or attributes):
        raise MaskkitError(f"--mode {mode} needs positive pairs: --pairs F, or --attributes PHRASE ... to pair each "
                           "class across them (or --mode projection)")
    if world and set(classes) != set(BIAS_CLASSES):
        raise MaskkitError(f"--classes {' '.join(classes)}: the biased shapes world's classes are "
                           f"{' '.join(BIAS_CLASSES)}")
    test = world_images("test", towers.image_size, towers.channels, seed=towers.world_seed) if world else folder_images(
        evaluation, classes, towers.image_size, towers.channels)
    pair_prompts, pairs = file_pairs or (
        attribute_pairs(classes, templates, attributes) if attributes else ([], []))

    queries = class_embeddings(towers, test.class_names, templates)                 # (K, E)
    basis = spurious_basis(towers.encode_texts(spurious), spurious)                # (E, k)
    p0 = projection_from_basis(basis)
    m = pair_matrix(towers.encode_texts(pair_prompts), pairs) if pairs else None
    image_embeddings = towers.encode_images(test.images)
    dim, rank = p0.shape[0], basis.shape[1]

    def evaluate(p: torch.Tensor | None) -> dict:
        q = queries if p is None else apply(queries, p)
        predictions = zero_shot_predictions(image_embeddings, q)
        return group_accuracy(predictions, test.labels, test.groups, test.class_names, test.group_names).as_dict()

    results = {"before": evaluate(None), "projection": evaluate(p0)}
    if m is not None:
        results["calibrated"] = evaluate(debias_matrix("calibrated", p0, m, lam))
        results["calibration"] = evaluate(debias_matrix("calibration", p0, m, lam))
    results["random_projection"] = evaluate(random_projection(dim, rank, seed))
    sweep = []
    if m is not None:
        for value in LAMBDA_SWEEP:
            sweep.append({"lam": value, "calibrated": evaluate(debias_matrix("calibrated", p0, m, value)),
                          "calibration": evaluate(debias_matrix("calibration", p0, m, value))})
    fraction = fraction_in_span(queries, basis)
    report = {
        "model": towers.description, "evaluation": test.description, "mode": mode, "lam": lam,
        "classes": test.class_names, "groups": test.group_names, "templates": templates, "spurious_prompts": spurious,
        "pair_prompts": pair_prompts, "pairs": [list(p) for p in pairs], "embedding_dim": dim, "spurious_rank": rank,
        "class_difference_in_spurious_span": fraction, "random_direction_in_span": rank / dim,
        "results": results, "lambda_sweep": sweep,
    }
    if fraction > LARGE_FRACTION:
        report["warning"] = (f"{fraction:.0%} of the class prompts' difference lies in the spurious span (a random "
                             f"direction: {rank / dim:.0%}): projecting it out removes class information too")
    if world:
        report["balanced_linear_probe"] = balanced_probe(
            world_images("val", towers.image_size, towers.channels, seed=towers.world_seed), test, towers)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-debias")
    with writing(out_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        chosen = debias_matrix(mode, p0, m, lam)
        save_file({"projection": chosen.contiguous()}, tmp / "projection.safetensors",
                  metadata={"mode": mode, "lam": repr(lam), "apply": "q <- normalize(q @ projection.T)"})
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=1, ensure_ascii=False))
        plot_groups(results, tmp / "accuracy.png")
        if sweep:
            plot_sweep(sweep, tmp / "lambda_sweep.png")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    return report


def plot_groups(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(results)
    groups = list(results["before"]["groups"]) + ["worst group", "average"]
    figure, axis = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name]["groups"][g] for g in groups[:-2]] + [results[name]["worst_group"],
                                                                      results[name]["average"]]
        axis.bar([x + i * width for x in range(len(groups))], values, width, label=name.replace("_", " "))
    axis.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(groups))], groups, fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("zero-shot accuracy")
    axis.legend(fontsize=7, ncol=len(names), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_sweep(sweep: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.4))
    xs = [max(row["lam"], 0.1) for row in sweep]                   # lambda = 0 drawn at 0.1 on the log axis
    for mode, style in (("calibrated", "-"), ("calibration", "--")):
        axis.plot(xs, [row[mode]["worst_group"] for row in sweep], style, marker="o", label=f"{mode}: worst group")
        axis.plot(xs, [row[mode]["average"] for row in sweep], style, marker="s", label=f"{mode}: average")
    axis.set_xscale("log")
    axis.set_xlabel("lambda (0 drawn at 0.1)")
    axis.set_ylabel("zero-shot accuracy")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
