"""Hugging Face `CLIPModel` <-> maskkit FLIP: configs and state dicts, both ways.

CLIP (Radford et al. 2021) and FLIP share the two-tower model; CLIP's towers differ from FLIP's defaults
in ways the configs can express: the image tower has learned positions (the CLS token's included), a
LayerNorm before the blocks (`pre_layrnorm`), QuickGELU and a patch projection without bias, and its
embedding is the CLS token (after `post_layernorm`, which is maskkit's final norm); the text tower is
causal and pools the end-of-text token. HF keeps q, k and v apart where maskkit fuses them.

HF's text pooling takes the token with the largest id when `eos_token_id == 2` (the original CLIP
vocabulary puts end-of-text last), else the first end-of-text token; maskkit's `eot` pooling takes
the last real token, which is the same token for CLIP-tokenised input.
"""


import torch

from maskkit.errors import MaskkitError
from maskkit.interop.hf import _import_transformers, from_pretrained_dir, quiet_transformers
from maskkit.methods.flip import FLIP, FLIPConfig
from maskkit.nn.transformer import TextConfig, ViTConfig


def _activation(name: str, field: str) -> str:
    if name not in ("quick_gelu", "gelu"):
        raise MaskkitError(f"hf config {field}={name!r}; maskkit's MLP supports quick_gelu and gelu")
    return name


def flip_config_from_hf_clip(hf_config) -> FLIPConfig:
    """FLIPConfig of a `transformers.CLIPConfig` (no masking: CLIP trains unmasked)."""
    v, t = hf_config.vision_config, hf_config.text_config
    if v.intermediate_size % v.hidden_size or t.intermediate_size % t.hidden_size:
        raise MaskkitError("hf config intermediate_size must be a multiple of hidden_size for maskkit's mlp_ratio")
    encoder = ViTConfig(
        image_size=v.image_size, patch_size=v.patch_size, in_channels=v.num_channels, dim=v.hidden_size,
        depth=v.num_hidden_layers, num_heads=v.num_attention_heads, mlp_ratio=v.intermediate_size / v.hidden_size,
        qkv_bias=True, norm_eps=v.layer_norm_eps, cls_token=True, position="learned", pre_norm=True,
        activation=_activation(v.hidden_act, "vision_config.hidden_act"), patch_bias=False,
    )
    text = TextConfig(
        vocab_size=t.vocab_size, context_length=t.max_position_embeddings, dim=t.hidden_size,
        depth=t.num_hidden_layers, num_heads=t.num_attention_heads, mlp_ratio=t.intermediate_size / t.hidden_size,
        norm_eps=t.layer_norm_eps, causal=True, pool="eot",
        activation=_activation(t.hidden_act, "text_config.hidden_act"),
    )
    return FLIPConfig(encoder=encoder, text=text, embed_dim=hf_config.projection_dim, mask_ratio=0.0,
                      image_pool="cls")


def hf_clip_config_from_flip(cfg: FLIPConfig):
    """The `transformers.CLIPConfig` of a CLIP-style FLIPConfig (the inverse of `flip_config_from_hf_clip`)."""
    transformers = _import_transformers()
    e, t = cfg.encoder, cfg.text
    if not (e.position == "learned" and e.pre_norm and not e.patch_bias and e.cls_token and cfg.image_pool == "cls"
            and t.causal and t.pool == "eot"):
        raise MaskkitError("only a CLIP-style FLIP config (learned positions, pre-norm, no patch bias, CLS image "
                           "pooling, causal text with eot pooling) maps to a Hugging Face CLIPModel")
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=int(t.dim * t.mlp_ratio),
                         num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
                         max_position_embeddings=t.context_length, hidden_act=t.activation,
                         layer_norm_eps=t.norm_eps, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=e.dim, intermediate_size=int(e.dim * e.mlp_ratio), num_hidden_layers=e.depth,
                           num_attention_heads=e.num_heads, image_size=e.image_size, patch_size=e.patch_size,
                           num_channels=e.in_channels, hidden_act=e.activation, layer_norm_eps=e.norm_eps),
        projection_dim=cfg.embed_dim,
    )


def _block_keys(ours: str, theirs: str, depth: int) -> dict[str, list[str]]:
    keys = {}
    for i in range(depth):
        a, b = f"{ours}.blocks.{i}", f"{theirs}.encoder.layers.{i}"
        for p in ("weight", "bias"):
            keys[f"{a}.norm1.{p}"] = [f"{b}.layer_norm1.{p}"]
            keys[f"{a}.norm2.{p}"] = [f"{b}.layer_norm2.{p}"]
            keys[f"{a}.attn.qkv.{p}"] = [f"{b}.self_attn.{n}_proj.{p}" for n in "qkv"]
            keys[f"{a}.attn.proj.{p}"] = [f"{b}.self_attn.out_proj.{p}"]
            keys[f"{a}.mlp.fc1.{p}"] = [f"{b}.mlp.fc1.{p}"]
            keys[f"{a}.mlp.fc2.{p}"] = [f"{b}.mlp.fc2.{p}"]
    return keys


def key_map(cfg: FLIPConfig) -> dict[str, list[str]]:
    """maskkit key -> the HF key(s) it is made of (several when maskkit fuses q, k and v)."""
    keys = {
        "encoder.patch_embed.weight": ["vision_model.embeddings.patch_embedding.weight"],
        "encoder.cls_token": ["vision_model.embeddings.class_embedding"],
        "encoder.pos_embed": ["vision_model.embeddings.position_embedding.weight"],
        "image_projection.weight": ["visual_projection.weight"],
        "text.token_embedding.weight": ["text_model.embeddings.token_embedding.weight"],
        "text.position_embedding": ["text_model.embeddings.position_embedding.weight"],
        "text_projection.weight": ["text_projection.weight"],
        "logit_scale": ["logit_scale"],
    }
    for p in ("weight", "bias"):
        keys[f"encoder.norm_pre.{p}"] = [f"vision_model.pre_layrnorm.{p}"]
        keys[f"encoder.norm.{p}"] = [f"vision_model.post_layernorm.{p}"]
        keys[f"text.norm.{p}"] = [f"text_model.final_layer_norm.{p}"]
    keys.update(_block_keys("encoder", "vision_model", cfg.encoder.depth))
    keys.update(_block_keys("text", "text_model", cfg.text.depth))
    return keys


def flip_from_hf_clip_state_dict(state_dict: dict[str, torch.Tensor], cfg: FLIPConfig) -> dict[str, torch.Tensor]:
    reference = FLIP(cfg).state_dict()
    out = {}
    for ours, theirs in key_map(cfg).items():
        missing = [k for k in theirs if k not in state_dict]
        if missing:
            raise MaskkitError(f"Hugging Face CLIP state dict has no {missing[0]} (needed for maskkit's {ours})")
        tensor = torch.cat([state_dict[k] for k in theirs]) if len(theirs) > 1 else state_dict[theirs[0]]
        tensor = tensor.reshape(reference[ours].shape)       # class embedding (D,) -> (1, 1, D), tables -> (1, L, D)
        out[ours] = tensor
    unknown = set(reference) - set(out)
    if unknown:
        raise AssertionError(f"keys without a CLIP counterpart: {sorted(unknown)[:3]}")
    return out


def flip_to_hf_clip_state_dict(flip_state_dict: dict[str, torch.Tensor], cfg: FLIPConfig) -> dict[str, torch.Tensor]:
    out = {}
    shapes = {"vision_model.embeddings.class_embedding": (cfg.encoder.dim,)}
    for ours, theirs in key_map(cfg).items():
        tensor = flip_state_dict[ours]
        if len(theirs) == 3:
            out.update(zip(theirs, (part.clone() for part in tensor.chunk(3)), strict=True))
        else:
            name = theirs[0]
            if name in shapes:
                tensor = tensor.reshape(shapes[name])
            elif name.endswith("position_embedding.weight"):
                tensor = tensor[0]
            out[name] = tensor.clone()
    return out


def load_hf_clip(source) -> FLIP:
    """A maskkit FLIP from a `transformers.CLIPModel` or a local directory saved by `save_pretrained`."""
    transformers = _import_transformers()
    if not isinstance(source, torch.nn.Module):
        source = from_pretrained_dir(transformers.CLIPModel, source)
    cfg = flip_config_from_hf_clip(source.config)
    flip = FLIP(cfg)
    flip.load_state_dict(flip_from_hf_clip_state_dict(source.state_dict(), cfg))
    return flip


def save_hf_clip(flip: FLIP, path) -> None:
    transformers = _import_transformers()
    model = transformers.CLIPModel(hf_clip_config_from_flip(flip.cfg))
    missing, unexpected = model.load_state_dict(flip_to_hf_clip_state_dict(flip.state_dict(), flip.cfg), strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise AssertionError(f"CLIP state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with quiet_transformers():
        model.save_pretrained(path)
