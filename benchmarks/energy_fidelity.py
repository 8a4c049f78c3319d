"""Energy-based pretraining (masked image modelling restored by gradient descent on the input) against MAE
and random init, on the same backbone and data (recipes energy/tiny and mae/tiny: photos + digits).

Three pretrainings: energy for the recipe's 600 steps; MAE for the same 600 steps (equal epochs); MAE for
as many steps as fit in the energy run's wall-clock time (equal time). Each backbone, and the random one
they all start from, is evaluated on digits: weighted kNN, the linear probe, and a linear probe trained
on 10 labels per class (the full probe saturates near 0.95 even at random init). Also the PSNR of the
energy model's restoration of masked held-out digits, before and after its gradient step(s).

    python benchmarks/energy_fidelity.py --out runs/energy_fidelity     # ~15 minutes on 2 CPU cores
"""

import argparse
import json
import time
from pathlib import Path

import torch

from maskkit.config import load_config
from maskkit.data import build_data
from maskkit.data.images import labelled_dataset
from maskkit.eval.features import extract_features
from maskkit.eval.linear_probe import linear_probe
from maskkit.eval.run import evaluate_backbones, load_backbone, method_from_checkpoint
from maskkit.methods.energy import psnr
from maskkit.nn.corruptions import corrupt
from maskkit.rng import sample_keys
from maskkit.train import checkpoint
from maskkit.train.loop import train


def few_label_probe(backbone, cfg, per_class: int = 10, seed: int = 0) -> float:
    """Linear probe trained on `per_class` labelled digits of each class (a fixed choice), tested on all."""
    data = build_data(cfg.data, "train")
    train_set, test_set = labelled_dataset(cfg.data, "train"), labelled_dataset(cfg.data, "test")
    train_f, train_y = extract_features(backbone, train_set, data.normalize, cfg.eval.pool)
    test_f, test_y = extract_features(backbone, test_set, data.normalize, cfg.eval.pool)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.cat([(train_y == c).nonzero().flatten()[torch.randperm(int((train_y == c).sum()), generator=generator)[:per_class]]
                        for c in range(10)])
    return linear_probe(train_f[chosen], train_y[chosen], test_f, test_y, 10, epochs=100, lr=0.1,
                        batch_size=20, seed=seed).test_accuracy


@torch.no_grad()
def restoration_psnr(run_dir: Path) -> dict:
    """PSNR (dB) of masked held-out digits, corrupted and after each of 1..3 gradient steps of the energy model."""
    method, cfg = method_from_checkpoint(checkpoint.find_checkpoint(run_dir))
    data = build_data(cfg.data, "train")
    method.check_data(data)
    method.eval()
    test = labelled_dataset(load_config("mae/tiny").data, "test")
    images = data.normalize(torch.stack([test[i]["images"] for i in range(256)]))
    keys = sample_keys(123, torch.zeros(256, dtype=torch.long), torch.arange(256))
    corrupted, _ = corrupt("mim", images, keys, method.pixel_mean, method.pixel_std, method.cfg.encoder.patch_size)
    with torch.enable_grad():
        restored, _ = method.restore(corrupted, 3, create_graph=False)
    result = {"corrupted": float(psnr(corrupted, images, method.pixel_std))}
    result.update({f"step_{k}": float(psnr(x, images, method.pixel_std)) for k, x in enumerate(restored, start=1)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/energy_fidelity")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    out = Path(args.out)
    seconds, results = {}, {}
    runs = [("energy", "energy/tiny", args.steps), ("mae_equal_epochs", "mae/tiny", args.steps)]
    for name, recipe, steps in runs:
        start = time.perf_counter()
        train(load_config(recipe, [f"train.steps={steps}"]), out / name, progress=False)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {steps} steps in {seconds[name]:.0f} s", flush=True)
    mae_steps = round(args.steps * seconds["energy"] / seconds["mae_equal_epochs"])
    start = time.perf_counter()
    train(load_config("mae/tiny", [f"train.steps={mae_steps}"]), out / "mae_equal_time", progress=False)
    seconds["mae_equal_time"] = time.perf_counter() - start
    print(f"mae_equal_time: {mae_steps} steps in {seconds['mae_equal_time']:.0f} s", flush=True)

    for name in ("energy", "mae_equal_epochs", "mae_equal_time"):
        backbone, cfg = load_backbone(out / name)
        evaluated = evaluate_backbones(backbone, cfg, ("knn", "linear"), progress=False)
        torch.manual_seed(0)
        random_init = type(backbone)(backbone.cfg)
        results[name] = {
            "seconds": round(seconds[name], 1),
            "knn": evaluated["knn"]["pretrained"], "linear": evaluated["linear"]["pretrained"],
            "ten_per_class": few_label_probe(backbone, cfg),
            "random_init": {"knn": evaluated["knn"]["random_init"], "linear": evaluated["linear"]["random_init"],
                            "ten_per_class": few_label_probe(random_init, cfg)},
        }
    results["energy"]["restoration_psnr"] = restoration_psnr(out / "energy")
    (out / "energy_fidelity.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'digits test accuracy':<28} {'seconds':>8} {'kNN':>7} {'linear':>7} {'10/class':>9}")
    for name, r in results.items():
        print(f"{name:<28} {r['seconds']:>8.0f} {r['knn']:>7.3f} {r['linear']:>7.3f} {r['ten_per_class']:>9.3f}")
        ri = r["random_init"]
        print(f"{'  (its random init)':<28} {'':>8} {ri['knn']:>7.3f} {ri['linear']:>7.3f} {ri['ten_per_class']:>9.3f}")
    print("energy restoration PSNR (dB) of masked held-out digits:", results["energy"]["restoration_psnr"])


if __name__ == "__main__":
    main()
