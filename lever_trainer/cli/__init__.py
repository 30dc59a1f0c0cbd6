"""``lever-train``: the command line. It parses options and reports; runs are planned and
started in :mod:`lever_trainer.run`.

``lever-train [train] OPTIONS`` trains; ``lever-train plugins`` lists installed
plugins; ``lever-train demo-data DIR`` writes the synthetic demo dataset. Every
:class:`~lever_trainer.errors.LeverError` becomes one line on stderr and exit status 2.
The options of ``train``, ``prepare``, ``select`` and ``evaluate`` are generated from
the core's table (:mod:`lever_trainer.coreoptions`) and the plugins' ``add_options``
records, which are shown in ``--help`` under the plugin's name.
"""

from __future__ import annotations

from .collect import collect_cmd
from .embed import embed_cmd
from .group import installed_plugins, main
from .params import EXIT_INTERRUPTED, Number, click_option, user_errors, warn
from .tools import (
    convert_checkpoint_cmd,
    demo_data,
    export_verdicts,
    plot_cmd,
    plugins_cmd,
    prepare,
    serve_judge_cmd,
)
from .train import EXIT_STOPPED, train
from .use import SelectionWriter, evaluate_cmd, select_cmd

for _command in (
    train,
    plugins_cmd,
    demo_data,
    plot_cmd,
    prepare,
    select_cmd,
    evaluate_cmd,
    export_verdicts,
    convert_checkpoint_cmd,
    serve_judge_cmd,
    collect_cmd,
    embed_cmd,
):
    main.add_command(_command)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_STOPPED",
    "Number",
    "SelectionWriter",
    "click_option",
    "installed_plugins",
    "main",
    "user_errors",
    "warn",
]
