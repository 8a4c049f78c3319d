"""The data layer's one entry point: `build_data(cfg.data, split)` -> what the loop needs, whatever the modality.

The training loop and the evaluation protocols call only these three things, so a text or image-text
data set slots in without touching them:

    data.dataset   items are dicts (or `Unreadable`), asked for by index or by (index, epoch)
    data.collate   a list of items -> a batch dict on the host ("unreadable" lists dropped files)
    data.prepare   (batch, per-sample keys, device) -> the model's input on the device: moved,
                   augmented (images) or tokenised (text), with the keys as batch["seed"]
"""

import dataclasses
import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from maskkit.data.common import collate
from maskkit.data.images import build_image_dataset, class_folders
from maskkit.errors import MaskkitError

log = logging.getLogger("maskkit")


@dataclass
class Data:
    dataset: Dataset
    collate: Callable[[list], dict]
    prepare: Callable[[dict, torch.Tensor, torch.device], dict]
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None     # [0, 1] pixels -> model input (no augmentation)
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None   # model input -> displayable pixels
    tokenizer: object | None = None    # text and pair data: the Tokenizer that collate uses
    mean: list[float] | None = None    # image data: the per-channel normalisation (pixels = x * std + mean)
    std: list[float] | None = None
    label_names: list[str] | None = None   # labelled text documents (data.examples=documents): class index -> name


def build_data(cfg, split: str = "train") -> Data:
    """cfg: a DataConfig (kind image), PairDataConfig (pairs) or TextDataConfig (text); split: "train", "test"
    (held out) or "all" ("val" too for text)."""
    from maskkit.data.augment import ImageAugment

    if cfg.kind == "text":
        from maskkit.data.text import build_document_dataset, build_text_dataset, collate_blocks, prepare_text

        if cfg.examples == "documents":
            dataset, tokenizer, names = build_document_dataset(cfg, split)
            return Data(dataset, collate, prepare_text, tokenizer=tokenizer, label_names=names)
        dataset, tokenizer, _ = build_text_dataset(cfg, split)
        return Data(dataset, collate_blocks, prepare_text, tokenizer=tokenizer)

    augment = ImageAugment(cfg)
    if cfg.kind == "pairs":
        from maskkit.data.pairs import PairCollate, build_pair_dataset, captions_of, count_truncated, pair_tokenizer

        dataset = build_pair_dataset(cfg, split)
        captions = captions_of(dataset)
        tokenizer = pair_tokenizer(cfg, captions if split == "train" else None)   # the train split's: read once
        truncated = count_truncated(tokenizer, captions)
        if truncated:
            log.warning("%d of the %d captions are longer than data.context_length=%d tokens and are truncated",
                        truncated, len(dataset), cfg.context_length)
        return Data(dataset, PairCollate(tokenizer), augment.prepare, augment.normalize, augment.denormalize, tokenizer,
                    list(cfg.mean), list(cfg.std))
    return Data(build_image_dataset(cfg, split), collate, augment.prepare, augment.normalize, augment.denormalize,
                None, list(cfg.mean), list(cfg.std))


def build_held_out(cfg) -> Data:
    """Data held out from training, to validate on during training: text's "val" split (its "test" is left
    to the protocols), the test split of images and pairs. Members of data.name whose "test" split is their
    training data (photos: the same crops in every split; a folder without class sub-folders: all of it
    trains) are left out (photos+digits validates on the held-out digits); with none left, one line says so."""
    if cfg.kind == "text":
        return build_data(cfg, "val")
    names = cfg.name.split("+")
    if cfg.kind == "image":
        names = [name for name in names if name != "photos"]
        if "folder" in names and not _has_class_folders(cfg):
            names.remove("folder")
    if not names:
        raise MaskkitError(f"train.eval_every: data.name={cfg.name} holds nothing out of training (photos are the same "
                           "crops in every split; a folder without class sub-folders trains on all of it); validate "
                           "on digits, shapes or a folder with class sub-folders, or set train.eval_every=0")
    if names != cfg.name.split("+"):
        log.info("validating on the held-out %s only (the rest of data.name=%s has no held-out split)",
                 "+".join(names), cfg.name)
    return build_data(dataclasses.replace(cfg, name="+".join(names)), "test")


def _has_class_folders(cfg) -> bool:
    """Whether data.path is a labelled folder (one sub-folder per class), as `ImageFolder` reads it."""
    path = Path(cfg.path).expanduser()
    return path.is_dir() and bool(class_folders(path))


# What data.tokenizer may be for each data kind (a path to a tokenizer.json besides), for the messages.
TOKENIZERS = {"text": "wiki, minilm or a path to a tokenizer.json (e.g. one made by `maskkit tokenizer train`)",
              "pairs": "captions (learnt from the training captions), minilm or a path to a tokenizer.json"}


def check_sources(cfg, tokenizer: bool = True) -> None:
    """The files and folders `cfg` (a data config) names exist and are of the kind its reader expects, without
    reading any data: the checks `maskkit validate` shares with `train`, so both say the same thing.

    `tokenizer=False` leaves data.tokenizer out (a resumed text run reads the vocabulary pinned in its run).
    """
    kind = getattr(cfg, "kind", "image")
    path = Path(cfg.path).expanduser() if getattr(cfg, "path", "") else None
    names = cfg.name.split("+")
    if kind == "image" and "folder" in names:
        _require_folder(path, "data.name=folder reads a folder of images (class sub-folders give labels)")
    elif kind == "pairs" and cfg.name == "csv":
        _require_file(path, "data.name=csv reads one .csv or .tsv file")
    elif kind == "pairs" and cfg.name == "shards":
        if path is not None and not path.is_dir() and not glob.glob(str(path)):
            raise MaskkitError(f"data.path: {path} does not exist (data.name=shards reads a folder of .tar shards, "
                               "or a glob like shards/*.tar)")
    elif kind == "text" and cfg.name in ("txt", "jsonl"):
        if path is not None and not path.exists():
            raise MaskkitError(f"data.path: {path} does not exist (data.name={cfg.name} reads a file, or a folder "
                               "of .txt and .jsonl files)")
    elif kind == "text" and cfg.name == "hf":
        _require_folder(path, "data.name=hf reads a folder written by datasets' save_to_disk")
    if tokenizer and kind in TOKENIZERS:
        named = ("wiki", "minilm") if kind == "text" else ("captions", "minilm")
        if cfg.tokenizer not in named:
            if cfg.tokenizer in ("wiki", "minilm", "captions"):
                raise MaskkitError(f"data.tokenizer={cfg.tokenizer} is not for data.kind={kind}; use {TOKENIZERS[kind]}")
            found = Path(cfg.tokenizer).expanduser()
            if not found.is_file():
                what = "is a folder, not a tokenizer.json" if found.is_dir() else "does not exist"
                raise MaskkitError(f"data.tokenizer: {found} {what}; for data.kind={kind} use {TOKENIZERS[kind]}")


def _require_folder(path: Path | None, reads: str) -> None:
    if path is None:
        return                                   # the config check names the empty data.path
    if path.is_file():
        raise MaskkitError(f"data.path: {path} is a file, not a folder ({reads})")
    if not path.is_dir():
        raise MaskkitError(f"data.path: {path} does not exist ({reads})")


def _require_file(path: Path | None, reads: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise MaskkitError(f"data.path: {path} is a folder, not a file ({reads})")
    if not path.is_file():
        raise MaskkitError(f"data.path: {path} does not exist ({reads})")
