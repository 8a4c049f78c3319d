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
    assert main(["analyze", "minilm", "--text", FIVE[1], "--text", FIVE[0], "--out", str(out), "--save-vectors",
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
        (["minilm", "--out", out], "give texts"),
        ([str(tmp_path / "nowhere"), "--text", "x", "--out", out], "not a model"),
        (["minilm", "--image", str(tmp_path / "empty.txt"), "--out", out], "reads texts: give --text"),
        ([str(tmp_path / "mae"), "--image", str(tmp_path / "empty.txt"), "--out", out], "not a readable image"),
        ([str(tmp_path / "mae"), "--image", str(tmp_path / "nowhere"), "--out", out], "no such file or folder"),
        (["minilm", "--text", "x", "--image", str(tmp_path / "empty.txt"), "--out", out], "one of the two"),
        (["minilm", "--text", "x", "--out", str(tmp_path / "full")], "exists and is not empty"),
        (["minilm", "--text", "x", "--out", out, "--chunk", "0"], "--chunk 0"),
    ]
    for arguments, message in cases:
        assert main(["analyze", *arguments, "--no-progress"]) == 2, arguments
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and (tmp_path / "full" / "mine.txt").read_text(encoding="utf-8") == "keep"


def random_png(path, size: int, seed: int):
    from PIL import Image

    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return pixels.permute(2, 0, 1).double() / 255


def test_a_hugging_face_clip_image_tower_decomposes_into_its_hidden_states_with_its_own_normalisation(tmp_path, capsys):
    from tests.interop.test_hf_clip import random_clip

    clip = random_clip(seed=3)
    clip.save_pretrained(tmp_path / "clip")
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}),
                                                                 encoding="utf-8")
    (tmp_path / "images").mkdir()
    pixels = [random_png(tmp_path / "images" / f"{n}.png", 32, n) for n in range(2)]
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "clip"), "--image", str(tmp_path / "images"), "--out", str(out),
                 "--save-vectors", "--float64", "--no-progress"]) == 0
    assert "analyzed 2 image(s) through Hugging Face clip" in capsys.readouterr().out
    summary, vectors = json.loads((out / "summary.json").read_text(encoding="utf-8")), load_file(out / "contributions.safetensors")
    assert summary["input"] == "images" and summary["texts"][1]["image"].endswith("1.png")
    assert summary["texts"][0]["tokens"][:3] == ["[CLS]", "p0,0", "p0,1"] and len(summary["texts"][0]["tokens"]) == 17
    normalised = (pixels[1] - torch.tensor(mean).view(3, 1, 1).double()) / torch.tensor(std).view(3, 1, 1).double()
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=normalised[None].float(), output_hidden_states=True).hidden_states
    for layer in range(2):        # every layer's parts sum to CLIP's own hidden state after it (fp64 sums, fp32 HF)
        assert_close_at_scale(vectors[f"t1.layer{layer}.ffn_residual"].sum(1), hidden[layer + 1][0], REAL_MODEL_PARITY)
    assert all("[CLS]" not in (p["target_token"], p["source_token"]) for p in summary["ffn_amplified_pairs"])


def test_a_maskkit_image_run_is_read_with_its_data_normalisation_and_refuses_texts(tmp_path, capsys, tiny_config):
    from maskkit.eval.run import method_from_checkpoint
    from maskkit.train.checkpoint import find_checkpoint
    from maskkit.train.loop import train

    train(tiny_config(train={"steps": 1}, data={"mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7]}), tmp_path / "mae",
          progress=False)
    pixels = random_png(tmp_path / "one.png", 16, 0)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "mae"), "--image", str(tmp_path / "one.png"), "--out", str(out),
                 "--save-vectors", "--no-progress"]) == 0
    vit = method_from_checkpoint(find_checkpoint(tmp_path / "mae"))[0].backbone.eval()
    normalised = (pixels.float() - torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(3, 1, 1)
    last = []
    vit.blocks[-1].register_forward_hook(lambda module, args, output: last.append(output))
    with torch.no_grad():
        vit(normalised[None])                       # the real forward pass: its last block's output
    vectors = load_file(out / "contributions.safetensors")
    assert_close_at_scale(vectors["t0.layer1.ffn_residual"].sum(1), last[0][0], 1e-5)
    assert main(["analyze", str(tmp_path / "mae"), "--text", "a cat", "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "reads images: give --image" in capsys.readouterr().err


def test_a_hugging_face_vit_mae_directory_is_read_with_imagenet_normalisation(tmp_path, tiny_config):
    from maskkit.interop.hf import save_hf_vitmae
    from maskkit.methods import build_method

    mae = build_method(tiny_config()).eval()
    save_hf_vitmae(mae, tmp_path / "vitmae")
    pixels = random_png(tmp_path / "one.png", 16, 4)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "vitmae"), "--image", str(tmp_path / "one.png"), "--out", str(out),
                 "--save-vectors", "--no-progress"]) == 0
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    last = []
    mae.encoder.blocks[-1].register_forward_hook(lambda module, args, output: last.append(output))
    with torch.no_grad():
        mae.encoder(((pixels.float() - mean) / std)[None])
    assert_close_at_scale(load_file(out / "contributions.safetensors")["t0.layer1.ffn_residual"].sum(1), last[0][0], 1e-5)
