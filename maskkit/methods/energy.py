"""Energy-inspired self-supervised pretraining for vision models (Wang et al., ICLR 2023). Sections refer to the paper.

The network's forward pass is an energy over images (Sec 3.1): E(x) = w . mean(ViT(x)), a scalar per
image from a bias-free linear head on the mean of the final-norm tokens. A corrupted image is restored
by K steps of gradient descent on the input (Sec 3.1, Eq. 2): x_{k+1} = x_k - alpha * dE/dx_k, with a
learnable step size alpha (Sec 3.1: alpha is learnt with the network). Training matches every step's
restoration to the clean image (SmoothL1, beta = 1, summed over the steps). There is no decoder: the
backward pass of the network is the "decoder". The pretexts (Sec 3.2) are masked image modelling, patch
sorting, super-resolution, denoising and colorization (`maskkit.nn.corruptions`).

The inner gradient is taken with `create_graph=True`: the loss depends on the network's weights only
through dE/dx, so without the second-order graph only alpha would get a gradient (the mistake of the
public ports; `test_energy.py` shows the weights' gradients are exactly zero then). Always on in
training; there is no switch to turn it off. Second-order gradients of attention need the math SDPA
kernel (`double_backward_safe`), and the method trains in fp32 (`supports_bf16 = False`).

The step's scale (`model.normalize_step`, `model.alpha_init`, `model.alpha_lr_scale`). The paper learns
alpha with the network and gives no scale for dE/dx; here the scale is what decides whether anything
is learnt. E(x) is a bias-free linear head on the mean of LayerNorm-ed tokens, so at init its input
gradient is tiny: |alpha dE/dx| was about 5e-4 of the correction |x_corrupted - x| (gradient norm ~0.2 per
32x32 image, correction ~43, alpha 0.1), and alpha, learnt as log alpha by AdamW at lr 3.75e-4, moves
~lr per step in log space (0.100 -> 0.106 in 600 steps, where it had to grow ~400x). The restoration
then stayed near the corrupted input (+0.03 dB, the issue's measurement) and the weights learnt nothing useful. Two fixes:
- `normalize_step: true` (on in the recipes) divides each image's gradient by its RMS over pixels,
  x_{k+1} = x_k - alpha dE/dx / rms(dE/dx): still gradient descent on E (same direction, Eq. 2), but
  alpha is now the RMS step in normalised pixel units, whatever the energy's scale, and the network
  learns where to put the step (the masked patches), not how to reach a magnitude 400x away.
  `alpha_init` is then set from the data's scale: the masked pixels of a normalised image are ~1 away
  from their value, 75% of them, so an RMS correction of ~0.8; 0.5 starts below it.
- `alpha_lr_scale` c: alpha = exp(c * log_alpha) with the parameter log_alpha = log(alpha_init) / c, so
  AdamW, which moves a parameter ~lr per step, moves log alpha ~c * lr per step: alpha's own learning
  rate, c times the network's, without a special optimizer group.
`normalize_step: false, alpha_lr_scale: 1` is the plain Eq. 2 step of the earlier recipe. The paper's
text (beyond the abstract) could not be read here: that alpha is learnt is the paper's; normalising the
step and alpha's learning rate are maskkit's choices. Measured (benchmarks/energy_fidelity.py, 200 steps):
masked held-out digits +3.3 dB after one step, alpha 0.50 -> 0.63.

The energy's input (`model.energy_pool`). The paper's pseudo-code is `head(model(x))`: a scalar head on what
the ViT returns, which the text does not pin down. "mean" (the default and the recipes') reads the mean of the
final-norm tokens; "cls" reads the [CLS] token, so that the restoration's gradient reaches the patches only
through [CLS]'s attention, the token that [CLS] fine-tuning reads. Measured (seed 2, 600 steps, the 10-labels-
per-class fine-tune of benchmarks/energy_fidelity.py, [CLS]): mean 0.176, cls 0.274, random init 0.704. Neither
beats random init; the README's energy section has the rest of what was tried.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskkit.errors import require, require_float, require_int
from maskkit.files import image_grid
from maskkit.methods.base import Method, MethodOutput
from maskkit.nn.corruptions import CORRUPTIONS, corrupt
from maskkit.nn.transformer import ViT, ViTConfig, double_backward_safe


@dataclass
class EnergyConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    inner_steps: int = 1             # K: gradient steps on the input (1 on a CPU, 2 in the GPU recipe)
    # The defaults are the plain Eq. 2 step of earlier versions (so that older runs resume as they were
    # trained); the recipes turn on the step that learns: true, 0.5, 10 (docstring).
    normalize_step: bool = False     # divide each image's dE/dx by its RMS: alpha is the RMS step (docstring)
    alpha_init: float = 0.1          # initial step size (RMS per pixel when normalize_step, else of raw dE/dx)
    alpha_lr_scale: float = 1.0      # log alpha learns alpha_lr_scale times faster than the weights
    corruption: str = "mim"          # mim | shuffle | sr | noise | gray | mix (one per sample)
    mask_ratio: float = 0.75         # for mim
    loss_on: str = "all"             # all pixels, or only the corrupted ones ("corrupted")
    # What E reads (docstring, "The energy's input"): "mean" of the final-norm tokens, or the "cls" token.
    energy_pool: str = "mean"

    def check(self, data, source: str) -> None:
        self.encoder.check(source, "model.encoder")
        require(getattr(data, "kind", "image") == "image", source, "data.kind", getattr(data, "kind", None),
                "image for method energy")
        require(self.encoder.image_size == data.image_size, source, "model.encoder.image_size",
                self.encoder.image_size, f"equal to data.image_size={data.image_size}")
        require(self.encoder.in_channels == data.in_channels, source, "model.encoder.in_channels",
                self.encoder.in_channels, f"equal to data.in_channels={data.in_channels}")
        require_int(source, "model.inner_steps", self.inner_steps, 1, 16)
        require(isinstance(self.normalize_step, bool), source, "model.normalize_step", self.normalize_step, "true or false")
        require_float(source, "model.alpha_init", self.alpha_init, 0.0, 100.0, low_open=True)
        require_float(source, "model.alpha_lr_scale", self.alpha_lr_scale, 0.0, 1000.0, low_open=True)
        require(self.corruption in CORRUPTIONS, source, "model.corruption", self.corruption, ", ".join(CORRUPTIONS))
        require_float(source, "model.mask_ratio", self.mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        require(self.loss_on in ("all", "corrupted"), source, "model.loss_on", self.loss_on, "all or corrupted")
        require(self.energy_pool in ("mean", "cls"), source, "model.energy_pool", self.energy_pool, "mean or cls")
        require(self.energy_pool != "cls" or self.encoder.cls_token, source, "model.energy_pool", self.energy_pool,
                "mean (model.encoder.cls_token is false: there is no [CLS] token to read)")


def psnr(restored: torch.Tensor, clean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) in [0, 1] pixel units: normalised differences are scaled back by the data set's std."""
    error = ((restored - clean) * std.view(1, -1, 1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(error)).mean()


class Energy(Method):
    name = "energy"
    supports_bf16 = False
    compile_refusal = "its restoration step differentiates through a gradient, and torch.compile has no double backward"
    # Measured: the recomputation runs in the backward, outside `double_backward_safe`, so attention takes
    # another kernel there and torch.utils.checkpoint refuses the mismatch (CheckpointError).
    activation_checkpointing_refusal = ("its attention runs on the math kernel for the double backward, and a "
                                        "recomputation in the backward would run another one")
    # Measured on torch 2.13, 2 gloo ranks: the double backward through fully_shard's unshard/reshard hooks
    # crashes the process (SIGSEGV) at the first step.
    fsdp2_refusal = ("its restoration step differentiates through a gradient, and that double backward crashes "
                     "under fully_shard's hooks")

    def __init__(self, cfg: EnergyConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(cfg.encoder)
        self.energy_head = nn.Linear(cfg.encoder.dim, 1, bias=False)
        nn.init.normal_(self.energy_head.weight, std=cfg.encoder.dim**-0.5)
        # alpha = exp(alpha_lr_scale * log_alpha): the scale is alpha's own learning rate (docstring).
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha_init) / cfg.alpha_lr_scale))
        # The data set's normalisation (corruptions work in pixels); set from the data by `check_data`.
        self.register_buffer("pixel_mean", torch.zeros(cfg.encoder.in_channels), persistent=False)
        self.register_buffer("pixel_std", torch.ones(cfg.encoder.in_channels), persistent=False)

    @property
    def backbone(self) -> ViT:
        return self.encoder

    def check_data(self, data) -> None:
        if data.mean is not None:
            self.pixel_mean.copy_(torch.tensor(data.mean))
            self.pixel_std.copy_(torch.tensor(data.std))

    @property
    def alpha(self) -> torch.Tensor:
        """The step size, a 0-dim tensor with the graph to log_alpha."""
        return (self.cfg.alpha_lr_scale * self.log_alpha).exp()

    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) energies E(x) (Sec 3.1)."""
        tokens = self.encoder(images)                                   # (B, [1+] N, D), final norm applied
        pooled = tokens[:, 0] if self.cfg.energy_pool == "cls" else tokens.mean(1)     # (B, D)
        return self.energy_head(pooled).squeeze(-1)

    def restore(self, corrupted: torch.Tensor, steps: int, create_graph: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """x_{k+1} = x_k - alpha dE/dx_k for k < steps; returns ([x_1 .. x_K], [E(x_0) .. E(x_{K-1})]).

        With `normalize_step` each image's dE/dx is divided by its RMS over all pixels first (inside the
        graph: the weights learn through the direction of the step).

        Each step starts from a detached leaf copy of the current input: the paper stops gradients
        between inner steps (its Algorithm 1), so step k's loss trains the network through step k's
        dE/dx alone, with x_k a constant; x_{k+1} keeps the graph through alpha * dE/dx.
        """
        alpha = self.alpha
        x, restored, energies = corrupted, [], []
        # Restoring differentiates E w.r.t. x, so it needs autograd even where the caller turned it off (the
        # loop's held-out loss runs under no_grad); nothing is backpropagated into the weights there.
        with double_backward_safe(), torch.enable_grad():
            for _ in range(steps):
                leaf = x.detach().requires_grad_(True)
                energy = self.energy(leaf)                                          # (B,)
                (gradient,) = torch.autograd.grad(energy.sum(), leaf, create_graph=create_graph)
                if self.cfg.normalize_step:                                          # (B, C, H, W) / (B, 1, 1, 1)
                    rms = gradient.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-20)
                    gradient = gradient / rms.view(-1, 1, 1, 1)
                x = leaf - alpha * gradient
                restored.append(x)
                energies.append(energy.detach())
        return restored, energies

    def forward(self, batch: dict) -> MethodOutput:
        clean = batch["images"].float()                                             # (B, C, H, W)
        keys = batch["seed"] if "seed" in batch else torch.arange(len(clean), device=clean.device)
        corrupted, where = corrupt(self.cfg.corruption, clean, keys, self.pixel_mean, self.pixel_std,
                                   self.cfg.encoder.patch_size, self.cfg.mask_ratio)
        # The weights get gradients only through dE/dx: create_graph is what makes them train.
        restored, energies = self.restore(corrupted, self.cfg.inner_steps, create_graph=self.training)
        weight = where.expand_as(clean) if self.cfg.loss_on == "corrupted" else torch.ones_like(clean)
        losses = [(F.smooth_l1_loss(x, clean, beta=1.0, reduction="none") * weight).sum() / weight.sum().clamp_min(1)
                  for x in restored]
        loss = torch.stack(losses).sum()
        logs = {"loss": loss.detach(), "alpha": self.alpha.detach(),
                "psnr_corrupted": psnr(corrupted.detach(), clean, self.pixel_std)}
        for k, (step_loss, energy, x) in enumerate(zip(losses, energies, restored, strict=True), start=1):
            logs[f"loss_step{k}"] = step_loss.detach()
            logs[f"energy_step{k - 1}"] = energy.mean()
            logs[f"psnr_step{k}"] = psnr(x.detach(), clean, self.pixel_std)
        return MethodOutput(loss=loss, logs=logs, extras={"corrupted": corrupted, "restored": restored})

    def save_figures(self, batch, out_dir: Path, denormalize=lambda x: x) -> list[Path]:
        """clean / corrupted / step 1 .. step K for eight images of the last batch."""
        was_training = self.training
        self.eval()
        with torch.enable_grad():
            out = self.forward({k: v[:8] if torch.is_tensor(v) and v.ndim else v for k, v in batch.items()})
        self.train(was_training)
        rows = {"clean": batch["images"][:8], "corrupted": out.extras["corrupted"]}
        rows.update({f"step {k}": x.detach() for k, x in enumerate(out.extras["restored"], start=1)})
        rows = {title: denormalize(images.float()) for title, images in rows.items()}
        title = f"energy restoration ({self.cfg.corruption}, alpha {self.alpha.item():.3f})"
        return [image_grid(rows, title, Path(out_dir) / "restoration.png")]
