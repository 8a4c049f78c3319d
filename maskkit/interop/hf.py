"""State-dict maps between maskkit's MAE and Hugging Face `transformers`' ViTMAEForPreTraining.

The two models compute the same function (MAE, He et al. 2021): pre-norm blocks with exact GELU, a CLS
token whose position embedding is zero, fixed 2D sin-cos positions in the layout of MAE's reference
code, and a decoder that reuses the encoder's qkv bias and LayerNorm epsilon. They differ in names, in
maskkit's one fused qkv projection (HF has q_proj, k_proj, v_proj), and in the position tables: HF
stores them as frozen parameters, maskkit derives them from the config and does not save them.

Keys are the in-memory names of transformers >= 5 (`ViTMAEForPreTraining.state_dict()`:
`vit.layers.0.attention.q_proj.weight`, ...). Files on disk, old checkpoints and what `save_pretrained`
still writes, use the 4.x names (`vit.encoder.layer.0.attention.attention.query.weight`, ...) that
`from_pretrained` renames on load; so read a directory with `load_hf_vitmae(directory)`, not safetensors.
"""

import contextlib
import importlib.util
import io
import json
import logging
import math
import sys
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import torch

from maskkit.errors import MaskkitError
from maskkit.methods.mae import MAE, MAEConfig
from maskkit.nn.pos_embed import sincos_2d
from maskkit.nn.transformer import ViTConfig

# maskkit prefix -> HF prefix; the first that matches a key wins.
_PREFIXES = (
    ("encoder.patch_embed.", "vit.embeddings.patch_embeddings.projection."),
    ("encoder.cls_token", "vit.embeddings.cls_token"),
    ("encoder.blocks.", "vit.layers."),
    ("encoder.norm.", "vit.layernorm."),
    ("decoder_embed.", "decoder.decoder_embed."),
    ("mask_token", "decoder.mask_token"),
    ("decoder_blocks.", "decoder.decoder_layers."),
    ("decoder_norm.", "decoder.decoder_norm."),
    ("decoder_pred.", "decoder.decoder_pred."),
)
# Inside one block (after "<prefix><index>."), maskkit name -> HF name.
_BLOCK_PARTS = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.o_proj."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
# The fixed sin-cos tables HF saves and maskkit recomputes.
_ENCODER_POS = "vit.embeddings.position_embeddings"
_DECODER_POS = "decoder.decoder_pos_embed"


def _hf_keys(key: str) -> list[str]:
    """HF names of one maskkit tensor: one name, or q, k, v (in the fused layout's order) for `attn.qkv`."""
    match = next(((ours, theirs) for ours, theirs in _PREFIXES if key.startswith(ours)), None)
    if match is None:
        raise MaskkitError(f"maskkit key {key!r} has no Hugging Face ViT-MAE counterpart")
    ours, theirs = match
    rest = key[len(ours) :]
    if not ours.endswith("blocks."):
        return [theirs + rest]
    index, part = rest.split(".", 1)
    if part.startswith("attn.qkv."):
        # Attention reshapes qkv's output to (3, heads, head_dim): rows are q, then k, then v.
        return [f"{theirs}{index}.attention.{name}_proj.{part[len('attn.qkv.'):]}" for name in "qkv"]
    for ours_part, theirs_part in _BLOCK_PARTS:
        if part.startswith(ours_part):
            return [f"{theirs}{index}.{theirs_part}{part[len(ours_part):]}"]
    raise MaskkitError(f"maskkit key {key!r} has no Hugging Face ViT-MAE counterpart")


def _reference_state(cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """Names and shapes of an MAE built from cfg, on the meta device so nothing is allocated."""
    with torch.device("meta"):
        return MAE(cfg).state_dict()


def _position_tables(cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """The fixed tables as HF stores them: (1, 1+N, D), the CLS token's row zero."""
    grid = cfg.encoder.image_size // cfg.encoder.patch_size
    return {
        _ENCODER_POS: sincos_2d(cfg.encoder.dim, grid, grid, cls_token=True).unsqueeze(0),
        _DECODER_POS: sincos_2d(cfg.decoder_dim, grid, grid, cls_token=True).unsqueeze(0),
    }


def _require_cls_token(cfg: MAEConfig) -> None:
    if not cfg.encoder.cls_token:
        raise MaskkitError("model.encoder.cls_token=False: Hugging Face ViT-MAE always has a CLS token")


def _check_keys(given: Iterable[str], expected: Iterable[str], what: str, hint: str = "") -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise MaskkitError(f"{what} is missing {len(missing)} key(s): {', '.join(missing[:5])}{hint}")
    if unexpected:
        raise MaskkitError(f"{what} has {len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}{hint}")


def _square(value, field: str) -> int:
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise MaskkitError(f"hf config {field}={list(value)} is not square; maskkit's ViT takes square images and patches")


def _mlp_ratio(dim: int, hidden_dim: int, field: str) -> float:
    """A float ratio with int(dim * ratio) == hidden_dim, which is how maskkit's Block sizes its MLP."""
    ratio = hidden_dim / dim
    if int(dim * ratio) != hidden_dim:
        # hidden_dim / dim can round to just below the quotient, and int() then truncates a whole unit.
        ratio = math.nextafter(ratio, math.inf)
    if int(dim * ratio) != hidden_dim:
        raise MaskkitError(f"hf config {field}={hidden_dim} cannot be written as int({dim} * mlp_ratio)")
    return ratio


def mae_config_from_hf(hf_config) -> MAEConfig:
    """MAEConfig for a `transformers.ViTMAEConfig`; MaskkitError for anything maskkit cannot represent."""
    c = hf_config
    if getattr(c, "model_type", "vit_mae") != "vit_mae":
        raise MaskkitError(f"hf config model_type={c.model_type!r}; only 'vit_mae' maps to maskkit's MAE")
    if c.hidden_act != "gelu":
        # HF's "gelu" is the exact erf form, which is what maskkit's MLP uses; the tanh forms differ by up to 5e-4.
        raise MaskkitError(f"hf config hidden_act={c.hidden_act!r}; maskkit's MLP uses exact GELU ('gelu')")
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if getattr(c, field, 0.0):
            raise MaskkitError(f"hf config {field}={getattr(c, field)}; maskkit's blocks have no dropout, use 0.0")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        raise MaskkitError(f"hf config head_dim={head_dim}: maskkit needs head_dim * heads == hidden_size")
    for field in ("hidden_size", "decoder_hidden_size"):
        if getattr(c, field) % 4:
            raise MaskkitError(f"hf config {field}={getattr(c, field)} is not divisible by 4, as 2D sin-cos needs")
    encoder = ViTConfig(
        image_size=_square(c.image_size, "image_size"),
        patch_size=_square(c.patch_size, "patch_size"),
        in_channels=c.num_channels,
        dim=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_ratio=_mlp_ratio(c.hidden_size, c.intermediate_size, "intermediate_size"),
        qkv_bias=c.qkv_bias,
        norm_eps=c.layer_norm_eps,  # HF's default is 1e-12, maskkit's 1e-6: carry it, do not assume
        cls_token=True,
    )
    return MAEConfig(
        encoder=encoder,
        decoder_dim=c.decoder_hidden_size,
        decoder_depth=c.decoder_num_hidden_layers,
        decoder_num_heads=c.decoder_num_attention_heads,
        decoder_mlp_ratio=_mlp_ratio(c.decoder_hidden_size, c.decoder_intermediate_size, "decoder_intermediate_size"),
        mask_ratio=c.mask_ratio,
        norm_pix_loss=c.norm_pix_loss,
    )


def hf_config_from_mae(cfg: MAEConfig):
    """The `transformers.ViTMAEConfig` of an MAEConfig (the inverse of `mae_config_from_hf`)."""
    transformers = _import_transformers()
    _require_cls_token(cfg)
    enc = cfg.encoder
    return transformers.ViTMAEConfig(
        hidden_size=enc.dim,
        num_hidden_layers=enc.depth,
        num_attention_heads=enc.num_heads,
        intermediate_size=int(enc.dim * enc.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=enc.norm_eps,
        image_size=enc.image_size,
        patch_size=enc.patch_size,
        num_channels=enc.in_channels,
        qkv_bias=enc.qkv_bias,
        decoder_hidden_size=cfg.decoder_dim,
        decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_dim * cfg.decoder_mlp_ratio),
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
    )


def mae_from_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """A maskkit MAE state dict from a ViTMAEForPreTraining one; `cfg` usually from `mae_config_from_hf`.

    The position tables are not copied (maskkit recomputes them) but checked: a checkpoint whose
    tables differ would silently lose its positions otherwise.
    """
    _require_cls_token(cfg)
    reference = _reference_state(cfg)
    key_map = {key: _hf_keys(key) for key in reference}
    tables = _position_tables(cfg)
    expected = [name for names in key_map.values() for name in names] + list(tables)
    hint = ""
    if any(".attention.attention." in key for key in state_dict):
        hint = "; these look like transformers 4.x names, load the directory with load_hf_vitmae"
    _check_keys(state_dict, expected, "Hugging Face ViT-MAE state dict", hint)

    for key, table in tables.items():
        stored = state_dict[key]
        if stored.shape != table.shape:
            raise MaskkitError(f"{key} has shape {tuple(stored.shape)}, expected {tuple(table.shape)} for this config")
        # Compare in the checkpoint's dtype, so a bf16 checkpoint of the right table passes.
        error = (stored.float() - table.to(stored.device, stored.dtype).float()).abs().max().item()
        if error > 1e-5:
            raise MaskkitError(
                f"{key} differs from MAE's fixed 2D sin-cos table by {error:.2e}; maskkit cannot represent "
                "learned or differently laid out position embeddings"
            )

    out = {}
    for key, names in key_map.items():
        tensor = torch.cat([state_dict[name] for name in names], dim=0) if len(names) > 1 else state_dict[names[0]]
        if tensor.shape != reference[key].shape:
            raise MaskkitError(
                f"{' + '.join(names)} has shape {tuple(tensor.shape)}, expected {tuple(reference[key].shape)} "
                f"for maskkit's {key}; does the config match the checkpoint?"
            )
        out[key] = tensor
    return out


def mae_to_hf_state_dict(mae_state_dict: dict[str, torch.Tensor], cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """A ViTMAEForPreTraining state dict (position tables included, so strict loading works) from a maskkit one."""
    _require_cls_token(cfg)
    reference = _reference_state(cfg)
    _check_keys(mae_state_dict, reference, "maskkit MAE state dict")
    out = {}
    for key, names in ((key, _hf_keys(key)) for key in reference):
        tensor = mae_state_dict[key]
        if tensor.shape != reference[key].shape:
            raise MaskkitError(f"{key} has shape {tuple(tensor.shape)}, expected {tuple(reference[key].shape)}")
        if len(names) == 1:
            out[names[0]] = tensor
        else:
            # Clones, not views of one storage, which safetensors refuses to save.
            out.update(zip(names, (part.clone() for part in tensor.chunk(len(names), dim=0)), strict=True))
    like = mae_state_dict["encoder.cls_token"]
    for key, table in _position_tables(cfg).items():
        out[key] = table.to(like.device, like.dtype)
    return out


def _import_transformers():
    _import_torchao_quietly()
    try:
        import transformers
    except ImportError as error:
        raise MaskkitError("Hugging Face interop needs transformers: pip install 'maskkit[hf]'") from error
    return transformers


def _import_torchao_quietly() -> None:
    """transformers imports torchao when it is installed (maskkit's dev extra has it, for a parity test), and
    torchao 0.18 on a CPU-only torch prints four lines (a CUDA kernel library it cannot load, no triton, and
    torch's pytree warning that its Enums need no registration, on imports transformers makes later). None of
    it concerns a maskkit user: the first import happens here with its messages held back, and the pytree
    logger drops that one deprecation message (a filter on it, nothing else)."""
    if "torchao" in sys.modules or importlib.util.find_spec("torchao") is None:
        return
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())
    torchao_logger = logging.getLogger("torchao")
    level = torchao_logger.level
    torchao_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import torchao.quantization  # noqa: F401
    except Exception:                        # a broken optional install: transformers will say so if it needs it
        pass
    finally:
        torchao_logger.setLevel(level)


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars from transformers (loading or writing weights) while maskkit calls it: maskkit says in
    one line what it loaded or wrote."""
    logging = _import_transformers().utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def from_pretrained_dir(model_class, path):
    """`model_class.from_pretrained` on a local directory; a path that is not one, or a directory it cannot
    load, is a one-line MaskkitError."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MaskkitError(f"{path}: not a directory; pass a local directory written by "
                           f"{model_class.__name__}.save_pretrained")
    try:
        with quiet_transformers():
            return model_class.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MaskkitError(f"{path}: cannot load a {model_class.__name__}: {first_line}") from None


def load_hf_vitmae(model_or_path) -> MAE:
    """A maskkit MAE from a ViTMAEForPreTraining instance or a local directory written by `save_pretrained`."""
    transformers = _import_transformers()
    if isinstance(model_or_path, (str, PathLike)):
        model = from_pretrained_dir(transformers.ViTMAEForPreTraining, model_or_path)
    elif isinstance(model_or_path, transformers.ViTMAEForPreTraining):
        model = model_or_path
    else:
        raise MaskkitError(
            f"load_hf_vitmae takes a ViTMAEForPreTraining or a directory, got {type(model_or_path).__name__}"
        )
    cfg = mae_config_from_hf(model.config)
    mae = MAE(cfg)
    mae.load_state_dict(mae_from_hf_state_dict(model.state_dict(), cfg))
    return mae


def save_hf_vitmae(mae: MAE, directory) -> Path:
    """Write `mae` as a ViTMAEForPreTraining directory (config.json + safetensors) that `from_pretrained` loads."""
    transformers = _import_transformers()
    model = transformers.ViTMAEForPreTraining(hf_config_from_mae(mae.cfg))
    model.load_state_dict(mae_to_hf_state_dict(mae.state_dict(), mae.cfg), strict=True)
    with quiet_transformers():
        model.save_pretrained(directory)
    return Path(directory)


# Image normalisation of a Hugging Face directory without preprocessor_config.json (each family's default).
HF_IMAGE_DEFAULTS = {"clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                     "vit_mae": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def hf_normalisation(path: Path, family: str) -> tuple[list[float], list[float]]:
    """(mean, std) of a Hugging Face image model directory: its preprocessor_config.json, else the family's."""
    mean, std = HF_IMAGE_DEFAULTS[family]
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            config = json.loads(preprocessor.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise MaskkitError(f"{preprocessor}: not valid JSON ({error})") from None
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    return list(mean), list(std)


def hf_model_type(path: Path) -> str:
    """The model_type of a Hugging Face directory's config.json ("" when it names none); a file that is not JSON
    fails naming it."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise MaskkitError(f"{Path(path) / 'config.json'}: not valid JSON ({error})") from None
    return config.get("model_type", "") if isinstance(config, dict) else ""


def load_hf_tokenizer(path: Path):
    """The directory's own tokenizer (transformers.AutoTokenizer, offline); missing or unloadable files fail in one
    line."""
    path = Path(path)
    transformers = _import_transformers()
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise MaskkitError(f"{path}: no tokenizer files (tokenizer.json, vocab.txt or vocab.json) beside the model; "
                           "save the tokenizer into the directory too")
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MaskkitError(f"{path}: its tokenizer cannot be loaded ({first})") from None
