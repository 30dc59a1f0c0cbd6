"""``lever-train embed``: a dataset manifest -> the embedding table training reads."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import LeverError
from .params import EXIT_INTERRUPTED, table_command, user_errors, warn

#: Seconds between two progress lines when stderr is not a terminal.
PROGRESS_LINE_SECONDS = 30.0


def _progress(total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``(update(done), close())``: a tqdm bar on a terminal, else a line on stderr every
    :data:`PROGRESS_LINE_SECONDS` (a log file gets no bar redraws)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            desc="embed",
            unit="item",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )
        return (lambda done: bar.update(done - bar.n)), bar.close
    last = [time.monotonic()]

    def line(done: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] >= PROGRESS_LINE_SECONDS:
            last[0] = now
            warn(f"embed: {done}/{total} items")

    return line, lambda: None


def check_output(output: str, replace: bool) -> bool:
    """Refuse an ``--output`` that cannot be written, an existing file without
    ``--overwrite`` and a file not named ``*.safetensors`` (before any work); True when
    the table goes to standard output."""
    from ..fileio import FILE, STDOUT, output_kind

    kind = output_kind(output, "--output")
    if kind == FILE:
        if Path(output).suffix.lower() != ".safetensors":
            raise LeverError(
                f"--output: {output} must be named *.safetensors (the suffix decides how "
                "--img-emb reads a table)"
            )
        if Path(output).exists() and not replace:
            raise LeverError(f"--output: {output} already exists; pass --overwrite to replace it")
    return kind == STDOUT


def _identity(digest: str, model: str, modality: str, batch_size: int, rows: int) -> dict[str, str]:
    """What an unfinished embedding must share with the command that continues it (the
    same batches give the same bytes)."""
    return {
        "manifest_sha256": digest,
        "model": str(model),
        "modality": modality,
        "batch_size": str(batch_size),
        "rows": str(rows),
    }


def _kept(partial: Any, total: int) -> str:
    """Where the work done before a stop is kept, or "" when nothing is."""
    if partial is None or not partial.done:
        return ""
    return (
        f"{partial.done} of {total} items embedded are kept in {partial.folder}: run the "
        "same command again to continue"
    )


@table_command("embed")
@click.argument("manifest", type=click.Path(dir_okay=False))
@user_errors
def embed_cmd(
    manifest: str,
    model: str,
    table_output: str,
    modality: str,
    batch_size: int,
    device: str,
    save_every: int,
    replace: bool,
) -> None:
    """Embed a manifest's items with CLIP: the table --img-emb reads.

    MANIFEST is JSON Lines (id, image, question, answers); the table written to
    --output is what train, select and evaluate read with --img-emb: row i is the item
    with id i, each row of unit length.

    The whole manifest is checked (every line, every local image) before the model
    loads; URL images are fetched as they are embedded. The table is written once every
    item is embedded; until then the work done is kept in OUTPUT.partial/ every
    --save-every items, and running the same command again continues it (the table is
    the same, byte for byte). Needs the clip extra: pip install 'lever-trainer[clip]'.
    """
    from ..embed import (
        PartialEmbed,
        check_ids,
        embed_items,
        embedding_file,
        file_sha256,
        load_clip,
        require_clip,
    )
    from ..fileio import write_output
    from ..manifest import read_manifest
    from ..run import resolve_device

    to_stdout = check_output(table_output, replace)
    say = (lambda text: click.echo(text, err=True)) if to_stdout else click.echo
    require_clip()
    items = list(read_manifest(manifest).values())
    rows = check_ids(items, manifest)
    digest = file_sha256(manifest)
    where = resolve_device(device, warn)
    started = time.monotonic()
    partial = None
    if not to_stdout:  # a table for standard output is made in one go
        partial = PartialEmbed.beside(
            table_output, _identity(digest, model, modality, batch_size, rows)
        )
        if partial.parts():
            say(f"continuing the unfinished embedding kept in {partial.folder}")
    encoder = load_clip(model, where)
    if partial is not None:
        partial.model_revision(encoder.revision)
    update, close = _progress(len(items))
    try:
        result = embed_items(
            items, encoder, modality, batch_size, manifest, rows, update, partial, save_every
        )
    except (KeyboardInterrupt, LeverError) as exc:
        close()
        kept = _kept(partial, len(items))
        if isinstance(exc, LeverError):
            raise LeverError(f"{exc}{'; ' + kept if kept else ''}") from None
        click.echo(f"interrupted{'; ' + kept if kept else ''}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        close()
    write_output(table_output, embedding_file(result, encoder, modality, digest), "--output")
    if partial is not None:
        partial.remove()
    seconds = time.monotonic() - started
    notes = [modality, model, where, f"{seconds:.1f} s"]
    if 0 < result.images < len(items):
        notes.append(f"{result.images} distinct images")
    padding = rows - len(items)
    if padding:
        notes.append(f"{padding} row{'s' if padding > 1 else ''} of padding for absent ids")
    say(
        f"wrote {'standard output' if to_stdout else table_output}: {len(items)} items, "
        f"[{rows}, {result.table.shape[1]}] ({', '.join(notes)})"
    )
    if result.cut_texts:
        warn(
            f"warning: {result.cut_texts} questions were longer than the model's "
            f"{encoder.max_text_tokens} tokens and were cut to fit"
        )
