"""Wall time of the commands a shell runs often: ``lever-train --help``, ``--version``,
a completion request, ``train --help`` and a mistyped option value (a one-line error),
and whether each imports torch (the last two read the plugin-option cache, which the
first command that discovers the plugins writes).

Not a test. ``python bench/cli_startup.py [--repeat N]`` runs each command N times
(default 10) in fresh processes and prints the median and best wall time, and whether
``python -X importtime`` shows torch among the imports. Run it on two revisions (or
see bench/compare_revisions.py) to compare.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "lever-train --help": (["--help"], {}),
    "lever-train --version": (["--version"], {}),
    "complete `lever-train tr`": (
        [],
        {
            "_LEVER_TRAIN_COMPLETE": "bash_complete",
            "COMP_WORDS": "lever-train tr",
            "COMP_CWORD": "1",
        },
    ),
    "lever-train train --help": (["train", "--help"], {}),
    "lever-train --rce-epochs x (error)": (["--rce-epochs", "x"], {}),
    "complete `lever-train train --rce`": (
        [],
        {
            "_LEVER_TRAIN_COMPLETE": "bash_complete",
            "COMP_WORDS": "lever-train train --rce",
            "COMP_CWORD": "2",
        },
    ),
}


def entry() -> list[str]:
    """The ``lever-train`` console script run with this interpreter, as installed."""
    return [
        sys.executable,
        "-c",
        'from lever_trainer.cli import main; main(prog_name="lever-train")',
    ]


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [*entry(), *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return time.perf_counter() - started


def imports_torch(args: list[str], env: dict[str, str]) -> bool:
    cmd = [sys.executable, "-X", "importtime", *entry()[1:], *args]
    done = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    return any(re.search(r"\|\s+torch$", line.rstrip()) for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    opts = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {opts.repeat} runs each, fresh processes")
    print(f"{'command':38} {'median s':>9} {'best s':>7}  torch imported")
    for name, (args, env) in COMMANDS.items():
        times = [timed(args, env) for _ in range(opts.repeat)]
        print(
            f"{name:38} {statistics.median(times):9.3f} {min(times):7.3f}  "
            f"{'yes' if imports_torch(args, env) else 'no'}"
        )


if __name__ == "__main__":
    main()
