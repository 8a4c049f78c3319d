"""Every value a config can hold is either accepted and trains a step, or refused in one MaskkitError.

Property-based: hypothesis replaces one to three fields of a tiny MAE config with random values of the
field's type (negative, zero, huge, NaN, infinite, empty, lists of the wrong length, nonsense strings),
then the config is validated and, when accepted, trained for one step. Any exception other than a
MaskkitError is a bug: a crash deep inside torch, AdamW or kornia instead of a line that names the key.
"""

import copy
import dataclasses
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskkit.config import Config, config_from_dict
from maskkit.data.images import DataConfig
from maskkit.errors import MaskkitError
from maskkit.methods.mae import MAEConfig
from maskkit.train.loop import train
from tests.conftest import tiny_config_dict


def leaf_fields(cls, prefix: str = "") -> dict[str, type]:
    """{"optim.base_lr": float, ...}: every field that holds a value, by its dotted key."""
    hints, fields = typing.get_type_hints(cls), {}
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if field.name == "model":
            fields.update(leaf_fields(MAEConfig, "model."))
        elif field.name == "data":
            fields.update(leaf_fields(DataConfig, "data."))
        elif dataclasses.is_dataclass(tp):
            fields.update(leaf_fields(tp, f"{prefix}{field.name}."))
        else:
            fields[prefix + field.name] = tp
    return fields


# train.compile is left out: an accepted compiled config spends a minute compiling (tests/train/test_compile.py
# covers it, and a bool has no bad values to find).
FIELDS = {key: tp for key, tp in leaf_fields(Config).items() if key != "train.compile"}
# Sizes stay small so that an accepted config trains in a fraction of a second; the interesting values
# (zero, negative, off-by-one, non-divisible) are all in this range.
SMALL_INTS = st.integers(min_value=-3, max_value=40)
INTS = st.one_of(SMALL_INTS, st.sampled_from([64, 2**31, 2**63, -(2**63)]))
FLOATS = st.one_of(
    st.floats(min_value=-2.0, max_value=2.0),
    st.sampled_from([0.0, -0.0, 1.0, 1e-12, 1e9, math.inf, -math.inf, math.nan]),
)
SIZE_KEYS = {"data.image_size", "data.load_size", "model.encoder.image_size", "model.encoder.patch_size",
             "model.encoder.dim", "model.encoder.depth", "model.encoder.num_heads", "model.decoder_dim",
             "model.decoder_depth", "model.decoder_num_heads", "train.batch_size", "train.threads",
             "data.photo_crops", "data.num_workers", "data.shapes"}
STRINGS = st.one_of(st.sampled_from(["", "digits", "photos", "folder", "photos+digits", "digits+", "cpu", "cuda", "bf16", "fp32",
                                     "auto", "cls", "mean", "gpu", "/no/such/dir", "mae", "ddp", "fsdp2"]),
                    st.text(max_size=8))


def values_for(key: str, tp, size_keys=SIZE_KEYS, strings=STRINGS, ints: dict | None = None) -> st.SearchStrategy:
    """Random values of type `tp`: small ones for `size_keys`, a key's own strategy from `ints` if given."""
    if tp is bool:
        return st.booleans()
    if tp is int:
        return (ints or {}).get(key, SMALL_INTS if key in size_keys else INTS)
    if tp is float:
        return FLOATS
    if tp is str:
        return strings
    if typing.get_origin(tp) is list:
        return st.lists(FLOATS, min_size=0, max_size=4)
    raise AssertionError(f"no strategy for {key}: {tp}")


def mutate(draw, values: dict, fields: dict, **strategy) -> dict:
    """`values` with one to three of `fields` replaced by random values (`values_for(**strategy)`)."""
    for key in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True)):
        node, parts = values, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = draw(values_for(key, fields[key], **strategy))
    return values


def trains_a_step_or_fails_in_one_line(values: dict, run_dir) -> None:
    """Validate `values`; if accepted, train one step. Anything but a one-line MaskkitError fails the test."""
    threads = torch.get_num_threads()
    try:
        try:
            cfg = config_from_dict(values)
        except MaskkitError as error:
            assert "\n" not in str(error)
            return
        try:
            result = train(cfg, run_dir, stop_at_step=1, progress=False)
        except MaskkitError as error:
            assert "\n" not in str(error)
            return
        assert result.final_step == 1 and math.isfinite(result.final_loss)
    finally:
        torch.set_num_threads(threads)


@st.composite
def mutated_configs(draw):
    values = copy.deepcopy(tiny_config_dict(train={"steps": 4, "batch_size": 8, "checkpoint_every": 100}))
    return mutate(draw, values, FIELDS)


def test_every_field_is_covered():
    assert len(FIELDS) > 50
    for key in ("optim.betas", "train.checkpoint_every", "data.eval_split", "model.encoder.qkv_bias",
                "model.mask_ratio", "eval.probe_batch_size"):
        assert key in FIELDS


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=mutated_configs())
def test_any_value_validates_and_trains_or_fails_in_one_line(values, tmp_path_factory):
    trains_a_step_or_fails_in_one_line(values, tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("override", [
    {"model": {"encoder": {"qkv_bias": False}}},
    {"model": {"decoder_depth": 0}},
    {"model": {"mask_ratio": 0.0}},
    {"model": {"encoder": {"cls_token": False}}},
    {"data": {"in_channels": 1, "mean": [0.5], "std": [0.25]}, "model": {"encoder": {"in_channels": 1}}},
    {"optim": {"base_lr": 0.0, "warmup_steps": 0}},
])
def test_edge_values_that_are_valid_train(tmp_path, override):
    result = train(config_from_dict(tiny_config_dict(**override)), tmp_path / "run", stop_at_step=2, progress=False)
    assert result.final_step == 2 and math.isfinite(result.final_loss)
