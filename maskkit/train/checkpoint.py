"""Checkpoints: safetensors for tensors, JSON for the rest, each written atomically.

    RUN/checkpoints/step_000200/model.safetensors      method weights (frozen parts left out)
                               /optimizer.safetensors  optimizer moments + RNG states
                               /state.json             step, optimizer hyper-parameters, config, method
    RUN/checkpoints/latest                             name of the newest complete checkpoint
    RUN/checkpoints/best                               train.keep_best: name of the best one by train.best_by

A checkpoint directory is filled under a temporary name and renamed when complete, and `latest` is
replaced with os.replace, so a crash at any moment leaves every earlier checkpoint intact. Temporaries
carry the writer's PID; those of processes that are no longer alive are removed when a run starts
(`remove_stale_temporaries`). Nothing is ever unpickled, except in sharded checkpoints (below).

A train.parallel=fsdp2 run writes its sharded checkpoints with torch.distributed.checkpoint (DCP), each rank
its own slices, in place of the two safetensors files:

    RUN/checkpoints/step_000200/sharded/               DCP: __RANK_0.distcp per rank, .metadata
                               /rng.safetensors        RNG states
                               /state.json             as above, plus "parallel" and "world_size"

DCP's .metadata file is a pickle: load sharded checkpoints of your own runs only. `maskkit export RUN --to
safetensors DIR` turns one into a checkpoint of the first kind (whole tensors, no pickle) that loads anywhere.
"""

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maskkit.errors import MaskkitError
from maskkit.files import atomic_write_text, cannot_write, publish_mode, writing

FORMAT_VERSION = 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove `*.tmp-PID` files and `.tmp-*-PID` directories left by processes that died while writing."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if not path.name.startswith(".") or "tmp-" not in path.name:
                continue
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _places(run_dir: Path, step: int, writer_pid: int) -> tuple[Path, str, Path, str]:
    """(checkpoints folder, the checkpoint's name, its temporary folder, what a failure leaves, for the error)."""
    directory = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    latest = directory / "latest"
    previous = (f"the previous checkpoint {directory / latest.read_text().strip()} is intact" if latest.is_file()
                else "no checkpoint was written before")
    return directory, name, directory / f".tmp-{name}-{writer_pid}", previous


def save_checkpoint(run_dir: Path, method, optimizer, step: int, config: dict, keep: int = 2,
                    loss: float | None = None, measured: dict | None = None, world_size: int = 1) -> Path:
    """Write checkpoint `step` (the number of optimizer steps done) and point `latest` at it.

    `loss` is the training loss of the last step, so resuming a finished run can report it; `measured` what
    validation measured at this step, if it did ({"val_loss", "val_knn"}: what `best` is chosen by). The checkpoint named in
    `best` is never pruned: `keep` counts the others. A failed
    write (a full disk, a read-only folder) removes its partial checkpoint and raises a MaskkitError
    naming the file and the cause; `latest` still points at the previous checkpoint, which is untouched.
    """
    directory, name, tmp, previous = _places(run_dir, step, os.getpid())
    try:
        _write_checkpoint(directory, tmp, name, method, optimizer, step, config, loss, measured or {}, world_size)
    except (OSError, SafetensorError) as error:
        # Free what the failed write took (on a full disk, that is what the next try needs).
        shutil.rmtree(tmp, ignore_errors=True)
        raise MaskkitError(f"{cannot_write(directory / name, error)}; {previous}") from None
    _prune(directory, keep, protect=name)
    return directory / name


def _write_checkpoint(directory: Path, tmp: Path, name: str, method, optimizer, step: int, config: dict,
                      loss: float | None, measured: dict, world_size: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = _whole_tensors(method.trainable_state_dict())
    save_file(weights, tmp / "model.safetensors", metadata={"method": method.name})
    publish_mode(tmp / "model.safetensors")
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    optim_tensors.update(_rng_tensors())
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    publish_mode(tmp / "optimizer.safetensors")
    _finish(directory, tmp, name, _state(method, step, config, loss, measured, world_size, optimizer=optim_meta))


def _whole_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What safetensors writes: detached, on the CPU, contiguous."""
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors


def _state(method, step: int, config: dict, loss, measured: dict, world_size: int, **more) -> dict:
    return {"format": FORMAT_VERSION, "method": method.name, "step": step, "time": time.time(), "loss": loss,
            "val_loss": measured.get("val_loss"), "val_knn": measured.get("val_knn"), "world_size": world_size,
            **more, "config": config}


def _finish(directory: Path, tmp: Path, name: str, state: dict) -> None:
    """state.json last, then the rename and `latest`: until then the checkpoint does not exist."""
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(directory / "latest", name + "\n")


def save_sharded_checkpoint(run_dir: Path, method, optimizer, step: int, config: dict, keep: int, writer_pid: int,
                            is_main: bool, world_size: int, loss: float | None = None,
                            measured: dict | None = None) -> Path:
    """A train.parallel=fsdp2 checkpoint (see the module docstring); every rank calls it, with the same
    `writer_pid` (rank 0's, which names the temporary folder and lets a later run tell that it is stale).

    DCP writes every rank's slices into the temporary folder; rank 0 then adds the RNG states and state.json
    and renames it, so a kill at any moment (of any rank) leaves `latest` on the previous, complete one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from maskkit import collectives

    directory, name, tmp, previous = _places(run_dir, step, writer_pid)
    try:
        if is_main:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        collectives.barrier()
        state = {"model": method.trainable_state_dict(), "optimizer": get_optimizer_state_dict(method, optimizer)}
        with _quiet_in_one_process():
            dcp.save(state, checkpoint_id=tmp / "sharded")
        if is_main:
            save_file(_rng_tensors(), tmp / "rng.safetensors")
            publish_mode(tmp / "rng.safetensors")
            _finish(directory, tmp, name, _state(method, step, config, loss, measured or {}, world_size,
                                                 parallel="fsdp2", optimizer=None))
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MaskkitError(f"{cannot_write(directory / name, error)}; {previous}") from None
    if is_main:
        _prune(directory, keep, protect=name)
    collectives.barrier()        # no rank goes on (to the next save, or to reading it) before it is complete
    return directory / name


def save_whole_checkpoint(method, source: Path, directory: Path) -> None:
    """`maskkit export RUN --to safetensors DIR`: the weights of checkpoint `source` (loaded into `method`) as a
    checkpoint of whole tensors, model.safetensors + state.json, without optimizer state: what `maskkit eval`,
    `export` and train.init_from read anywhere, with nothing to unpickle (a sharded checkpoint's metadata is)."""
    state = read_state(source)
    state.update(optimizer=None, exported_from=str(source))
    state.pop("parallel", None)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-model-{os.getpid()}.safetensors"
    save_file(_whole_tensors(method.trainable_state_dict()), tmp, metadata={"method": method.name})
    publish_mode(tmp)
    os.replace(tmp, directory / "model.safetensors")
    atomic_write_text(directory / "state.json", json.dumps(state, indent=1))


def is_sharded(checkpoint: Path) -> bool:
    return (Path(checkpoint) / "sharded").is_dir()


def _prune(directory: Path, keep: int, protect: str) -> None:
    best = directory / "best"
    kept = {protect, best.read_text().strip()} if best.is_file() else {protect}
    checkpoints = sorted(p for p in directory.glob("step_*") if p.is_dir() and p.name not in kept)
    for old in checkpoints[: max(0, len(checkpoints) + 1 - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def mark_best(run_dir: Path, checkpoint: Path, keep: int) -> None:
    """Point RUN/checkpoints/best at `checkpoint`, the newest one (atomically, like `latest`); the previous
    best is now pruned like any other, so `keep` checkpoints remain besides the best."""
    directory = Path(run_dir) / "checkpoints"
    with writing(directory / "best"):
        atomic_write_text(directory / "best", checkpoint.name + "\n")
    _prune(directory, keep, protect=checkpoint.name)


def best_value(run_dir: Path, key: str = "val_loss") -> float | None:
    """What validation measured (`key`: val_loss or val_knn) at the checkpoint `best` names (None without one,
    or when it was not measured there): what a resumed run must beat."""
    best = Path(run_dir) / "checkpoints" / "best"
    if not best.is_file():
        return None
    found = best.parent / best.read_text().strip()
    return read_state(found).get(key) if (found / "state.json").is_file() else None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its `checkpoints/` folder, or the directory itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MaskkitError(f"checkpoint path {path} does not exist")
    if (path / "state.json").is_file():
        return path
    for folder in (path / "checkpoints", path):
        latest = folder / "latest"
        if latest.is_file():
            found = folder / latest.read_text().strip()
            if (found / "state.json").is_file():
                return found
            raise MaskkitError(f"{latest} points to {found.name}, which is missing or incomplete")
    raise MaskkitError(f"no checkpoint in {path} (expected state.json or checkpoints/latest)")


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MaskkitError(f"{checkpoint / 'state.json'}: unreadable checkpoint state ({error})") from None
    if state.get("format") != FORMAT_VERSION:
        raise MaskkitError(f"{checkpoint / 'state.json'}: format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise MaskkitError(f"{path}: unreadable safetensors file ({error})") from None


def check_state_dict(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """Fail with the file and the first offending keys when `weights` does not fit a model's state dict."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise MaskkitError(
            f"{file} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            " (was it written with another model size?)"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise MaskkitError(
                f"{file}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )


def _state_of_method(method, checkpoint: Path) -> dict:
    """state.json of `checkpoint`, refused when another method wrote it."""
    state = read_state(checkpoint)
    if state["method"] != method.name:
        raise MaskkitError(f"{checkpoint} is a {state['method']!r} checkpoint, but the config trains {method.name!r}")
    return state


def load_weights(method, checkpoint: Path) -> dict:
    """Load method weights from a checkpoint; refuses another method's checkpoint. Returns state.json."""
    state = _state_of_method(method, checkpoint)
    if is_sharded(checkpoint):
        weights = _load_sharded_weights(method, checkpoint)
    else:
        weights = _load_safetensors(checkpoint / "model.safetensors")
        check_state_dict(weights, method.trainable_state_dict(), checkpoint / "model.safetensors")
    method.load_state_dict(weights, strict=False)
    return state


def _sharded_metadata(checkpoint: Path):
    """The DCP metadata of a sharded checkpoint (a pickle: see the module docstring)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(checkpoint / "sharded")).read_metadata()
    except Exception as error:        # a missing, truncated or foreign .metadata: DCP raises many kinds
        raise MaskkitError(f"{checkpoint / 'sharded'}: unreadable sharded checkpoint ({error})") from None


def _check_sharded_fits(method, checkpoint: Path) -> None:
    """The sharded checkpoint's tensor names and shapes (from its metadata, nothing loaded) against the method's."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {key[len("model."):]: torch.empty(meta.size, device="meta") for key, meta in
             _sharded_metadata(checkpoint).state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    check_state_dict(saved, method.trainable_state_dict(), checkpoint / "sharded")


def _load_sharded_weights(method, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of a sharded checkpoint, read into this process (any number of ranks wrote
    it; DCP reassembles them), checked against the method first."""
    import torch.distributed.checkpoint as dcp

    _check_sharded_fits(method, checkpoint)
    weights = {key: torch.empty_like(value, device="cpu") for key, value in method.trainable_state_dict().items()}
    with _quiet_in_one_process(), _named_failures(checkpoint):
        dcp.load({"model": weights}, checkpoint_id=checkpoint / "sharded", no_dist=True)
    return weights


@contextlib.contextmanager
def _named_failures(checkpoint: Path):
    """A shard file missing or cut short: DCP raises OSError, or its CheckpointException (a BaseException)
    holding each rank's traceback, of which the last line names the cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        first = (lines[-1] if isinstance(error, CheckpointException) else lines[0]) if lines else type(error).__name__
        raise MaskkitError(f"{checkpoint / 'sharded'}: cannot read the sharded checkpoint ({first[:200]})") from None


@contextlib.contextmanager
def _quiet_in_one_process():
    """DCP warns that it is "assuming the intent is to load (save) in a single process" when it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def load_sharded_training_state(method, optimizer, checkpoint: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """Resume a train.parallel=fsdp2 run (every rank calls it): weights and optimizer state, each rank reading
    its own slices, whatever number of ranks wrote them. Returns the step and the saved RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = _state_of_method(method, checkpoint)
    _check_sharded_fits(method, checkpoint)
    loaded = {"model": method.trainable_state_dict(), "optimizer": get_optimizer_state_dict(method, optimizer)}
    with _quiet_in_one_process(), _named_failures(checkpoint):
        dcp.load(loaded, checkpoint_id=checkpoint / "sharded")
    method.load_state_dict(loaded["model"], strict=False)
    set_optimizer_state_dict(method, optimizer, optim_state_dict=loaded["optimizer"])
    return int(state["step"]), _load_safetensors(checkpoint / "rng.safetensors")


def record_config(checkpoint: Path, config: dict) -> None:
    """Replace the config in `checkpoint`'s state.json (atomically; the tensors are untouched): how
    --extend-steps records the run's new total, so that a resume from this checkpoint continues to it."""
    state = read_state(checkpoint)
    state["config"] = config
    with writing(checkpoint / "state.json"):
        atomic_write_text(checkpoint / "state.json", json.dumps(state, indent=1))


def load_training_state(optimizer, checkpoint: Path, state: dict) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore optimizer moments; returns the step to continue from and the saved RNG states."""
    tensors = _load_safetensors(checkpoint / "optimizer.safetensors")
    _restore_optimizer(optimizer, tensors, state["optimizer"])
    return int(state["step"]), {k: v for k, v in tensors.items() if k.startswith("rng.")}


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore the global generators (call it last: building a DataLoader iterator draws from them)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def export_module(module, config: dict, path: Path) -> Path:
    """One exported network (the ViT encoder, a text tower) plus its config, for downstream use."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    weights = _whole_tensors(module.state_dict())
    try:
        save_file(weights, tmp, metadata={"config": json.dumps(config)})
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)       # a full disk: leave no half-written file taking its space
        raise
    return path
