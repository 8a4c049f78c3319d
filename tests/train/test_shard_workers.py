"""Tar shards read by loader workers: a run stopped and resumed with data.num_workers=2 trains bitwise the
weights of an uninterrupted run that reads in the main process (the sampler, not the workers, orders samples)."""

import numpy as np
import pytest
from PIL import Image

from maskkit.config import config_from_dict
from maskkit.train.loop import train
from tests.data.test_pairs import write_shard
from tests.helpers import assert_bitwise_equal, final_weights
from tests.methods.test_flip import flip_config_dict


def png(seed: int) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_resume_with_loader_workers_on_shards_is_bitwise_the_main_process_run(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(4):
        write_shard(folder / f"{shard:03d}.tar", [(f"{shard}{i:03d}", {"png": png(100 * shard + i),
                                                                       "txt": f"a picture {i % 3}".encode()})
                                                  for i in range(10)])

    def config(workers: int):
        return config_from_dict(flip_config_dict(
            data={"name": "shards", "path": str(folder), "num_workers": workers, "eval_split": 0.25},
            train={"steps": 6, "batch_size": 8, "checkpoint_every": 3}))   # 30 training pairs: an epoch ends in step 4

    train(config(0), tmp_path / "main", progress=False)
    train(config(2), tmp_path / "workers", stop_at_step=3, progress=False)
    train(config(2), tmp_path / "workers", resume=True, progress=False)
    assert_bitwise_equal(final_weights(tmp_path / "main"), final_weights(tmp_path / "workers"))
