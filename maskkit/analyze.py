"""`maskkit analyze MODEL (--text "..." | --text-file F) --out DIR`: whole-layer contextualization analysis
(Kobayashi et al. 2021, 2024; the method is maskkit/analysis/contextualization.py) of a text model.

MODEL is `minilm` (the bundled all-MiniLM-L6-v2), a Hugging Face BERT directory, or a maskkit run of a text
method (mlm, pmlm, tinybert, flip's text tower). DIR receives

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
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskkit.analysis.contextualization import (
    amplified_pairs,
    contextualization_change,
    decompose_layers,
    mixing_ratio,
    stages_of,
    text_inputs,
    token_map,
)
from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.files import atomic_write_text, pyplot, writing
from maskkit.nn.transformer import Block, TextTransformer

# The component each contextualization change measures: (the map before it, the map after it), per block type.
POST_NORM_CHANGES = {"residual": ("attention", "residual"), "norm": ("residual", "norm"), "ffn": ("norm", "ffn"),
                     "ffn_residual": ("ffn", "ffn_residual"), "ffn_norm": ("ffn_residual", "ffn_norm"),
                     "feed-forward block": ("norm", "ffn_norm")}
PRE_NORM_CHANGES = {"residual": ("attention", "residual"), "ffn": ("norm", "ffn"),
                    "ffn_residual": ("ffn", "ffn_residual"), "feed-forward block": ("residual", "ffn_residual")}
HEATMAP_TEXTS = 5            # heatmaps are drawn for the first texts only


def load_text_model(source: str) -> tuple[TextTransformer, Path, str]:
    """(the encoder, its tokenizer.json, what it is) from minilm, a Hugging Face BERT directory or a maskkit run."""
    if source == "minilm":
        from maskkit.interop.hf_bert import load_hf_bert, minilm_dir

        return _encoder(load_hf_bert(minilm_dir()), source), minilm_tokenizer_file(), "all-MiniLM-L6-v2 (bundled)"
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        from maskkit.interop.hf_bert import load_hf_bert

        return _encoder(load_hf_bert(path), source), path / "tokenizer.json", f"Hugging Face model {path}"
    if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        from maskkit.eval.run import method_from_checkpoint
        from maskkit.train.checkpoint import find_checkpoint

        checkpoint = find_checkpoint(path)
        method, cfg = method_from_checkpoint(checkpoint)
        run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else path
        model = method.text if cfg.method == "flip" else getattr(method, "backbone", None)
        return _encoder(model, source), run / "tokenizer.json", f"maskkit {cfg.method} run {run}"
    raise MaskkitError(f"{source}: not a model (minilm, a Hugging Face directory with config.json, or a maskkit run "
                       "with checkpoints/)")


def _encoder(model, source: str) -> TextTransformer:
    model = getattr(model, "encoder", None) or getattr(model, "backbone", None) or model   # MLM, classifier
    if not isinstance(model, TextTransformer) or not all(type(b) is Block for b in model.blocks):
        raise MaskkitError(f"{source}: a {type(model).__name__} has no decomposition; maskkit analyze reads text "
                           "Transformers built of standard attention + feed-forward blocks (BERT, mlm, pmlm, tinybert, "
                           "flip's text tower)")
    return model.eval()


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
    if not out:
        raise MaskkitError("give a text: --text \"...\" or --text-file FILE (one text per line)")
    return out


def tokenize(tokenizer: Tokenizer, texts: list[str], context_length: int) -> list[tuple[torch.Tensor, list[str]]]:
    """[CLS] text [SEP] ids and tokens of each text; a text longer than the model's positions is refused."""
    special = tokenizer.special_ids()
    out = []
    for number, pieces in enumerate(tokenizer.encode_plain(texts)):
        ids = [special.cls, *pieces, special.sep]
        if len(ids) > context_length:
            raise MaskkitError(f"text {number + 1} is {len(ids)} tokens long, more than the model's {context_length} "
                               "positions; shorten it (analyze does not cut texts)")
        out.append((torch.tensor(ids), [tokenizer.backend.id_to_token(i) for i in ids]))
    return out


def analyze(source: str, texts: list[str], out_dir: str | Path, save_vectors: bool = False, chunk: int = 16,
            dtype: torch.dtype = torch.float32, progress: bool = True, heatmaps: int = HEATMAP_TEXTS) -> dict:
    """Decompose every layer of `source` on each text and write DIR (see the module docstring), with heatmaps of the
    first `heatmaps` texts; returns the summary."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MaskkitError(f"{out_dir} exists and is not empty; analyze into a new --out")
    model, tokenizer_file, description = load_text_model(source)
    if not Path(tokenizer_file).is_file():
        raise MaskkitError(f"{source}: its tokenizer.json ({tokenizer_file}) is missing")
    model = model.to(dtype)
    tokenizer = Tokenizer.from_file(tokenizer_file, model.cfg.context_length)
    encoded = tokenize(tokenizer, texts, model.cfg.context_length)
    changes = POST_NORM_CHANGES if model.cfg.post_norm else PRE_NORM_CHANGES
    stages = stages_of(model.blocks[0])
    special = {tokenizer.special_ids().cls, tokenizer.special_ids().sep}      # left out of the amplified pairs
    maps, vectors, per_text, pairs = {}, {}, [], []
    started = time.perf_counter()
    from tqdm import tqdm

    for number, (ids, tokens) in enumerate(tqdm(encoded, desc="analyze", disable=not progress, leave=False)):
        x, allowed = text_inputs(model, ids)
        layers = decompose_layers(model.blocks, x, allowed, chunk)
        record = {"tokens": tokens, "mixing_ratio": [], "contextualization_change": []}
        for index, layer in enumerate(layers):
            layer_maps = {stage: token_map(parts) for stage, parts in layer.stages.items()}
            record["mixing_ratio"].append({s: mixing_ratio(layer.stages[s]) for s in stages})
            record["contextualization_change"].append(
                {name: contextualization_change(layer_maps[a], layer_maps[b]) for name, (a, b) in changes.items()})
            for stage in stages:
                maps[f"t{number}.layer{index}.{stage}"] = layer_maps[stage].float().contiguous()
                if save_vectors:
                    vectors[f"t{number}.layer{index}.{stage}"] = layer.stages[stage].float().contiguous()
            keep = [i for i, token in enumerate(ids.tolist()) if token not in special]
            if len(keep) > 1:
                chosen = torch.tensor(keep)
                before, after = layer_maps["norm"], layer_maps["ffn"]
                for pair in amplified_pairs(_rows(before, chosen), _rows(after, chosen), [tokens[i] for i in keep], 5):
                    pairs.append({"text": number, "layer": index, **pair,
                                  "target": keep[pair["target"]], "source": keep[pair["source"]]})
        per_text.append(record)
    seconds = (time.perf_counter() - started) / len(encoded)
    summary = {"model": description, "post_norm": model.cfg.post_norm, "stages": list(stages),
               "changes": {name: list(pair) for name, pair in changes.items()}, "num_texts": len(texts),
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
