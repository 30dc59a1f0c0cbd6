"""``lever-train``: the command line.

``lever-train [train] OPTIONS`` trains; ``lever-train plugins`` lists installed
plugins; ``lever-train demo-data DIR`` writes the synthetic demo dataset. Every
:class:`~lever_trainer.errors.LeverError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
import torch

from . import __version__
from .checkpoint import (
    atomic_write_bytes,
    infer_policy_shape,
    is_pickle_checkpoint,
    load_into_model,
    read_state_dict,
)
from .data import (
    DataOptions,
    LoadReport,
    QueryTable,
    cache_path_for,
    check_ids_in_range,
    file_fingerprint,
    load_embeddings,
    load_rl_data,
    split_train_val,
)
from .errors import LeverError
from .jsonstream import iter_object_members
from .model import PointerPolicy, PolicyConfig
from .plugins import PluginSet, discover, load_plugins
from .rewards import RewardParams, registry_from_plugins
from .state import TrainConfig

#: Seed-script flags that stand for a plugin choice.
ALIAS_FLAGS = {
    "rce_use_raw_reward": ("--rce_use_raw_reward", "raw-reward"),
    "rce_use_normalized_reward": ("--rce_use_normalized_reward", "normalized-reward"),
    "freeze_backbone_in_grpo": ("--freeze_backbone_in_grpo", "freeze-backbone"),
}


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    click.echo(message, err=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a LeverError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LeverError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


class DefaultToTrain(click.Group):
    """A group whose default command is ``train``: ``lever-train --beam-data ...`` trains."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToTrain, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lever-train")
def main() -> None:
    """Train a pointer policy for in-context example selection (RCE, then GRPO).

    Run `lever-train train --help` for the training options (`train` may be
    omitted), `lever-train plugins` for the installed plugins.
    """


def resolve_device(name: str) -> str:
    """Check a --device value; CUDA without CUDA falls back to CPU with a warning."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LeverError(
            f"--device: {name!r} is not a device (expected cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise LeverError(
            f"--device: unsupported device type {device.type!r} (expected cpu or cuda)"
        )
    if not torch.cuda.is_available():
        warn(f"warning: --device {name}: CUDA is not available, running on cpu")
        return "cpu"
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


def plugin_choices(enable: tuple[str, ...], aliases: dict[str, bool]) -> list[str]:
    """--plugin names plus those implied by the seed script's flags."""
    names = list(enable)
    on = [flag for key, (flag, _) in ALIAS_FLAGS.items() if aliases.get(key)]
    if "--rce_use_raw_reward" in on and "--rce_use_normalized_reward" in on:
        raise click.UsageError(
            "--rce_use_raw_reward and --rce_use_normalized_reward both choose "
            "the RCE reward (raw and normalized); give only one"
        )
    for key, (_, plugin) in ALIAS_FLAGS.items():
        if aliases.get(key) and plugin not in names:
            names.append(plugin)
    if "raw-reward" in names and "normalized-reward" in names:
        raise click.UsageError(
            "--plugin raw-reward and --plugin normalized-reward both choose "
            "the RCE reward; give only one"
        )
    return names


def build_model(
    d: int, hidden_dim: int | None, num_layers: int | None, sft_ckpt: str | None, trust: bool
) -> tuple[PointerPolicy, list[str]]:
    """The policy for embedding width ``d``, loaded from ``sft_ckpt`` when given."""
    if sft_ckpt and trust and is_pickle_checkpoint(Path(sft_ckpt)):
        warn(
            f"warning: --trust-checkpoint: loading {sft_ckpt} with a full (unsafe) pickle "
            "load; only do this for files from a source you trust"
        )
    state_dict = read_state_dict(sft_ckpt, trust) if sft_ckpt else None
    shape = infer_policy_shape(state_dict) if state_dict is not None else {}
    for flag, given, key in (
        ("--hidden-dim", hidden_dim, "hidden_dim"),
        ("--num-layers", num_layers, "num_layers"),
    ):
        if given is not None and key in shape and shape[key] != given:
            raise LeverError(
                f"{flag} {given} disagrees with --sft-ckpt {sft_ckpt}, "
                f"which has {key.replace('_', ' ')} {shape[key]}"
            )
    config = PolicyConfig(
        input_dim=d,
        hidden_dim=hidden_dim or shape.get("hidden_dim", 256),
        num_layers=num_layers or shape.get("num_layers", 1),
    )
    model = PointerPolicy(config)
    lines: list[str] = []
    if state_dict is not None:
        assert sft_ckpt is not None
        report = load_into_model(
            model, state_dict, sft_ckpt, f" (embedding width d={d} from --img-emb)"
        )
        lines = report.lines()
    return model, lines


beam_data_option = click.option(
    "--beam-data",
    "--beam_data",
    "beam_data",
    required=True,
    type=click.Path(dir_okay=False),
    help="RL data JSON (SPEC 2.1).",
)


def embedding_options(fn: Callable[..., Any], required: bool = True) -> Callable[..., Any]:
    """--img-emb, --cand-emb and --emb-key (shared by train and select)."""
    fn = click.option(
        "--emb-key", default=None, help="Tensor name inside a multi-tensor embedding file."
    )(fn)
    fn = click.option(
        "--cand-emb",
        "cand_emb",
        type=click.Path(dir_okay=False),
        default=None,
        help="Separate candidate embedding table (default: --img-emb).",
    )(fn)
    fn = click.option(
        "--img-emb",
        "--img_emb",
        "img_emb",
        required=required,
        type=click.Path(dir_okay=False),
        help="Embedding table [N, d]: .pt/.pth, .npy or .safetensors.",
    )(fn)
    return fn


beam_data_option_optional = click.option(
    "--beam-data",
    "--beam_data",
    "beam_data",
    type=click.Path(dir_okay=False),
    help="RL data JSON (SPEC 2.1).  [required unless --resume]",
)


def embedding_options_optional(fn: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`embedding_options` with --img-emb checked by the command (train --resume)."""
    return embedding_options(fn, required=False)


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that decide how RL data becomes a table (train, prepare, select)."""
    options = [
        click.option(
            "--max-pool",
            "--max_pool",
            "max_pool",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Cut each query's pool to its first N ids.",
        ),
        click.option(
            "--keep-fallback",
            "--no_skip_fallback_reward",
            "keep_fallback",
            is_flag=True,
            help="Keep candidates whose evaluation fell back.",
        ),
        click.option(
            "--require-positive-query",
            "--require_positive_query",
            "require_positive",
            is_flag=True,
            help="Keep only queries with at least one vqa_correct == 1 candidate.",
        ),
        click.option(
            "--gen-methods",
            "--gen_methods",
            "gen_methods",
            default=None,
            metavar="LIST",
            help="Keep only candidates of these gen_method values, "
            "comma-separated (e.g. beam,sample).",
        ),
        click.option(
            "--reward-mode",
            "--reward_mode",
            "reward_mode",
            default="hard_plus_soft",
            show_default=True,
            help="Raw-reward formula (SPEC 3.1), from a plugin.",
        ),
        click.option(
            "--hard-weight",
            "--hard_weight",
            "hard_weight",
            type=float,
            default=1.0,
            show_default=True,
            help="wh: weight of vqa_correct.",
        ),
        click.option(
            "--soft-weight",
            "--soft_weight",
            "soft_weight",
            type=float,
            default=1.0,
            show_default=True,
            help="ws: weight of vqa_acc_score / vqa_gt_prob.",
        ),
        click.option(
            "--rel-weight",
            "--rel_weight",
            "rel_weight",
            type=float,
            default=0.1,
            show_default=True,
            help="wl: weight of vqa_rel_score.",
        ),
        click.option(
            "--reward-alpha",
            "--reward_alpha",
            "reward_alpha",
            type=float,
            default=1.0,
            show_default=True,
            help="legacy mode: weight of the beam quality.",
        ),
        click.option(
            "--reward-beta",
            "--reward_beta",
            "reward_beta",
            type=float,
            default=1.0,
            show_default=True,
            help="legacy mode: weight of the correctness.",
        ),
        click.option(
            "--correctness-mode",
            "--correctness_mode",
            "correctness_mode",
            type=click.Choice(["01", "pm1"]),
            default="01",
            show_default=True,
            help="legacy mode: correctness as 0/1 or -1/+1.",
        ),
        click.option(
            "--use-logprob",
            "--use_logprob",
            "use_logprob",
            is_flag=True,
            help="legacy mode: quality = -logprob_score instead of beam_score.",
        ),
        click.option(
            "--normalize",
            "--normalize_method",
            "normalize",
            default="z_score_clamp",
            show_default=True,
            help="Group normaliser (SPEC 3.2), from a plugin.",
        ),
        click.option(
            "--normalize-clamp-value",
            "--normalize_clamp_value",
            "normalize_clamp",
            type=click.FloatRange(min=0, min_open=True),
            default=3.0,
            show_default=True,
            help="Bound of z_score_clamp.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plugin_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--plugin and --no-plugin."""
    fn = click.option(
        "--no-plugin",
        "plugins_off",
        multiple=True,
        metavar="NAME",
        help="Disable a plugin that is on by default (repeatable).",
    )(fn)
    fn = click.option(
        "--plugin",
        "plugins_on",
        multiple=True,
        metavar="NAME",
        help="Enable an installed plugin (repeatable).",
    )(fn)
    return fn


def make_data_options(opts: dict[str, Any]) -> DataOptions:
    """DataOptions from parsed CLI options."""
    methods = None
    if opts.get("gen_methods") is not None:
        methods = frozenset(m.strip() for m in opts["gen_methods"].split(",") if m.strip())
        if not methods:
            raise LeverError("--gen-methods: expected a comma-separated list such as beam,sample")
    params = RewardParams(
        hard=opts["hard_weight"],
        soft=opts["soft_weight"],
        rel=opts["rel_weight"],
        alpha=opts["reward_alpha"],
        beta=opts["reward_beta"],
        correctness=opts["correctness_mode"],
        use_logprob=opts["use_logprob"],
        clamp=opts["normalize_clamp"],
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


def load_data(opts: dict[str, Any], plugins: PluginSet) -> tuple[QueryTable, LoadReport]:
    """Load --beam-data with the plugins' reward modes, normalisers and readers.

    The prepared cache is keyed on the plugins (and their versions) that read the
    file and supply the chosen formulas, so switching one of them rebuilds it.
    """
    registry = registry_from_plugins(plugins)
    data_opts = make_data_options(opts)
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
        click.echo(f"reading {p} with plugin {decision.plugin}")
        members: Iterable[tuple[str, Any]] = decision.value
        return members

    try:
        return load_rl_data(
            path,
            data_opts,
            cache=not opts.get("no_cache", False),
            warn=warn,
            registry=registry,
            reader=reader,
            producers=producers,
        )
    finally:
        close = getattr(decision.value if decision is not None else None, "close", None)
        if callable(close):
            close()  # a reader that was not needed (cache hit) releases its file


@main.command("train")
@beam_data_option_optional
@embedding_options_optional
@click.option(
    "--sft-ckpt",
    "--sft_ckpt",
    "sft_ckpt",
    type=click.Path(dir_okay=False),
    default=None,
    help="Starting checkpoint (safetensors, torch.save dict, Lightning .ckpt).",
)
@click.option(
    "--trust-checkpoint", is_flag=True, help="Allow a full (unsafe) pickle load of --sft-ckpt."
)
@click.option(
    "--output-dir",
    "--output_dir",
    "output_dir",
    required=False,
    type=click.Path(file_okay=False),
    help="Where checkpoints and metrics go.",
)
@click.option("--overwrite", is_flag=True, help="Write over checkpoints already in --output-dir.")
@click.option(
    "--rce-epochs",
    "--rce_epochs",
    "rce_epochs",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
)
@click.option(
    "--grpo-epochs",
    "--grpo_epochs",
    "grpo_epochs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
)
@click.option(
    "--batch-size",
    "--batch_size",
    "batch_size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Queries per optimiser step.",
)
@click.option("--rce-lr", "--rce_lr", "rce_lr", type=float, default=1e-4, show_default=True)
@click.option("--grpo-lr", "--grpo_lr", "grpo_lr", type=float, default=1e-5, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option(
    "--rce-temp-start",
    "--rce_temp_start",
    "rce_temp_start",
    type=float,
    default=2.0,
    show_default=True,
)
@click.option(
    "--rce-temp-end", "--rce_temp_end", "rce_temp_end", type=float, default=0.5, show_default=True
)
@click.option("--kl-beta", "--kl_beta", "kl_beta", type=float, default=0.1, show_default=True)
@click.option(
    "--clip-epsilon", "--clip_epsilon", "clip_epsilon", type=float, default=0.2, show_default=True
)
@click.option("--early-top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--late-top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--early-epochs", type=click.IntRange(min=0), default=1, show_default=True)
@click.option(
    "--hidden-dim",
    type=click.IntRange(min=1),
    default=None,
    help="Policy width (default 256, or the --sft-ckpt's).",
)
@click.option(
    "--num-layers",
    "--num_layers",
    "num_layers",
    type=click.IntRange(min=1),
    default=None,
    help="Cross-attention layers (default 1, or the --sft-ckpt's).",
)
@data_options
@click.option(
    "--val-ratio",
    "--val_ratio",
    "val_ratio",
    type=float,
    default=0.2,
    show_default=True,
    help="Share of queries (the highest ids) kept for validation.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write the prepared cache next to --beam-data.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--deterministic",
    is_flag=True,
    help="Deterministic algorithms only (also on CUDA); slower on GPU.",
)
@click.option(
    "--max-bad-steps",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Stop after this many consecutive steps with a non-finite loss or gradient.",
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=None,
    help="Keep only the newest N epoch checkpoints (default: all).",
)
@click.option(
    "--best-metric",
    default=None,
    metavar="NAME",
    help="Also keep the best epoch by this validation metric as best.safetensors.",
)
@click.option("--best-mode", type=click.Choice(["max", "min"]), default="max", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@plugin_options
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    default=None,
    metavar="RUN_DIR",
    help="Continue the run in RUN_DIR from its newest snapshot, with its options.",
)
@click.option("--rce_use_raw_reward", is_flag=True, help="Same as --plugin raw-reward.")
@click.option(
    "--rce_use_normalized_reward", is_flag=True, help="Same as --plugin normalized-reward."
)
@click.option("--freeze_backbone_in_grpo", is_flag=True, help="Same as --plugin freeze-backbone.")
@user_errors
def train(**opts: Any) -> None:
    """Train on RL data: reference log-probs, RCE epochs, then GRPO epochs."""
    from .trainer import SNAPSHOT_NAME, StopRequested, Trainer

    options = dict(opts)
    snapshot = None
    if opts["resume"]:
        opts, snapshot, original = resume_run(Path(opts["resume"]))
    else:
        for name, flag in (
            ("beam_data", "--beam-data"),
            ("img_emb", "--img-emb"),
            ("output_dir", "--output-dir"),
        ):
            if not opts[name]:
                raise click.UsageError(f"Missing option '{flag}'.")
    enable = plugin_choices(opts["plugins_on"], {k: opts[k] for k in ALIAS_FLAGS})
    plugins = load_plugins(enable, opts["plugins_off"], warn=warn)
    device = resolve_device(opts["device"])
    if opts.get("deterministic"):
        make_deterministic()
    output_dir = Path(opts["output_dir"])
    check_output_dir(output_dir, opts["overwrite"])

    table, report = load_data(opts, plugins)
    for line in report.lines():
        click.echo(line)
    emb = load_embeddings(opts["img_emb"], opts["cand_emb"], opts["emb_key"])
    check_ids_in_range(table, emb)
    train_table, val_table = split_train_val(table, opts["val_ratio"])
    click.echo(
        f"split: {len(train_table)} train / {len(val_table)} validation queries, "
        f"S = {table.seq_len}, d = {emb.dim}"
    )

    torch.manual_seed(opts["seed"])
    model, ckpt_lines = build_model(
        emb.dim, opts["hidden_dim"], opts["num_layers"], opts["sft_ckpt"], opts["trust_checkpoint"]
    )
    for line in ckpt_lines:
        click.echo(line)
    config = TrainConfig(
        rce_epochs=opts["rce_epochs"],
        grpo_epochs=opts["grpo_epochs"],
        batch_size=opts["batch_size"],
        rce_lr=opts["rce_lr"],
        grpo_lr=opts["grpo_lr"],
        weight_decay=opts["weight_decay"],
        grad_clip=opts["grad_clip"],
        rce_tau_start=opts["rce_temp_start"],
        rce_tau_end=opts["rce_temp_end"],
        kl_beta=opts["kl_beta"],
        clip_epsilon=opts["clip_epsilon"],
        early_epochs=opts["early_epochs"],
        early_top_k=opts["early_top_k"],
        late_top_k=opts["late_top_k"],
        seed=opts["seed"],
        device=device,
        max_bad_steps=opts["max_bad_steps"],
        keep_last=opts["keep_last"],
        best_metric=opts["best_metric"],
        best_mode=opts["best_mode"],
    )
    click.echo(
        f"plugins: {', '.join(plugins.names) or 'none'}; device {device}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    data_hash = report.source_sha256 or file_fingerprint(opts["beam_data"])
    emb_hash = file_fingerprint(opts["img_emb"], opts["cand_emb"])
    fingerprint = hashlib.sha256(f"{data_hash}:{emb_hash}".encode()).hexdigest()
    run_metadata = {"data_fingerprint": fingerprint, "beam_data": str(opts["beam_data"])}
    trainer = Trainer(config, model, train_table, val_table, emb, plugins, output_dir, run_metadata)
    trainer.resolve_rewards()  # a plugin conflict stops the run before anything is written
    if snapshot is not None:
        if original.get("data_fingerprint") != fingerprint:
            raise LeverError(
                f"--resume: the data files changed since the run in {output_dir} "
                "started (their fingerprint differs); resume needs the same data"
            )
    else:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeverError(
                f"--output-dir: cannot create {output_dir} ({exc.strerror or exc})"
            ) from None
        run_config = {
            "train_config": config.to_dict(),
            "model": model.config.to_dict(),
            "plugins": plugins.versions(),
            **run_metadata,
            "options": options,
            "lever_trainer_version": __version__,
        }
        atomic_write_bytes(
            output_dir / "run_config.json",
            (json.dumps(run_config, indent=2, sort_keys=True) + "\n").encode(),
        )
    install_stop_handlers(trainer)
    try:
        state = trainer.fit(resume=snapshot)
    except StopRequested as stop:
        click.echo(
            f"stopped by {stop.reason} after phase {stop.phase} epoch {stop.epoch} step "
            f"{stop.step}; snapshot {output_dir / SNAPSHOT_NAME}",
            err=True,
        )
        click.echo(f"resume with: lever-train --resume {output_dir}", err=True)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        click.echo(
            f"interrupted at once; the newest complete snapshot is in {output_dir}, "
            f"resume with: lever-train --resume {output_dir}",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except LeverError as exc:
        if getattr(exc, "snapshot", None):
            raise LeverError(
                f"{exc}; a snapshot of the last completed step is in "
                f"{output_dir}, resume with: lever-train --resume {output_dir}"
            ) from None
        raise
    finally:
        restore_signal_handlers()
    if state.history:
        click.echo(f"done: {len(state.history)} epochs, checkpoints in {output_dir}")


#: Exit status after a clean stop on SIGINT/SIGTERM (a resumable snapshot was written).
EXIT_STOPPED = 3
#: Exit status after a second Ctrl-C stopped the run at once.
EXIT_INTERRUPTED = 130
_saved_handlers: dict[int, Any] = {}


def make_deterministic() -> None:
    """Torch flags for run-to-run identical results on CUDA as well as CPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def install_stop_handlers(trainer: Any) -> None:
    """SIGINT/SIGTERM: finish the step, write a snapshot, stop; a second SIGINT stops at once."""

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.stop_requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = name
        click.echo(
            f"\n{name}: finishing the current step, then writing a resumable snapshot "
            "(Ctrl-C again to stop at once)",
            err=True,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        _saved_handlers[sig] = signal.signal(sig, handler)


def restore_signal_handlers() -> None:
    """Put back the handlers :func:`install_stop_handlers` replaced."""
    while _saved_handlers:
        sig, old = _saved_handlers.popitem()
        signal.signal(sig, old)


def resume_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Options, snapshot and run config of the run in ``run_dir``, for --resume."""
    from .trainer import SNAPSHOT_NAME

    config_path, snap_path = run_dir / "run_config.json", run_dir / SNAPSHOT_NAME
    if not config_path.is_file():
        raise LeverError(f"--resume: {run_dir} has no run_config.json (not a lever-train run)")
    if not snap_path.is_file():
        raise LeverError(
            f"--resume: {run_dir} has no {SNAPSHOT_NAME} (the run stopped before "
            "its first snapshot; start it again)"
        )
    try:
        original = json.loads(config_path.read_text())
        opts = dict(original["options"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LeverError(f"{config_path}: unreadable run config ({exc})") from None
    try:
        snapshot = torch.load(snap_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LeverError(f"{snap_path}: unreadable snapshot ({exc})") from None
    for key in ("plugins_on", "plugins_off"):
        opts[key] = tuple(opts.get(key) or ())
    opts.update(output_dir=str(run_dir), overwrite=True, resume=str(run_dir))
    return opts, snapshot, original


@main.command("plugins")
def plugins_cmd() -> None:
    """List installed plugins: name, distribution, version, hooks, default state."""
    found = discover()
    if not found:
        click.echo("no plugins installed")
        return
    for p in found:
        dist = f"{p.distribution or '?'} {p.version or '?'}"
        if p.broken:
            click.echo(f"{p.name}  [{dist}]  BROKEN: {p.error}")
            continue
        default = "on by default" if p.enabled_by_default else "off by default"
        click.echo(f"{p.name}  [{dist}]  {default}")
        if p.description:
            click.echo(f"    {p.description}")
        click.echo(f"    hooks: {', '.join(p.hooks) or 'none'}")


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--queries", type=click.IntRange(min=5), default=400, show_default=True)
@click.option("--pool", type=click.IntRange(min=4), default=32, show_default=True)
@click.option("--dim", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def demo_data(out_dir: str, queries: int, pool: int, dim: int, seed: int) -> None:
    """Write a synthetic RL dataset with a learnable signal into OUT_DIR."""
    from .demo import DemoSpec, write_demo

    spec = DemoSpec(queries=queries, demos=max(3 * queries, pool), pool=pool, dim=dim, seed=seed)
    data_path, emb_path = write_demo(Path(out_dir), spec)
    click.echo(f"wrote {data_path} and {emb_path}")
    click.echo(
        f"train with: lever-train --beam-data {data_path} --img-emb {emb_path} "
        f"--output-dir runs/demo"
    )


@main.command("prepare")
@beam_data_option
@data_options
@plugin_options
@user_errors
def prepare(**opts: Any) -> None:
    """Convert RL data JSON into its prepared binary form, next to the file.

    Training reads the prepared form instead of the JSON whenever it was made from
    the same bytes (sha256) with the same data options; otherwise it rebuilds it.
    """
    plugins = load_plugins(opts["plugins_on"], opts["plugins_off"], warn=warn)
    _, report = load_data(opts, plugins)
    for line in report.lines():
        click.echo(line)
    if not report.cache:
        raise LeverError(f"{cache_path_for(opts['beam_data'])}: could not write the prepared form")


@main.command("select")
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(dir_okay=False),
    help="A checkpoint of this project (or any --sft-ckpt format).",
)
@beam_data_option
@embedding_options
@click.option(
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSON file to write: {query id: [global ids]}.",
)
@click.option(
    "--shots",
    type=click.IntRange(min=1),
    default=None,
    help="Demonstrations to pick per query (default: the data's S).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-checkpoint", is_flag=True)
@data_options
@plugin_options
@user_errors
def select_cmd(**opts: Any) -> None:
    """Pick demonstrations for every query of --beam-data with a trained policy."""
    from .select import select_demonstrations

    device = resolve_device(opts["device"])
    plugins = load_plugins(opts["plugins_on"], opts["plugins_off"], warn=warn)
    table, _ = load_data(opts, plugins)
    emb = load_embeddings(opts["img_emb"], opts["cand_emb"], opts["emb_key"])
    check_ids_in_range(table, emb)
    model, lines = build_model(emb.dim, None, None, opts["ckpt"], opts["trust_checkpoint"])
    for line in lines:
        click.echo(line)
    shots = opts["shots"] or table.seq_len
    if shots > int(table.pool_len.min()):
        raise LeverError(
            f"--shots {shots}: some query pools hold only {int(table.pool_len.min())} ids"
        )
    picks = select_demonstrations(model.to(device), table, emb, shots, opts["batch_size"], device)
    result = {str(q): p for q, p in zip(table.query_ids.tolist(), picks.tolist(), strict=True)}
    atomic_write_bytes(Path(opts["output"]), (json.dumps(result) + "\n").encode())
    click.echo(f"wrote {len(result)} selections to {opts['output']}")


@main.command("convert-checkpoint")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option(
    "--input-dim",
    type=click.IntRange(min=1),
    default=None,
    help="Embedding width d; must agree with SRC (default: read from SRC's weights).",
)
@click.option(
    "--num-heads",
    type=click.IntRange(min=1),
    default=None,
    help="Attention heads to record in the metadata (default: SRC's metadata, else 1).",
)
@click.option("--trust-checkpoint", is_flag=True, help="Allow a full (unsafe) pickle load of SRC.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@user_errors
def convert_checkpoint_cmd(
    src: str,
    dst: str,
    input_dim: int | None,
    num_heads: int | None,
    trust_checkpoint: bool,
    overwrite: bool,
) -> None:
    """Convert a starting checkpoint SRC into this project's safetensors DST.

    SRC may be a torch.save dict with model_state_dict, a Lightning .ckpt, a bare
    state dict or one of this project's checkpoints. Only the policy's weights are
    kept; DST's metadata records the model shape, SRC's path and sha256, and the
    ignored and missing keys. DST works as --sft-ckpt.
    """
    from .checkpoint import convert_checkpoint

    report = convert_checkpoint(
        src,
        dst,
        input_dim=input_dim,
        num_heads=num_heads,
        trust=trust_checkpoint,
        overwrite=overwrite,
        warn=warn,
    )
    for line in report.lines():
        click.echo(line)
