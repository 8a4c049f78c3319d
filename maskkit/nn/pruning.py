"""Structured pruning that really shrinks the matrices: attention heads (rows of qkv, columns of proj) and
feed-forward neurons (rows of fc1, columns of fc2), and the way back to the dense layout for exports.

A pruned model is described by its config (ViTConfig / TextConfig `head_dim`, `layer_heads`, `layer_hidden`), so
it is rebuilt and loaded like any other; `densify` pads it back with zero heads and neurons, which contribute
exactly nothing (a zero head's values are 0; a zero neuron's activation g(0) = 0 for GELU and QuickGELU), for
formats that only know uniform layers (Hugging Face BERT, ViT-MAE, CLIP).
"""

import torch
from torch import nn

from maskkit.errors import MaskkitError
from maskkit.nn.quantized import Int8Linear, dequantized_linear
from maskkit.nn.transformer import MLP, Attention, layer_shapes


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    return _linear_of(weight, bias)


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (out, in) and `bias`."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def keep_heads(attention: Attention, keep: list[int]) -> None:
    """Keep the heads `keep` (indices into the layer's current heads) of `attention`, in place."""
    if isinstance(attention.qkv, Int8Linear):
        raise MaskkitError("prune a model before quantizing it (its Linear layers are int8)")
    if not keep:
        raise MaskkitError("pruning would remove every head of a layer; keep at least one")
    heads, width = attention.num_heads, attention.head_dim
    index = torch.tensor(sorted(keep))
    columns = (index[:, None] * width + torch.arange(width)).flatten()                    # (K * head_dim,)
    rows = torch.cat([part * heads * width + columns for part in range(3)])              # q, k, v of those heads
    attention.qkv = _sliced(attention.qkv, rows=rows)
    attention.proj = _sliced(attention.proj, columns=columns)
    attention.num_heads = len(index)


def keep_neurons(mlp: MLP, keep: list[int]) -> None:
    """Keep the feed-forward neurons `keep` of `mlp` (rows of fc1, columns of fc2), in place."""
    if isinstance(mlp.fc1, Int8Linear):
        raise MaskkitError("prune a model before quantizing it (its Linear layers are int8)")
    if not keep:
        raise MaskkitError("pruning would remove every feed-forward neuron of a layer; keep at least one")
    index = torch.tensor(sorted(keep))
    mlp.fc1 = _sliced(mlp.fc1, rows=index)
    mlp.fc2 = _sliced(mlp.fc2, columns=index)


def record_shapes(model: nn.Module) -> None:
    """Write the blocks' current heads and neurons into `model.cfg` (a ViT or TextTransformer); a head keeps its
    width dim // num_heads, so num_heads stays the unpruned count that the width is computed from."""
    cfg = model.cfg
    heads = [b.attn.num_heads for b in model.blocks]
    hidden = [b.mlp.fc1.out_features for b in model.blocks]
    cfg.layer_heads = heads if any(h != cfg.num_heads for h in heads) else []
    cfg.layer_hidden = hidden if any(f != int(cfg.dim * cfg.mlp_ratio) for f in hidden) else []


def _padded(linear: nn.Linear, rows: torch.Tensor | None, size: int, columns: bool = False) -> nn.Linear:
    """`linear` with its rows (or columns) placed at `rows` of a zero matrix of `size` rows (columns)."""
    weight = linear.weight.detach()
    if columns:
        full = weight.new_zeros(weight.shape[0], size)
        full[:, rows] = weight
        bias = linear.bias
    else:
        full = weight.new_zeros(size, weight.shape[1])
        full[rows] = weight
        bias = None if linear.bias is None else linear.bias.detach().new_zeros(size).index_copy(0, rows, linear.bias.detach())
    return _linear_of(full, None if bias is None else bias.detach())


def densify(model: nn.Module) -> nn.Module:
    """A ViT or TextTransformer back in the dense layout its config's num_heads and mlp_ratio describe, in place:
    int8 layers dequantized, pruned heads and neurons back as zeros (the function is unchanged). Feed-forward
    layers pruned alike keep their smaller width when mlp_ratio can express it."""
    cfg = model.cfg
    for child in list(model.blocks.modules()):
        for attr, layer in list(child.named_children()):
            if isinstance(layer, Int8Linear):
                setattr(child, attr, dequantized_linear(layer))
    cfg.quantize = ""
    shapes = layer_shapes(cfg)
    widest = max(hidden for _, _, hidden in shapes)
    ratio = widest / cfg.dim
    if int(cfg.dim * ratio) != widest:
        widest, ratio = int(cfg.dim * cfg.mlp_ratio), cfg.mlp_ratio
    full_heads, width = cfg.num_heads, cfg.dim // cfg.num_heads
    for block, (heads, head_dim, hidden) in zip(model.blocks, shapes, strict=True):
        if heads != full_heads:
            if head_dim != width:
                raise MaskkitError(f"heads of width {head_dim} cannot be laid out as {full_heads} heads of width {width}")
            columns = torch.arange(heads * width)                  # the kept heads first, zero heads after them
            rows = torch.cat([part * full_heads * width + columns for part in range(3)])
            block.attn.qkv = _padded(block.attn.qkv, rows, 3 * full_heads * width)
            block.attn.proj = _padded(block.attn.proj, columns, full_heads * width, columns=True)
            block.attn.num_heads, block.attn.head_dim = full_heads, width
        if hidden != widest:
            index = torch.arange(hidden)
            block.mlp.fc1 = _padded(block.mlp.fc1, index, widest)
            block.mlp.fc2 = _padded(block.mlp.fc2, index, widest, columns=True)
    cfg.head_dim, cfg.layer_heads, cfg.layer_hidden, cfg.mlp_ratio = 0, [], [], ratio
    return model
