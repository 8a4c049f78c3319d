"""Parity with Hugging Face CLIPModel on random weights: maskkit's FLIP, with CLIP's switches, gives the
same image and text embeddings (masking off), and the state dict goes there and back exactly."""

import pytest
import torch

from maskkit.errors import MaskkitError
from maskkit.interop.hf_clip import (
    flip_config_from_hf_clip,
    flip_to_hf_clip_state_dict,
    hf_clip_config_from_flip,
    load_hf_clip,
    save_hf_clip,
)
from tests.helpers import FLOAT32_PARITY, assert_close_at_scale
from tests.interop.random_weights import randomize_

transformers = pytest.importorskip("transformers")


def random_clip(seed: int = 0, attn_implementation: str = "eager"):
    """A tiny CLIPModel with every tensor random at unit scale (see random_weights.py for why)."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    config._attn_implementation = attn_implementation
    return randomize_(transformers.CLIPModel(config).eval(), seed)


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    lengths = torch.tensor([12, 7, 4])
    attention_mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 60, (3, 12), generator=generator) * attention_mask
    ids[torch.arange(3), lengths - 1] = 63     # end-of-text: the last real token has the largest id
    return images, ids, attention_mask


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output with the features in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


def assert_same_embeddings(flip, hf) -> None:
    images, ids, attention_mask = inputs()
    with torch.no_grad():
        ours_image, ours_text = flip.encode_image(images), flip.encode_text(ids, attention_mask)
        theirs_image = features(hf.get_image_features(pixel_values=images))
        theirs_text = features(hf.get_text_features(input_ids=ids, attention_mask=attention_mask))
    assert ours_image.shape == theirs_image.shape == (3, 24) and ours_text.shape == theirs_text.shape
    assert_close_at_scale(ours_image, theirs_image, FLOAT32_PARITY)
    assert_close_at_scale(ours_text, theirs_text, FLOAT32_PARITY)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_hf_clip_to_maskkit_parity(attn_implementation):
    hf = random_clip(attn_implementation=attn_implementation)
    flip = load_hf_clip(hf).eval()
    assert flip.cfg.text.causal and flip.cfg.text.pool == "eot" and flip.cfg.encoder.activation == "quick_gelu"
    assert_same_embeddings(flip, hf)
    torch.testing.assert_close(flip.logit_scale, hf.logit_scale)


def test_round_trip_through_a_saved_directory(tmp_path):
    hf = random_clip(seed=3)
    flip = load_hf_clip(hf).eval()
    save_hf_clip(flip, tmp_path)
    again = transformers.CLIPModel.from_pretrained(tmp_path, local_files_only=True).eval()
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert flip_config_from_hf_clip(again.config) == flip.cfg
    loaded = load_hf_clip(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in flip.state_dict().items())


def test_a_flip_style_config_does_not_pretend_to_be_clip():
    from maskkit.methods.flip import FLIPConfig

    with pytest.raises(MaskkitError, match="only a CLIP-style FLIP config"):
        hf_clip_config_from_flip(FLIPConfig())
    flip = load_hf_clip(random_clip())
    state = flip_to_hf_clip_state_dict(flip.state_dict(), flip.cfg)
    assert state["vision_model.embeddings.class_embedding"].shape == (48,)
