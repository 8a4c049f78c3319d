"""Text fine-tuning protocols: UniLM's seq2seq mask on a worked example and through a real Transformer, a
classifier and a seq2seq model that learn synthetic tasks, beam search against greedy, ROUGE-L by hand."""

import pytest
import torch

from maskkit.data.tokenizer import SpecialIds
from maskkit.eval.text import (
    Seq2SeqExamples,
    Seq2SeqLM,
    TextExamples,
    beam_search,
    exact_match,
    finetune_seq2seq,
    finetune_text_classifier,
    greedy_search,
    lcs_f1,
    pack,
    rouge_l,
    seq2seq_attention_mask,
    sequence_log_prob,
    text_features,
)
from maskkit.nn.transformer import TextConfig, TextTransformer
from tests.helpers import SUMMATION_ORDER, assert_close_at_scale

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=16)
CONTENT = range(5, 16)       # the non-special token ids


def tiny_text_model(seed: int = 0, **overrides) -> TextTransformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=SPECIAL.vocab_size, context_length=16, dim=32, depth=2, num_heads=2)
    return TextTransformer(TextConfig(**{**cfg, **overrides}))


def test_seq2seq_mask_worked_example():
    # Row 0: [CLS] s [SEP] | t1 t2 | pad: a source segment of 3, a target segment of 2, 1 padding.
    # Row 1: [CLS] s1 s2 s3 [SEP] | t1: no padding, so the padded row's rule must not leak into it.
    mask = seq2seq_attention_mask(torch.tensor([3, 5]), torch.tensor([5, 6]), 6)
    expected_0 = torch.tensor([
        [1, 1, 1, 0, 0, 0],    # [CLS]: the source only
        [1, 1, 1, 0, 0, 0],    # s
        [1, 1, 1, 0, 0, 0],    # [SEP]
        [1, 1, 1, 1, 0, 0],    # t1: the source and itself
        [1, 1, 1, 1, 1, 0],    # t2: the source, t1 and itself; never the padding
        [0, 0, 0, 0, 0, 1],    # pad: only itself
    ], dtype=torch.bool)
    expected_1 = torch.tensor([[1, 1, 1, 1, 1, 0]] * 5 + [[1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert mask.dtype == torch.bool and mask.shape == (2, 6, 6)
    assert torch.equal(mask[0], expected_0)
    assert torch.equal(mask[1], expected_1)


def test_pack_layout():
    ids, source_lengths, lengths = pack(SPECIAL, [[7, 8], [9]], [[10], [11, 12, 13]], close=True)
    assert ids.tolist() == [[2, 7, 8, 3, 10, 3, 0], [2, 9, 3, 11, 12, 13, 3]]
    assert source_lengths.tolist() == [4, 3] and lengths.tolist() == [6, 7]


def test_seq2seq_mask_through_a_transformer():
    # Unit-scale random weights: with the default init attention is nearly uniform, and a leak would be tiny.
    backbone = tiny_text_model()
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_()
    model = Seq2SeqLM(backbone, SPECIAL).eval()
    source, target = [5, 6, 7], [8, 9, 10, 11]
    changed_tail = target[:2] + [12, 13]               # the same first two target tokens, different later ones
    changed_source = [5, 6, 14]
    with torch.no_grad():
        out, *_ = model.hidden([source] * 3, [target, changed_tail, target], close=True)
        other, *_ = model.hidden([changed_source], [target], close=True)
    first_target = 5                                    # [CLS] s1 s2 s3 [SEP] | t1 ...
    # The source and the first two target tokens do not see what follows them ...
    assert_close_at_scale(out[0, : first_target + 2], out[1, : first_target + 2], SUMMATION_ORDER)
    # ... but the later target tokens do, and everything sees the source.
    assert (out[0, first_target + 2 :] - out[1, first_target + 2 :]).abs().max() > 1e-2
    assert ((out[0] - other[0]).abs().amax(-1) > 1e-4).all()     # float32 noise is ~1e-6
    # Padding does not change real tokens: a shorter target padded in a batch with a longer one.
    with torch.no_grad():
        alone, *_ = model.hidden([source], [target[:2]], close=False)
        padded, *_ = model.hidden([source, source], [target[:2], target], close=False)
    assert_close_at_scale(alone[0], padded[0, : alone.shape[1]], SUMMATION_ORDER)


def contains_seven(count: int, seed: int) -> TextExamples:
    """Label 1 when token 7 appears among the 3-10 content tokens; about half the sequences have one."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(count, 12, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    labels = torch.randint(0, 2, (count,), generator=generator)
    others = torch.tensor([t for t in CONTENT if t != 7])
    for i in range(count):
        length = int(torch.randint(3, 11, (1,), generator=generator))
        tokens = others[torch.randint(0, len(others), (length,), generator=generator)]
        if labels[i]:
            tokens[torch.randint(0, length, (1,), generator=generator)] = 7
        ids[i, : length + 2] = torch.cat([torch.tensor([SPECIAL.cls]), tokens, torch.tensor([SPECIAL.sep])])
        attention_mask[i, : length + 2] = 1
    return TextExamples(ids, attention_mask, labels)


def test_classifier_learns_is_deterministic_and_leaves_the_backbone():
    backbone = tiny_text_model(depth=1)
    backbone.requires_grad_(False).eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, test = contains_seven(256, seed=1), contains_seven(128, seed=2)
    run = lambda: finetune_text_classifier(backbone, train, test, num_classes=2, epochs=6, lr=3e-3, batch_size=32,
                                           seed=0, device="cpu", progress=False)
    first, second = run(), run()

    assert first["accuracy"] > 0.9 and first["train_accuracy"] > 0.9       # chance is 0.5
    assert len(first["curve"]) == 6 and first["curve"][-1] == first["accuracy"]
    assert first == second                                                  # bit for bit, curve included
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_frozen_text_features_are_the_mean_of_the_real_tokens_whatever_the_padding():
    """text-probe's features: padding a batch (or splitting it) changes nothing, and the backbone is left as it was."""
    backbone = tiny_text_model(depth=1).train()
    examples = contains_seven(20, seed=3)
    features = text_features(backbone, examples, batch_size=7)
    assert features.shape == (20, 32) and backbone.training
    real = int(examples.attention_mask[4].sum())
    with torch.no_grad():
        backbone.eval()
        alone = backbone(examples.ids[4:5, :real]).mean(1)                     # no padding at all
    assert_close_at_scale(features[4:5], alone, SUMMATION_ORDER, "one unpadded sequence")
    assert_close_at_scale(text_features(backbone, examples, batch_size=20), features, SUMMATION_ORDER, "batching")


def test_classifier_rejects_labels_outside_the_classes():
    from maskkit.errors import MaskkitError

    data = contains_seven(8, seed=0)
    with pytest.raises(MaskkitError, match="num_classes=1"):
        finetune_text_classifier(tiny_text_model(), data, data, num_classes=1, epochs=1, lr=1e-3, batch_size=4,
                                 seed=0, device="cpu", progress=False)


def reverse_task(count: int, seed: int) -> Seq2SeqExamples:
    generator = torch.Generator().manual_seed(seed)
    sources = [torch.randint(CONTENT.start, CONTENT.stop, (int(torch.randint(2, 5, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(count)]
    return Seq2SeqExamples(sources, [source[::-1] for source in sources])


@pytest.fixture(scope="module")
def trained():
    """A tiny model fine-tuned on reversing 2-4 tokens; its backbone (unchanged) and the result."""
    backbone = tiny_text_model(dim=48, depth=2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, test = reverse_task(600, seed=1), reverse_task(60, seed=2)
    result = finetune_seq2seq(backbone, train, test, special=SPECIAL, epochs=20, lr=3e-3, batch_size=32, seed=0,
                              device="cpu", max_target_length=6, progress=False)
    return backbone, before, train, test, result


def test_seq2seq_learns_to_reverse(trained):
    backbone, before, _, test, result = trained
    assert result["exact_match"] > 0.5, result["examples"][:5]       # an untrained model gets ~0
    assert result["rouge_l"] >= result["exact_match"]
    source, reference, prediction = result["examples"][0]
    assert source == test.sources[0] and reference == test.targets[0] and isinstance(prediction, list)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_seq2seq_decodes_truncates_and_repeats():
    # Context 10 with targets up to 4 leaves 10 - 4 - 3 = 3 source tokens: 4-token sources are cut.
    backbone = tiny_text_model(context_length=10)
    train, test = reverse_task(64, seed=5), reverse_task(16, seed=6)
    decode = lambda ids: " ".join(f"w{i}" for i in ids.tolist())      # called like Tokenizer.decode
    run = lambda: finetune_seq2seq(backbone, train, test, special=SPECIAL, epochs=2, lr=1e-3, batch_size=16, seed=3,
                                   device="cpu", max_target_length=4, beam_size=2, decode=decode, progress=False)
    first, second = run(), run()
    assert first == second
    assert first["truncated_sources"] == sum(len(s) > 3 for s in train.sources + test.sources) > 0
    source, reference, prediction = first["examples"][0]
    assert source == decode(torch.tensor(test.sources[0])) and reference == decode(torch.tensor(test.targets[0]))
    assert isinstance(prediction, str) and len(prediction.split()) <= 4
    expected = sum(rouge_l(p, r) for _, r, p in first["examples"]) / len(test)
    assert first["rouge_l"] == pytest.approx(expected)


def test_beam_search_is_greedy_at_one_and_never_worse():
    # Half-trained (20 steps on reversal): the next-token distributions are neither uniform nor peaked, so
    # greedy's choices are often not the best sequences (beam search finds better ones for about half the
    # sources). Beam search does not promise to beat greedy everywhere (greedy's path may fall out of the
    # beam), but on this model it does on every source; after 40 steps it helps on only a few.
    backbone = tiny_text_model(dim=48, depth=2)
    model = Seq2SeqLM(backbone, SPECIAL, torch.Generator().manual_seed(0))
    train = reverse_task(300, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        batch = range(step * 5 % 300, step * 5 % 300 + 32)
        loss = model.loss([train.sources[i % 300] for i in batch], [train.targets[i % 300] for i in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sources = reverse_task(40, seed=4).sources
    greedy, greedy_scores = greedy_search(model, sources, max_target_length=5, batch_size=16)
    beam1, beam1_scores = beam_search(model, sources, beam_size=1, max_target_length=5, batch_size=16)
    beam, beam_scores = beam_search(model, sources, beam_size=4, max_target_length=5, batch_size=16)

    assert beam1 == greedy
    assert_close_at_scale(torch.tensor(beam1_scores), torch.tensor(greedy_scores), SUMMATION_ORDER)
    # Scores recomputed by teacher forcing, independently of the searches: [SEP] is part of the sequence
    # when the prediction stopped before the length limit.
    closed = lambda outputs: [out + [SPECIAL.sep] if len(out) < 5 else out for out in outputs]
    greedy_log_prob = sequence_log_prob(model, sources, closed(greedy))
    beam_log_prob = sequence_log_prob(model, sources, closed(beam))
    assert_close_at_scale(greedy_log_prob, torch.tensor(greedy_scores), SUMMATION_ORDER)
    assert_close_at_scale(beam_log_prob, torch.tensor(beam_scores), SUMMATION_ORDER)
    assert (beam_log_prob >= greedy_log_prob - 1e-4).all()
    assert (beam_log_prob > greedy_log_prob + 1e-3).any(), "the test should include a case where beam search helps"


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5; P = R = 5/6.
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" = 2 of 3 predicted, 2 of 4 reference: P 2/3, R 1/2, F = 2PR/(P+R) = 4/7.
    assert rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
    # Order matters (a subsequence, not a bag): LCS("a b", "b a") = 1.
    assert rouge_l("a b", "b a") == pytest.approx(0.5)
    assert rouge_l("", "a") == 0.0 and rouge_l("x y", "a b") == 0.0 and rouge_l("Same, words!", "same words") == 1.0
    assert lcs_f1([5, 6, 7], [5, 7]) == pytest.approx(0.8)
    assert exact_match("A red  ball.", "a red ball") == 1.0 and exact_match("a red ball", "a ball") == 0.0


def test_rouge_l_matches_rouge_score():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("the quick brown fox jumps over the lazy dog", "a quick brown dog jumps over the fox"),
             ("Police killed the gunman.", "the gunman was shot down by police"),
             ("a small red ball, on a table", "a red ball on the small table (wooden)"),
             ("it's 3-D and x_y", "its 3 d and x y"), ("one", "one one one"), ("", "")]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == pytest.approx(scorer.score(reference, prediction)["rougeL"].fmeasure)


def test_stratified_subset_keeps_class_shares_and_is_deterministic():
    from maskkit.eval.text import stratified_subset

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    chosen = stratified_subset(labels, 20, seed=7)
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [10, 6, 3, 1]      # 20 * (50, 30, 15, 5) / 100
    assert torch.equal(chosen, stratified_subset(labels, 20, seed=7))                  # same inputs, same documents
    assert not torch.equal(chosen, stratified_subset(labels, 20, seed=8))              # the seed picks them
    # Shares that do not divide: floor each, the remainder to the largest fractions (7 * 0.5 = 3.5 -> 4).
    assert torch.bincount(labels[stratified_subset(labels, 7, seed=0)], minlength=4).tolist() == [4, 2, 1, 0]
    assert torch.equal(stratified_subset(labels, 500, seed=0), torch.arange(100))      # more than there are: all
