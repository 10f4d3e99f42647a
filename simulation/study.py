"""The study: federated vs centralized vs local-only, every model scored on every site's test split, the pooled
internal test set and the external site (FLamby's triad).

Compute budget: centralized trains E epochs on the pooled data; each local arm trains E epochs on its own site; the
federated arm runs R rounds of L local epochs with R·L = E, so every site passes over its own data E times in
every arm.

Repetitions: every seed, and with ``folds`` ≥ 2 every fold of a per-site stratified k-fold split of the training
cases (each site holds out its own fold k; the federated sites compute the same folds themselves from the run
config, so no case id ever crosses the network). Each repetition trains every arm; tables show mean ± sd. A
finished repetition, and each scored arm, is kept in the run folder (``simulation/saved.py``): the same study run
again into the same folder trains only the repetitions and arms not finished yet.

The federated arm runs the external site as a deployment does: a simulated evaluate-only site (an extra partition,
``sites = "...,external:evaluate-only"``) that scores the global model every round on its own cases, never trains,
and whose scores are each round's ``external`` entry; the centre holds no site's data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import field
from typing import Callable
from pathlib import Path

import torch

from braintumnet.checkpoint import load_model, save_checkpoint
from braintumnet.config import GATE_REGIONS, Profile, at_site, resolve, to_dict
from braintumnet.data.cache import sigterm_as_exit
from braintumnet.data.contract import class_names as task_classes
from braintumnet.data.dataset import select_slices
from braintumnet.data.folds import site_folds
from braintumnet.data.loading import load_sites
from braintumnet.engine import build_model, pick_device, train_model
from braintumnet.errors import BrainTumNetError
from braintumnet.io import atomic_write_json
from braintumnet.metrics import mean_sd_tree
from braintumnet.postprocess import with_rule
from braintumnet.protocol import EVALUATE_ONLY
from braintumnet.report import SYNTHETIC_NOTE
from braintumnet.report.provenance import provenance as run_provenance, usable_cores
from braintumnet.tracking import tracking_uri
from simulation.figures import study_figures
from simulation import saved
from simulation.arms import (BUDGETS, federated_arm_name, federated_local_epochs, optimizer_steps, score_model,
                             strategy_words, training_cases)
from simulation.flower_run import Cluster, run_federated
from simulation.cohort import study_cohort
from simulation.pooled import StudySites
from simulation.report import GATE_ARM, write_report
from simulation.tracking import arm_logged, log_arm
from simulation.workers import Workers, arm_cost, auto_jobs, claim, override_items, share

log = logging.getLogger("simulation")

EXPERIMENT = "braintumnet-study"
FEDERATED_TIMEOUT_FACTOR = 4.0


def say(message: str) -> None:
    """One progress line per phase and round (the study's whole console output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def epoch_lines(arm: str, epochs: int, started: float, lines: int = 5):
    """``train_model``'s ``on_epoch`` for an arm: a progress line every ``epochs // lines`` epochs but the last (its
    scores follow), so that a long arm, here or in a worker's log, shows it is moving."""
    every = max(1, epochs // lines)

    def line(epoch: int, losses: dict[str, float]) -> None:
        if epoch % every == 0 and epoch < epochs:
            say(f"  {arm}: epoch {epoch}/{epochs}, loss {losses['train_loss']:.3f} "
                f"({time.perf_counter() - started:.0f} s)")

    return line


def run_study(out: Path, profile_name: str = "quick", *, phantom: Path | None = None, data: Path | None = None,
              site_column: str = "hospital", external: str = "external", scale: float | None = None,
              seeds: tuple[int, ...] = (0,), folds: int = 0, device: str = "auto", skip_federated: bool = False,
              overrides: dict | None = None, cluster: Cluster = Cluster(), gate_regions: bool = False,
              budgets: tuple[str, ...] = ("epochs",), arms: tuple[str, ...] = (), jobs: int = 1,
              worker: bool = False) -> dict:
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
        arms: train only these arms of every repetition (names as in ``metrics.json``: ``centralized``,
            ``local:<site>``, ``federated``, ``federated:wall-time``, ``gate:<region>``; a ``gate:`` or
            ``federated:`` arm needs no other flag), keep them in ``out`` and write no report: arms of one study can
            then be trained on several machines at once, their ``repetitions/`` folders gathered into one run folder,
            and the study run there without ``arms`` reports them all.
        jobs: worker processes that train the in-process arms (centralized, Table 2's, the hospitals alone) while
            this process runs the federated arms (simulation/workers.py); 1 = every arm here, one after the other;
            0 = one per usable core on a CPU, 1 on a GPU.
        worker: this study is such a worker (with ``arms``): it logs nothing to MLflow, its parent does.
    """
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown or not budgets:
        raise BrainTumNetError(f"budgets {list(budgets)}: use one or more of {BUDGETS}")
    if arms:  # an arm asked for by name is in the plan whatever the flags that would otherwise choose it say
        # The first federated arm named keeps the rounds the report draws, as the first budget's does in a study.
        budgets = tuple(b for b in BUDGETS if federated_arm_name(b) in arms) or budgets
        gate_regions = gate_regions or any(a.startswith(GATE_ARM) for a in arms)
        skip_federated = skip_federated and not any(a.startswith("federated") for a in arms)
    study = Study.open(out, profile_name, dict(overrides or {}), device, cluster, budgets, skip_federated)
    study.worker = worker
    started = time.perf_counter()
    study.prepare(study_cohort(study.out, profile_name, phantom, data, site_column, external, scale, say), gate_regions)
    study.folds = folds if folds >= 2 else 0
    plan = [(seed, fold) for seed in seeds for fold in (range(folds) if folds >= 2 else [None])]
    if arms:
        return study.train_only(tuple(arms), plan, folds)
    command = ["--profile", profile_name, "--out", str(study.out), "--seeds", ",".join(map(str, seeds)),
               "--folds", str(folds), "--device", device,
               "--budget", "both" if len(budgets) > 1 else budgets[0], *override_items(study.overrides), "--worker",
               *(["--data", str(data), "--site-column", site_column, "--external", str(external)] if data is not None
                 else ["--phantom", str(study.layout.root)]),
               *(["--gate-regions"] if gate_regions else []), *(["--skip-federated"] if skip_federated else [])]
    # SIGTERM ends the study through the finally clause, so its workers stop with it.
    threads = torch.get_num_threads()  # start_workers lowers it while its workers share the cores
    with sigterm_as_exit():
        try:
            study.start_workers(plan, folds, jobs or auto_jobs(study.dev.type), command)
            repetitions = [study.reuse(seed, fold, first=i == 0) or study.repetition(seed, fold, folds, first=i == 0)
                           for i, (seed, fold) in enumerate(plan)]
        finally:
            if study.workers is not None:
                study.workers.stop()
            torch.set_num_threads(threads)
    document = study.document(repetitions, seeds, folds)
    say("report: figures and tables")
    document["figures"] = study_figures(study.out, document, study.cases_of, study.fed_rounds, study.overlay_model,
                                        study.internal, study.base, study.dev, study.classes)
    document["wall_s"]["total"] = round(time.perf_counter() - started, 1)
    atomic_write_json(study.out / "metrics.json", document)
    write_report(document, study.out)
    say(f"done in {document['wall_s']['total']} s: {study.out / 'metrics.json'}, {study.out / 'report.md'}, "
        f"{study.out / 'report.html'}" + (" (SYNTHETIC data)" if study.layout.synthetic else ""))
    return document


@dataclasses.dataclass
class Repetition:
    """One seed (and fold) of the study: its profile, each site's held-out training cases, every arm's scores."""

    seed: int
    fold: int | None
    folds: int
    profile: Profile
    held: dict[str, list[str]]
    first: bool
    scores: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # arm -> its checkpoint
    centralized_s: float = 0.0  # the centralized arm's training time: what a federated arm may take is a multiple

    @property
    def tag(self) -> str:
        return f"seed {self.seed}" + (f", fold {self.fold + 1}/{self.folds}" if self.fold is not None else "")


@dataclasses.dataclass
class Study:
    """One study while it runs: its settings and sites, and what the repetitions leave for the report (wall times
    per arm, the first repetition's per-case tables, the first federated run's rounds, a model for the overlays)."""

    out: Path
    profile_name: str
    overrides: dict
    base: Profile
    device: str
    dev: torch.device
    cluster: Cluster
    budgets: tuple[str, ...]
    skip_federated: bool
    provenance: dict
    layout: StudySites | None = None
    sites: dict = field(default_factory=dict)
    extra_regions: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cases_of: dict = field(default_factory=dict)
    fed_rounds: list = field(default_factory=list)
    overlay_model: torch.nn.Module | None = None
    overlay_path: Path | None = None  # its checkpoint, kept with the first repetition
    reused: list[dict] = field(default_factory=list)  # repetitions and arms taken from an earlier run
    folds: int = 0  # cross-validation folds of every seed (0: none)
    worker: bool = False  # a worker of another study (simulation/workers.py): that study logs its arms to MLflow
    workers: Workers | None = None
    by_workers: set = field(default_factory=set)  # (seed, fold, arm) this study's workers train

    @classmethod
    def open(cls, out: Path, profile_name: str, overrides: dict, device: str, cluster: Cluster,
             budgets: tuple[str, ...], skip_federated: bool) -> Study:
        """Type the settings (an unknown key is refused before the run folder exists), then make the folder."""
        out = Path(out).absolute()
        base = resolve({"profile": profile_name, **overrides})
        out.mkdir(parents=True, exist_ok=True)
        # Taken before any training: the tree may change while a long study runs.
        return cls(out, profile_name, overrides, base, device, pick_device(device), cluster, tuple(budgets),
                   skip_federated, run_provenance(overrides))

    @property
    def epochs(self) -> int:
        return self.base.federation.num_rounds * self.base.federation.local_epochs

    @property
    def classes(self) -> tuple[str, ...]:
        return task_classes(self.base.data.task)

    @property
    def settings(self) -> dict:
        """What a saved repetition must share with this study to be reused (``simulation/saved.py``)."""
        return saved.settings_of(to_dict(self.base), self.budgets, self.skip_federated, self.extra_regions,
                                 self.folds, {"internal": list(self.layout.internal), "external": self.layout.external},
                                 {s.site: [str(c) for c in s.slices["case_id"].unique()] for s in self.sites.values()})

    @property
    def internal(self) -> list:
        return [self.sites[s] for s in self.layout.internal]

    @property
    def external(self) -> list:
        return [self.sites[self.layout.external]] if self.layout.external else []

    def prepare(self, layout: StudySites, gate_regions: bool) -> None:
        """Phase 2: every site's prepared slices at the profile's data settings."""
        say(f"phase 2/5 prepare: {self.base.data.slices_per_case} slices per case at {self.base.data.img_size} px")
        self.layout = layout
        self.sites = {s.site: s for s in load_sites([layout.root / s for s in layout.all], self.out / "cache",
                                                    self.base.data, progress=False)}
        self.extra_regions = [r for r in GATE_REGIONS if r != self.base.model.gate_region] if gate_regions else []

    def repetition(self, seed: int, fold: int | None, folds: int, *, first: bool) -> dict:
        """Phases 3 to 5 for one seed (and fold): every arm trained and scored; ``{"seed", "fold", <arm>: ...}``."""
        rep = self.new_repetition(seed, fold, folds, first=first)
        saved.split_repetition(self.out, seed, fold, self.settings)
        saved.forget(self.out, seed, fold)
        spent_before = dict(self.timings)
        plan = self.arm_plan(rep)
        if self.workers is not None:  # what no worker trains (the federated arms) first, while the workers train
            plan.sort(key=lambda step: self.workers.holder(step[0]) is not None)
        for name, header, train, args in plan:
            if header:
                say(header)
            self.arm(rep, name, train, *args)
        if first and self.overlay_model is None:
            self.overlay_path = self.model_path("centralized", rep)
            self.overlay_model = load_model(self.overlay_path)[0]
        result = {"seed": seed, "fold": fold, **rep.scores}
        timings = {arm: seconds - spent_before.get(arm, 0.0) for arm, seconds in self.timings.items()}
        kept = {"cases_of": self.cases_of, "fed_rounds": self.fed_rounds,
                "overlay_model": str(self.overlay_path.relative_to(self.out)) if self.overlay_path else None}
        saved.save(self.out, self.settings, result, timings=timings, provenance=self.provenance,
                   first=kept if first else None)
        return result

    def new_repetition(self, seed: int, fold: int | None, folds: int, *, first: bool) -> Repetition:
        """One seed (and fold): the profile with the seed and the study's epochs, each site's held-out fold."""
        profile = resolve({"profile": self.profile_name, **self.overrides, "train.seed": seed})
        profile = dataclasses.replace(profile, train=dataclasses.replace(profile.train, epochs=self.epochs))
        held = {s.site: site_folds(s, self.classes, folds, seed)[fold] for s in self.internal} if fold is not None \
            else {}
        return Repetition(seed, fold, folds, profile, held, first)

    def arm_plan(self, rep: Repetition) -> list[tuple[str, str | None, Callable, tuple]]:
        """Every arm of ``rep`` in training order: (name, the progress line that opens its phase or None, the trainer,
        its arguments)."""
        plan: list[tuple[str, str | None, Callable, tuple]] = [
            ("centralized", f"phase 3/5 centralized ({rep.tag}): pooled {', '.join(self.layout.internal)}, "
             f"{self.epochs} epochs", self.train_arm, (self.internal,))]
        for region in self.extra_regions:
            plan.append((f"{GATE_ARM}{region}", f"  Table 2 ({rep.tag}): centralized, the classifier sees the {region} "
                         "region", self.train_arm, (self.internal, dataclasses.replace(
                             rep.profile, model=dataclasses.replace(rep.profile.model, gate_region=region)))))
        for i, site in enumerate(self.internal):
            header = f"phase 4/5 local-only ({rep.tag}): each site alone, {self.epochs} epochs" if i == 0 else None
            plan.append((f"local:{site.site}", header, self.train_arm, ([site],)))
        if not self.skip_federated:
            plan += [(federated_arm_name(b), None, self.federated_arm, (b,)) for b in self.budgets]
        return plan

    def train_only(self, arms: tuple[str, ...], plan: list[tuple[int, int | None]], folds: int) -> dict:
        """Train and keep only ``arms`` of every repetition in ``plan``, with no report: each is kept whole (its
        per-case tables, model and rounds), so that the study run into this folder later reuses it for any
        repetition, the first included. Unknown arm names are refused before any training."""
        # Kept whole for any repetition; a worker's study needs that only for its first (it reuses the others as
        # they are, and re-scoring them here would cost the cores it shares).
        reps = [self.new_repetition(seed, fold, folds, first=not self.worker or i == 0)
                for i, (seed, fold) in enumerate(plan)]
        known = [name for name, *_ in self.arm_plan(reps[0])]
        unknown = [a for a in arms if a not in known]
        if unknown:
            raise BrainTumNetError(f"--arms {','.join(unknown)}: this study's arms are {', '.join(known)}")
        for rep in reps:
            for name, _, train, args in self.arm_plan(rep):
                if name in arms:
                    # A worker leaves to the study what it takes without training (start_workers gave it none of
                    # those, but a worker's --arms covers every seed): a kept arm, or one scored again from its model.
                    if self.worker and (saved.rescorable(self.out, self.settings, rep.seed, rep.fold, name)
                                        or not claim(self.out, rep.seed, rep.fold, name)):
                        say(f"{name} ({rep.tag}): taken by the study")
                        continue
                    say(f"{name} ({rep.tag})")
                    self.arm(rep, name, train, *args)
        say(f"kept {', '.join(arms)} in {self.out / saved.FOLDER}: run the study into {self.out} without --arms to "
            "report (every kept arm reused)")
        return {"arms": {rep.tag: rep.scores for rep in reps}, "wall_s": dict(self.timings)}

    def reuse(self, seed: int, fold: int | None, *, first: bool) -> dict | None:
        """A repetition an earlier run into this folder finished with the same settings, or None."""
        record = saved.load(self.out, seed, fold, self.settings, first=first)
        if record is None:
            return None
        for arm, seconds in record["timings"].items():
            self._spent(arm, seconds)
        if first:
            kept = record["first"]
            self.cases_of, self.fed_rounds = kept["cases_of"], kept["fed_rounds"]
            if kept["overlay_model"]:
                self.overlay_path = self.out / kept["overlay_model"]
                self.overlay_model = load_model(self.overlay_path)[0]
        entry = {"seed": seed, "fold": fold, "commit": record.get("commit"), "finished": record.get("finished")}
        again = saved.scored_again(self.out, seed, fold)
        if again:
            entry["scored_again"] = again
        self.reused.append(entry)
        say(f"reusing seed {seed}" + (f", fold {fold + 1}" if fold is not None else "")
            + f": finished {entry['finished']} at commit {entry['commit']} ({saved.path_of(self.out, seed, fold)})")
        return record["result"]

    def arm(self, rep: Repetition, name: str, train, *args) -> None:
        """One arm of ``rep``: taken from a saved arm of an earlier run into this folder, or trained and scored by
        ``train(rep, name, *args)`` and saved at once (``simulation/saved.py``)."""
        key = (rep.seed, rep.fold, name)
        if self.workers is not None and key in self.by_workers:
            missing = self.workers.wait_for(*key, meanwhile=lambda: self.train_unstarted(rep))
            if missing:
                say(f"  {name} ({rep.tag}): {missing}; training it here")
                self.by_workers.discard(key)
        if name in rep.scores:  # trained here while waiting for a worker (train_unstarted)
            return
        if self.reuse_arm(rep, name, self.arm_profile(rep, name, *args[1:2])):
            return
        self.train_and_keep(rep, name, train, *args)

    def train_unstarted(self, rep: Repetition) -> bool:
        """While waiting for a worker: train here the first arm of ``rep`` that a worker holds and none has started
        (True), so that this process does not sit idle while a worker still has a queue; False when there is none.
        Only from a worker that is up (it has claimed an arm): one that never starts leaves its arms to the study
        with a message, as before."""
        for name, _, train, args in self.arm_plan(rep):
            key = (rep.seed, rep.fold, name)
            if key in self.by_workers and self.workers.started(name) and claim(self.out, *key):
                self.by_workers.discard(key)
                say(f"  {name} ({rep.tag}): trained here while the workers train the others (none had started it)")
                self.train_and_keep(rep, name, train, *args)
                return True
        return False

    def train_and_keep(self, rep: Repetition, name: str, train, *args) -> None:
        """Train and score arm ``name`` here (``train(rep, name, *args)``) and keep it at once."""
        before = self.timings.get(name, 0.0)
        train(rep, name, *args)
        model = rep.models.get(name)
        saved.save_arm(self.out, self.settings, rep.seed, rep.fold, name, rep.scores[name],
                       self.timings.get(name, 0.0) - before, provenance=self.provenance,
                       per_case=self.cases_of.get(name) if rep.first else None,
                       fed_rounds=self.fed_rounds if rep.first and name == self.rounds_arm else None,
                       model=str(model.relative_to(self.out)) if model else None)

    @property
    def rounds_arm(self) -> str | None:
        """The arm whose rounds the report's figures draw, and whose model the overlays show: the first federated
        budget's (None without a federated arm: the overlays then show the centralized model)."""
        return None if self.skip_federated else federated_arm_name(self.budgets[0])

    def reuse_arm(self, rep: Repetition, name: str, profile: Profile | None = None) -> bool:
        """Take ``name`` of ``rep`` from a saved arm, if one with the same settings is there (and has what the first
        repetition keeps for the figures). An arm this study's workers trained is logged to MLflow here with
        ``profile``, and not counted as reused."""
        record = saved.load_arm(self.out, self.settings, rep.seed, rep.fold, name, first=rep.first)
        draws_rounds = rep.first and name == self.rounds_arm
        rule = self.base.model.postprocess
        checkpoint = None
        if record is None:
            # Kept by a run where this repetition came later (so without the per-case tables the first one's figures
            # need), or scored with another post-processing rule: score its model again rather than train it again,
            # when the model is still here.
            record = saved.load_arm(self.out, self.settings, rep.seed, rep.fold, name, first=False, any_rule=True)
            if record is None or draws_rounds and "fed_rounds" not in record:
                return False
            checkpoint = saved.kept_model(self.out, record, name, rep.seed, rep.fold)
            if not checkpoint.is_file():
                return False
        elif draws_rounds and ("fed_rounds" not in record or not record.get("model")):
            return False
        if checkpoint is not None:
            before = self.timings.get(name, 0.0)
            model, kept = load_model(checkpoint, self.dev)
            # Its scores and per-case tables as when it was trained, or with this study's rule; its MLflow run only
            # if the store lacks one with these scores (the study that kept the arm logged it, unless that was a
            # worker or another machine; scored with another rule, its run there holds other scores and is replaced).
            same_rule = record["scored_with"] == rule
            logged = self.worker or same_rule and arm_logged(self.out, EXPERIMENT, self.arm_tags(rep, name))
            # The study's rule, not the checkpoint's: a model saved before the rule existed loads with the default.
            self.score_arm(rep, name, model, with_rule(kept.profile, rule), mlflow=not logged)
            self.timings[name] = before
            again = None if same_rule else {"from": record["scored_with"], "commit": self.provenance.get("commit"),
                                            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            saved.save_arm(self.out, self.settings, rep.seed, rep.fold, name, rep.scores[name], record["seconds"],
                           provenance=record, per_case=self.cases_of.get(name) if rep.first else None,
                           fed_rounds=record.get("fed_rounds"), model=record.get("model"),
                           finished=record.get("finished"), scored_again=again or record.get("scored_again"))
        else:
            rep.scores[name] = record["scores"]
            if rep.first:
                self.cases_of[name] = record["per_case"]
        self._spent(name, record["seconds"])
        if name == "centralized":
            rep.centralized_s = record["seconds"]
        if record.get("model"):
            rep.models[name] = self.out / record["model"]
        if (rep.seed, rep.fold, name) in self.by_workers:  # trained for this study, beside it: not reused
            if checkpoint is None:  # (scored again, score_arm has logged it)
                self.log_arm(rep, name, rep.scores[name], profile or rep.profile,
                             f" (trained by a worker in {record['seconds']:.0f} s)")
            return True
        if draws_rounds:
            self.fed_rounds = record["fed_rounds"]
            self.overlay_path = rep.models[name]
            self.overlay_model = load_model(self.overlay_path)[0]
        entry = {"seed": rep.seed, "fold": rep.fold, "arm": name, "commit": record.get("commit"),
                 "finished": record.get("finished")}
        if checkpoint is not None and record["scored_with"] != rule:
            entry["scored_with"] = record["scored_with"]
        elif isinstance(record.get("scored_again"), dict):  # scored again by an earlier run into this folder
            entry["scored_with"] = record["scored_again"].get("from")
        self.reused.append(entry)
        why = (f"with the post-processing {rule!r}, it was scored with {record['scored_with']!r}"
               if "scored_with" in entry else "for the per-case tables")
        say(f"  {name} ({rep.tag}): reused, finished {entry['finished']} at commit {entry['commit']}"
            + (f" (scored again from its model {why})" if checkpoint is not None else ""))
        if checkpoint is None and not self.worker and not arm_logged(self.out, EXPERIMENT, self.arm_tags(rep, name)):
            # Kept by a worker of a study stopped before it took the arm, or by --arms on another machine: the
            # study's store gets the arm's run now, so that MLflow shows every arm the report does.
            self.log_arm(rep, name, rep.scores[name], profile or rep.profile, " (its MLflow run logged now)")
        return True

    @staticmethod
    def arm_profile(rep: Repetition, name: str, profile: Profile | None = None) -> Profile:
        """The settings arm ``name`` trains with: ``profile`` (a Table 2 arm's own) or ``rep``'s; a hospital alone
        trains as it does in the federation, in its site's batch."""
        profile = profile if isinstance(profile, Profile) else rep.profile
        return at_site(profile) if name.startswith("local:") else profile

    def train_arm(self, rep: Repetition, name: str, train_sites: list, profile: Profile | None = None) -> None:
        """Train one arm in this process on ``train_sites`` (less their held-out folds), keep it, score it."""
        profile = self.arm_profile(rep, name, profile)
        t0 = time.perf_counter()
        model = build_model(profile, len(self.classes))
        ids = training_cases(train_sites, self.classes, rep.held)
        train_model(model, train_sites, profile, self.dev, epochs=self.epochs, case_ids=ids, progress=False,
                    on_epoch=epoch_lines(f"{name} ({rep.tag})", self.epochs, t0))
        self._spent(name, time.perf_counter() - t0)
        if name == "centralized":
            rep.centralized_s = time.perf_counter() - t0
        rep.models[name] = self.model_path(name, rep)
        save_checkpoint(rep.models[name], model.state_dict(), profile, self.classes,
                        {"arm": name, "synthetic": self.layout.synthetic, "epochs": self.epochs, "seed": rep.seed,
                         "fold": rep.fold})
        self.score_arm(rep, name, model, profile)

    def federated_arm(self, rep: Repetition, name: str, budget: str) -> None:
        """The federated arm ``name`` under ``budget`` on Flower's Simulation Engine; its final global model is
        scored."""
        fed = self.base.federation
        local_epochs = federated_local_epochs(budget, fed.local_epochs, self.internal, self.classes, rep.held)
        say(f"phase 5/5 {name} ({rep.tag}): {strategy_words(rep.profile)} on Flower's Simulation Engine, "
            f"{fed.num_rounds} rounds x {local_epochs} local epochs, {len(self.internal)} simulated sites"
            + (f" and the evaluate-only external site {self.layout.external}" if self.layout.external else ""))
        t0 = time.perf_counter()
        num_sites = len(self.internal) + len(self.external)
        # The longest wait for the next round (run_federated stops a run that aggregates none for that long). A
        # federated arm does up to (local epochs / the profile's) times the centralized arm's work, on sites that
        # share the machine; an hour times that ratio at the least (the centralized arm's time is unknown when only
        # some arms are trained, or when workers train it meanwhile), or FEDERATED_TIMEOUT_FACTOR x ratio x the
        # centralized arm of this repetition. (A limit on the whole run stopped two standard arms at rounds 9 and 12
        # of 20 on a busy shared machine.)
        ratio = max(1.0, local_epochs / max(1, fed.local_epochs))
        timeout = max(3600.0 * ratio, FEDERATED_TIMEOUT_FACTOR * ratio * rep.centralized_s)
        run_dir = run_federated(self.federated_run_config(rep, local_epochs), self.out, num_sites=num_sites,
                                cpus_per_site=self.cluster.cpus_per_site, gpus_per_site=self.cluster.gpus_per_site,
                                ray_address=self.cluster.ray_address, mlflow_uri=tracking_uri(self.out),
                                timeout_s=timeout, log=say)
        self._spent(name, time.perf_counter() - t0)
        rep.models[name] = run_dir / "final.pt"
        model, _ = load_model(rep.models[name])
        if rep.first and name == self.rounds_arm:
            self.fed_rounds = json.loads((run_dir / "metrics.json").read_text()).get("rounds", [])
            self.overlay_model, self.overlay_path = model, run_dir / "final.pt"
        self.score_arm(rep, name, model, rep.profile)

    def federated_run_config(self, rep: Repetition, local_epochs: int) -> dict:
        """The run config the ServerApp and the simulated sites receive for one federated arm: partition i is site i
        of ``sites``; the external site, if any, is the last partition, evaluate-only."""
        sites = [*self.layout.internal, *([f"{self.layout.external}:{EVALUATE_ONLY}"] if self.layout.external else [])]
        run_config = {
            "profile": self.profile_name, **self.overrides, "train.seed": rep.seed,
            "num-server-rounds": self.base.federation.num_rounds, "train.local-epochs": local_epochs,
            "checkpoint-dir": str(self.out / "federated"), "cache-dir": str(self.out / "cache"),
            "phantom-dir": str(self.layout.root), "device": self.device, "sites": ",".join(sites),
            "mlflow-experiment": EXPERIMENT, "external-data": "",
        }
        if rep.fold is not None:
            run_config.update({"cv.folds": rep.folds, "cv.fold": rep.fold + 1})  # 1-based in the run config
        return run_config

    def score_arm(self, rep: Repetition, name: str, model, profile: Profile, mlflow: bool = True) -> None:
        """Score a trained arm on every test set, log it to MLflow (unless ``mlflow`` is false: its run is there
        already) and keep its scores in ``rep``."""
        scores, per_case = score_model(model, self.internal, self.external, profile, self.dev, rep.held)
        self._spent(name, scores.pop("wall_s", 0.0))
        rep.scores[name] = scores
        if rep.first:
            self.cases_of[name] = per_case
        self.log_arm(rep, name, scores, profile, mlflow=mlflow)

    def arm_tags(self, rep: Repetition, name: str) -> dict[str, str]:
        """The tags that name an arm's MLflow run: which arm of which repetition of which study."""
        return {"arm": name, "seed": str(rep.seed), "fold": str(rep.fold), "synthetic": str(self.layout.synthetic),
                "study": str(self.out)}

    def log_arm(self, rep: Repetition, name: str, scores: dict, profile: Profile, note: str = "",
                mlflow: bool = True) -> None:
        """An arm's MLflow run (unless this study is a worker, or ``mlflow`` is false) and its progress line."""
        if mlflow and not self.worker:
            log_arm(self.out, EXPERIMENT, name, scores, to_dict(profile), self.arm_tags(rep, name))
        r = scores["internal_test"]
        say(f"  {name} ({rep.tag}): internal dice_tumor {r['dice_tumor']:.3f} acc {r['acc']:.3f}{note}")

    def start_workers(self, plan: list[tuple[int, int | None]], folds: int, jobs: int, command: list[str]) -> None:
        """Start worker processes (simulation/workers.py) for the in-process arms that some repetition of ``plan``
        still has to train, when ``jobs`` > 1 and there is something to do beside them; ``command``: this study's
        own command line, less ``--arms``."""
        if jobs <= 1:
            return
        for seed, fold in plan:  # a repetition kept whole counts as its arms
            saved.split_repetition(self.out, seed, fold, self.settings)
        rep = self.new_repetition(*plan[0], folds, first=True)
        costs = {}
        for name, _, train, args in self.arm_plan(rep):
            todo = [(seed, fold) for seed, fold in plan
                    if not saved.rescorable(self.out, self.settings, seed, fold, name)]
            if train == self.train_arm and todo:
                slices = len(select_slices(args[0], "train", self.classes))
                costs[name] = arm_cost(slices, self.arm_profile(rep, name, *args[1:2]).train.batch_size)
                self.by_workers |= {(seed, fold, name) for seed, fold in todo}
        if len(costs) < 2 and (self.skip_federated or not costs):
            self.by_workers.clear()
            return
        groups = share(costs, min(jobs, len(costs)))
        threads = max(1, usable_cores() // len(groups))
        self.provenance["workers"] = {"processes": len(groups), "torch_threads": threads}
        self.workers = Workers.start(self.out, self.settings, command, groups, threads, say)
        # This process scores the federated models meanwhile: with more threads than its share of the cores, its
        # threads wait on each other (scoring one `quick` federated model took 90 s at two threads beside two workers
        # on a 2-core box, about 10 s alone).
        torch.set_num_threads(threads)

    def model_path(self, arm: str, rep: Repetition) -> Path:
        return saved.model_file(self.out, arm, rep.seed, rep.fold)

    def document(self, repetitions: list[dict], seeds: tuple[int, ...], folds: int) -> dict:
        """``metrics.json`` without its figures: the settings, the budget, each arm's mean (and sd) over the
        repetitions, every repetition, the provenance."""
        arms = [k for k in repetitions[0] if k not in ("seed", "fold")]
        means, sds = mean_sd_tree([{a: r[a] for a in arms} for r in repetitions])
        fed, internal = self.base.federation, self.internal
        document = {
            "synthetic": self.layout.synthetic,
            "note": SYNTHETIC_NOTE if self.layout.synthetic else "",
            "profile": self.profile_name,
            "config": to_dict(self.base),
            "device": str(self.dev),
            "sites": {"internal": list(self.layout.internal), "external": self.layout.external},
            "budget": {"centralized_epochs": self.epochs, "local_epochs_per_site": self.epochs,
                       "federated_rounds": fed.num_rounds, "federated_local_epochs": fed.local_epochs,
                       "federated_budgets": {b: federated_local_epochs(b, fed.local_epochs, internal, self.classes,
                                                                        {}) for b in self.budgets},
                       **optimizer_steps(internal, self.classes, self.base.train, self.epochs, fed)},
            "cases": {s.site: int(s.slices["case_id"].nunique()) for s in self.sites.values()},
            "n_repetitions": len(repetitions),
            "folds": folds if folds >= 2 else None,
            "seeds": list(seeds),
            "wall_s": {**{k: round(v, 1) for k, v in self.timings.items()}, "total": 0.0},
            **means,
            "sd": sds,
            "repetitions": repetitions,
            "provenance": self.provenance,
        }
        if self.reused:
            document["reused"] = self.reused
        if self.extra_regions:  # region -> the arm whose classifier saw it (the centralized arm sees the profile's)
            document["gate_regions"] = {self.base.model.gate_region: "centralized",
                                        **{r: f"{GATE_ARM}{r}" for r in self.extra_regions}}
        return document

    def _spent(self, arm: str, seconds: float) -> None:
        self.timings[arm] = self.timings.get(arm, 0.0) + seconds
