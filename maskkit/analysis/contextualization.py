"""Whole-layer contextualization analysis: every component of a Transformer layer as a sum over source tokens.

Kobayashi et al. 2021 ("Incorporating Residual and Normalization Layers into Analysis of Masked Language Models",
EMNLP; "2021" below) write the output of a layer's attention block for target token i as a sum of one vector per
source token j, y_i = sum_j y_{i<-j} + b, through attention, the residual and the layer norm; Kobayashi et al. 2024
("Analyzing Feed-Forward Blocks in Transformers through the Lens of Attention Maps", ICLR; "2024") carry the sum
through the feed-forward block with integrated gradients. Here each layer of a maskkit model is decomposed
given its real input x (every input token x_j is its own source), stage by stage:

    attention     y_{i<-j} = sum_h alpha^h_ij f^h(x_j),  f^h(x) = (x W_V^h + b_V^h) W_O^h       (2021 Eq. 4-5)
                  the softmax weights alpha recomputed from Q and K with the padding (and causal) mask; b_O -> bias
    residual      + x_i on its own source (2021 Eq. 6)
    norm          LN(sum_k z_k) = sum_k gamma (z_k - mean(z_k)) / s(z) + beta: each part centred, all divided by
                  the standard deviation s of their total, times gamma; beta -> bias (2021 Eq. 7-8)
    ffn           FFN(h) = g(h W_1 + b_1) W_2 + b_2 with integrated gradients from a zero baseline on the
                  pre-activation parts u_k (2024 Sec 3): for an element-wise g the path integral has the closed
                  form u_k * (g(u) - g(0)) / u, u = sum_k u_k; `riemann_steps` computes it by the midpoint rule
                  instead, to check it. b_2 -> bias
    ffn_residual  + the feed-forward input (post-norm) or the residual stream (pre-norm)
    ffn_norm      the second layer norm, distributed as above (post-norm only)

b_1 on the integrated-gradients path: b_1 is one more input part, the bias source's, on the same straight path from
0 to u as the token parts. Taking b_1 as the baseline instead (a path from g(b_1)) would hand the bias g(b_1), a
share that does not shrink when the tokens' parts do; on one path, the bias competes with the tokens on equal terms
and the shares still sum to g(u) - g(0) = g(u) (g(0) = 0 for GELU and QuickGELU).

Pre-norm blocks (ViT, CLIP, maskkit's text models) run the attention on LN_1(x_j), token j's own vector, so it is
source j's (beta_1 included); their `norm` stage is LN_2 distributed over the residual stream's parts, the input the
feed-forward block reads, and their layer output is `ffn_residual`. In post-norm blocks (BERT) the layer output is
`ffn_norm`. Every stage's parts, the bias included, sum exactly to the real output of that stage
(tests/analysis/test_contextualization.py checks it on the real MiniLM).

A contribution tensor is (targets, sources + 1, width), the last source the bias. The feed-forward stage holds
(targets, sources + 1, d_ff) at once for `chunk` targets: memory O(chunk * n * d_ff), O(n^2 * d_ff) unchunked
(n = 128 tokens, d_ff = 1536, fp64: 200 MB per 128 targets).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maskkit.errors import MaskkitError
from maskkit.nn.transformer import MLP, Attention, Block, TextTransformer, ViT

POST_NORM_STAGES = ("attention", "residual", "norm", "ffn", "ffn_residual", "ffn_norm")
PRE_NORM_STAGES = ("attention", "residual", "norm", "ffn", "ffn_residual")


def stages_of(block: Block) -> tuple[str, ...]:
    return POST_NORM_STAGES if block.post_norm else PRE_NORM_STAGES


def own_sources(x: torch.Tensor) -> torch.Tensor:
    """(L, D) vectors -> (L, L + 1, D) parts with x_i on source i of target i (the residual's contribution)."""
    length, dim = x.shape
    parts = x.new_zeros(length, length + 1, dim)
    index = torch.arange(length, device=x.device)
    parts[index, index] = x
    return parts


def distribute_layer_norm(parts: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LN(sum_k z_k) as parts (2021 Eq. 7-8): gamma (z_k - mean(z_k)) / s(sum_k z_k), beta on the bias source (the
    last). parts (T, S + 1, D) -> (T, S + 1, D); the parts sum to norm(parts.sum(1)) exactly."""
    total = parts.sum(1)                                                        # (T, D)
    deviation = torch.sqrt(total.var(-1, unbiased=False, keepdim=True) + norm.eps)    # (T, 1)
    out = (parts - parts.mean(-1, keepdim=True)) / deviation[:, None, :]
    if norm.weight is not None:
        out = out * norm.weight
    if norm.bias is not None:
        out[:, -1] = out[:, -1] + norm.bias
    return out


def decompose_attention(attention: Attention, x: torch.Tensor,
                        allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """2021 Eq. 4-5: y_{i<-j} = sum_h alpha^h_ij (x_j W_V^h + b_V^h) W_O^h, b_O on the bias source, with alpha =
    softmax(q k^T / sqrt(d)) recomputed from the layer's Q and K; `allowed` (L, L) boolean, True = the query may
    attend the key (padding and causal masks). x (L, D) -> (parts (L, L + 1, D), alpha (H, L, L))."""
    length, dim = x.shape
    heads = attention.num_heads
    q, k, values = (t[0] for t in attention.heads(x[None]))                    # (H, L, D/H) each, b_V in values
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5                      # (H, L, L)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    alpha = scores.softmax(-1)
    w_out = attention.proj.weight.reshape(dim, heads, dim // heads)             # (D, H, D/H): W_O per head
    transformed = torch.einsum("hjc,dhc->hjd", values, w_out)                   # (H, L, D): f^h(x_j)
    parts = x.new_zeros(length, length + 1, dim)
    parts[:, :length] = torch.einsum("hij,hjd->ijd", alpha, transformed)
    if attention.proj.bias is not None:
        parts[:, -1] = attention.proj.bias
    return parts, alpha


def activation_of(mlp: MLP):
    """The element-wise activation g of `mlp` and g'(0), the closed form's limit where u -> 0."""
    if mlp.activation == "quick_gelu":
        return (lambda u: u * torch.sigmoid(1.702 * u)), 0.5
    return F.gelu, 0.5


def integrated_gradient_shares(pre: torch.Tensor, activation, slope_at_zero: float,
                               riemann_steps: int = 0) -> torch.Tensor:
    """Integrated gradients of g(sum_k u_k) from a zero baseline, per part: u_k * int_0^1 g'(a u) da (2024 Sec 3).
    pre (T, S + 1, H) parts u_k -> (T, S + 1, H) shares summing to g(u) - g(0). The closed form for an element-wise
    g is u_k (g(u) - g(0)) / u; with `riemann_steps` the integral is the midpoint rule on autograd's g'."""
    total = pre.sum(1)                                                          # (T, H)
    if riemann_steps:
        slope = torch.zeros_like(total)
        for step in range(riemann_steps):
            point = (total * ((step + 0.5) / riemann_steps)).detach().requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(activation(point).sum(), point)
            slope = slope + gradient / riemann_steps
    else:
        zero = activation(torch.zeros((), dtype=total.dtype, device=total.device))
        tiny = total.abs() < torch.finfo(total.dtype).eps ** 0.5
        slope = torch.where(tiny, torch.full_like(total, slope_at_zero),
                            (activation(total) - zero) / torch.where(tiny, torch.ones_like(total), total))
    return pre * slope[:, None, :]


def decompose_feed_forward(mlp: MLP, parts: torch.Tensor, chunk: int = 16, riemann_steps: int = 0) -> torch.Tensor:
    """FFN(sum_k h_k) as parts: u_k = h_k W_1 (b_1 joins the bias source's part), integrated-gradient shares of g,
    then W_2, b_2 on the bias source. parts (T, S + 1, D) -> (T, S + 1, D), `chunk` targets at a time."""
    g, slope_at_zero = activation_of(mlp)
    out = []
    for start in range(0, parts.shape[0], chunk):
        pre = parts[start:start + chunk] @ mlp.fc1.weight.T                       # (t, S + 1, d_ff)
        pre[:, -1] = pre[:, -1] + mlp.fc1.bias
        shares = integrated_gradient_shares(pre, g, slope_at_zero, riemann_steps)
        block_out = shares @ mlp.fc2.weight.T                                     # (t, S + 1, D)
        block_out[:, -1] = block_out[:, -1] + mlp.fc2.bias
        out.append(block_out)
    return torch.cat(out)


@dataclass
class LayerDecomposition:
    """One layer: stage name -> (L, L + 1, D) parts (last source the bias), in the block's order; the attention
    weights alpha (H, L, L); `output`, the real layer output (L, D) for the next layer's input."""

    stages: dict[str, torch.Tensor]
    alpha: torch.Tensor
    output: torch.Tensor


@torch.no_grad()
def decompose_block(block: Block, x: torch.Tensor, allowed: torch.Tensor | None = None, chunk: int = 16,
                    riemann_steps: int = 0) -> LayerDecomposition:
    """Every stage of `block` on input x (L, D) as per-source parts; see the module docstring."""
    stages = {}
    if block.post_norm:
        stages["attention"], alpha = decompose_attention(block.attn, x, allowed)
        stages["residual"] = stages["attention"] + own_sources(x)
        stages["norm"] = distribute_layer_norm(stages["residual"], block.norm1)
        stages["ffn"] = decompose_feed_forward(block.mlp, stages["norm"], chunk, riemann_steps)
        stages["ffn_residual"] = stages["ffn"] + stages["norm"]
        stages["ffn_norm"] = distribute_layer_norm(stages["ffn_residual"], block.norm2)
    else:
        stages["attention"], alpha = decompose_attention(block.attn, block.norm1(x), allowed)
        stages["residual"] = stages["attention"] + own_sources(x)
        stages["norm"] = distribute_layer_norm(stages["residual"], block.norm2)
        stages["ffn"] = decompose_feed_forward(block.mlp, stages["norm"], chunk, riemann_steps)
        stages["ffn_residual"] = stages["ffn"] + stages["residual"]
    output = block(x[None], attn_mask=None if allowed is None else allowed[None, None])[0]
    return LayerDecomposition(stages, alpha, output)


# The models: their layers' inputs, one text or image at a time.


def text_inputs(model: TextTransformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first layer's input (L, D), the mask (L, L) its layers attend with) for one sequence of real tokens."""
    if ids.ndim != 1:
        raise MaskkitError(f"token ids of shape {tuple(ids.shape)}: analyze one sequence of real tokens, (L,)")
    if len(ids) > model.cfg.context_length:
        raise MaskkitError(f"a text of {len(ids)} tokens is longer than the model's {model.cfg.context_length} "
                           "positions; shorten it")
    x = model.embed(ids[None])[0]                                               # (L, D)
    allowed = model.attention_mask(torch.ones_like(ids)[None])[0, 0]            # (L, L)
    return x, allowed


def image_inputs(model: ViT, image: torch.Tensor) -> torch.Tensor:
    """The first layer's input (1 + N, D) for one image (C, H, W): patches, positions, the CLS token, norm_pre."""
    tokens = model.embed(image[None])
    if model.cls_token is not None:
        cls = model.cls_token if model.cfg.position != "learned" else model.cls_token + model.pos_embed[:, :1]
        tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
    if model.norm_pre is not None:
        tokens = model.norm_pre(tokens)
    return tokens[0]


@torch.no_grad()
def decompose_layers(blocks, x: torch.Tensor, allowed: torch.Tensor | None = None, chunk: int = 16,
                     riemann_steps: int = 0) -> list[LayerDecomposition]:
    """Each block decomposed on its real input, the previous block's real output."""
    layers = []
    for block in blocks:
        layer = decompose_block(block, x, allowed, chunk, riemann_steps)
        layers.append(layer)
        x = layer.output
    return layers


# Measures (2021 Sec 5; 2024 Sec 4-5)


def token_map(parts: torch.Tensor) -> torch.Tensor:
    """||y_{i<-j}||: (T, S + 1, D) -> (T, S + 1) norms, the bias last."""
    return parts.norm(dim=-1)


def mixing_ratio(parts: torch.Tensor) -> float:
    """2021 Sec 5: per target, ||context|| / (||context|| + ||self||) with the mixing vector context =
    sum_{j != i} y_{i<-j} and the preserving vector self = y_{i<-i}, the bias excluded; averaged over the targets.
    The norm of the summed context, not the sum of its norms: contributions that cancel do not mix (with the sum of
    norms MiniLM's ratios come out ~2x higher and grow with the text's length). A single token mixes nothing: 0.
    The same convention as the authors' code (norm-analysis-of-transformer, emnlp2021, BertNormOutput): b_O and
    beta are left out of both vectors, and the mean runs over every token, [CLS] and [SEP] included."""
    tokens = parts[:, :-1]                                                      # (L, L, D)
    index = torch.arange(tokens.shape[0], device=parts.device)
    own = tokens[index, index]                                                  # (L, D)
    context = (tokens.sum(1) - own).norm(dim=-1)
    own = own.norm(dim=-1)
    return float((context / (context + own).clamp_min(torch.finfo(parts.dtype).tiny)).mean())


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort(-1).argsort(-1).to(torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of each row of a against the same row of b, (T, S) -> (T,) (no ties expected in norms)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def contextualization_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """2024 Sec 4: 1 - Spearman's rho between two token-to-token maps (T, S + 1) over the token sources, averaged
    over targets; NaN for a single token, which has no order to change."""
    if before.shape[0] < 2:
        return math.nan
    return float(1.0 - spearman(before[:, :-1], after[:, :-1]).mean())


def amplified_pairs(before: torch.Tensor, after: torch.Tensor, tokens: list[str], top: int = 10) -> list[dict]:
    """The (target, source) pairs i != j whose share of target i's token contributions grows most through a
    component (2024 Sec 5: the feed-forward block amplifies subword pieces of one word and named entities):
    factor = (after_ij / sum_j after_ij) / (before_ij / sum_j before_ij)."""
    share_before = before[:, :-1] / before[:, :-1].sum(1, keepdim=True)
    share_after = after[:, :-1] / after[:, :-1].sum(1, keepdim=True)
    factor = share_after / share_before.clamp_min(torch.finfo(share_before.dtype).tiny)
    factor.fill_diagonal_(-math.inf)
    count = min(top, factor.numel() - len(tokens))
    if count <= 0:
        return []
    best = factor.flatten().topk(count).indices
    pairs = []
    for index in best.tolist():
        target, source = divmod(index, factor.shape[1])
        pairs.append({"target": target, "source": source, "target_token": tokens[target],
                      "source_token": tokens[source], "factor": float(factor[target, source])})
    return pairs
