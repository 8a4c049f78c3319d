"""Contextualization analysis (Kobayashi et al. 2021, 2024): every stage's parts sum to the real model's output
(the real MiniLM at every layer on a padded batch, fp64 and fp32; a random HF CLIP text layer with its causal
mask; a random ViT layer), the layer norm's distributive law, the closed cases (one token, W_O = 0, an identity
activation, Riemann sums against the closed form) and permutation equivariance."""

import math

import pytest
import torch
import torch.nn.functional as F

from maskkit.analysis.contextualization import (
    amplified_pairs,
    contextualization_change,
    decompose_block,
    decompose_layers,
    distribute_layer_norm,
    image_inputs,
    integrated_gradient_shares,
    mixing_ratio,
    text_inputs,
    token_map,
)
from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.nn.transformer import Block, TextConfig, TextTransformer, ViT, ViTConfig
from tests.helpers import FLOAT32_PARITY, REAL_MODEL_PARITY, assert_close_at_scale
from tests.interop.random_weights import randomize_

transformers = pytest.importorskip("transformers")
FLOAT64_EXACT = 1e-10      # the decomposition's sums in float64 against the model's own float64 forward
SENTENCES = ["A cat sat on the mat.", "Paris is the capital and most populous city of France.",
             "Tokenization splits unbelievably long words into several pieces."]


def stage_totals(block: Block, x: torch.Tensor, allowed=None) -> dict:
    """Each stage's real output, computed by the block's own modules."""
    mask = None if allowed is None else allowed[None, None]
    with torch.no_grad():
        if block.post_norm:
            attention = block.attn(x[None], attn_mask=mask)[0]
            norm = block.norm1(x + attention)
            ffn = block.mlp(norm)
            return {"attention": attention, "residual": x + attention, "norm": norm, "ffn": ffn,
                    "ffn_residual": norm + ffn, "ffn_norm": block.norm2(norm + ffn)}
        attention = block.attn(block.norm1(x)[None], attn_mask=mask)[0]
        norm = block.norm2(x + attention)
        ffn = block.mlp(norm)
        return {"attention": attention, "residual": x + attention, "norm": norm, "ffn": ffn,
                "ffn_residual": x + attention + ffn}


@pytest.fixture(scope="module")
def minilm():
    from maskkit.interop.hf_bert import load_hf_bert, minilm_dir

    hf = transformers.BertModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    return load_hf_bert(minilm_dir()).eval(), hf


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, FLOAT64_EXACT), (torch.float32, REAL_MODEL_PARITY)])
def test_every_stage_of_every_minilm_layer_sums_to_the_real_output_on_a_padded_batch(minilm, dtype, tolerance):
    ours, hf = minilm
    ours, hf = ours.to(dtype), hf.to(dtype)
    tokenizer = Tokenizer.from_file(minilm_tokenizer_file(), 32)
    ids, mask = tokenizer.encode(SENTENCES)
    assert (mask == 0).any()
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for row in range(len(SENTENCES)):
        real = int(mask[row].sum())
        x, allowed = text_inputs(ours, ids[row, :real])
        layers = decompose_layers(ours.blocks, x, allowed)
        assert len(layers) == 6
        for number, layer in enumerate(layers):
            layer_input = reference[number][row, :real]
            for stage, total in stage_totals(ours.blocks[number], layer_input).items():
                assert_close_at_scale(layer.stages[stage].sum(1), total, tolerance, f"layer {number} {stage}")
            # The layer's output is its last stage, BertModel's next hidden state.
            assert_close_at_scale(layer.stages["ffn_norm"].sum(1), reference[number + 1][row, :real], tolerance,
                                  f"layer {number} output")
    ours.float(), hf.float()


def test_a_clip_text_layer_with_its_causal_mask_and_a_vit_layer_decompose_exactly():
    from maskkit.interop.hf_clip import load_hf_clip
    from tests.interop.test_hf_clip import random_clip

    clip = random_clip().double()
    hf_text = clip.text_model
    ours = load_hf_clip(clip).text.double().eval()
    assert ours.cfg.causal
    ids = torch.randint(3, 60, (9,), generator=torch.Generator().manual_seed(0))
    x, allowed = text_inputs(ours, ids)
    assert not allowed[0, 1] and allowed[1, 0]                                   # causal: the future is hidden
    layer = decompose_layers(ours.blocks, x, allowed)[0]
    with torch.no_grad():
        hidden = hf_text(input_ids=ids[None], output_hidden_states=True).hidden_states
    # HF's eager CLIP attention takes its softmax in float32 even for a float64 model: float32's tolerance.
    assert_close_at_scale(layer.stages["ffn_residual"].sum(1), hidden[1][0], FLOAT32_PARITY)
    for stage, total in stage_totals(ours.blocks[0], x, allowed).items():
        assert_close_at_scale(layer.stages[stage].sum(1), total, FLOAT64_EXACT, stage)
    # A token receives nothing from the tokens after it, at any stage.
    for parts in layer.stages.values():
        assert float(token_map(parts)[:, :-1].triu(1).abs().max()) == 0.0

    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=4)).double().eval()
    randomize_(vit, seed=1)
    image = torch.randn(3, 16, 16, dtype=torch.float64)
    layers = decompose_layers(vit.blocks, image_inputs(vit, image))
    x = image_inputs(vit, image)
    for block, layer in zip(vit.blocks, layers, strict=True):
        for stage, total in stage_totals(block, x).items():
            assert_close_at_scale(layer.stages[stage].sum(1), total, FLOAT64_EXACT, stage)
        x = layer.output
    with torch.no_grad():
        assert_close_at_scale(vit.norm(layers[-1].stages["ffn_residual"].sum(1)), vit(image[None])[0], FLOAT64_EXACT)


def test_the_layer_norm_distributes_over_its_parts():
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_(generator=generator), norm.bias.normal_(generator=generator)
    parts = torch.randn(3, 5, 8, dtype=torch.float64, generator=generator)
    out = distribute_layer_norm(parts, norm)
    with torch.no_grad():
        assert_close_at_scale(out.sum(1), norm(parts.sum(1)), FLOAT64_EXACT)
    # Each token part is centred and shares the total's scale; beta is the bias source's alone.
    deviation = torch.sqrt(parts.sum(1).var(-1, unbiased=False) + 1e-5)
    expected = (parts[:, 1] - parts[:, 1].mean(-1, keepdim=True)) / deviation[:, None] * norm.weight
    assert_close_at_scale(out[:, 1], expected, FLOAT64_EXACT)
    assert_close_at_scale(out[:, -1] - norm.bias,
                          (parts[:, -1] - parts[:, -1].mean(-1, keepdim=True)) / deviation[:, None] * norm.weight,
                          FLOAT64_EXACT)


def small_block(post_norm: bool, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block(16, 4, 2.0, post_norm=post_norm).double().eval()
    randomize_(block, seed=seed)
    return block


@pytest.mark.parametrize("post_norm", [True, False])
def test_one_token_mixes_nothing_and_without_w_o_the_map_is_diagonal(post_norm):
    block = small_block(post_norm)
    x = torch.randn(1, 16, dtype=torch.float64)
    layer = decompose_block(block, x)
    for stage in layer.stages:
        assert mixing_ratio(layer.stages[stage]) == 0.0
        assert math.isnan(contextualization_change(token_map(layer.stages[stage]), token_map(layer.stages[stage])))
    with torch.no_grad():
        block.attn.proj.weight.zero_()
    layer = decompose_block(block, torch.randn(6, 16, dtype=torch.float64))
    for stage in ("residual", "norm", "ffn", "ffn_residual"):
        tokens = token_map(layer.stages[stage])[:, :-1]
        assert float((tokens - tokens.diag().diag()).abs().max()) == 0.0, stage
        assert mixing_ratio(layer.stages[stage]) == 0.0


def test_integrated_gradients_share_an_identity_exactly_and_riemann_sums_reach_the_closed_form():
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(4, 6, 10, dtype=torch.float64, generator=generator)
    assert torch.equal(integrated_gradient_shares(pre, lambda u: u, 1.0), pre)
    assert torch.equal(integrated_gradient_shares(pre, lambda u: u, 1.0, riemann_steps=5), pre)
    closed = integrated_gradient_shares(pre, F.gelu, 0.5)
    assert_close_at_scale(closed.sum(1), F.gelu(pre.sum(1)), FLOAT64_EXACT)
    coarse = float((integrated_gradient_shares(pre, F.gelu, 0.5, riemann_steps=8) - closed).abs().max())
    fine = float((integrated_gradient_shares(pre, F.gelu, 0.5, riemann_steps=256) - closed).abs().max())
    assert fine < 1e-4 * float(closed.abs().max()) and fine < coarse / 100        # midpoint rule: error ~ 1/n^2
    # u -> 0: the share's limit g'(0) u_k, no division by zero.
    tiny = torch.zeros(1, 2, 3, dtype=torch.float64)
    tiny[0, 0], tiny[0, 1] = 1e-12, -1e-12
    assert torch.isfinite(integrated_gradient_shares(tiny, F.gelu, 0.5)).all()


@pytest.mark.parametrize("post_norm", [True, False])
def test_permuting_the_tokens_permutes_every_map(post_norm):
    block = small_block(post_norm, seed=3)
    x = torch.randn(7, 16, dtype=torch.float64)
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    plain, permuted = decompose_block(block, x), decompose_block(block, x[order])
    for stage, parts in plain.stages.items():
        expected = torch.cat([parts[order][:, order], parts[order][:, -1:]], dim=1)
        assert_close_at_scale(permuted.stages[stage], expected, FLOAT64_EXACT, stage)


def test_amplified_pairs_rank_the_growth_of_a_pairs_share():
    before = torch.tensor([[4.0, 1.0, 1.0, 0.5], [1.0, 4.0, 1.0, 0.5], [1.0, 1.0, 4.0, 0.5]])
    after = before.clone()
    after[2, 0] = 3.0                                   # target 2's share of source 0 grows from 1/6 to 3/8
    pairs = amplified_pairs(before, after, ["a", "b", "c"], top=2)
    assert (pairs[0]["target"], pairs[0]["source"], pairs[0]["source_token"]) == (2, 0, "a")
    assert pairs[0]["factor"] == pytest.approx((3 / 8) / (1 / 6))
    assert all(p["target"] != p["source"] for p in pairs)


def test_a_text_longer_than_the_model_is_refused_in_one_line():
    model = TextTransformer(TextConfig(vocab_size=50, context_length=8, dim=16, depth=1, num_heads=2))
    with pytest.raises(MaskkitError, match=r"a text of 9 tokens is longer than the model's 8 positions"):
        text_inputs(model, torch.arange(9))
