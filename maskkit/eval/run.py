"""Evaluate a pretrained backbone with MAE's protocols (He et al. 2021, Sec 4): kNN, linear probe, fine-tuning.

`evaluate(path, protocol)` loads the backbone of a run, runs the protocol on the labelled data set of
the run's config, and runs it again on a ViT of the same shape with random weights, so the result shows
what pretraining bought over the architecture alone. The result is also written to RUN/eval.json:
{protocol: [result, ...]}, one result per checkpoint and settings.
"""

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from maskkit.config import (
    Config,
    apply_overrides,
    build_dataclass,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
)
from maskkit.data.augment import ImageAugment
from maskkit.data.images import labelled_dataset, labelled_name
from maskkit.data.text import build_document_dataset, run_vocabulary
from maskkit.errors import MaskkitError
from maskkit.eval.features import extract_features
from maskkit.eval.finetune import finetune, labels_per_class
from maskkit.eval.linear_probe import linear_probe
from maskkit.eval.text import task_accuracy
from maskkit.files import atomic_write_text, writing
from maskkit.interop.pretrained import build_with_frozen_parts
from maskkit.nn.knn import knn_accuracy
from maskkit.nn.transformer import SequenceClassifier, ViT, ViTConfig
from maskkit.runlock import RunLock
from maskkit.train.checkpoint import check_state_dict, find_checkpoint, load_weights, read_state
from maskkit.train.distributed import pick_device

log = logging.getLogger("maskkit")
PROTOCOLS = ("linear", "knn", "finetune", "dense-probe", "zero-shot", "retrieval", "text-classify", "text-probe",
             "seq2seq", "tokens", "lm-features", "classify")
TWO_TOWER_PROTOCOLS = ("zero-shot", "retrieval")
TEXT_PROTOCOLS = ("text-classify", "text-probe", "seq2seq")
LQAE_PROTOCOLS = ("tokens", "lm-features")      # maskkit/eval/lqae.py
RECORD_WAIT_S = 3.0    # another eval holds the run's lock for the milliseconds of its own write

# The config keys each protocol reads. An override of any other key would change nothing, so `evaluate` refuses
# it instead of recording a setting that had no effect; the values of these keys are recorded with each result.
# The run's vocabulary is fixed by its weights, so the text protocols do not read data.tokenizer (they use the
# run's pinned RUN/tokenizer.json).
_LABELLED_IMAGES = ("data.name", "data.path", "data.image_size", "data.in_channels", "data.eval_split", "data.strict",
                    "data.mean", "data.std")
_PAIRS = ("data.name", "data.path", "data.image_column", "data.caption_column", "data.image_size", "data.in_channels",
          "data.num_samples", "data.eval_split", "data.tokenizer", "data.vocab_size", "data.context_length",
          "data.mean", "data.std")
_DOCUMENTS = ("data.name", "data.path", "data.documents", "data.text_field", "data.split", "data.split_seed",
              "data.max_documents")
READS = {
    "knn": (*_LABELLED_IMAGES, "eval.pool", "eval.batch_size", "eval.knn_k", "eval.knn_temperature"),
    "linear": (*_LABELLED_IMAGES, "eval.pool", "eval.batch_size", "eval.probe_epochs", "eval.probe_lr",
               "eval.probe_batch_size"),
    "finetune": (*_LABELLED_IMAGES, "eval.pool", "eval.finetune_epochs", "eval.finetune_lr", "eval.finetune_batch_size",
                 "eval.finetune_labels_per_class", "eval.finetune_crop_scale", "eval.finetune_hflip"),
    "dense-probe": ("data.mean", "data.std"),         # its own data: the shapes world at the backbone's size
    "zero-shot": _PAIRS,
    "retrieval": _PAIRS,
    "text-classify": (*_DOCUMENTS, "data.label_field", "eval.text_max_length", "eval.text_labels", "eval.text_epochs",
                      "eval.text_lr", "eval.text_batch_size"),
    "text-probe": (*_DOCUMENTS, "data.label_field", "eval.text_max_length", "eval.text_labels", "eval.text_batch_size",
                   "eval.probe_epochs", "eval.probe_lr", "eval.probe_batch_size"),
    "seq2seq": (*_DOCUMENTS, "data.target_field", "eval.seq2seq_source_length", "eval.seq2seq_target_length",
                "eval.seq2seq_epochs", "eval.seq2seq_test_documents", "eval.text_lr", "eval.text_batch_size",
                "eval.beam_size"),
    "tokens": (*_LABELLED_IMAGES, "eval.batch_size"),
    "lm-features": (*_LABELLED_IMAGES, "eval.batch_size", "eval.knn_k", "eval.knn_temperature", "eval.probe_epochs",
                    "eval.probe_lr", "eval.probe_batch_size"),
    "classify": ("eval.test_documents", "data.text_field", "data.label_field", "eval.text_batch_size"),
}
RUNTIME_OVERRIDES = ("train.threads",)   # how fast, not what: accepted by every protocol, not part of its settings


def find_weights(path: str | Path) -> Path:
    """The checkpoint directory or backbone.safetensors file that `path` stands for.

    A run directory gives its latest checkpoint, or its backbone.safetensors when it has no checkpoint.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MaskkitError(
            f"{path} does not exist; expected a run directory, a checkpoint directory or a backbone.safetensors file"
        )
    if path.is_file():
        return path
    if any((path / name).is_file() for name in ("state.json", "latest", "checkpoints/latest")):
        return find_checkpoint(path)
    if (path / "backbone.safetensors").is_file():
        return path / "backbone.safetensors"
    raise MaskkitError(f"{path} holds neither a checkpoint (checkpoints/latest) nor a backbone.safetensors")


def load_backbone(path: str | Path) -> tuple[ViT, Config]:
    """(backbone, config) from a run directory, a checkpoint directory or a backbone.safetensors file.

    A checkpoint brings the full config of its run (state.json). A backbone.safetensors file brings the
    ViT config in its metadata, plus the run's config.yaml when one sits next to it; without one, the
    data and eval sections are the defaults (at the backbone's image size).
    """
    source = find_weights(path)
    return _from_checkpoint(source) if source.is_dir() else _from_safetensors(source)


def method_from_checkpoint(checkpoint: Path):
    """(method with the checkpoint's weights, the run's config) from a checkpoint directory."""
    state = read_state(checkpoint)
    if not isinstance(state.get("config"), dict):
        raise MaskkitError(f"{checkpoint / 'state.json'} holds no config, so the model cannot be rebuilt")
    cfg = config_from_dict(state["config"], source=str(checkpoint / "state.json"))
    method = build_with_frozen_parts(cfg)
    load_weights(method, checkpoint)
    return method, cfg


# The protocols of the methods without a ViT, the default (`maskkit eval RUN`) first; every other method is
# evaluated on images, knn by default.
_TEXT = ("text-probe", "text-classify", "seq2seq")
PROTOCOLS_OF_METHOD = {"mlm": _TEXT, "xlnet": _TEXT, "pmlm": _TEXT, "tinybert": ("classify",)}


def _from_checkpoint(checkpoint: Path) -> tuple[ViT, Config]:
    method, cfg = method_from_checkpoint(checkpoint)
    if not isinstance(method.backbone, ViT):
        fitting = PROTOCOLS_OF_METHOD.get(cfg.method)
        instead = f"; evaluate it with --protocol {' or '.join(fitting)}" if fitting else ""
        raise MaskkitError(f"{checkpoint}: method {cfg.method!r} has no ViT backbone to evaluate on images{instead}")
    return method.backbone, cfg


def _from_safetensors(file: Path) -> tuple[ViT, Config]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise MaskkitError(f"{file}: unreadable safetensors file ({error})") from None
    config_yaml = file.parent / "config.yaml"
    run_cfg = load_config(str(config_yaml)) if config_yaml.is_file() else None
    if "config" in metadata:
        try:
            values = json.loads(metadata["config"])
        except json.JSONDecodeError:
            raise MaskkitError(f"{file}: the 'config' metadata is not JSON") from None
        vit_cfg = build_dataclass(ViTConfig, values, source=f"{file} (metadata 'config')")
    elif run_cfg is not None and isinstance(getattr(run_cfg.model, "encoder", None), ViTConfig):
        vit_cfg = run_cfg.model.encoder
    else:
        raise MaskkitError(f"{file}: no ViT config in its metadata and no config.yaml next to it")
    if run_cfg is None:
        # A bare backbone file does not say which method trained it; `mae` only fills the model section.
        run_cfg = config_from_dict(
            {"method": "mae", "model": {"encoder": dataclasses.asdict(vit_cfg)},
             "data": {"image_size": vit_cfg.image_size, "in_channels": vit_cfg.in_channels}},
            source=str(file),
        )
    backbone = ViT(vit_cfg)
    check_state_dict(weights, backbone.state_dict(), file)
    backbone.load_state_dict(weights)
    return backbone, run_cfg


def load_method(source: Path):
    """(method, config) of a checkpoint, for protocols that need more than the backbone (both towers)."""
    if not source.is_dir():
        raise MaskkitError(f"{source}: zero-shot and retrieval need a run or checkpoint directory (both towers), "
                           "not an exported backbone")
    method, cfg = method_from_checkpoint(source)
    if not hasattr(method, "encode_text"):
        raise MaskkitError(f"{source}: method {cfg.method!r} has no text tower; zero-shot and retrieval need one (flip)")
    return method, cfg


def evaluate_two_towers(method, cfg: Config, protocol: str, device="cpu", seed: int = 0) -> dict:
    """Zero-shot classification or retrieval for `method` and for the same model with random weights."""
    from maskkit.data import build_data
    from maskkit.data.pairs import DIGIT_NAMES
    from maskkit.data.shapes import CLASS_NAMES
    from maskkit.eval.zero_shot import DIGIT_TEMPLATES, SHAPE_TEMPLATES, retrieval_recall, zero_shot_accuracy

    device = _device(device)
    data_cfg = cfg.data
    if data_cfg.name not in ("shapes", "digits") and protocol == "zero-shot":
        raise MaskkitError(f"zero-shot needs class names: data.name=shapes or digits, not {data_cfg.name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_init = build_with_frozen_parts(cfg)
    models = {"pretrained": copy.deepcopy(method).to(device), "random_init": random_init.to(device)}
    result = {"protocol": protocol, "dataset": data_cfg.name}       # no "num_train": nothing is trained
    if protocol == "zero-shot":
        names, templates = (CLASS_NAMES, SHAPE_TEMPLATES) if data_cfg.name == "shapes" else (DIGIT_NAMES, DIGIT_TEMPLATES)
        test = build_data(data_cfg, "test")
        seen = build_data(data_cfg, "seen") if data_cfg.name == "shapes" else None
        result["num_test"] = len(test.dataset)
        for name, model in models.items():
            result[name] = zero_shot_accuracy(model, test, names, templates, device=device)
            if seen is not None:
                result[f"{name}_seen_pairs"] = zero_shot_accuracy(model, seen, names, templates, device=device)
        result["chance"] = 1 / len(names)
        return result
    test = build_data(data_cfg, "val" if data_cfg.name == "shapes" else "test")
    result["num_test"] = len(test.dataset)
    for name, model in models.items():
        recalls = retrieval_recall(model, test, device=device)
        result[f"{name}_recall"] = recalls
        result[name] = (recalls["image_to_text_R@1"] + recalls["text_to_image_R@1"]) / 2   # the headline number
    return result


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise MaskkitError(f"unknown evaluation protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def check_overrides(protocol: str, overrides: Sequence[str]) -> None:
    """Refuse an override of a key that `protocol` does not read: it would be recorded but change nothing."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith("model."):
            raise MaskkitError(f"override {override!r}: the model's shape comes from the saved weights, not the config")
        if key not in READS[protocol] and key not in RUNTIME_OVERRIDES:
            raise MaskkitError(f"override {key} has no effect on {protocol}, which reads only "
                               f"{', '.join(READS[protocol] + RUNTIME_OVERRIDES)}")


def settings_of(cfg: Config, protocol: str, seed: int) -> dict:
    """{key: value} of every key `protocol` reads, and the seed: what tells one result of it from another."""
    values = flatten(config_to_dict(cfg))
    return {**{key: values.get(key) for key in READS[protocol]}, "seed": seed}


def _device(name: str | torch.device) -> torch.device:
    # pick_device knows auto / cpu / cuda (and fails clearly without CUDA); anything else is torch's to parse.
    if name in ("auto", "cpu", "cuda"):
        return pick_device(name, setting="--device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MaskkitError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None


def evaluate_backbones(
    backbone: ViT,
    cfg: Config,
    protocols: Sequence[str] = ("knn", "linear"),
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """{protocol: result} for `backbone` and for a ViT of the same config with random weights (seed `seed`).

    A result holds "protocol", "dataset", "pretrained" and "random_init" (test accuracies in [0, 1]),
    "num_train" and "num_test". `backbone` itself is not modified: a copy goes to `device`.
    """
    for protocol in protocols:
        _check_protocol(protocol)
    device = _device(device)
    results = {}
    if "dense-probe" in protocols:            # its own data (the shapes world), not the labelled set
        results["dense-probe"] = dense_probe_both(backbone, cfg, device, seed)
        protocols = [p for p in protocols if p != "dense-probe"]
        if not protocols:
            return results
    if cfg.data.eval_split == 0:
        raise MaskkitError(
            f"{', '.join(protocols)}: the run has no held-out split (data.eval_split=0: it pretrained on every image "
            f"of {cfg.data.name}); evaluate on another labelled set (data.name=folder data.path=DIR), or hold out "
            "images it pretrained on with data.eval_split=0.3"
        )
    train_set, test_set = labelled_dataset(cfg.data, "train"), labelled_dataset(cfg.data, "test")
    num_classes = train_set.dataset.num_classes    # both labelled sets (digits, folder) define it
    augment = ImageAugment(cfg.data)
    ecfg = cfg.eval
    # Fine-tuning crops and flips by eval.finetune_crop_scale / eval.finetune_hflip (see EvalConfig).
    # One view, no colour augmentation, whatever the pretraining used (two views for MoCo / DenseCL).
    single_view = {"views": 1, "color": False} if hasattr(cfg.data, "views") else {}
    finetune_augment = ImageAugment(dataclasses.replace(
        cfg.data, crop_scale=list(ecfg.finetune_crop_scale), hflip=ecfg.finetune_hflip, **single_view))
    with torch.random.fork_rng(devices=[]):        # seeded, without moving the caller's global generator
        torch.manual_seed(seed)
        random_init = ViT(backbone.cfg)
    backbones = {"pretrained": copy.deepcopy(backbone).to(device), "random_init": random_init.to(device)}
    # eval.finetune_labels_per_class > 0: a few labels of each class, the same ones for both backbones.
    finetune_set = (labels_per_class(train_set, ecfg.finetune_labels_per_class, num_classes, seed)
                    if ecfg.finetune_labels_per_class else train_set)
    sizes = {"num_train": len(train_set), "num_test": len(test_set)}
    results.update({protocol: {"protocol": protocol, "dataset": labelled_name(cfg.data.name), **sizes}
                    for protocol in protocols})
    for name, model in backbones.items():
        features = None  # (train_f, train_y, test_f, test_y), computed once for kNN and the probe together
        for protocol in protocols:
            if protocol == "finetune":
                results[protocol][name] = finetune(
                    model, finetune_set, test_set, finetune_augment, num_classes, epochs=ecfg.finetune_epochs,
                    lr=ecfg.finetune_lr, batch_size=ecfg.finetune_batch_size, pool=ecfg.pool, seed=seed,
                    device=device, progress=progress,
                )
                results[protocol]["num_train"] = len(finetune_set)
                continue
            if features is None:
                features = (
                    *extract_features(model, train_set, augment.normalize, ecfg.pool, ecfg.batch_size, device),
                    *extract_features(model, test_set, augment.normalize, ecfg.pool, ecfg.batch_size, device),
                )
            # Counted from the features: images that could not be decoded are not in them.
            results[protocol].update(num_train=len(features[1]), num_test=len(features[3]))
            if protocol == "knn":
                results[protocol][name] = knn_accuracy(
                    *features, k=ecfg.knn_k, temperature=ecfg.knn_temperature, num_classes=num_classes
                )
            else:
                probe = linear_probe(
                    *features, num_classes, epochs=ecfg.probe_epochs, lr=ecfg.probe_lr,
                    batch_size=ecfg.probe_batch_size, seed=seed,
                )
                results[protocol][name] = probe.test_accuracy
    return results


def dense_probe_both(backbone: ViT, cfg: Config, device, seed: int = 0) -> dict:
    """The dense probe (mIoU on held-out shapes-world images) for `backbone` and its random init."""
    from maskkit.eval.dense_probe import dense_probe

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_init = ViT(backbone.cfg)
    normalize = ImageAugment(cfg.data).normalize
    result = {"protocol": "dense-probe", "dataset": "shapes (segmentation)", "num_train": 1024, "num_test": 512}
    for name, model in (("pretrained", copy.deepcopy(backbone).to(device)), ("random_init", random_init.to(device))):
        scores = dense_probe(model, normalize, seed=seed, device=device)
        result[name], result[f"{name}_pixel_accuracy"] = scores["miou"], scores["pixel_accuracy"]
    return result


def _text_splits(cfg: Config, keep) -> tuple[dict, list[str]]:
    """({"train": documents, "test": documents} kept by `keep`, class names), the corpus read once."""
    from maskkit.data.text import read_corpus, split_documents

    corpus = read_corpus(cfg.data)
    splits = {split: [d for d in split_documents(corpus.documents, cfg.data.split, cfg.data.split_seed, split)
                      if keep(d)] for split in ("train", "test")}
    return splits, corpus.label_names


def text_examples(cfg: Config, max_length: int):
    """(train, test) TextExamples of the labelled documents, and the class names, for text-classify."""
    from maskkit.data.tokenizer import build_text_tokenizer
    from maskkit.eval.text import TextExamples

    splits, names = _text_splits(cfg, lambda d: d.label >= 0)
    tokenizer = build_text_tokenizer(cfg.data.tokenizer, max_length)
    examples = []
    for split, documents in splits.items():
        if not documents:
            raise MaskkitError(f"text-classify: the {split} split of {cfg.data.name} has no labelled document"
                               + ("" if cfg.data.name == "wiki" else "; name the label with data.label_field"))
        ids, mask = tokenizer.encode([d.text for d in documents])
        examples.append(TextExamples(ids, mask, torch.tensor([d.label for d in documents])))
    return *examples, names


def seq2seq_examples(cfg: Config):
    """(train, test) Seq2SeqExamples of the documents with a target (at most eval.seq2seq_test_documents test
    ones), and the tokenizer, for seq2seq."""
    from maskkit.data.tokenizer import build_text_tokenizer
    from maskkit.eval.text import Seq2SeqExamples

    e = cfg.eval
    splits, _ = _text_splits(cfg, lambda d: bool(d.target))
    if e.seq2seq_test_documents:
        splits["test"] = splits["test"][: e.seq2seq_test_documents]
    tokenizer = build_text_tokenizer(cfg.data.tokenizer, e.seq2seq_source_length)
    examples = []
    for split, documents in splits.items():
        if not documents:
            raise MaskkitError(f"seq2seq: the {split} split of {cfg.data.name} has no document with a target"
                               + ("" if cfg.data.name == "wiki" else "; name it with data.target_field"))
        sources = [ids[: e.seq2seq_source_length] for ids in tokenizer.encode_plain([d.text for d in documents])]
        examples.append(Seq2SeqExamples(sources, tokenizer.encode_plain([d.target for d in documents])))
    return *examples, tokenizer


def random_backbone(cfg: Config, seed: int):
    """The backbone of the run's method with fresh weights (seed `seed`), the caller's generator untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_with_frozen_parts(cfg).backbone


def labelled_documents(cfg: Config, protocol: str):
    """(train, test, result) for the text protocols that classify: the labelled documents, the training ones cut to
    eval.text_labels (class-stratified) when set, and the result's start: num_train, num_test, classes and the
    majority-class rate."""
    from maskkit.eval.text import stratified_subset, subset

    e = cfg.eval
    train, test, names = text_examples(cfg, e.text_max_length)
    if e.text_labels:
        if e.text_labels > len(train):
            log.info("%s: eval.text_labels=%d, but the training split has %d labelled documents; using all",
                     protocol, e.text_labels, len(train))
        train = subset(train, stratified_subset(train.labels, e.text_labels, cfg.data.split_seed))
    result = {"num_train": len(train), "num_test": len(test), "classes": names,
              "majority": float(torch.bincount(test.labels).max()) / len(test)}
    return train, test, result


def text_classify(models: dict, cfg: Config, device="cpu", seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune each of `models` ({name: backbone}) on the labelled training documents; {name: test accuracy,
    name_curve: accuracy per epoch} with num_train, num_test, classes and the majority-class rate."""
    from maskkit.eval.text import finetune_text_classifier

    e = cfg.eval
    train, test, result = labelled_documents(cfg, "text-classify")
    names = result["classes"]
    log.info("text-classify: fine-tuning %d model(s) on %d classes (%d train / %d test documents)", len(models),
             len(names), len(train), len(test))
    for name, model in models.items():
        scores = finetune_text_classifier(model, train, test, num_classes=len(names), epochs=e.text_epochs,
                                          lr=e.text_lr, batch_size=e.text_batch_size, seed=seed, device=device,
                                          progress=progress)
        result[name], result[f"{name}_curve"] = scores["accuracy"], scores["curve"]
    return result


def text_probe(models: dict, cfg: Config, device="cpu", seed: int = 0) -> dict:
    """A linear probe on each of `models`' frozen features ({name: backbone}; the mean of the real tokens) of the
    labelled training documents (eval.text_labels of them when set); {name: test accuracy} with num_train,
    num_test, classes and the majority-class rate.

    Fine-tuning lets a random init learn a bag of words from the labels themselves, which on these topics is
    nearly all the task needs; a frozen probe reads only what the weights already hold, so it is the protocol
    that shows what pretraining put there (the issue's "linear probe on frozen features").
    """
    from maskkit.eval.linear_probe import linear_probe
    from maskkit.eval.text import text_features

    e = cfg.eval
    train, test, result = labelled_documents(cfg, "text-probe")
    names = result["classes"]
    for name, model in models.items():
        model = model.to(device)
        probe = linear_probe(text_features(model, train, e.text_batch_size, device), train.labels,
                             text_features(model, test, e.text_batch_size, device), test.labels, len(names),
                             epochs=e.probe_epochs, lr=e.probe_lr, batch_size=e.probe_batch_size, seed=seed)
        result[name], result[f"{name}_train"] = probe.test_accuracy, probe.train_accuracy
    return result


def evaluate_text(backbone, cfg: Config, protocol: str, device="cpu", seed: int = 0, progress: bool = True) -> dict:
    """text-classify, text-probe or seq2seq for `backbone` and for the same architecture with random weights."""
    from maskkit.eval.text import finetune_seq2seq

    if getattr(cfg.data, "kind", "image") != "text":
        raise MaskkitError(f"{protocol} evaluates text models; this run trained on data.kind={cfg.data.kind}")
    device = _device(device)
    models = {"pretrained": backbone, "random_init": random_backbone(cfg, seed)}
    result = {"protocol": protocol, "dataset": cfg.data.name}
    if protocol == "text-classify":
        return {**result, **text_classify(models, cfg, device, seed, progress)}
    if protocol == "text-probe":
        return {**result, **text_probe(models, cfg, device, seed)}
    e = cfg.eval
    train, test, tokenizer = seq2seq_examples(cfg)
    result.update(num_train=len(train), num_test=len(test), beam_size=e.beam_size)
    for name, model in models.items():
        scores = finetune_seq2seq(model, train, test, special=tokenizer.special_ids(), epochs=e.seq2seq_epochs,
                                  lr=e.text_lr, batch_size=e.text_batch_size, seed=seed, device=device,
                                  max_target_length=e.seq2seq_target_length, beam_size=e.beam_size,
                                  decode=tokenizer.decode, progress=progress)
        result[name], result[f"{name}_exact_match"] = scores["rouge_l"], scores["exact_match"]
        result[f"{name}_examples"] = [list(example) for example in scores["examples"][:5]]
    return result


def evaluate_lqae(method, cfg: Config, protocol: str, png: Path, device="cpu", seed: int = 0) -> dict:
    """tokens or lm-features (maskkit/eval/lqae.py) for an LQAE run and for a random init of it (same frozen LM)."""
    from maskkit.eval.lqae import lm_features_protocol, require_lqae, tokens_protocol

    require_lqae(method, protocol)
    device = _device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_init = build_with_frozen_parts(cfg)
    models = {"pretrained": method, "random_init": random_init}
    if protocol == "tokens":
        return tokens_protocol(models, cfg, png, device)
    return lm_features_protocol(models, cfg, device, seed)


def test_documents_of(run_dir: Path, given: str = "") -> Path:
    """`given`, else the test.jsonl that `maskkit distill` writes in its folder (RUN/.., or RUN for its root)."""
    if given:
        path = Path(given).expanduser()
    else:
        candidates = [run_dir / "test.jsonl", run_dir.parent / "test.jsonl"]
        path = next((p for p in candidates if p.is_file()), candidates[-1])
    if not path.is_file():
        raise MaskkitError(f"{path}: no test documents for this classifier (maskkit distill writes them next to its "
                           "stages; name a JSON-lines file of {\"text\", \"label\"} with eval.test_documents=FILE, "
                           "or --test FILE to compress and pareto)")
    return path


def classify(model, cfg: Config, run_dir: Path, test_documents: str = "") -> dict:
    """Test accuracy of a classifier (a TinyBERT stage, or a compressed one) on labelled documents, matched to its
    classes by name; the majority class's share beside it. There is no random init to compare: an untrained
    classifier is at chance."""
    if not isinstance(model, SequenceClassifier) or getattr(cfg.model, "stage", "") == "general":
        raise MaskkitError(f"{run_dir}: method {cfg.method!r} without a trained classifier; classify evaluates TinyBERT's "
                           "stages after the general one (which distils the backbone only), e.g. prediction")
    path = test_documents_of(run_dir, test_documents)
    data = dataclasses.replace(run_vocabulary(cfg.data, run_dir), name="jsonl", path=str(path), split=[0.0, 0.0, 1.0],
                               examples="documents", max_documents=0, label_field=cfg.data.label_field or "label")
    documents, _, names = build_document_dataset(data, "test")
    labels = documents.dataset.labels
    majority = int(torch.bincount(labels).max()) / len(labels)
    accuracy = task_accuracy(model, documents.dataset, model.labels, names, batch_size=cfg.eval.text_batch_size)
    unknown = sorted(set(names) - set(model.labels))
    return {"protocol": "classify", "dataset": str(path), "num_test": len(labels), "accuracy": accuracy,
            "majority": majority, **({"unknown_classes": unknown} if unknown else {})}


def _eval_json_path(source: Path) -> Path:
    """RUN/eval.json for a checkpoint under RUN/checkpoints/, else next to the file or in the checkpoint."""
    if source.is_file():
        return source.parent / "eval.json"
    return (source.parent.parent if source.parent.name == "checkpoints" else source) / "eval.json"


def default_protocol(source: Path) -> str:
    """What `maskkit eval RUN` measures without --protocol: knn for an image backbone, classify for a TinyBERT
    stage, text-probe (the quick one: a linear probe on frozen features) for a text model."""
    if not source.is_dir():
        return "knn"
    config = read_state(source).get("config")
    method = config.get("method") if isinstance(config, dict) else None
    return PROTOCOLS_OF_METHOD.get(method, ("knn",))[0]


def evaluate(
    path: str | Path,
    protocol: str | None,
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run `protocol` (one of PROTOCOLS; None: `default_protocol` of the run) on the model at `path` and on a random
    init of it.

    `overrides` are dotted `key=value` strings for the data and eval keys the protocol reads (`READS`, e.g.
    `eval.knn_k=10`, `data.name=folder`, `data.path=DIR`); any other key is refused. Returns the result, with
    its "overrides" and "settings" (the values of every key the protocol read, and the seed), and records it
    in the run's eval.json under its protocol, next to the results of other settings and protocols.

    Writing eval.json makes eval a writer of the run directory, so it takes the run's lock
    (`maskkit.runlock`) for the read-modify-write of eval.json: a run that is training refuses it, and
    two evals of one run keep both results. The lock is checked before the work too, so a refusal comes
    at once rather than after it. A result that cannot be recorded (a read-only folder, a full disk, a
    run that started training meanwhile) is still returned, with "eval_json" None and the reason in
    "not_recorded".
    """
    source = find_weights(path)
    protocol = protocol or default_protocol(source)
    _check_protocol(protocol)
    check_overrides(protocol, overrides)
    lock = RunLock(_eval_json_path(source).parent, f"eval records its result in {_eval_json_path(source)}, so run it "
                   "when that finishes (or evaluate a copy of the checkpoint)")
    lock.check_free(wait=RECORD_WAIT_S)
    if protocol in TWO_TOWER_PROTOCOLS:
        method, cfg = load_method(source)
    elif protocol in TEXT_PROTOCOLS or protocol in LQAE_PROTOCOLS or protocol == "classify":
        if not source.is_dir():
            raise MaskkitError(f"{source}: {protocol} needs a run or checkpoint directory, not an exported file")
        method, cfg = method_from_checkpoint(source)
    else:
        backbone, cfg = load_backbone(source)
    if overrides:
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), list(overrides)), source="overrides")
    if protocol in TEXT_PROTOCOLS:
        cfg.data = run_vocabulary(cfg.data, _eval_json_path(source).parent)
    if cfg.train.threads and _device(device).type == "cpu":
        torch.set_num_threads(cfg.train.threads)  # as `train` does: train.threads=1 helps on a busy machine
    if protocol in TWO_TOWER_PROTOCOLS:
        result = evaluate_two_towers(method, cfg, protocol, device, seed)
    elif protocol in TEXT_PROTOCOLS:
        result = evaluate_text(method.backbone, cfg, protocol, device, seed, progress)
    elif protocol == "classify":
        result = classify(getattr(method, "model", None), cfg, _eval_json_path(source).parent, cfg.eval.test_documents)
    elif protocol in LQAE_PROTOCOLS:
        result = evaluate_lqae(method, cfg, protocol, _eval_json_path(source).parent / "tokens.png", device, seed)
    else:
        result = evaluate_backbones(backbone, cfg, [protocol], device, seed, progress)[protocol]
    result.update(checkpoint=str(source), overrides=list(overrides), settings=settings_of(cfg, protocol, seed))
    try:
        record(result, _eval_json_path(source), lock)
    except MaskkitError as error:
        result["eval_json"], result["not_recorded"] = None, str(error)
    return result


def read_results(path: Path) -> dict[str, list[dict]]:
    """{protocol: [result, ...]} recorded in the eval.json at `path`, oldest first ({} when there is none).

    Files written before results carried their settings hold one result per protocol; it is read as a list of one.
    """
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        recorded = {}
    if not isinstance(recorded, dict):
        return {}
    return {protocol: [results] if isinstance(results, dict) else [r for r in results if isinstance(r, dict)]
            for protocol, results in recorded.items() if isinstance(results, (dict, list))}


def record(result: dict, path: Path, lock: RunLock) -> None:
    """Add `result` to the list of its protocol in eval.json at `path`.

    It replaces only an earlier result of the same checkpoint with the same settings; the results of other
    settings, checkpoints and protocols stay.
    """
    with writing(path):
        lock.acquire(wait=RECORD_WAIT_S)
        try:
            recorded = read_results(path)
            result["eval_json"] = str(path)
            same = (result["checkpoint"], result.get("settings"))
            kept = [r for r in recorded.get(result["protocol"], []) if (r.get("checkpoint"), r.get("settings")) != same]
            recorded[result["protocol"]] = [*kept, result]
            atomic_write_text(path, json.dumps(recorded, indent=1) + "\n")
        finally:
            lock.release()
