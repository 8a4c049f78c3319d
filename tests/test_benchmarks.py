"""Every benchmark script names only what maskkit has: a renamed function must not leave a script that fails after
an hour's setup (benchmarks/tinybert.py imported a `maskkit.distill.accuracy` that a refactor had moved)."""

import importlib
import importlib.util
from pathlib import Path

import pytest

from tests.helpers import maskkit_imports

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def test_the_benchmarks_are_found():
    assert len(BENCHMARKS) > 10 and any(p.name == "tinybert.py" for p in BENCHMARKS)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_only_what_exists(path):
    for module, name in maskkit_imports(path):
        loaded = importlib.import_module(module)
        if name is not None:
            submodule = hasattr(loaded, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
            assert hasattr(loaded, name) or submodule, f"{path.name}: from {module} import {name}: no such name"


def test_the_check_sees_a_missing_name(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("from maskkit.distill import accuracy, distill\n", encoding="utf-8")
    assert ("maskkit.distill", "accuracy") in maskkit_imports(script)
    assert not hasattr(importlib.import_module("maskkit.distill"), "accuracy")
