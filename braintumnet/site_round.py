"""A site's part of a federated round, without Flower: train on the received global model, or evaluate it.

The ClientApp (``client/app.py``) unpacks a message, calls :func:`train_round` or :func:`evaluate_round` and packs
what they return; the names of the reply's metrics are those of :mod:`braintumnet.protocol`. Everything a site
keeps between rounds stays in its cache, keyed by the federation id: the privacy ledger (``dp.enabled``) and Adam's
state (``train.keep-optimizer-state``).

A train round's metrics: the losses (:data:`~braintumnet.protocol.TRAIN_KEYS`) and ``num-examples`` = training
**slices**, which FedAvg weights by; with ``evaluate_received``, the received model's evaluation scored before
training, under :data:`~braintumnet.protocol.RECEIVED_PREFIX`; with DP, ``dp_epsilon`` (the site's cumulative ε)
and ``dp_budget_spent`` (1 when the site refused to train: then no state dict and ``num-examples`` 0), and the losses
are NaN: a training loss is not covered by DP-SGD's guarantee, so it stays in the site's log. An evaluate round's
metrics: every key of :data:`~braintumnet.protocol.EVAL_KEYS` and ``num-examples`` = test **cases**.

Nothing here imports ``flwr``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Mapping

import torch
from torch import nn

from braintumnet.checkpoint import model_with_weights
from braintumnet.config import Profile
from braintumnet.data.contract import class_names
from braintumnet.data.folds import training_cases_without_fold
from braintumnet.data.loading import SiteRuntime, open_site
from braintumnet.engine import pick_device, train_model
from braintumnet.optimizer_state import OptimizerMemory, make_optimizer
from braintumnet.privacy import PrivacyBudgetSpent, PrivacyLedger, PrivateTraining
from braintumnet.protocol import (DP_BUDGET_SPENT, DP_EPSILON, EVAL_KEYS, RECEIVED_PREFIX, SECONDS, TRAIN_KEYS,
                                  WEIGHT_KEY)
from braintumnet.scoring import evaluate_model

log = logging.getLogger("braintumnet.client")  # the site's own log, beside its ClientApp's lines

StateDict = Mapping[str, torch.Tensor]


def train_round(global_state: StateDict, profile: Profile, site: SiteRuntime, *, server_round: int,
                total_rounds: int, federation_id: str, evaluate_received: bool = False,
                ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Train the received global model on the site's training cases for ``federation.local-epochs`` epochs.

    Args:
        global_state: the global model's state dict, as received.
        server_round, total_rounds: this round (from 1) and the federation's rounds: where the local epochs sit in
            the cosine schedule, and whether Adam's state is kept for a next round.
        federation_id: keys the site's privacy ledger and Adam's state (it survives ``resume-from``).
        evaluate_received: score the received model (the previous round's) on the test split before training.

    Returns:
        ``(state, metrics)``: the trained state dict on the CPU, None when the privacy budget refused the round.

    Raises:
        BrainTumNetError: the site's data or the settings are unusable.
        FloatingPointError: training diverged.
    """
    start = time.perf_counter()
    epochs = profile.federation.local_epochs
    device = pick_device(site.device)
    prepared = open_site(site, profile.data)
    model = _global_model(global_state, profile).to(device)  # before the optimizer: a restored Adam lands there too
    anchor = ({k: v.detach().clone() for k, v in model.state_dict().items()}
              if profile.train.fedprox_mu > 0 else None)
    ledger, dp = _privacy(profile, site, federation_id)
    memory, optimizer = _optimizer(profile, site, federation_id, model)
    case_ids = cross_validation_cases(prepared, profile, site)
    received = {}
    if evaluate_received:  # the previous round's global model, before this round changes it
        received = {RECEIVED_PREFIX + k: v for k, v in _evaluation(model, prepared, profile, device, site,
                                                                    server_round - 1).items()}
    log.info("site %s: round %d, training %d epoch(s) on %s (FedProx mu=%g%s)", site.name, server_round, epochs,
             device, profile.train.fedprox_mu, f", DP-SGD, epsilon so far {dp.epsilon:.3f}" if dp else "")
    try:
        stats = train_model(model, [prepared], profile, device, epochs=epochs,
                            epoch_offset=(server_round - 1) * epochs, total_epochs=total_rounds * epochs,
                            proximal_to=anchor, case_ids=case_ids, progress=False, privacy=dp, optimizer=optimizer)
    except PrivacyBudgetSpent as spent:
        # Not an error: the site has done its share. One clear line here; the centre logs it by site name.
        log.warning("site %s: round %d not trained: %s", site.name, server_round, spent)
        return None, {**{k: math.nan for k in TRAIN_KEYS}, WEIGHT_KEY: 0, DP_EPSILON: spent.spent,
                      DP_BUDGET_SPENT: 1, **received, SECONDS: time.perf_counter() - start}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if memory is not None and server_round < total_rounds:
        memory.save(optimizer)
    elif memory is not None:
        memory.forget()  # the last round: nothing continues from it
    metrics = {k: _finite(stats[k]) for k in TRAIN_KEYS}
    metrics[WEIGHT_KEY] = int(stats[WEIGHT_KEY])
    loss = metrics["train_loss"]
    if dp is not None:
        metrics.update(_spend(dp, ledger, profile, site, server_round))
    metrics.update(received)
    metrics[SECONDS] = time.perf_counter() - start
    log.info("site %s: round %d trained on %d slices in %.1f s, loss %.4f", site.name, server_round,
             metrics[WEIGHT_KEY], metrics[SECONDS], loss)
    return state, metrics


def evaluate_round(global_state: StateDict, profile: Profile, site: SiteRuntime, *,
                   server_round: int | None) -> dict[str, Any]:
    """The received global model on the site's test split: every key of EVAL_KEYS, ``num-examples`` (test cases)
    and ``seconds``."""
    start = time.perf_counter()
    prepared = open_site(site, profile.data)
    metrics = _evaluation(_global_model(global_state, profile), prepared, profile, pick_device(site.device), site,
                          server_round)
    metrics[SECONDS] = time.perf_counter() - start
    return metrics


def cross_validation_cases(prepared, profile: Profile, site: SiteRuntime) -> list[str] | None:
    """With ``cv.folds`` = k, the site's training cases minus its own fold ``cv.fold``: every site derives its folds
    from its own cache and the seed, so no case id ever crosses the network (None = every training case)."""
    train = profile.train
    if not train.cv_folds:
        return None
    cases = training_cases_without_fold(prepared, class_names(profile.data.task), train.cv_folds, train.cv_fold - 1,
                                        train.seed)
    log.info("site %s: cross-validation fold %d/%d held out; training on %d cases", site.name, train.cv_fold,
             train.cv_folds, len(cases))
    return cases


def _privacy(profile: Profile, site: SiteRuntime, federation_id: str):
    """The site's privacy ledger for this federation and its DP-SGD state, or (None, None) without DP."""
    if not profile.privacy.enabled:
        return None, None
    ledger = PrivacyLedger(site.cache, site.name, federation_id)
    return ledger, PrivateTraining(profile.privacy, ledger.load())


def _spend(dp: PrivateTraining, ledger: PrivacyLedger, profile: Profile, site: SiteRuntime,
           server_round: int) -> dict[str, float]:
    """Record the trained round's ε in the ledger; the reply's DP metrics, with the losses masked."""
    spent = dp.epsilon
    ledger.save(dp.history, spent, profile.privacy.delta, server_round)
    log.info("site %s: round %d: DP-SGD with sigma %.3f, sample rate %.4f; epsilon now %.3f at delta %g "
             "(budget %g); ledger %s", site.name, server_round, dp.noise_multiplier, dp.sample_rate, spent,
             profile.privacy.delta, profile.privacy.budget, ledger.path)
    # The losses are plain means over the training slices, outside DP-SGD's guarantee: they stay here.
    return {**{k: math.nan for k in TRAIN_KEYS}, DP_EPSILON: spent, DP_BUDGET_SPENT: 0}


def _optimizer(profile: Profile, site: SiteRuntime, federation_id: str, model: nn.Module):
    """The site's Adam, continued from its previous round of this federation (``train.keep-optimizer-state``):
    ``(memory, optimizer)``, or ``(None, None)`` for a fresh Adam every round."""
    if not profile.train.keep_optimizer_state:
        return None, None
    memory = OptimizerMemory(site.cache, site.name, federation_id)
    optimizer = make_optimizer(model, profile.train.learning_rate)
    if memory.restore(optimizer):
        log.info("site %s: Adam continues from this site's previous round (%s)", site.name, memory.path)
    return memory, optimizer


def _evaluation(model: nn.Module, prepared, profile: Profile, device: torch.device, site: SiteRuntime,
                server_round) -> dict[str, Any]:
    """The model on the site's test split: every key of EVAL_KEYS and ``num-examples`` (test cases)."""
    start = time.perf_counter()
    found = evaluate_model(model, [prepared], "test", profile, device, progress=False)
    # Keys fixed and always present; an undefined value (e.g. AUC with one class in the test split) stays NaN and
    # the centre averages each metric over the sites where it is defined.
    metrics: dict[str, Any] = {k: float(found.get(k, math.nan)) for k in EVAL_KEYS}
    metrics[WEIGHT_KEY] = int(found[WEIGHT_KEY])
    log.info("site %s: round %s's global model evaluated on %d test cases in %.1f s: dice_tumor %.4f, acc %.4f",
             site.name, server_round, metrics[WEIGHT_KEY], time.perf_counter() - start, metrics["dice_tumor"],
             metrics["acc"])
    return metrics


def _global_model(state: StateDict, profile: Profile) -> nn.Module:
    return model_with_weights(profile, state, class_names(profile.data.task), source="the global model received")


def _finite(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"training diverged (loss {value}); lower train.learning-rate")
    return value
