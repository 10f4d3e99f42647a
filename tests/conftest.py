"""Shared, session-scoped fixtures: one tiny phantom cohort, prepared once at a tiny size for every test that trains.

The cohort is synthetic (braintumnet.data.phantom); sizes are cut so a 2-core CPU runs the suite in minutes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from braintumnet.config import resolve

# Tiny models gain nothing from intra-op threads, and several pytest processes (or a loaded CI box) sharing two
# cores slow down many-fold when each spreads over both.
torch.set_num_threads(1)

TINY_RUN_CONFIG = {"profile": "quick", "data.img-size": 32, "data.slices-per-case": 3, "model.feature-size": 8,
                   "train.batch-size": 8}


@pytest.fixture(scope="session")
def tiny_run_config() -> dict:
    return dict(TINY_RUN_CONFIG)


@pytest.fixture(scope="session")
def tiny_profile():
    return resolve(TINY_RUN_CONFIG)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """yibin / plagh / jinling / external at scale 0.03 (about 15 internal cases), NIfTI."""
    from braintumnet.data.phantom import generate_cohort

    root = tmp_path_factory.mktemp("phantom") / "cohort"
    generate_cohort(root, scale=0.03, seed=0, fmt="nifti", progress=False)
    return root


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def prepared_sites(phantom_root, cache_root, tiny_profile) -> dict:
    from braintumnet.data.loading import prepare_and_load

    logging.getLogger("braintumnet").setLevel(logging.WARNING)
    return {site: prepare_and_load(phantom_root / site, cache_root, tiny_profile.data, progress=False)
            for site in ("yibin", "plagh", "jinling", "external")}


@pytest.fixture
def task_identity():
    """Flower's Message constructor reads the process's task identity, which flwr-serverapp and flwr-clientapp set in
    real runs: run 7, node 1 (the SuperLink's own node id, as for a message the SuperLink makes itself), task 1."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
