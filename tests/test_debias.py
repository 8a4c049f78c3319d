"""`maskkit debias`: the projection it writes is the method's on the model's own embeddings (a Hugging Face CLIP
directory against CLIPModel's features, a maskkit FLIP run on the biased shapes world), what DIR holds, the
world's groups, and bad input in one line each."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from maskkit.analysis.debias import apply, spurious_projection, zero_shot_predictions
from maskkit.cli import main
from maskkit.config import config_from_dict
from maskkit.data.shapes import BIAS_CLASSES, BiasedShapes
from maskkit.debias import attribute_pairs, debias
from tests.methods.test_flip import flip_config_dict

transformers = pytest.importorskip("transformers")

# Tokens of the tiny CLIP's vocabulary (64 ids): end-of-text ([SEP]) takes the largest id, so CLIPModel's
# pooling (the largest id when eos_token_id == 2) and maskkit's (the last real token) read the same token.
WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "grass", "water", "in", "sand", "snow"]


def clip_directory(tmp_path):
    from tests.interop.test_hf_clip import random_clip

    clip = random_clip(seed=5)
    directory = tmp_path / "clip"
    clip.save_pretrained(directory)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[MASK]", *WORDS]
    vocab += [f"[unused{i}]" for i in range(63 - len(vocab))] + ["[SEP]"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return clip, tokenizer, directory, mean, std


def eval_folder(tmp_path, classes=("cat", "dog"), groups=("grass", "water"), per_group=2):
    from PIL import Image

    folder = tmp_path / "eval"
    folder.mkdir()
    rows, generator = ["filepath,class,group"], torch.Generator().manual_seed(0)
    for name in classes:
        for group in groups:
            for k in range(per_group):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{name}_{group}_{k}.png")
                rows.append(f"{name}_{group}_{k}.png,{name},{group}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_hugging_face_clip_directory_gets_the_projection_of_its_own_text_features(tmp_path, capsys):
    clip, tokenizer, directory, mean, std = clip_directory(tmp_path)
    folder = eval_folder(tmp_path)
    spurious = ["a photo of grass", "a photo of water", "the sand", "snow"]
    out = tmp_path / "out"
    assert main(["debias", str(directory), "--classes", "cat", "dog", "--template", "a photo of a {}",
                 "--template", "the {}", "--spurious", *spurious, "--mode", "projection", "--eval", str(folder),
                 "--out", str(out)]) == 0
    assert "worst group" in capsys.readouterr().out

    def features(texts):
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        output = output if torch.is_tensor(output) else output.pooler_output
        return F.normalize(output.double(), dim=-1)

    expected_p0 = spurious_projection(features(spurious))
    written = load_file(out / "projection.safetensors")["projection"]
    # Tolerance: the embeddings come from float32 towers (maskkit's and HF's kernels round differently, ~1e-6 of
    # unit vectors); P0 is well-conditioned in them (4 random directions), so P0 moves by about as much.
    torch.testing.assert_close(written, expected_p0, atol=1e-5, rtol=0)
    classes = torch.stack([F.normalize(features([f"a photo of a {c}", f"the {c}"]).mean(0), dim=-1) for c in ("cat", "dog")])
    from maskkit.data.images import ImageFolder

    report = json.loads((out / "report.json").read_text())
    images = torch.stack([ImageFolder.load(folder / f"{c}_{g}_{k}.png", 32, 3) for c in ("cat", "dog")
                          for g in ("grass", "water") for k in range(2)])
    normalised = (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        image_output = clip.get_image_features(pixel_values=normalised)
    image_features = image_output if torch.is_tensor(image_output) else image_output.pooler_output
    labels = torch.tensor([0] * 4 + [1] * 4)
    for name, q in (("before", classes), ("projection", apply(classes, expected_p0))):
        accuracy = zero_shot_predictions(image_features, q).eq(labels).double().mean().item()
        assert report["results"][name]["average"] == pytest.approx(accuracy)
    assert report["groups"] == ["grass", "water"] and report["spurious_rank"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "projection.safetensors", "report.json"]
    # The calibrated P of a pairs file (pairs by index and by text) is P0 (lambda M + I)^-1 of CLIPModel's features.
    prompts = ["a photo of a cat on grass", "a photo of a cat on water", "the dog in snow", "the dog on sand"]
    (tmp_path / "pairs.json").write_text(json.dumps({"prompts": prompts, "pairs": [[0, 1], ["the dog in snow", 3]]}))
    assert main(["debias", str(directory), "--classes", "cat", "dog", "--spurious", *spurious, "--pairs",
                 str(tmp_path / "pairs.json"), "--lam", "10", "--eval", str(folder), "--out", str(tmp_path / "cal")]) == 0
    from maskkit.analysis.debias import calibrated_projection, pair_matrix

    expected = calibrated_projection(expected_p0, pair_matrix(features(prompts), [(0, 1), (2, 3)]), 10.0)
    written = load_file(tmp_path / "cal" / "projection.safetensors")["projection"]
    # lambda 10 scales the towers' float32 differences by up to lambda; measured 2026-12-03 on Intel: 4.0e-7 under
    # ATEN_CPU_CAPABILITY=default, 4.6e-7 under avx2; 1e-5 leaves a factor of 20 for other processors' kernels.
    torch.testing.assert_close(written, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "cal" / "lambda_sweep.png").is_file()


def flip_run(tmp_path, steps: int = 2):
    from maskkit.train.loop import train

    cfg = config_from_dict(flip_config_dict(data={"name": "biased-shapes", "num_samples": 64},
                                            model={"unmasked_steps": 0},
                                            train={"steps": steps, "checkpoint_every": steps}))
    train(cfg, tmp_path / "flip", progress=False)
    return tmp_path / "flip"


def test_a_flip_run_on_the_biased_world_uses_its_defaults_and_writes_the_calibrated_projection(tmp_path, capsys):
    run = flip_run(tmp_path)
    assert (run / "tokenizer.json").is_file()             # pair runs pin their vocabulary
    report = debias(str(run), tmp_path / "out", lam=10.0)
    assert report["classes"] == list(BIAS_CLASSES) and report["groups"] == ["green", "blue"]
    assert set(report["results"]) == {"before", "projection", "calibrated", "calibration", "random_projection"}
    # 1024 group-balanced test images: 256 per group.
    assert report["results"]["before"]["counts"] == {f"{c} / {g}": 256 for c in BIAS_CLASSES for g in ("green", "blue")}
    assert [row["lam"] for row in report["lambda_sweep"]] == [0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    for row in report["lambda_sweep"]:
        if row["lam"] == 0.0:                              # lambda = 0: calibrated is the projection
            assert row["calibrated"] == report["results"]["projection"]
        if row["lam"] == 10.0:
            assert row["calibrated"] == report["results"]["calibrated"]
    assert 0.0 <= report["balanced_linear_probe"]["worst_group"] <= 1.0
    assert (tmp_path / "out" / "lambda_sweep.png").is_file()
    assert load_file(tmp_path / "out" / "projection.safetensors")["projection"].dtype == torch.float64


def test_attribute_pairs_pair_each_class_and_template_across_the_attributes():
    prompts, pairs = attribute_pairs(["cat", "dog"], ["a {}", "the {}"], ["on grass", "on water", "in snow"])
    assert prompts[:3] == ["a cat on grass", "a cat on water", "a cat in snow"] and prompts[3] == "the cat on grass"
    assert len(prompts) == 12 and len(pairs) == 12
    assert pairs[:3] == [(0, 1), (0, 2), (1, 2)]
    assert all(prompts[i].split(" on ")[0].split(" in ")[0] == prompts[j].split(" on ")[0].split(" in ")[0]
               for i, j in pairs)


def test_the_biased_world_is_correlated_in_training_and_balanced_for_evaluation():
    train = BiasedShapes("train", 4000, 16, correlation=0.95, other=0.5)
    described = [train.describe(i) for i in range(len(train))]
    classes = [(y, a) for y, a, _, _ in described if y >= 0]
    others = [a for y, a, _, _ in described if y < 0]
    usual = sum(y == a for y, a in classes) / len(classes)
    assert usual == pytest.approx(0.95, abs=0.015)           # 2,000 draws: 3 standard errors
    assert len(others) / len(described) == pytest.approx(0.5, abs=0.04)
    assert sum(others) / len(others) == pytest.approx(0.5, abs=0.05)    # other kinds on either background
    test = BiasedShapes("test", 4000, 16)
    groups = [(int(test[i]["label"]), int(test[i]["group"])) for i in range(len(test))]
    assert {g: groups.count(g) for g in set(groups)} == {(0, 0): 250, (0, 1): 250, (1, 0): 250, (1, 1): 250}
    item = test[3]                                            # y = 1, a = 1: a cross on blue
    assert item["text"].split(" on ")[0].endswith("cross") and item["text"].endswith("blue background") in (True, False)
    assert item["images"][2].mean() > item["images"][1].mean()   # blue background
    assert torch.equal(test[3]["images"], BiasedShapes("test", 4000, 16)[3]["images"])


def test_bad_input_fails_in_one_line(tmp_path, capsys, tiny_config):
    from maskkit.train.loop import train

    clip, _, directory, _, _ = clip_directory(tmp_path)
    folder = eval_folder(tmp_path)
    base = ["debias", str(directory), "--classes", "cat", "dog", "--spurious", "grass", "water", "--eval", str(folder)]
    capsys.readouterr()                                  # save_pretrained's progress bar

    def fails(arguments, message):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert main([*arguments, "--out", str(out)]) == 2, arguments
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"prompts": ["a cat on grass", "a cat on water"], "pairs": [[0, "a cat in snow"]]}))
    fails([*base, "--pairs", str(pairs)], "pair 1 names 'a cat in snow', which is not one of its 2 prompts")
    pairs.write_text(json.dumps({"prompts": ["a cat on grass", "a cat on water"], "pairs": [[0, 2]]}))
    fails([*base, "--pairs", str(pairs)], "pair 1 names 2, which is not one of its 2 prompts")
    pairs.write_text("{not json")
    fails([*base, "--pairs", str(pairs)], "not valid JSON")
    fails([*base[:5], "--spurious", "grass", "grass", "--eval", str(folder), "--mode", "projection"],
          "rank-deficient (rank 1 of 2 prompts): prompt 2 ('grass')")
    fails([*base, "--mode", "calibrated"], "needs positive pairs: --pairs F, or --attributes")
    fails([*base, "--mode", "both"], "--mode 'both': choose from projection, calibrated, calibration")
    fails([*base, "--mode", "projection", "--lam", "nan"], "must be a finite number >= 0")
    fails([*base, "--mode", "projection", "--template", "a photo"], "needs exactly one {}")
    fails([*base[:3], "cat", "--spurious", "grass", "--eval", str(folder)], "two or more distinct class names")
    fails([*base[:3], "cat", "cow", "--spurious", "grass", "--eval", str(folder), "--mode", "projection"],
          "class 'dog' is not among --classes (cat, cow)")
    (folder / "metadata.csv").write_text("filepath,class\ncat_grass_0.png,cat\n")
    fails([*base, "--mode", "projection"], "metadata.csv: no group labels; its columns are ['filepath', 'class']")
    (folder / "metadata.csv").unlink()
    fails([*base, "--mode", "projection"], "no metadata.csv with the columns filepath, class, group")
    fails([*base[:2], "--classes", "cat", "dog", "--spurious", "grass", "--mode", "projection"], "give the evaluation set")
    train(tiny_config(train={"steps": 1}), tmp_path / "mae", progress=False)
    fails(["debias", str(tmp_path / "mae"), "--eval", "biased-shapes"], "a mae run has no text tower")
    fails(["debias", "minilm", "--eval", "biased-shapes"], "not a two-tower model")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main([*base, "--mode", "projection", "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert clip is not None


def test_an_empty_spurious_set_is_refused(tmp_path):
    from maskkit.errors import MaskkitError

    run = flip_run(tmp_path, steps=1)
    with pytest.raises(MaskkitError, match="--classes square circle: the biased shapes world's classes are circle cross"):
        debias(str(run), tmp_path / "o1", classes=["square", "circle"])
    from maskkit.analysis.debias import spurious_basis

    with pytest.raises(MaskkitError, match="the spurious prompt set is empty"):
        spurious_basis(torch.zeros(0, 16))


def test_a_spreadsheet_metadata_file_reads_like_a_plain_one_and_a_broken_image_is_left_out(tmp_path, caplog):
    _, _, directory, _, _ = clip_directory(tmp_path)
    folder = eval_folder(tmp_path)
    arguments = dict(classes=["cat", "dog"], spurious=["grass", "water"], mode="projection", evaluation=str(folder))
    plain = debias(str(directory), tmp_path / "plain", **arguments)
    rows = (folder / "metadata.csv").read_text().splitlines()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append("broken.png,cat,grass")
    # Excel's "CSV UTF-16" with a byte-order mark, semicolons and CRLF line ends.
    (folder / "metadata.csv").write_bytes("\r\n".join(r.replace(",", ";") for r in rows).encode("utf-16"))
    with caplog.at_level("WARNING", logger="maskkit"):
        sheet = debias(str(directory), tmp_path / "sheet", **arguments)
    assert "1 unreadable images left out, e.g." in caplog.text and "broken.png" in caplog.text
    assert sheet["results"] == plain["results"] and sheet["evaluation"].endswith("(8 images)")


@pytest.mark.parametrize("key, value", [("spurious_correlation", 1.5), ("spurious_correlation", float("nan")),
                                        ("background_mention", -0.1), ("other_kinds", 1.0), ("world_seed", -1)])
def test_bad_values_of_the_biased_world_are_refused_by_name(key, value):
    from maskkit.errors import MaskkitError

    with pytest.raises(MaskkitError, match=f"data.{key}"):
        config_from_dict(flip_config_dict(data={"name": "biased-shapes", key: value}))


def test_training_on_the_biased_world_resumes_bitwise_across_an_epoch(tmp_path):
    from tests.helpers import assert_bitwise_equal, resumed_and_straight

    # 64 images in batches of 16: an epoch is 4 steps; stopped at 3, resumed to 6.
    cfg = config_from_dict(flip_config_dict(data={"name": "biased-shapes", "num_samples": 64, "world_seed": 3},
                                            model={"unmasked_steps": 1}, train={"steps": 6, "checkpoint_every": 3}))
    straight, resumed = resumed_and_straight(cfg, tmp_path, stop_at=3)
    assert_bitwise_equal(straight, resumed)
