"""Parity with Hugging Face XLNetLMHeadModel on random weights: the same query-stream logits for the same
perm_mask and target_mapping (with and without token_type_ids, odd and even lengths), the same second
segment given the first one's memory, and the same content stream with padding."""

import pytest
import torch
import torch.nn.functional as F

from maskkit.errors import MaskkitError
from maskkit.interop.hf_xlnet import backbone_state_from_hf, load_hf_xlnet, xlnet_config_from_hf
from maskkit.methods.xlnet import XLNet, XLNetModel
from tests.helpers import FLOAT32_PARITY, assert_close_at_scale
from tests.interop.random_weights import randomize_

transformers = pytest.importorskip("transformers")


def random_xlnet(seed: int = 0, mem_len: int | None = None, **overrides):
    """A tiny XLNetLMHeadModel with every tensor random at unit scale (see random_weights.py for why)."""
    values = dict(vocab_size=60, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0, mem_len=mem_len)
    config = transformers.XLNetConfig(**{**values, **overrides})
    return randomize_(transformers.XLNetLMHeadModel(config).eval(), seed)


def order_inputs(length: int, seed: int = 1, batch: int = 3):
    """ids, a random HF perm_mask (1 = may not attend) with every target blocked from itself, a one-hot
    target_mapping of 3 targets per sample, and two-segment token_type_ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (batch, length), generator=generator)
    perm_mask = (torch.rand(batch, length, length, generator=generator) < 0.5).float()
    positions = torch.stack([torch.randperm(length, generator=generator)[:3] for _ in range(batch)])
    perm_mask[torch.arange(batch)[:, None], positions, positions] = 1.0
    token_type_ids = (torch.arange(length)[None] >= torch.randint(1, length, (batch, 1), generator=generator)).long()
    return ids, perm_mask, F.one_hot(positions, length).float(), token_type_ids


@pytest.mark.parametrize("length", [7, 8])
@pytest.mark.parametrize("with_segments", [False, True])
def test_query_stream_logits_match_hf(length, with_segments):
    hf = random_xlnet()
    method = load_hf_xlnet(hf).eval()
    assert isinstance(method, XLNet) and method.cfg.dim == 32 and method.cfg.depth == 2
    ids, perm_mask, mapping, token_type_ids = order_inputs(length)
    token_type_ids = token_type_ids if with_segments else None
    with torch.no_grad():
        theirs = hf(input_ids=ids, perm_mask=perm_mask, target_mapping=mapping, token_type_ids=token_type_ids,
                    use_mems=False).logits
        query, mems = method.model.forward_two_stream(ids, perm_mask, mapping, token_type_ids=token_type_ids)
        ours = method.lm_logits(query)
    assert mems is None and ours.shape == theirs.shape == (3, 3, 60)
    assert theirs.abs().max() > 1.0                   # unit-scale weights: a wrong term would move it by ~1
    assert_close_at_scale(ours, theirs, FLOAT32_PARITY)


def test_second_segment_with_memory_matches_hf():
    hf = random_xlnet(seed=2, mem_len=5)
    method = load_hf_xlnet(hf).eval()
    assert method.cfg.mem_len == 5
    ids, perm_mask, mapping, token_type_ids = order_inputs(7, seed=3)
    next_ids, next_perm, next_mapping, next_types = order_inputs(7, seed=4)
    with torch.no_grad():
        first = hf(input_ids=ids, perm_mask=perm_mask, target_mapping=mapping, token_type_ids=token_type_ids,
                   use_mems=True)
        second = hf(input_ids=next_ids, perm_mask=next_perm, target_mapping=next_mapping, token_type_ids=next_types,
                    mems=first.mems, use_mems=True)
        _, mems = method.model.forward_two_stream(ids, perm_mask, mapping, token_type_ids=token_type_ids)
        query, _ = method.model.forward_two_stream(next_ids, next_perm, next_mapping, token_type_ids=next_types,
                                                   mems=mems)
        without_memory, _ = method.model.forward_two_stream(next_ids, next_perm, next_mapping, token_type_ids=next_types)
    for ours_mem, hf_mem in zip(mems, first.mems, strict=True):             # HF keeps mems (L, B, D)
        assert ours_mem.shape == (3, 5, 32) and not ours_mem.requires_grad
        assert_close_at_scale(ours_mem, hf_mem.transpose(0, 1), FLOAT32_PARITY)
    assert_close_at_scale(method.lm_logits(query), second.logits, FLOAT32_PARITY)
    assert (method.lm_logits(without_memory) - second.logits).abs().max() > 1e-2   # the memory mattered


def test_content_stream_matches_hf_with_padding():
    hf = random_xlnet(seed=5)
    model = load_hf_xlnet(hf.transformer)
    assert isinstance(model, XLNetModel)
    ids, _, _, token_type_ids = order_inputs(9, seed=6)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    with torch.no_grad():
        theirs = hf.transformer(input_ids=ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                use_mems=False).last_hidden_state
        ours = model(ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    assert_close_at_scale(ours, theirs, FLOAT32_PARITY)


def test_state_dict_of_an_existing_method_and_errors():
    hf = random_xlnet(seed=7)
    method = XLNet(xlnet_config_from_hf(hf.config))
    load_hf_xlnet(method, hf.state_dict())
    torch.testing.assert_close(method.lm_bias, hf.lm_loss.bias, atol=0, rtol=0)
    qkv = method.model.layers[1].attn.qkv.weight                          # (3D, D): q, k, v rows
    torch.testing.assert_close(qkv[32:64], hf.transformer.layer[1].rel_attn.k.reshape(32, 32).T, atol=0, rtol=0)

    state = dict(hf.state_dict())
    del state["transformer.layer.1.rel_attn.r_s_bias"]
    with pytest.raises(MaskkitError, match="r_s_bias") as error:
        load_hf_xlnet(XLNet(method.cfg), state)
    assert "\n" not in str(error.value)
    with pytest.raises(MaskkitError, match="shape"):
        backbone_state_from_hf(random_xlnet(d_inner=96).state_dict(), method.cfg)
    with pytest.raises(MaskkitError, match="attn_type"):
        xlnet_config_from_hf(transformers.XLNetConfig(attn_type="uni"))
    with pytest.raises(MaskkitError, match="bi_data"):
        xlnet_config_from_hf(transformers.XLNetConfig(bi_data=True))


def test_loads_a_saved_directory_and_names_a_bad_one(tmp_path):
    hf = random_xlnet(seed=3)
    hf.save_pretrained(tmp_path / "xlnet")
    method = load_hf_xlnet(tmp_path / "xlnet").eval()
    ids, perm_mask, mapping, _ = order_inputs(7)
    with torch.no_grad():
        theirs = hf(input_ids=ids, perm_mask=perm_mask, target_mapping=mapping, use_mems=False).logits
        ours = method.lm_logits(method.model.forward_two_stream(ids, perm_mask, mapping)[0])
    assert_close_at_scale(ours, theirs, FLOAT32_PARITY)
    with pytest.raises(MaskkitError, match="not a directory"):
        load_hf_xlnet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskkitError, match="cannot load a XLNetLMHeadModel"):
        load_hf_xlnet(tmp_path / "empty")
