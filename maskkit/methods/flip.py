"""FLIP: Scaling Language-Image Pre-training via Masking (Li et al., 2022). Sections refer to the paper.

CLIP's contrastive image-text training (Radford et al. 2021) in which the image encoder sees only a
random subset of its patches (Sec 3, "Image masking": 50% or 75% of the patches are removed, as in MAE,
and the encoder runs on the visible ones alone, so a step costs a half or a quarter). The text encoder
is a non-autoregressive Transformer (Sec 3, "Text encoder"; padding is masked here, unlike the released
code). The image embedding is the mean of the encoder's output tokens followed by a linear projection,
the text embedding its [CLS] token's (by default), and the loss is the symmetric InfoNCE with a learnable
temperature (CLIP's, initialised at 0.07, logit scale clamped at 100). At the end of training an
"unmasked tuning" phase (Sec 3) runs the last `unmasked_steps` steps with no masking, which closes the gap
between masked training and unmasked inference. No masking at evaluation.

Under DDP the features of all ranks are gathered with their gradients and each rank computes the loss of
its own rows against every column, so the gradient is that of the global batch (open_clip's approach).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from maskkit.collectives import all_gather_with_grad
from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.methods.base import Method, MethodOutput
from maskkit.nn.masking import random_masking
from maskkit.nn.transformer import TextConfig, TextTransformer, ViT, ViTConfig
from maskkit.rng import Stream, uniform


@dataclass
class FLIPConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128             # the joint embedding space
    mask_ratio: float = 0.5          # Sec 3 / Table 1a: 50% is the paper's default, 75% also reported
    text_mask_ratio: float = 0.0     # Sec 3 / Table 1c: optional dropping of text tokens (not padding)
    unmasked_steps: int = 0          # Sec 3 "Unmasked tuning": the last N steps run with mask ratio 0
    image_pool: str = "mean"         # mean of the output tokens (FLIP) | cls (CLIP: the CLS token)
    temperature_init: float = 0.07   # CLIP: logit scale starts at 1 / 0.07
    max_logit_scale: float = 100.0   # CLIP: the learned logit scale is clamped at 100

    def check(self, data, source: str) -> None:
        require(getattr(data, "kind", "image") == "pairs", source, "data.kind", getattr(data, "kind", "image"),
                "pairs for method flip (it trains on image-text pairs)")
        self.encoder.check(source, "model.encoder")
        self.text.check(source, "model.text")
        require(self.encoder.image_size == data.image_size, source, "model.encoder.image_size",
                self.encoder.image_size, f"equal to data.image_size={data.image_size}")
        require(self.encoder.in_channels == data.in_channels, source, "model.encoder.in_channels",
                self.encoder.in_channels, f"equal to data.in_channels={data.in_channels}")
        require(self.text.context_length >= data.context_length, source, "model.text.context_length",
                self.text.context_length, f"at least data.context_length={data.context_length}")
        require_int(source, "model.embed_dim", self.embed_dim, 1)
        num_patches = (self.encoder.image_size // self.encoder.patch_size) ** 2
        require_float(source, "model.mask_ratio", self.mask_ratio, 0.0, 1.0, high_open=True)
        require(int(num_patches * (1 - self.mask_ratio)) >= 1, source, "model.mask_ratio", self.mask_ratio,
                f"small enough to keep at least one of the {num_patches} patches")
        require_float(source, "model.text_mask_ratio", self.text_mask_ratio, 0.0, 1.0, high_open=True)
        require_int(source, "model.unmasked_steps", self.unmasked_steps, 0)
        require(self.image_pool in ("mean", "cls"), source, "model.image_pool", self.image_pool, "mean or cls")
        require(self.image_pool == "mean" or self.encoder.cls_token, source, "model.image_pool", self.image_pool,
                "mean when model.encoder.cls_token is false")
        require_float(source, "model.temperature_init", self.temperature_init, 1e-4, 10.0)
        require_float(source, "model.max_logit_scale", self.max_logit_scale, 1.0, 1e4)

    def check_steps(self, steps: int, source: str) -> None:
        """Unmasked tuning that covers every step would train plain CLIP while the run says FLIP."""
        if self.mask_ratio > 0 and self.unmasked_steps >= steps:
            raise MaskkitError(
                f"{source}: model.unmasked_steps={self.unmasked_steps} covers the whole run (train.steps={steps}), "
                f"so no step would mask (plain CLIP); set model.unmasked_steps below {steps} "
                "(e.g. model.unmasked_steps=0), or model.mask_ratio=0 to train CLIP on purpose")


class FLIP(Method):
    name = "flip"

    def __init__(self, cfg: FLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(cfg.encoder)
        self.text = TextTransformer(cfg.text)
        # Bias-free projections into the joint space (CLIP's image and text projections).
        self.image_projection = nn.Linear(cfg.encoder.dim, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=cfg.encoder.dim**-0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text.dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature_init)))

    @property
    def backbone(self) -> ViT:
        return self.encoder

    def exports(self) -> dict:
        """Both towers: the image encoder as the backbone (evaluated like MAE's), and the text encoder."""
        import dataclasses

        return {"backbone": (self.encoder, dataclasses.asdict(self.cfg.encoder)),
                "text": (self.text, dataclasses.asdict(self.cfg.text))}

    def mask_ratio_at(self, batch: dict) -> float:
        """The image mask ratio of this step: 0 outside training and during unmasked tuning."""
        if not self.training:
            return 0.0
        step, total = batch.get("step"), batch.get("total_steps")
        if step is not None and total is not None and int(step) >= int(total) - self.cfg.unmasked_steps:
            return 0.0
        return self.cfg.mask_ratio

    def encode_image(self, images: torch.Tensor, keys: torch.Tensor | None = None, mask_ratio: float = 0.0) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim), unnormalised: mean of the output tokens, then the projection."""
        keep = None
        if mask_ratio > 0:
            noise = (uniform(keys, (self.encoder.num_patches,), Stream.MASK) if keys is not None
                     else torch.rand(len(images), self.encoder.num_patches, device=images.device))
            keep = random_masking(noise, mask_ratio).keep                         # (B, N_keep)
        tokens = self.encoder(images, keep=keep)                                  # (B, [1+] N_keep, D)
        if self.cfg.image_pool == "cls":
            return self.image_projection(tokens[:, 0])
        return self.image_projection(self.encoder.patch_tokens(tokens).mean(1))

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor | None = None,
                    mask_ratio: float = 0.0) -> torch.Tensor:
        """(B, L) ids -> (B, embed_dim), unnormalised. Text masking drops real tokens other than [CLS]."""
        if mask_ratio > 0 and keys is not None:
            noise = uniform(keys, (ids.shape[1],), Stream.TEXT_MASK)                      # (B, L)
            drop = (noise < mask_ratio) & attention_mask.bool()
            drop[:, 0] = False                                                            # keep [CLS]
            attention_mask = attention_mask * (~drop)
        return self.text_projection(self.text.features(ids, attention_mask))

    def forward(self, batch: dict) -> MethodOutput:
        keys = batch.get("seed")
        mask_ratio = self.mask_ratio_at(batch)
        text_ratio = self.cfg.text_mask_ratio if mask_ratio > 0 else 0.0
        image = F.normalize(self.encode_image(batch["images"], keys, mask_ratio).float(), dim=-1)
        text = F.normalize(self.encode_text(batch["ids"], batch["attention_mask"], keys, text_ratio).float(), dim=-1)
        loss, accuracy = self.contrastive_loss(image, text)
        logs = {"loss": loss.detach(), "logit_scale": self.logit_scale.detach().exp(),
                "mask_ratio": torch.tensor(mask_ratio), "batch_accuracy": accuracy}
        return MethodOutput(loss=loss, logs=logs, extras={"image": image, "text": text})

    def contrastive_loss(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE (CLIP Fig. 3) of this rank's rows against the columns of every rank, in fp32."""
        scale = self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)        # (W*B, E)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        labels = torch.arange(len(image), device=image.device) + rank * len(image)
        logits_per_image = scale * image @ all_text.T                                        # (B, W*B)
        logits_per_text = scale * text @ all_image.T
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        accuracy = (logits_per_image.argmax(1) == labels).float().mean().detach()
        return loss, accuracy

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B_images, B_texts) cosine similarities, unmasked (inference)."""
        image = F.normalize(self.encode_image(images).float(), dim=-1)
        text = F.normalize(self.encode_text(ids, attention_mask).float(), dim=-1)
        return image @ text.T

    def check_data(self, data) -> None:
        tokenizer = data.tokenizer
        if tokenizer.vocab_size > self.cfg.text.vocab_size:
            raise MaskkitError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size="
                f"{self.cfg.text.vocab_size}; set model.text.vocab_size={tokenizer.vocab_size} (or more)"
            )
