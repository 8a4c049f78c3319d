"""`maskkit profile`: each number against a direct computation (parameter counts against numel and HF's
num_parameters() for the real MiniLM, FLOPs of a Linear and of an attention block against their formulas, peak
activation memory of a known chain), and bad input in one line each."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from maskkit.cli import main
from maskkit.efficiency.models import load_profiled
from maskkit.efficiency.profile import (
    LiveActivations,
    activation_peak,
    flops_per_example,
    parameter_counts,
    percentile,
    profile_model,
    safetensors_bytes,
)
from maskkit.nn.transformer import Block

transformers = pytest.importorskip("transformers")


def test_minilm_parameter_counts_match_hugging_face(tmp_path):
    from maskkit.interop.hf_bert import minilm_dir

    hf = transformers.BertModel.from_pretrained(minilm_dir(), local_files_only=True)
    profiled = load_profiled("minilm", length=16)
    total, trainable, without = parameter_counts(profiled.module, profiled.embedding_tables)
    assert total == hf.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert trainable == total
    assert without == total - hf.embeddings.word_embeddings.weight.numel() == total - 30522 * 384


def test_flops_of_a_linear_and_of_an_attention_block_follow_their_formulas():
    linear = nn.Linear(64, 48)
    x = torch.randn(8, 10, 64)
    assert flops_per_example(linear, (x,), 8) == 2 * 10 * 64 * 48            # a multiply-add is 2 FLOPs
    dim, heads, length, ratio = 32, 4, 12, 4.0
    block = Block(dim, heads, mlp_ratio=ratio).eval()
    tokens = torch.randn(3, length, dim)
    projections = 2 * length * dim * (3 * dim) + 2 * length * dim * dim      # qkv and the output projection
    attention = 2 * 2 * length * length * dim                                # scores Q K^T and the weighted sum
    mlp = 2 * 2 * length * dim * int(dim * ratio)
    assert flops_per_example(block, (tokens,), 3) == projections + attention + mlp


def test_peak_activation_memory_of_a_chain_is_the_largest_pair_alive():
    chain = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(32, 16)
    with torch.inference_mode():
        peak = activation_peak(chain, (x,))
    # Linear 1's output (32 x 256 floats) is alive while ReLU writes its own (32 x 256); then Linear 2's (32 x 8).
    assert peak == 2 * 32 * 256 * 4
    inplace = nn.Sequential(nn.Linear(16, 256), nn.ReLU(inplace=True), nn.Linear(256, 8)).eval()
    with torch.inference_mode():
        assert activation_peak(inplace, (x,)) == 32 * 256 * 4 + 32 * 8 * 4    # ReLU in place adds nothing
    mode = LiveActivations()
    with mode:
        y = x.view(-1) * 2                            # one new storage, a view of it, released when both are gone
        z = y.view(32, 16)
    assert mode.peak == 32 * 16 * 4 and mode.current == 32 * 16 * 4
    del y, z
    assert mode.current == 0


def test_size_percentiles_and_the_footprint_of_a_small_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    assert safetensors_bytes(model) >= (16 * 32 + 32 + 32 * 4 + 4) * 4
    assert safetensors_bytes(model) < (16 * 32 + 32 + 32 * 4 + 4) * 4 + 1024   # the header is small
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    assert percentile(values, 0.9) == pytest.approx(np.percentile(values, 90))
    assert percentile(values, 0.5) == pytest.approx(np.median(values))
    footprint = profile_model(model, lambda n: (torch.randn(n, 16),), batch=8, warmup=1, repeats=5)
    assert footprint.parameters == 16 * 32 + 32 + 32 * 4 + 4 and footprint.flops_per_example == 2 * (16 * 32 + 32 * 4)
    assert footprint.latency_ms_p90 >= footprint.latency_ms_median > 0 and footprint.throughput_per_s > 0
    assert footprint.peak_memory_bytes == footprint.activation_peak_bytes + 4 * footprint.parameters


def test_a_compiled_profile_times_a_frozen_graph_of_the_same_model_and_leaves_the_settings_alone():
    import torch._inductor.config

    from maskkit.nn.quantized import Int8Linear

    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    model[2] = Int8Linear.from_linear(model[2])                 # what compress --quantize int8 --compile profiles
    calls = []
    original = torch._inductor.config.freezing

    def forward(x):
        calls.append(torch._inductor.config.freezing)           # read while dynamo traces (and while eager runs)
        return model(x)

    footprint = profile_model(model, lambda n: (torch.randn(n, 16),), batch=8, warmup=1, repeats=3, forward=forward,
                              compile=True)
    eager = profile_model(model, lambda n: (torch.randn(n, 16),), batch=8, warmup=1, repeats=3)
    assert footprint.compiled and not eager.compiled and footprint.flops_per_example == eager.flops_per_example
    assert True in calls and torch._inductor.config.freezing == original
    assert footprint.latency_ms_median > 0 and footprint.throughput_per_s > 0


def test_the_cli_profiles_minilm_and_a_maskkit_run_and_writes_json(tmp_path, capsys, tiny_config):
    from maskkit.train.loop import train

    assert main(["profile", "minilm", "--length", "16", "--batch", "2", "--repeats", "3",
                 "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "GFLOP/ex" in out
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["parameters"] == 22713216 and record["input"] == "16 tokens"
    # MiniLM at 16 tokens: 6 layers of 2 * 16 * (4 * 384^2 + 2 * 384 * 1536) + attention 4 * 16^2 * 384 (the
    # forward returns the token states: the pooler, which sentence embeddings do not use, is not run).
    layer = 2 * 16 * (4 * 384 * 384 + 2 * 384 * 1536) + 4 * 16 * 16 * 384
    assert record["flops_per_example"] == 6 * layer
    train(tiny_config(train={"steps": 1}), tmp_path / "mae", progress=False)
    assert main(["profile", str(tmp_path / "mae"), "--batch", "2", "--repeats", "2"]) == 0
    assert "16 px" in capsys.readouterr().out


def test_bad_input_fails_in_one_line(tmp_path, capsys, tiny_config):
    from maskkit.train.loop import train

    train(tiny_config(train={"steps": 1}), tmp_path / "mae", progress=False)

    def fails(arguments, message):
        assert main(["profile", *arguments]) == 2, arguments
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    fails([str(tmp_path / "nothing")], "not a model")
    fails(["minilm", "--length", "513"], "--length 513: all-MiniLM-L6-v2 (bundled) reads 1 to 512 tokens")
    fails(["minilm", "--length", "4", "--image-size", "32"], "not both")
    fails(["minilm", "--batch", "0"], "profile needs batch >= 1")
    fails([str(tmp_path / "mae"), "--image-size", "32"], "has positions for 16 px images only")
    fails([str(tmp_path / "mae"), "--length", "8"], "is an image model")
    fails([str(tmp_path / "mae"), "--tower", "text"], "has one tower")
    fails([str(tmp_path / "mae"), "--batch", str(2**40), "--repeats", "1"], f"--batch {2**40} does not fit in memory")
    # the size of the failed allocation in GiB, not the allocator's byte count cut short (it once read 10240000
    # for 102,400,000,000 bytes): 2**40 images of 3 x 16 x 16 float32
    fails([str(tmp_path / "mae"), "--batch", str(2**40), "--repeats", "1"], "one tensor of 3072.0 TiB")


def test_a_flip_run_is_profiled_one_tower_at_a_time(tmp_path):
    from maskkit.config import config_from_dict
    from maskkit.eval.run import method_from_checkpoint
    from maskkit.train.checkpoint import find_checkpoint
    from maskkit.train.loop import train
    from tests.methods.test_flip import flip_config_dict

    train(config_from_dict(flip_config_dict(train={"steps": 3})), tmp_path / "flip", progress=False)
    flip = method_from_checkpoint(find_checkpoint(tmp_path / "flip"))[0]
    image, text = load_profiled(str(tmp_path / "flip")), load_profiled(str(tmp_path / "flip"), tower="text")
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())       # noqa: E731
    assert parameter_counts(image.module)[0] == count(flip.encoder, flip.image_projection)
    assert parameter_counts(text.module, text.embedding_tables)[0] == count(flip.text, flip.text_projection)
    ids, mask = text.make_example(2)
    assert ids.shape == (2, 16) and text.forward(ids, mask).shape == (2, 16)              # embed_dim 16
    assert image.forward(*image.make_example(3)).shape == (3, 16)


def test_hugging_face_directories_are_profiled_with_their_own_counts(tmp_path, capsys):
    from tests.interop.test_hf_clip import random_clip

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    profiled = load_profiled(str(tmp_path / "bert"), length=12)
    assert parameter_counts(profiled.module, profiled.embedding_tables)[:3:2] == (
        bert.num_parameters(), bert.num_parameters() - 99 * 32)
    clip = random_clip(seed=1)
    clip.save_pretrained(tmp_path / "clip")
    image = load_profiled(str(tmp_path / "clip"))
    vision = sum(p.numel() for p in clip.vision_model.parameters()) + clip.visual_projection.weight.numel()
    assert parameter_counts(image.module)[0] == vision and image.input == "32 px"
    text = load_profiled(str(tmp_path / "clip"), tower="text")
    assert parameter_counts(text.module)[0] == sum(p.numel() for p in clip.text_model.parameters()) + \
        clip.text_projection.weight.numel()
    capsys.readouterr()
    assert main(["profile", str(tmp_path / "bert"), "--length", "12", "--batch", "2", "--repeats", "2"]) == 0
    assert "Hugging Face bert" in capsys.readouterr().out
