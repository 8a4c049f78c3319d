"""MLM: BERT's masked language model (Devlin et al., 2019). Sections refer to the BERT paper.

Sec 3.1 "Task #1: Masked LM": 15% of the input tokens are chosen at random and predicted from the rest;
a chosen token is replaced by [MASK] 80% of the time, by a random token 10% of the time and left
unchanged 10% of the time, so that the encoder cannot rely on [MASK] marking the positions it must
predict (it never sees [MASK] when fine-tuned). The loss is the cross-entropy at the chosen positions
only (averaged per sample, then over the samples, so that any split over ranks and micro-batches trains
the same: `token_cross_entropy`). As in the released `create_pretraining_data.py`, the number chosen is round(15% of the
candidates) (at least one), the candidates being the real tokens other than [CLS], [SEP] and [PAD],
and a random replacement is any id of the tokenizer's vocabulary.

The prediction head is BERT's (App. A; `maskkit.nn.transformer.LMHead`, tied to the input embedding) and
runs on the chosen rows alone: Hugging Face's BertForMaskedLM projects all L positions onto the
vocabulary and then ignores 85% of the logits.

Every random number comes from the sample's key (`batch["seed"]`, `maskkit.rng`), so a sample is masked
the same way whatever batch it is in. One stream, Stream.TEXT_MASK, gives three numbers per position j,
drawn as outputs 3j..3j+2 so that they do not depend on the batch's padded length: whether the token is
chosen, how it is replaced, and which random token replaces it.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maskkit.data.tokenizer import SpecialIds
from maskkit.errors import MaskkitError, require, require_float
from maskkit.methods.base import Method, MethodOutput
from maskkit.nn.transformer import LMHead, TextConfig, TextTransformer
from maskkit.rng import Stream, uniform


@dataclass
class MLMConfig:
    text: TextConfig = field(default_factory=TextConfig)
    mask_ratio: float = 0.15          # Sec 3.1: "mask 15% of all WordPiece tokens in each sequence at random"

    def check(self, data, source: str) -> None:
        check_text_data(self.text, data, source, "mlm")
        require_float(source, "model.mask_ratio", self.mask_ratio, 0.0, 1.0, low_open=True, high_open=True)


def check_text_data(text: TextConfig, data, source: str, method: str) -> None:
    """What every text pretraining method asks of its data section: text blocks that fit the context."""
    kind = getattr(data, "kind", None)
    require(kind == "text", source, "data.kind", kind, f"text for method {method} (it trains on token blocks)")
    text.check(source, "model.text")
    require(text.context_length >= data.block_length, source, "model.text.context_length", text.context_length,
            f"at least data.block_length={data.block_length}")


def maskable_tokens(ids: torch.Tensor, attention_mask: torch.Tensor, special: SpecialIds) -> torch.Tensor:
    """(B, L) bool: the real tokens a masked LM may choose, i.e. not [CLS], [SEP] or padding."""
    is_special = (ids == special.cls) | (ids == special.sep) | (ids == special.pad)
    return attention_mask.bool() & ~is_special


def bert_replacement(ids: torch.Tensor, chosen: torch.Tensor, replace_noise: torch.Tensor, token_noise: torch.Tensor,
                     special: SpecialIds) -> torch.Tensor:
    """BERT's 80/10/10 corruption (Sec 3.1) of the chosen positions; (B, L) -> (B, L) ids.

    `replace_noise` and `token_noise` are (B, L) uniforms in [0, 1): below 0.8 the token becomes [MASK],
    in [0.8, 0.9) a random id of the tokenizer's vocabulary (floor(token_noise * vocab_size)), and from
    0.9 up it stays. Unchosen positions are returned unchanged.
    """
    random_ids = (token_noise * special.vocab_size).long().clamp_(max=special.vocab_size - 1)
    corrupted = torch.where(replace_noise < 0.8, torch.full_like(ids, special.mask),
                            torch.where(replace_noise < 0.9, random_ids, ids))
    return torch.where(chosen, corrupted, ids)


def choose_tokens(noise: torch.Tensor, maskable: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """(B, L) bool: in each row the round(mask_ratio * candidates) candidates (at least one) of lowest noise."""
    count = (maskable.sum(1).to(torch.float64) * mask_ratio).round().long()            # (B,)
    count = torch.maximum(count, maskable.any(1).long())
    noise = noise.masked_fill(~maskable, 2.0)                                             # candidates first
    rank = noise.argsort(dim=1, stable=True).argsort(dim=1)                                    # (B, L)
    return rank < count[:, None]


def masked_lm_inputs(ids: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor, special: SpecialIds,
                     mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids (B, L), chosen (B, L) bool) from the samples' keys: Sec 3.1's masking of one batch."""
    noise = uniform(keys, (ids.shape[1], 3), Stream.TEXT_MASK)                            # (B, L, 3)
    chosen = choose_tokens(noise[..., 0], maskable_tokens(ids, attention_mask, special), mask_ratio)
    return bert_replacement(ids, chosen, noise[..., 1], noise[..., 2], special), chosen


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, sample: torch.Tensor, batch_size: int,
                        anchor: torch.Tensor, parts: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([loss per part], [accuracy per part]) of (parts * N, V) logits against (N,) targets, in fp32;
    `sample` (N,) says whose each row is. `parts` > 1 scores several predictions of the same N tokens
    (PMLM's [M] and [P] rows) in one cross-entropy call: slicing the logits instead would make the backward
    pass zero-fill a full (parts * N, V) gradient per slice.

    A part's loss is the mean over the batch's samples of each sample's mean cross-entropy (a sample with
    nothing to predict counts 0), not the mean over all N tokens: the training loop weights micro-batches
    and ranks by their samples, so only a per-sample mean makes the loss of a global batch the same on
    1 or 8 ranks and with any accumulation. The masking draws a fixed fraction of each sample's tokens,
    so the two means differ only by the spread of those counts.
    With N = 0 the loss is 0 attached to `anchor`'s graph, not the NaN of an empty mean, so the step and
    DDP's gradient reduction still run.
    """
    if len(targets) == 0:
        return [anchor.sum() * 0.0] * parts, [torch.zeros((), device=anchor.device)] * parts
    all_targets = targets.repeat(parts)                                                   # (parts * N,)
    per_token = F.cross_entropy(logits.float(), all_targets, reduction="none")          # (parts * N,)
    correct = (logits.detach().argmax(-1) == all_targets).float()
    counts = torch.bincount(sample, minlength=batch_size).clamp_min(1)                  # (B,)
    losses, accuracies = [], []
    for part in range(parts):
        rows = slice(part * len(targets), (part + 1) * len(targets))
        sums = per_token.new_zeros(batch_size).index_add(0, sample, per_token[rows])    # (B,)
        losses.append((sums / counts).sum() / batch_size)
        accuracies.append(correct[rows].mean())
    return losses, accuracies


def check_vocabulary(tokenizer_size: int, model_size: int, key: str = "model.text.vocab_size", extra_rows: int = 0,
                     why: str = "") -> None:
    """The model's embedding (`key` = `model_size` rows) must have a row for every id of the tokenizer (and
    `extra_rows` more); MLM, PMLM and XLNet ask this of their data."""
    needed = tokenizer_size + extra_rows
    if model_size < needed:
        raise MaskkitError(f"the tokenizer has {tokenizer_size} tokens{why} but {key}={model_size}; "
                           f"set {key}={needed} (or more)")


def require_tokens(special: SpecialIds | None, batch: dict, method: str) -> SpecialIds:
    """The special ids set by `use_tokens`, and a batch that carries per-sample keys."""
    if special is None:
        raise MaskkitError(f"method {method} does not know the tokenizer's special ids: call "
                           "method.check_data(data) (or method.use_tokens(tokenizer.special_ids())) before training")
    if "seed" not in batch:
        raise MaskkitError(f"method {method} draws its masks from per-sample keys: the batch needs a 'seed' entry "
                           "(B,) int64, as the text data pipeline's prepare() adds")
    return special


class MLM(Method):
    name = "mlm"

    def __init__(self, cfg: MLMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = TextTransformer(cfg.text)
        self.head = LMHead(self.encoder.token_embedding, cfg.text.norm_eps)
        self.special: SpecialIds | None = None

    @property
    def backbone(self) -> TextTransformer:
        return self.encoder

    def use_tokens(self, special: SpecialIds) -> None:
        """The tokenizer's [CLS], [SEP], [PAD], [MASK] ids and vocabulary size, which masking needs."""
        check_vocabulary(special.vocab_size, self.cfg.text.vocab_size)
        self.special = special

    def check_data(self, data) -> None:
        self.use_tokens(data.tokenizer.special_ids())

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        special = require_tokens(self.special, batch, self.name)
        ids, attention_mask = batch["ids"], batch["attention_mask"]                        # (B, L) each
        inputs, chosen = masked_lm_inputs(ids, attention_mask, batch["seed"], special, self.cfg.mask_ratio)
        hidden = self.encoder(inputs, attention_mask)                                     # (B, L, D)
        logits = self.head(hidden[chosen])                                                # (N, V), N chosen
        sample = chosen.nonzero()[:, 0]                                                   # (N,) row-major, as hidden[chosen]
        (loss,), (accuracy,) = token_cross_entropy(logits, ids[chosen], sample, len(ids), hidden)
        return MethodOutput(loss=loss, logs={"loss": loss.detach(), "accuracy": accuracy},
                            extras={"chosen": chosen, "logits": logits.detach()})
