"""Text pretraining steps next to their references, in one process: XLNet vs Hugging Face XLNetLMHeadModel,
MLM vs HF BertForMaskedLM, and a PMLM step vs an MLM step of the same model.

The issue's sizes: width 256, 4 layers, 4 heads, FFN 1024, length 128, batch 32, the bundled 4k WordPiece
vocabulary, fp32, no dropout anywhere (maskkit has none). Each step is forward + backward + AdamW on real
wiki blocks. HF's models get exactly maskkit's inputs: XLNet the same `perm_mask` / `target_mapping` /
labels (from maskkit's span sampler, K = 6), BERT the same masked positions (labels -100 elsewhere).
Timing: medians over rounds; each round times every model once, in a rotating order, and ratios are taken
within a round, so a slower or busier moment hits all of them alike.

    python benchmarks/text_throughput.py                  # ~2 minutes on 2 quiet CPU cores
    python benchmarks/text_throughput.py --device cuda    # bf16 autocast on a GPU
"""

import argparse
import contextlib
import statistics
import time

import torch

from maskkit.config import OptimConfig
from maskkit.data.text import TextDataConfig, build_text_dataset, collate_blocks
from maskkit.methods.mlm import MLM, MLMConfig, masked_lm_inputs
from maskkit.methods.pmlm import PMLM, PMLMConfig
from maskkit.methods.xlnet import XLNet, XLNetConfig, sample_permutation, target_mapping
from maskkit.nn.transformer import TextConfig
from maskkit.rng import sample_keys
from maskkit.train.optim import build_optimizer

WIDTH, DEPTH, HEADS, LENGTH = 256, 4, 4, 128


def wiki_batch(batch_size: int, device: torch.device):
    dataset, tokenizer, _ = build_text_dataset(TextDataConfig(tokenizer="wiki", block_length=LENGTH, max_documents=2000))
    batch = collate_blocks([dataset[i] for i in range(batch_size)])
    keys = sample_keys(0, batch["epoch"], batch["index"])
    batch = {"ids": batch["ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
             "seed": keys.to(device)}
    return batch, tokenizer.special_ids()


def maskkit_models(special, device):
    text = TextConfig(vocab_size=special.vocab_size + 1, context_length=LENGTH, dim=WIDTH, depth=DEPTH,
                      num_heads=HEADS)
    mlm = MLM(MLMConfig(text=TextConfig(**{**text.__dict__, "vocab_size": special.vocab_size})))
    pmlm = PMLM(PMLMConfig(text=text))
    xlnet = XLNet(XLNetConfig(vocab_size=special.vocab_size, context_length=LENGTH, dim=WIDTH, depth=DEPTH,
                              num_heads=HEADS, mem_len=0, segments=1))
    for model in (mlm, pmlm, xlnet):
        model.use_tokens(special)
        model.to(device)
    return {"maskkit MLM": mlm, "maskkit PMLM": pmlm, "maskkit XLNet": xlnet}


def hf_models(special, device):
    from transformers import BertConfig, BertForMaskedLM, XLNetLMHeadModel
    from transformers import XLNetConfig as HFXLNetConfig

    bert = BertForMaskedLM(BertConfig(vocab_size=special.vocab_size, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                                      num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                                      max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, pad_token_id=special.pad))
    xlnet = XLNetLMHeadModel(HFXLNetConfig(vocab_size=special.vocab_size, d_model=WIDTH, n_layer=DEPTH, n_head=HEADS,
                                           d_inner=4 * WIDTH, dropout=0.0, mem_len=None, use_mems_train=False,
                                           pad_token_id=special.pad))
    return {"HF BertForMaskedLM": bert.to(device), "HF XLNetLMHeadModel": xlnet.to(device)}


def hf_inputs(batch, special, device):
    """The inputs maskkit's own steps draw, in HF's form."""
    keys, ids, mask = batch["seed"], batch["ids"], batch["attention_mask"]
    corrupted, chosen = masked_lm_inputs(ids, mask, keys, special, 0.15)[:2]
    bert = {"input_ids": corrupted, "attention_mask": mask, "labels": torch.where(chosen, ids, -100)}
    perm = sample_permutation(keys.cpu(), ids.cpu(), special, attention_mask=mask.cpu(), predict_fraction_k=6)
    xlnet = {"input_ids": ids, "perm_mask": perm.perm_mask.float().to(device),
             "target_mapping": target_mapping(perm.target_positions, LENGTH).float().to(device),
             "labels": ids.cpu().gather(1, perm.target_positions).to(device)}
    return {"HF BertForMaskedLM": bert, "HF XLNetLMHeadModel": xlnet}


def step_function(name, model, batch, hf_batch, autocast):
    optimizer = build_optimizer(model, OptimConfig(), peak_lr=1e-4)

    def step():
        with autocast():
            loss = model(**hf_batch[name]).loss if name.startswith("HF") else model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch, special = wiki_batch(args.batch, device)
    models = {**maskkit_models(special, device), **hf_models(special, device)}
    hf_batch = hf_inputs(batch, special, device)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    steps = {name: step_function(name, model, batch, hf_batch, autocast) for name, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    names = list(steps)
    times = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    def ratio(slow: str, fast: str) -> float:
        return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))

    tokens = args.batch * LENGTH
    print(f"device {device}, batch {args.batch} x {LENGTH} tokens, width {WIDTH}, {DEPTH} layers, {HEADS} heads, "
          f"vocab {special.vocab_size}, {args.rounds} rounds (medians)")
    print(f"{'model':<22} {'ms/step':>8} {'tokens/s':>9}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:<22} {median * 1e3:8.1f} {tokens / median:9.0f}")
    print(f"XLNet: maskkit {ratio('HF XLNetLMHeadModel', 'maskkit XLNet'):.2f}x HF XLNetLMHeadModel's tokens/s "
          "(target >= 1.15x)")
    print(f"MLM:   maskkit {ratio('HF BertForMaskedLM', 'maskkit MLM'):.2f}x HF BertForMaskedLM's tokens/s")
    print(f"PMLM step = {ratio('maskkit PMLM', 'maskkit MLM'):.2f}x the MLM step of the same model (target <= 1.5x)")


if __name__ == "__main__":
    main()
