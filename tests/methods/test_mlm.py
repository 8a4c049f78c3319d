"""MLM (BERT, Devlin et al. 2019, Sec 3.1): 15% of the non-special tokens, 80/10/10, logits at the chosen
rows only, per-sample determinism, the checks a config and a tokenizer get."""

from types import SimpleNamespace

import pytest
import torch

from maskkit.data.tokenizer import SpecialIds, Tokenizer
from maskkit.errors import MaskkitError
from maskkit.methods.mlm import MLM, MLMConfig, masked_lm_inputs
from maskkit.nn.transformer import TextConfig
from maskkit.rng import sample_keys
from tests.helpers import fit_one_batch

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=40)


def text_batch(indices, length: int = 32, padded_from: dict | None = None) -> dict:
    """Packed blocks "[CLS] a [SEP] b [SEP]"; sample i's tokens and key depend on i alone; optional right padding."""
    rows = []
    for index in indices:
        generator = torch.Generator().manual_seed(1000 + index)
        row = torch.randint(5, SPECIAL.vocab_size, (length,), generator=generator)
        row[0], row[length // 2], row[-1] = SPECIAL.cls, SPECIAL.sep, SPECIAL.sep
        rows.append(row)
    ids = torch.stack(rows)
    attention_mask = torch.ones_like(ids)
    for row, start in (padded_from or {}).items():
        ids[row, start - 1] = SPECIAL.sep
        ids[row, start:] = SPECIAL.pad
        attention_mask[row, start:] = 0
    index = torch.tensor(list(indices))
    return {"ids": ids, "attention_mask": attention_mask, "seed": sample_keys(0, torch.zeros_like(index), index)}


def tiny_mlm(**kw) -> MLM:
    model = MLM(MLMConfig(text=TextConfig(vocab_size=SPECIAL.vocab_size, context_length=64, dim=32, depth=2,
                                          num_heads=2), **kw))
    model.use_tokens(SPECIAL)
    return model


def is_special(ids):
    return (ids == SPECIAL.cls) | (ids == SPECIAL.sep) | (ids == SPECIAL.pad)


def test_chooses_fifteen_percent_of_the_non_special_tokens_and_never_a_special_one():
    batch = text_batch(range(300), length=48, padded_from={0: 20, 1: 5, 2: 3})
    _, chosen = masked_lm_inputs(batch["ids"], batch["attention_mask"], batch["seed"], SPECIAL, 0.15)
    candidates = batch["attention_mask"].bool() & ~is_special(batch["ids"])
    assert not (chosen & ~candidates).any()                           # never [CLS], [SEP] or padding
    # BERT's create_pretraining_data: round(15% of the candidates), at least one.
    expected = torch.clamp((candidates.sum(1) * 0.15).round(), min=1).long()
    assert torch.equal(chosen.sum(1), expected)
    assert chosen[2].sum() == 1                                       # one candidate token: it is chosen
    # Which ones are chosen is spread over the sequence, not a fixed pattern.
    per_position = chosen[3:].float().mean(0)[candidates[3]]
    assert per_position.min() > 0.05 and per_position.max() < 0.3


def test_replacement_is_80_mask_10_random_10_unchanged():
    batch = text_batch(range(2000), length=64)
    ids = batch["ids"]
    corrupted, chosen = masked_lm_inputs(ids, batch["attention_mask"], batch["seed"], SPECIAL, 0.15)
    assert torch.equal(corrupted[~chosen], ids[~chosen])              # only chosen tokens change
    before, after = ids[chosen], corrupted[chosen]
    total = len(before)
    assert total > 15000
    to_mask = (after == SPECIAL.mask).float().mean()
    # A random token equals the original 1 time in 40 and is [MASK] 1 time in 40.
    changed = ((after != SPECIAL.mask) & (after != before)).float().mean()
    unchanged = (after == before).float().mean()
    assert abs(to_mask - (0.8 + 0.1 / 40)) < 0.015
    assert abs(changed - 0.1 * 38 / 40) < 0.01
    assert abs(unchanged - (0.1 + 0.1 / 40)) < 0.01
    # Random replacements cover the tokenizer's vocabulary (special ids included, as in BERT) and no more.
    random_ids = after[(after != SPECIAL.mask) & (after != before)]
    assert random_ids.max() < SPECIAL.vocab_size and len(random_ids.unique()) >= SPECIAL.vocab_size - 2


def test_logits_only_at_the_chosen_rows():
    model = tiny_mlm()
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.shape)))
    batch = text_batch(range(4), length=32)
    out = model(batch)
    chosen = out.extras["chosen"]
    count = int(chosen.sum())
    assert seen == [((count, 32), (count, SPECIAL.vocab_size))]       # one head call on N rows, not B * L
    assert out.extras["logits"].shape == (count, SPECIAL.vocab_size)
    assert count == 4 * round(29 * 0.15)
    assert set(out.logs) >= {"loss", "accuracy"} and all(not v.requires_grad for v in out.logs.values())


def test_loss_is_the_cross_entropy_of_the_original_tokens_at_the_chosen_rows():
    model = tiny_mlm()
    batch = text_batch(range(2), length=32)
    out = model(batch)
    chosen = out.extras["chosen"]
    corrupted, _ = masked_lm_inputs(batch["ids"], batch["attention_mask"], batch["seed"], SPECIAL, 0.15)
    logits = model.head(model.encoder(corrupted, batch["attention_mask"])[chosen])
    expected = torch.nn.functional.cross_entropy(logits, batch["ids"][chosen])
    torch.testing.assert_close(out.loss, expected)
    # Unchosen positions get no gradient through the loss: their targets are not in it.
    assert (corrupted[chosen] != batch["ids"][chosen]).any()


def test_loss_decreases_on_a_repeated_batch():
    torch.manual_seed(0)
    model = tiny_mlm()
    batch = text_batch(range(8), length=32)
    losses = [log["loss"] for log in fit_one_batch(model, batch, 40)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_masking_depends_on_the_sample_key_alone():
    alone = text_batch([7], length=32)
    among = text_batch([3, 7, 11], length=32)
    padded = text_batch([7, 9], length=48, padded_from={0: 32})       # longer batch, sample 7 padded
    padded["ids"][0, :32] = alone["ids"][0]
    results = [masked_lm_inputs(b["ids"], b["attention_mask"], b["seed"], SPECIAL, 0.15) for b in (alone, among, padded)]
    (ids_a, chosen_a), (ids_b, chosen_b), (ids_c, chosen_c) = results
    assert torch.equal(ids_a[0], ids_b[1]) and torch.equal(chosen_a[0], chosen_b[1])
    assert torch.equal(ids_a[0], ids_c[0, :32]) and torch.equal(chosen_a[0], chosen_c[0, :32])
    assert not chosen_c[0, 32:].any()
    again = masked_lm_inputs(alone["ids"], alone["attention_mask"], alone["seed"], SPECIAL, 0.15)
    assert torch.equal(again[0], ids_a) and torch.equal(again[1], chosen_a)
    # Another key masks the same tokens differently.
    other = dict(alone, seed=alone["seed"] + 1)
    assert not torch.equal(masked_lm_inputs(other["ids"], other["attention_mask"], other["seed"], SPECIAL, 0.15)[1],
                           chosen_a)


def test_padding_is_never_attended_nor_predicted():
    model = tiny_mlm().eval()
    batch = text_batch(range(2), length=32, padded_from={1: 12})
    out = model(batch)
    assert not out.extras["chosen"][1, 12:].any() and torch.isfinite(out.loss)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["ids"][1, 12:] = 7                                        # padding content must not matter
    torch.testing.assert_close(model(changed).loss, out.loss)


def test_forward_needs_the_special_ids():
    model = MLM(MLMConfig(text=TextConfig(vocab_size=40, context_length=64, dim=32, depth=1, num_heads=2)))
    with pytest.raises(MaskkitError, match="check_data"):
        model(text_batch(range(2)))


def test_check_data_compares_the_vocabularies():
    tokenizer = Tokenizer.from_captions(["a red square", "a blue circle"], vocab_size=60, context_length=16)
    data = SimpleNamespace(kind="text", block_length=16, tokenizer=tokenizer)
    small = MLM(MLMConfig(text=TextConfig(vocab_size=tokenizer.vocab_size - 1, context_length=16, dim=32, depth=1,
                                          num_heads=2)))
    with pytest.raises(MaskkitError, match=f"model.text.vocab_size={tokenizer.vocab_size}"):
        small.check_data(data)
    model = MLM(MLMConfig(text=TextConfig(vocab_size=tokenizer.vocab_size, context_length=16, dim=32, depth=1,
                                          num_heads=2)))
    model.check_data(data)
    assert model.special == tokenizer.special_ids()


def test_config_check_names_the_key():
    data = SimpleNamespace(kind="text", block_length=64)
    MLMConfig(text=TextConfig(context_length=64)).check(data, "mlm.yaml")
    with pytest.raises(MaskkitError, match="mlm.yaml: model.text.context_length must be at least data.block_length=64"):
        MLMConfig(text=TextConfig(context_length=32)).check(data, "mlm.yaml")
    with pytest.raises(MaskkitError, match="model.mask_ratio"):
        MLMConfig(text=TextConfig(context_length=64), mask_ratio=0.0).check(data, "mlm.yaml")
    with pytest.raises(MaskkitError, match="data.kind must be text"):
        MLMConfig().check(SimpleNamespace(kind="pairs", block_length=16), "mlm.yaml")
