"""The ClientApp's replies: a failure names the site and the exception type, never the case or the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from braintumnet.data.loading import SiteRuntime
from braintumnet.errors import BrainTumNetError, CaseProblem
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
             "WEIGHT_KEY", "RECEIVED_PREFIX", "DP_EPSILON", "DP_BUDGET_SPENT", "PACKED_LAYOUT", "EVALUATE_SECONDS")
    keys = {getattr(protocol, name): name for name in names}
    # client/sites.py and client/run.py read sites.toml, whose "site" tables are no message key.
    files = [Path(client.__file__).parent / "app.py", Path(braintumnet.site_round.__file__)]
    found = [f"{path.name}:{node.lineno} {node.value!r} (braintumnet.protocol.{keys[node.value]})"
             for path in files for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and node.value in keys]
    assert not found, "use braintumnet.protocol's names: " + "; ".join(found)
    assert {f"{protocol.RECEIVED_PREFIX}{k}" for k in EVAL_KEYS} < set(protocol.RECEIVED_KEYS) <= \
        protocol.REPLY_METRIC_KEYS


@pytest.mark.parametrize("phase, run_config, rule", [
    ("train", {"dp.enabled": False}, "dp-required"),
    ("train", {"dp.enabled": True, "dp.noise-multiplier": 0.3}, "min-noise-multiplier"),
    ("evaluate", {"data.img-size": 48}, "allowed-data"),
])
def test_the_site_policy_is_the_sites_and_a_refusal_names_the_rule_only(phase, run_config, rule, task_identity,
                                                                        tmp_path, caplog, monkeypatch):
    """The real ClientApp, as a SuperNode started by client/run.py calls it: the policy comes from the site config
    named in the node config, whatever the centre's run config says; nothing is opened before the refusal."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    # The ClientApp gives the braintumnet logger a handler of its own (and stops propagation) unless it has one.
    monkeypatch.setattr(logging.getLogger("braintumnet"), "handlers", [logging.NullHandler()])
    monkeypatch.setattr(logging.getLogger("braintumnet"), "propagate", True)

    from client.app import app
    from client.sites import SiteSettings, site_settings

    config = tmp_path / "sites.toml"
    config.write_text('[defaults]\nstate-dir = "state"\ncache = "cache"\n[defaults.run-config]\nprofile = "quick"\n'
                      '[site.yibin]\ndata = "data/yibin"\n')
    settings = site_settings(config, "yibin")
    assert isinstance(settings, SiteSettings) and settings.policy.dp_required  # the hospital default
    from flwr.common.config import parse_config_args

    node_config = parse_config_args([settings.node_config()])
    assert node_config["site-config"] == str(config)
    msg = Message(RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=phase)
    context = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    with caplog.at_level("WARNING", logger="braintumnet.client"), pytest.raises(SiteFailure) as err:
        app(msg, context)
    assert str(err.value) == f"site yibin: {phase} refused by the site's policy, rule {rule}"
    assert err.value.__cause__ is None
    lines = [r.getMessage() for r in caplog.records if r.name == "braintumnet.client"]
    assert len(lines) == 1 and f"rule {rule}: " in lines[0]  # the detail stays in the site's log
    assert not (tmp_path / "state").exists() and not settings.cache.exists()  # refused before opening anything


def test_the_role_is_the_sites_own_and_an_evaluate_only_site_refuses_to_train(task_identity, tmp_path, monkeypatch):
    """The real ClientApp with the node config the launcher writes from ``role = "evaluate-only"``: the role query is
    answered with the name and role only; a train message is refused naming the role, before anything is opened."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common.config import parse_config_args

    from client.app import app
    from client.sites import site_settings

    monkeypatch.setattr(logging.getLogger("braintumnet"), "handlers", [logging.NullHandler()])
    config = tmp_path / "sites.toml"
    config.write_text('[defaults]\nstate-dir = "state"\ncache = "cache"\n[site.external]\ndata = "data/external"\n'
                      'role = "evaluate-only"\n[site.yibin]\ndata = "data/yibin"\n')
    for name, role in (("external", "evaluate-only"), ("yibin", "training")):
        settings = site_settings(config, name)
        # the node config, which the --check preflight prints, names a role other than the default
        assert settings.role == role and (f'role="{role}"' in settings.node_config()) == (role != "training")
        context = Context(run_id=7, node_id=1, node_config=parse_config_args([settings.node_config()]),
                          state=RecordDict(), run_config={})
        query = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                        message_type="query")
        reply = app(query, context)
        assert dict(reply.content["site"]) == {"name": name, "role": role} and not reply.content.array_records
    train = Message(RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=1, message_type="train")
    external = Context(run_id=7, node_id=1, node_config=parse_config_args([site_settings(config, "external")
                                                                           .node_config()]),
                       state=RecordDict(), run_config={})
    with pytest.raises(SiteFailure, match="^site external: train refused: this site's role is evaluate-only$"):
        app(train, external)
    assert not (tmp_path / "state").exists() and not (tmp_path / "cache").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('[site.external]\ndata = "data/external"\nrole = "observer"\n')
    with pytest.raises(BrainTumNetError, match="role='observer'.*evaluate-only"):
        site_settings(bad, "external")


def test_a_simulated_site_takes_its_role_from_the_sites_list():
    from client.sites import simulation_sites, site_role

    run_config = {"sites": "yibin,plagh,external:evaluate-only"}
    assert simulation_sites(run_config) == ["yibin", "plagh", "external"]
    assert [site_role({"partition-id": i}, run_config) for i in range(3)] == ["training", "training",
                                                                              "evaluate-only"]
