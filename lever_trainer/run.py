"""Starting a run: plugins, device, data, embeddings, policy, output directory, run_config.

A run is planned first (:mod:`lever_trainer.plan`: settings in, a description of the run
out, no torch), then started here: :func:`start` builds everything the plan describes,
once, and hands back the trainer; the command line only parses and reports.
"""

from __future__ import annotations

import dataclasses
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
from .coreoptions import by_dest
from .data import (
    DataOptions,
    Embeddings,
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
from .judge import (
    Environment,
    Judge,
    VerdictStore,
    default_store_path,
    environments_from_plugins,
)
from .judge_driver import DriverSettings
from .options import check_value
from .plan import RunPlan, Settings, plan_run, recorded_settings
from .plan import split_seed as settings_split_seed
from .plugins import PluginSet, load_plugins
from .policies import build_policy, start_policy
from .policy import Policy
from .resuming import ResumePlan, path_options, plan_resume
from .rewards import RewardParams, clip_reward, registry_from_plugins
from .rundir import RunLock, check_output_dir, clear_previous_run, occupied_error, run_files
from .state import TrainConfig
from .trainer import Trainer, collect_phases

#: --ray-start-timeout's declared default (a different value is named when unused)
RAY_START_DEFAULT = by_dest()["ray_start_timeout"].default

#: File name of a run's configuration in its output directory.
RUN_CONFIG = "run_config.json"

Echo = Callable[[str], None]
#: ``check(dest, value)``: why a recorded option value is not acceptable (None when it is).
OptionCheck = Callable[[str, Any], "str | None"]


def activate_plugins(settings: Settings, given: Mapping[str, str], warn: Echo) -> PluginSet:
    """The run's plugins (``--plugin``, ``--no-plugin`` and the plugins' alias flags); an
    explicitly given option of an inactive plugin is an error."""
    from .plugins import alias_choices, discover

    installed = discover()
    alias_on, alias_off = alias_choices(installed, settings.plugin_values)
    chosen = list(settings.plugins_on)
    disable = [*settings.plugins_off, *alias_off]
    plugins = load_plugins(
        list(dict.fromkeys([*chosen, *alias_on])), list(dict.fromkeys(disable)), warn=warn
    )
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


def make_data_options(settings: Settings, plugins: PluginSet) -> DataOptions:
    """DataOptions from the settings; the reward settings carry the option values of the
    plugins that provide the chosen reward mode and normaliser."""
    from .plan import gen_methods

    registry = registry_from_plugins(plugins)
    providers = {
        registry.providers.get(f"mode:{settings.reward_mode}"),
        registry.providers.get(f"normalizer:{settings.normalize}"),
    }
    plugin_opts = {
        dest: settings.plugin_values.get(dest, option.default)
        for dest, (plugin, option) in plugins.options().items()
        if plugin in providers
    }
    params = RewardParams(
        hard=settings.hard_weight,
        soft=settings.soft_weight,
        rel=settings.rel_weight,
        options=plugin_opts,
    )
    return DataOptions(
        max_pool=settings.max_pool,
        keep_fallback=settings.keep_fallback,
        gen_methods=gen_methods(settings),
        require_positive=settings.require_positive,
        val_ratio=settings.val_ratio,
        reward_mode=settings.reward_mode,
        reward_params=params,
        normalize=settings.normalize,
    )


def load_data(
    settings: Settings, plugins: PluginSet, echo: Echo, warn: Echo
) -> tuple[QueryTable, LoadReport]:
    """Load ``settings.beam_data`` with the plugins' reward modes, normalisers and readers.

    The prepared cache is keyed on the plugins (and their versions) that read the
    file and supply the chosen formulas, so switching one of them rebuilds it.
    """
    registry = registry_from_plugins(plugins)
    data_opts = make_data_options(settings, plugins)
    path = Path(settings.beam_data or "")
    decision = plugins.call_single("read_rl_data", path=path) if path.is_file() else None
    versions = plugins.versions()

    def version_of(key: str) -> str:
        plugin = registry.providers.get(key, "")
        return f"{plugin} {versions.get(plugin, '')}".strip()

    reader = (
        version_of("")
        if decision is None
        else f"{decision.plugin} {versions.get(decision.plugin, '')}"
    )
    producers = json.dumps(
        {
            "reader": reader,
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
            cache=not settings.no_cache,
            warn=warn,
            reader=None if decision is None else plugin_reader,
            producers=producers,
            cache_dir=settings.cache_dir,
        )
    finally:
        close = getattr(decision.value if decision is not None else None, "close", None)
        if callable(close):
            close()  # a reader that was not needed (cache hit) releases its file


def make_judge(settings: Settings, plugins: PluginSet, warn: Echo) -> Judge | None:
    """The judge named by ``--judge`` (None without), behind the verdict store ``--store``
    (``--no-store``: verdicts kept in memory only). Its rewards use the run's reward mode."""
    name = settings.judge
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
        env.configure(settings.as_options())
    except LeverError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin}: environment {name} could not be configured: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    data_opts = make_data_options(settings, plugins)
    raw_fn = registry_from_plugins(plugins).raw_fn(data_opts.reward_mode)

    def reward(verdict: Mapping[str, float]) -> float:
        return clip_reward(float(raw_fn(verdict, data_opts.reward_params)))

    driver = DriverSettings.from_settings(settings)
    if settings.judge_backend == "ray":
        env, driver = _ray_environment(settings, plugins, plugin, env, driver, warn)
    elif warn is not None:
        unused = [
            flag
            for flag, value in (
                ("--judge-workers", settings.judge_workers != 1),
                ("--judge-gpus-per-worker", bool(settings.judge_gpus_per_worker)),
                ("--ray-address", bool(settings.ray_address)),
                ("--ray-start-timeout", settings.ray_start_timeout != RAY_START_DEFAULT),
            )
            if value
        ]
        if unused:
            warn(
                f"warning: {', '.join(unused)} apply only with --judge-backend ray; "
                "this run judges in its own process"
            )
    store = None if settings.no_store else VerdictStore(settings.store or default_store_path())
    return Judge(env, plugin, store, reward, warn, driver=driver)


def _ray_environment(
    settings: Settings,
    plugins: PluginSet,
    plugin: str,
    env: Environment,
    driver: DriverSettings,
    warn: Echo,
) -> tuple[Environment, DriverSettings]:
    """``--judge-backend ray``: the environment in ``--judge-workers`` Ray actors, with at
    least one batch in flight per worker."""
    from .plugins import discover
    from .ray_judge import PluginEnvironment, RayEnvironment, import_ray

    import_ray()  # one line when Ray is missing, before anything starts
    workers = settings.judge_workers
    if workers > 1 and not (settings.judge_batch_size or env.batch_size) and warn is not None:
        warn(
            f"warning: environment {env.name} takes a whole round per call: with "
            f"--judge-workers {workers}, set --judge-batch-size to spread a round over "
            "the workers"
        )
    active = tuple(plugins.names)
    factory = PluginEnvironment(
        plugin,
        str(settings.judge),
        enable=active,
        disable=tuple(p.name for p in discover() if p.name not in active),
        options=settings.as_options(),
    )
    remote = RayEnvironment(
        env,
        plugin,
        factory,
        workers=workers,
        gpus_per_worker=settings.judge_gpus_per_worker,
        address=settings.ray_address,
        start_seconds=settings.ray_start_timeout,
        notice=warn,
    )
    if warn is not None:
        warn(remote.placement())
    return remote, dataclasses.replace(driver, concurrency=max(driver.concurrency, workers))


def split_seed(options: Mapping[str, Any]) -> int | None:
    """The validation split's seed of a recorded run's options (see
    :func:`lever_trainer.plan.split_seed`; a run recorded before ``--val-split`` existed
    split off the highest query ids)."""
    return settings_split_seed(recorded_settings(options))


def make_deterministic() -> None:
    """Torch flags for run-to-run identical results on CUDA as well as CPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


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
        """Drop the output directory's lock; stop the judge's workers (Ray actors)."""
        if self.lock is not None:
            self.lock.release()
        if self.trainer is not None:
            close_judge(self.trainer.state.judge)


def close_judge(judge: Judge | None) -> None:
    """Stop what the judge's environment runs outside this process (``--judge-backend
    ray``: its actors, and the local cluster it started); nothing for a local judge."""
    close = getattr(getattr(judge, "env", None), "close", None)
    if callable(close):
        close()


def check_plugin_values(opts: Mapping[str, Any], plugins: PluginSet, where: str) -> None:
    """Every active plugin option's value within its declared type and range (values
    that did not come through the command line: a recorded run, the API)."""
    for dest, (plugin, option) in plugins.options().items():
        if dest not in opts:
            continue
        problem = check_value(option, opts[dest])
        if problem is not None:
            raise LeverError(f"{where}{option.name} {opts[dest]!r}: {problem} (plugin {plugin})")


@dataclass
class _Resumed:
    """A resumed run's record: its run_config, its snapshot and what the resume changed."""

    recorded: dict[str, Any]
    snap: dict[str, Any]
    merge: ResumePlan
    plugins: PluginSet


def _resume(
    plan: RunPlan, echo: Echo, warn: Echo, check: OptionCheck | None
) -> Run | tuple[RunPlan, _Resumed]:
    """``--resume``: the run's own options (``run_config.json``) with those given now
    applied or refused (:mod:`lever_trainer.resuming`); a :class:`Run` with only
    ``complete`` when nothing is left to do."""
    assert plan.resume_dir is not None
    run_dir = plan.resume_dir
    recorded, snap = read_run(run_dir, check)
    recorded_given = {k: str(v) for k, v in (recorded.get("given") or {}).items()}
    settings = recorded_settings(recorded["options"])
    plugins = activate_plugins(settings, recorded_given, warn)
    check_plugin_values(recorded["options"], plugins, f"{run_dir / RUN_CONFIG}: ")
    now = {**plan.settings.as_options(), "resume": str(run_dir)}
    merge = plan_resume(
        recorded["options"], now, plan.given, plugins, collect_phases(plugins), snap, run_dir
    )
    if merge.complete is not None:
        return Run(None, run_dir, snap, complete=merge.complete)
    for line in merge.lines:
        echo(line)
    if merge.extended:
        snap["stop_request"] = None
    options = {**merge.options, "output_dir": str(run_dir), "overwrite": False}
    options["resume"] = str(run_dir)
    resumed_plan = plan_run(recorded_settings(options), recorded_given, resumed=True)
    return resumed_plan, _Resumed(recorded, snap, merge, plugins)


def _load_inputs(
    plan: RunPlan, plugins: PluginSet, device: str, echo: Echo, warn: Echo
) -> tuple[QueryTable, QueryTable, Embeddings, str]:
    """The data (split into training and validation), the embeddings, and the
    fingerprint of both files."""
    s = plan.settings
    table, report = load_data(s, plugins, echo, warn)
    for line in report.lines():
        echo(line)
    assert s.img_emb is not None
    img_emb = s.img_emb
    emb, emb_hash = load_verified(
        lambda: load_embeddings(img_emb, s.cand_emb, s.emb_key), img_emb, s.cand_emb
    )
    check_ids_in_range(table, emb)
    check_batches(
        max(s.batch_size, MIN_EVAL_BATCH),
        table.pool_ids.shape[1],
        emb.dim,
        table.sequences.shape[1],
        table.seq_len,
        device,
    )
    for line in embedding_warnings(table, emb):
        warn(line)
    train_table, val_table = split_train_val(table, s.val_ratio, plan.split_seed)
    how = "highest query ids" if plan.split_seed is None else f"drawn with seed {plan.split_seed}"
    echo(
        f"split: {len(train_table)} train / {len(val_table)} validation queries "
        f"({how}), S = {table.seq_len}, d = {emb.dim}"
    )
    fingerprint = hashlib.sha256(f"{report.source_sha256}:{emb_hash}".encode()).hexdigest()
    return train_table, val_table, emb, fingerprint


def _make_policy(
    plan: RunPlan,
    plugins: PluginSet,
    dim: int,
    shots: int,
    resumed: _Resumed | None,
    echo: Echo,
    warn: Echo,
) -> Policy:
    """The policy the plan names: as the resumed run built it, else fresh or from
    ``--sft-ckpt``."""
    s = plan.settings
    torch.manual_seed(s.seed)
    recorded = resumed.recorded.get("policy") if resumed is not None else None
    if isinstance(recorded, dict):
        # resume: the policy exactly as the run built it (its weights are in the snapshot)
        return build_policy(plugins, recorded["name"], dim, recorded["options"])
    name = plan.policy
    if name is None:
        assert s.sft_ckpt is not None
        name = sft_policy_name(s.sft_ckpt, s.trust_checkpoint)
    policy, lines = start_policy(
        plugins,
        name,
        dim,
        {**s.as_options(), "shots": shots},
        plan.policy_given,
        s.sft_ckpt,
        s.trust_checkpoint,
        warn,
        partial=s.partial_load,
        seed=s.seed,
    )
    for line in lines:
        echo(line)
    for dest, flag in plan.policy_given.items():
        if dest not in policy.policy_options():
            warn(
                f"warning: {flag} is not an option of policy {policy.policy_name}; it has no effect"
            )
    return policy


def start(plan: RunPlan, echo: Echo, warn: Echo, check: OptionCheck | None = None) -> Run:
    """Build the run ``plan`` describes (``plan.resume_dir``: continue that run).

    Nothing is written before every input has been read and checked; then the output
    directory is locked for the run's lifetime (``Run.lock``), a previous run's files
    are removed (``--overwrite``) and ``run_config.json`` is written.
    """
    resumed = None
    if plan.resume_dir is not None:
        outcome = _resume(plan, echo, warn, check)
        if isinstance(outcome, Run):
            return outcome
        plan, resumed = outcome
    s = plan.settings
    assert plan.output_dir is not None
    plugins = resumed.plugins if resumed else activate_plugins(s, plan.given, warn)
    device = resolve_device(s.device, warn)
    if s.deterministic:
        make_deterministic()
    check_output_dir(plan.output_dir, s.overwrite, resume=resumed is not None)
    train_table, val_table, emb, fingerprint = _load_inputs(plan, plugins, device, echo, warn)
    policy = _make_policy(plan, plugins, emb.dim, train_table.seq_len, resumed, echo, warn)
    config = plan.train_config(device)
    echo(
        f"plugins: {', '.join(plugins.names) or 'none'}; device {device}; policy "
        f"{policy.policy_name}, {sum(p.numel() for p in policy.parameters()):,} parameters"
    )
    run_metadata = {"data_fingerprint": fingerprint, "beam_data": str(s.beam_data)}
    plugin_values = {
        dest: s.plugin_values.get(dest, option.default)
        for dest, (_, option) in plugins.options().items()
    }
    options = {**s.as_options(), **plugin_values}
    judge = _judge(s, plugins, echo, warn)
    trainer = Trainer(
        config,
        policy,
        train_table,
        val_table,
        emb,
        plugins,
        plan.output_dir,
        options=options,
        run_metadata=run_metadata,
        log=echo,
        judge=judge,
    )
    trainer.resolve_rewards()  # a plugin conflict stops the run before anything is written
    if resumed is not None:
        _check_resumed(trainer, resumed, fingerprint, plan.output_dir)
    trainer.check_settings(trainer.phases_to_run(resumed.snap if resumed else None))
    record = {
        **_run_record(policy, plugins, options),
        "train_config": config.to_dict(),
        **run_metadata,
        "given": dict(plan.given),
    }
    return _take_directory(plan, trainer, record, config, resumed, echo, warn)


def _check_resumed(trainer: Trainer, resumed: _Resumed, fingerprint: str, output_dir: Path) -> None:
    """A resumed run reads the same data, and its snapshot fits the rebuilt trainer."""
    if resumed.recorded.get("data_fingerprint") != fingerprint:
        raise LeverError(
            f"--resume: the data files changed since the run in {output_dir} "
            "started (their fingerprint differs); resume needs the same data"
        )
    snapshot.check_fits(trainer, resumed.snap, output_dir / snapshot.SNAPSHOT_NAME)


def _run_record(policy: Policy, plugins: PluginSet, options: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of ``run_config.json`` that describe the policy, plugins and options."""
    return {
        "policy": {
            "name": policy.policy_name,
            "input_dim": policy.input_dim,
            "options": policy.policy_options(),
        },
        "options": absolute_paths(options, plugins),
        "lever_trainer_version": __version__,
        "plugins": plugins.versions(),
        "plugin_options": {
            p.name: {o.dest: options.get(o.dest) for o in p.options}
            for p in plugins.active
            if p.options
        },
    }


def _judge(s: Settings, plugins: PluginSet, echo: Echo, warn: Echo) -> Judge | None:
    """The run's judge (``--judge``), announced in the log."""
    judge = make_judge(s, plugins, warn)
    if judge is not None:
        where = judge.store.path if judge.store is not None else "memory only (--no-store)"
        echo(
            f"judge: environment {judge.name} {judge.version} (plugin {judge.plugin}); "
            f"verdicts: {where}"
        )
    return judge


def _take_directory(
    plan: RunPlan,
    trainer: Trainer,
    record: dict[str, Any],
    config: TrainConfig,
    resumed: _Resumed | None,
    echo: Echo,
    warn: Echo,
) -> Run:
    """Every input is checked: lock the output directory, then write ``run_config.json``
    (a resumed run: only what the resume changed)."""
    output_dir = plan.output_dir
    assert output_dir is not None
    lock = RunLock(output_dir, warn).acquire()
    try:
        if resumed is not None:
            if resumed.merge.changed:
                record_resume(
                    output_dir / RUN_CONFIG, resumed.recorded, resumed.merge, config, resumed.snap
                )
            return Run(trainer, output_dir, resumed.snap, lock)
        existing = run_files(output_dir)
        if existing and not plan.settings.overwrite:
            raise occupied_error(output_dir, existing)  # a run that finished meanwhile
        if plan.settings.overwrite:
            removed = clear_previous_run(output_dir)
            if removed:
                echo(f"--overwrite: removed {len(removed)} files of the previous run")
        write_run_config(output_dir / RUN_CONFIG, record)
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
    "check_output_dir",
    "check_run_config",
    "checkpoint_name",
    "load_data",
    "make_data_options",
    "resolve_device",
    "start",
]
