"""DenseCL: dense contrastive learning (Wang et al., CVPR 2021), on MoCo v2 and the spine's ViT.

MoCo v2's global loss plus a dense one between matched local features of the two views (Sec 3.2): a
dense projection head (a per-token 2-layer MLP, the 1x1 convolutions of the paper) embeds every patch
token; each query token's positive is the key token whose *backbone* feature is most similar (cosine,
argmax over the other view's tokens: Sec 3.3 "dense correspondence", as in the official code), and the
negatives are a second queue holding one dense key per image (its tokens averaged, then normalised).
Loss = (1 - lambda) * global + lambda * dense, lambda = 0.5, optionally 0 for the first
`dense_warmup_steps` (the official code's warm-up of the dense weight).

`geometric_correspondence` gives the true match from the two crop boxes and flips the augmentation
used; it is logged as the accuracy of the feature matching and used by the tests.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkit.errors import require, require_float, require_int
from maskkit.methods.base import MethodOutput
from maskkit.methods.moco import MoCo, MoCoConfig, mlp_head


@dataclass
class DenseCLConfig(MoCoConfig):
    dense_weight: float = 0.5        # lambda (Sec 3.2, Eq. 4)
    dense_warmup_steps: int = 0      # lambda = 0 for the first N steps

    def check(self, data, source: str) -> None:
        super().check(data, source)
        grid = self.encoder.image_size // self.encoder.patch_size
        require(grid >= 2, source, "model.encoder.patch_size", self.encoder.patch_size,
                f"small enough for a token grid of at least 2x2 (image {self.encoder.image_size} px gives {grid}x{grid})")
        require_float(source, "model.dense_weight", self.dense_weight, 0.0, 1.0)
        require_int(source, "model.dense_warmup_steps", self.dense_warmup_steps, 0)


def match_tokens(query_features: torch.Tensor, key_features: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, M, D) -> (B, N): for each query token the key token of highest cosine similarity."""
    similarity = F.normalize(query_features, dim=-1) @ F.normalize(key_features, dim=-1).transpose(1, 2)
    return similarity.argmax(dim=2)


def geometric_correspondence(boxes_q, flips_q, boxes_k, flips_k, grid: int, size: int) -> torch.Tensor:
    """(B, N) index of the key-view token covering each query token's centre, -1 where it falls outside.

    boxes: (B, 4, 2) crop corners (x, y) in input pixels as `ImageAugment` draws them (top-left, top-right,
    bottom-right, bottom-left; output pixel p maps to x0 + p (x1 - x0) / (size - 1)); flips: (B,) bool.
    """
    patch = size / grid
    cells = torch.arange(grid, dtype=torch.float32, device=boxes_q.device)
    centre = (cells + 0.5) * patch - 0.5                                                      # output pixels

    def to_input(boxes, flips, columns, rows):
        x0, y0 = boxes[:, 0, 0, None], boxes[:, 0, 1, None]
        x1, y1 = boxes[:, 2, 0, None], boxes[:, 2, 1, None]
        columns = torch.where(flips[:, None], size - 1 - columns, columns)
        return x0 + columns * (x1 - x0) / (size - 1), y0 + rows * (y1 - y0) / (size - 1)

    rows, columns = torch.meshgrid(centre, centre, indexing="ij")                              # (g, g)
    rows, columns = rows.flatten()[None].expand(len(boxes_q), -1), columns.flatten()[None].expand(len(boxes_q), -1)
    x, y = to_input(boxes_q, flips_q, columns, rows)                                           # (B, N) input px
    x0, y0 = boxes_k[:, 0, 0, None], boxes_k[:, 0, 1, None]
    x1, y1 = boxes_k[:, 2, 0, None], boxes_k[:, 2, 1, None]
    px = (x - x0) * (size - 1) / (x1 - x0)                                                    # key-view pixels
    py = (y - y0) * (size - 1) / (y1 - y0)
    px = torch.where(flips_k[:, None], size - 1 - px, px)
    column, row = torch.floor((px + 0.5) / patch), torch.floor((py + 0.5) / patch)
    inside = (column >= 0) & (column < grid) & (row >= 0) & (row < grid)
    index = (row * grid + column).long()
    return torch.where(inside, index, torch.full_like(index, -1))


class DenseCL(MoCo):
    name = "densecl"

    def __init__(self, cfg: DenseCLConfig):
        super().__init__(cfg)
        self.dense_head = mlp_head(cfg.encoder.dim, cfg.head_hidden, cfg.embed_dim)
        self.key_dense_head = mlp_head(cfg.encoder.dim, cfg.head_hidden, cfg.embed_dim).requires_grad_(False)
        self.key_dense_head.load_state_dict(self.dense_head.state_dict())
        self.register_buffer("dense_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=1))
        self._pending_dense: list[torch.Tensor] = []

    def ema_pairs(self):
        return [*super().ema_pairs(), (self.key_dense_head, self.dense_head)]

    def forward(self, batch: dict) -> MethodOutput:
        query_tokens = self.encoder.patch_tokens(self.encoder(batch["images"]))              # (B, N, D)
        query = F.normalize(self.head(query_tokens.mean(1)).float(), dim=1)                    # (B, E)
        query_dense = F.normalize(self.dense_head(query_tokens).float(), dim=2)                # (B, N, E)
        with torch.no_grad():
            key_tokens = self.key_encoder.patch_tokens(self.key_encoder(batch["images2"]))
            key = F.normalize(self.key_head(key_tokens.mean(1)).float(), dim=1)
            key_dense = F.normalize(self.key_dense_head(key_tokens).float(), dim=2)            # (B, N, E)
            match = match_tokens(query_tokens.detach(), key_tokens)                            # backbone features
        global_loss, accuracy = self.info_nce(query, key)
        positive = key_dense.gather(1, match[..., None].expand(-1, -1, key_dense.shape[2]))    # (B, N, E)
        dense_loss = self.dense_info_nce(query_dense, positive)
        weight = self.cfg.dense_weight
        if int(batch.get("step", 10**12)) < self.cfg.dense_warmup_steps:
            weight = 0.0
        loss = (1 - weight) * global_loss + weight * dense_loss
        if self.training:
            self._pending_keys.append(key)
            self._pending_dense.append(F.normalize(key_dense.mean(1), dim=1))
        logs = {"loss": loss.detach(), "global_loss": global_loss.detach(), "dense_loss": dense_loss.detach(),
                "accuracy": accuracy, "dense_weight": torch.tensor(weight)}
        if "boxes" in batch:
            grid = self.encoder.grid_size
            truth = geometric_correspondence(batch["boxes"], batch["flips"], batch["boxes2"], batch["flips2"],
                                             grid, self.cfg.encoder.image_size)
            valid = truth >= 0
            if valid.any():
                logs["correspondence_accuracy"] = (match == truth)[valid].float().mean()
        return MethodOutput(loss=loss, logs=logs, extras={"match": match})

    def dense_info_nce(self, query: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Per-token InfoNCE (Eq. 3): positive = the matched key token, negatives = the dense queue."""
        positive_logit = (query * positive).sum(2, keepdim=True)                                # (B, N, 1)
        negative_logits = query @ self.dense_queue.T                                           # (B, N, K)
        logits = torch.cat([positive_logit, negative_logits], dim=2).flatten(0, 1) / self.cfg.temperature
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        from maskkit import collectives

        if self._pending_dense:
            dense = collectives.all_gather_no_grad(torch.cat(self._pending_dense))
            start = int(self.queue_pointer) % len(self.dense_queue)    # the pointer the global queue uses
            self.dense_queue[start : start + len(dense)] = dense
        self._pending_dense = []
        super().after_step(step, total_steps)
