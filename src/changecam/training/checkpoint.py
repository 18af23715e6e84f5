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

import contextlib
import pickle
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import nn

from changecam.models import SEED_ARCHITECTURE, build_network, network_config
from changecam.models.external import import_factory
from changecam.training.input_scale import DATA_KEY
from changecam.training.model_match import match_config, match_state, shapes_of

CONFIG_KEY = "net_config"
PREFIX_KEY = "net_prefix"
LEGACY_PREFIX = "net."  # checkpoints written before net_prefix was recorded
SIAMESE_TARGET = "changecam.models.SiameseUNet"


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


# torch's weights-only refusals (torch.serialization, torch._weights_only_unpickler), matched
# case-insensitively: each names the global or class that a weights file must not need.
_REFUSED_GLOBAL = (
    re.compile(r"GLOBAL\s+(\S+?)\s+was not an allowed global", re.I),
    re.compile(r"unsupported GLOBAL\s+(\S+?)\s+whose module\s+\S+\s+is blocked", re.I),
    re.compile(
        r"call reduce for unrecognized function\s+(.+?)(?:\s+which belongs.*)?$", re.I | re.M
    ),
    re.compile(r"(?:create new object|can only build)\b.*?but got\s+(<class '[^']+'>|\S+)", re.I),
)
_WEIGHTS_ONLY_REFUSAL = re.compile(r"weights only load failed|weightsunpickler|unsupported", re.I)
# Sentences of torch's message that advise unsafe loading (weights_only=False, allowlisting
# the global) or are boilerplate; they are never passed on.
_UNSAFE_ADVICE = re.compile(
    r"weights_only\W{0,4}(?:set to\W{0,4})?false|safe_globals|weights only load failed|"
    r"file an issue|check the documentation|do those steps|can still be loaded|"
    r"recommended steps|changed the default value|trusted source|arbitrary code",
    re.I,
)
# Modules whose functions a weights file has no reason to call.
_RISKY_MODULES = {"os", "sys", "posix", "nt", "subprocess", "shutil", "builtins", "socket"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # a pickle of protocol >= 2: torch's legacy format, or pickle.dump


def _plain(err: BaseException) -> str:
    """The error text without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(err))


def refused_global(err: BaseException) -> str | None:
    """The global (function or class) that a weights-only refusal names, if it names one."""
    text = _plain(err)
    for pattern in _REFUSED_GLOBAL:
        found = pattern.search(text)
        if found:
            return found.group(1).strip().rstrip(".")
    return None


def refusal_detail(err: BaseException) -> str:
    """The informative part of a torch load error, without torch's advice to load unsafely."""
    sentences = re.split(r"(?<=\.)\s+|\n+", _plain(err))
    kept = [
        re.sub(r"^\(?\d?\)?\s*WeightsUnpickler error:\s*", "", s.strip(), flags=re.I)
        for s in sentences
        if s.strip() and not _UNSAFE_ADVICE.search(s)
    ]
    return " ".join(s for s in kept if s) or type(err).__name__


def _file_kind(path: Path) -> str:
    """What the first bytes of ``path`` say it is, for the message of an unreadable file."""
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(ZIP_MAGIC):
        return "a zip archive as torch.save writes, but damaged or cut short"
    if head.startswith(PICKLE_MAGIC):
        return "a pickle that torch.load(weights_only=True) cannot read"
    return f"neither a torch.save file nor a pickle (it starts with {head!r})"


def _pickled_code_error(path: Path, name: str) -> CheckpointError:
    """The refusal of a file that needs the global ``name`` (a function or class) to load."""
    module = name.rsplit(".", 1)[0] if "." in name else "builtins"
    warning = (
        f" A weights file has no reason to call {name}: do not load this file by other means."
        if module.split(".")[0] in _RISKY_MODULES
        else ""
    )
    return CheckpointError(
        f"{path} needs pickled Python code to load: it refers to the global {name}, which is "
        "not a tensor or a plain value, and changecam refuses it "
        "(torch.load(weights_only=True) only)." + warning + " Save weights only, e.g. "
        "torch.save(model.state_dict(), path), or use a checkpoint written by changecam's train.py."
    )


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong.

    A refusal names the global the file needs and never passes on torch's advice to load with
    ``weights_only=False`` (which runs whatever code the file holds), not even in the chained
    exception.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, needs pickled code, is not a PyTorch file, or holds
            no mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: the file is empty (0 bytes); the "
            "run that wrote it was probably killed or its disk was full"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(err)
        if name is not None:
            raise _pickled_code_error(path, name) from None
        kind = _file_kind(path)
        if kind.startswith("a zip") and _WEIGHTS_ONLY_REFUSAL.search(_plain(err)):
            kind = "a torch.save file holding objects other than tensors and plain values"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {kind} ({refusal_detail(err)}). "
            "changecam reads weights saved with torch.save(model.state_dict(), path) and "
            "checkpoints written by its train.py."
        ) from None
    except Exception as err:  # zip/format errors of corrupt or foreign files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {_file_kind(path)} "
            f"({type(err).__name__}: {refusal_detail(err)})"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint or a state_dict"
        )
    return dict(obj)


# prefixes a wrapper adds to every key: DataParallel/DDP's and torch.compile's
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _tensors(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    stripped = True
    while state and stripped:  # e.g. module._orig_mod.: compiled, then wrapped in DDP
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                stripped = True
    return state


def own_prefix(
    state: Mapping[str, torch.Tensor], expected: Collection[str]
) -> Mapping[str, torch.Tensor]:
    """``state`` with the wrapper prefixes put back that :func:`_tensors` took off but which
    were the network's own: a child named ``module``, or a factory that returns a
    ``torch.compile``d module (``_orig_mod.``). Used when no key of ``state`` is one of
    ``expected`` and a prefixed one is (one or two prefixes, the first such)."""
    if set(state) & set(expected):
        return state
    singles = WRAPPER_PREFIXES
    for prefix in (*singles, *(a + b for a in singles for b in singles)):
        prefixed = {prefix + k: v for k, v in state.items()}
        if set(prefixed) & set(expected):
            return prefixed
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


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all() for k in names]).cpu()  # one sync
    return [k for k, ok in zip(names, finite.tolist(), strict=True) if not ok]


def describe_tensors(names: list[str], total: int, shown: int = 5) -> str:
    """``a, b, c ... (7 of 40 tensors)``: the first few of ``names``, and how many."""
    text = ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")
    return f"{text} ({len(names)} of {total} tensors)"


def check_finite(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights that hold NaN or infinite values (those of a diverged run).

    Raises:
        CheckpointError: naming ``path`` and the first offending tensors.
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or inf) in {describe_tensors(bad, len(state))}: "
            "the run that wrote it diverged. Use a checkpoint from before the divergence, or "
            "retrain with a lower module.optimizer.lr (or trainer.gradient_clip_val)."
        )


def load_network(path: str | Path, model_cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """The network of :func:`read_checkpoint`, in eval mode on the CPU."""
    return read_checkpoint(path, model_cfg)[0]


def read_network_state(
    path: str | Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """(the file's contents, the network's finite weights, the recorded network config or
    ``None``) of a weights file: the checks every command runs before building anything.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: unreadable or empty file, pickled code, no weights, non-finite weights.
    """
    obj = read_weights_file(path)
    state, stored_cfg = split_checkpoint(obj, path)
    if not state:
        raise CheckpointError(f"{path} holds no weight tensors")
    check_finite(state, path)
    return obj, state, stored_cfg


def state_differences(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` (a file's) differs from ``expected`` (a network's): the network's keys the
    file lacks, the file's keys the network lacks, and ``name: file (..) vs model (..)`` for
    each key whose shapes differ."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    return missing, unexpected, shape_errors


def check_fits(
    path: str | Path,
    cfg: Mapping[str, Any],
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    stored_cfg: Mapping[str, Any] | None = None,
) -> None:
    """Raise a :class:`CheckpointError` (:func:`mismatch_message`) unless ``state`` has exactly
    the keys and shapes of ``expected``, the state dict of the network of ``cfg``."""
    missing, unexpected, shape_errors = state_differences(expected, state)
    if missing or unexpected or shape_errors:
        raise CheckpointError(
            mismatch_message(path, cfg, missing, unexpected, shape_errors, state, stored_cfg)
        )


def read_checkpoint(
    path: str | Path,
    model_cfg: Mapping[str, Any] | None = None,
    choosing: frozenset[str] = frozenset(),
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network, load its weights from ``path``; return it (eval mode, on the CPU) and
    the module hyper-parameters the file records (``loss``, ``threshold`` ...; empty for a
    plain state dict), with the training data's protocol under
    :data:`~changecam.training.input_scale.DATA_KEY` where the file records it.

    Args:
        path: a Lightning ``.ckpt`` written by changecam (it records the network config) or a
            plain ``state_dict`` ``.pth`` (then ``model_cfg`` says which network to build,
            e.g. the ``model=siamese_unet_seed`` config for the seed notebook's weights).
        model_cfg: Hydra config of the network (with ``_target_``); overrides the one stored in
            the checkpoint.
        choosing: keys of ``model_cfg`` that only choose what is explained (an external
            model's ``layers``), which may differ from the recorded ones.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: pickled code, non-finite weights, no config to build the network
            from, or an architecture mismatch (the message lists missing and unexpected keys,
            shape mismatches and the ``model=`` that fits the file).
    """
    obj, state, stored_cfg = read_network_state(path)
    cfg = model_cfg if model_cfg is not None else stored_cfg
    if cfg is None:
        hint = suggest_model(state)
        raise CheckpointError(
            f"{path} holds weights without a network config; choose the network with model=... "
            "(e.g. model=siamese_unet_seed for the seed notebook's weights)"
            + (f"; the weights fit: {hint}" if hint else "")
        )
    net = build_network(cfg)
    check_fits(path, cfg, net.state_dict(), state, stored_cfg)
    # dropout acts in training only: eval, predict and explain run the network in eval mode
    changed = config_changes(stored_cfg, model_cfg, ignore=STARTING_KEYS | {"dropout"} | choosing)
    if changed:  # the same weight shapes: the scores would be another network's
        raise CheckpointError(
            f"{path} records its network, and the model config given builds another with "
            f"weights of the same shapes ({'; '.join(changed)}): leave model= and model.* out "
            "(they choose the network of a plain state_dict)"
        )
    net.load_state_dict(state, strict=True)
    hparams = obj.get("hyper_parameters") if stored_cfg is not None else None
    hparams = dict(hparams) if isinstance(hparams, Mapping) else {}
    if stored_cfg is not None and isinstance(obj.get(DATA_KEY), Mapping):
        hparams[DATA_KEY] = dict(obj[DATA_KEY])  # the training data's pixel scale
    return net.eval(), hparams


def is_lightning_checkpoint(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` is a Lightning checkpoint (which ``trainer.fit(ckpt_path=)`` resumes)."""
    return isinstance(obj.get("state_dict"), Mapping) and (
        CONFIG_KEY in obj or "pytorch-lightning_version" in obj
    )


# network settings that choose only the starting weights, which a checkpoint's replace
STARTING_KEYS = frozenset({"init"})


def config_changes(
    stored: Mapping[str, Any] | None,
    given: Mapping[str, Any] | None,
    ignore: frozenset[str] = STARTING_KEYS,
) -> list[str]:
    """``key: <stored> in the checkpoint, <given> now`` for each network setting the two
    configs hold differently, but those in ``ignore`` (keys an older checkpoint does not
    record are left out: they had their defaults); none when either is missing."""
    if not stored or not given:
        return []

    def same(key: str) -> bool:
        if key == "_target_":  # changecam.models.SiameseUNet is ...siamese_unet.SiameseUNet
            return target_object(stored[key]) is target_object(given[key])
        return stored[key] == given[key]

    return [
        f"{key}: {stored[key]!r} in the checkpoint, {given[key]!r} now"
        for key in sorted(set(stored) & set(given) - ignore, key=str)
        if not same(key)
    ]


def target_object(target: Any) -> Any:
    """What a ``_target_`` names (the text itself where it cannot be imported)."""
    try:
        return hydra.utils.get_object(str(target))
    except Exception:  # an unimportable target: compared as written
        return str(target)


def check_resume_checkpoint(path: str | Path, net: nn.Module) -> None:
    """The checks of :func:`read_checkpoint` for ``train.py ckpt_path=<file>``, before Lightning
    reads the file: readable, weights only, a Lightning checkpoint, finite, and fitting ``net``
    (the network the run's ``model`` config builds).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: what is wrong, with the ``model=`` overrides that fit the file.
    """
    obj, state, stored_cfg = read_network_state(path)
    if not is_lightning_checkpoint(obj):
        hint = suggest_model(state)
        raise CheckpointError(
            f"{path} is a plain state_dict, not a checkpoint written by train.py: resuming needs "
            "the optimiser and loop state of a Lightning checkpoint (<run dir>/checkpoints/"
            "last.ckpt); to start a new run from its weights use module.init_from="
            f"{path}, and a plain state_dict can be evaluated with eval.py ckpt_path=... model=..."
            + (f" ({hint})" if hint else "")
        )
    built = network_config(net) or {}
    cfg = built or {"_target_": f"{type(net).__module__}.{type(net).__qualname__}"}
    check_fits(path, cfg, net.state_dict(), state, stored_cfg)
    # the same weight shapes (checked above), another network: fusion=diff vs absdiff
    changed = config_changes(stored_cfg, built)
    if changed:
        raise CheckpointError(
            f"{path} was trained as another network than the run's model config builds, with "
            f"weights of the same shapes ({'; '.join(changed)}): resuming would go on training "
            "it as that other network; resume with the model settings it records"
        )


def mismatch_message(
    path: str | Path,
    cfg: Mapping[str, Any],
    missing: list[str],
    unexpected: list[str],
    shape_errors: list[str],
    state: Mapping[str, torch.Tensor],
    stored_cfg: Mapping[str, Any] | None = None,
) -> str:
    """Explain an architecture mismatch and suggest the ``model=`` config that fits the file."""

    def short(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    lines = [f"{path} does not fit the network {dict(cfg)}:"]
    if missing:
        lines.append(f"  missing keys: {short(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {short(unexpected)}")
    if shape_errors:
        lines.append(f"  shape mismatches: {short(shape_errors)}")
    hint = suggest_model(state, stored_cfg, cfg)
    if hint:
        lines.append(f"  a config that fits: {hint}")
    elif stored_cfg is not None:
        lines.append(
            f"  the file records the network {dict(stored_cfg)}, which no conf/model/*.yaml builds"
        )
    else:
        lines.append("  the file fits none of the networks of conf/model/*.yaml")
    return "\n".join(lines)


def suggest_model(
    state: Mapping[str, torch.Tensor],
    stored_cfg: Mapping[str, Any] | None = None,
    current: Mapping[str, Any] | None = None,
) -> str | None:
    """The ``model=<name> model.<key>=<value> ...`` overrides that fit a file, for any
    architecture of ``conf/model/*.yaml`` (see :mod:`changecam.training.model_match`).

    A changecam checkpoint's recorded config says the class; a plain state dict is matched by
    its key names and shapes (the SiameseUNet inference first: it also tells the fusion).
    ``current``: the network config that did not fit; the values it set otherwise are named.
    """
    if stored_cfg is not None and "_target_" in stored_cfg:
        match = match_config(stored_cfg)
        return match.overrides(current) if match is not None else None
    hint = suggest_siamese_unet(state)
    if hint is not None and _fits({"_target_": SIAMESE_TARGET, **hint}, state):
        return format_suggestion(hint, current)
    match, agreement = match_state(state)
    if match is None or agreement < 0.5:
        return None
    if match.fitted is not None:
        return match.overrides(current)
    if agreement == 1.0:
        return f"model={match.name} (its key names fit; set its widths, e.g. model.base_channels)"
    return (
        f"none exactly; the closest is model={match.name} ({agreement:.0%} of the key names agree)"
    )


def _fits(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> bool:
    return shapes_of(cfg) == {k: tuple(v.shape) for k, v in state.items()}


def format_suggestion(hint: Mapping[str, Any], current: Mapping[str, Any] | None = None) -> str:
    """Command-line overrides for a :func:`suggest_siamese_unet` result."""
    match = match_config({"_target_": SIAMESE_TARGET, **hint})
    if match is not None:
        text = match.overrides(current)
    elif dict(hint) == SEED_ARCHITECTURE:
        text = "model=siamese_unet_seed"
    else:  # no conf/model presets (e.g. the package installed without its configs)
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


def read_external_checkpoint(
    path: str | Path, model_cfg: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """A network changecam did not write (``model=external``), with its weights from ``path``,
    and the module hyper-parameters the file records (as :func:`read_checkpoint`).

    The file is a plain ``state_dict`` of the user's own network (also wrapped or with
    ``module.`` prefixes, see :func:`split_checkpoint`), loaded strictly into the network the
    factory builds (no hyper-parameters); a changecam checkpoint of such a wrapped network is
    read as any changecam checkpoint: its threshold and data scale are kept, and a ``model``
    config that builds another network than it records is refused.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: pickled code, no weights, NaN or infinite weights, or keys and shapes
            that do not fit (listed).
    """
    state, stored_cfg = split_checkpoint(read_weights_file(path), path)
    if stored_cfg is not None:  # train.py's checkpoint of an external network
        given = dict(model_cfg)
        stored_target, target = stored_cfg.get("target"), given.get("target")
        if stored_target != target and isinstance(stored_target, str) and isinstance(target, str):
            with contextlib.suppress(ValueError):  # one factory, spelled `a.b:make` or `a.b.make`
                if import_factory(stored_target) is import_factory(target):
                    given["target"] = stored_target
        # the declared layers and the size multiple choose what is explained and how inputs are
        # padded, not the network: other ones explain the recorded network elsewhere
        return read_checkpoint(path, given, choosing=frozenset({"layers", "size_multiple"}))
    if not state:
        raise CheckpointError(f"{path} holds no weight tensors")
    check_finite(state, path)  # as every changecam network's weights are
    wrapper = build_network(model_cfg)
    if not set(state) & set(wrapper.state_dict()):
        state = dict(own_prefix(state, wrapper.model.state_dict()))
    net = wrapper if set(state) == set(wrapper.state_dict()) else wrapper.model
    missing, unexpected, shapes = state_differences(net.state_dict(), state)
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
    return wrapper.eval(), {}
