"""Layers import one way only (README, "Module map"): a lower layer never imports a higher one,
and the pure layers never import flask, requests or the store."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fhir_kat"

# Higher number = higher layer. A module may import its own layer or lower ones.
LAYERS = {
    "api": 6,
    "web": 6,
    "app": 7,
    "cli": 8,
    "services": 5,
    "exchange": 4,
    "security": 4,
    "store": 3,
    "artifacts": 2,
    "mapping": 2,
    "clinical": 2,
    "instruments": 2,
    "workflow": 2,
    "terminology": 1,
    "search": 1,
    "validation": 1,
    "errors": 0,
    "settings": 0,
    "canonical": 0,
    "profiles": 1,
    "logging": 0,
    "wsgi": 8,
    "prefork": 7,
    "synthetic": 2,
    "v2": 2,
}
PURE = {
    "mapping",
    "terminology",
    "clinical",
    "artifacts",
    "search",
    "validation",
    "profiles",
    "errors",
    "workflow",
    "instruments",
    "synthetic",
    "v2",
}
FORBIDDEN_IN_PURE = {"flask", "requests", "sqlalchemy", "fhir_kat.store", "fhir_kat.api"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fhir_kat" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_imports_point_down() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _layer(".".join(rel.parts))
        if own is None or own not in LAYERS:
            continue
        for imported in _imports(path):
            other = _layer(imported)
            if other and other in LAYERS and LAYERS[other] > LAYERS[own]:
                problems.append(f"{rel}: {own} imports higher layer {imported}")
            if own in PURE and any(
                imported == f or imported.startswith(f + ".") for f in FORBIDDEN_IN_PURE
            ):
                problems.append(f"{rel}: pure layer {own} imports {imported}")
    assert not problems, "\n".join(problems)


def test_every_top_level_module_has_a_layer() -> None:
    names = {
        p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"
    }
    names -= {"__init__", "py"}
    unknown = {n for n in names if n not in LAYERS and not n.endswith(".typed")}
    assert not unknown, f"add these to LAYERS (and the README module map): {unknown}"
