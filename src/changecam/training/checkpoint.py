"""changecam's checkpoints: what they record about the network, and loading it back.

:func:`record_network` (called by the LightningModule when Lightning saves) and
:func:`split_checkpoint` are the two sides of one format. Loading is always
``torch.load(weights_only=True)``: a file that needs pickled code is refused. Accepted files:

* a Lightning ``.ckpt`` written by changecam: ``net_config`` records how to build the network
  (:meth:`changecam.models.ChangeNetwork.config`) and ``net_prefix`` under which name the
  module holds it, i.e. which entries of its ``state_dict`` are the network's weights;
* a plain ``state_dict`` (``torch.save(model.state_dict(), path)``, e.g. the seed notebook's
  weights for ``model=siamese_unet_seed``), also wrapped as ``{"state_dict": ...}`` or
  ``{"model_state_dict": ...}``, with or without the ``module.`` prefix of ``DataParallel``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from changecam.models import SEED_ARCHITECTURE, build_network, network_config

CONFIG_KEY = "net_config"
PREFIX_KEY = "net_prefix"
LEGACY_PREFIX = "net."  # checkpoints written before net_prefix was recorded


def record_network(checkpoint: dict[str, Any], module: nn.Module, net: nn.Module) -> None:
    """Record in a Lightning checkpoint how to rebuild ``net`` and where its weights are.

    Args:
        checkpoint: the dict Lightning is about to save.
        module: the LightningModule holding ``net`` as a direct child.
        net: the network.
    """
    name = next((n for n, child in module.named_children() if child is net), None)
    if name is None:
        raise ValueError(f"{type(net).__name__} is not a direct child of {type(module).__name__}")
    checkpoint[CONFIG_KEY] = network_config(net)
    checkpoint[PREFIX_KEY] = f"{name}."


class CheckpointError(ValueError):
    """A weights file cannot be loaded into the requested network."""


def _refusal_detail(err: Exception) -> str:
    """The informative line of torch's weights-only error (which global it refused)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    for line in text.splitlines():
        if "Unsupported" in line:
            return line.strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file needs pickled code, is not a PyTorch file, or holds no mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # a corrupt or foreign file, not pickled code
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint: {_refusal_detail(err)}"
            ) from err
        raise CheckpointError(
            f"{path} needs pickled Python code to load, which changecam refuses "
            "(torch.load(weights_only=True) only). Save weights only, e.g. "
            f"torch.save(model.state_dict(), path). Detail: {_refusal_detail(err)}"
        ) from err
    except Exception as err:  # zip/format errors of corrupt or foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint or a state_dict"
        )
    return dict(obj)


def _tensors(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def split_checkpoint(
    obj: Mapping[str, Any], path: str | Path = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(network state dict, network config or ``None``) of a checkpoint or a plain state dict.

    Raises:
        CheckpointError: a Lightning checkpoint that holds no ``net.*`` weights.
    """
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        inner = obj["state_dict"]
        if CONFIG_KEY in obj or "pytorch-lightning_version" in obj:  # a Lightning checkpoint
            prefix = str(obj.get(PREFIX_KEY, LEGACY_PREFIX))
            state = {k.removeprefix(prefix): v for k, v in inner.items() if k.startswith(prefix)}
            if not state:
                prefixes = sorted({k.split(".")[0] for k in inner})
                raise CheckpointError(
                    f"{path} is a Lightning checkpoint without network weights under "
                    f"{prefix!r} (its state_dict prefixes: {prefixes}); changecam's "
                    f"ChangeDetectionModule records the network's prefix as {PREFIX_KEY!r}"
                )
            return state, obj.get(CONFIG_KEY)
        return _tensors(inner), None
    if "model_state_dict" in obj and isinstance(obj["model_state_dict"], Mapping):
        return _tensors(obj["model_state_dict"]), None
    return _tensors(obj), None


def load_network(path: str | Path, model_cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """The network of :func:`read_checkpoint`, in eval mode on the CPU."""
    return read_checkpoint(path, model_cfg)[0]


def read_checkpoint(
    path: str | Path, model_cfg: Mapping[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network, load its weights from ``path``; return it (eval mode, on the CPU) and
    the module hyper-parameters the file records (``loss``, ``threshold`` ...; empty for a
    plain state dict).

    Args:
        path: a Lightning ``.ckpt`` written by changecam (it records the network config) or a
            plain ``state_dict`` ``.pth`` (then ``model_cfg`` says which network to build,
            e.g. the ``model=siamese_unet_seed`` config for the seed notebook's weights).
        model_cfg: Hydra config of the network (with ``_target_``); overrides the one stored in
            the checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: pickled code, no config to build the network from, or an
            architecture mismatch (the message lists missing and unexpected keys, shape
            mismatches and the model config that fits the file).
    """
    obj = read_weights_file(path)
    state, stored_cfg = split_checkpoint(obj, path)
    cfg = model_cfg if model_cfg is not None else stored_cfg
    if cfg is None:
        raise CheckpointError(
            f"{path} holds weights without a network config; choose the network with model=... "
            "(e.g. model=siamese_unet_seed for the seed notebook's weights)" + _hint_suffix(state)
        )
    if not state:
        raise CheckpointError(f"{path} holds no weight tensors")
    net = build_network(cfg)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if missing or unexpected or shape_errors:
        raise CheckpointError(mismatch_message(path, cfg, missing, unexpected, shape_errors, state))
    net.load_state_dict(state, strict=True)
    hparams = obj.get("hyper_parameters") if stored_cfg is not None else None
    return net.eval(), dict(hparams) if isinstance(hparams, Mapping) else {}


def _hint_suffix(state: Mapping[str, torch.Tensor]) -> str:
    hint = suggest_siamese_unet(state)
    return f"; the weights fit: {format_suggestion(hint)}" if hint else ""


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
        lines.append(f"  a config that fits: {format_suggestion(hint)}")
    else:
        lines.append("  the file does not look like a changecam SiameseUNet")
    return "\n".join(lines)


def format_suggestion(hint: Mapping[str, Any]) -> str:
    """Command-line overrides for a :func:`suggest_siamese_unet` result."""
    if dict(hint) == SEED_ARCHITECTURE:
        return "model=siamese_unet_seed"
    text = "model=siamese_unet " + " ".join(f"model.{k}={v}" for k, v in hint.items())
    if hint.get("fusion") == "diff":
        text += " (or model.fusion=absdiff: the weights cannot tell diff from absdiff)"
    return text


def suggest_siamese_unet(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Infer :class:`~changecam.models.SiameseUNet` arguments from a state dict, if it is one."""
    shared = "encoder1.conv1.conv.weight" in state
    first = state.get("encoder1.conv1.conv.weight", state.get("encoder1a.conv1.conv.weight"))
    bottleneck = state.get("bottleneck.conv.weight")
    if first is None or bottleneck is None or first.ndim != 4 or bottleneck.ndim != 4:
        return None
    depth = sum(1 for k in state if re.fullmatch(r"decoder\d+\.upconv\.weight", k))
    if depth == 0:
        return None
    base, in_channels = int(first.shape[0]), int(first.shape[1])
    widest = base * 2 ** (depth - 1)
    return {
        "in_channels": in_channels,
        "base_channels": base,
        "depth": depth,
        "fusion": "concat" if bottleneck.shape[1] == 2 * widest else "diff",
        "shared_encoder": shared,
    }


def read_external_checkpoint(path: str | Path, model_cfg: Mapping[str, Any]) -> nn.Module:
    """A network changecam did not write (``model=external``), with its weights from ``path``.

    The file is a plain ``state_dict`` of the user's own network (also wrapped or with
    ``module.`` prefixes, see :func:`split_checkpoint`), loaded strictly into the network the
    factory builds; a changecam checkpoint of such a wrapped network loads as well.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: pickled code, no weights, or keys and shapes that do not fit (listed).
    """
    state, _ = split_checkpoint(read_weights_file(path), path)
    if not state:
        raise CheckpointError(f"{path} holds no weight tensors")
    wrapper = build_network(model_cfg)
    net = wrapper if set(state) == set(wrapper.state_dict()) else wrapper.model
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if missing or unexpected or shapes:

        def short(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        problems = [
            f"  {what}: {short(keys)}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if keys
        ]
        raise CheckpointError(
            "\n".join(
                [
                    f"{path} does not fit the network of model.target="
                    f"{model_cfg.get('target')!r} with model.kwargs={model_cfg.get('kwargs')}:",
                    *problems,
                ]
            )
        )
    net.load_state_dict(state, strict=True)
    return wrapper.eval()
