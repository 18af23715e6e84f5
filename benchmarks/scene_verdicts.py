"""The sign test's verdict (:func:`common.paired_verdict`) on every recorded scene side by side.

``python benchmarks/scene_verdicts.py [records...]`` (default: every ``benchmarks/scene*.json``
with a side by side) prints one Markdown row per record and torch-thread setting: the GeoTIFF
path with every output, and with rasters only, against the PNG path. A record made before
``scene.py`` kept the rasters-only ratio of each round has it rebuilt from the rounds' wall
seconds, which it keeps to two decimals (marked ``≈``: a ratio of 0.5 s runs is then good to
about 2 %). Records of fewer than 5 rounds give ``too few rounds``. Last line: one JSON
object, the verdicts by record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import REPO, emit, paired_verdict

# comparison: (the record's per-round ratios, the GeoTIFF run they divide the PNG run by)
COMPARISONS = {
    "every output": ("geotiff_vs_png_speed_per_round", "geotiff"),
    "rasters only": ("geotiff_rasters_only_vs_png_speed_per_round", "geotiff_rasters_only"),
}


def round_ratios(row: dict[str, Any], key: str, run: str) -> tuple[list[float], bool] | None:
    """The per-round ratios ``row`` keeps under ``key``, else rebuilt from its rounds' wall
    seconds (then ``True``: approximate); ``None``: the record has neither."""
    if key in row:
        return list(row[key]), False
    wall = row.get("wall_seconds") or {}
    if "png" in wall and run in wall and len(wall["png"]) == len(wall[run]):
        return [p / g for p, g in zip(wall["png"], wall[run], strict=True)], True
    return None


def verdicts(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{threads: {comparison: verdict}}`` of one record's side by side (a verdict rebuilt
    from wall seconds has ``"from_wall_seconds": true``)."""
    found: dict[str, dict[str, Any]] = {}
    for threads, row in (record.get("side_by_side") or {}).items():
        if not isinstance(row, dict):
            continue
        judged: dict[str, Any] = {}
        for name, (key, run) in COMPARISONS.items():
            ratios = round_ratios(row, key, run)
            if ratios is not None:
                verdict = paired_verdict(ratios[0])
                judged[name] = {**verdict, "from_wall_seconds": True} if ratios[1] else verdict
        found[threads] = judged
    return found


def network_kind(record: dict[str, Any]) -> str:
    """``trained``, ``fresh`` or ``stand-in``, and the GPU when there was one."""
    network = str(record.get("network", ""))
    if network.startswith("stand-in"):
        kind = "stand-in"
    else:
        kind = "trained" if ", trained:" in network else "fresh"
    gpu = (record.get("machine") or {}).get("gpu")
    return f"{kind}, {gpu}" if gpu else kind


def shown(verdict: dict[str, Any] | None) -> str:
    """One table cell: the verdict, the median ratio and its interval (``≈``: rebuilt)."""
    if verdict is None:
        return "—"
    mark = "≈ " if verdict.get("from_wall_seconds") else ""
    if verdict["interval"] is None:
        return f"{mark}{verdict['verdict']} (median {verdict['median']})"
    low, high = verdict["interval"]
    return f"{mark}{verdict['verdict']} (median {verdict['median']}, {low}–{high})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="*", type=Path, help="scene benchmark JSON records")
    args = parser.parse_args(argv)
    paths = args.records or sorted((REPO / "benchmarks").glob("scene*.json"))
    print("| record | network | torch threads | every output | rasters only |")
    print("|---|---|---|---|---|")
    table: dict[str, Any] = {}
    for path in paths:
        record = json.loads(path.read_text())
        found = verdicts(record) if isinstance(record, dict) else {}
        if not found:
            continue
        table[path.name] = found
        for threads, row in found.items():
            count = record["side_by_side"][threads].get("torch_threads", threads)
            print(
                f"| {path.name} | {network_kind(record)} | {count} "
                f"| {shown(row.get('every output'))} | {shown(row.get('rasters only'))} |"
            )
    emit(table)
    return table


if __name__ == "__main__":
    main()
