"""The house's structure, read from the source (ast): no import cycle among the project's
modules, no module importing another's private names, and dependencies pointing one way
(trainer → hybrid_engine → rollout, weight_loaders → archs → tandem_core)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tandem_core", "archs", "weight_loaders", "rollout", "hybrid_engine", "trainer")
SCRIPTS = ("benchmarks",)
LAYERS = {
    "tandem_core": 0,
    "archs": 1,
    "weight_loaders": 2,
    "rollout": 2,
    "hybrid_engine": 3,
    "trainer": 4,
    "benchmarks": 5,
}
"""A package may import its own layer and those below, never one above."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [p for pkg in (*PACKAGES, *SCRIPTS) for p in (REPO / pkg).rglob("*.py")]
    return {module_name(p): p for p in files}


def imports(path: Path, modules: dict[str, Path]):
    """(imported module, names taken from it, line) for every import statement anywhere in
    the file, function-local ones included (they keep an import at run time all the same)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base not in modules and not any(f"{base}.{a.name}" in modules for a in node.names):
                continue  # outside the project
            names = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from pkg import module`
                    yield sub, [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield base, names, node.lineno


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {target for target, _, _ in imports(p, modules)} - {m} for m, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_modules_are_found():
    modules = project_modules()
    for name in ("trainer.loop", "trainer.main", "archs.llama", "hybrid_engine.megatron_rollout"):
        assert name in modules


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_aliases(path: Path, modules: dict[str, Path]) -> set[str]:
    """Names under which a file holds a project module (`import a.b as X`, `from a import b`)."""
    aliases = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                full = alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                if full in modules:
                    aliases.add(alias.asname or alias.name.split(".")[0])
    return aliases


def test_no_private_name_crosses_a_module():
    modules = project_modules()
    bad = []
    for path in modules.values():
        where = path.relative_to(REPO)
        for target, names, line in imports(path, modules):
            private = [n for n in names if is_private(n)]
            if is_private(target.rpartition(".")[2]):
                private.append(target)
            if private:
                bad.append(f"{where}:{line} takes {private} from {target}")
        aliases = module_aliases(path, modules)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and is_private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                bad.append(f"{where}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", [*PACKAGES, *SCRIPTS])
def test_dependencies_point_down(package):
    edges = graph()
    bad = [
        f"{src} -> {dst}"
        for src, targets in edges.items()
        if src.split(".")[0] == package
        for dst in targets
        if LAYERS[dst.split(".")[0]] > LAYERS[package]
    ]
    assert not bad, "imports that run back up:\n" + "\n".join(bad)
