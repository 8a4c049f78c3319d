"""Images/s read from WebDataset-format tar shards (`data.name=shards`) by the training loader, 0 to 4 workers.

    python benchmarks/shard_reader.py                    # ~1 minute on 2 cores
    python benchmarks/shard_reader.py --samples 4000 --image-size 128 --workers 0 1 2 4

Writes `--shards` tar files of JPEG photo crops (scikit-image's photos) with captions into a temporary folder,
then reads them as `maskkit train` does: the `Shards` set (tar members indexed once, each worker opening its own
handles), `StepSampler` batches of one rank and `PairCollate` (decode, resize, tokenize), for each
`data.num_workers`. Prints images/s and the ratio to the first worker count, all in this process.
"""

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from maskkit.data import build_data
from maskkit.data.pairs import PairDataConfig
from maskkit.train.loop import StepSampler


def write_shards(folder: Path, samples: int, shards: int, size: int) -> None:
    from skimage import data as photos

    sources = [getattr(photos, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    rng = np.random.default_rng(0)
    per_shard = -(-samples // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:04d}.tar", "w") as archive:
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                photo = sources[i % len(sources)]
                top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
                crop = Image.fromarray(photo[top : top + size, left : left + size, :3])
                buffer = io.BytesIO()
                crop.save(buffer, format="JPEG", quality=90)
                for name, payload in ((f"{i:06d}.jpg", buffer.getvalue()),
                                      (f"{i:06d}.txt", f"a photo crop number {i} of {i % 5}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))


def images_per_second(folder: Path, workers: int, batch: int, batches: int, size: int) -> float:
    cfg = PairDataConfig(name="shards", path=str(folder), image_size=size, eval_split=0.0, num_workers=workers)
    data = build_data(cfg, "train")
    sampler = StepSampler(len(data.dataset), batch, 0, 1, 1, seed=0)
    loader = DataLoader(data.dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=workers,
                        persistent_workers=False)
    stream = iter(loader)
    next(stream)                                       # workers started and warm
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96, help="the JPEGs' side; the loader resizes to 64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder, args.samples, args.shards, args.image_size)
        print(f"{args.samples} samples in {args.shards} shards of {args.image_size}px JPEGs, batches of {args.batch}")
        rates = {}
        for workers in args.workers:
            rates[workers] = images_per_second(folder, workers, args.batch, args.batches, 64)
            base = rates[args.workers[0]]
            print(f"data.num_workers={workers}: {rates[workers]:8.0f} images/s  {rates[workers] / base:5.2f}x "
                  f"num_workers={args.workers[0]}")


if __name__ == "__main__":
    main()
