"""PMLM: the pseudo-masked language model of UniLMv2 (Bao et al., 2020). Sections refer to the paper.

One forward pass trains two objectives on the same masked tokens (Sec 2.1):

- autoencoding (AE), BERT's: every masked token is predicted from the unmasked context, through the
  conventional mask [M] left at its position;
- partially autoregressive (PAR): the masked tokens are predicted block after block in a random
  factorization order, each block from the context and the blocks predicted before it.

Masking is blockwise (Sec 2.1, "Blockwise Masking and Factorization", Algorithm 1): blocks are drawn
until 15% of the tokens are masked, a block being a 2- to 6-token span 40% of the time and a single token
otherwise; every block is one factorization step, and the steps are taken in a random order.

The input (Sec 2.2, Figure 2) keeps the sequence with [M] at the masked positions and appends, step by
step, a pseudo mask [P] for every masked token of the step followed by a copy of its original token,
each with the position id of the token it stands for. For x1..x6 with {x4, x5} then {x2} predicted:

    x1 [M] x3 [M] [M] x6 | [P] [P] x4 x5 | [P] x2        positions 1 2 3 4 5 6 | 4 5 4 5 | 2 2

The self-attention mask (Sec 2.2, Figure 3) lets the AE part and the PAR part share the context's
encodings without either seeing what it predicts:

- the context and the [M] tokens attend to each other only, exactly as in BERT, so the AE predictions
  and the context encodings never see an appended token;
- every appended token sees the context and [M] tokens (the [M] tokens tell where the other masked
  tokens are, so all position embeddings are available to PAR);
- a [P] of step s sees the [P]s of its own step and the original tokens of the steps before s, which is
  the conditioning of p(x_{M_s} | x_{\\M_{>=s}}); never its own original or a later one;
- an original token of step s sees the original tokens of steps <= s: it encodes the already-known
  tokens that later steps condition on; nothing attends to the originals of a step after its own.

The loss is L_AE + L_PAR (Sec 2.1): the cross-entropy of the original token at each [M] and at each [P],
each computed on the gathered rows alone (no vocabulary projection of the whole sequence). The [M]
positions carry BERT's 80/10/10 replacement (Devlin et al. 2019, Sec 3.1; shared with `maskkit.methods.mlm`).
A consequence to know: the 10% of [M] slots that keep their token are visible to every [P], so a [P] sees
its own token there one time in ten, the same noise BERT's AE objective has; set the replacement to
always-[MASK] (`bert_replacement` with replace_noise 0) for a PAR objective that never sees it.

The tokenizers have no [P]: its id is the first row after the tokenizer's vocabulary (`special.vocab_size`),
so model.text.vocab_size must be at least the tokenizer's size plus one. The appended part is padded to
the batch's largest masked count; a padding slot is attended by nobody, attends only itself (a row with
no key would make the attention softmax NaN) and carries no loss.

Randomness comes from the sample's key (`batch["seed"]`, `maskkit.rng`): Stream.TEXT_MASK gives five
numbers per index j (outputs 5j..5j+4, so they do not depend on the batch's padded length): three for the
j-th attempt of Algorithm 1 (span or not, span length, start) and two for position j's 80/10/10;
Stream.PERMUTATION gives block k its sort key in the factorization order.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from maskkit.data.tokenizer import SpecialIds
from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.methods.base import MethodOutput
from maskkit.methods.mlm import (
    MLM,
    bert_replacement,
    check_text_data,
    check_vocabulary,
    maskable_tokens,
    require_tokens,
    token_cross_entropy,
)
from maskkit.nn.transformer import TextConfig
from maskkit.rng import Stream, uniform


@dataclass
class PMLMConfig:
    text: TextConfig = field(default_factory=TextConfig)
    mask_ratio: float = 0.15          # Algorithm 1: blocks are drawn until 15% of the tokens are masked
    span_probability: float = 0.4     # Algorithm 1: "40% of the time" a block is an n-gram span ...
    span_min: int = 2                 # ... of 2 to 6 tokens; otherwise a single token
    span_max: int = 6

    def check(self, data, source: str) -> None:
        check_text_data(self.text, data, source, "pmlm")
        require_float(source, "model.mask_ratio", self.mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        require_float(source, "model.span_probability", self.span_probability, 0.0, 1.0)
        require_int(source, "model.span_min", self.span_min, 1)
        require_int(source, "model.span_max", self.span_max, self.span_min)
        require(self.span_max <= data.block_length, source, "model.span_max", self.span_max,
                f"at most data.block_length={data.block_length}")


# Sec 2.1, Algorithm 1: blockwise masking and the factorization order.


@torch.compiler.disable   # host-side numpy sampling: eager under train.compile
def blockwise_masking(maskable: torch.Tensor, attempts: torch.Tensor, order_noise: torch.Tensor, mask_ratio: float = 0.15,
                      span_probability: float = 0.4, span_min: int = 2, span_max: int = 6) -> torch.Tensor:
    """Algorithm 1 then a random factorization order: (B, L) int64, each masked token's step, -1 elsewhere.

    maskable (B, L) bool: the tokens that may be masked (not [CLS], [SEP], padding).
    attempts (B, A, 3) uniforms: attempt j draws (span or single token, span length, start).
    order_noise (B, A) uniforms: block k (the k-th accepted) is step rank(order_noise[:, k]).

    Per sample, attempts are made until at least mask_ratio of its maskable tokens are masked: a block is
    a span of randint(span_min, span_max) tokens with probability span_probability, else one token, at a
    uniform start between the first and the last maskable token. A block that would overlap a masked or
    an unmaskable token is dropped and the next attempt made: blocks are disjoint because each is one
    factorization step, and a span never crosses [SEP] into the next document. A sample that runs out of
    its A attempts (A = L draws; in practice about L/10 are used) keeps the blocks it has.

    A host-side loop over attempts, vectorised over the batch: about L/10 iterations of (B, span_max) work.
    """
    device = maskable.device
    maskable = maskable.cpu().numpy()
    attempts = attempts.cpu().numpy()
    batch, length = maskable.shape
    rows, within = np.arange(batch), np.arange(span_max)
    # "until |M| >= 0.15 |x|"; the epsilon keeps 0.15 * 20 = 3.0000000000000004 from asking for 4 tokens.
    target = np.ceil(mask_ratio * maskable.sum(1) - 1e-9)                                 # (B,)
    first = maskable.argmax(1)
    last = length - 1 - maskable[:, ::-1].argmax(1)
    available = maskable.copy()                                                           # (B, L)
    block_of = np.full((batch, length), -1, dtype=np.int64)                               # (B, L) accepted block index
    num_blocks = np.zeros(batch, dtype=np.int64)
    num_masked = np.zeros(batch, dtype=np.int64)
    for attempt in range(attempts.shape[1]):
        active = num_masked < target
        if not active.any():
            break
        is_span, span_draw, start_draw = attempts[:, attempt].T                          # (B,) each
        size = np.where(is_span < span_probability,
                        span_min + (span_draw * (span_max - span_min + 1)).astype(np.int64), 1)
        starts = last - first + 2 - size                   # starts that keep the block in [first, last]
        start = first + (start_draw * np.maximum(starts, 1)).astype(np.int64)
        cells = np.minimum(start[:, None] + within, length - 1)                          # (B, span_max)
        inside = within < size[:, None]
        free = (available[rows[:, None], cells] | ~inside).all(1)
        accept = active & (starts >= 1) & free
        sample, offset = np.nonzero(accept[:, None] & inside)
        available[sample, cells[sample, offset]] = False
        block_of[sample, cells[sample, offset]] = num_blocks[sample]
        num_blocks += accept
        num_masked += np.where(accept, size, 0)
    # Sec 2.1: the blocks are factorization steps taken in a random order (a random permutation of the blocks).
    order_noise = order_noise.cpu().numpy().astype(np.float64)
    order_noise[np.arange(order_noise.shape[1])[None, :] >= num_blocks[:, None]] = np.inf
    rank = order_noise.argsort(1, kind="stable").argsort(1)                               # (B, A)
    step = np.where(block_of >= 0, rank[rows[:, None], np.maximum(block_of, 0)], -1)
    return torch.from_numpy(step).to(device)


# Sec 2.2, Figures 2 and 3: the pseudo-masked input and its self-attention mask.

CONTEXT, PSEUDO, ORIGINAL, PADDING = 0, 1, 2, 3     # what an input slot holds ([M] slots count as context)


@dataclass
class AppendedLayout:
    """Where each masked token's [P] and original copy go in the appended part, K = the batch's largest
    masked count; entries are in factorization order (step, then position), and entries k >= a sample's
    count are padding (valid False) whose slots are the padding slots."""

    positions: torch.Tensor        # (B, K) the masked token's position in the sequence (0 for padding)
    steps: torch.Tensor            # (B, K) its factorization step (-1 for padding)
    valid: torch.Tensor            # (B, K) bool
    pseudo_slots: torch.Tensor     # (B, K) index of its [P] in the appended part, in [0, 2K)
    original_slots: torch.Tensor   # (B, K) index of its original copy in the appended part


def appended_layout(step: torch.Tensor) -> AppendedLayout:
    """The appended part of Figure 2 for (B, L) steps (-1 = not masked): per step, its [P]s then its originals."""
    batch, length = step.shape
    masked = step >= 0
    count = masked.sum(1)                                                                 # (B,)
    size = int(count.max()) if batch else 0
    arange = torch.arange(length, device=step.device)
    sort_key = torch.where(masked, step, length) * length + arange                        # step first, then position
    order = sort_key.argsort(1)[:, :size]                                                 # (B, K)
    index = torch.arange(size, device=step.device)[None, :]                               # (1, K)
    valid = index < count[:, None]
    steps = step.gather(1, order).masked_fill(~valid, -1)
    # Step s occupies 2 * |M_s| slots from 2 * (tokens of earlier steps): [P]s first, then the originals.
    step_index = steps.clamp(min=0)
    step_size = torch.zeros(batch, max(size, 1), dtype=torch.long, device=step.device)
    step_size.scatter_add_(1, step_index, valid.long())                                   # (B, K) tokens per step
    step_start = step_size.cumsum(1) - step_size                                          # tokens before the step
    start, size_of_step = step_start.gather(1, step_index), step_size.gather(1, step_index)
    pseudo = index + start
    original = pseudo + size_of_step
    # Padding entries k >= count take the free slots [2 count, 2K): count + k and K + k never collide.
    pseudo = torch.where(valid, pseudo, count[:, None] + index)
    original = torch.where(valid, original, size + index)
    return AppendedLayout(positions=order.masked_fill(~valid, 0), steps=steps, valid=valid,
                          pseudo_slots=pseudo, original_slots=original)


def slot_contents(attention_mask: torch.Tensor, layout: AppendedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(kind (B, L'), step (B, L')) of every input slot, L' = L + 2K: CONTEXT/PADDING for the sequence,
    PSEUDO/ORIGINAL/PADDING for the appended part, and the factorization step of appended tokens (-1 else)."""
    batch, length = attention_mask.shape
    appended = 2 * layout.valid.shape[1]
    kind = torch.full((batch, length + appended), PADDING, dtype=torch.long, device=attention_mask.device)
    kind[:, :length] = torch.where(attention_mask.bool(), CONTEXT, PADDING)
    slot_step = torch.full_like(kind, -1)
    for slots, slot_kind in ((layout.pseudo_slots, PSEUDO), (layout.original_slots, ORIGINAL)):
        kind.scatter_(1, length + slots, torch.where(layout.valid, slot_kind, PADDING))
        slot_step.scatter_(1, length + slots, layout.steps)
    return kind, slot_step


def attention_from_slots(kind: torch.Tensor, slot_step: torch.Tensor) -> torch.Tensor:
    """(B, L', L') bool, True = the query (row) may attend the key (column): Figure 3's rules."""
    query_kind, key_kind = kind[:, :, None], kind[:, None, :]
    query_step, key_step = slot_step[:, :, None], slot_step[:, None, :]
    # The context and [M] tokens are visible to every token; they themselves see nothing appended.
    sees = (key_kind == CONTEXT) & (query_kind != PADDING)
    # A [P] of step s: the originals of the earlier steps and the [P]s of its own step.
    sees |= (query_kind == PSEUDO) & (((key_kind == ORIGINAL) & (key_step < query_step))
                                      | ((key_kind == PSEUDO) & (key_step == query_step)))
    # An original of step s: the originals of steps <= s (tokens already known when step s+1 is predicted).
    sees |= (query_kind == ORIGINAL) & (key_kind == ORIGINAL) & (key_step <= query_step)
    # Padding attends only itself: an all-False row gives NaN in the softmax, and nobody attends padding.
    length = kind.shape[1]
    sees |= (query_kind == PADDING) & torch.eye(length, dtype=torch.bool, device=kind.device)
    return sees


def pseudo_masked_attention_mask(attention_mask: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Sec 2.2 / Figure 3: the (B, L + 2K, L + 2K) self-attention mask (True = may attend) of the
    pseudo-masked input built by `pmlm_inputs`, from attention_mask (B, L), 1 = real token, and the
    factorization step of each token (B, L), -1 = not masked."""
    return attention_from_slots(*slot_contents(attention_mask, appended_layout(step)))


@dataclass
class PMLMInputs:
    ids: torch.Tensor          # (B, L') the sequence with [M]s, then the appended [P]s and originals
    positions: torch.Tensor    # (B, L') position ids: appended tokens take their masked token's position
    attn_mask: torch.Tensor    # (B, L', L') bool, True = may attend
    layout: AppendedLayout


def pmlm_inputs(ids: torch.Tensor, corrupted: torch.Tensor, attention_mask: torch.Tensor, step: torch.Tensor,
                pseudo_id: int, pad_id: int) -> PMLMInputs:
    """Figure 2's input. ids (B, L) the original tokens, corrupted (B, L) the same with the 80/10/10
    replacement at the masked positions, step (B, L) each token's factorization step (-1 = not masked)."""
    batch, length = ids.shape
    layout = appended_layout(step)
    appended = 2 * layout.valid.shape[1]
    appended_ids = torch.full((batch, appended), pad_id, dtype=ids.dtype, device=ids.device)
    appended_ids.scatter_(1, layout.pseudo_slots, torch.where(layout.valid, pseudo_id, pad_id))
    appended_ids.scatter_(1, layout.original_slots, torch.where(layout.valid, ids.gather(1, layout.positions), pad_id))
    appended_positions = torch.zeros(batch, appended, dtype=torch.long, device=ids.device)
    appended_positions.scatter_(1, layout.pseudo_slots, layout.positions)
    appended_positions.scatter_(1, layout.original_slots, layout.positions)
    sequence_positions = torch.arange(length, device=ids.device).expand(batch, length)
    return PMLMInputs(ids=torch.cat([corrupted, appended_ids], 1),                             # (B, L + 2K)
                      positions=torch.cat([sequence_positions, appended_positions], 1),
                      attn_mask=attention_from_slots(*slot_contents(attention_mask, layout)),
                      layout=layout)


class PMLM(MLM):
    """MLM's encoder and head (`MLM.__init__`, `backbone`, `check_data`), PMLM's input, mask and losses."""

    name = "pmlm"

    def __init__(self, cfg: PMLMConfig):
        super().__init__(cfg)

    def use_tokens(self, special: SpecialIds) -> None:
        """The tokenizer's special ids; [P] takes the id special.vocab_size, which needs one more row."""
        check_vocabulary(special.vocab_size, self.cfg.text.vocab_size, extra_rows=1,
                         why=" and PMLM adds its pseudo mask [P] after them")
        self.special = special

    @property
    def pseudo_id(self) -> int:
        return self.special.vocab_size

    def masking(self, ids: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step (B, L), corrupted ids (B, L)): Algorithm 1's blocks in a random order, and 80/10/10 at them."""
        cfg, special, length = self.cfg, self.special, ids.shape[1]
        noise = uniform(keys, (length, 5), Stream.TEXT_MASK)                                # (B, L, 5)
        order_noise = uniform(keys, (length,), Stream.PERMUTATION)                          # (B, L)
        step = blockwise_masking(maskable_tokens(ids, attention_mask, special), noise[..., :3], order_noise,
                                 cfg.mask_ratio, cfg.span_probability, cfg.span_min, cfg.span_max)
        return step, bert_replacement(ids, step >= 0, noise[..., 3], noise[..., 4], special)

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        special = require_tokens(self.special, batch, self.name)
        ids, attention_mask = batch["ids"], batch["attention_mask"]                        # (B, L) each
        batch_size, length = ids.shape
        if length > self.cfg.text.context_length:
            raise MaskkitError(f"token ids of shape {tuple(ids.shape)} are longer than the context length "
                               f"{self.cfg.text.context_length} (model.text.context_length)")
        step, corrupted = self.masking(ids, attention_mask, batch["seed"])
        inputs = pmlm_inputs(ids, corrupted, attention_mask, step, self.pseudo_id, special.pad)
        hidden = self.encoder(inputs.ids, positions=inputs.positions, attn_mask=inputs.attn_mask)   # (B, L', D)
        layout = inputs.layout
        sample = torch.arange(batch_size, device=ids.device)[:, None].expand_as(layout.valid)[layout.valid]   # (N,)
        position = layout.positions[layout.valid]                                          # (N,)
        targets = ids[sample, position]
        masks = hidden[sample, position]                                                   # (N, D) the [M] slots
        pseudos = hidden[sample, length + layout.pseudo_slots[layout.valid]]               # (N, D) the [P] slots
        logits = self.head(torch.cat([masks, pseudos]))                                   # (2N, V): one head call
        (ae_loss, par_loss), (ae_accuracy, par_accuracy) = token_cross_entropy(logits, targets, sample, batch_size,
                                                                               hidden, parts=2)
        loss = ae_loss + par_loss                                                          # Sec 2.1: L_AE + L_PAR
        logs = {"loss": loss.detach(), "ae_loss": ae_loss.detach(), "par_loss": par_loss.detach(),
                "accuracy": ae_accuracy, "par_accuracy": par_accuracy,
                "masked_fraction": torch.tensor(len(targets) / max(1, int(attention_mask.sum())))}
        return MethodOutput(loss=loss, logs=logs, extras={"step": step, "logits": logits.detach()})

