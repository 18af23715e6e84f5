"""Peak memory: the quickstart training run, and predicting a 1024² pair with sliding windows.

Each workload runs in its own child process; its peak resident set size is the kernel's
high-water mark reported by ``wait4`` (the largest process of the child's tree, exact, no
polling). Measured:

* **train**: ``python train.py experiment=quickstart`` (data, W&B offline, checkpoints, val
  and test) for ``--epochs`` epochs (memory does not grow with more);
* **predict**: the checkpoint that run wrote, on one synthetic 1024² pair -- through
  ``predict.py`` where the repository has it, else ``sliding_window_logits`` on the network
  loaded with ``load_network`` (the figure says which);
* **predict, LEVIR-CD recipe network**: ``model=siamese_unet`` (base width 32, untrained) on
  the same pair with the same windows: what a LEVIR-trained model needs;
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

from common import REPO, emit, machine, timed

GIB = 2**30
TINY_TRAIN = [
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


def child(args: argparse.Namespace) -> None:
    """The measured workloads that are not a repository command."""
    import lightning  # noqa: F401
    import torch

    import changecam.data  # noqa: F401  (the import footprint of a real run)

    if args.child == "baseline":
        return
    import hydra

    from changecam.checkpoint import load_network
    from changecam.data.io import read_image
    from changecam.data.transforms import image_to_tensor
    from changecam.inference import SlidingWindow, sliding_window_logits

    if args.model is not None:
        net = hydra.utils.instantiate({**args.model_cfg}).eval()
    else:
        net = load_network(args.ckpt)
    pre, post = (image_to_tensor(read_image(p))[None] for p in (args.pre, args.post))
    logits = sliding_window_logits(net, pre, post, SlidingWindow())
    mask = torch.sigmoid(logits) > 0.5
    print(f"{tuple(mask.shape)} change pixels: {int(mask.sum())}")


def predict_command(ckpt: Path, pre: Path, post: Path, out: Path) -> tuple[list[str], str]:
    """How to predict one pair: ``predict.py`` if the repository has it, else the direct path."""
    if (REPO / "predict.py").is_file():
        cmd = [
            sys.executable,
            "predict.py",
            f"ckpt_path={ckpt}",
            f"input.pre={pre}",
            f"input.post={post}",
            f"hydra.run.dir={out}",
        ]
        return cmd, "predict.py"
    cmd = [sys.executable, __file__, "--child", "predict", "--ckpt", str(ckpt)]
    cmd += ["--pre", str(pre), "--post", str(post)]
    return cmd, "sliding_window_logits + load_network (predict.py is not in the repository yet)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="quickstart epochs to train")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the predicted pair")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for the tests")
    parser.add_argument("--child", choices=["baseline", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pre", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--post", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.model:
            from omegaconf import OmegaConf

            args.model_cfg = OmegaConf.to_container(
                OmegaConf.load(REPO / f"conf/model/{args.model}.yaml")
            )
        child(args)
        return {}
    if args.tiny:
        args.epochs, args.image_size = 1, 128

    from changecam.data import SyntheticSpec, generate
    from changecam.inference import SlidingWindow

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
            print(f"{name:>20}: peak RSS {mib[name]:8.1f} MiB  ({seconds[name]:.1f} s)")

        if not args.tiny:
            measure("baseline", [sys.executable, __file__, "--child", "baseline"])
        run_dir = tmp / "train"
        train = [sys.executable, "train.py", "experiment=quickstart"]
        train += [f"trainer.max_epochs={args.epochs}", f"hydra.run.dir={run_dir}"]
        train += [f"paths.data_dir={tmp / 'data'}", *(TINY_TRAIN if args.tiny else [])]
        measure("train", train)
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        cmd, method = predict_command(ckpt, pre, post, tmp / "predict")
        measure("predict", cmd)
        if not args.tiny:
            cmd = [sys.executable, __file__, "--child", "predict", "--model", "siamese_unet"]
            measure("predict_levir_model", cmd + ["--pre", str(pre), "--post", str(post)])

    limit = 2 * GIB / 2**20
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
            "predict_method": method,
            "pair": f"{args.image_size}x{args.image_size} synthetic",
            "sliding_window": repr(SlidingWindow()),
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
