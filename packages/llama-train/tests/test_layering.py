"""The import graph of both packages: no cycles, and every layer imports only those below it.

Every import is read from the source with `ast`, at module level and inside
functions alike (a function-level import hides a cycle from Python, not from
this test). The layers of llama_train, lowest first (docs/design.md, section
Architecture): the leaves `errors` and `rundir`; the torch-free readers `scaling`
and `analysis`; `core`; `recipe`; `launch`; `cli`. gssm_data never imports
llama_train, and llama_train reaches it only through its public face.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import gssm_data
import llama_train

Graph = dict[str, set[str]]

LEAVES = ("llama_train.errors", "llama_train.rundir")
# Torch-free readers of finished runs (fits, tables, plots, status): above the leaves only.
ANALYSIS = ("llama_train.scaling", "llama_train.analysis")
CORE = ("llama_train.core",)
RECIPE = ("llama_train.recipe",)
LAUNCH = ("llama_train.launch",)
CLI = ("llama_train.cli",)
LAYERS = (LEAVES, ANALYSIS, CORE, RECIPE, LAUNCH, CLI)
ENTRY_POINTS = ("llama_train", "llama_train.__main__")

# ---------------------------------------------------------------------------
# The checker


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def import_graph(package: str, root: Path) -> Graph:
    """Module -> the modules it imports anywhere in its source (own package and others)."""
    modules = {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}
    graph: Graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, is_package)
                for alias in node.names:
                    # `from pkg import mod` imports the module pkg.mod when there is one.
                    child = f"{base}.{alias.name}"
                    targets.add(child if child in modules else base)
        graph[name] = {target for target in targets if target != name}
    return graph


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules (`a -> b -> a`), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def forbidden_imports(
    graph: Mapping[str, Iterable[str]], importers: Iterable[str], targets: Iterable[str]
) -> list[str]:
    """`a -> b` for every module under `importers` that imports a module under `targets`."""
    importers, targets = tuple(importers), tuple(targets)
    return sorted(
        f"{module} -> {target}"
        for module, imported in graph.items()
        if _within(module, importers)
        for target in imported
        if _within(target, targets)
    )


def _graph(package: object) -> Graph:
    root = Path(package.__file__).parent  # type: ignore[attr-defined]
    return import_graph(package.__name__, root)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def llama_graph() -> Graph:
    return _graph(llama_train)


@pytest.fixture(scope="module")
def gssm_graph() -> Graph:
    return _graph(gssm_data)


# ---------------------------------------------------------------------------
# The checker can fail


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def late():\n    from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph("pkg", package)
    assert graph["pkg.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    del graph["pkg.c"]
    assert find_cycle(graph) is None


def test_the_checker_names_an_import_that_reaches_up_a_layer():
    graph = {"x.core.model": {"x.errors", "x.train"}, "x.train": {"x.core.model"}}
    assert forbidden_imports(graph, ["x.core"], ["x.train", "x.cli"]) == ["x.core.model -> x.train"]
    assert forbidden_imports(graph, ["x.core"], ["x.cli"]) == []


# ---------------------------------------------------------------------------
# llama_train


def test_every_module_belongs_to_one_layer(llama_graph):
    assert {"llama_train.recipe.train_config", "llama_train.recipe.train"} <= set(llama_graph)
    placed = set(ENTRY_POINTS) | {
        name for name in llama_graph if any(_within(name, layer) for layer in LAYERS)
    }
    assert placed == set(llama_graph)
    for layer in LAYERS:  # every folder the design names exists
        assert any(_within(name, layer) for name in llama_graph), layer


def test_llama_train_has_no_import_cycle(llama_graph):
    assert len(llama_graph) > 20  # every module was read
    assert find_cycle(llama_graph) is None


def test_the_leaves_import_only_each_other(llama_graph):
    others = [n for n in llama_graph if "." in n and not _within(n, LEAVES)]
    assert forbidden_imports(llama_graph, LEAVES, others) == []
    assert forbidden_imports(llama_graph, ["llama_train.errors"], ["llama_train"]) == []


@pytest.mark.parametrize("level", range(1, len(LAYERS)), ids=lambda i: LAYERS[i][-1])
def test_each_layer_imports_only_the_layers_below_it(llama_graph, level):
    above = [prefix for layer in LAYERS[level + 1 :] for prefix in layer]
    assert forbidden_imports(llama_graph, LAYERS[level], above) == []


def test_the_analysis_imports_only_the_leaves(llama_graph):
    others = [n for n in llama_graph if "." in n and not _within(n, (*LEAVES, *ANALYSIS))]
    assert forbidden_imports(llama_graph, ANALYSIS, others) == []


def test_the_fits_do_not_import_the_run_readers(llama_graph):
    assert forbidden_imports(llama_graph, ["llama_train.scaling"], ["llama_train.analysis"]) == []


def test_the_cli_app_is_a_leaf_of_the_cli(llama_graph):
    assert forbidden_imports(llama_graph, ["llama_train.cli.app"], ["llama_train"]) == [
        "llama_train.cli.app -> llama_train.errors"
    ]


# ---------------------------------------------------------------------------
# gssm_data


def test_gssm_data_has_no_import_cycle(gssm_graph):
    assert len(gssm_graph) > 10
    assert find_cycle(gssm_graph) is None


def test_gssm_data_never_imports_llama_train(gssm_graph):
    assert forbidden_imports(gssm_graph, ["gssm_data"], ["llama_train"]) == []


def test_llama_train_reaches_gssm_data_only_through_its_public_face(llama_graph):
    """`gssm_data` itself (the data API) and `gssm_data.common` (the shared utilities)."""
    inside = [
        f"{module} -> {target}"
        for module, targets in llama_graph.items()
        for target in targets
        if _within(target, ["gssm_data"])
        and target != "gssm_data"
        and not _within(target, ["gssm_data.common"])
    ]
    assert inside == []


def test_the_shared_utilities_import_nothing_else_of_gssm_data(gssm_graph):
    others = [
        name
        for name in gssm_graph
        if not _within(name, ["gssm_data.common", "gssm_data.errors"]) and name != "gssm_data"
    ]
    assert forbidden_imports(gssm_graph, ["gssm_data.common"], others) == []


def test_the_gssm_data_cli_app_imports_no_command_module(gssm_graph):
    assert forbidden_imports(gssm_graph, ["gssm_data.cli.app"], ["gssm_data.cli"]) == []


def test_the_readers_of_runs_load_no_torch(llama_graph):
    """Every module of `analysis` and `scaling` imports without torch (quick on any machine)."""
    modules = sorted(name for name in llama_graph if _within(name, ANALYSIS))
    assert "llama_train.analysis.status" in modules and "llama_train.scaling.fit" in modules
    code = "import sys\n" + "".join(f"import {name}\n" for name in modules)
    code += "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
