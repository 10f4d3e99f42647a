"""The whole study (`python -m simulation`) on the session's tiny SYNTHETIC cohort: centralized, local-only and
federated arms, the federated one on Flower's own Simulation Engine (`flwr run . local` with a private FLWR_HOME),
every output file and metric key; and the pooled-dataset split.
"""

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import simulation.study as study
from braintumnet.data.contract import EXTERNAL_SITE, SITES
from braintumnet.errors import BrainTumNetError
from braintumnet.metrics import METRIC_NAMES
from simulation.__main__ import main as simulation_main
from simulation.pooled import split_pooled

REPO = Path(__file__).resolve().parents[1]
ARMS = {"centralized", "federated", *(f"local:{s}" for s in SITES)}


@pytest.mark.timeout(1200)
def test_quick_study_runs_every_arm_and_writes_every_file(phantom_root, tiny_run_config, tmp_path):
    """The README's main job, smaller: two worker processes train the centralized and local arms (as
    ``python -m simulation`` does on a 2-core machine) while the study runs the federated arm."""
    from braintumnet.checkpoint import load_checkpoint

    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    overrides.update({"num-server-rounds": 2, "train.local-epochs": 1, "train.site-batch-size": 4})
    pyproject = (REPO / "pyproject.toml").read_bytes()
    doc = study.run_study(tmp_path, "quick", phantom=phantom_root, device="cpu", overrides=overrides, jobs=2)

    assert doc["synthetic"] is True and set(doc["sd"]) == ARMS
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for arm in ARMS:
        for section in ("internal_test", "external"):
            assert set(METRIC_NAMES) <= set(saved[arm][section]), (arm, section)
        assert set(saved[arm]["per_site"]) == set(SITES)
        assert set(METRIC_NAMES) <= set(saved[arm]["per_site"]["plagh"])
    budget = saved["budget"]
    assert {k: budget[k] for k in ("centralized_epochs", "local_epochs_per_site", "federated_rounds",
                                   "federated_local_epochs")} == {"centralized_epochs": 2, "local_epochs_per_site": 2,
                                                                  "federated_rounds": 2, "federated_local_epochs": 1}
    # Adam steps beside the equal-epochs budget: a site's batches per epoch x its epochs (last one dropped); the
    # pooled arm in batches of 8, a hospital alone and a federated site in batches of train.site-batch-size.
    in_process = ARMS - {"federated"}
    assert {arm: load_checkpoint(tmp_path / "models" / f"{arm.replace(':', '-')}-s0.pt").profile.train.batch_size
            for arm in in_process} == {arm: 4 if arm.startswith("local:") else 8 for arm in in_process}
    slices = budget["train_slices"]
    assert set(slices) == set(SITES)
    assert budget["centralized_steps"] == 2 * (sum(slices.values()) // 8)
    assert budget["federated_steps_per_site"] == budget["local_steps"] == {s: 2 * (n // 4) for s, n in slices.items()}
    assert "Equal epochs are not equal optimizer steps" in (tmp_path / "report.md").read_text()
    # No case is in two sites (of the data the arms read), and the external site is never trained on by the
    # simulated sites (nor by the in-process arms: test_gate_regions_train_a_centralized_model_per_region_for_table_2).
    owners: dict[str, str] = {}
    for site in (*SITES, EXTERNAL_SITE):
        for case in pd.read_csv(tmp_path / "cache" / site / "32px_3sl" / "slices.csv", dtype=str)["case_id"]:
            assert owners.setdefault(case, site) == site, f"{case} in {owners[case]} and {site}"
    run_dir = next((tmp_path / "federated").glob("run-*"))
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 2 and all(set(r["sites"]) == {*SITES, EXTERNAL_SITE} for r in rounds)  # partition i is site i
    # The external site is a simulated evaluate-only site, as in a deployment: it scored every round's model on its
    # own cases and never trained; the centre held none of its data.
    assert all(r["external"]["n_cases"] > 0 and set(r["sites"][EXTERNAL_SITE]) == {"external"} for r in rounds)
    assert (REPO / "pyproject.toml").read_bytes() == pyproject  # `flwr run` did not rewrite it
    # Each simulated site kept its Adam state after round 1 and deleted it after the last round.
    kept = tmp_path / "cache" / "optimizer"
    assert {p.name for p in kept.iterdir()} == set(SITES) and not list(kept.glob("*/*.pt"))

    report = (tmp_path / "report.md").read_text()
    assert "SYNTHETIC" in report and "paper (reference, not ours)" in report
    assert "2 worker processes (" in report  # the arms' times overlap, and the report says so
    assert f"{saved['federated']['internal_test']['dice_tumor']:.3f}" in report
    for table in ("Table 1.", "Table 2.", "Table 3.", "Table 4.", "Table 5.", "Study questions"):
        assert table in report
    html = (tmp_path / "report.html").read_text()
    assert "SYNTHETIC" in html and html.count("data:image/png;base64,") == len(saved["figures"]) >= 7
    for figure in saved["figures"]:
        assert (tmp_path / figure["path"]).stat().st_size > 1000
    assert {"learning_curves.png", "per_site.png", "overlays.png", "roc_federated_external.png",
            "confusion_centralized_internal_test.png"} <= {Path(f["path"]).name for f in saved["figures"]}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(study.EXPERIMENT).experiment_id])
    names = [r.info.run_name for r in runs]
    assert sorted(n for n in names if n in ARMS) == sorted(ARMS)  # one MLflow run per arm (the study's, none from
    assert len(names) == len(ARMS) + 1  # its workers), and the ServerApp's per-round run beside them
    assert doc["provenance"]["workers"]["processes"] == 2 and len(list((tmp_path / "workers").glob("*.log"))) == 2
    federated = next(r for r in runs if r.info.run_name == "federated")
    assert federated.data.metrics["internal_test/dice_tumor"] == pytest.approx(
        saved["federated"]["internal_test"]["dice_tumor"])


def _pooled(phantom_root: Path, folder: Path, column: str = "hospital") -> Path:
    """The phantom's four sites as one pooled folder, images left where they are."""
    frames = []
    for site in (*SITES, EXTERNAL_SITE):
        cases = pd.read_csv(phantom_root / site / "cases.csv", dtype=str, keep_default_na=False)
        for c in ("image", "mask"):
            cases[c] = [str(phantom_root / site / p) for p in cases[c]]
        frames.append(cases.assign(**{column: site}))
    folder.mkdir()
    shutil.copy(phantom_root / "yibin" / "dataset.json", folder / "dataset.json")
    meta = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**meta, "site": "pooled",
                                                     "tumor_types": ["glioma", "metastasis", "meningioma"]}))
    pd.concat(frames).to_csv(folder / "cases.csv", index=False)
    return folder


def test_pooled_dataset_splits_by_hospital_without_copying_or_sharing_a_case(phantom_root, tmp_path):
    pooled = _pooled(phantom_root, tmp_path / "pooled")
    before = {p: p.stat().st_mtime_ns for p in pooled.iterdir()}
    layout = split_pooled(pooled, "hospital", tmp_path / "sites")
    assert layout.internal == SITES and layout.external == EXTERNAL_SITE
    seen: dict[str, str] = {}
    for site in layout.all:
        cases = pd.read_csv(tmp_path / "sites" / site / "cases.csv", dtype=str)
        assert json.loads((tmp_path / "sites" / site / "dataset.json").read_text())["site"] == site
        for case in cases["case_id"]:
            assert case not in seen, f"{case} in {seen.get(case)} and {site}"
            seen[case] = site
        # Relative to the hospital's folder, as the contract reads them (and a cache's fingerprint needs).
        assert all(not Path(p).is_absolute() and (tmp_path / "sites" / site / p).is_file() for p in cases["image"])
    assert {p: p.stat().st_mtime_ns for p in pooled.iterdir()} == before  # the pooled folder is only read


@pytest.mark.parametrize("problem, expected", [
    ("column", "no column 'site'"),
    ("duplicate", "appear more than once"),
    ("one-site", "at least two"),
])
def test_pooled_dataset_problems_name_the_file_and_the_fix(phantom_root, tmp_path, problem, expected):
    pooled = _pooled(phantom_root, tmp_path / "pooled")
    cases = pd.read_csv(pooled / "cases.csv", dtype=str, keep_default_na=False)
    if problem == "duplicate":
        cases.loc[1, "case_id"] = cases.loc[0, "case_id"]
    if problem == "one-site":
        cases["hospital"] = cases["hospital"].where(cases["hospital"] == EXTERNAL_SITE, "yibin")
    cases.to_csv(pooled / "cases.csv", index=False)
    with pytest.raises(BrainTumNetError, match=expected) as info:
        split_pooled(pooled, "site" if problem == "column" else "hospital", tmp_path / "sites")
    assert str(pooled / "cases.csv") in str(info.value)


def test_command_line_refuses_a_missing_dataset_with_one_line(tmp_path, capsys):
    code = simulation_main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "nowhere" in err and "Traceback" not in err


def test_a_study_run_again_into_its_folder_trains_only_the_repetitions_not_finished(phantom_root, tiny_run_config,
                                                                                      tmp_path, monkeypatch):
    from simulation import saved

    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    overrides.update({"num-server-rounds": 1, "train.local-epochs": 1})
    first = study.run_study(tmp_path, "quick", phantom=phantom_root, device="cpu", skip_federated=True,
                            overrides=overrides)
    assert saved.path_of(tmp_path, 0, None).is_file() and "reused" not in first
    trained = []
    real_train = study.train_model
    monkeypatch.setattr(study, "train_model", lambda model, sites, *a, **k: (trained.append(1),
                                                                             real_train(model, sites, *a, **k)))
    doc = study.run_study(tmp_path, "quick", phantom=phantom_root, device="cpu", skip_federated=True,
                          seeds=(0, 1), overrides=overrides)
    assert len(trained) == 1 + len(SITES)  # seed 1's centralized and local arms only
    same = json.dumps(doc["repetitions"][0], sort_keys=True) == json.dumps(first["repetitions"][0], sort_keys=True)
    assert same and doc["repetitions"][1]["seed"] == 1  # (compared as text: an undefined metric is NaN)
    assert [r["seed"] for r in doc["reused"]] == [0] and doc["reused"][0]["commit"]
    assert doc["wall_s"]["centralized"] > first["wall_s"]["centralized"]  # both seeds' training time
    assert "Reused from an earlier run into this folder" in (tmp_path / "report.md").read_text()
    assert any(f["path"].endswith("overlays.png") for f in doc["figures"])  # the first repetition's model, reloaded
    # Other settings (here a learning rate): nothing is reused.
    settings = json.loads(saved.path_of(tmp_path, 0, None).read_text())["settings"]
    assert saved.load(tmp_path, 0, None, settings, first=True) is not None
    for other in ({**settings, "config": {**settings["config"], "train.learning_rate": 0.5}},
                  {**settings, "folds": 3},
                  {**settings, "cases": {**settings["cases"], "plagh": {**settings["cases"]["plagh"], "digest": "0"}}}):
        assert saved.load(tmp_path, 0, None, other, first=True) is None
    path = saved.path_of(tmp_path, 0, None)
    record = json.loads(path.read_text())
    del record["timings"]
    path.write_text(json.dumps(record))
    assert saved.load(tmp_path, 0, None, settings, first=True) is None  # unreadable: trained again, no traceback
    assert saved.load(tmp_path, 1, None, settings, first=True) is None  # saved as a later repetition: no figures


def test_a_ratio_against_a_model_that_learned_nothing_is_not_a_pass():
    """Measured on the standard study: federated Dice 0.007 external over 0.000 internal read "28.1, aim met"."""
    from simulation.report import _questions

    doc = {"centralized": {"internal_test": {"dice_tumor": 0.406, "acc": 0.848},
                           "external": {"dice_tumor": 0.429, "acc": 0.800}},
           "federated": {"internal_test": {"dice_tumor": 0.0003, "acc": 0.758},
                         "external": {"dice_tumor": 0.007, "acc": 0.600}},
           "local:plagh": {"internal_test": {"dice_tumor": 0.010, "acc": 0.727}}}
    verdicts = {row[0]: row[3] for row in _questions(doc)}
    assert verdicts["external / internal, federated, dice_tumor"].startswith("n/a: internal dice_tumor 0.000")
    assert verdicts["external / internal, centralized, dice_tumor"] == "yes"  # 1.057
    assert verdicts["external / internal, federated, acc"] == "no"  # 0.792
    assert verdicts["federated / centralized, dice_tumor (internal)"] == "no"
    assert "federated, dice_tumor (internal)" not in verdicts  # no absolute aim without a profile that has one
    verdicts = {row[0]: row[3] for row in _questions({**doc, "profile": "quick"})}
    assert verdicts["federated, dice_tumor (internal)"] == "no (by 0.800)"
    doc["federated"]["internal_test"]["dice_tumor"] = 0.81
    assert {row[0]: row[3] for row in _questions({**doc, "profile": "quick"})}["federated, dice_tumor (internal)"] \
        == "yes"


def test_an_unknown_run_config_key_stops_the_study_before_anything_is_written(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the study started")

    monkeypatch.setattr(study, "run_study", never)
    out = tmp_path / "run"
    code = simulation_main(["-c", "model.gate-gradiant=false", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "'model.gate-gradiant'" in err and "did you mean 'model.gate-gradient'" in err
    assert not out.exists()


def test_gate_regions_is_off_unless_asked_for(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_study", lambda *args, **kwargs: calls.append(kwargs))
    assert simulation_main(["--out", str(tmp_path / "a")]) == 0
    assert simulation_main(["--out", str(tmp_path / "b"), "--gate-regions", "-c", "model.gate-gradient=false"]) == 0
    assert [c["gate_regions"] for c in calls] == [False, True]
    assert calls[1]["overrides"] == {"model.gate-gradient": False}


def test_gate_regions_train_a_centralized_model_per_region_for_table_2(phantom_root, tiny_run_config, tmp_path,
                                                                       monkeypatch):
    """Through the same Study.train_arm path as the centralized arm; training itself is skipped (the wiring is under
    test)."""
    from braintumnet.checkpoint import load_checkpoint

    trained = []
    monkeypatch.setattr(study, "train_model", lambda model, sites, profile, *a, **k: trained.append(
        (model.gate_region, profile.model.gate_region, tuple(sorted(s.site for s in sites)))))
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    study.run_study(tmp_path, "quick", phantom=phantom_root, device="cpu", skip_federated=True, gate_regions=True,
                    overrides=overrides)

    pooled = [t for t in trained if t[2] == tuple(sorted(SITES))]
    assert [t[0] for t in pooled] == ["tumor", "edema", "whole"] and all(t[0] == t[1] for t in trained)
    assert sorted(t[2] for t in trained if t not in pooled) == sorted((s,) for s in SITES)  # and each site alone:
    assert all(EXTERNAL_SITE not in t[2] for t in trained)  # no arm ever trains on the external site
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["gate_regions"] == {"tumor": "centralized", "edema": "gate:edema", "whole": "gate:whole"}
    for arm in ("gate:edema", "gate:whole"):
        assert {"acc", "auc"} <= set(saved[arm]["internal_test"]) and arm in saved["sd"]
    assert load_checkpoint(tmp_path / "models" / "gate-whole-s0.pt").profile.model.gate_region == "whole"
    assert not any("gate:" in f["title"] for f in saved["figures"])  # the study's figures keep the study's arms

    report = (tmp_path / "report.md").read_text()
    table2 = report.split("## Table 2.")[1].split("## Table 3.")[0]
    assert "| arm | classifier sees | ACC | AUC (macro) |" in table2 and "DSC" not in table2
    for region, arm in (("tumour", "centralized"), ("edema", "gate:edema"), ("whole lesion", "gate:whole")):
        assert f"| {arm} | {region} | {saved[arm]['internal_test']['acc']:.3f} |" in table2
    assert "| paper (reference, not ours) | edema | 0.850 |" in table2

    record = saved["provenance"]
    assert record["overrides"] == overrides and record["commit"] and record["machine"]["cores"] >= 1
    assert f"commit {record['commit']}" in report and "data.img-size=32" in report


def test_without_gate_regions_table_2_says_how_to_produce_it():
    from simulation.report import _tables

    doc = json.loads((REPO / "docs" / "results" / "study-standard" / "metrics.json").read_text())
    table2 = next(t for t in _tables(doc) if t.title.startswith("Table 2."))
    assert [row[1] for row in table2.rows[:3]] == ["tumour", "edema", "whole lesion"]  # committed with --gate-regions
    # The same study as a run without --gate-regions writes it: no region arms.
    without = {k: v for k, v in doc.items() if k != "gate_regions" and not k.startswith("gate:")}
    table2 = next(t for t in _tables(without) if t.title.startswith("Table 2."))
    assert table2.rows == [] and "--gate-regions" in table2.note and "--profile standard" in table2.note


def test_study_figures_label_axes_in_words_show_sd_and_the_synthetic_mark(tmp_path, monkeypatch):
    import simulation.figures as figures
    from matplotlib.container import ErrorbarContainer
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.append(fig) or path)
    results = {"centralized": {"per_site": {"a": {"dice_tumor": 0.5, "acc": 0.8}, "b": {"dice_tumor": 0.4, "acc": 0.7}}}}
    sd = {"centralized": {"per_site": {"a": {"dice_tumor": 0.1, "acc": 0.05}, "b": {"dice_tumor": 0.2, "acc": 0.0}}}}
    figures.site_bars(results, ["a", "b"], tmp_path / "bars.png", sd=sd, synthetic=True)
    figures.site_bars(results, ["a", "b"], tmp_path / "bars.png")
    rounds = [{"round": 1, "evaluate": {"dice_tumor": 0.1, "acc": 0.5}, "train": {"train_loss": 1.0}}]
    figures.learning_curves(rounds, {"centralized": {"dice_tumor": 0.5, "acc": 0.8}}, tmp_path / "lc.png",
                            sd={"centralized": {"dice_tumor": 0.1, "acc": 0.05}}, synthetic=True)

    with_sd, without_sd, curves = drawn
    for fig in drawn:
        assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
        labels = {ax.get_ylabel() for ax in fig.axes} | {ax.get_xlabel() for ax in fig.axes}
        assert not labels & {"dice_tumor", "acc", "loss", "round"}, labels
    assert {ax.get_ylabel() for ax in with_sd.axes} == {"Tumour Dice", "Accuracy"}
    assert "SYNTHETIC" in with_sd.get_suptitle() and "SYNTHETIC" in curves.get_suptitle()
    assert "SYNTHETIC" not in without_sd.get_suptitle()
    errorbars = [c for c in with_sd.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert list(errorbars[0].lines[2][0].get_segments()[0][:, 1]) == pytest.approx([0.4, 0.6])  # site a: 0.5 ± 0.1
    assert not any(isinstance(c, ErrorbarContainer) for c in without_sd.axes[0].containers)
    assert len(curves.axes[0].patches) == 1  # the centralized final's ±1 sd band


def test_each_arm_is_kept_when_scored_so_a_stopped_or_widened_study_trains_only_the_missing_arms(
        phantom_root, tiny_run_config, tmp_path, monkeypatch):
    """A study stopped in its third arm keeps the first two; run again with more arms (Table 2's regions) it trains
    only the others; a repetition saved whole is split into its arms for a study that only chooses other arms.
    Training itself is skipped (the bookkeeping is under test)."""
    from simulation import saved

    trained = []

    def train(model, sites, profile, *a, **k):
        trained.append((profile.model.gate_region, tuple(sorted(s.site for s in sites))))
        if stop_at and len(trained) == stop_at:
            raise RuntimeError("stopped")

    monkeypatch.setattr(study, "train_model", train)
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    run = dict(phantom=phantom_root, device="cpu", skip_federated=True, overrides=overrides)
    stop_at = 3  # centralized, local:yibin, then stopped in local:plagh
    with pytest.raises(RuntimeError):
        study.run_study(tmp_path, "quick", **run)
    assert not saved.path_of(tmp_path, 0, None).exists()
    kept = sorted(p.name for p in saved.path_of(tmp_path, 0, None).with_suffix("").iterdir())
    assert kept == ["centralized.json", f"local-{SITES[0]}.json"]

    stop_at, trained[:] = 0, []
    doc = study.run_study(tmp_path, "quick", gate_regions=True, **run)
    assert sorted(trained) == sorted([("edema", tuple(sorted(SITES))), ("whole", tuple(sorted(SITES))),
                                      *(("tumor", (s,)) for s in SITES[1:])])
    assert [r["arm"] for r in doc["reused"]] == ["centralized", f"local:{SITES[0]}"]
    assert f"seed 0 (centralized, local:{SITES[0]})" in (tmp_path / "report.md").read_text()
    arm_file = json.loads(saved.arm_path(tmp_path, 0, None, "centralized").read_text())
    assert json.dumps(doc["centralized"]["internal_test"]) == json.dumps(arm_file["scores"]["internal_test"])

    # Saved whole (as before arms were kept one by one), then run without the regions: split, nothing trained.
    shutil.rmtree(saved.path_of(tmp_path, 0, None).with_suffix(""))
    trained[:] = []
    again = study.run_study(tmp_path, "quick", **run)
    assert trained == [] and "gate:edema" not in again
    assert json.dumps(again["repetitions"][0], sort_keys=True) == json.dumps(
        {k: v for k, v in doc["repetitions"][0].items() if not k.startswith("gate:")}, sort_keys=True)
    settings = json.loads(saved.path_of(tmp_path, 0, None).read_text())["settings"]
    other = {**settings, "config": {**settings["config"], "train.learning_rate": 0.5}}
    assert saved.load_arm(tmp_path, other, 0, None, "centralized", first=True) is None


def test_a_split_repetition_gives_its_federated_arm_the_rounds_and_the_overlay_model(tmp_path):
    from simulation import saved

    settings = {"config": {"a": 1}, "budgets": ["epochs"], "skip_federated": False, "gate_regions": [], "folds": 0,
                "sites": {}, "cases": {}}
    table = pd.DataFrame({"case_id": ["c1"], "dice_tumor": [0.5]})
    first = {"cases_of": {"centralized": {"internal_test": table}, "federated": {"internal_test": table}},
             "fed_rounds": [{"round": 1}], "overlay_model": "federated/run-1/final.pt"}
    saved.save(tmp_path, settings, {"seed": 0, "fold": None, "centralized": {"x": 1.0}, "federated": {"x": None}},
               timings={"centralized": 3.0, "federated": 5.0}, provenance={"commit": "abc"}, first=first)
    wider = {**settings, "budgets": ["epochs", "wall-time"]}
    assert saved.split_repetition(tmp_path, 0, None, wider) == ["centralized", "federated"]
    (tmp_path / "federated" / "run-1").mkdir(parents=True)
    (tmp_path / "federated" / "run-1" / "final.pt").write_bytes(b"")
    fed = saved.load_arm(tmp_path, wider, 0, None, "federated", first=True)
    assert fed["model"] == "federated/run-1/final.pt" and fed["fed_rounds"] == [{"round": 1}]
    assert fed["seconds"] == 5.0 and fed["commit"] == "abc" and math.isnan(fed["scores"]["x"])
    assert list(fed["per_case"]["internal_test"]["case_id"]) == ["c1"]
    assert saved.load_arm(tmp_path, wider, 0, None, "centralized", first=True)["model"] is None
    assert saved.split_repetition(tmp_path, 0, None, {**settings, "folds": 3}) == []  # another study: not split


def test_a_repetition_saved_before_case_digests_is_split_on_equal_case_counts_only(tmp_path):
    from simulation import saved

    now = {"config": {"a": 1}, "budgets": ["epochs"], "skip_federated": False, "gate_regions": [], "folds": 0,
           "sites": {}, "cases": {"yibin": {"n": 2, "digest": "d1"}}}
    older = {k: v for k, v in now.items() if k != "folds"} | {"cases": {"yibin": 2}}
    saved.save(tmp_path, older, {"seed": 0, "fold": None, "centralized": {"x": 1.0}},
               timings={"centralized": 3.0}, provenance={}, first=None)
    assert saved.split_repetition(tmp_path, 0, None, {**now, "cases": {"yibin": {"n": 3, "digest": "d1"}}}) == []
    assert saved.split_repetition(tmp_path, 0, None, {**now, "budgets": ["wall-time"]}) == ["centralized"]
    assert saved.load_arm(tmp_path, now, 0, None, "centralized", first=False)["scores"] == {"x": 1.0}


def test_an_arm_kept_as_a_later_repetition_is_scored_again_not_trained_when_its_repetition_comes_first(
        phantom_root, tiny_run_config, tmp_path, monkeypatch):
    """Seed 1 kept by a study of seeds 0 and 1 has no per-case tables (only the first repetition keeps them for the
    figures); a study of seed 1 alone scores its kept models again, and trains one only when its model is gone; each
    arm keeps one MLflow run per seed (scoring again does not log it twice)."""
    from mlflow.tracking import MlflowClient

    from simulation import saved

    trained = []
    monkeypatch.setattr(study, "train_model", lambda model, sites, *a, **k: trained.append(len(sites)))
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    run = dict(phantom=phantom_root, device="cpu", skip_federated=True, overrides=overrides)
    both = study.run_study(tmp_path, "quick", seeds=(0, 1), **run)
    assert "per_case" not in json.loads(saved.arm_path(tmp_path, 1, None, "centralized").read_text())
    (tmp_path / "models" / f"local-{SITES[0]}-s1.pt").unlink()

    trained[:] = []
    alone = study.run_study(tmp_path, "quick", seeds=(1,), **run)
    assert trained == [1]  # only local:yibin, whose model was removed
    assert json.dumps(alone["repetitions"][0]["centralized"]) == json.dumps(both["repetitions"][1]["centralized"])
    assert "per_case" in json.loads(saved.arm_path(tmp_path, 1, None, "centralized").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(study.EXPERIMENT).experiment_id])
    seed1 = sorted(r.data.tags["arm"] for r in runs if r.data.tags["seed"] == "1")
    assert seed1 == sorted(["centralized", *(f"local:{s}" for s in SITES)])


def test_an_arm_kept_with_another_postprocessing_rule_is_scored_again_from_its_model_not_trained(
        phantom_root, tiny_run_config, tmp_path, monkeypatch, capsys):
    """The rule cleans a trained network's labels: a study with another ``model.postprocess`` than its kept arms
    scores their models again (every repetition, the first's per-case tables too) and trains only an arm whose model
    is gone; a worker process leaves the arms it could score again to the study; the report, the arm's record and
    its MLflow run say which rule made its scores. The models are untrained (their scattered labels give the two
    rules different figures, which the test needs)."""
    from mlflow.tracking import MlflowClient

    from braintumnet.checkpoint import load_model
    from braintumnet.postprocess import with_rule
    from simulation import saved
    from simulation.arms import score_model

    trained = []
    monkeypatch.setattr(study, "train_model", lambda model, sites, *a, **k: trained.append(len(sites)))
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    run = dict(phantom=phantom_root, device="cpu", skip_federated=True)
    kept = study.run_study(tmp_path, "quick", seeds=(0, 1), overrides={**overrides, "model.postprocess": "none"},
                           **run)
    assert len(trained) == 2 * (1 + len(SITES))
    (tmp_path / "models" / f"local-{SITES[0]}-s1.pt").unlink()
    before = json.loads(saved.arm_path(tmp_path, 0, None, "centralized").read_text())

    # A worker given local:yibin (as a study's --jobs starts one, for every seed) trains seed 1's, whose model is
    # gone, and leaves seed 0's to the study, which scores it again.
    trained[:] = []
    study.run_study(tmp_path, "quick", seeds=(0, 1), overrides=overrides, arms=(f"local:{SITES[0]}",), worker=True,
                    **run)
    assert trained == [1]
    assert f"local:{SITES[0]} (seed 0): taken by the study" in capsys.readouterr().out

    trained[:] = []
    doc = study.run_study(tmp_path, "quick", seeds=(0, 1), overrides=overrides, **run)
    assert trained == []  # every other arm scored again from its model; the worker's reused
    assert doc["config"]["model.postprocess"] == "largest-lesion"
    again = {(r["seed"], r["arm"]) for r in doc["reused"] if r.get("scored_with") == "none"}
    assert again == {(s, a) for s in (0, 1) for a in ("centralized", *(f"local:{x}" for x in SITES))} - {
        (1, f"local:{SITES[0]}")}
    # Scored with the study's rule: equal to scoring the kept model afresh, and not the kept (rule-less) figures.
    model, checkpoint = load_model(tmp_path / "models" / "centralized-s1.pt")
    assert checkpoint.profile.model.postprocess == "none"  # as trained; the study's rule is not the checkpoint's
    profile = with_rule(checkpoint.profile, "largest-lesion")
    sites = [s for s in study.load_sites([phantom_root / x for x in (*SITES, EXTERNAL_SITE)], tmp_path / "cache",
                                          profile.data, progress=False)]
    internal, external = [s for s in sites if s.site in SITES], [s for s in sites if s.site not in SITES]
    fresh, _ = score_model(model, internal, external, profile, "cpu", {})
    rescored = doc["repetitions"][1]["centralized"]["internal_test"]
    assert rescored["dice_tumor"] == pytest.approx(fresh["internal_test"]["dice_tumor"], abs=1e-9)
    assert rescored["dice_tumor"] != kept["repetitions"][1]["centralized"]["internal_test"]["dice_tumor"]
    # The first repetition's per-case tables (the report's figures) are the new rule's too.
    model0, checkpoint0 = load_model(tmp_path / "models" / "centralized-s0.pt")
    _, cases0 = score_model(model0, internal, external, with_rule(checkpoint0.profile, "largest-lesion"), "cpu", {})
    after = json.loads(saved.arm_path(tmp_path, 0, None, "centralized").read_text())

    def scores_of(table):  # the per-case figures (every number; undefined ones as NaN)
        table = pd.DataFrame(**table) if isinstance(table, dict) else table
        return table.select_dtypes("number").astype(float).to_numpy()

    kept_cases = scores_of(after["per_case"]["internal_test"])
    assert np.allclose(kept_cases, scores_of(cases0["internal_test"]), equal_nan=True, atol=1e-9)
    assert not np.allclose(kept_cases, scores_of(before["per_case"]["internal_test"]), equal_nan=True)
    record = json.loads(saved.arm_path(tmp_path, 1, None, "centralized").read_text())
    assert record["settings"]["config"]["model.postprocess"] == "largest-lesion"
    assert record["scored_again"]["from"] == "none" and record["seconds"] > 0
    assert "scored again from the kept models with this study's post-processing (they had been scored with 'none')" \
        in (tmp_path / "report.md").read_text()
    # MLflow: the arm's one run now holds the new scores and names their rule (the old run is replaced, as for an
    # arm trained again); run again, nothing is scored or logged twice.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study.EXPERIMENT).experiment_id

    def rules():
        return sorted(r.data.params.get("model.postprocess", "?") for r in client.search_runs([experiment])
                      if r.data.tags["arm"] == "centralized" and r.data.tags["seed"] == "0")

    assert rules() == ["largest-lesion"]
    run_ids = sorted(r.info.run_id for r in client.search_runs([experiment]))
    trained[:] = []
    study.run_study(tmp_path, "quick", seeds=(0, 1), overrides=overrides, **run)
    assert trained == [] and sorted(r.info.run_id for r in client.search_runs([experiment])) == run_ids
    # A later run still says the rule those scores replaced.
    assert "they had been scored with 'none'" in (tmp_path / "report.md").read_text()


def test_arms_trains_only_the_named_arms_kept_whole_for_a_later_study(phantom_root, tiny_run_config, tmp_path,
                                                                      monkeypatch, capsys):
    """``--arms`` (several machines, one study): only the named arms are trained, each kept with what the first
    repetition needs, so the study run into the folder later reuses it; no report is written; an unknown name is
    refused before any training. Training itself is skipped (the bookkeeping is under test)."""
    from simulation import saved

    trained = []
    monkeypatch.setattr(study, "train_model", lambda model, sites, profile, *a, **k: trained.append(
        (profile.model.gate_region, tuple(sorted(s.site for s in sites)))))
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    run = dict(phantom=phantom_root, device="cpu", overrides=overrides)

    with pytest.raises(BrainTumNetError, match=r"--arms local:nowhere: this study's arms are centralized, .*local:"):
        study.run_study(tmp_path, "quick", arms=("local:nowhere",), **run)
    assert trained == []

    done = study.run_study(tmp_path, "quick", seeds=(1,), arms=("gate:whole", f"local:{SITES[0]}"), **run)
    assert trained == [("whole", tuple(sorted(SITES))), ("tumor", (SITES[0],))]
    assert set(done["arms"]["seed 1"]) == {"gate:whole", f"local:{SITES[0]}"}
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "report.md").exists()
    kept = sorted(p.name for p in saved.path_of(tmp_path, 1, None).with_suffix("").iterdir())
    assert kept == ["gate-whole.json", f"local-{SITES[0]}.json"]
    assert "run the study into" in capsys.readouterr().out

    # The local arm's MLflow run lost (as for an arm kept on another machine and copied here), gate:whole's kept.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study.EXPERIMENT).experiment_id
    local_run, = [r for r in client.search_runs([experiment]) if r.data.tags["arm"] == f"local:{SITES[0]}"]
    client.delete_run(local_run.info.run_id)

    # Seed 1 as the first (and only) repetition of the full study: the kept arms are reused, the others trained.
    trained[:] = []
    doc = study.run_study(tmp_path, "quick", seeds=(1,), skip_federated=True, gate_regions=True, **run)
    assert ("whole", tuple(sorted(SITES))) not in trained and ("tumor", (SITES[0],)) not in trained
    assert len(trained) == 2 + len(SITES) - 1  # centralized, gate:edema, the other local arms
    assert sorted(r["arm"] for r in doc["reused"]) == ["gate:whole", f"local:{SITES[0]}"]
    # One MLflow run per arm: the lost one logged again, none twice.
    arms = sorted(r.data.tags["arm"] for r in client.search_runs([experiment]))
    assert arms == sorted(["centralized", "gate:edema", "gate:whole", *(f"local:{s}" for s in SITES)])
    assert "local:" + SITES[0] + " (seed 1): internal" in capsys.readouterr().out


def test_arms_on_the_command_line_need_no_other_flag(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_study", lambda *args, **kwargs: calls.append(kwargs))
    assert simulation_main(["--out", str(tmp_path), "--arms", "federated:wall-time, gate:whole"]) == 0
    assert calls[0]["arms"] == ("federated:wall-time", "gate:whole")


def test_the_phantom_is_the_same_whatever_seeds_repeat_the_study(tmp_path, monkeypatch):
    """Arms trained with other --seeds (another machine, a later run) must have seen the same cohort."""
    import simulation.cohort as cohort

    class Written(Exception):
        pass

    seen = []

    def generate(out, *, scale, seed, progress, test_scale):
        seen.append((seed, scale, test_scale))
        raise Written

    monkeypatch.setattr(cohort, "generate_cohort", generate)
    for seeds in ((2,), (1, 0)):
        with pytest.raises(Written):
            study.run_study(tmp_path / str(seeds[0]), "quick", seeds=seeds, device="cpu", skip_federated=True)
    # The profile's cohort: training cases at quick's scale, test sets of standard's size.
    assert seen == [(cohort.PHANTOM_SEED, 0.1, 0.3)] * 2


def test_a_pooled_arm_kept_with_another_site_batch_is_reused_and_a_site_arm_is_not(tmp_path):
    """Each site's batch (train.site-batch-size) changes how local and federated arms train, not the pooled ones: a
    pooled arm kept by a version without the key, or with another value, is reused; a local arm only when its sites
    trained in the same batch."""
    from simulation import saved

    before = {"config": {"train.batch_size": 8}, "budgets": ["epochs"], "skip_federated": False, "gate_regions": [],
              "folds": 0, "sites": {}, "cases": {}}
    for arm in ("centralized", "gate:whole", "local:yibin"):
        saved.save_arm(tmp_path, before, 0, None, arm, {"x": 1.0}, 3.0, provenance={})
    now = {**before, "config": {"train.batch_size": 8, "train.site_batch_size": 3}}
    assert saved.load_arm(tmp_path, now, 0, None, "centralized", first=False)["scores"] == {"x": 1.0}
    assert saved.load_arm(tmp_path, now, 0, None, "gate:whole", first=False)["scores"] == {"x": 1.0}
    assert saved.load_arm(tmp_path, now, 0, None, "local:yibin", first=False) is None
    wider = {**now, "config": {"train.batch_size": 16, "train.site_batch_size": 3}}
    assert saved.load_arm(tmp_path, wider, 0, None, "centralized", first=False) is None
    # A site batch of 0 (the default) or 8 is the pooled batch the record's sites trained in: every arm counts.
    for same in (0, 8):
        unchanged = {**before, "config": {"train.batch_size": 8, "train.site_batch_size": same}}
        assert saved.load_arm(tmp_path, unchanged, 0, None, "local:yibin", first=False)["scores"] == {"x": 1.0}
    # Kept whole (an older version): only its pooled arms are split out under the new settings.
    other = tmp_path / "whole"
    saved.save(other, before, {"seed": 0, "fold": None, "centralized": {"x": 1.0}, "gate:whole": {"x": 2.0},
                               "local:yibin": {"x": 3.0}}, timings={}, provenance={}, first=None)
    assert saved.split_repetition(other, 0, None, now) == ["centralized", "gate:whole"]
    assert saved.load_arm(other, now, 0, None, "gate:whole", first=False)["scores"] == {"x": 2.0}
    assert saved.split_repetition(other, 0, None, wider) == []


def test_an_arm_kept_before_the_postprocessing_counts_as_scored_without_it(tmp_path):
    """A record without ``model.postprocess`` scored the network's labels as they are: reused with ``none``, trained
    again with the default rule."""
    from simulation import saved

    before = {"config": {"train.batch_size": 8}, "budgets": ["epochs"], "skip_federated": False, "gate_regions": [],
              "folds": 0, "sites": {}, "cases": {}}
    for arm in ("centralized", "local:yibin"):
        saved.save_arm(tmp_path, before, 0, None, arm, {"x": 1.0}, 3.0, provenance={})
    for rule, reused in (("none", True), ("largest-lesion", False)):
        now = {**before, "config": {"train.batch_size": 8, "model.postprocess": rule}}
        for arm in ("centralized", "local:yibin"):
            assert (saved.load_arm(tmp_path, now, 0, None, arm, first=False) is not None) is reused, (rule, arm)
    # Scored again rather than trained with the default rule, when its model is here: the record names none (as an
    # arm split out of a repetition kept whole), so the study's own model file counts.
    default = saved.model_file(tmp_path, "local:yibin", 0, None)
    assert default == tmp_path / "models" / "local-yibin-s0.pt"
    assert not saved.rescorable(tmp_path, now, 0, None, "local:yibin")
    default.parent.mkdir()
    default.write_bytes(b"a checkpoint")
    assert saved.rescorable(tmp_path, now, 0, None, "local:yibin")


def test_an_arms_mlflow_run_counts_in_a_moved_folder_and_on_a_shared_server_only_for_its_study(tmp_path, monkeypatch):
    from simulation.tracking import arm_logged, log_arm

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tags = {"arm": "local:yibin", "seed": "0", "fold": "None", "synthetic": "True"}
    scores = {"internal_test": {"dice_tumor": 0.5}}
    assert not arm_logged(tmp_path, "exp", {**tags, "study": "/here"})  # no experiment yet
    log_arm(tmp_path, "exp", "local:yibin", scores, {}, {**tags, "study": "/where/it/was"})
    assert arm_logged(tmp_path, "exp", {**tags, "study": "/here"})  # the folder's own store: moved, still its run
    assert not arm_logged(tmp_path, "exp", {**tags, "seed": "1", "study": "/here"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # as a shared server
    assert not arm_logged(tmp_path, "exp", {**tags, "study": "/here"})  # another study's run
    assert arm_logged(tmp_path, "exp", {**tags, "study": "/where/it/was"})
    log_arm(tmp_path, "exp", "local:yibin", scores, {}, tags)  # logged before runs named their study
    assert arm_logged(tmp_path, "exp", {**tags, "study": "/here's/a quote"})


def test_an_arm_says_every_fifth_of_its_epochs_but_the_last(capsys):
    line = study.epoch_lines("centralized (seed 0)", 30, time.perf_counter())
    for epoch in range(1, 31):
        line(epoch, {"train_loss": 1.0 / epoch})
    said = capsys.readouterr().out.splitlines()
    assert [s.split("): ")[1].split(",")[0] for s in said] == [f"epoch {e}/30" for e in (6, 12, 18, 24)]
    assert "centralized (seed 0): epoch 6/30, loss 0.167 (" in said[0]
