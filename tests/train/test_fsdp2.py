"""train.parallel=fsdp2 on 2 gloo ranks: the same weights as one process, bitwise resume, a kill during a save,
the number of ranks a checkpoint was written by, and no deprecation warnings from maskkit's own calls."""

import json
import os
import signal
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from maskkit.config import config_from_dict
from maskkit.errors import MaskkitError
from maskkit.eval.run import method_from_checkpoint
from maskkit.train import checkpoint, loop
from tests.conftest import tiny_config_dict
from tests.helpers import log_tolerance
from tests.methods.test_flip import flip_config_dict
from tests.methods.test_moco import moco_config_dict

pytestmark = pytest.mark.slow

# Weights after 3 AdamW steps at a peak learning rate of 6.25e-5 (base 1e-3, batch 16), a sum split over 2 ranks:
# measured at most 2.4e-7 under ATEN_CPU_CAPABILITY=default and =avx2 (MASKKIT_TOLERANCE_LOG) outside the keys'
# bias; a gradient left unaveraged (FLIP's logit scale when the loop skips it) moves a weight by a step, ~6e-5.
WEIGHTS_ATOL = 1e-5
# The keys' part of a qkv bias has a zero gradient in exact arithmetic (softmax ignores a constant added to a row
# of scores): Adam divides its float noise by its own RMS and steps by up to the learning rate, in any direction
# (measured: 1.2e-5 under avx2). There the bound is the steps' sum, 3 x 6.25e-5.
KEY_BIAS_ATOL = 3 * 6.25e-5


def _rank_main(rank, world_size, init_file, run_dir, cfg_dict, stop_at, resume, kill_at_save_of):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    if kill_at_save_of is not None:
        finish = checkpoint._finish

        def die_after_the_shards(directory, tmp, name, state):
            if state["step"] == kill_at_save_of:        # every rank's slices are written, state.json is not
                os.kill(os.getpid(), signal.SIGKILL)
            finish(directory, tmp, name, state)

        checkpoint._finish = die_after_the_shards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.train(config_from_dict(cfg_dict), run_dir, stop_at_step=stop_at, resume=resume, progress=False)
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) and f"{os.sep}maskkit{os.sep}" in w.filename]
    assert not ours, ours
    torch.distributed.destroy_process_group()


def two_ranks(cfg_dict, run_dir, init_file, stop_at=None, resume=False, kill_at_save_of=None) -> None:
    mp.spawn(_rank_main, args=(2, str(init_file), str(run_dir), cfg_dict, stop_at, resume, kill_at_save_of),
             nprocs=2, join=True)


def weights_of(run_dir) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of a run's latest checkpoint, of either format."""
    method, _ = method_from_checkpoint(checkpoint.find_checkpoint(run_dir))
    return method.trainable_state_dict()


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].double(), b[name].double()
        if name.endswith("attn.qkv.bias"):
            third = len(x) // 3
            keys = slice(third, 2 * third)
            torch.testing.assert_close(y[keys], x[keys], rtol=0, atol=KEY_BIAS_ATOL, msg=name)
            x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
        log_tolerance(f"fsdp2 weights atol {WEIGHTS_ATOL:g}", float((y - x).abs().max()), name)
        torch.testing.assert_close(y, x, rtol=0, atol=WEIGHTS_ATOL, msg=name)


def fsdp2(cfg_dict: dict) -> dict:
    cfg_dict["train"].update(parallel="fsdp2", threads=1)
    return cfg_dict


# The MAE run on 2 ranks also recomputes its blocks' activations (train.activation_checkpointing under fsdp2).
MAE = tiny_config_dict(train={"steps": 3, "checkpoint_every": 3, "activation_checkpointing": True})
FLIP = flip_config_dict(train={"steps": 3, "checkpoint_every": 3}, optim={"clip_grad": 1.0})


@pytest.mark.parametrize("method, cfg_dict", [("mae", MAE), ("flip", FLIP)])
def test_two_sharded_ranks_train_the_weights_of_one_process(tmp_path, method, cfg_dict):
    cfg_dict = fsdp2(json.loads(json.dumps(cfg_dict)))
    two_ranks(cfg_dict, tmp_path / "two", tmp_path / "init")
    one = {**cfg_dict, "train": {**cfg_dict["train"], "parallel": "ddp", "activation_checkpointing": False}}
    loop.train(config_from_dict(one), tmp_path / "one", progress=False)
    assert checkpoint.is_sharded(checkpoint.find_checkpoint(tmp_path / "two"))
    a, b = weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    assert_close_weights(a, b)
    start = config_from_dict(one)
    torch.manual_seed(start.train.seed)
    from maskkit.methods import build_method

    initial = build_method(start).trainable_state_dict()
    assert any(not torch.equal(initial[name], a[name]) for name in a)       # it trained
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    for x, y in zip(rows["one"], rows["two"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        if "grad_norm" in x:                # the norm of sharded and whole (0-d, FLIP's logit scale) gradients
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    # The consolidated exports of rank 0 hold the trained weights.
    assert (tmp_path / "two" / "backbone.safetensors").is_file()


def test_moco_momentum_encoder_and_queue_under_fsdp2_equal_one_process(tmp_path):
    cfg_dict = fsdp2(moco_config_dict(train={"steps": 3, "checkpoint_every": 3}))
    two_ranks(cfg_dict, tmp_path / "two", tmp_path / "init")
    loop.train(config_from_dict({**cfg_dict, "train": {**cfg_dict["train"], "parallel": "ddp"}}), tmp_path / "one",
               progress=False)
    a, b = weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    assert any(name.startswith("key_") or ".key" in name or "momentum" in name for name in a), sorted(a)[:5]
    assert "queue" in a
    assert_close_weights(a, b)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_the_resume_is_bitwise_across_epochs(tmp_path, parallel):
    """40 samples, batch 16: epochs end after 2.5 and 5 steps. Rank 0 is killed (SIGKILL) while it saves step 4,
    after the tensors (every rank's slices, under fsdp2) and before state.json: the resume continues from step 2
    across both epoch boundaries and ends bitwise where the uninterrupted run does."""
    cfg_dict = tiny_config_dict(data={"name": "photos", "photo_crops": 40, "image_size": 16},
                                train={"steps": 6, "checkpoint_every": 2, "parallel": parallel, "threads": 1})
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        two_ranks(cfg_dict, tmp_path / "killed", tmp_path / "init1", kill_at_save_of=4)
    assert checkpoint.find_checkpoint(tmp_path / "killed").name == "step_0000002"
    assert list((tmp_path / "killed" / "checkpoints").glob(".tmp-step_0000004-*"))     # the half-written one
    weights_of(tmp_path / "killed")                                                     # the previous one loads
    two_ranks(cfg_dict, tmp_path / "killed", tmp_path / "init2", resume=True)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))              # removed as stale
    two_ranks(cfg_dict, tmp_path / "straight", tmp_path / "init3")
    assert checkpoint.is_sharded(checkpoint.find_checkpoint(tmp_path / "straight")) == (parallel == "fsdp2")
    a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / "killed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_checkpoint_of_two_ranks_resumes_on_one_only_with_allow_reshard(tmp_path):
    cfg_dict = fsdp2(tiny_config_dict(train={"steps": 4, "checkpoint_every": 2}))
    two_ranks(cfg_dict, tmp_path / "run", tmp_path / "init", stop_at=2)
    cfg = config_from_dict(cfg_dict)
    with pytest.raises(MaskkitError, match=r"written by 2 rank\(s\), and this run has 1; pass --allow-reshard"):
        loop.train(cfg, tmp_path / "run", resume=True, progress=False)
    result = loop.train(cfg, tmp_path / "run", resume=True, progress=False, allow_reshard=True)
    assert result.final_step == 4
    assert checkpoint.read_state(checkpoint.find_checkpoint(tmp_path / "run"))["world_size"] == 1

    # The sharded checkpoint as whole tensors: no DCP folder, the same weights, a start for a new run.
    from maskkit.export import export_run

    export_run(tmp_path / "run", "safetensors", tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["model.safetensors", "state.json"]
    a, b = weights_of(tmp_path / "run"), weights_of(tmp_path / "whole")
    assert all(torch.equal(a[name], b[name]) for name in a)
    plain = {**cfg_dict, "optim": {"base_lr": 0.0, "warmup_steps": 0},      # one step that changes nothing
             "train": {**cfg_dict["train"], "parallel": "ddp", "steps": 1, "init_from": str(tmp_path / "whole")}}
    loop.train(config_from_dict(plain), tmp_path / "next", progress=False)
    assert all(torch.equal(a[name], w) for name, w in weights_of(tmp_path / "next").items())


def test_fsdp2_is_refused_by_energy_and_bad_values_fail_in_one_line():
    from tests.methods.test_energy import energy_config_dict

    with pytest.raises(MaskkitError, match="train.parallel=fsdp2 is not supported by energy .*; use train.parallel=ddp"):
        config_from_dict(energy_config_dict(train={"parallel": "fsdp2"}))
    with pytest.raises(MaskkitError, match="train.activation_checkpointing=true is not supported by energy"):
        config_from_dict(energy_config_dict(train={"activation_checkpointing": True}))
    with pytest.raises(MaskkitError, match="train.parallel must be ddp or fsdp2"):
        config_from_dict(tiny_config_dict(train={"parallel": "fsdp"}))


def test_a_sharded_checkpoint_with_a_shard_missing_or_cut_short_fails_in_one_line(tmp_path):
    cfg_dict = fsdp2(tiny_config_dict(train={"steps": 2, "checkpoint_every": 2}))    # one process: DCP as well
    loop.train(config_from_dict(cfg_dict), tmp_path / "run", progress=False)
    found = checkpoint.find_checkpoint(tmp_path / "run")
    shard = found / "sharded" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MaskkitError, match=r"sharded: cannot read the sharded checkpoint \(EOFError"):
        weights_of(tmp_path / "run")
    shard.unlink()
    with pytest.raises(MaskkitError, match=r"sharded: cannot read .*No such file or directory: .*__0_0.distcp"):
        weights_of(tmp_path / "run")
    (found / "sharded" / ".metadata").write_bytes(b"")
    with pytest.raises(MaskkitError, match="unreadable sharded checkpoint"):
        weights_of(tmp_path / "run")
