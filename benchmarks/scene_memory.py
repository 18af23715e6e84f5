"""Where a scene's peak memory is reached: RSS per phase of ``predict_scene``, per scene size.

In one process per size (a child, so that each starts from the same imports), the synthetic
georeferenced pair of ``benchmarks/scene.py`` is predicted with the explanation on, and the
current and peak RSS are printed before and after the polygons and the overviews
(``peak_in_block_loop_mib`` is the process's peak just before the polygons: imports, the
written pair and the block loop; ``rss_at_start_mib`` is the RSS when the prediction starts); the
figures also hold the peaks of the shared-window cache from ``scene.json`` (window outputs of 3
float32 bands: logits, pre and post maps; in memory, and spilled to its temporary file).
``--malloc-arenas N`` runs the children with ``MALLOC_ARENA_MAX=N`` (glibc), to see how much of
the peak is allocator fragmentation.

Run: ``python benchmarks/scene_memory.py --size 4096 8192`` (about 6 minutes on 2 cores);
``make bench-scene`` does not run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, machine, rss_mib, run_child

PHASES = ("scene_polygons", "build_overviews")


def whole_mib() -> tuple[int, int]:
    """(current, peak) RSS in whole MiB, as this benchmark reports them."""
    current, peak = rss_mib()
    return int(current), int(peak)


def child(size: int) -> dict[str, Any]:
    """Predict one ``size``² pair in this process; RSS before and after each phase."""
    import scene as scene_bench

    from changecam.geo import SceneSettings
    from changecam.models.sliding_window import SlidingWindow

    module = sys.modules["changecam.geo.scene"]
    write = sys.modules["changecam.geo.write"]
    phases: dict[str, dict[str, int]] = {}

    def watched(owner: Any, name: str) -> None:
        function = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before = whole_mib()
            out = function(*args, **kwargs)
            after = whole_mib()
            phases[name] = {
                "rss_before": before[0],
                "peak_before": before[1],
                "rss_after": after[0],
            }
            return out

        setattr(owner, name, wrapper)

    watched(module, "scene_polygons")
    watched(write.SceneFiles, "build_overviews")
    settings = SceneSettings(progress=False)
    with tempfile.TemporaryDirectory(prefix="changecam-scene-memory-") as tmp_name:
        tmp = Path(tmp_name)
        net = scene_bench.fresh_network(tmp / "quickstart_fresh.pth").eval()
        pre, post = scene_bench.write_synthetic_pair(tmp / "tif", size)
        start = whole_mib()
        started = time.perf_counter()
        summary = module.predict_scene(
            net, pre, post, tmp / "out", SlidingWindow(), settings, "cpu"
        )
        seconds = time.perf_counter() - started
    end = whole_mib()
    return {
        "side": size,
        "rss_at_start_mib": start[0],
        "peak_in_block_loop_mib": phases["scene_polygons"]["peak_before"],
        "phases_mib": phases,
        "peak_mib": end[1],
        "window_cache": summary["window_cache"],
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--malloc-arenas", type=int, default=None, help="MALLOC_ARENA_MAX")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a 256² scene, for the tests")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)), flush=True)
        return {}
    sizes = [256] if args.tiny else args.size
    env = {} if args.malloc_arenas is None else {"MALLOC_ARENA_MAX": str(args.malloc_arenas)}
    runs = []
    for size in sizes:
        runs.append(run_child(__file__, [str(size)], env))
        print(f"scene {size}²: {runs[-1]}", flush=True)
    figures = {"scenes": runs, "malloc_arena_max": args.malloc_arenas, "machine": machine()}
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
