"""Typed configs: plain dataclasses, loaded from YAML recipes with dotted `key=value` overrides.

A recipe names its method (`method: mae`); the `model:` section is that method's config dataclass
(`METHODS` in maskkit/methods/__init__.py). Unknown keys and values of the wrong type fail with one
line that names the key and lists the valid ones.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maskkit.data.images import DataConfig
from maskkit.errors import MaskkitError

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


@dataclass
class EvalConfig:
    pool: str = "cls"                # cls | mean: how an image becomes one feature vector
    knn_k: int = 20                  # weighted kNN as in Wu et al. 2018 / DINO: cosine, k=20, T=0.07
    knn_temperature: float = 0.07
    probe_epochs: int = 90
    probe_lr: float = 0.1
    probe_batch_size: int = 256
    finetune_epochs: int = 20
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 64
    batch_size: int = 256            # feature extraction


@dataclass
class Config:
    name: str = "run"
    method: str = "mae"
    model: Any = None                # the method's config dataclass, chosen by `method`
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    cfg = build_dataclass(Config, values, source)
    cfg.model = model
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Cross-field checks that a single type cannot express."""
    encoder = getattr(cfg.model, "encoder", None)
    if encoder is not None:
        if encoder.image_size != cfg.data.image_size:
            raise MaskkitError(
                f"{source}: model.encoder.image_size={encoder.image_size} differs from data.image_size={cfg.data.image_size}"
            )
        if encoder.image_size % encoder.patch_size:
            raise MaskkitError(
                f"{source}: image size {encoder.image_size} is not divisible by model.encoder.patch_size={encoder.patch_size}"
            )
        if encoder.in_channels != cfg.data.in_channels:
            raise MaskkitError(f"{source}: model.encoder.in_channels differs from data.in_channels")
    mask_ratio = getattr(cfg.model, "mask_ratio", None)
    if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
        raise MaskkitError(f"{source}: model.mask_ratio must be in [0, 1), got {mask_ratio}")
    widths = {"model.encoder.dim": getattr(encoder, "dim", None), "model.decoder_dim": getattr(cfg.model, "decoder_dim", None)}
    for key, width in widths.items():
        if width is not None and width % 4:
            raise MaskkitError(f"{source}: {key}={width} must be divisible by 4 (2D sin-cos positions)")
    channels = cfg.data.in_channels
    if len(cfg.data.mean) != channels or len(cfg.data.std) != channels:
        raise MaskkitError(f"{source}: data.mean and data.std need one value per channel ({channels})")
    for key, value in (("eval.knn_k", cfg.eval.knn_k), ("eval.probe_epochs", cfg.eval.probe_epochs),
                       ("eval.batch_size", cfg.eval.batch_size), ("eval.probe_batch_size", cfg.eval.probe_batch_size),
                       ("eval.finetune_batch_size", cfg.eval.finetune_batch_size)):
        if value < 1:
            raise MaskkitError(f"{source}: {key} must be at least 1, got {value}")
    for key, value in (("train.steps", cfg.train.steps), ("train.batch_size", cfg.train.batch_size),
                       ("train.accumulation_steps", cfg.train.accumulation_steps)):
        if value < 1:
            raise MaskkitError(f"{source}: {key} must be at least 1, got {value}")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise MaskkitError(f"{source}: train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    if cfg.eval.pool not in ("cls", "mean"):
        raise MaskkitError(f"{source}: eval.pool must be cls or mean, got {cfg.eval.pool!r}")


# Keys that say where and how a run executes, not what it computes: a resumed run may change them.
RUNTIME_KEYS = ("train.device", "train.threads", "data.num_workers", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints")


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
    return config_from_dict(apply_overrides(values, list(overrides)), source=str(path))


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The config a run was started with (from its latest checkpoint), with `overrides` applied."""
    import copy

    from maskkit.train.checkpoint import find_checkpoint, read_state

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "latest").is_file():
        raise MaskkitError(f"no checkpoint in {run_dir} to resume from; start the run without --resume")
    found = find_checkpoint(run_dir)
    saved = read_state(found).get("config")
    if not isinstance(saved, dict):
        raise MaskkitError(f"{found / 'state.json'} holds no config to resume with")
    return config_from_dict(apply_overrides(copy.deepcopy(saved), list(overrides)), source=str(found / "state.json"))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def list_recipes() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
