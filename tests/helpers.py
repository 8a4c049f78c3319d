"""Helpers several tests share: run the real loop on 2 gloo ranks, compare checkpoints, capture gradients."""

import ast
import dataclasses
import os
from pathlib import Path

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


# Relative tolerances for assert_close_at_scale. The worst ratio measured over the suite's 274 comparisons
# was 1.8e-6 (XLNet's gradients through its memory) under ATEN_CPU_CAPABILITY=default and =avx2 on an AMD
# EPYC (MASKKIT_TOLERANCE_LOG=file re-measures it): 1e-5 leaves 5x for other kernels and processors, while a
# real difference (a leak through a mask, a wrong gradient) is of order 1e-3 to 1 of the scale.
SUMMATION_ORDER = 1e-5   # one float32 computation, its sums split or ordered differently (ranks, micro-batches)
FLOAT32_PARITY = 1e-5    # two implementations of the same network (maskkit vs Hugging Face), a few layers deep
# The real all-MiniLM-L6-v2 (6 layers, trained weights, states of scale ~10): two float32 computations of it
# (maskkit vs BertModel, SDPA vs written-out attention) differed by up to 1.1e-5 of the scale on a 2-core Intel
# with AMX while another process shared the cores (another thread split, another summation order); 5e-5 leaves
# 5x, while a leak through the padding mask or a swapped LayerNorm moves the states by 1e-2 or more.
REAL_MODEL_PARITY = 5e-5


def log_tolerance(tolerance: str, measured: float, what: str) -> None:
    """With MASKKIT_TOLERANCE_LOG=file, append (tolerance, measured error, what): re-measures each constant."""
    if os.environ.get("MASKKIT_TOLERANCE_LOG"):
        with open(os.environ["MASKKIT_TOLERANCE_LOG"], "a") as log:
            log.write(f"{tolerance}\t{measured:.3g}\t{what}\n")


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, msg: str = "") -> None:
    """|actual - expected| <= rel * max|expected| for every element.

    Two float32 computations of one quantity that add their terms in another order (another rank split,
    another SIMD kernel: ATEN_CPU_CAPABILITY=default vs avx2, AMX or not) differ by rounding errors of the
    size of the terms they add, which is the scale of the whole tensor, not of each element: an element
    that cancels to nearly zero still carries its terms' error, so a per-element rtol with a fixed tiny
    atol fails on some processors and not others. The tolerance is therefore absolute, sized by the tensor.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = float(expected.abs().max())
    difference = float((actual - expected).abs().max())
    ratio = difference / max(scale, 1e-300)
    log_tolerance(f"{rel:g}", ratio, msg)
    assert difference <= rel * scale, (f"{msg}: max |difference| {difference:.3g} is {ratio:.3g} "
                                       f"of the tensor's scale {scale:.3g} (allowed {rel:g})")


def assert_same_weights(a_dir, b_dir, rtol: float = 1e-4, atol: float = 5e-5) -> None:
    """The final weights of two runs agree to atol + rtol * |w|.

    Weights after a few AdamW steps, not one computation: Adam divides each gradient by its own running
    RMS, so float noise in a gradient that is zero in exact arithmetic (the key part of the qkv bias:
    softmax ignores a constant added to a row of scores) becomes a step of up to the learning rate, in
    any direction. The error is therefore in units of the runs' learning rate, not of the weights' scale.
    Measured: at most 8.7e-6 (that bias, ATEN_CPU_CAPABILITY=avx2; 6.6e-6 under default) against
    Adam steps of ~6e-5 per step in these tests, so 5e-5 allows for other kernels and still fails when
    the runs' updates point elsewhere.
    """
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        log_tolerance(f"weights atol {atol:g}", float((b[name].double() - a[name].double()).abs().max()), name)
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
    """Final weights of an uninterrupted run and of one stopped at `stop_at` and resumed (same config).

    Both run with train.threads=2, what users run: an operation whose reduction order depends on the
    threads (PMLM's position lookup once did) then shows up as a difference.
    """
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=2))
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


def maskkit_imports(path) -> list[tuple[str, str | None]]:
    """(module, name) for each `from maskkit... import name` in a Python file, (module, None) for each `import maskkit...`."""
    found = []
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maskkit":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "maskkit"]
    return found
