"""The shapes world: generated scenes of 1-3 coloured shapes with compositional captions and masks.

`ShapesWorld(split, ...)[i]` draws scene i from its own key: 32-64 px images of circles, squares,
triangles and crosses in several colours, sizes and positions; a caption ("a small red circle left of a
large blue square"); a per-pixel mask (class = shape kind, 0 = background); and the first shape's
(colour, kind) class as label. The (colour, kind) pairs in HELD_OUT never occur in training: the "val"
split shows exactly those, alone, so zero-shot accuracy on it measures composition. Image-text pairs
(`pairs.py`), the `shapes` image set (`images.py`) and the dense probe all read it from here.
"""

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from maskkit.data.common import to_channels
from maskkit.errors import MaskkitError
from maskkit.rng import Stream, sample_keys, uniform

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.2, 0.8), "white": (0.95, 0.95, 0.95)}
KINDS = ("circle", "square", "triangle", "cross")
# (colour, kind) pairs that never appear in training; the held-out split shows exactly these, alone.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square"),
            ("purple", "circle"), ("white", "triangle"))
CLASS_NAMES = tuple(f"{colour} {kind}" for colour in COLOURS for kind in KINDS)   # shapes' zero-shot classes


@dataclass
class Shape:
    kind: str
    colour: str
    size: str         # small | large
    x: float          # centre, as a fraction of the image side
    y: float


def _draw(shape: Shape, side: int, scale: float = 1.0) -> torch.Tensor:
    """(side, side) bool: the pixels the shape covers (`scale` times the usual radius)."""
    radius = (0.12 if shape.size == "small" else 0.2) * side * scale
    coords = torch.arange(side, dtype=torch.float32) + 0.5
    dy, dx = coords[:, None] - shape.y * side, coords[None, :] - shape.x * side
    if shape.kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape.kind == "square":
        return (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    if shape.kind == "triangle":   # apex up: the half-width grows from 0 at the top to `radius` at the base
        return (dy >= -radius) & (dy <= radius) & (dx.abs() <= (dy + radius) / 2)
    arm = radius / 3
    return ((dx.abs() <= arm) & (dy.abs() <= radius)) | ((dy.abs() <= arm) & (dx.abs() <= radius))


def _describe(shape: Shape, u: float) -> str:
    words = [shape.colour, shape.kind] if u < 0.4 else [shape.size, shape.colour, shape.kind]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def caption(shapes: list[Shape], u: list[float]) -> str:
    """A compositional caption: the shapes, and for two of them where the first is relative to the second."""
    if len(shapes) == 1:
        return _describe(shapes[0], u[0])
    first, second = shapes[0], shapes[1]
    if len(shapes) == 2:
        dx, dy = first.x - second.x, first.y - second.y
        relation = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        return f"{_describe(first, u[0])} {relation} {_describe(second, u[1])}"
    names = [_describe(s, v) for s, v in zip(shapes, u, strict=False)]
    return f"{names[0]}, {names[1]} and {names[2]}"


class ShapesWorld(Dataset):
    """Item i is a fixed function of (seed, split, i): 1-3 shapes, a caption and a segmentation mask.

    Splits: "train" (1-3 shapes, never a HELD_OUT (colour, kind) pair), "val" (more scenes like those,
    for retrieval), "test" (single shapes of exactly the HELD_OUT pairs: composition never seen) and
    "seen" (single shapes of the other pairs). "label" is the first shape's (colour, kind) class,
    `CLASS_NAMES[label]`; mask values are 0 background, 1 + KINDS.index(kind).
    """

    SPLITS = {"train": 0, "test": 1, "seen": 2, "val": 3}     # each split draws its scenes from its own stream

    def __init__(self, split: str, num_samples: int, image_size: int, channels: int = 3, seed: int = 0):
        if split == "all":
            split = "train"
        self.split, self.image_size, self.channels, self.seed = split, image_size, channels, seed
        self.num = num_samples if split == "train" else max(len(HELD_OUT) * 4, num_samples // 4)
        self.colours = list(COLOURS)
        self.seen = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in HELD_OUT]

    def __len__(self) -> int:
        return self.num

    def scene(self, i: int) -> list[Shape]:
        epoch = self.SPLITS[self.split]
        u = uniform(sample_keys(self.seed, torch.tensor([epoch]), torch.tensor([i])), (64,), Stream.SCENE)[0].tolist()
        if self.split in ("test", "seen"):
            colour, kind = HELD_OUT[i % len(HELD_OUT)] if self.split == "test" else self.seen[i % len(self.seen)]
            return [Shape(kind, colour, "small" if u[0] < 0.5 else "large", 0.3 + 0.4 * u[1], 0.3 + 0.4 * u[2])]
        count = 1 + int(u[0] * 3)
        shapes, k = [], 1
        while len(shapes) < count:
            u_colour, u_kind, u_size, u_x, u_y = u[k : k + 5]
            k += 5
            colour, kind = self.colours[int(u_colour * len(COLOURS))], KINDS[int(u_kind * len(KINDS))]
            if (colour, kind) in HELD_OUT:
                if k + 5 <= 58:
                    continue                       # draw again: this pair is kept for the held-out split
                colour = next(c for c in self.colours if (c, kind) not in HELD_OUT)
            # Spread the shapes over the width so that relations ("left of") are unambiguous.
            x = (len(shapes) + 0.5 + 0.3 * (u_x - 0.5)) / count if count > 1 else 0.3 + 0.4 * u_x
            shapes.append(Shape(kind, colour, "small" if u_size < 0.5 else "large", x, 0.3 + 0.4 * u_y))
        order = sorted(range(count), key=lambda j: u[58 + j])     # which shape the caption names first
        return [shapes[j] for j in order]

    def __getitem__(self, i: int) -> dict:
        shapes = self.scene(i)
        side = self.image_size
        u = uniform(sample_keys(self.seed, torch.tensor([7 + self.SPLITS[self.split]]), torch.tensor([i])), (4,),
                    Stream.SCENE)[0].tolist()
        image = torch.full((3, side, side), 0.08) + 0.04 * torch.rand(
            3, side, side, generator=torch.Generator().manual_seed(int(u[0] * 2**31)))
        mask = torch.zeros(side, side, dtype=torch.long)
        for shape in shapes:
            covered = _draw(shape, side)
            image[:, covered] = torch.tensor(COLOURS[shape.colour])[:, None]
            mask[covered] = 1 + KINDS.index(shape.kind)
        return {"images": to_channels(image.clamp(0, 1), self.channels), "text": caption(shapes, u[1:]),
                "label": torch.tensor(CLASS_NAMES.index(f"{shapes[0].colour} {shapes[0].kind}")), "mask": mask}


# The biased world (Waterbirds, Sagawa et al. 2020, made of shapes): class y = the shape's kind, spurious
# attribute a = the background's colour. Shape colours avoid the background colours, so colour words name one or
# the other. Class y's usual background is BACKGROUNDS[y]; the group of an image is its (y, a). The other kinds
# appear on either background alike, as the rest of a web crawl shows a model what shapes are.
BIAS_CLASSES = ("circle", "cross")
OTHER_KINDS = ("square", "triangle")
BACKGROUNDS = {"green": (0.25, 0.55, 0.2), "blue": (0.15, 0.3, 0.75)}
BIAS_SHAPE_COLOURS = ("red", "yellow", "white", "purple")
BIAS_SCALE = 1.5          # shapes 1.5 times the shapes world's: kinds that patches of 4 px can tell apart


class BiasedShapes(Dataset):
    """Item i is a fixed function of (seed, split, i): one shape on a textured background of colour
    list(BACKGROUNDS)[a], with a caption, "label" y (BIAS_CLASSES[y]; -1 for the other kinds) and "group" a.

    "train": a fraction `other` of the images shows one of OTHER_KINDS on either background; the rest a class y,
    on its usual background a = y with probability `correlation` (Waterbirds: 0.95), else on the other. A caption
    names the shape ("a small red circle") and, with probability `mention`, the background ("... on a green
    background"), so the text tower learns background words while shape-only captions lean towards their usual
    background. "val" and "test": the classes only, group-balanced (item i has y = i % 2, a = (i // 2) % 2), for
    balanced probes and worst-group accuracy. Each split draws from its own stream.
    """

    SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, split: str, num_samples: int, image_size: int, channels: int = 3, seed: int = 0,
                 correlation: float = 0.95, mention: float = 0.5, other: float = 0.5):
        split = "train" if split == "all" else split
        if split not in self.SPLITS:
            raise MaskkitError(f"the biased shapes world has the splits {', '.join(self.SPLITS)}, not {split!r}")
        self.split, self.image_size, self.channels, self.seed = split, image_size, channels, seed
        self.correlation, self.mention, self.other = correlation, mention, other
        self.num = num_samples if split == "train" else max(4 * 16, num_samples // 4)

    def __len__(self) -> int:
        return self.num

    def describe(self, i: int) -> tuple[int, int, Shape, float]:
        """(y, a, the shape, u): y = -1 for an other kind; u < mention puts the background in the caption."""
        u = uniform(sample_keys(self.seed, torch.tensor([20 + self.SPLITS[self.split]]), torch.tensor([i])), (8,),
                    Stream.SCENE)[0].tolist()
        if self.split != "train":
            y, a = i % 2, (i // 2) % 2
            kind = BIAS_CLASSES[y]
        elif u[0] < self.other:
            y, a = -1, int(u[1] * len(BACKGROUNDS))
            kind = OTHER_KINDS[int(u[7] * len(OTHER_KINDS))]
        else:
            y = int(u[7] * len(BIAS_CLASSES))
            a = y if u[1] < self.correlation else 1 - y
            kind = BIAS_CLASSES[y]
        colour = BIAS_SHAPE_COLOURS[int(u[2] * len(BIAS_SHAPE_COLOURS))]
        shape = Shape(kind, colour, "small" if u[3] < 0.5 else "large", 0.35 + 0.3 * u[4], 0.35 + 0.3 * u[5])
        return y, a, shape, u[6]

    def caption(self, i: int) -> str:
        _, a, shape, u = self.describe(i)
        return self._caption(a, shape, u)

    def _caption(self, a: int, shape: Shape, u: float) -> str:
        text = _describe(shape, 1.0)                              # "a small red circle": size always named
        return f"{text} on a {list(BACKGROUNDS)[a]} background" if u < self.mention else text

    def __getitem__(self, i: int) -> dict:
        y, a, shape, u = self.describe(i)                         # once per item: the loader's hot path
        side = self.image_size
        noise = torch.rand(3, side, side, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 97 * i
                                                                                  + self.SPLITS[self.split]))
        image = torch.tensor(BACKGROUNDS[list(BACKGROUNDS)[a]])[:, None, None] * (0.8 + 0.4 * noise)
        image[:, _draw(shape, side, BIAS_SCALE)] = torch.tensor(COLOURS[shape.colour])[:, None]
        return {"images": to_channels(image.clamp(0, 1), self.channels), "text": self._caption(a, shape, u),
                "label": torch.tensor(y), "group": torch.tensor(a)}
