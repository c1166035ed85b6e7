"""reslab's modules import each other in one direction: the import graph has no cycle.

A cycle hidden in function-level imports still works (each import runs late enough) but it means
neither module can be read, tested or changed without the other; it is how `infer` and `export`
used to be. The graph is read from the source with `ast`, function-level imports included, so a
cycle that only shows at run time on some path is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import reslab

SOURCE = Path(reslab.__file__).parent


def module_names(root: Path = SOURCE) -> dict[str, Path]:
    """Every module under src/reslab: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("reslab", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The reslab modules that `name` imports anywhere in its file.

    `from reslab.pkg import x` imports the submodule reslab.pkg.x where there is one, else the
    package; `import reslab.a.b` imports reslab.a.b; relative imports are resolved against the
    importer's package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
    resolved = set()
    for target in found:
        # `import reslab.a.b.c` where c is an attribute, not a file: the nearest module that exists.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.startswith("reslab") and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    """Edges importer -> imported, without edges from a module to its own ancestor packages.

    Importing `reslab.a.b` runs `reslab/a/__init__.py` first, so `reslab.a.b` reading a name from
    `reslab.a` is reading a package that is already being initialised; every other edge counts,
    a package's own re-exports of its submodules included.
    """
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        graph[name] = {t for t in imported_modules(name, path, modules) if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_sees_function_level_relative_and_submodule_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from reslab.pkg.a import thing\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from reslab.pkg import c\n")
    (pkg / "b.py").write_text("import reslab.pkg.a\n")
    (pkg / "c.py").write_text("from reslab.pkg import thing\n")  # the package: an ancestor, skipped
    modules = module_names(tmp_path)
    edges = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert edges["reslab.pkg.a"] == {"reslab.pkg.b", "reslab.pkg.c"}
    assert edges["reslab.pkg.b"] == {"reslab.pkg.a"}
    assert edges["reslab.pkg"] == {"reslab.pkg.a"}
    assert edges["reslab.pkg.c"] == {"reslab.pkg"}
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in edges.items()}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"reslab.pkg.a", "reslab.pkg.b"}
    graph["reslab.pkg.b"] = set()
    assert find_cycle(graph) is None


def test_reslab_has_no_import_cycle():
    graph = import_graph()
    assert "reslab.inference.predictor" in graph and len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_inference_layers_point_one_way():
    """fold <- backends <- export <- predictor: the exporter never reaches back for the Predictor."""
    graph = import_graph()
    assert "reslab.inference.predictor" not in graph["reslab.inference.export"]
    assert not {"reslab.inference.export", "reslab.inference.predictor"} & graph["reslab.inference.backends"]
    assert not {m for m in graph["reslab.inference.fold"] if m.startswith("reslab.inference")}


def test_the_old_module_names_still_import():
    import reslab.inference
    from reslab import export, infer

    assert infer.Predictor is reslab.inference.Predictor and infer.fold_batchnorm is reslab.inference.fold_batchnorm
    assert export.export is reslab.inference.export.export and export.TOLERANCE == reslab.inference.TOLERANCE
    for module in (infer, export):
        assert all(hasattr(module, name) for name in module.__all__)
