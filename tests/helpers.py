"""Helpers several tests share: run the real loop on 2 gloo ranks, compare checkpoints, capture gradients."""

import os

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from maskkit.config import config_from_dict
from maskkit.train import checkpoint, loop


def _rank_main(rank, world_size, init_file, run_dir, cfg_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    loop.train(config_from_dict(cfg_dict), run_dir, progress=False)
    torch.distributed.destroy_process_group()


def train_on_two_ranks(cfg_dict: dict, run_dir, init_file) -> None:
    """`maskkit train` as torchrun --nproc_per_node 2 would run it, with gloo, into `run_dir`."""
    mp.spawn(_rank_main, args=(2, str(init_file), str(run_dir), cfg_dict), nprocs=2, join=True)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.find_checkpoint(run_dir) / "model.safetensors")


def assert_same_weights(a_dir, b_dir, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, msg=name)


def first_step(cfg, run_dir, monkeypatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(gradients the optimizer sees at the first step, the checkpoint's weights after it) of the real loop."""
    captured = {}
    build = loop.build_optimizer

    def build_and_capture(method, optim_cfg, peak_lr):
        optimizer = build(method, optim_cfg, peak_lr)
        step = optimizer.step

        def step_and_capture(*args, **kwargs):
            if not captured:
                captured.update({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
            return step(*args, **kwargs)

        optimizer.step = step_and_capture
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", build_and_capture)
    loop.train(cfg, run_dir, stop_at_step=1, progress=False)
    return captured, final_weights(run_dir)


def resumed_and_straight(cfg, tmp_path, stop_at: int = 3) -> tuple[dict, dict]:
    """Final weights of an uninterrupted run and of one stopped at `stop_at` and resumed (same config)."""
    loop.train(cfg, tmp_path / "straight", progress=False)
    loop.train(cfg, tmp_path / "resumed", stop_at_step=stop_at, progress=False)
    loop.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    return final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fit_one_batch(method, batch: dict, steps: int, lr: float = 3e-3) -> list[dict[str, float]]:
    """The logs of `steps` AdamW steps of `method` on the same batch (a method must be able to memorise it)."""
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr)
    logs = []
    for _ in range(steps):
        out = method(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        logs.append({name: float(value) for name, value in out.logs.items()})
    return logs
