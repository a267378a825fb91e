"""The core's shape: no import circle, a contract at the bottom, one public API that plugins need nothing else
for (bench.api), and a core that imports no plugin."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import bench.api as api

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted((ROOT / "bench").glob("*.py"))
PLUGIN_FILES = sorted([*(ROOT / "defenses").glob("*.py"), *(ROOT / "attacks").glob("*.py"),
                       *(ROOT / "tests" / "plugins").glob("*/*/*.py")])


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside a function (`from bench import x` as bench.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            if node.module == "bench":
                out |= {f"bench.{a.name}" for a in node.names}
    return out


def core_graph() -> dict[str, set[str]]:
    names = {p.stem for p in CORE}
    return {p.stem: {m.split(".")[1] for m in imported(p) if m.startswith("bench.") and m.split(".")[1] in names}
            - {p.stem} for p in CORE}


def test_core_modules_import_each_other_without_a_circle():
    graph, done, path = core_graph(), set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_contract_sits_at_the_bottom_and_nothing_in_the_core_imports_the_public_api():
    graph = core_graph()

    def below(module):
        out, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - out:
                out.add(nxt)
                todo.append(nxt)
        return out

    engine = {"runner", "evaluator", "checkpoints", "train", "config", "store", "leaderboard", "registry", "checks",
              "context", "cli", "sweep", "data", "models"}
    for module in ("params", "contract", "composition"):
        assert not below(module) & engine, f"bench.{module} imports the engine: {sorted(below(module) & engine)}"
    assert [m for m, deps in graph.items() if "api" in deps] == []  # api gathers names; nothing depends on it
    for path in CORE:
        assert not {m for m in imported(path) if m.split(".")[0] in ("defenses", "attacks")}, path.name


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path):
    """The built-in plugins (and the test packages standing for third-party ones) use nothing internal."""
    internal = sorted(m for m in imported(path) if m.split(".")[0] == "bench" and m != "bench.api")
    assert internal == [], f"{path.name} imports {internal}; export what it needs from bench.api"


def test_every_public_name_exists_has_its_own_docstring_and_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    plugin_section = readme[readme.index("## Writing a plugin"):]
    assert len(api.__all__) == len(set(api.__all__))
    for name in api.__all__:
        obj = getattr(api, name)
        doc = inspect.getdoc(obj) or ""
        assert doc and not doc.startswith(f"{getattr(obj, '__name__', name)}("), f"{name} has no docstring of its own"
        assert f"`{name}" in plugin_section, f"README's plugin section does not document {name}"
    with pytest.raises(AttributeError, match="no attribute 'pgd_attack'"):
        api.pgd_attack  # noqa: B018 -- a name that is not public is an AttributeError, not a lazy import


def test_ray_is_an_optional_extra_that_only_the_cluster_executor_imports():
    users = sorted(p.stem for p in CORE if any(m.split(".")[0] == "ray" for m in imported(p)))
    assert users == ["cluster"]
    graph = core_graph()
    assert [m for m, deps in graph.items() if "cluster" in deps] == ["sweep"]  # `bench sweep --executor ray` only
    source = (ROOT / "bench" / "sweep.py").read_text()
    assert "from bench import cluster" in source.split("def run(")[1]  # imported when a Ray sweep starts
