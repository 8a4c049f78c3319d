"""Parity with Hugging Face ViTMAEForPreTraining on random weights, and the state-dict round trips."""

import pytest
import torch

from maskkit.errors import MaskkitError
from maskkit.interop.hf import (
    hf_config_from_mae,
    load_hf_vitmae,
    mae_config_from_hf,
    mae_from_hf_state_dict,
    mae_to_hf_state_dict,
    save_hf_vitmae,
)
from tests.helpers import FLOAT32_PARITY, assert_close_at_scale
from tests.interop.random_weights import randomize_

transformers = pytest.importorskip("transformers")
modeling_vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")

TINY = {
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 128,
}


def _hf_table(dim: int, grid: int) -> torch.Tensor:
    """HF's own table, rotated to the pretrained-checkpoint layout exactly as its initialize_weights does."""
    table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
    half = dim // 2
    return torch.cat([table[:, half:], table[:, :half]], dim=1).unsqueeze(0)


def random_hf(norm_pix_loss: bool = False, attn_implementation: str = "eager", seed: int = 0, qkv_bias: bool = True):
    """A tiny ViTMAEForPreTraining with every tensor random, in eval mode.

    HF's own init leaves biases, LayerNorms, the CLS and mask tokens at 0/1 (and, in transformers 5.24,
    the position tables at zero), and its 0.02-std weights make attention nearly uniform: there, swapping
    q and k moves the logits by only ~4e-5, and two LayerNorms swapped not at all. With unit-scale random
    tensors either mistake moves them by more than 1.
    """
    config = transformers.ViTMAEConfig(**TINY, norm_pix_loss=norm_pix_loss, attn_implementation=attn_implementation,
                                       qkv_bias=qkv_bias)
    model = randomize_(transformers.ViTMAEForPreTraining(config).eval(), seed)
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.copy_(_hf_table(config.hidden_size, grid))
        model.decoder.decoder_pos_embed.copy_(_hf_table(config.decoder_hidden_size, grid))
    return model


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    noise = torch.rand(3, (32 // 4) ** 2, generator=generator)
    return images, noise


def assert_same_outputs(mae, hf) -> float:
    """Same noise through both models; returns the largest absolute difference seen."""
    images, noise = inputs()
    with torch.no_grad():
        ours = mae({"images": images, "noise": noise})
        theirs = hf(pixel_values=images, noise=noise)
    torch.testing.assert_close(ours.extras["mask"], theirs.mask, atol=0, rtol=0)
    assert_close_at_scale(ours.extras["pred"], theirs.logits, FLOAT32_PARITY)
    assert_close_at_scale(ours.loss, theirs.loss, FLOAT32_PARITY)
    return max((ours.extras["pred"] - theirs.logits).abs().max().item(), (ours.loss - theirs.loss).abs().item())


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_to_maskkit_parity(norm_pix_loss, attn_implementation):
    hf = random_hf(norm_pix_loss, attn_implementation)
    assert hf.config._attn_implementation == attn_implementation
    mae = load_hf_vitmae(hf).eval()
    assert mae.cfg.encoder.norm_eps == 1e-12
    assert mae.cfg.norm_pix_loss is norm_pix_loss
    assert_same_outputs(mae, hf)


def test_a_vit_mae_without_qkv_bias_loads_and_matches(tmp_path):
    """qkv_bias=False used to crash MAE's init (`'NoneType' object has no attribute 'zero_'`)."""
    hf = random_hf(qkv_bias=False)
    save_hf_vitmae(load_hf_vitmae(hf), tmp_path)
    mae = load_hf_vitmae(tmp_path).eval()
    assert mae.cfg.encoder.qkv_bias is False and mae.encoder.blocks[0].attn.qkv.bias is None
    assert_same_outputs(mae, hf)


def test_maskkit_to_hf_round_trip():
    hf = random_hf(norm_pix_loss=True)
    mae = load_hf_vitmae(hf).eval()
    fresh = transformers.ViTMAEForPreTraining(hf_config_from_mae(mae.cfg)).eval()
    fresh.load_state_dict(mae_to_hf_state_dict(mae.state_dict(), mae.cfg), strict=True)
    for key, value in hf.state_dict().items():
        assert_close_at_scale(fresh.state_dict()[key], value, FLOAT32_PARITY, msg=key)
    assert_same_outputs(mae, fresh)
    assert mae_config_from_hf(fresh.config) == mae.cfg


def test_save_and_load_directory(tmp_path):
    mae = load_hf_vitmae(random_hf(norm_pix_loss=False)).eval()
    save_hf_vitmae(mae, tmp_path)
    assert (tmp_path / "config.json").exists() and list(tmp_path.glob("*.safetensors"))
    loaded = load_hf_vitmae(tmp_path).eval()
    assert loaded.cfg == mae.cfg
    for key, value in mae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path, local_files_only=True).eval()
    assert_same_outputs(mae, hf)


@pytest.mark.parametrize(
    ("corrupt", "named"),
    [
        (lambda sd: sd.pop("vit.layers.1.attention.k_proj.bias"), "vit.layers.1.attention.k_proj.bias"),
        (lambda sd: sd.update({"decoder.extra.weight": torch.zeros(1)}), "decoder.extra.weight"),
        (lambda sd: sd["decoder.decoder_pos_embed"].mul_(-1), "decoder.decoder_pos_embed"),
        (lambda sd: sd.update({"vit.layernorm.bias": torch.zeros(65)}), "vit.layernorm.bias"),
    ],
    ids=["missing", "unexpected", "position-table", "shape"],
)
def test_bad_state_dict_names_the_key(corrupt, named):
    hf = random_hf()
    state_dict = {key: value.clone() for key, value in hf.state_dict().items()}
    corrupt(state_dict)
    with pytest.raises(MaskkitError, match=named.replace(".", r"\.")):
        mae_from_hf_state_dict(state_dict, mae_config_from_hf(hf.config))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"image_size": [32, 48]}, "image_size"),
        ({"hidden_dropout_prob": 0.1}, "hidden_dropout_prob"),
    ],
)
def test_unrepresentable_config_names_the_field(override, field):
    config = transformers.ViTMAEConfig(**{**TINY, **override})
    with pytest.raises(MaskkitError, match=field):
        mae_config_from_hf(config)


def test_missing_directory_is_a_maskkit_error(tmp_path):
    with pytest.raises(MaskkitError, match="not a directory"):
        load_hf_vitmae(tmp_path / "absent")
