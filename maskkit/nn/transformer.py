"""Transformer building blocks: attention, MLP, pre-norm block, and the Vision Transformer.

The block is generic (any token sequence, optional attention mask), so text models reuse it; the ViT
adds patch embedding, fixed 2D sin-cos positions and an optional CLS token (Dosovitskiy et al. 2021,
Sec 3.1), and its forward takes the indices of the tokens to keep, so any method can drop tokens
before the encoder runs (MAE Sec 3, FLIP Sec 3).
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.nn.masking import gather_tokens
from maskkit.nn.pos_embed import sincos_2d
from maskkit.nn.quantized import quantize_linears


@contextlib.contextmanager
def double_backward_safe():
    """Run attention on the math kernel, which supports gradients of gradients.

    In torch 2.13 the default CPU kernel of `scaled_dot_product_attention` has no second derivative
    ("derivative for _scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); losses
    that differentiate through an inner gradient step (energy-based pretraining) run inside this.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


class Attention(nn.Module):
    """Multi-head attention with one fused qkv projection (Vaswani et al. 2017, Sec 3.2).

    Self-attention by default; with `context` the queries come from `x` and the keys and values from
    `context` (XLNet's query stream attends to the content stream, Transformer-XL attends to memory
    concatenated with the segment), with the same projection weights.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, head_dim: int = 0):
        super().__init__()
        if not head_dim and dim % num_heads:
            raise MaskkitError(f"width {dim} is not divisible by num_heads {num_heads}")
        # head_dim: the width of each head, dim // num_heads unless given (a pruned layer keeps its heads' width
        # with fewer heads, so num_heads * head_dim < dim: maskkit compress --prune-heads).
        self.num_heads, self.head_dim = num_heads, head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        # (H,) multipliers of the heads' outputs, set only while compress measures each head's importance
        # (Michel et al. 2019, Sec 4.1: the head mask xi_h); None runs nothing.
        self.head_gate: torch.Tensor | None = None

    def heads(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """(q, k, v), each (B, H, L, D/H): queries from `x` (B, Lq, D), keys and values from `context`
        (B, Lk, D), which defaults to `x` (one fused matmul then)."""
        batch, length, _ = x.shape
        head_dim, inner = self.head_dim, self.num_heads * self.head_dim
        # Split along the last dimension and transpose each part: views with the same strides as a permute of
        # the packed (B, L, 3, H, D/H) tensor, but the backward joins the three gradients with one cat straight
        # into the qkv matmul's layout, where unbinding a permuted copy stacked them and copied twice more.
        if context is None:
            parts = self.qkv(x).split(inner, dim=-1)
            return tuple(part.view(batch, length, self.num_heads, head_dim).transpose(1, 2) for part in parts)
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x, weight[:inner], None if bias is None else bias[:inner])
        kv = F.linear(context, weight[inner:], None if bias is None else bias[inner:])
        q = q.reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)
        k, v = (part.view(batch, context.shape[1], self.num_heads, head_dim).transpose(1, 2)
                for part in kv.split(inner, dim=-1))
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               is_causal: bool = False) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, heads merged and projected: (B, H, Lq, D/H) -> (B, Lq, D).

        `attn_mask`: boolean (True = may attend) or additive float, broadcastable to (B, H, Lq, Lk).
        """
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal))

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D/H) per-head outputs -> (B, L, D), projected."""
        batch, heads, length, head_dim = out.shape
        if self.head_gate is not None:
            out = out * self.head_gate[:, None, None].to(out.dtype)
        return self.proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(x, context)
        return self.attend(q, k, v, attn_mask, is_causal)

    def forward_with_scores(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        """Self-attention that also returns its pre-softmax scores q k^T / sqrt(d) (B, H, L, L), before any
        mask (TinyBERT Sec 3.1 distils them; the analysis tools read them). Written out instead of SDPA,
        which does not return them; `attn_mask` boolean (True = may attend), broadcastable to the scores."""
        q, k, v = self.heads(x)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5                # (B, H, L, L)
        masked = scores if attn_mask is None else scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        return self._merge(masked.softmax(-1) @ v), scores


ACTIVATIONS = ("gelu", "quick_gelu")


class MLP(nn.Module):
    """fc2(act(fc1(x))) with exact GELU, or CLIP's QuickGELU x * sigmoid(1.702 x)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.activation = activation
        # (hidden_dim,) multipliers of the neurons' activations, set only while compress measures each neuron's
        # importance (as Attention.head_gate); None runs nothing.
        self.neuron_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.activation == "quick_gelu" else F.gelu(x)
        if self.neuron_gate is not None:
            x = x * self.neuron_gate.to(x.dtype)
        return self.fc2(x)


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); with `post_norm`, the original
    Transformer's and BERT's order (Vaswani et al. 2017 Sec 5.4, Devlin et al. 2019): LN(x + Attn(x)), then
    LN(x + MLP(x)).

    With `checkpoint_activations` set (train.activation_checkpointing), training keeps only the block's input and
    recomputes the rest in the backward (Chen et al. 2016, "Training deep nets with sublinear memory cost").
    """

    # Every method besides `forward` that runs the block: a sharded block (FSDP2) gathers its weights around them.
    forward_methods = ("forward_at", "forward_with_scores")
    checkpoint_activations: bool = False

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 activation: str = "gelu", post_norm: bool = False, head_dim: int = 0, hidden_dim: int = 0):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, hidden_dim or int(dim * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self._residuals(x, lambda h: self.attn(h, attn_mask=attn_mask, is_causal=is_causal))

    def forward_at(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output at a subset of its tokens: `queries` (B, M, D) are rows of `x` (B, L, D) and
        attend to all of `x`; equal to `forward(x)` at those rows, with the MLP and the query projections
        run on M rows instead of L (MAE's last decoder block, whose loss reads only the removed patches)."""
        context = x if self.post_norm else self.norm1(x)
        return self._residuals(queries, lambda h: self.attn(h, context=context))

    def forward_with_scores(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        """(output (B, L, D), pre-softmax attention scores (B, H, L, L)): see Attention.forward_with_scores."""
        scores = []

        def attend(h: torch.Tensor) -> torch.Tensor:
            out, layer_scores = self.attn.forward_with_scores(h, attn_mask)
            scores.append(layer_scores)
            return out

        return self._residuals(x, attend), scores[0]

    def _residuals(self, x: torch.Tensor, attend) -> torch.Tensor:
        """The block around `attend` (its attention), in the block's norm order."""
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Non-reentrant: it supports inputs that need no gradient and keyword arguments, and it replays
            # the random draws (dropout) of the forward.
            return torch.utils.checkpoint.checkpoint(self._residuals_computed, x, attend, use_reentrant=False)
        return self._residuals_computed(x, attend)

    def _residuals_computed(self, x: torch.Tensor, attend) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + attend(x))
            return self.norm2(x + self.mlp(x))
        x = x + attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    cls_token: bool = True
    # CLIP's ViT (Radford et al. 2021), for loading its weights: learned positions (the CLS token's too),
    # a LayerNorm before the blocks, QuickGELU, and a patch projection without bias.
    position: str = "sincos"         # sincos (fixed, MAE Sec A.1) | learned
    pre_norm: bool = False
    activation: str = "gelu"         # gelu | quick_gelu
    patch_bias: bool = True
    # What `maskkit compress` leaves (0 / [] / "" = none): the width of each head when heads were pruned (0 =
    # dim // num_heads), each layer's number of heads and of feed-forward neurons (structured pruning; [] = num_heads
    # and int(dim * mlp_ratio) in every layer), and "int8" for int8 Linear layers in the blocks (maskkit.nn.quantized).
    head_dim: int = 0
    layer_heads: list[int] = field(default_factory=list)
    layer_hidden: list[int] = field(default_factory=list)
    quantize: str = ""

    def check(self, source: str, prefix: str = "model.encoder") -> None:
        """Each field's valid range, named `PREFIX.FIELD` in the error."""
        require_int(source, f"{prefix}.image_size", self.image_size, 1, 4096)
        require_int(source, f"{prefix}.patch_size", self.patch_size, 1, self.image_size)
        require(self.image_size % self.patch_size == 0, source, f"{prefix}.patch_size", self.patch_size,
                f"a divisor of the image size {self.image_size}")
        require_int(source, f"{prefix}.depth", self.depth, 1)
        require_int(source, f"{prefix}.num_heads", self.num_heads, 1)
        require(self.position in ("sincos", "learned"), source, f"{prefix}.position", self.position, "sincos or learned")
        require(self.activation in ACTIVATIONS, source, f"{prefix}.activation", self.activation, "gelu or quick_gelu")
        if self.position == "sincos":
            check_width(source, f"{prefix}.dim", self.dim, self.num_heads, f"{prefix}.num_heads")
        else:
            require_int(source, f"{prefix}.dim", self.dim, 1)
            require(self.dim % self.num_heads == 0, source, f"{prefix}.dim", self.dim,
                    f"divisible by {prefix}.num_heads={self.num_heads}")
        check_mlp_ratio(source, f"{prefix}.mlp_ratio", self.mlp_ratio, self.dim)
        require_float(source, f"{prefix}.norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        check_layer_shapes(self, source, prefix)


def check_layer_shapes(cfg, source: str, prefix: str) -> None:
    """head_dim, layer_heads, layer_hidden and quantize of a ViTConfig or TextConfig (what compress writes)."""
    require_int(source, f"{prefix}.head_dim", cfg.head_dim, 0, cfg.dim)
    # Pruning only removes: at most num_heads heads and int(dim * mlp_ratio) neurons in a layer.
    for key, most in (("layer_heads", cfg.num_heads), ("layer_hidden", int(cfg.dim * cfg.mlp_ratio))):
        values = getattr(cfg, key)
        require(isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most
                                                 for v in values), source, f"{prefix}.{key}", values,
                f"a list of integers from 1 to {most}, one per layer")
        require(not values or len(values) == cfg.depth, source, f"{prefix}.{key}", values,
                f"one value per layer ({cfg.depth}, {prefix}.depth)")
    require(cfg.quantize in ("", "int8"), source, f"{prefix}.quantize", cfg.quantize, "'' (none) or int8")


def layer_shapes(cfg) -> list[tuple[int, int, int]]:
    """(heads, head width, feed-forward neurons) of each layer of a ViTConfig or TextConfig."""
    if not cfg.head_dim and cfg.dim % cfg.num_heads:
        # A config built in Python skips check(): refused here, not built with narrower heads than it says.
        raise MaskkitError(f"width {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
    head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
    heads = cfg.layer_heads or [cfg.num_heads] * cfg.depth
    hidden = cfg.layer_hidden or [int(cfg.dim * cfg.mlp_ratio)] * cfg.depth
    return [(h, head_dim, f) for h, f in zip(heads, hidden, strict=True)]


def check_width(source: str, key: str, dim: int, num_heads: int, heads_key: str) -> None:
    """A width that 2D sin-cos positions (4 parts) and `num_heads` heads both divide."""
    require_int(source, key, dim, 4)
    require(dim % 4 == 0, source, key, dim, "divisible by 4 (2D sin-cos positions)")
    require(dim % num_heads == 0, source, key, dim, f"divisible by {heads_key}={num_heads}")


def check_mlp_ratio(source: str, key: str, ratio: float, dim: int) -> None:
    require_float(source, key, ratio, 0.0, 64.0, low_open=True)
    require(int(dim * ratio) >= 1, source, key, ratio, f"large enough for a hidden layer (int({dim} * ratio) >= 1)")


class ViT(nn.Module):
    """Vision Transformer encoder. forward(images, keep) -> (B, [1+] N_keep, D) normalised tokens."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise MaskkitError(
                f"model.encoder.image_size={cfg.image_size} is not divisible by patch_size={cfg.patch_size}"
            )
        self.cfg = cfg
        self.grid_size = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid_size**2
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        if cfg.position == "learned":
            # (1, [1+] N, D): row 0 is the CLS token's position when there is one (CLIP).
            self.pos_embed = nn.Parameter(torch.zeros(1, int(cfg.cls_token) + self.num_patches, cfg.dim))
        else:
            # Fixed, so derived from the config and not saved (MAE Sec A.1: "sine-cosine version").
            table = sincos_2d(cfg.dim, self.grid_size, self.grid_size).unsqueeze(0)
            self.register_buffer("pos_embed", table, persistent=False)
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(
            Block(cfg.dim, heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps, cfg.activation, head_dim=head_dim,
                  hidden_dim=hidden)
            for heads, head_dim, hidden in layer_shapes(cfg)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self._init_weights()
        if cfg.quantize:
            quantize_linears(self.blocks)

    def _init_weights(self):
        # MAE's init: patch projection like a linear layer, xavier-uniform linears, small normal tokens.
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.cfg.position == "learned":
            nn.init.normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise MaskkitError(f"images of shape {tuple(images.shape)} do not match the model's (B, {', '.join(map(str, expected))})")

    def embed(self, images: torch.Tensor, position: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens with position embeddings added (before any masking).

        position=False leaves the patch position embeddings out: tokens that carry content only (DenseCL
        matches views on such features, Sec 3.3).
        """
        self.check_images(images)
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)   # (B, N, D)
        if not position:
            return tokens
        return tokens + self.pos_embed[:, -self.num_patches :].to(tokens.dtype)

    def embed_kept(self, images: torch.Tensor, keep: torch.Tensor, position: bool = True) -> torch.Tensor:
        """`embed(images)` at the patches `keep` (B, N_keep) only: the patches' pixels are gathered first and
        projected by the patch embedding's weights as one matrix multiply, so the removed patches cost nothing
        (MAE Sec 3: the encoder "operates only on visible patches"; 4x fewer patch-projection FLOPs at 75%)."""
        self.check_images(images)
        batch, channels, size, patch = images.shape[0], self.cfg.in_channels, self.cfg.image_size, self.cfg.patch_size
        side = size // patch
        pixels = images.reshape(batch, channels, side, patch, side, patch).permute(0, 2, 4, 1, 3, 5)
        pixels = gather_tokens(pixels.reshape(batch, side * side, channels * patch * patch), keep)   # (B, N_keep, C*P*P)
        weight = self.patch_embed.weight.reshape(self.cfg.dim, -1).to(pixels.dtype)       # (D, C*P*P), conv order
        tokens = F.linear(pixels, weight, self.patch_embed.bias)
        if not position:
            return tokens
        return tokens + gather_tokens(self.pos_embed[:, -self.num_patches :].expand(batch, -1, -1), keep).to(tokens.dtype)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, position: bool = True) -> torch.Tensor:
        if keep is not None:
            tokens = self.embed_kept(images, keep, position)              # (B, N_keep, D)
        else:
            tokens = self.embed(images, position)
        if self.cls_token is not None:
            cls = self.cls_token
            if self.cfg.position == "learned":
                cls = cls + self.pos_embed[:, :1]
            tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        if self.norm_pre is not None:
            tokens = self.norm_pre(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output tokens of the patches, the CLS token left out: (B, [1+] N, D) -> (B, N, D)."""
        return tokens[:, 1:] if self.cls_token is not None else tokens

    def features(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(B, D) image features for evaluation: the CLS token, or the mean of the patch tokens."""
        tokens = self(images)
        if pool == "cls" and self.cls_token is not None:
            return tokens[:, 0]
        if pool in ("mean", "cls"):
            return self.patch_tokens(tokens).mean(1)
        raise MaskkitError(f"unknown pool {pool!r}; use 'cls' or 'mean'")


@dataclass
class TextConfig:
    vocab_size: int = 30522          # set from the tokenizer when the model is built for a data set
    context_length: int = 32         # longest token sequence; longer captions are truncated (and counted)
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    causal: bool = False             # FLIP's text tower is bidirectional; CLIP's is causal
    pool: str = "cls"                # cls (first token) | mean (over real tokens) | eot (last real token, CLIP)
    activation: str = "gelu"         # gelu | quick_gelu (CLIP)
    # BERT's LayerNorm over the summed token and position embeddings (Devlin et al. 2019, HF
    # `embeddings.LayerNorm`, eps `norm_eps` = HF `layer_norm_eps`). Without it the blocks' residual stream
    # starts at the embeddings' init scale (std ~0.02) while every block adds O(1) outputs, so the token
    # identity is a small part of what the later blocks read (benchmarks/text_fidelity.py measures the
    # cost). Off by default so that FLIP's text tower and older checkpoints (no such weights) stay as they
    # were; the MLM and PMLM recipes (tiny and base) turn it on.
    embedding_norm: bool = False
    # BERT's architecture (Devlin et al. 2019; HF BertModel), for loading and exporting BERT-family models
    # (maskkit.interop.hf_bert) and for students that export as one (TinyBERT): post-norm blocks and no final
    # LayerNorm, with BERT's init (every weight normal(0, 0.02), biases 0); token-type (segment) embeddings
    # (0 = none); a padding row of the token embedding that gets no gradient (-1 = none); the pooler
    # tanh(W h_[CLS] + b) that BertForSequenceClassification classifies from.
    post_norm: bool = False
    type_vocab_size: int = 0
    padding_idx: int = -1
    pooler: bool = False
    # What `maskkit compress` leaves (0 / [] / "" = none): the width of each head when heads were pruned (0 =
    # dim // num_heads), each layer's number of heads and of feed-forward neurons (structured pruning; [] = num_heads
    # and int(dim * mlp_ratio) in every layer), and "int8" for int8 Linear layers in the blocks (maskkit.nn.quantized).
    head_dim: int = 0
    layer_heads: list[int] = field(default_factory=list)
    layer_hidden: list[int] = field(default_factory=list)
    quantize: str = ""

    def check(self, source: str, prefix: str = "model.text") -> None:
        require_int(source, f"{prefix}.vocab_size", self.vocab_size, 2)
        require_int(source, f"{prefix}.context_length", self.context_length, 2, 4096)
        require_int(source, f"{prefix}.depth", self.depth, 1)
        require_int(source, f"{prefix}.num_heads", self.num_heads, 1)
        require_int(source, f"{prefix}.dim", self.dim, 1)
        require(self.dim % self.num_heads == 0, source, f"{prefix}.dim", self.dim,
                f"divisible by {prefix}.num_heads={self.num_heads}")
        check_mlp_ratio(source, f"{prefix}.mlp_ratio", self.mlp_ratio, self.dim)
        require_float(source, f"{prefix}.norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        require(self.pool in ("cls", "mean", "eot"), source, f"{prefix}.pool", self.pool, "cls, mean or eot")
        require(self.activation in ACTIVATIONS, source, f"{prefix}.activation", self.activation, "gelu or quick_gelu")
        for key in ("embedding_norm", "post_norm", "pooler"):
            require(isinstance(getattr(self, key), bool), source, f"{prefix}.{key}", getattr(self, key), "true or false")
        require_int(source, f"{prefix}.type_vocab_size", self.type_vocab_size, 0, 1024)   # segment ids: BERT has 2
        require_int(source, f"{prefix}.padding_idx", self.padding_idx, -1, self.vocab_size - 1)
        require(not (self.post_norm and self.causal), source, f"{prefix}.post_norm", self.post_norm,
                f"false with {prefix}.causal=true (post-norm is BERT's encoder, which is bidirectional)")
        check_layer_shapes(self, source, prefix)


@dataclass
class TextLayers:
    """What every layer of a TextTransformer computed (TinyBERT's distillation targets, the analysis tools).

    states: depth + 1 tensors (B, L, D), the embedding output then each block's output (HF's `hidden_states`);
    scores: depth tensors (B, H, L, L), each block's pre-softmax attention scores q k^T / sqrt(d), unmasked;
    output: (B, L, D), what `forward` returns (the last state, after the final LayerNorm of a pre-norm model).
    """

    states: list
    scores: list
    output: torch.Tensor


class TextTransformer(nn.Module):
    """Token + learned position (+ token-type) embeddings (LayerNorm-ed with `embedding_norm`, as BERT), then
    pre-norm blocks and a final LayerNorm, or BERT's post-norm blocks with `post_norm`; pooling.

    forward(ids (B, L), attention_mask (B, L) with 1 = real token) -> (B, L, D) tokens. Padding is
    never attended to (it is masked out of every key set), so padded and unpadded captions give the
    same features; `causal` adds the autoregressive mask (token i sees tokens <= i).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim,
                                            padding_idx=cfg.padding_idx if cfg.padding_idx >= 0 else None)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.dim))
        self.token_type_embedding = nn.Embedding(cfg.type_vocab_size, cfg.dim) if cfg.type_vocab_size else None
        self.embedding_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.embedding_norm else None
        self.blocks = nn.ModuleList(Block(cfg.dim, heads, cfg.mlp_ratio, True, cfg.norm_eps, cfg.activation,
                                          cfg.post_norm, head_dim, hidden) for heads, head_dim, hidden in layer_shapes(cfg))
        self.norm = None if cfg.post_norm else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.pooler else None
        if cfg.post_norm:
            self._init_like_bert()
        else:
            self._init_pre_norm()
        if self.token_embedding.padding_idx is not None:
            with torch.no_grad():
                self.token_embedding.weight[self.token_embedding.padding_idx].zero_()
        if cfg.quantize:
            quantize_linears(self.blocks)

    def _init_pre_norm(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.token_type_embedding is not None:
            nn.init.normal_(self.token_type_embedding.weight, std=0.02)
        if self.pooler is not None:
            nn.init.normal_(self.pooler.weight, std=0.02)
            nn.init.zeros_(self.pooler.bias)

    def _init_like_bert(self) -> None:
        """HF BertPreTrainedModel._init_weights: normal(0, 0.02) weights, zero biases, LayerNorm 1 and 0."""
        nn.init.normal_(self.position_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) 1 = real -> (B, 1, L, L) boolean, True = may attend."""
        length = attention_mask.shape[1]
        allowed = attention_mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
        if self.cfg.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=allowed.device).tril()
        return allowed

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): token + position (+ token-type) embeddings, then the embedding LayerNorm.

        `inputs_embeds` (B, L, D) replaces the token-embedding lookup (HF's argument of that name; `ids` then only
        gives the shape): vectors that are not rows of the table (LQAE's quantized image tokens) enter the model
        through its own position, token-type and LayerNorm stage, and E[ids] gives exactly what ids gives."""
        batch, length = ids.shape
        if positions is None:
            if length > self.cfg.context_length:
                raise MaskkitError(f"token ids of shape {tuple(ids.shape)} are longer than the context length "
                                   f"{self.cfg.context_length} (model.text.context_length)")
            position_table = self.position_embedding[:, :length]
        else:
            if positions.shape[-1] != length:
                raise MaskkitError(f"positions of shape {tuple(positions.shape)} do not match token ids of shape "
                                   f"{tuple(ids.shape)}")
            # An embedding lookup, not `table[0, positions]`: the indexing's backward (index_put_ with
            # accumulation) adds repeated positions in a thread-dependent order on the CPU, so PMLM's runs
            # (whose pseudo-masked tokens repeat positions) differed from run to run with 2 threads.
            position_table = F.embedding(positions, self.position_embedding[0])   # (B, L, D) or (L, D)
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(ids)
        elif inputs_embeds.shape != (batch, length, self.cfg.dim):
            raise MaskkitError(f"inputs_embeds of shape {tuple(inputs_embeds.shape)} do not match token ids of shape "
                               f"{tuple(ids.shape)} and the model's width {self.cfg.dim}")
        x = inputs_embeds + position_table.to(inputs_embeds.dtype)                          # (B, L, D)
        if self.token_type_embedding is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(ids)          # HF's default: every token of segment A
            elif token_type_ids.shape != ids.shape:
                raise MaskkitError(f"token_type_ids of shape {tuple(token_type_ids.shape)} do not match token ids "
                                   f"of shape {tuple(ids.shape)}")
            x = x + self.token_type_embedding(token_type_ids)
        elif token_type_ids is not None and bool(token_type_ids.any()):
            raise MaskkitError("token_type_ids given to a text model without token-type embeddings "
                               "(model.text.type_vocab_size=0)")
        return x if self.embedding_norm is None else self.embedding_norm(x)

    def _mask(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, attn_mask: torch.Tensor | None):
        if attn_mask is None:
            return self.attention_mask(torch.ones_like(ids) if attention_mask is None else attention_mask)
        length = ids.shape[1]
        if attn_mask.shape[-2:] != (length, length) or attn_mask.ndim not in (3, 4):
            raise MaskkitError(f"attn_mask of shape {tuple(attn_mask.shape)} does not match ids of shape "
                               f"{tuple(ids.shape)}; expected (B, {length}, {length}) or (B, 1, {length}, {length})")
        return attn_mask if attn_mask.ndim == 4 else attn_mask.unsqueeze(1)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D).

        `positions` (B, L) or (L,): each token's position id (default 0 .. L-1); PMLM gives its appended
        pseudo-masked tokens the position of the token they stand for, so L may exceed the context
        length while every position stays inside it. `attn_mask` (B, L, L) or (B, 1, L, L) boolean,
        True = query may attend key, replaces the padding and causal masks (PMLM, UniLM seq2seq).
        `token_type_ids` (B, L): BERT's segment ids (default all 0), with model.text.type_vocab_size > 0.
        `inputs_embeds` (B, L, D): vectors in place of the token embeddings (see `embed`).
        """
        x = self.embed(ids, positions, token_type_ids, inputs_embeds)
        mask = self._mask(ids, attention_mask, attn_mask)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x if self.norm is None else self.norm(x)

    def forward_layers(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None) -> TextLayers:
        """Every layer's output and attention scores (see TextLayers); `output` equals `forward`'s."""
        x = self.embed(ids, None, token_type_ids)
        mask = self._mask(ids, attention_mask, None)
        states, scores = [x], []
        for block in self.blocks:
            x, block_scores = block.forward_with_scores(x, attn_mask=mask)
            states.append(x)
            scores.append(block_scores)
        return TextLayers(states, scores, x if self.norm is None else self.norm(x))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """BERT's pooler output tanh(W h_[CLS] + b): (B, L, D) -> (B, D); needs model.text.pooler=true."""
        if self.pooler is None:
            raise MaskkitError("this text model has no pooler (model.text.pooler=false)")
        return torch.tanh(self.pooler(tokens[:, 0]))

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D) by the configured pooling."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return mean_of_real_tokens(tokens, attention_mask)
        last = attention_mask.long().sum(1) - 1                               # (B,) the last real token
        return tokens[torch.arange(len(tokens), device=tokens.device), last]

    def features(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self(ids, attention_mask), attention_mask)


class SequenceClassifier(nn.Module):
    """BERT's sequence classifier (Devlin et al. 2019 Sec 4.1; HF BertForSequenceClassification): a linear
    layer on the pooler output tanh(W h_[CLS] + b). (B, L) ids -> (B, num_classes) logits. `labels` names the
    classes in order (HF's id2label)."""

    def __init__(self, backbone: TextTransformer, num_classes: int, labels: list[str] | None = None):
        super().__init__()
        if backbone.pooler is None:
            raise MaskkitError("a sequence classifier needs a text model with a pooler (model.text.pooler=true)")
        if labels is not None and len(labels) != num_classes:
            raise MaskkitError(f"{len(labels)} label names for {num_classes} classes")
        self.backbone, self.labels = backbone, list(labels) if labels else [f"LABEL_{i}" for i in range(num_classes)]
        self.classifier = nn.Linear(backbone.cfg.dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.backbone(ids, attention_mask, token_type_ids=token_type_ids)    # (B, L, D)
        return self.classifier(self.backbone.pooled(tokens))                          # (B, C)


def trim_padding(ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns after the batch's last real token (tokenizers pad to the context length)."""
    real_columns = attention_mask.bool().any(0).nonzero()
    length = int(real_columns.max()) + 1 if len(real_columns) else 1
    return ids[:, :length], attention_mask[:, :length]


def mean_of_real_tokens(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens, (B, L) mask (1 = real) -> (B, D) the mean over the real tokens; padding counts for nothing."""
    real = attention_mask.to(tokens.dtype)
    return (tokens * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).clamp_min(1)


class LMHead(nn.Module):
    """BERT's masked-LM head (Devlin et al. 2019, App. A; HF `BertLMPredictionHead`): dense, GELU, LayerNorm,
    then the vocabulary projection tied to the input embedding, plus a bias.

    Called on the gathered positions that have a target only, (N, D) -> (N, V): projecting every
    position onto the vocabulary costs L/N times more for logits nobody reads.
    """

    def __init__(self, embedding: nn.Embedding, norm_eps: float = 1e-6):
        super().__init__()
        dim = embedding.weight.shape[1]
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.bias = nn.Parameter(torch.zeros(embedding.weight.shape[0]))
        # Tied: the encoder's embedding itself, kept out of this module's registry so that the state dict
        # (and a checkpoint) holds the weight once, under the encoder.
        self.__dict__["embedding"] = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(hidden, self.embedding.weight, self.bias)
