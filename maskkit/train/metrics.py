"""RUN/metrics.jsonl: one JSON row per logged step, kept true to the checkpoints after a crash.

Training rows hold "loss" (and lr, samples/s, ...); validation rows (train.eval_every) are rows of their
own, {"step": s, "val_loss": ..., "val_knn": ...} (val_knn for image backbones), so a reader picks a curve by its key.

A run killed between two checkpoints has logged steps that its resumed continuation will log again,
and a kill during a write can leave a torn last line. `start_metrics` therefore keeps exactly the rows
up to the step the run continues from (dropping torn lines), and a fresh run starts an empty file.
"""

import json
import logging
import os
from pathlib import Path

from maskkit.files import pyplot

log = logging.getLogger("maskkit")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file; lines that are not complete JSON objects (a torn write) are skipped."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def start_metrics(path: Path, resume_step: int | None):
    """Open the metrics file for appending: emptied for a fresh run, cut back to `resume_step` on resume."""
    path = Path(path)
    rows = [] if resume_step is None else [r for r in read_metrics(path) if r["step"] <= resume_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
    return open(path, "a")


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    """The training loss against the step, the held-out loss (val_loss rows) and the kNN accuracy (val_knn rows,
    on a right-hand axis) when the run measured them."""
    plt = pyplot()
    all_rows = read_metrics(metrics_path)
    rows = [r for r in all_rows if "loss" in r]
    held_out = [r for r in all_rows if "val_loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training")
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["val_loss"] for r in held_out], marker="o", markersize=3,
                label="held-out (eval mode)")
        ax.legend(loc="upper center")
    knn = [r for r in all_rows if "val_knn" in r]
    if knn:
        right = ax.twinx()      # accuracy on its own axis: a fraction next to a loss of another scale
        right.plot([r["step"] for r in knn], [r["val_knn"] for r in knn], color="tab:green", marker="s",
                   markersize=3, label="held-out kNN accuracy")
        right.set_ylabel("kNN accuracy", color="tab:green")
        right.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if held_out else "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
