"""`maskkit export RUN --to hf DIR`: a run's trained model as a Hugging Face `save_pretrained` directory.

Each method with a Hugging Face twin writes it: MAE -> ViTMAEForPreTraining, FLIP -> CLIPModel, MLM and
PMLM -> BertForMaskedLM with the run's tokenizer (a BERT-architecture text model: model.text.post_norm=true
and embedding_norm=true, as the `mlm/bert-tiny` recipe trains); TinyBERT runs (a stage of `maskkit distill`) ->
BertForSequenceClassification with the tokenizer and the class names: the student, or in the stage `teacher`
(RUN/teacher-finetune) the fine-tuned teacher, which is how a BERT-architecture text model fine-tuned on a task
leaves maskkit (`maskkit distill ... model.teacher=RUN` fine-tunes a maskkit MLM run). Methods without a twin say
so in one line.
The directory is written beside its final name and renamed into place, so a failed export leaves nothing.
"""

import dataclasses
import shutil
from pathlib import Path

import torch

from maskkit.data.text import RUN_TOKENIZER
from maskkit.data.tokenizer import Tokenizer
from maskkit.errors import MaskkitError
from maskkit.eval.run import method_from_checkpoint
from maskkit.files import writing
from maskkit.methods.mlm import MLM, MLMConfig
from maskkit.nn.pruning import densify
from maskkit.nn.transformer import TextTransformer, ViT
from maskkit.train.checkpoint import find_checkpoint, save_whole_checkpoint

FORMATS = ("hf", "safetensors")
TWINS = {"mae": "ViTMAEForPreTraining", "flip": "CLIPModel", "mlm": "BertForMaskedLM", "pmlm": "BertForMaskedLM",
         "tinybert": "BertForSequenceClassification"}


def export_run(path: str | Path, to: str, directory: str | Path) -> str:
    """Write the run (or checkpoint) at `path` in format `to` into `directory`; returns a one-line summary."""
    if to not in FORMATS:
        raise MaskkitError(f"--to {to}: the export formats are hf (Hugging Face save_pretrained) and safetensors "
                           "(a whole-tensor checkpoint, e.g. of a sharded fsdp2 run)")
    directory = Path(directory).expanduser()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise MaskkitError(f"{directory} exists and is not an empty folder; export into a new one (nothing was written)")
    checkpoint = find_checkpoint(path)
    method, cfg = method_from_checkpoint(checkpoint)
    if to == "safetensors":
        with writing(directory):
            save_whole_checkpoint(method, checkpoint, directory)
        return (f"exported {cfg.method} from {checkpoint} as a whole-tensor checkpoint to {directory} "
                f"(maskkit eval / export / train.init_from read it; no optimizer state, no pickle)")
    for module in list(method.modules()):
        # A compressed run (maskkit compress): Hugging Face's layers are uniform and float, so pruned heads and
        # neurons go back as zeros and int8 weights as their float values; the exported model computes the same.
        if isinstance(module, (ViT, TextTransformer)) and (module.cfg.quantize or module.cfg.layer_heads
                                                           or module.cfg.layer_hidden):
            densify(module)
    if cfg.method not in TWINS:
        raise MaskkitError(f"{cfg.method} has no Hugging Face twin to export to (export knows "
                           f"{', '.join(f'{m} -> {t}' for m, t in TWINS.items())}); its backbone is in "
                           f"{checkpoint.parent.parent / 'backbone.safetensors'}")
    from maskkit.interop import hf, hf_bert, hf_clip

    tmp = directory.with_name(f".{directory.name}.tmp-export")
    with writing(directory):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if cfg.method == "mae":
                hf.save_hf_vitmae(method, tmp)
            elif cfg.method == "flip":
                hf_clip.save_hf_clip(method, tmp)
            else:
                tokenizer_file = checkpoint.parent.parent / RUN_TOKENIZER
                if not tokenizer_file.is_file():
                    raise MaskkitError(f"{tokenizer_file} is missing: the run's vocabulary is needed beside the model")
                if cfg.method == "tinybert":
                    hf_bert.save_hf_bert(method.model, tmp, "sequence-classification", tokenizer_file)
                else:
                    tokenizer = Tokenizer.from_file(tokenizer_file, cfg.model.text.context_length)
                    hf_bert.save_hf_bert(_bert_of(method, tokenizer.vocab_size), tmp, "masked-lm", tokenizer)
            if directory.exists():
                directory.rmdir()
            tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return f"exported {cfg.method} from {checkpoint} as a Hugging Face {TWINS[cfg.method]} to {directory}"


def _bert_of(method: MLM, vocab_size: int) -> MLM:
    """The MLM itself, or for PMLM a copy without the row of its pseudo mask [P] (id vocab_size), which no
    tokenizer produces and a BERT user never feeds."""
    text = method.cfg.text
    if text.vocab_size == vocab_size:
        return method
    bert = MLM(MLMConfig(text=dataclasses.replace(text, vocab_size=vocab_size)))
    state = {k: v[:vocab_size] if k in ("encoder.token_embedding.weight", "head.bias") else v
             for k, v in method.state_dict().items()}
    with torch.no_grad():
        bert.load_state_dict(state)
    return bert
