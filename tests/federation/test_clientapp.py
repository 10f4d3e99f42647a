"""The ClientApp's replies: a failure names the site and the exception type, never the case or the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from braintumnet.errors import CaseProblem
from client.app import EVAL_KEYS, SiteFailure, _guarded
from client.sites import SiteRuntime


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

    assert set(EVAL_KEYS) == set(METRIC_NAMES)  # the canonical names; per-tumour-type extras vary by site
