"""Kinds are told apart in one place, the registry: no floor above it compares a kind name as a string."""

from __future__ import annotations

import ast
from pathlib import Path

from medret import kinds

PACKAGE = Path(__file__).resolve().parents[2] / "medret"
GUARDED = [*(PACKAGE / d for d in ("serve", "pipelines", "cli")), PACKAGE / "kinds" / "inspect.py"]
#: words that are kind names and also ordinary option values (on_error="skip", S3 addressing "auto"):
#: flagged only when the other side of the comparison is about a kind
COMMON_WORDS = {"auto", "skip"}


def _mentions_kind(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and "kind" in n.id.lower():
            return True
        if isinstance(n, ast.Attribute) and "kind" in n.attr.lower():
            return True
        if isinstance(n, ast.Constant) and n.value == "kind":
            return True
    return False


def _literals(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def kind_comparisons(source: str, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        literals = set().union(*(_literals(s) for s in sides)) & names
        if literals - COMMON_WORDS or (literals and any(_mentions_kind(s) for s in sides)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_guard_sees_the_comparisons_it_is_for() -> None:
    names = set(kinds.names()) | {"tiff"}
    caught = kind_comparisons(
        'if kind == "wsi": pass\nif unit["kind"] in ("wsi", "dicom-series"): pass\n'
        'if detected != "nifti": pass\nif kind.name == "auto": pass\nif mode == "auto": pass\n',
        names,
    )
    assert [c.split(":")[0] for c in caught] == ["line 1", "line 2", "line 3", "line 4"]
    assert kind_comparisons('if cfg.on_error == "skip": pass\nif style == "auto": pass\n', names) == []


def test_no_kind_name_is_compared_outside_the_registry() -> None:
    names = set(kinds.names()) | {k.name for k in kinds.all_kinds()}
    files = [f for g in GUARDED for f in (sorted(g.rglob("*.py")) if g.is_dir() else [g])]
    assert len(files) > 20
    offences = {str(f.relative_to(PACKAGE)): kind_comparisons(f.read_text(), names) for f in files}
    assert {f: o for f, o in offences.items() if o} == {}
