"""Methods built with frozen pretrained parts (LQAE's language model): the one place that loads them.

A method config that needs pretrained weights it does not train lists them in `frozen_parts()` ({argument:
source}); `build_with_frozen_parts(cfg)` loads each source here (interop is the layer that reads Hugging Face models) and hands the
loaded modules to the method's constructor, so that methods/ never imports interop. Every other method is built as
`build_method` builds it.
"""

from pathlib import Path

from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.methods import METHODS, Method


def build_with_frozen_parts(cfg) -> Method:
    """The method a config names, with its frozen parts loaded (see the module docstring)."""
    method_cls, _ = METHODS[cfg.method]
    sources = cfg.model.frozen_parts() if hasattr(cfg.model, "frozen_parts") else {}
    parts = {}
    for argument, source in sources.items():
        parts[argument], parts["tokenizer"] = load_language_model(source, f"model.{argument}")
    return method_cls(cfg.model, **parts)


def load_language_model(source: str, key: str = "model.lm"):
    """(a TextTransformer, or an MLM with its head for a BertForMaskedLM, and its Tokenizer) from minilm or a
    Hugging Face BERT directory with its tokenizer files."""
    from maskkit.interop.hf_bert import load_hf_bert, minilm_dir

    if source == "minilm":
        model, tokenizer_file = load_hf_bert(minilm_dir()), minilm_tokenizer_file()
    else:
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise MaskkitError(f"{key}={source}: not a Hugging Face BERT directory (no config.json); give minilm or "
                               "a directory written by save_pretrained")
        try:
            model = load_hf_bert(path)
        except MaskkitError as error:
            raise MaskkitError(f"{key}={source}: {error}") from None
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise MaskkitError(f"{key}={source}: no tokenizer.json beside the model (save the fast tokenizer too)")
    if type(model).__name__ == "SequenceClassifier":
        model = model.backbone
    encoder = getattr(model, "encoder", model)
    return model.eval(), Tokenizer.from_file(tokenizer_file, encoder.cfg.context_length)
