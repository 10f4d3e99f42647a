"""The hospital's ClientApp: train and evaluate BrainTumNet on the site's prepared cache.

Flower starts a fresh process for every message, so each handler opens the memory-mapped cache (prepared beforehand
by ``python client/run.py``) and rebuilds the model from the received arrays. Replies carry exactly what FedAvg
needs and nothing patient-level:

- ``arrays``: the model's state dict (train replies only);
- ``metrics``: aggregate numbers with the same keys at every site, ``num-examples`` = training **slices** (train)
  or test **cases** (evaluate), which FedAvg weights by. A train message with ``evaluate-received`` also gets the
  received global model's evaluation metrics, prefixed ``received_`` (scored before training). With ``dp.enabled`` a train reply adds ``dp_epsilon``
  (the site's cumulative ε) and ``dp_budget_spent`` (1 when the site refused to train: then no arrays and
  ``num-examples`` 0; the centre leaves it out of the aggregation and the site still evaluates), and its losses are
  NaN: a training loss is not covered by DP-SGD's guarantee, so it stays in the site's log;
- ``site``: a ConfigRecord with the site's name only, so the centre can log per-site metrics when node names are not
  registered (no TLS / node authentication, simulation).

An exception (say, a case that turns out corrupt) is logged here in full and becomes an error reply that names the
site and the exception type only; the full message can name cases or files and stays at the site.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from braintumnet.logs import setup_logging
from braintumnet.errors import BrainTumNetError
from client.sites import SiteRuntime, open_site, site_from_context

log = logging.getLogger("braintumnet.client")
app = ClientApp()

# Evaluation metrics every site sends, always all of them (Flower aborts the round on differing keys).
EVAL_KEYS = ("dice_tumor", "iou_tumor", "hd95_tumor_mm", "hd_tumor_mm", "dice_edema", "dice_whole", "acc",
             "sensitivity", "specificity", "f1", "auc", "miss_rate_tumor", "n_cases")
TRAIN_KEYS = ("train_loss", "train_loss_seg", "train_loss_cls")
DP_KEYS = ("dp_epsilon", "dp_budget_spent")  # train replies, only when dp.enabled (every site shares the run config)
# A train message with ``evaluate-received`` asks the site to score the global model it received (the previous
# round's) before training: the reply carries those metrics under this prefix, so a round needs one model download
# per site instead of two (docs/federation.md, "evaluate-in-train").
RECEIVED_PREFIX = "received_"
RECEIVED_KEYS = tuple(RECEIVED_PREFIX + k for k in EVAL_KEYS + ("num-examples",))
# Every key a reply's MetricRecord may hold; the message audit (tests/privacy) allows nothing else.
REPLY_METRIC_KEYS = frozenset(TRAIN_KEYS + DP_KEYS + EVAL_KEYS + RECEIVED_KEYS + ("num-examples", "seconds"))


class SiteFailure(RuntimeError):
    """What the centre sees of a failed message: the site, the phase and the exception type, nothing else."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = _site(context)
    return _guarded(site, "train", lambda: _train(msg, context, site))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = _site(context)
    return _guarded(site, "evaluate", lambda: _evaluate(msg, context, site))


def _train(msg: Message, context: Context, site: SiteRuntime) -> Message:
    from braintumnet.config import resolve
    from braintumnet.engine import pick_device, train_model
    from braintumnet.privacy import PrivacyBudgetSpent

    start = time.perf_counter()
    profile = resolve(context.run_config)
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    total_rounds = int(cfg.get("total-rounds", server_round))
    epochs = profile.federation.local_epochs
    device = pick_device(site.device)
    prepared = open_site(site, profile.data)
    model = _model(msg, profile).to(device)  # before the optimizer, so a restored Adam state lands on the device
    anchor = ({k: v.detach().clone() for k, v in model.state_dict().items()}
              if profile.train.fedprox_mu > 0 else None)
    ledger, dp = _privacy(profile, site, cfg, context)
    memory, optimizer = _optimizer(profile, site, cfg, context, model)
    case_ids = _cross_validation_cases(prepared, profile, site)
    received = {}
    if cfg.get("evaluate-received"):  # the previous round's global model, before this round changes it
        received = {RECEIVED_PREFIX + k: v for k, v in _evaluation(model, prepared, profile, device, site,
                                                                    server_round - 1).items()}
    log.info("site %s: round %d, training %d epoch(s) on %s (FedProx mu=%g%s)", site.name, server_round, epochs,
             device, profile.train.fedprox_mu, f", DP-SGD, epsilon so far {dp.epsilon:.3f}" if dp else "")
    try:
        stats = train_model(model, [prepared], profile, device, epochs=epochs,
                            epoch_offset=(server_round - 1) * epochs, total_epochs=total_rounds * epochs,
                            proximal_to=anchor, case_ids=case_ids, progress=False, privacy=dp,
                            optimizer=optimizer)
    except PrivacyBudgetSpent as spent:
        # Not an error: the site has done its share. One clear line here; the centre logs it by site name.
        log.warning("site %s: round %d not trained: %s", site.name, server_round, spent)
        metrics = {**{k: math.nan for k in TRAIN_KEYS}, "num-examples": 0, "dp_epsilon": spent.spent,
                   "dp_budget_spent": 1, **received, "seconds": time.perf_counter() - start}
        return _reply(msg, site, metrics)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if memory is not None and server_round < total_rounds:
        memory.save(optimizer)
    elif memory is not None:
        memory.forget()  # the last round: nothing continues from it
    metrics = {k: _finite(stats[k]) for k in TRAIN_KEYS}
    metrics["num-examples"] = int(stats["num-examples"])
    loss = metrics["train_loss"]
    if dp is not None:
        spent = dp.epsilon
        ledger.save(dp.history, spent, profile.privacy.delta, server_round)
        # The losses are plain means over the training slices, outside DP-SGD's guarantee: they stay here.
        metrics.update({**{k: math.nan for k in TRAIN_KEYS}, "dp_epsilon": spent, "dp_budget_spent": 0})
        log.info("site %s: round %d: DP-SGD with sigma %.3f, sample rate %.4f; epsilon now %.3f at delta %g "
                 "(budget %g); ledger %s", site.name, server_round, dp.noise_multiplier, dp.sample_rate, spent,
                 profile.privacy.delta, profile.privacy.budget, ledger.path)
    metrics.update(received)
    metrics["seconds"] = time.perf_counter() - start
    log.info("site %s: round %d trained on %d slices in %.1f s, loss %.4f", site.name, server_round,
             metrics["num-examples"], metrics["seconds"], loss)
    return _reply(msg, site, metrics, ArrayRecord(state))


def _cross_validation_cases(prepared, profile, site: SiteRuntime) -> list[str] | None:
    """With ``cv.folds`` = k, the site's training cases minus its own fold ``cv.fold``: every site derives its folds
    from its own cache and the seed, so no case id ever crosses the network (None = every training case)."""
    train = profile.train
    if not train.cv_folds:
        return None
    from braintumnet.data.contract import class_names
    from braintumnet.data.folds import training_cases_without_fold

    cases = training_cases_without_fold(prepared, class_names(profile.data.task), train.cv_folds, train.cv_fold - 1,
                                        train.seed)
    log.info("site %s: cross-validation fold %d/%d held out; training on %d cases", site.name, train.cv_fold,
             train.cv_folds, len(cases))
    return cases


def _privacy(profile, site: SiteRuntime, cfg, context: Context):
    """The site's privacy ledger for this federation and its DP-SGD state, or (None, None) without DP.

    The ledger is keyed by the federation id the centre sends (it survives ``resume-from``); a centre that sends
    none gets a ledger per Flower run.
    """
    if not profile.privacy.enabled:
        return None, None
    from braintumnet.privacy import PrivacyLedger, PrivateTraining

    ledger = PrivacyLedger(site.cache, site.name, _federation_id(cfg, context))
    return ledger, PrivateTraining(profile.privacy, ledger.load())


def _optimizer(profile, site: SiteRuntime, cfg, context: Context, model):
    """The site's Adam, continued from its previous round of this federation (``train.keep-optimizer-state``):
    ``(memory, optimizer)``, or ``(None, None)`` for a fresh Adam every round."""
    if not profile.train.keep_optimizer_state:
        return None, None
    from braintumnet.optimizer_state import OptimizerMemory, make_optimizer

    memory = OptimizerMemory(site.cache, site.name, _federation_id(cfg, context))
    optimizer = make_optimizer(model, profile.train.learning_rate)
    if memory.restore(optimizer):
        log.info("site %s: Adam continues from this site's previous round (%s)", site.name, memory.path)
    return memory, optimizer


def _federation_id(cfg, context: Context) -> str:
    """Keys what a site keeps between rounds; a centre that sends no federation id gets one per Flower run."""
    return str(cfg.get("federation-id", "") or f"run-{context.run_id}")


def _evaluate(msg: Message, context: Context, site: SiteRuntime) -> Message:
    from braintumnet.config import resolve
    from braintumnet.engine import pick_device

    start = time.perf_counter()
    profile = resolve(context.run_config)
    prepared = open_site(site, profile.data)
    metrics = _evaluation(_model(msg, profile), prepared, profile, pick_device(site.device), site,
                          msg.content["config"].get("server-round"))
    metrics["seconds"] = time.perf_counter() - start
    return _reply(msg, site, metrics)


def _evaluation(model, prepared, profile, device, site: SiteRuntime, server_round) -> dict[str, Any]:
    """The model on the site's test split: every key of EVAL_KEYS and ``num-examples`` (test cases)."""
    from braintumnet.engine import evaluate_model

    start = time.perf_counter()
    found = evaluate_model(model, [prepared], "test", profile, device, progress=False)
    # Keys fixed and always present; an undefined value (e.g. AUC with one class in the test split) stays NaN and
    # the centre averages each metric over the sites where it is defined (server.strategy.nan_weighted_mean).
    metrics: dict[str, Any] = {k: float(found.get(k, math.nan)) for k in EVAL_KEYS}
    metrics["num-examples"] = int(found["num-examples"])
    log.info("site %s: round %s's global model evaluated on %d test cases in %.1f s: dice_tumor %.4f, acc %.4f",
             site.name, server_round, metrics["num-examples"], time.perf_counter() - start, metrics["dice_tumor"],
             metrics["acc"])
    return metrics


def _model(msg: Message, profile):
    from braintumnet.data.contract import class_names
    from braintumnet.engine import build_model

    model = build_model(profile, len(class_names(profile.data.task)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return model


def _reply(msg: Message, site: SiteRuntime, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)


def _finite(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"training diverged (loss {value}); lower train.learning-rate")
    return value


def _site(context: Context) -> SiteRuntime:
    setup_logging()
    return site_from_context(context.node_config, context.run_config)


def _guarded(site: SiteRuntime, phase: str, fn: Callable[[], Message]) -> Message:
    try:
        return fn()
    except Exception as exc:  # every failure becomes an error reply; the full story stays in this site's log
        log.exception("site %s: %s failed", site.name, phase)
        kind = "a data or settings problem, " if isinstance(exc, BrainTumNetError) else ""
        raise SiteFailure(f"site {site.name}: {phase} failed with {type(exc).__name__} ({kind}details in the "
                          "site's own log, which may name cases and files)") from None


