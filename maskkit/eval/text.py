"""Fine-tuning protocols for pretrained text encoders: classification, and UniLM-style sequence-to-sequence
generation (Dong et al. 2019, "Unified Language Model Pre-training", Sec 2.3; Bao et al. 2020, UniLMv2
Sec 3.3), scored with ROUGE-L (Lin 2004) and exact match.

Both protocols train a deep copy of the backbone (the caller's is never modified, so one pretrained backbone
can be fine-tuned several times) with BERT's fine-tuning recipe (Devlin et al. 2019, Sec 4 / App. A.3):
AdamW (betas 0.9, 0.999; weight decay 0.01, norms, biases and embeddings exempt), a linear warmup over the
first 10% of the steps, then a cosine decay to 0 (maskkit's schedule; BERT decays linearly), gradients
clipped at norm 1. One learning rate for every layer: layer-wise decay (ELECTRA, BEiT) helps deep backbones
and is left out to keep the protocol a single number to tune. A backbone is any module with
`forward(ids, attention_mask=None, attn_mask=None) -> (B, L, D)`, a `token_embedding` (nn.Embedding) and
`cfg.dim` (maskkit's TextTransformer, the XLNet model); `cfg.context_length`, when it has one, bounds the
packed sequence length.

Sequence-to-sequence, as UniLM packs it: one sequence `[CLS] source [SEP] target [SEP]`, one Transformer,
and a self-attention mask that makes the source segment bidirectional and the target segment left-to-right
(`seq2seq_attention_mask`; rows are queries, 1 = may attend):

                 [CLS] s1  s2 [SEP]  t1  t2 [SEP]  pad
    [CLS] s1 s2 [SEP]  1    1   1   1     0   0   0     0     the source sees the source
    t1                 1    1   1   1     1   0   0     0     a target token sees the source,
    t2                 1    1   1   1     1   1   0     0     itself and the target before it
    [SEP]              1    1   1   1     1   1   1     0
    pad                0    0   0   0     0   0   0     1     (a padded row sees only itself: no empty softmax)

Training objective: UniLM masks a share of the target tokens and predicts them from their [MASK] inputs;
here the simpler next-token form under the same mask is used (teacher forcing): the output at the source's
[SEP] predicts t1, the output at t_i predicts t_(i+1), the output at the last target token predicts the
closing [SEP]. Every target token gets a loss in every step, and generation is exactly the training
computation: feed `[CLS] source [SEP] t1 .. tk`, read t_(k+1) off the last position, append, repeat until
[SEP] or `max_target_length` tokens (the whole sequence is recomputed each step; descriptions are short, so
there is no key/value cache). The vocabulary projection is a fresh BERT LM head tied to the backbone's
token embedding (`LMHead`).
"""

import copy
import logging
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from maskkit.config import OptimConfig
from maskkit.data.tokenizer import SpecialIds
from maskkit.errors import MaskkitError
from maskkit.nn.transformer import LMHead, SequenceClassifier, mean_of_real_tokens, trim_padding
from maskkit.rng import Stream, scalar_seed
from maskkit.train.optim import lr_at, param_groups

log = logging.getLogger("maskkit")
WEIGHT_DECAY = 0.01       # BERT's fine-tuning setting; norms, biases and embeddings are exempt (param_groups)
BETAS = (0.9, 0.999)
WARMUP_FRACTION = 0.1     # BERT warms up over the first 10% of the steps
CLIP_GRAD = 1.0           # BERT clips the global gradient norm at 1


# Data.


@dataclass
class TextExamples:
    """Labelled token sequences for classification, as `Tokenizer.encode` makes them."""

    ids: torch.Tensor              # (N, L) int64
    attention_mask: torch.Tensor   # (N, L) int64, 1 = real token
    labels: torch.Tensor           # (N,) int64 in [0, num_classes)

    def __post_init__(self):
        if self.ids.ndim != 2 or self.attention_mask.shape != self.ids.shape or self.labels.shape != self.ids.shape[:1]:
            raise MaskkitError(f"TextExamples: ids {tuple(self.ids.shape)}, attention_mask "
                               f"{tuple(self.attention_mask.shape)} and labels {tuple(self.labels.shape)} do not "
                               "match; expected (N, L), (N, L) and (N,)")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Seq2SeqExamples:
    """Source and target token ids, one list per example, WITHOUT [CLS], [SEP] or padding: the protocol packs
    `[CLS] source [SEP] target [SEP]` itself (strip the specials `Tokenizer.encode` adds, or encode with a
    tokenizer whose post-processor adds none)."""

    sources: list[list[int]]
    targets: list[list[int]]

    def __post_init__(self):
        if len(self.sources) != len(self.targets):
            raise MaskkitError(f"Seq2SeqExamples: {len(self.sources)} sources but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.sources)


def stratified_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of `count` examples (all if fewer) with each class's share of `labels` (N,) kept.

    Class c gets floor(count * n_c / N) examples and the remainder goes to the largest fractional parts (ties
    to the lower class), so every class with n_c >= N / count appears; which of its examples is a seeded
    permutation of that class alone. The same (labels, count, seed) always gives the same subset, so the
    models compared on it (a pretrained backbone and its random init, several pretraining seeds) fine-tune
    on the same documents.
    """
    if count >= len(labels):
        return torch.arange(len(labels))
    classes, sizes = torch.unique(labels, return_counts=True)
    exact = sizes.double() * count / len(labels)
    share = exact.floor().long()
    remainder = count - int(share.sum())
    order = sorted(range(len(classes)), key=lambda c: (-float(exact[c] - share[c]), c))
    share[order[:remainder]] += 1
    chosen = []
    for label, size in zip(classes.tolist(), share.tolist(), strict=True):
        members = (labels == label).nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(scalar_seed(seed, label, -1, Stream.ORDER))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:size]])
    return torch.cat(chosen).sort().values


def subset(examples: TextExamples, indices: torch.Tensor) -> TextExamples:
    return TextExamples(examples.ids[indices], examples.attention_mask[indices], examples.labels[indices])


# The shared loop.


def _fit(model: nn.Module, size: int, batch_loss: Callable[[list[int]], torch.Tensor], *, epochs: int, lr: float,
         batch_size: int, seed: int, progress: bool, desc: str,
         after_epoch: Callable[[int], None] | None = None) -> list[float]:
    """`epochs` passes over `size` examples in seeded random batches; the mean training loss of each epoch.

    `batch_loss(indices)` computes the loss of those examples; `after_epoch(epoch)` runs at each epoch's end
    (an evaluation; it may switch the model to eval mode, the next epoch switches it back).
    """
    if size == 0 or batch_size < 1 or epochs < 0:
        raise MaskkitError(f"fine-tuning needs training examples, batch_size >= 1 and epochs >= 0; got {size} "
                           f"examples, batch_size={batch_size}, epochs={epochs}")
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=lr, betas=BETAS)
    total_steps = epochs * math.ceil(size / batch_size)
    schedule = OptimConfig(warmup_steps=int(WARMUP_FRACTION * total_steps), min_lr=0.0)
    bar = tqdm(total=total_steps, desc=desc, disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    step, epoch_losses = 0, []
    for epoch in range(epochs):
        model.train()
        # The order of epoch e depends only on (seed, epoch): same inputs, same result.
        generator = torch.Generator().manual_seed(scalar_seed(seed, epoch, -1, Stream.ORDER))
        losses = []
        for indices in torch.randperm(size, generator=generator).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, lr, schedule)
            loss = batch_loss(indices.tolist())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            step += 1
            bar.update(1)
        epoch_losses.append(sum(losses) / len(losses))
        if progress and bar.disable:          # no terminal: one plain line per epoch instead of the bar
            log.info("%s: epoch %d/%d, training loss %.4f", desc, epoch + 1, epochs, epoch_losses[-1])
        if after_epoch is not None:
            after_epoch(epoch)
    bar.close()
    return epoch_losses


def _check_backbone(backbone: nn.Module) -> None:
    if not isinstance(getattr(backbone, "token_embedding", None), nn.Embedding) or not hasattr(backbone, "cfg"):
        raise MaskkitError(f"a {type(backbone).__name__} cannot be fine-tuned on text: the backbone needs a "
                           "`token_embedding` (nn.Embedding) and a `cfg` with `dim` (a TextTransformer or XLNet model)")


# Classification.


class TextClassifier(nn.Module):
    """Backbone, mean of the real tokens' outputs, LayerNorm, linear head: (B, L) ids -> (B, num_classes).

    The LayerNorm after pooling is MAE's `fc_norm` for global pooling: an average of normalised tokens has a
    smaller, input-dependent scale.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.norm = nn.LayerNorm(backbone.cfg.dim)
        self.head = nn.Linear(backbone.cfg.dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.02, generator=generator)    # BERT's initializer_range
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(ids, attention_mask=attention_mask)               # (B, L, D)
        return self.head(self.norm(mean_of_real_tokens(tokens, attention_mask)))


@torch.no_grad()
def text_features(backbone: nn.Module, examples: TextExamples, batch_size: int,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, D) frozen features of `examples`: the mean of the real tokens' outputs (TextClassifier's pooling), in
    eval mode; padding changes nothing. The text-probe protocol fits a linear classifier on them."""
    was_training = backbone.training
    backbone.eval()
    features = []
    for indices in torch.arange(len(examples)).split(batch_size):
        ids, attention_mask, _ = _batch(examples, indices, torch.device(device))
        tokens = backbone(ids, attention_mask=attention_mask)                    # (B, L, D)
        features.append(mean_of_real_tokens(tokens, attention_mask).float().cpu())
    backbone.train(was_training)
    return torch.cat(features) if features else torch.zeros(0, backbone.cfg.dim)


def _batch(examples: TextExamples, indices, device: torch.device):
    ids, attention_mask = trim_padding(examples.ids[indices], examples.attention_mask[indices])
    return ids.to(device), attention_mask.to(device), examples.labels[indices].to(device)


@torch.no_grad()
def classification_accuracy(model: TextClassifier, examples: TextExamples, batch_size: int,
                            device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of `model` on `examples`, in [0, 1] (eval mode)."""
    model.eval()
    correct = 0
    for indices in torch.arange(len(examples)).split(batch_size):
        ids, attention_mask, labels = _batch(examples, indices, torch.device(device))
        correct += (model(ids, attention_mask).argmax(1) == labels).sum().item()
    return correct / max(1, len(examples))


def finetune_text_classifier(backbone: nn.Module, train: TextExamples, test: TextExamples, *, num_classes: int,
                             epochs: int, lr: float, batch_size: int, seed: int, device: str | torch.device,
                             progress: bool = True) -> dict:
    """Fine-tune a copy of `backbone` with a mean-pool + LayerNorm + linear head on `train`.

    Returns {"accuracy": test top-1 after the last epoch, "train_accuracy": the same on `train`, "curve": the
    test accuracy after each epoch, "train_loss": each epoch's mean training loss}. `lr` is the peak learning
    rate of every parameter. Deterministic: the head's init and the batch order come from `seed` alone.
    """
    _check_backbone(backbone)
    for name, examples in (("train", train), ("test", test)):
        if len(examples) and not (0 <= int(examples.labels.min()) and int(examples.labels.max()) < num_classes):
            raise MaskkitError(f"{name} labels span [{int(examples.labels.min())}, {int(examples.labels.max())}], "
                               f"outside [0, num_classes={num_classes})")
    device = torch.device(device)
    model = TextClassifier(copy.deepcopy(backbone), num_classes, torch.Generator().manual_seed(seed))
    model = model.to(device).requires_grad_(True)

    def batch_loss(indices: list[int]) -> torch.Tensor:
        ids, attention_mask, labels = _batch(train, indices, device)
        return F.cross_entropy(model(ids, attention_mask), labels)

    curve = []
    losses = _fit(model, len(train), batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  progress=progress, desc="finetune text",
                  after_epoch=lambda epoch: curve.append(classification_accuracy(model, test, batch_size, device)))
    return {"accuracy": curve[-1] if curve else classification_accuracy(model, test, batch_size, device),
            "train_accuracy": classification_accuracy(model, train, batch_size, device),
            "curve": curve, "train_loss": losses}


# Sequence-to-sequence.


def seq2seq_attention_mask(source_lengths: torch.Tensor, lengths: torch.Tensor, length: int) -> torch.Tensor:
    """UniLM's sequence-to-sequence self-attention mask (Dong et al. 2019, Sec 2.3, Fig. 1): (B, L, L) boolean,
    [b, query, key] True = may attend.

    `source_lengths` (B,): tokens in the source segment `[CLS] source [SEP]`; `lengths` (B,): real tokens
    (source and target segments); `length`: L, the padded length. Source queries see every source key, target
    queries see the source and the target keys at or before themselves, padding keys are never seen by a real
    query, and a padded query sees only itself (a row with no True would make the softmax NaN).
    """
    position = torch.arange(length, device=lengths.device)
    query, key = position[:, None], position[None, :]                      # (L, 1), (1, L)
    in_source = key < source_lengths[:, None, None]                        # (B, 1, L)
    real_key = key < lengths[:, None, None]                                # (B, 1, L)
    allowed = real_key & (in_source | (key <= query))                      # (B, L, L)
    padded_query = query >= lengths[:, None, None]                         # (B, L, 1)
    return torch.where(padded_query, key == query, allowed)


def pack(special: SpecialIds, sources: list[list[int]], targets: list[list[int]],
         close: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[CLS] source [SEP] target` (+ `[SEP]` if `close`), right-padded with [PAD].

    Returns ids (B, L) int64, source_lengths (B,) (the `[CLS] source [SEP]` segment) and lengths (B,).
    """
    rows = [[special.cls, *source, special.sep, *target, *([special.sep] if close else [])]
            for source, target in zip(sources, targets, strict=True)]
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.full((len(rows), int(lengths.max())), special.pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    source_lengths = torch.tensor([len(source) + 2 for source in sources])
    return ids, source_lengths, lengths


class Seq2SeqLM(nn.Module):
    """A backbone under the sequence-to-sequence mask and a fresh LM head tied to its token embedding."""

    def __init__(self, backbone: nn.Module, special: SpecialIds, generator: torch.Generator | None = None):
        super().__init__()
        self.backbone, self.special = backbone, special    # backbone first: its embedding keeps its own name
        self.head = LMHead(backbone.token_embedding)
        nn.init.xavier_uniform_(self.head.dense.weight, generator=generator)
        nn.init.zeros_(self.head.dense.bias)

    def hidden(self, sources: list[list[int]], targets: list[list[int]], close: bool):
        """(B, L, D) outputs of the packed pairs, with their source_lengths and lengths (B,)."""
        device = self.head.bias.device
        ids, source_lengths, lengths = (t.to(device) for t in pack(self.special, sources, targets, close))
        attention_mask = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()    # (B, L)
        attn_mask = seq2seq_attention_mask(source_lengths, lengths, ids.shape[1])                # (B, L, L)
        return self.backbone(ids, attention_mask=attention_mask, attn_mask=attn_mask), ids, source_lengths, lengths

    def target_log_probs(self, sources: list[list[int]], targets: list[list[int]],
                         close: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of every target token (and of the closing [SEP] if `close`) given what precedes it.

        Returns (T,) log-probabilities and (T,) the row each belongs to.
        """
        hidden, ids, source_lengths, lengths = self.hidden(sources, targets, close)
        position = torch.arange(ids.shape[1], device=ids.device)
        # The outputs at [SEP] .. t_(m-1) (t_m when closed) predict t_1 .. t_m (the closing [SEP]).
        predicting = (position >= source_lengths[:, None] - 1) & (position < lengths[:, None] - 1)    # (B, L)
        next_ids = F.pad(ids[:, 1:], (0, 1), value=self.special.pad)                                 # (B, L)
        log_probs = self.head(hidden[predicting]).log_softmax(-1)                                     # (T, V)
        rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)[predicting]
        return log_probs.gather(1, next_ids[predicting][:, None]).squeeze(1), rows

    def loss(self, sources: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Mean next-token cross-entropy over the target tokens and the closing [SEP]s."""
        return -self.target_log_probs(sources, targets, close=True)[0].mean()

    def next_log_probs(self, sources: list[list[int]], prefixes: list[list[int]]) -> torch.Tensor:
        """(B, V) log p(next target token | source, target prefix)."""
        hidden, _, _, lengths = self.hidden(sources, prefixes, close=False)
        last = hidden[torch.arange(len(lengths), device=lengths.device), lengths - 1]                 # (B, D)
        return self.head(last).float().log_softmax(-1)


@torch.no_grad()
def sequence_log_prob(model: Seq2SeqLM, sources: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """(B,) sum of log p of each continuation's tokens given the source; include the [SEP] in a continuation
    to score the decision to stop."""
    model.eval()
    log_probs, rows = model.target_log_probs(sources, continuations, close=False)
    return torch.zeros(len(sources), device=log_probs.device).index_add_(0, rows, log_probs.float()).cpu()


def _check_max_length(max_target_length: int) -> None:
    if max_target_length < 1:
        raise MaskkitError(f"max_target_length must be at least 1, got {max_target_length}")


@torch.no_grad()
def greedy_search(model: Seq2SeqLM, sources: list[list[int]], *, max_target_length: int,
                  batch_size: int = 64) -> tuple[list[list[int]], list[float]]:
    """The most likely next token, one step at a time, until [SEP] or `max_target_length` tokens.

    Returns the predictions (without [SEP]) and their log-probabilities (the [SEP] step included).
    """
    _check_max_length(max_target_length)
    model.eval()
    outputs, scores = [[] for _ in sources], [0.0] * len(sources)
    for start in range(0, len(sources), batch_size):
        active = list(range(start, min(start + batch_size, len(sources))))
        while active:
            log_probs = model.next_log_probs([sources[i] for i in active], [outputs[i] for i in active])    # (A, V)
            best, tokens = log_probs.max(1)
            still = []
            for i, token, log_prob in zip(active, tokens.tolist(), best.tolist(), strict=True):
                scores[i] += log_prob
                if token != model.special.sep:
                    outputs[i].append(token)
                    if len(outputs[i]) < max_target_length:
                        still.append(i)
            active = still
    return outputs, scores


@torch.no_grad()
def beam_search(model: Seq2SeqLM, sources: list[list[int]], *, beam_size: int, max_target_length: int,
                batch_size: int = 64) -> tuple[list[list[int]], list[float]]:
    """Beam search on the summed log-probability (no length penalty), until [SEP] or `max_target_length`.

    Each step extends every live hypothesis by every token; of the candidates, in order of score, a [SEP]
    among the best `beam_size` finishes its hypothesis, and the best `beam_size` others live on (so the beam
    stays full, as in Hugging Face's `BeamSearchScorer`). An example stops once its best finished score is
    at least its best live one: log-probabilities only fall as a hypothesis grows, so that one is final.
    With `beam_size=1` this is `greedy_search`. Returns the best finished hypotheses and their scores.
    """
    _check_max_length(max_target_length)
    if beam_size < 1:
        raise MaskkitError(f"beam_size must be at least 1, got {beam_size}")
    model.eval()
    sep = model.special.sep
    outputs, scores = [], []
    per_chunk = max(1, batch_size // beam_size)     # examples per forward: beam_size rows each
    for start in range(0, len(sources), per_chunk):
        chunk = sources[start : start + per_chunk]
        live = [[([], 0.0)] for _ in chunk]           # per example: (tokens, log-prob) of the live hypotheses
        finished = [[] for _ in chunk]
        while any(live):
            flat = [(e, tokens, score) for e, hypotheses in enumerate(live) for tokens, score in hypotheses]
            log_probs = model.next_log_probs([chunk[e] for e, _, _ in flat], [tokens for _, tokens, _ in flat])
            totals = log_probs + torch.tensor([score for _, _, score in flat], device=log_probs.device)[:, None]
            # Per hypothesis, at most one [SEP] among its best beam_size + 1, and beam_size others.
            best, tokens = totals.topk(min(beam_size + 1, totals.shape[1]), dim=1)
            candidates = [[] for _ in chunk]
            for (e, prefix, _), row_scores, row_tokens in zip(flat, best.tolist(), tokens.tolist(), strict=True):
                candidates[e] += [(score, prefix, token) for score, token in zip(row_scores, row_tokens, strict=True)]
            for e in range(len(chunk)):
                if not live[e]:
                    continue
                live[e] = []
                for rank, (score, prefix, token) in enumerate(sorted(candidates[e], key=lambda c: -c[0])):
                    if token == sep:
                        if rank < beam_size:
                            finished[e].append((prefix, score))
                    elif len(live[e]) < beam_size:
                        live[e].append((prefix + [token], score))
                finished[e] += [h for h in live[e] if len(h[0]) == max_target_length]
                live[e] = [h for h in live[e] if len(h[0]) < max_target_length]
                if finished[e] and live[e] and max(s for _, s in finished[e]) >= max(s for _, s in live[e]):
                    live[e] = []
        for hypotheses in finished:
            tokens, score = max(hypotheses, key=lambda h: h[1])
            outputs.append(tokens)
            scores.append(score)
    return outputs, scores


def generate(model: Seq2SeqLM, sources: list[list[int]], *, max_target_length: int, beam_size: int = 1,
             batch_size: int = 64) -> tuple[list[list[int]], list[float]]:
    """Greedy decoding for `beam_size=1`, else beam search; (predictions without [SEP], log-probabilities)."""
    if beam_size == 1:
        return greedy_search(model, sources, max_target_length=max_target_length, batch_size=batch_size)
    return beam_search(model, sources, beam_size=beam_size, max_target_length=max_target_length,
                       batch_size=batch_size)


def finetune_seq2seq(backbone: nn.Module, train: Seq2SeqExamples, test: Seq2SeqExamples, *, special: SpecialIds,
                     epochs: int, lr: float, batch_size: int, seed: int, device: str | torch.device,
                     max_target_length: int, beam_size: int = 1,
                     decode: Callable[[torch.Tensor], str] | None = None, progress: bool = True) -> dict:
    """Fine-tune a copy of `backbone` as a UniLM sequence-to-sequence model on `train`, generate for `test`.

    Targets are cut to `max_target_length` tokens for training; sources to what the backbone's context length
    leaves (`cfg.context_length - max_target_length - 3` tokens: [CLS], [SEP], [SEP]). Predictions are scored
    against the full references. With `decode` (e.g. `tokenizer.decode`, called with a 1-D int64 tensor),
    ROUGE-L and exact match compare the decoded strings' words; without it, the token ids themselves.

    Returns {"rouge_l": mean ROUGE-L F1 over `test`, "exact_match": the fraction matched exactly,
    "examples": one (source, reference, prediction) per test example, strings with `decode`, id lists
    without, "train_loss": each epoch's mean loss, "truncated_sources": sources cut to fit}.
    """
    _check_backbone(backbone)
    _check_max_length(max_target_length)
    context_length = getattr(backbone.cfg, "context_length", None)
    source_budget = None if context_length is None else context_length - max_target_length - 3
    if source_budget is not None and source_budget < 1:
        raise MaskkitError(f"max_target_length={max_target_length} leaves no room for a source in the backbone's "
                           f"context length {context_length} ([CLS] source [SEP] target [SEP]); lower it")
    truncated = sum(len(s) > source_budget for s in train.sources + test.sources) if source_budget else 0
    train_sources = [source[:source_budget] for source in train.sources]
    train_targets = [target[:max_target_length] for target in train.targets]
    test_sources = [source[:source_budget] for source in test.sources]

    device = torch.device(device)
    model = Seq2SeqLM(copy.deepcopy(backbone), special, torch.Generator().manual_seed(seed))
    model = model.to(device).requires_grad_(True)
    losses = _fit(model, len(train),
                  lambda indices: model.loss([train_sources[i] for i in indices], [train_targets[i] for i in indices]),
                  epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, desc="finetune seq2seq")
    predictions, _ = generate(model, test_sources, max_target_length=max_target_length, beam_size=beam_size,
                              batch_size=batch_size)

    examples, rouge, exact = [], 0.0, 0.0
    for source, reference, prediction in zip(test.sources, test.targets, predictions, strict=True):
        if decode is not None:
            source, reference, prediction = (decode(torch.tensor(ids, dtype=torch.long))
                                             for ids in (source, reference, prediction))
            rouge += rouge_l(prediction, reference)
            exact += exact_match(prediction, reference)
        else:
            rouge += lcs_f1(prediction, reference)
            exact += float(list(prediction) == list(reference))
        examples.append((source, reference, prediction))
    count = max(1, len(test))
    return {"rouge_l": rouge / count, "exact_match": exact / count, "examples": examples, "train_loss": losses,
            "truncated_sources": truncated}


# Metrics.


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits; everything else separates. On ASCII text these are the
    `rouge-score` package's tokens (no stemming); letters outside ASCII are kept, where it drops them."""
    return re.findall(r"[^\W_]+", text.lower())


def lcs_f1(prediction: list, reference: list) -> float:
    """F1 of the longest common subsequence (ROUGE-L, Lin 2004, Sec 3.1, beta = 1) of two token lists; 0 when
    either is empty (as `rouge-score`)."""
    if not prediction or not reference:
        return 0.0
    # previous[j]: LCS of the prediction so far and reference[:j] (one row of the dynamic programme).
    previous = [0] * (len(reference) + 1)
    for token in prediction:
        current = [0]
        for j, other in enumerate(reference):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of two strings over their `words` (rouge-score's `rougeL` fmeasure, no stemming)."""
    return lcs_f1(words(prediction), words(reference))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two strings have the same `words` (case and punctuation ignored), else 0.0."""
    return float(words(prediction) == words(reference))


@torch.no_grad()
def task_accuracy(model: SequenceClassifier, documents, model_labels: list[str], data_labels: list[str],
             batch_size: int = 64) -> float:
    """Test accuracy of `model` on labelled documents (their labels index `data_labels`, mapped by name)."""
    model.eval()
    # A class the model does not know counts as wrong (index -1 matches no prediction).
    order = torch.tensor([model_labels.index(name) if name in model_labels else -1 for name in data_labels])
    correct = 0
    for start in range(0, len(documents), batch_size):
        ids, mask = trim_padding(documents.ids[start:start + batch_size], documents.attention_mask[start:start + batch_size])
        correct += int((model(ids, mask).argmax(-1) == order[documents.labels[start:start + batch_size]]).sum())
    return correct / len(documents)
