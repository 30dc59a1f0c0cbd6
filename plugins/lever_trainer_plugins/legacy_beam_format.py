"""Read the legacy beam format (docs/algorithm.md#rl-data). On by default.

``{"<query id>": {"id_list": [[icd_1, ..., icd_S, query id], ...], "score_list": [...]}}``:
each beam lists the global ids of its demonstrations followed by the query itself,
and its score is the raw reward. The file is recognised by its first query, which
must carry ``id_list``; anything else is left to the RL data JSON reader.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lever_trainer.api import About, LeverError, hookimpl, iter_object_members


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="read legacy beam files ({qid: {id_list, score_list}}) as RL data",
        enabled_by_default=True,
    )


def _is_query_key(key: str) -> bool:
    key = key.strip()
    return key.isascii() and key.isdigit()  # "²".isdigit() is True, int("²") fails


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        return False


def convert(members: Iterable[tuple[str, Any]], path: Path) -> Iterator[tuple[str, Any]]:
    """Legacy members -> RL data members: one beam candidate per id list, raw reward = score."""
    for key, value in members:
        if not _is_query_key(key):
            yield key, value
            continue
        where = f"{path}: query {key}"
        if not isinstance(value, Mapping):
            raise LeverError(f"{where}: expected an object with id_list and score_list")
        ids, scores = value.get("id_list"), value.get("score_list")
        if not isinstance(ids, list) or not isinstance(scores, list):
            raise LeverError(f"{where}: legacy beam format needs lists 'id_list' and 'score_list'")
        if len(ids) != len(scores):
            raise LeverError(
                f"{where}: 'id_list' has {len(ids)} beams but 'score_list' has {len(scores)} scores"
            )
        cands = []
        for j, (beam, score) in enumerate(zip(ids, scores, strict=True)):
            if not isinstance(beam, list) or len(beam) < 2:
                raise LeverError(
                    f"{where} candidate {j}: a beam lists its demonstrations and then the query id"
                )
            if beam[-1] != int(key):
                raise LeverError(
                    f"{where} candidate {j}: a beam must end with its query id "
                    f"{int(key)}, found {beam[-1]!r}"
                )
            if not _finite_number(score):
                raise LeverError(
                    f"{where} candidate {j}: 'score_list' holds {score!r}, expected a finite number"
                )
            cands.append(
                {"pointer": beam[:-1], "raw_reward": score, "gen_method": "beam", "beam_rank": j}
            )
        yield key, {"pointer_candidates": cands}


@hookimpl
def read_rl_data(path: Path) -> Iterable[tuple[str, Any]] | None:
    """Answer only for files whose first query carries ``id_list``."""
    members = iter_object_members(path)
    head: list[tuple[str, Any]] = []
    try:
        for key, value in members:
            head.append((key, value))
            if _is_query_key(key):
                break
    except LeverError:
        members.close()
        return None  # let the RL data reader report what is wrong with the file
    if not head or not isinstance(head[-1][1], Mapping) or "id_list" not in head[-1][1]:
        members.close()
        return None
    return convert(itertools.chain(head, members), path)
