"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021).

Section numbers refer to the paper. The encoder sees only the visible patches (Sec 3, "MAE encoder"),
a light decoder of its own width and depth sees the encoded patches plus a learned mask token at every
removed position (Sec 3, "MAE decoder"), and the loss is the mean squared error on removed patches only
(Sec 3, "Reconstruction target"), optionally against per-patch normalised pixels.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskkit.errors import require, require_float, require_int
from maskkit.files import image_grid
from maskkit.methods.base import Method, MethodOutput
from maskkit.nn.masking import Masking, gather_tokens, num_kept, random_masking
from maskkit.nn.pos_embed import sincos_2d
from maskkit.nn.transformer import Block, ViT, ViTConfig, check_mlp_ratio, check_width
from maskkit.rng import Stream, uniform


@dataclass
class MAEConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder_dim: int = 128           # Sec 4 / Table 1a-b: a narrow, shallow decoder suffices
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75         # Sec 3: "a high masking ratio (e.g., 75%)"
    norm_pix_loss: bool = True       # Sec 3 / Table 1d: per-patch normalised pixels improve features

    def check(self, data, source: str) -> None:
        """Each field's valid range, and the encoder against the images the data section delivers."""
        enc = self.encoder
        enc.check(source, "model.encoder")
        require(enc.image_size == data.image_size, source, "model.encoder.image_size", enc.image_size,
                f"equal to data.image_size={data.image_size}")
        require(enc.in_channels == data.in_channels, source, "model.encoder.in_channels", enc.in_channels,
                f"equal to data.in_channels={data.in_channels}")
        require_int(source, "model.decoder_num_heads", self.decoder_num_heads, 1)
        check_width(source, "model.decoder_dim", self.decoder_dim, self.decoder_num_heads, "model.decoder_num_heads")
        require_int(source, "model.decoder_depth", self.decoder_depth, 0)
        check_mlp_ratio(source, "model.decoder_mlp_ratio", self.decoder_mlp_ratio, self.decoder_dim)
        require_float(source, "model.mask_ratio", self.mask_ratio, 0.0, 1.0, high_open=True)
        num_patches = (enc.image_size // enc.patch_size) ** 2
        require(num_kept(num_patches, self.mask_ratio) >= 1, source, "model.mask_ratio", self.mask_ratio,
                f"small enough to keep at least one of the {num_patches} patches visible")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches row-major, pixels (row, col, channel) inside a patch."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)                                   # (B, rows, cols, P, P, C)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W); the inverse of `patchify` for a square grid."""
    batch, num_patches, _ = patches.shape
    side = int(round(num_patches**0.5))
    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)                                   # (B, C, rows, P, cols, P)
    return x.reshape(batch, channels, side * patch_size, side * patch_size)


def patch_statistics(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 1) mean and std of each patch; the std is unbiased, with eps added to the variance."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps) ** 0.5


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised target (Sec 3): subtract the patch mean, divide by its (unbiased) std."""
    mean, std = patch_statistics(patches, eps)
    return (patches - mean) / std


class MAE(Method):
    name = "mae"

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = ViT(enc)
        self.patch_size = enc.patch_size
        self.decoder_embed = nn.Linear(enc.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        grid = self.encoder.grid_size
        pos = sincos_2d(cfg.decoder_dim, grid, grid, cls_token=enc.cls_token).unsqueeze(0)
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, enc.qkv_bias, enc.norm_eps)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=enc.norm_eps)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, enc.patch_size**2 * enc.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:       # qkv has none with qkv_bias=False
                    nn.init.zeros_(module.bias)

    @property
    def backbone(self) -> ViT:
        return self.encoder

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        images = batch["images"]                                       # (B, C, H, W)
        masking = random_masking(self.noise(batch), self.cfg.mask_ratio)
        latent = self.encoder(images, keep=masking.keep)               # (B, [1+] N_keep, D)
        if self.training and self.cfg.decoder_depth > 0 and masking.removed.shape[1] > 0:
            # Training reads only the removed patches' predictions (Sec 3, "Reconstruction target"), so the
            # last decoder block's queries, MLP, norm and head run only there: the same loss and gradients,
            # 4% fewer FLOPs at the tiny sizes (benchmarks/mae_throughput.py). Eval mode predicts every patch.
            pred = self.forward_decoder(latent, masking, removed_only=True)   # (B, N_removed, P*P*C)
            target = gather_tokens(self.target(images), masking.removed)
            loss = ((pred.float() - target.float()) ** 2).mean()
            return MethodOutput(loss=loss, logs={"loss": loss.detach()},
                                extras={"pred_removed": pred, "mask": masking.mask})
        pred = self.forward_decoder(latent, masking)                   # (B, N, P*P*C)
        loss = self.forward_loss(images, pred, masking.mask)
        return MethodOutput(loss=loss, logs={"loss": loss.detach()}, extras={"pred": pred, "mask": masking.mask})

    def noise(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N) masking noise: given, drawn from per-sample seeds, or from the global generator."""
        images = batch["images"]
        if "noise" in batch:
            return batch["noise"]
        if "seed" in batch:
            return uniform(batch["seed"].to(images.device), (self.encoder.num_patches,), Stream.MASK)
        return torch.rand(images.shape[0], self.encoder.num_patches, device=images.device)

    def forward_decoder(self, latent: torch.Tensor, masking: Masking, removed_only: bool = False) -> torch.Tensor:
        """(B, N, P*P*C) predictions in patch order; with `removed_only`, (B, N_removed, P*P*C) at
        `masking.removed` (the last block's queries and the head run on those rows only)."""
        x = self.decoder_embed(latent)                                 # (B, [1+] N_keep, D_dec)
        has_cls = self.encoder.cls_token is not None
        visible = x[:, 1:] if has_cls else x
        batch, num_patches = masking.restore.shape
        masks = self.mask_token.expand(batch, num_patches - visible.shape[1], -1).to(x.dtype)
        x_ = gather_tokens(torch.cat([visible, masks], dim=1), masking.restore)  # (B, N, D_dec) in patch order
        x = torch.cat([x[:, :1], x_], dim=1) if has_cls else x_
        x = x + self.decoder_pos_embed.to(x.dtype)
        blocks = list(self.decoder_blocks)
        if removed_only:
            for block in blocks[:-1]:
                x = block(x)
            queries = gather_tokens(x[:, 1:] if has_cls else x, masking.removed)    # (B, N_removed, D_dec)
            return self.decoder_pred(self.decoder_norm(blocks[-1].forward_at(queries, x)))
        for block in blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))                 # (B, [1+] N, P*P*C)
        return pred[:, 1:] if has_cls else pred

    def target(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, self.patch_size)                    # (B, N, P*P*C)
        return normalize_patches(patches) if self.cfg.norm_pix_loss else patches

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = ((pred.float() - self.target(images).float()) ** 2).mean(dim=-1)  # (B, N)
        if num_kept(mask.shape[1], self.cfg.mask_ratio) == mask.shape[1]:
            # mask_ratio 0 removes nothing: plain autoencoding over all patches instead of 0/0.
            return per_patch.mean()
        return (per_patch * mask).sum() / mask.sum()                   # removed patches only

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, mask image) in the input's pixel space, visible patches pasted from the input.

        With a normalised target the prediction is in per-patch normalised units; it is mapped back
        with each patch's own mean and std, which are known for visible and removed patches alike.
        """
        batch = {"images": images} if noise is None else {"images": images, "noise": noise}
        out = self.forward(batch)
        pred, mask = out.extras["pred"].float(), out.extras["mask"]
        patches = patchify(images.float(), self.patch_size)
        if self.cfg.norm_pix_loss:
            mean, std = patch_statistics(patches)
            pred = pred * std + mean
        pasted = pred * mask.unsqueeze(-1) + patches * (1 - mask.unsqueeze(-1))
        channels = images.shape[1]
        mask_image = unpatchify(mask.unsqueeze(-1).expand_as(patches).contiguous(), self.patch_size, channels)
        return unpatchify(pasted, self.patch_size, channels), mask_image

    def save_figures(self, batch, out_dir: Path, denormalize=lambda x: x) -> list[Path]:
        """original / masked / reconstruction for eight images of the last batch."""
        images = batch["images"][:8]
        noise = batch["noise"][:8] if "noise" in batch else None
        was_training = self.training
        self.eval()
        recon, mask_image = self.reconstruct(images, noise)
        self.train(was_training)
        rows = {
            "original": denormalize(images.float()),
            "masked": denormalize(images.float()) * (1 - mask_image) + 0.5 * mask_image,
            "reconstruction": denormalize(recon),
        }
        title = f"MAE reconstructions (mask ratio {self.cfg.mask_ratio:.2f})"
        return [image_grid(rows, title, Path(out_dir) / "reconstruction.png")]
