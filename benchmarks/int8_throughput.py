"""int8 against fp32 on the model a run deploys (default: the TinyBERT recipe's task teacher, MiniLM fine-tuned),
interleaved in one process: what `maskkit compress --quantize int8` buys in speed.

Four variants of the same weights: fp32 eager, fp32 compiled, int8 compiled (maskkit.nn.quantized.Int8Linear in
the blocks, what compress writes) and int8 eager. Each round runs every variant once on the same batch
(--batch x --length tokens, under inference_mode), in a rotating order; rounds during which other processes kept
the CPU busy are left out (as in mae_throughput.py), and the ratios are medians of ratios within a round.
Batch 1 latency is measured the same way. The compress command measures before and after one at a time, so a
busy machine can skew it; this script is the number to quote.

    python benchmarks/int8_throughput.py                          # runs/tinybert/teacher-finetune, ~4 minutes
    python benchmarks/int8_throughput.py RUN --batch 32 --length 128
    python benchmarks/int8_throughput.py --freezing      # both compiled variants with inductor's freezing
"""

import argparse
import copy
import statistics
import time

import torch
import torch._inductor.config
from mae_throughput import cpu_seconds_elsewhere

from maskkit.efficiency.compress import apply, load_compressible
from maskkit.efficiency.models import image_profiled, text_profiled
from maskkit.nn.transformer import ViT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/tinybert/teacher-finetune")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="quiet rounds wanted")
    parser.add_argument("--max-seconds", type=float, default=240)
    parser.add_argument("--max-other-load", type=float, default=0.25)
    parser.add_argument("--freezing", action="store_true",
                        help="compile with inductor's freezing (weights folded in as constants, for inference)")
    args = parser.parse_args()
    if args.freezing:
        torch._inductor.config.freezing = True

    fp32 = load_compressible(args.run)
    int8 = copy.deepcopy(fp32)
    apply(int8, "quantize", "int8", 0, torch.device("cpu"))
    variants = {}
    for name, c, compiled in (("fp32 eager", fp32, False), ("fp32 compiled", fp32, True),
                              ("int8 compiled", int8, True), ("int8 eager", int8, False)):
        if isinstance(c.backbone, ViT):
            profiled = image_profiled(name, c.model, c.backbone, None)
        else:
            profiled = text_profiled(name, c.model, c.backbone, args.length)
        c.model.eval()
        run = profiled.forward or profiled.module
        variants[name] = (torch.compile(run, dynamic=False) if compiled else run, profiled.make_example)

    inputs = {}
    with torch.inference_mode():
        for name, (run, make_example) in variants.items():
            start = time.perf_counter()
            many, one = make_example(args.batch), make_example(1)
            for _ in range(3):
                run(*many)
                run(*one)
            inputs[name] = (many, one)
            print(f"{name}: warm-up (incl. any compilation) {time.perf_counter() - start:.1f} s")
        reference = variants["fp32 eager"][0](*inputs["fp32 eager"][0])
        for name in ("int8 compiled", "int8 eager"):
            out = variants[name][0](*inputs[name][0])
            agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item() if out.ndim == 2 else float("nan")
            print(f"{name}: predictions agree with fp32 on {agree:.1%} of the batch")

        names = list(variants)
        rounds, round_index, started = [], 0, time.perf_counter()
        while len(rounds) < args.rounds and time.perf_counter() - started < args.max_seconds:
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            timing, loads = {}, []
            for name in order:
                run, (many, one) = variants[name][0], inputs[name]
                elsewhere, start = cpu_seconds_elsewhere(), time.perf_counter()
                run(*many)
                middle = time.perf_counter()
                run(*one)
                stop = time.perf_counter()
                timing[name] = (args.batch / (middle - start), 1000 * (stop - middle))
                loads.append((cpu_seconds_elsewhere() - elsewhere) / (stop - start))
            round_index += 1
            if max(loads) <= args.max_other_load:
                rounds.append(timing)
    print(f"\n{len(rounds)} quiet rounds of {round_index}; batch {args.batch} x {args.length} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if len(rounds) < 3:
        raise SystemExit("fewer than 3 quiet rounds: rerun on a quieter machine or raise --max-seconds")
    print(f"{'variant':<14} {'examples/s':>10} {'vs fp32 eager':>13} {'vs fp32 compiled':>16} {'batch-1 ms':>10} "
          f"{'latency vs fp32 compiled':>24}")
    for name in names:
        speed = statistics.median(r[name][0] for r in rounds)
        vs_eager = statistics.median(r[name][0] / r["fp32 eager"][0] for r in rounds)
        vs_compiled = statistics.median(r[name][0] / r["fp32 compiled"][0] for r in rounds)
        latency = statistics.median(r[name][1] for r in rounds)
        latency_gain = statistics.median(r["fp32 compiled"][1] / r[name][1] for r in rounds)
        print(f"{name:<14} {speed:>10.1f} {vs_eager:>12.2f}x {vs_compiled:>15.2f}x {latency:>10.1f} {latency_gain:>23.2f}x")


if __name__ == "__main__":
    main()
