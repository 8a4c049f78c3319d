"""XLNet: Generalized Autoregressive Pretraining for Language Understanding (Yang et al., 2019).

Section numbers refer to the paper. Permutation language modelling (Sec 2.2): the likelihood of a block
is factorised in a random order z, token z_t predicted from z_<t; the order lives in the attention masks
only, the tokens keep their positions. Two-stream self-attention (Sec 2.3, Fig. 1): the *content* stream
h is an ordinary Transformer-XL stream in which a token sees itself and what precedes it in z; the *query*
stream g starts from a learned vector (`mask_embedding`), knows its position (through the relative
encodings) and sees only the content of the tokens before it, never its own, so it can predict it.
Partial prediction (Sec 2.3): only the last 1/K of the order is predicted (K = 6 in the paper's base
runs); the others are context that sees itself bidirectionally and never the targets. The query stream
runs here for the predicted positions only, (B, M, D) instead of (B, L, D), and the LM head on those rows.

Targets are n-gram spans as in the released pretraining data (`_sample_mask`: n in 1..5 with p ~ 1/n, one
span per window of about K*n tokens, topped up with single tokens to L/K); [CLS], [SEP], [PAD] and [MASK]
are never targets. The order puts every non-target first and the targets after them in a random order
(`_local_perm`); unlike the released code, [SEP]/[CLS] are context rather than shuffled in with the targets.

Transformer-XL parts (Sec 2.4, Dai et al. 2019): relative positional attention with the biases u and v
(HF `r_w_bias`, `r_r_bias`) over sinusoidal encodings of the distance, relative segment encodings (Sec
2.5: a learned vector for "same segment" and one for "different segment", bias `r_s_bias`), and a
recurrence memory of the previous segment's hidden states, gradients stopped. In pretraining a block is
cut into `segments` consecutive chunks processed in order with the memory carried from one to the next,
so recurrence needs no state across batches (a resumed run stays bitwise exact).

Segment ids in pretraining: the number of [SEP] tokens before the position within the chunk, so tokens
of one document share a segment (a [SEP] belongs to the document it closes); only equality is compared.
The memory counts as segment 0, the convention of the original code and of HF, i.e. the same segment as
the chunk's first document, which is usually the continuation of the memory's last one.

The layers compute exactly HF `XLNetLMHeadModel` (attn_type "bi", no bi_data, no clamp_len): post-norm,
h = LN(h + Attn(h)), h = LN(h + FFN(h)), no q/k/v/o biases, FFN = Linear -> GELU -> Linear; LM head tied to
the word embedding plus a bias. `maskkit.interop.hf_xlnet` maps the weights.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskkit.data.tokenizer import SpecialIds
from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.methods.base import Method, MethodOutput
from maskkit.methods.mlm import check_vocabulary, token_cross_entropy
from maskkit.nn.transformer import MLP, Attention, check_mlp_ratio
from maskkit.rng import Stream, uniform


@dataclass
class XLNetConfig:
    vocab_size: int = 30522
    context_length: int = 128        # longest block (relative positions have no limit; used for config checks)
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-12          # HF layer_norm_eps
    predict_fraction_k: int = 6      # Sec 2.3: predict the last 1/K of the factorisation order
    max_span: int = 5                # targets are n-grams, n in 1..max_span with p ~ 1/n (released data code)
    mem_len: int = 0                 # Sec 2.4: hidden states of the previous chunk kept as memory (0: none)
    segments: int = 1                # pretraining: each block is processed as this many chunks, memory carried

    def check(self, data, source: str) -> None:
        """Each field's valid range, and the model against the text blocks the data section delivers."""
        kind = getattr(data, "kind", "image")
        require(kind == "text", source, "data.kind", kind, "text for method xlnet (it trains on token blocks)")
        require_int(source, "model.vocab_size", self.vocab_size, 8)
        require_int(source, "model.context_length", self.context_length, 2, 65536)
        block_length = getattr(data, "block_length", None)
        if block_length is not None:
            require(self.context_length >= block_length, source, "model.context_length", self.context_length,
                    f"at least data.block_length={block_length}")
        require_int(source, "model.depth", self.depth, 1)
        require_int(source, "model.num_heads", self.num_heads, 1)
        require_int(source, "model.dim", self.dim, 2)
        require(self.dim % self.num_heads == 0, source, "model.dim", self.dim,
                f"divisible by model.num_heads={self.num_heads}")
        require(self.dim % 2 == 0, source, "model.dim", self.dim, "even (sinusoidal relative encodings)")
        check_mlp_ratio(source, "model.mlp_ratio", self.mlp_ratio, self.dim)
        require_float(source, "model.norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        require_int(source, "model.predict_fraction_k", self.predict_fraction_k, 2, 1000)
        require_int(source, "model.max_span", self.max_span, 1, 64)
        require_int(source, "model.mem_len", self.mem_len, 0, 65536)
        require_int(source, "model.segments", self.segments, 1, 64)
        if block_length is not None:
            require(block_length % self.segments == 0 and block_length // self.segments >= 2, source,
                    "model.segments", self.segments,
                    f"a divisor of data.block_length={block_length} leaving chunks of at least 2 tokens")


# Relative positional attention (Transformer-XL Sec 3.3, XLNet Sec 2.4)


def relative_encodings(query_length: int, key_length: int, dim: int, device=None) -> torch.Tensor:
    """(key_length + query_length, D) sinusoids of the distances key_length, key_length-1, ..., -query_length+1.

    Row r encodes the distance key_length - r; HF's `relative_positional_encoding` with attn_type "bi",
    computed in float32 the same way (sin half, then cos half) so that the weights transfer exactly.
    """
    distances = torch.arange(key_length, -query_length, -1, device=device, dtype=torch.int64).float()
    inverse_frequency = 1 / torch.pow(10000, torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)
    angles = distances[:, None] * inverse_frequency                   # (R, D/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def relative_index(row_positions: torch.Tensor, query_length: int, memory_length: int) -> torch.Tensor:
    """Which row of `relative_encodings` each (query row, key) pair reads: (..., Q) -> (..., Q, M+L).

    A query at position p of the current chunk is at p + memory_length among the keys; its distance to key
    j is p + memory_length - j, stored at row (M+L) - distance = query_length - p + j. This is the
    Transformer-XL "relative shift" as a gather, which works for any length and for any subset of rows
    (the query stream's targets).
    """
    keys = torch.arange(memory_length + query_length, device=row_positions.device)
    return query_length - row_positions[..., None] + keys


class XLNetLayer(nn.Module):
    """One post-norm layer shared by both streams: h = LN(h + RelAttn(h)), h = LN(h + FFN(h)).

    The score of query row i and key j (Transformer-XL Sec 3.3, XLNet Sec 2.5) is the sum, over sqrt(d), of
        (q_i + u) . k_j              content: SDPA's own q . k, with u added to q
        (q_i + v) . W_r R_(i-j)      position: sinusoid R of the distance, gathered per (i, j)
        (q_i + b) . s_ij             segment: s+ if i and j share a segment, s- otherwise
    The last two go to SDPA as its additive float mask, pre-scaled (SDPA scales only q . k), with a large
    negative value on the pairs i may not attend to.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn = Attention(dim, num_heads, qkv_bias=False, proj_bias=False)
        self.position_projection = nn.Linear(dim, dim, bias=False)                  # W_r (HF `r`)
        self.content_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))     # u (HF `r_w_bias`)
        self.position_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))    # v (HF `r_r_bias`)
        self.segment_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))     # b (HF `r_s_bias`)
        self.segment_embedding = nn.Parameter(torch.zeros(2, num_heads, self.head_dim))  # s+ (same), s- (different)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, content: torch.Tensor, allowed: torch.Tensor, encodings: torch.Tensor,
                position_index: torch.Tensor, different_segment: torch.Tensor | None) -> torch.Tensor:
        """x (B, Q, D) query rows (content rows then query-stream rows); content (B, K, D) memory + content
        stream, the keys and values; allowed (B, Q, K) bool; encodings (R, D); position_index (B|1, Q, K)
        rows of `encodings`; different_segment (B, Q, K) bool or None (no segment term)."""
        q, k, v = self.attn.heads(x, context=content)                              # (B, H, Q|K, Dh)
        scale = self.head_dim**-0.5
        r = self.position_projection(encodings.to(x.dtype))                        # (R, D)
        r = r.reshape(len(r), self.num_heads, self.head_dim).transpose(0, 1)       # (H, R, Dh)
        position_scores = (q + self.position_bias[:, None].to(q.dtype)) @ r.transpose(1, 2)   # (B, H, Q, R)
        batch, heads, rows, _ = position_scores.shape
        index = position_index[:, None].expand(batch, heads, rows, position_index.shape[-1])
        bias = position_scores.gather(3, index)                                    # (B, H, Q, K)
        if different_segment is not None:
            segment = self.segment_embedding.to(q.dtype).permute(1, 2, 0)          # (H, Dh, 2)
            segment_scores = (q + self.segment_bias[:, None].to(q.dtype)) @ segment   # (B, H, Q, 2)
            bias = bias + torch.where(different_segment[:, None], segment_scores[..., 1:], segment_scores[..., :1])
        bias = (bias * scale).masked_fill(~allowed[:, None], _masked_score(bias.dtype))
        out = self.attn.attend(q + self.content_bias[:, None].to(q.dtype), k, v, attn_mask=bias)
        x = self.norm1(x + out)
        return self.norm2(x + self.mlp(x))


def _masked_score(dtype: torch.dtype) -> float:
    """A large finite negative score: a row with every key masked then averages them as HF does (-1e30)
    instead of producing NaN as -inf would."""
    return -1e30 if torch.finfo(dtype).max > 1e30 else torch.finfo(dtype).min / 2


class XLNetModel(nn.Module):
    """The XLNet backbone: word embedding, `depth` relative-attention layers, memory. No final norm (post-norm).

    `forward` runs the content stream alone (fine-tuning, features); `forward_two_stream` runs both streams
    for a given factorisation order (HF's `perm_mask` / `target_mapping`); `streams` is what both call.
    """

    def __init__(self, cfg: XLNetConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads or cfg.dim % 2:
            raise MaskkitError(f"model.dim={cfg.dim} must be even and divisible by model.num_heads={cfg.num_heads}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.dim))        # the query stream's g^(0) (HF `mask_emb`)
        self.layers = nn.ModuleList(XLNetLayer(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
                                    for _ in range(cfg.depth))
        self._init_weights()

    def _init_weights(self):
        # HF / the released code: every weight and relative bias normal(0, 0.02), biases 0, LayerNorm 1/0.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            for param in (layer.content_bias, layer.position_bias, layer.segment_bias, layer.segment_embedding):
                nn.init.normal_(param, std=0.02)
        nn.init.normal_(self.mask_embedding, std=0.02)

    def streams(self, ids: torch.Tensor, allowed: torch.Tensor, query_positions: torch.Tensor | None = None,
                query_allowed: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                mems: list[torch.Tensor] | None = None):
        """The two streams of Sec 2.3 as one set of query rows sharing each layer's weights.

        ids (B, L); allowed (B, L, L) bool, content row i may attend content key j (memory is always
        visible); query_positions (B, M) the positions the query stream predicts, query_allowed (B, M, L)
        what each may see; mems: per layer (B, Lm, D) or None.
        Returns (content (B, L, D), query (B, M, D) or None, new mems (per layer (B, mem_len, D), detached) or None).
        """
        batch, length = ids.shape
        memory_length = 0 if mems is None else mems[0].shape[1]
        if mems is not None and len(mems) != len(self.layers):
            raise MaskkitError(f"mems has {len(mems)} tensors; the model has {len(self.layers)} layers")
        positions = torch.arange(length, device=ids.device).expand(batch, length)          # (B, L)
        rows_allowed = allowed
        if query_positions is not None:
            positions = torch.cat([positions, query_positions], dim=1)                     # (B, L+M)
            rows_allowed = torch.cat([allowed, query_allowed], dim=1)                       # (B, L+M, L)
        if memory_length:
            memory_visible = rows_allowed.new_ones(batch, rows_allowed.shape[1], memory_length)
            rows_allowed = torch.cat([memory_visible, rows_allowed], dim=2)                 # (B, L+M, Lm+L)
        different_segment = None
        if token_type_ids is not None:
            # The memory is segment 0 (the original code's and HF's convention).
            key_segments = F.pad(token_type_ids, (memory_length, 0), value=0)             # (B, Lm+L)
            row_segments = token_type_ids.gather(1, positions)                             # (B, L+M)
            different_segment = row_segments[:, :, None] != key_segments[:, None, :]       # (B, L+M, Lm+L)
        encodings = relative_encodings(length, memory_length + length, self.cfg.dim, ids.device)
        position_index = relative_index(positions, length, memory_length)                  # (B, L+M, Lm+L)

        h = self.token_embedding(ids)                                                      # (B, L, D)
        x = h
        if query_positions is not None:
            g = self.mask_embedding.to(h.dtype).expand(batch, query_positions.shape[1], -1)   # (B, M, D)
            x = torch.cat([h, g], dim=1)                                                   # (B, L+M, D)
        new_mems = []
        for index, layer in enumerate(self.layers):
            content = x[:, :length]
            if self.cfg.mem_len:
                # Sec 2.4: cache this layer's input; stop-gradient, as in Transformer-XL.
                previous = content if mems is None else torch.cat([mems[index].to(content.dtype), content], dim=1)
                new_mems.append(previous[:, -self.cfg.mem_len:].detach())
            keys = content if mems is None else torch.cat([mems[index].to(content.dtype), content], dim=1)
            x = layer(x, keys, rows_allowed, encodings, position_index, different_segment)
        query = x[:, length:] if query_positions is not None else None
        return x[:, :length], query, (new_mems if self.cfg.mem_len else None)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                mems: list[torch.Tensor] | None = None, return_mems: bool = False):
        """Content stream only: (B, L) ids -> (B, L, D), or ((B, L, D), new mems) with `return_mems`.

        attention_mask (B, L), 1 = real token: padding is never attended to (a token always sees itself,
        as in HF). attn_mask (B, L, L) or (B, 1, L, L) bool, True = may attend, replaces it (UniLM-style
        sequence-to-sequence fine-tuning). The memory, if given, is visible to every token.
        """
        batch, length = _check_ids(ids)
        if attn_mask is None:
            real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            _check_shape("attention_mask", real, (batch, length))
            allowed = real[:, None, :] | torch.eye(length, dtype=torch.bool, device=ids.device)   # (B, L, L)
        else:
            if attn_mask.shape[-2:] != (length, length) or attn_mask.ndim not in (3, 4) or (
                    attn_mask.ndim == 4 and attn_mask.shape[1] != 1):
                raise MaskkitError(f"attn_mask of shape {tuple(attn_mask.shape)} does not match ids of shape "
                                   f"{tuple(ids.shape)}; expected (B, {length}, {length}) or (B, 1, {length}, {length})")
            allowed = (attn_mask[:, 0] if attn_mask.ndim == 4 else attn_mask).bool().expand(batch, length, length)
        if token_type_ids is not None:
            _check_shape("token_type_ids", token_type_ids, (batch, length))
        content, _, new_mems = self.streams(ids, allowed, token_type_ids=token_type_ids, mems=mems)
        return (content, new_mems) if return_mems else content

    def forward_two_stream(self, ids: torch.Tensor, perm_mask: torch.Tensor, target_mapping: torch.Tensor | None = None,
                           token_type_ids: torch.Tensor | None = None, mems: list[torch.Tensor] | None = None,
                           attention_mask: torch.Tensor | None = None, target_positions: torch.Tensor | None = None):
        """Both streams for a factorisation order given in HF's convention; returns (query (B, M, D), new mems).

        perm_mask (B, L, L): 1 (True) where token i may NOT attend to token j; target_mapping (B, M, L)
        one-hot rows, the M predicted positions (or `target_positions` (B, M) directly). The content stream
        sees itself regardless of perm_mask[i, i]; a target's query stream must not, so perm_mask[b, t, t]
        must be 1 for every target t.
        """
        batch, length = _check_ids(ids)
        _check_shape("perm_mask", perm_mask, (batch, length, length))
        blocked = perm_mask.bool() if perm_mask.dtype == torch.bool else _zero_one("perm_mask", perm_mask)
        if target_positions is None:
            if target_mapping is None:
                raise MaskkitError("forward_two_stream needs target_mapping (B, M, L) or target_positions (B, M)")
            target_positions = positions_from_mapping(target_mapping, batch, length)
        _check_shape("target_positions", target_positions, (batch, target_positions.shape[-1]))
        if target_positions.numel() and not (0 <= int(target_positions.min()) and int(target_positions.max()) < length):
            raise MaskkitError(f"target_positions must lie in [0, {length}) for ids of shape {tuple(ids.shape)}")
        target_blocked = blocked.gather(1, target_positions[:, :, None].expand(-1, -1, length))   # (B, M, L)
        sees_itself = ~target_blocked.gather(2, target_positions[:, :, None]).squeeze(2)           # (B, M)
        if bool(sees_itself.any()):
            b, m = (int(i) for i in sees_itself.nonzero()[0])
            raise MaskkitError(f"perm_mask of shape {tuple(perm_mask.shape)} lets target {m} (position "
                               f"{int(target_positions[b, m])}, sample {b}) attend to itself; perm_mask[b, t, t] must "
                               "be 1 for every target t (1 = may NOT attend, HF's convention)")
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        _check_shape("attention_mask", real, (batch, length))
        if token_type_ids is not None:
            _check_shape("token_type_ids", token_type_ids, (batch, length))
        eye = torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = (~blocked & real[:, None, :]) | eye                                   # content sees itself
        query_allowed = ~target_blocked & real[:, None, :]
        _, query, new_mems = self.streams(ids, allowed, target_positions, query_allowed, token_type_ids, mems)
        return query, new_mems


def _check_ids(ids: torch.Tensor) -> tuple[int, int]:
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise MaskkitError(f"ids must be (B, L) integers, got shape {tuple(ids.shape)} of {ids.dtype}")
    return ids.shape


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise MaskkitError(f"{name} of shape {tuple(tensor.shape)} does not match the expected "
                           f"{tuple(expected)} (from ids of shape {expected[:2]})")


def _zero_one(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not bool(((tensor == 0) | (tensor == 1)).all()):
        raise MaskkitError(f"{name} of shape {tuple(tensor.shape)} must hold only 0 and 1")
    return tensor == 1


def positions_from_mapping(target_mapping: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """HF's one-hot `target_mapping` (B, M, L) -> target positions (B, M); any other row is an error."""
    if target_mapping.ndim != 3 or tuple(target_mapping.shape[::2]) != (batch, length):
        raise MaskkitError(f"target_mapping of shape {tuple(target_mapping.shape)} does not match ids of shape "
                           f"{(batch, length)}; expected (B, M, {length}) with one-hot rows")
    ones = _zero_one("target_mapping", target_mapping)
    if not bool((ones.sum(-1) == 1).all()):
        raise MaskkitError(f"target_mapping of shape {tuple(target_mapping.shape)} has a row that is not one-hot; "
                           "each of the M rows must mark exactly one predicted position")
    return ones.float().argmax(-1)


def target_mapping(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Target positions (B, M) -> HF's one-hot `target_mapping` (B, M, L) float."""
    return F.one_hot(positions, length).float()


# Partial prediction targets and the factorisation order (Sec 2.2-2.3)


@dataclass
class Permutation:
    """One factorisation order per sample, for blocks (B, L)."""

    perm_mask: torch.Tensor          # (B, L, L) bool, True = token i may NOT attend to token j (HF convention)
    targets: torch.Tensor            # (B, L) bool, the predicted tokens (the last 1/K of the order)
    target_positions: torch.Tensor   # (B, M) int64, each sample's targets in position order, padded with 0
    target_valid: torch.Tensor       # (B, M) bool, False on the padding rows
    rank: torch.Tensor               # (B, L) float: -1 for context, else the target's place in the order (larger = later)


def never_targets(ids: torch.Tensor, special: SpecialIds, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: padding and the special tokens [PAD], [CLS], [SEP], [MASK]."""
    special_token = (ids == special.pad) | (ids == special.cls) | (ids == special.sep) | (ids == special.mask)
    return special_token if attention_mask is None else special_token | ~attention_mask.bool()


def select_spans(eligible: np.ndarray, span_uniforms: np.ndarray, fill_uniforms: np.ndarray,
                 predict_fraction_k: int, max_span: int) -> np.ndarray:
    """One sample's targets: (L,) bool, round(eligible / K) tokens in n-gram spans (released `_sample_mask`).

    Walk left to right; each span draws n with p ~ 1/n and a window of (K - 1) n context tokens, a uniform
    part of which precedes the span (so on average 1 token in K is predicted). A span stops early at a
    token that cannot be predicted. Tokens still missing at the end are single tokens chosen at random,
    preferring ones whose neighbours are not targets so that spans stay within `max_span`.
    span_uniforms (2, L): (n, left context) draws of span k in column k; fill_uniforms (L,): priorities.
    """
    length = len(eligible)
    goal = int(round(eligible.sum() / predict_fraction_k))
    if goal == 0 and eligible.any():
        goal = 1
    targets = np.zeros(length, dtype=bool)
    grams = np.arange(1, max_span + 1)
    cumulative = np.cumsum(1.0 / grams)
    cumulative /= cumulative[-1]
    count, cursor, span = 0, 0, 0
    while count < goal and cursor < length and span < length:
        n = int(grams[min(np.searchsorted(cumulative, span_uniforms[0, span], side="right"), max_span - 1)])
        n = min(n, goal - count)
        context = n * (predict_fraction_k - 1)
        left = int(span_uniforms[1, span] * context)
        span += 1
        begin = cursor + left
        while begin < length and not eligible[begin]:
            begin += 1
        end = begin
        while end < min(begin + n, length) and eligible[end]:
            end += 1
        if begin >= length:
            break
        targets[begin:end] = True
        count += end - begin
        cursor = end + (context - left)
    if count < goal:
        order = np.argsort(fill_uniforms, kind="stable")
        for isolated_only in (True, False):
            for position in order:
                if count == goal:
                    break
                if not eligible[position] or targets[position]:
                    continue
                if isolated_only and ((position > 0 and targets[position - 1])
                                      or (position + 1 < length and targets[position + 1])):
                    continue
                targets[position] = True
                count += 1
    return targets


def permutation_from_targets(targets: torch.Tensor, order_uniforms: torch.Tensor) -> Permutation:
    """The order of Sec 2.3 with partial prediction: every non-target first (they see each other and never a
    target), then the targets in the order of their uniforms (`_local_perm`). perm_mask[i, j] = 1 when j is
    a target not before i, so a target does not see itself nor later targets."""
    rank = torch.where(targets, order_uniforms.to(torch.float32), torch.full_like(order_uniforms, -1.0))   # (B, L)
    perm_mask = targets[:, None, :] & (rank[:, None, :] >= rank[:, :, None])            # (B, L, L)
    counts = targets.sum(1)
    width = int(counts.max()) if len(counts) else 0
    # Position order within each sample: sorting "is target" descending, stably, lists targets first.
    order = torch.sort(targets.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]   # (B, M)
    valid = torch.arange(width, device=targets.device)[None, :] < counts[:, None]
    positions = torch.where(valid, order, torch.zeros_like(order))
    return Permutation(perm_mask, targets, positions, valid, rank)


@torch.compiler.disable   # host-side numpy sampling: eager under train.compile
def sample_permutation(keys: torch.Tensor, ids: torch.Tensor, special: SpecialIds,
                       attention_mask: torch.Tensor | None = None, predict_fraction_k: int = 6, max_span: int = 5,
                       chunk: int = 0) -> Permutation:
    """Targets and factorisation order of each sample, from its key alone (`maskkit.rng`).

    Sample b's draws are numbers of its own streams (TEXT_MASK for the spans, PERMUTATION for the order),
    so its targets and order do not depend on the rest of the batch. `chunk` selects a fresh set of draws
    for the chunk-th piece of a block (pretraining with `segments`).
    """
    batch, length = ids.shape
    spans = uniform(keys, ((chunk + 1) * 3, length), Stream.TEXT_MASK)[:, chunk * 3:]       # (B, 3, L)
    order = uniform(keys, (chunk + 1, length), Stream.PERMUTATION)[:, chunk]               # (B, L)
    eligible = (~never_targets(ids, special, attention_mask)).cpu().numpy()
    spans = spans.cpu().numpy()
    targets = np.stack([select_spans(eligible[b], spans[b, :2], spans[b, 2], predict_fraction_k, max_span)
                        for b in range(batch)]) if batch else np.zeros((0, length), dtype=bool)
    return permutation_from_targets(torch.from_numpy(targets).to(ids.device), order.to(ids.device))


def segment_ids(ids: torch.Tensor, sep: int) -> torch.Tensor:
    """(B, L) the number of [SEP] tokens before each position: one id per document of a packed block."""
    separators = (ids == sep).long()
    return separators.cumsum(1) - separators


class XLNet(Method):
    """Permutation language modelling with two-stream attention and partial prediction (Sec 2.2-2.4)."""

    name = "xlnet"

    def __init__(self, cfg: XLNetConfig):
        super().__init__()
        self.cfg = cfg
        self.model = XLNetModel(cfg)
        # HF `lm_loss`: a linear layer tied to the word embedding, with its own bias.
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.special: SpecialIds | None = None

    @property
    def backbone(self) -> XLNetModel:
        return self.model

    def use_tokens(self, special: SpecialIds) -> None:
        self.special = special

    def check_data(self, data) -> None:
        check_vocabulary(data.tokenizer.vocab_size, self.cfg.vocab_size, "model.vocab_size")
        self.use_tokens(data.tokenizer.special_ids())

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, V): called on the predicted rows only."""
        return F.linear(hidden, self.model.token_embedding.weight, self.lm_bias)

    def predict_chunk(self, ids: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor, chunk: int,
                      mems: list[torch.Tensor] | None):
        """One chunk of a block: (logits (N, V) of its N predicted tokens, their ids (N,), the sample of each (N,),
        new mems)."""
        if self.special is None:
            raise MaskkitError("XLNet needs the tokenizer's special ids: call method.check_data(data) or use_tokens()")
        length = ids.shape[1]
        perm = sample_permutation(keys, ids, self.special, attention_mask, self.cfg.predict_fraction_k,
                                  self.cfg.max_span, chunk)
        real = attention_mask.bool()
        eye = torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = (~perm.perm_mask & real[:, None, :]) | eye                         # (B, L, L), content sees itself
        positions = perm.target_positions                                            # (B, M)
        query_allowed = ~perm.perm_mask.gather(1, positions[:, :, None].expand(-1, -1, length)) & real[:, None, :]
        _, query, new_mems = self.model.streams(ids, allowed, positions, query_allowed,
                                                segment_ids(ids, self.special.sep), mems)   # query (B, M, D)
        logits = self.lm_logits(query[perm.target_valid])                             # (N, V)
        sample = perm.target_valid.nonzero()[:, 0]                                    # (N,) whose each row is
        return logits, ids.gather(1, positions)[perm.target_valid], sample, new_mems

    def forward(self, batch: dict) -> MethodOutput:
        ids, keys = batch["ids"], batch["seed"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        if ids.shape[1] % self.cfg.segments:
            raise MaskkitError(f"ids of shape {tuple(ids.shape)} cannot be cut into model.segments="
                               f"{self.cfg.segments} equal chunks")
        chunk_length = ids.shape[1] // self.cfg.segments
        logits, labels, samples, mems = [], [], [], None
        for chunk in range(self.cfg.segments):
            window = slice(chunk * chunk_length, (chunk + 1) * chunk_length)
            chunk_logits, chunk_labels, chunk_samples, mems = self.predict_chunk(
                ids[:, window], attention_mask[:, window], keys, chunk, mems)
            logits.append(chunk_logits)
            labels.append(chunk_labels)
            samples.append(chunk_samples)
        logits, labels = torch.cat(logits), torch.cat(labels)                       # (N, V), (N,)
        # The mean over samples of each sample's mean (blocks of special tokens only count 0): see
        # `token_cross_entropy`, which makes the loss independent of how ranks and micro-batches split a batch.
        (loss,), (accuracy,) = token_cross_entropy(logits, labels, torch.cat(samples), len(ids), logits)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "accuracy": accuracy},
                            extras={"num_predicted": torch.tensor(len(labels))})


__all__ = ["XLNetConfig", "XLNetModel", "XLNetLayer", "XLNet", "Permutation", "sample_permutation",
           "select_spans", "permutation_from_targets", "never_targets", "segment_ids", "relative_encodings",
           "relative_index", "positions_from_mapping", "target_mapping"]
