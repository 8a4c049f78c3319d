"""What `maskkit profile MODEL` measures: MODEL is `minilm` (the bundled all-MiniLM-L6-v2), a Hugging Face directory
(BERT family, CLIP, ViT-MAE) or a maskkit run, turned into the module a user deploys and a batch maker for it.

A text model is profiled on `length` random token ids (all real, no padding), an image model on random pixels at
its own size. A maskkit run is its backbone (the network exported for downstream use); a TinyBERT or text-classify
classifier its whole classifier; CLIP and FLIP their image tower, or their text tower with tower="text".
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskkit.errors import MaskkitError
from maskkit.nn.transformer import SequenceClassifier, TextTransformer, ViT


@dataclass
class Profiled:
    description: str
    module: nn.Module
    make_example: Callable[[int], tuple]
    forward: Callable | None = None
    embedding_tables: list[nn.Parameter] = field(default_factory=list)
    input: str = ""


def text_profiled(description: str, module: nn.Module, encoder: TextTransformer, length: int | None) -> Profiled:
    context = encoder.cfg.context_length
    length = length or min(128, context)
    if not 1 <= length <= context:
        raise MaskkitError(f"--length {length}: {description} reads 1 to {context} tokens")
    vocab = encoder.cfg.vocab_size
    device = next(module.parameters()).device

    def make_example(n: int) -> tuple:
        generator = torch.Generator().manual_seed(n)
        ids = torch.randint(min(5, vocab - 1), vocab, (n, length), generator=generator).to(device)
        return ids, torch.ones_like(ids)

    tables = [encoder.token_embedding.weight] if hasattr(encoder, "token_embedding") else []
    return Profiled(description, module, make_example, embedding_tables=tables, input=f"{length} tokens")


def image_profiled(description: str, module: nn.Module, encoder: ViT, image_size: int | None,
                   forward: Callable | None = None) -> Profiled:
    size = encoder.cfg.image_size
    if image_size not in (None, size):
        raise MaskkitError(f"--image-size {image_size}: {description} has positions for {size} px images only")
    channels = encoder.cfg.in_channels
    device = next(module.parameters()).device

    def make_example(n: int) -> tuple:
        generator = torch.Generator().manual_seed(n)
        return (torch.rand(n, channels, size, size, generator=generator).to(device),)

    return Profiled(description, module, make_example, forward=forward, input=f"{size} px")


def load_profiled(source: str, length: int | None = None, image_size: int | None = None, tower: str = "") -> Profiled:
    """`minilm`, a Hugging Face directory or a maskkit run, as the module to profile and its inputs."""
    if tower not in ("", "image", "text"):
        raise MaskkitError(f"--tower {tower!r}: image or text (two-tower models only)")
    if length is not None and image_size is not None:
        raise MaskkitError("give --length (a text model) or --image-size (an image model), not both")
    if source == "minilm":
        from maskkit.interop.hf_bert import load_hf_bert, minilm_dir

        model = load_hf_bert(minilm_dir())
        return text_profiled("all-MiniLM-L6-v2 (bundled)", model, model, length)
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return _hf(path, length, image_size, tower)
    if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        return _run(path, length, image_size, tower)
    raise MaskkitError(f"{source}: not a model (minilm, a Hugging Face directory with config.json, or a maskkit run "
                       "with checkpoints/)")


def _two_towers(description: str, model, length, image_size, tower: str) -> Profiled:
    """CLIP or FLIP: the image tower with its projection (encode_image), or the text tower (encode_text)."""
    if tower == "text" or length is not None:
        text_tower = nn.ModuleList([model.text, model.text_projection])       # what encode_text runs, counted alone
        profiled = text_profiled(f"{description}, text tower", text_tower, model.text, length)
        profiled.forward = model.encode_text
        return profiled
    image_tower = nn.ModuleList([model.encoder, model.image_projection])
    return image_profiled(f"{description}, image tower", image_tower, model.encoder, image_size, model.encode_image)


def _hf(path: Path, length, image_size, tower) -> Profiled:
    from maskkit.interop.hf import hf_model_type

    family = hf_model_type(path)
    description = f"Hugging Face {family or 'model'} {path}"
    if family == "clip":
        from maskkit.interop.hf_clip import load_hf_clip

        return _two_towers(description, load_hf_clip(path), length, image_size, tower)
    if tower:
        raise MaskkitError(f"--tower {tower}: {description} has one tower")
    if family == "vit_mae":
        from maskkit.interop.hf import load_hf_vitmae

        encoder = load_hf_vitmae(path).encoder
        return image_profiled(description, encoder, encoder, image_size)
    if family not in ("bert", ""):
        raise MaskkitError(f"{path}: a Hugging Face {family} model; profile reads BERT-family, CLIP and ViT-MAE "
                           "directories")
    from maskkit.interop.hf_bert import load_hf_bert

    model = load_hf_bert(path)
    if isinstance(model, SequenceClassifier):
        return text_profiled(description, model, model.backbone, length)
    encoder = model if isinstance(model, TextTransformer) else model.encoder
    return text_profiled(description, encoder, encoder, length)


def _run(path: Path, length, image_size, tower) -> Profiled:
    from maskkit.eval.run import method_from_checkpoint
    from maskkit.train.checkpoint import find_checkpoint

    method, cfg = method_from_checkpoint(find_checkpoint(path))
    description = f"maskkit {cfg.method} run {path}"
    if hasattr(method, "encode_text") and hasattr(method, "encode_image"):
        return _two_towers(description, method, length, image_size, tower)
    if tower:
        raise MaskkitError(f"--tower {tower}: {description} has one tower")
    classifier = getattr(method, "model", None)               # TinyBERT: the student (or teacher) classifier
    if isinstance(classifier, SequenceClassifier):
        return text_profiled(description, classifier, classifier.backbone, length)
    backbone = method.backbone
    if isinstance(backbone, TextTransformer):
        if image_size is not None:
            raise MaskkitError(f"--image-size: {description} is a text model (give --length)")
        return text_profiled(description, backbone, backbone, length)
    if isinstance(backbone, ViT):
        if length is not None:
            raise MaskkitError(f"--length: {description} is an image model (give --image-size)")
        return image_profiled(description, backbone, backbone, image_size)
    raise MaskkitError(f"{description}: its backbone is a {type(backbone).__name__}, which profile cannot feed")
