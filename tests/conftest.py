import os

import pytest
import torch

from maskkit.config import config_from_dict

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: one torch thread each (the gloo ranks that a
    # test spawns inherit OMP_NUM_THREADS), so that the two share the cores instead of oversubscribing them.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def tiny_config_dict(**sections) -> dict:
    """A MAE config small enough for a training step in well under a second."""
    values = {
        "name": "tiny",
        "method": "mae",
        "model": {
            "encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "num_heads": 2},
            "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
        },
        "data": {"name": "digits", "image_size": 16},
        "optim": {"base_lr": 1e-3, "warmup_steps": 2, "clip_grad": 1.0},
        "train": {"steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5},
    }
    return deep_update(values, sections)


def deep_update(values: dict, updates: dict) -> dict:
    """Nested dicts are merged key by key ({"model": {"encoder": {"depth": 1}}} keeps the other encoder keys)."""
    for key, update in updates.items():
        if isinstance(update, dict) and isinstance(values.get(key), dict):
            deep_update(values[key], update)
        else:
            values[key] = update
    return values


@pytest.fixture
def tiny_config():
    return lambda **sections: config_from_dict(tiny_config_dict(**sections))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
