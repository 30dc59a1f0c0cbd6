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


# ------------------------------------------------- declarations, registries, discovery
class Declares:
    """A plugin that says what it is through the ``about`` hook, with two policies."""

    def __init__(self, chooses: str = "", policy: str = "tiny") -> None:
        self.chooses, self.policy = chooses, policy

    @hookimpl
    def about(self) -> Any:
        from lever_trainer.api import About

        return About(description="declared", enable_flags=("--use_it",), chooses=self.chooses)

    @hookimpl
    def policies(self) -> dict[str, Any]:
        def fails(input_dim: int, options: Any) -> Any:
            raise ValueError(f"no policy of width {input_dim}")

        return {self.policy: lambda input_dim, options: None, f"{self.policy}-2": fails}


def test_about_and_policies_are_read_from_the_hooks() -> None:
    info = describe_object("decl", Declares())
    assert not info.broken, info.error
    assert (info.description, info.enabled_by_default) == ("declared", False)
    assert info.enable_flags == ("--use_it",) and info.policies == ("tiny", "tiny-2")
    assert "about" not in info.hooks and "policies" in info.hooks


def test_an_about_answer_of_the_wrong_type_marks_the_plugin_broken() -> None:
    class Wrong:
        @hookimpl
        def about(self) -> Any:
            return {"description": "a dict"}

    info = describe_object("wrong", Wrong())
    assert info.error == "about failed: TypeError: returned dict, expected lever_trainer.api.About"


def test_legacy_module_attributes_still_declare_a_plugin() -> None:
    info = describe_object("old", Answers("rce", "X", default=True))
    assert info.enabled_by_default is True and not info.broken


def test_two_plugins_choosing_the_same_thing_are_refused_by_name() -> None:
    a = describe_object("a", Declares(chooses="the RCE reward"))
    b = describe_object("b", Declares(chooses="the RCE reward"))
    # one of them, or both only on by default: nothing to refuse
    assert [p.name for p in select_active([a, b], enable=["a"])] == ["a"]
    with pytest.raises(LeverError) as err:
        select_active([a, b], enable=["a", "b"])
    assert str(err.value) == (
        "--plugin a or --use_it and --plugin b or --use_it both choose the RCE reward; "
        "give only one"
    )


def test_two_plugins_providing_one_policy_name_are_an_error_naming_both() -> None:
    from lever_trainer.policies import build_policy

    ps = plugin_set(("p1", Declares()), ("p2", Declares()))  # asked last-registered first
    with pytest.raises(PluginError, match="plugins p2 and p1 both provide policy 'tiny'"):
        build_policy(ps, "tiny", 4, {})


def test_a_builder_that_returns_no_policy_is_named() -> None:
    from lever_trainer.policies import build_policy

    ps = plugin_set(("p1", Declares()))
    with pytest.raises(PluginError, match="plugin p1: policy 'tiny' was built as NoneType"):
        build_policy(ps, "tiny", 4, {})
    with pytest.raises(PluginError) as err:
        build_policy(ps, "tiny-2", 4, {})
    assert str(err.value) == (
        "plugin p1 failed building policy 'tiny-2': ValueError: no policy of width 4"
    )


def test_a_training_run_discovers_the_plugins_once(
    cli: Any, demo_files: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lever_trainer import plugins
    from lever_trainer.cli import installed_plugins

    scans: list[int] = []
    real = plugins._scan

    def counted() -> Any:
        scans.append(1)
        return real()

    monkeypatch.setattr(plugins, "_scan", counted)
    plugins.reset_discovery()
    installed_plugins.cache_clear()
    args = ["--beam-data", demo_files[0], "--img-emb", demo_files[1], "--hidden-dim", "8"]
    result = cli(*args, "--output-dir", tmp_path / "out", "--rce-epochs", "1")
    assert result.exit_code == 0, result.output
    assert len(scans) == 1
    # what a test that installs a plugin meanwhile needs: a reset looks again
    plugins.reset_discovery()
    assert discover() and len(scans) == 2


def test_alias_flags_are_read_under_their_option_name_and_as_older_runs_recorded_them() -> None:
    from lever_trainer.plugins import alias_choices, alias_dest

    info = describe_object("decl", Declares())
    assert alias_dest("--use_it") == "plugin_flag_use_it"
    assert alias_choices([info], {"plugin_flag_use_it": True}) == (["decl"], [])
    # a run_config.json written when the flag was a core option records it as "use_it"
    assert alias_choices([info], {"use_it": True}) == (["decl"], [])
    assert alias_choices([info], {"use_it": False}) == ([], [])


def test_a_policy_plugin_written_before_the_policies_hook_still_builds() -> None:
    from lever_trainer.api import TrunkConfig
    from lever_trainer.policies import build_policy, known_policies
    from lever_trainer_plugins.pointer import PointerPolicy

    class OldPolicyPlugin:
        POLICIES = ("old-pointer",)

        @hookimpl
        def build_policy(self, name: str, input_dim: int, options: Any) -> Any:
            if name != "old-pointer":
                return None
            return PointerPolicy(TrunkConfig.from_options(input_dim, {"hidden_dim": 8}))

    ps = plugin_set(("old", OldPolicyPlugin()))
    assert known_policies(ps) == ["old-pointer"]
    policy = build_policy(ps, "old-pointer", 4, {})
    assert isinstance(policy, PointerPolicy) and policy.input_dim == 4
    with pytest.raises(LeverError, match=r"no active plugin builds policy 'new' \(available: old-"):
        build_policy(ps, "new", 4, {})
