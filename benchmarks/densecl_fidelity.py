"""MoCo v2 against DenseCL on the same data, steps and seeds: does the dense loss help a dense task?

Both are recipe densecl/tiny (shapes world + photo crops, the same ViT, two views, queue 1024), MoCo v2
being DenseCL with lambda = 0 (the tests show it is then exactly MoCo v2). For each seed: the dense
probe's mIoU on held-out shapes images (`maskkit.eval.dense_probe`), for both methods and the random
init, and DenseCL's logged `correspondence_accuracy` (how often its positives are the true match; the
mean of the last five logged values). The gain is paired by seed (same init, same data order); the
acceptance line asks for a mean gain >= 0.01 and > 2 standard deviations of the per-seed gains.
A run directory that already holds a finished run is evaluated, not retrained. Writes the table,
densecl_fidelity.json and densecl_fidelity.png to --out.

    python benchmarks/densecl_fidelity.py --steps 300 --seeds 3                    # positives: features
    python benchmarks/densecl_fidelity.py --steps 300 --seeds 3 --positives geometric
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from maskkit.config import load_config
from maskkit.eval.run import dense_probe_both, load_backbone
from maskkit.files import pyplot
from maskkit.train.loop import train


def trained(run: Path, overrides: list[str]) -> Path:
    if not (run / "checkpoints" / "latest").exists():
        train(load_config("densecl/tiny", overrides), run, progress=False)
    return run


def correspondence(run: Path) -> float | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r["correspondence_accuracy"] for r in rows if "correspondence_accuracy" in r][-5:]
    return statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--positives", default="features", choices=("features", "geometric"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/densecl_fidelity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        common = [f"train.steps={args.steps}", f"train.seed={seed}", "train.checkpoint_every=100000",
                  f"train.threads={args.threads}"]
        moco = trained(out / f"moco_seed{seed}", ["model.dense_weight=0.0", *common])
        densecl = trained(out / f"densecl_{args.positives}_seed{seed}",
                          ["model.dense_weight=0.5", f"model.positives={args.positives}", "model.log_feature_match=true",
                           *common])
        row = {"seed": seed, "correspondence_accuracy": correspondence(densecl)}
        for name, run in (("moco", moco), ("densecl", densecl)):
            backbone, cfg = load_backbone(run)
            scores = dense_probe_both(backbone, cfg, "cpu", seed)
            row[name], row["random_init"] = scores["pretrained"], scores["random_init"]
        row["gain"] = row["densecl"] - row["moco"]
        rows.append(row)
        print(f"seed {seed}: dense-probe mIoU MoCo v2 {row['moco']:.3f}, DenseCL {row['densecl']:.3f} "
              f"(gain {row['gain']:+.3f}), random init {row['random_init']:.3f}; DenseCL correspondence_accuracy "
              f"{row['correspondence_accuracy']:.3f}", flush=True)
    (out / f"densecl_fidelity_{args.positives}.json").write_text(json.dumps(rows, indent=1))

    def stats(key):
        values = [r[key] for r in rows]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")

    print(f"\npositives={args.positives}, {args.steps} steps, {len(rows)} seeds, dense-probe mIoU mean +- std (sample std)")
    for label, key in (("random init", "random_init"), ("MoCo v2", "moco"), ("DenseCL", "densecl"),
                       ("gain (paired)", "gain"), ("correspondence", "correspondence_accuracy")):
        mean, std = stats(key)
        print(f"{label:<16} {mean:7.3f} +- {std:.3f}")
    mean, std = stats("gain")
    verdict = "met" if mean >= 0.01 and mean > 2 * std else "NOT met"
    print(f"acceptance (gain >= 0.01 and > 2 std of the per-seed gains): {verdict}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    names = ["random init", "MoCo v2", f"DenseCL ({args.positives})"]
    means = [stats(k)[0] for k in ("random_init", "moco", "densecl")]
    bars = ax.bar(names, means, yerr=[stats(k)[1] if len(rows) > 1 else 0 for k in ("random_init", "moco", "densecl")],
                  color=["grey", "tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("dense-probe mIoU (shapes)")
    fig.tight_layout()
    fig.savefig(out / f"densecl_fidelity_{args.positives}.png", dpi=120)


if __name__ == "__main__":
    main()
