"""The package's rooms import one way, from the Lightning rooms down to the maths (docs/architecture.md).

Every import counts, those inside functions and under ``TYPE_CHECKING`` included: a lazy import that goes up is
a cycle in the design even when Python tolerates it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_influence"

RANKS = {
    "errors": 0,
    "_legacy_modules": 0,  # 0.1.0's module paths, resolved at import time: it imports nothing of the package itself
    "results": 1,
    "io": 2,
    "optimizers": 2,
    "records": 3,
    "sample_ids": 4,
    "autodiff": 5,
    "estimators": 6,
    "trajectory": 6,
    "core": 7,
    "reporting": 8,
    "callbacks": 9,
    "testing": 9,
    "__init__": 10,
}
"""A room may import the rooms of a lower rank, and itself; rooms of one rank are independent of each other."""

LIGHTNING_ROOMS = {"callbacks", "testing", "__init__"}
LOGGER_MODULES = ("lightning.pytorch.loggers", "lightning.pytorch.utilities")
"""``reporting`` may import Lightning's logger classes and rank-zero utilities, nothing else of Lightning."""


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path for path in sorted(PACKAGE.rglob("*.py"))
    }


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 or parts[1] == "__init__" else parts[1]


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import statement of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(base, node.lineno, id(node) in top)] + [(n, node.lineno, id(node) in top) for n in names]
    return found


MODULES = _modules()


def _internal(name: str) -> str | None:
    """The package module ``name`` refers to (a module, or a name inside one), or None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_goes_down_or_stays_in_its_room(module):
    room, problems = _room(module), []
    assert room in RANKS, f"{module}: room {room!r} has no rank in RANKS (add it, and to docs/architecture.md)"
    for name, line, _ in _imports(MODULES[module], module):
        target = _internal(name)
        if target is None:
            continue
        other = _room(target)
        if other != room and RANKS[other] >= RANKS[room]:
            problems.append(f"line {line}: {room} (rank {RANKS[room]}) imports {target} ({other}, rank {RANKS[other]})")
    assert not problems, f"{module} imports upwards:\n" + "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _room(m) not in LIGHTNING_ROOMS))
def test_lightning_stays_out_of_the_maths_rooms(module):
    allowed = LOGGER_MODULES if _room(module) == "reporting" else ()
    bad = [
        f"line {line}: {name}"
        for name, line, _ in _imports(MODULES[module], module)
        if name.split(".")[0] in ("lightning", "pytorch_lightning") and not name.startswith(allowed or ("\0",))
    ]
    assert not bad, f"{module} imports Lightning:\n" + "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    graph = {
        m: {t for name, _, top in _imports(p, m) if top and (t := _internal(name)) and t != m}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule (its __init__) is no cycle
            if state.get(nxt) == 1:
                return path + [nxt]
            if not state.get(nxt) and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            cycle = visit(module, [module])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
