"""The package's layers, read from its imports: each subpackage imports only the layers below it (the order
its `__init__` docstrings state), and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import k3d_registry_dockerd

PACKAGE = k3d_registry_dockerd.__name__
ROOT = Path(k3d_registry_dockerd.__file__).parent
# Lowest first. Layers of one rank are peers: neither may import the other.
RANKS = {
    "common": 0,
    "oci": 0,
    "docker": 1,
    "cache": 1,
    "sources": 2,
    "mirror": 3,
    "push": 4,
    "web": 5,
    "program": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def layer(module: str) -> str | None:
    """The layer of a module of the package; None for the package itself (its name and version only)."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return parts[0] if parts[0] in RANKS else "program"


def imports(path: Path) -> set[str]:
    """The package's modules (or packages) that the module at `path` imports, anywhere in its code."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.split(".")[0] == PACKAGE:
                target = node.module
            else:
                continue
            # `from . import units` imports a module; `from .store import Store` a name of one.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


MODULES = {module_name(path): imports(path) for path in sorted(ROOT.rglob("*.py"))}


def test_every_module_is_in_a_known_layer() -> None:
    subpackages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert subpackages == set(RANKS) - {"program"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module: str) -> None:
    source = layer(module)
    wrong = []
    for target in sorted(MODULES[module]):
        below = layer(target)
        if below is None or source is None or below == source:
            continue
        if RANKS[below] >= RANKS[source]:
            wrong.append(f"{target} ({below}, rank {RANKS[below]})")
    assert not wrong, f"{module} ({source}, rank {RANKS[source or 'program']}) imports upward: {wrong}"


def test_no_import_cycles() -> None:
    graph = {
        module: {t for t in targets if t in MODULES and t != module} for module, targets in MODULES.items()
    }
    # A package's __init__ imports nothing here, so edges into it are no cycles through its modules.
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycle = [*visiting[visiting.index(module) :], module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_check_sees_imports() -> None:
    """The reader finds relative, absolute and in-function imports (else the layer tests check nothing)."""
    assert f"{PACKAGE}.oci.reference" in MODULES[f"{PACKAGE}.mirror.mirror"]
    assert f"{PACKAGE}.common.units" in MODULES[f"{PACKAGE}.cli"]
    assert f"{PACKAGE}.web.routes" in MODULES[f"{PACKAGE}.server"]
