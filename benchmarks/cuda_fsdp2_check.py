"""FSDP2 on CUDA, checked in one short run on a machine with a GPU (CI has none; tests/train/test_fsdp2.py runs gloo).

    python benchmarks/cuda_fsdp2_check.py --out DIR        # ~4 minutes on one H100/H200
    python benchmarks/cuda_fsdp2_check.py --device cpu --steps 40   # the script itself, on gloo (bf16: autocast)

1. A 1-rank NCCL group: a gather with gradient and a reduction, then MAE-tiny trained under train.parallel=fsdp2
   (fully_shard on a CUDA mesh), a sharded (DCP) checkpoint written and resumed, and the same under DDP's path.
2. bf16 under FSDP2 (MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction) against fp32: the loss curve
   over `--steps` MAE steps, mean of the last 20 losses within 1%.
Prints one JSON line per check and the card; exits non-zero when a check fails.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from maskkit import collectives
from maskkit.config import load_config
from maskkit.train import checkpoint
from maskkit.train.loop import train

DEVICE = "cuda"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def check_collectives() -> dict:
    x = torch.arange(4.0, device=DEVICE, requires_grad=True)
    gathered = collectives.all_gather_with_grad(x)
    gathered.sum().backward()
    total = collectives.all_reduce_sum(torch.ones((), device=DEVICE))
    return {"gather_ok": bool(torch.equal(gathered.detach(), x.detach()) and torch.equal(x.grad, torch.ones(4, device=DEVICE))),
            "all_reduce_ok": float(total) == 1.0, "backend": dist.get_backend()}


def check_train_and_resume(out: Path, parallel: str) -> dict:
    overrides = [f"train.parallel={parallel}", f"train.device={DEVICE}", "train.steps=20", "train.checkpoint_every=10"]
    cfg = load_config("mae/tiny", overrides)
    train(cfg, out / f"{parallel}_straight", progress=False)
    train(cfg, out / f"{parallel}_resumed", stop_at_step=10, progress=False)
    train(load_config("mae/tiny", overrides), out / f"{parallel}_resumed", resume=True, progress=False)
    found = checkpoint.find_checkpoint(out / f"{parallel}_straight")
    a, b = losses(out / f"{parallel}_straight"), losses(out / f"{parallel}_resumed")
    return {"sharded_checkpoint": checkpoint.is_sharded(found), "losses_equal": a == b,
            "max_loss_diff": max(abs(x - y) for x, y in zip(a, b, strict=True)), "final_loss": a[-1]}


def check_bf16_curve(out: Path, steps: int) -> dict:
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config("mae/tiny", ["train.parallel=fsdp2", f"train.device={DEVICE}", f"train.steps={steps}",
                                       f"train.precision={precision}", f"train.checkpoint_every={steps}"])
        train(cfg, out / f"curve_{precision}", progress=False)
        curves[precision] = losses(out / f"curve_{precision}")
    tail = {p: sum(c[-20:]) / len(c[-20:]) for p, c in curves.items()}
    relative = abs(tail["bf16"] - tail["fp32"]) / tail["fp32"]
    return {"fp32_last20": tail["fp32"], "bf16_last20": tail["bf16"], "relative": relative, "within_1pct": relative <= 0.01}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cuda_fsdp2_check")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    print(f"torch {torch.__version__}, {card}", flush=True)
    report, failed = {}, False
    checks = [("collectives", check_collectives),
              ("fsdp2_train_resume", lambda: check_train_and_resume(out, "fsdp2")),
              ("ddp_train_resume", lambda: check_train_and_resume(out, "ddp")),
              ("fsdp2_bf16_curve", lambda: check_bf16_curve(out, args.steps))]
    for name, check in checks:
        try:
            report[name] = check()
        except Exception as error:      # report every check, then fail
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        failed |= "error" in report[name] or report[name].get("within_1pct") is False
        print(name, json.dumps(report[name]), flush=True)
    report["card"] = card
    (out / "cuda_fsdp2_check.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
