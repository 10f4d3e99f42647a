"""Where MLflow writes: one rule for the centre's per-round runs and the study's per-arm runs.

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server), else an embedded SQLite store ``<root>/mlflow.db``
with artifacts in ``<root>/mlartifacts`` (MLflow 3 deprecates the plain file store), so
``mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db`` shows every run written under ``root``.
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_STORE = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store in ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).absolute() / EMBEDDED_STORE}"


def experiment_id(client, name: str, root: Path) -> str:
    """The id of MLflow experiment ``name`` in ``client``'s store, created if it is missing; in the embedded store
    its artifacts go to ``<root>/mlartifacts`` (a tracking server keeps its own artifact location).

    Args:
        client: an ``mlflow.tracking.MlflowClient``.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if str(client.tracking_uri).startswith("sqlite:"):
        return client.create_experiment(name, artifact_location=(Path(root).absolute() / EMBEDDED_ARTIFACTS).as_uri())
    return client.create_experiment(name)
