"""The import graph between cnnflow's packages has no cycle, function-local imports
included; the light modules stay light.

A "package" is a first-level part of cnnflow: `cnnflow.data`, `cnnflow.train`,
`cnnflow.tracking`, ... or a top-level module (`cnnflow.cli`, `cnnflow.stages`).
`__main__` modules are entry points that nothing imports, so they are not part of it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "cnnflow"


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cnnflow" or len(parts) == 1:
        return None
    return parts[1]


def package_graph() -> dict[str, set[str]]:
    """{package: packages it imports}, from every import statement in src/cnnflow."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = _part(".".join(rel.parts).removesuffix(".__init__"))
        if me is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "cnnflow":  # `from cnnflow import x`: x a module or not
                    names = [f"cnnflow.{a.name}" for a in node.names
                             if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file()]
            for name in names:
                other = _part(name)
                if other and other != me:
                    graph.setdefault(me, set()).add(other)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert {"data", "train", "distributed", "tracking", "launch", "kfp"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_distributed_imports_nothing_from_train():
    assert "train" not in package_graph().get("distributed", set())


def test_light_modules_import_no_heavy_library():
    """What every step and the CLI load first: no torch, mlflow, kfp or matplotlib."""
    code = ("import sys, cnnflow.cli, cnnflow.config, cnnflow.stages, cnnflow.kfp.steps, "
            "cnnflow.launch, cnnflow.data.shards, cnnflow.data.manifest; "
            "print(','.join(m for m in ('torch', 'mlflow', 'kfp', 'matplotlib', 'sklearn', "
            "'webdataset') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == ""
