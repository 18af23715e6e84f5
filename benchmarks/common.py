"""What every benchmark script shares: the machine description, timing, the JSON last line.

Each benchmark is a script ``benchmarks/<name>.py`` that measures ratios side by side in one
run and prints its figures as one JSON object on its **last** line (``run_all.py`` reads it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a fresh clone without installing, too
    sys.path.insert(0, str(REPO / "src"))

from changecam.environment import configure_environment  # noqa: E402 (after the sys.path line)

configure_environment()


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU, cores, GPU, library versions, and the 1-minute load
    when called (a benchmark that calls it last counts its own run in it)."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of ``fn()`` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def quickstart_config(tmp: Path, overrides: list[str]) -> DictConfig:
    """``experiment=quickstart`` as ``train.py`` composes it, with every path under ``tmp``."""
    from changecam.cli.common import compose_config

    return compose_config("train", ["experiment=quickstart", *overrides], tmp)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_verdict(ratios: Sequence[float], coverage: float = 0.9) -> dict[str, Any]:
    """Which of two paths is the faster, from their speed ratio in each round (``> 1``: the
    first path was faster in that round), without assuming how the machine's noise is
    distributed: the median ratio's order-statistic confidence interval (the sign test's),
    the narrowest ``[r_(j), r_(n+1-j)]`` of the sorted ratios that covers the median with
    probability ``coverage`` or more, the rounds taken as independent. The rounds of one run
    share that run's state of the machine: a verdict is the run's, and another run of the same
    code may get another.

    Returns:
        ``verdict``: ``faster`` (the whole interval above 1), ``slower`` (below 1), ``even
        within noise`` (it holds 1) or ``too few rounds`` (even ``[min, max]`` covers less
        than ``coverage``: 4 rounds or fewer for 0.9); with the ``median``, the ``interval``
        (its ends rounded to 3 decimals, as judged) and its ``coverage`` (to 4 decimals).

    Raises:
        ValueError: ``coverage`` is not between 0 and 1.
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage={coverage!r} must be between 0 and 1")
    values, n = sorted(ratios), len(ratios)
    # the interval [r_(j), r_(n+1-j)] misses the median when fewer than j of the n rounds
    # fall on one side of it: probability 2 P(Binomial(n, 1/2) < j)
    chosen: tuple[int, float] | None = None
    j, below = 1, 0
    while 2 * j <= n + 1:
        below += math.comb(n, j - 1)
        covered = 1 - 2 * below / 2**n
        if covered < coverage:
            break
        chosen = (j, covered)
        j += 1
    record: dict[str, Any] = {"median": round(median(values), 3) if values else None}
    if chosen is None:
        return {"verdict": "too few rounds", **record, "interval": None, "coverage": None}
    j, covered = chosen
    low, high = round(values[j - 1], 3), round(values[n - j], 3)
    verdict = "faster" if low > 1 else "slower" if high < 1 else "even within noise"
    return {"verdict": verdict, **record, "interval": [low, high], "coverage": round(covered, 4)}


def emit(figures: dict[str, Any]) -> None:
    """Print the figures as one JSON object on the last line of the output."""
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True), flush=True)


# Overrides that shrink the quickstart run to seconds (the benchmarks' --tiny smoke runs).
TINY_QUICKSTART: list[str] = [
    "data.synthetic.image_size=64",
    "data.synthetic.train=4",
    "data.synthetic.val=2",
    "data.synthetic.test=2",
    "data.patch_size=32",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "model.base_channels=4",
    "model.depth=2",
    "logger=csv",
]


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux ``/proc``)."""
    import resource

    current = 0.0
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS"):
                current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """``python <script> --child <args>`` in a fresh process (``src/`` and ``benchmarks/`` on
    its path, ``env`` added to this one's): the JSON its last line prints. The memory
    benchmarks measure each size this way, every child from the same imports."""
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks")]),
        **(env or {}),
    }
    out = subprocess.run(
        [sys.executable, script, "--child", *args],
        env=child_env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def growth_figures(benchmark: str, runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A memory benchmark's figures: its runs (smallest size first) and ``growth_ratio``, the
    ``key`` growth of the largest over the smallest (below 1 MiB counted as 1: noise)."""
    growth = [max(run[key], 1.0) for run in runs]
    return {
        "benchmark": benchmark,
        "machine": machine(),
        "scenes": runs,
        "growth_ratio": round(growth[-1] / growth[0], 3),
    }
