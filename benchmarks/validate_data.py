"""Set-up validation time (``data.validate``) on LEVIR-CD-sized metadata.

LEVIR-CD has 637 triplets of 1024² (445 train / 64 val / 128 test). The synthetic generator
writes ``--unique`` distinct 1024² triplets (about half a second each on one core), and the
official layout's 637 triplets are made from them as hard links: every one is a real PNG file
with its own directory entry, opened and read like any other (the page cache holds them, as
it holds a dataset read once before; a cold network file system is slower).

Measured, best of ``--repeats`` fresh datamodules, each checking train, val and test as a
``train.py`` run with ``test: true`` does at its first set-up:

* ``validate_headers_s``: ``data.validate=headers`` (lists, pairing, every header and file
  length, sizes against ``data.patch_size`` and a SiameseUNet's size multiple 16);
* ``validate_full_s_estimate``: ``data.validate=full`` (every file decoded once), measured on
  the distinct triplets and scaled to the whole set.

Last line: ``{"validate_headers_s", "validate_headers_ms_per_triplet", ...}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, machine

from changecam.data import ChangeDetectionDataModule, SyntheticSpec, generate
from changecam.data.validate import NetworkFit, decode_all

LEVIR_SPLITS = {"train": 445, "val": 64, "test": 128}
TINY_SPLITS = {"train": 12, "val": 4, "test": 4}
NETWORK = NetworkFit(16, "SiameseUNet, model.depth=4", "a lower model.depth")


def build_levir_shaped(root: Path, source: Path, counts: dict[str, int]) -> int:
    """Write the official layout ``root/{split}/{A,B,label}/{split}_{n}.png`` with ``counts``
    triplets per split, hard-linked round-robin from ``source``'s train triplets."""
    names = sorted(p.name for p in (source / "train" / "A").glob("*.png"))
    total = 0
    for split, count in counts.items():
        for sub in ("A", "B", "label"):
            (root / split / sub).mkdir(parents=True)
        for n in range(count):
            name = names[n % len(names)]
            for sub in ("A", "B", "label"):
                os.link(source / "train" / sub / name, root / split / sub / f"{split}_{n}.png")
            total += 1
    return total


def time_headers(root: Path, patch_size: int, repeats: int) -> float:
    """Best wall-clock seconds of checking every split with ``data.validate=headers``."""
    best = float("inf")
    for _ in range(repeats):
        dm = ChangeDetectionDataModule(root, layout="levir", patch_size=patch_size)
        start = time.perf_counter()
        dm.check(list(LEVIR_SPLITS), NETWORK)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="64 px, 20 triplets: a smoke run")
    parser.add_argument("--unique", type=int, default=6, help="distinct generated triplets")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    size, counts, patch = (64, TINY_SPLITS, 32) if args.tiny else (1024, LEVIR_SPLITS, 256)
    unique = 2 if args.tiny else args.unique

    with tempfile.TemporaryDirectory(prefix="changecam-validate-") as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        source = generate(
            tmp_path / "source", SyntheticSpec(image_size=size, train=unique, val=1, test=1)
        )
        generate_s = time.perf_counter() - start
        root = tmp_path / "levir_shaped"
        total = build_levir_shaped(root, source, counts)
        headers_s = time_headers(root, patch, args.repeats)
        dm = ChangeDetectionDataModule(source, layout="levir", patch_size=patch)
        start = time.perf_counter()
        problems = decode_all(dm.triplets("train"))
        full_per_triplet = (time.perf_counter() - start) / unique
        assert not problems, problems

    figures = {
        "validate_headers_s": round(headers_s, 3),
        "validate_headers_ms_per_triplet": round(1000 * headers_s / total, 3),
        "validate_full_s_estimate": round(full_per_triplet * total, 1),
        "setup": {
            "triplets": total,
            "splits": counts,
            "image_size": size,
            "distinct_triplets": unique,
            "files": "hard links to the distinct triplets (real PNG files, warm page cache)",
            "generate_s": round(generate_s, 1),
            "repeats": args.repeats,
        },
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
