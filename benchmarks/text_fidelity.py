"""Held-out loss of maskkit's text objectives next to Hugging Face's, trained on identical inputs.

MLM: maskkit's MLM (recipe `mlm/tiny`: width 128, 4 layers, the bundled 4k WordPiece, blocks of 128) with
and without the embedding LayerNorm (`model.text.embedding_norm`), and HF `BertForMaskedLM` of the same
shape (post-norm, BERT's init, its embedding LayerNorm; no dropout). XLNet: maskkit's XLNet (recipe
`xlnet/tiny`, one chunk per block and no memory, which HF's training forward does not carry) and HF
`XLNetLMHeadModel` of the same shape. Identical everywhere but the model: the same batches in the same
order, the same masks / permutations (maskkit's samplers, from the samples' keys), the same loss (the
per-sample mean of `token_cross_entropy`, on the same rows), AdamW with the recipe's betas, weight decay
(none on norms, biases and embeddings), warmup + cosine schedule and gradient clipping.

Scored on the validation split's blocks, every block masked with fixed keys: the mean masked-token
cross-entropy in nats, next to the unigram entropy (the training split's token frequencies scored on the
same held-out targets), the loss of a model that ignores the context.

    python benchmarks/text_fidelity.py --objective mlm --only "on,HF"   # 25 min on 1 thread of a busy 2-core CPU
    python benchmarks/text_fidelity.py --objective xlnet --steps 300
    python benchmarks/text_fidelity.py --run runs/mlm              # held-out loss of a trained mlm run
"""

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from maskkit.config import load_config
from maskkit.data.text import build_text_dataset, run_vocabulary
from maskkit.methods.mlm import MLM, masked_lm_inputs, token_cross_entropy
from maskkit.methods.xlnet import XLNet, sample_permutation, segment_ids, target_mapping
from maskkit.rng import sample_keys
from maskkit.train.optim import lr_at, peak_learning_rate

HELD_OUT_SEED = 1234567       # the keys of the held-out masks, the same for every model


def blocks(cfg, split: str) -> tuple[torch.Tensor, object]:
    dataset, tokenizer, _ = build_text_dataset(cfg.data, split)
    return dataset.dataset.blocks, tokenizer.special_ids()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """maskkit's exemptions (norms, biases, embeddings) by a rule that also matches HF's parameter names."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or "embedding" in name or "mask_emb" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# One loss per model kind, all from maskkit's own sampling of the batch.


def mlm_loss(model, ids: torch.Tensor, keys: torch.Tensor, special) -> torch.Tensor:
    mask = torch.ones_like(ids)
    inputs, chosen = masked_lm_inputs(ids, mask, keys, special, 0.15)
    if isinstance(model, MLM):
        hidden, head = model.encoder(inputs, mask), model.head
    else:                                                      # BertForMaskedLM: encoder, then its LM head
        hidden, head = model.bert(input_ids=inputs, attention_mask=mask).last_hidden_state, model.cls
    logits = head(hidden[chosen])                                                       # (N, V)
    return token_cross_entropy(logits, ids[chosen], chosen.nonzero()[:, 0], len(ids), hidden)[0][0]


def xlnet_loss(model, ids: torch.Tensor, keys: torch.Tensor, special) -> torch.Tensor:
    if isinstance(model, XLNet):
        return model({"ids": ids, "seed": keys, "attention_mask": torch.ones_like(ids)}).loss
    perm = sample_permutation(keys, ids, special, torch.ones_like(ids), 6, 5)
    out = model(input_ids=ids, perm_mask=perm.perm_mask.float(), token_type_ids=segment_ids(ids, special.sep),
                target_mapping=target_mapping(perm.target_positions, ids.shape[1]), use_mems=False)
    logits = out.logits[perm.target_valid]                                             # (N, V)
    targets = ids.gather(1, perm.target_positions)[perm.target_valid]
    return token_cross_entropy(logits, targets, perm.target_valid.nonzero()[:, 0], len(ids), logits)[0][0]


LOSSES = {"mlm": mlm_loss, "xlnet": xlnet_loss}


@torch.no_grad()
def held_out(model, loss_fn, val: torch.Tensor, special, batch_size: int = 64) -> float:
    """Mean over the held-out blocks of each block's mean masked-token cross-entropy."""
    model.eval()
    total = 0.0
    for start in range(0, len(val), batch_size):
        ids = val[start : start + batch_size]
        keys = sample_keys(HELD_OUT_SEED, torch.zeros(len(ids), dtype=torch.long), torch.arange(start, start + len(ids)))
        total += float(loss_fn(model, ids, keys, special)) * len(ids)
    model.train()
    return total / len(val)


def unigram_entropy(train: torch.Tensor, val: torch.Tensor, special, vocab_size: int) -> float:
    """Cross-entropy of the training split's token frequencies (add-one smoothed) on the held-out MLM targets."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    keys = sample_keys(HELD_OUT_SEED, torch.zeros(len(val), dtype=torch.long), torch.arange(len(val)))
    _, chosen = masked_lm_inputs(val, torch.ones_like(val), keys, special, 0.15)
    return float(-log_p[val[chosen]].mean())


def train(model, loss_fn, cfg, train_blocks, special, steps: int, seed: int) -> float:
    """`steps` AdamW steps on batches drawn in a fixed order; seconds taken."""
    torch.manual_seed(seed)
    optim, batch_size = cfg.optim, cfg.train.batch_size
    peak = peak_learning_rate(optim, batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=peak, betas=tuple(optim.betas))
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for step in range(steps):
        epoch, offset = divmod(step * batch_size, len(train_blocks))
        index = order[torch.arange(offset, offset + batch_size) % len(train_blocks)]
        keys = sample_keys(seed, torch.full((batch_size,), epoch), index)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak, optim)
        loss = loss_fn(model, train_blocks[index], keys, special)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        optimizer.step()
    return time.perf_counter() - start


def hf_bert(text, special):
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=text.vocab_size, hidden_size=text.dim, num_hidden_layers=text.depth,
                                      num_attention_heads=text.num_heads, intermediate_size=int(text.dim * text.mlp_ratio),
                                      max_position_embeddings=text.context_length, layer_norm_eps=text.norm_eps,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=1,
                                      pad_token_id=special.pad))


def hf_xlnet(model_cfg, special):
    from transformers import XLNetConfig, XLNetLMHeadModel

    return XLNetLMHeadModel(XLNetConfig(vocab_size=model_cfg.vocab_size, d_model=model_cfg.dim,
                                        n_layer=model_cfg.depth, n_head=model_cfg.num_heads,
                                        d_inner=int(model_cfg.dim * model_cfg.mlp_ratio),
                                        layer_norm_eps=model_cfg.norm_eps, dropout=0.0, mem_len=None,
                                        use_mems_train=False, pad_token_id=special.pad))


def models_for(objective: str, seed: int, special):
    """{name: (config, model)}: maskkit's models and HF's, built from the objective's tiny recipe."""
    from maskkit.methods import build_method

    torch.manual_seed(seed)
    if objective == "mlm":
        cfg = load_config("mlm/tiny", ["model.text.embedding_norm=true"])
        off = load_config("mlm/tiny", ["model.text.embedding_norm=false"])
        models = {"maskkit MLM (embedding_norm on, the recipe)": build_method(cfg),
                  "maskkit MLM (embedding_norm off, before)": build_method(off),
                  "HF BertForMaskedLM": hf_bert(cfg.model.text, special)}
    else:
        cfg = load_config("xlnet/tiny", ["model.segments=1", "model.mem_len=0"])
        models = {"maskkit XLNet": build_method(cfg), "HF XLNetLMHeadModel": hf_xlnet(cfg.model, special)}
    for model in models.values():
        if hasattr(model, "use_tokens"):
            model.use_tokens(special)
    return cfg, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=("mlm", "xlnet"), default="mlm")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated: train only the models whose name contains one")
    parser.add_argument("--run", default="", help="instead: the held-out loss of this mlm or xlnet run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.run:
        from maskkit.eval.run import method_from_checkpoint
        from maskkit.train.checkpoint import find_checkpoint

        checkpoint = find_checkpoint(Path(args.run))
        method, cfg = method_from_checkpoint(checkpoint)
        cfg.data = run_vocabulary(cfg.data, args.run)
        if cfg.method not in LOSSES:
            raise SystemExit(f"{args.run}: method {cfg.method} (this script scores mlm and xlnet runs)")
        (train_blocks, special), (val, _) = blocks(cfg, "train"), blocks(cfg, "val")
        method.use_tokens(special)
        vocab = getattr(cfg.model, "text", cfg.model).vocab_size
        print(f"{checkpoint}: {len(val)} held-out blocks of {val.shape[1]} tokens; unigram entropy "
              f"{unigram_entropy(train_blocks, val, special, vocab):.3f} nats")
        print(f"held-out masked cross-entropy {held_out(method, LOSSES[cfg.method], val, special):.3f} nats")
        return

    probe = load_config(f"{args.objective}/tiny")
    (train_blocks, special), (val, _) = blocks(probe, "train"), blocks(probe, "val")
    cfg, models = models_for(args.objective, args.seed, special)
    vocab = getattr(cfg.model, "text", cfg.model).vocab_size
    print(f"{args.objective}: {len(train_blocks)} training / {len(val)} held-out blocks of {val.shape[1]} tokens, "
          f"batch {cfg.train.batch_size}, {args.steps} steps, seed {args.seed}, {args.threads} thread(s)")
    print(f"unigram entropy of the held-out targets: {unigram_entropy(train_blocks, val, special, vocab):.3f} nats")
    print(f"{'model':<46} {'held-out CE':>11} {'at init':>8} {'seconds':>8}")
    for name, model in models.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        start = held_out(model, LOSSES[args.objective], val, special)
        seconds = train(model, LOSSES[args.objective], cfg, train_blocks, special, args.steps, args.seed)
        end = held_out(model, LOSSES[args.objective], val, special)
        print(f"{name:<46} {end:11.3f} {start:8.3f} {seconds:8.0f}", flush=True)
        assert math.isfinite(end)


if __name__ == "__main__":
    main()
