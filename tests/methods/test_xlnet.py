"""XLNet (Yang et al. 2019): span targets and the factorisation order (Sec 2.3, the released `_sample_mask` /
`_local_perm`), two-stream attention semantics, partial prediction, argument checks, per-sample determinism,
training, and memory across segments with stopped gradients."""

from types import SimpleNamespace

import pytest
import torch

from maskkit.data.tokenizer import SpecialIds
from maskkit.errors import MaskkitError
from maskkit.methods.mlm import token_cross_entropy
from maskkit.methods.xlnet import XLNet, XLNetConfig, XLNetModel, sample_permutation, segment_ids, target_mapping
from maskkit.rng import sample_keys
from tests.helpers import SUMMATION_ORDER, assert_close_at_scale, fit_one_batch
from tests.interop.random_weights import randomize_

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=64)


def keys_of(count: int, start: int = 0) -> torch.Tensor:
    return sample_keys(0, torch.zeros(count, dtype=torch.long), torch.arange(start, start + count))


def packed_blocks(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] doc [SEP] doc [SEP] ... blocks; the last sample ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (batch, length), generator=generator)
    ids[:, 0] = SPECIAL.cls
    ids[:, length // 3] = SPECIAL.sep
    ids[:, length // 2] = SPECIAL.sep
    attention_mask = torch.ones_like(ids)
    attention_mask[-1, length - 9:] = 0
    ids[-1, length - 9:] = SPECIAL.pad
    return ids, attention_mask


def runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a (L,) bool row."""
    lengths, current = [], 0
    for value in row.tolist() + [False]:
        if value:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths


def tiny(**overrides) -> XLNet:
    cfg = XLNetConfig(**{"vocab_size": 64, "dim": 32, "depth": 2, "num_heads": 4, **overrides})
    method = XLNet(cfg)
    method.use_tokens(SPECIAL)
    return method


def test_targets_are_short_spans_of_ordinary_tokens_one_in_k():
    ids, attention_mask = packed_blocks(16, 61)                      # odd length
    perm = sample_permutation(keys_of(16), ids, SPECIAL, attention_mask, predict_fraction_k=6, max_span=5)
    eligible = (ids > SPECIAL.mask) & attention_mask.bool()
    span_lengths = []
    for b in range(16):
        assert int(perm.targets[b].sum()) == round(int(eligible[b].sum()) / 6)          # about L / K
        assert not (perm.targets[b] & ~eligible[b]).any()                               # never [CLS]/[SEP]/[PAD]
        span_lengths += runs(perm.targets[b])
    assert max(span_lengths) <= 5 and min(span_lengths) >= 1
    assert sum(n > 1 for n in span_lengths) >= len(span_lengths) // 3                   # n-grams, not single tokens
    # target_positions / target_valid list exactly the targets, in position order
    for b in range(16):
        listed = perm.target_positions[b][perm.target_valid[b]]
        assert listed.tolist() == perm.targets[b].nonzero().flatten().tolist()


def test_order_context_first_then_targets_in_random_order():
    ids, attention_mask = packed_blocks(4, 40)
    perm = sample_permutation(keys_of(4), ids, SPECIAL, attention_mask)
    for b in range(4):
        blocked, targets, rank = perm.perm_mask[b], perm.targets[b], perm.rank[b]
        context = ~targets
        # context sees all context (itself included) and no target: targets never leak into context
        assert not blocked[context][:, context].any() and blocked[context][:, targets].all()
        # a target does not see itself (its query stream must not) nor later targets; sees earlier ones
        t = targets.nonzero().flatten()
        assert blocked[t, t].all()
        expected = rank[t][None, :] >= rank[t][:, None]
        assert torch.equal(blocked[t][:, t], expected)
        assert not blocked[t][:, context].any()
        assert len(set(rank[t].tolist())) > 1                                          # a random order


def test_order_depends_on_the_sample_key_only():
    ids, attention_mask = packed_blocks(5, 33, seed=1)
    keys = keys_of(5)
    whole = sample_permutation(keys, ids, SPECIAL, attention_mask)
    again = sample_permutation(keys, ids, SPECIAL, attention_mask)
    assert torch.equal(whole.perm_mask, again.perm_mask) and torch.equal(whole.targets, again.targets)
    alone = sample_permutation(keys[2:3], ids[2:3], SPECIAL, attention_mask[2:3])       # other neighbours
    assert torch.equal(alone.perm_mask[0], whole.perm_mask[2]) and torch.equal(alone.targets[0], whole.targets[2])
    other = sample_permutation(keys_of(5, start=5), ids, SPECIAL, attention_mask)
    assert not torch.equal(other.targets, whole.targets)
    later_chunk = sample_permutation(keys, ids, SPECIAL, attention_mask, chunk=1)
    assert not torch.equal(later_chunk.targets, whole.targets)


def test_two_stream_attention_semantics():
    torch.manual_seed(0)
    model = randomize_(XLNetModel(XLNetConfig(vocab_size=64, dim=32, depth=2, num_heads=4)), seed=0).eval()
    ids, attention_mask = packed_blocks(1, 23)
    perm = sample_permutation(keys_of(1), ids, SPECIAL, attention_mask)
    t = perm.target_positions[0, perm.target_valid[0]]
    order = t[perm.rank[0, t].argsort()]                              # targets in factorisation order
    middle = order[len(order) // 2]
    earlier, later = order[0], order[-1]
    context = int((~perm.targets[0] & (ids[0] > SPECIAL.mask)).nonzero()[0])
    allowed = ~perm.perm_mask | torch.eye(23, dtype=torch.bool)
    index = int((perm.target_positions[0] == middle).nonzero()[0])

    def run(changed_position=None):
        changed = ids.clone()
        if changed_position is not None:
            changed[0, changed_position] = 5 + (int(changed[0, changed_position]) - 4) % 59   # another ordinary token
        query_allowed = ~perm.perm_mask.gather(1, perm.target_positions[:, :, None].expand(-1, -1, 23))
        with torch.no_grad():
            content, query, _ = model.streams(changed, allowed, perm.target_positions, query_allowed)
        return content[0, middle], query[0, index]

    content, query = run()
    own_content, own_query = run(middle)
    assert torch.equal(own_query, query)                                # the query stream never sees its own token
    assert (own_content - content).abs().max() > 1e-3                   # the content stream does
    assert torch.equal(run(later)[1], query)                            # later in the order: invisible
    assert (run(earlier)[1] - query).abs().max() > 1e-3                 # earlier in the order: visible
    assert (run(context)[1] - query).abs().max() > 1e-3                 # context: visible


def test_query_stream_and_lm_head_run_on_predicted_rows_only(monkeypatch):
    method = tiny()
    ids, attention_mask = packed_blocks(4, 48)
    batch = {"ids": ids, "attention_mask": attention_mask, "seed": keys_of(4)}
    perm = sample_permutation(batch["seed"], ids, SPECIAL, attention_mask)
    rows, head_rows = [], []
    method.model.layers[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    lm_logits = method.lm_logits
    monkeypatch.setattr(method, "lm_logits", lambda hidden: head_rows.append(hidden.shape) or lm_logits(hidden))
    output = method(batch)
    assert rows == [48 + perm.target_positions.shape[1]]                   # L content rows + M query rows, not 2L
    assert head_rows == [(int(perm.targets.sum()), 32)]                    # only the predicted tokens
    assert int(output.extras["num_predicted"]) == int(perm.targets.sum())
    assert set(output.logs) == {"loss", "accuracy"} and not output.logs["loss"].requires_grad


@pytest.mark.parametrize("case, name", [
    ("perm_mask_shape", "perm_mask"),
    ("perm_mask_values", "perm_mask"),
    ("target_sees_itself", "perm_mask"),
    ("mapping_two_hot", "target_mapping"),
    ("mapping_empty_row", "target_mapping"),
    ("mapping_length", "target_mapping"),
    ("token_types", "token_type_ids"),
])
def test_wrong_perm_mask_or_target_mapping_is_a_one_line_error(case, name):
    model = XLNetModel(XLNetConfig(vocab_size=64, dim=32, depth=1, num_heads=4))
    ids = torch.randint(5, 64, (2, 9))
    perm_mask = torch.zeros(2, 9, 9)
    positions = torch.tensor([[1, 4], [0, 8]])
    perm_mask[torch.arange(2)[:, None], positions, positions] = 1
    mapping = target_mapping(positions, 9)
    model.forward_two_stream(ids, perm_mask, mapping)                       # the valid call runs
    token_types = None
    if case == "perm_mask_shape":
        perm_mask = perm_mask[:, :8]
    elif case == "perm_mask_values":
        perm_mask = perm_mask * 2
    elif case == "target_sees_itself":
        perm_mask[1, 8, 8] = 0                                              # the 0/1 convention flipped for a target
    elif case == "mapping_two_hot":
        mapping[0, 1, 2] = 1
    elif case == "mapping_empty_row":
        mapping[1, 0] = 0
    elif case == "mapping_length":
        mapping = mapping[:, :, :8]
    elif case == "token_types":
        token_types = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(MaskkitError) as error:
        model.forward_two_stream(ids, perm_mask, mapping, token_type_ids=token_types)
    message = str(error.value)
    assert name in message and "\n" not in message and "shape" in message


def test_content_stream_ignores_padding_and_takes_an_explicit_mask():
    model = XLNetModel(XLNetConfig(vocab_size=64, dim=32, depth=2, num_heads=4)).eval()
    randomize_(model, seed=1)
    ids = torch.randint(5, 64, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    attention_mask = torch.tensor([[1] * 10 + [0] * 3])
    with torch.no_grad():
        alone = model(ids)
        with_padding = model(padded, attention_mask=attention_mask)
        causal = model(ids, attn_mask=torch.ones(10, 10, dtype=torch.bool).tril()[None])
        prefix = model(ids[:, :6], attn_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool).tril())
    assert_close_at_scale(with_padding[:, :10], alone, SUMMATION_ORDER)
    assert_close_at_scale(causal[:, :6], prefix, SUMMATION_ORDER)    # relative positions: a prefix is a prefix
    with pytest.raises(MaskkitError, match="attn_mask"):
        model(ids, attn_mask=torch.ones(1, 9, 9, dtype=torch.bool))


def test_loss_decreases_on_a_repeated_batch():
    torch.manual_seed(0)
    method = tiny()
    ids, attention_mask = packed_blocks(8, 32)
    batch = {"ids": ids, "attention_mask": attention_mask, "seed": keys_of(8)}
    losses = [log["loss"] for log in fit_one_batch(method, batch, 30)]
    assert losses[0] == pytest.approx(4.16, abs=0.3)                       # about log(64) at init
    assert losses[-1] < 0.7 * losses[0]


def test_segments_carry_memory_without_gradient():
    torch.manual_seed(0)
    method = tiny(mem_len=8, segments=2)
    randomize_(method.model, seed=2)
    ids, attention_mask = packed_blocks(3, 24)
    keys = keys_of(3)
    batch = {"ids": ids, "attention_mask": attention_mask, "seed": keys}
    method(batch).loss.backward()
    through_method = {name: p.grad.clone() for name, p in method.named_parameters()}

    # The same loss with the first chunk's memory recomputed without a graph: equal gradients mean none
    # flowed from the second chunk into the first through the memory.
    method.zero_grad()
    first_logits, first_labels, first_samples, mems = method.predict_chunk(ids[:, :12], attention_mask[:, :12], keys,
                                                                           0, None)
    assert all(not m.requires_grad for m in mems) and mems[0].shape == (3, 8, 32)
    with torch.no_grad():
        _, _, _, constant_mems = method.predict_chunk(ids[:, :12], attention_mask[:, :12], keys, 0, None)
    second_logits, second_labels, second_samples, _ = method.predict_chunk(ids[:, 12:], attention_mask[:, 12:], keys,
                                                                           1, constant_mems)
    token_cross_entropy(torch.cat([first_logits, second_logits]), torch.cat([first_labels, second_labels]),
                        torch.cat([first_samples, second_samples]), 3, first_logits)[0][0].backward()
    for name, p in method.named_parameters():
        assert_close_at_scale(p.grad, through_method[name], SUMMATION_ORDER, msg=name)

    with torch.no_grad():                                                   # and the memory is used
        without = method.predict_chunk(ids[:, 12:], attention_mask[:, 12:], keys, 1, None)[0]
    assert (without - second_logits.detach()).abs().max() > 1e-3


def test_segment_ids_count_separators():
    ids = torch.tensor([[2, 7, 7, 3, 8, 3, 9]])
    assert segment_ids(ids, SPECIAL.sep).tolist() == [[0, 0, 0, 0, 1, 1, 2]]


def test_config_and_data_checks():
    data = SimpleNamespace(kind="text", block_length=64)
    XLNetConfig(context_length=64, segments=2).check(data, "recipe.yaml")
    for cfg, key in [(XLNetConfig(context_length=32), "model.context_length"),
                     (XLNetConfig(segments=3), "model.segments"),
                     (XLNetConfig(dim=30, num_heads=4), "model.dim"),
                     (XLNetConfig(predict_fraction_k=1), "model.predict_fraction_k"),
                     (XLNetConfig(mem_len=-1), "model.mem_len")]:
        with pytest.raises(MaskkitError, match=f"recipe.yaml: {key} must be"):
            cfg.check(data, "recipe.yaml")
    with pytest.raises(MaskkitError, match="data.kind"):
        XLNetConfig().check(SimpleNamespace(kind="image"), "recipe.yaml")

    tokenizer = SimpleNamespace(vocab_size=100, special_ids=lambda: SPECIAL)
    method = XLNet(XLNetConfig(vocab_size=64, dim=32, depth=1, num_heads=4))
    with pytest.raises(MaskkitError, match="model.vocab_size"):
        method.check_data(SimpleNamespace(tokenizer=tokenizer))
    tokenizer.vocab_size = 64
    method.check_data(SimpleNamespace(tokenizer=tokenizer))
    assert method.special == SPECIAL
