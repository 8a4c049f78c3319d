"""Image data sets that need no download: `digits`, `photos`, `folder`, and mixtures ("photos+digits").

Every item is a dict: "images" (C, H, W) float in [0, 1] at `image_size`, "label" (int, -1 when the
set has none) and "index" (the position the sampler asked for, from which per-sample randomness is
seeded). Augmentation happens later, batched (see `augment.py`).
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from maskkit.errors import MaskkitError
from maskkit.nn.masking import sample_seed

log = logging.getLogger("maskkit")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
PHOTO_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry",
    "hubble_deep_field", "moon", "page", "text", "clock", "retina", "grass", "gravel", "brick",
)


@dataclass
class DataConfig:
    name: str = "digits"              # digits | photos | folder | a "+"-joined mixture, e.g. photos+digits
    path: str = ""                    # the folder for `folder`
    image_size: int = 32
    load_size: int = 0                # folder/photos images are loaded at this size for training (0 = image_size)
    in_channels: int = 3
    photo_crops: int = 4096           # samples in `photos` (fixed random crops of the sample photographs)
    eval_split: float = 0.3           # held-out fraction for labelled sets (digits, folder with classes)
    strict: bool = False              # fail on the first unreadable image instead of skipping it
    num_workers: int = 0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # random resized crop, area fraction
    hflip: bool = True


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(c, H, W) -> (channels, H, W): grey is repeated, alpha dropped."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1).contiguous()
    if channels == 1:
        return image[:3].mean(0, keepdim=True)
    return image[:channels]


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


class PhotoCrops(Dataset):
    """Random crops of scikit-image's sample photographs: natural-image statistics with no download.

    Crop i is a fixed function of i (its photo, scale and position come from `sample_seed`), so the
    set is a fixed data set of `num_crops` images; augmentation adds per-epoch variety on top.
    """

    def __init__(self, num_crops: int, image_size: int, channels: int = 3, seed: int = 0):
        import skimage.data

        self.photos = []
        for name in PHOTO_NAMES:
            array = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
            photo = torch.from_numpy(array)
            photo = photo.unsqueeze(0) if photo.ndim == 2 else photo.permute(2, 0, 1)
            photo = to_channels(photo, channels)
            # Keep at most 256 px on the short side: crops are small, and memory stays ~10 MB.
            if min(photo.shape[1:]) > 256:
                photo = resize(photo, 256) if photo.shape[1] == photo.shape[2] else _shrink(photo, 256)
            self.photos.append(photo)
        self.num_crops, self.image_size, self.seed = num_crops, image_size, seed

    def __len__(self) -> int:
        return self.num_crops

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, 0, i, stream=7))
        u = torch.rand(4, generator=generator).tolist()
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


class ImageFolder(Dataset):
    """A directory of images; one sub-folder per class when there are sub-folders, else unlabelled.

    Unreadable images are reported by path and skipped (the batch is one shorter and the loop counts
    them), or raise MaskkitError in strict mode.
    """

    def __init__(self, root: str, image_size: int, channels: int = 3, split: str = "all",
                 eval_split: float = 0.3, strict: bool = False):
        path = Path(root).expanduser()
        if not root:
            raise MaskkitError("data.path is empty: set data.path=DIR for data.name=folder")
        if not path.is_dir():
            raise MaskkitError(f"data.path: {path} does not exist or is not a directory")
        class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        files, labels = [], []
        if class_dirs:
            self.classes = [d.name for d in class_dirs]
            for label, directory in enumerate(class_dirs):
                found = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
                files += found
                labels += [label] * len(found)
        else:
            self.classes = []
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            labels = [-1] * len(files)
        if not files:
            raise MaskkitError(f"data.path: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {path}")
        if split != "all":
            # A fixed split: every k-th file of each class is held out.
            period = max(2, round(1 / eval_split)) if eval_split > 0 else 0
            rank_in_class, seen = [], {}
            for label in labels:
                rank_in_class.append(seen.get(label, 0))
                seen[label] = rank_in_class[-1] + 1
            keep = [(r % period == 0) == (split == "test") if period else split == "train" for r in rank_in_class]
            files = [f for f, k in zip(files, keep, strict=True) if k]
            labels = [lab for lab, k in zip(labels, keep, strict=True) if k]
        self.files, self.labels = files, torch.tensor(labels, dtype=torch.long)
        self.image_size, self.channels, self.strict = image_size, channels, strict
        self.num_classes = len(self.classes)
        self.reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict | None:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB" if self.channels == 3 else "L"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError) as error:
            if self.strict:
                raise MaskkitError(f"unreadable image {path}: {error} (data.strict=false skips such files)") from None
            if path not in self.reported:  # once per file, not once per epoch
                self.reported.add(path)
                log.warning("skipping unreadable image %s: %s", path, error)
            return None
        image = torch.from_numpy(array)
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        return {"images": resize(image, self.image_size), "label": self.labels[i]}


class Indexed(Dataset):
    """Adds "index" to every item, so randomness can be seeded per sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict | None:
        item = self.dataset[i]
        return None if item is None else {**item, "index": torch.tensor(i)}


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
        else:
            raise MaskkitError(f"data.name: unknown data set {name!r}; choose from digits, photos, folder (or a+b)")
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


def collate(items: list[dict | None]) -> dict[str, torch.Tensor]:
    """Stack items into a batch dict, dropping unreadable ones and counting them in "skipped"."""
    kept = [item for item in items if item is not None]
    if not kept:
        return {"skipped": torch.tensor(len(items))}
    batch = {key: torch.stack([item[key] for item in kept]) for key in kept[0]}
    batch["skipped"] = torch.tensor(len(items) - len(kept))
    return batch


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
