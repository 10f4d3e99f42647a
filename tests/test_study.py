"""The study's centralized and local-only arms and its report, on the session's tiny SYNTHETIC cohort.

The federated arm (Flower's Simulation Engine through `flwr run . local`) is exercised by
tests/federation/test_simulation.py.
"""

import json

from braintumnet.metrics import METRIC_NAMES
from simulation.study import run_study


def test_study_writes_metrics_and_a_report_that_says_synthetic(phantom_root, tiny_run_config, tmp_path):
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    overrides.update({"num-server-rounds": 1, "train.local-epochs": 1})
    run_study(tmp_path, "quick", phantom=phantom_root, device="cpu", skip_federated=True, overrides=overrides)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["synthetic"] is True
    assert {"centralized", "local:yibin", "local:plagh", "local:jinling"} <= set(doc)
    for arm in ("centralized", "local:plagh"):
        assert set(METRIC_NAMES) <= set(doc[arm]["internal_test"]) and set(METRIC_NAMES) <= set(doc[arm]["external"])
        assert set(doc[arm]["per_site"]) == {"yibin", "plagh", "jinling"}
    assert doc["budget"]["centralized_epochs"] == 1
    report = (tmp_path / "report.md").read_text()
    assert "SYNTHETIC" in report and f"{doc['centralized']['internal_test']['dice_tumor']:.3f}" in report
    assert "SYNTHETIC" in (tmp_path / "report.html").read_text()
