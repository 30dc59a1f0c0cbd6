"""Finding, activating and calling plugins.

Plugins are found through the ``lever_trainer`` entry-point group, the same door
for built-in and third-party packages. Discovery is not activation: a run uses the
plugins that are on by default plus those named with ``--plugin``, minus those
named with ``--no-plugin``. Hooks are called through :class:`PluginSet`, which
attributes every answer and every exception to the plugin that produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import entrypoints, hookspecs
from .errors import Interrupted, LeverError, PluginError
from .options import Option
from .state import About

ENTRY_POINT_GROUP = entrypoints.ENTRY_POINT_GROUP
#: Set to 1 to ignore installed plugins entirely (only ``extra`` objects register).
DISABLE_AUTOLOAD_ENV = entrypoints.DISABLE_AUTOLOAD_ENV


@dataclass
class PluginInfo:
    """One installed plugin, as ``lever-train plugins`` lists it."""

    name: str
    distribution: str | None
    version: str | None
    obj: Any = None
    error: str | None = None
    enabled_by_default: bool = False
    description: str = ""
    hooks: list[str] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    #: The plugin could not be imported (a missing dependency, say), as opposed to one
    #: that imported but whose hooks or options are wrong.
    import_failed: bool = False
    #: Two installed distributions register a plugin under this name: neither is used.
    clash: bool = False
    #: Flags (``ENABLE_FLAGS`` / ``DISABLE_FLAGS``) that mean ``--plugin NAME`` /
    #: ``--no-plugin NAME``: the spellings of the script a plugin replaces.
    enable_flags: tuple[str, ...] = ()
    disable_flags: tuple[str, ...] = ()
    #: What the plugin chooses (``About.chooses``): two plugins asked for by name that
    #: choose the same thing are refused before the run starts.
    chooses: str = ""
    #: The policy names the plugin builds (the keys of its ``policies`` answer).
    policies: tuple[str, ...] = ()

    @property
    def broken(self) -> bool:
        """True when the plugin failed to import or to register."""
        return self.error is not None


def _impl_names(obj: Any) -> list[str]:
    """Names of the attributes of ``obj`` marked with ``@hookimpl``."""
    marker = f"{hookspecs.PROJECT}_impl"
    out = []
    for name in dir(obj):
        try:
            value = getattr(obj, name, None)
        except Exception:  # a property that raises is no hook implementation
            continue
        if callable(value) and hasattr(value, marker):
            out.append(name)
    return sorted(out)


def _spec_args(hook: str) -> list[str]:
    return list(inspect.signature(getattr(hookspecs, hook)).parameters)


def check_hookimpls(obj: Any) -> str | None:
    """Why ``obj``'s hook implementations cannot work (None when they can).

    An implementation whose name is no hook (a misspelling would never be called) and
    one that asks for an argument its hook does not pass are errors, as in pluggy's
    ``check_pending``.
    """
    known = hookspecs.all_hook_names()
    for name in _impl_names(obj):
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            return f"hook implementation {name!r} matches no hook{hint}"
        try:
            params = inspect.signature(getattr(obj, name)).parameters
        except (TypeError, ValueError):
            continue
        passed = _spec_args(name)
        for arg, param in params.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if arg not in passed and param.default is param.empty:
                return (
                    f"hook {name} asks for argument {arg!r}, which the hook does not pass "
                    f"(it passes: {', '.join(passed) or 'nothing'})"
                )
    return None


def call_unregistered(obj: Any, hook: str) -> Any:
    """The answer of ``obj``'s implementation of a no-argument ``hook`` (None when it has
    none): how the hooks asked of every installed plugin, active or not (``about``,
    ``add_options``), are called before a run's :class:`PluginSet` exists."""
    fn = getattr(obj, hook, None)
    if fn is None or not hasattr(fn, f"{hookspecs.PROJECT}_impl"):
        return None
    return fn()


def _declared_options(obj: Any) -> list[Option]:
    declared = call_unregistered(obj, "add_options")
    if declared is None:
        return []
    options = list(declared)
    for option in options:
        if not isinstance(option, Option):
            raise TypeError(f"add_options returned {type(option).__name__}, expected Option")
    return options


#: The module attributes a plugin declared itself with before the ``about`` hook (still
#: read, for plugins written then): ``About`` field -> attribute.
LEGACY_ATTRIBUTES = {
    "description": "DESCRIPTION",
    "enabled_by_default": "ENABLED_BY_DEFAULT",
    "enable_flags": "ENABLE_FLAGS",
    "disable_flags": "DISABLE_FLAGS",
}


def _about(obj: Any) -> About:
    """What ``obj`` declares of itself: its ``about`` answer, else its older module
    attributes (``DESCRIPTION``, ``ENABLED_BY_DEFAULT``, ``ENABLE_FLAGS``,
    ``DISABLE_FLAGS``), else nothing."""
    answer = call_unregistered(obj, "about")
    if answer is not None:
        if not isinstance(answer, About):
            raise TypeError(f"returned {type(answer).__name__}, expected lever_trainer.api.About")
        return answer
    found = {
        field: getattr(obj, attr) for field, attr in LEGACY_ATTRIBUTES.items() if hasattr(obj, attr)
    }
    found["description"] = str(found.get("description", ""))
    found["enabled_by_default"] = bool(found.get("enabled_by_default", False))
    return About(**found)


def _policy_names(obj: Any) -> tuple[str, ...]:
    """The policies ``obj`` builds: its ``policies`` answer's names (or, for a plugin
    written before that hook, its ``POLICIES`` attribute)."""
    answer = call_unregistered(obj, "policies")
    if answer is None:
        return tuple(str(n) for n in getattr(obj, "POLICIES", ()))
    if not isinstance(answer, Mapping):
        raise TypeError(f"returned {type(answer).__name__}, expected {{name: builder}}")
    return tuple(str(n) for n in answer)


def _apply_about(info: PluginInfo, about: About) -> None:
    info.description = about.description or info.description
    info.enabled_by_default = about.enabled_by_default
    info.enable_flags, info.disable_flags = about.enable_flags, about.disable_flags
    info.chooses = about.chooses


def describe_object(
    name: str, obj: Any, distribution: str | None = None, version: str | None = None
) -> PluginInfo:
    """Build the :class:`PluginInfo` of an already imported plugin object.

    The plugin is checked here (its hook implementations, what it says of itself, its
    options), so a broken plugin is reported by ``lever-train plugins`` and named when a
    run would use it.
    """
    info = PluginInfo(
        name=name,
        distribution=distribution,
        version=version,
        obj=obj,
        description=(obj.__doc__ or "").strip().split("\n")[0],
        # ``about`` says what the plugin is; the list is of what it does
        hooks=[n for n in _impl_names(obj) if n in hookspecs.all_hook_names() and n != "about"],
    )
    info.error = check_hookimpls(obj)
    if info.error is not None:
        return info
    steps: list[tuple[str, Callable[[], None]]] = [
        ("about", lambda: _apply_about(info, _about(obj))),
        ("policies", lambda: setattr(info, "policies", _policy_names(obj))),
        ("add_options", lambda: setattr(info, "options", _declared_options(obj))),
    ]
    for hook, step in steps:
        try:
            step()
        except Exception as exc:
            info.error = f"{hook} failed: {type(exc).__name__}: {exc}"
            break
    return info


def check_option_conflicts(plugins: Sequence[PluginInfo]) -> None:
    """Mark a plugin broken when it declares a flag or ``dest`` another plugin declared first."""
    owners: dict[str, str] = {}
    for info in plugins:
        if info.broken:
            continue
        for option in info.options:
            for key in (*option.flags, f"dest:{option.dest}"):
                other = owners.get(key)
                if other is not None and other != info.name:
                    what = f"option {key[5:]!r}" if key.startswith("dest:") else key
                    info.error = f"declares {what}, which plugin {other} also declares"
                    info.options = []
                    break
            if info.broken:
                break
        if not info.broken:
            for option in info.options:
                for key in (*option.flags, f"dest:{option.dest}"):
                    owners[key] = info.name


#: Discovery's findings, by the ``sys.path`` they were found on (see :func:`discover`).
_DISCOVERED: dict[tuple[str, ...], tuple[PluginInfo, ...]] = {}


def reset_discovery() -> None:
    """Forget what :func:`discover` found, so the next call looks again (for tests that
    install or remove a plugin while the process runs)."""
    _DISCOVERED.clear()


def discover() -> list[PluginInfo]:
    """Every plugin installed under the entry-point group; broken ones carry ``error``.

    The entry points are read and the plugins imported once per process (per
    ``sys.path``: a directory put on it may hold more); each call returns fresh
    :class:`PluginInfo` copies that the caller may change."""
    if entrypoints.autoload_disabled():
        return []
    key = tuple(sys.path)
    if key not in _DISCOVERED:
        _DISCOVERED[key] = tuple(_scan())
    return [dataclasses.replace(p, options=list(p.options)) for p in _DISCOVERED[key]]


def _scan() -> list[PluginInfo]:
    found: dict[str, PluginInfo] = {}
    for item in entrypoints.installed():
        ep, dist_name, version = item.entry_point, item.distribution, item.version
        if ep.name in found:
            # The same distribution seen twice on sys.path is harmless; two
            # distributions claiming one name is not.
            if found[ep.name].distribution != dist_name:
                first = found[ep.name]
                first.error = (
                    f"plugin name {ep.name!r} is claimed by two installed distributions, "
                    f"{first.distribution} {first.version or ''} and {dist_name} "
                    f"{version or ''}; lever-train uses neither: uninstall one of them "
                    "(pip uninstall NAME)"
                ).replace("  ", " ")
                first.clash, first.import_failed = True, False
                try:  # a run that would use either of them must hear of the clash
                    other_default = _about(ep.load()).enabled_by_default
                except Exception:
                    other_default = False
                first.enabled_by_default = first.enabled_by_default or other_default
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            found[ep.name] = PluginInfo(
                ep.name,
                dist_name,
                version,
                error=f"{type(exc).__name__}: {exc}",
                import_failed=True,
            )
            continue
        found[ep.name] = describe_object(ep.name, obj, dist_name, version)
    plugins = sorted(found.values(), key=lambda p: p.name)
    check_option_conflicts(plugins)
    return plugins


def implementers(hook: str) -> list[str]:
    """The installed plugins (working ones) that implement ``hook``: what to suggest when
    no active plugin answers it."""
    return [p.name for p in discover() if not p.broken and hook in p.hooks]


#: How the option names of plugins' alias flags begin (see :func:`alias_dest`).
ALIAS_PREFIX = "plugin_flag_"


def alias_dest(flag: str) -> str:
    """The option name under which a plugin's alias flag is parsed and recorded."""
    return ALIAS_PREFIX + flag.lstrip("-").replace("-", "_")


def alias_choices(plugins: Sequence[PluginInfo], opts: Any) -> tuple[list[str], list[str]]:
    """``(enable, disable)``: the plugins whose alias flags are set in ``opts``."""
    enable: list[str] = []
    disable: list[str] = []

    def given(flag: str) -> bool:
        # runs recorded before a flag became a plugin's alias hold it under its own name
        return bool(opts.get(alias_dest(flag)) or opts.get(flag.lstrip("-").replace("-", "_")))

    for info in plugins:
        if any(given(f) for f in info.enable_flags):
            enable.append(info.name)
        if any(given(f) for f in info.disable_flags):
            disable.append(info.name)
    return enable, disable


@dataclass(frozen=True)
class Decision:
    """The answer of a single-answer hook and where it came from."""

    value: Any
    plugin: str
    origin: str  # "default", "explicit" or "plugin"

    @property
    def label(self) -> str:
        """``default``, ``explicit`` or ``plugin NAME``, as printed in the run's log."""
        return f"plugin {self.plugin}" if self.origin == "plugin" else self.origin


class PluginSet:
    """The active plugins of one run, registered with a pluggy manager."""

    def __init__(self, active: Sequence[PluginInfo], explicit: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.active = list(active)
        self.explicit = set(explicit)
        self.current_plugin: str | None = None
        #: During (and after a failure of) a broadcast call: the plugin being called and
        #: those after it, in call order.
        self.unfinished: list[str] = []
        self._by_obj: dict[int, PluginInfo] = {}
        for info in self.active:
            problem = info.error or check_hookimpls(info.obj)
            if problem is not None:
                raise PluginError(f"plugin {info.name}: {problem}")
            try:
                self.pm.register(info.obj, name=info.name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(
                    f"plugin {info.name}: invalid hook implementation ({exc})"
                ) from None
            self._by_obj[id(info.obj)] = info
        for hook_name in hookspecs.all_hook_names():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.hookwrapper or impl.wrapper:
                    raise PluginError(
                        f"plugin {impl.plugin_name}: hook {hook_name} is a wrapper;"
                        " lever_trainer hooks do not support wrappers"
                    )

    @property
    def names(self) -> list[str]:
        """Names of the active plugins."""
        return [p.name for p in self.active]

    def versions(self) -> dict[str, str]:
        """``{plugin name: "distribution version"}`` of the active plugins, for checkpoints."""
        return {p.name: f"{p.distribution or '-'} {p.version or '-'}" for p in self.active}

    def options(self) -> dict[str, tuple[str, Option]]:
        """``{dest: (plugin, option)}`` for every option the active plugins declare."""
        return {o.dest: (p.name, o) for p in self.active for o in p.options}

    def option_defaults(self) -> dict[str, Any]:
        """``{dest: default}`` of every option the active plugins declare."""
        return {dest: option.default for dest, (_, option) in self.options().items()}

    @contextmanager
    def _calling(self, plugin: str) -> Iterator[None]:
        outer, self.current_plugin = self.current_plugin, plugin
        try:
            yield
        finally:
            self.current_plugin = outer

    def _answers(
        self, hook_name: str, kwargs: dict[str, Any], only: Collection[str] | None = None
    ) -> list[tuple[str, Any]]:
        out = []
        # pluggy calls implementations last-registered first; keep its order.
        impls = [
            impl
            for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls())
            if only is None or impl.plugin_name in only
        ]
        for i, impl in enumerate(impls):
            args = {a: kwargs[a] for a in impl.argnames}
            # the plugins that will not have answered if this one fails
            self.unfinished = [m.plugin_name for m in impls[i:]]
            try:
                with self._calling(impl.plugin_name):
                    result = impl.function(**args)
            except (LeverError, Interrupted):
                raise
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # exiting is failing
                raise PluginError(
                    f"plugin {impl.plugin_name} failed in hook {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            out.append((impl.plugin_name, result))
        return out

    def call_all(
        self, hook_name: str, *, only: Collection[str] | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Call a broadcast hook on every active plugin (or on those named in ``only``);
        returns ``(plugin, result)`` pairs, in call order."""
        if hook_name in hookspecs.single_answer_hooks():
            raise ValueError(f"hook {hook_name} takes a single answer: use call_single")
        return self._answers(hook_name, kwargs, only)

    def state_dict(self, state: Any) -> dict[str, Any]:
        """``{plugin: state}``: the ``plugin_state_dict`` answers that are not None."""
        answers = self.call_all("plugin_state_dict", state=state)
        return {name: value for name, value in answers if value is not None}

    def load_state_dict(self, saved: Mapping[str, Any], state: Any) -> None:
        """Hand each active plugin what :meth:`state_dict` kept of it
        (``load_plugin_state``); the state of a plugin not active now is skipped, with a
        warning in the run's log."""
        for name, value in saved.items():
            if name not in self.names:
                state.log(
                    f"warning: the snapshot holds a state of plugin {name}, which is "
                    "not active in this run"
                )
                continue
            self.call_all("load_plugin_state", only=[name], state=state, saved=value)

    def call_single(self, hook_name: str, **kwargs: Any) -> Decision | None:
        """Call a single-answer hook and resolve who decides (see :mod:`hookspecs`)."""
        if hook_name not in hookspecs.single_answer_hooks():
            raise ValueError(f"hook {hook_name} is not a single-answer (firstresult) hook")
        answers = [(n, v) for n, v in self._answers(hook_name, kwargs) if v is not None]
        if not answers:
            return None
        if len(answers) > 1:
            explicit = [(n, v) for n, v in answers if n in self.explicit]
            if len(explicit) != 1:
                tied = explicit or answers
                names = " and ".join(n for n, _ in tied)
                what = f" for phase {kwargs['phase']!r}" if "phase" in kwargs else ""
                raise PluginError(
                    f"plugins {names} both answer hook {hook_name}{what}; "
                    "enable only one of them (--plugin / --no-plugin)"
                )
            answers = explicit
        name, value = answers[0]
        info = next(p for p in self.active if p.name == name)
        if not info.enabled_by_default:
            origin = "plugin"
        else:
            origin = "explicit" if name in self.explicit else "default"
        return Decision(value, name, origin)


def check_choices(asked: Sequence[PluginInfo]) -> None:
    """Refuse two plugins asked for by name that choose the same thing (``About.chooses``)."""
    seen: dict[str, PluginInfo] = {}
    for info in asked:
        if not info.chooses:
            continue
        first = seen.setdefault(info.chooses, info)
        if first is not info:
            a, b = (" or ".join([f"--plugin {p.name}", *p.enable_flags]) for p in (first, info))
            raise LeverError(f"{a} and {b} both choose {info.chooses}; give only one")


def select_active(
    installed: Sequence[PluginInfo],
    enable: Sequence[str] = (),
    disable: Sequence[str] = (),
    warn: Any = None,
) -> list[PluginInfo]:
    """Defaults plus ``enable`` minus ``disable``; unknown or broken names are errors."""
    by_name = {p.name: p for p in installed}
    known = ", ".join(sorted(by_name)) or "none installed"
    for flag, names in (("--plugin", enable), ("--no-plugin", disable)):
        for n in names:
            if n not in by_name:
                raise LeverError(f"{flag}: unknown plugin {n!r} (installed: {known})")
    both = sorted(set(enable) & set(disable))
    if both:
        raise LeverError(f"--plugin and --no-plugin both name {both[0]!r}")
    check_choices([by_name[n] for n in dict.fromkeys(enable)])
    active = []
    for p in installed:
        wanted = p.name in enable or (p.enabled_by_default and p.name not in disable)
        if not wanted:
            continue
        if p.clash:
            raise PluginError(f"plugin {p.name}: {p.error}")
        if p.broken and not p.import_failed:
            # imported, but its hooks or options are wrong: never run it quietly without
            dist = f" (from {p.distribution} {p.version})" if p.distribution else ""
            raise PluginError(
                f"plugin {p.name}{dist}: {p.error}; fix it or run without it (--no-plugin {p.name})"
            )
        if p.broken:
            if p.name in enable:
                raise LeverError(f"--plugin: plugin {p.name!r} is broken: {p.error}")
            if warn is not None:
                warn(f"warning: skipping broken plugin {p.name!r}: {p.error}")
            continue
        active.append(p)
    return active


def load_plugins(
    enable: Sequence[str] = (),
    disable: Sequence[str] = (),
    extra: Sequence[tuple[str, ModuleType | object]] = (),
    warn: Any = None,
) -> PluginSet:
    """Discover installed plugins, add ``extra`` (name, object) pairs, activate and register."""
    installed = discover()
    taken = {p.name for p in installed}
    for name, _ in extra:
        if name in taken:
            raise PluginError(f"plugin name {name!r} is already taken by an installed plugin")
        taken.add(name)
    installed += [describe_object(n, obj) for n, obj in extra]
    check_option_conflicts(installed)
    active = select_active(installed, enable, disable, warn)
    return PluginSet(active, explicit=enable)
