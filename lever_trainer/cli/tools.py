"""The smaller commands: plugins, demo-data, plot, prepare, export-verdicts,
convert-checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import LeverError
from ..plan import Settings
from .group import installed_plugins
from .params import given_options, table_command, user_errors, warn


@click.command("plugins")
def plugins_cmd() -> None:
    """List installed plugins: name, distribution, version, hooks, options, default state."""
    found = installed_plugins()
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
        if p.policies:
            click.echo(f"    policies: {', '.join(p.policies)}")
        aliases = [*p.enable_flags, *(f"{f} (= --no-plugin)" for f in p.disable_flags)]
        if aliases:
            click.echo(f"    aliases: {', '.join(aliases)}")
        if p.options:
            shown = ", ".join(
                f"{o.name} (removed: {o.extra['removed']})"
                if o.extra.get("removed")
                else f"{o.name} ({o.default!r})"
                if o.type != "bool"
                else o.name
                for o in p.options
            )
            click.echo(f"    options: {shown}")


@table_command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@user_errors
def demo_data(out_dir: str, n_queries: int, pool: int, dim: int, data_seed: int) -> None:
    """Write a synthetic RL dataset with a learnable signal into OUT_DIR."""
    from ..demo import DemoSpec, demo_train_command, write_demo

    spec = DemoSpec(
        queries=n_queries, demos=max(3 * n_queries, pool), pool=pool, dim=dim, seed=data_seed
    )
    data_path, emb_path = write_demo(Path(out_dir), spec)
    click.echo(f"wrote {data_path} and {emb_path}")
    click.echo(f"train with: {demo_train_command(data_path, emb_path)}")
    click.echo("then draw the curves: lever-train plot runs/demo")


@table_command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@user_errors
def plot_cmd(run_dirs: tuple[str, ...], picture: str | None, title: str | None) -> None:
    """Draw the curves of one or more runs (overlaid) from their metrics.jsonl and
    steps.jsonl: training and validation loss, KL and its weight, policy_reward@1
    against random and oracle, normalized_gain, and downstream judge_* metrics.

    Needs matplotlib: pip install 'lever-trainer[plot]'.
    """
    from ..plot import draw, read_run, run_names

    paths = [Path(d) for d in run_dirs]
    output = picture
    if output is None:
        if len(paths) > 1:
            raise LeverError("--output: name the picture to write when plotting several runs")
        output = str(paths[0] / "curves.png")
    runs = [read_run(p, n) for p, n in zip(paths, run_names(paths), strict=True)]
    for run in runs:
        for note in run.notes:
            click.echo(f"note: {note}", err=True)
    draw(runs, Path(output), title)
    click.echo(f"wrote {output} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


@table_command("prepare")
@click.pass_context
@user_errors
def prepare(ctx: click.Context, **opts: Any) -> None:
    """Convert RL data JSON into its prepared binary form, next to the file (or in
    --cache-dir).

    Training reads the prepared form instead of the JSON whenever it was made from
    the same bytes (sha256) with the same data options; otherwise it rebuilds it.
    """
    from ..run import activate_plugins, load_data

    s = Settings.from_options("prepare", opts)
    if not s.beam_data:
        raise LeverError("missing option --beam-data")
    plugins = activate_plugins(s, given_options(ctx, opts), warn)
    _, report = load_data(s, plugins, click.echo, warn)
    for line in report.lines():
        click.echo(line)
    if not report.cache:
        raise LeverError(f"{report.cache_path}: could not write the prepared form")


@table_command("export-verdicts")
@user_errors
def export_verdicts(
    store: str | None,
    judge_name: str,
    env_version: str | None,
    rl_output: str,
    export_shots: int | None,
) -> None:
    """Write the stored verdicts of one environment as RL data JSON: every judged sequence
    a logged candidate (gen_method "judge"), ready for offline training."""
    from ..fileio import STDOUT, output_kind, write_output
    from ..judge import VerdictStore, default_store_path, export_rl_data

    output = rl_output
    to_stdout = output_kind(output, "--output") == STDOUT
    path = Path(store) if store else default_store_path()
    if not path.is_file():
        raise LeverError(f"--store: {path} does not exist")
    verdicts = VerdictStore(path)
    versions = verdicts.versions(judge_name)
    if not versions:
        raise LeverError(f"--judge: {path} holds no verdicts of environment {judge_name!r}")
    if env_version is None:
        if len(versions) > 1:
            raise LeverError(
                f"--version: {path} holds {judge_name} versions {', '.join(sorted(versions))}; "
                "name one"
            )
        env_version = next(iter(versions))
    elif env_version not in versions:
        raise LeverError(f"--version: {path} holds no verdicts of {judge_name} {env_version}")
    doc = export_rl_data(verdicts, judge_name, env_version, export_shots)
    queries = sum(1 for k in doc if k.isdigit())
    if not queries:
        raise LeverError(
            f"--shots: {path} holds no sequence of {export_shots} demonstrations of "
            f"{judge_name} {env_version}"
        )
    written = sum(len(v["pointer_candidates"]) for k, v in doc.items() if k.isdigit())
    write_output(output, (json.dumps(doc) + "\n").encode(), "--output")
    click.echo(
        f"wrote {written} verdicts of {queries} queries "
        f"({judge_name} {env_version}) to {'standard output' if to_stdout else output}",
        err=to_stdout,
    )


@table_command("convert-checkpoint")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@user_errors
def convert_checkpoint_cmd(
    src: str,
    dst: str,
    input_dim: int | None,
    record_heads: int | None,
    trust_checkpoint: bool,
    replace: bool,
) -> None:
    """Convert a starting checkpoint SRC into this project's safetensors DST.

    SRC may be a torch.save dict with model_state_dict, a Lightning .ckpt, a bare
    state dict or one of this project's checkpoints. Only the policy's weights are
    kept; DST's metadata records the policy (name, width, options), SRC's path and
    sha256, and the ignored and missing keys. DST works as --sft-ckpt.
    """
    from ..checkpoint import convert_checkpoint
    from ..plugins import load_plugins
    from ..policies import FOREIGN_POLICY, build_policy

    plugins = load_plugins(warn=warn)
    report = convert_checkpoint(
        src,
        dst,
        input_dim=input_dim,
        num_heads=record_heads,
        trust=trust_checkpoint,
        overwrite=replace,
        warn=warn,
        build=lambda d, options: build_policy(plugins, FOREIGN_POLICY, d, options),
    )
    for line in report.lines():
        click.echo(line)


@table_command("serve-judge")
@click.argument("name", metavar="NAME")
@user_errors
def serve_judge_cmd(name: str, **opts: Any) -> None:
    """Serve the installed environment NAME over HTTP for `--judge remote --judge-url`.

    POST /judge takes {"query_ids": [...], "sequences": [[...], ...]} and answers
    {"verdicts": [...], "name": ..., "version": ...}; GET /health answers the name and
    version. With LEVER_JUDGE_TOKEN set, both require "Authorization: Bearer TOKEN".
    Needs the serve extra: pip install 'lever-trainer[serve]'.
    """
    from ..serve import Limits, serve_judge

    limits = Limits(
        max_body_bytes=int(opts.pop("max_body_mb") * 2**20),
        max_batch=opts.pop("max_batch"),
        threads=opts.pop("threads"),
    )
    host, port = opts.pop("host"), opts.pop("port")
    access_log, plugins_on = opts.pop("access_log"), opts.pop("plugins_on")
    serve_judge(name, opts, host, port, limits, plugins_on, access_log, click.echo, warn)
