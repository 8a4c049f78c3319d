"""`maskkit demo`: the main job on a fresh machine, with no data of the user's.

Pretrains MAE-tiny (recipe `mae/tiny`) on random crops of the scikit-image photographs plus sklearn's
handwritten digits, then evaluates the encoder on digits with a kNN classifier and a linear probe,
next to the same ViT with random weights, and prints what pretraining bought. Run it again and it
resumes (or, when training is complete, only evaluates).
"""

import json
import logging
import time
from pathlib import Path

from maskkit.config import load_config
from maskkit.eval.run import evaluate_backbones, load_backbone
from maskkit.files import atomic_write_text, pyplot
from maskkit.train.loop import train

log = logging.getLogger("maskkit")
PROTOCOLS = ("knn", "linear")


def demo(out_dir: Path, overrides: list[str] = (), progress: bool = True) -> dict:
    cfg = load_config("mae/tiny", overrides)
    resume = (out_dir / "checkpoints" / "latest").exists()
    log.info("pretraining MAE-tiny on %s for %d steps into %s%s", cfg.data.name, cfg.train.steps, out_dir,
             " (resuming)" if resume else "")
    start = time.perf_counter()
    result = train(cfg, out_dir, resume=resume, progress=progress)
    train_seconds = time.perf_counter() - start

    backbone, run_cfg = load_backbone(out_dir)
    log.info("evaluating on digits (kNN and linear probe), pretrained vs random init")
    results = evaluate_backbones(backbone, run_cfg, PROTOCOLS, seed=cfg.train.seed, progress=progress)

    summary = {
        "steps": result.final_step,
        "final_loss": result.final_loss,
        "train_seconds": round(train_seconds, 1),
        **{protocol: {k: results[protocol][k] for k in ("pretrained", "random_init")} for protocol in PROTOCOLS},
    }
    atomic_write_text(out_dir / "demo.json", json.dumps(summary, indent=1) + "\n")
    plot_comparison(summary, out_dir / "accuracy.png")
    print(format_table(summary, out_dir))
    return summary


def format_table(summary: dict, out_dir: Path) -> str:
    names = {"knn": "kNN (k=20, T=0.07)", "linear": "linear probe"}
    lines = [
        "",
        f"MAE-tiny, {summary['steps']} steps, final loss {summary['final_loss']:.4f}; digits test accuracy:",
        f"  {'protocol':<20} {'random init':>12} {'MAE':>8} {'gain':>8}",
    ]
    for protocol in PROTOCOLS:
        random_init, pretrained = summary[protocol]["random_init"], summary[protocol]["pretrained"]
        lines.append(
            f"  {names[protocol]:<20} {random_init:>12.3f} {pretrained:>8.3f} {pretrained - random_init:>+8.3f}"
        )
    lines.append(f"figures: {out_dir}/reconstruction.png, loss_curve.png, accuracy.png; numbers: demo.json")
    return "\n".join(lines)


def plot_comparison(summary: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    positions = range(len(PROTOCOLS))
    for offset, key, label in ((-0.2, "random_init", "random init"), (0.2, "pretrained", "MAE")):
        bars = ax.bar([p + offset for p in positions], [summary[p][key] for p in PROTOCOLS], 0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(list(positions), ["kNN", "linear probe"])
    ax.set_ylabel("digits test accuracy")
    ax.set_ylim(0, 1.1)
    ax.legend(loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
