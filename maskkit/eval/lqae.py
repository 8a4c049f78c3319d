"""LQAE's own protocols (Liu et al. 2023): what the words say, and what a frozen language model reads from them.

tokens       held-out images beside their reconstructions from their words, with the words (a PNG), and the
             reconstruction PSNR
lm-features  the frozen LM's features of each image's code sequence (its last hidden state, averaged over the
             tokens): a linear probe, kNN, and N-way K-shot nearest-class-mean episodes (Sec 4.2 evaluates few-shot
             classification by prompting a large LM with the words; nearest class means on the LM's features are a
             proxy for that which needs no large LM)

Both run on the run itself and on the same method with a random encoder and decoder (the same frozen LM).
"""

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from maskkit.data.augment import ImageAugment
from maskkit.data.images import labelled_dataset, labelled_name
from maskkit.errors import MaskkitError
from maskkit.eval.linear_probe import linear_probe
from maskkit.files import pyplot
from maskkit.nn.knn import knn_accuracy

FEW_SHOT = ((5, 1), (5, 5))      # (ways, shots)
QUERIES = 15                     # query images per class and episode (the usual protocol)
EPISODES = 600


def require_lqae(method, protocol: str) -> None:
    if not hasattr(method, "lm_features"):
        raise MaskkitError(f"{protocol} evaluates an LQAE run (its words and the frozen LM's features); this is a "
                           f"{type(method).__name__} run")


@torch.no_grad()
def _images_and_labels(dataset, normalize, batch_size: int, device, limit: int | None = None):
    """Batches of (normalised images, labels) of a labelled image set, unreadable files left out."""
    batch, labels, count = [], [], 0
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, dict):
            continue
        batch.append(item["images"])
        labels.append(item["label"])
        count += 1
        if len(batch) == batch_size or index == len(dataset) - 1 or count == limit:
            yield normalize(torch.stack(batch).to(device)), torch.tensor(labels)
            batch, labels = [], []
        if count == limit:
            return
    if batch:
        yield normalize(torch.stack(batch).to(device)), torch.tensor(labels)


@torch.no_grad()
def lm_feature_set(method, dataset, normalize, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for images, label in _images_and_labels(dataset, normalize, batch_size, device):
        features.append(method.lm_features(images).float().cpu())
        labels.append(label)
    return torch.cat(features), torch.cat(labels)


def few_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, ways: int, shots: int, queries: int = QUERIES,
                      episodes: int = EPISODES, seed: int = 0) -> float:
    """Mean accuracy over seeded N-way K-shot episodes: `ways` classes, `shots` support and `queries` query images
    of each; a query takes the class whose support mean is nearest in cosine similarity."""
    features = F.normalize(features.float(), dim=-1)
    classes = [c for c in labels.unique().tolist() if int((labels == c).sum()) >= shots + queries]
    if len(classes) < ways:
        raise MaskkitError(f"{ways}-way {shots}-shot needs {ways} classes with {shots + queries} images each; the "
                           f"held-out set has {len(classes)}")
    generator = torch.Generator().manual_seed(seed)
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    correct = 0
    for _ in range(episodes):
        chosen = [classes[i] for i in torch.randperm(len(classes), generator=generator)[:ways].tolist()]
        means, query_rows = [], []
        for c in chosen:
            rows = members[c][torch.randperm(len(members[c]), generator=generator)[: shots + queries]]
            means.append(features[rows[:shots]].mean(0))
            query_rows.append(rows[shots:])
        prototypes = F.normalize(torch.stack(means), dim=-1)                 # (ways, D)
        for way, rows in enumerate(query_rows):
            correct += int(((features[rows] @ prototypes.T).argmax(1) == way).sum())
    return correct / (episodes * ways * queries)


def lm_features_protocol(models: dict, cfg, device, seed: int = 0) -> dict:
    """Linear probe, kNN and few-shot accuracies on the LM's features of each model ({name: LQAE})."""
    train_set, test_set = labelled_dataset(cfg.data, "train"), labelled_dataset(cfg.data, "test")
    num_classes = train_set.dataset.num_classes
    normalize, e = ImageAugment(cfg.data).normalize, cfg.eval
    result = {"protocol": "lm-features", "dataset": labelled_name(cfg.data.name)}
    for name, model in models.items():
        model = model.to(device).eval()
        train_f, train_y = lm_feature_set(model, train_set, normalize, e.batch_size, device)
        test_f, test_y = lm_feature_set(model, test_set, normalize, e.batch_size, device)
        result.update(num_train=len(train_y), num_test=len(test_y))
        probe = linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=e.probe_epochs, lr=e.probe_lr,
                             batch_size=e.probe_batch_size, seed=seed)
        result[name] = probe.test_accuracy
        result[f"{name}_knn"] = knn_accuracy(train_f, train_y, test_f, test_y, k=e.knn_k,
                                             temperature=e.knn_temperature, num_classes=num_classes)
        for ways, shots in FEW_SHOT:
            result[f"{name}_{ways}way_{shots}shot"] = few_shot_accuracy(test_f, test_y, ways, shots, seed=seed)
    return result


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of pixels in [0, 1], over the whole set."""
    error = F.mse_loss(reconstructions.float().clamp(0, 1), images.float().clamp(0, 1)).item()
    return 10 * math.log10(1 / max(error, 1e-12))


def tokens_protocol(models: dict, cfg, out_png: Path, device, count: int = 8, psnr_images: int = 256) -> dict:
    """Reconstruction PSNR from the words on held-out images for each model, and a PNG of the first `count`
    images, the run's reconstructions and their words."""
    augment = ImageAugment(cfg.data)
    test_set = labelled_dataset(cfg.data, "test")
    result = {"protocol": "tokens", "dataset": labelled_name(cfg.data.name), "png": str(out_png)}
    shown = None
    for name, model in models.items():
        model = model.to(device).eval()
        originals, rebuilt, words = [], [], []
        for images, _ in _images_and_labels(test_set, augment.normalize, cfg.eval.batch_size, device, psnr_images):
            ids = model.encode(images)
            originals.append(augment.denormalize(images).cpu())
            rebuilt.append(augment.denormalize(model.decode_ids(ids)).cpu())
            words += model.to_text(ids)
        originals, rebuilt = torch.cat(originals), torch.cat(rebuilt)
        result[name] = psnr(originals, rebuilt)
        result["num_test"] = len(originals)
        if name == "pretrained":
            shown = (originals[:count], rebuilt[:count], words[:count])
            result["sequences"] = words[:count]
    _plot_tokens(*shown, model.encoder.grid_size, out_png)
    return result


def _plot_tokens(images, reconstructions, words: list[str], grid: int, path: Path) -> None:
    """One row per image: the image, its reconstruction, and its words laid out as the patch grid."""
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(9.5, 1.9 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 3.2]})
    for row in range(rows):
        for column, picture in enumerate((images[row], reconstructions[row])):
            axes[row][column].imshow(picture.clamp(0, 1).permute(1, 2, 0).numpy().squeeze())
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
        pieces = words[row].split(" ")
        lines = [" ".join(pieces[r * grid:(r + 1) * grid]) for r in range(math.ceil(len(pieces) / grid))]
        axes[row][2].text(0, 0.5, "\n".join(lines), fontsize=7, family="monospace", va="center")
        axes[row][2].axis("off")
    axes[0][0].set_title("image", fontsize=8)
    axes[0][1].set_title("from its words", fontsize=8)
    axes[0][2].set_title("its words (patch grid, row by row)", fontsize=8)
    with warnings.catch_warnings():          # word pieces of other scripts: the font draws a box for them
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)
