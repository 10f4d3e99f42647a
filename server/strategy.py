"""FedAvg for BrainTumNet-FL: Flower's FedAvg, plus what a federation of hospitals needs.

:class:`SiteAwareFedAvg` coordinates; each part is a module of its own:

- **Sites** (``server/sites.py``): every reply is attributed to a site by name; sampling waits for enough sites,
  bounded and loudly.
- **Transport** (``server/transport.py``): replies polled as often as the phase deserves, reads retried while the
  SuperLink is busy, bytes and timings recorded per exchange; with ``audit-messages = true`` every message is
  described in ``audit.jsonl`` (``server/audit.py``).
- **Screening** (``server/screening.py``): every reply is held by its node id; bad replies are logged with the site's
  name and left out, not fatal, and so are all replies of a site name that several nodes claim; a site whose privacy
  budget is spent is left out of the aggregation (it still evaluates); each parameter group of an update above its
  bound (``robust.norm-factor`` x the group's median norm, carried from earlier rounds below three replies) is clipped
  onto it; with three or more train replies no site's weight may exceed ``robust.max-weight-share`` of the total (a
  larger ``num-examples`` is clipped).
- **Aggregation** (``strategy.aggregation``, ``server/robust.py``, ``server/aggregation.py``): FedAvg's weighted mean,
  or a coordinate-wise median or trimmed mean; metrics averaged where defined; integer buffers keep their dtype.
- **Server optimizer** (``strategy.server-optimizer``, ``server/optimizers.py``): Flower's FedAvgM, FedAdam, FedYogi or
  FedAdagrad composed on top of this class, stepping from the screened, robust aggregate.
- **Rounds** (``server/rounds.py``): each round's record; the finished rounds' checkpoints (``best`` by the federated
  ``dice_tumor``), ``metrics.json`` and MLflow metrics.

Here: the phases in Flower's order, and

- **Dropout.** A round counts when at least ``min-train-nodes`` sites replied; otherwise the global model stays as
  it was and the log says so. A site that comes back is sampled again next round.
- **Refusal.** A robust rule that cannot work with the replies it has (``server.robust.rule_shortfall``) is not
  applied: the global model stays as it was, and the round records why (``refused``).
- **Rounds continue across resumes**: ``round_offset`` shifts every round number the sites, logs, checkpoints and
  MLflow see.
- **Evaluate-in-train** (``evaluate-in-train``): the sites score the model they receive before training, so round r's
  federated metrics arrive with round r+1's train replies and are filed under round r.
- **Roles.** Before a node is sent any model, a query message asks it for its site name and role (metadata only;
  once per node, again next round if it did not answer). Train messages go to ``training`` nodes only; a node that
  has not answered is not sampled. ``evaluate-only`` nodes (the external hospital, its role set in its own node
  config) receive an evaluate message every round, evaluate-in-train or not, and their scores are the round's
  ``external`` entry; they never count towards the federated evaluation, ``min-*-nodes`` or ``best``.
- **End of round** (``end_of_round``, Flower's ``evaluate_fn`` hook): the centre's evaluation on a public benchmark
  set (``external-data``, filed as ``benchmark``), then the round goes into the book.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from braintumnet.protocol import (EVALUATE_ONLY, EVALUATE_RECEIVED, FEDERATION_ID, METRICS, RECEIVED_PREFIX,
                                  SERVER_ROUND, TOTAL_ROUNDS, TRAINING, WEIGHT_KEY)
from server.aggregation import cast_like, fedavg_arguments
from server.audit import describe_screening
from server.checkpoints import RunFolder
from server.robust import NormReference, aggregate, rule_shortfall
from server.rounds import BEST_METRIC, RoundBook, RoundRecord
from server.screening import bound_updates, cap_weights, screen_replies
from server.settings import ServerSettings, server_optimizer_params
from server.sites import SiteNames, SiteRoles, sample_nodes, split_exchange
from server.tracking import Tracker
from server.transport import Exchange, RecordingGrid, retry_busy

log = logging.getLogger("braintumnet.server")

# How long a role query may take: a ClientApp's start and a reply from its node config, no data touched.
QUERY_TIMEOUT_S = 120.0


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
        external_eval: ``fn(state_dict) -> metrics`` on the centre's public benchmark set, or None.
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
        self.profile, self.settings = profile, settings
        self.robust = profile.robust
        self.round_offset = round_offset
        self.total_rounds = profile.federation.num_rounds
        self.external_eval = external_eval
        self.meta = dict(meta or {})
        # a resumed run starts from the names its checkpoint knew (node ids survive restarts)
        self.names = SiteNames(self.meta.pop("site-nodes", {}))
        self.book = RoundBook(folder=folder, tracker=tracker, profile=profile, class_names=tuple(class_names),
                              meta=self.meta, best_value=best_value)
        self._grid: RecordingGrid | None = None
        self._sent_arrays: ArrayRecord | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self._round: RoundRecord | None = None  # the round under way
        self._aggregate: ArrayRecord | None = None  # the round's screened, robust aggregate (before a server step)
        self._norms = NormReference()  # the update-norm bound's reference, carried for rounds with 1-2 replies
        self.arrays: ArrayRecord | None = None  # the global model after the last finished round
        self.roles = SiteRoles(self.names)  # node id -> the role it answered the role query with
        self._external_nodes: set[int] = set()  # the evaluate-only nodes sent this round's evaluate message
        self._timeout = QUERY_TIMEOUT_S

    @property
    def folder(self) -> RunFolder:
        return self.book.folder

    @property
    def best_value(self) -> float | None:
        """The best federated ``dice_tumor`` so far, or None."""
        return self.book.best_value

    @property
    def history(self) -> list[dict]:
        """The finished rounds as ``metrics.json`` lists them."""
        return self.book.history

    # ---- Flower entry point -------------------------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None):
        self._grid = RecordingGrid(grid, self.folder.append_audit if self.settings.audit_messages else None)
        self._dtypes = {k: a.numpy().dtype for k, a in initial_arrays.items()}
        self._timeout = timeout
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
                 f"{r.norm_factor:g} x the median per parameter group (of 3+ replies, else carried from earlier "
                 "rounds), larger updates clipped" if r.norm_factor > 0 else "off",
                 "on" if dp.enabled else "off", f", budget epsilon {dp.budget:g} at delta {dp.delta:g}"
                 if dp.enabled else "")
        params = self.server_optimizer_params()
        log.info("server optimizer %s%s", params.pop("name"),
                 f" ({', '.join(f'{k} {v:g}' for k, v in params.items())}) on the aggregate; its state is "
                 "checkpointed each round" if params else " (FedAvg: the aggregate is the new global model)")
        if self.settings.audit_messages:
            log.info("message audit on: %s", self.folder.audit_path)
        training = self.settings.training_sites
        shortfall = rule_shortfall(r.aggregation, len(training), r.trim_fraction)
        if shortfall and self.fraction_train > 0:
            log.warning("with the %d expected training sites (%s): %s; such a round's aggregate is refused and the "
                        "global model stays as it was", len(training), ", ".join(training), shortfall)
        if self.settings.evaluate_only:
            log.info("evaluate-only sites expected (their scores are the rounds' external entry): %s",
                     ", ".join(self.settings.evaluate_only))

    # ---- train ---------------------------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        g = self.round_offset + server_round
        self._round = RoundRecord(round=g, started=time.monotonic())
        self._sent_arrays = arrays
        self.roles.new_round()
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes, "train", g)
        config[SERVER_ROUND] = g
        config[TOTAL_ROUNDS] = self.total_rounds
        if self.meta.get("federation-id"):
            config[FEDERATION_ID] = str(self.meta["federation-id"])  # keys a site's privacy ledger (resume-proof)
        if self._evaluates_in_train() and self.book.rounds:  # score the global model of the round before, at each site
            config[EVALUATE_RECEIVED] = True
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        log.info("round %d/%d: training at %s", g, self.total_rounds, self.names.names_of(nodes))
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self.fraction_train == 0.0:
            return None, None
        rec, exchange = self._round, self._exchange()
        screened = screen_replies(list(replies), exchange, "train", self._sent_arrays, names=self.names, record=rec,
                                  dp_budget=self.profile.privacy.budget)
        valid = bound_updates(screened, self._sent_arrays, self.robust.norm_factor, self._norms, rec)
        self._previous_round_evaluated(rec.split_received())
        rec.train_s = exchange.seconds
        rec.bytes = {"down_train": self._by_site(exchange.bytes_out), "up_train": self._by_site(exchange.bytes_in)}
        if len(valid) < max(self.min_train_nodes, 1):
            log.warning("round %d: %d site(s) replied to train, fewer than min-train-nodes=%d; the global model "
                        "stays as it was this round", rec.round, len(valid), self.min_train_nodes)
            rec.skipped = True
            self._audit_screening("train")
            return None, None
        refused = rule_shortfall(self.robust.aggregation, len(valid), self.robust.trim_fraction)
        if refused:
            # Averaging instead would hand a bad update the very influence the robust rule was chosen to deny.
            log.warning("round %d: %s: the round's aggregate is refused, the global model stays as it was",
                        rec.round, refused)
            rec.skipped, rec.refused = True, refused
            self._audit_screening("train")
            return None, None
        contents = cap_weights(valid, self.robust.max_weight_share, rec)
        arrays = cast_like(aggregate(contents, self.robust.aggregation, self.weighted_by_key,
                                     self.robust.trim_fraction), self._dtypes)
        self._norms.accept(r.norms for r in valid)
        self._audit_screening("train")
        self._aggregate = ArrayRecord(dict(arrays.items()))  # a copy: Flower's FedAvgM clears the record it steps
        metrics = MetricRecord({k: v for k, v in self.train_metrics_aggr_fn(contents, self.weighted_by_key).items()
                                if not k.startswith(RECEIVED_PREFIX)})
        rec.train = dict(metrics)
        return arrays, metrics

    # ---- evaluate ------------------------------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        g = self.round_offset + server_round
        # The external hospital scores every round's model, whatever the federated evaluation does.
        external = self._connected_external(grid, g)
        self._external_nodes = set(external)
        nodes: list[int] = []
        if self.fraction_evaluate > 0.0:
            if self._evaluates_in_train() and g < self.total_rounds:
                self._round.evaluate_later = True  # with the next round's train replies
            else:
                nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate", g)
        if not nodes and not external:
            return []
        config[SERVER_ROUND] = g
        if self.meta.get("federation-id"):
            config[FEDERATION_ID] = str(self.meta["federation-id"])  # keys the sites' evaluation count
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if external:
            log.info("round %d: the evaluate-only site(s) %s score the global model", g, self.names.names_of(external))
        return self._construct_messages(record, nodes + external, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rec = self._round
        rec.ended = time.monotonic()
        replies, exchange = list(replies), self._exchange()
        if exchange.sent:
            rec.bytes.update({"down_evaluate": self._by_site(exchange.bytes_out),
                              "up_evaluate": self._by_site(exchange.bytes_in)})
        federated, external = split_exchange(replies, exchange, self._external_nodes)
        self._external_scores(*external)
        if self.fraction_evaluate == 0.0 or rec.evaluate_later:
            return None
        replies, exchange = federated
        valid = screen_replies(replies, exchange, "evaluate", None, names=self.names, record=rec,
                               dp_budget=self.profile.privacy.budget)
        rec.evaluate_s = exchange.seconds
        self._audit_screening("evaluate")
        if len(valid) < max(self.min_evaluate_nodes, 1):
            log.warning("round %d: %d site(s) replied to evaluate, fewer than min-evaluate-nodes=%d; no federated "
                        "metrics this round", rec.round, len(valid), self.min_evaluate_nodes)
            return None
        metrics = self.evaluate_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        rec.evaluate = dict(metrics)
        return metrics

    def _external_scores(self, replies: list[Message], exchange: Exchange) -> None:
        """The evaluate-only sites' scores of the round's global model: the round's ``external`` entry (their
        case-weighted mean), each site's under ``sites[NAME]["external"]``. A site that is down is logged, and the
        round goes on without its scores."""
        if not exchange.sent:
            return
        rec = self._round
        valid = screen_replies(replies, exchange, "external", None, names=self.names, record=rec,
                               dp_budget=self.profile.privacy.budget)
        self._audit_screening("external")
        rec.external_s = exchange.seconds
        if not valid:
            log.warning("round %d: no external scores this round (the evaluate-only site(s) %s did not reply)",
                        rec.round, self.names.names_of(exchange.sent.values()))
            return
        cases = sum(int(rec.sites[r.label]["external"][WEIGHT_KEY]) for r in valid)
        rec.external = {**self.evaluate_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key),
                        WEIGHT_KEY: cases}
        log.info("round %d: external site(s) %s: dice_tumor %.4f, acc %.4f (%d cases)", rec.round,
                 ", ".join(r.label for r in valid), rec.external.get("dice_tumor", math.nan),
                 rec.external.get("acc", math.nan), cases)

    # ---- end of round: the centre's benchmark evaluation, then the round goes into the book -----------------------

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: called with round 0 before training (nothing to do) and after every round."""
        if server_round == 0:
            return None
        rec = self._round
        rec.close(time.monotonic())
        self.arrays = arrays
        state = arrays.to_torch_state_dict()
        benchmark = None
        if self.external_eval is not None:
            t = time.monotonic()
            benchmark = self.external_eval(state)
            rec.benchmark = benchmark
            rec.benchmark_s = time.monotonic() - t
            log.info("round %d: the centre's benchmark set: dice_tumor %.4f, acc %.4f (%d cases)", rec.round,
                     benchmark.get("dice_tumor", math.nan), benchmark.get("acc", math.nan),
                     benchmark.get(WEIGHT_KEY, 0))
        path, best = self.book.record(rec, state, self.names.as_meta(), self.server_optimizer_state())
        log.info("round %d/%d done in %.1f s (sites' own time %.1f s, overhead x%.2f); checkpoint %s%s", rec.round,
                 self.total_rounds, rec.wall_s, _or_nan(rec.slowest_site_s), _or_nan(rec.overhead), path,
                 " (best so far)" if best else "")
        return MetricRecord({k: float(v) for k, v in benchmark.items()}) if benchmark else None

    def _previous_round_evaluated(self, per_site: dict[str, dict]) -> None:
        """The sites' scores of the global model they received this round: the previous round's federated metrics,
        which the book files where an evaluate phase would have put them."""
        if not per_site or not self.book.rounds or self._sent_arrays is None:
            return
        g = self.book.rounds[-1].round
        if len(per_site) < max(self.min_evaluate_nodes, 1):
            log.warning("round %d: %d site(s) scored it, fewer than min-evaluate-nodes=%d; no federated metrics for "
                        "round %d", g, len(per_site), self.min_evaluate_nodes, g)
            return
        records = [RecordDict({METRICS: MetricRecord(m)}) for m in per_site.values()]
        metrics = dict(self.evaluate_metrics_aggr_fn(records, self.weighted_by_key))
        # The model the sites scored is the one sent this round: the previous round's global model.
        best = self.book.score_last(metrics, per_site, self._sent_arrays.to_torch_state_dict(), self.names.as_meta())
        log.info("round %d (scored by the sites with round %d's training): dice_tumor %.4f, acc %.4f from %s%s", g,
                 self._round.round, metrics.get(BEST_METRIC, math.nan), metrics.get("acc", math.nan),
                 ", ".join(sorted(per_site)),
                 " (best so far)" if best else "")

    # ---- the server optimizer (none here; see server/optimizers.py) ------------------------------------------------

    def server_optimizer_params(self) -> dict[str, Any]:
        return server_optimizer_params(self.profile)

    def server_optimizer_state(self) -> dict[str, np.ndarray] | None:
        """The server optimizer's state to checkpoint with each round, or None when there is no server optimizer."""
        return None

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _evaluates_in_train(self) -> bool:
        return self.settings.evaluate_in_train and self.fraction_evaluate > 0.0

    def _by_site(self, per_node: dict[int, int]) -> dict[str, int]:
        """A per-node count under the names the round's entries use (two nodes claiming one site stay two)."""
        return {self._round.site_of(node, self.names.name(node)): v for node, v in per_node.items()}

    def _audit_screening(self, phase: str) -> None:
        """With the message audit on, the phase's screening decisions per node id follow its messages."""
        if self._grid is not None and self._grid.audit is not None:
            rec = self._round
            self._grid.audit([describe_screening(rec.round, phase, rec.outcomes.get(phase, {}),
                                                 rec.refused if phase == "train" else None)])

    def _exchange(self) -> Exchange:
        return self._grid.last if self._grid is not None else Exchange()

    def _sample(self, grid: Grid, fraction: float, min_nodes: int, phase: str, g: int) -> list[int]:
        """Training nodes only (known by their answer to the role query), sampled as FedAvg does."""
        def training(ids: list[int]) -> tuple[list[int], int]:
            self._learn_roles(ids, g)
            return self.roles.of_role(ids, TRAINING)

        return sample_nodes(grid, self.names, fraction=fraction, min_nodes=min_nodes,
                            min_available=self.min_available_nodes, wait_s=self.profile.federation.wait_for_nodes_s,
                            expected=self.settings.sites, phase=phase, server_round=g, eligible=training)

    def _connected_external(self, grid: Grid, g: int) -> list[int]:
        """The connected evaluate-only nodes (no waiting: the round never waits for the external hospital)."""
        ids = [n.node_id for n in retry_busy(lambda: list(grid.get_nodes()), "get nodes")]
        self._learn_roles(ids, g)
        return sorted(self.roles.of_role(ids, EVALUATE_ONLY)[0])

    def _learn_roles(self, ids: list[int], g: int) -> None:
        if self._grid is not None:
            record = RecordDict({self.configrecord_key: ConfigRecord({SERVER_ROUND: g})})
            self.roles.ask(self._grid, ids, g, lambda ask: self._construct_messages(record, ask, MessageType.QUERY),
                           timeout=min(self._timeout, QUERY_TIMEOUT_S))


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
