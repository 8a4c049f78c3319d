"""Image data sets that need no download: `digits`, `photos`, `folder`, and mixtures ("photos+digits").

Every item is a dict: "images" (C, H, W) float in [0, 1] at `image_size`, "label" (int, -1 when the
set has none), and, once wrapped in `Indexed`, "index" and "epoch" (from which per-sample randomness is
seeded). A file that cannot be decoded comes back as `Unreadable` and `collate` drops it, listing its
path. Augmentation happens later, batched (see `augment.py`).
"""

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from maskkit.data.common import (
    Indexed,
    Unreadable,
    check_crop_scale,
    check_normalisation,
    held_out,
    hidden,
    report_skipped_files,
    report_unreadable,
    to_channels,
)
from maskkit.data.shapes import ShapesWorld
from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.rng import Stream, sample_keys, uniform

log = logging.getLogger("maskkit")

DATA_SETS = ("digits", "photos", "folder", "shapes")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
PHOTO_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry",
    "hubble_deep_field", "moon", "page", "text", "clock", "retina", "grass", "gravel", "brick",
)


@dataclass
class DataConfig:
    kind: str = "image"               # image | pairs (image-text, see pairs.PairDataConfig)
    name: str = "digits"              # digits | photos | folder | a "+"-joined mixture, e.g. photos+digits
    path: str = ""                    # the folder for `folder`
    image_size: int = 32
    load_size: int = 0                # folder/photos images are loaded at this size for training (0 = image_size)
    in_channels: int = 3
    photo_crops: int = 4096           # samples in `photos` (fixed random crops of the sample photographs)
    eval_split: float = 0.3           # held-out fraction for labelled sets (digits, folder with classes); 0 = none
    strict: bool = False              # fail on the first unreadable image instead of skipping it
    num_workers: int = 0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # random resized crop, area fraction
    hflip: bool = True
    shapes: int = 4096                # images in `shapes` (the generated shapes world, with per-pixel masks)
    views: int = 1                    # 2: two augmented views per image (MoCo, DenseCL), each with its box and flip
    color: bool = False               # MoCo v2's colour jitter, grayscale and blur on top of crop and flip


def check_image_data(d: DataConfig, source: str) -> None:
    require(d.kind == "image", source, "data.kind", d.kind, "image for these fields")
    for name in d.name.split("+"):
        require(name in DATA_SETS, source, "data.name", d.name,
                f"one of {', '.join(DATA_SETS)} or a '+'-joined mixture of them (e.g. photos+digits)")
    require_int(source, "data.image_size", d.image_size, 1, 4096)
    require(d.load_size == 0 or 1 <= d.load_size <= 4096, source, "data.load_size", d.load_size,
            "0 (= data.image_size) or an integer in [1, 4096]")
    require(d.in_channels in (1, 3), source, "data.in_channels", d.in_channels, "1 (grey) or 3 (RGB)")
    require_int(source, "data.photo_crops", d.photo_crops, 1)
    require_int(source, "data.shapes", d.shapes, 4)
    # 0: pretrain on every image of a labelled set; the evaluation protocols then refuse (no held-out split).
    require_float(source, "data.eval_split", d.eval_split, 0.0, 1.0, high_open=True)
    require_int(source, "data.num_workers", d.num_workers, 0, 256)
    check_normalisation(d, source)
    check_crop_scale(source, "data.crop_scale", d.crop_scale)
    require(d.views in (1, 2), source, "data.views", d.views, "1 or 2")


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): shorter side to `size`, then a centre crop."""
    _, height, width = image.shape
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top : top + size, left : left + size].clamp(0, 1)


class Digits(Dataset):
    """sklearn's 1,797 real handwritten digits (8x8, 10 classes), upsampled; a fixed stratified split."""

    def __init__(self, split: str, image_size: int, channels: int = 3, eval_split: float = 0.3):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0        # (1797, 8, 8)
        labels = torch.tensor(digits.target, dtype=torch.long)
        num_test = math.ceil(len(labels) * eval_split)        # how train_test_split counts a fraction
        if eval_split == 0:                                   # pretraining on every digit: nothing held out
            train_idx, test_idx = np.arange(len(labels)), np.arange(0)
        elif not 10 <= num_test <= len(labels) - 10:
            raise MaskkitError(
                f"data.eval_split={eval_split} holds out {num_test} of the 1797 digits; a stratified split needs "
                "at least one per class on each side (0.006 <= data.eval_split <= 0.994), or 0 to hold out none"
            )
        else:
            train_idx, test_idx = train_test_split(
                np.arange(len(labels)), test_size=eval_split, random_state=0, stratify=labels.numpy()
            )
        chosen = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
        images = images[chosen].unsqueeze(1)                                      # (n, 1, 8, 8)
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = images.clamp(0, 1).expand(-1, channels, -1, -1).contiguous() if channels != 1 else images
        self.labels = labels[chosen]
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], "label": self.labels[i]}


@functools.lru_cache(maxsize=2)
def load_photos(channels: int) -> tuple[torch.Tensor, ...]:
    """The sample photographs as (channels, H, W) tensors in [0, 1], at most 256 px on the short side."""
    import skimage.data

    photos = []
    for name in PHOTO_NAMES:
        array = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        photo = torch.from_numpy(array)
        photo = photo.unsqueeze(0) if photo.ndim == 2 else photo.permute(2, 0, 1)
        photo = to_channels(photo, channels)
        # Keep at most 256 px on the short side: crops are small, and memory stays ~10 MB.
        if min(photo.shape[1:]) > 256:
            photo = resize(photo, 256) if photo.shape[1] == photo.shape[2] else _shrink(photo, 256)
        photos.append(photo)
    return tuple(photos)


class PhotoCrops(Dataset):
    """Random crops of scikit-image's sample photographs: natural-image statistics with no download.

    Crop i is a fixed function of i (its photo, scale and position come from `maskkit.rng`), so the
    set is a fixed data set of `num_crops` images; augmentation adds per-epoch variety on top.
    """

    def __init__(self, num_crops: int, image_size: int, channels: int = 3, seed: int = 0):
        self.photos = load_photos(channels)
        self.num_crops, self.image_size, self.seed = num_crops, image_size, seed

    def __len__(self) -> int:
        return self.num_crops

    def __getitem__(self, i: int) -> dict:
        key = sample_keys(self.seed, torch.zeros(1, dtype=torch.long), torch.tensor([i]))
        u = uniform(key, (4,), Stream.PHOTO)[0].tolist()
        which = int(u[0] * len(self.photos))
        photo = self.photos[which]
        _, height, width = photo.shape
        # Crop side between the model's input size and half the photo's short side.
        low, high = self.image_size, max(self.image_size, min(height, width) // 2)
        side = int(low + u[1] * (high - low))
        top, left = int(u[2] * (height - side)), int(u[3] * (width - side))
        crop = photo[:, top : top + side, left : left + side]
        return {"images": resize(crop, self.image_size), "label": torch.tensor(which)}


def _shrink(photo: torch.Tensor, short_side: int) -> torch.Tensor:
    _, height, width = photo.shape
    scale = short_side / min(height, width)
    size = (round(height * scale), round(width * scale))
    return F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _open_error(path: Path, decode: bool) -> str | None:
    """None if PIL can open `path` (and, with `decode`, decode all of it), else the reason it cannot."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if decode:
                image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        return str(error) or type(error).__name__
    return None


def class_folders(path: Path) -> list[Path]:
    """The class sub-folders of an image folder (hidden ones left out), sorted: their names are the labels."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolder(Dataset):
    """A directory of images: either one sub-folder per class, or images at the top level (unlabelled).

    Images are the files with an image suffix (any case); the other files are counted and named once, and
    hidden entries (.DS_Store, macOS's ._name copies, .git) are left alone.

    Every file's header is read once when the set is built: files PIL cannot open are reported by
    path (once each) and left out, so lengths count readable images; a set in which no image can be
    decoded fails here, before any training. A file that opens but does not decode (a truncated JPEG)
    is reported when it is read and skipped by `collate`. `strict` turns every unreadable file into an
    error instead.
    """

    def __init__(self, root: str, image_size: int, channels: int = 3, split: str = "all",
                 eval_split: float = 0.3, strict: bool = False):
        path = Path(root).expanduser()
        if not root:
            raise MaskkitError("data.path is empty: set data.path=DIR for data.name=folder")
        if not path.is_dir():
            raise MaskkitError(f"data.path: {path} does not exist or is not a directory")
        class_dirs = class_folders(path)
        top = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        loose = [p for p in top if p.suffix.lower() in IMAGE_EXTENSIONS]
        others = [p for p in top if p.suffix.lower() not in IMAGE_EXTENSIONS]    # counted and named below
        if class_dirs and loose:
            raise MaskkitError(
                f"data.path: {path} has {len(loose)} image{'s' if len(loose) > 1 else ''} at its top level next to "
                f"class sub-folders "
                f"({', '.join(d.name for d in class_dirs[:3])}{', ...' if len(class_dirs) > 3 else ''}); move the "
                "loose images into a sub-folder (or the sub-folders out) so that every image has a class or none does"
            )
        files, labels = [], []
        if class_dirs:
            self.classes = [d.name for d in class_dirs]
            for label, directory in enumerate(class_dirs):
                inside = sorted(p for p in directory.rglob("*") if p.is_file() and not hidden(p, path))
                found = [p for p in inside if p.suffix.lower() in IMAGE_EXTENSIONS]
                others += [p for p in inside if p.suffix.lower() not in IMAGE_EXTENSIONS]
                files += found
                labels += [label] * len(found)
        else:
            self.classes = []
            files, labels = loose, [-1] * len(loose)
        if not files:
            besides = f", only {len(others)} other files such as {sorted(others)[0].relative_to(path)}" if others else ""
            raise MaskkitError(f"data.path: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {path}{besides}")
        report_skipped_files(path, sorted(others), "images")
        self.unreadable = self._check_readable(path, files, strict)
        if split != "all" and self.classes:
            # A fixed split of each class: exactly round(n_c * eval_split) of its files are held out. An
            # unlabelled folder has nothing to evaluate on, so all of it is training data.
            by_class: dict[int, list[int]] = {}
            for position, label in enumerate(labels):
                by_class.setdefault(label, []).append(position)
            test = set()
            for positions in by_class.values():
                test.update(p for p, out in zip(positions, held_out(len(positions), eval_split), strict=True) if out)
            chosen = [p for p in range(len(files)) if (p in test) == (split == "test")]
            files, labels = [files[p] for p in chosen], [labels[p] for p in chosen]
        # Left out only after the split, so a broken file does not move others between train and test.
        kept = [(f, lab) for f, lab in zip(files, labels, strict=True) if str(f) not in self.unreadable]
        if not kept:
            raise MaskkitError(f"data.path: the {split!r} split of {path} has no readable images (data.eval_split={eval_split})")
        self.files, self.labels = [f for f, _ in kept], torch.tensor([lab for _, lab in kept], dtype=torch.long)
        self.image_size, self.channels, self.strict = image_size, channels, strict
        self.num_classes = len(self.classes)

    @staticmethod
    def _check_readable(root: Path, files: list[Path], strict: bool) -> dict[str, str]:
        """{path: reason} of the files PIL cannot open; fails unless at least one file decodes."""
        unreadable = {}
        for file in files:
            reason = _open_error(file, decode=False)
            if reason is not None:
                if strict:
                    raise MaskkitError(f"unreadable image {file}: {reason} (data.strict=false skips such files)")
                unreadable[str(file)] = reason
        # One complete decode proves the set is not entirely broken (headers can be fine, data truncated).
        for file in files:
            if str(file) in unreadable:
                continue
            reason = _open_error(file, decode=True)
            if reason is None:
                break
            if strict:
                raise MaskkitError(f"unreadable image {file}: {reason} (data.strict=false skips such files)")
            unreadable[str(file)] = reason
        else:
            example, reason = next(iter(unreadable.items()))
            raise MaskkitError(
                f"data.path: none of the {len(files)} image files under {root} can be read (e.g. {example}: {reason})"
            )
        for file, reason in unreadable.items():
            report_unreadable(file, reason)
        return unreadable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict | Unreadable:
        image = self.load(self.files[i], self.image_size, self.channels)
        if isinstance(image, Unreadable):
            if self.strict:
                raise MaskkitError(f"unreadable image {image.path}: {image.reason} (data.strict=false skips such files)")
            return image
        return {"images": image, "label": self.labels[i]}

    @staticmethod
    def load(path: Path, image_size: int, channels: int) -> torch.Tensor | Unreadable:
        """(channels, image_size, image_size) in [0, 1], or Unreadable(path, reason)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            return Unreadable(str(path), str(error) or type(error).__name__)
        image = torch.from_numpy(array)
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        return resize(image, image_size)


class ShapeImages(Dataset):
    """The shapes world (`maskkit.data.shapes.ShapesWorld`) as an image set: images, per-pixel masks
    (class = shape kind) and the first shape's (colour, kind) class as label; captions left out."""

    def __init__(self, split: str, count: int, image_size: int, channels: int):
        self.world = ShapesWorld("train" if split in ("train", "all") else "val", count if split != "test" else 4 * count,
                                 image_size, channels)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> dict:
        item = self.world[i]
        item.pop("text")
        return item


def build_image_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """split: "train" (pretraining / probe training), "test" (held out), or "all"."""
    parts = []
    load_size = cfg.load_size or cfg.image_size
    for name in cfg.name.split("+"):
        if name == "digits":
            parts.append(Digits(split, load_size, cfg.in_channels, cfg.eval_split))
        elif name == "photos":
            parts.append(PhotoCrops(cfg.photo_crops, load_size, cfg.in_channels))
        elif name == "folder":
            parts.append(ImageFolder(cfg.path, load_size, cfg.in_channels, split, cfg.eval_split, cfg.strict))
        elif name == "shapes":
            parts.append(ShapeImages(split, cfg.shapes, load_size, cfg.in_channels))
        else:
            raise MaskkitError(f"data.name: unknown data set {name!r}; choose from {', '.join(DATA_SETS)} (or a+b)")
    return Indexed(parts[0] if len(parts) == 1 else ConcatDataset(parts))


def labelled_name(name: str) -> str:
    """The labelled member of `data.name` (digits or folder); for a mixture such as photos+digits, its one."""
    labelled = [part for part in name.split("+") if part in ("digits", "folder")]
    if len(labelled) != 1:
        raise MaskkitError(
            f"data.name={name!r} has no single labelled data set; evaluate with data.name=digits "
            "or data.name=folder data.path=DIR (class sub-folders)"
        )
    return labelled[0]


def labelled_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The labelled set used by evaluation: digits, or a folder with class sub-folders."""
    if labelled_name(cfg.name) == "folder":
        dataset = ImageFolder(cfg.path, cfg.image_size, cfg.in_channels, split, cfg.eval_split, cfg.strict)
        if not dataset.classes:
            raise MaskkitError(f"data.path: {cfg.path} has no class sub-folders, so it has no labels to evaluate on")
        return Indexed(dataset)
    return Indexed(Digits(split, cfg.image_size, cfg.in_channels, cfg.eval_split))


