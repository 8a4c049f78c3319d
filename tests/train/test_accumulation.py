"""Gradient accumulation: 4 micro-batches of 16 give the gradients of one batch of 64, through the real loop."""

import torch

from tests.helpers import SUMMATION_ORDER, assert_close_at_scale, first_step


def first_step_gradients(cfg, run_dir, monkeypatch) -> dict[str, torch.Tensor]:
    return first_step(cfg, run_dir, monkeypatch)[0]


def test_four_micro_batches_of_16_give_the_gradients_of_one_batch_of_64(tmp_path, tiny_config, monkeypatch):
    whole = first_step_gradients(tiny_config(train={"batch_size": 64}), tmp_path / "whole", monkeypatch)
    micro = first_step_gradients(tiny_config(train={"batch_size": 64, "accumulation_steps": 4}),
                                 tmp_path / "micro", monkeypatch)
    assert whole.keys() == micro.keys() and len(whole) > 10
    for name in whole:
        assert_close_at_scale(micro[name], whole[name], SUMMATION_ORDER, msg=name)
    # The comparison can fail: one micro-batch's gradient alone is far from the whole batch's.
    last_only = first_step_gradients(tiny_config(train={"batch_size": 16}), tmp_path / "last", monkeypatch)
    assert not torch.allclose(last_only["encoder.patch_embed.weight"], whole["encoder.patch_embed.weight"], rtol=0.1)
