"""One federated run on Flower's Simulation Engine (``flwr run . local``), DP on, the message audit on.

Three phantom hospitals, three rounds, a budget that lets every site train rounds 1 and 2 and refuses round 3. The
same run feeds every check, so the suite pays for one federation (about a minute and a half on 2 cores):

- ε is cumulative: each site's ε grows from round 1 to round 2 (restored from its ledger for each message) and
  matches Opacus's accountant; at round 3 every site refuses to train, says so, and still evaluates;
- the final model has the plain keys and finite values (DP-SGD unwrapped; nothing aggregated at round 3);
- every message the centre sent or received holds only the model's arrays, the allowed metric keys and config keys,
  and no string that names a case, a file or a path; the centre's log, ``metrics.json`` and its MLflow store do not
  hold any case id either.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch

from braintumnet.checkpoint import load_checkpoint
from braintumnet.config import site_batch
from braintumnet.data.contract import class_names
from braintumnet.data.dataset import select_slices
from braintumnet.engine import build_model
from braintumnet.privacy import epsilon
from braintumnet.protocol import REPLY_METRIC_KEYS
from simulation.flower_run import run_federated

pytestmark = pytest.mark.timeout(900)

SITES = ("yibin", "plagh", "jinling")
SIGMA, DELTA = 1.0, 1e-5
CONFIG_KEYS_TO_SITES = {"server-round", "total-rounds", "federation-id", "evaluate-received"}


def planned_epsilons(prepared_sites, profile, rounds: int) -> dict[str, list[float]]:
    """Each site's ε after 1..rounds rounds of one epoch, as the site's accountant will compute it.

    The steps per epoch follow ``train_model``'s loader (``drop_last`` when there is more than one batch);
    Opacus samples with rate 1/steps.
    """
    out = {}
    for name in SITES:
        n = len(select_slices([prepared_sites[name]], "train", class_names(profile.data.task)))
        b = site_batch(profile.train)  # a site trains in its own batch
        steps = n // b if n > b else 1
        out[name] = [epsilon([(SIGMA, 1.0 / steps, k * steps)], DELTA) for k in range(1, rounds + 1)]
    return out


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, phantom_root, cache_root, prepared_sites, tiny_run_config, tiny_profile):
    planned = planned_epsilons(prepared_sites, tiny_profile, 3)
    low, high = max(e[1] for e in planned.values()), min(e[2] for e in planned.values())
    assert low < high, f"no budget admits round 2 but not round 3 at every site: {planned}"
    work = tmp_path_factory.mktemp("dp-run")
    config = {**tiny_run_config, "train.local-epochs": 1, "round-timeout-s": 600.0, "num-server-rounds": 3,
              "checkpoint-dir": str(work / "runs"), "cache-dir": str(cache_root), "phantom-dir": str(phantom_root),
              "dp.enabled": True, "dp.noise-multiplier": SIGMA, "dp.delta": DELTA,
              "dp.max-epsilon": (low + high) / 2, "audit-messages": True}
    run_dir = run_federated(config, work, num_sites=3, cpus_per_site=1, timeout_s=800, log=lambda _: None)
    return run_dir, work / "flwr-home", planned


def test_epsilon_grows_round_over_round_and_the_budget_stops_training(dp_run, tiny_profile):
    run_dir, _, planned = dp_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for name in SITES:
        trained = [r["sites"][name]["train"] for r in rounds]
        assert [t["dp_budget_spent"] for t in trained] == [0, 0, 1]
        e1, e2, e3 = (t["dp_epsilon"] for t in trained)
        assert 0 < e1 < e2 == e3  # cumulative across messages; nothing spent on the refused round
        assert [e1, e2] == pytest.approx(planned[name][:2], rel=1e-6)
        assert all("evaluate" in r["sites"][name] for r in rounds)  # a site out of budget still evaluates
    assert rounds[2]["privacy"]["budget_spent"] == sorted(SITES) and rounds[2]["skipped"]
    assert rounds[1]["privacy"]["epsilon_max"] == pytest.approx(max(p[1] for p in planned.values()))
    final = load_checkpoint(run_dir / "final.pt").state_dict
    assert list(final) == list(build_model(tiny_profile).state_dict())
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    round2 = load_checkpoint(run_dir / "round-0002.pt").state_dict
    assert all(torch.equal(final[k], round2[k]) for k in final)  # round 3 aggregated nothing


def test_every_message_carries_only_model_arrays_and_aggregate_numbers(dp_run, tiny_profile, phantom_root):
    run_dir, _, _ = dp_run
    model = {k: list(v.shape) for k, v in build_model(tiny_profile).state_dict().items()}
    lines = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    entries = [e for e in lines if e["direction"] in ("to-site", "from-site")]
    # each site's role query and its answer (round 1), rounds x train x (instruction, reply) x sites, and the last
    # round's evaluate: rounds 1 and 2 are scored by the sites inside the next round's train message (evaluate-in-train)
    assert len(entries) == 2 * len(SITES) + 3 * 2 * len(SITES) + 2 * len(SITES)
    # the centre's screening verdicts, one per phase: names, node ids and outcomes only
    screening = [e for e in lines if e["direction"] == "screening"]
    assert len(screening) == len(lines) - len(entries) == 3 + 1
    assert all(set(r) == {"name", "node", "outcome"} and r["name"] in SITES for e in screening for r in e["replies"])
    strings = []
    for e in entries:
        assert "error" not in e, e
        records = e["records"]
        if e["type"] == "query":  # what the node is, before any model: the round, then its name and role only
            if e["direction"] == "to-site":
                assert records == {"config": {"kind": "config", "items": {"server-round": 1}}}, records
            else:
                assert set(records) == {"site"} and records["site"]["items"] == {
                    "name": records["site"]["items"]["name"], "role": "training"}
                assert records["site"]["items"]["name"] in SITES
            continue
        if e["direction"] == "to-site":
            assert set(records) == {"arrays", "config"}
            assert set(records["config"]["items"]) <= CONFIG_KEYS_TO_SITES
            strings += [v for v in records["config"]["items"].values() if isinstance(v, str)]
        else:
            allowed = {"arrays", "metrics", "site"} if e["type"] == "train" else {"metrics", "site"}
            assert {"metrics", "site"} <= set(records) <= allowed, records.keys()
            metrics = records["metrics"]
            assert metrics["kind"] == "metric" and set(metrics["items"]) <= REPLY_METRIC_KEYS
            # one number each (NaN, e.g. a refused round's loss, is null in strict JSON)
            assert all(v is None or isinstance(v, (int, float)) for v in metrics["items"].values())
            assert records["site"] == {"kind": "config", "items": {"name": records["site"]["items"]["name"]}}
            assert records["site"]["items"]["name"] in SITES
        if "arrays" in records:  # the model, nothing else: same keys, same shapes (no pixels, no per-case values)
            assert records["arrays"]["kind"] == "array"
            assert {k: v["shape"] for k, v in records["arrays"]["items"].items()} == model
    assert not [s for s in strings if "/" in s or "\\" in s], strings  # no paths
    text = (run_dir / "audit.jsonl").read_text()
    assert not [c for c in case_names(phantom_root) if c in text]


def test_the_centre_logs_and_tracks_no_case(dp_run, phantom_root):
    """The run's log as ``flwr log`` shows it (the SuperLink keeps it in its state database), the SuperLink's own log,
    ``metrics.json`` and the MLflow store. In simulation the run's log also holds the simulated sites' lines, which
    may name their cases by design; ours do not, so the check covers them too."""
    run_dir, home, _ = dp_run
    superlink = home / "local-superlink"
    with sqlite3.connect(superlink / "state.db") as db:
        run_log = "".join(line for (line,) in db.execute("SELECT log FROM task_logs ORDER BY timestamp"))
    assert "privacy budget is spent" in run_log and "braintumnet.server" in run_log  # the centre's lines are there
    store = run_dir.parent / "mlflow.db"
    with sqlite3.connect(store) as db:
        keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM metrics")}
    assert {"privacy/epsilon_max", *(f"{s}/train/dp_epsilon" for s in SITES)} <= keys
    places = [*superlink.glob("*.log"), store, run_dir / "metrics.json", *run_dir.parent.glob("mlartifacts/**/*")]
    blobs = {str(p): p.read_bytes() for p in places if p.is_file()}
    blobs["run log"] = run_log.encode()
    leaks = [(where, c) for c in case_names(phantom_root) for where, b in blobs.items() if c.encode() in b]
    assert not leaks


def case_names(phantom_root: Path) -> list[str]:
    """Every case id and image / mask file name of the three hospitals."""
    names = []
    for site in SITES:
        cases = pd.read_csv(phantom_root / site / "cases.csv")
        names += cases["case_id"].astype(str).tolist()
        names += [Path(p).name for p in cases["image"].tolist() + cases["mask"].tolist()]
    assert len(names) > 3 * len(SITES)
    return names
