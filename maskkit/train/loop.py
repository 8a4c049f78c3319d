"""The one explicit training loop: data -> augmentation -> method -> loss -> AdamW, for every method.

Read top to bottom: `train()` builds the pieces, then each optimizer step draws `accumulation_steps`
micro-batches, backpropagates, checks the loss is finite, clips, steps, calls `method.after_step()`,
logs and checkpoints. All per-sample randomness (crops, flips, masks) is seeded by
(seed, epoch, sample index), so resuming or changing the number of ranks changes nothing a sample sees.
"""

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from maskkit.config import Config, config_to_dict, save_config
from maskkit.data.augment import ImageAugment
from maskkit.data.images import build_image_dataset, collate
from maskkit.errors import MaskkitError
from maskkit.methods import METHODS, Method
from maskkit.nn.masking import sample_seed
from maskkit.train import checkpoint, distributed
from maskkit.train.optim import build_optimizer, lr_at, peak_learning_rate

log = logging.getLogger("maskkit")


def build_method(cfg: Config) -> Method:
    method_cls, _ = METHODS[cfg.method]
    return method_cls(cfg.model)


class StepSampler(Sampler):
    """Yields the micro-batches of this rank, step after step, from `start_step` on.

    Step s of epoch e takes the global batch perm_e[s*G:(s+1)*G] (a fixed permutation per epoch, the
    incomplete tail dropped); rank r takes its contiguous share and cuts it into micro-batches. The
    union over ranks and micro-batches is the same global batch for any number of ranks.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int,
                 accumulation_steps: int, seed: int, start_step: int = 0):
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise MaskkitError(f"train.batch_size={global_batch} is larger than the data set ({num_samples} samples)")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation_steps
        self.seed, self.start_step = seed, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1)))

    def __iter__(self):
        step = self.start_step
        per_rank = self.global_batch // self.world_size
        micro = per_rank // self.accumulation
        while True:
            epoch, position = divmod(step, self.steps_per_epoch)
            perm = self.permutation(epoch)
            while position < self.steps_per_epoch:
                start = position * self.global_batch + self.rank * per_rank
                share = perm[start : start + per_rank]
                for m in range(self.accumulation):
                    yield share[m * micro : (m + 1) * micro].tolist()
                position += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs a number
        return 2**31


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    final_loss: float
    backbone_path: Path | None


def _metrics_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def train(cfg: Config, run_dir: str | Path, resume: bool = False, stop_at_step: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir`. `stop_at_step` checkpoints and returns early, as an interrupted run would."""
    run_dir = Path(run_dir)
    info = distributed.setup(cfg.train.device)
    if cfg.train.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    tcfg = cfg.train
    if tcfg.batch_size % (info.world_size * tcfg.accumulation_steps):
        raise MaskkitError(
            f"train.batch_size={tcfg.batch_size} is not divisible by ranks x accumulation_steps "
            f"({info.world_size} x {tcfg.accumulation_steps})"
        )

    # Same seed on every rank, so every rank starts from the same weights.
    torch.manual_seed(tcfg.seed)
    method = build_method(cfg).to(info.device)
    peak_lr = peak_learning_rate(cfg.optim, tcfg.batch_size)
    optimizer = build_optimizer(method, cfg.optim, peak_lr)

    start_step, rng_state = 0, None
    if resume:
        found = checkpoint.find_checkpoint(run_dir)
        state = checkpoint.load_weights(method, found)
        start_step, rng_state = checkpoint.load_training_state(optimizer, found, state)
        if info.is_main:
            log.info("resumed from %s at step %d", found, start_step)
    elif (run_dir / "checkpoints" / "latest").exists():
        raise MaskkitError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    config_dict = config_to_dict(cfg)

    dataset = build_image_dataset(cfg.data, "train")
    augment = ImageAugment(cfg.data)
    sampler = StepSampler(len(dataset), tcfg.batch_size, info.rank, info.world_size,
                          tcfg.accumulation_steps, tcfg.seed, start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                        pin_memory=info.device.type == "cuda")
    batches = iter(loader)
    if rng_state is not None:
        checkpoint.restore_rng(rng_state)

    model = method
    if info.enabled:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(method, device_ids=device_ids)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda"
                else contextlib.nullcontext())
    metrics_file = open(run_dir / "metrics.jsonl", "a") if info.is_main else None
    writer = _metrics_writer(run_dir) if info.is_main else None
    end_step = min(tcfg.steps, stop_at_step) if stop_at_step is not None else tcfg.steps
    bar = tqdm(total=tcfg.steps, initial=start_step, disable=not (progress and info.is_main),
               desc=f"{cfg.method} {cfg.name}", dynamic_ncols=True)
    skipped_total, images_seen, tic = 0, 0, time.perf_counter()
    loss_value = math.nan
    method.train()
    step = start_step
    last_batch = None
    try:
        for step in range(start_step, end_step):
            lr = lr_at(step, tcfg.steps, peak_lr, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            epoch = step // sampler.steps_per_epoch
            step_loss = torch.zeros((), device=info.device)
            logs = {}
            for micro in range(tcfg.accumulation_steps):
                batch = next(batches)
                skipped_total += int(batch.pop("skipped"))
                if "images" not in batch:
                    continue  # every image of this micro-batch was unreadable
                batch = prepare_batch(batch, augment, tcfg.seed, epoch, info.device)
                last_batch = batch
                sync = micro == tcfg.accumulation_steps - 1 or not info.enabled
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                    out = model(batch)
                    loss = out.loss / tcfg.accumulation_steps
                loss.backward()
                step_loss += loss.detach()
                logs = out.logs
                images_seen += batch["images"].shape[0] * info.world_size
            if not logs and not info.enabled:
                log.warning("step %d: every image of the batch was unreadable; no update", step)
                bar.update(1)
                continue
            step_loss = distributed.all_reduce_mean(step_loss)
            loss_value = float(step_loss)
            if not math.isfinite(loss_value):
                latest = run_dir / "checkpoints" / "latest"
                kept = (f"the last good checkpoint is {checkpoint.find_checkpoint(run_dir)}" if latest.exists()
                        else "no checkpoint was written yet")
                raise MaskkitError(f"non-finite loss ({loss_value}) at step {step}; stopped before the update, {kept}")
            if cfg.optim.clip_grad > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(step)
            done = step + 1
            bar.update(1)
            if info.is_main and (done % tcfg.log_every == 0 or done == end_step):
                elapsed = time.perf_counter() - tic
                row = {"step": done, "loss": loss_value, "lr": lr, "images_per_s": images_seen / max(elapsed, 1e-9)}
                row.update({k: float(v) for k, v in logs.items() if k != "loss"})
                if cfg.optim.clip_grad > 0:
                    row["grad_norm"] = float(grad_norm)
                if skipped_total:
                    row["skipped_images"] = skipped_total
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for key, value in row.items():
                        writer.add_scalar(f"train/{key}", value, done)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.0f}")
                images_seen, tic = 0, time.perf_counter()
            if info.is_main and (done % tcfg.checkpoint_every == 0 or done == end_step):
                checkpoint.save_checkpoint(run_dir, method, optimizer, done, config_dict, tcfg.keep_checkpoints)
        step = end_step
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()

    backbone_path = None
    if info.is_main and step == tcfg.steps:
        backbone_cfg = config_dict["model"].get("encoder", config_dict["model"])
        backbone_path = checkpoint.export_backbone(method.backbone, backbone_cfg, run_dir / "backbone.safetensors")
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        if last_batch is not None:
            method.save_figures(last_batch, run_dir, augment.denormalize)
        if skipped_total:
            log.warning("skipped %d unreadable images in total", skipped_total)
    distributed.barrier()
    return TrainResult(run_dir=run_dir, final_step=step, final_loss=loss_value, backbone_path=backbone_path)


def prepare_batch(batch: dict, augment: ImageAugment, seed: int, epoch: int, device: torch.device) -> dict:
    """Move to the device, attach per-sample seeds, augment (crop, flip, normalise) on the device."""
    seeds = torch.tensor([sample_seed(seed, epoch, int(i)) for i in batch["index"]], dtype=torch.long)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["seed"] = seeds
    batch["images"] = augment(batch["images"], seeds)
    return batch
