"""`maskkit analyze MODEL (--text "..." | --text-file F | --image FILE_OR_FOLDER) --out DIR`: whole-layer
contextualization analysis (Kobayashi et al. 2021, 2024; the method is maskkit/analysis/contextualization.py) of a
Transformer's layers.

MODEL is `minilm` (the bundled all-MiniLM-L6-v2), a Hugging Face directory (any BERT; CLIP, whose text tower reads
texts and image tower images; ViT-MAE), or a maskkit run (text: mlm, pmlm, tinybert; image: mae, moco, densecl,
energy; flip: both towers). A text is [CLS] text [SEP] (CLIP: its start and end tokens), never cut; an image is
resized (shorter side, centre crop) to the model's size and normalised as the model was trained (a run's data.mean
and data.std, a Hugging Face directory's preprocessor_config.json); its tokens are [CLS] and the patches p{row},{col}.
DIR receives

  summary.json                 per layer and stage: mixing ratio, contextualization change (mean over the texts
                               and per text), the token pairs the feed-forward block amplifies most, seconds per text
  maps.safetensors             t{t}.layer{l}.{stage}: the token-to-token map ||y_{i<-j}||, (tokens, tokens + 1)
  heatmaps/text{t}.png         every layer's and stage's map of the first texts, with the tokens
  mixing_ratio.png             mixing ratio per layer, one line per stage
  contextualization_change.png contextualization change per layer, one line per component
  with --save-vectors:
  contributions.safetensors    t{t}.layer{l}.{stage}: the parts themselves, (tokens, tokens + 1, width), the last
                               source the bias
  tokens.json                  the tokens of each text
"""

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskkit.analysis.contextualization import (
    amplified_pairs,
    contextualization_change,
    decompose_layers,
    image_inputs,
    mixing_ratio,
    stages_of,
    text_inputs,
    token_map,
)
from maskkit.data.common import Unreadable
from maskkit.data.images import IMAGE_EXTENSIONS, ImageFolder
from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.files import atomic_write_text, pyplot, writing
from maskkit.interop.hf import HF_IMAGE_DEFAULTS, hf_model_type, hf_normalisation, load_hf_tokenizer
from maskkit.nn.transformer import Block, TextTransformer, ViT

# The component each contextualization change measures: (the map before it, the map after it), per block type.
POST_NORM_CHANGES = {"residual": ("attention", "residual"), "norm": ("residual", "norm"), "ffn": ("norm", "ffn"),
                     "ffn_residual": ("ffn", "ffn_residual"), "ffn_norm": ("ffn_residual", "ffn_norm"),
                     "feed-forward block": ("norm", "ffn_norm")}
PRE_NORM_CHANGES = {"residual": ("attention", "residual"), "ffn": ("norm", "ffn"),
                    "ffn_residual": ("ffn", "ffn_residual"), "feed-forward block": ("residual", "ffn_residual")}
HEATMAP_TEXTS = 5            # heatmaps are drawn for the first texts only


@dataclass
class Subject:
    """What analyze reads from MODEL: a text encoder with its tokenizer, an image encoder with its preprocessing,
    or both (CLIP, FLIP: the tower that reads the given input is analyzed)."""

    description: str
    text: TextTransformer | None = None
    # texts, context length -> ([(ids, tokens)] per text, the special ids left out of the amplified pairs)
    tokenize: Callable[[list[str], int], tuple[list[tuple[torch.Tensor, list[str]]], set[int]]] | None = None
    image: ViT | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


def load_subject(source: str) -> Subject:
    """minilm, a Hugging Face directory (BERT family, CLIP, ViT-MAE) or a maskkit run, as a Subject."""
    if source == "minilm":
        from maskkit.interop.hf_bert import load_hf_bert, minilm_dir

        tokenizer = Tokenizer.from_file(minilm_tokenizer_file(), 512)
        return Subject("all-MiniLM-L6-v2 (bundled)", text=_checked(load_hf_bert(minilm_dir()), source),
                       tokenize=_maskkit_tokenize(tokenizer))
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return _hf_subject(path)
    if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        return _run_subject(path)
    raise MaskkitError(f"{source}: not a model (minilm, a Hugging Face directory with config.json, or a maskkit run "
                       "with checkpoints/)")


def _hf_subject(path: Path) -> Subject:
    family = hf_model_type(path)
    description = f"Hugging Face {family or 'model'} {path}"
    if family in HF_IMAGE_DEFAULTS:
        mean, std = hf_normalisation(path, family)
        if family == "clip":
            from maskkit.interop.hf_clip import load_hf_clip

            clip = load_hf_clip(path)
            return Subject(description, text=_checked(clip.text, str(path)), tokenize=_hf_tokenize(path),
                           image=_checked(clip.encoder, str(path)), mean=mean, std=std)
        from maskkit.interop.hf import load_hf_vitmae

        return Subject(description, image=_checked(load_hf_vitmae(path).encoder, str(path)), mean=mean, std=std)
    from maskkit.interop.hf_bert import load_hf_bert

    return Subject(description, text=_checked(load_hf_bert(path), str(path)), tokenize=_hf_tokenize(path))


def _run_subject(path: Path) -> Subject:
    from maskkit.eval.run import method_from_checkpoint
    from maskkit.train.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(path)
    method, cfg = method_from_checkpoint(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else path
    description = f"maskkit {cfg.method} run {run}"
    text = method.text if cfg.method == "flip" else getattr(method, "backbone", None)
    image = None
    if isinstance(text, ViT):
        text, image = None, text
    elif cfg.method == "flip":
        image = method.encoder
    subject = Subject(description)
    if image is not None:
        subject.image, subject.mean, subject.std = _checked(image, str(path)), list(cfg.data.mean), list(cfg.data.std)
    if text is not None:
        subject.text = _checked(text, str(path))
        tokenizer_file = run / "tokenizer.json"
        if cfg.data.kind == "pairs":
            # The vocabulary pinned in the run; a flip run from before pairs pinned theirs learns it again, as eval does.
            from maskkit.data.pairs import pair_tokenizer
            from maskkit.data.text import run_vocabulary

            tokenizer = pair_tokenizer(run_vocabulary(cfg.data, run))
        elif tokenizer_file.is_file():
            tokenizer = Tokenizer.from_file(tokenizer_file, subject.text.cfg.context_length)
        else:
            raise MaskkitError(f"{path}: its tokenizer.json ({tokenizer_file}) is missing")
        subject.tokenize = _maskkit_tokenize(tokenizer)
    return subject


def _checked(model, source: str) -> TextTransformer | ViT:
    """The Transformer inside `model` (an MLM's or classifier's encoder), if its blocks have a decomposition."""
    if not isinstance(model, (TextTransformer, ViT)):
        model = getattr(model, "encoder", None) or getattr(model, "backbone", None) or model
    if not isinstance(model, (TextTransformer, ViT)) or not all(type(b) is Block for b in model.blocks):
        raise MaskkitError(f"{source}: a {type(model).__name__} has no decomposition; maskkit analyze reads "
                           "Transformers built of standard attention + feed-forward blocks (BERT, CLIP, ViT-MAE, and "
                           "maskkit's mae, moco, densecl, energy, flip, mlm, pmlm and tinybert runs)")
    return model.eval()


def _maskkit_tokenize(tokenizer: Tokenizer):
    special = tokenizer.special_ids()

    def tokenize(texts: list[str], context_length: int):
        pieces = tokenizer.encode_plain(texts)
        return (_within([[special.cls, *p, special.sep] for p in pieces], tokenizer.backend.id_to_token, context_length),
                {special.cls, special.sep})
    return tokenize


def _hf_tokenize(path: Path):
    """The directory's own tokenizer through transformers (BERT's [CLS] ... [SEP], CLIP's start and end tokens),
    loaded when texts come (a CLIP directory read for its images needs none)."""

    def tokenize(texts: list[str], context_length: int):
        from maskkit.interop.hf import quiet_transformers

        tokenizer = load_hf_tokenizer(path)
        with quiet_transformers():
            ids = [tokenizer(text)["input_ids"] for text in texts]
        return _within(ids, tokenizer.convert_ids_to_tokens, context_length), set(tokenizer.all_special_ids)
    return tokenize


def _within(sequences: list[list[int]], token_of, context_length: int):
    """(ids, tokens) of each text; a text longer than the model's positions is refused, not cut."""
    out = []
    for number, ids in enumerate(sequences):
        if len(ids) > context_length:
            raise MaskkitError(f"text {number + 1} is {len(ids)} tokens long, more than the model's {context_length} "
                               "positions; shorten it (analyze does not cut texts)")
        out.append((torch.tensor(ids), [token_of(i) for i in ids]))
    return out


def read_texts(texts: list[str] | None, text_file: str | None) -> list[str]:
    """The --text values, or the non-empty lines of --text-file (UTF-8; another encoding is refused, not guessed)."""
    out = [t for t in (texts or []) if t.strip()]
    if text_file:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise MaskkitError(f"--text-file {path}: no such file")
        try:
            content = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise MaskkitError(f"--text-file {path} is not UTF-8 (byte {error.start}); save it as UTF-8") from None
        out += [line.strip() for line in content.splitlines() if line.strip()]
        if not out:
            raise MaskkitError(f"--text-file {path} holds no text (one text per line)")
    return out


def image_files(paths: list[str] | None) -> list[Path]:
    """--image values: image files, or folders whose image files (sorted) are all taken."""
    files = []
    for value in paths or []:
        path = Path(value).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise MaskkitError(f"--image {path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MaskkitError(f"--image {path}: no such file or folder")
    return files


def read_images(files: list[Path], model: ViT, mean: list[float], std: list[float]) -> list[torch.Tensor]:
    """Each file as the model's normalised (C, S, S) input: shorter side to S, centre crop; an unreadable file is
    refused naming it."""
    channels, size = model.cfg.in_channels, model.cfg.image_size
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    if len(mean) != channels or len(std) != channels:
        raise MaskkitError(f"the model reads {channels}-channel images but its normalisation has {len(mean)} means "
                           f"and {len(std)} standard deviations")
    images = []
    for path in files:
        image = ImageFolder.load(path, size, channels)
        if isinstance(image, Unreadable):
            raise MaskkitError(f"--image {path}: not a readable image ({image.reason})")
        images.append((image - mean_t) / std_t)
    return images


def image_tokens(model: ViT) -> list[str]:
    """[CLS] (when the model has one), then each patch by its grid position, row by row."""
    grid = model.grid_size
    patches = [f"p{row},{column}" for row in range(grid) for column in range(grid)]
    return (["[CLS]"] if model.cls_token is not None else []) + patches


def analyze(source: str, texts: list[str] | None, out_dir: str | Path, save_vectors: bool = False, chunk: int = 16,
            dtype: torch.dtype = torch.float32, progress: bool = True, heatmaps: int = HEATMAP_TEXTS,
            images: list[str | Path] | None = None) -> dict:
    """Decompose every layer of `source` on each text (or each image) and write DIR (see the module docstring), with
    heatmaps of the first `heatmaps` inputs; returns the summary."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MaskkitError(f"{out_dir} exists and is not empty; analyze into a new --out")
    if bool(texts) == bool(images):
        raise MaskkitError("give texts (--text \"...\" or --text-file FILE) or images (--image FILE_OR_FOLDER), "
                           "one of the two")
    subject = load_subject(source)
    model = subject.image if images else subject.text
    if model is None:
        reads = "images: give --image FILE_OR_FOLDER" if subject.image is not None else "texts: give --text or --text-file"
        raise MaskkitError(f"{source} ({subject.description}) reads {reads}")
    model = model.to(dtype)
    if images:
        files = image_files(images)
        pixels = read_images(files, model, subject.mean, subject.std)
        names = image_tokens(model)
        keep = [i for i, name in enumerate(names) if name != "[CLS]"]
        encoded = [(None, names) for _ in files]
        inputs = ((image_inputs(model, image.to(dtype)), None, keep) for image in pixels)
    else:
        encoded, special = subject.tokenize(texts, model.cfg.context_length)
        inputs = ((*text_inputs(model, ids), [i for i, t in enumerate(ids.tolist()) if t not in special])
                  for ids, _ in encoded)
    changes = POST_NORM_CHANGES if model.blocks[0].post_norm else PRE_NORM_CHANGES
    stages = stages_of(model.blocks[0])
    maps, vectors, per_text, pairs = {}, {}, [], []
    started = time.perf_counter()
    from tqdm import tqdm

    for number, (x, allowed, keep) in enumerate(tqdm(inputs, total=len(encoded), desc="analyze",
                                                    disable=not progress, leave=False)):
        tokens = encoded[number][1]
        layers = decompose_layers(model.blocks, x, allowed, chunk)
        record = {"tokens": tokens, "mixing_ratio": [], "contextualization_change": []}
        if images:
            record["image"] = str(files[number])
        for index, layer in enumerate(layers):
            layer_maps = {stage: token_map(parts) for stage, parts in layer.stages.items()}
            record["mixing_ratio"].append({s: mixing_ratio(layer.stages[s]) for s in stages})
            record["contextualization_change"].append(
                {name: contextualization_change(layer_maps[a], layer_maps[b]) for name, (a, b) in changes.items()})
            for stage in stages:
                maps[f"t{number}.layer{index}.{stage}"] = layer_maps[stage].float().contiguous()
                if save_vectors:
                    vectors[f"t{number}.layer{index}.{stage}"] = layer.stages[stage].float().contiguous()
            if len(keep) > 1:
                chosen = torch.tensor(keep)
                before, after = layer_maps["norm"], layer_maps["ffn"]
                for pair in amplified_pairs(_rows(before, chosen), _rows(after, chosen), [tokens[i] for i in keep], 5):
                    pairs.append({"text": number, "layer": index, **pair,
                                  "target": keep[pair["target"]], "source": keep[pair["source"]]})
        per_text.append(record)
    seconds = (time.perf_counter() - started) / len(encoded)
    summary = {"model": subject.description, "input": "images" if images else "texts",
               "post_norm": model.blocks[0].post_norm, "stages": list(stages),
               "changes": {name: list(pair) for name, pair in changes.items()}, "num_texts": len(encoded),
               "mixing_ratio": _mean_over_texts(per_text, "mixing_ratio"),
               "contextualization_change": _mean_over_texts(per_text, "contextualization_change"),
               "ffn_amplified_pairs": sorted(pairs, key=lambda p: -p["factor"])[:20],
               "seconds_per_text": round(seconds, 4), "dtype": str(dtype).removeprefix("torch."), "texts": per_text}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-analyze")
    with writing(out_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "heatmaps").mkdir(parents=True)
        save_file(maps, tmp / "maps.safetensors")
        if save_vectors:
            save_file(vectors, tmp / "contributions.safetensors")
            atomic_write_text(tmp / "tokens.json", json.dumps([t for _, t in encoded], ensure_ascii=False))
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
        plot_lines(summary["mixing_ratio"], "mixing ratio (context / (context + self))", tmp / "mixing_ratio.png")
        plot_lines(summary["contextualization_change"], "contextualization change (1 - Spearman rho)",
                   tmp / "contextualization_change.png")
        for number in range(min(heatmaps, len(encoded))):
            plot_heatmaps(maps, number, encoded[number][1], len(model.blocks), stages,
                          tmp / "heatmaps" / f"text{number}.png")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    return summary


def _rows(token_map_: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The map restricted to the chosen targets and sources, the bias column kept last."""
    return torch.cat([token_map_[chosen][:, chosen], token_map_[chosen][:, -1:]], dim=1)


def _mean_over_texts(per_text: list[dict], key: str) -> list[dict]:
    """Per layer, each name's mean over the texts (NaN entries, single-token texts, left out)."""
    layers = len(per_text[0][key])
    out = []
    for index in range(layers):
        names = per_text[0][key][index]
        means = {}
        for name in names:
            values = [t[key][index][name] for t in per_text if not math.isnan(t[key][index][name])]
            means[name] = sum(values) / len(values) if values else math.nan
        out.append(means)
    return out


def plot_lines(per_layer: list[dict], ylabel: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    layers = range(1, len(per_layer) + 1)
    for name in per_layer[0]:
        ax.plot(layers, [row[name] for row in per_layer], marker="o", markersize=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks(list(layers))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(maps: dict, number: int, tokens: list[str], depth: int, stages, path: Path) -> None:
    """A grid, layers down and stages across, of one text's token-to-token maps (rows: targets, columns: sources,
    the bias left out), each row normalised to sum 1 so that the stages compare."""
    plt = pyplot()
    size = 1.2 + 0.09 * len(tokens)
    fig, axes = plt.subplots(depth, len(stages), figsize=(size * len(stages), size * depth), squeeze=False)
    labelled = len(tokens) <= 40
    for layer in range(depth):
        for column, stage in enumerate(stages):
            values = maps[f"t{number}.layer{layer}.{stage}"][:, :-1]
            values = values / values.sum(1, keepdim=True).clamp_min(1e-30)
            ax = axes[layer][column]
            ax.imshow(values.numpy(), cmap="viridis")
            ax.set_xticks(range(len(tokens)) if labelled else [], tokens if labelled else [], rotation=90, fontsize=4)
            ax.set_yticks(range(len(tokens)) if labelled else [], tokens if labelled else [], fontsize=4)
            if layer == 0:
                ax.set_title(stage, fontsize=7)
            if column == 0:
                ax.set_ylabel(f"layer {layer + 1}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
