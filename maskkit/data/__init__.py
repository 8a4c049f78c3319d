"""The data layer's one entry point: `build_data(cfg.data, split)` -> what the loop needs, whatever the modality.

The training loop and the evaluation protocols call only these three things, so a text or image-text
data set slots in without touching them:

    data.dataset   items are dicts (or `Unreadable`), asked for by index or by (index, epoch)
    data.collate   a list of items -> a batch dict on the host ("unreadable" lists dropped files)
    data.prepare   (batch, per-sample keys, device) -> the model's input on the device: moved,
                   augmented (images) or tokenised (text), with the keys as batch["seed"]
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from maskkit.data.common import collate
from maskkit.data.images import build_image_dataset

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


def build_data(cfg, split: str = "train") -> Data:
    """cfg: a DataConfig (kind image), PairDataConfig (pairs) or TextDataConfig (text); split: "train", "test"
    (held out) or "all" ("val" too for text)."""
    from maskkit.data.augment import ImageAugment

    if cfg.kind == "text":
        from maskkit.data.text import build_text_dataset, collate_blocks, prepare_text

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

