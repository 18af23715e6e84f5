"""The sign test's verdict (:func:`common.paired_verdict`) on every recorded scene side by side.

``python benchmarks/scene_verdicts.py [records...]`` (default: every ``benchmarks/scene*.json``
with a side by side) prints one Markdown row per record and torch-thread setting: the GeoTIFF
path with every output, and rasters only where the record kept that comparison's rounds
(records made since 2026-12-06), against the PNG path. Records of fewer than 5 rounds give
``too few rounds``. Last line: one JSON object, the verdicts by record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import REPO, emit, paired_verdict

COMPARISONS = {
    "every output": "geotiff_vs_png_speed_per_round",
    "rasters only": "geotiff_rasters_only_vs_png_speed_per_round",
}


def verdicts(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{threads: {comparison: verdict}}`` of one record's side by side."""
    found: dict[str, dict[str, Any]] = {}
    for threads, row in (record.get("side_by_side") or {}).items():
        if not isinstance(row, dict):
            continue
        found[threads] = {
            name: paired_verdict(row[key]) for name, key in COMPARISONS.items() if key in row
        }
    return found


def network_kind(record: dict[str, Any]) -> str:
    """``trained``, ``fresh`` or ``stand-in``, and the GPU when there was one."""
    network = str(record.get("network", ""))
    kind = (
        "stand-in"
        if network.startswith("stand-in")
        else ("trained" if "trained" in network else "fresh")
    )
    gpu = (record.get("machine") or {}).get("gpu")
    return f"{kind}, {gpu}" if gpu else kind


def shown(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "—"
    if verdict["interval"] is None:
        return f"{verdict['verdict']} (median {verdict['median']})"
    low, high = verdict["interval"]
    return f"{verdict['verdict']} (median {verdict['median']}, {low}–{high})"


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
        network = network_kind(record)
        for threads, row in found.items():
            print(
                f"| {path.name} | {network} | {threads} | {shown(row.get('every output'))} "
                f"| {shown(row.get('rasters only'))} |"
            )
    emit(table)
    return table


if __name__ == "__main__":
    main()
