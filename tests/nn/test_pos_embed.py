import numpy as np
import torch

from maskkit.nn.pos_embed import sincos_2d


def mae_reference(embed_dim: int, grid: int) -> np.ndarray:
    """MAE's published formula written out: meshgrid(w, h), first half from grid[0] (columns)."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(embed_dim // 2, g[0]), one_d(embed_dim // 2, g[1])], axis=1)


def test_matches_the_mae_formula():
    table = sincos_2d(64, 5, 5, cls_token=True)
    assert table.shape == (26, 64)
    assert torch.all(table[0] == 0)
    np.testing.assert_allclose(table[1:].numpy(), mae_reference(64, 5), atol=1e-6)


def test_positions_are_distinct():
    table = sincos_2d(32, 4, 4)
    distances = torch.cdist(table, table) + torch.eye(16) * 10
    assert distances.min() > 0.1
