"""Loading network weights: Lightning checkpoints or plain ``state_dict`` files.

Always ``torch.load(weights_only=True)``: a file that needs pickled code is refused.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import nn


class CheckpointError(ValueError):
    """A weights file cannot be loaded into the requested network."""


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} needs pickled Python code to load, which changecam refuses "
            "(torch.load(weights_only=True)). Save weights only, e.g. torch.save(model.state_dict(), path). "
            f"Detail: {str(err).splitlines()[0]}"
        ) from err
    except Exception as err:  # zip/format errors of corrupt or foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint or a state_dict"
        )
    return dict(obj)


def split_checkpoint(
    obj: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(network state dict, network config or None) of a Lightning checkpoint or a plain state dict."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = {
            k.removeprefix("net."): v for k, v in obj["state_dict"].items() if k.startswith("net.")
        }
        return state, obj.get("net_config")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None


def load_network(path: str | Path, model_cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the network and load its weights from ``path``.

    Args:
        path: a Lightning ``.ckpt`` written by changecam (it records the network config) or a
            plain ``state_dict`` ``.pth`` (then ``model_cfg`` says which network to build,
            e.g. the ``model=siamese_unet_seed`` config for the seed notebook's weights).
        model_cfg: Hydra config of the network; overrides the one stored in the checkpoint.

    Raises:
        CheckpointError: pickled code, no config to build the network from, or an
            architecture mismatch (the message lists missing and unexpected keys).
    """
    state, stored_cfg = split_checkpoint(read_weights_file(path))
    cfg = model_cfg if model_cfg is not None else stored_cfg
    if cfg is None:
        raise CheckpointError(
            f"{path} is a plain state_dict without a network config; choose one with model=... "
            "(e.g. model=siamese_unet_seed for the seed notebook's weights)"
        )
    net = hydra.utils.instantiate(dict(cfg))
    result = net.load_state_dict(state, strict=False)
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(net.state_dict()[k].shape)}"
        for k, v in state.items()
        if k in net.state_dict() and net.state_dict()[k].shape != v.shape
    ]
    if result.missing_keys or result.unexpected_keys or shape_errors:
        raise CheckpointError(
            mismatch_message(
                path, cfg, result.missing_keys, result.unexpected_keys, shape_errors, state
            )
        )
    return net


def mismatch_message(
    path: str | Path,
    cfg: Mapping[str, Any],
    missing: list[str],
    unexpected: list[str],
    shape_errors: list[str],
    state: Mapping[str, torch.Tensor],
) -> str:
    """Explain an architecture mismatch and suggest the model config that fits the file."""

    def short(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    lines = [f"{path} does not fit the network {dict(cfg)}:"]
    if missing:
        lines.append(f"  missing keys: {short(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {short(unexpected)}")
    if shape_errors:
        lines.append(f"  shape mismatches: {short(shape_errors)}")
    hint = suggest_siamese_unet(state)
    if hint:
        lines.append("  a config that fits: " + " ".join(f"model.{k}={v}" for k, v in hint.items()))
    return "\n".join(lines)


def suggest_siamese_unet(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Infer SiameseUNet arguments from a state dict's keys and shapes, if it is one."""
    shared = "encoder1.conv1.conv.weight" in state
    first = state.get("encoder1.conv1.conv.weight", state.get("encoder1a.conv1.conv.weight"))
    if first is None or "bottleneck.conv.weight" not in state:
        return None
    depth = sum(1 for k in state if k.startswith("decoder") and k.endswith(".upconv.weight"))
    base, in_channels = first.shape[0], first.shape[1]
    widest = base * 2 ** (depth - 1)
    fusion = (
        "concat" if state["bottleneck.conv.weight"].shape[1] == 2 * widest else "diff (or absdiff)"
    )
    return {
        "in_channels": in_channels,
        "base_channels": base,
        "depth": depth,
        "fusion": fusion,
        "shared_encoder": shared,
    }
