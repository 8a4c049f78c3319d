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
    frozen_prefixes = ("teacher.",)

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)
        self.register_buffer("queue", torch.zeros(8, cfg.encoder.dim))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        out = super().forward(batch)
        with torch.no_grad():
            self.last_features = self.teacher(batch["images"])[:, 0]
        return out

    def after_step(self, step: int) -> None:
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
