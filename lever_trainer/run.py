"""Assembling a run: plugins, device, data, embeddings, policy, output directory, run_config.

Everything a training run needs is built here, once, from the parsed options (a flat
``{dest: value}`` dict, the core's and every plugin's) and the set of options the user
gave explicitly; the command line only parses and reports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, snapshot
from .checkpoint import checkpoint_name
from .data import (
    DataOptions,
    LoadReport,
    QueryTable,
    check_ids_in_range,
    embedding_warnings,
    load_embeddings,
    load_rl_data,
    load_verified,
    plugin_members,
    split_train_val,
)
from .data.budget import check_batches
from .errors import LeverError, PluginError
from .evaluation import MIN_EVAL_BATCH
from .fileio import atomic_write_bytes, json_safe
from .judge import Judge, VerdictStore, default_store_path, environments_from_plugins
from .judge_driver import DriverSettings
from .options import check_value
from .plugins import PluginSet, load_plugins
from .policies import DEFAULT_POLICY, build_policy, start_policy
from .policy import TrunkConfig
from .resuming import ResumePlan, path_options, plan_resume
from .rewards import RewardParams, clip_reward, registry_from_plugins
from .rundir import RunLock, check_output_dir, clear_previous_run, occupied_error, run_files
from .state import TrainConfig
from .trainer import Trainer, collect_phases

#: The trunk's options (core flags), which every policy may read.
POLICY_OPTIONS = tuple(n for n in TrunkConfig.field_names() if n != "input_dim")
#: File name of a run's configuration in its output directory.
RUN_CONFIG = "run_config.json"

Echo = Callable[[str], None]
#: ``check(dest, value)``: why a recorded option value is not acceptable (None when it is).
OptionCheck = Callable[[str, Any], "str | None"]


def activate_plugins(opts: Mapping[str, Any], given: Mapping[str, str], warn: Echo) -> PluginSet:
    """The run's plugins; an explicitly given option of an inactive plugin is an error."""
    from .plugins import alias_choices, discover

    installed = discover()
    alias_on, alias_off = alias_choices(installed, opts)
    enable = [*(opts.get("plugins_on") or ()), *alias_on]
    disable = [*(opts.get("plugins_off") or ()), *alias_off]
    plugins = load_plugins(list(dict.fromkeys(enable)), list(dict.fromkeys(disable)), warn=warn)
    active = plugins.options()
    # the declaring plugin, to say which one to enable
    owners = {o.dest: p.name for p in installed for o in p.options}
    # options a plugin no longer takes: ``Option.extra["removed"]`` says what replaces them
    removed = {o.dest: o.extra.get("removed") for p in installed for o in p.options}
    removed = {dest: hint for dest, hint in removed.items() if hint}
    for dest, flag in given.items():
        if dest in removed:
            raise LeverError(f"{flag} was removed: {removed[dest]}")
        if dest in owners and dest not in active:
            raise LeverError(
                f"{flag}: an option of plugin {owners[dest]}, which is not active in this "
                f"run (add --plugin {owners[dest]})"
            )
    return plugins


def resolve_device(name: str, warn: Echo) -> str:
    """The device a --device value names: ``auto`` is CUDA when available, else CPU;
    asking for CUDA where there is none is an error (never a silent CPU run)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LeverError(
            f"--device: {name!r} is not a device (expected auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise LeverError(
            f"--device: unsupported device type {device.type!r} (expected cpu or cuda)"
        )
    if not torch.cuda.is_available():
        raise LeverError(
            f"--device {name}: CUDA is not available here (torch {torch.__version__}"
            f"{', a CPU-only build' if torch.version.cuda is None else ''}); use "
            "--device cpu, or --device auto to take CUDA only where it exists"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LeverError(
            f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA devices)"
        )
    return str(device)


def make_data_options(opts: Mapping[str, Any], plugins: PluginSet) -> DataOptions:
    """DataOptions from parsed options; the reward settings carry the option values of
    the plugins that provide the chosen reward mode and normaliser."""
    methods = None
    if opts.get("gen_methods") is not None:
        methods = frozenset(m.strip() for m in opts["gen_methods"].split(",") if m.strip())
        if not methods:
            raise LeverError("--gen-methods: expected a comma-separated list such as beam,sample")
    registry = registry_from_plugins(plugins)
    providers = {
        registry.providers.get(f"mode:{opts['reward_mode']}"),
        registry.providers.get(f"normalizer:{opts['normalize']}"),
    }
    plugin_opts = {
        dest: opts.get(dest, option.default)
        for dest, (plugin, option) in plugins.options().items()
        if plugin in providers
    }
    params = RewardParams(
        hard=opts["hard_weight"],
        soft=opts["soft_weight"],
        rel=opts["rel_weight"],
        options=plugin_opts,
    )
    return DataOptions(
        max_pool=opts["max_pool"],
        keep_fallback=opts["keep_fallback"],
        gen_methods=methods,
        require_positive=opts["require_positive"],
        val_ratio=opts.get("val_ratio", 0.2),
        reward_mode=opts["reward_mode"],
        reward_params=params,
        normalize=opts["normalize"],
    )


def load_data(
    opts: Mapping[str, Any], plugins: PluginSet, echo: Echo, warn: Echo
) -> tuple[QueryTable, LoadReport]:
    """Load --beam-data with the plugins' reward modes, normalisers and readers.

    The prepared cache is keyed on the plugins (and their versions) that read the
    file and supply the chosen formulas, so switching one of them rebuilds it.
    """
    registry = registry_from_plugins(plugins)
    data_opts = make_data_options(opts, plugins)
    path = Path(opts["beam_data"])
    decision = plugins.call_single("read_rl_data", path=path) if path.is_file() else None
    versions = plugins.versions()

    def version_of(key: str) -> str:
        plugin = registry.providers.get(key, "")
        return f"{plugin} {versions.get(plugin, '')}".strip()

    producers = json.dumps(
        {
            "reader": version_of("")
            if decision is None
            else f"{decision.plugin} {versions.get(decision.plugin, '')}",
            "reward_mode": version_of(f"mode:{data_opts.reward_mode}"),
            "normalize": version_of(f"normalizer:{data_opts.normalize}"),
        },
        sort_keys=True,
    )

    def plugin_reader(p: Path) -> Iterable[tuple[str, Any]]:
        assert decision is not None
        echo(f"reading {p} with plugin {decision.plugin}")
        return plugin_members(decision.value, decision.plugin, p)

    try:
        return load_rl_data(
            path,
            data_opts,
            registry,
            cache=not opts.get("no_cache", False),
            warn=warn,
            reader=None if decision is None else plugin_reader,
            producers=producers,
            cache_dir=opts.get("cache_dir"),
        )
    finally:
        close = getattr(decision.value if decision is not None else None, "close", None)
        if callable(close):
            close()  # a reader that was not needed (cache hit) releases its file


def make_judge(opts: Mapping[str, Any], plugins: PluginSet, warn: Echo) -> Judge | None:
    """The judge named by ``--judge`` (None without), behind the verdict store ``--store``
    (``--no-store``: verdicts kept in memory only). Its rewards use the run's reward mode."""
    name = opts.get("judge")
    if not name:
        return None
    envs = environments_from_plugins(plugins)
    if name not in envs:
        known = ", ".join(sorted(envs)) or "none; install an environment plugin"
        raise LeverError(
            f"--judge: no active plugin provides environment {name!r} (available: {known})"
        )
    plugin, env = envs[name]
    try:
        env.configure(opts)
    except LeverError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin}: environment {name} could not be configured: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    data_opts = make_data_options(opts, plugins)
    raw_fn = registry_from_plugins(plugins).raw_fn(data_opts.reward_mode)

    def reward(verdict: Mapping[str, float]) -> float:
        return clip_reward(float(raw_fn(verdict, data_opts.reward_params)))

    store = None
    if not opts.get("no_store"):
        store = VerdictStore(opts.get("store") or default_store_path())
    return Judge(env, plugin, store, reward, warn, driver=DriverSettings.from_options(opts))


def split_seed(opts: Mapping[str, Any]) -> int | None:
    """The seed that draws the validation split (``--val-split random``: ``--split-seed``,
    else ``--seed``), or None for the highest query ids (``--val-split last``; also a run
    recorded before the option existed, whose split was that)."""
    if (opts.get("val_split") or "last") == "last":
        return None
    chosen = opts.get("split_seed")
    return int(opts["seed"] if chosen is None else chosen)


def make_deterministic() -> None:
    """Torch flags for run-to-run identical results on CUDA as well as CPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def train_config(opts: Mapping[str, Any], device: str) -> TrainConfig:
    """The core's settings from the parsed options."""
    return TrainConfig(
        batch_size=opts["batch_size"],
        weight_decay=opts["weight_decay"],
        grad_clip=opts["grad_clip"],
        seed=opts["seed"],
        device=device,
        max_bad_steps=opts["max_bad_steps"],
        keep_last=opts["keep_last"],
        best_metric=opts["best_metric"],
        best_mode=opts["best_mode"],
        best_rule=opts.get("best_rule") or "paired",
    )


def read_run(
    run_dir: Path, check: OptionCheck | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run config and snapshot of the run in ``run_dir``, for --resume, both checked:
    a tampered file is a :class:`LeverError` naming the file and the entry."""
    config_path, snap_path = run_dir / RUN_CONFIG, run_dir / snapshot.SNAPSHOT_NAME
    if not config_path.is_file():
        raise LeverError(f"--resume: {run_dir} has no {RUN_CONFIG} (not a lever-train run)")
    if not snap_path.is_file():
        raise LeverError(
            f"--resume: {run_dir} has no {snapshot.SNAPSHOT_NAME} (the run stopped before "
            "its first snapshot; start it again)"
        )
    try:
        original = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise LeverError(f"{config_path}: unreadable run config ({exc})") from None
    check_run_config(original, config_path, check)
    return original, snapshot.read(snap_path)


def sft_policy_name(path: str, trust: bool) -> str:
    """The policy a starting checkpoint was trained as (foreign files: ``pointer``).
    Only the header is read; ``trust`` is for the weights, which are loaded later."""
    from .checkpoint import header_metadata
    from .policies import FOREIGN_POLICY, recorded_policy

    recorded = recorded_policy(header_metadata(path))
    return recorded[0] if recorded is not None else FOREIGN_POLICY


def check_run_config(config: Any, path: Path, check: OptionCheck | None = None) -> None:
    """The entries a resumed run reads from ``run_config.json``, with values of the right
    type; ``check(dest, value)`` (from the command line's option types) checks each
    option value."""
    if not isinstance(config, dict):
        raise LeverError(f"{path}: expected a JSON object, found {type(config).__name__}")
    options = config.get("options")
    if not isinstance(options, dict):
        raise LeverError(f"{path}: entry 'options' is missing or not an object")
    for key in ("beam_data", "img_emb"):
        if not isinstance(options.get(key), str) or not options[key]:
            raise LeverError(f"{path}: entry 'options.{key}' is missing or not a path")
    given = config.get("given", {})
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise LeverError(f"{path}: entry 'given' should map option names to flags")
    policy = config.get("policy")
    if policy is not None and (
        not isinstance(policy, dict)
        or not isinstance(policy.get("name"), str)
        or not isinstance(policy.get("options"), dict)
    ):
        raise LeverError(f"{path}: entry 'policy' should be {{'name': ..., 'options': {{...}}}}")
    if not isinstance(config.get("data_fingerprint"), str):
        raise LeverError(f"{path}: entry 'data_fingerprint' is missing or not a string")
    if check is not None:
        for dest, value in options.items():
            problem = check(dest, value)
            if problem is not None:
                raise LeverError(f"{path}: entry 'options.{dest}' is {value!r:.60}: {problem}")


def absolute_paths(options: Mapping[str, Any], plugins: PluginSet) -> dict[str, Any]:
    """``options`` with every path made absolute, so that ``run_config.json`` works as a
    ``--config`` (and for ``--resume``) from any working directory."""
    keys = path_options(plugins)
    return {
        k: os.path.abspath(os.path.expanduser(v)) if k in keys and isinstance(v, str) and v else v
        for k, v in options.items()
    }


@dataclass
class Run:
    """An assembled run: the trainer, the snapshot it resumes from (if any), and the lock
    it holds on its output directory (release it when the run ends). A resumed run with
    nothing left to do has no trainer, only ``complete`` (the line to print)."""

    trainer: Trainer | None
    output_dir: Path
    resume: dict[str, Any] | None = None
    lock: RunLock | None = None
    complete: str | None = None

    def release(self) -> None:
        """Drop the output directory's lock."""
        if self.lock is not None:
            self.lock.release()


def check_plugin_values(opts: Mapping[str, Any], plugins: PluginSet, where: str) -> None:
    """Every active plugin option's value within its declared type and range (values
    that did not come through the command line: a recorded run, the API)."""
    for dest, (plugin, option) in plugins.options().items():
        if dest not in opts:
            continue
        problem = check_value(option, opts[dest])
        if problem is not None:
            raise LeverError(f"{where}{option.name} {opts[dest]!r}: {problem} (plugin {plugin})")


def assemble(
    opts: dict[str, Any],
    given: Mapping[str, str],
    echo: Echo,
    warn: Echo,
    check: OptionCheck | None = None,
) -> Run:
    """Build a run from parsed options (``given``: the options set explicitly, by dest).

    With ``opts["resume"]`` the run's own options come from its ``run_config.json``;
    options given with it are applied or refused (:mod:`lever_trainer.resuming`).
    Nothing is written before every input has been read and checked; then the output
    directory is locked for the run's lifetime (``Run.lock``), a previous run's files
    are removed (``--overwrite``) and ``run_config.json`` is written.
    """
    recorded: dict[str, Any] | None = None
    resume = None
    plan: ResumePlan | None = None
    if opts.get("resume"):
        run_dir = Path(opts["resume"])
        recorded, resume = read_run(run_dir, check)
        recorded_given = {k: str(v) for k, v in (recorded.get("given") or {}).items()}
        plugins = activate_plugins(recorded["options"], recorded_given, warn)
        check_plugin_values(recorded["options"], plugins, f"{run_dir / RUN_CONFIG}: ")
        plan = plan_resume(
            recorded["options"], opts, given, plugins, collect_phases(plugins), resume, run_dir
        )
        if plan.complete is not None:
            return Run(None, run_dir, resume, complete=plan.complete)
        for line in plan.lines:
            echo(line)
        if plan.extended:
            resume["stop_request"] = None
        opts = dict(plan.options)
        opts.update(output_dir=str(run_dir), overwrite=False, resume=str(run_dir))
        given = recorded_given
    for name, flag in (
        ("beam_data", "--beam-data"),
        ("img_emb", "--img-emb"),
        ("output_dir", "--output-dir"),
    ):
        if not opts.get(name):
            raise LeverError(f"missing option {flag}")
    if recorded is None:
        plugins = activate_plugins(opts, given, warn)
    device = resolve_device(opts["device"], warn)
    if opts.get("deterministic"):
        make_deterministic()
    output_dir = Path(opts["output_dir"])
    check_output_dir(output_dir, bool(opts.get("overwrite")), resume=recorded is not None)

    table, report = load_data(opts, plugins, echo, warn)
    for line in report.lines():
        echo(line)
    emb, emb_hash = load_verified(
        lambda: load_embeddings(opts["img_emb"], opts.get("cand_emb"), opts.get("emb_key")),
        opts["img_emb"],
        opts.get("cand_emb"),
    )
    check_ids_in_range(table, emb)
    check_batches(
        max(opts["batch_size"], MIN_EVAL_BATCH),
        table.pool_ids.shape[1],
        emb.dim,
        table.sequences.shape[1],
        table.seq_len,
        device,
    )
    for line in embedding_warnings(table, emb):
        warn(line)
    seed = split_seed(opts)
    train_table, val_table = split_train_val(table, opts["val_ratio"], seed)
    how = "highest query ids" if seed is None else f"drawn with seed {seed}"
    echo(
        f"split: {len(train_table)} train / {len(val_table)} validation queries "
        f"({how}), S = {table.seq_len}, d = {emb.dim}"
    )

    torch.manual_seed(opts["seed"])
    name = opts.get("policy") or DEFAULT_POLICY
    if opts.get("sft_ckpt") and "policy" not in given and recorded is None:
        # continuing from a checkpoint: its own policy unless --policy says otherwise
        name = sft_policy_name(opts["sft_ckpt"], bool(opts.get("trust_checkpoint")))
    policy_opts = {**opts, "shots": table.seq_len}
    if recorded is not None and isinstance(recorded.get("policy"), dict):
        # resume: the policy exactly as the run built it (its weights are in the snapshot)
        spec = recorded["policy"]
        policy = build_policy(plugins, spec["name"], emb.dim, spec["options"])
        lines: list[str] = []
    else:
        policy, lines = start_policy(
            plugins,
            name,
            emb.dim,
            policy_opts,
            {k: v for k, v in given.items() if k in POLICY_OPTIONS},
            opts.get("sft_ckpt"),
            bool(opts.get("trust_checkpoint")),
            warn,
            partial=bool(opts.get("partial_load")),
            seed=opts["seed"],
        )
    for line in lines:
        echo(line)
    unread = [
        flag
        for dest, flag in given.items()
        if dest in POLICY_OPTIONS and dest not in policy.policy_options()
    ]
    for flag in unread:
        warn(f"warning: {flag} is not an option of policy {policy.policy_name}; it has no effect")
    config = train_config(opts, device)
    echo(
        f"plugins: {', '.join(plugins.names) or 'none'}; device {device}; policy "
        f"{policy.policy_name}, {sum(p.numel() for p in policy.parameters()):,} parameters"
    )
    fingerprint = hashlib.sha256(f"{report.source_sha256}:{emb_hash}".encode()).hexdigest()
    run_metadata = {"data_fingerprint": fingerprint, "beam_data": str(opts["beam_data"])}
    plugin_values = {
        dest: opts.get(dest, option.default) for dest, (_, option) in plugins.options().items()
    }
    options = {**opts, **plugin_values}
    judge = make_judge(opts, plugins, warn)
    if judge is not None:
        where = judge.store.path if judge.store is not None else "memory only (--no-store)"
        echo(
            f"judge: environment {judge.name} {judge.version} (plugin {judge.plugin}); "
            f"verdicts: {where}"
        )
    trainer = Trainer(
        config,
        policy,
        train_table,
        val_table,
        emb,
        plugins,
        output_dir,
        options=options,
        run_metadata=run_metadata,
        log=echo,
        judge=judge,
    )
    trainer.resolve_rewards()  # a plugin conflict stops the run before anything is written
    if resume is not None:
        assert recorded is not None and plan is not None
        if recorded.get("data_fingerprint") != fingerprint:
            raise LeverError(
                f"--resume: the data files changed since the run in {output_dir} "
                "started (their fingerprint differs); resume needs the same data"
            )
        snapshot.check_fits(trainer, resume, output_dir / snapshot.SNAPSHOT_NAME)
    trainer.check_settings(trainer.phases_to_run(resume))

    # every input is checked: take the directory, then write
    lock = RunLock(output_dir, warn).acquire()
    try:
        if resume is not None:
            assert recorded is not None and plan is not None
            if plan.changed:
                record_resume(output_dir / RUN_CONFIG, recorded, plan, config, resume)
            return Run(trainer, output_dir, resume, lock)
        existing = run_files(output_dir)
        if existing and not opts.get("overwrite"):
            raise occupied_error(output_dir, existing)  # a run that finished meanwhile
        if opts.get("overwrite"):
            removed = clear_previous_run(output_dir)
            if removed:
                echo(f"--overwrite: removed {len(removed)} files of the previous run")
        write_run_config(
            output_dir / RUN_CONFIG,
            {
                "train_config": config.to_dict(),
                "policy": {
                    "name": policy.policy_name,
                    "input_dim": policy.input_dim,
                    "options": policy.policy_options(),
                },
                "plugins": plugins.versions(),
                "plugin_options": {
                    plugin: {o.dest: options.get(o.dest) for o in info.options}
                    for plugin, info in ((p.name, p) for p in plugins.active)
                    if info.options
                },
                **run_metadata,
                "options": absolute_paths(options, plugins),
                "given": dict(given),
                "lever_trainer_version": __version__,
            },
        )
    except BaseException:
        lock.release()
        raise
    return Run(trainer, output_dir, None, lock)


def write_run_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write ``run_config.json`` atomically (strict JSON)."""
    atomic_write_bytes(
        path,
        (
            json.dumps(json_safe(dict(config)), indent=2, sort_keys=True, default=str) + "\n"
        ).encode(),
    )


def record_resume(
    path: Path,
    recorded: dict[str, Any],
    plan: ResumePlan,
    config: TrainConfig,
    snap: Mapping[str, Any],
) -> None:
    """Update ``run_config.json`` with the options a resume changed, and keep a record of
    the change (``resumes``), so a later ``--resume`` continues with them."""
    updated = dict(recorded)
    updated["options"] = {**recorded["options"], **plan.options}
    updated["train_config"] = config.to_dict()
    for plugin_options in (updated.get("plugin_options") or {}).values():
        if isinstance(plugin_options, dict):
            for dest in plugin_options:
                if dest in plan.changed:
                    plugin_options[dest] = plan.changed[dest][1]
    history = list(updated.get("resumes") or [])
    history.append(
        {
            "at": f"phase {snap['phase']} epoch {snap['epoch']} step {snap['step_in_epoch']}",
            "changed": {dest: [old, new] for dest, (old, new) in plan.changed.items()},
            "lever_trainer_version": __version__,
        }
    )
    updated["resumes"] = history
    write_run_config(path, updated)


__all__ = [
    "RUN_CONFIG",
    "Run",
    "assemble",
    "check_output_dir",
    "check_run_config",
    "checkpoint_name",
    "load_data",
    "make_data_options",
    "resolve_device",
]
