"""The one explicit training loop: data -> augmentation -> method -> loss -> AdamW, for every method.

Read top to bottom: `train()` builds the pieces, then each optimizer step draws `accumulation_steps`
micro-batches, backpropagates, checks the loss is finite, clips, steps, calls `method.after_step()`,
logs, measures the held-out loss (train.eval_every) and checkpoints. All per-sample randomness (crops,
flips, masks) is seeded by (seed, epoch, sample index), so resuming or changing the number of ranks
changes nothing a sample sees.
"""

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from maskkit import collectives
from maskkit.compiling import separate_cache_per_kernel_set
from maskkit.config import (
    Config,
    EvalConfig,
    config_changes,
    config_from_dict,
    config_to_dict,
    config_with_overrides,
    save_config,
)
from maskkit.data import Data, build_data, build_held_out, check_sources
from maskkit.data.augment import ImageAugment
from maskkit.data.common import batch_size_of, collate, report_unreadable
from maskkit.data.images import labelled_dataset
from maskkit.data.text import pin_vocabulary, run_vocabulary
from maskkit.errors import MaskkitError
from maskkit.files import cannot_write, writing
from maskkit.interop.pretrained import build_with_frozen_parts
from maskkit.nn.knn import knn_accuracy
from maskkit.nn.transformer import ViT
from maskkit.rng import Stream, sample_keys, scalar_seed
from maskkit.runlock import RunLock
from maskkit.train import checkpoint, distributed
from maskkit.train.metrics import plot_loss_curve, start_metrics
from maskkit.train.optim import build_optimizer, lr_at, peak_learning_rate

log = logging.getLogger("maskkit")


class StepSampler(Sampler):
    """Yields the micro-batches of this rank, step after step, from `start_step` on.

    The samples form one endless stream, perm_0 ++ perm_1 ++ ..., where perm_e is epoch e's own
    permutation of the data set; step s takes the global batch stream[s*G : (s+1)*G], so every sample
    is seen exactly once per epoch (a batch may straddle two epochs). Rank r takes its contiguous share
    of the global batch and cuts it into micro-batches, so the union over ranks and micro-batches is
    the same global batch for any number of ranks. Each item is (sample index, epoch): per-sample
    randomness is seeded by both.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int,
                 accumulation_steps: int, seed: int, start_step: int = 0):
        if global_batch > num_samples:
            raise MaskkitError(f"train.batch_size={global_batch} is larger than the data set ({num_samples} samples)")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation_steps
        self.seed, self.start_step = seed, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(scalar_seed(self.seed, epoch, -1, Stream.ORDER))
        return torch.randperm(self.num_samples, generator=generator)

    def epoch_of(self, step: int) -> float:
        """The (fractional) number of passes over the data set before `step`."""
        return step * self.global_batch / self.num_samples

    def items(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(sample index, epoch) of stream positions [start, stop)."""
        out, position = [], start
        while position < stop:
            epoch, offset = divmod(position, self.num_samples)
            if self._cached_epoch != epoch:
                self._cached_epoch, self._cached_perm = epoch, self.permutation(epoch).tolist()
            end = min(stop, (epoch + 1) * self.num_samples)
            out += [(index, epoch) for index in self._cached_perm[offset : offset + end - position]]
            position = end
        return out

    def __iter__(self):
        self._cached_epoch, self._cached_perm = -1, []
        per_rank = self.global_batch // self.world_size
        micro = per_rank // self.accumulation
        step = self.start_step
        while True:
            start = step * self.global_batch + self.rank * per_rank
            for m in range(self.accumulation):
                yield self.items(start + m * micro, start + (m + 1) * micro)
            step += 1

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


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The config a run was started with (from its latest checkpoint), with `overrides` applied."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "latest").is_file():
        raise MaskkitError(f"no checkpoint in {run_dir} to resume from; start the run without --resume")
    found = checkpoint.find_checkpoint(run_dir)
    saved = checkpoint.read_state(found).get("config")
    if not isinstance(saved, dict):
        raise MaskkitError(f"{found / 'state.json'} holds no config to resume with")
    return config_with_overrides(saved, list(overrides), str(found / "state.json"))


def check_resume_config(cfg: Config, saved: dict, run_dir: Path, extend_steps: int = 0) -> None:
    """A resumed run trains the config it was started with; only RUNTIME_KEYS may differ, and train.steps by
    exactly `extend_steps` (--extend-steps N: `cfg` is then the extended config).

    A key the saved config lacks (added to maskkit after the run started) counts at its default: defaults
    keep the earlier behaviour (new methods' switches are turned on in the recipes), so that is what the
    run was trained with.
    """
    if saved:
        saved = config_to_dict(config_from_dict(copy.deepcopy(saved), source=str(run_dir)))
        saved["train"]["steps"] += extend_steps
    changes = config_changes(saved, config_to_dict(cfg))
    if changes:
        key, old, new = changes[0]
        longer = "; to train it longer, --resume --extend-steps N" if key == "train.steps" and not extend_steps else ""
        raise MaskkitError(
            f"--resume continues {run_dir} with the config it was started with, but {key}={new!r} differs from "
            f"the run's {old!r}{longer}; to train from these weights with another config, start a new run: "
            f"maskkit train CONFIG train.init_from={run_dir} --out NEW_DIR"
        )


def check_world_size(state: dict, world_size: int, found: Path, allow_reshard: bool) -> None:
    """A resumed run keeps its number of ranks unless --allow-reshard: the data each sample sees and the global
    batch stay the same on any number (StepSampler), but the float sums are split otherwise, so the run is no
    longer bitwise the one it would have been. Checkpoints of both formats hold whole or reshardable tensors."""
    saved = state.get("world_size")
    if saved is not None and saved != world_size and not allow_reshard:
        raise MaskkitError(f"{found} was written by {saved} rank(s), and this run has {world_size}; pass "
                           f"--allow-reshard to continue it on {world_size} (the same samples and global batch, "
                           f"float sums split otherwise), or launch {saved} rank(s)")


def check_before_training(cfg: Config, resume: bool = False) -> None:
    """What can be checked before any data is read or weights are built: the data's files and folders exist
    and are of the right kind, data.tokenizer suits the data, train.init_from holds a checkpoint.
    `maskkit validate` runs exactly these, so it refuses what `train` would refuse, with the same words."""
    check_sources(cfg.data, tokenizer=not resume)       # a resumed run reads the vocabulary pinned in it
    if cfg.train.init_from and not resume:
        try:
            checkpoint.find_checkpoint(cfg.train.init_from)
        except MaskkitError as error:
            raise MaskkitError(f"train.init_from: {error}") from None


def _last_checkpoint(run_dir: Path) -> str:
    """What a run stopped by an error keeps, for the error's message."""
    if (run_dir / "checkpoints" / "latest").exists():
        return f"the last good checkpoint is {checkpoint.find_checkpoint(run_dir)}"
    return "no checkpoint was written yet"


def extended(cfg: Config, extend_steps: int) -> Config:
    """`cfg` with train.steps raised by `extend_steps` (checked again: a method's own schedule may forbid it)."""
    values = config_to_dict(cfg)
    values["train"]["steps"] += extend_steps
    return config_from_dict(values, source=f"--extend-steps {extend_steps}")


def _refuse_a_second_run(run_dir: Path) -> None:
    if (run_dir / "checkpoints" / "latest").exists():
        raise MaskkitError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


def train(cfg: Config, run_dir: str | Path, resume: bool = False, stop_at_step: int | None = None,
          progress: bool = True, extend_steps: int = 0, allow_reshard: bool = False) -> TrainResult:
    """Train `cfg` into `run_dir`. `stop_at_step` checkpoints and returns early, as an interrupted run would.

    `extend_steps` (with `resume`; `cfg` is the run's config, as `resume_config` reads it) continues the run
    for that many steps more than its recorded train.steps, finished or not. The extended run is the run of
    the new total from where it stands: every schedule given the total (the cosine learning rate, a
    method's own, such as FLIP's unmasked tail) is recomputed for it, so a finished cosine run's learning rate jumps
    from min_lr back up to where a run of the longer length would be at this step. The other choice, a
    warmup-free tail from the current learning rate, cannot continue a finished run at all: its schedule
    ended at optim.min_lr, 0 by default. The new total is written into the latest checkpoint's state.json
    and RUN/config.yaml before the first step, so a plain --resume after a kill continues to it.

    The run owns `run_dir` while it trains (RUN/.lock, see `maskkit.runlock`): another train, --resume or
    eval of it is refused with the holder's name. Only rank 0 writes the run directory, so only rank 0
    takes the lock, and the ranks of one run do not refuse each other. `allow_reshard` lets --resume continue on
    another number of ranks than wrote the checkpoint (`check_world_size`). A write that fails (a read-only
    folder, a full disk) stops the run with one MaskkitError naming the path and the cause; the
    checkpoints written before it are intact.
    """
    check_before_training(cfg, resume)
    lock = RunLock(run_dir, "wait for it to finish, or train into another --out")
    try:
        return _train(cfg, Path(run_dir), lock, resume, stop_at_step, progress, extend_steps, allow_reshard)
    finally:
        lock.release()


def _train(cfg: Config, run_dir: Path, lock: RunLock, resume: bool, stop_at_step: int | None,
           progress: bool, extend_steps: int, allow_reshard: bool) -> TrainResult:
    info = distributed.setup(cfg.train.device)
    if info.is_main and run_dir.is_dir():
        with writing(run_dir):
            lock.acquire()  # before reading anything of the run: a second writer is refused at once
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
    method = build_with_frozen_parts(cfg).to(info.device)
    if extend_steps < 0:
        raise MaskkitError(f"--extend-steps must be an integer >= 1, got {extend_steps}")
    if extend_steps and not resume:
        raise MaskkitError(f"--extend-steps {extend_steps} continues a run: pass --resume too")
    found = None
    if resume:
        if not (run_dir / "checkpoints" / "latest").exists():
            raise MaskkitError(f"no checkpoint in {run_dir} to resume from; start the run without --resume")
        found = checkpoint.find_checkpoint(run_dir)
        if extend_steps:
            cfg = extended(cfg, extend_steps)
            tcfg = cfg.train
        state = checkpoint.read_state(found)
        check_resume_config(cfg, state.get("config") or {}, run_dir, extend_steps)
        check_world_size(state, info.world_size, found, allow_reshard)
    else:
        _refuse_a_second_run(run_dir)
        if tcfg.init_from:
            initial = checkpoint.find_checkpoint(tcfg.init_from)
            checkpoint.load_weights(method, initial)
            if info.is_main:
                log.info("initialised the weights from %s", initial)
    if tcfg.activation_checkpointing:
        distributed.checkpoint_activations(method)

    # train.parallel=fsdp2 writes sharded checkpoints (DCP) even on one rank, so that the run resumes on any number.
    sharded_checkpoints = tcfg.parallel == "fsdp2"
    # Sharded wherever a process group exists: torchrun with several ranks, or one that a caller initialised
    # (benchmarks/cuda_fsdp2_check.py runs FSDP2 on one GPU under NCCL).
    sharded = sharded_checkpoints and torch.distributed.is_initialized()
    # Under FSDP2, rank 0 keeps a whole copy of the method for what it does alone (validation, the figures and
    # exports at the end), refreshed from the shards before each use (`_refresh`): one more copy of the
    # weights, where the gradients and the optimizer's moments stay sharded.
    whole = method if not sharded else copy.deepcopy(method) if info.is_main else None
    mixed_precision = sharded and tcfg.precision == "bf16" and info.device.type == "cuda"
    replicated = distributed.shard(method, info, bf16=mixed_precision) if sharded else []
    peak_lr = peak_learning_rate(cfg.optim, tcfg.batch_size)
    optimizer = build_optimizer(method, cfg.optim, peak_lr)

    start_step, rng_state, final_loss, best_value = 0, None, math.nan, None
    if resume:
        if checkpoint.is_sharded(found):
            start_step, rng_state = checkpoint.load_sharded_training_state(method, optimizer, found)
        else:
            checkpoint.load_weights(method, found)
            start_step, rng_state = checkpoint.load_training_state(optimizer, found, state)
        final_loss = state.get("loss") if state.get("loss") is not None else math.nan
        best_value = checkpoint.best_value(run_dir, tcfg.best_by)
        if info.is_main:
            log.info("resumed from %s at step %d", found, start_step)
            if extend_steps:
                log.info("extended to %d steps: the schedules are those of a %d-step run from here on",
                         tcfg.steps, tcfg.steps)

    # The data first: a data set that cannot be used fails before the run directory is touched.
    # A resumed text run reads the vocabulary it started with, whatever data.tokenizer's file holds now.
    data_cfg = run_vocabulary(cfg.data, run_dir) if resume else cfg.data
    data = build_data(data_cfg, "train")
    method.check_data(data)
    # Every rank builds it, so that a data set without a held-out split fails on all of them alike.
    held_out = HeldOut(data_cfg, tcfg, cfg.eval) if tcfg.eval_every else None
    if extend_steps:
        collectives.barrier()   # every rank has read the run's total before rank 0 records the new one
    if info.is_main:
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            if lock.fd is None:
                # The folder did not exist when this run started: another may have made it (and finished) since.
                lock.acquire()
                if not resume:
                    _refuse_a_second_run(run_dir)
            for stale in checkpoint.remove_stale_temporaries(run_dir):
                log.info("removed %s, left by a process that died while writing it", stale)
            if not resume:
                save_config(cfg, run_dir / "config.yaml")
                pin_vocabulary(cfg.data, data.tokenizer, run_dir)
    config_dict = config_to_dict(cfg)
    if info.is_main and extend_steps:
        with writing(run_dir):
            checkpoint.record_config(found, config_dict)
            save_config(cfg, run_dir / "config.yaml")

    sampler = StepSampler(len(data.dataset), tcfg.batch_size, info.rank, info.world_size,
                          tcfg.accumulation_steps, tcfg.seed, start_step)
    loader = DataLoader(data.dataset, batch_sampler=sampler, collate_fn=data.collate,
                        num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda")
    batches = iter(loader)
    if rng_state is not None:
        checkpoint.restore_rng(rng_state)

    if tcfg.compile:
        separate_cache_per_kernel_set()
        # In place (Module.compile), so the state dict's names, the checkpoints and DDP see the same module.
        method.compile()
    model = distributed.wrap(method, info)
    # bf16 autocast on CUDA, or on a CPU with AMX (4x fp32 there; many times slower on a CPU without it).
    if info.is_main and (slow := distributed.slow_precision(tcfg.precision, info.device)):
        log.warning(slow)
    autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16) if tcfg.precision == "bf16"
                else contextlib.nullcontext())
    # FSDP2's mixed-precision policy casts the sharded units itself; validation on the whole copy autocasts.
    step_autocast = contextlib.nullcontext() if mixed_precision else autocast
    # The name of a sharded checkpoint's temporary folder: rank 0's PID, which every rank must know.
    writer_pid = (int(collectives.all_reduce_sum(torch.tensor(os.getpid() if info.is_main else 0, device=info.device)))
                  if sharded else os.getpid())
    with writing(run_dir):
        metrics_file = start_metrics(run_dir / "metrics.jsonl", start_step if resume else None) if info.is_main else None
        writer = _metrics_writer(run_dir) if info.is_main else None
    end_step = min(tcfg.steps, stop_at_step) if stop_at_step is not None else tcfg.steps
    progress = Progress(f"{cfg.method} {cfg.name}", start_step, tcfg.steps, enabled=progress and info.is_main)
    unreadable: set[str] = set()
    samples_seen, tic = 0, time.perf_counter()
    method.train()
    step = start_step
    last_batch = None   # this rank's last readable micro-batch (raw): the figures, and a stand-in (see below)
    try:
        for step in range(start_step, end_step):
            lr = lr_at(step, tcfg.steps, peak_lr, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [next(batches) for _ in range(tcfg.accumulation_steps)]
            for batch in micro_batches:
                for path in batch.pop("unreadable"):
                    if path not in unreadable:
                        unreadable.add(path)
                        report_unreadable(path, "cannot be decoded")
            # Readable samples per micro-batch on this rank, and over all ranks: every rank makes the same
            # decisions from them (which micro-batches run, how losses are weighted), so none waits alone.
            counts = torch.tensor([batch_size_of(b) for b in micro_batches], dtype=torch.float64)
            # One process needs no exchange (and no host-device round trip on a GPU every step).
            global_counts = collectives.all_reduce_sum(counts.to(info.device)).cpu() if info.enabled else counts
            total = float(global_counts.sum())
            running = [m for m in range(tcfg.accumulation_steps) if global_counts[m] > 0]
            step_loss = torch.zeros((), device=info.device)
            logs = {}
            for position, m in enumerate(running):
                batch = micro_batches[m]
                if counts[m] == 0:
                    # Unreadable files left this rank's share empty while other ranks have samples: it
                    # still runs forward/backward (on a stand-in with weight 0) so DDP's all-reduce meets.
                    batch = last_batch if last_batch is not None else _first_readable(data)
                else:
                    last_batch = batch
                prepared = prepare(data, batch, tcfg.seed, info.device)
                prepared["step"], prepared["total_steps"] = step, tcfg.steps    # schedules inside a method
                # The step's loss is the mean over all readable samples of the global batch: DDP averages
                # gradients over ranks, so this rank's mean loss is weighted by its share of the samples.
                weight = float(counts[m]) * info.world_size / total
                sync = position == len(running) - 1 or not info.enabled
                with distributed.no_sync(model, sync), step_autocast:
                    out = model(prepared)
                    loss = out.loss * weight if weight > 0 else out.loss * 0.0
                loss.backward()
                step_loss += loss.detach()
                if weight > 0:
                    logs = out.logs
            samples_seen += int(total)
            done = step + 1
            if not running:
                if info.is_main:
                    log.warning("step %d: every image of the batch was unreadable; no update", step)
            else:
                step_loss = collectives.all_reduce_mean(step_loss)
                loss_value = float(step_loss)
                if not math.isfinite(loss_value):
                    raise MaskkitError(f"non-finite loss ({loss_value}) at step {step}; stopped before the update, "
                                       f"{_last_checkpoint(run_dir)}")
                final_loss = loss_value
                distributed.average_gradients(replicated)
                if cfg.optim.clip_grad > 0:
                    grad_norm = distributed.clip_gradients(model, cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step(step, tcfg.steps)
                if info.is_main and (done % tcfg.log_every == 0 or done == end_step):
                    elapsed = time.perf_counter() - tic
                    row = {"step": done, "epoch": round(sampler.epoch_of(done), 4), "loss": loss_value, "lr": lr,
                           "samples_per_s": samples_seen / max(elapsed, 1e-9)}
                    row.update({k: float(v) for k, v in logs.items() if k != "loss"})
                    if cfg.optim.clip_grad > 0:
                        row["grad_norm"] = float(grad_norm)
                    if unreadable:
                        row["unreadable_files"] = len(unreadable)
                    _write_row(metrics_file, writer, row, "train", run_dir)
                    progress.report(row)
                    samples_seen, tic = 0, time.perf_counter()
            # Rank 0 alone measures (on its own copy of the weights: DDP's wrapper is not called, so no rank
            # waits for a collective the others never reach; under FSDP2 every rank first gathers the whole
            # weights into rank 0's copy); the others wait at the next step's all-reduce.
            measured = {}
            measuring = held_out is not None and (done % tcfg.eval_every == 0 or done == tcfg.steps)
            if measuring:
                if sharded:
                    _refresh(whole, method)
                if info.is_main:
                    measured = {"val_loss": held_out.loss(whole, info.device, autocast)}
                    knn = held_out.knn(whole, info.device, autocast)
                    if knn is not None:
                        measured["val_knn"] = knn
                    _write_row(metrics_file, writer, {"step": done, **measured}, "val", run_dir)
                    progress.report_val(measured)
            value = measured.get(tcfg.best_by)
            improved = tcfg.keep_best and value is not None and math.isfinite(value) and (
                best_value is None or (value > best_value if tcfg.best_by == "val_knn" else value < best_value))
            if sharded and measuring:     # rank 0 decided; all ranks write a sharded checkpoint
                improved = bool(collectives.all_reduce_sum(torch.tensor(float(improved), device=info.device)) > 0)
            progress.update(done)
            if done % tcfg.checkpoint_every == 0 or done == end_step or improved:
                saved = None
                if sharded_checkpoints:
                    saved = checkpoint.save_sharded_checkpoint(
                        run_dir, method, optimizer, done, config_dict, tcfg.keep_checkpoints, writer_pid,
                        info.is_main, info.world_size, loss=final_loss, measured=measured)
                elif info.is_main:
                    saved = checkpoint.save_checkpoint(run_dir, method, optimizer, done, config_dict,
                                                       tcfg.keep_checkpoints, loss=final_loss, measured=measured,
                                                       world_size=info.world_size)
                if improved and info.is_main:
                    checkpoint.mark_best(run_dir, saved, tcfg.keep_checkpoints)
                    best_value = value
        step = end_step
    finally:
        progress.close()
        # Every row was flushed when written, so closing can fail only after a write did, and that failure
        # is the error on its way up; a second one raised here would hide it.
        if metrics_file is not None:
            with contextlib.suppress(OSError):
                metrics_file.close()
        if writer is not None:
            with writing(run_dir / "tensorboard"):
                writer.close()

    unreadable = collectives.union_of_sets(unreadable)
    backbone_path = None
    if step == tcfg.steps and sharded:
        _refresh(whole, method)
    if info.is_main and step == tcfg.steps:
        # The training itself is in the last checkpoint: resuming the finished run writes these again.
        with writing(run_dir, f"; {_last_checkpoint(run_dir)} (--resume writes the exports and figures again)"):
            for name, (module, module_cfg) in whole.exports().items():
                path = checkpoint.export_module(module, module_cfg, run_dir / f"{name}.safetensors")
                backbone_path = path if name == "backbone" else backbone_path
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
            if last_batch is not None:
                whole.save_figures(prepare(data, last_batch, tcfg.seed, info.device), run_dir, data.denormalize)
    if info.is_main and unreadable:
        log.warning("skipped %d unreadable image files during training (each named above)", len(unreadable))
    collectives.barrier()
    return TrainResult(run_dir=run_dir, final_step=step, final_loss=final_loss, backbone_path=backbone_path)


def _refresh(whole, method) -> None:
    """Gather an FSDP2 method's shards into rank 0's whole copy (every rank calls it; `whole` is None elsewhere)."""
    weights = distributed.full_state_dict(method)
    if whole is not None:
        whole.load_state_dict(weights, strict=False)


def _write_row(metrics_file, writer, row: dict, group: str, run_dir: Path) -> None:
    """One metrics.jsonl row (flushed: a kill keeps it), and the same scalars in TensorBoard under `group`."""
    try:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if writer is not None:
            for key, value in row.items():
                if key != "step":
                    writer.add_scalar(f"{group}/{key}", value, row["step"])
    except OSError as error:
        raise MaskkitError(f"{cannot_write(run_dir / 'metrics.jsonl', error)}; {_last_checkpoint(run_dir)}") from None


class HeldOut:
    """Validation: the method's own loss on a fixed set of held-out samples, the same measurement every time.

    The samples are the first train.eval_samples of the held-out split (`build_held_out`: text's "val", the
    others' "test"), never training data, collated once into batches of train.batch_size /
    train.accumulation_steps (what one process of a one-rank run feeds the method, whatever the number of
    ranks); only full batches are used when there is more than one, since a contrastive loss depends on the
    batch's size. `train.keep_best` keeps the checkpoint of the lowest (finite) held-out loss: lower is better. The method runs
    in eval mode (no dropout, no masking where a method turns it off outside training, nothing queued) with
    gradients off, and each sample's crops and masks come from its key of (seed, epoch 0, held-out index).
    The global generators are forked around it, so the training's random streams, its data order and thus
    its weights are those of a run without validation.
    """

    def __init__(self, data_cfg, tcfg, ecfg=None):
        split = "val" if data_cfg.kind == "text" else "test"
        self.data, self.seed = build_held_out(data_cfg), tcfg.seed
        count = min(len(self.data.dataset), tcfg.eval_samples)
        if count == 0:
            raise MaskkitError(f"train.eval_every={tcfg.eval_every} measures the held-out ({split}) split, but "
                               f"data.name={data_cfg.name} holds none; set train.eval_every=0")
        size = min(tcfg.batch_size // tcfg.accumulation_steps, count)
        count = count - count % size
        self.batches = _collated(self.data.dataset, count, size, self.data.collate)
        if not self.batches:
            raise MaskkitError(f"train.eval_every: no readable sample among the first {count} of the {split} split")
        self.knn_sets = self.normalize = None
        if data_cfg.kind == "image" and tcfg.knn_bank:
            self._prepare_knn(data_cfg, tcfg, ecfg or EvalConfig())

    def _prepare_knn(self, data_cfg, tcfg, ecfg) -> None:
        """The kNN protocol's two sets, as `maskkit eval --protocol knn` reads them (the labelled train and test
        splits, un-augmented), cut to train.knn_bank and train.eval_samples images and collated once."""
        try:
            bank, queries = labelled_dataset(data_cfg, "train"), labelled_dataset(data_cfg, "test")
        except MaskkitError as error:
            if tcfg.best_by == "val_knn":
                raise MaskkitError(f"train.best_by=val_knn: {error}") from None
            log.info("validation measures the held-out loss only (no kNN accuracy): %s", error)
            return
        self.num_classes, self.ecfg = bank.dataset.num_classes, ecfg
        self.knn_sets = [_collated(dataset, min(len(dataset), limit), 256, collate)
                         for dataset, limit in ((bank, tcfg.knn_bank), (queries, tcfg.eval_samples))]
        if not all(self.knn_sets):
            raise MaskkitError("train.knn_bank: no readable labelled image for the kNN accuracy; set train.knn_bank=0")
        self.normalize = ImageAugment(data_cfg).normalize

    def loss(self, method, device: torch.device, autocast) -> float:
        """The mean loss per held-out sample."""
        total, samples = 0.0, 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # Anything a method draws from the global generators is drawn alike at every measurement.
            torch.random.default_generator.manual_seed(self.seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(self.seed)
            method.eval()
            try:
                with torch.no_grad(), autocast:
                    for batch in self.batches:
                        size = batch_size_of(batch)
                        total += float(method(prepare(self.data, batch, self.seed, device)).loss) * size
                        samples += size
            finally:
                method.train()
        return total / samples

    def knn(self, method, device: torch.device, autocast) -> float | None:
        """The kNN accuracy of the method's backbone (None when this run measures none: text, pairs, no
        labels): each held-out image's eval.knn_k most similar bank images vote with exp(cosine / T)."""
        if self.knn_sets is None or not isinstance(method.backbone, ViT):
            return None
        backbone, was_training = method.backbone, method.backbone.training
        features = []
        backbone.eval()
        try:
            with torch.no_grad(), autocast:
                for batches in self.knn_sets:
                    features.append((torch.cat([backbone.features(self.normalize(b["images"].to(device)), self.ecfg.pool)
                                                for b in batches]).float(),
                                     torch.cat([b["label"] for b in batches])))
        finally:
            backbone.train(was_training)
        (bank, bank_labels), (queries, labels) = features
        return knn_accuracy(bank, bank_labels, queries, labels, self.ecfg.knn_k, self.ecfg.knn_temperature,
                            self.num_classes)


def _collated(dataset, count: int, size: int, collate_items) -> list[dict]:
    """The first `count` items in batches of `size`, unreadable ones named and dropped (so is an empty batch)."""
    batches = []
    for start in range(0, count, size):
        batch = collate_items([dataset[index] for index in range(start, min(start + size, count))])
        for path in batch.pop("unreadable"):
            report_unreadable(path, "cannot be decoded")
        if batch_size_of(batch):
            batches.append(batch)
    return batches


def _first_readable(data: Data) -> dict:
    """A one-sample batch of the first decodable item: the stand-in for a rank left without samples."""
    for index in range(len(data.dataset)):
        batch = data.collate([data.dataset[index]])
        if batch_size_of(batch):
            batch.pop("unreadable")
            return batch
    raise MaskkitError("no readable sample in the training set")


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) a plain line at most every 15 s and at the end."""

    def __init__(self, description: str, start: int, total: int, enabled: bool = True):
        self.description, self.total, self.enabled = description, total, enabled
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc=description, dynamic_ncols=True, disable=not self.terminal)
        self.last_line, self.row, self.measured = time.perf_counter(), None, {}

    def report(self, row: dict) -> None:
        self.row = row
        if self.terminal:
            self.bar.set_postfix(self._postfix())

    def report_val(self, measured: dict) -> None:
        self.measured = measured
        if self.terminal:
            self.bar.set_postfix(self._postfix())

    def _postfix(self) -> dict:
        row, shown = self.row or {}, {}
        if row:
            shown = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "per_s": f"{row['samples_per_s']:.0f}"}
        if "val_loss" in self.measured:
            shown["val"] = f"{self.measured['val_loss']:.4f}"
        if "val_knn" in self.measured:
            shown["knn"] = f"{self.measured['val_knn']:.3f}"
        return shown

    def update(self, done: int) -> None:
        if self.terminal:
            self.bar.update(done - self.bar.n)
        elif self.enabled and self.row is not None and (
            done == self.total or time.perf_counter() - self.last_line >= 15
        ):
            row = self.row
            held_out = f"  held-out loss {self.measured['val_loss']:.4f}" if "val_loss" in self.measured else ""
            held_out += f"  kNN {self.measured['val_knn']:.3f}" if "val_knn" in self.measured else ""
            log.info("%s: step %d/%d  loss %.4f  lr %.2e  %.0f samples/s%s", self.description, row["step"], self.total,
                     row["loss"], row["lr"], row["samples_per_s"], held_out)
            self.last_line, self.row = time.perf_counter(), None

    def close(self) -> None:
        self.bar.close()


def prepare(data: Data, batch: dict, seed: int, device: torch.device) -> dict:
    """The data layer's `prepare`, with each sample's key of (run seed, epoch, index) computed on `device`."""
    keys = sample_keys(seed, batch["epoch"], batch["index"]).to(device, non_blocking=True)   # B numbers
    return data.prepare(batch, keys, device)
