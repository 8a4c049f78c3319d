"""MoCo v2: momentum contrast (He et al. 2020; Chen et al. 2020, "Improved Baselines"), on the spine's ViT.

Two augmented views of each image (`data.views: 2`, MoCo v2's colour augmentation with `data.color`).
The query encoder (ViT + a 2-layer MLP head on the mean of the output tokens) embeds the first view;
a momentum copy of it, never trained by gradients, embeds the second view into keys. InfoNCE at
temperature 0.2 contrasts each query with its own key against a queue of earlier keys (Sec 3.1), in fp32.

Once per optimizer step (`after_step`, so the same with or without gradient accumulation): the key
encoder moves towards the query encoder (EMA, m = 0.999), which is "before the key pass" of the next
step, and every micro-batch's keys of the step, gathered over ranks in the global batch's order, are
pushed into the queue. Enqueueing between micro-batches would change the negatives in the middle of a
step. The queue and its pointer are persistent buffers: a resumed run continues with the same negatives.
The ViT has no BatchNorm, so MoCo's shuffle-BN is not needed.
"""

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from maskkit import collectives
from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.methods.base import Method, MethodOutput
from maskkit.nn.transformer import ViT, ViTConfig


@dataclass
class MoCoConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    head_hidden: int = 512           # MoCo v2: a 2-layer MLP head (2048 hidden on ResNet-50)
    embed_dim: int = 128
    queue_size: int = 1024           # 65536 in the paper; must be a multiple of the global batch
    momentum: float = 0.999
    temperature: float = 0.2         # MoCo v2

    def check(self, data, source: str) -> None:
        self.encoder.check(source, "model.encoder")
        require(getattr(data, "kind", "image") == "image" and getattr(data, "views", 1) == 2, source, "data.views",
                getattr(data, "views", None), "2 for a two-view method (set data.views=2)")
        require(self.encoder.image_size == data.image_size, source, "model.encoder.image_size",
                self.encoder.image_size, f"equal to data.image_size={data.image_size}")
        require_int(source, "model.head_hidden", self.head_hidden, 1)
        require_int(source, "model.embed_dim", self.embed_dim, 1)
        require_int(source, "model.queue_size", self.queue_size, 1)
        require_float(source, "model.momentum", self.momentum, 0.0, 1.0)
        require_float(source, "model.temperature", self.temperature, 1e-4, 10.0)

    def check_batch(self, batch_size: int, source: str) -> None:
        require(self.queue_size % batch_size == 0, source, "model.queue_size", self.queue_size,
                f"a multiple of train.batch_size={batch_size} (each step enqueues one global batch of keys)")


def mlp_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class MoCo(Method):
    name = "moco"

    def __init__(self, cfg: MoCoConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(cfg.encoder)
        self.head = mlp_head(cfg.encoder.dim, cfg.head_hidden, cfg.embed_dim)
        # The momentum (key) encoder: saved with the weights (a resume needs it), never optimized.
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[torch.Tensor] = []

    @property
    def backbone(self) -> ViT:
        return self.encoder

    def check_data(self, data) -> None:
        # A queue longer than the data set would hold several keys of the same image as "negatives".
        if self.cfg.queue_size > len(data.dataset):
            raise MaskkitError(f"model.queue_size={self.cfg.queue_size} is longer than the data set "
                               f"({len(data.dataset)} images): its negatives would repeat images; use at most that")

    def embed(self, encoder: ViT, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim) unit vectors: the head on the mean of the output tokens."""
        return F.normalize(head(encoder.features(images, "mean")).float(), dim=1)

    def forward(self, batch: dict) -> MethodOutput:
        query = self.embed(self.encoder, self.head, batch["images"])                         # (B, E)
        with torch.no_grad():
            key = self.embed(self.key_encoder, self.key_head, batch["images2"])               # (B, E)
        loss, accuracy = self.info_nce(query, key)
        if self.training:
            self._pending_keys.append(key.detach())
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "accuracy": accuracy})

    def info_nce(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of [positive, queue negatives] logits / T with the positive as class 0 (Eq. 1)."""
        positive = (query * key).sum(1, keepdim=True)                                        # (B, 1)
        # No copy of the queue: it only changes in after_step, once every backward of the step is done.
        negative = query @ self.queue.T                                                      # (B, K)
        logits = torch.cat([positive, negative], dim=1) / self.cfg.temperature
        labels = torch.zeros(len(query), dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, labels), (logits.argmax(1) == 0).float().mean().detach()

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(momentum copy, trained module) pairs that the EMA updates."""
        return [(self.key_encoder, self.encoder), (self.key_head, self.head)]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.cfg.momentum
        for copy_module, module in self.ema_pairs():
            for key_param, param in zip(copy_module.parameters(), module.parameters(), strict=True):
                key_param.mul_(m).add_(param.detach(), alpha=1 - m)
        if self._pending_keys:
            self.enqueue(collectives.all_gather_no_grad(torch.cat(self._pending_keys)))
        self._pending_keys = []

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.queue)
        if size % len(keys):
            raise MaskkitError(f"model.queue_size={size} is not a multiple of the global batch of keys ({len(keys)})")
        start = int(self.queue_pointer) % size
        self.queue[start : start + len(keys)] = keys
        self.queue_pointer.fill_((start + len(keys)) % size)
