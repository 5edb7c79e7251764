"""The project's modules import each other without a circle, lazy imports (inside functions)
included: read from the source, so an import that only runs on some path counts too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lomo_jax", "convert")


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for f in sorted((REPO / package).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_only(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block: never run, read by type checkers only."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == (
        "TYPE_CHECKING"
    )


def imports(name: str, tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """The project's modules that module `name` imports anywhere in its code (a package's
    submodule named in `from package import submodule` is the submodule; a string literal that
    is a submodule's dotted name counts, as `importlib.import_module` takes it)."""
    is_package = known[name].name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in (or is)
                package = name.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "." in node.value and node.value in known:
                out.add(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, ast.parse(f.read_text()), known) for name, f in known.items()}


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_import_circle():
    found = circle(graph())
    assert found is None, " -> ".join(found)


def test_the_check_sees_a_lazy_circle():
    """The detector itself: a function-level import back to its importer is a circle."""
    known = {"lomo_jax.a": REPO / "a.py", "lomo_jax.b": REPO / "b.py"}
    a = ast.parse("import lomo_jax.b\n")
    b = ast.parse("def f():\n    from lomo_jax import a\n")
    edges = {"lomo_jax.a": imports("lomo_jax.a", a, known)}
    edges["lomo_jax.b"] = imports("lomo_jax.b", b, known)
    assert circle(edges) == ["lomo_jax.a", "lomo_jax.b", "lomo_jax.a"]
    assert circle({"lomo_jax.a": set(), "lomo_jax.b": {"lomo_jax.a"}}) is None


def test_every_module_is_read():
    found = graph()
    assert {"lomo_jax.engine", "lomo_jax.cli", "convert.importer"} <= set(found)
    assert "lomo_jax.records" in found["lomo_jax.tasks"]  # a module-level import
    assert "convert" in found["lomo_jax.pretrained"]  # a lazy one
