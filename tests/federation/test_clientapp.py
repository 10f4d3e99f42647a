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


def test_no_site_module_spells_a_message_key_itself():
    """The sites' half of the protocol: the ClientApp and the core's site round take every message key from
    braintumnet.protocol (the centre's half is checked in test_strategy.py), so a renamed key cannot leave one side
    behind."""
    import ast

    import braintumnet.protocol as protocol
    import braintumnet.site_round
    import client

    names = ("ARRAYS", "METRICS", "SITE", "SERVER_ROUND", "TOTAL_ROUNDS", "EVALUATE_RECEIVED", "FEDERATION_ID",
             "WEIGHT_KEY", "RECEIVED_PREFIX", "DP_EPSILON", "DP_BUDGET_SPENT")
    keys = {getattr(protocol, name): name for name in names}
    # client/sites.py and client/run.py read sites.toml, whose "site" tables are no message key.
    files = [Path(client.__file__).parent / "app.py", Path(braintumnet.site_round.__file__)]
    found = [f"{path.name}:{node.lineno} {node.value!r} (braintumnet.protocol.{keys[node.value]})"
             for path in files for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and node.value in keys]
    assert not found, "use braintumnet.protocol's names: " + "; ".join(found)
    assert {f"{protocol.RECEIVED_PREFIX}{k}" for k in EVAL_KEYS} < set(protocol.RECEIVED_KEYS) <= \
        protocol.REPLY_METRIC_KEYS


