"""Zero-shot classification and image-text retrieval for two-tower models (CLIP Sec 3.1.4; FLIP Sec 4).

Zero-shot: each class becomes text through prompt templates; its embedding is the normalised mean of
the normalised prompt embeddings (CLIP's prompt ensembling), and an image takes the class whose embedding
is most similar. On the shapes world the held-out split shows (colour, kind) pairs that never occur in
training, so its accuracy measures composition; the "seen" split is the same task on trained pairs.

Retrieval: Recall@K from images to captions and from captions to images over a held-out set. Generated
captions repeat ("a red circle" describes many images), so a retrieved item counts as correct when its
caption is the query's caption, not only when it is the query's own partner.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maskkit.data import Data

SHAPE_TEMPLATES = ("a {}", "a photo of a {}", "a drawing of a {}", "an image of a {}", "a small {}", "a large {}")
DIGIT_TEMPLATES = ("a handwritten digit {}", "the number {}", "a photo of the digit {}", "a written {}")


@torch.no_grad()
def class_embeddings(model, tokenizer, class_names, templates, device) -> torch.Tensor:
    """(K, E) normalised class embeddings from prompt ensembles."""
    rows = []
    for name in class_names:
        ids, mask = tokenizer.encode([template.format(name) for template in templates])
        text = F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1)   # (T, E)
        rows.append(F.normalize(text.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def image_embeddings(model, data: Data, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, E) normalised image embeddings, (N,) labels and the N captions, un-augmented."""
    features, labels, captions = [], [], []
    for batch in DataLoader(data.dataset, batch_size=batch_size, collate_fn=data.collate):
        if "images" not in batch:
            continue                                   # every image of this batch was unreadable
        images = data.normalize(batch["images"].to(device))
        features.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())
        labels.append(batch["label"])
        captions += batch["text"]
    return torch.cat(features), torch.cat(labels), captions


@torch.no_grad()
def zero_shot_accuracy(model, data: Data, class_names, templates, batch_size: int = 256, device="cpu") -> float:
    was_training = model.training
    model.eval()
    try:
        classes = class_embeddings(model, data.tokenizer, class_names, templates, device).cpu()
        images, labels, _ = image_embeddings(model, data, batch_size, device)
    finally:
        model.train(was_training)
    return (images @ classes.T).argmax(1).eq(labels).float().mean().item()


@torch.no_grad()
def retrieval_recall(model, data: Data, ks=(1, 5, 10), batch_size: int = 256, device="cpu") -> dict[str, float]:
    """{"image_to_text_R@1": ..., "text_to_image_R@1": ..., ...} over the data set's pairs."""
    was_training = model.training
    model.eval()
    try:
        images, _, captions = image_embeddings(model, data, batch_size, device)
        texts = []
        for start in range(0, len(captions), batch_size):
            ids, mask = data.tokenizer.encode(captions[start : start + batch_size])
            texts.append(F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1).cpu())
        texts = torch.cat(texts)
    finally:
        model.train(was_training)
    similarity = images @ texts.T                                          # (N images, N captions)
    index = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([index[c] for c in captions])                # equal captions share an id
    same = caption_id[:, None] == caption_id[None, :]                      # (N, N) correct pairs
    result = {}
    for k in ks:
        k_eff = min(k, len(captions))
        top_texts = similarity.topk(k_eff, dim=1).indices                  # per image
        top_images = similarity.T.topk(k_eff, dim=1).indices               # per caption
        result[f"image_to_text_R@{k}"] = same.gather(1, top_texts).any(1).float().mean().item()
        result[f"text_to_image_R@{k}"] = same.T.gather(1, top_images).any(1).float().mean().item()
    return result
