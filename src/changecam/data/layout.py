"""Finding (pre, post, label) image triplets on disk.

Two layouts are understood:

* ``levir``: the official LEVIR-CD release, ``<root>/{train,val,test}/{A,B,label}/*.png``;
* ``levir256``: the flat LEVIR-CD-256 distribution (BIT, ChangeFormer),
  ``<root>/{A,B,label}/*.png`` with ``<root>/list/{train,val,test}.txt``.

Pairing is strict by file name without its suffix, so images and masks may differ in format
(``A/x.jpg``, ``B/x.jpg``, ``label/x.png``). This is the one place in changecam that finds files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
Layout = Literal["auto", "levir", "levir256"]
SPLITS: tuple[str, ...] = get_args(Split)
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# predict.py's inputs may also be GDAL VRTs (its scene path reads them; explain.py does not)
INPUT_SUFFIXES: tuple[str, ...] = (*IMAGE_SUFFIXES, ".vrt")

# formats a reader could take for images that changecam does not read: named, not skipped silently
OTHER_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    (".webp", ".jp2", ".j2k", ".jpe", ".jfif", ".gif", ".pbm", ".pgm", ".ppm", ".pnm", ".pxm")
    + (".exr", ".hdr", ".pic", ".ras", ".sr", ".avif", ".heic", ".img", ".tga", ".vrt")
)
_NAMED_UNREAD: set[tuple[Path, tuple[str, ...]]] = set()  # (folder, names) already warned about


def forget_named_files() -> None:
    """Name unread files again: a command calls it as its run starts, so that each run's log
    (each job of a sweep run in one process) names them once."""
    _NAMED_UNREAD.clear()


LEVIR_HELP = (
    "Expected either the official LEVIR-CD layout <root>/{train,val,test}/{A,B,label}/*.png "
    "or the flat LEVIR-CD-256 layout <root>/{A,B,label}/*.png with <root>/list/{train,val,test}.txt. "
    "LEVIR-CD is published by Chen & Shi (2020) at https://justchenhao.github.io/LEVIR/ "
    "(free for academic use); download it and point data.root at it. "
    "To try the pipeline without it, use data=synthetic."
)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset root is missing or does not look like a known layout."""


class LayoutError(ValueError):
    """Files are present but do not pair up (a name missing in A, B or label, empty lists...)."""


@dataclass(frozen=True)
class Triplet:
    """One sample on disk. ``label`` is ``None`` where no label exists (prediction inputs)."""

    name: str
    pre: Path
    post: Path
    label: Path | None = None


def detect_layout(root: str | Path) -> Literal["levir", "levir256"]:
    """Tell which layout ``root`` holds, or raise :class:`DatasetNotFoundError`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset root {root} does not exist. {LEVIR_HELP}")
    if any((root / s / "A").is_dir() for s in SPLITS):
        lists = root / "list"
        if lists.is_dir() and (lists, ()) not in _NAMED_UNREAD:  # once per run, as below
            _NAMED_UNREAD.add((lists, ()))
            log.warning(
                "%s holds the official layout's split folders and %s: the split folders are "
                "read and the lists are not (lists choose files of the flat layout, "
                "<root>/A, B, label; to train on a subset, keep only its files in train/)",
                root,
                lists,
            )
        return "levir"
    if (root / "A").is_dir() and (root / "list").is_dir():
        return "levir256"
    raise DatasetNotFoundError(f"dataset root {root} holds neither known layout. {LEVIR_HELP}")


def _images(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """The image files of ``folder`` by name without suffix (the key pairing uses)."""
    if not folder.is_dir():
        raise LayoutError(f"missing folder {folder}")
    found: dict[str, Path] = {}
    other: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes:
            if path.suffix.lower() in OTHER_IMAGE_SUFFIXES and not path.name.startswith("."):
                other.append(path.name)
            continue
        if path.stem in found:
            raise LayoutError(
                f"{found[path.stem]} and {path} have the same name without suffix: files pair "
                "up by that name, so keep one file per name in each folder"
            )
        found[path.stem] = path
    if other and (folder, tuple(other)) not in _NAMED_UNREAD:  # once: each split lists A/ and B/
        _NAMED_UNREAD.add((folder, tuple(other)))
        log.warning(
            "%d file(s) in %s are not read, as their format is not one of %s (convert them to "
            "one of those): %s",
            len(other),
            folder,
            ", ".join(suffixes),
            ", ".join(other[:10]) + (" ..." if len(other) > 10 else ""),
        )
    return found


def pair_folder(
    folder: str | Path,
    names: list[str] | None = None,
    require_label: bool = True,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> list[Triplet]:
    """Pair ``folder/A``, ``folder/B`` and ``folder/label`` strictly by file name without suffix
    (``A/x.jpg`` pairs with ``B/x.jpg`` and ``label/x.png``).

    Args:
        folder: directory holding ``A/``, ``B/`` and (if ``require_label``) ``label/``.
        names: file names to take (e.g. from a ``list/*.txt``); default: every image in ``A/``.
        require_label: whether ``label/`` must exist and hold every pair's label. Without it,
            labels are used when present: a pair without one (or a label without its pair) is
            named in a warning and the pair is taken unlabelled.
        suffixes: the file suffixes (lower case) taken as images.

    Raises:
        LayoutError: a name present in one folder is missing in another, two files of a folder
            share a name, or nothing is found.
    """
    folder = Path(folder)
    pre, post = _images(folder / "A", suffixes), _images(folder / "B", suffixes)
    has_label = (folder / "label").is_dir()
    if require_label and not has_label:
        raise LayoutError(f"missing folder {folder / 'label'}")
    label = _images(folder / "label", suffixes) if has_label else {}
    # (name without suffix, the file name shown when a partner is missing)
    wanted = (
        [(listed_stem(n, suffixes), n) for n in names]
        if names is not None
        else [(stem, path.name) for stem, path in pre.items()]
    )
    if names is None:
        for found in (post, label) if has_label and require_label else (post,):
            extra = sorted(set(found) - set(pre))
            if extra:
                raise LayoutError(
                    f"{found[extra[0]]} has no partner {folder / 'A' / found[extra[0]].name}"
                )
    if has_label and not require_label:
        stems = {stem for stem, _ in wanted}
        for names, what in (
            (sorted(stems - set(label)), "pair(s) have no label in %s, taken unlabelled"),
            (sorted(set(label) - stems), "label(s) in %s have no pair, not used"),
        ):
            if names:
                shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                log.warning(f"%d {what}: %s", len(names), folder / "label", shown)
    triplets = []
    for stem, shown in wanted:
        required = (("label", label),) if has_label and require_label else ()
        for sub, found in (("A", pre), ("B", post)) + required:
            if stem not in found:
                raise LayoutError(
                    f"{folder / sub / shown} is missing (no file named {stem} with any of the "
                    f"suffixes {', '.join(suffixes)} in {folder / sub})"
                )
        triplets.append(Triplet(stem, pre[stem], post[stem], label.get(stem)))
    if not triplets:
        raise LayoutError(f"no images found in {folder / 'A'}")
    return triplets


def listed_stem(name: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> str:
    """A split list's name without its image suffix, if it has one: ``2019.05.01_a`` stays
    whole (its last dot starts no suffix), ``x.png`` is ``x``."""
    path = Path(name)
    return path.stem if path.suffix.lower() in suffixes else path.name


def read_list(listing: Path) -> str:
    """A split list's text: UTF-8, with or without a byte-order mark (Notepad), or UTF-16
    with one (PowerShell 5's ``>``).

    Raises:
        LayoutError: it is in no such encoding.
    """
    data = listing.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise LayoutError(
            f"split list {listing} is not UTF-8 text ({err}); save it as UTF-8, one file name "
            "per line"
        ) from err


def find_triplets(root: str | Path, split: Split, layout: Layout = "auto") -> list[Triplet]:
    """Return the labelled triplets of one split of a LEVIR-style dataset.

    Raises:
        DatasetNotFoundError: ``root`` is missing or holds no known layout.
        LayoutError: the split's files do not pair up.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif not root.is_dir():
        raise DatasetNotFoundError(f"dataset root {root} does not exist. {LEVIR_HELP}")
    if layout == "levir":
        if not (root / split).is_dir():
            raise DatasetNotFoundError(f"split folder {root / split} does not exist. {LEVIR_HELP}")
        return pair_folder(root / split)
    if layout == "levir256":
        listing = root / "list" / f"{split}.txt"
        if not listing.is_file():
            raise DatasetNotFoundError(f"split list {listing} does not exist. {LEVIR_HELP}")
        text = read_list(listing)
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise LayoutError(f"split list {listing} is empty")
        seen: dict[str, int] = {}
        for number, name in enumerate(names, 1):
            stem = listed_stem(name)
            if stem in seen:  # its pair would be trained on or scored twice
                raise LayoutError(
                    f"split list {listing} names {stem} twice (lines "
                    f"{seen[stem]} and {number} among its non-blank lines)"
                )
            seen[stem] = number
        return pair_folder(root, names)
    raise ValueError(
        f"data.layout={layout!r} is not allowed; expected one of {', '.join(get_args(Layout))}"
    )


def input_pairs(
    pre: str | Path | None = None,
    post: str | Path | None = None,
    dir: str | Path | None = None,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> list[Triplet]:
    """The pairs a prediction/explanation command works on: one ``pre``/``post`` file pair, or a
    folder with ``A/`` and ``B/`` (and optionally ``label/``), paired by file name among the
    files with ``suffixes`` (predict.py: :data:`INPUT_SUFFIXES`, which adds GDAL VRTs).

    Raises:
        ValueError: neither or both ways are given.
        FileNotFoundError / LayoutError: files are missing or do not pair up.
    """
    if dir is not None and (pre is not None or post is not None):
        raise ValueError("give either input.dir or input.pre and input.post, not both")
    if dir is not None:
        return pair_folder(dir, require_label=False, suffixes=suffixes)
    if (pre is None) != (post is None):
        given, other = ("input.pre", "input.post") if post is None else ("input.post", "input.pre")
        raise ValueError(f"{given} is set but {other} is not: a pair needs both dates")
    if pre is None or post is None:
        raise ValueError(
            "no input: set input.dir=<folder with A/ and B/> or input.pre=<file> input.post=<file>"
        )
    pre, post = Path(pre), Path(post)
    for p in (pre, post):
        if not p.is_file():
            raise FileNotFoundError(f"input image {p} does not exist")
    return [Triplet(pre.stem, pre, post, None)]
