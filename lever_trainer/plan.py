"""Planning a run: parsed options in, a description of the run out.

:class:`Settings` is every core option of a command as one typed, frozen object (its
fields are the option table's ``dest`` names, :mod:`lever_trainer.coreoptions`; a test
checks that they agree), plus the plugins' option values by name. :func:`plan_run` turns
the settings of ``lever-train train`` into a :class:`RunPlan`: which plugins to
activate, where the run writes, which policy it builds, how the data is split. It is
pure (no file is read, torch is not imported), so the whole description of a run can
be checked, and tested, before anything heavy starts; :func:`lever_trainer.run.start`
then builds the run the plan describes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .coreoptions import CORE_OPTIONS, RUN_COMMANDS, TRAIN, options_of
from .errors import LeverError
from .state import TrainConfig

#: Values a run recorded before an option existed ran with, where that differs from the
#: option's default today: such a run split off the highest query ids.
LEGACY_VALUES = {"val_split": "last"}
RUN = frozenset(RUN_COMMANDS)
#: The trunk's options, which every policy may read (``TrunkConfig``'s fields).
POLICY_OPTIONS = ("hidden_dim", "num_layers", "num_heads", "dropout", "attn_dropout", "temperature")


@dataclass(frozen=True)
class Settings:
    """The values of every core option (one field per ``dest`` of the option table) and
    the plugins' option values (``plugin_values``, by ``dest``). Built by
    :meth:`from_options`, which fills each option the command does not set with its
    default."""

    config: str | None
    preset: str | None
    print_config: bool
    beam_data: str | None
    queries: str | None
    max_pool: int | None
    keep_fallback: bool
    require_positive: bool
    cache_dir: str | None
    gen_methods: str | None
    reward_mode: str
    hard_weight: float
    soft_weight: float
    rel_weight: float
    normalize: str
    val_ratio: float
    val_split: str
    split_seed: int | None
    no_cache: bool
    img_emb: str | None
    cand_emb: str | None
    emb_key: str | None
    policy: str
    hidden_dim: int | None
    num_layers: int | None
    num_heads: int | None
    dropout: float | None
    attn_dropout: float | None
    temperature: float | None
    sft_ckpt: str | None
    ckpt: str | None
    trust_checkpoint: bool
    partial_load: bool
    output_dir: str | None
    output: str | None
    baselines: str
    shots: int | None
    scores: bool
    overwrite: bool
    batch_size: int
    weight_decay: float
    grad_clip: float
    seed: int
    device: str
    log_every: int
    deterministic: bool
    max_bad_steps: int
    keep_last: int | None
    best_metric: str | None
    best_mode: str
    best_rule: str
    resume: str | None
    judge: str | None
    store: str | None
    no_store: bool
    judge_timeout: float
    judge_batch_size: int | None
    judge_concurrency: int
    judge_retries: int
    judge_max_rps: float
    judge_max_calls: int
    judge_backend: str
    judge_workers: int
    judge_gpus_per_worker: float
    ray_address: str | None
    ray_start_timeout: float
    beam_size: int
    beam_score: str
    beam_candidates: int | None
    random_sequences: int
    cosine_sequences: bool
    shard: str | None
    merge: bool
    plugins_on: tuple[str, ...]
    plugins_off: tuple[str, ...]
    plugin_values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, command: str, values: Mapping[str, Any]) -> Settings:
        """Settings from ``{dest: value}`` (the core's and the plugins'); a core option
        missing from ``values`` takes its default (the command's record, else the first
        record of that ``dest``)."""
        core = core_dests()
        own = {o.dest: o for o in options_of(command)}
        kwargs: dict[str, Any] = {}
        for dest in core:
            record = own.get(dest) or next(
                o for o in CORE_OPTIONS if o.dest == dest and set(o.commands) & RUN
            )
            default: Any = () if record.multiple else record.default
            if record.type == "bool":
                default = bool(default)
            value = values.get(dest, default)
            if record.multiple:
                value = tuple(value or ())
            elif record.type == "bool":
                value = bool(value)
            kwargs[dest] = value
        extra = {k: v for k, v in values.items() if k not in core}
        return cls(**kwargs, plugin_values=MappingProxyType(extra))

    def as_options(self) -> dict[str, Any]:
        """``{dest: value}`` of the options a run records (core and plugins), as the
        plugins read them from ``state.options`` and ``run_config.json`` keeps them."""
        recorded = {o.dest for o in CORE_OPTIONS if o.recorded}
        core = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: v for k, v in core.items() if k in recorded}
        out.update(self.plugin_values)
        return out

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (core fields by name)."""
        return dataclasses.replace(self, **changes)


def core_dests() -> list[str]:
    """Every ``dest`` of the option table's records for the commands that read data and
    run policies (``RUN_COMMANDS``), in table order."""
    return list(dict.fromkeys(o.dest for o in CORE_OPTIONS if set(o.commands) & RUN))


@dataclass(frozen=True)
class RunPlan:
    """What a training run will do, decided from its settings alone.

    ``enable``/``disable``: the plugins named with ``--plugin`` and ``--no-plugin`` (a
    plugin's own alias flags are resolved when the plugins are activated); ``policy``:
    the policy to build, None for the one the ``--sft-ckpt`` records; ``policy_given``:
    ``{dest: flag}`` of the trunk options given; ``split_seed``: the seed of the
    validation split (None: the highest query ids); ``gen_methods``: the kept
    ``gen_method`` values (None: all).
    """

    settings: Settings
    given: Mapping[str, str]
    enable: tuple[str, ...]
    disable: tuple[str, ...]
    output_dir: Path | None
    resume_dir: Path | None
    policy: str | None
    policy_given: Mapping[str, str]
    split_seed: int | None
    gen_methods: frozenset[str] | None

    def train_config(self, device: str) -> TrainConfig:
        """The core's settings of the trainer, on the resolved ``device``."""
        s = self.settings
        return TrainConfig(
            batch_size=s.batch_size,
            weight_decay=s.weight_decay,
            grad_clip=s.grad_clip,
            seed=s.seed,
            device=device,
            max_bad_steps=s.max_bad_steps,
            keep_last=s.keep_last,
            best_metric=s.best_metric,
            best_mode=s.best_mode,
            best_rule=s.best_rule,
        )


def gen_methods(settings: Settings) -> frozenset[str] | None:
    """The ``--gen-methods`` list as a set (None: keep every method)."""
    if settings.gen_methods is None:
        return None
    methods = frozenset(m.strip() for m in settings.gen_methods.split(",") if m.strip())
    if not methods:
        raise LeverError("--gen-methods: expected a comma-separated list such as beam,sample")
    return methods


def split_seed(settings: Settings) -> int | None:
    """The seed that draws the validation split (``--val-split random``: ``--split-seed``,
    else ``--seed``), or None for the highest query ids (``--val-split last``)."""
    if settings.val_split == "last":
        return None
    return int(settings.seed if settings.split_seed is None else settings.split_seed)


def plan_run(settings: Settings, given: Mapping[str, str], resumed: bool = False) -> RunPlan:
    """The plan of a ``train`` run; a :class:`LeverError` for settings that cannot work
    together (a missing required option, an empty list).

    ``given``: ``{dest: flag}`` of the options the user set; ``resumed``: the settings
    are a recorded run's (its policy is rebuilt as recorded, not chosen again).
    """
    if not settings.resume or resumed:
        for dest, flag in (
            ("beam_data", "--beam-data"),
            ("img_emb", "--img-emb"),
            ("output_dir", "--output-dir"),
        ):
            if not getattr(settings, dest):
                raise LeverError(f"missing option {flag}")
    policy: str | None = settings.policy
    if settings.sft_ckpt and "policy" not in given and not resumed:
        policy = None  # continuing from a checkpoint: its own policy
    return RunPlan(
        settings=settings,
        given=MappingProxyType(dict(given)),
        enable=tuple(dict.fromkeys(settings.plugins_on)),
        disable=tuple(dict.fromkeys(settings.plugins_off)),
        output_dir=Path(settings.output_dir) if settings.output_dir else None,
        resume_dir=Path(settings.resume) if settings.resume and not resumed else None,
        policy=policy,
        policy_given=MappingProxyType({k: v for k, v in given.items() if k in POLICY_OPTIONS}),
        split_seed=split_seed(settings),
        gen_methods=gen_methods(settings),
    )


def installed_names() -> set[str]:
    """The names of the installed plugins, read from their entry points (none imported)."""
    from . import entrypoints

    if entrypoints.autoload_disabled():
        return set()
    return {item.entry_point.name for item in entrypoints.installed()}


def preflight(plan: RunPlan, refusals: Mapping[str, str] | None = None) -> None:
    """What can be checked from names and file metadata alone, before torch is imported:
    plugins named that are not installed (or, ``refusals``, that are known to be broken:
    ``{name: the error}``), input files that do not exist, an output directory that
    cannot take the run. Reads no file's contents and writes nothing."""
    from .rundir import check_output_dir

    installed = installed_names()
    known = ", ".join(sorted(installed)) or "none installed"
    for flag, names in (("--plugin", plan.enable), ("--no-plugin", plan.disable)):
        for name in names:
            if name not in installed:
                raise LeverError(f"{flag}: unknown plugin {name!r} (installed: {known})")
    for name in plan.enable:
        if refusals and name in refusals:
            raise LeverError(refusals[name])
    if plan.resume_dir is not None or plan.output_dir is None:
        return  # a resumed run's files are checked against its record
    s = plan.settings
    check_output_dir(plan.output_dir, s.overwrite)
    for path in (s.beam_data, s.img_emb, s.cand_emb):
        if path and not Path(path).is_file():
            raise LeverError(f"{path}: file not found")
    if s.sft_ckpt and not Path(s.sft_ckpt).is_file():
        found = "not a file" if Path(s.sft_ckpt).exists() else "file not found"
        raise LeverError(f"{s.sft_ckpt}: {found}")


def recorded_settings(options: Mapping[str, Any]) -> Settings:
    """The settings of a recorded run (``run_config.json``'s options): an option it does
    not record takes the value such a run ran with (:data:`LEGACY_VALUES`), else its
    default."""
    return Settings.from_options(TRAIN, {**LEGACY_VALUES, **options})


__all__ = [
    "LEGACY_VALUES",
    "POLICY_OPTIONS",
    "RunPlan",
    "Settings",
    "core_dests",
    "gen_methods",
    "installed_names",
    "plan_run",
    "preflight",
    "recorded_settings",
    "split_seed",
]
