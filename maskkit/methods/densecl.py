"""DenseCL: dense contrastive learning (Wang et al., CVPR 2021), on MoCo v2 and the spine's ViT.

MoCo v2's global loss plus a dense one between matched local features of the two views (Sec 3.2): a
dense projection head (a per-token 2-layer MLP, the 1x1 convolutions of the paper) embeds every patch
token; each query token has one positive key token (below), and the negatives are a second queue
holding one dense key per image (its tokens averaged, then normalised). Loss = (1 - lambda) * global +
lambda * dense (Eq. 4), lambda = 0.5, optionally 0 for the first `dense_warmup_steps` (the official
code's warm-up of the dense weight). lambda = 0 is exactly MoCo v2 (the dense part is not computed).

Positives, `model.positives` (Sec 3.3, "dense correspondence"):

- "features" (the paper's mechanism): the key token whose backbone feature is most similar (cosine,
  argmax over the other view's tokens), the query view's features from the query encoder and the key
  view's from the key encoder, as in the official code. The paper matches ResNet features, which carry
  no absolute position. A ViT's tokens do: the sin-cos position embedding added to every patch makes
  the argmax pick the same grid cell in the other view (at init 51% of matches, and only 14% the true
  correspondence), so most dense positives were wrong. Here the matching features come from a second,
  gradient-free pass of each encoder with the position embedding left out (`ViT(..., position=False)`):
  the same weights, content and context only (two extra forward passes).
- "geometric" (the default): the true correspondence from the two crop boxes and flips
  (`geometric_correspondence`); query tokens whose centre falls outside the key view have no positive
  and add nothing to the dense loss (which still averages over all tokens: see `dense_info_nce`). Not
  the paper's procedure (DenseCL avoids needing the augmentation's geometry), but the positives the
  paper's matching is meant to find.

Why geometric is the default: on the shapes world (large flat backgrounds, 4 px patches) position-free
features find the true correspondence for only 7-9% of the tokens: at init, after 300 steps of MoCo v2
and during 300 steps of DenseCL with geometric positives (its logged `correspondence_accuracy`); the
patch embeddings alone 12%, and the features with positions 15-18%, mostly from the same-cell bias. Local content is too ambiguous here
for the argmax to work before a long training has made tokens context-aware, and wrong positives teach
the dense head to be invariant to the wrong thing. `features` stays available for data where the
content is distinctive (natural images at ImageNet scale), which is where the paper measured it.

The accuracy of the feature matching against the geometric correspondence is logged as
`correspondence_accuracy` whenever the batch carries the crop boxes and the matching is computed: always
with `features` (it is the positives), and with `geometric` only under `model.log_feature_match=true`, since
there the matching serves only that log and costs two more forward passes per step (~40% of a step).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.methods.base import MethodOutput
from maskkit.methods.moco import MoCo, MoCoConfig, mlp_head

POSITIVES = ("features", "geometric")


@dataclass
class DenseCLConfig(MoCoConfig):
    dense_weight: float = 0.5        # lambda (Sec 3.2, Eq. 4)
    dense_warmup_steps: int = 0      # lambda = 0 for the first N steps
    positives: str = "geometric"     # Sec 3.3: "features" (argmax, position-free) or "geometric" (crop boxes)
    log_feature_match: bool = False  # geometric: also run the feature matching, to log correspondence_accuracy

    def check(self, data, source: str) -> None:
        super().check(data, source)
        grid = self.encoder.image_size // self.encoder.patch_size
        require(grid >= 2, source, "model.encoder.patch_size", self.encoder.patch_size,
                f"small enough for a token grid of at least 2x2 (image {self.encoder.image_size} px gives {grid}x{grid})")
        require_float(source, "model.dense_weight", self.dense_weight, 0.0, 1.0)
        require_int(source, "model.dense_warmup_steps", self.dense_warmup_steps, 0)
        require(self.positives in POSITIVES, source, "model.positives", self.positives, f"one of {', '.join(POSITIVES)}")

    def check_steps(self, steps: int, source: str) -> None:
        """A dense warm-up that covers every step would train MoCo v2 while the run says DenseCL."""
        if self.dense_weight > 0 and self.dense_warmup_steps >= steps:
            raise MaskkitError(
                f"{source}: model.dense_warmup_steps={self.dense_warmup_steps} covers the whole run "
                f"(train.steps={steps}), so the dense loss would never be used (plain MoCo v2); set it below {steps}, "
                "or model.dense_weight=0 to train MoCo v2 on purpose")


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
        if self.cfg.dense_weight == 0:
            return super().forward(batch)                    # MoCo v2, without the dense part's cost
        query_tokens = self.encoder.patch_tokens(self.encoder(batch["images"]))              # (B, N, D)
        query = F.normalize(self.head(query_tokens.mean(1)).float(), dim=1)                    # (B, E)
        query_dense = F.normalize(self.dense_head(query_tokens).float(), dim=2)                # (B, N, E)
        with torch.no_grad():
            key_tokens = self.key_encoder.patch_tokens(self.key_encoder(batch["images2"]))
            key = F.normalize(self.key_head(key_tokens.mean(1)).float(), dim=1)
            key_dense = F.normalize(self.key_dense_head(key_tokens).float(), dim=2)            # (B, N, E)
            # (B, N); with geometric positives only to log how often the paper's matching would be right.
            match = self.feature_match(batch) if self.cfg.positives == "features" or self.cfg.log_feature_match else None
        truth = self.true_correspondence(batch) if "boxes" in batch else None                  # (B, N), -1 outside
        if self.cfg.positives == "geometric":
            if truth is None:
                raise MaskkitError("model.positives=geometric needs the crop boxes of both views (batch['boxes'], "
                                   "batch['boxes2']); use model.positives=features")
            positive_index, valid = truth.clamp_min(0), truth >= 0
        else:
            positive_index, valid = match, torch.ones_like(match, dtype=torch.bool)
        global_loss, accuracy = self.info_nce(query, key)
        positive = key_dense.gather(1, positive_index[..., None].expand(-1, -1, key_dense.shape[2]))   # (B, N, E)
        dense_loss = self.dense_info_nce(query_dense, positive, valid)
        weight = self.cfg.dense_weight
        if int(batch.get("step", 10**12)) < self.cfg.dense_warmup_steps:
            weight = 0.0
        loss = (1 - weight) * global_loss + weight * dense_loss
        if self.training:
            self._pending_keys.append(key)
            self._pending_dense.append(F.normalize(key_dense.mean(1), dim=1))
        logs = {"loss": loss.detach(), "global_loss": global_loss.detach(), "dense_loss": dense_loss.detach(),
                "accuracy": accuracy, "dense_weight": torch.tensor(weight)}
        if match is not None and truth is not None and (truth >= 0).any():
            logs["correspondence_accuracy"] = (match == truth)[truth >= 0].float().mean()
        return MethodOutput(loss=loss, logs=logs, extras={"match": match} if match is not None else {})

    @torch.no_grad()
    def feature_match(self, batch: dict) -> torch.Tensor:
        """(B, N): the argmax match of each query token among the key view's, on position-free features."""
        query_features = self.encoder.patch_tokens(self.encoder(batch["images"], position=False))
        key_features = self.key_encoder.patch_tokens(self.key_encoder(batch["images2"], position=False))
        return match_tokens(query_features, key_features)

    def true_correspondence(self, batch: dict) -> torch.Tensor:
        return geometric_correspondence(batch["boxes"], batch["flips"], batch["boxes2"], batch["flips2"],
                                        self.encoder.grid_size, self.cfg.encoder.image_size)

    def dense_info_nce(self, query: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-token InfoNCE (Eq. 3) of (B, N, E) query tokens: positive = the matched key token, negatives =
        the dense queue; averaged over all B * N tokens, those without a positive (`valid` False) adding 0.

        Dividing by B * N rather than by the number of valid tokens keeps every token's weight fixed, so
        micro-batches and ranks (which average their losses) give the loss of the whole batch.
        """
        # -log softmax at the positive = logsumexp(positive, negatives) - positive, without concatenating the
        # (B, N, 1 + K) logits (the cross-entropy over a cat copied and normalised them all once more).
        query = query / self.cfg.temperature
        positive_logit = (query * positive).sum(2)                                             # (B, N)
        negative_logits = query @ self.dense_queue.T                                           # (B, N, K)
        per_token = torch.logaddexp(positive_logit, torch.logsumexp(negative_logits, dim=2)) - positive_logit
        return (per_token * valid).sum() / valid.numel()

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        from maskkit import collectives

        if self._pending_dense:
            dense = collectives.all_gather_no_grad(torch.cat(self._pending_dense))
            start = int(self.queue_pointer) % len(self.dense_queue)    # the pointer the global queue uses
            self.dense_queue[start : start + len(dense)] = dense
        self._pending_dense = []
        super().after_step(step, total_steps)
