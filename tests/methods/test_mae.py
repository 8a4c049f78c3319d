import math

import pytest
import torch

from maskkit.methods.mae import MAE, MAEConfig, normalize_patches, patchify, unpatchify
from maskkit.nn.transformer import ViTConfig
from tests.helpers import FLOAT32_PARITY, assert_close_at_scale


def tiny_mae(**kw) -> MAE:
    encoder = ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2)
    return MAE(MAEConfig(encoder=encoder, **{"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, **kw}))


def test_patchify_layout_and_inverse():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block; inside a patch pixels go (row, col, channel).
    assert patches[0, 1, 0] == images[0, 0, 0, 4] and patches[0, 1, 1] == images[0, 1, 0, 4]
    assert patches[0, 1, 3] == images[0, 0, 0, 5]
    assert torch.equal(unpatchify(patches, 4, 3), images)


def test_encoder_sees_only_visible_patches():
    mae = tiny_mae()
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = inputs[0].shape

    mae.encoder.blocks[0].register_forward_hook(record)
    out = mae.eval()({"images": torch.randn(3, 3, 16, 16)})
    assert seen["shape"] == (3, 1 + 4, 32)                  # 16 patches, 75% removed, plus CLS
    assert out.extras["pred"].shape == (3, 16, 48)          # eval mode predicts every patch
    assert torch.all(out.extras["mask"].sum(1) == 12)


def test_loss_is_mse_on_removed_patches_against_normalised_target():
    mae = tiny_mae(norm_pix_loss=True).eval()
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = mae({"images": images, "noise": noise})
    pred, mask = out.extras["pred"], out.extras["mask"]
    patches = patchify(images, 4)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(normalize_patches(patches), target)
    # Visible patches do not enter the loss: their predictions get no gradient.
    pred.retain_grad()
    out = mae({"images": images, "noise": noise})
    grad = torch.autograd.grad(out.loss, out.extras["pred"])[0]
    assert torch.all(grad[out.extras["mask"] == 0] == 0)
    assert torch.all(grad[out.extras["mask"] == 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("decoder_depth", [1, 2])
def test_training_runs_the_last_decoder_block_only_at_removed_patches_with_the_same_loss_and_gradients(decoder_depth):
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=True, decoder_depth=decoder_depth)
    images, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    head_rows = []
    mae.decoder_pred.register_forward_hook(lambda module, inputs, output: head_rows.append(inputs[0].shape[1]))
    params = [p for p in mae.parameters() if p.requires_grad]
    fast = mae.train()({"images": images, "noise": noise})
    fast_grads = torch.autograd.grad(fast.loss, params)
    full = mae.eval()({"images": images, "noise": noise})
    full_grads = torch.autograd.grad(full.loss, params)
    assert head_rows == [12, 17]                             # 12 removed patches, then all 16 + CLS
    assert fast.extras["pred_removed"].shape == (3, 12, 48)
    removed = torch.argsort(noise, dim=1)[:, 4:]             # the 12 largest noises, in noise order
    assert torch.equal(full.extras["mask"].gather(1, removed), torch.ones(3, 12))
    full_at_removed = torch.gather(full.extras["pred"], 1, removed[..., None].expand(-1, -1, 48))
    assert_close_at_scale(fast.extras["pred_removed"], full_at_removed, FLOAT32_PARITY)
    assert_close_at_scale(fast.loss, full.loss, FLOAT32_PARITY)
    for p, a, b in zip(params, fast_grads, full_grads, strict=True):
        assert_close_at_scale(a, b, FLOAT32_PARITY)
        assert p.grad is None


def test_mask_ratio_zero_is_finite_autoencoding():
    mae = tiny_mae(mask_ratio=0.0, norm_pix_loss=False)
    out = mae({"images": torch.randn(2, 3, 16, 16)})
    assert out.extras["mask"].sum() == 0 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)


def test_same_noise_gives_same_mask_and_seeds_reproduce():
    mae = tiny_mae()
    images = torch.randn(4, 3, 16, 16)
    seeds = torch.tensor([11, 12, 13, 14])
    a = mae({"images": images, "seed": seeds}).extras["mask"]
    b = mae({"images": images[[2, 3]], "seed": seeds[[2, 3]]}).extras["mask"]
    assert torch.equal(a[[2, 3]], b)


def test_reconstruction_is_in_pixel_space_and_pastes_visible_patches():
    mae = tiny_mae(norm_pix_loss=True).eval()
    images = torch.rand(2, 3, 16, 16)
    recon, mask_image = mae.reconstruct(images, noise=torch.rand(2, 16))
    assert recon.shape == images.shape == mask_image.shape
    visible = mask_image == 0
    torch.testing.assert_close(recon[visible], images[visible])


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_decreases_on_a_fixed_batch(norm_pix_loss):
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=norm_pix_loss)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=2e-3, betas=(0.9, 0.95))
    images = torch.rand(8, 3, 16, 16)
    noise = torch.rand(8, 16)
    losses = []
    for _ in range(40):
        loss = mae({"images": images, "noise": noise}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
