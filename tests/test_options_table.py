"""One table of options: every command's flags come from it, and an option that two
commands share means the same in both (same record, same default, same help)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import click
import pytest

from lever_trainer.coreoptions import CORE_OPTIONS, DEFAULT_POLICY, TABLE_COMMANDS, options_of
from lever_trainer.options import Option

#: Flags that name a different option in different commands, on purpose: each is two
#: records with disjoint commands. ``--output`` (and ``-o``) is what a command writes (select's picks,
#: evaluate's report, plot's picture, export-verdicts' RL data); ``--shots`` defaults to
#: the checkpoint's S in select but to the data's in evaluate; ``--batch-size`` is queries
#: per optimiser step in training but per forward pass in select/evaluate; ``--beam-data``
#: is an alias of ``--queries`` there, which reads more formats than training's RL data;
#: demo-data's ``--queries`` and ``--seed`` are the size and seed of the dataset it makes;
#: export-verdicts' ``--judge`` names the environment whose stored verdicts it writes (no
#: judging); convert-checkpoint's ``--num-heads`` is only recorded in the metadata and its
#: ``--overwrite`` replaces one file, not a run's directory. In collect, ``--img-emb`` is
#: optional (only --cosine and --beam-candidates need it), ``--shots`` defaults to 2 and
#: ``--seed`` seeds the --random draws.
PER_COMMAND = {
    "--output",
    "--shots",
    "--batch-size",
    "--batch_size",
    "--beam-data",
    "--beam_data",
    "--queries",
    "--seed",
    "--judge",
    "--num-heads",
    "--overwrite",
    "--img-emb",
    "-o",
}


def records_by_flag() -> dict[str, list[Option]]:
    found: dict[str, list[Option]] = defaultdict(list)
    for option in CORE_OPTIONS:
        for flag in option.flags:
            found[flag].append(option)
    return found


def test_a_dest_names_one_record_within_each_command() -> None:
    for command in TABLE_COMMANDS:
        dests = [o.dest for o in options_of(command)]
        assert len(dests) == len(set(dests)), command
        flags = [f for o in options_of(command) for f in o.flags]
        assert len(flags) == len(set(flags)), command


def test_a_flag_shared_by_commands_is_one_record_in_the_table() -> None:
    shared = 0
    for flag, records in records_by_flag().items():
        if len(records) > 1:
            assert flag in PER_COMMAND, f"{flag} has {len(records)} records"
            commands = [c for r in records for c in r.commands]
            assert len(commands) == len(set(commands)), f"{flag}: two records in one command"
        elif len(records[0].commands) > 1:
            shared += 1
    assert shared >= 20  # data, rewards, embeddings, judge, plugins, device, ...


def built_commands() -> dict[str, click.Command]:
    from lever_trainer.cli import main

    with click.Context(main, info_name="lever-train") as ctx:
        return {name: main.get_command(ctx, name) for name in TABLE_COMMANDS}  # type: ignore[misc]


def test_every_command_with_options_takes_them_from_the_table() -> None:
    from lever_trainer.cli import main

    with click.Context(main, info_name="lever-train") as ctx:
        for name in main.list_commands(ctx):
            command = main.get_command(ctx, name)
            assert command is not None
            options = [p for p in command.params if isinstance(p, click.Option)]
            if name not in TABLE_COMMANDS:
                assert options == [], name  # `plugins` takes none
            for param in options:
                # a record of the core's or a plugin's, or a plugin's alias flag
                assert hasattr(param, "lever_option") or hasattr(param, "lever_alias"), (
                    name,
                    param.opts,
                )


def kind(value: click.ParamType) -> tuple[Any, ...]:
    from lever_trainer.cli import Number

    if isinstance(value, Number):
        return ("number", value.name, value.describe())
    if isinstance(value, click.Choice):
        return ("choice", tuple(value.choices))
    if isinstance(value, click.Path):
        return ("path", value.file_okay, value.dir_okay)
    return (type(value).__name__,)


def describe(param: click.Parameter) -> tuple[Any, ...]:
    """What a user sees of an option: its name, default, help, type and kind."""
    assert isinstance(param, click.Option)
    return (
        param.name,
        param.default,
        param.help,
        kind(param.type),
        param.is_flag,
        param.multiple,
        tuple(param.opts),
    )


def test_every_option_shared_by_two_built_commands_has_one_default_and_meaning() -> None:
    commands = built_commands()
    seen: dict[str, tuple[str, tuple[Any, ...]]] = {}
    compared = 0
    for name, command in commands.items():
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            for flag in param.opts:
                if flag in PER_COMMAND:
                    continue
                if flag in seen:
                    first, described = seen[flag]
                    assert describe(param) == described, f"{flag}: {first} and {name} differ"
                    compared += 1
                else:
                    seen[flag] = (name, describe(param))
    assert compared >= 40  # core and plugin options shared by train, prepare, select, evaluate


def test_the_drifted_options_now_agree() -> None:
    commands = built_commands()
    for name in ("train", "select", "evaluate"):
        device = next(p for p in commands[name].params if p.name == "device")
        assert device.default == "auto", name
    evaluate_flags = {f for p in commands["evaluate"].params for f in p.opts}
    assert {"--hard_weight", "--soft_weight", "--rel_weight", "--reward_mode"} <= evaluate_flags


def test_the_default_policy_is_stated_once() -> None:
    from lever_trainer import policies
    from lever_trainer.coreoptions import by_dest

    assert policies.DEFAULT_POLICY is DEFAULT_POLICY
    assert by_dest("train")["policy"].default == DEFAULT_POLICY


@pytest.mark.parametrize("command", TABLE_COMMANDS)
def test_every_core_record_becomes_a_flag_of_its_commands(command: str) -> None:
    params = {p.name: p for p in built_commands()[command].params}
    for option in options_of(command):
        param = params[option.dest]
        assert isinstance(param, click.Option)
        assert tuple(param.opts) == option.flags
        assert param.help == option.help
        assert param.multiple == option.multiple
        assert param.is_flag == (option.type == "bool")


def test_resume_rules_are_the_tables() -> None:
    """Each core option of train is applied or refused on --resume as its record says,
    with the record's reason in the message."""
    from lever_trainer.coreoptions import options_of
    from lever_trainer.errors import LeverError
    from lever_trainer.plugins import load_plugins
    from lever_trainer.resuming import _Rules

    plugins = load_plugins([], [])
    rules = _Rules(plugins, [], set())
    checked = 0
    for option in options_of("train"):
        if option.resume == "apply":
            rules.check(option.dest, option.name)  # no error
        elif option.resume == "fixed":
            with pytest.raises(LeverError) as caught:
                rules.check(option.dest, option.name)
            assert f"cannot change {option.name}" in str(caught.value)
            assert option.resume_reason in str(caught.value)
        checked += 1
    assert checked == len(options_of("train"))
