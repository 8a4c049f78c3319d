"""Debiasing FLIP's zero-shot classifier on the biased shapes world, over seeds (Chuang et al. 2023 on Waterbirds:
worst-group accuracy up, gap down, average about the same, with no training and no extra data).

For each seed s: the world data.world_seed=s and a FLIP run of recipe flip/biased_shapes with train.seed=s; then
`maskkit debias` on it (the world's default prompts, lambda 1000) gives, on the group-balanced test split, the
worst-group and average accuracy and the gap before and after projection, calibrated projection, calibration only
and the random projection of the same rank; and the two preconditions of a claim: a balanced linear probe on the
image embeddings (>= 90% worst group: the class is in the image embeddings) and the zero-shot gap (>= 15 points:
the bias is in the alignment). Prints the mean and standard deviation over seeds and writes DIR/summary.json.

    python benchmarks/debias_world.py --out runs/debias-bench                  # 5 seeds, ~40 min on a 2-core CPU
    python benchmarks/debias_world.py --out runs/b --seeds 2 -- train.steps=400  # recipe overrides after --
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from maskkit.config import load_config
from maskkit.debias import debias
from maskkit.train.loop import train

ROWS = ("before", "projection", "calibrated", "calibration", "random_projection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lam", type=float, default=1000.0)
    parser.add_argument("overrides", nargs="*", help="recipe overrides (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    per_seed = []
    for seed in range(args.seeds):
        run = out / f"flip-seed{seed}"
        cfg = load_config("flip/biased_shapes", [f"train.seed={seed}", f"data.world_seed={seed}", *args.overrides])
        started = time.perf_counter()
        if not (run / "checkpoints" / "latest").exists():
            train(cfg, run, progress=False)
        seconds = time.perf_counter() - started
        report_dir = out / f"debias-seed{seed}"
        if (report_dir / "report.json").is_file():
            report = json.loads((report_dir / "report.json").read_text())
        else:
            report = debias(str(run), report_dir, lam=args.lam, seed=seed)
        row = {"seed": seed, "train_seconds": round(seconds, 1),
               "probe_worst_group": report["balanced_linear_probe"]["worst_group"],
               "fraction_in_span": report["class_difference_in_spurious_span"]}
        for name in ROWS:
            result = report["results"][name]
            row[name] = {key: result[key] for key in ("worst_group", "average", "gap")}
        per_seed.append(row)
        print(json.dumps(row))
    summary = {"seeds": args.seeds, "lam": args.lam, "overrides": args.overrides, "per_seed": per_seed, "mean": {}}
    print(f"\n{'':18s} {'worst group':>16s} {'average':>16s} {'gap':>16s}   (mean +- sd over {args.seeds} seeds)")
    for name in ROWS:
        summary["mean"][name] = {}
        cells = []
        for key in ("worst_group", "average", "gap"):
            values = [row[name][key] for row in per_seed]
            mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            summary["mean"][name][key] = [mean, sd]
            cells.append(f"{mean:.3f} +- {sd:.3f}")
        print(f"{name:18s} " + " ".join(f"{c:>16s}" for c in cells))
    probes = [row["probe_worst_group"] for row in per_seed]
    fractions = [row["fraction_in_span"] for row in per_seed]
    print(f"balanced linear probe, worst group: {statistics.fmean(probes):.3f} (min {min(probes):.3f}); class difference "
          f"in the spurious span: {statistics.fmean(fractions):.2f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
