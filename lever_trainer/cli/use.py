"""``lever-train select`` and ``lever-train evaluate``: use trained policies."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import LeverError
from ..plan import Settings
from .params import EXIT_INTERRUPTED, given_options, kept_verdicts, table_command, user_errors, warn


class SelectionWriter:
    """Writes picks as they are made: JSON ``{qid: [ids]}`` (or ``{qid: {"ids",
    "scores"}}``), or JSON Lines when the output's name ends in ``.jsonl``."""

    def __init__(self, fh: Any, output: str, scores: bool) -> None:
        self.fh, self.scores, self.count = fh, scores, 0
        self.lines = Path(output).suffix.lower() in (".jsonl", ".ndjson")

    def write(self, selection: Any) -> None:
        """Append one piece of picks."""
        rows = zip(selection.query_ids, selection.picks, selection.scores, strict=True)
        parts = []
        for q, p, s in rows:
            if self.lines:
                record = {"query_id": q, "ids": p, **({"scores": s} if self.scores else {})}
                parts.append(json.dumps(record) + "\n")
            else:
                value = {"ids": p, "scores": s} if self.scores else p
                parts.append(("{" if self.count == 0 else ", ") + f'"{q}": {json.dumps(value)}')
            self.count += 1
        self.fh.write("".join(parts).encode())

    def close(self) -> None:
        """End the document (an empty selection is ``{}``)."""
        if not self.lines:
            self.fh.write(("{}\n" if self.count == 0 else "}\n").encode())


def _required(s: Settings, *names: tuple[str, str]) -> None:
    for dest, flag in names:
        if not getattr(s, dest):
            raise LeverError(f"missing option {flag}")


def check_not_snapshot(path: str, flag: str) -> None:
    """A training run's resume snapshot given where a checkpoint is expected: say what
    to pass instead."""
    from ..snapshot import SNAPSHOT_NAME

    if Path(path).name == SNAPSHOT_NAME:
        folder = Path(path).parent
        raise LeverError(
            f"{flag}: {path} is the resume snapshot of a training run (for lever-train "
            f"--resume {folder}), not a checkpoint; pass one of that run's checkpoints "
            f"instead, e.g. {folder / 'best.safetensors'}"
        )


@table_command("select")
@click.pass_context
@user_errors
def select_cmd(ctx: click.Context, **opts: Any) -> None:
    """Pick demonstrations for every query of a query file with a trained policy.

    The policy's free greedy selection over each query's whole pool (no logged
    sequences needed); a policy with a STOP item may pick fewer than --shots.
    """
    from ..checkpoint import header_metadata
    from ..data import load_embeddings
    from ..fileio import STDOUT, output_kind
    from ..policies import policy_from_checkpoint, recorded_policy
    from ..run import activate_plugins, resolve_device

    s = Settings.from_options("select", opts)
    _required(s, ("ckpt", "--ckpt"), ("queries", "--queries"), ("img_emb", "--img-emb"))
    _required(s, ("output", "--output"))
    assert s.ckpt and s.queries and s.img_emb and s.output
    check_not_snapshot(s.ckpt, "--ckpt")
    to_stdout = output_kind(s.output, "--output") == STDOUT
    say = functools.partial(click.echo, err=to_stdout)  # the picks may own stdout
    if not Path(s.queries).is_file():
        raise LeverError(f"{s.queries}: file not found")
    device = resolve_device(s.device, warn)
    plugins = activate_plugins(s, given_options(ctx, opts), warn)
    emb = load_embeddings(s.img_emb, s.cand_emb, s.emb_key)
    model, lines = policy_from_checkpoint(plugins, s.ckpt, emb.dim, s.trust_checkpoint, warn)
    for line in lines:
        say(line)
    shots = s.shots
    if shots is None:
        recorded = recorded_policy(header_metadata(s.ckpt))
        shots = int((recorded[1] if recorded else {}).get("shots") or 2)
    count = write_picks(s, model.to(device), emb, shots, device)
    say(f"wrote {count} selections to {'standard output' if to_stdout else s.output}")


def write_picks(s: Settings, model: Any, emb: Any, shots: int, device: str) -> int:
    """Select for every query of ``s.queries`` and write the picks to ``s.output``.

    Streamed: queries are read, selected and written a piece at a time, so memory
    stays flat in the number of queries. A regular --output file appears only once
    every query is done (an error midway leaves any previous file as it was).
    """
    from ..data import check_pool_ids, iter_pools
    from ..fileio import open_output
    from ..select import select_greedy

    assert s.output is not None and s.queries is not None
    with open_output(s.output, "--output") as fh:
        writer = SelectionWriter(fh, s.output, s.scores)
        for pools in iter_pools(Path(s.queries), s.max_pool, chunk=max(s.batch_size, 1024)):
            check_pool_ids(pools, emb, s.queries)
            short = pools.pool_len < shots
            if bool(short.any()):
                row = int(short.nonzero()[0, 0])
                raise LeverError(
                    f"--shots {shots}: query {int(pools.query_ids[row])}'s pool holds only "
                    f"{int(pools.pool_len[row])} ids"
                )
            try:
                selection = select_greedy(model, pools, emb, shots, s.batch_size, device, s.scores)
            except LeverError as exc:
                raise LeverError(f"{s.ckpt}: {exc}") from None
            writer.write(selection)
        writer.close()
    return writer.count


def _baselines(ctx: click.Context, s: Settings, checkpoints: tuple[str, ...]) -> list[str]:
    """The baselines evaluate measures, checked against what there is to measure."""
    from ..assess import BASELINES

    baselines = [b.strip() for b in s.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise LeverError(
            f"--baselines: unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})"
        )
    if not checkpoints and not s.judge:
        raise LeverError("nothing to measure: give checkpoints, or --judge NAME for the baselines")
    if "start" in baselines and not checkpoints:
        if ctx.get_parameter_source("baselines") != click.core.ParameterSource.DEFAULT:
            raise LeverError(
                "--baselines start: the starting policy is rebuilt from a checkpoint's "
                "metadata; give a checkpoint, or leave start out"
            )
        baselines.remove("start")  # the default list: measured when there is a checkpoint
    if not checkpoints and not baselines:
        raise LeverError("--baselines: nothing to measure: give checkpoints or baselines")
    return baselines


@table_command("evaluate")
@click.argument("checkpoints", nargs=-1, type=click.Path(dir_okay=False))
@click.pass_context
@user_errors
def evaluate_cmd(ctx: click.Context, checkpoints: tuple[str, ...], **opts: Any) -> None:
    """Compare checkpoints and baselines on a query file, side by side.

    With --judge, the downstream verdicts of each selector's free greedy selection
    (judge_correct, judge_reward); where the file has logged sequences, the offline
    metrics of the policies too. A table on screen; --output writes it as JSON.
    """
    from ..assess import evaluate, has_logged_sequences
    from ..data import load_embeddings
    from ..fileio import STDOUT, output_kind
    from ..run import activate_plugins, close_judge, load_data, make_judge, resolve_device

    s = Settings.from_options("evaluate", opts)
    _required(s, ("queries", "--queries"), ("img_emb", "--img-emb"))
    assert s.queries and s.img_emb
    queries, img_emb = Path(s.queries), s.img_emb
    for path in checkpoints:
        check_not_snapshot(path, "evaluate")
    to_stdout = bool(s.output) and output_kind(s.output or "", "--output") == STDOUT
    say = functools.partial(click.echo, err=to_stdout)  # the JSON may own stdout
    baselines = _baselines(ctx, s, checkpoints)
    device = resolve_device(s.device, warn)
    plugins = activate_plugins(s, given_options(ctx, opts), warn)
    # the query file is read as it is: no filters, no split, no prepared cache
    s = s.replace(
        beam_data=s.queries,
        no_cache=True,
        val_ratio=0.0,
        plugin_values={**plugins.option_defaults(), **s.plugin_values},
    )
    judge = make_judge(s, plugins, warn)
    try:
        if not queries.is_file():
            raise LeverError(f"{queries}: file not found")
        logged = has_logged_sequences(queries)
        if not logged and judge is None:
            raise LeverError(
                f"{queries} holds pools only (no logged sequences to score offline): "
                "evaluate needs a judge to measure selections on it (--judge NAME)"
            )
        table = load_data(s, plugins, say, warn)[0] if logged else None
        emb = load_embeddings(img_emb, s.cand_emb, s.emb_key)
        report = evaluate(
            plugins,
            list(checkpoints),
            queries,
            emb,
            judge,
            baselines,
            table,
            s.shots,
            s.max_pool,
            s.batch_size,
            device,
            s.trust_checkpoint,
            say,
        )
        show_report(report, s, queries, baselines, judge, say, to_stdout)
    except KeyboardInterrupt:
        kept = f"; {kept_verdicts(judge)}" if judge is not None else ""
        click.echo(f"interrupted{kept}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        close_judge(judge)  # the Ray actors of --judge-backend ray


def show_report(
    report: Any,
    s: Settings,
    queries: Path,
    baselines: list[str],
    judge: Any,
    say: Any,
    to_stdout: bool,
) -> None:
    """Print evaluate's table (and write it with --output)."""
    from ..fileio import write_output

    if not report.selectors:
        raise LeverError(
            f"nothing was measured on {queries} (baselines {', '.join(baselines)}): "
            "give a checkpoint, or baselines that apply"
        )
    say(f"{report.n_queries} queries of {queries}, {report.steps} demonstrations each")
    for line in report.table():
        say(line)
    for note in report.notes:
        say(f"note: {note}")
    if judge is not None:
        calls = sum(judge.calls.values())
        say(f"judge: {judge.name} {judge.version}, {calls} new verdicts")
    if s.output:
        write_output(s.output, (report.to_json() + "\n").encode(), "--output")
        say(f"wrote {'standard output' if to_stdout else s.output}")
