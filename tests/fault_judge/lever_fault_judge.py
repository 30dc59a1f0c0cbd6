"""Environment ``faulty``: the digits judge, failing on request, for the fault-injection
tests of the judge path (tests/test_judge_faults.py). Not installed: those tests put this
folder, with its ``.dist-info``, on ``PYTHONPATH`` of a ``lever-train`` subprocess.

``FAULT_JUDGE=KIND:N`` makes the call that would return the run's N-th verdict (counted
from 0 over the process) fail before answering:

* ``raise``: raises ``ConnectionError``;
* ``exit``: raises ``SystemExit(0)``;
* ``interrupt``: raises ``KeyboardInterrupt``;
* ``garbage``: answers ``{"correct": 1}`` for every sequence (no verdict field);
* ``hang``: writes ``FAULT_JUDGE_HUNG`` (a path) and sleeps for an hour.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lever_digits_env import DigitsEnvironment

from lever_trainer.api import Environment, hookimpl

ENABLED_BY_DEFAULT = True
DESCRIPTION = "environment `faulty`: the digits judge, failing on request (tests only)"


class FaultyEnvironment(Environment):
    """The digits judge, with one fault at a chosen verdict."""

    name, version = "faulty", "1"

    def __init__(self) -> None:
        self.inner = DigitsEnvironment()
        self.verdicts = 0

    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> Sequence[Mapping[str, Any]]:
        kind, _, at = os.environ.get("FAULT_JUDGE", "").partition(":")
        if kind and self.verdicts <= int(at) < self.verdicts + len(sequences):
            if kind == "raise":
                raise ConnectionError("model server went away")
            if kind == "exit":
                raise SystemExit(0)
            if kind == "interrupt":
                raise KeyboardInterrupt
            if kind == "garbage":
                return [{"correct": 1} for _ in sequences]
            if kind == "hang":
                Path(os.environ["FAULT_JUDGE_HUNG"]).write_text(str(os.getpid()))
                time.sleep(3600)
        self.verdicts += len(sequences)
        return self.inner.judge(query_ids, sequences)


@hookimpl
def environments() -> Mapping[str, Environment]:
    """The faulty judge."""
    return {"faulty": FaultyEnvironment()}
