"""MLflow tracking for the centre: one MLflow run per federation (a resumed federation continues its MLflow run).

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server), else an embedded SQLite store
``<checkpoint-dir>/mlflow.db`` with artifacts in ``<checkpoint-dir>/mlartifacts`` (MLflow 3 deprecates the plain
file store). Metric keys:

- ``train/<name>``, ``eval/<name>``: aggregated over sites (weighted by ``num-examples``), step = global round;
- ``<site>/train/<name>``, ``<site>/eval/<name>``: what each site reported, including ``num-examples``;
- ``external/<name>``: the evaluate-only sites' scores of the round's global model (the external hospital);
- ``benchmark/<name>``: the centre's own evaluation on a public benchmark set (``external-data``), when set;
- ``round/<name>``: wall time, sites that replied, bytes sent and received.

Logging runs on a background thread: importing MLflow and creating the SQLite schema take seconds that the
federation should not wait for, and a broken tracking store logs one warning instead of stopping the run.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from braintumnet.extras import require
from braintumnet.tracking import experiment_id as find_or_create_experiment, tracking_uri

log = logging.getLogger("braintumnet.server")

_STOP = object()


def metric_key(*parts: str) -> str:
    """An MLflow-safe key: letters, digits, ``_ - . /`` and spaces; anything else becomes ``_``."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


class Tracker:
    """Queue MLflow calls and run them, in order, on one daemon thread.

    Args:
        root: the checkpoint folder (the embedded store lives there).
        experiment: MLflow experiment name.
        run_name: the MLflow run's name.
        federation_id: identifies the federation across resumed Flower runs (an MLflow tag).
        params: flat config, logged as MLflow params.
        tags: extra tags.
        enabled: False turns every call into a no-op.
    """

    def __init__(self, root: Path, experiment: str, run_name: str, federation_id: str,
                 params: Mapping[str, Any], tags: Mapping[str, str], enabled: bool = True):
        self.root = Path(root).absolute()
        self.uri = tracking_uri(self.root)
        self.enabled = enabled
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        self._failed = False
        self._thread = threading.Thread(target=self._work, name="mlflow", daemon=True)
        if enabled:
            self._thread.start()
            self._queue.put(lambda: self._start(experiment, run_name, federation_id, dict(params), dict(tags)))

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Log ``{key: value}`` at ``step`` (the global round)."""
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        stamp = int(time.time() * 1000)
        self._put(lambda: self._log_metrics(values, step, stamp))

    def artifact(self, path: Path) -> None:
        self._put(lambda: self._client.log_artifact(self.run_id, str(path)))

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> None:
        """Mark the run ``FINISHED`` / ``FAILED`` and wait (at most ``timeout`` s) for the queue to drain."""
        if not self.enabled:
            return
        self._put(lambda: self._client.set_terminated(self.run_id, status))
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("MLflow: still busy after %.0f s; the tracking store may miss the last entries", timeout)

    def _put(self, call: Callable[[], Any]) -> None:
        if self.enabled:
            self._queue.put(call)

    def _work(self) -> None:
        while (call := self._queue.get()) is not _STOP:
            if self._failed:
                continue
            try:
                call()
            except Exception as exc:  # tracking must never stop the federation
                self._failed = True
                log.warning("MLflow tracking at %s failed (%s: %s); the run goes on without it, metrics.json in the "
                            "run folder still has every number", self.uri, type(exc).__name__, exc)

    def _start(self, experiment: str, run_name: str, federation_id: str, params: dict, tags: dict) -> None:
        # A centre installs mlflow with the 'centre' extra; without it this names the extra, and the federation
        # goes on untracked (_work logs the message once).
        MlflowClient = require("mlflow.tracking", "the centre's MLflow tracking").MlflowClient
        from mlflow.entities import Param

        self.root.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = find_or_create_experiment(client, experiment, self.root)
        previous = client.search_runs([experiment_id], f"tags.`federation-id` = '{federation_id}'", max_results=1)
        if previous:
            self.run_id = previous[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            flwr_runs = previous[0].data.tags.get("flwr-run-ids", "")
            client.set_tag(self.run_id, "flwr-run-ids", ",".join(filter(None, [flwr_runs, tags.get("flwr-run-id")])))
            log.info("MLflow: continuing run %s (federation %s) at %s", self.run_id, federation_id, self.uri)
        else:
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={**tags, "federation-id": federation_id,
                                          "flwr-run-ids": tags.get("flwr-run-id", "")})
            self.run_id = run.info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])
            log.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment, self.uri)
        self._client = client

    def _log_metrics(self, values: dict[str, float], step: int, stamp: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, stamp, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000])
