"""The text Transformer: padding is never attended to, causal means causal, pooling picks the right token."""

import pytest
import torch

from maskkit.errors import MaskkitError
from maskkit.nn.transformer import TextConfig, TextTransformer
from tests.helpers import SUMMATION_ORDER, assert_close_at_scale


def tiny(**kw) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextConfig(vocab_size=50, context_length=12, dim=32, depth=2, num_heads=4, **kw)).eval()


def test_padding_never_changes_the_real_tokens():
    model = tiny()
    ids = torch.tensor([[1, 7, 9, 4, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    other_padding = ids.clone()
    other_padding[0, 4:] = torch.tensor([33, 2, 41, 5])                   # garbage where padding is
    a, b = model(ids, mask), model(other_padding, mask)
    assert_close_at_scale(a[:, :4], b[:, :4], SUMMATION_ORDER)
    # And equal to the caption run alone, without any padding.
    assert_close_at_scale(a[:, :4], model(ids[:, :4]), SUMMATION_ORDER)
    # Without the mask the padding would leak in (the test can fail).
    assert not torch.allclose(model(ids)[:, :4], model(other_padding)[:, :4], atol=1e-3)


def test_causal_tokens_see_only_the_past():
    model = tiny(causal=True)
    ids = torch.tensor([[3, 8, 1, 22, 5, 9]])
    changed = ids.clone()
    changed[0, 4] = 40
    a, b = model(ids), model(changed)
    assert_close_at_scale(a[:, :4], b[:, :4], SUMMATION_ORDER)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)
    bidirectional = tiny()
    assert not torch.allclose(bidirectional(ids)[:, :4], bidirectional(changed)[:, :4], atol=1e-3)


@pytest.mark.parametrize("pool", ["cls", "mean", "eot"])
def test_pooling(pool):
    model = tiny(pool=pool)
    ids = torch.tensor([[1, 7, 9, 4, 0, 0], [1, 5, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    tokens = model(ids, mask)
    pooled = model.features(ids, mask)
    expected = {
        "cls": tokens[:, 0],
        "mean": torch.stack([tokens[0, :4].mean(0), tokens[1, :3].mean(0)]),
        "eot": torch.stack([tokens[0, 3], tokens[1, 2]]),
    }[pool]
    torch.testing.assert_close(pooled, expected)


def test_too_long_input_names_the_context_length():
    with pytest.raises(MaskkitError, match="model.text.context_length"):
        tiny()(torch.zeros(1, 13, dtype=torch.long))


def test_explicit_positions_and_attention_mask_reproduce_the_default_forward():
    torch.manual_seed(0)
    model = TextTransformer(TextConfig(vocab_size=50, context_length=8, dim=16, depth=2, num_heads=2)).eval()
    ids = torch.randint(5, 50, (2, 6))
    plain = model(ids)
    allowed = torch.ones(2, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(model(ids, positions=torch.arange(6), attn_mask=allowed), plain)
    # A token repeated with its original's position id, visible to nobody, leaves the others unchanged and
    # gets the original's output when it sees exactly what the original sees (PMLM's appended copies).
    longer = torch.cat([ids, ids[:, 2:3]], 1)
    positions = torch.cat([torch.arange(6), torch.tensor([2])])
    mask = torch.zeros(2, 7, 7, dtype=torch.bool)
    mask[:, :6, :6] = True
    mask[:, 6, :6] = True
    out = model(longer, positions=positions.expand(2, -1), attn_mask=mask)
    assert_close_at_scale(out[:, :6], plain, SUMMATION_ORDER)
    assert_close_at_scale(out[:, 6], plain[:, 2], SUMMATION_ORDER)
    with pytest.raises(MaskkitError, match="attn_mask of shape"):
        model(ids, attn_mask=torch.ones(2, 5, 5, dtype=torch.bool))


def test_embedding_norm_is_applied_when_on():
    """BERT's embeddings: LayerNorm(token + position) feeds the first block. A LayerNorm makes the model blind to
    the embeddings' scale, which the off model is not; and the norm's own affine is in the path."""
    on, off = tiny(embedding_norm=True, norm_eps=1e-12), tiny(norm_eps=1e-12)
    ids = torch.tensor([[1, 7, 9, 4, 3, 11]])
    with torch.no_grad():
        x = on.token_embedding(ids) + on.position_embedding[:, :6]
        x = on.embedding_norm(x)
        for block in on.blocks:
            x = block(x)
        by_hand = on.norm(x)
        out = on(ids)
        # Unit-scale outputs of a few float32 LayerNorms and matmuls: 1e-5 is ~100 ulps of them.
        torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-5 * float(by_hand.abs().max()))
        for model in (on, off):
            model.token_embedding.weight.mul_(10)
            model.position_embedding.mul_(10)
        # x10 on both embeddings changes the LayerNorm's input variance 100x; its eps 1e-12 (HF BERT's) is
        # negligible next to the ~5e-4 variance of the init's embeddings, so the outputs agree to float32 rounding.
        torch.testing.assert_close(on(ids), out, rtol=0, atol=1e-4 * float(out.abs().max()))
        on.embedding_norm.weight.fill_(3.0)
        assert not torch.allclose(on(ids), out, atol=1e-2)
        off_before = tiny(norm_eps=1e-12)(ids)
        assert not torch.allclose(off(ids), off_before, atol=1e-2)          # off: the scale reaches the blocks


def test_embedding_norm_off_has_no_weights_so_older_checkpoints_load():
    on, off = tiny(embedding_norm=True), tiny()
    assert off.embedding_norm is None
    assert set(on.state_dict()) - set(off.state_dict()) == {"embedding_norm.weight", "embedding_norm.bias"}
    # A state dict from before the switch (no embedding_norm keys) loads strictly into a default model.
    old = {k: v for k, v in on.state_dict().items() if not k.startswith("embedding_norm.")}
    off.load_state_dict(old, strict=True)


def test_embedding_norm_must_be_a_bool():
    from maskkit.errors import MaskkitError

    with pytest.raises(MaskkitError, match="model.text.embedding_norm"):
        TextConfig(embedding_norm="yes").check("test.yaml")


def test_repeated_positions_give_the_same_gradient_every_time_on_two_threads():
    """PMLM's layout (Bao et al. 2020, Figure 2) repeats positions: appended pseudo tokens take their masked
    token's position and padding slots position 0. `table[0, positions]`'s backward (index_put_ with
    accumulation) added the repeats in a thread-dependent order, so two identical runs differed; measured
    with PMLM's real layout, 4 of 10 repeated backward passes differed from the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = TextTransformer(TextConfig(vocab_size=50, dim=128, depth=1, num_heads=2, context_length=128))
        batch, length, appended = 8, 128, 48
        ids = torch.randint(0, 50, (batch, length + appended))
        positions = torch.cat([torch.arange(length).expand(batch, length),
                               torch.randint(0, length, (batch, appended // 2)),
                               torch.zeros(batch, appended // 2, dtype=torch.long)], 1)   # (B, L')
        upstream = torch.randn(batch, length + appended, 128)

        def position_gradient():
            model.zero_grad(set_to_none=True)
            model(ids, positions=positions).backward(upstream)
            return model.position_embedding.grad.clone()

        first = position_gradient()
        for _ in range(30):
            assert torch.equal(position_gradient(), first)
    finally:
        torch.set_num_threads(threads)
