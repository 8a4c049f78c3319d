"""What every data kind (images, pairs, text) shares: the per-sample index wrapper, unreadable items and
their report, the files a folder reader leaves out and their report, the decoding of text files, the fixed
held-out split, collation, and the checks of normalisation and crop settings.

It imports nothing of the data layer, so `images.py`, `pairs.py` and `text.py` depend on it and not on
one another for these.
"""

import codecs
import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from maskkit.errors import MaskkitError, require, require_float

log = logging.getLogger("maskkit")


class Unreadable(NamedTuple):
    """What a data set returns for a file it cannot decode; `collate` drops it and lists its path."""

    path: str
    reason: str


_REPORTED: set[str] = set()   # unreadable files already reported by this process: each is named once


def report_unreadable(path: str, reason: str) -> None:
    if path not in _REPORTED:
        _REPORTED.add(path)
        log.warning("skipping unreadable file %s: %s", path, reason)


def hidden(path: Path, root: Path) -> bool:
    """Whether `path` is, or lies in, a hidden entry of `root` (.DS_Store, macOS's ._name copies, .git): never data."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


_REPORTED_FOLDERS: set[str] = set()   # folders whose left-out files were already reported by this process


def report_skipped_files(root: Path, skipped: list[Path], wanted: str) -> None:
    """One warning per folder (however many sets are built from it) that counts the files a reader leaves out
    for their extension, and names the first few."""
    if not skipped or str(root) in _REPORTED_FOLDERS:
        return
    _REPORTED_FOLDERS.add(str(root))
    suffixes = ", ".join(sorted({p.suffix.lower() or "no extension" for p in skipped}))
    names = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    log.warning("%s: skipped %d files that are not %s (%s): %s%s", root, len(skipped), wanted, suffixes, names, more)


# Text files


def read_text(path: Path) -> str:
    """A text file's contents, decoded by `decode_text`; a file that cannot be read fails naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise MaskkitError(f"{path}: cannot be read ({error.strerror or error})") from None
    return decode_text(data, str(path))


def decode_text(data: bytes, where: str) -> str:
    """Text as people save it: UTF-8, with or without the byte-order mark Excel's "CSV UTF-8" and PowerShell write,
    or UTF-16 with a byte-order mark (Notepad's and Excel's "Unicode"). Anything else fails in one line naming
    `where`, the line and what the bytes look like: a guessed encoding would train on mojibake without a word.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")            # reads the mark for the byte order, and drops it
        except UnicodeDecodeError as error:
            raise MaskkitError(f"{where}: starts with a UTF-16 byte-order mark but is not UTF-16 ({error.reason} "
                               f"at byte {error.start}); save it as UTF-8") from None
        if "\x00" in text:                           # UTF-32, whose mark begins like UTF-16's
            raise MaskkitError(f"{where}: holds NUL characters (UTF-32, or not a text file?); save it as UTF-8")
        return text
    body = data.removeprefix(codecs.BOM_UTF8)
    if b"\x00" in body:
        # Valid UTF-8, but no text editor writes NUL: UTF-16 without a mark puts one beside every ASCII letter.
        raise MaskkitError(f"{where}: holds NUL bytes (the first at line {_line_of(body, body.index(0))}): "
                           "UTF-16 without a byte-order mark, or not a text file; save it as UTF-8")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MaskkitError(f"{where}: {_not_utf8(body, error.start)}; save it as UTF-8") from None


def _line_of(body: bytes, offset: int) -> int:
    return body.count(b"\n", 0, offset) + 1


def _not_utf8(body: bytes, start: int) -> str:
    """What the byte at `start` says: its line, and how that line reads in the usual 8-bit encoding."""
    line_start = body.rfind(b"\n", 0, start) + 1
    line_end = body.find(b"\n", start)
    line = body[line_start : line_end if line_end >= 0 else len(body)].rstrip(b"\r")
    column = start - line_start
    around = line[max(0, column - 30) : column + 30]
    problem = f"not UTF-8 (byte 0x{body[start]:02x} at line {_line_of(body, start)}"
    try:
        return f"{problem}; as Latin-1 or Windows-1252 it reads {around.decode('cp1252')!r})"
    except UnicodeDecodeError:
        return f"{problem})"


def held_out(count: int, fraction: float) -> list[bool]:
    """Which of `count` items (in order) are held out: exactly round(count * fraction), spread evenly."""
    return [math.floor((r + 1) * fraction + 0.5) > math.floor(r * fraction + 0.5) for r in range(count)]


def take_split(items: list, fraction: float, split: str) -> list:
    """The items of `split` ("train", "test" = the held-out `fraction`, or "all"), in their order."""
    if split == "all":
        return list(items)
    return [item for item, out in zip(items, held_out(len(items), fraction), strict=True) if out == (split == "test")]


class Indexed(Dataset):
    """Adds "index" and "epoch" to every item, so randomness can be seeded per sample.

    Items are asked for by index, or by (index, epoch) as `StepSampler` yields them (epoch 0 otherwise).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | Unreadable:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.dataset[index]
        if isinstance(item, Unreadable):
            return item
        return {**item, "index": torch.tensor(index), "epoch": torch.tensor(epoch)}


def collate(items: list[dict | Unreadable]) -> dict:
    """Stack items into a batch dict; unreadable items are dropped and their paths listed in "unreadable".

    A batch of only unreadable items has no tensors at all, just "unreadable".
    """
    kept = [item for item in items if not isinstance(item, Unreadable)]
    # A mixture's members can carry different extras (a shapes image has a mask, a photo has none):
    # the batch keeps what every item has.
    keys = [key for key in kept[0] if all(key in item for item in kept)] if kept else []
    batch = {key: torch.stack([item[key] for item in kept]) for key in keys}
    batch["unreadable"] = [item.path for item in items if isinstance(item, Unreadable)]
    return batch


def batch_size_of(batch: dict) -> int:
    """The number of readable samples in a collated batch."""
    return len(batch["index"]) if "index" in batch else 0


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(c, H, W) -> (channels, H, W): grey is repeated, alpha dropped."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1).contiguous()
    if channels == 1:
        return image[:3].mean(0, keepdim=True)
    return image[:channels]


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (without blocking the host); anything else as it is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_normalisation(d, source: str) -> None:
    """data.mean / data.std: one finite value per channel, positive deviations."""
    for key in ("mean", "std"):
        values = getattr(d, key)
        require(len(values) == d.in_channels, source, f"data.{key}", values,
                f"one value per channel (data.in_channels={d.in_channels})")
    for i, (mean, std) in enumerate(zip(d.mean, d.std, strict=True)):
        require(math.isfinite(mean), source, f"data.mean[{i}]", mean, "a finite number")
        require_float(source, f"data.std[{i}]", std, 0.0, low_open=True)


def check_crop_scale(source: str, key: str, scale: list[float]) -> None:
    require(len(scale) == 2, source, key, scale, "two area fractions [low, high]")
    low, high = scale
    require_float(source, f"{key}[0]", low, 0.0, 1.0, low_open=True)
    require_float(source, f"{key}[1]", high, low, 1.0)
