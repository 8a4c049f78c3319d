"""train.compile: torch.compile of the method's forward, in place."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from maskkit.config import config_from_dict
from maskkit.errors import MaskkitError
from maskkit.train import checkpoint
from maskkit.train.loop import train
from tests.conftest import tiny_config_dict
from tests.helpers import FLOAT32_PARITY, assert_close_at_scale


def tensors(run) -> dict[str, torch.Tensor]:
    found = checkpoint.find_checkpoint(run)
    return {**load_file(found / "model.safetensors"), **load_file(found / "optimizer.safetensors")}


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_a_compiled_run_resumes_bitwise_and_computes_what_eager_does(tmp_path):
    # Compiled kernels fuse and reorder float operations, so compiled weights differ from eager ones in their
    # last bits; but a compiled run that is killed and resumed compiles the same kernels again and lands on
    # exactly the weights of the uninterrupted compiled run. (The second compilation hits inductor's cache.)
    compiled = config_from_dict(tiny_config_dict(train={"steps": 4, "compile": True, "checkpoint_every": 2}))
    frames_before = counters["stats"]["unique_graphs"]
    train(compiled, tmp_path / "straight", progress=False)
    assert counters["stats"]["unique_graphs"] > frames_before          # dynamo did compile the method
    train(compiled, tmp_path / "resumed", stop_at_step=2, progress=False)
    train(compiled, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = tensors(tmp_path / "straight"), tensors(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and any(k.startswith("encoder.blocks.0.") for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    # The same computation as eager: the first step's loss (before any update) at float32 parity.
    eager = config_from_dict(tiny_config_dict(train={"steps": 1}))
    train(eager, tmp_path / "eager", progress=False)
    assert_close_at_scale(torch.tensor(losses(tmp_path / "straight")[0]), torch.tensor(losses(tmp_path / "eager")[0]),
                          FLOAT32_PARITY)


def test_compile_is_refused_in_one_line_where_torch_compile_cannot_run_the_method():
    values = tiny_config_dict(method="energy", train={"compile": True})
    values["model"] = {"encoder": values["model"]["encoder"]}
    with pytest.raises(MaskkitError, match=r"train.compile=true is not supported by energy \(.*double backward\)"):
        config_from_dict(values)
    with pytest.raises(MaskkitError, match="train.compile"):
        config_from_dict(tiny_config_dict(train={"compile": "yes"}))


def test_each_cpu_kernel_set_gets_its_own_compile_cache(monkeypatch):
    """Inductor's cache (and its precompiled header) built under one ATEN_CPU_CAPABILITY breaks compiles under
    another; maskkit keeps them apart, and leaves a folder the user chose alone."""
    from maskkit.compiling import separate_cache_per_kernel_set

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    default = separate_cache_per_kernel_set()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    avx2 = separate_cache_per_kernel_set()
    assert default and avx2 and default != avx2 and default.endswith("_default")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == avx2
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())    # inductor's own default: not a choice
    assert separate_cache_per_kernel_set() == avx2
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    assert separate_cache_per_kernel_set() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert separate_cache_per_kernel_set() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
