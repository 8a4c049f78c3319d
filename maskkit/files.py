"""Small file helpers that training, evaluation and the demo share: atomic writes, write errors, file modes, plots."""

import contextlib
import os
import re
from pathlib import Path

from safetensors import SafetensorError

from maskkit.errors import MaskkitError


def cannot_write(path: Path, error: Exception) -> str:
    """'cannot write PATH: CAUSE' for a failed write (a read-only folder, a full disk).

    PATH is what the caller writes (a run directory, a checkpoint), not the temporary the error may
    name. safetensors' error wraps the cause ("Error while serializing: I/O error: No space left on
    device (os error 28)"); it is unwrapped to read as an OSError's does.
    """
    if isinstance(error, OSError) and error.strerror:
        return f"cannot write {path}: {error.strerror}"
    cause = re.sub(r" \(os error \d+\)$", "", str(error).split("I/O error: ")[-1])
    return f"cannot write {path}: {cause}"


@contextlib.contextmanager
def writing(path: Path, consequence: str = ""):
    """Turn a failed write inside the block into one MaskkitError: the path, the cause, then `consequence`."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise MaskkitError(cannot_write(path, error) + consequence) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write under a temporary name (carrying this PID) and rename: readers see the old file or the new.

    A failed write (a full disk) removes its temporary, so it leaves the old file and nothing else.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):     # a read-only folder has no temporary to remove
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a finished file the mode `open()` would (0644 under the usual umask): safetensors writes 0600."""
    os.chmod(path, 0o666 & ~_umask())


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(rows: dict, title: str, path: Path, dpi: int = 120) -> Path:
    """A figure of image rows ({row title: (B, C, H, W) pixels in [0, 1]}), one column per image."""
    plt = pyplot()
    columns = len(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.7 * len(rows)), squeeze=False)
    for r, (row_title, images) in enumerate(rows.items()):
        for c in range(columns):
            axes[r][c].imshow(images[c].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().squeeze())
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(row_title)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
