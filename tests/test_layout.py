"""The package's layout and import structure: the folders the package is grouped into, every
old (pre-grouping) import path answering with the same module object as its new home, no import
circle between its modules, and no module importing another module's private names (nor a
private module from outside its package).

Every import counts, including those inside functions: a lazy import still ties two
modules together. A private name is one with a leading underscore; a module may import
its own package's private modules (passes/_fx.py from passes/*.py) but not another's.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pathlib
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fairy2i_compile"
PACKAGE = "fairy2i_compile"
OPS = f"{PACKAGE}.compiler.ops"
CODEGEN = f"{PACKAGE}.compiler.codegen"

# what a newcomer sees at the top of the package: one folder per wing, the shared cache
# module, the two entry points and the op wing's compatibility modules
TOP_FOLDERS = {"compiler", "quantization", "checkpoints", "training", "eval"}
TOP_MODULES = {"__init__", "cache", "cli", "demo", "packed_ops", "quant_ops"}


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """({module: modules of this package it imports}, ['module: imports private name ...'])."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    private: List[str] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module or "")
                targets = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append((sub, None) if sub in modules else (base, a.name))
            else:
                continue
            for target, name in targets:
                if not target.startswith(PACKAGE):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != mod:
                    graph[mod].add(target)
                    if name is not None and name.startswith("_") and not name.startswith("__"):
                        private.append(f"{mod}: imports private name {name} from {target}")
                    leaf_parent, _, leaf = target.rpartition(".")
                    if leaf.startswith("_") and not leaf.startswith("__") and not (mod + ".").startswith(leaf_parent + "."):
                        private.append(f"{mod}: imports the private module {target} from outside its package")
    return graph, private


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    # A package's __init__ importing its own submodules (to re-export them) is not a circle
    # with a submodule that imports a sibling through the package: keep the edges
    # parent -> child out, and count every other edge.
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    graph, _ = import_graph()
    assert import_cycles(_without_package_inits(graph)) == []


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == []


def test_checker_sees_a_cycle_and_a_private_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_every_op_is_defined_in_the_ops_package():
    """torch.library definitions live in fairy2i_compile/compiler/ops/ and nowhere else in the package."""
    where = set()
    for mod, path in _modules().items():
        text = path.read_text()
        if "torch.library.custom_op(" in text or ".define(" in text or "torch.library.triton_op(" in text:
            where.add(mod)
    assert {m for m in where if not m.startswith(OPS)} == set()
    assert f"{OPS}.observe" in where


def test_public_functions_of_the_op_wing_and_codegen_have_docstrings():
    missing = []
    for mod, path in _modules().items():
        if not mod.startswith((OPS, CODEGEN)):
            continue
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                    and not ast.get_docstring(node)):
                missing.append(f"{mod}.{node.name}")
    assert missing == []


def test_the_top_of_the_package_is_the_wings_and_the_entry_points():
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert top == TOP_FOLDERS
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_MODULES
    # no source left at an old path: it would shadow the alias with a second copy (a folder
    # holding only __pycache__, left behind by a checkout update, shadows nothing)
    import fairy2i_compile
    for old, new in fairy2i_compile.MOVED_MODULES.items():
        assert not (ROOT / f"{old}.py").exists() and not list((ROOT / old).rglob("*.py")), old
        assert f"{PACKAGE}.{new}" in _modules(), new


def test_wing_packages_import_nothing():
    """compiler/, quantization/, checkpoints/, training/ __init__s hold a docstring only: importing
    compiler.options from the quantizer must not pull in the backend."""
    graph, _ = import_graph()
    for wing in ("compiler", "quantization", "checkpoints", "training"):
        assert graph[f"{PACKAGE}.{wing}"] == set(), wing


OLD_SUBMODULES = ["ops.packed", "ops.quantize", "codegen.dispatch", "codegen.cpu_packed", "passes.phase_quant",
                  "passes._layers", "calibration.driver", "calibration.rounding"]


@pytest.mark.parametrize("old", sorted(__import__(PACKAGE).MOVED_MODULES) + OLD_SUBMODULES)
def test_old_import_paths_give_the_same_module(old):
    """The one test of the old paths: each answers with its new home's module object."""
    import fairy2i_compile
    new = fairy2i_compile.moved_to(f"{PACKAGE}.{old}")
    assert new is not None and new != f"{PACKAGE}.{old}"
    assert importlib.import_module(f"{PACKAGE}.{old}") is importlib.import_module(new)


def test_old_names_reach_the_same_objects():
    import fairy2i_compile
    from fairy2i_compile.backend import fairy2i_backend
    from fairy2i_compile.calibration import calibrate
    from fairy2i_compile.compiler.backend import fairy2i_backend as new_backend
    from fairy2i_compile.quant import phase_quant
    from fairy2i_compile.quantization import quant
    from fairy2i_compile.quantization.calibration import calibrate as new_calibrate

    assert phase_quant is quant.phase_quant
    assert fairy2i_backend is new_backend is fairy2i_compile.fairy2i_backend
    assert calibrate is new_calibrate is fairy2i_compile.calibrate
    assert fairy2i_compile.quant is quant  # attribute access, as before the grouping
    assert fairy2i_compile.ops is importlib.import_module(OPS)
    assert fairy2i_compile.moved_to(f"{PACKAGE}.cli") is None and fairy2i_compile.moved_to("torch.quant") is None


def test_the_dynamo_entry_point_loads_the_backend():
    eps = [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "fairy2i"]
    if not eps:
        pytest.skip("fairy2i_compile is not installed (no torch_dynamo_backends entry point)")
    from fairy2i_compile.compiler.backend import fairy2i_backend
    assert eps[0].load() is fairy2i_backend  # whether the installed metadata names the old path or the new


if __name__ == "__main__":
    g, p = import_graph()
    print("modules:", len(g), "edges:", sum(map(len, g.values())))
    print("cycles:", import_cycles(_without_package_inits(g)))
    print("private imports:", p)
