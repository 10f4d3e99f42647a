"""The study: federated vs centralized vs local-only, every model scored on every site's test split, the pooled
internal test set and the external site (FLamby's triad, field notes §4).

Compute budget: centralized trains E epochs on the pooled data; each local arm trains E epochs on its own site; the
federated arm runs R rounds of L local epochs with R·L = E, so every site passes over its own data E times in
every arm.

Repetitions: every seed, and with ``folds`` ≥ 2 every fold of a per-site stratified k-fold split of the training
cases (each site holds out its own fold k; the federated sites compute the same folds themselves from the run
config, so no case id ever crosses the network). Each repetition trains every arm; tables show mean ± sd.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from braintumnet.centralized import SYNTHETIC_NOTE
from braintumnet.checkpoint import load_checkpoint, save_checkpoint
from braintumnet.config import GATE_REGIONS, Profile, resolve, to_dict
from braintumnet.data.contract import class_names as task_classes
from braintumnet.data.dataset import select_slices
from braintumnet.data.folds import site_folds
from braintumnet.data.loading import load_sites
from braintumnet.errors import BrainTumNetError
from braintumnet.engine import (build_model, evaluate_cases, evaluate_model, evaluate_sites, pick_device,
                               predict_slices, train_model)
from braintumnet.report.plots import overlay_examples
from braintumnet.report.provenance import provenance as run_provenance
from simulation import figures as fig
from simulation.flower_run import run_federated
from simulation.pooled import StudySites, phantom_sites, split_pooled
from simulation.report import GATE_ARM, arms_of, write_report
from simulation.tracking import log_arm, tracking_uri

log = logging.getLogger("simulation")

# Phantom scale per profile: quick fits 15 minutes on 2 cores; paper is the paper's 485 + 51 cases.
PHANTOM_SCALE = {"quick": 0.1, "standard": 0.3, "paper": 1.0}
EXPERIMENT = "braintumnet-study"


def say(message: str) -> None:
    """One progress line per phase and round (the study's whole console output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the federated arm's simulated sites run (Flower's Ray backend).

    Args:
        ray_address: join this running Ray cluster (``ray start --head`` prints it) instead of starting a private
            one; None = a private Ray instance on this machine.
        cpus_per_site, gpus_per_site: Ray resources each simulated site reserves (``client-resources-num-*``).
    """

    ray_address: str | None = None
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0


def run_study(out: Path, profile_name: str = "quick", *, phantom: Path | None = None, data: Path | None = None,
              site_column: str = "hospital", external: str = "external", scale: float | None = None,
              seeds: tuple[int, ...] = (0,), folds: int = 0, device: str = "auto", skip_federated: bool = False,
              overrides: dict | None = None, cluster: Cluster = Cluster(), gate_regions: bool = False,
              budgets: tuple[str, ...] = ("epochs",)) -> dict:
    """Run every arm and write ``metrics.json``, ``report.md``, ``report.html``, ``figures/`` and an MLflow run per
    arm into ``out``.

    Args:
        phantom: reuse this phantom cohort (else one is written to ``out/phantom``).
        data: a pooled dataset to split by ``site_column`` instead of the phantom (simulation.pooled).
        external: the hospital of ``data`` kept for external validation only.
        seeds, folds: repetitions (every seed × every fold; ``folds`` < 2 = no cross-validation).
        overrides: run-config keys (``[tool.flwr.app.config]`` names) applied on top of the profile in every arm,
            the federated one included.
        budgets: the federated arm's compute budgets, each a federated arm of its own: ``epochs`` (every site passes
            over its data as often as the centralized model does: arm ``federated``) and ``wall-time`` (every site
            trains as long as the centralized model does, sites working in parallel: each site's local epochs are
            multiplied by pooled / largest site's training slices; arm ``federated:wall-time``).
        gate_regions: also train one centralized model per other ``model.gate-region`` (the region the classifier
            sees: tumor, edema, whole), arms ``gate:<region>``, for the report's Table 2 (accuracy by region).
    """
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown or not budgets:
        raise BrainTumNetError(f"budgets {list(budgets)}: use one or more of {BUDGETS}")
    out = Path(out).absolute()
    overrides = dict(overrides or {})
    base = resolve({"profile": profile_name, **overrides})  # refuses an unknown key before the run folder exists
    out.mkdir(parents=True, exist_ok=True)
    # Taken before any training: the tree may change while a long study runs.
    provenance = run_provenance(overrides)
    fed = base.federation
    epochs = fed.num_rounds * fed.local_epochs
    dev = pick_device(device)
    cache = out / "cache"
    started = time.perf_counter()

    layout = _cohort(out, profile_name, phantom, data, site_column, external, scale, seeds[0])
    say(f"phase 2/5 prepare: {base.data.slices_per_case} slices per case at {base.data.img_size} px")
    sites = {s.site: s for s in load_sites([layout.root / s for s in layout.all], cache, base.data, progress=False)}
    internal = [sites[s] for s in layout.internal]
    ext = [sites[layout.external]] if layout.external else []
    classes = task_classes(base.data.task)
    plan = [(seed, fold) for seed in seeds for fold in (range(folds) if folds >= 2 else [None])]
    extra_regions = [r for r in GATE_REGIONS if r != base.model.gate_region] if gate_regions else []
    repetitions, timings, cases_of, fed_rounds, overlay_model = [], {}, {}, [], None

    for index, (seed, fold) in enumerate(plan):
        tag = f"seed {seed}" + (f", fold {fold + 1}/{folds}" if fold is not None else "")
        profile = resolve({"profile": profile_name, **overrides, "train.seed": seed})
        profile = dataclasses.replace(profile, train=dataclasses.replace(profile.train, epochs=epochs))
        held = {s.site: site_folds(s, classes, folds, seed)[fold] for s in internal} if fold is not None else {}
        rep: dict = {"seed": seed, "fold": fold}
        first = index == 0

        def keep(name: str, model, arm_profile: Profile) -> None:
            scores, per_case = _score(model, internal, ext, arm_profile, dev, held)
            rep[name] = scores
            if first:
                cases_of[name] = per_case
            timings[name] = timings.get(name, 0.0) + rep[name].pop("wall_s", 0.0)
            log_arm(out, EXPERIMENT, name, scores, to_dict(arm_profile),
                    {"seed": str(seed), "fold": str(fold), "synthetic": str(layout.synthetic)})
            r = scores["internal_test"]
            say(f"  {name} ({tag}): internal dice_tumor {r['dice_tumor']:.3f} acc {r['acc']:.3f}")

        def arm(name: str, train_sites, arm_profile: Profile | None = None) -> None:
            arm_profile = arm_profile or profile
            t0 = time.perf_counter()
            model = build_model(arm_profile, len(classes))
            ids = _training_cases(train_sites, classes, held)
            train_model(model, train_sites, arm_profile, dev, epochs=epochs, case_ids=ids, progress=False)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            save_checkpoint(out / "models" / f"{name.replace(':', '-')}-s{seed}{_fold_tag(fold)}.pt",
                            model.state_dict(), arm_profile, classes,
                            {"arm": name, "synthetic": layout.synthetic, "epochs": epochs, "seed": seed,
                             "fold": fold})
            keep(name, model, arm_profile)

        say(f"phase 3/5 centralized ({tag}): pooled {', '.join(layout.internal)}, {epochs} epochs")
        arm("centralized", internal)
        for region in extra_regions:
            say(f"  Table 2 ({tag}): centralized, the classifier sees the {region} region")
            arm(f"{GATE_ARM}{region}", internal, dataclasses.replace(
                profile, model=dataclasses.replace(profile.model, gate_region=region)))
        say(f"phase 4/5 local-only ({tag}): each site alone, {epochs} epochs")
        for site in internal:
            arm(f"local:{site.site}", [site])
        if not skip_federated:
            for budget in budgets:
                local_epochs = _federated_local_epochs(budget, fed.local_epochs, internal, classes, held)
                name = "federated" if budget == "epochs" else f"federated:{budget}"
                say(f"phase 5/5 {name} ({tag}): {_strategy_words(profile)} on Flower's Simulation Engine, "
                    f"{fed.num_rounds} rounds x {local_epochs} local epochs, {len(internal)} simulated sites")
                t0 = time.perf_counter()
                run_config = {
                    "profile": profile_name, **overrides, "train.seed": seed, "num-server-rounds": fed.num_rounds,
                    "train.local-epochs": local_epochs, "checkpoint-dir": str(out / "federated"),
                    "cache-dir": str(cache), "phantom-dir": str(layout.root), "device": device,
                    "sites": ",".join(layout.internal), "mlflow-experiment": EXPERIMENT,
                    "external-data": str(layout.root / layout.external) if layout.external else "",
                }
                if fold is not None:
                    run_config.update({"cv.folds": folds, "cv.fold": fold + 1})  # 1-based in the run config
                run_dir = run_federated(run_config, out, num_sites=len(internal),
                                        cpus_per_site=cluster.cpus_per_site, gpus_per_site=cluster.gpus_per_site,
                                        ray_address=cluster.ray_address, mlflow_uri=tracking_uri(out), log=say)
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
                ckpt = load_checkpoint(run_dir / "final.pt")
                model = build_model(ckpt.profile, len(ckpt.class_names))
                model.load_state_dict(ckpt.state_dict)
                if first and budget == budgets[0]:
                    fed_rounds = json.loads((run_dir / "metrics.json").read_text()).get("rounds", [])
                    overlay_model = model
                keep(name, model, profile)
        repetitions.append(rep)
        if first and overlay_model is None:
            overlay_model = model_of(out, "centralized", seed, fold, profile, len(classes))

    arms = [k for k in repetitions[0] if k not in ("seed", "fold")]
    document = {
        "synthetic": layout.synthetic,
        "note": SYNTHETIC_NOTE if layout.synthetic else "",
        "profile": profile_name,
        "config": to_dict(base),
        "device": str(dev),
        "sites": {"internal": list(layout.internal), "external": layout.external},
        "budget": {"centralized_epochs": epochs, "local_epochs_per_site": epochs,
                   "federated_rounds": fed.num_rounds, "federated_local_epochs": fed.local_epochs,
                   "federated_budgets": {b: _federated_local_epochs(b, fed.local_epochs, internal, classes, {})
                                         for b in budgets},
                   **_optimizer_steps(internal, classes, profile.train.batch_size, epochs, fed)},
        "cases": {s.site: int(s.slices["case_id"].nunique()) for s in sites.values()},
        "n_repetitions": len(plan),
        "folds": folds if folds >= 2 else None,
        "seeds": list(seeds),
        "wall_s": {**{k: round(v, 1) for k, v in timings.items()}, "total": 0.0},
        **{a: _mean([r[a] for r in repetitions]) for a in arms},
        "sd": {a: _sd([r[a] for r in repetitions]) for a in arms},
        "repetitions": repetitions,
        "provenance": provenance,
    }
    if extra_regions:  # region -> the arm whose classifier saw it (the centralized arm sees the profile's region)
        document["gate_regions"] = {base.model.gate_region: "centralized",
                                    **{r: f"{GATE_ARM}{r}" for r in extra_regions}}
    say("report: figures and tables")
    document["figures"] = _figures(out, document, cases_of, fed_rounds, overlay_model, internal, profile, dev, classes)
    document["wall_s"]["total"] = round(time.perf_counter() - started, 1)
    (out / "metrics.json").write_text(json.dumps(document, indent=2, default=float))
    write_report(document, out)
    say(f"done in {document['wall_s']['total']} s: {out / 'metrics.json'}, {out / 'report.md'}, "
        f"{out / 'report.html'}" + (" (SYNTHETIC data)" if layout.synthetic else ""))
    return document


def _cohort(out: Path, profile_name: str, phantom, data, site_column, external, scale, seed) -> StudySites:
    if data is not None:
        say(f"phase 1/5 cohort: splitting {data} by its {site_column!r} column into {out / 'sites'}")
        layout = split_pooled(Path(data), site_column, out / "sites", external)
        say(f"  training hospitals: {', '.join(layout.internal)}; external: {layout.external or 'none'}")
        return layout
    phantom = Path(phantom).absolute() if phantom else out / "phantom"
    if not (phantom / "phantom.json").is_file():
        from braintumnet.data.phantom import generate_cohort

        scale = scale or PHANTOM_SCALE.get(profile_name, 0.1)
        say(f"phase 1/5 cohort: writing the SYNTHETIC phantom cohort (scale {scale}) to {phantom}")
        say("  " + generate_cohort(phantom, scale=scale, seed=seed, progress=False).summary().replace("\n", "\n  "))
    else:
        say(f"phase 1/5 cohort: reusing the SYNTHETIC phantom cohort {phantom}")
    return phantom_sites(phantom)


BUDGETS = ("epochs", "wall-time")


def _federated_local_epochs(budget: str, local_epochs: int, internal, classes, held: dict) -> int:
    """Local epochs per round of the federated arm under ``budget`` (``BUDGETS``).

    ``wall-time``: the sites train in parallel, so in the wall time the centralized model takes for E epochs over
    the pooled slices, the largest site can pass over its own slices E x pooled / largest times.
    """
    if budget == "epochs":
        return local_epochs
    sizes = [len(select_slices([s], "train", classes, _training_cases([s], classes, held))) for s in internal]
    return max(local_epochs, round(local_epochs * sum(sizes) / max(max(sizes), 1)))


def _strategy_words(profile: Profile) -> str:
    server = profile.server.optimizer
    return "FedAvg" if server == "none" else f"FedAvg with server optimizer {server}"


def _training_cases(train_sites, classes, held: dict) -> list[str] | None:
    """The training cases left after each site's held-out fold (None = all of them)."""
    if not held:
        return None
    table = select_slices(train_sites, "train", classes)
    return sorted(set(table["case_id"]) - {c for s in train_sites for c in held.get(s.site, [])})


def _score(model, internal, ext, profile: Profile, dev, held: dict) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    metrics, per_case = {}, {}
    metrics["internal_test"], per_case["internal_test"], per_site = evaluate_sites(model, internal, "test", profile,
                                                                                   dev, progress=False)
    if ext:
        metrics["external"], per_case["external"] = evaluate_cases(model, ext, None, profile, dev, progress=False)
    scores = {k: _numbers(v) for k, v in metrics.items()}
    scores.setdefault("external", {})
    scores["per_site"] = {site: _numbers(m) for site, m in per_site.items()}
    if held:
        ids = sorted(c for v in held.values() for c in v)
        scores["validation"] = _numbers(evaluate_model(model, internal, "train", profile, dev, case_ids=ids,
                                                       progress=False))
    scores["wall_s"] = time.perf_counter() - t0
    return scores, per_case


def _numbers(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num-examples"}


def _mean(reps: list[dict]) -> dict:
    return _combine(reps, lambda v: float(np.mean(v)))


def _sd(reps: list[dict]) -> dict:
    return _combine(reps, lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def _combine(reps: list[dict], reduce) -> dict:
    """Reduce the repetitions of one arm metric by metric (NaN, e.g. an undefined AUC, left out of the mean)."""
    def walk(nodes: list):
        if isinstance(nodes[0], dict):
            return {k: walk([n[k] for n in nodes if k in n]) for k in nodes[0]}
        values = [v for v in nodes if v == v]
        return reduce(values) if values else float("nan")
    return walk(reps)


def _fold_tag(fold) -> str:
    return "" if fold is None else f"-f{fold + 1}"


def model_of(out: Path, arm: str, seed: int, fold, profile: Profile, k: int):
    ckpt = load_checkpoint(out / "models" / f"{arm.replace(':', '-')}-s{seed}{_fold_tag(fold)}.pt")
    model = build_model(profile, k)
    model.load_state_dict(ckpt.state_dict)
    return model


def _figures(out: Path, doc: dict, cases_of: dict, rounds: list, model, internal, profile, dev, classes) -> list:
    folder = out / "figures"
    shown = []

    def add(path: Path, title: str) -> None:
        shown.append({"title": title, "path": str(path.relative_to(out))})

    arms = arms_of(doc)  # the study's arms; Table 2's gate-region arms are only in its table
    synthetic = bool(doc.get("synthetic"))
    several = doc.get("n_repetitions", 1) > 1  # error bars only where there is a spread to show
    if rounds:
        add(fig.learning_curves(rounds, {a: doc[a]["internal_test"] for a in arms}, folder / "learning_curves.png",
                                sd={a: doc["sd"][a]["internal_test"] for a in arms} if several else None,
                                synthetic=synthetic),
            "Learning curves: federated Dice and accuracy per round (internal and external); other arms' finals"
            + (" (mean, band ±1 sd over the repetitions; rounds of the first)" if several else ""))
    add(fig.site_bars({a: doc[a] for a in arms}, doc["sites"]["internal"], folder / "per_site.png",
                      sd={a: doc["sd"][a] for a in arms} if several else None, synthetic=synthetic),
        "Every arm on every site's test split" + (" (mean ± sd over the repetitions)" if several else ""))
    for arm in [a for a in ("federated", "centralized") if a in cases_of]:
        for section, label in (("internal_test", "pooled internal test"), ("external", "external site")):
            if section in cases_of[arm]:
                stem = f"{arm}_{section}"
                paths = fig.classification_figures(cases_of[arm][section], classes, folder, stem, f"{arm}, {label}",
                                                   synthetic=synthetic)
                add(paths[0], f"ROC curves, {arm}, {label} (first repetition)")
                add(paths[1], f"Confusion matrix, {arm}, {label} (first repetition)")
    if model is not None:
        table = select_slices(internal, "test", classes)
        # One slice per tumour type: the slice with the most reference tumour in the first test case of each type
        # (test cases hold the whole scan, most of it tumour-free; a figure may pick by the labels, scoring never does).
        picks = []
        for _, grp in table.groupby("tumor_type", sort=True):
            case = grp[grp["case_id"] == grp["case_id"].iloc[0]]
            area = [int((internal[i].masks[r] == 1).sum()) for i, r in zip(case["site_index"], case["row"])]
            picks.append(case.index[int(np.argmax(area))])
        rows = table.loc[picks]
        seg, probs = predict_slices(model, internal, rows, dev, profile.train.batch_size, progress=False)
        images = [internal[i].images[r].astype(np.float32) for i, r in zip(rows["site_index"], rows["row"])]
        targets = [internal[i].masks[r] for i, r in zip(rows["site_index"], rows["row"])]
        titles = [f"{t}: predicted {classes[int(p.argmax())]}" for t, p in zip(rows["tumor_type"], probs)]
        name = "federated" if "federated" in cases_of else "centralized"
        add(overlay_examples(images, targets, list(seg), folder / "overlays.png", titles, synthetic=synthetic),
            f"Example internal test slices, {name} model: reference solid, prediction dashed")
    return shown


def _optimizer_steps(internal: list, classes, batch_size: int, epochs: int, fed) -> dict:
    """Adam steps each arm's model takes (no cross-validation), to put beside the equal-epochs budget.

    Equal epochs are not equal progress: centralized takes one step per pooled batch, while FedAvg's global model
    moves each round by an average of the sites' steps, not their sum, so along its trajectory it takes about
    rounds x local epochs x one site's batches per epoch. A local arm takes the same steps as one federated site.
    """
    def steps(n_slices: int) -> int:  # engine.train_model drops the last partial batch when there is more than one
        return n_slices // batch_size if n_slices > batch_size else 1

    per_site = {s.site: len(select_slices([s], "train", classes)) for s in internal}
    per_round = {site: fed.local_epochs * steps(n) for site, n in per_site.items()}
    return {"train_slices": per_site,
            "centralized_steps": epochs * steps(sum(per_site.values())),
            "local_steps": {site: epochs * steps(n) for site, n in per_site.items()},
            "federated_steps_per_site": {site: fed.num_rounds * n for site, n in per_round.items()}}

