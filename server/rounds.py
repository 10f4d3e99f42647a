"""The rounds' bookkeeping: one global round's record, as the strategy fills it in (:class:`RoundRecord`), and the
book of finished rounds (:class:`RoundBook`), which records each in the run folder and MLflow.

- A round's entry in ``metrics.json`` (:meth:`RoundRecord.public`) holds the aggregated train and evaluate metrics,
  what each site reported, the Flower node id behind each site's entry, the evaluate-only (external) sites' scores,
  the centre's benchmark evaluation, timings and the overhead against the slowest site, model bytes per site, the
  screening (rejected replies, clipped updates, the norm bound, a refused aggregate) and the sites' cumulative
  privacy ε.
- The screening's outcome for every reply, keyed by node id, is what the message audit adds per phase
  (:meth:`RoundRecord.outcomes`, ``server/audit.py``).
- Its MLflow metrics (:meth:`RoundRecord.mlflow_metrics`) are keyed as ``server/tracking.py`` describes.
- Its checkpoint's meta names the round, the best federated ``BEST_METRIC`` so far, the round's evaluation and sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from braintumnet.protocol import DP_BUDGET_SPENT, DP_EPSILON, RECEIVED_PREFIX, SECONDS
from server.checkpoints import RunFolder
from server.settings import server_optimizer_params
from server.tracking import Tracker, metric_key

BEST_METRIC = "dice_tumor"  # federated (case-weighted) tumour Dice on the sites' test splits; higher is better

Metrics = dict[str, float]


@dataclass
class RoundRecord:
    """One global round: what happened, filled in phase by phase (``time.monotonic`` seconds for the clock fields).

    Args:
        round: the global round (continues across resumes).
        started: when its train phase was configured.
        sites: site -> phase (``train`` / ``evaluate``) -> the metrics it reported (train: with its update norm).
        train: the aggregated train metrics.
        evaluate: the federated evaluation (with evaluate-in-train, filled in by the next round's train replies).
        external: the evaluate-only sites' (the external hospital's) scores of the round's global model, case-weighted;
            each one's under ``sites[NAME]["external"]``.
        benchmark: the centre's own evaluation on a public benchmark set (``external-data``), if any.
        rejected: phase -> site -> why its reply was left out.
        nodes: site -> the Flower node id its entries come from. A site name claimed by several nodes in a phase is
            recorded as ``SITE (node ID)``, once per node.
        clipped: site -> parameter group -> its update's ``norm`` and the ``bound`` it was clipped onto.
        norm_bound: the round's update-norm bound: ``factor``, ``reference`` (where the reference norm came from) and
            ``groups`` (group -> bound); empty when no bound applied.
        outcomes: phase -> node id -> the screening's outcome for its reply (``name``: the site it is recorded as;
            ``outcome``: kept, clipped, rejected, error or budget-spent; the reason or clipped groups), for the audit.
        bytes: ``down_train`` / ``up_train`` / ``down_evaluate`` / ``up_evaluate`` -> site -> model bytes.
        skipped: the global model stayed as it was: too few train replies, or the aggregate was refused.
        refused: why the round's aggregate was refused (a robust rule that cannot work with the replies it has), or
            None.
        evaluate_later: the round's evaluation arrives with the next round's train replies.
        ended: when its evaluate phase ended.
        train_s, evaluate_s, external_s, benchmark_s: the phases' durations (external: the evaluate exchange that
            brought the external scores).
        wall_s: the round's wall time; slowest_site_s: the slowest site's own train + evaluate time; overhead: their
            ratio (set by :meth:`close`).
    """

    round: int
    started: float
    sites: dict[str, dict[str, Metrics]] = field(default_factory=dict)
    train: Metrics = field(default_factory=dict)
    evaluate: Metrics = field(default_factory=dict)
    external: Metrics = field(default_factory=dict)
    benchmark: Metrics = field(default_factory=dict)
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    norm_bound: dict = field(default_factory=dict)
    outcomes: dict[str, dict[int, dict]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: bool = False
    refused: str | None = None
    evaluate_later: bool = False
    ended: float | None = None
    train_s: float | None = None
    evaluate_s: float | None = None
    external_s: float | None = None
    benchmark_s: float | None = None
    wall_s: float | None = None
    slowest_site_s: float | None = None
    overhead: float | None = None

    def report(self, site: str, phase: str, metrics: Metrics) -> None:
        """What ``site`` reported for ``phase``."""
        self.sites.setdefault(site, {})[phase] = metrics

    def reject(self, phase: str, site: str, reason: str) -> None:
        self.rejected.setdefault(phase, {})[site] = reason

    def clip(self, site: str, groups: dict[str, dict[str, float]]) -> None:
        """``site``'s update was clipped in ``groups`` (group -> its ``norm`` and ``bound``)."""
        self.clipped[site] = groups

    def outcome(self, phase: str, node: int, site: str, outcome: str, **details) -> None:
        """The screening's outcome for ``node``'s reply in ``phase`` (a later one replaces an earlier one)."""
        self.outcomes.setdefault(phase, {})[node] = {"name": site, "outcome": outcome, **details}

    def site_of(self, node: int, default: str) -> str:
        """The name ``node``'s entries are recorded under this round (the latest), or ``default``."""
        return next((site for site, n in reversed(self.nodes.items()) if n == node), default)

    def split_received(self) -> dict[str, Metrics]:
        """Move the ``received_*`` metrics out of each site's train metrics; returns them per site, unprefixed."""
        out = {}
        for site, phases in self.sites.items():
            train = phases.get("train", {})
            received = {k.removeprefix(RECEIVED_PREFIX): train.pop(k) for k in list(train)
                        if k.startswith(RECEIVED_PREFIX)}
            if received:
                out[site] = received
        return out

    def scored(self, metrics: Metrics, per_site: Mapping[str, Metrics]) -> None:
        """The round's federated evaluation and each site's, arriving after the round (evaluate-in-train)."""
        self.evaluate = metrics
        for site, m in per_site.items():
            self.sites.setdefault(site, {})["evaluate"] = m

    def close(self, now: float) -> None:
        """The round's wall time (to the end of its evaluate phase, else ``now``) and its overhead."""
        self.wall_s = (self.ended if self.ended is not None else now) - self.started
        per_site = [sum(v.get(SECONDS, 0.0) for v in phases.values()) for phases in self.sites.values()]
        if per_site and max(per_site) > 0:
            self.slowest_site_s = max(per_site)
            self.overhead = self.wall_s / self.slowest_site_s

    # ---- outputs ---------------------------------------------------------------------------------------------------

    def public(self) -> dict:
        """The round as metrics.json stores it (no arrays)."""
        return {
            "round": self.round,
            "skipped": self.skipped,
            "train": self.train,
            "evaluate": self.evaluate,
            "external": self.external,
            "benchmark": self.benchmark,
            "sites": self.sites,
            "seconds": self._timings("wall_s", "train_s", "evaluate_s", "external_s", "benchmark_s",
                                     "slowest_site_s"),
            "overhead": self.overhead,
            "bytes_per_site": self.bytes_per_site(),
            "rejected": self.rejected,
            "nodes": self.nodes,
            "clipped": self.clipped,
            "norm_bound": self.norm_bound,
            "refused": self.refused,
            "privacy": self.privacy(),
        }

    def mlflow_metrics(self) -> dict[str, float]:
        """The round's MLflow metrics, at the round's step."""
        out: dict[str, float] = {}
        for phase, prefix, aggregated in (("train", "train", self.train), ("evaluate", "eval", self.evaluate)):
            out.update(phase_metrics(prefix, aggregated, {site: phases[phase] for site, phases in self.sites.items()
                                                          if phase in phases}))
        out.update({metric_key("external", k): v for k, v in self.external.items()})
        out.update({metric_key("benchmark", k): v for k, v in self.benchmark.items()})
        out.update({metric_key("round", k): v for k, v in self._timings("wall_s", "train_s", "evaluate_s",
                                                                          "slowest_site_s", "overhead").items()})
        out["round/sites_train"] = sum("train" in p for p in self.sites.values())
        out["round/sites_evaluate"] = sum("evaluate" in p for p in self.sites.values())
        out["round/skipped"] = float(self.skipped)
        out["round/rejected_train"] = len(self.rejected.get("train", {}))
        out["round/clipped_train"] = len(self.clipped)
        out["round/refused"] = float(self.refused is not None)
        privacy = self.privacy()
        if privacy:
            out["privacy/epsilon_max"] = privacy["epsilon_max"]
            out["privacy/sites_budget_spent"] = len(privacy["budget_spent"])
        per_site = self.bytes_per_site()
        if per_site:
            out["round/bytes_down_site_max"] = max(v["down"] for v in per_site.values())
            out["round/bytes_up_site_max"] = max(v["up"] for v in per_site.values())
        return out

    def privacy(self) -> dict:
        """Every site's cumulative ε as it reported this round, the maximum, and the sites whose budget is spent."""
        epsilons = {site: p["train"][DP_EPSILON] for site, p in self.sites.items() if DP_EPSILON in p.get("train", {})}
        if not epsilons:
            return {}
        spent = sorted(site for site, p in self.sites.items() if p.get("train", {}).get(DP_BUDGET_SPENT) == 1)
        return {"epsilon": epsilons, "epsilon_max": max(epsilons.values()), "budget_spent": spent}

    def bytes_per_site(self) -> dict[str, dict[str, int]]:
        """Model bytes each site received (train + evaluate instructions) and sent (its train reply), per site."""
        b = self.bytes
        sites = set().union(*(b.get(d, {}) for d in ("down_train", "up_train", "down_evaluate", "up_evaluate")))
        return {site: {"down": b.get("down_train", {}).get(site, 0) + b.get("down_evaluate", {}).get(site, 0),
                       "up": b.get("up_train", {}).get(site, 0) + b.get("up_evaluate", {}).get(site, 0)}
                for site in sorted(sites)}

    def _timings(self, *names: str) -> dict[str, float]:
        """The named clock fields that are set, in that order."""
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def phase_metrics(prefix: str, aggregated: Mapping[str, float], per_site: Mapping[str, Mapping[str, float]]) -> dict:
    """MLflow keys of one phase of a round: ``<prefix>/<metric>`` and ``<site>/<prefix>/<metric>``."""
    out = {metric_key(prefix, k): v for k, v in aggregated.items()}
    for site, m in per_site.items():
        out.update({metric_key(site, prefix, k): v for k, v in m.items()})
    return out


def evaluation_metrics(metrics: Mapping[str, float], per_site: Mapping[str, Mapping[str, float]]) -> dict:
    """MLflow keys of a round's evaluation, as :meth:`RoundRecord.mlflow_metrics` names them."""
    return {**phase_metrics("eval", metrics, per_site), "round/sites_evaluate": len(per_site)}


class RoundBook:
    """The finished rounds of this Flower run, each recorded where it belongs: its checkpoint (``latest``, and
    ``best`` while its federated ``BEST_METRIC`` is the best so far), ``metrics.json`` and MLflow at the round's step.

    Args:
        folder: the run folder.
        tracker: MLflow.
        profile: the typed run config (stored in checkpoints).
        class_names: the task's classes (stored in checkpoints).
        meta: fixed checkpoint meta (``federation-id``, ...), also at the top of ``metrics.json``.
        best_value: the best ``BEST_METRIC`` before this Flower run (resume), or None.
    """

    def __init__(self, *, folder: RunFolder, tracker: Tracker, profile, class_names: tuple[str, ...], meta: dict,
                 best_value: float | None = None):
        self.folder, self.tracker, self.profile, self.class_names = folder, tracker, profile, class_names
        self.meta = meta
        self.best_value = best_value
        self.rounds: list[RoundRecord] = []

    @property
    def history(self) -> list[dict]:
        """The finished rounds as ``metrics.json`` lists them."""
        return [r.public() for r in self.rounds]

    def record(self, rec: RoundRecord, state: Mapping, site_nodes: dict[str, str],
               optimizer_state: dict[str, np.ndarray] | None) -> tuple[Path, bool]:
        """A finished round with its global model ``state``: the checkpoint's path, and whether it is the best so far.

        Args:
            site_nodes: node id -> site name (a resumed run starts from them).
            optimizer_state: the server optimizer's state after the round, or None without a server optimizer.
        """
        best = self._is_new_best(rec.evaluate)
        if optimizer_state is not None:  # first, so that a checkpoint never exists without the state it resumes with
            self.folder.save_server_optimizer(rec.round, self.profile.server.optimizer, optimizer_state)
        path = self.folder.save_round(rec.round, state, self.profile, self.class_names,
                                      self._checkpoint_meta(rec, site_nodes), best)
        self.rounds.append(rec)
        self._write_metrics()
        self.tracker.metrics(rec.mlflow_metrics(), step=rec.round)
        return path, best

    def score_last(self, metrics: Metrics, per_site: Mapping[str, Metrics], state: Mapping,
                   site_nodes: dict[str, str]) -> bool:
        """The last round's federated evaluation, arriving after it (evaluate-in-train): into its entry in
        ``metrics.json``, its checkpoint (``state``, the model the sites scored, written again with the new meta;
        ``best`` moves to it when it is the best so far) and MLflow at its step. Returns whether it is the best."""
        last = self.rounds[-1]
        last.scored(metrics, per_site)
        best = self._is_new_best(metrics)
        self.folder.save_round(last.round, state, self.profile, self.class_names,
                               self._checkpoint_meta(last, site_nodes), best)
        self._write_metrics()
        self.tracker.metrics(evaluation_metrics(metrics, per_site), step=last.round)
        return best

    def _is_new_best(self, evaluation: Mapping[str, float]) -> bool:
        """Whether a round's federated ``BEST_METRIC`` beats the best so far (then it becomes the best)."""
        value = evaluation.get(BEST_METRIC, math.nan)
        best = math.isfinite(value) and (self.best_value is None or value > self.best_value)
        if best:
            self.best_value = value
        return best

    def _checkpoint_meta(self, rec: RoundRecord, site_nodes: dict[str, str]) -> dict:
        return {**self.meta, "round": rec.round, "total_rounds": self.profile.federation.num_rounds,
                "best_metric": BEST_METRIC, "best_value": self.best_value, "evaluate": rec.evaluate,
                "sites": sorted(rec.sites), "site-nodes": site_nodes}

    def _write_metrics(self) -> None:
        self.folder.write_metrics({"rounds": self.history, **self.meta,
                                   "server-optimizer": server_optimizer_params(self.profile)})
