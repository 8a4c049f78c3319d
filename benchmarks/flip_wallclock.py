"""FLIP's central claim, on the shapes world: under the same wall-clock budget, masking half the image
patches (then a short unmasked tuning) reaches better zero-shot accuracy than training unmasked, because
each step costs less and the run sees more pairs (Li et al. 2022, Fig. 1 and Sec 4).

Each setting trains recipe flip/tiny for the number of steps its own measured speed fits in the budget
(so each completes its learning-rate schedule), keeps checkpoints along the way, and zero-shot
accuracy on held-out and on seen (colour, shape) pairs is measured at each. Writes a table and
`flip_wallclock.png` (accuracy against training seconds) to --out.

    python benchmarks/flip_wallclock.py --budget 120      # ~6 minutes on 2 CPU cores
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from maskkit.config import load_config
from maskkit.data import build_data
from maskkit.data.shapes import CLASS_NAMES
from maskkit.eval.run import load_method
from maskkit.eval.zero_shot import SHAPE_TEMPLATES, zero_shot_accuracy
from maskkit.files import pyplot
from maskkit.methods.flip import FLIP
from maskkit.train import checkpoint
from maskkit.train.loop import train

SETTINGS = (("unmasked (CLIP)", 0.0, 0.0), ("mask 0.5 + unmasked tuning", 0.5, 0.1))


def train_step_speeds(configs: list, rounds: int = 5) -> list[float]:
    """Pairs/s of one train step of each config's model on a batch of the real data: measured in rounds
    that take every model in turn (medians), so a busy moment of the machine hits all of them alike."""
    steps = []
    for cfg in configs:
        data = build_data(cfg.data, "train")
        size = cfg.train.batch_size
        batch = data.collate([data.dataset[i] for i in range(size)])
        batch = {**data.prepare(batch, torch.arange(size), torch.device("cpu")), "step": 0, "total_steps": 10**9}
        torch.manual_seed(0)
        model = FLIP(cfg.model).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, batch=batch, optimizer=optimizer):
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        steps.append((step, size))
    speeds = [[] for _ in configs]
    for _ in range(rounds):
        for i, (step, size) in enumerate(steps):
            start = time.perf_counter()
            step()
            speeds[i].append(size / (time.perf_counter() - start))
    return [statistics.median(s) for s in speeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per setting")
    parser.add_argument("--out", default="runs/flip_wallclock")
    parser.add_argument("--points", type=int, default=4, help="checkpoints evaluated per setting")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    probes = [load_config("flip/tiny", [f"model.mask_ratio={mask_ratio}"]) for _, mask_ratio, _ in SETTINGS]
    speeds = train_step_speeds(probes)
    for (name, mask_ratio, tuning), probe, speed in zip(SETTINGS, probes, speeds, strict=True):
        steps = max(args.points, int(args.budget * speed / probe.train.batch_size))
        every = max(1, steps // args.points)
        overrides = [f"model.mask_ratio={mask_ratio}", f"model.unmasked_steps={int(tuning * steps)}",
                     f"train.steps={steps}", f"train.checkpoint_every={every}", "train.keep_checkpoints=100",
                     f"optim.warmup_steps={max(1, steps // 16)}"]
        cfg = load_config("flip/tiny", overrides)
        run_dir = out / name.split(" ")[0].replace("(", "")
        print(f"{name}: {speed:.0f} pairs/s -> {steps} steps in {args.budget:.0f} s", flush=True)
        start = time.perf_counter()
        train(cfg, run_dir, progress=False)
        seconds = time.perf_counter() - start
        held, seen = build_data(cfg.data, "test"), build_data(cfg.data, "seen")
        points = []
        for found in sorted((run_dir / "checkpoints").glob("step_*")):
            method, _ = load_method(found)
            step = checkpoint.read_state(found)["step"]
            points.append({"step": step, "seconds": round(seconds * step / steps, 1),
                           "held_out": zero_shot_accuracy(method, held, CLASS_NAMES, SHAPE_TEMPLATES),
                           "seen": zero_shot_accuracy(method, seen, CLASS_NAMES, SHAPE_TEMPLATES)})
        results[name] = {"pairs_per_s": speed, "steps": steps, "seconds": round(seconds, 1), "points": points}
    (out / "flip_wallclock.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'setting':<28} {'pairs/s':>8} {'steps':>6} {'seconds':>8} {'held-out':>9} {'seen':>6}")
    for name, r in results.items():
        last = r["points"][-1]
        print(f"{name:<28} {r['pairs_per_s']:>8.0f} {r['steps']:>6} {r['seconds']:>8.0f} {last['held_out']:>9.3f} "
              f"{last['seen']:>6.3f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, r in results.items():
        seconds = [p["seconds"] for p in r["points"]]
        line, = ax.plot(seconds, [p["held_out"] for p in r["points"]], marker="o", label=f"{name}: held-out pairs")
        ax.plot(seconds, [p["seen"] for p in r["points"]], marker="x", linestyle="--", color=line.get_color(),
                label=f"{name}: seen pairs")
    ax.axhline(1 / len(CLASS_NAMES), color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("zero-shot accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "flip_wallclock.png", dpi=120)
    print(f"figure: {out / 'flip_wallclock.png'}")


if __name__ == "__main__":
    main()
