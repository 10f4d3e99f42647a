"""A site's round without Flower (braintumnet.site_round), on the tiny synthetic cohort, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from braintumnet.config import resolve
from braintumnet.data.loading import SiteRuntime
from braintumnet.engine import build_model
from braintumnet.protocol import (DP_BUDGET_SPENT, DP_EPSILON, RECEIVED_KEYS, RECEIVED_PREFIX, REPLY_METRIC_KEYS,
                                  SECONDS, TRAIN_KEYS, WEIGHT_KEY)
from braintumnet.site_round import evaluate_round, train_round


@pytest.fixture
def site(prepared_sites, phantom_root, cache_root, tmp_path):
    """plagh on the session's prepared cache, in a cache root of its own (for what it keeps between rounds)."""
    (tmp_path / "plagh").symlink_to(cache_root / "plagh", target_is_directory=True)
    return SiteRuntime("plagh", phantom_root / "plagh", tmp_path), "federation-1"


def one_epoch(run_config, **overrides):
    return resolve({**run_config, "train.local-epochs": 1, **overrides})


def test_a_round_scores_the_received_model_first_and_sends_only_protocol_keys(site, tiny_run_config,
                                                                               prepared_sites):
    runtime, federation = site
    profile = one_epoch(tiny_run_config)
    received = build_model(profile).state_dict()
    state, metrics = train_round(received, profile, runtime, server_round=1, total_rounds=1,
                                 federation_id=federation, evaluate_received=True)
    assert set(metrics) <= REPLY_METRIC_KEYS and set(RECEIVED_KEYS) <= set(metrics)
    assert metrics[WEIGHT_KEY] == (prepared_sites["plagh"].slices["split"] == "train").sum()
    assert all(math.isfinite(metrics[k]) for k in TRAIN_KEYS)
    assert list(state) == list(received) and any(not torch.equal(state[k], received[k]) for k in state)
    scored = evaluate_round(received, profile, runtime, server_round=0)
    scored.pop(SECONDS)
    assert {k: metrics[RECEIVED_PREFIX + k] for k in scored} == pytest.approx(scored, nan_ok=True)


def test_under_dp_the_losses_stay_at_the_site_and_a_spent_budget_trains_nothing(site, tiny_run_config):
    runtime, federation = site
    dp = {"dp.enabled": True, "dp.noise-multiplier": 1.0, "dp.delta": 1e-5}
    profile = one_epoch(tiny_run_config, **dp, **{"dp.max-epsilon": 1000.0})
    received = build_model(profile).state_dict()
    state, metrics = train_round(received, profile, runtime, server_round=1, total_rounds=2, federation_id=federation)
    assert state is not None and metrics[DP_BUDGET_SPENT] == 0 and metrics[DP_EPSILON] > 0
    assert all(math.isnan(metrics[k]) for k in TRAIN_KEYS)

    capped = one_epoch(tiny_run_config, **dp, **{"dp.max-epsilon": metrics[DP_EPSILON] * 1.01})
    state, refused = train_round(received, capped, runtime, server_round=2, total_rounds=2, federation_id=federation)
    assert state is None and refused[DP_BUDGET_SPENT] == 1 and refused[WEIGHT_KEY] == 0
    assert refused[DP_EPSILON] == pytest.approx(metrics[DP_EPSILON])  # read back from the site's ledger
    assert (runtime.cache / "privacy" / "plagh" / "federation-1.json").is_file()
    assert set(refused) <= REPLY_METRIC_KEYS and all(math.isnan(refused[k]) for k in TRAIN_KEYS)
