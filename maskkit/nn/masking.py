"""Per-sample random masking with a fixed count per sample (MAE, He et al. 2021, Sec 3).

"We randomly sample a subset of patches without replacement": draw uniform noise per token, sort it,
keep the tokens with the smallest noise. Every sample keeps exactly the same number of tokens, so the
visible tokens form a dense (B, N_keep, D) tensor and the encoder never sees a mask token.

The noise comes from `maskkit.rng` (stream MASK of each sample's key), so a sample sees the same mask
whatever the batch it lands in, the number of ranks, or whether the run was resumed.
"""

from dataclasses import dataclass

import torch


@dataclass
class Masking:
    keep: torch.Tensor     # (B, N_keep) indices of visible tokens, in noise order
    restore: torch.Tensor  # (B, N) argsort of the shuffle: puts [visible, removed] back in place
    mask: torch.Tensor     # (B, N) float, 1 = removed, 0 = visible (the paper's convention)
    removed: torch.Tensor | None = None  # (B, N - N_keep) indices of removed tokens, in noise order


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """Keep the N*(1-mask_ratio) tokens with the smallest noise. noise: (B, N)."""
    batch, num_tokens = noise.shape
    keep_count = num_kept(num_tokens, mask_ratio)
    shuffle = torch.argsort(noise, dim=1)              # (B, N) ascending: small noise is kept
    restore = torch.argsort(shuffle, dim=1)            # (B, N)
    keep = shuffle[:, :keep_count]                     # (B, N_keep)
    mask = torch.ones(batch, num_tokens, device=noise.device)
    mask[:, :keep_count] = 0
    mask = torch.gather(mask, 1, restore)              # (B, N) back in patch order
    return Masking(keep=keep, restore=restore, mask=mask, removed=shuffle[:, keep_count:])


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), index (B, M) -> (B, M, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
