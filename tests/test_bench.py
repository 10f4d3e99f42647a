"""``python -m bench`` at the test suite's size: every benchmark's pipeline runs, its JSON has the keys the tables are
built from, and its markdown table is written. Figures at this size mean nothing; ``--quick`` and the full mode
measure (bench/results/)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bench import accuracy, compute, data_pipeline, evaluation, federation, federation_runs
from bench.__main__ import main, parse_args
from bench.common import Context, interleaved, ratio

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def ctx(tmp_path, phantom_root, cache_root) -> Context:
    ctx = Context(out=tmp_path / "results", workdir=tmp_path / "work", quick=True, device="cpu", tiny=True,
                  cache=cache_root)
    ctx.register_phantom(SimpleNamespace(out=phantom_root, seconds=0.0), scale=0.03)
    return ctx


def _written(ctx: Context, name: str) -> dict:
    doc = json.loads((ctx.out / f"{name}.json").read_text())
    md = (ctx.out / f"{name}.md").read_text()
    assert doc["benchmark"] == name and doc["mode"] == "tiny (test)"
    assert {"cpu", "cpus_usable", "load_average", "torch", "flwr"} <= set(doc["machine"])
    assert md.startswith("# ") and "| " in md and doc["machine"]["cpu"] in md
    return doc


def test_interleaved_takes_turns_and_ratio_handles_missing():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"] and all(len(t) == 2 for t in times.values())
    assert ratio(2.0, 4.0) == 0.5 and ratio(1.0, None) is None and ratio(1.0, 0) is None


def test_a_kept_workdir_reuses_its_phantom(tmp_path, monkeypatch):
    """``--workdir`` keeps the cohort: a complete one of the same scale, format and seed is not generated again."""
    ctx = Context(out=tmp_path / "out", workdir=tmp_path, quick=True)
    root = tmp_path / "phantom-nifti-s0.3-seed0"
    root.mkdir()
    (root / "phantom.json").write_text(json.dumps({"generator": "braintumnet.data.phantom", "scale": 0.3, "seed": 0,
                                                   "format": "nifti", "complete": True}))
    found = ctx.phantom(0.3)
    assert found.out == root and found.seconds is None
    larger_tests = tmp_path / "phantom-nifti-s0.1-t0.3-seed0"  # the quick study's: test sets of scale 0.3
    larger_tests.mkdir()
    (larger_tests / "phantom.json").write_text(json.dumps({"generator": "braintumnet.data.phantom", "scale": 0.1,
                                                           "test_scale": 0.3, "seed": 0, "format": "nifti",
                                                           "complete": True}))
    assert ctx.phantom(0.1, test_scale=0.3).out == larger_tests and ctx.phantom(0.3).out == root
    assert ctx.phantom(0.3, test_scale=0.3).out == root  # a test scale not above the scale adds nothing
    written = []
    monkeypatch.setattr("braintumnet.data.phantom.generate_cohort",
                        lambda out, **kw: written.append((out.name, kw["test_scale"])) or SimpleNamespace(out=out))
    other = tmp_path / "phantom-nifti-s0.1-t0.2-seed0"  # its marker says: no larger test sets
    other.mkdir()
    (other / "phantom.json").write_text(json.dumps({"generator": "braintumnet.data.phantom", "scale": 0.1,
                                                    "test_scale": None, "seed": 0, "format": "nifti",
                                                    "complete": True}))
    ctx.phantom(0.1, test_scale=0.2)  # a kept cohort of other test sets is generated again, not reused
    assert written == [("phantom-nifti-s0.1-t0.2-seed0", 0.2)]


def test_compute_pipeline(ctx):
    compute.run(ctx)
    doc = _written(ctx, "compute")
    models = doc["widths"]["quick"]["models"]
    assert {"BrainTumNet", "BasicUNet"} <= set(models)
    assert models["BrainTumNet"]["train_ratio"] == 1.0
    assert all(m["train_slices_s"] > 0 and m["infer_slices_s"] > 0 and m["params"] > 0 for m in models.values())
    sparse = doc["sparse_vs_dense"]
    assert sparse["speed"]["quick"]["speedup"] > 0 and sparse["speed"]["quick"]["attention_speedup"] > 0
    assert abs(sparse["dice_tumor_difference"]) <= 1
    assert 0 <= sparse["tumor_mask_agreement_dice"] <= 1 and "sparse_dice_difference" in doc["aims"]


def test_accuracy_pipeline(ctx, prepared_sites):
    accuracy.run(ctx, sites=prepared_sites)
    doc = _written(ctx, "accuracy")
    arms = doc["arms"]
    assert {accuracy.REFERENCE, "BrainTumNet two-stage", "without CBAM", "BasicUNet", "ResNet-18"} == set(arms)
    assert arms["BasicUNet"]["internal_test"]["acc"] is None  # a segmenter has no classification figures
    assert arms["ResNet-18"]["internal_test"]["dice_tumor"] is None
    assert arms[accuracy.REFERENCE]["ratio_to_braintumnet"]["internal_test"]["acc"] in (1.0, None)
    assert set(doc["multitask_minus_two_stage"]["internal_test"]) == {"dice_tumor_points", "acc_points"}
    assert "dice_tumor" in (ctx.out / "accuracy.md").read_text()


def test_accuracy_keeps_finished_arms_and_names_missing_ones(ctx, prepared_sites):
    """A full run takes hours on a CPU: arms trained by one run are kept and reused by the next, never retrained,
    and the tables say which arms are still missing."""
    ctx.arms = ("multitask",)
    first = accuracy.run(ctx, sites=prepared_sites)
    assert list(first["arms"]) == [accuracy.REFERENCE] and "no-cbam" in first["missing_arms"]
    kept = ctx.out / "accuracy-arms-tiny" / "multitask.json"
    stamp = kept.stat().st_mtime_ns
    assert "--arms two-stage," in (ctx.out / "accuracy.md").read_text()  # the command that trains the rest

    ctx.arms = ("no-cbam", "multitask")
    second = accuracy.run(ctx, sites=prepared_sites)
    assert list(second["arms"]) == [accuracy.REFERENCE, "without CBAM"]  # the table's order, whatever --arms says
    assert kept.stat().st_mtime_ns == stamp  # reused, not retrained
    assert second["arms"][accuracy.REFERENCE]["train_s"] == first["arms"][accuracy.REFERENCE]["train_s"]
    assert "multitask" not in second["missing_arms"] and "no-cbam" not in second["missing_arms"]

    ctx.arms, ctx.fresh = ("multitask",), True  # --fresh retrains the chosen arms, and still shows the kept ones
    other = (ctx.out / "accuracy-arms-tiny" / "no-cbam.json").stat().st_mtime_ns
    assert "without CBAM" in accuracy.run(ctx, sites=prepared_sites)["arms"]
    assert kept.stat().st_mtime_ns != stamp
    assert (ctx.out / "accuracy-arms-tiny" / "no-cbam.json").stat().st_mtime_ns == other

    assert parse_args(["--arms", "kept"]).arms == () and parse_args([]).arms is None
    ctx.arms, ctx.fresh = (), False  # --arms kept: no training, the tables rewritten from what is kept
    stamp = kept.stat().st_mtime_ns
    assert list(accuracy.run(ctx, sites=prepared_sites)["arms"]) == [accuracy.REFERENCE, "without CBAM"]
    assert kept.stat().st_mtime_ns == stamp

    settings = json.loads(kept.read_text())
    settings["settings"]["epochs"] += 1  # kept under other settings: not a result of this run's settings
    kept.write_text(json.dumps(settings))
    ctx.arms, ctx.fresh = ("no-cbam",), False
    assert accuracy.REFERENCE not in accuracy.run(ctx, sites=prepared_sites)["arms"]
    settings["settings"]["epochs"] -= 1
    assert settings["settings"].pop("postprocess") == "largest-lesion"  # as kept before the rule: scored without it
    kept.write_text(json.dumps(settings))
    assert accuracy.REFERENCE not in accuracy.run(ctx, sites=prepared_sites)["arms"]


def test_accuracy_table_shows_an_arm_another_process_finished_while_this_one_trained(ctx, prepared_sites,
                                                                                     monkeypatch):
    """Two processes split the arms: the one that ends last writes the table with both processes' arms."""
    train = accuracy._train_arm

    def train_while_another_process_keeps_an_arm(*args, **kwargs):
        result = train(*args, **kwargs)
        accuracy.ArmStore(ctx, accuracy._settings(ctx), "largest-lesion").save(
            "two-stage", "BrainTumNet two-stage", result, ctx.machine, "other")
        return result

    monkeypatch.setattr(accuracy, "_train_arm", train_while_another_process_keeps_an_arm)
    ctx.arms = ("no-cbam",)  # two-stage comes before it in the table's order: looked up before it was there
    doc = accuracy.run(ctx, sites=prepared_sites)
    assert list(doc["arms"]) == ["BrainTumNet two-stage", "without CBAM"]
    assert doc["provenance"]["BrainTumNet two-stage"]["commit"] == "other"
    assert "two-stage" not in doc["missing_arms"]


def test_federation_partition_and_analysis(ctx, prepared_sites, tiny_profile, tmp_path):
    """The sites-scaling partition and the metrics.json analysis (the Flower runs themselves are covered by
    tests/federation; ``--quick`` runs them)."""
    from braintumnet.data.cache import load_prepared, prepared_dir

    internal = [prepared_sites[s] for s in ("yibin", "plagh", "jinling")]
    names = federation.partition(internal, 3, tmp_path / "parts", tiny_profile.data)
    parts = [load_prepared(prepared_dir(tmp_path / "parts", n, tiny_profile.data)) for n in names]
    assert sum(len(p) for p in parts) == sum(len(s) for s in internal)  # the same total data, dealt
    assert all(len(p.indices("test")) and len(p.indices("train")) for p in parts)
    size = 1000
    rounds = [{"round": r, "sites": {n: {"train": {"seconds": 2.0}, "evaluate": {"seconds": 1.0}} for n in names},
               "seconds": {"wall_s": 3.3}, "overhead": 1.1,
               "bytes_per_site": {n: {"down": size * (2 if r == 2 else 1), "up": size} for n in names}}
              for r in (1, 2)]  # evaluate-in-train: one download a round, two in the last
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    found = federation_runs.analyse(run_dir, size, parallel_slots=2)
    assert found["exchanged_vs_2x_model"] == 1.0 and found["exchanged_vs_2x_model_run"] == 1.25
    assert found["up_vs_1x_model"] == 1.0
    assert found["overhead_median"] == 1.1
    assert found["overhead_vs_cores_median"] == pytest.approx(3.3 / 4.5)  # 3 sites × 3 s on 2 cores
    assert federation_runs.model_bytes({"profile": "quick", "model.feature-size": 8}) > 0


def test_federation_one_site_at_a_time_runs_give_their_own_overhead_and_data_scaling():
    def run(sites, fraction, epochs, serial, wall, overhead, vs_cores):
        return {"sites": sites, "fraction": fraction, "local_epochs": epochs, "serial": serial, "run_wall_s": wall,
                "round_wall_s_total": wall, "overhead_median": overhead, "overhead_vs_cores_median": vs_cores,
                "exchanged_vs_2x_model": 1.0}

    runs = {"sites3-data1": run(3, 1.0, 1, False, 10.0, 2.4, 1.7),
            "sites3-data0.5": run(3, 0.5, 1, False, 8.0, 2.6, 1.8),
            "sites3-data1-epochs10-serial": run(3, 1.0, 10, True, 100.0, 3.2, 1.05),
            "sites3-data0.5-epochs10-serial": run(3, 0.5, 10, True, 52.0, 3.3, 1.08)}
    doc = {"runs": runs, "deployments": None, "scaling": federation._scaling(runs)}
    assert doc["scaling"]["data"][0.5]["vs_full"] == 0.8  # the parallel runs alone
    assert doc["scaling"]["data_serial"][0.5]["vs_full"] == 0.52
    aims = federation._aims(doc)
    assert aims["round_overhead_simulation"]["value"] == 2.4  # the 1-epoch parallel run stays the reference
    serial = aims["round_overhead_simulation_one_site_at_a_time_10_local_epochs"]
    assert serial["value"] == 1.05 and serial["met"]  # wall / sum of the sites' own times
    assert not aims["half_data_vs_full"]["met"] and aims["half_data_vs_full_one_site_at_a_time"]["met"]


def test_federation_deployment_runs_each_get_their_aims_and_row_and_a_failed_one_is_named():
    ok = {"local_epochs": 10, "run_wall_s": 90.0, "round_wall_s_total": 80.0, "overhead_round1": 1.4,
          "overhead_median": 1.3, "overhead_vs_cores_median": 1.08, "exchanged_vs_2x_model": 1.01,
          "exchanged_vs_2x_model_run": 1.2, "rounds": [{"bytes_down_per_site": 1000}]}
    failed = {"local_epochs": 1, "error": "run ended as finished:failed after 0 round(s)"}
    doc = {"runs": {}, "deployments": {1: failed, 10: ok}, "scaling": {}, "parallel_slots": 2, "repeated": True,
           "model_bytes_fp32": 2**20, "data": {}, "rounds": 2, "phantom_scale": 0.1}
    doc["aims"] = aims = federation._aims(doc)
    assert "round_overhead_deployment" not in aims  # no figure from a run that failed
    assert aims["round_overhead_deployment_10_local_epochs"] == {"value": 1.3, "aim": 1.10, "met": False}
    assert aims["round_overhead_deployment_10_local_epochs_vs_cores"]["met"]
    text = "\n".join(line for _, lines in federation._sections(doc) for line in lines)
    assert "| loopback deployment | 3 | 1.0000 | 1 | run ended as finished:failed" in text
    assert "| loopback deployment (TLS, node auth) | 3 | 1.0000 | 10 |" in text
    notes = " ".join(federation._notes(SimpleNamespace(), doc))
    assert "1 local epoch(s): run ended as finished:failed" in notes and "10 local epoch(s)" not in notes


def test_deployment_round_split_separates_the_phases_the_work_and_the_centre():
    from bench.federation_deployment import _round_split

    def rnd(wall, train, work_t, evaluate, work_e):
        return {"wall_s": wall, "train_s": train, "slowest_train_s": work_t, "evaluate_s": evaluate,
                "slowest_evaluate_s": work_e}

    ok = {"rounds": [rnd(99.0, 50.0, 1.0, 40.0, 1.0), rnd(12.0, 7.0, 5.0, 3.0, 2.5), rnd(14.0, 8.0, 6.0, 4.0, 3.5)]}
    [row] = _round_split({"1": ok, "40": {"error": "failed", "rounds": []}})
    assert row[0] == "1" and row[1] == pytest.approx(13.0)  # round 1 (the cold start) left out
    assert row[6] == pytest.approx(2.0) and row[7] == pytest.approx(0.5)  # each phase beyond its slowest site
    assert row[8] == pytest.approx(2.0)  # the centre between the phases: wall - train - evaluate


def test_resnet_baselines_have_he_et_al_stem_and_give_logits_for_every_slice():
    from bench.models import classifier_baselines

    x = torch.zeros(2, 1, 64, 64)
    for name, factory in classifier_baselines(3).items():
        model = factory()
        seg, logits = model(x)
        assert logits.shape == (2, 3) and seg.shape == (2, 3, 64, 64) and not seg.any(), name
        if name.startswith("ResNet"):  # MONAI's default stride 1 would keep 4x the pixels through every stage
            assert model.net.conv1.stride == (2, 2) and isinstance(model.net.maxpool, torch.nn.MaxPool2d), name


def test_evaluation_speed(tmp_path):
    """Seconds per evaluated case, through engine.evaluate_cases on synthetic whole-scan cases (no phantom)."""
    ctx = Context(out=tmp_path / "results", workdir=tmp_path / "work", quick=True, device="cpu", tiny=True)
    evaluation.run(ctx)
    doc = _written(ctx, "evaluation")
    (found,) = doc["sizes"].values()
    assert found["cases"] == 2 and found["slices_per_case"] == 12
    assert 0 < found["scoring_s_per_case"] and 0 < found["total_s_per_case"]
    assert 0 < found["scoring_without_postprocess_s_per_case"] and found["postprocess"] == "largest-lesion"
    assert "post-processing ratio" in (ctx.out / "evaluation.md").read_text()
    site = evaluation.synthetic_site(32, 1, 12)
    assert (site.masks == 1).any() and site.slices["z_index"].tolist() == list(range(12))


def test_data_pipeline(ctx):
    data_pipeline.run(ctx)
    doc = _written(ctx, "data")
    assert doc["prepare"]["tiny"]["nifti"]["cases_per_min"] > 0
    load = doc["cache_load"]["tiny"]
    assert load["load_s"] > 0 and load["n_slices"] > 0


def test_gpu_without_a_gpu_says_so_and_the_cli_writes_it(tmp_path):
    assert main(["--only", "gpu", "--device", "cpu", "--out", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["run"] is False and "no CUDA" in doc["reason"]
    assert "Not run" in (tmp_path / "gpu.md").read_text()
    with pytest.raises(SystemExit):
        parse_args(["--only", "compute,nonsense"])


def test_federation_sites_option_sets_the_scaling_runs_and_grows_the_phantom(tmp_path):
    assert parse_args(["--sites", "24,12,6"]).sites == (24, 12, 6)
    settings = federation_runs.settings(Context(out=tmp_path, workdir=tmp_path, quick=True, sites=(24, 12, 6)))
    assert settings["sites"] == [3, 6, 12, 24]  # 3 sites is the reference of every ratio
    assert settings["phantom"] == 0.24  # about 38 internal test cases: one for each of 24 dealt sites
    with pytest.raises(SystemExit):
        parse_args(["--sites", "0,3"])


def test_joint_model_benchmark_pairs_seeds_and_keeps_finished_arm_seeds(ctx, prepared_sites):
    from bench import joint

    ctx.arms, ctx.seeds = ("multitask", "two-stage"), (0, 1)
    first = joint.run(ctx, sites=prepared_sites)
    assert set(first["arms"]) == {"multitask", "two-stage"} and "no-cbam" in first["missing"]
    claim = first["multitask_minus_two_stage"]["internal_test"]["dice_tumor"]
    per_seed = first["per_seed"]
    expected = [100 * (per_seed["multitask"][s]["internal_test"]["dice_tumor"]
                       - per_seed["two-stage"][s]["internal_test"]["dice_tumor"]) for s in (0, 1)]
    assert claim["per_seed"] == pytest.approx(expected)
    assert "the paper's claim" in (ctx.out / "joint.md").read_text()
    versus = first["minus_default"]["two-stage"]["internal_test"]["acc"]  # the same pairs, the other way round
    assert versus["per_seed"] == pytest.approx([-d for d in first["multitask_minus_two_stage"]["internal_test"]["acc"]
                                                ["per_seed"]])
    assert first["arms"]["two-stage"]["seeds"] == [0, 1] and "Each arm minus the default" in (ctx.out / "joint.md"
                                                                                             ).read_text()
    kept = sorted(p.name for p in (ctx.out / "joint-arms-tiny").iterdir())
    assert kept == ["multitask-s0.json", "multitask-s1.json", "two-stage-s0.json", "two-stage-s1.json"]
    stamp = (ctx.out / "joint-arms-tiny" / "multitask-s0.json").stat().st_mtime_ns
    joint.run(ctx, sites=prepared_sites)  # nothing retrained: the kept arm-seeds match their settings
    assert (ctx.out / "joint-arms-tiny" / "multitask-s0.json").stat().st_mtime_ns == stamp
    assert "did not all train on one processor" not in (ctx.out / "joint.md").read_text()
    record = ctx.out / "joint-arms-tiny" / "two-stage-s1.json"  # as if trained later on another machine
    record.write_text(json.dumps({**json.loads(record.read_text()), "machine": "Other CPU, 2 usable core(s) of 2"}))
    assert joint.run(ctx, sites=prepared_sites)["processors"]["two-stage"][1] == "Other CPU"
    report = (ctx.out / "joint.md").read_text()
    assert "did not all train on one processor" in report and "two-stage [seed 0]" in report
    assert "Other CPU: two-stage [seed 1]" in report
    # Kept before the post-processing existed: scored on the raw labels, so not a result of the default rule.
    doc = json.loads(record.read_text())
    assert doc["model_defaults"].pop("postprocess") == "largest-lesion"
    record.write_text(json.dumps(doc))
    defaults = {**doc["model_defaults"], "postprocess": "largest-lesion"}
    assert joint._load(record, doc["settings"], defaults) is None
    assert joint._load(record, doc["settings"], {**defaults, "postprocess": "none"}) is not None
    # Such a record is not shown, and the report says why instead of calling the arm never trained: first one seed
    # of the arm (seed 0 still shown), then the whole arm.
    store = ctx.out / "joint-arms-tiny"
    assert joint._kept_otherwise(store, "two-stage", (1,), doc["settings"], defaults) == ["model.postprocess"]
    assert joint._kept_otherwise(store, "two-stage", (0,), doc["settings"], defaults) == []
    assert joint._kept_otherwise(store, "two-stage", (1,), doc["settings"], {**defaults, "postprocess": "none"}) == []
    ctx.arms = ("multitask",)  # train nothing else: the run only reads the kept records
    partly = joint.run(ctx, sites=prepared_sites)
    assert partly["arms"]["two-stage"]["seeds"] == [0]
    assert partly["kept_otherwise"] == {"two-stage": {"seeds": [1], "differ": ["model.postprocess"]}}
    assert "two-stage [seed 1] (model.postprocess differs)" in (ctx.out / "joint.md").read_text()
    stale = store / "two-stage-s0.json"
    old = json.loads(stale.read_text())
    del old["model_defaults"]["postprocess"]
    stale.write_text(json.dumps(old))
    whole = joint.run(ctx, sites=prepared_sites)
    assert "two-stage" in whole["missing"] and "two-stage" not in whole["arms"]
    assert whole["kept_otherwise"] == {"two-stage": {"seeds": [0, 1], "differ": ["model.postprocess"]}}
    report = (ctx.out / "joint.md").read_text()
    assert "two-stage [seeds 0, 1] (model.postprocess differs)" in report
    assert "`python -m bench --only joint --quick --arms two-stage --seeds 0,1`" in report  # this run's size again
    never = report.split("Not trained yet: ")[1].split(" (")[0].split(", ")
    assert "no-cbam" in never and "two-stage" not in never


def test_joint_benchmark_trains_at_the_chosen_profile_and_skips_an_arm_equal_to_the_default(tmp_path):
    from bench import joint

    assert parse_args(["--only", "joint", "--profile", "standard"]).profile == "standard"
    with pytest.raises(SystemExit):
        parse_args(["--profile", "huge"])
    standard = Context(out=tmp_path, workdir=tmp_path, quick=False, profile="standard")
    assert joint._settings(standard) == {"run_config": {"profile": "standard"}, "phantom": 0.3, "epochs": 40}
    assert joint.size_name(standard) == "standard"
    assert joint.size_name(Context(out=tmp_path, workdir=tmp_path, quick=False)) == "full"  # the kept quick results
    # quick scores on the study's test sets, of scale 0.3 (33 internal and 15 external cases), training at 0.1
    assert joint._settings(Context(out=tmp_path, workdir=tmp_path, quick=False)) == {
        "run_config": {"profile": "quick"}, "phantom": 0.1, "epochs": 30, "test_scale": 0.3}
    detached = {"gate_gradient": False, "shared_features": False}
    assert joint.same_as_default("detached", detached)
    assert not joint.same_as_default("detached", {**detached, "shared_features": True})
    assert not joint.same_as_default("multitask", detached)
    assert not joint.same_as_default("no-cbam", detached)  # a switch of the network, not of the defaults


def test_a_paired_difference_of_one_seed_shows_no_sd():
    from bench.joint import _points

    assert _points({"mean": 4.9, "sd": None, "per_seed": [4.9]}) == "+4.9 (one seed: no sd) (+4.9)"
    assert _points({"mean": 2.0, "sd": 1.5, "per_seed": [1.0, 3.0]}) == "+2.0 ± 1.5 (+1.0, +3.0)"
