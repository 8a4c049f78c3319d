"""TinyBERT: Transformer distillation (Jiao et al., 2020). Section numbers refer to the paper.

A small BERT (the student, M layers) learns to reproduce a large one (the teacher, N layers) layer by
layer (Sec 3.1), student layer m imitating teacher layer g(m) = m * N / M:

    embeddings    L_embd = MSE(E^S W_e, E^T)                                         (Eq. 9)
    attention     L_attn = 1/h sum_i MSE(A_i^S, A_i^T), A = q k^T / sqrt(d), before softmax (Eq. 7-8)
    hidden        L_hidn = MSE(H^S W_h, H^T)                                         (Eq. 9)
    prediction    L_pred = CE(softmax(z^T / t), log_softmax(z^S / t))                (Eq. 10)

in two stages (Sec 3.2): general distillation from the pre-trained teacher on the unlabelled corpus
(embedding + attention + hidden), then task distillation from a teacher fine-tuned on the task, on the task
data expanded by data augmentation (Sec 3.3, `augment_documents`): the intermediate layers first, then the
prediction layer (the official code's two runs, without and with `--pred_distill`). One run of maskkit's
loop trains one stage, `model.stage`; `maskkit distill` (maskkit/distill.py) runs the stages in order, the
teacher's fine-tuning (`stage: teacher`) first.

Where maskkit follows the official code (huawei-noah/Pretrained-Language-Model, TinyBERT/) over the paper's
text: the attention loss compares the scores with the padding mask's entries zeroed in both (the code's
`torch.where(att <= -1e2, 0, att)`), MSE over every entry (heads averaged), summed over layers; the loss
weights are all 1; the prediction stage uses the teacher's logits only (no hard labels; t = 1). Where it
departs: W_e and W_h are two projections as in Eq. 9 (the code shares one `fit_dense`); the hidden-state MSE
is over real tokens (the code averages padding in); the soft cross-entropy is summed over the classes and
averaged over the batch (the code's `.mean()` also divides by the number of classes). The teacher runs in
eval mode (the code leaves its dropout on).

The teacher is a frozen part (`Method.freeze`): no gradients, not in the optimizer or the checkpoint,
rebuilt from its file on resume. A Hugging Face teacher enters through `maskkit.interop.hf_bert` and is
written as a maskkit teacher file (`save_teacher`) by `maskkit distill`; this module reads only that.
"""

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.methods.base import Method, MethodOutput
from maskkit.nn.transformer import SequenceClassifier, TextConfig, TextTransformer, trim_padding

STAGES = ("teacher", "general", "intermediate", "prediction")


def default_student() -> TextConfig:
    """TinyBERT's shape (Sec 4.1: M=4, d'=312, d'_i=1200, h=12) scaled to this CPU: 3 layers of width 192, 12 heads
    like the teacher (the attention loss compares head by head; a divisor of 12 compares groups of heads)."""
    return TextConfig(vocab_size=30522, context_length=512, dim=192, depth=3, num_heads=12, mlp_ratio=4.0,
                      norm_eps=1e-12, pool="cls", embedding_norm=True, post_norm=True, type_vocab_size=2,
                      padding_idx=0, pooler=True)


@dataclass
class TinyBERTConfig:
    stage: str = "general"            # teacher | general | intermediate | prediction (see the module docstring)
    # A maskkit teacher file (save_teacher; `maskkit distill` writes RUN/teacher/*.safetensors from
    # "minilm", a Hugging Face BERT directory or a maskkit run).
    teacher: str = "minilm"
    student: TextConfig = field(default_factory=default_student)
    labels: list[str] = field(default_factory=list)   # the task's classes in order ([] = the teacher file's)
    # Teacher layer (1..N) each student layer m = 1..M imitates; [] = uniform, g(m) = m * N / M (Sec 3.1).
    layer_map: list[int] = field(default_factory=list)
    # How the general stage starts the student's embedding tables: random (the paper, Sec 4.1) or teacher-pca (the
    # teacher's token, position and token-type tables projected on their top model.student.dim principal directions;
    # a departure for CPU scale, where a few hundred steps cannot learn a 30k-row table: see init_from_teacher)
    student_init: str = "random"
    temperature: float = 1.0          # t of Eq. 10 (the code's default; Sec 4.2 "t = 1 performs well")
    embedding_weight: float = 1.0     # the paper weighs every layer's loss 1 (Eq. 11)
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    # maskkit distill: the steps and base lr of each stage (the loop's train.steps / optim.base_lr in its run)
    teacher_steps: int = 120
    teacher_lr: float = 8.0e-4
    general_steps: int = 100
    general_lr: float = 8.0e-3
    intermediate_steps: int = 150
    intermediate_lr: float = 8.0e-3
    prediction_steps: int = 150
    prediction_lr: float = 4.0e-3
    # Data augmentation (Sec 3.3; Alg. 1): copies per document N_a, replacement probability p_t, candidates K
    augment_copies: int = 4
    augment_probability: float = 0.4
    augment_candidates: int = 15
    augment_mlm: str = ""             # a BertForMaskedLM directory with the teacher's vocabulary ("" = embeddings only)
    # maskkit distill: the task's labelled training documents (class-stratified, seeded by data.split_seed);
    # 0 = every labelled document of the training split, e.g. 1000 for a low-resource task
    task_documents: int = 0

    def check(self, data, source: str) -> None:
        require(self.stage in STAGES, source, "model.stage", self.stage, "one of " + ", ".join(STAGES))
        require(bool(self.teacher), source, "model.teacher", self.teacher, "a teacher (minilm, a directory or a file)")
        self.student.check(source, "model.student")
        require(self.student.post_norm and self.student.embedding_norm and self.student.pooler, source,
                "model.student.post_norm", self.student.post_norm,
                "true, with embedding_norm and pooler true: the student is a BERT, so that it exports as one")
        require(isinstance(self.labels, list) and all(isinstance(n, str) and n for n in self.labels), source,
                "model.labels", self.labels, "a list of class names")
        require(len(set(self.labels)) == len(self.labels), source, "model.labels", self.labels, "distinct names")
        require(isinstance(self.layer_map, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1
                                                         for i in self.layer_map),
                source, "model.layer_map", self.layer_map, "a list of teacher layers (1 = the first), one per student layer")
        require(not self.layer_map or len(self.layer_map) == self.student.depth, source, "model.layer_map",
                self.layer_map, f"one teacher layer per student layer ({self.student.depth}, model.student.depth)")
        require(self.student_init in ("random", "teacher-pca"), source, "model.student_init", self.student_init,
                "random or teacher-pca")
        require_float(source, "model.temperature", self.temperature, 0.0, low_open=True)
        for key in ("embedding_weight", "attention_weight", "hidden_weight"):
            require_float(source, f"model.{key}", getattr(self, key), 0.0)
        for stage in STAGES:
            require_int(source, f"model.{stage}_steps", getattr(self, f"{stage}_steps"), 1)
            require_float(source, f"model.{stage}_lr", getattr(self, f"{stage}_lr"), 0.0, low_open=True)
        require_int(source, "model.augment_copies", self.augment_copies, 0)
        require_float(source, "model.augment_probability", self.augment_probability, 0.0, 1.0)
        require_int(source, "model.augment_candidates", self.augment_candidates, 1)
        require_int(source, "model.task_documents", self.task_documents, 0)
        kind = getattr(data, "kind", None)
        require(kind == "text", source, "data.kind", kind, "text for method tinybert")
        wanted = "blocks" if self.stage == "general" else "documents"
        require(data.examples == wanted, source, "data.examples", data.examples,
                f"{wanted} for model.stage={self.stage} (general distillation reads the unlabelled corpus, the "
                "other stages labelled documents)")
        require(self.student.context_length >= data.block_length, source, "model.student.context_length",
                self.student.context_length, f"at least data.block_length={data.block_length}")


# The teacher file: a maskkit model with its config, written once, read at every (re)start.


def save_teacher(model: nn.Module, path: str | Path, source: str) -> Path:
    """Write a TextTransformer or SequenceClassifier as a teacher file (safetensors, config and labels in its
    metadata), atomically."""
    path = Path(path)
    if isinstance(model, SequenceClassifier):
        kind, backbone, labels = "classifier", model.backbone, model.labels
    elif isinstance(model, TextTransformer):
        kind, backbone, labels = "encoder", model, []
    else:
        raise MaskkitError(f"a teacher is a TextTransformer or a SequenceClassifier, got {type(model).__name__}")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"kind": kind, "config": json.dumps(asdict(backbone.cfg)), "labels": json.dumps(labels),
                "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(weights, tmp, metadata=metadata)
    tmp.replace(path)
    return path


def load_teacher(path: str | Path) -> tuple[nn.Module, dict]:
    """(TextTransformer or SequenceClassifier, metadata) from a teacher file; a bad file is one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MaskkitError(f"model.teacher: {path} is not a teacher file (maskkit distill writes RUN/teacher/*.safetensors "
                           "from minilm, a Hugging Face BERT directory or a maskkit run)")
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            weights = {key: file.get_tensor(key) for key in file.keys()}
        cfg = TextConfig(**json.loads(metadata["config"]))
        labels = json.loads(metadata.get("labels", "[]"))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise MaskkitError(f"model.teacher: {path} is not a teacher file ({type(error).__name__}: {error})") from None
    backbone = TextTransformer(cfg)
    model = SequenceClassifier(backbone, len(labels), labels) if metadata.get("kind") == "classifier" else backbone
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise MaskkitError(f"model.teacher: {path} does not hold the model its config describes "
                           f"(keys {(missing + unexpected)[:3]})")
    return model.eval(), metadata


# The losses of Sec 3.1, each on tensors a test can compute by hand.


def uniform_layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """g(m) = m * N / M for m = 1..M (Sec 3.1), teacher layers counted from 1; N must be a multiple of M."""
    if teacher_depth % student_depth:
        raise MaskkitError(f"the teacher's {teacher_depth} layers are not a multiple of the student's {student_depth} "
                           "(model.student.depth): give the mapping, e.g. model.layer_map="
                           f"[{','.join(str(math.ceil((m + 1) * teacher_depth / student_depth)) for m in range(student_depth))}]")
    step = teacher_depth // student_depth
    return [step * (m + 1) for m in range(student_depth)]


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8 on one layer: MSE of the pre-softmax scores (B, H, L, L), the entries whose key is padding zeroed
    in both (the official code's where(att <= -1e2, 0, att) on its -10000-masked scores), mean over every entry.

    A student with fewer heads (H_S dividing H_T) imitates the teacher's heads averaged in consecutive groups of
    H_T / H_S (student head i: teacher heads i*g .. i*g+g-1); the paper and its code compare head by head."""
    heads, teacher_heads = student.shape[1], teacher.shape[1]
    if teacher_heads != heads:
        if teacher_heads % heads:
            raise MaskkitError(f"the student's {heads} attention heads do not divide the teacher's {teacher_heads}")
        teacher = teacher.unflatten(1, (heads, teacher_heads // heads)).mean(2)       # (B, H_S, L, L)
    keep = attention_mask[:, None, None, :].to(student.dtype)                 # (B, 1, 1, L), 1 = real key
    return F.mse_loss(student * keep, teacher * keep)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 9 after the projection: MSE of (B, L, D) states over the real tokens."""
    real = attention_mask.bool()
    return F.mse_loss(student[real], teacher[real])


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 10: -sum_c softmax(z^T / t)_c log softmax(z^S / t)_c, averaged over the batch."""
    target = F.softmax(teacher_logits / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


@torch.no_grad()
def init_from_teacher(student: TextTransformer, teacher: TextTransformer) -> torch.Tensor:
    """Start the student's embedding tables at the teacher's projected on the top `student.dim` principal directions
    of the teacher's token table: one basis P (D_T, D_S) for the token, position and token-type rows, so that the
    student's embedding sum is the teacher's projected, E^S = E^T P, before the LayerNorm. The paper's student starts
    at random (its general distillation reads 3 epochs of Wikipedia); at CPU scale the table is most of the student
    and barely moves. Returns P."""
    s_cfg, t_cfg = student.cfg, teacher.cfg
    if s_cfg.dim > t_cfg.dim:
        raise MaskkitError(f"model.student_init=teacher-pca: the student (dim {s_cfg.dim}) is wider than the teacher "
                           f"({t_cfg.dim}); it projects the teacher's tables on fewer directions")
    table = teacher.token_embedding.weight.double()                                  # (V, D_T)
    centred = table - table.mean(0)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)                     # rows: principal directions
    basis = right[: s_cfg.dim].T                                                     # (D_T, D_S)
    student.token_embedding.weight.copy_((table @ basis).float())
    length = min(s_cfg.context_length, t_cfg.context_length)
    student.position_embedding[:, :length].copy_((teacher.position_embedding[:, :length].double() @ basis).float())
    if student.token_type_embedding is not None and teacher.token_type_embedding is not None:
        types = min(s_cfg.type_vocab_size, t_cfg.type_vocab_size)
        student.token_type_embedding.weight[:types].copy_(
            (teacher.token_type_embedding.weight[:types].double() @ basis).float())
    return basis.float()


class TinyBERT(Method):
    name = "tinybert"

    def __init__(self, cfg: TinyBERTConfig):
        super().__init__()
        self.cfg = cfg
        teacher, metadata = load_teacher(cfg.teacher)
        labels = list(cfg.labels) or (teacher.labels if isinstance(teacher, SequenceClassifier) else [])
        if not labels:
            raise MaskkitError("model.labels: name the task's classes (maskkit distill fills them from the data); "
                               f"the teacher {cfg.teacher} is not a classifier that would name them")
        teacher_cfg = (teacher.backbone if isinstance(teacher, SequenceClassifier) else teacher).cfg
        if cfg.stage == "teacher":
            # Fine-tune the teacher on the task (the task teacher of Sec 3.2): it is what this run trains.
            backbone = teacher.backbone if isinstance(teacher, SequenceClassifier) else teacher
            if not backbone.cfg.pooler:
                raise MaskkitError(f"model.teacher: {cfg.teacher} has no pooler; BERT's classifier reads it")
            self.model = SequenceClassifier(backbone, len(labels), labels)
            self.teacher, self.layer_map = None, []
            self.labels = labels
            return
        if cfg.stage != "general" and not isinstance(teacher, SequenceClassifier):
            raise MaskkitError(f"model.stage={cfg.stage}: task distillation needs a teacher fine-tuned on the task "
                               f"(Sec 3.2), but {cfg.teacher} is a pre-trained encoder ({metadata.get('source', '')}); "
                               "maskkit distill fine-tunes it first (stage teacher)")
        if cfg.stage != "general" and list(teacher.labels) != labels:
            raise MaskkitError(f"model.labels={labels} differ from the task teacher's classes {teacher.labels}")
        student_cfg = cfg.student
        if student_cfg.vocab_size != teacher_cfg.vocab_size:
            raise MaskkitError(f"model.student.vocab_size={student_cfg.vocab_size} differs from the teacher's "
                               f"{teacher_cfg.vocab_size}: the student reads the teacher's tokenizer")
        self.layer_map = list(cfg.layer_map) or uniform_layer_map(student_cfg.depth, teacher_cfg.depth)
        if max(self.layer_map) > teacher_cfg.depth:
            raise MaskkitError(f"model.layer_map={self.layer_map} names a layer the teacher does not have (it has "
                               f"{teacher_cfg.depth})")
        if cfg.attention_weight and teacher_cfg.num_heads % student_cfg.num_heads:
            raise MaskkitError(f"model.student.num_heads={student_cfg.num_heads} does not divide the teacher's "
                               f"{teacher_cfg.num_heads}: each student head imitates a group of the teacher's (averaged; "
                               "the paper compares head by head); give a divisor or set model.attention_weight=0")
        self.labels = labels
        self.teacher = teacher
        self.freeze(self.teacher)
        self.model = SequenceClassifier(TextTransformer(student_cfg), len(labels), labels)
        if cfg.stage == "general" and cfg.student_init == "teacher-pca":
            init_from_teacher(self.model.backbone, self.teacher_backbone)
        self.embedding_projection = nn.Linear(student_cfg.dim, teacher_cfg.dim)     # W_e of Eq. 9
        self.hidden_projection = nn.Linear(student_cfg.dim, teacher_cfg.dim)        # W_h, shared by the layers
        self.label_order: torch.Tensor | None = None
        # What a stage's loss does not reach is not trained in it (and DDP would wait for its gradients forever):
        # the pooler and classifier before the prediction stage, the projections in it. Every stage keeps every
        # weight, so each starts from the one before it (train.init_from).
        idle = ([self.embedding_projection, self.hidden_projection] if cfg.stage == "prediction"
                else [self.model.classifier, self.model.backbone.pooler])
        for module in idle:
            module.requires_grad_(False)

    @property
    def backbone(self) -> TextTransformer:
        return self.model.backbone

    def exports(self) -> dict:
        return {"backbone": (self.model.backbone, asdict(self.model.backbone.cfg))}

    def check_data(self, data) -> None:
        """The data's tokenizer is the teacher's (same vocabulary size), and its classes are the task's, mapped by
        name (a data set may order them otherwise)."""
        vocab = self.model.backbone.cfg.vocab_size
        if data.tokenizer.vocab_size != vocab:
            raise MaskkitError(f"data.tokenizer gives {data.tokenizer.vocab_size} tokens, the models read {vocab}: "
                               "the student and the data use the teacher's tokenizer")
        if self.cfg.stage == "general":
            return
        names = list(data.label_names or [])
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise MaskkitError(f"the data's class {unknown[0]!r} is not one of the task's {self.labels} (model.labels)")
        self.label_order = torch.tensor([self.labels.index(name) for name in names], dtype=torch.long)

    def forward(self, batch: dict) -> MethodOutput:
        ids, attention_mask = trim_padding(batch["ids"], batch["attention_mask"])             # (B, L) each
        if self.cfg.stage == "teacher":
            logits = self.model(ids, attention_mask)                                  # (B, C)
            labels = self.task_labels(batch)
            loss = F.cross_entropy(logits, labels)
            return MethodOutput(loss=loss, logs={"loss": loss.detach(), "accuracy": _accuracy(logits, labels)})
        with torch.no_grad():
            teacher_layers = self.teacher_backbone.forward_layers(ids, attention_mask)
        student_layers = self.model.backbone.forward_layers(ids, attention_mask)
        logs = {}
        if self.cfg.stage == "prediction":
            with torch.no_grad():
                teacher_logits = self.teacher.classifier(self.teacher.backbone.pooled(teacher_layers.output))
            logits = self.model.classifier(self.model.backbone.pooled(student_layers.output))
            loss = soft_cross_entropy(logits, teacher_logits, self.cfg.temperature)
            logs["agreement"] = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().detach()
            if "label" in batch:
                logs["accuracy"] = _accuracy(logits, self.task_labels(batch))
        else:
            embedding = hidden_loss(self.embedding_projection(student_layers.states[0]), teacher_layers.states[0],
                                    attention_mask)
            attention = sum(attention_loss(student_layers.scores[m], teacher_layers.scores[t - 1], attention_mask)
                            for m, t in enumerate(self.layer_map))
            hidden = sum(hidden_loss(self.hidden_projection(student_layers.states[m + 1]), teacher_layers.states[t],
                                     attention_mask) for m, t in enumerate(self.layer_map))
            cfg = self.cfg
            loss = cfg.embedding_weight * embedding + cfg.attention_weight * attention + cfg.hidden_weight * hidden
            logs.update(embedding=embedding.detach(), attention=attention.detach(), hidden=hidden.detach())
        logs["loss"] = loss.detach()
        return MethodOutput(loss=loss, logs=logs)

    @property
    def teacher_backbone(self) -> TextTransformer:
        return self.teacher.backbone if isinstance(self.teacher, SequenceClassifier) else self.teacher

    def task_labels(self, batch: dict) -> torch.Tensor:
        """The batch's labels as indices into model.labels (the data's own order mapped by name)."""
        labels = batch["label"]
        return labels if self.label_order is None else self.label_order.to(labels.device)[labels]


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean().detach()


# Data augmentation (Sec 3.3, Algorithm 1)

STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves""".split())
WORD = re.compile(r"[A-Za-z]+")


@dataclass
class Replacements:
    """What augmentation may put in place of each word: candidates (up to K token ids) per lower-cased word."""

    candidates: dict[str, list[int]]


def eligible_words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, lower-cased word) of each alphabetic word not a stop word (the official code's `_is_valid`
    and stop list): numbers, punctuation and function words are never replaced."""
    return [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text) if m.group().lower() not in STOP_WORDS]


def whole_word_tokens(vocabulary: dict[str, int]) -> tuple[list[str], torch.Tensor]:
    """The vocabulary entries that are whole alphabetic words (no "##" piece, no [special]), and their ids."""
    words = sorted((token, index) for token, index in vocabulary.items() if token.isalpha() and token.isascii())
    return [w for w, _ in words], torch.tensor([i for _, i in words], dtype=torch.long)


def embedding_neighbours(words: list[str], pieces: list[list[int]], embedding: torch.Tensor, vocabulary: dict[str, int],
                         count: int, chunk: int = 512) -> dict[str, list[int]]:
    """For each word, the `count` whole-word tokens nearest (cosine) to the mean of its pieces' embeddings in the
    teacher's input embedding (the paper's GloVe neighbours, in the teacher's own space); never the word itself."""
    names, ids = whole_word_tokens(vocabulary)
    table = F.normalize(embedding[ids].float(), dim=1)                         # (V', D)
    out = {}
    for start in range(0, len(words), chunk):
        batch_words, batch_pieces = words[start:start + chunk], pieces[start:start + chunk]
        vectors = torch.stack([embedding[torch.tensor(p)].float().mean(0) for p in batch_pieces])   # (b, D)
        similarity = F.normalize(vectors, dim=1) @ table.T                     # (b, V')
        own = torch.tensor([vocabulary.get(w, -1) for w in batch_words])
        similarity[ids[None, :] == own[:, None]] = -math.inf                   # the word itself never comes back
        top = similarity.topk(min(count, len(names)), dim=1).indices
        out.update({w: ids[row].tolist() for w, row in zip(batch_words, top, strict=True)})
    return out


def masked_lm_candidates(documents: list[str], tokenizer, predict_masked, vocabulary: dict[str, int], count: int,
                         batch_size: int = 64) -> dict[tuple[int, int], list[int]]:
    """Candidates for the single-piece words from a masked LM (Sec 3.3): the word's token replaced by [MASK] in
    its own sentence and nothing else (the official code appends the unmasked sentence as segment B, so the
    predictor can copy the word it should replace); the top `count` whole-word tokens other than the word.

    `predict_masked(ids (B, L), attention_mask (B, L), positions (B,))` -> (B, V) logits at the masked positions.
    Returns {(document, start): token ids}."""
    special = tokenizer.special_ids()
    allowed = torch.zeros(special.vocab_size, dtype=torch.bool)
    allowed[whole_word_tokens(vocabulary)[1]] = True
    queries = []          # (document index, word start, masked text start/end in characters)
    for index, text in enumerate(documents):
        for start, end, word in eligible_words(text):
            if word in vocabulary:                                  # one piece: the masked LM proposes
                queries.append((index, start, end, vocabulary[word]))
    out = {}
    for offset in range(0, len(queries), batch_size):
        chunk = queries[offset:offset + batch_size]
        masked = [documents[i][:s] + " [MASK] " + documents[i][e:] for i, s, e, _ in chunk]
        ids, attention_mask = tokenizer.encode(masked)
        positions = (ids == special.mask).float().argmax(1)        # the first [MASK] of each (the one we put)
        found = (ids == special.mask).any(1)
        logits = predict_masked(ids, attention_mask, positions).float()         # (b, V)
        logits = logits[:, : special.vocab_size].masked_fill(~allowed, -math.inf)
        originals = torch.tensor([token for *_, token in chunk])
        logits[torch.arange(len(chunk)), originals] = -math.inf               # never the word it replaces
        top = logits.topk(count, dim=1).indices
        for (index, start, _, _), row, ok in zip(chunk, top, found, strict=True):
            if ok:                                                 # a [MASK] cut off by truncation proposes nothing
                out[(index, start)] = row.tolist()
    return out


def augment_documents(documents: list[str], tokenizer, embedding: torch.Tensor, copies: int, probability: float,
                      count: int, seed: int, predict_masked=None, first_index: int = 0) -> list[list[str]]:
    """Algorithm 1: for each document, itself then up to `copies` variants in which each eligible word is
    replaced with probability p by one of its K candidates (a masked LM's for single-piece words when
    `predict_masked` is given, else the teacher-embedding neighbours), duplicates dropped. The rest of the text
    (case, punctuation, spacing) is kept. Document i's randomness is its own (seed, first_index + i)."""
    if copies == 0:                 # no augmentation: the documents as they are, without finding any neighbours
        return [[text] for text in documents]
    vocabulary = tokenizer.backend.get_vocab()
    words = sorted({word for text in documents for _, _, word in eligible_words(text)})
    pieces = tokenizer.encode_plain(words)
    keep = [(w, p) for w, p in zip(words, pieces, strict=True) if p]
    neighbours = embedding_neighbours([w for w, _ in keep], [p for _, p in keep], embedding, vocabulary, count)
    from_mlm = masked_lm_candidates(documents, tokenizer, predict_masked, vocabulary, count) if predict_masked else {}
    id_to_token = {index: token for token, index in vocabulary.items()}
    out = []
    for index, text in enumerate(documents):
        rng = np.random.default_rng([seed, first_index + index])
        spans = eligible_words(text)
        variants, seen = [text], {text}
        for _ in range(copies):
            pieces_out, cursor = [], 0
            for start, end, word in spans:
                candidates = from_mlm.get((index, start)) or neighbours.get(word)
                if candidates and rng.random() < probability:
                    pieces_out.append(text[cursor:start])
                    replacement = id_to_token[candidates[rng.integers(len(candidates))]]
                    pieces_out.append(replacement.capitalize() if text[start].isupper() else replacement)
                    cursor = end
            variant = "".join(pieces_out) + text[cursor:]
            if variant not in seen:
                variants.append(variant)
                seen.add(variant)
        out.append(variants)
    return out
