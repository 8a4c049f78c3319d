"""Image-text pairs: the shapes world (captions true to the image, masks true to the shapes, held-out
combinations really held out), captioned digits, the CSV/TSV loader and the tokenizer."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskkit.data import build_data
from maskkit.data.pairs import CaptionFile, PairDataConfig
from maskkit.data.shapes import COLOURS, HELD_OUT, KINDS, ShapesWorld
from maskkit.data.tokenizer import Tokenizer
from maskkit.errors import MaskkitError


def test_held_out_pairs_never_appear_in_training_and_are_all_the_test_split_shows():
    train = ShapesWorld("train", 600, 32)
    for i in range(600):
        for shape in train.scene(i):
            assert (shape.colour, shape.kind) not in HELD_OUT
    test = ShapesWorld("test", 600, 32)
    assert {(s.colour, s.kind) for i in range(len(test)) for s in test.scene(i)} == set(HELD_OUT)


def test_captions_masks_and_relations_are_true_to_the_image():
    world = ShapesWorld("train", 300, 48)
    checked_relations = 0
    for i in range(60):
        shapes, item = world.scene(i), world[i]
        caption, mask, image = item["text"], item["mask"], item["images"]
        for shape in shapes:
            assert shape.colour in caption and shape.kind in caption
        # Every pixel the mask gives to a kind shows a shape of that kind's colour in this image.
        for value in mask.unique().tolist():
            if value == 0:
                continue
            kind = KINDS[value - 1]
            colours = {s.colour for s in shapes if s.kind == kind}
            pixels = image[:, mask == value].T                                  # (P, 3)
            palette = torch.tensor([COLOURS[c] for c in colours])
            assert (pixels[:, None] - palette[None]).abs().amax(-1).min(1).values.max() < 1e-6
        assert (mask == 0).any()
        if len(shapes) == 2 and " left of " in caption:
            assert shapes[0].x < shapes[1].x
            checked_relations += 1
    assert checked_relations > 3


def test_pair_batches_carry_tokens_and_the_tokenizer_round_trips():
    data = build_data(PairDataConfig(num_samples=64, image_size=16, context_length=16, vocab_size=128), "train")
    items = [data.dataset[i] for i in range(4)]
    captions = [item["text"] for item in items]
    batch = data.collate(items)
    assert batch["ids"].shape == batch["attention_mask"].shape == (4, 16)
    assert batch["text"] == captions
    for row, caption in zip(batch["ids"], captions, strict=True):
        assert data.tokenizer.decode(row) == caption              # the learnt vocabulary covers every word
    assert (batch["ids"][:, 0] == data.tokenizer.backend.token_to_id("[CLS]")).all()


def test_long_captions_are_truncated_and_counted():
    tokenizer = Tokenizer.from_captions(["a red circle left of a blue square"] * 4, 64, context_length=5)
    ids, mask = tokenizer.encode(["a red circle left of a blue square", "a red circle"])
    assert ids.shape == (2, 5) and mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert tokenizer.truncated == 1
    with pytest.raises(MaskkitError, match="does not exist"):
        Tokenizer.from_file("/no/such/tokenizer.json", 8)
    with pytest.raises(MaskkitError, match="data.vocab_size=10 cannot hold"):
        Tokenizer.from_captions(["a red circle"], 10, context_length=5)


def test_the_caption_vocabulary_is_the_same_in_every_process():
    """A resumed run or an evaluation rebuilds the vocabulary: it must get the very same ids."""
    import subprocess
    import sys

    code = ("from maskkit.data.pairs import PairDataConfig, pair_tokenizer; import json; "
            "t = pair_tokenizer(PairDataConfig(num_samples=64, vocab_size=128)); "
            "print(json.dumps(sorted(t.backend.get_vocab().items())))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(runs) == 1


def write_images(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((10, 12, 3), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")


def test_csv_pairs_report_missing_images_and_empty_captions(tmp_path, caplog):
    write_images(tmp_path / "img", 6)
    rows = ["filepath,title"] + [f"img/{i}.png,picture number {i}" for i in range(6)]
    rows += ["img/missing.png,a lost picture", "img/0.png,"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cfg = PairDataConfig(name="csv", path=str(tmp_path / "pairs.csv"), image_size=16, eval_split=0.5)
    train, test = CaptionFile(cfg, "train"), CaptionFile(cfg, "test")
    assert len(train) + len(test) == 6
    assert "1 rows with an empty caption and 1 with a missing image" in caplog.text
    assert train[0]["images"].shape == (3, 16, 16)


def test_csv_errors_name_the_columns_and_the_separator(tmp_path):
    (tmp_path / "pairs.csv").write_text("path\tcaption\nimg/0.png\thello\n")
    cfg = PairDataConfig(name="csv", path=str(tmp_path / "pairs.csv"))
    with pytest.raises(MaskkitError, match=r"found \['path\\tcaption'\]; it looks tab-separated"):
        CaptionFile(cfg, "train")
    (tmp_path / "other.csv").write_text("image,text\nimg/0.png,hello\n")
    with pytest.raises(MaskkitError, match=r"data.image_column='filepath'.*found \['image', 'text'\]"):
        CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "other.csv")), "train")


def test_captioned_digits_name_their_digit():
    data = build_data(PairDataConfig(name="digits", image_size=16, context_length=16, vocab_size=128), "test")
    item = data.dataset[0]
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert names[int(item["label"])] in item["text"]


def write_shard(path, samples):
    """samples: (key, {extension: bytes}); a WebDataset-format tar."""
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def png_bytes(value: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_shards_read_pairs_skip_incomplete_samples_and_name_undecodable_images(tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "000.tar", [(f"{i:04d}", {"png": png_bytes(10 * i), "txt": f"picture {i}".encode()})
                                     for i in range(5)] + [("nocap", {"png": png_bytes(1)})])
    write_shard(folder / "001.tar", [("0100", {"png": png_bytes(7), "txt": b"last picture"}),
                                     ("0101", {"png": b"broken", "txt": b"a broken picture"})])
    cfg = PairDataConfig(name="shards", path=str(folder), image_size=16, eval_split=0.25, context_length=16,
                         vocab_size=64)
    data = build_data(cfg, "train")
    test = build_data(cfg, "test")
    assert len(data.dataset) + len(test.dataset) == 7
    assert "skipped 1 samples without a caption and 0 without an image" in caplog.text
    batch = data.collate([data.dataset[i] for i in range(len(data.dataset))])
    everything = batch["text"] + [test.dataset[i]["text"] for i in range(len(test.dataset))
                                  if isinstance(test.dataset[i], dict)]
    assert "picture 3" in everything and "last picture" in everything
    broken = [item for item in (list(data.dataset) + list(test.dataset)) if not isinstance(item, dict)]
    assert len(broken) == 1 and broken[0].path.endswith("001.tar:0101.png")


def test_shards_without_captions_fail_on_the_first_shard(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "000.tar", [(f"{i}", {"jpg": png_bytes(i), "json": b"{}"}) for i in range(3)])
    (folder / "001.tar").write_bytes(b"not a tar file")      # never read: the first shard already fails
    cfg = PairDataConfig(name="shards", path=str(folder))
    with pytest.raises(MaskkitError, match=r"000.tar: none of its 3 samples has both an image and a caption "
                                           r"\(found files .jpg, .json"):
        build_data(cfg, "train")


# Files as people make them: Excel's "CSV UTF-8" (a byte-order mark, CRLF line ends, a cell with a line break
# quoted), Excel's "Unicode Text" (UTF-16 LE with a BOM, tab-separated), and a Latin-1 file from an old editor.


def test_csv_utf8_from_excel_keeps_accents_and_quoted_line_breaks(tmp_path):
    write_images(tmp_path / "img", 3)
    rows = ["filepath,title", "img/0.png,café crème", 'img/1.png,"a cat\non two lines"', 'img/2.png,"a ""quoted"" dog"']
    (tmp_path / "pairs.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    data = CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "pairs.csv"), image_size=16), "all")
    assert [text for _, text in data.pairs] == ["café crème", "a cat\non two lines", 'a "quoted" dog']
    assert [path.name for path, _ in data.pairs] == ["0.png", "1.png", "2.png"]


def test_tsv_in_utf16_with_a_byte_order_mark_is_read(tmp_path):
    write_images(tmp_path / "img", 2)
    text = "filepath\ttitle\r\nimg/0.png\tNaïve café\r\nimg/1.png\t日本の猫\r\n"
    (tmp_path / "pairs.tsv").write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    data = CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "pairs.tsv"), image_size=16), "all")
    assert [text for _, text in data.pairs] == ["Naïve café", "日本の猫"]
    (tmp_path / "big.tsv").write_bytes(b"\xfe\xff" + text.encode("utf-16-be"))
    big = CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "big.tsv"), image_size=16), "all")
    assert [text for _, text in big.pairs] == ["Naïve café", "日本の猫"]


def test_csv_in_another_encoding_is_refused_naming_the_line_and_the_byte(tmp_path):
    write_images(tmp_path / "img", 2)
    text = "filepath,title\nimg/0.png,a dog\nimg/1.png,café crème\n"
    (tmp_path / "latin.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(MaskkitError, match=r"latin.csv: not UTF-8 \(byte 0xe9 at line 3; as Latin-1 or Windows-1252 "
                                           r"it reads 'img/1.png,café crème'\); save it as UTF-8"):
        CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "latin.csv")), "all")
    (tmp_path / "wide.csv").write_bytes(text.encode("utf-16-le"))     # UTF-16 without a byte-order mark
    with pytest.raises(MaskkitError, match=r"wide.csv: .*NUL bytes.*UTF-16 without a byte-order mark"):
        CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "wide.csv")), "all")


def test_an_unclosed_quote_is_refused_instead_of_swallowing_the_rows_after_it(tmp_path):
    write_images(tmp_path / "img", 3)
    (tmp_path / "pairs.csv").write_text('filepath,title\nimg/0.png,"a cat\nimg/1.png,a dog\nimg/2.png,a bird\n')
    with pytest.raises(MaskkitError, match=r"pairs.csv: not a valid CSV file at line 2 \(unexpected end of data"):
        CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "pairs.csv")), "all")


def test_a_row_with_more_fields_than_the_header_is_skipped_and_named_not_cut(tmp_path, caplog):
    write_images(tmp_path / "img", 3)
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg/0.png,a cat\nimg/1.png,a dog, sitting\n\n"
                                        'img/2.png,"a bird, flying"\n')
    with caplog.at_level("WARNING", logger="maskkit"):
        data = CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "pairs.csv")), "all")
    assert [text for _, text in data.pairs] == ["a cat", "a bird, flying"]
    assert "skipped 1 rows with more fields than the header's 2 (the first at line 3): an unquoted comma" in caplog.text


def test_shard_captions_honour_byte_order_marks_and_refuse_other_encodings(tmp_path, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "000.tar", [("0000", {"png": png_bytes(1), "txt": "\ufeffcafé crème".encode()}),
                                     ("0001", {"png": png_bytes(2), "txt": "\ufeff日本の猫".encode("utf-16-le")})])
    write_shard(folder / "001.tar", [("0100", {"png": png_bytes(3), "txt": "crème brûlée".encode("latin-1")})])
    cfg = PairDataConfig(name="shards", path=str(folder), image_size=16, context_length=16, vocab_size=64)
    from maskkit.data.pairs import Shards

    shards = Shards(cfg, "all")
    assert [shards[i]["text"] for i in range(2)] == ["café crème", "日本の猫"]
    # A later shard's caption that is not UTF-8 is skipped like an image that does not decode, and named.
    assert shards[2].path.endswith("001.tar:0100.txt") and "byte 0xe8" in shards[2].reason
    from maskkit.data.pairs import captions_of

    assert captions_of(shards) == ["café crème", "日本の猫"]
    assert "001.tar:0100.txt" in caplog.text
    # In the first shard, which is read in full before training, it fails at once.
    write_shard(folder / "000.tar", [("0000", {"png": png_bytes(1), "txt": "crème".encode("latin-1")})])
    with pytest.raises(MaskkitError, match=r"000.tar:0000.txt: not UTF-8 \(byte 0xe8 at line 1"):
        Shards(cfg, "all")


def test_csv_from_a_european_excel_with_semicolons_is_read(tmp_path):
    """Excel writes ';' between the fields where the decimal separator is a comma; captions keep their commas."""
    write_images(tmp_path / "img", 2)
    rows = ["filepath;title", "img/0.png;a red square, small", 'img/1.png;"a blue; round disc"']
    (tmp_path / "pairs.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    data = CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "pairs.csv"), image_size=16), "all")
    assert [text for _, text in data.pairs] == ["a red square, small", "a blue; round disc"]
    # A comma-separated file whose captions hold semicolons is still read by commas.
    rows = ["filepath,title", "img/0.png,one; two", "img/1.png,three"]
    (tmp_path / "commas.csv").write_text("\n".join(rows) + "\n")
    data = CaptionFile(PairDataConfig(name="csv", path=str(tmp_path / "commas.csv"), image_size=16), "all")
    assert [text for _, text in data.pairs] == ["one; two", "three"]
