"""The first-party import graph, read with ``ast`` (nothing is imported): no cycles of any kind, training
scripts are leaves, library modules follow the layer order, every package docstring maps its modules, and
no test module imports another.

Edges have a kind: "top" (module level), "local" (inside a function) and "type" (under
``if TYPE_CHECKING:``). A cycle of any kind counts: a function-local or TYPE_CHECKING import only hides
one (the first call, or the type checker, still meets it), and untangling it later costs more.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "autoencoder", "diffusion", "prior", "pipelines", "bench")
# DESIGN's layers, lowest first: a module imports from its own package or from a lower layer only.
LAYER = {"common": 0, "autoencoder": 1, "prior": 2, "diffusion": 2, "pipelines": 3, "bench": 4}
TRAINING_SCRIPTS = frozenset({"autoencoder.train", "diffusion.train_latent", "diffusion.train_classifier",
                              "prior.train"})


def is_leaf(module: str) -> bool:
    """Entry points, which only users launch: they may import anything (but a training script)."""
    name = module.rsplit(".", 1)[-1]
    return (module in TRAINING_SCRIPTS or name.startswith("evaluate") or module.startswith("bench.")
            or module in ("pipelines.generate", "pipelines.demo"))


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def resolve(name: str) -> str | None:
    """The longest first-party module a dotted name starts with (``pkg.mod.Class`` -> ``pkg.mod``)."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules()), None)


class _Imports(ast.NodeVisitor):
    """Collects (target module, kind) for every import statement of one module."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package, self.kind, self.found = module, is_package, "top", set()

    def _with_kind(self, kind: str, nodes) -> None:
        outer, self.kind = self.kind, kind
        for node in nodes:
            self.visit(node)
        self.kind = outer

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self._with_kind("type", node.body)
            self._with_kind(self.kind, node.orelse)
        else:
            self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._with_kind("local" if self.kind == "top" else self.kind, ast.iter_child_nodes(node))

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(resolve(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        for alias in node.names:
            self._add(resolve(f"{base}.{alias.name}") or resolve(base))

    def _add(self, target: str | None) -> None:
        if target and target != self.module:
            self.found.add((target, self.kind))


@functools.cache
def edges() -> dict[tuple[str, str], frozenset[str]]:
    """(importer, imported) -> the kinds of import between them."""
    graph: dict[tuple[str, str], set[str]] = {}
    for module, path in modules().items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for target, kind in visitor.found:
            graph.setdefault((module, target), set()).add(kind)
    return {pair: frozenset(kinds) for pair, kinds in graph.items()}


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), over edges of every kind."""
    succ: dict[str, list[str]] = {}
    for a, b in sorted(edges()):
        succ.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(modules()):
        if module not in index:
            visit(module)
    return groups


def describe(pairs) -> list[str]:
    return [f"{a} -> {b} [{', '.join(sorted(edges()[a, b]))}]" for a, b in sorted(pairs)]


def test_the_graph_is_read():
    """Guards the other tests against vacuous passes: the scan finds the modules and known edges."""
    assert {"common.config", "autoencoder.model", "diffusion.unet", "pipelines.base"} <= set(modules())
    assert ("diffusion.unet", "common.layers") in edges() or ("autoencoder.model", "common.config") in edges()


def test_no_import_cycles_of_any_kind():
    problems = []
    for group in cycles():
        problems += [f"cycle {', '.join(group)}:"] + describe((a, b) for a, b in edges() if a in group and b in group)
    assert not problems, "\n".join(problems)


def test_nothing_imports_a_training_script():
    """Training scripts are leaves: a config or helper they share belongs in a library module."""
    imports = describe(pair for pair in edges() if pair[1] in TRAINING_SCRIPTS)
    assert not imports, "training scripts imported:\n" + "\n".join(imports)


def test_library_modules_follow_the_layer_order():
    """common <- autoencoder <- {prior, diffusion} <- pipelines; prior and diffusion do not import each
    other; and a library module imports no entry point."""
    wrong = []
    for a, b in edges():
        if is_leaf(a):
            continue
        top_a, top_b = a.split(".")[0], b.split(".")[0]
        if (top_a != top_b and LAYER[top_b] >= LAYER[top_a]) or is_leaf(b):
            wrong.append((a, b))
    assert not wrong, "imports against the layer order:\n" + "\n".join(describe(wrong))


@pytest.mark.parametrize("package", ["common", "common.data", "autoencoder", "diffusion", "prior", "pipelines"])
def test_package_docstring_maps_every_module(package):
    path = modules()[package]
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    children = [m for m in modules() if m.startswith(package + ".") and "." not in m[len(package) + 1:]]
    missing = [m for m in children if f"``{m}``" not in doc]
    assert not missing, f"{path.relative_to(ROOT)}'s docstring does not name: {', '.join(missing)}"


def test_no_test_module_imports_another():
    """Shared factories live in tiny.py and shared fixtures in conftest.py, so each test module stands alone."""
    wrong = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{path.name} imports {n}" for n in names if n.split(".")[-1].startswith(("test_", "conftest"))]
    assert not wrong, "\n".join(wrong)
