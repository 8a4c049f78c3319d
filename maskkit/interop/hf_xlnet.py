"""Hugging Face `XLNetLMHeadModel` / `XLNetModel` -> maskkit XLNet: config and state dict.

The two compute the same function (see `maskkit.methods.xlnet`); they differ in names and layouts. HF
keeps each projection as a (D, H, Dh) tensor used as `einsum("ibh,hnd->ibnd")`; maskkit uses `nn.Linear`
weights (out, in) with heads merged as h * Dh + d, so q, k, v, r become `W.reshape(D, D).T` (q, k and v
stacked into the fused qkv weight, in that order) and the output projection o becomes `W.reshape(D, D)`.
HF's `lm_loss.weight` is tied to the word embedding; its bias is maskkit's `lm_bias`.

Supported: attn_type "bi", bi_data False, clamp_len <= 0, ff_activation "gelu", d_head = d_model / n_head,
and no `reuse_len` (which only changes what the memory caches); anything else is a MaskkitError.
"""

from os import PathLike

import torch

from maskkit.errors import MaskkitError
from maskkit.interop.hf import _import_transformers, from_pretrained_dir
from maskkit.methods.xlnet import XLNet, XLNetConfig, XLNetModel


def xlnet_config_from_hf(hf_config, context_length: int = 512) -> XLNetConfig:
    """XLNetConfig of a `transformers.XLNetConfig` (`context_length` is maskkit's check only: XLNet has no limit)."""
    c = hf_config
    unsupported = {
        "attn_type": (c.attn_type, c.attn_type == "bi", "bi"),
        "bi_data": (c.bi_data, not c.bi_data, "False"),
        "clamp_len": (c.clamp_len, c.clamp_len is None or c.clamp_len <= 0, "<= 0"),
        "ff_activation": (c.ff_activation, c.ff_activation == "gelu", "gelu"),
        "d_head": (c.d_head, c.d_head == c.d_model // c.n_head and c.d_model % c.n_head == 0, "d_model / n_head"),
        "reuse_len": (c.reuse_len, not c.reuse_len, "None or 0"),
    }
    for key, (value, ok, wanted) in unsupported.items():
        if not ok:
            raise MaskkitError(f"hf config {key}={value!r} is not supported by maskkit's XLNet (needs {wanted})")
    if c.d_inner % c.d_model:
        raise MaskkitError(f"hf config d_inner={c.d_inner} must be a multiple of d_model={c.d_model} for mlp_ratio")
    return XLNetConfig(vocab_size=c.vocab_size, context_length=context_length, dim=c.d_model, depth=c.n_layer,
                       num_heads=c.n_head, mlp_ratio=c.d_inner / c.d_model, norm_eps=c.layer_norm_eps,
                       mem_len=c.mem_len or 0)


def _layer_map(index: int, dim: int) -> dict[str, tuple[list[str], object]]:
    """maskkit key -> (HF keys, how to turn them into the maskkit tensor) for layer `index`."""
    ours, theirs = f"layers.{index}", f"layer.{index}"
    as_linear = lambda *tensors: torch.cat([t.reshape(dim, dim).T for t in tensors])   # noqa: E731
    attention = f"{theirs}.rel_attn"
    same = lambda t: t   # noqa: E731
    return {
        f"{ours}.attn.qkv.weight": ([f"{attention}.{n}" for n in "qkv"], as_linear),
        f"{ours}.attn.proj.weight": ([f"{attention}.o"], lambda o: o.reshape(dim, dim)),
        f"{ours}.position_projection.weight": ([f"{attention}.r"], as_linear),
        f"{ours}.content_bias": ([f"{attention}.r_w_bias"], same),
        f"{ours}.position_bias": ([f"{attention}.r_r_bias"], same),
        f"{ours}.segment_bias": ([f"{attention}.r_s_bias"], same),
        f"{ours}.segment_embedding": ([f"{attention}.seg_embed"], same),
        f"{ours}.norm1.weight": ([f"{attention}.layer_norm.weight"], same),
        f"{ours}.norm1.bias": ([f"{attention}.layer_norm.bias"], same),
        f"{ours}.mlp.fc1.weight": ([f"{theirs}.ff.layer_1.weight"], same),
        f"{ours}.mlp.fc1.bias": ([f"{theirs}.ff.layer_1.bias"], same),
        f"{ours}.mlp.fc2.weight": ([f"{theirs}.ff.layer_2.weight"], same),
        f"{ours}.mlp.fc2.bias": ([f"{theirs}.ff.layer_2.bias"], same),
        f"{ours}.norm2.weight": ([f"{theirs}.ff.layer_norm.weight"], same),
        f"{ours}.norm2.bias": ([f"{theirs}.ff.layer_norm.bias"], same),
    }


def backbone_state_from_hf(hf_state: dict[str, torch.Tensor], cfg: XLNetConfig,
                           prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """maskkit `XLNetModel` state dict from an HF state dict (`XLNetLMHeadModel`'s keys start with
    "transformer.", `XLNetModel`'s with nothing: pass prefix="")."""
    mapping = {"token_embedding.weight": (["word_embedding.weight"], lambda t: t),
               "mask_embedding": (["mask_emb"], lambda t: t.reshape(cfg.dim))}
    for index in range(cfg.depth):
        mapping.update(_layer_map(index, cfg.dim))
    with torch.device("meta"):
        expected = XLNetModel(cfg).state_dict()
    state = {}
    for key, (hf_keys, convert) in mapping.items():
        missing = [prefix + k for k in hf_keys if prefix + k not in hf_state]
        if missing:
            raise MaskkitError(f"hf state dict has no {missing[0]!r} (needed for maskkit {key!r}); is it an XLNet "
                               f"with {cfg.depth} layers and prefix {prefix!r}?")
        tensor = convert(*(hf_state[prefix + k] for k in hf_keys))
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise MaskkitError(f"hf {hf_keys[0]!r} gives shape {tuple(tensor.shape)} for maskkit {key!r}, which "
                               f"needs {tuple(expected[key].shape)}; the config does not match the weights")
        state[key] = tensor.detach().clone()
    if set(state) != set(expected):
        raise MaskkitError(f"maskkit XLNet keys without an HF counterpart: {sorted(set(expected) - set(state))[:3]}")
    return state


def load_hf_xlnet(target, hf_state: dict[str, torch.Tensor] | None = None) -> XLNet | XLNetModel:
    """Copy HF XLNet weights into `target` and return it.

    `target`: a maskkit `XLNet` method (gets the backbone and the LM head's bias) or an `XLNetModel`, or a
    `transformers.XLNetLMHeadModel` / `XLNetModel` instance, from which a new maskkit XLNet (resp. model)
    is built with `xlnet_config_from_hf`, or a local directory written by `XLNetLMHeadModel.save_pretrained`.
    `hf_state`: the HF state dict (default: the HF model's own).
    """
    transformers = _import_transformers()
    if isinstance(target, (str, PathLike)):
        target = from_pretrained_dir(transformers.XLNetLMHeadModel, target)
    if isinstance(target, (transformers.XLNetLMHeadModel, transformers.XLNetModel)):
        hf_state = target.state_dict() if hf_state is None else hf_state
        cfg = xlnet_config_from_hf(target.config)
        target = XLNet(cfg) if isinstance(target, transformers.XLNetLMHeadModel) else XLNetModel(cfg)
    if not isinstance(target, (XLNet, XLNetModel)):
        raise MaskkitError(f"load_hf_xlnet takes a maskkit XLNet, XLNetModel or an HF XLNet model, got {type(target).__name__}")
    if hf_state is None:
        raise MaskkitError("load_hf_xlnet needs the HF state dict when given a maskkit model")
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
    backbone = target.backbone if isinstance(target, XLNet) else target
    backbone.load_state_dict(backbone_state_from_hf(hf_state, backbone.cfg, prefix))
    if isinstance(target, XLNet):
        bias = hf_state.get("lm_loss.bias")
        if bias is None:
            raise MaskkitError("hf state dict has no 'lm_loss.bias'; an XLNet method needs an XLNetLMHeadModel's weights")
        if bias.shape != target.lm_bias.shape:
            raise MaskkitError(f"hf 'lm_loss.bias' has shape {tuple(bias.shape)}, maskkit lm_bias needs "
                               f"{tuple(target.lm_bias.shape)}")
        weight = hf_state.get("lm_loss.weight")
        if weight is not None and not torch.equal(weight, hf_state[prefix + "word_embedding.weight"]):
            raise MaskkitError("hf 'lm_loss.weight' differs from the word embedding; maskkit's LM head is tied to it")
        with torch.no_grad():
            target.lm_bias.copy_(bias)
    return target
