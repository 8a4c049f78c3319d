"""Energy-inspired pretraining (Wang et al. ICLR 2023): the weights train only through the second-order
graph, gradients check in float64, inner steps descend the energy on leaf inputs, corruptions are what
they claim, and runs resume bitwise."""

import math

import pytest
import torch
from safetensors.torch import load_file

from maskkit.config import config_from_dict, load_config
from maskkit.errors import MaskkitError
from maskkit.methods.energy import Energy, EnergyConfig, psnr
from maskkit.nn.corruptions import CORRUPTIONS, corrupt, shuffle
from maskkit.nn.transformer import ViTConfig
from maskkit.rng import sample_keys
from maskkit.train.loop import train
from tests.conftest import deep_update
from tests.helpers import assert_bitwise_equal, assert_same_weights, resumed_and_straight, train_on_two_ranks

# The recipes' step (configs/energy/*.yaml); the dataclass defaults keep the earlier plain step.
RECIPE_STEP = {"normalize_step": True, "alpha_init": 0.5, "alpha_lr_scale": 10.0}


def energy_config_dict(**sections) -> dict:
    values = {
        "name": "energy-test",
        "method": "energy",
        "model": {"encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "num_heads": 2},
                  "inner_steps": 1, **RECIPE_STEP},
        "data": {"name": "photos", "image_size": 16, "photo_crops": 40},
        "optim": {"base_lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 10},
    }
    return deep_update(values, sections)


def test_the_recipes_use_the_normalised_step_and_the_defaults_the_plain_one():
    for recipe in ("energy/tiny", "energy/vit_b16"):
        model = load_config(recipe).model
        assert {key: getattr(model, key) for key in RECIPE_STEP} == RECIPE_STEP, recipe
    plain = EnergyConfig()
    assert (plain.normalize_step, plain.alpha_init, plain.alpha_lr_scale) == (False, 0.1, 1.0)


def tiny_energy(**kw) -> Energy:
    torch.manual_seed(0)
    encoder = ViTConfig(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2)
    return Energy(EnergyConfig(encoder=encoder, **{**RECIPE_STEP, **kw}))


def keys(n: int) -> torch.Tensor:
    return sample_keys(0, torch.zeros(n, dtype=torch.long), torch.arange(n))


def test_weights_train_only_through_the_second_order_graph():
    model = tiny_energy(inner_steps=2)
    clean = torch.randn(4, 3, 8, 8)
    corrupted, _ = corrupt("mim", clean, keys(4), model.pixel_mean, model.pixel_std, 4)
    for create_graph in (False, True):
        model.zero_grad(set_to_none=True)
        restored, _ = model.restore(corrupted, 2, create_graph=create_graph)
        sum(torch.nn.functional.smooth_l1_loss(x, clean) for x in restored).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if name != "log_alpha"}
        assert model.log_alpha.grad is not None and model.log_alpha.grad != 0
        if create_graph:
            # Every matrix of the network shapes dE/dx, so each gets a gradient (a bias that only shifts
            # the energy, like the final LayerNorm's, rightly gets none).
            matrices = [name for name, g in grads.items() if name.endswith("weight") and g is not None and g.ndim > 1]
            assert len(matrices) == 1 + 4 * 2 + 1            # patch embedding, 4 per block x 2 blocks, energy head
            assert all(torch.count_nonzero(grads[name]) > 0 for name in matrices)
        else:   # the public ports' mistake: only alpha would train
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads.values())


class OneStepLoss(Energy):
    """One restoration step's loss as a forward, so that torch.func.functional_call can swap parameters."""

    def forward(self, corrupted, clean):
        restored, _ = self.restore(corrupted, 1, create_graph=True)
        return ((restored[0] - clean) ** 2).mean()


def test_float64_gradcheck_of_the_k_step_loss():
    """Each step's loss has exact second-order gradients (gradcheck, from x_0 and from x_1), and the K = 2
    loss's gradient is their sum: the paper stops gradients between inner steps, so step 2 trains the
    network through its own dE/dx alone, with x_1 as a constant input."""
    torch.manual_seed(0)
    model = OneStepLoss(EnergyConfig(encoder=ViTConfig(image_size=8, patch_size=4, dim=8, depth=2, num_heads=2))).double()
    clean = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x0 = clean + 0.3 * torch.randn_like(clean)
    x1 = model.restore(x0, 1, create_graph=False)[0][0].detach()
    names = ("energy_head.weight", "log_alpha", "encoder.blocks.1.mlp.fc2.weight", "encoder.blocks.0.attn.qkv.weight")
    params = {n: p for n, p in model.named_parameters() if n in names}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in (x0, x1):
            values = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
            loss = lambda *v, start=start: torch.func.functional_call(model, dict(zip(names, v, strict=True)), (start, clean))
            assert torch.autograd.gradcheck(loss, values, eps=1e-6, atol=1e-6)
        per_step = [torch.autograd.grad(model(start, clean), [params[n] for n in names]) for start in (x0, x1)]
        restored, _ = model.restore(x0, 2, create_graph=True)
        two_steps = torch.autograd.grad(sum(((x - clean) ** 2).mean() for x in restored), [params[n] for n in names])
        for total, a, b in zip(two_steps, *per_step, strict=True):
            torch.testing.assert_close(total, a + b, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_small_steps_descend_the_energy_on_leaf_inputs():
    model = tiny_energy(alpha_init=1e-3).eval()
    inputs = []
    original = model.energy

    def recording(images):
        inputs.append((images.is_leaf, images.requires_grad))
        return original(images)

    model.energy = recording
    restored, energies = model.restore(torch.randn(3, 3, 8, 8), 4, create_graph=False)
    assert inputs == [(True, True)] * 4                       # each step starts from a fresh leaf
    final = original(restored[-1].detach())
    path = torch.stack([*energies, final])                    # (K+1, B): E(x_0) .. E(x_K)
    assert (path[1:] < path[:-1]).all(), path


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_the_energy_reads_the_pooled_token_it_is_told_to(pool):
    model = tiny_energy(energy_pool=pool).eval()
    images = torch.randn(3, 3, 8, 8)
    tokens = model.encoder(images)                                            # (B, 1 + N, D)
    pooled = tokens[:, 0] if pool == "cls" else tokens.mean(1)
    torch.testing.assert_close(model.energy(images), pooled @ model.energy_head.weight[0], rtol=0, atol=1e-6)
    other = tokens.mean(1) if pool == "cls" else tokens[:, 0]
    assert not torch.allclose(model.energy(images), other @ model.energy_head.weight[0], atol=1e-3)


def test_normalized_step_moves_each_image_by_alpha_rms_whatever_the_energy_scale():
    """The defect: |alpha dE/dx| was ~5e-4 of the correction at init. A normalised step is alpha (RMS per
    pixel) for every image, and scaling the energy head by 1000 does not change it."""
    model = tiny_energy(alpha_init=0.5).eval()
    x0 = torch.randn(3, 3, 8, 8)
    step = model.restore(x0, 1, create_graph=False)[0][0] - x0
    rms = step.pow(2).flatten(1).mean(1).sqrt()
    # 192 float32 squares summed: rounding is ~1e-6 relative, far below a wrong scale.
    torch.testing.assert_close(rms, torch.full((3,), 0.5), rtol=1e-5, atol=0.0)
    with torch.no_grad():
        model.energy_head.weight.mul_(1000)
    scaled = model.restore(x0, 1, create_graph=False)[0][0] - x0
    torch.testing.assert_close(scaled, step, rtol=1e-4, atol=1e-5 * step.abs().max().item())
    plain = tiny_energy(normalize_step=False, alpha_init=0.5).eval()
    plain_step = plain.restore(x0, 1, create_graph=False)[0][0] - x0
    assert plain_step.pow(2).mean().sqrt() < 0.05 * 0.5           # the raw gradient is tiny at init


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_alpha_starts_at_alpha_init_and_learns_alpha_lr_scale_times_faster(scale):
    model = tiny_energy(alpha_init=0.5, alpha_lr_scale=scale)
    assert math.isclose(float(model.alpha.detach()), 0.5, rel_tol=1e-6)
    clean = torch.randn(4, 3, 8, 8)
    output = model({"images": clean, "seed": keys(4)})
    optimizer = torch.optim.AdamW([model.log_alpha], lr=1e-3, weight_decay=0.0)
    output.loss.backward()
    optimizer.step()
    # Adam's first step is lr * g / (|g| + eps) = lr up to eps / |g| (eps 1e-8, |g| >> 1e-5 here), so
    # log alpha moves by scale * lr: alpha's own learning rate.
    assert abs(model.log_alpha.grad) > 1e-5
    moved = abs(math.log(float(model.alpha.detach())) - math.log(0.5))
    assert math.isclose(moved, scale * 1e-3, rel_tol=1e-3), moved


def train_restoration(steps: int, **kw) -> tuple[float, float]:
    """(PSNR of the corrupted, of the step-1 restoration) on smooth images after `steps` AdamW steps."""
    torch.manual_seed(0)
    model = Energy(EnergyConfig(encoder=ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2),
                                **{**RECIPE_STEP, **kw}))
    generator = torch.Generator().manual_seed(0)
    # Smooth images (a colour and a horizontal ramp each), so the masked patches follow from the visible ones.
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16) * torch.randn(32, 1, 1, 1, generator=generator)
    clean = (torch.randn(32, 3, 1, 1, generator=generator) + ramp).expand(32, 3, 16, 16).contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        loss = model({"images": clean, "seed": sample_keys(0, torch.full((32,), step), torch.arange(32))}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    corrupted, _ = corrupt("mim", clean, sample_keys(1, torch.zeros(32, dtype=torch.long), torch.arange(32)),
                           model.pixel_mean, model.pixel_std, 4)
    restored = model.restore(corrupted, 1, create_graph=False)[0][0].detach()
    return float(psnr(corrupted, clean, model.pixel_std)), float(psnr(restored, clean, model.pixel_std))


def test_restoration_gains_psnr_after_thirty_steps_where_the_plain_step_did_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        corrupted, restored = train_restoration(30)
        plain_corrupted, plain_restored = train_restoration(30, normalize_step=False, alpha_init=0.1, alpha_lr_scale=1.0)
    finally:
        torch.set_num_threads(threads)
    # Measured +2.7 dB (normalised) and +0.05 dB (plain); the margins are far wider than kernel noise.
    assert restored - corrupted > 1.5, (corrupted, restored)
    assert abs(plain_restored - plain_corrupted) < 0.5, (plain_corrupted, plain_restored)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_and_repeats_from_the_seed(name):
    images = torch.randn(6, 3, 16, 16)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    a, where = corrupt(name, images, keys(6), mean, std, 4)
    b, _ = corrupt(name, images, keys(6), mean, std, 4)
    assert torch.equal(a, b) and a.shape == images.shape and where.shape == (6, 1, 16, 16)
    assert ((a - images).flatten(1).abs().amax(1) > 1e-4).all()            # every image changed
    # A sample is corrupted the same way in another batch.
    part, _ = corrupt(name, images[[4, 1]], keys(6)[[4, 1]], mean, std, 4)
    torch.testing.assert_close(part, a[[4, 1]])


def test_mim_touches_exactly_round_r_n_patches_and_shuffle_is_a_permutation():
    images = torch.randn(5, 3, 16, 16)
    mean, std = torch.zeros(3), torch.ones(3)
    out, where = corrupt("mim", images, keys(5), mean, std, 4, mask_ratio=0.75)
    patches_removed = where[:, 0, ::4, ::4].flatten(1).sum(1)
    assert (patches_removed == round(0.75 * 16)).all()
    assert torch.equal(out * where, torch.zeros_like(out))                 # filled with the mean (0 here)
    assert torch.equal(out * (1 - where), images * (1 - where))
    moved, changed, source = shuffle(images, keys(5), mean, std, 4)
    for b in range(5):
        assert sorted(source[b].tolist()) == list(range(16))
        assert 2 <= int((source[b] != torch.arange(16)).sum()) <= 8     # half the positions take part
    # A permutation of patches: the multiset of patches is unchanged.
    def patches(x):
        return x.reshape(5, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(5, 16, -1)
    for b in range(5):
        assert torch.equal(patches(moved)[b][source[b].argsort()], patches(images)[b])


def test_bad_values_fail_in_one_line():
    for override, key in ((("model", "inner_steps", 0), "model.inner_steps"), (("model", "alpha_init", -0.1), "model.alpha_init"),
                          (("model", "alpha_lr_scale", 0.0), "model.alpha_lr_scale"),
                          (("model", "normalize_step", "yes"), "model.normalize_step"),
                          (("eval", "finetune_labels_per_class", -1), "eval.finetune_labels_per_class"),
                          (("model", "corruption", "blur"), "model.corruption"),
                          (("model", "energy_pool", "max"), "model.energy_pool"), (("train", "precision", "bf16"), "train.precision")):
        section, name, value = override
        with pytest.raises(MaskkitError, match=key.replace(".", r"\.")):
            config_from_dict(energy_config_dict(**{section: {name: value}}))


def test_cls_energy_on_a_vit_without_cls_fails_in_one_line():
    with pytest.raises(MaskkitError, match=r"model\.energy_pool"):
        config_from_dict(energy_config_dict(model={"energy_pool": "cls", "encoder": {"cls_token": False}}))


@pytest.mark.slow
def test_energy_trains_the_backbone_and_resumes_bitwise_across_epochs(tmp_path):
    cfg = config_from_dict(energy_config_dict())              # 40 samples, batch 16: 6 steps cross 2 epochs
    a, b = resumed_and_straight(cfg, tmp_path)
    assert_bitwise_equal(a, b)
    torch.manual_seed(cfg.train.seed)
    start = Energy(cfg.model).state_dict()
    assert not torch.equal(start["encoder.blocks.0.attn.qkv.weight"], a["encoder.blocks.0.attn.qkv.weight"])
    assert not torch.equal(start["log_alpha"], a["log_alpha"])
    first = load_file(tmp_path / "straight" / "checkpoints" / "step_0000002" / "model.safetensors")
    model = Energy(cfg.model)
    model.load_state_dict(first, strict=False)
    assert math.isclose(float(model.log_alpha.detach()), float(first["log_alpha"]))   # alpha survives the round trip
    assert (tmp_path / "straight" / "restoration.png").is_file()


@pytest.mark.slow
def test_two_ranks_train_energy_like_one(tmp_path):
    """Under DDP the second-order graph still reaches every weight, and parameters that rightly get no
    gradient (the final LayerNorm's bias) do not stall the all-reduce."""
    cfg_dict = energy_config_dict(train={"steps": 3, "threads": 1, "checkpoint_every": 3})
    train_on_two_ranks(cfg_dict, tmp_path / "two", tmp_path / "init")
    train(config_from_dict(cfg_dict), tmp_path / "one", progress=False)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
