"""notebooks/explain_change.ipynb runs headless (nbclient, a kernel on this interpreter)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from ipykernel.kernelspec import install
from nbclient import NotebookClient

from helpers import REPO
from test_checkpoint import make_lightning_checkpoint

NOTEBOOK = REPO / "notebooks" / "explain_change.ipynb"
KERNEL = "changecam-test"


def kernel_on_this_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Register a kernelspec that runs ``sys.executable`` in a private Jupyter path."""
    install(kernel_name=KERNEL, prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    spec = tmp_path / "jupyter" / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    assert sys.executable in spec.read_text()
    return KERNEL


def outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            images += "image/png" in out.get("data", {})
    return "".join(text), images


def test_committed_notebook_is_clean_and_parametrised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        "commit it without outputs"
    )
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "CHANGECAM_CKPT" in code[0].source and "outputs/quickstart/runs" in "".join(
        c.source for c in code
    )


def test_notebook_runs_on_a_tiny_checkpoint(tmp_path, tiny_synthetic, monkeypatch):
    # the default checkpoint lookup: the newest <root>/outputs/quickstart/runs/*/checkpoints/best.ckpt
    root = tmp_path / "project"
    ckpt = make_lightning_checkpoint(
        root / "outputs/quickstart/runs/2026-01-01_00-00-00/checkpoints/best.ckpt",
        tiny_synthetic,
        steps=3,
    )
    # trained with module.threshold=0.3: the notebook scored and explained at 0.5 (helper-103)
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["threshold"] = 0.3
    torch.save(saved, ckpt)
    shutil.copytree(tiny_synthetic, root / "data" / "synthetic")
    monkeypatch.delenv("CHANGECAM_CKPT", raising=False)
    monkeypatch.setenv("CHANGECAM_ROOT", str(root))
    monkeypatch.setenv("CHANGECAM_PATCH_SIZE", "32")
    monkeypatch.setenv("CHANGECAM_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel_on_this_python(tmp_path, monkeypatch),
        timeout=240,
        iopub_timeout=60,  # a slow kernel's output must not be dropped silently
        raise_on_iopub_timeout=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text, images = outputs(nb)
    assert "runs/2026-01-01_00-00-00/checkpoints/best.ckpt (threshold 0.3)" in text
    assert "8 of 8 test tiles of 32 px" in text
    assert "pooled over all pixels: f1" in text
    assert images >= 2, "the post-share distribution and the deletion curves at least"
