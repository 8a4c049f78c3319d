"""MoCo v2 against DenseCL on the same data, steps and seeds: does the dense loss help a dense task?

Both are recipe densecl/tiny (shapes world + photo crops, the same ViT, two views, queue 1024), MoCo v2
being DenseCL with lambda = 0 (the tests show it is then exactly MoCo v2). For each of 3 seeds: the
dense probe's mIoU on held-out shapes images, the global linear probe on digits, and the random-init
floor. Writes a table, densecl_fidelity.json and densecl_fidelity.png to --out.

    python benchmarks/densecl_fidelity.py --steps 300       # ~12 minutes on 2 CPU cores
"""

import argparse
import json
import statistics
from pathlib import Path

from maskkit.config import load_config
from maskkit.eval.run import evaluate_backbones, load_backbone
from maskkit.files import pyplot
from maskkit.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/densecl_fidelity")
    args = parser.parse_args()
    out = Path(args.out)
    results = {"MoCo v2": [], "DenseCL": []}
    for seed in range(args.seeds):
        for name, weight in (("MoCo v2", 0.0), ("DenseCL", 0.5)):
            run = out / f"{name.split()[0].lower()}_seed{seed}"
            cfg = load_config("densecl/tiny", [f"model.dense_weight={weight}", f"train.steps={args.steps}",
                                               f"train.seed={seed}", "train.checkpoint_every=100000"])
            train(cfg, run, progress=False)
            backbone, run_cfg = load_backbone(run)
            dense = evaluate_backbones(backbone, run_cfg, ["dense-probe"], seed=seed, progress=False)["dense-probe"]
            digits = run_cfg.data.__class__(**{**run_cfg.data.__dict__, "name": "digits", "views": 1, "color": False})
            run_cfg.data = digits
            linear = evaluate_backbones(backbone, run_cfg, ["linear"], seed=seed, progress=False)["linear"]
            results[name].append({"seed": seed, "miou": dense["pretrained"], "miou_random": dense["random_init"],
                                  "linear": linear["pretrained"], "linear_random": linear["random_init"]})
            print(f"{name} seed {seed}: mIoU {dense['pretrained']:.3f} (random {dense['random_init']:.3f}), "
                  f"digits linear {linear['pretrained']:.3f} (random {linear['random_init']:.3f})", flush=True)
    (out / "densecl_fidelity.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'':<10} {'dense-probe mIoU':>18} {'digits linear probe':>20}   (mean +- std over {args.seeds} seeds)")
    for name, rows in [*results.items(), ("random init", None)]:
        source = rows if rows is not None else results["MoCo v2"]
        miou = [r["miou" if rows is not None else "miou_random"] for r in source]
        linear = [r["linear" if rows is not None else "linear_random"] for r in source]
        print(f"{name:<12} {statistics.mean(miou):>8.3f} +- {statistics.pstdev(miou):.3f}   "
              f"{statistics.mean(linear):>10.3f} +- {statistics.pstdev(linear):.3f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    names = ["random init", *results]
    means = [statistics.mean(r["miou_random"] for r in results["MoCo v2"]),
             *[statistics.mean(r["miou"] for r in rows) for rows in results.values()]]
    bars = ax.bar(names, means, color=["grey", "tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("dense-probe mIoU (shapes)")
    fig.tight_layout()
    fig.savefig(out / "densecl_fidelity.png", dpi=120)


if __name__ == "__main__":
    main()
