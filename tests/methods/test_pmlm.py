"""PMLM (UniLMv2, Bao et al. 2020): the worked example's self-attention mask (Figure 3) built by hand,
Algorithm 1's blocks, Figure 2's positions, no leak from an own or later original through the real model,
padding slots, the loss, per-sample determinism."""

import math
from types import SimpleNamespace

import pytest
import torch

from maskkit.data.tokenizer import Tokenizer
from maskkit.errors import MaskkitError
from maskkit.methods.mlm import maskable_tokens
from maskkit.methods.pmlm import PMLM, PMLMConfig, blockwise_masking, pmlm_inputs, pseudo_masked_attention_mask
from maskkit.nn.transformer import TextConfig
from maskkit.rng import Stream, uniform
from tests.helpers import SUMMATION_ORDER, assert_close_at_scale, fit_one_batch
from tests.methods.test_mlm import SPECIAL, text_batch

PSEUDO_ID = SPECIAL.vocab_size


def tiny_pmlm(**kw) -> PMLM:
    model = PMLM(PMLMConfig(text=TextConfig(vocab_size=SPECIAL.vocab_size + 1, context_length=64, dim=32, depth=2,
                                            num_heads=2), **kw))
    model.use_tokens(SPECIAL)
    return model


def draw_blocks(batch: dict, **kw):
    length = batch["ids"].shape[1]
    maskable = maskable_tokens(batch["ids"], batch["attention_mask"], SPECIAL)
    attempts = uniform(batch["seed"], (length, 5), Stream.TEXT_MASK)[..., :3]
    order = uniform(batch["seed"], (length,), Stream.PERMUTATION)
    return blockwise_masking(maskable, attempts, order, **kw), maskable


def test_attention_mask_of_the_papers_worked_example():
    # x1..x6, {x2, x4, x5} masked, factorization order {x4, x5} -> {x2} (Figures 2 and 3). The input is
    #   x1 [M] x3 [M] [M] x6 | [P]4 [P]5 x4 x5 | [P]2 x2
    step = torch.tensor([[-1, 1, -1, 0, 0, -1]])
    expected = torch.tensor([
        # x1 M2 x3 M4 M5 x6 P4 P5 x4 x5 P2 x2    (columns: keys)
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # x1: context and [M] only, as in BERT
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # [M] at 2
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # x3
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # [M] at 4
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # [M] at 5
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],   # x6
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],   # [P]4: context, the [P]s of step 1, not x4 or x5
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],   # [P]5
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0],   # x4: context and the originals of step 1
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0],   # x5
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0],   # [P]2: context, x4 and x5 (step 1), itself; never x2
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1],   # x2: context, the originals of steps 1 and 2
    ], dtype=torch.bool)
    mask = pseudo_masked_attention_mask(torch.ones(1, 6, dtype=torch.long), step)
    assert mask.shape == (1, 12, 12)
    assert torch.equal(mask[0], expected)


def test_inputs_of_the_worked_example_carry_the_masked_positions():
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    corrupted = torch.tensor([[11, SPECIAL.mask, 13, SPECIAL.mask, 22, 16]])   # x5 got a random token
    inputs = pmlm_inputs(ids, corrupted, torch.ones_like(ids), torch.tensor([[-1, 1, -1, 0, 0, -1]]), PSEUDO_ID,
                         SPECIAL.pad)
    P, M = PSEUDO_ID, SPECIAL.mask
    assert inputs.ids.tolist() == [[11, M, 13, M, 22, 16, P, P, 14, 15, P, 12]]
    assert inputs.positions.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 1, 1]]


def test_appended_tokens_take_the_positions_and_tokens_they_stand_for():
    model = tiny_pmlm()
    batch = text_batch(range(6), length=40, padded_from={2: 17})
    ids, attention_mask = batch["ids"], batch["attention_mask"]
    step, corrupted = model.masking(ids, attention_mask, batch["seed"])
    inputs = pmlm_inputs(ids, corrupted, attention_mask, step, PSEUDO_ID, SPECIAL.pad)
    layout, length = inputs.layout, ids.shape[1]
    assert inputs.ids.shape[1] == length + 2 * int((step >= 0).sum(1).max())
    for b in range(len(ids)):
        masked = (step[b] >= 0).nonzero().flatten()
        valid = layout.valid[b]
        assert sorted(layout.positions[b][valid].tolist()) == masked.tolist()
        for position, pseudo, original in zip(layout.positions[b][valid], layout.pseudo_slots[b][valid],
                                              layout.original_slots[b][valid], strict=True):
            assert inputs.positions[b, length + pseudo] == position == inputs.positions[b, length + original]
            assert inputs.ids[b, length + pseudo] == PSEUDO_ID
            assert inputs.ids[b, length + original] == ids[b, position]
        # The sequence part keeps every unmasked token and its own position.
        assert torch.equal(inputs.ids[b, :length][step[b] < 0], ids[b][step[b] < 0])
        assert torch.equal(inputs.positions[b, :length], torch.arange(length))
        # Figure 2's order: step by step, the [P]s and then the originals of the step.
        steps = layout.steps[b][valid]
        assert torch.equal(steps, steps.sort().values)


def test_blocks_follow_algorithm_1():
    batch = text_batch(range(500), length=128)
    step, maskable = draw_blocks(batch)
    lengths, spans_by_length, left_to_right, first_block_rank = [], [0] * 7, 0, []
    for b in range(len(step)):
        count = int(maskable[b].sum())
        masked = int((step[b] >= 0).sum())
        target = math.ceil(0.15 * count - 1e-9)
        assert target <= masked < target + 6                       # "until |M| >= 15%", one block of overshoot
        assert not ((step[b] >= 0) & ~maskable[b]).any()            # never [CLS], [SEP] or padding
        steps = step[b][step[b] >= 0]
        num_steps = int(steps.max()) + 1
        assert sorted(steps.unique().tolist()) == list(range(num_steps))   # every block is one step
        starts = []
        for s in range(num_steps):
            where = (step[b] == s).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))   # contiguous
            assert len(where) == 1 or 2 <= len(where) <= 6
            lengths.append(len(where))
            spans_by_length[min(len(where), 6)] += len(where) > 1
            starts.append((int(where[0]), s))
        order = [s for _, s in sorted(starts)]
        left_to_right += order == sorted(order)
        first_block_rank.append(order[0] / (num_steps - 1))
    lengths = torch.tensor(lengths)
    # 40% of the draws are spans; overlapping draws are redrawn, which drops long spans a little more often.
    assert 0.33 < (lengths > 1).float().mean() < 0.42
    spans = sum(spans_by_length)
    assert all(0.14 < spans_by_length[n] / spans < 0.26 for n in range(2, 7))   # randint(2, 6)
    masked_fraction = (step >= 0).sum() / maskable.sum()
    assert 0.15 <= masked_fraction < 0.17
    # A random factorization order: the leftmost block's step is uniform, rarely a left-to-right order.
    assert left_to_right < 10
    assert abs(sum(first_block_rank) / len(first_block_rank) - 0.5) < 0.06


def test_factorization_order_is_the_rank_of_each_blocks_permutation_key():
    batch = text_batch(range(50), length=64)
    length = batch["ids"].shape[1]
    maskable = maskable_tokens(batch["ids"], batch["attention_mask"], SPECIAL)
    attempts = uniform(batch["seed"], (length, 5), Stream.TEXT_MASK)[..., :3]
    order = uniform(batch["seed"], (length,), Stream.PERMUTATION)
    forward, backward = blockwise_masking(maskable, attempts, order), blockwise_masking(maskable, attempts, 1 - order)
    # The same blocks, taken in the reverse order: the order comes from the permutation keys alone.
    num_steps = forward.max(1, keepdim=True).values
    assert torch.equal(forward >= 0, backward >= 0)
    assert torch.equal(backward[forward >= 0], (num_steps - forward).expand_as(forward)[forward >= 0])
    assert (num_steps >= 1).all() and num_steps.float().mean() > 3


def test_a_pseudo_mask_sees_earlier_steps_only_through_the_real_model():
    # [CLS] x1..x6 [SEP] with {x4, x5} then {x2}: slots 8, 9 = [P]4, [P]5; 10, 11 = x4, x5; 12, 13 = [P]2, x2.
    torch.manual_seed(0)
    model = tiny_pmlm().eval()
    ids = torch.tensor([[SPECIAL.cls, 11, 12, 13, 14, 15, 16, SPECIAL.sep]])
    step = torch.tensor([[-1, -1, 1, -1, 0, 0, -1, -1]])
    corrupted = torch.where(step >= 0, SPECIAL.mask, ids)
    inputs = pmlm_inputs(ids, corrupted, torch.ones_like(ids), step, PSEUDO_ID, SPECIAL.pad)
    assert inputs.ids[0, 8:].tolist() == [PSEUDO_ID, PSEUDO_ID, 14, 15, PSEUDO_ID, 12]

    def hidden(token_ids):
        with torch.no_grad():
            return model.encoder(token_ids, positions=inputs.positions, attn_mask=inputs.attn_mask)[0]

    def changed(slot):
        token_ids = inputs.ids.clone()
        token_ids[0, slot] = 33
        return hidden(token_ids)

    base = hidden(inputs.ids)
    pseudo_first, pseudo_second, context = [8, 9], 12, list(range(8))
    # Own step's originals: [P]4 and [P]5 unchanged; the later step's [P]2 conditions on them.
    for slot in (10, 11):
        out = changed(slot)
        assert_close_at_scale(out[pseudo_first], base[pseudo_first], SUMMATION_ORDER)
        assert (out[pseudo_second] - base[pseudo_second]).abs().max() > 1e-3
        assert_close_at_scale(out[context], base[context], SUMMATION_ORDER)
    # x2 is a later step for [P]4, [P]5 and [P]2's own original: no [P] and no context token sees it.
    out = changed(13)
    assert_close_at_scale(out[:13], base[:13], SUMMATION_ORDER)
    assert (out[13] - base[13]).abs().max() > 1e-3                   # the model does read the slot
    # Any appended token leaves the context's (and the [M]s') encodings alone: the AE part is BERT's.
    for slot in (8, 12):
        assert_close_at_scale(changed(slot)[context], base[context], SUMMATION_ORDER)


def test_padding_slots_carry_no_loss_and_no_nan():
    model = tiny_pmlm()
    batch = text_batch(range(3), length=40, padded_from={1: 9})       # sample 1 masks far fewer tokens
    ids, attention_mask = batch["ids"], batch["attention_mask"]
    step, corrupted = model.masking(ids, attention_mask, batch["seed"])
    counts = (step >= 0).sum(1)
    assert counts[1] < counts.max()
    inputs = pmlm_inputs(ids, corrupted, attention_mask, step, PSEUDO_ID, SPECIAL.pad)
    length, total = ids.shape[1], inputs.ids.shape[1]
    padding = torch.cat([attention_mask[1] == 0, torch.arange(total - length) >= 2 * counts[1]])   # (L',)
    mask = inputs.attn_mask[1]
    assert torch.equal(mask[padding], torch.eye(total, dtype=torch.bool)[padding])     # attend only themselves
    assert torch.equal(mask[:, padding], torch.eye(total, dtype=torch.bool)[:, padding])   # nobody attends them
    hidden = model.encoder(inputs.ids, positions=inputs.positions, attn_mask=inputs.attn_mask)
    assert torch.isfinite(hidden).all()
    # The loss reads N [M] rows and N [P] rows, N the real masked tokens.
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    out = model(batch)
    assert seen == [2 * int(counts.sum())]
    assert all(torch.isfinite(value) for value in out.logs.values())
    # Changing what the padding slots hold changes nothing real.
    token_ids = inputs.ids.clone()
    token_ids[1, padding] = 21
    changed = model.encoder(token_ids, positions=inputs.positions, attn_mask=inputs.attn_mask)
    assert_close_at_scale(changed[1, ~padding], hidden[1, ~padding], SUMMATION_ORDER)


def test_a_batch_with_nothing_to_mask_gives_a_zero_loss_not_nan():
    model = tiny_pmlm()
    ids = torch.tensor([[SPECIAL.cls, SPECIAL.sep, SPECIAL.pad, SPECIAL.pad]] * 2)
    batch = {"ids": ids, "attention_mask": (ids != SPECIAL.pad).long(), "seed": torch.tensor([1, 2])}
    out = model(batch)
    assert out.loss.item() == 0 and out.extras["logits"].shape == (0, SPECIAL.vocab_size + 1)
    out.loss.backward()                                               # still a graph: DDP's reduction runs


def test_loss_is_the_sum_of_the_two_objectives_and_decreases():
    torch.manual_seed(0)
    model = tiny_pmlm()
    batch = text_batch(range(8), length=32)
    out = model(batch)
    assert set(out.logs) >= {"loss", "accuracy", "ae_loss", "par_loss"}
    torch.testing.assert_close(out.loss.detach(), out.logs["ae_loss"] + out.logs["par_loss"])
    losses = [(log["ae_loss"], log["par_loss"]) for log in fit_one_batch(model, batch, 40)]
    assert losses[-1][0] < 0.5 * losses[0][0] and losses[-1][1] < 0.5 * losses[0][1], losses


def test_mask_slots_get_the_80_10_10_replacement():
    model = tiny_pmlm()
    batch = text_batch(range(1000), length=64)
    step, corrupted = model.masking(batch["ids"], batch["attention_mask"], batch["seed"])
    masked = step >= 0
    assert torch.equal(corrupted[~masked], batch["ids"][~masked])
    assert abs((corrupted[masked] == SPECIAL.mask).float().mean() - 0.8) < 0.02
    assert abs((corrupted[masked] == batch["ids"][masked]).float().mean() - 0.1) < 0.02


def test_masking_depends_on_the_sample_key_alone():
    model = tiny_pmlm()
    alone = text_batch([5], length=40)
    among = text_batch([2, 5, 9], length=40)
    padded = text_batch([5, 1], length=56, padded_from={0: 40})
    padded["ids"][0, :40] = alone["ids"][0]
    (step_a, ids_a), (step_b, ids_b), (step_c, ids_c) = (
        model.masking(b["ids"], b["attention_mask"], b["seed"]) for b in (alone, among, padded))
    assert (step_a >= 0).any()
    assert torch.equal(step_a[0], step_b[1]) and torch.equal(ids_a[0], ids_b[1])
    assert torch.equal(step_a[0], step_c[0, :40]) and torch.equal(ids_a[0], ids_c[0, :40])
    assert (step_c[0, 40:] == -1).all()
    other = model.masking(alone["ids"], alone["attention_mask"], alone["seed"] + 1)[0]
    assert not torch.equal(other, step_a)


def test_vocabulary_needs_a_row_for_the_pseudo_mask():
    tokenizer = Tokenizer.from_captions(["a red square", "a blue circle"], vocab_size=60, context_length=16)
    data = SimpleNamespace(kind="text", block_length=16, tokenizer=tokenizer)
    size = tokenizer.vocab_size
    text = dict(context_length=16, dim=32, depth=1, num_heads=2)
    with pytest.raises(MaskkitError, match=f"model.text.vocab_size={size + 1}"):
        PMLM(PMLMConfig(text=TextConfig(vocab_size=size, **text))).check_data(data)
    model = PMLM(PMLMConfig(text=TextConfig(vocab_size=size + 1, **text)))
    model.check_data(data)
    assert model.pseudo_id == size
    with pytest.raises(MaskkitError, match="check_data"):
        PMLM(PMLMConfig(text=TextConfig(vocab_size=size + 1, **text)))(text_batch(range(2), length=16))


def test_config_check_names_the_key():
    data = SimpleNamespace(kind="text", block_length=64)
    PMLMConfig(text=TextConfig(context_length=64)).check(data, "pmlm.yaml")
    for fields, key in [({"span_probability": 1.5}, "model.span_probability"), ({"span_min": 0}, "model.span_min"),
                        ({"span_min": 4, "span_max": 3}, "model.span_max"), ({"mask_ratio": 1.0}, "model.mask_ratio")]:
        with pytest.raises(MaskkitError, match=f"pmlm.yaml: {key} must be"):
            PMLMConfig(text=TextConfig(context_length=64), **fields).check(data, "pmlm.yaml")
    with pytest.raises(MaskkitError, match="model.text.context_length"):
        PMLMConfig(text=TextConfig(context_length=32)).check(data, "pmlm.yaml")
