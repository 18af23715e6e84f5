"""What a change network offers the rest of changecam: the one definition.

A change network is an ``nn.Module`` with ``forward(pre, post) -> logits`` (B×1×H×W, no
sigmoid). Subclassing :class:`ChangeNetwork` gives it the three things the other packages use:

* :attr:`ChangeNetwork.size_multiple`: input sides must be a multiple of it (``2**depth`` for a
  U-Net); :func:`size_multiple` reads it from any module (1 for modules that do not say);
* :meth:`ChangeNetwork.config`: its constructor call as a Hydra config (``_target_`` plus the
  arguments it was built with, recorded automatically), which checkpoints store so eval,
  predict, explain and the background CAM process rebuild it with :func:`build_network`;
* its taps: named :class:`~changecam.models.taps.Tap` modules, found with
  :func:`~changecam.models.taps.find_taps`.

A network written elsewhere works too if it holds taps; it only lacks the automatic config.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import hydra
from torch import Tensor, nn


class ChangeNetwork(nn.Module):
    """Base class of changecam's change networks.

    Subclasses set :attr:`size_multiple` (a class attribute or, when it depends on the
    arguments, an instance attribute or property). The arguments of the most derived
    ``__init__`` are recorded as they were passed (defaults filled in), so :meth:`config` is
    never a hand-kept copy of the signature.
    """

    size_multiple: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: ChangeNetwork, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            # A subclass's constructor finishes after the ones it calls: its arguments win.
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            arguments: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:  # after self
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)  # **kwargs: each is a keyword of the config
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        raise TypeError(
                            f"{cls.__qualname__} was given {len(value)} extra positional "
                            f"argument(s) for *{name}, which its config (what checkpoints "
                            "record to rebuild it) cannot name; pass them as keywords"
                        )
                else:
                    arguments[name] = value
            object.__setattr__(self, "_init_arguments", arguments)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments this network was built with."""
        return dict(getattr(self, "_init_arguments", {}))

    def check_inputs(self, pre: Tensor, post: Tensor, divisor: str | None = None) -> None:
        """Raise :class:`ValueError` unless ``pre`` and ``post`` are both
        B × ``self.in_channels`` × H × W with sides divisible by :attr:`size_multiple`.

        Args:
            pre: first-date images.
            post: second-date images.
            divisor: how the size multiple reads in the message (default: its value), e.g.
                ``"2**depth = 16"``.
        """
        if pre.shape != post.shape:
            raise ValueError(
                f"pre and post must have the same shape, got {tuple(pre.shape)} and {tuple(post.shape)}"
            )
        in_channels = getattr(self, "in_channels", None)
        if pre.ndim != 4 or (in_channels is not None and pre.shape[1] != in_channels):
            raise ValueError(f"expected inputs B x {in_channels} x H x W, got {tuple(pre.shape)}")
        factor = size_multiple(self)
        if pre.shape[-2] % factor or pre.shape[-1] % factor:
            raise ValueError(
                f"input size {tuple(pre.shape[-2:])} must be divisible by {divisor or factor}; "
                "use sliding-window prediction or pad the images"
            )

    def config(self) -> dict[str, Any]:
        """A Hydra-instantiable description: ``{"_target_": "<module>.<class>", **init_kwargs}``."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            **self.init_kwargs,
        }


def size_multiple(net: nn.Module) -> int:
    """The factor that input heights and widths of ``net`` must be divisible by (default 1)."""
    value = getattr(net, "size_multiple", 1)
    return int(value) if isinstance(value, int) and value >= 1 else 1


def network_config(net: nn.Module) -> dict[str, Any] | None:
    """The config a checkpoint records for ``net``, or ``None`` if it cannot describe itself."""
    return net.config() if isinstance(net, ChangeNetwork) else None


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a network from its config (as :meth:`ChangeNetwork.config` returns it)."""
    if "_target_" not in config:
        raise ValueError(f"a network config needs a _target_; got keys {sorted(config)}")
    return hydra.utils.instantiate(dict(config))


__all__ = ["ChangeNetwork", "build_network", "network_config", "size_multiple"]
