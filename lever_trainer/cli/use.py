"""``lever-train select`` and ``lever-train evaluate``: use trained policies."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click

from ..errors import LeverError
from .params import given_options, table_command, user_errors, warn


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


@table_command("select")
@click.pass_context
@user_errors
def select_cmd(ctx: click.Context, **opts: Any) -> None:
    """Pick demonstrations for every query of a query file with a trained policy.

    The policy's free greedy selection over each query's whole pool (no logged
    sequences needed); a policy with a STOP item may pick fewer than --shots.
    """
    from ..checkpoint import header_metadata
    from ..data import check_pool_ids, iter_pools, load_embeddings
    from ..fileio import STDOUT, open_output, output_kind
    from ..policies import policy_from_checkpoint, recorded_policy
    from ..run import activate_plugins, resolve_device
    from ..select import select_greedy

    for name, flag in (
        ("ckpt", "--ckpt"),
        ("queries", "--queries"),
        ("img_emb", "--img-emb"),
        ("output", "--output"),
    ):
        if not opts.get(name):
            raise LeverError(f"missing option {flag}")
    output = opts["output"]
    to_stdout = output_kind(output, "--output") == STDOUT
    say = functools.partial(click.echo, err=to_stdout)  # the picks may own stdout
    queries = Path(opts["queries"])
    if not queries.is_file():
        raise LeverError(f"{queries}: file not found")
    device = resolve_device(opts["device"], warn)
    plugins = activate_plugins(opts, given_options(ctx, opts), warn)
    emb = load_embeddings(opts["img_emb"], opts["cand_emb"], opts["emb_key"])
    model, lines = policy_from_checkpoint(
        plugins, opts["ckpt"], emb.dim, opts["trust_checkpoint"], warn
    )
    for line in lines:
        say(line)
    shots = opts["shots"]
    if shots is None:
        recorded = recorded_policy(header_metadata(opts["ckpt"]))
        shots = int((recorded[1] if recorded else {}).get("shots") or 2)
    model = model.to(device)
    # Streamed: queries are read, selected and written a piece at a time, so memory
    # stays flat in the number of queries. A regular --output file appears only once
    # every query is done (an error midway leaves any previous file as it was).
    with open_output(output, "--output") as fh:
        writer = SelectionWriter(fh, output, opts["scores"])
        for pools in iter_pools(queries, opts["max_pool"], chunk=max(opts["batch_size"], 1024)):
            check_pool_ids(pools, emb, opts["queries"])
            short = pools.pool_len < shots
            if bool(short.any()):
                row = int(short.nonzero()[0, 0])
                raise LeverError(
                    f"--shots {shots}: query {int(pools.query_ids[row])}'s pool holds only "
                    f"{int(pools.pool_len[row])} ids"
                )
            try:
                selection = select_greedy(
                    model, pools, emb, shots, opts["batch_size"], device, opts["scores"]
                )
            except LeverError as exc:
                raise LeverError(f"{opts['ckpt']}: {exc}") from None
            writer.write(selection)
        writer.close()
    say(f"wrote {writer.count} selections to {'standard output' if to_stdout else output}")


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
    from ..assess import BASELINES, evaluate, has_logged_sequences
    from ..data import load_embeddings
    from ..fileio import STDOUT, output_kind, write_output
    from ..run import activate_plugins, load_data, make_judge, resolve_device

    for name, flag in (("queries", "--queries"), ("img_emb", "--img-emb")):
        if not opts.get(name):
            raise LeverError(f"missing option {flag}")
    to_stdout = False
    if opts["output"]:
        to_stdout = output_kind(opts["output"], "--output") == STDOUT
    say = functools.partial(click.echo, err=to_stdout)  # the JSON may own stdout
    baselines = [b.strip() for b in opts["baselines"].split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise LeverError(
            f"--baselines: unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})"
        )
    if not checkpoints and not opts.get("judge"):
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
    device = resolve_device(opts["device"], warn)
    plugins = activate_plugins(opts, given_options(ctx, opts), warn)
    settings = {
        **plugins.option_defaults(),
        **opts,
        "beam_data": opts["queries"],
        "keep_fallback": False,
        "gen_methods": None,
        "require_positive": False,
        "normalize": "z_score_clamp",
        "no_cache": True,
        "val_ratio": 0.0,
    }
    judge = make_judge(settings, plugins, warn)
    queries = Path(opts["queries"])
    if not queries.is_file():
        raise LeverError(f"{queries}: file not found")
    table = None
    if has_logged_sequences(queries):
        table, _ = load_data(settings, plugins, say, warn)
    emb = load_embeddings(opts["img_emb"], opts["cand_emb"], opts["emb_key"])
    report = evaluate(
        plugins,
        list(checkpoints),
        queries,
        emb,
        judge,
        baselines,
        table,
        opts["shots"],
        opts["max_pool"],
        opts["batch_size"],
        device,
        opts["trust_checkpoint"],
        say,
    )
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
    if opts["output"]:
        write_output(opts["output"], (report.to_json() + "\n").encode(), "--output")
        say(f"wrote {'standard output' if to_stdout else opts['output']}")
