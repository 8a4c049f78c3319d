"""TinyBERT (Jiao et al. 2020): each loss of Sec 3.1 against a direct computation (the padding-zeroed attention
scores, the layer mapping), the stages' checks (a teacher not fine-tuned, classes by name, head counts, the
tokenizer), data augmentation that never shows the predictor the word it replaces, bitwise resume across
epochs, and 2 gloo ranks == 1."""

import json

import pytest
import torch
import torch.nn.functional as F

from maskkit.config import config_from_dict
from maskkit.data import build_data
from maskkit.data.text import WIKI_TOPICS
from maskkit.data.tokenizer import build_text_tokenizer
from maskkit.errors import MaskkitError
from maskkit.methods import build_method
from maskkit.methods.tinybert import (
    attention_loss,
    augment_documents,
    eligible_words,
    embedding_neighbours,
    hidden_loss,
    init_from_teacher,
    masked_lm_candidates,
    save_teacher,
    soft_cross_entropy,
    uniform_layer_map,
)
from maskkit.nn.transformer import SequenceClassifier, TextConfig, TextTransformer
from maskkit.train.loop import train
from tests.helpers import SUMMATION_ORDER, assert_close_at_scale, final_weights, train_on_two_ranks

BERT = dict(norm_eps=1e-12, embedding_norm=True, post_norm=True, type_vocab_size=2, padding_idx=0, pooler=True)


def teacher_file(tmp_path, classifier: bool = True, depth: int = 4, heads: int = 4, labels=WIKI_TOPICS, name="teacher"):
    torch.manual_seed(0)
    backbone = TextTransformer(TextConfig(vocab_size=4096, context_length=64, dim=32, depth=depth, num_heads=heads, **BERT))
    model = SequenceClassifier(backbone, len(labels), list(labels)) if classifier else backbone
    return save_teacher(model, tmp_path / f"{name}.safetensors", "a test")


def tinybert_values(teacher, stage: str = "intermediate", **sections) -> dict:
    values = {
        "name": "tb", "method": "tinybert",
        "model": {"stage": stage, "teacher": str(teacher), "labels": list(WIKI_TOPICS),
                  "student": {"vocab_size": 4096, "context_length": 64, "dim": 16, "depth": 2, "num_heads": 4, **BERT}},
        "data": {"kind": "text", "name": "wiki", "tokenizer": "wiki", "block_length": 32, "max_documents": 120,
                 "examples": "blocks" if stage == "general" else "documents"},
        "optim": {"base_lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5},
    }
    for section, update in sections.items():
        values[section].update(update)
    return values


def test_attention_loss_zeroes_the_padding_keys_of_both_and_averages_every_entry():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    expected = 0.0
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(4):
                    if mask[b, j]:                            # a padding key: 0 - 0 (the code's -1e2 rule)
                        expected += float(student[b, h, i, j] - teacher[b, h, i, j]) ** 2
    expected /= student.numel()                               # zeroed entries still count in the mean
    assert abs(float(attention_loss(student, teacher, mask)) - expected) < 1e-6
    # A huge difference on a padding key changes nothing; on a padding query row (a real key) it does.
    moved = student.clone()
    moved[1, :, :, 3] += 100.0
    assert float(attention_loss(moved, teacher, mask)) == pytest.approx(expected, rel=1e-6)
    moved[1, :, 3, 0] += 1.0
    assert abs(float(attention_loss(moved, teacher, mask)) - expected) > 1e-3


def test_a_student_with_fewer_heads_imitates_the_teachers_heads_averaged_in_consecutive_groups():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 2, 4, 4, generator=generator), torch.randn(2, 6, 4, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    keep = mask[:, None, None, :].float()
    grouped = torch.stack([teacher[:, 0:3].mean(1), teacher[:, 3:6].mean(1)], dim=1)
    expected = ((student - grouped) * keep).pow(2).mean()
    assert_close_at_scale(attention_loss(student, teacher, mask), expected, SUMMATION_ORDER)
    with pytest.raises(MaskkitError, match=r"student's 4 attention heads do not divide the teacher's 6"):
        attention_loss(torch.randn(2, 4, 4, 4), teacher, mask)


def test_hidden_loss_is_over_real_tokens_and_soft_cross_entropy_is_eq_10():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = [(0, 0), (0, 1), (1, 0)]
    expected = sum(float(((student[b, t] - teacher[b, t]) ** 2).sum()) for b, t in rows) / (3 * 5)
    assert float(hidden_loss(student, teacher, mask)) == pytest.approx(expected, rel=1e-6)
    logits_s, logits_t = torch.randn(4, 3), torch.randn(4, 3)
    for temperature in (1.0, 2.0):
        p = torch.softmax(logits_t / temperature, -1)
        direct = -(p * torch.log(torch.softmax(logits_s / temperature, -1))).sum(-1).mean()
        assert float(soft_cross_entropy(logits_s, logits_t, temperature)) == pytest.approx(float(direct), rel=1e-6)
    # Its minimum over the student is the teacher's distribution (the cross-entropy equals the entropy).
    entropy = -(torch.softmax(logits_t, -1) * torch.log_softmax(logits_t, -1)).sum(-1).mean()
    assert float(soft_cross_entropy(logits_t, logits_t, 1.0)) == pytest.approx(float(entropy), rel=1e-6)


def test_uniform_layer_map_is_g_of_m_and_a_mismatch_names_a_mapping():
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(4, 12) == [3, 6, 9, 12]        # TinyBERT4 from BERT-base (the code's layers_per_block)
    with pytest.raises(MaskkitError, match=r"not a multiple of the student's 4 .*model\.layer_map=\[2,3,5,6\]"):
        uniform_layer_map(4, 6)


def method_and_batch(values: dict):
    """The method of `values`, its loss on the first 4 documents, and those documents' ids and mask cut to their
    longest (what the method itself trims to)."""
    method = build_method(config_from_dict(values))
    data = build_data(config_from_dict(values).data)
    method.check_data(data)
    batch = data.collate([data.dataset[i] for i in range(4)])
    out = method(batch)
    length = int(batch["attention_mask"].sum(1).max())
    return method, out, batch["ids"][:, :length], batch["attention_mask"][:, :length]


@pytest.mark.parametrize("layer_map", [[], [1, 3]])
def test_intermediate_loss_is_the_sum_over_the_mapped_layers(tmp_path, layer_map):
    method, out, ids, mask = method_and_batch(tinybert_values(teacher_file(tmp_path), model={"layer_map": layer_map}))
    assert method.layer_map == (layer_map or [2, 4]) and method.teacher.training is False
    with torch.no_grad():
        teacher = method.teacher.backbone.forward_layers(ids, mask)
        student = method.model.backbone.forward_layers(ids, mask)
        real = mask.bool()
        expected = F.mse_loss(method.embedding_projection(student.states[0])[real], teacher.states[0][real])
        for m, t in enumerate(method.layer_map):
            keep = mask[:, None, None, :].float()
            expected += F.mse_loss(student.scores[m] * keep, teacher.scores[t - 1] * keep)
            expected += F.mse_loss(method.hidden_projection(student.states[m + 1])[real], teacher.states[t][real])
    assert_close_at_scale(out.loss.detach(), expected, SUMMATION_ORDER)
    assert set(out.logs) >= {"embedding", "attention", "hidden"}
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())                    # frozen
    assert not any(key.startswith("teacher.") for key in method.trainable_state_dict())   # not checkpointed


def test_prediction_stage_distils_the_teacher_logits(tmp_path):
    method, out, ids, mask = method_and_batch(tinybert_values(teacher_file(tmp_path), "prediction",
                                                              model={"temperature": 2.0}))
    with torch.no_grad():
        expected = soft_cross_entropy(method.model(ids, mask), method.teacher(ids, mask), 2.0)
    assert_close_at_scale(out.loss.detach(), expected, SUMMATION_ORDER)


def test_teacher_pca_init_projects_every_table_on_the_top_principal_directions():
    """A teacher whose token table spans 16 directions: the student's 16-wide tables are the teacher's in an
    orthonormal basis of exactly that span, so projecting back loses nothing (a wrong basis or a transposed
    one would); position and token-type rows use the same basis."""
    torch.manual_seed(0)
    teacher = TextTransformer(TextConfig(vocab_size=500, context_length=64, dim=32, depth=1, num_heads=4, **BERT))
    student = TextTransformer(TextConfig(vocab_size=500, context_length=32, dim=16, depth=1, num_heads=4, **BERT))
    span = torch.randn(16, 32)
    with torch.no_grad():
        teacher.token_embedding.weight.copy_(torch.randn(500, 16) @ span + 0.3)
    basis = init_from_teacher(student, teacher)
    assert_close_at_scale(basis.T @ basis, torch.eye(16), SUMMATION_ORDER)
    table = teacher.token_embedding.weight
    offset = torch.full((32,), 0.3)             # off the span: the directions are those of the centred table
    assert_close_at_scale(student.token_embedding.weight @ basis.T, table - offset + offset @ basis @ basis.T,
                          SUMMATION_ORDER)
    assert_close_at_scale(student.position_embedding, teacher.position_embedding[:, :32] @ basis, SUMMATION_ORDER)
    assert_close_at_scale(student.token_type_embedding.weight, teacher.token_type_embedding.weight @ basis,
                          SUMMATION_ORDER)
    with pytest.raises(MaskkitError, match=r"student \(dim 16\) is wider than the teacher \(8\)"):
        init_from_teacher(student, TextTransformer(TextConfig(vocab_size=500, context_length=64, dim=8, depth=1,
                                                              num_heads=4, **BERT)))


def test_bad_teachers_and_mismatches_fail_in_one_line_before_training(tmp_path):
    encoder = teacher_file(tmp_path, classifier=False, name="encoder")
    with pytest.raises(MaskkitError, match=r"task distillation needs a teacher fine-tuned on the task"):
        build_method(config_from_dict(tinybert_values(encoder, "intermediate")))
    build_method(config_from_dict(tinybert_values(encoder, "general")))          # general distillation: fine
    with pytest.raises(MaskkitError, match=r"num_heads=3 does not divide the teacher's 4"):
        build_method(config_from_dict(tinybert_values(teacher_file(tmp_path), model={
            "student": {"vocab_size": 4096, "context_length": 64, "dim": 18, "depth": 2, "num_heads": 3, **BERT}})))
    build_method(config_from_dict(tinybert_values(teacher_file(tmp_path), model={      # 2 heads: groups of 2
        "student": {"vocab_size": 4096, "context_length": 64, "dim": 16, "depth": 2, "num_heads": 2, **BERT}})))
    with pytest.raises(MaskkitError, match=r"layer_map=\[2, 5\] names a layer the teacher does not have \(it has 4\)"):
        build_method(config_from_dict(tinybert_values(teacher_file(tmp_path), model={"layer_map": [2, 5]})))
    with pytest.raises(MaskkitError, match=r"model\.layer_map must be one teacher layer per student layer \(2"):
        config_from_dict(tinybert_values(teacher_file(tmp_path), model={"layer_map": [2]}))
    with pytest.raises(MaskkitError, match=r"model\.teacher: .*nothing\.safetensors is not a teacher file"):
        build_method(config_from_dict(tinybert_values(tmp_path / "nothing.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(MaskkitError, match=r"junk\.safetensors is not a teacher file"):
        build_method(config_from_dict(tinybert_values(tmp_path / "junk.safetensors")))
    with pytest.raises(MaskkitError, match=r"model\.student\.vocab_size=30522 differs from the teacher's 4096"):
        build_method(config_from_dict(tinybert_values(teacher_file(tmp_path), model={
            "student": {"vocab_size": 30522, "context_length": 64, "dim": 16, "depth": 2, "num_heads": 4, **BERT}})))
    method = build_method(config_from_dict(tinybert_values(teacher_file(tmp_path))))
    minilm_data = build_data(config_from_dict(tinybert_values(teacher_file(tmp_path), data={"tokenizer": "minilm"})).data)
    with pytest.raises(MaskkitError, match=r"data\.tokenizer gives 30522 tokens, the models read 4096"):
        method.check_data(minilm_data)
    with pytest.raises(MaskkitError, match=r"data\.examples must be documents for model\.stage=intermediate"):
        config_from_dict(tinybert_values(teacher_file(tmp_path), data={"examples": "blocks"}))


def test_classes_are_mapped_by_name_and_an_unknown_class_is_refused(tmp_path):
    reordered = list(reversed(WIKI_TOPICS))
    teacher = teacher_file(tmp_path, labels=reordered, name="reordered")
    method = build_method(config_from_dict(tinybert_values(teacher, "prediction", model={"labels": reordered})))
    data = build_data(config_from_dict(tinybert_values(teacher, "prediction")).data)
    method.check_data(data)                                  # the data's classes are WIKI_TOPICS in their order
    batch = data.collate([data.dataset[i] for i in range(8)])
    names = [data.label_names[i] for i in batch["label"]]
    assert [reordered[i] for i in method.task_labels(batch)] == names
    with pytest.raises(MaskkitError, match=r"model\.labels=.* differ from the task teacher's classes"):
        build_method(config_from_dict(tinybert_values(teacher, "prediction")))
    few = teacher_file(tmp_path, labels=WIKI_TOPICS[:3], name="three")
    method = build_method(config_from_dict(tinybert_values(few, "prediction", model={"labels": list(WIKI_TOPICS[:3])})))
    with pytest.raises(MaskkitError, match=r"the data's class 'Geography' is not one of the task's"):
        method.check_data(data)


def test_augmentation_never_shows_the_masked_lm_the_word_it_replaces():
    tokenizer = build_text_tokenizer("wiki", 64)
    vocabulary = tokenizer.backend.get_vocab()
    special = tokenizer.special_ids()
    documents = ["The river flows north into the cold sea near the old town.", "Paris is a large city in France."]
    seen = []

    def predict(ids, attention_mask, positions):
        seen.append((ids.clone(), attention_mask.clone(), positions.clone()))
        logits = torch.zeros(len(ids), special.vocab_size)
        logits[:, vocabulary["river"]] = 10.0           # a predictor that would gladly return the original word
        logits[:, vocabulary["city"]] = 9.0
        return logits

    candidates = masked_lm_candidates(documents, tokenizer, predict, vocabulary, count=3)
    ids = torch.cat([batch[0] for batch in seen])
    mask = torch.cat([batch[1] for batch in seen])
    positions = torch.cat([batch[2] for batch in seen])
    queries = [(i, s, w) for i, text in enumerate(documents) for s, _, w in eligible_words(text) if w in vocabulary]
    assert len(ids) == len(queries) > 4
    for row, real, position, (_, _, word) in zip(ids, mask, positions, queries, strict=True):
        tokens = row[real.bool()]
        assert int((tokens == special.mask).sum()) == 1 and int(row[position]) == special.mask
        assert int((tokens == special.sep).sum()) == 1                       # one sentence: no unmasked copy
        assert vocabulary[word] not in tokens.tolist() or word in ("the",)   # the word is gone from the input
    for (index, start, word) in queries:
        assert vocabulary[word] not in candidates[(index, start)]           # never proposed as its own replacement
    # The embedding path never returns the word itself either.
    words = ["river", "city", "mountain"]
    neighbours = embedding_neighbours(words, tokenizer.encode_plain(words), torch.randn(special.vocab_size, 8),
                                      vocabulary, 5)
    assert all(vocabulary[w] not in neighbours[w] and len(neighbours[w]) == 5 for w in words)


def test_augmented_copies_replace_words_with_probability_p_and_keep_the_rest(tmp_path):
    tokenizer = build_text_tokenizer("wiki", 64)
    embedding = torch.randn(tokenizer.vocab_size, 16, generator=torch.Generator().manual_seed(0))
    text = "The painter moved to Paris in 1890, where she studied colour and light."
    out = augment_documents([text], tokenizer, embedding, copies=6, probability=0.4, count=5, seed=0)[0]
    assert out[0] == text and 3 <= len(out) <= 7 and len(set(out)) == len(out)
    for variant in out[1:]:
        assert "1890," in variant and variant.endswith(".")                  # numbers and punctuation stay
        assert variant.split()[0] == "The"                                    # stop words are never replaced
    assert augment_documents([text], tokenizer, embedding, 6, 0.4, 5, seed=0) == [out]        # seeded
    assert augment_documents([text], tokenizer, embedding, 6, 0.0, 5, seed=0) == [[text]]     # p = 0: the original
    assert augment_documents([text], tokenizer, embedding, 0, 0.4, 5, seed=0) == [[text]]


def test_a_stage_resumes_bitwise_across_epochs(tmp_path):
    values = tinybert_values(teacher_file(tmp_path), train={"steps": 14, "checkpoint_every": 7})
    cfg = config_from_dict(values)
    data = build_data(cfg.data)
    assert 7 < len(data.dataset) / 8 < 14                      # the resumed half crosses an epoch boundary
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", stop_at_step=7, progress=False)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and not any(k.startswith("teacher.") for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [json.loads(line).get("loss") for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]                              # the student approaches the teacher


@pytest.mark.slow
def test_two_gloo_ranks_train_what_one_does(tmp_path):
    values = tinybert_values(teacher_file(tmp_path), train={"steps": 3, "threads": 1})
    train_on_two_ranks(values, tmp_path / "two", tmp_path / "init")
    train(config_from_dict(values), tmp_path / "one", progress=False)
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    for key in one:
        assert_close_at_scale(two[key], one[key], SUMMATION_ORDER, key)
