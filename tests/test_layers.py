"""Every room on its floor: no medret module imports a floor above its own, at import time or inside a function.

The floors are those of ``docs/architecture.md``; a new top-level module or package must be
given one here, so the map cannot fall behind the tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medret"

FLOORS: dict[str, int] = {
    # 0: the ground every floor stands on
    "__init__": 0,
    "errors": 0,
    "registry": 0,
    "itemid": 0,
    "config": 0,
    "observability": 0,
    "runtime": 0,
    # 1: bytes in and out
    "storage": 1,
    "io": 1,
    # 2: pure array work
    "preprocess": 2,
    # 3: what a file is; what an encoder is
    "kinds": 3,
    "models": 3,
    # 4: code tables and search; the training methods
    "index": 4,
    "methods": 4,
    "slides": 4,
    "sketch": 4,
    # 5: scoring
    "eval": 5,
    # 6: the jobs
    "pipelines": 6,
    "train": 6,
    "samples": 6,
    # 7: the query service
    "serve": 7,
    # 8: the whole system on one machine
    "demo": 8,
    # 9: the command line
    "cli": 9,
}


def _room(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "medret":  # from medret import kinds
                found += [(node.lineno, f"medret.{a.name}") for a in node.names if not a.name.startswith("__")]
    return [(line, m.split(".")[1]) for line, m in found if m.startswith("medret.")]


def upward_imports(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        room = _room(path, package)
        for line, target in _imports(path):
            if target not in FLOORS:
                out.append(f"{path.relative_to(package)}:{line}: imports medret.{target}, which has no floor")
            elif FLOORS[target] > FLOORS[room]:
                out.append(
                    f"{path.relative_to(package)}:{line}: floor {FLOORS[room]} ({room}) imports "
                    f"floor {FLOORS[target]} (medret.{target})"
                )
    return out


def test_every_top_level_module_has_a_floor() -> None:
    rooms = {_room(p) for p in PACKAGE.rglob("*.py")}
    assert rooms - FLOORS.keys() == set()
    assert FLOORS.keys() - rooms == set(), "a floor named for a module that is gone"


def test_no_module_imports_a_floor_above_it() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "medret"
    (pkg / "io").mkdir(parents=True)
    (pkg / "io" / "reader.py").write_text("def f():\n    from medret.serve.app import create_app\n")
    (pkg / "kinds").mkdir()
    (pkg / "kinds" / "x.py").write_text("from medret import io, storage\n")
    assert upward_imports(pkg) == ["io/reader.py:2: floor 1 (io) imports floor 7 (medret.serve)"]
