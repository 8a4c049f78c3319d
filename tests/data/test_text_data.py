"""The text data layer: the bundled corpus, the user's files (as editors save them), the split, packing."""

import json
import logging

import numpy as np
import pytest
import torch

from maskkit.cli import main
from maskkit.config import config_from_dict
from maskkit.data import build_data
from maskkit.data.text import (
    WIKI_TOPICS,
    TextDataConfig,
    TokenisedDocuments,
    pack_blocks,
    read_corpus,
    split_documents,
)
from maskkit.data.tokenizer import Tokenizer, build_text_tokenizer
from maskkit.errors import MaskkitError


def test_wiki_corpus_has_its_topics_and_a_fixed_disjoint_split():
    corpus = read_corpus(TextDataConfig())
    documents = corpus.documents
    assert 9000 < len(documents) < 11000
    labels = [d.label for d in documents]
    assert set(labels) == set(range(len(WIKI_TOPICS))) | {-1}          # 11 topics plus "Uncategorized"
    assert sum(1 for d in documents if d.target) > 0.9 * len(documents)  # short descriptions for seq2seq
    parts = {split: split_documents(documents, [0.8, 0.1, 0.1], 0, split) for split in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == pytest.approx([0.8 * len(documents), 0.1 * len(documents),
                                                               0.1 * len(documents)], abs=1)
    ids = {split: {id(d) for d in part} for split, part in parts.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    assert sum(len(p) for p in parts.values()) == len(documents)
    again = split_documents(documents, [0.8, 0.1, 0.1], 0, "test")
    assert [d.text for d in again] == [d.text for d in parts["test"]]
    other_seed = split_documents(documents, [0.8, 0.1, 0.1], 1, "test")
    assert [d.text for d in other_seed] != [d.text for d in parts["test"]]


def test_pack_blocks_concatenates_documents_with_sep_and_starts_each_block_with_cls():
    blocks = pack_blocks([[10, 11, 12], [13], [14, 15, 16, 17]], block_length=4, cls_id=2, sep_id=3)
    # stream: 10 11 12 3 13 3 14 15 16 17 3 -> pieces of 3 after [CLS]; the 2-token tail is dropped
    np.testing.assert_array_equal(blocks, [[2, 10, 11, 12], [2, 3, 13, 3], [2, 14, 15, 16]])
    with pytest.raises(MaskkitError, match="data.block_length=64"):
        pack_blocks([[10, 11]], block_length=64, cls_id=2, sep_id=3)


def test_training_blocks_are_the_train_split_tokenised_and_carry_index_and_epoch():
    cfg = TextDataConfig(max_documents=200, block_length=32)
    data = build_data(cfg, "train")
    tokenizer = data.tokenizer
    special = tokenizer.special_ids()
    batch = data.collate([data.dataset[(i, 3)] for i in range(5)])
    assert batch["ids"].shape == (5, 32) and bool((batch["attention_mask"] == 1).all())
    assert bool((batch["ids"][:, 0] == special.cls).all()) and batch["epoch"].tolist() == [3] * 5
    documents = split_documents(read_corpus(cfg).documents, cfg.split, cfg.split_seed, "train")
    first = tokenizer.encode_plain([documents[0].text])[0]
    assert batch["ids"][0, 1:].tolist() == (first + [special.sep])[:31]


def test_txt_documents_by_line_or_blank_line_with_empty_lines_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first document here\n\nsecond line\nthird line\n   \nfourth\n")
    with caplog.at_level(logging.WARNING, logger="maskkit"):
        corpus = read_corpus(TextDataConfig(name="txt", path=str(path)))
    assert [d.text for d in corpus.documents] == ["first document here", "second line", "third line", "fourth"]
    assert corpus.skipped == {"empty": 2}
    assert f"skipped 2 documents (empty; the first at {path}:2)" in caplog.text
    paragraphs = read_corpus(TextDataConfig(name="txt", path=str(path), documents="blank")).documents
    assert [d.text for d in paragraphs] == ["first document here", "second line third line", "fourth"]
    path.write_text("a b\nc d\n\ne f\n")
    assert [d.text for d in read_corpus(TextDataConfig(name="txt", path=str(path), documents="blank")).documents] == [
        "a b c d", "e f"]


def test_jsonl_with_labels_targets_and_bad_lines(tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "a cat sat", "topic": "animals", "title": "Cat"}, {"body": "", "topic": "x"},
            {"other": "no body"}, {"body": "stocks fell", "topic": "money", "title": "Market"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n[1, 2]\n")
    cfg = TextDataConfig(name="jsonl", path=str(path), text_field="body", label_field="topic", target_field="title")
    with caplog.at_level(logging.WARNING, logger="maskkit"):
        corpus = read_corpus(cfg)
    assert [(d.text, d.label, d.target) for d in corpus.documents] == [("a cat sat", 0, "Cat"),
                                                                       ("stocks fell", 1, "Market")]
    assert corpus.label_names == ["animals", "money"]
    assert corpus.skipped == {"empty": 1, "no text field 'body'": 1, "not valid JSON": 1, "not a JSON object": 1}
    assert f"{path}:5" in caplog.text


def test_datasets_folder_from_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one two", "three", ""], "label": [1, 0, 1]}).save_to_disk(str(folder))
    corpus = read_corpus(TextDataConfig(name="hf", path=str(folder), label_field="label"))
    assert [(d.text, d.label) for d in corpus.documents] == [("one two", 1), ("three", 0)]
    assert corpus.skipped == {"empty": 1}
    with pytest.raises(MaskkitError, match="no column 'body'"):
        read_corpus(TextDataConfig(name="hf", path=str(folder), text_field="body"))
    with pytest.raises(MaskkitError, match="save_to_disk"):
        read_corpus(TextDataConfig(name="hf", path=str(tmp_path / "nothing")))


def test_an_empty_corpus_and_a_missing_file_fail_naming_them(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(MaskkitError, match=r"holds no document: 3 skipped as empty, the first at .*empty.txt:1$"):
        read_corpus(TextDataConfig(name="txt", path=str(empty)))
    # A spreadsheet's CSV given as JSON lines: one line saying why and what to do, no warnings before it.
    sheet = tmp_path / "sheet.csv"
    sheet.write_text('text,label\n"A painter in Paris",Arts\n', encoding="utf-8")
    with pytest.raises(MaskkitError, match=r"holds no document: 2 skipped as not valid JSON, the first at "
                                           r".*sheet.csv:1 \(a spreadsheet's CSV: save it as JSON lines"):
        read_corpus(TextDataConfig(name="jsonl", path=str(sheet)))
    with pytest.raises(MaskkitError, match="does not exist"):
        read_corpus(TextDataConfig(name="txt", path=str(tmp_path / "missing.txt")))


def test_a_vocabulary_without_mask_token_is_named(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4},
                                                               unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tok.json"
    backend.save(str(path))
    with pytest.raises(MaskkitError, match=r"no \[MASK\] token"):
        Tokenizer.from_file(path, 16).special_ids()


def test_fine_tuning_documents_are_tokenised_per_item_and_truncated_to_the_context():
    corpus = read_corpus(TextDataConfig(max_documents=20))
    tokenizer = build_text_tokenizer("wiki", 24)
    item = TokenisedDocuments(corpus.documents, tokenizer)[0]
    assert item["ids"].shape == item["attention_mask"].shape == (24,)
    assert int(item["label"]) == corpus.documents[0].label
    assert tokenizer.decode(item["ids"]).split()[:3] == corpus.documents[0].text.lower().split()[:3]


def test_text_config_keys_are_checked():
    def config(**data):
        return config_from_dict({"method": "mae", "data": {"kind": "text", **data}})

    for data, key in [({"name": "books"}, "data.name"), ({"name": "txt"}, "data.path"),
                      ({"block_length": 2}, "data.block_length"), ({"split": [0.5, 0.5]}, "data.split"),
                      ({"split": [0.9, 0.2, 0.1]}, "data.split"), ({"documents": "para"}, "data.documents"),
                      ({"max_documents": -1}, "data.max_documents")]:
        with pytest.raises(MaskkitError, match=key.replace(".", r"\.")):
            config(**data)


def test_tokenizer_train_command_writes_a_usable_vocabulary(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)))
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "100", "--out", str(out), "data.name=txt",
                 f"data.path={corpus}"]) == 0
    tokenizer = Tokenizer.from_file(out, 16)
    assert tokenizer.vocab_size <= 100 and tokenizer.special_ids().mask is not None
    ids, _ = tokenizer.encode(["the lazy fox"])
    assert tokenizer.decode(ids[0]) == "the lazy fox"
    assert main(["tokenizer", "train", "--out", str(out), "data.name=txt"]) == 2
    assert "data.path" in capsys.readouterr().err
    assert torch.is_tensor(ids)


# Files as people make them: Notepad's "Unicode" (UTF-16 LE with a byte-order mark, CRLF), PowerShell's UTF-8
# (with a byte-order mark), a Latin-1 file, a UTF-16 file without a mark, a folder of mixed files.


def test_txt_and_jsonl_with_byte_order_marks_and_crlf_are_read_as_written(tmp_path):
    notepad = tmp_path / "notepad.txt"
    notepad.write_bytes(b"\xff\xfe" + "café crème\r\nnaïve 日本\r\n\r\nlast line\r\n".encode("utf-16-le"))
    assert [d.text for d in read_corpus(TextDataConfig(name="txt", path=str(notepad))).documents] == [
        "café crème", "naïve 日本", "last line"]
    big_endian = tmp_path / "big.txt"
    big_endian.write_bytes(b"\xfe\xff" + "one\ntwo\n".encode("utf-16-be"))
    assert [d.text for d in read_corpus(TextDataConfig(name="txt", path=str(big_endian))).documents] == ["one", "two"]
    utf8 = tmp_path / "docs.jsonl"
    rows = [{"text": "crème brûlée", "label": "food"}, {"text": "line\u2028separator kept", "label": "x"}]
    utf8.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    corpus = read_corpus(TextDataConfig(name="jsonl", path=str(utf8), label_field="label"))
    assert [d.text for d in corpus.documents] == ["crème brûlée", "line\u2028separator kept"]
    assert corpus.skipped == {}


def test_text_in_another_encoding_is_refused_naming_the_file_the_line_and_the_byte(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nsecond line\ncafé crème\n".encode("latin-1"))
    with pytest.raises(MaskkitError, match=r"latin.txt: not UTF-8 \(byte 0xe9 at line 3.*Latin-1.*'café crème'"):
        read_corpus(TextDataConfig(name="txt", path=str(latin)))
    wide = tmp_path / "wide.txt"
    wide.write_bytes("no byte-order mark\n".encode("utf-16-le"))
    with pytest.raises(MaskkitError, match=r"wide.txt: .*NUL bytes.*UTF-16 without a byte-order mark"):
        read_corpus(TextDataConfig(name="txt", path=str(wide)))
    (tmp_path / "wide.jsonl").write_bytes('{"text": "x"}\n'.encode("utf-16-be"))
    with pytest.raises(MaskkitError, match=r"wide.jsonl: .*NUL bytes"):
        read_corpus(TextDataConfig(name="jsonl", path=str(tmp_path / "wide.jsonl")))


def test_a_folder_reads_txt_and_jsonl_in_path_order_and_names_the_files_it_leaves_out(tmp_path, caplog):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("from a.txt\n")
    (folder / "b" / "c.jsonl").write_text(json.dumps({"text": "from c.jsonl"}) + "\n")
    (folder / "b" / "d.TXT").write_text("from d.TXT\n")           # Windows' upper-case suffix
    (folder / "e.jsonl").write_text(json.dumps({"text": "from e.jsonl"}) + "\n")
    (folder / "notes.md").write_text("# not a corpus file\n")
    (folder / "paper.pdf").write_bytes(b"%PDF-1.4")
    (folder / ".hidden.txt").write_text("editor state\n")            # hidden files are never corpus files
    with caplog.at_level(logging.WARNING, logger="maskkit"):
        corpus = read_corpus(TextDataConfig(name="txt", path=str(folder)))
    assert [d.text for d in corpus.documents] == ["from a.txt", "from c.jsonl", "from d.TXT", "from e.jsonl"]
    assert "skipped 2 files that are not .txt, .jsonl or .json (.md, .pdf): notes.md, paper.pdf" in caplog.text
    # The folder is read the same whichever of the two kinds data.name says; its left-out files are named once.
    again = read_corpus(TextDataConfig(name="jsonl", path=str(folder)))
    assert [d.text for d in again.documents] == [d.text for d in corpus.documents]
    assert caplog.text.count("notes.md") == 1
