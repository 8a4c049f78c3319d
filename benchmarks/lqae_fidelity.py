"""LQAE against its two controls, same steps and batches (Liu et al. 2023, Sec 4: the LM's vocabulary is what makes
the codes readable by a language model):

  lqae     the frozen MiniLM's token table as the codebook, the decoder reading MiniLM's last hidden state
  vq-ae    a learned 1,024-code codebook at MiniLM's width, no LM in the training path (model.codebook=learned
           model.decoder_input=quantized)
  random   a frozen random table of MiniLM's shape and row norms, read by the same LM (model.codebook=random)

Each trains lqae/tiny (photos + digits, the same seed, so the same batches and the same optimizer), then on the
held-out digits: linear probe and kNN on the encoder's features, the LM-feature protocols (linear, kNN, 5-way 1-shot
and 5-shot nearest class means on MiniLM's features of the code sequence, for the VQ-AE its code vectors read by
MiniLM), code usage (distinct codes, perplexity), reconstruction PSNR; and the forward-time split of a training step
(encoder / LM / decoder).

    python benchmarks/lqae_fidelity.py --out runs/lqae-bench                     # ~30 min on a 2-core CPU
    python benchmarks/lqae_fidelity.py --out runs/b --steps 100 -- optim.base_lr=3e-3   # recipe overrides
"""

import argparse
import json
import time
from pathlib import Path

import torch

from maskkit.config import load_config
from maskkit.data import build_data
from maskkit.data.augment import ImageAugment
from maskkit.data.images import labelled_dataset
from maskkit.eval.lqae import lm_features_protocol, tokens_protocol
from maskkit.eval.run import evaluate_backbones, method_from_checkpoint
from maskkit.methods.lqae import code_perplexity
from maskkit.train.checkpoint import find_checkpoint
from maskkit.train.loop import train

VARIANTS = {"lqae": [], "vq-ae": ["model.codebook=learned", "model.decoder_input=quantized"],
            "random": ["model.codebook=random"]}


def step_split(method, cfg, steps: int = 5) -> dict:
    """Seconds per training step (forward + backward) and the forward time of the encoder, LM and decoder in it."""
    data = build_data(cfg.data)
    augment = ImageAugment(cfg.data)
    images = augment.normalize(torch.stack([data.dataset[i]["images"] for i in range(cfg.train.batch_size)]))
    batch = {"images": images, "seed": torch.arange(len(images))}
    spent = {"encoder": 0.0, "lm": 0.0, "decoder": 0.0}
    started = {}

    def timer(name, module):
        module.register_forward_pre_hook(lambda *_: started.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda *_: spent.__setitem__(name, spent[name] + time.perf_counter() - started[name]))

    timer("encoder", method.encoder)
    timer("lm", method.language_model)
    for block in method.decoder_blocks:
        timer("decoder", block)
    method.train()
    method(batch).loss.backward()                                       # warm-up
    spent.update(encoder=0.0, lm=0.0, decoder=0.0)
    start = time.perf_counter()
    for _ in range(steps):
        method.zero_grad(set_to_none=True)
        method(batch).loss.backward()
    total = (time.perf_counter() - start) / steps
    return {"step_s": total, **{f"{name}_forward_s": value / steps for name, value in spent.items()}}


@torch.no_grad()
def code_usage(method, cfg) -> dict:
    test_set = labelled_dataset(cfg.data, "test")
    normalize = ImageAugment(cfg.data).normalize
    images = normalize(torch.stack([test_set[i]["images"] for i in range(len(test_set))]))
    ids = torch.cat([method.eval().encode(chunk) for chunk in images.split(256)])
    return {"distinct_codes": int(ids.unique().numel()), "perplexity": float(code_perplexity(ids, len(method.allowed))),
            "tokens": int(ids.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0, help="training steps of each variant (0: the recipe's)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    for name in args.variants.split(","):
        overrides = [*args.overrides, *VARIANTS[name], *([f"train.steps={args.steps}"] if args.steps else [])]
        cfg = load_config("lqae/tiny", overrides)
        run = out / name
        if not (run / "checkpoints" / "latest").is_file():
            started = time.perf_counter()
            train(cfg, run, progress=False)
            print(f"{name}: trained {cfg.train.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
        method, cfg = method_from_checkpoint(find_checkpoint(run))
        row = {"steps": cfg.train.steps}
        encoder = evaluate_backbones(method.backbone, cfg, ["linear", "knn"])
        for protocol in ("linear", "knn"):
            row[f"encoder_{protocol}"], row[f"encoder_{protocol}_random_init"] = (
                encoder[protocol]["pretrained"], encoder[protocol]["random_init"])
        lm = lm_features_protocol({"pretrained": method}, cfg, "cpu")
        row.update(lm_linear=lm["pretrained"], lm_knn=lm["pretrained_knn"], lm_5way_1shot=lm["pretrained_5way_1shot"],
                   lm_5way_5shot=lm["pretrained_5way_5shot"])
        row["psnr"] = tokens_protocol({"pretrained": method}, cfg, run / "tokens.png", "cpu")["pretrained"]
        row.update(code_usage(method, cfg))
        row.update(step_split(method, cfg))
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    keys = ["encoder_linear", "encoder_knn", "lm_linear", "lm_knn", "lm_5way_1shot", "lm_5way_5shot", "distinct_codes",
            "perplexity", "psnr", "step_s", "encoder_forward_s", "lm_forward_s", "decoder_forward_s"]
    print("| variant | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
              + " |")


if __name__ == "__main__":
    main()
