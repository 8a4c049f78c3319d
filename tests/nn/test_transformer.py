import pytest
import torch

from maskkit.errors import MaskkitError
from maskkit.nn.masking import gather_tokens
from maskkit.nn.pos_embed import sincos_2d
from maskkit.nn.transformer import Attention, TextConfig, TextTransformer, ViT, ViTConfig, double_backward_safe
from tests.helpers import SUMMATION_ORDER, assert_close_at_scale


def tiny_vit(**kw) -> ViT:
    return ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, **kw))


def test_keep_runs_the_encoder_on_the_visible_tokens_only():
    vit = tiny_vit().eval()
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 5, 7], [15, 2, 3]])
    out = vit(images, keep=keep)
    assert out.shape == (2, 1 + 3, 32)
    # Same as running the blocks by hand on the gathered (position-embedded) tokens.
    tokens = gather_tokens(vit.embed(images), keep)
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1)
    for block in vit.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(out, vit.norm(tokens))


def test_each_kept_token_carries_its_own_position():
    """MAE Sec 3: positions are added to every patch before masking, so a kept token keeps its own position
    wherever it lands in the kept sequence (adding pos[0..N_keep) after the gather would fail here)."""
    vit = tiny_vit(cls_token=False).eval()
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[9, 1, 14], [3, 12, 0]])
    patches = vit.patch_embed(images).flatten(2).transpose(1, 2)              # (B, 16, D), no positions
    table = sincos_2d(32, 4, 4)                                               # (16, D), computed independently
    expected = torch.stack([patches[b, keep[b]] + table[keep[b]] for b in range(2)])
    torch.testing.assert_close(gather_tokens(vit.embed(images), keep), expected)
    tokens = expected
    for block in vit.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(vit(images, keep=keep), vit.norm(tokens))


@pytest.mark.parametrize("kw", [{}, {"position": "learned", "patch_bias": False}, {"in_channels": 1}])
@pytest.mark.parametrize("position", [True, False])
def test_kept_patches_embedded_alone_equal_the_convolution_gathered(kw, position):
    """embed_kept projects only the kept patches' pixels (one matmul with the conv's weights): the same tokens
    and the same weight gradients as convolving every patch and gathering."""
    vit = tiny_vit(**kw)
    with torch.no_grad():
        vit.pos_embed.copy_(torch.randn_like(vit.pos_embed))       # learned or not: any table, per position
    images = torch.randn(3, vit.cfg.in_channels, 16, 16)
    keep = torch.argsort(torch.rand(3, 16), dim=1)[:, :5]
    fast = vit.embed_kept(images, keep, position)
    slow = gather_tokens(vit.embed(images, position), keep)
    assert fast.shape == (3, 5, 32)
    assert_close_at_scale(fast, slow, SUMMATION_ORDER)
    grads = [torch.autograd.grad((t * torch.arange(32.0)).sum(), vit.patch_embed.weight)[0] for t in (fast, slow)]
    assert_close_at_scale(grads[0], grads[1], SUMMATION_ORDER)


def test_image_size_must_divide_by_patch():
    with pytest.raises(MaskkitError, match="not divisible by patch_size"):
        ViT(ViTConfig(image_size=30, patch_size=4))
    with pytest.raises(MaskkitError, match=r"\(3, 3, 32, 32\)"):
        tiny_vit()(torch.randn(3, 3, 32, 32))


def test_a_width_the_heads_do_not_divide_is_refused_when_the_config_is_built_in_python():
    # check() refuses it in a recipe; a TextConfig built in Python skips check() and once got heads of
    # 190 // 12 = 15 (an inner width of 180) without a word
    with pytest.raises(MaskkitError, match="width 190 is not divisible by num_heads 12"):
        TextTransformer(TextConfig(dim=190, num_heads=12))
    with pytest.raises(MaskkitError, match="width 200 is not divisible by num_heads 12"):
        ViT(ViTConfig(image_size=16, patch_size=4, dim=200, num_heads=12))
    assert TextTransformer(TextConfig(dim=180, num_heads=12)).blocks[0].attn.head_dim == 15


@pytest.fixture
def one_thread():
    """gradgradcheck runs thousands of tiny float64 ops: one thread takes 4 s where two, on a machine whose
    other core is busy, took 77 s waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_second_order_gradients_through_the_vit(one_thread):
    """Energy-based pretraining differentiates through a gradient step on the input (create_graph)."""
    vit = tiny_vit().double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)

    def energy_gradient(x):
        energy = vit(x).pow(2).mean()
        return torch.autograd.grad(energy, x, create_graph=True)[0]

    with double_backward_safe():
        grad = energy_gradient(images)
        restored = images - 0.1 * grad
        restored.pow(2).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit.parameters() if p.requires_grad)
        small = tiny_vit(cls_token=False).double()
        small.blocks = small.blocks[:1]
        x = torch.randn(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda t: small(t).sum(-1), (x,), eps=1e-6, atol=1e-4)


def test_attention_with_context_matches_self_attention_and_reads_keys_from_the_context():
    torch.manual_seed(0)
    attention = Attention(16, 4)
    x, other = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    assert_close_at_scale(attention(x, context=x), attention(x), SUMMATION_ORDER)
    # Queries from x, keys and values from `other`: one output row per query, and it changes with the context.
    out = attention(x, context=other)
    assert out.shape == (2, 5, 16)
    q, k, v = attention.heads(x, other)
    assert q.shape == (2, 4, 5, 4) and k.shape == v.shape == (2, 4, 7, 4)
    assert not torch.allclose(out, attention(x, context=other.flip(1) * 2))
