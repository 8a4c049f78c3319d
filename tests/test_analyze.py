"""`maskkit analyze`: golden MiniLM values on five fixed sentences, what DIR holds (maps, vectors that sum to the
model's hidden states, plots), and bad input in one line each."""

import json

import pytest
import torch
from safetensors.torch import load_file

from maskkit.analyze import analyze
from maskkit.cli import main
from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.interop.hf_bert import minilm_dir
from tests.helpers import REAL_MODEL_PARITY, assert_close_at_scale

transformers = pytest.importorskip("transformers")
FIVE = ["A cat sat on the mat.", "Paris is the capital and most populous city of France.",
        "Tokenization splits unbelievably long words into several pieces.",
        "Albert Einstein developed the theory of relativity in Switzerland.", "The river flows north into the sea."]
# float64 on 2026-12-02 (maskkit analyze minilm --float64 on FIVE): per layer, the mixing ratio after attention +
# residual + norm, and the contextualization change of the feed-forward layer and of the whole feed-forward block.
GOLDEN_MIXING = [0.268696, 0.217837, 0.208619, 0.202696, 0.163046, 0.314346]
GOLDEN_FFN_CHANGE = [0.059181, 0.030794, 0.030813, 0.027992, 0.110522, 0.187496]
GOLDEN_BLOCK_CHANGE = [0.036972, 0.02276, 0.032086, 0.013441, 0.038019, 0.01757]


def test_minilm_gives_the_golden_values_and_the_feed_forward_layer_changes_more_than_its_block(tmp_path):
    summary = analyze("minilm", FIVE, tmp_path / "out", dtype=torch.float64, progress=False, heatmaps=0)
    rounded = lambda rows, key: [round(row[key], 6) for row in rows]         # noqa: E731
    assert rounded(summary["mixing_ratio"], "norm") == pytest.approx(GOLDEN_MIXING, abs=2e-6)
    assert rounded(summary["contextualization_change"], "ffn") == pytest.approx(GOLDEN_FFN_CHANGE, abs=2e-6)
    assert rounded(summary["contextualization_change"], "feed-forward block") == pytest.approx(GOLDEN_BLOCK_CHANGE,
                                                                                              abs=2e-6)
    # The 2024 paper's cancellation: the residual and norm after the feed-forward layer undo most of its change.
    assert sum(GOLDEN_FFN_CHANGE) > 2 * sum(GOLDEN_BLOCK_CHANGE)


def test_the_folder_holds_maps_vectors_that_sum_to_the_hidden_states_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "minilm", "--text", FIVE[1], "--text", FIVE[2], "--out", str(out), "--save-vectors",
                 "--no-progress"]) == 0
    assert "analyzed 2 text(s) through all-MiniLM-L6-v2" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    tokens = json.loads((out / "tokens.json").read_text(encoding="utf-8"))
    assert tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]" and summary["texts"][1]["tokens"] == tokens[1]
    assert len(summary["mixing_ratio"]) == 6 and summary["stages"][-1] == "ffn_norm"
    vectors, maps = load_file(out / "contributions.safetensors"), load_file(out / "maps.safetensors")
    n = len(tokens[0])
    assert vectors["t0.layer5.ffn_norm"].shape == (n, n + 1, 384) and maps["t0.layer5.ffn_norm"].shape == (n, n + 1)
    assert_close_at_scale(vectors["t0.layer2.attention"].norm(dim=-1), maps["t0.layer2.attention"], 1e-6)
    hf = transformers.BertModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    with torch.no_grad():
        hidden = hf(input_ids=torch.tensor([hf_ids(tokens[0])]), output_hidden_states=True).hidden_states
    assert_close_at_scale(vectors["t0.layer5.ffn_norm"].sum(1), hidden[6][0], REAL_MODEL_PARITY)
    for name in ("mixing_ratio.png", "contextualization_change.png", "heatmaps/text0.png", "heatmaps/text1.png"):
        assert (out / name).stat().st_size > 1000, name
    for pair in summary["ffn_amplified_pairs"]:
        assert pair["target"] != pair["source"] and "[CLS]" not in (pair["target_token"], pair["source_token"])


def hf_ids(tokens: list[str]) -> list[int]:
    backend = Tokenizer.from_file(minilm_tokenizer_file(), 512).backend
    return [backend.token_to_id(t) for t in tokens]


def test_bad_input_fails_in_one_line(tmp_path, capsys, tiny_config):
    from maskkit.train.loop import train

    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Café crème in Zürich.\n".encode("latin-1"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep", encoding="utf-8")
    train(tiny_config(train={"steps": 1}), tmp_path / "mae", progress=False)
    out = str(tmp_path / "out")
    cases = [
        (["minilm", "--text", "word " * 600, "--out", out], "text 1 is 602 tokens long, more than the model's 512"),
        (["minilm", "--text-file", str(tmp_path / "empty.txt"), "--out", out], "holds no text"),
        (["minilm", "--text-file", str(tmp_path / "latin1.txt"), "--out", out], "is not UTF-8 (byte 3)"),
        (["minilm", "--text-file", str(tmp_path / "missing.txt"), "--out", out], "no such file"),
        (["minilm", "--out", out], "give a text"),
        ([str(tmp_path / "nowhere"), "--text", "x", "--out", out], "not a model"),
        ([str(tmp_path / "mae"), "--text", "x", "--out", out], "has no decomposition"),
        (["minilm", "--text", "x", "--out", str(tmp_path / "full")], "exists and is not empty"),
        (["minilm", "--text", "x", "--out", out, "--chunk", "0"], "--chunk 0"),
    ]
    for arguments, message in cases:
        assert main(["analyze", *arguments, "--no-progress"]) == 2, arguments
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "mine.txt").read_text(encoding="utf-8") == "keep"
