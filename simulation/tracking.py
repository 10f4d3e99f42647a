"""One MLflow run per arm and repetition of the study, in the study folder's own store.

The store is ``braintumnet.tracking``'s for the study folder: ``MLFLOW_TRACKING_URI`` when set, else
``sqlite:///<study>/mlflow.db`` (artifacts beside it); the federated arm's ServerApp logs its per-round run into the
same store (simulation.flower_run passes the URI on), so ``mlflow ui --backend-store-uri sqlite:///<study>/mlflow.db``
shows every arm side by side.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from braintumnet.extras import require
from braintumnet.tracking import experiment_id, tracking_uri

log = logging.getLogger("simulation")


def arm_logged(out: Path, experiment: str, tags: Mapping[str, str]) -> bool:
    """Whether the study's store already holds a run of this arm: every one of ``tags`` (its arm, seed and fold), and
    on a shared tracking server (``MLFLOW_TRACKING_URI``) also this study's folder, or none (a run logged before runs
    named their study); the folder's own store belongs to this study wherever the folder was moved. True when the
    store cannot be read, so a broken store never makes a study log twice."""
    try:
        require("mlflow", "the study's MLflow runs")
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # as in log_arm: no store-creation lines mid-progress
        client = MlflowClient(tracking_uri(out))
        found = client.get_experiment_by_name(experiment)
        return found is not None and bool(_runs_of_arm(client, found.experiment_id, tags, max_results=1))
    except Exception as exc:  # as in log_arm: the study's results never depend on the tracking store
        log.warning("MLflow: could not read the store (%s: %s)", type(exc).__name__, exc)
        return True


def _runs_of_arm(client, experiment_id: str, tags: Mapping[str, str], max_results: int = 1000) -> list:
    """The runs of this arm in this study (see ``arm_logged``)."""
    def quoted(value) -> str:  # MLflow's filter strings escape a quote by doubling it
        return "'" + str(value).replace("'", "''") + "'"

    same_arm = [f"tags.{key} = {quoted(value)}" for key, value in tags.items() if key != "study"]
    if os.environ.get("MLFLOW_TRACKING_URI"):  # in the query itself: other studies' runs could fill any page
        queries = [same_arm + [f"tags.study = {quoted(tags.get('study'))}"], same_arm + ["tags.study IS NULL"]]
    else:
        queries = [same_arm]
    return [run for q in queries
            for run in client.search_runs([experiment_id], filter_string=" and ".join(q), max_results=max_results)]


def log_arm(out: Path, experiment: str, arm: str, scores: Mapping[str, Any], params: Mapping[str, Any],
            tags: Mapping[str, str]) -> str | None:
    """Log one arm's final scores (``internal_test/<m>``, ``external/<m>``, ``<site>/<m>``) as an MLflow run.

    The arm's earlier runs in this study (an arm trained again because its model was gone) are deleted once the new
    run is complete, so MLflow shows one run per arm, as the report does; MLflow keeps deleted runs until ``mlflow
    gc``. Returns the MLflow run id, or None when MLflow could not write (logged once; the study goes on).
    """
    try:
        mlflow = require("mlflow", "the study's MLflow runs")
        from mlflow.tracking import MlflowClient

        # After the import, which sets its own level: its store-creation INFO lines would break the progress lines.
        logging.getLogger("mlflow").setLevel(logging.WARNING)

        client = MlflowClient(tracking_uri(out))
        experiment_of_arm = experiment_id(client, experiment, out)
        earlier = [r.info.run_id for r in _runs_of_arm(client, experiment_of_arm, tags)]
        run = client.create_run(experiment_of_arm, run_name=arm, tags={"arm": arm, **tags})
        rid = run.info.run_id
        flat = {k: str(v)[:500] for k, v in params.items()}
        for start in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            client.log_batch(rid, params=[mlflow.entities.Param(k, v)
                                          for k, v in list(flat.items())[start:start + 100]])
        metrics = []
        for section in ("internal_test", "external"):
            metrics += [(f"{section}/{k}", v) for k, v in (scores.get(section) or {}).items()]
        for site, values in (scores.get("per_site") or {}).items():
            metrics += [(f"{site}/{k}", v) for k, v in values.items()]
        entities = [mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics
                    if isinstance(v, (int, float)) and v == v]  # NaN (undefined AUC) is left out
        for start in range(0, len(entities), 1000):
            client.log_batch(rid, metrics=entities[start:start + 1000])
        client.set_terminated(rid)
        for stale in earlier:
            client.delete_run(stale)
        return rid
    except Exception as exc:  # a broken tracking store must not lose the study's results
        log.warning("MLflow: could not log arm %s (%s: %s); metrics.json still has it", arm, type(exc).__name__, exc)
        return None
