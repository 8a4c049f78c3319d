"""The CUDA paths, checked in one short run on a machine with a GPU (CI has none).

    python benchmarks/cuda_check.py --out DIR          # ~3 minutes on one H100/H200

1. `maskkit.rng` on CUDA gives bit for bit the numbers it gives on the CPU (int64 wrap-around on the GPU).
2. MAE-tiny trains on CUDA in fp32 and under bf16 autocast (train.precision), finite loss, images/s.
3. A run stopped and resumed on CUDA ends with the weights of the uninterrupted run (bitwise, or the
   largest difference when CUDA kernels are not deterministic).
4. The attention kernel SDPA picks for the ViT on CUDA in bf16 (flash / efficient / math).
Prints one line per check; exits non-zero when a check fails.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from maskkit import rng
from maskkit.config import load_config
from maskkit.rng import Stream
from maskkit.train import checkpoint
from maskkit.train.loop import train


def check_rng() -> dict:
    epochs = torch.randint(0, 1000, (4096,))
    indices = torch.randint(-1, 10**9, (4096,))
    cpu = rng.uniform(rng.sample_keys(7, epochs, indices), (196,), Stream.MASK)
    gpu = rng.uniform(rng.sample_keys(7, epochs.cuda(), indices.cuda()), (196,), Stream.MASK).cpu()
    cpu64 = rng.uniform(rng.sample_keys(7, epochs, indices), (33,), Stream.CROP, dtype=torch.float64)
    gpu64 = rng.uniform(rng.sample_keys(7, epochs.cuda(), indices.cuda()), (33,), Stream.CROP, dtype=torch.float64)
    keys = rng.sample_keys(7, epochs.cuda(), indices.cuda())
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(100):
        rng.uniform(keys, (196,), Stream.MASK)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 10
    return {"bitwise_equal_float32": torch.equal(cpu, gpu), "bitwise_equal_float64": torch.equal(cpu64, gpu64.cpu()),
            "ms_per_4096x196_draw": round(ms, 4)}


def check_training(out: Path, precision: str, steps: int) -> dict:
    cfg = load_config("mae/tiny", [f"train.steps={steps}", "train.device=cuda", f"train.precision={precision}",
                                   "train.checkpoint_every=1000", "train.log_every=10"])
    start = time.perf_counter()
    result = train(cfg, out / f"train_{precision}", progress=False)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / f"train_{precision}" / "metrics.jsonl").read_text().splitlines()]
    return {"final_loss": result.final_loss, "first_loss": rows[0]["loss"], "seconds": round(seconds, 1),
            "samples_per_s_last": round(rows[-1]["samples_per_s"], 1)}


def check_resume(out: Path, precision: str) -> dict:
    overrides = ["train.steps=30", "train.device=cuda", f"train.precision={precision}", "train.checkpoint_every=10",
                 "data.photo_crops=256", "train.batch_size=128"]     # 1280 images: the run crosses epochs
    cfg = load_config("mae/tiny", overrides)
    train(cfg, out / f"straight_{precision}", progress=False)
    train(cfg, out / f"resumed_{precision}", stop_at_step=17, progress=False)
    train(load_config("mae/tiny", overrides), out / f"resumed_{precision}", resume=True, progress=False)
    from safetensors.torch import load_file

    a = load_file(checkpoint.find_checkpoint(out / f"straight_{precision}") / "model.safetensors")
    b = load_file(checkpoint.find_checkpoint(out / f"resumed_{precision}") / "model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diff}


def check_attention_kernel() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(64, 4, 65, 32, device="cuda", dtype=torch.bfloat16)
    found = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            found[name] = True
        except RuntimeError as error:
            found[name] = str(error).splitlines()[0][:80]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cuda_check")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    report, failed = {}, False
    checks = [
        ("rng", check_rng),
        ("attention_kernels_bf16", check_attention_kernel),
        ("train_fp32", lambda: check_training(out, "fp32", args.steps)),
        ("train_bf16", lambda: check_training(out, "bf16", args.steps)),
        ("resume_fp32", lambda: check_resume(out, "fp32")),
        ("resume_bf16", lambda: check_resume(out, "bf16")),
    ]
    for name, check in checks:
        try:
            report[name] = check()
        except Exception as error:   # report every check, then fail
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            failed = True
        print(name, json.dumps(report[name]), flush=True)
    (out / "cuda_check.json").write_text(json.dumps(report, indent=1))
    failed |= not report["rng"].get("bitwise_equal_float32", False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
