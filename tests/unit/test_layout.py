"""The layout keeps its promises: engines stand alone, and no module imports another in a cycle.

Imports are read from the source (every `import`, at module level, inside functions and under
`TYPE_CHECKING` alike), so a cycle hidden behind a type-only import is still a cycle.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "addons" / "sluicegate"
# Adapters and wiring: allowed to import mitmproxy and the config. Everything else is an engine.
NOT_ENGINES = ("mitm", "mitmcompat", "cli", "config", "runtime", "__main__")
FORBIDDEN_FOR_ENGINES = ("mitmproxy", "sluicegate.config", "sluicegate.mitm", "sluicegate.runtime")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (`from a import b` counts `a.b` when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(path):
            # an import of a.b.c also executes a and a.b
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def _is_engine(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] not in NOT_ENGINES


def test_engines_import_neither_mitmproxy_nor_config() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if not _is_engine(module):
            continue
        for target in sorted(_imports(path)):
            if target.startswith(FORBIDDEN_FOR_ENGINES):
                offenders.append(f"{module} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles() -> None:
    graph = _graph()
    # Package __init__ modules re-export their children; an edge from a child back to its own
    # package's __init__ is how Python imports work, not a design cycle.
    for name, edges in graph.items():
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_engine_package_is_documented_in_architecture() -> None:
    text = (PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    missing = [p for p in packages if f"{p}/" not in text]
    assert not missing, f"packages not described in docs/ARCHITECTURE.md: {missing}"


def test_every_engine_is_type_checked_strictly() -> None:
    """pyproject's strict mypy override names every engine (a new engine package must join it)."""
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    strict = [o for o in pyproject["tool"]["mypy"]["overrides"] if o.get("disallow_untyped_defs")]
    assert len(strict) == 1, "one strict override, for the engines"
    patterns = strict[0]["module"]
    missing = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module == "sluicegate" or _is_engine(module):
            if not any(fnmatch.fnmatchcase(module, p) or module == p.removesuffix(".*")
                       for p in patterns):  # fmt: skip
                missing.append(module)
        elif any(fnmatch.fnmatchcase(module, p) for p in patterns):
            missing.append(f"{module} (not an engine, yet strict)")
    assert not missing, f"[tool.mypy] strict override misses: {missing}"
