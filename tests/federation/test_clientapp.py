"""The ClientApp's replies: a failure names the site and the exception type, never the case or the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from braintumnet.data.loading import SiteRuntime
from braintumnet.errors import CaseProblem
from braintumnet.protocol import EVAL_KEYS
from client.app import SiteFailure, _guarded


def test_a_failure_names_the_site_not_the_case():
    site = SiteRuntime("yibin", Path("/data/yibin"), Path("/cache"))

    def corrupt_case():
        raise CaseProblem("YB-017", "/data/yibin/imagesTr/YB-017_0000.nii.gz", "truncated gzip stream")

    with pytest.raises(SiteFailure) as err:
        _guarded(site, "train", corrupt_case)
    message = str(err.value)
    assert "site yibin: train failed with CaseProblem" in message and "site's own log" in message
    assert "YB-017" not in message and "/data" not in message and "gzip" not in message
    assert err.value.__cause__ is None  # the original is logged at the site, not chained into the reply


def test_every_site_sends_the_same_evaluation_keys():
    from braintumnet.metrics import METRIC_NAMES

    # The canonical names, and the miss rate (a case-weighted mean of the sites' rates is the federation's rate; a
    # mean of site medians would not be a median, so no median travels). Per-tumour-type extras vary by site.
    assert set(EVAL_KEYS) == set(METRIC_NAMES) | {"miss_rate_tumor"}


def test_the_centre_reads_the_prefix_the_sites_write():
    """evaluate-in-train: the ClientApp prefixes its scores of the received model; the centre (which does not import
    the sites' code) strips the same prefix."""
    from braintumnet.protocol import RECEIVED_KEYS, RECEIVED_PREFIX, REPLY_METRIC_KEYS
    from server.strategy import RECEIVED_PREFIX as CENTRE_PREFIX

    assert RECEIVED_PREFIX == CENTRE_PREFIX
    assert {f"{RECEIVED_PREFIX}{k}" for k in EVAL_KEYS} < set(RECEIVED_KEYS) <= REPLY_METRIC_KEYS
