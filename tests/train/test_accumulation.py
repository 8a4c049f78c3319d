"""Gradient accumulation: 4 micro-batches of 16 give the gradients of one batch of 64, through the real loop."""

import torch

from maskkit.train import loop


def first_step_gradients(cfg, tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
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
    loop.train(cfg, tmp_path, stop_at_step=1, progress=False)
    return captured


def test_four_micro_batches_of_16_give_the_gradients_of_one_batch_of_64(tmp_path, tiny_config, monkeypatch):
    whole = first_step_gradients(tiny_config(train={"batch_size": 64}), tmp_path / "whole", monkeypatch)
    micro = first_step_gradients(tiny_config(train={"batch_size": 64, "accumulation_steps": 4}),
                                 tmp_path / "micro", monkeypatch)
    assert whole.keys() == micro.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)
    # The comparison can fail: one micro-batch's gradient alone is far from the whole batch's.
    last_only = first_step_gradients(tiny_config(train={"batch_size": 16}), tmp_path / "last", monkeypatch)
    assert not torch.allclose(last_only["encoder.patch_embed.weight"], whole["encoder.patch_embed.weight"], rtol=0.1)
