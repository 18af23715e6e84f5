"""The package's import rule (docs/design.md): models <- explain <- training/evaluation <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "src" / "changecam"
# a part may import only parts of a lower level; nothing imports cli
LEVEL = {
    "atomic": 0,
    "environment": 0,
    "metrics": 0,
    "run_log": 0,
    "values": 0,
    "data": 1,
    "models": 1,
    "explain": 2,
    "training": 3,
    "evaluation": 3,
    "geo": 3,
    "cli": 4,
}


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of changecam that a module imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        parts |= {n.split(".")[1] for n in names if n.startswith("changecam.")}
    return parts


def test_every_part_has_a_level():
    found = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    found -= {"__init__", "__pycache__"}
    assert found == set(LEVEL)


def test_imports_run_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for other in imported_parts(path) - {part}:
            if LEVEL[other] >= LEVEL[part]:
                wrong.append(f"{path.relative_to(REPO)} imports changecam.{other}")
    assert wrong == []


def test_the_shims_are_the_only_importers_of_the_commands():
    importers = [
        str(p.relative_to(REPO))
        for p in [*PACKAGE.rglob("*.py"), *REPO.glob("*.py")]
        if p.relative_to(PACKAGE if PACKAGE in p.parents else REPO).parts[0] != "cli"
        and "cli" in imported_parts(p)
    ]
    assert sorted(importers) == ["eval.py", "explain.py", "predict.py", "study.py", "train.py"]
