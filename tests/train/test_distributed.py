"""Two ranks on CPU (gloo) compute the same gradients as one rank on the same global batch."""

import os

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from maskkit.config import config_from_dict
from maskkit.data.augment import ImageAugment
from maskkit.data.images import build_image_dataset, collate
from maskkit.train import distributed
from maskkit.train.loop import StepSampler, build_method, prepare_batch

GLOBAL_BATCH = 16


def gradients_of_first_step(cfg, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    model = torch.nn.parallel.DistributedDataParallel(method) if world_size > 1 else method
    dataset = build_image_dataset(cfg.data)
    sampler = iter(StepSampler(len(dataset), GLOBAL_BATCH, rank, world_size, 1, cfg.train.seed))
    batch = collate([dataset[i] for i in next(sampler)])
    batch.pop("skipped")
    batch = prepare_batch(batch, ImageAugment(cfg.data), cfg.train.seed, 0, torch.device("cpu"))
    model(batch).loss.backward()
    return {name: p.grad.clone() for name, p in method.named_parameters()}


def _rank_main(rank, world_size, init_file, out_dir, cfg_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    grads = gradients_of_first_step(config_from_dict(cfg_dict), rank, world_size)
    gathered = distributed.all_gather_with_grad(torch.full((2,), float(rank)))
    if rank == 0:
        grads["gathered"] = gathered
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))
    distributed.cleanup()


def test_two_ranks_match_one_rank(tmp_path):
    from tests.conftest import tiny_config_dict

    cfg_dict = tiny_config_dict()
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), cfg_dict), nprocs=2, join=True)
    two = load_file(tmp_path / "grads.safetensors")
    assert torch.equal(two.pop("gathered"), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    one = gradients_of_first_step(config_from_dict(cfg_dict), 0, 1)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in one.values())
