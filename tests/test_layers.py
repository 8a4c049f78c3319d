"""Each layer imports only the layers below it (STYLE.md), and no module imports itself back in a circle.

The imports are read from the source (every `import` and `from ... import`, those inside functions
too), so a lazy import that reaches upwards counts like any other.
"""

from pathlib import Path

import maskkit
from tests.helpers import maskkit_imports

PACKAGE = Path(maskkit.__file__).parent

# Lowest first. Modules of one layer may import each other (without a circle); nn and data are side by
# side and must not import each other.
LAYERS = [
    ("maskkit", "maskkit.errors", "maskkit.files", "maskkit.runlock", "maskkit.rng", "maskkit.collectives"),
    ("maskkit.nn", "maskkit.data"),
    ("maskkit.methods",),
    ("maskkit.interop", "maskkit.config"),
    ("maskkit.train",),
    ("maskkit.eval", "maskkit.analysis"),
    ("maskkit.efficiency",),
    ("maskkit.demo", "maskkit.export", "maskkit.distill", "maskkit.analyze", "maskkit.debias"),
    ("maskkit.cli",),
    ("maskkit.__main__",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    return {module for module, _ in maskkit_imports(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, group): the most specific prefix in LAYERS that names the module."""
    best = None
    for index, layer in enumerate(LAYERS):
        for group in layer:
            if (module == group or module.startswith(group + ".")) and (best is None or len(group) > len(best[1])):
                best = (index, group)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        level, group = layer_of(module)
        for target in targets:
            target_level, target_group = layer_of(target)
            if target_level > level or (target_level == level and target_group != group and level > 0):
                wrong.append(f"{module} ({group}) imports {target} ({target_group})")
    return sorted(wrong)


def circles(edges: dict[str, set[str]]) -> list[str]:
    found = []

    def visit(module, path):
        for target in edges.get(module, ()):
            if target == path[0]:
                found.append(" -> ".join([*path, target]))
            elif target not in path and len(path) < 12:
                visit(target, [*path, target])

    for module in edges:
        visit(module, [module])
    return sorted(found)


def test_every_module_imports_only_what_lies_below_it_or_beside_it_in_its_own_package():
    assert not layer_violations(graph()), "\n".join(layer_violations(graph()))


def test_no_module_reaches_itself_through_its_imports():
    assert not circles(graph()), "\n".join(circles(graph())[:10])


def test_the_checks_find_the_tangles_this_layering_removed():
    """The two checks can fail: the imports maskkit had before (a data reader calling the config's
    checks, a method importing a gather from the loop's package, data and nn importing each other, two
    data modules importing each other) are all reported."""
    before = {"maskkit.data.pairs": {"maskkit.config", "maskkit.data.images"},
              "maskkit.data.images": {"maskkit.data.pairs"},
              "maskkit.methods.flip": {"maskkit.train.distributed"},
              "maskkit.data.corruptions": {"maskkit.nn.masking"},
              "maskkit.config": {"maskkit.train.checkpoint"}}
    assert layer_violations(before) == [
        "maskkit.config (maskkit.config) imports maskkit.train.checkpoint (maskkit.train)",
        "maskkit.data.corruptions (maskkit.data) imports maskkit.nn.masking (maskkit.nn)",
        "maskkit.data.pairs (maskkit.data) imports maskkit.config (maskkit.config)",
        "maskkit.methods.flip (maskkit.methods) imports maskkit.train.distributed (maskkit.train)",
    ]
    assert circles(before) == ["maskkit.data.images -> maskkit.data.pairs -> maskkit.data.images",
                               "maskkit.data.pairs -> maskkit.data.images -> maskkit.data.pairs"]
