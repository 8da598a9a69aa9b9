"""Imports run one way (config/platform -> data, models -> training -> convert -> tools): no circle between the
package's files, counting the imports inside functions. Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
import functools
from collections.abc import Collection, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_ext"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    files = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    modules = set(files)
    return {name: frozenset(imported_modules(path, modules) - {name}) for name, path in files.items()}


def circles(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "megatron_ext.cli" in graph["megatron_ext.config"]  # top level
    assert "megatron_ext.models.gpt" in graph["megatron_ext.convert.hf"]  # inside a function
    assert "megatron_ext.training.layout" in graph["megatron_ext.convert"]  # the package's __init__


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circle_between_files() -> None:
    found = circles(import_graph())
    assert not found, "import circles (break each so imports run one way): " + "; ".join(" <-> ".join(c) for c in found)


# The order imports run in: a module may import its own layer and the layers before it. Modules not named here
# (new ones, the ALCF front end) are not checked by this test; the circle test above covers them.
LAYERS = [
    ["cli"],
    ["config", "platform", "distributed"],
    ["data", "models"],
    ["training"],
    ["convert"],
]
# Inside data/: the order of the data itself (text -> tokens -> index -> list -> blend -> samples).
DATA_ORDER = ["tokenizers", "indexed", "builtin_corpus", "preprocess", "data_list", "mixture", "blend", "gpt_data"]


def rank(module: str, order: list[list[str]], prefix: str) -> int | None:
    """The position of `module` (below `prefix`) in `order`, by its first name part; None if not named."""
    first = module[len(prefix) :].split(".")[0] if module.startswith(prefix) else None
    return next((i for i, names in enumerate(order) if first in names), None)


def backward_imports(order: list[list[str]], prefix: str) -> list[str]:
    graph = import_graph()
    found = []
    for module, imports in graph.items():
        own = rank(module, order, prefix)
        for dep in imports:
            theirs = rank(dep, order, prefix)
            if own is not None and theirs is not None and theirs > own:
                found.append(f"{module} -> {dep}")
    return sorted(found)


def test_imports_run_one_way() -> None:
    """config/platform -> data, models -> training -> convert: nothing imports a later layer (training does not
    load checkpoints through the converters, data does not import training, ...)."""
    backward = backward_imports(LAYERS, f"{PACKAGE}.")
    assert not backward, backward


def test_the_data_folder_reads_in_the_order_of_its_data() -> None:
    backward = backward_imports([[name] for name in DATA_ORDER], f"{PACKAGE}.data.")
    assert not backward, backward
