"""The core's options: one table, from which everything else about them is derived.

Each core option is one :class:`~lever_trainer.options.Option` record, the same form a
plugin's ``add_options`` hook returns: its spellings, type, default, help, the
``lever-train`` commands that take it, what ``--resume`` may do with it and whether it
is a path. The command line's flags (every command's), ``--print-config``, config files
and ``LEVER_TRAIN_*`` variables, the resume rules, shell completion and the options
reference in the docs are all generated from this table and the plugins' records.

An option that means something different in two commands (``--output`` is the picks
of ``select`` but the report of ``evaluate``) is two records with disjoint
``commands``; within one command a ``dest`` names one record.

This module imports neither torch nor click.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .options import Option

#: The policy a run trains when ``--policy`` is not given (the quality task's best
#: offline recipe; see docs/quality.md).
DEFAULT_POLICY = "cosine-bilinear"

#: The commands whose options come from the table (others take only their arguments
#: and a few flags of their own).
TRAIN, PREPARE, SELECT, EVALUATE = "train", "prepare", "select", "evaluate"
DEMO, PLOT, EXPORT, CONVERT = "demo-data", "plot", "export-verdicts", "convert-checkpoint"
SERVE = "serve-judge"
COLLECT = "collect"
EMBED = "embed"
#: The commands that read RL data, run policies or judge; :class:`~lever_trainer.plan.Settings`
#: holds their options.
RUN_COMMANDS = (TRAIN, PREPARE, SELECT, EVALUATE, COLLECT)
#: Every command with options, each generated from this table.
TABLE_COMMANDS = (*RUN_COMMANDS, DEMO, PLOT, EXPORT, CONVERT, SERVE, EMBED)
_DATA = (TRAIN, PREPARE)
_EMB = (TRAIN, SELECT, EVALUATE)
_REWARDS = (TRAIN, PREPARE, EVALUATE)
_PLUGINS = (TRAIN, PREPARE, SELECT, EVALUATE, COLLECT)
#: The commands that judge through the run's judge (driver options, store).
_JUDGING = (TRAIN, EVALUATE, COLLECT)
_USE = (SELECT, EVALUATE)
#: The help group of the options that steer how values are read.
CONFIGURATION = "Configuration"

#: Reasons ``--resume`` gives when it refuses or applies an option.
DATA_FIXED = (
    "the run's data is fixed (a resumed run reads the same data; its fingerprint is checked)"
)
POLICY_FIXED = "the policy is fixed (its weights and shape are in the snapshot)"
PLUGINS_FIXED = "the run's plugins are fixed"
STEPS_FIXED = (
    "it would change how the remaining steps are computed; start a new run from one "
    "of this run's checkpoints (--sft-ckpt) to change it"
)
JUDGE_HOW = "it changes where the verdicts are computed, not what they are"
BEST_FIXED = "the best checkpoint so far was chosen by the run's own --best-metric and --best-mode"


def _data(*flags: str, **kw: object) -> Option:
    return _core(flags, resume="fixed", resume_reason=DATA_FIXED, **kw)


def _policy(*flags: str, **kw: object) -> Option:
    kw.setdefault("group", "Policy")
    return _core(flags, resume="fixed", resume_reason=POLICY_FIXED, **kw)


def _core(flags: Iterable[str], **kw: object) -> Option:
    kw.setdefault("resume", "fixed")
    return Option(flags=tuple(flags), **kw)  # type: ignore[arg-type]


#: Core records whose values code below the command line reads (``RECORD.of(options)``);
#: each is also a row of :data:`CORE_OPTIONS`. ``SELECT_SHOTS`` is the ``--shots`` of
#: ``select`` (no default: a policy falls back to its own).
VAL_RATIO = _data(
    "--val-ratio",
    "--val_ratio",
    type="float",
    default=0.2,
    min=0,
    max=1,
    max_open=True,
    group="Data",
    help="Share of queries kept for validation (see --val-split).",
)
IMG_EMB = _data(
    "--img-emb",
    "--img_emb",
    type="path",
    path_kind="file",
    group="Data",
    commands=_EMB,
    help="Embedding table [N, d]: .pt/.pth, .npy or .safetensors.  [required]",
)
CAND_EMB = _data(
    "--cand-emb",
    type="path",
    path_kind="file",
    group="Data",
    commands=(*_EMB, COLLECT),
    help="Separate candidate embedding table (default: --img-emb).",
)
EMB_KEY = _data(
    "--emb-key",
    group="Data",
    commands=(*_EMB, COLLECT),
    help="Tensor name inside a multi-tensor embedding file.",
)
POLICY_TEMPERATURE = _policy(
    "--policy-temperature",
    dest="temperature",
    type="float",
    min=0,
    min_open=True,
    help="Logit temperature tau_p of the pointer scores (default 0.1).",
)
LOG_EVERY = _core(
    ("--log-every",),
    type="int",
    min=1,
    default=10,
    metavar="N",
    group="Run",
    help="Log the step values (steps.jsonl, trackers) every N optimiser steps, and at "
    "the last step of every epoch.",
)
SELECT_SHOTS = _core(
    ("--shots",),
    type="int",
    min=1,
    group="Run",
    commands=(SELECT,),
    help="Demonstrations to pick per query (default: the checkpoint's S, else 2).",
)


CORE_OPTIONS: tuple[Option, ...] = (
    # ------------------------------------------------------------ configuration
    _core(
        ("--config",),
        type="path",
        path_kind="file",
        metavar="FILE",
        group="Configuration",
        resume="",
        help="Read option values from a TOML or JSON file (a run's run_config.json works: "
        "it repeats that run). Precedence: command line > LEVER_TRAIN_* environment > "
        "--config > --preset > defaults.",
    ),
    _core(
        ("--preset",),
        metavar="NAME",
        group="Configuration",
        resume="",
        help="Start from a bundled configuration (`upstream`: the reference algorithm of "
        "the project started from, every setting pinned).",
    ),
    _core(
        ("--print-config",),
        type="bool",
        group="Configuration",
        recorded=False,
        resume="",
        help="Print the resolved configuration as TOML (a valid --config file, each value "
        "with where it came from) and exit without training.",
    ),
    # ------------------------------------------------------------ data
    _data(
        "--beam-data",
        "--beam_data",
        type="path",
        path_kind="file",
        group="Data",
        commands=_DATA,
        help="RL data JSON (format: docs/algorithm.md#rl-data).  [required]",
    ),
    _data(
        "--queries",
        "--beam-data",
        "--beam_data",
        type="path",
        path_kind="file",
        group="Data",
        commands=_USE,
        help="Queries with candidate pools: RL data JSON (with or without logged sequences), "
        "a {query id: [pool ids]} JSON object, or JSON Lines.  [required]",
    ),
    _data(
        "--max-pool",
        "--max_pool",
        type="int",
        min=1,
        metavar="N",
        group="Data",
        commands=(TRAIN, PREPARE, SELECT, EVALUATE, COLLECT),
        help="Cut each query's pool to its first N ids (default: keep every pool whole; "
        "refused, naming this flag, when padding to the largest pool would not fit in "
        "memory).",
    ),
    _data(
        "--keep-fallback",
        "--no_skip_fallback_reward",
        type="bool",
        group="Data",
        commands=_DATA,
        help="Keep candidates whose evaluation fell back.",
    ),
    _data(
        "--require-positive-query",
        "--require_positive_query",
        dest="require_positive",
        type="bool",
        group="Data",
        commands=_DATA,
        help="Keep only queries with at least one vqa_correct == 1 candidate.",
    ),
    _core(
        ("--cache-dir",),
        type="path",
        path_kind="dir",
        metavar="DIR",
        group="Data",
        commands=_DATA,
        resume="apply",
        resume_reason="only decides where the prepared cache lives",
        help="Keep the prepared cache of --beam-data in DIR instead of beside the file "
        "(for read-only or shared datasets).",
    ),
    _data(
        "--gen-methods",
        "--gen_methods",
        metavar="LIST",
        group="Data",
        commands=_DATA,
        help="Keep only candidates of these gen_method values, comma-separated (e.g. beam,sample).",
    ),
    _data(
        "--reward-mode",
        "--reward_mode",
        default="hard_plus_soft",
        group="Rewards",
        commands=_REWARDS,
        help="Raw-reward formula, from a plugin.",
    ),
    _data(
        "--hard-weight",
        "--hard_weight",
        type="float",
        default=1.0,
        group="Rewards",
        commands=_REWARDS,
        help="wh: weight of vqa_correct.",
    ),
    _data(
        "--soft-weight",
        "--soft_weight",
        type="float",
        default=1.0,
        group="Rewards",
        commands=_REWARDS,
        help="ws: weight of vqa_acc_score / vqa_gt_prob.",
    ),
    _data(
        "--rel-weight",
        "--rel_weight",
        type="float",
        default=0.1,
        group="Rewards",
        commands=_REWARDS,
        help="wl: weight of vqa_rel_score.",
    ),
    _data(
        "--normalize",
        "--normalize_method",
        default="z_score_clamp",
        group="Rewards",
        commands=_DATA,
        help="Group normaliser, from a plugin.",
    ),
    VAL_RATIO,
    _data(
        "--val-split",
        type="choice",
        choices=("random", "last"),
        default="random",
        group="Data",
        help="Which queries validate: random (drawn with --split-seed) or last (the highest "
        "query ids, the same split for every seed).",
    ),
    _data(
        "--split-seed",
        type="int",
        min=0,
        max=2**63 - 1,
        metavar="N",
        group="Data",
        help="Seed of the random validation split (default: --seed, so each seed also "
        "draws its own split).",
    ),
    _core(
        ("--no-cache",),
        type="bool",
        group="Data",
        resume="apply",
        resume_reason="only decides whether the prepared cache is used",
        help="Neither read nor write the prepared cache next to --beam-data.",
    ),
    IMG_EMB,
    CAND_EMB,
    EMB_KEY,
    # ------------------------------------------------------------ policy
    _policy(
        "--policy",
        default=DEFAULT_POLICY,
        metavar="NAME",
        help="The policy to train, built by a plugin (see `lever-train plugins`).",
    ),
    _policy(
        "--hidden-dim",
        "--hidden_dim",
        type="int",
        min=1,
        help="Policy width (default 256, or the --sft-ckpt's).",
    ),
    _policy(
        "--num-layers",
        "--num_layers",
        type="int",
        min=1,
        max=64,
        help="Cross-attention layers (default 1, or the --sft-ckpt's).",
    ),
    _policy(
        "--num-heads",
        "--num_heads",
        type="int",
        min=1,
        help="Attention heads (default 1); must divide the width.",
    ),
    _policy(
        "--dropout",
        type="float",
        min=0,
        max=1,
        max_open=True,
        help="Dropout on the query state and item keys in training (default 0.5).",
    ),
    _policy(
        "--attn-dropout",
        "--attn_dropout",
        type="float",
        min=0,
        max=1,
        max_open=True,
        help="Dropout on the attention weights in training (default 0.1).",
    ),
    POLICY_TEMPERATURE,
    _policy(
        "--sft-ckpt",
        "--sft_ckpt",
        type="path",
        path_kind="file",
        help="Starting checkpoint (safetensors, torch.save dict, Lightning .ckpt).",
    ),
    _policy(
        "--ckpt",
        type="path",
        path_kind="file",
        commands=(SELECT,),
        help="A checkpoint of this project (or any --sft-ckpt format).  [required]",
    ),
    _policy(
        "--trust-checkpoint",
        type="bool",
        commands=(TRAIN, SELECT, EVALUATE, CONVERT),
        help="Allow a full (unsafe) pickle load of the checkpoints this command reads "
        "(--sft-ckpt, --ckpt, evaluate's CHECKPOINTS, convert-checkpoint's SRC).",
    ),
    _policy(
        "--partial-load",
        type="bool",
        help="Start from an --sft-ckpt that lacks some of the policy's weights: those start "
        "from the --seed initialisation (listed in the log). Not needed for a checkpoint of "
        "another policy (its missing modules are expected).",
    ),
    # ------------------------------------------------------------ run
    _core(
        ("--output-dir", "--output_dir"),
        type="path",
        path_kind="dir",
        group="Run",
        resume_reason="a resumed run writes into its own directory",
        help="Where checkpoints and metrics go.  [required]",
    ),
    _core(
        ("--output",),
        type="path",
        path_kind="file",
        group="Run",
        commands=(SELECT,),
        help="Where the picks go: {query id: [global ids]} JSON, or JSON Lines (*.jsonl).  "
        "[required]",
    ),
    _core(
        ("--output",),
        type="path",
        path_kind="file",
        group="Run",
        commands=(EVALUATE,),
        help="Also write the results as JSON here.",
    ),
    _core(
        ("--baselines",),
        default="random,cosine,cosine-reversed,start,best",
        metavar="LIST",
        group="Run",
        commands=(EVALUATE,),
        help="Comma-separated: random, cosine, cosine-reversed, start (the first "
        "checkpoint's starting policy), best; '' for none.",
    ),
    SELECT_SHOTS,
    _core(
        ("--shots",),
        type="int",
        min=1,
        group="Run",
        commands=(EVALUATE,),
        help="Demonstrations per query (default: the data's S, else the checkpoint's).",
    ),
    _core(
        ("--scores",),
        type="bool",
        group="Run",
        commands=(SELECT,),
        help="Also write each pick's probability at its step.",
    ),
    _core(
        ("--overwrite",),
        type="bool",
        group="Run",
        resume_reason="it would remove the run being resumed",
        help="Remove the files of a previous run in --output-dir (checkpoints, metrics, "
        "snapshot, run_config.json; nothing else) before this run writes.",
    ),
    _core(
        ("--batch-size", "--batch_size"),
        type="int",
        min=1,
        default=32,
        group="Run",
        resume_reason=STEPS_FIXED,
        help="Queries per optimiser step.",
    ),
    _core(
        ("--batch-size",),
        type="int",
        min=1,
        default=512,
        group="Run",
        commands=_USE,
        help="Queries per forward pass.",
    ),
    _core(
        ("--weight-decay", "--weight_decay"),
        type="float",
        min=0,
        default=0.01,
        group="Run",
        resume_reason=STEPS_FIXED,
        help="AdamW weight decay of every phase.",
    ),
    _core(
        ("--grad-clip", "--grad_clip"),
        type="float",
        min=0,
        min_open=True,
        default=1.0,
        group="Run",
        resume_reason=STEPS_FIXED,
        help="Gradient-norm clip of every step.",
    ),
    _core(
        ("--seed",),
        type="int",
        min=0,
        max=2**63 - 1,
        default=42,
        group="Run",
        resume_reason=STEPS_FIXED,
        help="Seed of the initialisation, dropout, the query order, sampling, and the "
        "random validation split (unless --split-seed).",
    ),
    _core(
        ("--device",),
        default="auto",
        group="Run",
        commands=(TRAIN, SELECT, EVALUATE, EMBED),
        resume="apply",
        resume_reason="runs on the new device",
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N; asking for CUDA "
        "without it is an error.",
    ),
    LOG_EVERY,
    _core(
        ("--deterministic",),
        type="bool",
        group="Run",
        resume="apply",
        resume_reason="applies from now on",
        help="Deterministic algorithms only (also on CUDA); slower on GPU.",
    ),
    _core(
        ("--max-bad-steps",),
        type="int",
        min=1,
        default=10,
        group="Run",
        resume="apply",
        resume_reason="applies from now on",
        help="Stop after this many consecutive steps with a non-finite loss or gradient.",
    ),
    _core(
        ("--keep-last",),
        type="int",
        min=1,
        group="Run",
        resume="apply",
        resume_reason="applies to the checkpoints written from now on",
        help="Keep only the newest N epoch checkpoints (default: all).",
    ),
    _core(
        ("--best-metric",),
        metavar="NAME",
        group="Run",
        resume_reason=BEST_FIXED,
        help="The metric that chooses best.safetensors among the starting policy and the "
        "epochs (default: judge_correct@greedy with --judge, else policy_reward@1).",
    ),
    _core(
        ("--best-mode",),
        type="choice",
        choices=("max", "min"),
        default="max",
        group="Run",
        resume_reason=BEST_FIXED,
        help="Whether a larger or smaller --best-metric is better.",
    ),
    _core(
        ("--best-rule",),
        type="choice",
        choices=("paired", "value"),
        default="paired",
        group="Run",
        resume_reason=BEST_FIXED,
        help="paired: an epoch becomes best.safetensors only when it beats the best so far "
        "beyond the noise (paired 95 % interval over the validation queries); value: "
        "whenever its --best-metric value is better.",
    ),
    _core(
        ("--resume",),
        type="path",
        path_kind="dir",
        metavar="RUN_DIR",
        group="Run",
        resume="",
        help="Continue the run in RUN_DIR from its newest snapshot, with its options; more "
        "epochs (e.g. --rce-epochs 8) extend it, and other options are applied where sound "
        "or refused.",
    ),
    # ------------------------------------------------------------ judge
    _core(
        ("--judge",),
        metavar="NAME",
        group="Judge",
        commands=(TRAIN, EVALUATE),
        help="Downstream judge (an environment plugin): validation then also judges "
        "the policy's free greedy selection; online phases use it.",
    ),
    _core(
        ("--store",),
        type="path",
        path_kind="file",
        group="Judge",
        commands=(*_JUDGING, EXPORT),
        help="SQLite verdict store shared by runs (default: "
        "$XDG_CACHE_HOME/lever-train/verdicts.sqlite).",
    ),
    _core(
        ("--no-store",),
        type="bool",
        group="Judge",
        commands=_JUDGING,
        help="Keep verdicts in memory only.",
    ),
    _core(
        ("--judge-timeout",),
        type="float",
        min=0,
        default=0.0,
        metavar="SECONDS",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason="applies to the judge's calls from now on",
        help="Give up a call to the judge that takes longer (asked again up to "
        "--judge-retries times, then the run fails with a snapshot to resume from); "
        "0: no limit. A stop signal ends the wait at once either way.",
    ),
    _core(
        ("--judge-batch-size",),
        type="int",
        default=None,
        min=1,
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason="applies to the judge's calls from now on",
        help="Sequences per call to the judge (default: the environment's choice; "
        "in-process judges take a whole round at once).",
    ),
    _core(
        ("--judge-concurrency",),
        type="int",
        default=1,
        min=1,
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason="applies to the judge's calls from now on",
        help="Calls to the judge in flight at once.",
    ),
    _core(
        ("--judge-retries",),
        type="int",
        default=3,
        min=0,
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason="applies to the judge's calls from now on",
        help="Times a call that failed for a transient reason (a timeout, a lost "
        "connection) is asked again, with exponential backoff and jitter.",
    ),
    _core(
        ("--judge-max-rps",),
        type="float",
        default=0.0,
        min=0,
        metavar="CALLS",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason="applies to the judge's calls from now on",
        help="At most this many calls (batches) to the judge started per second; 0: no limit.",
    ),
    _core(
        ("--judge-max-calls",),
        type="int",
        default=0,
        min=0,
        metavar="VERDICTS",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason="a budget of the resumed process's own",
        help="Budget: verdicts this process may ask of the judge (retries count); a run "
        "that would exceed it stops with a resumable snapshot; 0: no limit.",
    ),
    _core(
        ("--judge-backend",),
        type="choice",
        choices=("local", "ray"),
        default="local",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason=JUDGE_HOW,
        help="Where the judge runs: local (in this process) or ray (in --judge-workers "
        "Ray actors, each holding one instance of the environment; needs "
        "pip install 'lever-trainer[ray]').",
    ),
    _core(
        ("--judge-workers",),
        type="int",
        default=1,
        min=1,
        metavar="N",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason=JUDGE_HOW,
        help="With --judge-backend ray: Ray actors judging at once, each with its own "
        "environment (also the least --judge-concurrency).",
    ),
    _core(
        ("--judge-gpus-per-worker",),
        type="float",
        default=0.0,
        min=0,
        metavar="GPUS",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason=JUDGE_HOW,
        help="With --judge-backend ray: GPUs Ray reserves for each worker (a fraction "
        "shares a GPU; 0: none).",
    ),
    _core(
        ("--ray-address",),
        metavar="ADDRESS",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason=JUDGE_HOW,
        help="With --judge-backend ray: join the Ray cluster at this address (e.g. auto, "
        "or ray://host:10001); default: start a local cluster for the run.",
    ),
    _core(
        ("--ray-start-timeout",),
        type="float",
        default=600.0,
        min=0,
        min_open=True,
        metavar="SECONDS",
        group="Judge",
        commands=_JUDGING,
        resume="apply",
        resume_reason=JUDGE_HOW,
        help="With --judge-backend ray: how long the actors may take to start (each loads "
        "its environment, e.g. a model; a joined cluster may first have to grow) before "
        "the run stops.",
    ),
    # ------------------------------------------------------------ collect
    _core(
        ("--judge",),
        metavar="NAME",
        group="Judge",
        commands=(COLLECT,),
        help="The environment (a plugin) that judges every sequence collected (required, "
        "except with --merge).",
    ),
    _core(
        ("--img-emb",),
        type="path",
        path_kind="file",
        group="Data",
        commands=(COLLECT,),
        help="Embedding table [N, d] (.pt/.pth, .npy or .safetensors); needed by --cosine "
        "and --beam-candidates, which rank pool items by cosine similarity to the query.",
    ),
    _core(
        ("--shots",),
        type="int",
        min=1,
        default=2,
        group="Collect",
        commands=(COLLECT,),
        help="S: demonstrations in each collected sequence.",
    ),
    _core(
        ("--beam-size",),
        type="int",
        min=1,
        default=5,
        metavar="B",
        group="Collect",
        commands=(COLLECT,),
        help="Sequences kept after each step of the beam search; the B final ones are "
        "written (gen_method beam, beam_rank 0 = best).",
    ),
    _core(
        ("--beam-score",),
        type="choice",
        choices=("vqa_gt_prob", "vqa_acc_score", "vqa_correct", "vqa_rel_score"),
        default="vqa_gt_prob",
        group="Collect",
        commands=(COLLECT,),
        help="The verdict field the beam search ranks by (higher is better; ties go to the "
        "sequence whose pool positions come first).",
    ),
    _core(
        ("--beam-candidates",),
        type="int",
        min=1,
        metavar="K",
        group="Collect",
        commands=(COLLECT,),
        help="Extend the beams only with the K pool items most cosine-similar to the query "
        "(needs --img-emb); default: every pool item. Bounds the judge calls per query.",
    ),
    _core(
        ("--random",),
        dest="random_sequences",
        type="int",
        min=0,
        default=0,
        metavar="N",
        group="Collect",
        commands=(COLLECT,),
        help="Also judge and write N ordered sequences of S distinct pool items drawn "
        "uniformly (gen_method random; seeded by --seed and the query id).",
    ),
    _core(
        ("--cosine",),
        dest="cosine_sequences",
        type="bool",
        group="Collect",
        commands=(COLLECT,),
        help="Also judge and write the S pool items most cosine-similar to the query, most "
        "similar first (gen_method cosine) and last (cosine-reversed); needs --img-emb.",
    ),
    _core(
        ("--seed",),
        type="int",
        min=0,
        max=2**63 - 1,
        default=0,
        group="Collect",
        commands=(COLLECT,),
        help="Seed of the --random draws.",
    ),
    _core(
        ("--shard",),
        metavar="I/N",
        group="Collect",
        commands=(COLLECT,),
        help="Collect only part I of N (0 <= I < N): the queries at positions I, I+N, "
        "I+2N, ... in query-id order; join the parts with --merge.",
    ),
    _core(
        ("--merge",),
        type="bool",
        group="Collect",
        commands=(COLLECT,),
        help="Join the outputs of collect runs (the arguments, e.g. the parts of a "
        "--shard run) into one RL data file; judges nothing.",
    ),
    _core(
        ("--output", "-o"),
        type="path",
        path_kind="file",
        group="Run",
        commands=(COLLECT,),
        help="RL data JSON to write (replaced atomically; - for standard output).  [required]",
    ),
    # ------------------------------------------------------------ plugins
    _core(
        ("--plugin",),
        dest="plugins_on",
        multiple=True,
        metavar="NAME",
        group="Plugins",
        commands=(*_PLUGINS, SERVE),
        resume_reason=PLUGINS_FIXED,
        help="Enable an installed plugin (repeatable).",
    ),
    _core(
        ("--no-plugin",),
        dest="plugins_off",
        multiple=True,
        metavar="NAME",
        group="Plugins",
        commands=_PLUGINS,
        resume_reason=PLUGINS_FIXED,
        help="Disable a plugin that is on by default (repeatable).",
    ),
)


# ------------------------------------------------------------ the smaller commands
_SMALL: tuple[Option, ...] = (
    Option(
        ("--queries",), "int", 400, "Number of queries.", dest="n_queries", min=5, commands=(DEMO,)
    ),
    Option(("--pool",), "int", 32, "Candidate demonstrations per query.", min=4, commands=(DEMO,)),
    Option(("--dim",), "int", 64, "Embedding width.", min=2, commands=(DEMO,)),
    Option(("--seed",), "int", 0, "Seed of the dataset.", dest="data_seed", commands=(DEMO,)),
    Option(
        ("--output", "-o"),
        "path",
        None,
        "Picture to write: .png, .svg or .pdf (default: RUN_DIR/curves.png for one run).",
        dest="picture",
        path_kind="file",
        commands=(PLOT,),
    ),
    Option(("--title",), "str", None, "A title above the panels.", commands=(PLOT,)),
    # ------------------------------------------------------------ serve-judge
    Option(("--host",), "str", "127.0.0.1", "Address to listen on.", commands=(SERVE,)),
    Option(("--port",), "int", 8000, "Port to listen on.", min=1, max=65535, commands=(SERVE,)),
    Option(
        ("--threads",),
        "int",
        8,
        "Batches judged at once (worker threads calling the environment); 1 for an "
        "environment that is not thread-safe.",
        min=1,
        commands=(SERVE,),
    ),
    Option(
        ("--max-batch",),
        "int",
        4096,
        "Most (query, sequence) pairs in one request; more is refused (413).",
        min=1,
        commands=(SERVE,),
    ),
    Option(
        ("--max-body-mb",),
        "float",
        16.0,
        "Largest request body in MiB; a larger one is refused (413).",
        min=0,
        min_open=True,
        commands=(SERVE,),
    ),
    Option(("--access-log",), "bool", False, "Log one line per request.", commands=(SERVE,)),
    Option(
        ("--judge",),
        "str",
        None,
        "Environment whose verdicts to export.",
        dest="judge_name",
        metavar="NAME",
        required=True,
        commands=(EXPORT,),
    ),
    Option(
        ("--version",),
        "str",
        None,
        "Its version (default: the only one stored).",
        dest="env_version",
        commands=(EXPORT,),
    ),
    Option(
        ("--output",),
        "path",
        None,
        "RL data JSON to write.",
        dest="rl_output",
        path_kind="file",
        required=True,
        commands=(EXPORT,),
    ),
    Option(
        ("--shots",),
        "int",
        None,
        "Export only the sequences of this many demonstrations (needed when the store "
        "holds several lengths, as after lever-train collect).",
        dest="export_shots",
        min=1,
        commands=(EXPORT,),
    ),
    Option(
        ("--input-dim",),
        "int",
        None,
        "Embedding width d; must agree with SRC (default: read from SRC's weights).",
        min=1,
        commands=(CONVERT,),
    ),
    Option(
        ("--num-heads",),
        "int",
        None,
        "Attention heads to record in the metadata (default: SRC's metadata, else 1).",
        dest="record_heads",
        min=1,
        commands=(CONVERT,),
    ),
    Option(
        ("--overwrite",),
        "bool",
        False,
        "Replace DST if it exists.",
        dest="replace",
        commands=(CONVERT,),
    ),
)

# ------------------------------------------------------------ embed
_EMBED_OPTIONS: tuple[Option, ...] = (
    Option(
        ("--model",),
        "str",
        None,
        "CLIP model: a Hugging Face hub name (read from the local cache, else downloaded) "
        "or a folder holding one (save_pretrained).",
        metavar="NAME_OR_PATH",
        required=True,
        commands=(EMBED,),
    ),
    Option(
        ("--output",),
        "path",
        None,
        "The embedding table to write (*.safetensors; --img-emb of train, select, evaluate).",
        dest="table_output",
        path_kind="file",
        required=True,
        commands=(EMBED,),
    ),
    Option(
        ("--modality",),
        "choice",
        "image",
        "What each row embeds: the image, the question (text), or both side by side "
        "(twice the width; the cosine of two rows is the mean of their image and text "
        "cosines).",
        choices=("image", "text", "both"),
        commands=(EMBED,),
    ),
    Option(
        ("--batch-size",),
        "int",
        32,
        "Items per forward pass of the model.",
        min=1,
        commands=(EMBED,),
    ),
    Option(
        ("--save-every",),
        "int",
        4096,
        "Keep the work done every this many items (whole batches) in OUTPUT.partial/, "
        "so that the same command, run again after an interruption, continues it.",
        metavar="ITEMS",
        min=1,
        commands=(EMBED,),
    ),
    Option(
        ("--overwrite",),
        "bool",
        False,
        "Replace --output if it exists.",
        dest="replace",
        commands=(EMBED,),
    ),
)
CORE_OPTIONS = CORE_OPTIONS + _SMALL + _EMBED_OPTIONS


def options_of(command: str, table: Iterable[Option] = CORE_OPTIONS) -> list[Option]:
    """The records ``command`` takes, in table order."""
    return [o for o in table if command in o.commands]


def by_dest(command: str = TRAIN) -> dict[str, Option]:
    """``{dest: record}`` of ``command``'s core options."""
    return {o.dest: o for o in options_of(command)}


def defaults(command: str = TRAIN) -> dict[str, object]:
    """``{dest: default}`` of ``command``'s core options."""
    return {o.dest: (() if o.multiple else o.default) for o in options_of(command)}


def path_dests(options: Iterable[Option]) -> set[str]:
    """The dests of ``options`` whose values are file or folder paths."""
    return {o.dest for o in options if o.type == "path"}


def control_dests(command: str = TRAIN) -> tuple[str, ...]:
    """Options that steer how the values are read (the ``Configuration`` group): never
    counted as given, never in a config."""
    return tuple(o.dest for o in options_of(command) if o.group == CONFIGURATION)


def resume_rules(command: str = TRAIN) -> Mapping[str, Option]:
    """``{dest: record}`` of the core options ``--resume`` applies or refuses."""
    return {o.dest: o for o in options_of(command) if o.resume}


__all__ = [
    "CORE_OPTIONS",
    "DEFAULT_POLICY",
    "RUN_COMMANDS",
    "TABLE_COMMANDS",
    "by_dest",
    "control_dests",
    "defaults",
    "options_of",
    "path_dests",
    "resume_rules",
]
