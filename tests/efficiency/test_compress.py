"""`maskkit compress`: a structurally pruned model computes what the original computes with those heads / neurons
masked, densify (for exports) changes nothing, the int8 layer matches torchao's scheme, a compressed run loads,
evaluates and exports, and bad amounts are one line each."""

import copy
import json

import pytest
import torch
from torch import nn

from maskkit.cli import main
from maskkit.config import config_from_dict
from maskkit.efficiency.compress import heads_to_keep, load_compressible, neurons_to_keep, prune_unstructured
from maskkit.eval import evaluate
from maskkit.eval.run import method_from_checkpoint
from maskkit.nn.pruning import densify, keep_heads, keep_neurons, record_shapes
from maskkit.nn.quantized import Int8Linear, quantize_linears
from maskkit.nn.transformer import TextConfig, TextTransformer, ViT, ViTConfig
from maskkit.train.checkpoint import find_checkpoint
from maskkit.train.loop import train

TINY = {
    "method": "mae",
    "model": {"encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "num_heads": 4},
              "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
    "data": {"name": "digits", "image_size": 16},
    "train": {"steps": 2, "batch_size": 16},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("compress") / "run"
    train(config_from_dict(TINY), run, progress=False)
    return run


def _text_model() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextConfig(vocab_size=50, context_length=12, dim=32, depth=2, num_heads=4, post_norm=True,
                                      embedding_norm=True, norm_eps=1e-12)).eval()


@pytest.mark.parametrize("kind", ["vit", "text"])
def test_pruned_model_equals_the_original_with_those_heads_and_neurons_masked(kind):
    if kind == "vit":
        torch.manual_seed(0)
        model, example = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=2, num_heads=4)).eval(), (
            torch.rand(3, 3, 16, 16),)
    else:
        model, example = _text_model(), (torch.randint(0, 50, (3, 12)),)
    heads, neurons = [[0, 3], [1, 2, 3]], [list(range(0, 128, 2)), list(range(100))]
    masked = copy.deepcopy(model)
    for block, kept_heads, kept_neurons in zip(masked.blocks, heads, neurons, strict=True):
        block.attn.head_gate = torch.zeros(4).index_fill(0, torch.tensor(kept_heads), 1.0)
        block.mlp.neuron_gate = torch.zeros(128).index_fill(0, torch.tensor(kept_neurons), 1.0)
    for block, kept_heads, kept_neurons in zip(model.blocks, heads, neurons, strict=True):
        keep_heads(block.attn, kept_heads)
        keep_neurons(block.mlp, kept_neurons)
    record_shapes(model)
    assert model.cfg.layer_heads == [2, 3] and model.cfg.layer_hidden == [64, 100]
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 32) and model.blocks[1].mlp.fc2.weight.shape == (32, 100)
    with torch.no_grad():
        expected, pruned = masked(*example), model(*example)
        torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
        rebuilt = type(model)(copy.deepcopy(model.cfg)).eval()           # the config alone describes the shapes
        rebuilt.load_state_dict(model.state_dict())
        torch.testing.assert_close(rebuilt(*example), expected, rtol=1e-5, atol=1e-5)
        densify(rebuilt)                                                   # back to 4 heads, 128 neurons, zeros
        assert rebuilt.cfg.layer_heads == [] and rebuilt.blocks[0].attn.num_heads == 4
        assert rebuilt.blocks[0].mlp.fc1.out_features == 100          # widest pruned layer, as mlp_ratio 100/32
        torch.testing.assert_close(rebuilt(*example), expected, rtol=1e-5, atol=1e-5)


def test_int8_linear_matches_torchao_and_stays_near_float():
    torchao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    ours = Int8Linear.from_linear(linear)
    theirs = copy.deepcopy(linear)
    torchao.quantize_(theirs, torchao.Int8DynamicActivationInt8WeightConfig())
    with torch.no_grad():
        exact, mine, reference = linear(x), ours(x), theirs(x)
    scale = exact.abs().max()
    assert (mine - exact).abs().max() < 0.02 * scale                 # int8 error, relative to the outputs' size
    # torchao's scheme: the same int8 weights (to one step: its range is -128..127, ours symmetric) and scales,
    # and an error of the same size
    assert (theirs.weight.qdata.int() - ours.weight_int8.t().int()).abs().max() <= 1
    torch.testing.assert_close(theirs.weight.scale.flatten(), ours.weight_scale, rtol=5e-3, atol=0)   # absmax/127.5 vs /127
    assert (mine - exact).abs().max() < 1.5 * (reference - exact).abs().max()
    assert ours.weight_int8.dtype == torch.int8 and ours.weight_int8.abs().max() == 127


def test_importance_ranking_keeps_one_head_per_layer_and_the_strongest_neurons():
    scores = [torch.tensor([0.1, 0.2, 5.0]), torch.tensor([1.0, 1.0, 1.0])]
    # normalised: layer 0 (0.02, 0.04, 1.0), layer 1 (0.58 each): the two weak heads of layer 0 go first
    assert heads_to_keep(scores, 2) == [[2], [0, 1, 2]]
    assert heads_to_keep(scores, 4) == [[2], [2]]                    # layer 0 keeps its last head
    assert neurons_to_keep([torch.tensor([3.0, 1.0, 2.0, 0.5])], 0.5) == [[0, 2]]


def test_unstructured_pruning_reaches_its_sparsity_and_zeroes_the_smallest():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=4))
    weights = torch.cat([m.weight.detach().abs().flatten() for m in model.blocks.modules() if isinstance(m, nn.Linear)])
    threshold = weights.kthvalue(int(0.6 * len(weights))).values
    assert prune_unstructured(model, 0.6) == pytest.approx(0.6, abs=1e-3)
    survivors = torch.cat([m.weight.detach().abs().flatten() for m in model.blocks.modules() if isinstance(m, nn.Linear)])
    assert survivors[survivors > 0].min() > threshold


def test_compressed_runs_load_evaluate_and_export(run_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    pruned, quantized = tmp_path / "pruned", tmp_path / "int8"
    assert main(["compress", str(run_dir), "--prune-heads", "3", "--batches", "2", "--repeats", "2", "--batch", "4",
                 "--out", str(pruned)]) == 0
    report = json.loads((pruned / "compress.json").read_text())
    assert sum(len(k) for k in report["kept"]) == 8 - 3 and report["ratios"]["parameters"] < 1
    method, cfg = method_from_checkpoint(find_checkpoint(pruned))
    assert sum(cfg.model.encoder.layer_heads) == 5
    assert report["after"]["quality"]["metric"] == "knn accuracy"
    assert main(["compress", str(pruned), "--quantize", "int8", "--repeats", "2", "--batch", "4",
                 "--out", str(quantized)]) == 0
    method, cfg = method_from_checkpoint(find_checkpoint(quantized))
    assert cfg.model.encoder.quantize == "int8" and isinstance(method.encoder.blocks[0].attn.qkv, Int8Linear)
    result = evaluate(quantized, "knn", progress=False)
    assert result["pretrained"] == pytest.approx(json.loads((quantized / "compress.json").read_text())
                                                 ["after"]["quality"]["value"])
    assert main(["export", str(quantized), "--to", "hf", str(tmp_path / "hf")]) == 0
    from maskkit.interop.hf import load_hf_vitmae

    exported = load_hf_vitmae(tmp_path / "hf").encoder.eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        dense = densify(copy.deepcopy(method.encoder)).eval()
        torch.testing.assert_close(exported(images), dense(images), rtol=1e-4, atol=1e-4)
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--prune-heads", "7"], "remove 1 to 6"),                     # 8 heads in 2 layers: one must stay in each
    (["--prune-heads", "0"], "remove 1 to 6"),
    (["--prune-ffn", "-0.1"], "in (0, 1)"),
    (["--prune-ffn", "1.0"], "in (0, 1)"),
    (["--prune-unstructured", "1.5"], "in (0, 1)"),
    (["--quantize", "int4"], "the one scheme is int8"),
])
def test_bad_amounts_are_one_line_and_write_nothing(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["compress", str(run_dir), *args, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_not_a_model_and_an_int8_model_pruned_are_refused(tmp_path, capsys):
    assert main(["compress", str(tmp_path), "--quantize", "int8", "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    model = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, depth=1, num_heads=4))
    quantize_linears(model.blocks)
    with pytest.raises(Exception, match="prune a model before quantizing"):
        keep_heads(model.blocks[0].attn, [0])


def test_load_compressible_finds_the_deployed_model(run_dir):
    c = load_compressible(run_dir)
    assert c.backbone is c.method.encoder and isinstance(c.model, ViT)


def test_pareto_front_and_plot(run_dir, tmp_path, capsys):
    from maskkit.efficiency.pareto import front

    rows = [{"quality": 0.9, "latency_ms": 10.0}, {"quality": 0.8, "latency_ms": 5.0},
            {"quality": 0.7, "latency_ms": 6.0}, {"quality": 0.9, "latency_ms": 12.0}]
    assert front(rows, "latency_ms") == [0, 1]                       # 2 is beaten by 1, 3 by 0
    sparse = tmp_path / "sparse"
    assert main(["compress", str(run_dir), "--prune-unstructured", "0.5", "--repeats", "2", "--batch", "4",
                 "--out", str(sparse)]) == 0
    assert main(["pareto", str(run_dir), str(sparse), "--repeats", "2", "--batch", "4", "--out", str(tmp_path / "p"),
                 "--names", "MAE", "MAE, half the weights zero"]) == 0
    table = json.loads((tmp_path / "p" / "pareto.json").read_text())
    assert [r["run"] for r in table] == [str(run_dir), str(sparse)] and (tmp_path / "p" / "pareto.png").stat().st_size
    assert [r["name"] for r in table] == ["MAE", "MAE, half the weights zero"]
    assert "MAE, half the weights zero" in capsys.readouterr().out
    assert main(["pareto", str(run_dir), str(sparse), "--names", "one", "--out", str(tmp_path / "q")]) == 2
    assert "--names has 1 label for 2 runs" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert table[1]["quality"] == json.loads((sparse / "compress.json").read_text())["after"]["quality"]["value"]
    capsys.readouterr()
