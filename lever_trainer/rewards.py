"""Reward formulas and group normalisers (docs/algorithm.md#rewards), supplied by plugins.

The core holds no formula. Plugins contribute named raw-reward modes through the
``reward_modes`` hook and named normalisers through ``normalizers``; the loader looks
the chosen names up in the merged :class:`RewardRegistry`. Raw rewards are computed
once per candidate at load time and clipped to [-5, 5]; normalised rewards once per
query group, over the group's kept candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import LeverError, PluginError

if TYPE_CHECKING:
    from .plugins import PluginSet

#: Every raw reward is clipped to this range (docs/algorithm.md#raw-rewards).
RAW_REWARD_CLIP = 5.0


@dataclass(frozen=True)
class RewardParams:
    """Settings every reward formula and normaliser receives.

    ``hard``, ``soft``, ``rel`` are the weights ``wh``, ``ws``, ``wl`` of the raw rewards, shared
    by every formula (``--hard-weight``, ``--soft-weight``, ``--rel-weight``).
    ``options`` holds the option values of the plugins that provide the chosen mode
    and normaliser (``reward_alpha`` of the ``legacy`` mode, say): read them with
    :meth:`option`.
    """

    hard: float = 1.0
    soft: float = 1.0
    rel: float = 0.1
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        """The value of plugin option ``name`` (``default`` when absent or None)."""
        value = self.options.get(name)
        return default if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for cache keys and metadata."""
        out = asdict(self)
        out["options"] = {k: self.options[k] for k in sorted(self.options)}
        return out


#: ``fn(candidate, params) -> raw reward`` (before clipping).
RawRewardFn = Callable[[Mapping[str, Any], RewardParams], float]
#: ``fn(raw rewards of one group [n], params) -> normalised rewards [n]``.
NormalizeFn = Callable[[torch.Tensor, RewardParams], torch.Tensor]


def clip_reward(value: float) -> float:
    """Clip a raw reward to [-5, 5]."""
    return max(-RAW_REWARD_CLIP, min(RAW_REWARD_CLIP, value))


@dataclass
class RewardRegistry:
    """Named raw-reward modes and normalisers, with the plugin that provides each."""

    modes: dict[str, RawRewardFn] = field(default_factory=dict)
    normalizers: dict[str, NormalizeFn] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)

    def raw_fn(self, mode: str) -> RawRewardFn:
        """The formula of ``mode``; an unknown mode is a user error listing the known ones."""
        try:
            return self.modes[mode]
        except KeyError:
            known = ", ".join(sorted(self.modes)) or "none"
            raise LeverError(
                f"--reward-mode: no active plugin provides mode {mode!r} (available: {known})"
            ) from None

    def normalize_fn(self, method: str) -> NormalizeFn:
        """The normaliser ``method``; an unknown one is a user error listing the known ones."""
        try:
            return self.normalizers[method]
        except KeyError:
            known = ", ".join(sorted(self.normalizers)) or "none"
            raise LeverError(
                f"--normalize: no active plugin provides method {method!r} (available: {known})"
            ) from None

    def add(self, kind: str, plugin: str, entries: Mapping[str, Any]) -> None:
        """Register ``entries`` of ``kind`` ("mode" or "normalizer") from ``plugin``."""
        table: dict[str, Any] = self.modes if kind == "mode" else self.normalizers
        for name, fn in entries.items():
            if not callable(fn):
                raise PluginError(f"plugin {plugin}: {kind} {name!r} is not callable")
            other = self.providers.get(f"{kind}:{name}")
            if other is not None and other != plugin:
                raise PluginError(
                    f"plugins {other} and {plugin} both provide {kind} {name!r}; "
                    "disable one of them (--no-plugin)"
                )
            table[name] = fn
            self.providers[f"{kind}:{name}"] = plugin


def registry_from_plugins(plugins: PluginSet) -> RewardRegistry:
    """Merge the ``reward_modes`` and ``normalizers`` answers of the active plugins."""
    registry = RewardRegistry()
    for hook, kind in (("reward_modes", "mode"), ("normalizers", "normalizer")):
        for plugin, entries in plugins.call_all(hook):
            if entries is None:
                continue
            if not isinstance(entries, Mapping):
                raise PluginError(
                    f"plugin {plugin}: hook {hook} must return a mapping of name -> "
                    f"function, got {type(entries).__name__}"
                )
            registry.add(kind, plugin, entries)
    return registry
