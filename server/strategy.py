"""FedAvg for BrainTumNet-FL: Flower's FedAvg, plus what a federation of hospitals needs.

- **Never waits silently.** Sampling logs which nodes are connected (by site name once known) and which expected
  sites are missing, every 15 s, and gives up after ``wait-for-nodes-s`` with an error saying what to do.
- **Per-site metrics.** Each reply is attributed to a site: ``NodeInfo.name`` when the SuperLink knows it (SuperNode
  authentication), else the ``site`` record the ClientApp sends. A SuperLink-made error reply (a node gone) is traced
  back to the node the instruction went to.
- **Bad replies are dropped, not fatal.** Flower's FedAvg raises ``InconsistentMessageReplies`` (and the ServerApp
  exits) when one site sends different keys; here each reply is checked (one ArrayRecord with the global model's keys,
  shapes and finite values; one MetricRecord with a positive ``num-examples`` and the same keys as the other sites)
  and a bad one is logged with the site's name and left out.
- **Update-norm bound** (``robust.norm-factor``, ``server/robust.py``): with three or more train replies, one whose
  update norm is far above the round's median is rejected, logged with the site and the reason.
- **Robust aggregation** (``strategy.aggregation``): FedAvg's weighted mean, or a coordinate-wise median or trimmed
  mean.
- **Server optimizer** (``strategy.server-optimizer``, ``make_strategy``): Flower's FedAvgM, FedAdam, FedYogi or
  FedAdagrad composed on top of this class by the MRO, so their server step moves the model from the screened, robust
  aggregate; their state is checkpointed every round and restored on resume.
- **Privacy budgets.** A site whose DP budget is spent replies ``dp_budget_spent = 1`` without arrays; it is left out
  of the aggregation with a log line naming it (it still evaluates). Each round's ``privacy`` entry in
  ``metrics.json`` and MLflow holds every site's cumulative ε.
- **Message audit** (``audit-messages = true``): every message the centre sends or receives is described (record
  names, keys, shapes, dtypes, config and metric values; never array contents) in ``audit.jsonl`` in the run folder.
- **Dropout.** A round counts when at least ``min-train-nodes`` sites replied; otherwise the global model stays as
  it was and the log says so. A site that comes back is sampled again next round.
- **Undefined metrics** (NaN, e.g. AUC on a one-class test split) are averaged over the sites where they are defined.
- **Rounds continue across resumes**: ``round_offset`` shifts every round number the sites, logs, checkpoints and
  MLflow see.
- **End of round** (``end_of_round``, Flower's ``evaluate_fn`` hook): the centre's external evaluation, the
  checkpoint, ``metrics.json`` and the MLflow entries.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import httpx
import numpy as np
from flwr import __version__ as FLWR_VERSION
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from braintumnet.errors import BrainTumNetError
from server.checkpoints import RunFolder
from server.robust import aggregate, norm_outliers, update_norm
from server.tracking import Tracker, metric_key

log = logging.getLogger("braintumnet.server")

WEIGHT_KEY = "num-examples"
BEST_METRIC = "dice_tumor"  # federated (case-weighted) tumour Dice on the sites' test splits; higher is better
# Per-site timings and privacy figures: logged per site; a weighted mean of them means nothing (the federation's ε
# is each site's own, summarised as the maximum in the round's ``privacy`` entry).
NOT_AVERAGED = {"seconds", "dp_epsilon", "dp_budget_spent"}
WAIT_LOG_EVERY_S = 15.0
# Seconds between reply polls. Flower's own Grid.send_and_receive waits a flat 3 s, which costs up to 3 s per phase
# (6 s a round) whatever the sites do: round overhead x2-x4 on short rounds (bench/results/federation.md). Each poll is
# a write at the SuperLink (it marks replies delivered), and flat fast polling made its SQLite state time out on locks
# on a busy machine. So the wait grows with the phase: a tenth of the time waited so far (the polling delay stays
# within ~10 % of the phase), never under POLL_MIN_S nor over POLL_S. The 3 s ceiling costs about 1.5 s a round on
# average (the standard study's rounds fell on a 3 s grid: 2.5 % of a 60 s round); a 1 s ceiling, tried, saw a
# loopback run fail on "database is locked" on a saturated box, so the ceiling stays.
POLL_S = 3.0
POLL_MIN_S = 0.5
POLL_FRACTION = 0.1
# A train reply's scores of the model the site received (evaluate-in-train): client.app.RECEIVED_PREFIX, which the
# centre does not import (the ClientApp module is the sites' code).
RECEIVED_PREFIX = "received_"
BUSY_RETRIES = 6  # a SuperLink under load answers 500 ("database is locked") now and then: retry reads


class FederationError(BrainTumNetError):
    """The federation cannot go on (e.g. not enough sites connected in time)."""


@dataclass(frozen=True)
class ServerSettings:
    """The centre's run-config keys (``[tool.flwr.app.config]``), beside the typed ``Profile``.

    Args:
        checkpoint_dir: run folders, the embedded MLflow store; relative paths resolve against the SuperLink's
            working directory (logged as absolute).
        resume_from: "" (fresh start), "latest", a run folder or a checkpoint file.
        external_data: "" or the centre's external cohort: a site folder or a prepared cache folder.
        cache_dir: where the centre prepares ``external_data``; "" = ``$BRAINTUMNET_CACHE`` or ``.cache/braintumnet``.
        sites: the sites expected (for the waiting log) and, in simulation, partition i's name.
        mlflow_experiment: MLflow experiment name; "" turns MLflow off.
        audit_messages: describe every message sent and received in ``audit.jsonl`` in the run folder.
        evaluate_in_train: each train message asks the sites to score the global model they receive (the previous
            round's) before training, and only the last round has an evaluate message: one model download per site
            per round instead of two. Round r's federated metrics then arrive with round r+1's train replies.
    """

    checkpoint_dir: Path
    resume_from: str = ""
    external_data: str = ""
    cache_dir: str = ""
    sites: tuple[str, ...] = ()
    mlflow_experiment: str = "braintumnet-fl"
    audit_messages: bool = False
    evaluate_in_train: bool = True

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> "ServerSettings":
        root = str(cfg.get("checkpoint-dir", "") or "runs")
        return cls(
            checkpoint_dir=Path(root).expanduser().absolute(),
            resume_from=str(cfg.get("resume-from", "") or ""),
            external_data=str(cfg.get("external-data", "") or ""),
            cache_dir=str(cfg.get("cache-dir", "") or ""),
            sites=tuple(s.strip() for s in str(cfg.get("sites", "")).split(",") if s.strip()),
            mlflow_experiment=str(cfg.get("mlflow-experiment", "braintumnet-fl")),
            audit_messages=str(cfg.get("audit-messages", False)).lower() in ("true", "1"),
            evaluate_in_train=str(cfg.get("evaluate-in-train", True)).lower() in ("true", "1"),
        )


@dataclass
class _Exchange:
    """One send-and-receive: where each message went, what came back, how long it took and how many bytes moved."""

    sent: dict[str, int] = field(default_factory=dict)  # message id -> node id
    replies: list[Message] = field(default_factory=list)
    seconds: float = 0.0
    timeout: float | None = None
    bytes_out: dict[int, int] = field(default_factory=dict)  # node id -> array bytes sent
    bytes_in: dict[int, int] = field(default_factory=dict)  # node id -> array bytes received


class _RecordingGrid(Grid):
    """Flower's Grid, plus a record of each exchange (for site names, bytes and timing) and retried reads.

    ``audit``, when given, receives a description (:func:`describe_message`) of every message sent and received.
    """

    def __init__(self, grid: Grid, audit: Callable[[list[dict]], Any] | None = None):
        self._grid = grid
        self.last = _Exchange()
        self.audit = audit

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # deprecated upstream
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        start = time.monotonic()
        exchange = _Exchange(bytes_out={m.metadata.dst_node_id: _array_bytes(m.content) for m in messages},
                             timeout=timeout)
        ids = list(self._grid.push_messages(messages)) if messages else []
        exchange.sent = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        waiting = set(exchange.sent)
        deadline = None if timeout is None else start + timeout
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = retry_busy(lambda: list(self._grid.pull_messages(list(waiting))), "pull replies")
            exchange.replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting:
                time.sleep(min(POLL_S, max(POLL_MIN_S, POLL_FRACTION * (time.monotonic() - start))))
        for m in exchange.replies:
            node = exchange.sent.get(m.metadata.reply_to_message_id)
            if node is not None and not m.has_error():
                exchange.bytes_in[node] = _array_bytes(m.content)
        exchange.seconds = time.monotonic() - start
        self.last = exchange
        if self.audit is not None:
            self.audit([describe_message(m, "to-site", node=m.metadata.dst_node_id) for m in messages]
                       + [describe_message(m, "from-site", node=exchange.sent.get(m.metadata.reply_to_message_id))
                          for m in exchange.replies])
        return exchange.replies


def describe_message(msg: Message, direction: str, node: int | None = None) -> dict:
    """What a message carries, for the audit: record names and kinds; arrays by shape and dtype only; config and
    metric items with their values (they are what the centre sees anyway); the error reason of an error reply."""
    entry: dict[str, Any] = {"direction": direction, "type": msg.metadata.message_type,
                             "group": msg.metadata.group_id, "node": node}
    if msg.has_error():
        entry["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        return entry
    records: dict[str, Any] = {}
    content = msg.content
    for name, record in content.items():
        if name in content.array_records:
            records[name] = {"kind": "array", "items": {k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                                                        for k, a in record.items()}}
        elif name in content.metric_records or name in content.config_records:
            kind = "metric" if name in content.metric_records else "config"
            records[name] = {"kind": kind, "items": {k: _plain(v) for k, v in record.items()}}
        else:
            records[name] = {"kind": type(record).__name__}
    entry["records"] = records
    return entry


def _plain(value: Any) -> Any:
    """A JSON-able copy of a config or metric value (bytes by length only: they could hold anything)."""
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def retry_busy(read: Callable[[], Any], what: str) -> Any:
    """Run a read-only SuperLink call, retrying with backoff when the SuperLink answers 5xx (e.g. its SQLite state is
    locked by a burst of uploads); Flower's own client gives up at the first 500 and the ServerApp would exit."""
    for attempt in range(BUSY_RETRIES + 1):
        try:
            return read()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code < 500 or attempt == BUSY_RETRIES:
                raise
            wait = min(2.0 ** attempt, 15.0)
            log.warning("SuperLink answered %d to '%s' (busy); retrying in %.0f s", exc.response.status_code, what,
                        wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _array_bytes(content: RecordDict) -> int:
    return sum(record.count_bytes() for record in content.array_records.values())


def nan_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Per metric, the ``weight_key``-weighted mean over the replies where it is finite (NaN where none is)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    keys: list[str] = []
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        for key, value in metrics.items():
            if key == weight_key or key in NOT_AVERAGED or isinstance(value, list):
                continue
            if key not in sums:
                keys.append(key)
                sums[key], weights[key] = 0.0, 0.0
            if math.isfinite(float(value)):
                sums[key] += w * float(value)
                weights[key] += w
    return MetricRecord({k: (sums[k] / weights[k] if weights[k] > 0 else math.nan) for k in keys})


def reply_problem(content: RecordDict, reference: ArrayRecord | None, metric_keys: set[str] | None) -> str | None:
    """Why a reply cannot be aggregated, or None if it can.

    Args:
        content: the reply's RecordDict.
        reference: the global model sent (train replies), or None (evaluate replies carry no arrays).
        metric_keys: the metric keys every site must send, or None to skip that check.
    """
    if reference is not None:
        if len(content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(content.array_records)}"
        arrays = next(iter(content.array_records.values()))
        missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
        if missing or extra:
            return f"model keys differ from the global model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
        for key, array in arrays.items():
            if tuple(array.shape) != tuple(reference[key].shape):
                return (f"array {key} has shape {tuple(array.shape)}, "
                        f"the global model's is {tuple(reference[key].shape)}")
            values = array.numpy()
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"array {key} holds NaN or infinite values"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(WEIGHT_KEY)
    if isinstance(weight, list) or weight is None or not float(weight) > 0:
        return f"{WEIGHT_KEY} must be a positive number, got {weight!r}"
    if metric_keys is not None and set(metrics) != metric_keys:
        return (f"metric keys differ from the other sites' (missing {sorted(metric_keys - set(metrics))}, "
                f"extra {sorted(set(metrics) - metric_keys)})")
    return None


def fedavg_arguments(profile) -> dict[str, Any]:
    """Flower's FedAvg keyword arguments from the profile (every strategy here passes them on to FedAvg)."""
    fed = profile.federation
    return dict(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
                min_available_nodes=fed.min_available_nodes, weighted_by_key=WEIGHT_KEY,
                train_metrics_aggr_fn=nan_weighted_mean, evaluate_metrics_aggr_fn=nan_weighted_mean)


class SiteAwareFedAvg(FedAvg):
    """FedAvg with site names, bad-reply rejection, a minimum-replies rule, bounded waiting and end-of-round I/O.

    Args:
        profile: the typed run config (``braintumnet.config.Profile``).
        settings: the centre's settings.
        folder: the run folder for checkpoints and ``metrics.json``.
        tracker: MLflow.
        class_names: the task's classes (stored in checkpoints).
        round_offset: rounds already done before this Flower run (resume).
        best_value: the best ``dice_tumor`` so far (resume), or None.
        external_eval: ``fn(state_dict) -> metrics`` on the centre's external cohort, or None.
        meta: fixed checkpoint meta (``federation-id``, ...).
    """

    def __init__(self, *, profile, settings: ServerSettings, folder: RunFolder, tracker: Tracker,
                 class_names, round_offset: int = 0, best_value: float | None = None,
                 external_eval: Callable[[dict], dict] | None = None, meta: dict | None = None):
        super().__init__(**fedavg_arguments(profile))
        self._init_site(profile=profile, settings=settings, folder=folder, tracker=tracker, class_names=class_names,
                        round_offset=round_offset, best_value=best_value, external_eval=external_eval, meta=meta)

    def _init_site(self, *, profile, settings: ServerSettings, folder: RunFolder, tracker: Tracker,
                   class_names, round_offset: int = 0, best_value: float | None = None,
                   external_eval: Callable[[dict], dict] | None = None, meta: dict | None = None) -> None:
        """This class's own state (apart from Flower's, which ``__init__`` sets up first)."""
        fed = profile.federation
        self.profile, self.settings, self.folder, self.tracker = profile, settings, folder, tracker
        self.robust = profile.robust
        self.class_names = tuple(class_names)
        self.round_offset = round_offset
        self.total_rounds = fed.num_rounds
        self.best_value = best_value
        self.external_eval = external_eval
        self.meta = dict(meta or {})
        # node id -> site name; a resumed run starts from the names its checkpoint knew (node ids survive restarts)
        self.names: dict[int, str] = {int(n): s for n, s in self.meta.pop("site-nodes", {}).items()}
        self.history: list[dict] = []
        self._grid: _RecordingGrid | None = None
        self._sent_arrays: ArrayRecord | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self._round: dict = {}
        self._aggregate: ArrayRecord | None = None  # the round's screened, robust aggregate (before a server step)
        self.arrays: ArrayRecord | None = None  # the global model after the last finished round

    # ---- Flower entry point -------------------------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None):
        self._grid = _RecordingGrid(grid, self.folder.append_audit if self.settings.audit_messages else None)
        self._dtypes = {k: a.numpy().dtype for k, a in initial_arrays.items()}
        return super().start(self._grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                             evaluate_fn or self.end_of_round)

    def summary(self) -> None:
        super().summary()
        log.info("rounds %d..%d of %d; checkpoints in %s; waiting at most %.0f s for nodes",
                 self.round_offset + 1, self.total_rounds, self.total_rounds, self.folder.dir,
                 self.profile.federation.wait_for_nodes_s)
        r, dp = self.robust, self.profile.privacy
        log.info("aggregation %s%s; update-norm bound %s; site DP %s%s", r.aggregation,
                 f" (trim-fraction {r.trim_fraction:g})" if r.aggregation == "trimmed-mean" else "",
                 f"{r.norm_factor:g} x median (3+ sites)" if r.norm_factor > 0 else "off",
                 "on" if dp.enabled else "off", f", budget epsilon {dp.budget:g} at delta {dp.delta:g}"
                 if dp.enabled else "")
        params = self.server_optimizer_params()
        log.info("server optimizer %s%s", params.pop("name"),
                 f" ({', '.join(f'{k} {v:g}' for k, v in params.items())}) on the aggregate; its state is "
                 "checkpointed each round" if params else " (FedAvg: the aggregate is the new global model)")
        if self.settings.audit_messages:
            log.info("message audit on: %s", self.folder.audit_path)

    # ---- train ---------------------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        g = self.round_offset + server_round
        self._round = {"round": g, "started": time.monotonic(), "sites": {}}
        self._sent_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes, "train", g)
        config["server-round"] = g
        config["total-rounds"] = self.total_rounds
        if self.meta.get("federation-id"):
            config["federation-id"] = str(self.meta["federation-id"])  # keys a site's privacy ledger (resume-proof)
        if self._evaluates_in_train() and self.history:  # score the global model of the round before, at each site
            config["evaluate-received"] = True
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        log.info("round %d/%d: training at %s", g, self.total_rounds, self._names_of(nodes))
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self.fraction_train == 0.0:
            return None, None
        exchange = self._exchange()
        valid = self._bound_norms(self._screen(list(replies), exchange, "train", self._sent_arrays))
        self._previous_round_evaluated(_split_received(self._round["sites"]))
        self._round["train_s"] = exchange.seconds
        self._round["bytes"] = {"down_train": self._by_site(exchange.bytes_out),
                                "up_train": self._by_site(exchange.bytes_in)}
        if len(valid) < max(self.min_train_nodes, 1):
            log.warning("round %d: %d site(s) replied to train, fewer than min-train-nodes=%d; the global model "
                        "stays as it was this round", self._round["round"], len(valid), self.min_train_nodes)
            self._round["skipped"] = True
            return None, None
        contents = [m.content for _, m in valid]
        arrays = _cast_like(aggregate(contents, self.robust.aggregation, self.weighted_by_key,
                                      self.robust.trim_fraction), self._dtypes)
        self._aggregate = ArrayRecord(dict(arrays.items()))  # a copy: Flower's FedAvgM clears the record it steps
        metrics = MetricRecord({k: v for k, v in self.train_metrics_aggr_fn(contents, self.weighted_by_key).items()
                                if not k.startswith(RECEIVED_PREFIX)})
        self._round["train"] = dict(metrics)
        return arrays, metrics

    # ---- evaluate ------------------------------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        g = self.round_offset + server_round
        if self.fraction_evaluate == 0.0:
            return []
        if self._evaluates_in_train() and g < self.total_rounds:
            self._round["evaluate_later"] = True  # with the next round's train replies
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate", g)
        config["server-round"] = g
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self._round["ended"] = time.monotonic()
        if self.fraction_evaluate == 0.0 or self._round.get("evaluate_later"):
            return None
        exchange = self._exchange()
        valid = self._screen(list(replies), exchange, "evaluate", None)
        self._round["evaluate_s"] = exchange.seconds
        self._round.setdefault("bytes", {}).update({"down_evaluate": self._by_site(exchange.bytes_out),
                                                    "up_evaluate": self._by_site(exchange.bytes_in)})
        if len(valid) < max(self.min_evaluate_nodes, 1):
            log.warning("round %d: %d site(s) replied to evaluate, fewer than min-evaluate-nodes=%d; no federated "
                        "metrics this round", self._round["round"], len(valid), self.min_evaluate_nodes)
            return None
        metrics = self.evaluate_metrics_aggr_fn([m.content for _, m in valid], self.weighted_by_key)
        self._round["evaluate"] = dict(metrics)
        return metrics

    # ---- end of round: external evaluation, checkpoint, metrics.json, MLflow ---------------------------------------

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: called with round 0 before training (nothing to do) and after every round."""
        if server_round == 0:
            return None
        rec = self._round
        g = rec["round"]
        rec["wall_s"] = rec.get("ended", time.monotonic()) - rec["started"]
        self.arrays = arrays
        state = arrays.to_torch_state_dict()
        external = None
        if self.external_eval is not None:
            t = time.monotonic()
            external = self.external_eval(state)
            rec["external"] = external
            rec["external_s"] = time.monotonic() - t
            log.info("round %d: external cohort: dice_tumor %.4f, acc %.4f (%d cases)", g,
                     external.get("dice_tumor", math.nan), external.get("acc", math.nan),
                     external.get("num-examples", 0))
        best = self._is_new_best(rec.get("evaluate", {}))
        optimizer_state = self.server_optimizer_state()
        if optimizer_state is not None:  # first, so that a checkpoint never exists without the state it resumes with
            self.folder.save_server_optimizer(g, self.profile.server.optimizer, optimizer_state)
        path = self.folder.save_round(g, state, self.profile, self.class_names, self._checkpoint_meta(rec), best)
        rec.update(_overhead(rec))
        self.history.append(_public(rec))
        self._write_metrics()
        self.tracker.metrics(_mlflow_metrics(rec), step=g)
        log.info("round %d/%d done in %.1f s (sites' own time %.1f s, overhead x%.2f); checkpoint %s%s", g,
                 self.total_rounds, rec["wall_s"], rec.get("slowest_site_s", math.nan), rec.get("overhead", math.nan),
                 path, " (best so far)" if best else "")
        return MetricRecord({k: float(v) for k, v in external.items()}) if external else None

    def _is_new_best(self, evaluation: Mapping[str, float]) -> bool:
        """Whether a round's federated ``BEST_METRIC`` beats the best so far (then it becomes the best)."""
        value = evaluation.get(BEST_METRIC, math.nan)
        best = math.isfinite(value) and (self.best_value is None or value > self.best_value)
        if best:
            self.best_value = value
        return best

    def _write_metrics(self) -> None:
        self.folder.write_metrics({"rounds": self.history, **self.meta,
                                   "server-optimizer": self.server_optimizer_params()})

    # ---- the server optimizer (none here; see _ServerOptimizer) ---------------------------------------------------

    def server_optimizer_params(self) -> dict[str, Any]:
        return server_optimizer_params(self.profile)

    def server_optimizer_state(self) -> dict[str, np.ndarray] | None:
        """The server optimizer's state to checkpoint with each round, or None when there is no server optimizer."""
        return None

    def _checkpoint_meta(self, rec: dict) -> dict:
        return {**self.meta, "round": rec["round"], "total_rounds": self.total_rounds, "best_metric": BEST_METRIC,
                "best_value": self.best_value, "evaluate": rec.get("evaluate", {}),
                "sites": sorted(rec["sites"]), "site-nodes": {str(n): s for n, s in self.names.items()}}

    # ---- evaluation that arrives with the next round's train replies (evaluate-in-train) --------------------------

    def _evaluates_in_train(self) -> bool:
        return self.settings.evaluate_in_train and self.fraction_evaluate > 0.0

    def _previous_round_evaluated(self, per_site: dict[str, dict]) -> None:
        """The sites' scores of the global model they received this round: the previous round's federated metrics.

        They go where an evaluate phase would have put them: that round's entry in ``metrics.json``, its checkpoint's
        meta (re-written; ``best`` moves to it when it is the best so far) and MLflow at that round's step.
        """
        if not per_site or not self.history or self._sent_arrays is None:
            return
        previous = self.history[-1]
        g = previous["round"]
        if len(per_site) < max(self.min_evaluate_nodes, 1):
            log.warning("round %d: %d site(s) scored it, fewer than min-evaluate-nodes=%d; no federated metrics for "
                        "round %d", g, len(per_site), self.min_evaluate_nodes, g)
            return
        records = [RecordDict({"metrics": MetricRecord(m)}) for m in per_site.values()]
        metrics = dict(self.evaluate_metrics_aggr_fn(records, self.weighted_by_key))
        previous["evaluate"] = metrics
        for site, m in per_site.items():
            previous["sites"].setdefault(site, {})["evaluate"] = m
        best = self._is_new_best(metrics)
        # The model the sites scored is the one sent this round: the previous round's global model.
        self.folder.save_round(g, self._sent_arrays.to_torch_state_dict(), self.profile, self.class_names,
                               self._checkpoint_meta(previous), best)
        self._write_metrics()
        self.tracker.metrics(_evaluation_metrics(metrics, per_site), step=g)
        log.info("round %d (scored by the sites with round %d's training): dice_tumor %.4f, acc %.4f from %s%s", g,
                 self._round["round"], metrics.get(BEST_METRIC, math.nan), metrics.get("acc", math.nan),
                 ", ".join(sorted(per_site)),
                 " (best so far)" if best else "")

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _exchange(self) -> _Exchange:
        return self._grid.last if self._grid is not None else _Exchange()

    def _screen(self, replies: list[Message], exchange: _Exchange, phase: str,
                reference: ArrayRecord | None) -> list[tuple[str, Message]]:
        """Attribute each reply to a site, log errors and bad replies, keep the good ones as (site, message)."""
        good: list[tuple[str, Message]] = []
        for msg in replies:
            node = exchange.sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            claimed = msg.content.config_records.get("site") if not msg.has_error() else None
            if claimed is not None and "name" in claimed:
                self._learn(node, str(claimed["name"]))
            site = self._name(node)
            if msg.has_error():
                log.warning("round %d: %s: %s error from %s: %s", self._round["round"], phase, phase, site,
                            msg.error.reason)
                continue
            good.append((site, msg))
        keys = Counter(frozenset(next(iter(m.content.metric_records.values())).keys())
                       for _, m in good if len(m.content.metric_records) == 1)
        expected = set(keys.most_common(1)[0][0]) if keys else None
        kept = []
        for site, msg in good:
            if reference is not None and _budget_spent(msg, expected):
                metrics = dict(next(iter(msg.content.metric_records.values())))
                self._round["sites"].setdefault(site, {})[phase] = metrics
                log.info("round %d: %s's privacy budget is spent (epsilon %.3f, dp.max-epsilon %g): it no longer "
                         "trains and is left out of the aggregation; it still evaluates", self._round["round"], site,
                         float(metrics.get("dp_epsilon", math.nan)), self.profile.privacy.budget)
                continue
            problem = reply_problem(msg.content, reference, expected)
            if problem:
                log.warning("round %d: %s reply from %s rejected: %s", self._round["round"], phase, site, problem)
                self._round.setdefault("rejected", {}).setdefault(phase, {})[site] = problem
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            self._round["sites"].setdefault(site, {})[phase] = metrics
            kept.append((site, msg))
        answered = {m.metadata.reply_to_message_id for m in replies}
        for mid, node in exchange.sent.items():
            if mid not in answered:
                log.warning("round %d: no %s reply from %s within round-timeout-s=%.0f s; left out of this round",
                            self._round["round"], phase, self._name(node), exchange.timeout or 0)
        sent_to = sorted(self._name(n) for n in exchange.sent.values())
        log.info("round %d: %s replies from %d of %d site(s): %s", self._round["round"], phase, len(kept),
                 len(sent_to), ", ".join(s for s, _ in kept) or "none")
        return kept

    def _bound_norms(self, kept: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        """Drop train replies whose update norm is far above the round's median (``robust.norm-factor``)."""
        norms = {site: update_norm(next(iter(m.content.array_records.values())), self._sent_arrays)
                 for site, m in kept}
        for site, norm in norms.items():
            self._round["sites"][site]["train"]["update_norm"] = norm  # metrics.json and MLflow, per site
        outliers = norm_outliers(norms, self.robust.norm_factor)
        for site, reason in outliers.items():
            log.warning("round %d: train reply from %s rejected: %s", self._round["round"], site, reason)
            self._round.setdefault("rejected", {}).setdefault("train", {})[site] = reason
        return [(site, m) for site, m in kept if site not in outliers]

    def _sample(self, grid: Grid, fraction: float, min_nodes: int, phase: str, g: int) -> list[int]:
        """Wait (bounded, loudly) until enough nodes are connected, then sample like FedAvg does."""
        need = max(self.min_available_nodes, min_nodes)
        limit = self.profile.federation.wait_for_nodes_s
        start = time.monotonic()
        last_log = -math.inf
        while True:
            nodes = retry_busy(lambda: list(grid.get_nodes()), "get nodes")
            for info in nodes:
                if info.name:
                    self._learn(info.node_id, info.name)
            if len(nodes) >= need:
                break
            waited = time.monotonic() - start
            connected = self._names_of([n.node_id for n in nodes]) or "none"
            connected_sites = {self.names.get(n.node_id) for n in nodes}
            missing = [s for s in self.settings.sites if s not in connected_sites]
            if waited >= limit:
                raise FederationError(
                    f"round {g} ({phase}): gave up after waiting {limit:.0f} s (wait-for-nodes-s) for nodes: "
                    f"{len(nodes)} connected ({connected}), {need} needed (min-available-nodes="
                    f"{self.min_available_nodes}, min-{phase}-nodes={min_nodes}). Start the missing sites with "
                    f"python client/run.py --site NAME, or lower min-available-nodes / min-{phase}-nodes")
            if waited - last_log >= WAIT_LOG_EVERY_S:
                last_log = waited
                log.warning("round %d (%s): waiting for nodes: %d connected (%s), %d needed; expected sites not "
                            "seen yet: %s; giving up in %.0f s (wait-for-nodes-s=%.0f)", g, phase, len(nodes),
                            connected, need, ", ".join(missing) or "-", limit - waited, limit)
            time.sleep(1.0)
        ids = [n.node_id for n in nodes]
        size = max(int(len(ids) * fraction), min_nodes)
        return random.sample(ids, min(size, len(ids)))

    def _learn(self, node: int, name: str) -> None:
        if self.names.get(node) not in (None, name):
            log.warning("node %s reported site %r but is known as %r; keeping %r", node, name, self.names[node],
                        self.names[node])
            return
        if name in self.names.values() and self.names.get(node) != name:
            # A site that restarted comes back as a new node; its old node is gone.
            self.names = {n: s for n, s in self.names.items() if s != name}
        self.names[node] = name

    def _by_site(self, per_node: Mapping[int, int]) -> dict[str, int]:
        return {self._name(n): v for n, v in per_node.items()}

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")

    def _names_of(self, nodes: Iterable[int]) -> str:
        return ", ".join(sorted(self._name(n) for n in nodes))


# ---- server optimizers: Flower's FedAvgM / FedAdam / FedYogi / FedAdagrad on top of SiteAwareFedAvg ------------------

FLOWER_OPTIMIZERS: dict[str, type[FedAvg]] = {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
                                              "fedadagrad": FedAdagrad}
# Flower keeps a server optimizer's state in attributes outside its documented API: they are read for each round's
# checkpoint and set again on resume (container: how Flower holds them, a dict by model key or a list in the model's
# key order), and FedAvgM's current_arrays (the model it steps from) is reset every round. They were checked against
# this flwr minor version; another one is refused, and tests/federation/test_server_optimizer.py fails if they change.
FLOWER_CHECKED = "1.42"
FLOWER_STATE: dict[str, tuple[tuple[str, type], ...]] = {
    "fedavgm": (("momentum_vector", list),),
    "fedadam": (("m_t", dict), ("v_t", dict)),
    "fedyogi": (("m_t", dict), ("v_t", dict)),
    "fedadagrad": (("m_t", dict), ("v_t", dict)),
}
FLOWER_INTERNALS = ("current_arrays",)


def server_optimizer_arguments(profile) -> dict[str, float]:
    """The keyword arguments Flower's server-optimizer class receives (none for ``none``): the run config's values,
    and where ``strategy.server-learning-rate`` is 0 the optimizer's default: ours where we measured one
    (``braintumnet.config.SERVER_LEARNING_RATES``), else Flower's own for that class."""
    opt = profile.server
    if opt.optimizer == "none":
        return {}
    if opt.optimizer == "fedavgm":
        lr, args = "server_learning_rate", {"server_momentum": opt.momentum}
    else:
        # eta_l, the sites' learning rate, is only shown in Flower's summary: the sites' own Adam uses theirs.
        lr, args = "eta", {"eta_l": profile.train.learning_rate, "tau": opt.tau}
        if opt.optimizer != "fedadagrad":  # FedAdagrad has no moment decays (Flower fixes beta_1 = beta_2 = 0)
            args.update(beta_1=opt.beta_1, beta_2=opt.beta_2)
    from braintumnet.config import SERVER_LEARNING_RATES

    default = SERVER_LEARNING_RATES.get(opt.optimizer,
                                        inspect.signature(FLOWER_OPTIMIZERS[opt.optimizer]).parameters[lr].default)
    return {lr: opt.learning_rate if opt.learning_rate > 0 else default, **args}


def server_optimizer_params(profile) -> dict[str, Any]:
    """``name`` (``strategy.server-optimizer``) and the hyperparameters its server step uses, Flower's defaults filled
    in (for logs, ``metrics.json`` and MLflow)."""
    args = server_optimizer_arguments(profile)
    args.pop("eta_l", None)
    return {"name": profile.server.optimizer, **args}


def _check_flower_internals(strategy: FedAvg, name: str) -> None:
    """Refuse a Flower whose server-optimizer attributes this module has not been checked against."""
    attributes = [a for a, _ in FLOWER_STATE[name]] + list(FLOWER_INTERNALS)
    missing = [a for a in attributes if not hasattr(strategy, a)]
    if FLWR_VERSION.split(".")[:2] != FLOWER_CHECKED.split(".") or missing:
        raise FederationError(
            f"strategy.server-optimizer={name}: the centre checkpoints and resumes the state of Flower's "
            f"{FLOWER_OPTIMIZERS[name].__name__} through attributes checked with flwr {FLOWER_CHECKED} "
            f"({', '.join(attributes)}); flwr {FLWR_VERSION} is installed"
            + (f" and lacks {', '.join(missing)}" if missing else "")
            + f". Install flwr {FLOWER_CHECKED}.x (pyproject.toml pins it), or use strategy.server-optimizer=none")


class _UnderServerOptimizer(SiteAwareFedAvg):
    """SiteAwareFedAvg as the base a Flower server optimizer builds on.

    FedOpt's and FedAvgM's ``__init__`` end with ``super().__init__(<FedAvg's arguments>)``; in the composed MRO that
    call lands here and goes on to FedAvg's. SiteAwareFedAvg's own arguments are taken by ``_ServerOptimizer``.
    """

    def __init__(self, **fedavg_kwargs):
        FedAvg.__init__(self, **fedavg_kwargs)


class _ServerOptimizer:
    """The top of a composed strategy, e.g. ``SiteAwareFedAdam(_ServerOptimizer, FedAdam, _UnderServerOptimizer)``
    with the MRO _ServerOptimizer -> FedAdam -> FedOpt -> _UnderServerOptimizer -> SiteAwareFedAvg -> FedAvg:

    - ``configure_train``: Flower's first (FedOpt records the global model it steps from), then SiteAwareFedAvg's
      (sampling, messages).
    - ``aggregate_train``: SiteAwareFedAvg's screened, norm-bounded, robust aggregate; Flower's server step on it; then
      here, integer buffers take the aggregate's value and every array gets its initial dtype back.
    - Flower's state arrays are read for each round's checkpoint and restored on resume (``FLOWER_STATE``).
    """

    optimizer_name = ""  # the strategy.server-optimizer value

    def __init__(self, **site):
        profile = site["profile"]
        if profile.server.optimizer != self.optimizer_name:
            raise ValueError(f"{type(self).__name__} runs strategy.server-optimizer={self.optimizer_name}, the profile "
                             f"asks for {profile.server.optimizer}: build the strategy with make_strategy()")
        super().__init__(**fedavg_arguments(profile), **server_optimizer_arguments(profile))
        _check_flower_internals(self, self.optimizer_name)
        self._init_site(**site)
        self._restore: dict[str, np.ndarray] | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs):
        if self._restore is not None:
            self._set_state(self._restore, initial_arrays)
            self._restore = None
        return super().start(grid, initial_arrays, *args, **kwargs)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        # FedAdam's bias correction counts rounds: count the federation's, so a resumed run steps like an unbroken one.
        arrays, metrics = super().aggregate_train(self.round_offset + server_round, replies)
        if arrays is None:
            return arrays, metrics
        # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights: no server step moves them.
        kept = {k for k, dtype in self._dtypes.items() if dtype.kind != "f"}
        stepped = ArrayRecord({k: self._aggregate[k] if k in kept else a for k, a in arrays.items()})
        return _cast_like(stepped, self._dtypes), metrics

    def server_optimizer_state(self) -> dict[str, np.ndarray]:
        """Flower's state arrays as ``<attribute>/<model key>``; empty before the first server step."""
        out: dict[str, np.ndarray] = {}
        for attribute, container in FLOWER_STATE[self.optimizer_name]:
            value = getattr(self, attribute)
            if not value:
                continue
            if container is list:
                value = dict(zip(self._dtypes, value, strict=True))
            out.update({f"{attribute}/{k}": np.asarray(v) for k, v in value.items()})
        return out

    def restore_server_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a checkpoint's state (``server_optimizer_state`` of the round resumed); applied in ``start``,
        where it is checked against the model's keys and shapes."""
        self._restore = dict(state)

    def _set_state(self, state: Mapping[str, np.ndarray], model: ArrayRecord) -> None:
        for attribute, container in FLOWER_STATE[self.optimizer_name]:
            parts = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.split("/", 1)[0] == attribute}
            if not parts:
                continue  # saved before the first server step
            wrong = sorted(k for k in set(parts) | set(model)
                           if k not in parts or k not in model or parts[k].shape != tuple(model[k].shape))
            if wrong:
                raise FederationError(
                    f"the saved {self.optimizer_name} state does not fit the model ({attribute} differs at "
                    f"{wrong[:3]}): resume with the checkpoint's run config, or start without resume-from")
            setattr(self, attribute, [parts[k] for k in model] if container is list else {k: parts[k] for k in model})
        log.info("server optimizer %s: state restored (%s)", self.optimizer_name,
                 ", ".join(sorted({k.split("/", 1)[0] for k in state})) or "empty: no step yet")


class SiteAwareFedAvgM(_ServerOptimizer, FedAvgM, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedAvgM (server momentum) on the robust aggregate."""

    optimizer_name = "fedavgm"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # FedAvgM records the global model in its first round only, then keeps its own (uncast) step; the model sent
        # (integer buffers at the aggregate's value, initial dtypes; a checkpoint on resume) is the one to step from.
        self.current_arrays = None
        return super().configure_train(server_round, arrays, config, grid)


class SiteAwareFedAdam(_ServerOptimizer, FedAdam, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedAdam on the robust aggregate."""

    optimizer_name = "fedadam"


class SiteAwareFedYogi(_ServerOptimizer, FedYogi, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedYogi on the robust aggregate."""

    optimizer_name = "fedyogi"


class SiteAwareFedAdagrad(_ServerOptimizer, FedAdagrad, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedAdagrad on the robust aggregate."""

    optimizer_name = "fedadagrad"


STRATEGIES: dict[str, type[SiteAwareFedAvg]] = {"none": SiteAwareFedAvg, "fedavgm": SiteAwareFedAvgM,
                                                 "fedadam": SiteAwareFedAdam, "fedyogi": SiteAwareFedYogi,
                                                 "fedadagrad": SiteAwareFedAdagrad}


def make_strategy(profile, settings: ServerSettings, **kwargs) -> SiteAwareFedAvg:
    """The centre's strategy for ``strategy.server-optimizer``; ``kwargs`` are SiteAwareFedAvg's other arguments."""
    return STRATEGIES[profile.server.optimizer](profile=profile, settings=settings, **kwargs)


def _split_received(sites: dict[str, dict]) -> dict[str, dict]:
    """Move the ``received_*`` metrics out of each site's train metrics; returns them per site, unprefixed."""
    out = {}
    for site, phases in sites.items():
        train = phases.get("train", {})
        received = {k.removeprefix(RECEIVED_PREFIX): train.pop(k) for k in list(train) if k.startswith(RECEIVED_PREFIX)}
        if received:
            out[site] = received
    return out


def _phase_metrics(prefix: str, aggregated: Mapping[str, float], per_site: Mapping[str, Mapping[str, float]]) -> dict:
    """MLflow keys of one phase of a round: ``<prefix>/<metric>`` and ``<site>/<prefix>/<metric>``."""
    out = {metric_key(prefix, k): v for k, v in aggregated.items()}
    for site, m in per_site.items():
        out.update({metric_key(site, prefix, k): v for k, v in m.items()})
    return out


def _evaluation_metrics(metrics: Mapping[str, float], per_site: Mapping[str, Mapping[str, float]]) -> dict:
    """MLflow keys of a round's evaluation, as ``_mlflow_metrics`` names them."""
    return {**_phase_metrics("eval", metrics, per_site), "round/sites_evaluate": len(per_site)}


def _budget_spent(msg: Message, expected: set[str] | None) -> bool:
    """A train reply of a site that refused to train (privacy budget spent), with the round's metric keys."""
    if len(msg.content.metric_records) != 1:
        return False
    metrics = next(iter(msg.content.metric_records.values()))
    return (expected is None or set(metrics) == expected) and metrics.get("dp_budget_spent") == 1


def _privacy(rec: dict) -> dict:
    """Every site's cumulative ε as it reported this round, the maximum, and the sites whose budget is spent."""
    epsilons = {site: p["train"]["dp_epsilon"] for site, p in rec["sites"].items()
                if "dp_epsilon" in p.get("train", {})}
    if not epsilons:
        return {}
    spent = sorted(site for site, p in rec["sites"].items() if p.get("train", {}).get("dp_budget_spent") == 1)
    return {"epsilon": epsilons, "epsilon_max": max(epsilons.values()), "budget_spent": spent}


def _cast_like(arrays: ArrayRecord, dtypes: Mapping[str, np.dtype]) -> ArrayRecord:
    """FedAvg's mean is float64 for integer buffers: give every array its initial dtype back, in the initial key order
    (FedAvgM pairs the global model's arrays with the aggregate's by position)."""
    out = {}
    for key in [k for k in dtypes if k in arrays] + [k for k in arrays if k not in dtypes]:
        values = arrays[key].numpy()
        dtype = dtypes.get(key, values.dtype)
        if dtype.kind in "iu" and values.dtype.kind == "f":
            values = np.rint(values)
        out[key] = Array(np.asarray(values, dtype=dtype))  # asarray: ufuncs turn 0-d arrays into scalars
    return ArrayRecord(out)


def _overhead(rec: dict) -> dict:
    """Round wall time against the slowest site's own train + evaluate time (the ClientApps' ``seconds``)."""
    per_site = [sum(v.get("seconds", 0.0) for v in phases.values()) for phases in rec["sites"].values()]
    if not per_site or max(per_site) <= 0:
        return {}
    slowest = max(per_site)
    return {"slowest_site_s": slowest, "overhead": rec["wall_s"] / slowest}


def _bytes_per_site(rec: dict) -> dict:
    """Model bytes each site received (train + evaluate instructions) and sent (its train reply), per site."""
    b = rec.get("bytes", {})
    sites = set().union(*(b.get(d, {}) for d in ("down_train", "up_train", "down_evaluate", "up_evaluate")))
    return {site: {"down": b.get("down_train", {}).get(site, 0) + b.get("down_evaluate", {}).get(site, 0),
                   "up": b.get("up_train", {}).get(site, 0) + b.get("up_evaluate", {}).get(site, 0)}
            for site in sorted(sites)}


def _public(rec: dict) -> dict:
    """A round as metrics.json stores it (no arrays)."""
    return {
        "round": rec["round"],
        "skipped": rec.get("skipped", False),
        "train": rec.get("train", {}),
        "evaluate": rec.get("evaluate", {}),
        "external": rec.get("external", {}),
        "sites": rec["sites"],
        "seconds": {k: rec[k] for k in ("wall_s", "train_s", "evaluate_s", "external_s", "slowest_site_s")
                    if k in rec},
        "overhead": rec.get("overhead"),
        "bytes_per_site": _bytes_per_site(rec),
        "rejected": rec.get("rejected", {}),
        "privacy": _privacy(rec),
    }


def _mlflow_metrics(rec: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for phase, prefix in (("train", "train"), ("evaluate", "eval")):
        out.update(_phase_metrics(prefix, rec.get(phase, {}),
                                  {site: phases[phase] for site, phases in rec["sites"].items() if phase in phases}))
    out.update({metric_key("external", k): v for k, v in (rec.get("external") or {}).items()})
    out.update({metric_key("round", k): rec[k] for k in ("wall_s", "train_s", "evaluate_s", "slowest_site_s",
                                                          "overhead") if k in rec})
    out["round/sites_train"] = sum("train" in p for p in rec["sites"].values())
    out["round/sites_evaluate"] = sum("evaluate" in p for p in rec["sites"].values())
    out["round/skipped"] = float(rec.get("skipped", False))
    out["round/rejected_train"] = len(rec.get("rejected", {}).get("train", {}))
    privacy = _privacy(rec)
    if privacy:
        out["privacy/epsilon_max"] = privacy["epsilon_max"]
        out["privacy/sites_budget_spent"] = len(privacy["budget_spent"])
    per_site = _bytes_per_site(rec)
    if per_site:
        out["round/bytes_down_site_max"] = max(v["down"] for v in per_site.values())
        out["round/bytes_up_site_max"] = max(v["up"] for v in per_site.values())
    return out
