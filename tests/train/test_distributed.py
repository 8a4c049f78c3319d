"""Two ranks on CPU (gloo) run the real training loop and end where one rank ends on the same global batch.

The data set is a folder in which most files are truncated PNGs (their headers read, their pixels do
not decode), so some steps leave one rank's whole share unreadable while the other rank has samples:
that rank must still take part in DDP's all-reduce (it used to skip `backward` and hang the run), and
the step's gradient must still be the mean over the readable samples of the global batch.
"""

import io
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from maskkit import collectives
from maskkit.config import config_from_dict
from maskkit.data.common import Unreadable
from maskkit.data.images import build_image_dataset
from maskkit.train import checkpoint, distributed
from maskkit.train.loop import StepSampler, train
from tests.conftest import tiny_config_dict

GLOBAL_BATCH, STEPS = 4, 6


def write_mostly_truncated_folder(root) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        # Files 0, 3, 6 and 9 decode; the rest are cut in half (a kill during a copy, a broken download).
        (root / f"img{i:02d}.png").write_bytes(data if i % 3 == 0 else data[: len(data) // 2])


def config_dict(folder) -> dict:
    return tiny_config_dict(
        data={"name": "folder", "path": str(folder), "image_size": 16},
        train={"steps": STEPS, "batch_size": GLOBAL_BATCH, "checkpoint_every": STEPS, "threads": 1},
    )


def _rank_main(rank, world_size, init_file, run_dir, cfg_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    train(config_from_dict(cfg_dict), run_dir, progress=False)
    gathered = collectives.all_gather_with_grad(torch.full((2,), float(rank)))
    assert torch.equal(gathered, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    distributed.cleanup()


@pytest.mark.slow
def test_two_ranks_match_one_rank_when_a_rank_has_only_unreadable_files(tmp_path):
    folder = tmp_path / "images"
    write_mostly_truncated_folder(folder)
    cfg_dict = config_dict(folder)
    cfg = config_from_dict(cfg_dict)

    # The case the test is about really occurs: some step gives one rank only unreadable files, the other not.
    dataset = build_image_dataset(cfg.data)
    shares = [iter(StepSampler(len(dataset), GLOBAL_BATCH, r, 2, 1, seed=cfg.train.seed)) for r in range(2)]
    readable = [[sum(not isinstance(dataset[key], Unreadable) for key in next(s)) for s in shares] for _ in range(STEPS)]
    assert any(min(counts) == 0 < max(counts) for counts in readable), readable

    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), cfg_dict), nprocs=2, join=True)
    train(cfg, tmp_path / "one", progress=False)

    one = load_file(checkpoint.find_checkpoint(tmp_path / "one") / "model.safetensors")
    two = load_file(checkpoint.find_checkpoint(tmp_path / "two") / "model.safetensors")
    start = build_method_weights(cfg)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(one[name], start[name]) for name in one)   # it trained


def build_method_weights(cfg) -> dict[str, torch.Tensor]:
    from maskkit.methods import build_method

    torch.manual_seed(cfg.train.seed)
    return build_method(cfg).trainable_state_dict()


def _gather_rank_main(rank, world_size, init_file):
    import warnings

    warnings.simplefilter("error")        # a deprecated torch call (FutureWarning) in maskkit's collectives fails
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    x = torch.full((2,), float(rank), requires_grad=True)
    gathered = collectives.all_gather_with_grad(x)
    assert torch.equal(gathered.detach(), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # Each rank's loss weighs the whole gathered batch by rank + 1; a slice's gradient sums what every rank's
    # loss put on it (1 + 2), as the all-reduced gradient of DDP would.
    (gathered.sum() * (rank + 1)).backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))
    distributed.cleanup()


def test_gather_with_grad_on_two_ranks_sums_gradients_without_a_deprecation_warning(tmp_path):
    mp.spawn(_gather_rank_main, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
