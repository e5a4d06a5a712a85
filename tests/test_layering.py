"""The import order DESIGN.md lays out, held by reading every module's imports (AST):

    errors -> core maths (options, schemes, observers, plan, ...) -> modules
           -> algorithms / quantizers -> io, export -> api -> cli, client

A module may import its own layer or lower ones, never a higher one; no private name
(``_x``) is imported from another module; the library never imports the service or a web
framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mono_quant"

# module prefix -> layer (the longest matching prefix wins)
LAYERS = {
    "mono_quant.errors": 0,
    "mono_quant.version": 0,
    "mono_quant.core": 1,
    "mono_quant.modules": 2,
    "mono_quant.core.quantizers": 3,
    "mono_quant.core.algorithms": 3,
    "mono_quant.core.tuning": 3,
    "mono_quant.io": 4,
    "mono_quant.export": 4,
    "mono_quant.api": 5,
    "mono_quant.cli": 6,
    "mono_quant.client": 6,
    "mono_quant.testing": 6,
    "mono_quant": 6,  # the package's __init__: the public API imports everything
}
FORBIDDEN_IN_LIBRARY = ("app", "fastapi", "starlette", "uvicorn", "sqlalchemy", "celery")
# The HTTP client is the one library module that may use an HTTP package.
HTTP_CLIENT_MODULES = ("mono_quant.client",)


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """``(line, imported module, names)`` of every import, function-level ones included."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base, [alias.name for alias in node.names]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    module = _module_name(path)
    own = _layer(module)
    bad = []
    for line, target, names in _imports(path):
        if target.split(".")[0] in FORBIDDEN_IN_LIBRARY:
            bad.append(f"line {line}: imports {target} (the library never imports the service or web packages)")
        if not target.startswith("mono_quant"):
            continue
        for name in names or [None]:
            full = f"{target}.{name}" if name and _layer(f"{target}.{name}") is not None and name[0] != "_" else target
            layer = _layer(full)
            if layer is not None and own is not None and layer > own and not full.startswith(module):
                bad.append(f"line {line}: {module} (layer {own}) imports {full} (layer {layer})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", SOURCES + sorted((ROOT / "app").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_from_another_module(path):
    module = _module_name(path)
    bad = [
        f"line {line}: from {target} import {name}"
        for line, target, names in _imports(path)
        if target.startswith(("mono_quant", "app")) and target != module
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_the_http_client_is_the_only_library_module_using_httpx():
    users = [
        _module_name(path)
        for path in SOURCES
        if any(target.split(".")[0] == "httpx" for _, target, _ in _imports(path))
    ]
    assert set(users) <= set(HTTP_CLIENT_MODULES)
