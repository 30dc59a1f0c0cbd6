"""Log the run to MLflow. Off by default.

``--plugin mlflow`` logs to ``--mlflow-tracking-uri``, else to ``MLFLOW_TRACKING_URI``
when set, else to a local file store in ``OUTPUT_DIR/mlruns`` (no server needed: view
it with ``mlflow ui --backend-store-uri OUTPUT_DIR/mlruns``, from the full ``mlflow``
package). The run goes into experiment ``--mlflow-experiment`` (``lever-trainer``),
named ``--mlflow-run-name`` (default: the output folder's name). Needs
``mlflow-skinny`` (or ``mlflow``): ``pip install 'lever-trainer[mlflow]'``.

MLflow accepts metric names of letters, digits and ``_ - . / space``: ``@`` becomes
``_at_`` (``epoch/policy_reward_at_1``), any other character ``_``. The run's options are
its parameters (values cut to 500 characters, MLflow's limit in older servers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lever_trainer.api import LeverError, Option, TrainState

from ._trackers import Session, TrackerPlugin, run_params

#: MLflow's limit on a parameter value in older servers (newer ones take more).
PARAM_LIMIT = 500


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts it: ``@`` -> ``_at_``, other invalid characters -> ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key.replace("@", "_at_"))


class MlflowSession(Session):
    """An active MLflow run, logged through an ``MlflowClient``."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None,
        params: Mapping[str, str],
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment)
            )
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            for key, value in params.items():
                self.client.log_param(self.run_id, metric_name(key), value[:PARAM_LIMIT])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        import time

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        assert self.run_id is not None
        self.client.set_terminated(self.run_id, status="FINISHED")


MLFLOW_TRACKING_URI = Option(
    ("--mlflow-tracking-uri",),
    "str",
    None,
    "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file store in OUTPUT_DIR/mlruns).",
    metavar="URI",
)
MLFLOW_EXPERIMENT = Option(
    ("--mlflow-experiment",),
    "str",
    "lever-trainer",
    "MLflow experiment name (created when missing).",
    metavar="NAME",
)
MLFLOW_RUN_NAME = Option(
    ("--mlflow-run-name",),
    "str",
    None,
    "MLflow run name (default: the output folder's name).",
    metavar="NAME",
)


class MlflowPlugin(TrackerPlugin):
    """The ``mlflow`` plugin."""

    NAME = "mlflow"
    DESCRIPTION = (
        "log steps, epochs and options to MLflow, a local file store by default (extra: mlflow)"
    )
    LIBRARY = "mlflow"
    EXTRA = "mlflow"

    def options(self) -> Sequence[Option]:
        return [
            MLFLOW_TRACKING_URI,
            MLFLOW_EXPERIMENT,
            MLFLOW_RUN_NAME,
        ]

    def open(self, state: TrainState, run_id: str | None) -> Session:
        uri = MLFLOW_TRACKING_URI.of(state.options) or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The file store needs no server; MLflow 3 asks for an explicit opt-in to it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (state.output_dir / "mlruns").absolute().as_uri()
        name = MLFLOW_RUN_NAME.of(state.options) or state.output_dir.absolute().name
        try:
            return MlflowSession(
                uri, str(MLFLOW_EXPERIMENT.of(state.options)), name, run_id, run_params(state)
            )
        except Exception as exc:  # the library's own errors: a bad URI, a refused server
            raise LeverError(f"plugin mlflow: cannot start a run at {uri}: {exc}") from None


plugin: Any = MlflowPlugin()
