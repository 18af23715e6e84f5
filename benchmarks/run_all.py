"""``make bench``: run every benchmark, collect their figures, write results.json and results.md.

Each benchmark script prints its figures as one JSON object on its last line. A script that
is not in the repository yet is skipped with a note; one that fails is reported with the tail
of its output, and the others still run. The full output of each script goes to
``outputs/bench/<name>.log`` (``--logs``).

    python benchmarks/run_all.py                 # everything, results in benchmarks/
    python benchmarks/run_all.py --only loader   # one benchmark
    python benchmarks/run_all.py --tiny --out /tmp/bench   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import machine

HERE = Path(__file__).resolve().parent
# Expected benchmarks, in running order (a missing one is skipped with a note); any other
# script in benchmarks/ runs after them.
EXPECTED = ("loader", "loop", "memory", "explain_cost", "cam_callback")
# zoo: `make bench-zoo` (it trains every model); real_small: `make bench-real` (half an hour);
# full_scale: `make bench-full` (LEVIR-CD-sized data, width 32); scene: `make bench-scene`
# (an 8192² GeoTIFF pair: tens of minutes on a CPU); scene_memory, scene_timeline,
# scene_codecs and causal_margin: by hand; scene_verdicts reads the scene records (no timing)
NOT_BENCHMARKS = (
    "common",
    "run_all",
    "zoo",
    "real_small",
    "full_scale",
    "scene",
    "scene_memory",
    "scene_timeline",
    "scene_codecs",
    "scene_verdicts",
    "causal_margin",  # needs a trained checkpoint
)


def benchmark_names() -> list[str]:
    """The expected benchmarks, then every other script in ``benchmarks/``."""
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    return [*EXPECTED, *(name for name in found if name not in EXPECTED)]


# Figures with a target from their issue: (comparison, bound)
TARGETS: dict[str, tuple[str, float]] = {
    "loader_speedup_vs_naive": (">=", 5.0),
    "fit_vs_plain_loop": ("<=", 1.10),
    "predict_1024_peak_rss_mib": ("<=", 2048.0),
    "predict_levir_model_1024_peak_rss_mib": ("<=", 2048.0),
    "ratio_vs_forward_backward": ("<=", 1.3),
    "zoo_max_ratio_vs_forward_backward": ("<=", 1.3),
    "val_epoch_ratio_with_callback": ("<=", 1.15),
    "validate_headers_s": ("<=", 5.0),
}
CONTEXT_KEYS = (
    "machine",
    "setup",
    "errors",
    "seconds",
    "epoch_cpu_s",
    "epoch_wall_s",
    "callback_setup_s",
)


def last_json(output: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of ``output``."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the script printed nothing")
    figures = json.loads(lines[-1])
    if not isinstance(figures, dict):
        raise ValueError(f"the last line is JSON but not an object: {lines[-1][:200]}")
    return figures


def run_script(name: str, tiny: bool, logs: Path) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py``; its status, duration, command and figures."""
    script = HERE / f"{name}.py"
    command = [sys.executable, str(script.relative_to(HERE.parent)), *(["--tiny"] if tiny else [])]
    entry: dict[str, Any] = {"command": " ".join(["python", *command[1:]])}
    if not script.is_file():
        return {
            **entry,
            "status": "skipped",
            "note": f"benchmarks/{name}.py is not in the repository yet",
        }
    print(f"== {name}: {entry['command']}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    output = proc.stdout + proc.stderr
    log = logs / f"{name}.log"
    log.write_text(output)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}")
        entry["figures"] = last_json(proc.stdout)
        entry["status"] = "ok"
    except (RuntimeError, ValueError) as err:
        entry["status"] = "failed"
        entry["note"] = f"{err}; see {log}"
        entry["output_tail"] = output[-2000:]
    print(f"   {entry['status']} in {entry['seconds']} s", flush=True)
    return entry


def flat_figures(figures: dict[str, Any]) -> dict[str, Any]:
    """Scalar figures, nested dicts flattened one level (``callback_cost.progress_bar``)."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        if key in CONTEXT_KEYS:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, dict)})
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def verdict(key: str, value: Any) -> str:
    if key not in TARGETS or not isinstance(value, int | float):
        return ""
    op, bound = TARGETS[key]
    ok = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g} {'✓' if ok else '✗'}"


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, with the machine and the command."""
    m = results["machine"]
    lines = [
        "| benchmark | figure | value | target |",
        "|---|---|---|---|",
    ]
    for name, entry in results["benchmarks"].items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | *{entry['status']}* | {entry.get('note', '')} | |")
            continue
        for key, value in flat_figures(entry["figures"]).items():
            shown = f"{value:g}" if isinstance(value, float) else str(value).lower()
            lines.append(f"| {name} | `{key}` | {shown} | {verdict(key, value)} |")
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    load = f", load average {m['load_avg_1min']} at the start" if "load_avg_1min" in m else ""
    if "load_avg_1min_end" in results:
        load += f" and {results['load_avg_1min_end']} at the end"
    lines += ["", "| benchmark | status | seconds | command |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {e['status']} | {e.get('seconds', '')} | `{e['command']}` |"
        for name, e in results["benchmarks"].items()
    ]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch {m['torch']}, {m['torch_threads']} "
        f"threads){gpu}{load}. Command: `{results['command']}` "
        f"({results['total_s']:.0f} s in all, {results['finished']}).",
        "Ratios are measured side by side in one run; each benchmark's setup is in "
        "`benchmarks/results.json`.",
    ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=benchmark_names(), help="benchmark names")
    parser.add_argument("--tiny", action="store_true", help="pass --tiny to every benchmark")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json/.md")
    parser.add_argument(
        "--logs", type=Path, default=HERE.parent / "outputs" / "bench", help="folder for logs"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/run_all.py", *given]) if given else "make bench",
        "machine": machine(),
        "benchmarks": {name: run_script(name, args.tiny, args.logs) for name in args.only},
    }
    results["total_s"] = round(time.perf_counter() - start, 1)
    if hasattr(os, "getloadavg"):
        results["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    results["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    write_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "results.md", markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
