"""``lever-train collect``: judged demonstration sequences for every query, as RL data."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..errors import Interrupted, JudgeStopped, LeverError
from ..plan import Settings
from .params import EXIT_INTERRUPTED, given_options, kept_verdicts, table_command, user_errors, warn


class CollectProgress:
    """Verdicts done of the whole collect run: a bar on a terminal, else a line on
    stderr every ``every`` seconds. Cached verdicts count as done."""

    def __init__(self, total: int, name: str, every: float) -> None:
        self.total, self.name, self.every = total, name, every
        self.base = 0
        self.last = time.monotonic()
        self.bar: Any = None
        if sys.stderr.isatty() and total > 1:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=f"collect ({name})",
                unit="verdict",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def within_round(self, progress: Any) -> None:
        """The judge's progress inside a round (``RoundProgress``)."""
        self._show(self.base + progress.cache_hits + progress.done)

    def round_done(self, judged: int) -> None:
        """A round of ``judged`` sequences has returned."""
        self.base += judged
        self._show(self.base)

    def _show(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last >= self.every and done < self.total:
            self.last = now
            click.echo(f"collect ({self.name}): {done}/{self.total} verdicts", err=True)

    def close(self) -> None:
        """End the bar (if any); a second call does nothing."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


#: Exit status of a collect stopped by a signal (as a stopped training run's).
EXIT_STOPPED = 3


@contextmanager
def _stop_on_signal(judge: Any) -> Iterator[None]:
    """SIGINT/SIGTERM: the wait for the judge ends (the batches that returned are
    stored); a second SIGINT interrupts at once."""
    requested: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if requested and signum == signal.SIGINT:
            raise Interrupted
        requested.append(signal.Signals(signum).name)

    judge.stop_reason = lambda: requested[0] if requested else None
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _json_bytes(doc: Any) -> bytes:
    """The document as strict JSON: a verdict field that is not a finite number (one an
    environment could not give) is written as null."""
    from ..fileio import json_safe

    return (json.dumps(json_safe(doc), allow_nan=False) + "\n").encode()


def _merge(inputs: tuple[str, ...], output: str) -> None:
    from ..collect import merge_parts
    from ..fileio import STDOUT, output_kind, write_output

    to_stdout = output_kind(output, "--output") == STDOUT
    parts = []
    for name in inputs:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LeverError(f"{name}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LeverError(f"{name}: cannot read ({exc})") from None
        try:
            parts.append((name, json.loads(text)))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise LeverError(f"{name}: not valid JSON ({exc})") from None
    doc = merge_parts(parts)
    write_output(output, _json_bytes(doc), "--output")
    n = doc["_meta"]["queries"]
    where = "standard output" if to_stdout else output
    click.echo(f"merged {len(parts)} parts: {n} queries written to {where}", err=to_stdout)


def _summary(judge: Any, queries: int, planned: int, started: float) -> str:
    cost = judge.cost
    stored = cost.cache_hits
    return (
        f"judge {judge.name} {judge.version}: {cost.asked} verdicts for {queries} queries "
        f"(planned {planned}, {planned / max(queries, 1):.1f} per query); {cost.calls} asked "
        f"of the environment in {cost.batches} calls ({cost.retries} retries, "
        f"{cost.seconds:.1f} s judging), {stored} already known (store or memory); "
        f"{time.monotonic() - started:.1f} s in all"
    )


@table_command("collect")
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False), metavar="POOLS|PART...")
@click.pass_context
@user_errors
def collect_cmd(ctx: click.Context, inputs: tuple[str, ...], **opts: Any) -> None:
    """Judge demonstration sequences for every query of POOLS and write them as RL data.

    A beam search per query over ordered sequences of --shots distinct pool items,
    ranked by the judge's --beam-score; optionally --random and --cosine sequences too.
    Every verdict goes through the verdict store, so a collect run again (after a
    kill, or with more queries) asks the judge only what it has not answered. With
    --merge, the arguments are the outputs of --shard runs, joined into one file.
    POOLS is a query file as select reads it (RL data, {query id: [pool ids]} JSON,
    or JSON Lines).
    """
    from ..collect import (
        SOURCE,
        CollectSpec,
        check_pools,
        collect,
        parse_shard,
        query_verdicts,
        shard_rows,
    )
    from ..data import check_pool_ids, load_embeddings, load_pools
    from ..fileio import STDOUT, output_kind, write_output
    from ..judge import PROGRESS_LOG_SECONDS
    from ..run import activate_plugins, close_judge, make_judge

    s = Settings.from_options("collect", opts)
    if not s.output:
        raise LeverError("missing option --output")
    if s.merge:
        if s.shard:
            raise LeverError("--merge joins the parts of a --shard run: leave out --shard")
        _merge(inputs, s.output)
        return
    if len(inputs) != 1:
        raise LeverError(
            f"expected one POOLS file, got {len(inputs)} arguments (to join the outputs of "
            "--shard runs, add --merge)"
        )
    if not s.judge:
        raise LeverError("missing option --judge (the environment that judges the sequences)")
    spec = CollectSpec(
        shots=s.shots or 2,
        beam_size=s.beam_size,
        score=s.beam_score,
        candidates=s.beam_candidates,
        random=s.random_sequences,
        cosine=s.cosine_sequences,
        seed=s.seed,
    )
    if spec.needs_embeddings and not s.img_emb:
        flag = "--cosine" if spec.cosine else "--beam-candidates"
        raise LeverError(f"{flag} ranks pool items by cosine similarity: give --img-emb")
    shard = parse_shard(s.shard) if s.shard else None
    output = s.output
    to_stdout = output_kind(output, "--output") == STDOUT
    say = (lambda m: click.echo(m, err=True)) if to_stdout else click.echo
    pools_path = inputs[0]
    if not Path(pools_path).is_file():
        raise LeverError(f"{pools_path}: file not found")
    pools = load_pools(pools_path, s.max_pool)
    check_pools(pools, spec, pools_path)
    emb = None
    if s.img_emb:
        emb = load_embeddings(s.img_emb, s.cand_emb, s.emb_key)
        check_pool_ids(pools, emb, pools_path)
    total_queries = len(pools)
    if shard is not None:
        import torch

        pools = pools.select(torch.tensor(shard_rows(len(pools), *shard), dtype=torch.long))
    plugins = activate_plugins(s, given_options(ctx, opts), warn)
    s = s.replace(plugin_values={**plugins.option_defaults(), **s.plugin_values})
    judge = make_judge(s, plugins, warn)
    assert judge is not None
    started = time.monotonic()
    planned = sum(query_verdicts(int(n), spec) for n in pools.pool_len.tolist())
    part = f" (shard {shard[0]}/{shard[1]} of {total_queries})" if shard else ""
    where = judge.store.path if judge.store is not None else "memory only (--no-store)"
    say(
        f"collect: {len(pools)} queries{part}, {spec.beam_size} beams of {spec.shots}, "
        f"{planned} sequences to judge ({planned / max(len(pools), 1):.1f} per query) with "
        f"{judge.name} {judge.version}; verdicts: {where}"
    )
    progress = CollectProgress(planned, judge.name, PROGRESS_LOG_SECONDS)
    judge.progress = progress.within_round
    kept = kept_verdicts(judge)
    try:
        with _stop_on_signal(judge):
            doc = collect(judge, pools, emb, spec, progress.round_done)
    except JudgeStopped as stop:
        progress.close()  # before the line, so that the bar does not overwrite it
        click.echo(f"stopped by {stop.reason}; {kept}", err=True)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"interrupted; {kept}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        progress.close()
        close_judge(judge)
    meta: dict[str, Any] = {
        "source": SOURCE,
        "env": judge.name,
        "env_version": judge.version,
        **spec.meta(),
        "max_pool": s.max_pool,
        "queries": len(doc),
    }
    if shard is not None:
        meta["shard"] = f"{shard[0]}/{shard[1]}"
    write_output(output, _json_bytes({"_meta": meta, **doc}), "--output")
    say(_summary(judge, len(doc), planned, started))
    candidates = sum(len(v["pointer_candidates"]) for v in doc.values())
    say(
        f"wrote {len(doc)} queries ({candidates} candidate sequences) to "
        f"{'standard output' if to_stdout else output}"
    )
