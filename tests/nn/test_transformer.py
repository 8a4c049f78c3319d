import pytest
import torch

from maskkit.errors import MaskkitError
from maskkit.nn.masking import gather_tokens
from maskkit.nn.transformer import ViT, ViTConfig, double_backward_safe


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


def test_position_embedding_is_added_before_masking():
    vit = tiny_vit(cls_token=False).eval()
    images = torch.randn(1, 3, 16, 16)
    full = vit.embed(images)
    # Token 9 keeps its own position wherever it lands in the kept sequence.
    out_a = gather_tokens(full, torch.tensor([[9, 1]]))[0, 0]
    out_b = gather_tokens(full, torch.tensor([[1, 9]]))[0, 1]
    assert torch.equal(out_a, out_b)


def test_image_size_must_divide_by_patch():
    with pytest.raises(MaskkitError, match="not divisible by patch_size"):
        ViT(ViTConfig(image_size=30, patch_size=4))
    with pytest.raises(MaskkitError, match=r"\(3, 3, 32, 32\)"):
        tiny_vit()(torch.randn(3, 3, 32, 32))


def test_second_order_gradients_through_the_vit():
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
