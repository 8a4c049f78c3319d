"""Image-text pairs that need no download: a generated shapes world and captioned digits, plus the user's
own pairs as a CSV/TSV of (image path, caption), as open_clip reads them.

`shapes` (generated in `shapes.py`): 32-64 px images of 1-3 coloured shapes of several kinds, sizes and
positions, each with a compositional caption ("a small red circle left of a large blue square") and a per-pixel segmentation
mask (class = shape kind; DenseCL's dense probe uses it). Some (colour, kind) combinations never occur in
training: the held-out split shows them alone, so zero-shot accuracy on it measures composition.

Every item is a dict: "images" (C, H, W) in [0, 1], "text" (the caption), "label" (class of the first
shape or digit), "mask" (H, W) long for shapes; `collate_pairs` tokenises the captions (in the loader's
workers) into "ids" and "attention_mask".
"""

import csv
import io
import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from maskkit.data.common import (
    Indexed,
    Unreadable,
    check_crop_scale,
    check_normalisation,
    collate,
    decode_text,
    read_text,
    report_unreadable,
    take_split,
)
from maskkit.data.images import Digits, ImageFolder
from maskkit.data.shapes import COLOURS, BiasedShapes, ShapesWorld, caption
from maskkit.data.tokenizer import Tokenizer, build_tokenizer
from maskkit.errors import MaskkitError, require, require_float, require_int

log = logging.getLogger("maskkit")

PAIR_SETS = ("shapes", "biased-shapes", "digits", "csv", "shards")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class PairDataConfig:
    kind: str = "pairs"               # image-text pairs (the image section is kind: image)
    name: str = "shapes"              # shapes | biased-shapes | digits | csv | shards
    path: str = ""                    # csv: a .csv or .tsv file of (image path, caption); shards: a folder or glob of .tar
    image_column: str = "filepath"    # csv column names (open_clip's defaults)
    caption_column: str = "title"
    image_size: int = 32
    in_channels: int = 3
    num_samples: int = 4096           # shapes: size of the training world (the held-out split adds a quarter)
    spurious_correlation: float = 0.95  # biased-shapes: P(background = the class's usual one) in training
    background_mention: float = 0.5   # biased-shapes: P(a training caption names the background)
    other_kinds: float = 0.5          # biased-shapes: the fraction of training images of other kinds, on either
    world_seed: int = 0               # biased-shapes: which world (every split's images and captions)
    eval_split: float = 0.25          # held-out fraction (digits, csv)
    tokenizer: str = "captions"       # captions (WordPiece learnt from the training captions) | minilm | PATH
    vocab_size: int = 256             # for tokenizer=captions: the largest vocabulary it may learn
    context_length: int = 24
    num_workers: int = 0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    hflip: bool = False               # off: a mirrored "circle left of a square" contradicts its caption


def check_pair_data(d: PairDataConfig, source: str) -> None:
    require(d.name in PAIR_SETS, source, "data.name", d.name, f"one of {', '.join(PAIR_SETS)} for data.kind=pairs")
    require(d.name not in ("csv", "shards") or bool(d.path), source, "data.path", d.path,
            "a .csv/.tsv file (data.name=csv) or a folder or glob of .tar shards (data.name=shards)")
    require_int(source, "data.image_size", d.image_size, 8, 4096)
    require(d.in_channels in (1, 3), source, "data.in_channels", d.in_channels, "1 (grey) or 3 (RGB)")
    require_int(source, "data.num_samples", d.num_samples, 4)
    require_float(source, "data.spurious_correlation", d.spurious_correlation, 0.0, 1.0)
    require_float(source, "data.background_mention", d.background_mention, 0.0, 1.0)
    require_float(source, "data.other_kinds", d.other_kinds, 0.0, 1.0, high_open=True)
    require_int(source, "data.world_seed", d.world_seed, 0, 2**31 - 1)
    require_float(source, "data.eval_split", d.eval_split, 0.0, 1.0, low_open=True, high_open=True)
    require_int(source, "data.vocab_size", d.vocab_size, len(COLOURS) + 8, 1_000_000)
    require_int(source, "data.context_length", d.context_length, 3, 4096)
    require_int(source, "data.num_workers", d.num_workers, 0, 256)
    check_normalisation(d, source)
    check_crop_scale(source, "data.crop_scale", d.crop_scale)


class CaptionedDigits(Dataset):
    """sklearn's digits with captions ("a handwritten digit seven", ...), on the Digits split."""

    TEMPLATES = ("a handwritten digit {}", "the number {}", "a photo of the digit {}", "a written {}")

    def __init__(self, split: str, image_size: int, channels: int, eval_split: float):
        self.digits = Digits(split, image_size, channels, eval_split)

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> dict:
        item = self.digits[i]
        label = int(item["label"])
        return {**item, "text": self.TEMPLATES[i % len(self.TEMPLATES)].format(DIGIT_NAMES[label])}


class CaptionFile(Dataset):
    """A CSV or TSV file of (image path, caption); paths relative to the file's folder.

    The whole file is decoded first (`decode_text`: UTF-8 with or without a byte-order mark, UTF-16 with one)
    and parsed as one text, so a quoted caption keeps its line breaks and CRLF row ends are understood. The
    parser is strict: a quote left open fails naming its line instead of swallowing the rows after it.
    """

    def __init__(self, cfg: PairDataConfig, split: str):
        from pathlib import Path

        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise MaskkitError(f"data.path: {path} does not exist")
        text = read_text(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        first_line = text.split("\n", 1)[0].rstrip("\r")
        if delimiter == "," and ";" in first_line:
            # Excel saves "CSV" with semicolons where the decimal separator is a comma (most of Europe).
            fields = next(csv.reader([first_line], delimiter=";"))
            if cfg.image_column in fields and cfg.caption_column in fields:
                delimiter = ";"
        other = "," if delimiter == "\t" else "\t"
        rows = self.parse(path, text, delimiter)
        columns = rows[0][1] if rows else []
        if cfg.image_column not in columns or cfg.caption_column not in columns:
            hint = ""
            if other in first_line and len(next(csv.reader([first_line], delimiter=other))) > len(columns):
                hint = f"; it looks {'tab' if other == chr(9) else 'comma'}-separated, rename it to .{'tsv' if other == chr(9) else 'csv'}"
            raise MaskkitError(
                f"{path}: needs the columns data.image_column={cfg.image_column!r} and data.caption_column="
                f"{cfg.caption_column!r}; found {columns}{hint}"
            )
        image_at, caption_at = columns.index(cfg.image_column), columns.index(cfg.caption_column)
        pairs, empty, missing, long_rows = [], 0, 0, []
        for line, row in rows[1:]:
            if not row:                                      # a blank line
                continue
            if len(row) > len(columns):
                long_rows.append(line)
                continue
            caption_text = row[caption_at].strip() if caption_at < len(row) else ""
            image_path = path.parent / (row[image_at] if image_at < len(row) else "")
            if not caption_text:
                empty += 1
            elif not image_path.is_file():
                missing += 1
                report_unreadable(str(image_path), "missing")
            else:
                pairs.append((image_path, caption_text))
        if empty or missing:
            log.warning("%s: skipped %d rows with an empty caption and %d with a missing image", path, empty, missing)
        if long_rows:
            separator = {"\t": "tab", ",": "comma", ";": "semicolon"}[delimiter]
            log.warning("%s: skipped %d rows with more fields than the header's %d (the first at line %d): an "
                        "unquoted %s inside a caption? quote the caption", path, len(long_rows), len(columns),
                        long_rows[0], separator)
        if not pairs:
            raise MaskkitError(f"{path}: no usable (image, caption) rows ({empty} empty captions, {missing} missing images"
                               f", {len(long_rows)} with too many fields)")
        self.pairs = take_split(pairs, cfg.eval_split, split)
        if not self.pairs:
            raise MaskkitError(f"{path}: the {split!r} split is empty (data.eval_split={cfg.eval_split})")
        self.image_size, self.channels = cfg.image_size, cfg.in_channels

    @staticmethod
    def parse(path, text: str, delimiter: str) -> list[tuple[int, list[str]]]:
        """(line where the row starts, its fields) for every row of the decoded file."""
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        rows, line = [], 1
        try:
            for row in reader:
                rows.append((line, row))
                line = reader.line_num + 1
        except csv.Error as error:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise MaskkitError(f"{path}: not a valid {kind} file at line {line} ({error}): a field that opens a quote "
                               'must close it, and a quote inside a quoted field is written twice ("")') from None
        return rows

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict | Unreadable:
        image_path, caption_text = self.pairs[i]
        item = ImageFolder.load(image_path, self.image_size, self.channels)
        return item if isinstance(item, Unreadable) else {"images": item, "text": caption_text, "label": torch.tensor(-1)}


class Shards(Dataset):
    """WebDataset-format tar shards: each sample is the files sharing a key ("000123.jpg" + "000123.txt").

    Read with Python's `tarfile`, as a map-style set: the members of every shard are indexed once (tar
    headers only), so `StepSampler` gives shards the same exact resume and rank invariance as any other
    set, with per-sample seeds from the sample's position. The first shard is checked before the others
    are read: shards whose samples carry no caption, or captions that are not text by `decode_text`'s rule,
    fail within seconds. Samples without an image or a caption are counted and skipped; an image or a later
    shard's caption that does not decode is reported and skipped by `collate`.
    """

    IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
    CAPTION_EXTENSIONS = ("txt", "caption", "cap")

    def __init__(self, cfg: "PairDataConfig", split: str):
        import glob
        import tarfile
        from pathlib import Path

        root = Path(cfg.path).expanduser()
        files = sorted(root.glob("*.tar")) if root.is_dir() else sorted(Path(p) for p in glob.glob(str(root)))
        if not files:
            raise MaskkitError(f"data.path: no .tar shards at {root} (a folder of shards, or a glob like shards/*.tar)")
        samples, without_caption, without_image = [], 0, 0
        for number, shard in enumerate(files):
            try:
                with tarfile.open(shard) as archive:
                    members = [m for m in archive.getmembers() if m.isfile()]
            except (tarfile.TarError, OSError) as error:
                raise MaskkitError(f"{shard}: not a readable tar shard ({error})") from None
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in members:
                directory, _, base = member.name.rpartition("/")
                key, _, extension = base.partition(".")
                groups.setdefault(f"{directory}/{key}", {})[extension.lower()] = member
            found = 0
            for key, parts in groups.items():
                image = next((parts[e] for e in self.IMAGE_EXTENSIONS if e in parts), None)
                text = next((parts[e] for e in self.CAPTION_EXTENSIONS if e in parts), None)
                if text is None:
                    without_caption += 1
                elif image is None:
                    without_image += 1
                else:
                    samples.append((str(shard), image.name, text.name, key))
                    found += 1
            if number == 0 and found == 0 and groups:
                extensions = sorted({e for parts in groups.values() for e in parts})
                raise MaskkitError(
                    f"{shard}: none of its {len(groups)} samples has both an image and a caption (found files "
                    f".{', .'.join(extensions)}; captions are read from .txt, .caption or .cap)"
                )
        if without_caption or without_image:
            log.warning("%s: skipped %d samples without a caption and %d without an image", root, without_caption,
                        without_image)
        if not samples:
            raise MaskkitError(f"data.path: the shards at {root} hold no (image, caption) samples")
        self._open: dict[str, object] = {}
        self._pid = None
        for sample in samples:
            if sample[0] != str(files[0]):
                break
            self.read_caption(sample)                       # raises on the first caption that is not text
        self.samples = take_split(samples, cfg.eval_split, split)
        if not self.samples:
            raise MaskkitError(f"data.path: the {split!r} split of the shards is empty (data.eval_split={cfg.eval_split})")
        self.image_size, self.channels = cfg.image_size, cfg.in_channels

    def __len__(self) -> int:
        return len(self.samples)

    def _archive(self, shard: str):
        import os
        import tarfile

        if self._pid != os.getpid():          # a loader worker: never share another process's file handles
            self._open, self._pid = {}, os.getpid()
        if shard not in self._open:
            self._open[shard] = tarfile.open(shard)
        return self._open[shard]

    def __getitem__(self, i: int) -> dict | Unreadable:
        import io

        shard, image_name, _, _ = self.samples[i]
        data = self._archive(shard).extractfile(image_name).read()
        image = ImageFolder.load(io.BytesIO(data), self.image_size, self.channels)
        if isinstance(image, Unreadable):
            return Unreadable(f"{shard}:{image_name}", image.reason)
        text = self.caption(i)
        return text if isinstance(text, Unreadable) else {"images": image, "text": text, "label": torch.tensor(-1)}

    def read_caption(self, sample: tuple[str, str, str, str]) -> str:
        shard, _, text_name, _ = sample
        return decode_text(self._archive(shard).extractfile(text_name).read(), f"{shard}:{text_name}").strip()

    def caption(self, i: int) -> str | Unreadable:
        """Sample i's caption, or Unreadable naming its member when it is not text."""
        try:
            return self.read_caption(self.samples[i])
        except MaskkitError as error:
            where = f"{self.samples[i][0]}:{self.samples[i][2]}"
            return Unreadable(where, str(error).removeprefix(f"{where}: "))


def build_pair_dataset(cfg: PairDataConfig, split: str = "train") -> Dataset:
    if cfg.name == "shapes":
        return Indexed(ShapesWorld(split, cfg.num_samples, cfg.image_size, cfg.in_channels))
    if cfg.name == "biased-shapes":
        return Indexed(BiasedShapes(split, cfg.num_samples, cfg.image_size, cfg.in_channels, cfg.world_seed,
                                    correlation=cfg.spurious_correlation, mention=cfg.background_mention,
                                    other=cfg.other_kinds))
    if cfg.name == "digits":
        return Indexed(CaptionedDigits(split, cfg.image_size, cfg.in_channels, cfg.eval_split))
    if cfg.name == "shards":
        return Indexed(Shards(cfg, split))
    return Indexed(CaptionFile(cfg, split))


def captions_of(dataset: Dataset) -> list[str]:
    """Every caption of a pair data set (to learn a vocabulary from, and to count truncations)."""
    inner = dataset.dataset if isinstance(dataset, Indexed) else dataset
    if isinstance(inner, CaptionFile):
        return [text for _, text in inner.pairs]
    if isinstance(inner, Shards):
        captions = [inner.caption(i) for i in range(len(inner))]
        for text in captions:
            if isinstance(text, Unreadable):
                report_unreadable(text.path, text.reason)      # skipped in training too: named here, once
        return [text for text in captions if isinstance(text, str)]
    if isinstance(inner, BiasedShapes):
        return [inner.caption(i) for i in range(len(inner))]
    if isinstance(inner, CaptionedDigits):
        return [CaptionedDigits.TEMPLATES[i % 4].format(DIGIT_NAMES[int(y)]) for i, y in enumerate(inner.digits.labels)]
    return [caption(inner.scene(i), [0.5] * 3) for i in range(len(inner))] + [
        caption(inner.scene(i), [0.0] * 3) for i in range(min(len(inner), 256))]


def pair_tokenizer(cfg: PairDataConfig, train_captions: list[str] | None = None) -> Tokenizer:
    """The run's tokenizer; for tokenizer=captions it is learnt from the training split's captions
    (`train_captions` when the caller has them already, else read from the training split)."""
    if cfg.tokenizer == "captions" and train_captions is None:
        train_captions = captions_of(build_pair_dataset(cfg, "train"))
    return build_tokenizer(cfg.tokenizer, cfg.context_length, cfg.vocab_size, train_captions or [])


class PairCollate:
    """Stacks images (and masks), tokenises captions into ids and attention_mask: runs in loader workers."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> dict:
        texts = [item.pop("text") for item in items if isinstance(item, dict)]
        batch = collate(items)
        if texts:
            batch["ids"], batch["attention_mask"] = self.tokenizer.encode(texts)
            batch["text"] = texts              # the captions themselves, for evaluation and figures
        return batch


def count_truncated(tokenizer: Tokenizer, captions: list[str]) -> int:
    before = tokenizer.truncated
    for start in range(0, len(captions), 1024):
        tokenizer.encode(captions[start : start + 1024])
    count, tokenizer.truncated = tokenizer.truncated - before, before
    return count
