"""The house's layers: one direction of imports (issue 24). Every ``taskpgm_ray`` import counts, also the ones
inside functions (they are still dependencies, only deferred)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "taskpgm_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the taskpgm_ray modules it imports (a package import counts as its ``__init__``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("taskpgm_ray"):
                for alias in node.names:  # `from taskpgm_ray.x import y`: y may itself be a module
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("taskpgm_ray"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep]
            if dep not in state and (cycle := visit(dep, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    # package __init__ files re-export their modules; an edge into a package is an edge into its modules
    graph = {k: {d for d in v if not (k.startswith(d + ".") and d != "taskpgm_ray")} for k, v in import_graph().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    high = {"taskpgm_ray.report", "taskpgm_ray.tune", "taskpgm_ray.compare", "taskpgm_ray.pipeline", "taskpgm_ray.cli",
            "taskpgm_ray.cli_mixture"}
    for name, deps in graph.items():
        if name.startswith(("taskpgm_ray.distributed", "taskpgm_ray.mixture", "taskpgm_ray.train",
                            "taskpgm_ray.tasks")):
            assert not deps & high, (name, deps & high)
    assert not graph["taskpgm_ray.compare"] & {"taskpgm_ray.report", "taskpgm_ray.pipeline"}
    assert not graph["taskpgm_ray.figures"] & high
    # mixture/ is pure maths: no Ray, no other layer of the package
    for name, deps in graph.items():
        if name.startswith("taskpgm_ray.mixture."):
            assert all(d.startswith("taskpgm_ray.mixture") for d in deps), (name, deps)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
