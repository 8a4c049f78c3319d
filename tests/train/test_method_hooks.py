"""The loop and checkpoints carry what later methods need: queues, after_step, frozen sub-modules."""

import copy

import torch
from safetensors.torch import load_file

from maskkit.config import config_from_dict
from maskkit.methods import METHODS
from maskkit.methods.mae import MAE, MAEConfig
from maskkit.train import checkpoint
from maskkit.train.loop import train
from maskkit.train.optim import build_optimizer
from tests.conftest import tiny_config_dict


class MAEWithQueueAndTeacher(MAE):
    """MAE plus a feature queue filled after every step (like MoCo) and a frozen teacher (like TinyBERT)."""

    name = "mae_queue"

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.teacher = copy.deepcopy(self.encoder)
        self.freeze(self.teacher)
        self.register_buffer("queue", torch.zeros(8, cfg.encoder.dim))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        out = super().forward(batch)
        with torch.no_grad():
            self.last_features = self.teacher(batch["images"])[:, 0]
        return out

    def after_step(self, step: int, total_steps: int) -> None:
        features = self.encoder.cls_token[0].detach() + self.last_features.mean(0)
        self.queue[self.queue_pointer % len(self.queue)] = features
        self.queue_pointer += 1


def test_queues_resume_exactly_and_frozen_parts_stay_out(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "mae_queue", (MAEWithQueueAndTeacher, MAEConfig))
    cfg = config_from_dict({**tiny_config_dict(train={"steps": 6}), "method": "mae_queue"})
    method = MAEWithQueueAndTeacher(cfg.model)
    optimized = {id(p) for group in build_optimizer(method, cfg.optim, 1e-3).param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in method.teacher.parameters())
    assert all(id(p) in optimized for p in method.encoder.parameters())

    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", stop_at_step=3, progress=False)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = load_file(checkpoint.find_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(checkpoint.find_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert not any(key.startswith("teacher.") for key in a)
    assert int(a["queue_pointer"]) == 6 and a["queue"][:6].abs().sum() > 0
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class WithDropoutTeacher(MAE):
    """A frozen part with dropout: it must stay in eval mode while the method trains."""

    name = "mae_dropout_teacher"

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
        self.freeze(self.teacher)
        self.steps_seen = []

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_seen.append((step, total_steps))
        x = torch.ones(64, 4)
        assert not self.teacher.training and torch.equal(self.teacher(x), self.teacher(x))   # dropout is off
        assert self.encoder.training


def test_a_frozen_part_keeps_dropout_off_while_training(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "mae_dropout_teacher", (WithDropoutTeacher, MAEConfig))
    cfg = config_from_dict({**tiny_config_dict(train={"steps": 3}), "method": "mae_dropout_teacher"})
    method = WithDropoutTeacher(cfg.model)
    method.train()
    assert not method.teacher.training and not method.teacher[1].training and method.encoder.training
    assert method.frozen_prefixes == ("teacher.",)
    assert not any(p.requires_grad for p in method.teacher.parameters())

    captured = {}
    original = WithDropoutTeacher.after_step

    def record(self, step, total_steps):
        original(self, step, total_steps)
        captured["steps"] = list(self.steps_seen)

    monkeypatch.setattr(WithDropoutTeacher, "after_step", record)
    train(cfg, tmp_path / "run", progress=False)
    assert captured["steps"] == [(0, 3), (1, 3), (2, 3)]


def test_freeze_takes_only_a_sub_module():
    method = MAE(config_from_dict(tiny_config_dict()).model)
    import pytest

    with pytest.raises(ValueError, match="sub-module"):
        method.freeze(torch.nn.Linear(2, 2))


def test_bf16_autocast_trains_and_a_method_can_refuse_it(tmp_path, monkeypatch):
    from maskkit.errors import MaskkitError

    result = train(config_from_dict(tiny_config_dict(train={"steps": 2, "precision": "bf16"})), tmp_path / "run",
                   progress=False)
    assert result.final_step == 2 and torch.isfinite(torch.tensor(result.final_loss))

    class FP32Only(MAE):
        name = "fp32_only"
        supports_bf16 = False

    monkeypatch.setitem(METHODS, "fp32_only", (FP32Only, MAEConfig))
    import pytest

    with pytest.raises(MaskkitError, match="train.precision=bf16 is not supported by fp32_only"):
        config_from_dict({**tiny_config_dict(train={"precision": "bf16"}), "method": "fp32_only"})


def test_bf16_on_a_cpu_without_amx_warns_once_naming_the_reason(tmp_path, monkeypatch, caplog):
    from maskkit.train import distributed

    warning = "train.precision=bf16 on a CPU without AMX"
    cfg = config_from_dict(tiny_config_dict(train={"steps": 1, "precision": "bf16"}))
    monkeypatch.setattr(distributed, "cpu_has_amx", lambda: False)
    train(cfg, tmp_path / "no_amx", progress=False)
    assert [r.levelname for r in caplog.records if warning in r.getMessage()] == ["WARNING"]
    assert "use train.precision=fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(distributed, "cpu_has_amx", lambda: True)
    train(cfg, tmp_path / "amx", progress=False)
    assert warning not in caplog.text
    # Only bf16 on a CPU is slow: fp32, and bf16 on CUDA, say nothing.
    monkeypatch.setattr(distributed, "cpu_has_amx", lambda: False)
    assert distributed.slow_precision("fp32", torch.device("cpu")) is None
    assert distributed.slow_precision("bf16", torch.device("cuda", 0)) is None
