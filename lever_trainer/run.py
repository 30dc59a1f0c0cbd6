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
    file_fingerprint,
    load_embeddings,
    load_rl_data,
    split_train_val,
)
from .errors import LeverError
from .fileio import atomic_write_bytes
from .jsonstream import iter_object_members
from .plugins import PluginSet, load_plugins
from .policies import DEFAULT_POLICY, build_policy, start_policy
from .policy import TrunkConfig
from .rewards import RewardParams, registry_from_plugins
from .state import TrainConfig
from .trainer import Trainer

#: Seed-script flags that stand for a plugin choice.
ALIAS_FLAGS = {
    "rce_use_raw_reward": ("--rce_use_raw_reward", "raw-reward"),
    "rce_use_normalized_reward": ("--rce_use_normalized_reward", "normalized-reward"),
    "freeze_backbone_in_grpo": ("--freeze_backbone_in_grpo", "freeze-backbone"),
}
#: The trunk's options (core flags), which every policy may read.
POLICY_OPTIONS = tuple(n for n in TrunkConfig.field_names() if n != "input_dim")
#: File name of a run's configuration in its output directory.
RUN_CONFIG = "run_config.json"

Echo = Callable[[str], None]


def plugin_choices(enable: Iterable[str], aliases: Mapping[str, Any]) -> list[str]:
    """--plugin names plus those implied by the seed script's flags."""
    names = list(enable)
    on = [flag for key, (flag, _) in ALIAS_FLAGS.items() if aliases.get(key)]
    if "--rce_use_raw_reward" in on and "--rce_use_normalized_reward" in on:
        raise LeverError(
            "--rce_use_raw_reward and --rce_use_normalized_reward both choose "
            "the RCE reward (raw and normalized); give only one"
        )
    for key, (_, plugin) in ALIAS_FLAGS.items():
        if aliases.get(key) and plugin not in names:
            names.append(plugin)
    if "raw-reward" in names and "normalized-reward" in names:
        raise LeverError(
            "--plugin raw-reward and --plugin normalized-reward both choose "
            "the RCE reward; give only one"
        )
    return names


def activate_plugins(opts: Mapping[str, Any], given: Mapping[str, str], warn: Echo) -> PluginSet:
    """The run's plugins; an explicitly given option of an inactive plugin is an error."""
    enable = plugin_choices(opts.get("plugins_on") or (), opts)
    plugins = load_plugins(enable, opts.get("plugins_off") or (), warn=warn)
    active = plugins.options()
    from .plugins import discover  # the declaring plugin, to say which one to enable

    owners = {o.dest: p.name for p in discover() for o in p.options}
    for dest, flag in given.items():
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


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a directory that already holds checkpoints unless --overwrite, or that
    cannot be created or written; checked before anything is written."""
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LeverError(f"--output-dir: cannot create {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LeverError(f"--output-dir: cannot write into {ancestor} (permission denied)")
    if path.exists() and not path.is_dir():
        raise LeverError(f"--output-dir: {path} exists and is not a directory")
    existing = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise LeverError(
            f"--output-dir: {path} already holds checkpoints ({shown}); pass "
            "--overwrite to write over them, or choose another directory"
        )


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

    def reader(p: Path) -> Iterable[tuple[str, Any]]:
        if decision is None:
            return iter_object_members(p)
        echo(f"reading {p} with plugin {decision.plugin}")
        members: Iterable[tuple[str, Any]] = decision.value
        return members

    try:
        return load_rl_data(
            path,
            data_opts,
            registry,
            cache=not opts.get("no_cache", False),
            warn=warn,
            reader=reader,
            producers=producers,
        )
    finally:
        close = getattr(decision.value if decision is not None else None, "close", None)
        if callable(close):
            close()  # a reader that was not needed (cache hit) releases its file


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
    )


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run config and snapshot of the run in ``run_dir``, for --resume."""
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
        if not isinstance(original, dict) or not isinstance(original.get("options"), dict):
            raise KeyError("options")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LeverError(f"{config_path}: unreadable run config ({exc})") from None
    return original, snapshot.read(snap_path)


#: The core options that hold file or folder paths.
PATH_OPTIONS = ("beam_data", "img_emb", "cand_emb", "sft_ckpt", "output_dir", "resume")


def absolute_paths(options: Mapping[str, Any], plugins: PluginSet) -> dict[str, Any]:
    """``options`` with every path made absolute, so that ``run_config.json`` works as a
    ``--config`` (and for ``--resume``) from any working directory."""
    keys = set(PATH_OPTIONS) | {
        dest for dest, (_, option) in plugins.options().items() if option.type == "path"
    }
    return {
        k: os.path.abspath(os.path.expanduser(v)) if k in keys and isinstance(v, str) and v else v
        for k, v in options.items()
    }


@dataclass
class Run:
    """An assembled run: the trainer, and the snapshot it resumes from (if any)."""

    trainer: Trainer
    output_dir: Path
    resume: dict[str, Any] | None = None


def assemble(opts: dict[str, Any], given: Mapping[str, str], echo: Echo, warn: Echo) -> Run:
    """Build a run from parsed options (``given``: the options set explicitly, by dest).

    With ``opts["resume"]`` the run's own options come from its ``run_config.json``.
    Nothing is written before every input has been read and checked.
    """
    recorded: dict[str, Any] | None = None
    resume = None
    if opts.get("resume"):
        run_dir = Path(opts["resume"])
        recorded, resume = read_run(run_dir)
        opts = dict(recorded["options"])
        opts.update(output_dir=str(run_dir), overwrite=True, resume=str(run_dir))
        given = {k: str(v) for k, v in (recorded.get("given") or {}).items()}
    for name, flag in (
        ("beam_data", "--beam-data"),
        ("img_emb", "--img-emb"),
        ("output_dir", "--output-dir"),
    ):
        if not opts.get(name):
            raise LeverError(f"missing option {flag}")
    plugins = activate_plugins(opts, given, warn)
    device = resolve_device(opts["device"], warn)
    if opts.get("deterministic"):
        make_deterministic()
    output_dir = Path(opts["output_dir"])
    check_output_dir(output_dir, bool(opts.get("overwrite")))

    table, report = load_data(opts, plugins, echo, warn)
    for line in report.lines():
        echo(line)
    emb = load_embeddings(opts["img_emb"], opts.get("cand_emb"), opts.get("emb_key"))
    check_ids_in_range(table, emb)
    train_table, val_table = split_train_val(table, opts["val_ratio"])
    echo(
        f"split: {len(train_table)} train / {len(val_table)} validation queries, "
        f"S = {table.seq_len}, d = {emb.dim}"
    )

    torch.manual_seed(opts["seed"])
    name = opts.get("policy") or DEFAULT_POLICY
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
        )
    for line in lines:
        echo(line)
    config = train_config(opts, device)
    echo(
        f"plugins: {', '.join(plugins.names) or 'none'}; device {device}; policy "
        f"{policy.policy_name}, {sum(p.numel() for p in policy.parameters()):,} parameters"
    )
    data_hash = report.source_sha256 or file_fingerprint(opts["beam_data"])
    emb_hash = file_fingerprint(opts["img_emb"], opts.get("cand_emb"))
    fingerprint = hashlib.sha256(f"{data_hash}:{emb_hash}".encode()).hexdigest()
    run_metadata = {"data_fingerprint": fingerprint, "beam_data": str(opts["beam_data"])}
    plugin_values = {
        dest: opts.get(dest, option.default) for dest, (_, option) in plugins.options().items()
    }
    options = {**opts, **plugin_values}
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
    )
    trainer.resolve_rewards()  # a plugin conflict stops the run before anything is written
    if resume is not None:
        assert recorded is not None
        if recorded.get("data_fingerprint") != fingerprint:
            raise LeverError(
                f"--resume: the data files changed since the run in {output_dir} "
                "started (their fingerprint differs); resume needs the same data"
            )
        return Run(trainer, output_dir, resume)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeverError(
            f"--output-dir: cannot create {output_dir} ({exc.strerror or exc})"
        ) from None
    run_config = {
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
    }
    atomic_write_bytes(
        output_dir / RUN_CONFIG,
        (json.dumps(run_config, indent=2, sort_keys=True, default=str) + "\n").encode(),
    )
    return Run(trainer, output_dir, None)


__all__ = [
    "ALIAS_FLAGS",
    "RUN_CONFIG",
    "Run",
    "assemble",
    "check_output_dir",
    "checkpoint_name",
    "load_data",
    "make_data_options",
    "resolve_device",
]
