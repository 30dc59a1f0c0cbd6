"""Plugin discovery, activation and hook calling (ARCHITECTURE rules 2-6)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

from lever_trainer import RewardChoice, hookimpl, hookspecs
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.plugins import PluginSet, describe_object, discover, load_plugins, select_active

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {
    "raw-reward": True,
    "normalized-reward": False,
    "grpo-normalized-reward": True,
    "freeze-backbone": False,
    "adaptive-kl": True,
    "console-log": True,
    "metrics-jsonl": True,
}


class Answers:
    """A plugin whose select_reward answers one phase with a fixed label."""

    def __init__(self, phase: str, label: str, default: bool = False) -> None:
        self.phase, self.label = phase, label
        self.ENABLED_BY_DEFAULT = default

    @hookimpl
    def select_reward(self, phase: str) -> RewardChoice | None:  # a subset of the spec's args
        if phase != self.phase:
            return None
        return RewardChoice.from_batch_field(self.label, self.label, "rewards_raw")


class Raises:
    @hookimpl
    def on_phase_start(self, state: Any) -> None:
        raise ValueError("boom")


def plugin_set(*named: tuple[str, Any], explicit: tuple[str, ...] = ()) -> PluginSet:
    return PluginSet([describe_object(n, obj) for n, obj in named], explicit=explicit)


def test_builtin_plugins_are_discovered_through_entry_points() -> None:
    found = {p.name: p for p in discover()}
    for name, default in BUILTINS.items():
        assert name in found, name
        assert found[name].enabled_by_default is default, name
        assert found[name].distribution == "lever-trainer"
        assert not found[name].broken
    assert found["freeze-backbone"].hooks == ["configure_trainable_params", "on_train_start"]
    assert found["raw-reward"].hooks == ["select_reward"]


def test_core_never_imports_builtin_plugins() -> None:
    for path in (ROOT / "lever_trainer").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("lever_trainer_plugins") for n in names), path


def test_every_hook_is_documented() -> None:
    names = hookspecs.all_hook_names()
    assert {
        "select_reward",
        "configure_trainable_params",
        "on_phase_start",
        "on_phase_end",
        "on_epoch_end",
        "adapt_kl_beta",
    } <= set(names)
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 40, f"hook {name} needs a docstring saying when it is called"
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for name in names:
        assert f"`{name}`" in guide, f"docs/plugins.md does not mention hook {name}"


def test_single_answer_from_default_plugin_is_labelled_default() -> None:
    ps = plugin_set(("a", Answers("rce", "A", default=True)))
    decision = ps.call_single("select_reward", state=None, phase="rce")
    assert decision is not None and decision.label == "default" and decision.plugin == "a"
    assert ps.call_single("select_reward", state=None, phase="grpo") is None


def test_explicit_plugin_overrides_default_and_is_named() -> None:
    ps = plugin_set(
        ("a", Answers("rce", "A", default=True)), ("b", Answers("rce", "B")), explicit=("b",)
    )
    decision = ps.call_single("select_reward", state=None, phase="rce")
    assert decision is not None and decision.value.name == "B"
    assert decision.label == "plugin b"


def test_default_plugin_asked_for_explicitly_is_labelled_explicit() -> None:
    ps = plugin_set(("a", Answers("rce", "A", default=True)), explicit=("a",))
    decision = ps.call_single("select_reward", state=None, phase="rce")
    assert decision is not None and decision.label == "explicit"


@pytest.mark.parametrize("explicit", [(), ("a", "b")])
def test_two_answers_of_equal_standing_name_both(explicit: tuple[str, ...]) -> None:
    ps = plugin_set(("a", Answers("rce", "A")), ("b", Answers("rce", "B")), explicit=explicit)
    with pytest.raises(
        PluginError,
        match=r"plugins (a and b|b and a) both answer hook select_reward for phase 'rce'",
    ):
        ps.call_single("select_reward", state=None, phase="rce")


def test_exception_in_hook_names_plugin_and_hook() -> None:
    ps = plugin_set(("exploder", Raises()))
    with pytest.raises(
        PluginError, match=r"plugin exploder failed in hook on_phase_start: ValueError: boom"
    ):
        ps.call_all("on_phase_start", state=None)


def test_wrappers_are_refused() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def on_phase_start(self, state: Any) -> Any:
            return (yield)

    with pytest.raises(PluginError, match="wrapper"):
        plugin_set(("w", Wrapper()))


def test_unknown_and_conflicting_plugin_flags() -> None:
    installed = [describe_object("x", Answers("rce", "X"))]
    with pytest.raises(LeverError, match=r"--plugin: unknown plugin 'nope' \(installed: x\)"):
        select_active(installed, enable=["nope"])
    with pytest.raises(LeverError, match="--no-plugin: unknown plugin 'nope'"):
        select_active(installed, disable=["nope"])
    with pytest.raises(LeverError, match="both name 'x'"):
        select_active(installed, enable=["x"], disable=["x"])


def test_activation_defaults_plus_enabled_minus_disabled() -> None:
    installed = [
        describe_object("on", Answers("rce", "1", default=True)),
        describe_object("off", Answers("grpo", "2")),
    ]
    assert [p.name for p in select_active(installed)] == ["on"]
    assert [p.name for p in select_active(installed, enable=["off"])] == ["on", "off"]
    assert [p.name for p in select_active(installed, disable=["on"])] == []


def test_broken_default_plugin_is_skipped_with_warning_and_refused_when_asked() -> None:
    broken = describe_object("bad", object())
    broken.enabled_by_default, broken.error = True, "ImportError: no module named zzz"
    broken.import_failed = True  # a plugin that failed to import (not one with bad hooks)
    warnings: list[str] = []
    assert select_active([broken], warn=warnings.append) == []
    assert "bad" in warnings[0] and "zzz" in warnings[0]
    with pytest.raises(LeverError, match="plugin 'bad' is broken: ImportError"):
        select_active([broken], enable=["bad"])


def test_autoload_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEVER_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert discover() == []
    ps = load_plugins(extra=[("mine", Answers("rce", "M"))], enable=["mine"])
    assert ps.names == ["mine"]


def test_freeze_backbone_on_a_policy_without_one_warns_and_freezes_nothing() -> None:
    from types import SimpleNamespace

    from lever_trainer_plugins import freeze_backbone
    from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

    lines: list[str] = []
    model = CosineBilinearPolicy(4, 2, 0.1, "reverse")
    state = SimpleNamespace(phase="grpo", log=lines.append)
    freeze_backbone.configure_trainable_params(state, model)  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())
    assert lines == [
        "warning: freeze-backbone: policy cosine-bilinear has no backbone "
        "(no backbone_modules); nothing is frozen"
    ]
