"""Where a scene's time goes, thread by thread: the GeoTIFF path's reader, network, writer and
tracer threads and its finish, beside the PNG path's decoding, network and encoding.

In one process, on the ``--compare``² synthetic pair of ``benchmarks/scene.py`` (2048² by
default), with one network as predict.py runs it: a warm-up, then ``--repeats`` rounds of the
PNG path and the GeoTIFF path (every output, explanation off; every other round in reverse
order), under the garbage collector as predict.py runs it. Each step is timed in the thread
that runs it (its start and length in ms from the start of its run):

* PNG path: ``decode`` (both PNGs), ``network`` (sliding window and sigmoid), ``encode`` (the
  mask and probability PNGs);
* GeoTIFF path: ``read`` (one block's region of both dates, reader thread), ``network`` (one
  block's windows, blend and sigmoid), ``hand_over`` (the network's thread waiting for room at
  the writer), ``write`` and ``trace`` (writer and tracer threads), then ``polygons``,
  ``geojson``, ``overviews`` and ``publish`` (the finish).

Figures: per path the median wall ms of the rounds and, per step, its thread, calls and
summed ms (median of the rounds); the GeoTIFF path's ``network_thread_idle_ms`` is its block
loop less the network's and hand-over's time (waiting for the reader, and the bookkeeping
between blocks), ``network_ms_geotiff_minus_png`` what its network's thread took more than the
PNG path's for the same windows, beside ``writer_and_tracer_ms``, and ``tail_ms`` its time after
the last block; and the last round's spans. ``--switch-interval`` sets
:func:`sys.setswitchinterval` (Python's default 0.005 s: how long a thread that wants the GIL
waits before asking the holder to drop it), to see whether the network's thread queues for the
GIL behind the reader, writer and tracer. ``--stand-in`` runs ``benchmarks/scene.py``'s stand-in
network, whose forward passes cost next to nothing (as on a GPU). Run by hand (``make bench`` does not):
``python benchmarks/scene_timeline.py --weights <make train's best.ckpt>``. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from common import emit, machine, median

Span = tuple[str, str, float, float]  # thread, step, start ms, length ms


class Timeline:
    """Spans of the wrapped functions, in whichever thread calls them."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.origin = time.perf_counter()
        self.lock = threading.Lock()

    def restart(self) -> None:
        with self.lock:
            self.spans = []
            self.origin = time.perf_counter()

    @contextmanager
    def wrapped(self, owner: Any, name: str, step: str) -> Iterator[None]:
        """``owner.name`` replaced by a timed call recorded as ``step``, until the exit."""
        function = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                end = time.perf_counter()
                span = (
                    threading.current_thread().name,
                    step,
                    round((start - self.origin) * 1e3, 1),
                    round((end - start) * 1e3, 1),
                )
                with self.lock:
                    self.spans.append(span)

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, function)

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per step: its thread(s), calls and summed ms."""
        out: dict[str, dict[str, Any]] = {}
        for thread, step, _, length in self.spans:
            row = out.setdefault(step, {"threads": set(), "calls": 0, "ms": 0.0})
            row["threads"].add(thread)
            row["calls"] += 1
            row["ms"] += length
        return {
            step: {"thread": "/".join(sorted(r["threads"])), "calls": r["calls"], "ms": r["ms"]}
            for step, r in out.items()
        }


def network_and_pair(args: argparse.Namespace, folder: Path) -> tuple[Any, Path, Path, Path, Path]:
    """The network (``--weights``, the stand-in, or a fresh quickstart U-Net) and the pair as
    GeoTIFFs and PNGs."""
    import scene

    if args.stand_in:
        net = scene.stand_in_network()
    elif args.weights is None:
        net = scene.fresh_network(folder / "quickstart_fresh.pth")
    else:
        from changecam.training.checkpoint import load_network

        net = load_network(args.weights.resolve())
    pre_tif, post_tif = scene.write_synthetic_pair(folder / "tif", args.compare)
    pre_png, post_png = scene.png_pair(pre_tif, post_tif, folder / "png")
    return net, pre_tif, post_tif, pre_png, post_png


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=int, default=2048, help="side of the pair")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both paths")
    parser.add_argument("--weights", type=Path, help="a trained quickstart .ckpt")
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval (seconds)"
    )
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="a network that costs next to nothing, as on a GPU (benchmarks/scene.py)",
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    args = parser.parse_args(argv)
    if args.stand_in and args.weights is not None:
        parser.error("--stand-in replaces the network: leave out --weights")
    if args.tiny:
        args.compare, args.repeats = 256, 1

    import torch
    from omegaconf import OmegaConf
    from scene import REPO, network_description

    import changecam.cli.predict as png_module
    from changecam.data.layout import Triplet
    from changecam.environment import frozen_gc
    from changecam.geo import SceneSettings
    from changecam.geo.polygons import RegionTracer
    from changecam.geo.write import SceneFiles
    from changecam.geo.writer import BlockWriter
    from changecam.models.inference import inference_network
    from changecam.models.sliding_window import SlidingWindow

    scene_module = importlib.import_module("changecam.geo.scene")

    default_interval = sys.getswitchinterval()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="changecam-timeline-") as tmp_name:
        tmp = Path(tmp_name)
        net, pre_tif, post_tif, pre_png, post_png = network_and_pair(args, tmp)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = inference_network(net, device)
        spec = SlidingWindow()
        batch = OmegaConf.load(REPO / "conf/predict.yaml").predict.batch_size
        pair = Triplet("pair", pre_png, post_png, None)

        def png_path() -> None:
            png_module.predict_pair(net, pair, spec, 0.5, None, device).save(tmp / "png_run")

        def geotiff_path() -> None:
            settings = SceneSettings(explain=False, progress=False, batch_size=batch)
            scene_module.predict_scene(
                net, pre_tif, post_tif, tmp / "scene", spec, settings, device
            )

        timeline = Timeline()
        wraps: list[tuple[Any, str, str]] = [
            (png_module, "read_image", "decode"),
            (png_module, "predict_probability", "network"),
            (png_module.PairPrediction, "save", "encode"),
            (scene_module, "read_region", "read"),
            (scene_module.SceneNetwork, "block", "network"),
            (BlockWriter, "submit", "hand_over"),
            (SceneFiles, "write_block", "write"),
            (RegionTracer, "add_block", "trace"),
            (RegionTracer, "features", "polygons"),
            (scene_module, "write_geojson", "geojson"),
            (SceneFiles, "build_overviews", "overviews"),
            (SceneFiles, "publish", "publish"),
        ]
        runs: dict[str, Callable[[], None]] = {"png": png_path, "geotiff": geotiff_path}
        walls: dict[str, list[float]] = {k: [] for k in runs}
        totals: dict[str, list[dict[str, dict[str, Any]]]] = {k: [] for k in runs}
        last: dict[str, list[Span]] = {}
        if args.switch_interval is not None:
            sys.setswitchinterval(args.switch_interval)
        try:
            png_path()  # warm-up: first calls, allocator, file cache
            geotiff_path()
            with frozen_gc(), ExitStack() as stack:
                for owner, attribute, step in wraps:
                    stack.enter_context(timeline.wrapped(owner, attribute, step))
                for round_ in range(args.repeats):
                    order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
                    for name in order:
                        timeline.restart()  # spans and the wall count from one origin
                        runs[name]()
                        walls[name].append((time.perf_counter() - timeline.origin) * 1e3)
                        totals[name].append(timeline.totals())
                        last[name] = list(timeline.spans)
        finally:
            sys.setswitchinterval(default_interval)

    steps: dict[str, dict[str, Any]] = {}
    for name, rounds in totals.items():
        steps[name] = {
            step: {
                "thread": row["thread"],
                "calls": row["calls"],
                "ms": round(median([r[step]["ms"] for r in rounds if step in r]), 1),
            }
            for step, row in rounds[-1].items()
        }
    spans = last["geotiff"]
    own = [s for s in spans if s[1] in ("network", "hand_over")]  # the network's thread
    loop_ms = max(s[2] + s[3] for s in own) - min(s[2] for s in spans if s[1] == "read")
    figures = {
        "side": args.compare,
        "repeats": args.repeats,
        "device": str(device),
        "switch_interval_s": args.switch_interval or default_interval,
        "wall_ms_median": {k: round(median(v), 1) for k, v in walls.items()},
        "geotiff_vs_png_speed_median": round(median(walls["png"]) / median(walls["geotiff"]), 3),
        "steps": steps,
        # the last round's block loop (first read to last hand-over) less the network's
        # thread's own work in it: waiting for the reader, and the bookkeeping between blocks
        "network_thread_idle_ms_last_round": round(loop_ms - sum(s[3] for s in own), 1),
        # the same windows in both paths: what the GeoTIFF path's network thread took more,
        # beside what its writer and tracer threads spent meanwhile (medians of the rounds)
        "network_ms_geotiff_minus_png": round(
            steps["geotiff"]["network"]["ms"] - steps["png"]["network"]["ms"], 1
        ),
        "writer_and_tracer_ms": round(
            sum(steps["geotiff"].get(k, {"ms": 0.0})["ms"] for k in ("write", "trace")), 1
        ),
        # the last round's time after the network's last block: the last write and trace,
        # then the finish (polygons, GeoJSON, overviews, renames)
        "tail_ms_last_round": round(
            max(s[2] + s[3] for s in spans) - max(s[2] + s[3] for s in own), 1
        ),
        "spans_last_round": last,
        "network": network_description(args.weights, args.stand_in),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
