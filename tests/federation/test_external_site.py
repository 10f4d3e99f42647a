"""The external hospital as an evaluate-only SuperNode, on a real loopback federation (harness.py): three training
sites and ``external``, started with ``python client/run.py --site external`` and ``role = "evaluate-only"`` in its
site config. Its data never leave it: it never receives a train message, never sends arrays, and scores the global
model every round; its scores are each round's ``external`` entry. A round completes while it is down.

Minutes long (five SuperNodes' ClientApps on one machine), so marked slow; test_strategy.py and test_clientapp.py check
the same rules in-process in seconds.
"""

from __future__ import annotations

import json
import signal

import pytest
from test_executor import pinned_app, set_allowlists, submit_app
from test_loopback import history, mlflow_run, received, wait_for

from braintumnet.certs import make_certs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TRAINING = ("yibin", "plagh", "jinling")
EXTERNAL = "external"
SITES_ENTRY = ",".join(TRAINING) + f",{EXTERNAL}:evaluate-only"


@pytest.fixture(scope="module")
def deployed(federation, tmp_path_factory):
    """The harness's centre and three sites, plus the external hospital as an evaluate-only site; every site's
    allow-list lists the app (pinned: the working tree may change during the test)."""
    fed = federation
    make_certs(fed.pki, sites=[EXTERNAL], keys_only=True)
    fed.sites_file.write_text(fed.sites_file.read_text() + (
        f'[site.{EXTERNAL}]\ndata = "{fed.phantom / EXTERNAL}"\nauth-key = "{fed.site_key(EXTERNAL)}"\n'
        'role = "evaluate-only"\n'))
    root = tmp_path_factory.mktemp("external-apps")
    app, app_hash = pinned_app(root / "braintumnet")
    lists = {}
    for site in (*TRAINING, EXTERNAL):
        lists[site] = root / f"{site}.allowed"
        lists[site].write_text(f"{app_hash}\n")
        lists[site].chmod(0o444)
    set_allowlists(fed, lists)
    fed.start_superlink()
    for site in (*TRAINING, EXTERNAL):
        fed.register(site)
    for site in (*TRAINING, EXTERNAL):
        fed.start_site(site)
    fed.wait_nodes(4, timeout=300)
    return fed, app


def test_the_external_hospital_scores_every_round_and_never_trains(deployed):
    fed, app = deployed
    assert 'role="evaluate-only"' in fed.sites[EXTERNAL].text()  # the launcher's preflight shows the role
    run_id = submit_app(fed, app, **{"num-server-rounds": 2, "min-available-nodes": 4, "min-train-nodes": 3,
                                     "min-evaluate-nodes": 3, "wait-for-nodes-s": 120.0, "audit-messages": True,
                                     "sites": SITES_ENTRY})
    run = fed.wait_finished(run_id, timeout=900)
    log = fed.server_log(run_id)
    assert run["status"] == "finished:completed", f"{run['status-details']}\n{log[-4000:]}"

    # The audit: the external node said what it is (metadata only), got an evaluate message each round and no train
    # message, and its replies carried no arrays.
    folder = fed.run_dir(run_id)
    audit = [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]
    answers = {e["node"]: e["records"]["site"]["items"] for e in audit
               if e["direction"] == "from-site" and e["type"] == "query" and "records" in e}
    external = [node for node, site in answers.items() if site["name"] == EXTERNAL]
    assert len(external) == 1 and answers[external[0]] == {"name": EXTERNAL, "role": "evaluate-only"}, answers
    node = external[0]
    to_external = [e["type"] for e in audit if e["direction"] == "to-site" and e["node"] == node]
    assert to_external == ["query", "evaluate", "evaluate"], to_external
    from_external = [e for e in audit if e["direction"] == "from-site" and e["node"] == node]
    assert all(r["kind"] != "array" for e in from_external for r in e.get("records", {}).values())
    screened = [e for e in audit if e["direction"] == "screening" and e["type"] == "external"]
    assert [[(r["node"], r["name"], r["outcome"]) for r in e["replies"]] for e in screened] == \
        [[(node, EXTERNAL, "kept")]] * 2
    assert received(fed.sites[EXTERNAL], "train") == 0

    # Filed as the external site's: metrics.json every round, MLflow at every round's step; never trained.
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    for r in rounds:
        assert r["external"]["num-examples"] > 0 and 0.0 <= r["external"]["dice_tumor"] <= 1.0, r
        assert set(r["sites"][EXTERNAL]) == {"external"} and r["bytes_per_site"][EXTERNAL]["up"] == 0
        assert set(r["sites"]) - {EXTERNAL} <= set(TRAINING) and "external" not in r["evaluate"]
    client, mrun = mlflow_run(fed, run_id)
    assert set(history(client, mrun.info.run_id, "external/dice_tumor")) == {1, 2}


def test_a_round_completes_while_the_external_hospital_is_down(deployed):
    fed, app = deployed
    assert sorted(fed.ckpt.glob("run-*/final.pt")), "needs the federation of the test before"
    fed.kill_site(EXTERNAL, signal.SIGTERM)
    wait_for(lambda: fed.online_nodes() == 3, 120, "the SuperLink to see the external hospital offline", poll=2)
    resumed = submit_app(fed, app, **{"num-server-rounds": 3, "resume-from": "latest", "min-available-nodes": 3,
                                      "wait-for-nodes-s": 120.0, "fraction-evaluate": 0.0, "sites": SITES_ENTRY})
    run = fed.wait_finished(resumed, timeout=900)
    log = fed.server_log(resumed)
    assert run["status"] == "finished:completed", f"{run['status-details']}\n{log[-4000:]}"
    rounds = json.loads((fed.run_dir(resumed) / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [3] and not rounds[0]["skipped"] and rounds[0]["external"] == {}
    assert set(rounds[0]["sites"]) == set(TRAINING)
