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
    """The top-level parts of changecam that a module imports: ``import changecam.x``,
    ``from changecam.x import ...``, ``from changecam import x`` and relative imports
    (``from ..x import ...``, resolved against the module's own package)."""
    package = [*path.relative_to(PACKAGE.parent).parts[:-1]] if PACKAGE in path.parents else []
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:  # relative: up from the module's package
                base = package[: len(package) - node.level + 1] + base
            if base == ["changecam"]:  # from changecam import x: the names are the parts
                names = [f"changecam.{alias.name}" for alias in node.names]
            else:
                names = [".".join(base)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        parts |= {n.split(".")[1] for n in names if n.startswith("changecam.")}
    return parts


def test_imported_parts_sees_every_spelling(monkeypatch):
    """``from changecam import cli`` and relative imports were invisible (helper-162)."""
    module = PACKAGE / "models" / "example.py"  # never written: only its place is used
    sources = {
        "import changecam.cli.train": {"cli"},
        "from changecam.cli import train": {"cli"},
        "from changecam import cli, data": {"cli", "data"},
        "from ..cli import train": {"cli"},
        "from .. import explain": {"explain"},
        "from .taps import Tap": {"models"},
        "import numpy": set(),
    }
    for source, expected in sources.items():
        monkeypatch.setattr(Path, "read_text", lambda self, s=source: s)
        assert imported_parts(module) == expected, source


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
