"""Typed configs: plain dataclasses, loaded from YAML recipes with dotted `key=value` overrides.

A recipe names its method (`method: mae`); the `model:` section is that method's config dataclass
(`METHODS` in maskkit/methods/__init__.py). Unknown keys and values of the wrong type fail with one
line that names the key and lists the valid ones.
"""

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskkit.data.common import check_crop_scale
from maskkit.data.images import DataConfig, check_image_data
from maskkit.data.pairs import PairDataConfig, check_pair_data
from maskkit.data.text import TextDataConfig, check_text_data
from maskkit.errors import MaskkitError, require, require_float, require_int

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4          # MAE Sec A.1: lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05       # not applied to norms, biases, or tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    clip_grad: float = 0.0           # max gradient norm; 0 turns clipping off


@dataclass
class TrainConfig:
    steps: int = 1000                # optimizer steps
    batch_size: int = 64             # global batch per optimizer step, over all ranks and accumulation
    accumulation_steps: int = 1
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    threads: int = 0                 # torch threads on CPU; 0 leaves torch's default
    init_from: str = ""              # a run or checkpoint whose weights start this (new) run; "" = random init
    precision: str = "fp32"          # fp32 | bf16 (autocast, on CUDA or on a CPU with AMX)
    # torch.compile the method's forward (and so its backward) in place: fewer, fused kernels for a one-off
    # compilation (about a minute on 2 CPU cores); the README (Using it) says when it pays.
    compile: bool = False
    # How several ranks (torchrun) share the work: ddp replicates the method on every rank and all-reduces its
    # gradients; fsdp2 shards every Transformer block's parameters, gradients and optimizer state over the ranks
    # (torch's fully_shard), for models whose training state does not fit one device. README, Scaling out.
    parallel: str = "ddp"            # ddp | fsdp2
    # Recompute each Transformer block's activations in the backward instead of keeping them: less memory for
    # about one more forward's compute (torch.utils.checkpoint, non-reentrant).
    activation_checkpointing: bool = False
    # Validation: every eval_every steps (and at the last), the method's own loss on the first eval_samples
    # samples of the held-out split, in eval mode (metrics.jsonl rows {"step", "val_loss"}); 0 = off.
    eval_every: int = 0
    eval_samples: int = 256
    # Image backbones also get the kNN protocol's accuracy (eval.knn_k, eval.knn_temperature, eval.pool) at
    # each measurement: the first eval_samples labelled held-out images, voted on by the first knn_bank
    # labelled training images, un-augmented (rows {"val_knn"}); 0 = held-out loss only.
    knn_bank: int = 2048
    keep_best: bool = False          # RUN/checkpoints/best names the best checkpoint by best_by
    best_by: str = "val_loss"        # val_loss (lowest) | val_knn (highest; image backbones)


@dataclass
class EvalConfig:
    pool: str = "cls"                # cls | mean: how an image becomes one feature vector
    knn_k: int = 20                  # weighted kNN as in Wu et al. 2018 / DINO: cosine, k=20, T=0.07
    knn_temperature: float = 0.07
    probe_epochs: int = 90
    probe_lr: float = 0.1
    probe_batch_size: int = 256
    finetune_epochs: int = 12        # with the crops below, 12 epochs fit digits; longer mostly lets a random init catch up
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 64
    # Fine-tune on this many labelled images of each class (a seeded choice), 0 = all: with few labels
    # the backbone's pretraining shows, where the full digits set lets a random init catch up.
    finetune_labels_per_class: int = 0
    # Fine-tuning's own augmentation, not data.crop_scale / data.hflip (which suit MAE pretraining): a
    # 35% crop of an upsampled 8x8 digit cuts the digit apart, and digits are not mirror-symmetric, so
    # with them the classifier could not even fit its training set. MAE (Appendix A.1, Table 9) fine-tunes
    # ImageNet with timm's random-resized crops and flips, whose classes survive both: for natural photos
    # eval.finetune_crop_scale=[0.08,1.0] eval.finetune_hflip=true is closer to the paper.
    finetune_crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    finetune_hflip: bool = False
    batch_size: int = 256            # feature extraction
    # Text protocols: text-classify fine-tunes on the corpus's labels (wiki: 11 topics), seq2seq generates the
    # target field (wiki: the short description) from the document, UniLM-style.
    text_max_length: int = 64        # tokens of a document the classifier reads ([CLS] and [SEP] included)
    text_epochs: int = 3
    text_lr: float = 3e-4
    text_batch_size: int = 32
    # text-classify with few labels: fine-tune on at most this many labelled training documents, a class-stratified
    # subset fixed by data.split_seed (0 = all). With all 7,216 wiki ones a bag of words already scores ~0.85, so a
    # randomly initialised Transformer does too; 1,000 leave room for what pretraining learnt (README, Text).
    text_labels: int = 0
    seq2seq_source_length: int = 64  # tokens of the document the decoder is conditioned on
    seq2seq_target_length: int = 16  # longest generated target
    seq2seq_epochs: int = 4
    seq2seq_test_documents: int = 300   # test documents decoded (generation is the slow part; 0 = all)
    beam_size: int = 1               # 1 = greedy decoding
    # classify (a TinyBERT stage's classifier, or a compressed one): JSON lines of {text, label}; "" = the
    # test.jsonl that `maskkit distill` writes next to its stages.
    test_documents: str = ""


@dataclass
class Config:
    name: str = "run"
    method: str = "mae"
    model: Any = None                # the method's config dataclass, chosen by `method`
    data: Any = field(default_factory=DataConfig)   # DataConfig (kind: image), PairDataConfig (pairs), TextDataConfig (text)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


DATA_KINDS = {"image": DataConfig, "pairs": PairDataConfig, "text": TextDataConfig}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str, source: str):
    """Check `value` against the annotation `tp` (dataclasses recursively); return the typed value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MaskkitError(f"{source}: key {key!r} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, source, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _convert(value, option, key, source)
                except MaskkitError:
                    pass
        raise MaskkitError(f"{source}: key {key!r} expects {tp}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise MaskkitError(f"{source}: key {key!r} expects a list, got {value!r}")
        return [_convert(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string, so numeric strings are accepted here.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise MaskkitError(f"{source}: key {key!r} expects a number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise MaskkitError(f"{source}: key {key!r} expects true or false, got {value!r}")
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise MaskkitError(f"{source}: key {key!r} expects {_type_name(tp)}, got {value!r}")
    return value


def build_dataclass(cls, values: dict, source: str = "config", prefix: str = ""):
    """Build `cls` from a dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise MaskkitError(
            f"{source}: unknown key {prefix + str(unknown[0])!r}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    return cls(**{k: _convert(v, hints[k], prefix + k, source) for k, v in values.items()})


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict."""
    for override in overrides:
        if "=" not in override:
            raise MaskkitError(f"override {override!r} is not of the form key=value (e.g. optim.base_lr=1e-3)")
        key, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise MaskkitError(f"override {override!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return values


def config_from_dict(values: dict, source: str = "config") -> Config:
    from maskkit.methods import METHODS

    values = dict(values)
    method = values.get("method", "mae")
    if method not in METHODS:
        raise MaskkitError(f"{source}: unknown method {method!r}; choose from {', '.join(METHODS)}")
    model_cls = METHODS[method][1]
    model = build_dataclass(model_cls, values.pop("model", None) or {}, source, prefix="model.")
    data_values = values.pop("data", None) or {}
    if not isinstance(data_values, dict):
        raise MaskkitError(f"{source}: key 'data' must be a mapping of data fields, got {data_values!r}")
    kind = data_values.get("kind", "image")
    if kind not in DATA_KINDS:
        raise MaskkitError(f"{source}: data.kind must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    data = build_dataclass(DATA_KINDS[kind], data_values, source, prefix="data.")
    cfg = build_dataclass(Config, values, source)
    cfg.model, cfg.data = model, data
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Every key's valid range, and the checks across keys; the method's config checks its own keys."""
    from maskkit.methods import METHODS

    # `maskkit train` without --out writes to runs/<name>: one folder name keeps it there (`../x` would not,
    # and an empty name would write into runs/ itself).
    require(cfg.name not in ("", ".", "..") and not set(cfg.name) & set("/\\\0"), source, "name", cfg.name,
            "one folder name (not empty, '.' or '..', no '/'): the run's folder runs/<name>")
    o, t, e = cfg.optim, cfg.train, cfg.eval
    require_float(source, "optim.base_lr", o.base_lr, 0.0)
    require_float(source, "optim.min_lr", o.min_lr, 0.0)
    require_float(source, "optim.weight_decay", o.weight_decay, 0.0)
    require(len(o.betas) == 2, source, "optim.betas", o.betas, "two numbers [beta1, beta2]")
    for i, beta in enumerate(o.betas):
        require_float(source, f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
    require_int(source, "optim.warmup_steps", o.warmup_steps, 0)
    require_float(source, "optim.clip_grad", o.clip_grad, 0.0)

    for key in ("steps", "batch_size", "accumulation_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        require_int(source, f"train.{key}", getattr(t, key), 1)
    require(t.batch_size % t.accumulation_steps == 0, source, "train.batch_size", t.batch_size,
            f"divisible by train.accumulation_steps={t.accumulation_steps}")
    require_int(source, "train.seed", t.seed, 0, 2**63 - 1)
    require_int(source, "train.eval_every", t.eval_every, 0)
    require_int(source, "train.eval_samples", t.eval_samples, 1)
    require_int(source, "train.knn_bank", t.knn_bank, 0)
    require(not t.keep_best or t.eval_every > 0, source, "train.keep_best", t.keep_best,
            "false while train.eval_every=0 (the best checkpoint is the best measurement on the held-out split)")
    require(t.best_by in ("val_loss", "val_knn"), source, "train.best_by", t.best_by, "val_loss or val_knn")
    if t.best_by == "val_knn":
        require(cfg.data.kind == "image", source, "train.best_by", t.best_by,
                f"val_loss: kNN accuracy is measured on image backbones only (data.kind={cfg.data.kind})")
        require(t.knn_bank > 0, source, "train.best_by", t.best_by, "val_loss while train.knn_bank=0 (no kNN)")
    require_int(source, "train.threads", t.threads, 0, 1024)
    require(t.device in ("auto", "cpu", "cuda"), source, "train.device", t.device, "auto, cpu or cuda")
    require(t.precision in ("fp32", "bf16"), source, "train.precision", t.precision, "fp32 or bf16")
    if t.precision == "bf16" and not METHODS[cfg.method][0].supports_bf16:
        raise MaskkitError(f"{source}: train.precision=bf16 is not supported by {cfg.method} (its numerics need "
                           "fp32); use train.precision=fp32")
    require(t.parallel in ("ddp", "fsdp2"), source, "train.parallel", t.parallel, "ddp or fsdp2")
    if t.parallel == "fsdp2" and (reason := METHODS[cfg.method][0].fsdp2_refusal):
        raise MaskkitError(f"{source}: train.parallel=fsdp2 is not supported by {cfg.method} ({reason}); "
                           "use train.parallel=ddp")
    if t.activation_checkpointing and (reason := METHODS[cfg.method][0].activation_checkpointing_refusal):
        raise MaskkitError(f"{source}: train.activation_checkpointing=true is not supported by {cfg.method} "
                           f"({reason}); use train.activation_checkpointing=false")
    if t.compile and (reason := METHODS[cfg.method][0].compile_refusal):
        raise MaskkitError(f"{source}: train.compile=true is not supported by {cfg.method} ({reason}); "
                           "use train.compile=false")

    require(e.pool in ("cls", "mean"), source, "eval.pool", e.pool, "cls or mean")
    for key in ("knn_k", "probe_epochs", "finetune_epochs", "finetune_batch_size", "batch_size"):
        require_int(source, f"eval.{key}", getattr(e, key), 1)
    # The probe's BatchNorm needs two samples to compute batch statistics.
    require_int(source, "eval.probe_batch_size", e.probe_batch_size, 2)
    require_int(source, "eval.finetune_labels_per_class", e.finetune_labels_per_class, 0)
    for key in ("knn_temperature", "probe_lr", "finetune_lr"):
        require_float(source, f"eval.{key}", getattr(e, key), 0.0, low_open=True)

    check_crop_scale(source, "eval.finetune_crop_scale", e.finetune_crop_scale)
    for key in ("text_epochs", "text_batch_size", "seq2seq_epochs", "beam_size"):
        require_int(source, f"eval.{key}", getattr(e, key), 1, 10_000)
    require_int(source, "eval.text_max_length", e.text_max_length, 3, 65536)
    require_int(source, "eval.text_labels", e.text_labels, 0)
    require_int(source, "eval.seq2seq_source_length", e.seq2seq_source_length, 1, 65536)
    require_int(source, "eval.seq2seq_target_length", e.seq2seq_target_length, 1, 65536)
    require_int(source, "eval.seq2seq_test_documents", e.seq2seq_test_documents, 0)
    require_float(source, "eval.text_lr", e.text_lr, 0.0, 1.0, low_open=True)
    if cfg.data.kind == "pairs":
        check_pair_data(cfg.data, source)
    elif cfg.data.kind == "text":
        check_text_data(cfg.data, source)
    else:
        check_image_data(cfg.data, source)
    cfg.model.check(cfg.data, source)
    if hasattr(cfg.model, "check_batch"):          # methods whose state depends on the global batch (queues)
        cfg.model.check_batch(cfg.train.batch_size, source)
    if hasattr(cfg.model, "check_steps"):          # methods with a schedule of their own (FLIP, DenseCL)
        cfg.model.check_steps(cfg.train.steps, source)


# Keys that say where and how a run executes, not what it computes: a resumed run may change them.
# Validation only reads the weights (never the training RNG or data order), so it may be turned on or off too.
RUNTIME_KEYS = ("train.device", "train.threads", "data.num_workers", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.eval_every", "train.keep_best", "train.knn_bank", "train.best_by",
                "train.activation_checkpointing")


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key outside RUNTIME_KEYS whose value differs."""
    saved, new = flatten(saved), flatten(new)
    return [(key, saved.get(key), new.get(key)) for key in sorted(set(saved) | set(new))
            if key not in RUNTIME_KEYS and saved.get(key) != new.get(key)]


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or a recipe name such as `mae/tiny` from the bundled configs."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if bundled.is_file():
        return bundled
    raise MaskkitError(f"config {name_or_path!r} is neither a file nor a bundled recipe (see `maskkit ls`)")


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    path = resolve_recipe(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise MaskkitError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise MaskkitError(f"{path}: expected a mapping of config sections at the top level")
    return config_with_overrides(values, overrides, str(path))


def config_with_overrides(values: dict, overrides: list[str], source: str) -> Config:
    """The config of `values` (read from `source`) with `overrides` applied, checked.

    An error is blamed on whoever caused it: when `values` alone are valid (or fail differently), the
    command line's overrides are named as the source, not the file that was fine without them.
    """
    overrides = list(overrides)
    try:
        return config_from_dict(apply_overrides(copy.deepcopy(values), overrides), source=source)
    except MaskkitError as combined:
        if not overrides:
            raise
        try:
            config_from_dict(copy.deepcopy(values), source=source)
        except MaskkitError as alone:
            if str(alone) == str(combined):
                raise combined from None
        shown = " ".join(overrides)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        config_from_dict(apply_overrides(copy.deepcopy(values), overrides), source=f"command line ({shown})")
        raise


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def list_recipes() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
