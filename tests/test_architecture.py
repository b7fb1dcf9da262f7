"""The package's rings hold: the problem packages (task, method, hp, optim, model, dataset) import nothing
from the engine, the config layer, the tools or the CLI (type-only imports excepted), lazy imports included;
and the import graph of ``hoexp/`` has no cycle (lazy imports included, type-only ones excepted)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hoexp"
PROBLEM = ("task", "method", "hp", "optim", "model", "dataset")
OUTER = ("hoexp.engine", "hoexp.config", "hoexp.tools", "hoexp.cli", "hoexp.api")
# Known exceptions, each with its reason; the list may only shrink.
ALLOWED: set[tuple[str, str]] = set()


# Known import cycles, each with its reason; the set may only shrink.
ALLOWED_CYCLES: set[frozenset[str]] = set()  # none: the list only shrinks (the IFT refactor removed the last)


def imported(path: Path, pkg: Path = PKG) -> list[str]:
    """The full name of everything ``path`` (a file of the package at ``pkg``) imports, at any depth, except
    under ``if TYPE_CHECKING:``: ``import a.b`` gives ``a.b``, ``from a import b`` gives ``a.b`` (a module
    or a name in ``a``); relative imports resolved."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the importing module's package, ``level - 1`` packages up
                base = module_name(path, pkg).split(".")
                base = base if path.name == "__init__.py" else base[:-1]
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            found += [f"{module}.{a.name}" for a in node.names]
    return found


def imports(path: Path, pkg: Path = PKG) -> set[str]:
    """Every module ``path`` imports, and every imported name (``from a import b``: ``a`` and ``a.b``)."""
    names = imported(path, pkg)
    return set(names) | {n.rpartition(".")[0] for n in names if "." in n}


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module → the package's modules it imports (an imported name resolves to the deepest module that
    holds it: ``from a.b import c`` is ``a.b.c`` if that is a module, else ``a.b``)."""
    files = {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        graph[mod] = set()
        for imp in imported(path, pkg):
            while imp and imp not in files:
                imp = imp.rpartition(".")[0]
            if imp and imp != mod:
                graph[mod].add(imp)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_problem_packages_import_nothing_from_the_outer_rings():
    bad = []
    for pkg in PROBLEM:
        for path in sorted((PKG / pkg).rglob("*.py")):
            mod = module_name(path)
            for imp in sorted(imports(path)):
                outer = next((o for o in OUTER if imp == o or imp.startswith(o + ".")), None)
                if outer and (mod, imp) not in ALLOWED and not any(mod == m and imp.startswith(a) for m, a in ALLOWED):
                    bad.append(f"{mod} imports {imp}")
    assert not bad, "\n".join(bad)


def test_the_allowed_exceptions_are_still_needed():
    for mod, imp in ALLOWED:
        path = PKG.parent / (mod.replace(".", "/") + ".py")
        assert any(i == imp or i.startswith(imp + ".") for i in imports(path)), f"{mod} no longer imports {imp}"


def test_the_rule_sees_a_violation(tmp_path, monkeypatch):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from hoexp.engine.loop import run\n")
    assert "hoexp.engine.loop" in imports(f)
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hoexp.engine.loop import run\n")
    assert "hoexp.engine.loop" not in imports(f)


def test_the_import_graph_has_no_cycle():
    bad = [" ↔ ".join(sorted(c)) for c in cycles(import_graph()) if c not in ALLOWED_CYCLES]
    assert not bad, "import cycles (lazy imports count):\n" + "\n".join(bad)


def test_the_allowed_cycles_are_still_there():
    found = cycles(import_graph())
    assert all(c in found for c in ALLOWED_CYCLES), f"remove from ALLOWED_CYCLES: {ALLOWED_CYCLES - set(found)}"


def test_the_cycle_check_sees_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "a.py").write_text("from p.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from p import a\n")  # lazy: still a cycle
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.sub\n")
    graph = import_graph(pkg)
    assert graph["p.sub"] == {"p.sub.c"} and graph["p.sub.c"] == set()  # relative resolved; type-only skipped
    assert cycles(graph) == [frozenset({"p.a", "p.b"})]
