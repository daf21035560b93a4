"""The package layers: every module imports, and imports only its own package and the layers
below it (the order of LAYERS), and the import graph has no cycle. Imports are read from the
source with ast, those inside functions included, so an upward import fails here at once
rather than as an import cycle some day later."""

from __future__ import annotations

import ast
import importlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "actors")

# Lowest first. A module may import its own unit and the layers before its own; units that
# share a layer are peers and may not import each other.
LAYERS = [
    ("orchestrator", "orchestrator.config", "orchestrator.faults"),
    ("orchestrator.data",),
    ("orchestrator.nn",),
    ("orchestrator.al",),
    ("actors",),
    ("orchestrator.distributed",),
    ("orchestrator.campaign",),
    ("orchestrator.sweep", "orchestrator.annotate"),
    ("orchestrator.run",),
]


def source_files() -> list[Path]:
    """The packages' Python files as the repository has them (tracked, or new and not
    ignored); every file below the packages when git is not there (an image's copy)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *PACKAGES],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return sorted(ROOT / name for name in listed if name.endswith(".py") and (ROOT / name).is_file())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in source_files()}


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of a module: the longest unit that is it or contains it."""
    found = [(len(unit), i, unit) for i, layer in enumerate(LAYERS) for unit in layer
             if module == unit or module.startswith(unit + ".")]
    if not found:
        return None
    _, index, unit = max(found)
    return index, unit


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """The project modules a module's source imports (relative imports resolved; `from
    package import name` counts as the submodule when there is one)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if f"{base}.{alias.name}" in MODULES)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    return {m: imports_in(p.read_text(), m, p.name == "__init__.py") for m, p in MODULES.items()}


def violations(module: str, imported: set[str]) -> list[str]:
    """Why each import of `module` breaks the rule (empty when none does)."""
    index, unit = unit_of(module)
    wrong = []
    for name in sorted(imported):
        if name in PACKAGES and name != "orchestrator":
            continue  # `import actors` alone: the empty package
        other = unit_of(name)
        if other is None:
            wrong.append(f"{module} imports {name}, which belongs to no layer")
        elif other[1] != unit and other[0] >= index:
            relation = "a peer" if other[0] == index else "a layer above"
            wrong.append(f"{module} ({unit}) imports {name} ({other[1]}, {relation})")
    return wrong


def test_the_packages_hold_the_layers_modules():
    assert len(MODULES) > 40, sorted(MODULES)
    assert {"orchestrator.run", "orchestrator.campaign.loop", "actors.scorer"} <= set(MODULES)


def test_every_module_belongs_to_a_layer():
    assert [m for m in MODULES if unit_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    assert importlib.import_module(module).__name__ == module


def test_no_module_imports_a_layer_above_its_own_or_a_peer():
    found = [v for module, imported in graph().items() for v in violations(module, imported)]
    assert found == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(edges.get(module, ())):
            if name not in edges:
                continue
            if state.get(name) == 1:
                cycles.append(path[path.index(name):] + [name])
            elif name not in state:
                visit(name, path + [name])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_an_upward_or_sideways_import_is_caught_wherever_it_is():
    """The rule itself can fail: imports at module level, in a function, and relative ones."""
    source = (
        "import numpy\n"
        "from orchestrator.data.pool import open_pool\n"
        "def f():\n"
        "    from orchestrator.campaign.loop import Campaign\n"
        "    from ..distributed import score\n"
    )
    imported = imports_in(source, "orchestrator.nn.example")
    assert imported >= {"orchestrator.data.pool", "orchestrator.campaign.loop",
                        "orchestrator.distributed.score"}
    assert violations("orchestrator.nn.example", imported) == [
        "orchestrator.nn.example (orchestrator.nn) imports orchestrator.campaign.loop "
        "(orchestrator.campaign, a layer above)",
        "orchestrator.nn.example (orchestrator.nn) imports orchestrator.distributed "
        "(orchestrator.distributed, a layer above)",
        "orchestrator.nn.example (orchestrator.nn) imports orchestrator.distributed.score "
        "(orchestrator.distributed, a layer above)",
    ]
    assert violations("orchestrator.sweep.x", {"orchestrator.annotate.server"}) == [
        "orchestrator.sweep.x (orchestrator.sweep) imports orchestrator.annotate.server "
        "(orchestrator.annotate, a peer)"]
