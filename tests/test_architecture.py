"""The package's rings hold: the problem packages (task, method, hp, optim, model, dataset) import nothing
from the engine, the config layer, the tools or the CLI (type-only imports excepted), lazy imports included."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hoexp"
PROBLEM = ("task", "method", "hp", "optim", "model", "dataset")
OUTER = ("hoexp.engine", "hoexp.config", "hoexp.tools", "hoexp.cli", "hoexp.api")
# Known exceptions, each with its reason; the list may only shrink.
ALLOWED: set[tuple[str, str]] = set()


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
