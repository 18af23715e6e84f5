"""Peak memory: the quickstart training run, and predicting a 1024² pair with sliding windows.

Each workload runs in its own child process; its peak resident set size is the kernel's
high-water mark reported by ``wait4`` (the largest process of the child's tree, exact, no
polling). Measured:

* **train**: ``python train.py experiment=quickstart`` (data, W&B offline, checkpoints, val
  and test) for ``--epochs`` epochs (default 1: every code path of a run, validation with its
  CAM panels, checkpointing and test, runs once);
* **predict**: ``python predict.py`` with that run's checkpoint on one synthetic 1024² pair,
  with its defaults: sliding windows, mask, probabilities, and the HiResCAM panel of the
  whole image;
* **predict, LEVIR-CD recipe network**: the same command with ``model=siamese_unet`` (base
  width 32, untrained weights saved as a state dict) and ``explain.enabled=false`` (the
  sliding-window prediction alone; explaining a whole 1024² image with this network takes
  minutes on 2 cores): what a LEVIR-trained model needs;
* **baseline**: a process that only imports torch, Lightning and changecam.

The 1024² predictions must stay within 2 GiB on the CPU. Last line:
``{"train_peak_rss_mib", "predict_1024_peak_rss_mib", "predict_1024_within_2gib", ...}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, TINY_QUICKSTART, emit, machine, timed

GIB = 2**30
TINY_TRAIN = TINY_QUICKSTART


def peak_rss(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` to completion; return its peak RSS in bytes, or raise naming the log."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{tail}")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB


def baseline() -> None:
    """The import footprint of a real run, and nothing else."""
    import lightning  # noqa: F401
    import torch  # noqa: F401

    import changecam.data  # noqa: F401
    import changecam.models.sliding_window  # noqa: F401


def predict(ckpt: Path, pre: Path, post: Path, out: Path, *overrides: str) -> list[str]:
    """The ``predict.py`` command line for one pair."""
    cmd = [sys.executable, "predict.py", f"ckpt_path={ckpt}", f"input.pre={pre}"]
    return cmd + [f"input.post={post}", f"hydra.run.dir={out}", *overrides]


def levir_state_dict(path: Path) -> Path:
    """Save an untrained ``model=siamese_unet`` network's weights to ``path``."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    net = hydra.utils.instantiate(OmegaConf.load(REPO / "conf/model/siamese_unet.yaml"))
    torch.save(net.state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="quickstart epochs to train")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the predicted pair")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        baseline()
        return {}
    if args.tiny:
        args.epochs, args.image_size = 1, 128

    from omegaconf import OmegaConf

    from changecam.data import SyntheticSpec, generate

    mib: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="changecam-memory-") as tmp_name:
        tmp = Path(tmp_name)
        spec = SyntheticSpec(image_size=args.image_size, train=0, val=0, test=1, seed=7)
        pair = generate(tmp / "pair", spec) / "test"
        pre, post = pair / "A" / "test_1.png", pair / "B" / "test_1.png"

        def measure(name: str, cmd: list[str]) -> None:
            seconds[name], rss = timed(lambda: peak_rss(cmd, tmp / f"{name}.log"))
            mib[name] = rss / 2**20
            print(f"{name:>20}: peak RSS {mib[name]:8.1f} MiB  ({seconds[name]:.1f} s)", flush=True)

        if not args.tiny:
            measure("baseline", [sys.executable, __file__, "--baseline"])
        run_dir = tmp / "train"
        train = [sys.executable, "train.py", "experiment=quickstart"]
        train += [f"trainer.max_epochs={args.epochs}", f"hydra.run.dir={run_dir}"]
        train += [f"paths.data_dir={tmp / 'data'}", *(TINY_TRAIN if args.tiny else [])]
        measure("train", train)
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        measure("predict", predict(ckpt, pre, post, tmp / "predict"))
        if not args.tiny:
            weights = levir_state_dict(tmp / "siamese_unet.pth")
            cmd = predict(weights, pre, post, tmp / "predict_levir", "model=siamese_unet")
            measure("predict_levir_model", [*cmd, "explain.enabled=false"])

    limit = 2 * GIB / 2**20
    from changecam.cli.common import compose_config

    composed = compose_config("predict", [], Path(tempfile.gettempdir()))
    predict_cfg = {k: OmegaConf.to_container(composed[k]) for k in ("sliding_window", "explain")}
    figures = {
        "train_peak_rss_mib": round(mib["train"], 1),
        "predict_1024_peak_rss_mib": round(mib["predict"], 1),
        "predict_1024_within_2gib": mib["predict"] <= limit,
        "predict_levir_model_1024_peak_rss_mib": round(mib["predict_levir_model"], 1)
        if "predict_levir_model" in mib
        else None,
        "import_baseline_rss_mib": round(mib["baseline"], 1) if "baseline" in mib else None,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "setup": {
            "train": f"train.py experiment=quickstart trainer.max_epochs={args.epochs}",
            "predict": "predict.py ckpt_path=<best.ckpt of the train run> input.pre=... input.post=...",
            "pair": f"{args.image_size}x{args.image_size} synthetic",
            "predict_config": {k: predict_cfg[k] for k in ("sliding_window", "explain")},
            "tiny": args.tiny,
        },
        "machine": machine(),
    }
    if "predict_levir_model" in mib:
        figures["predict_1024_within_2gib"] &= mib["predict_levir_model"] <= limit
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
