"""Every value a text recipe can hold is either accepted and trains a step, or refused in one MaskkitError.

The text counterpart of test_config_values.py: hypothesis replaces one to three fields of a tiny MLM,
XLNet or PMLM config (model, text data and the text evaluation keys) with random values of the field's
type, then the config is validated and, when accepted, trained for one step on a few wiki documents.
"""

import copy
import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskkit.config import EvalConfig
from maskkit.data.text import TextDataConfig
from maskkit.methods import METHODS
from tests.test_config_values import mutate, trains_a_step_or_fails_in_one_line

TINY_TEXT = {"vocab_size": 4097, "context_length": 16, "dim": 16, "depth": 1, "num_heads": 2}
BASE = {
    "mlm": {"text": dict(TINY_TEXT)},
    "pmlm": {"text": dict(TINY_TEXT)},
    "xlnet": {**TINY_TEXT, "vocab_size": 4096, "mem_len": 4, "segments": 2},
}


def tiny_text_config(method: str) -> dict:
    return {"method": method, "model": copy.deepcopy(BASE[method]),
            "data": {"kind": "text", "name": "wiki", "tokenizer": "wiki", "block_length": 16, "max_documents": 12},
            "optim": {"base_lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 100, "threads": 1}}


def leaf_fields(cls, prefix: str) -> dict[str, type]:
    hints, fields = typing.get_type_hints(cls), {}
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            fields.update(leaf_fields(tp, f"{prefix}{field.name}."))
        else:
            fields[prefix + field.name] = tp
    return fields


TEXT_EVAL_KEYS = {f"eval.{f.name}" for f in dataclasses.fields(EvalConfig) if f.name.startswith(("text", "seq2seq", "beam"))}
FIELDS = {method: {**leaf_fields(METHODS[method][1], "model."), **leaf_fields(TextDataConfig, "data."),
                   **{k: v for k, v in leaf_fields(EvalConfig, "eval.").items() if k in TEXT_EVAL_KEYS}}
          for method in BASE}
# Keys whose large values would make an accepted config slow (a 30k-row embedding, the whole corpus).
SIZE_KEYS = {"model.text.vocab_size", "model.vocab_size", "model.text.dim", "model.dim", "model.text.depth",
             "model.depth", "model.text.num_heads", "model.num_heads", "model.text.context_length",
             "model.context_length", "data.block_length", "model.mem_len", "model.segments", "data.num_workers",
             "model.predict_fraction_k", "model.max_span", "model.span_min", "model.span_max"}
STRINGS = st.one_of(st.sampled_from(["", "wiki", "minilm", "txt", "jsonl", "hf", "line", "blank", "text", "image",
                                     "/no/such/file", "captions"]), st.text(max_size=8))


# 0 documents means the whole corpus: slow, and covered elsewhere.
MAX_DOCUMENTS = {"data.max_documents": st.integers(min_value=-3, max_value=40).filter(lambda v: v != 0)}


@st.composite
def mutated_configs(draw):
    method = draw(st.sampled_from(sorted(BASE)))
    return mutate(draw, tiny_text_config(method), FIELDS[method], size_keys=SIZE_KEYS, strings=STRINGS,
                  ints=MAX_DOCUMENTS)


def test_the_text_keys_are_covered():
    for method, keys in (("mlm", ["model.text.vocab_size", "model.mask_ratio", "data.block_length", "data.split"]),
                         ("xlnet", ["model.mem_len", "model.segments", "model.predict_fraction_k", "eval.beam_size"]),
                         ("pmlm", ["model.span_probability", "model.span_max", "data.tokenizer",
                                   "eval.seq2seq_target_length"])):
        assert set(keys) <= set(FIELDS[method]), method


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=mutated_configs())
def test_any_text_value_validates_and_trains_or_fails_in_one_line(values, tmp_path_factory):
    trains_a_step_or_fails_in_one_line(values, tmp_path_factory.mktemp("run"))
