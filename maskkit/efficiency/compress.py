"""`maskkit compress RUN (--quantize int8 | --prune-heads K | --prune-ffn F | --prune-unstructured S) --out DIR`:
the compression techniques of the Efficient Deep Learning survey (Menghani 2021, Sec 3.1) on a run's deployed
model, re-evaluated with the run's protocol and re-profiled.

What is compressed is the model a run deploys: a TinyBERT stage's classifier (student, or the task teacher of
RUN/teacher-finetune), otherwise the run's backbone (MAE's encoder, an MLM's text encoder, FLIP's image tower).

  --quantize int8        every Linear layer of the blocks to int8 weights (per output channel) with int8 activations
                         quantized per token at run time (maskkit.nn.quantized; torchao's dynamic int8 scheme)
  --prune-heads K        remove K attention heads in all, the least important first, ranked over every layer by
                         I_h = |dL/dxi_h| (Michel et al. 2019, Sec 4.1: the gradient of the run's own training loss
                         with respect to a mask xi_h on the head's output, summed over batches, each layer's scores
                         L2-normalised); every layer keeps at least one head
  --prune-ffn F          remove the fraction F of each layer's feed-forward neurons, ranked by the same first-order
                         score on a gate after the activation (Molchanov et al. 2017's Taylor criterion)
  --prune-unstructured S zero the fraction S of the blocks' Linear weights with the smallest magnitude, over all
                         layers at once (Han et al. 2015); the matrices stay dense, so nothing gets faster

Structured pruning really shrinks the matrices (maskkit.nn.pruning), and the pruned shapes are in the config
(model.*.layer_heads / layer_hidden), so DIR is a run like any other: `maskkit eval DIR`, `maskkit export DIR`,
`maskkit profile DIR`. DIR/compress.json holds the quality and the footprint before and after.

Quality: a classifier's accuracy on the task's test documents (RUN/../test.jsonl, which `maskkit distill` writes,
or --test FILE), an image backbone's kNN accuracy (protocol knn), a text backbone's linear probe (text-probe).
"""

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from maskkit.config import config_to_dict, save_config
from maskkit.data import build_data
from maskkit.data.text import RUN_TOKENIZER, run_vocabulary
from maskkit.efficiency.models import image_profiled, text_profiled
from maskkit.efficiency.profile import profile_model
from maskkit.errors import MaskkitError
from maskkit.eval.run import classify, evaluate_backbones, evaluate_text, method_from_checkpoint
from maskkit.files import atomic_write_text, writing
from maskkit.nn.pruning import keep_heads, keep_neurons, record_shapes
from maskkit.nn.quantized import Int8Linear, quantize_linears
from maskkit.nn.transformer import SequenceClassifier, TextTransformer, ViT
from maskkit.train.checkpoint import find_checkpoint, read_state, save_checkpoint
from maskkit.train.loop import StepSampler, prepare

log = logging.getLogger("maskkit")
OPERATIONS = ("quantize", "prune_heads", "prune_ffn", "prune_unstructured")


@dataclass
class Compressible:
    """A run's method and config, and the parts compress acts on."""

    run_dir: Path
    checkpoint: Path
    method: nn.Module
    cfg: object
    model: nn.Module            # what is deployed and profiled: a SequenceClassifier or the backbone
    backbone: nn.Module         # the ViT or TextTransformer whose blocks are compressed


def load_compressible(path: str | Path) -> Compressible:
    checkpoint = find_checkpoint(path)
    method, cfg = method_from_checkpoint(checkpoint)
    model = getattr(method, "model", None)
    if not isinstance(model, SequenceClassifier):
        model = getattr(method, "backbone", None)
    backbone = model.backbone if isinstance(model, SequenceClassifier) else model
    if not isinstance(backbone, (ViT, TextTransformer)):
        raise MaskkitError(f"{path}: a {cfg.method} run whose model is a {type(backbone).__name__}; compress acts on "
                           "the blocks of a ViT or text Transformer")
    return Compressible(checkpoint.parent.parent, checkpoint, method, cfg, model, backbone)


# Importance scores (first order): |dL/d gate| of a gate of ones on each head's output or neuron's activation.

def importance(c: Compressible, kind: str, batches: int, device: torch.device) -> list[torch.Tensor]:
    """One score per head (kind "heads") or feed-forward neuron ("neurons") of each layer, from `batches` batches
    of the run's own training data and loss."""
    blocks = c.backbone.blocks
    gates = []
    for block in blocks:
        size = block.attn.num_heads if kind == "heads" else block.mlp.fc1.out_features
        gate = torch.ones(size, device=device, requires_grad=True)
        if kind == "heads":
            block.attn.head_gate = gate
        else:
            block.mlp.neuron_gate = gate
        gates.append(gate)
    scores = [torch.zeros(len(g), device=device) for g in gates]
    flags = {name: p.requires_grad for name, p in c.method.named_parameters()}
    c.method.requires_grad_(False)
    try:
        data_cfg = run_vocabulary(c.cfg.data, c.run_dir)
        data = build_data(data_cfg, "train")
        c.method.check_data(data)
        batch_size = min(c.cfg.train.batch_size, len(data.dataset))
        sampler = StepSampler(len(data.dataset), batch_size, 0, 1, 1, c.cfg.train.seed, 0)
        loader = iter(DataLoader(data.dataset, batch_sampler=sampler, collate_fn=data.collate))
        c.method.eval()
        for _ in range(batches):
            loss = c.method(prepare(data, next(loader), c.cfg.train.seed, device)).loss
            grads = torch.autograd.grad(loss, gates)
            for score, grad in zip(scores, grads, strict=True):
                score += grad.abs()
    finally:
        for block in blocks:
            block.attn.head_gate, block.mlp.neuron_gate = None, None
        for name, p in c.method.named_parameters():
            p.requires_grad_(flags[name])
    return scores


def heads_to_keep(scores: list[torch.Tensor], remove: int) -> list[list[int]]:
    """Remove the `remove` heads of smallest layer-normalised score, over all layers, keeping one per layer."""
    normalised = [s / s.norm().clamp_min(1e-12) for s in scores]
    order = sorted((float(v), layer, head) for layer, s in enumerate(normalised) for head, v in enumerate(s.tolist()))
    kept = [set(range(len(s))) for s in scores]
    for _, layer, head in order:
        if remove == 0:
            break
        if len(kept[layer]) > 1:
            kept[layer].discard(head)
            remove -= 1
    return [sorted(k) for k in kept]


def neurons_to_keep(scores: list[torch.Tensor], fraction: float) -> list[list[int]]:
    kept = []
    for s in scores:
        count = len(s) - round(fraction * len(s))
        kept.append(sorted(s.argsort(descending=True)[:count].tolist()))
    return kept


def prune_unstructured(backbone: nn.Module, sparsity: float) -> float:
    """Zero the smallest-magnitude fraction `sparsity` of the blocks' Linear weights (one global threshold);
    returns the fraction of those weights that are zero afterwards."""
    weights = [m.weight for m in backbone.blocks.modules() if isinstance(m, nn.Linear)]
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    count = int(sparsity * len(magnitudes))
    if count:
        threshold = magnitudes.kthvalue(count).values
        with torch.no_grad():
            for w in weights:
                w.masked_fill_(w.abs() <= threshold, 0.0)
    return float(sum(int((w == 0).sum()) for w in weights) / len(magnitudes))


def check_amount(c: Compressible, operation: str, amount) -> None:
    """One line for an amount a model cannot take."""
    shapes = [(b.attn.num_heads, b.mlp.fc1.out_features if isinstance(b.mlp.fc1, nn.Linear) else 0)
              for b in c.backbone.blocks]
    quantized = any(isinstance(m, Int8Linear) for m in c.backbone.modules())
    if quantized and operation != "quantize":
        raise MaskkitError(f"{c.run_dir} is already int8: prune first, then quantize the pruned run")
    if operation == "quantize":
        if amount != "int8":
            raise MaskkitError(f"--quantize {amount}: the one scheme is int8")
        if quantized:
            raise MaskkitError(f"{c.run_dir} is already int8")
        if not any(isinstance(m, nn.Linear) for m in c.backbone.blocks.modules()):
            raise MaskkitError(f"{c.run_dir}: its blocks have no Linear layer to quantize")
    elif operation == "prune_heads":
        total = sum(h for h, _ in shapes)
        if not isinstance(amount, int) or amount < 1 or amount > total - len(shapes):
            raise MaskkitError(f"--prune-heads {amount}: the model has {total} heads in {len(shapes)} layers and keeps "
                               f"at least one per layer, so remove 1 to {total - len(shapes)}")
    elif operation == "prune_ffn":
        smallest = min(f for _, f in shapes)
        if not 0 < amount < 1 or smallest - round(amount * smallest) < 1:
            raise MaskkitError(f"--prune-ffn {amount}: a fraction of each layer's feed-forward neurons in (0, 1) that "
                               f"leaves at least one of {smallest}")
    elif not 0 < amount < 1:
        raise MaskkitError(f"--prune-unstructured {amount}: a fraction of the weights in (0, 1)")


def apply(c: Compressible, operation: str, amount, batches: int, device: torch.device) -> dict:
    """Compress `c` in place (the amount checked by check_amount); returns what was done (for compress.json)."""
    done = {"operation": operation, "amount": amount}
    if operation == "quantize":
        done["int8_layers"] = quantize_linears(c.backbone.blocks)
        c.backbone.cfg.quantize = "int8"
        return done
    if operation == "prune_unstructured":
        done["sparsity"] = prune_unstructured(c.backbone, amount)
        done["note"] = ("the weight matrices stay dense: dense kernels multiply the zeros too, so the model is no "
                        "faster and its file no smaller")
        return done
    kind = "heads" if operation == "prune_heads" else "neurons"
    scores = importance(c, kind, batches, device)
    keep = heads_to_keep(scores, amount) if kind == "heads" else neurons_to_keep(scores, amount)
    for block, kept in zip(c.backbone.blocks, keep, strict=True):
        (keep_heads(block.attn, kept) if kind == "heads" else keep_neurons(block.mlp, kept))
    record_shapes(c.backbone)
    done.update(importance="|dL/dxi| (first order, the run's training loss)", batches=batches, kept=keep,
                scores=[[round(v, 6) for v in s.tolist()] for s in scores])
    return done


# Quality and footprint

def quality(c: Compressible, device: torch.device, test: str | None = None, seed: int = 0) -> dict:
    """{"metric", "value"}: the run's protocol on the model as it is now."""
    if isinstance(c.model, SequenceClassifier):
        result = classify(c.model, c.cfg, c.run_dir, test or "")
        return {"metric": "test accuracy", "value": result["accuracy"], "num_test": result["num_test"]}
    if isinstance(c.backbone, ViT):
        result = evaluate_backbones(c.backbone, c.cfg, ["knn"], device, seed, progress=False)["knn"]
        return {"metric": "knn accuracy", "value": result["pretrained"], "num_test": result["num_test"]}
    cfg = replace(c.cfg, data=run_vocabulary(c.cfg.data, c.run_dir))
    result = evaluate_text(c.backbone, cfg, "text-probe", device, seed, progress=False)
    return {"metric": "text-probe accuracy", "value": result["pretrained"], "num_test": result.get("num_test")}


def linear_weight_bytes(backbone: nn.Module) -> int:
    """Bytes of the blocks' Linear weight matrices (with an int8 layer's scales): what int8 quantization shrinks."""
    total = 0
    for m in backbone.blocks.modules():
        if isinstance(m, Int8Linear):
            total += m.weight_int8.numel() * m.weight_int8.element_size() + m.weight_scale.numel() * 4
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def footprint(c: Compressible, batch: int, length: int | None, compile: bool, repeats: int) -> dict:
    if isinstance(c.backbone, ViT):
        profiled = image_profiled("model", c.model, c.backbone, None)
    else:
        profiled = text_profiled("model", c.model, c.backbone, length)
    measured = profile_model(profiled.module, profiled.make_example, batch, repeats=repeats,
                             embedding_tables=profiled.embedding_tables, compile=compile).as_dict()
    return {**measured, "linear_weight_bytes": linear_weight_bytes(c.backbone)}


def compress(path: str | Path, operation: str, amount, out: str | Path, *, batches: int = 8, test: str | None = None,
             batch: int = 32, length: int | None = None, compile: bool = False, repeats: int = 20,
             device: str = "cpu") -> dict:
    """Compress the run at `path` into the run `out`; returns (and writes to OUT/compress.json) the report."""
    if operation not in OPERATIONS:
        raise MaskkitError(f"unknown compression {operation!r}; one of {', '.join(OPERATIONS)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MaskkitError(f"{out} exists and is not an empty folder; compress into a new one (nothing was written)")
    device = torch.device(device)
    c = load_compressible(path)
    check_amount(c, operation, amount)
    c.method.to(device)
    before = {"quality": quality(c, device, test), "footprint": footprint(c, batch, length, compile, repeats)}
    done = apply(c, operation, amount, batches, device)
    after = {"quality": quality(c, device, test), "footprint": footprint(c, batch, length, compile, repeats)}
    report = {"source": str(c.checkpoint), "out": str(out), **done, "before": before, "after": after,
              "ratios": ratios(before, after)}
    write_run(c, out, report)
    return report


def ratios(before: dict, after: dict) -> dict:
    b, a = before["footprint"], after["footprint"]
    return {"size": a["size_bytes"] / b["size_bytes"], "linear_weights": a["linear_weight_bytes"] / b["linear_weight_bytes"],
            "parameters": a["parameters"] / b["parameters"],
            "flops": a["flops_per_example"] / b["flops_per_example"],
            "latency_speedup": b["latency_ms_median"] / a["latency_ms_median"],
            "throughput_speedup": a["throughput_per_s"] / b["throughput_per_s"],
            "quality_change": after["quality"]["value"] - before["quality"]["value"]}


def write_run(c: Compressible, out: Path, report: dict) -> None:
    """OUT as a run: its checkpoint (the compressed weights; the config describes the compressed shapes), config,
    vocabulary and test documents, and compress.json. Written beside OUT and renamed into place."""
    from maskkit.methods.tinybert import save_teacher

    tmp = out.with_name(f".{out.name}.tmp-compress")
    with writing(out):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            if c.cfg.method == "tinybert" and c.cfg.model.stage == "teacher":
                # The task teacher's shapes come from its teacher file (model.teacher): write the compressed one.
                save_teacher(c.model, tmp / "teacher.safetensors", f"{c.checkpoint} compressed ({report['operation']})")
                c.cfg.model.teacher = str((out / "teacher.safetensors").resolve())
            step = int(read_state(c.checkpoint).get("step", 0))
            holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)    # no optimizer state to keep
            save_checkpoint(tmp, c.method.cpu(), holder, step, config_to_dict(c.cfg))
            save_config(c.cfg, tmp / "config.yaml")
            for name in (RUN_TOKENIZER, "test.jsonl"):
                for source in (c.run_dir / name, c.run_dir.parent / name):
                    if source.is_file():
                        shutil.copyfile(source, tmp / name)
                        break
            atomic_write_text(tmp / "compress.json", json.dumps(report, indent=1))
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
