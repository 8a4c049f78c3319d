"""Fixed sine-cosine position embeddings (Vaswani et al. 2017, Sec 3.5; 2D form as in MAE's code)."""

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): half sines, half cosines, frequencies 1 / 10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega                                      # (D/2,)
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_height: int, grid_width: int, cls_token: bool = False) -> torch.Tensor:
    """(grid_h*grid_w [+1], embed_dim) float32 table, row-major over the patch grid.

    The first half of the channels encodes the column index and the second half the row index,
    which is the order MAE's reference code (and so every MAE checkpoint) uses. A CLS token, when
    present, gets an all-zero embedding in front.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64),
        torch.arange(grid_width, dtype=torch.float64),
        indexing="ij",
    )
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()
