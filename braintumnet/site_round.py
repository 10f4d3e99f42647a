"""A site's part of a federated round, without Flower: train on the received global model, or evaluate it.

The ClientApp (``client/app.py``) unpacks a message, calls :func:`train_round` or :func:`evaluate_round` and packs
what they return; the names of the reply's metrics are those of :mod:`braintumnet.protocol`. Each round first checks
the run against the site's own policy (:mod:`braintumnet.site_policy`) and raises
:class:`~braintumnet.site_policy.PolicyRefusal` before any training or evaluation when the run breaks a rule. What a
site must never forget lives in its state directory: the privacy ledger (every federation's ε) and the count of
evaluations; Adam's state (``train.keep-optimizer-state``) stays in the cache, keyed by the federation id. The
state dicts here are plain: a model that travelled packed (:mod:`braintumnet.packing`) is unpacked and packed again
by the ClientApp.

A train round's metrics: the losses (:data:`~braintumnet.protocol.TRAIN_KEYS`) and ``num-examples`` = training
**slices**, which FedAvg weights by; with ``evaluate_received``, the received model's evaluation scored before
training, under :data:`~braintumnet.protocol.RECEIVED_PREFIX`, and the seconds that took
(:data:`~braintumnet.protocol.EVALUATE_SECONDS`); with DP, ``dp_epsilon`` (this federation's ε so far)
and ``dp_budget_spent`` (1 when the site refused to train: then no state dict and ``num-examples`` 0), and the losses
are NaN: a training loss is not covered by DP-SGD's guarantee, so it stays in the site's log. An evaluate round's
metrics: every key of :data:`~braintumnet.protocol.EVAL_KEYS` and ``num-examples`` = test **cases**.

Nothing here imports ``flwr``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from braintumnet.checkpoint import model_with_weights
from braintumnet.config import Profile, at_site
from braintumnet.data.contract import class_names
from braintumnet.data.folds import training_cases_without_fold
from braintumnet.data.loading import SiteRuntime, open_site
from braintumnet.engine import pick_device, train_model
from braintumnet.errors import BrainTumNetError
from braintumnet.optimizer_state import OptimizerMemory, make_optimizer
from braintumnet.privacy import EpsilonLimit, PrivacyBudgetSpent, PrivacyLedger, PrivateTraining, group_privacy
from braintumnet.protocol import (DP_BUDGET_SPENT, DP_EPSILON, EVAL_KEYS, EVALUATE_SECONDS, RECEIVED_PREFIX,
                                  SECONDS, TRAIN_KEYS, WEIGHT_KEY)
from braintumnet.scoring import evaluate_model
from braintumnet.site_policy import EvaluationLog, SitePolicy, check_data, check_training, rounded

log = logging.getLogger("braintumnet.client")  # the site's own log, beside its ClientApp's lines

StateDict = Mapping[str, torch.Tensor]


def train_round(global_state: StateDict, profile: Profile, site: SiteRuntime, *, server_round: int,
                total_rounds: int, federation_id: str, policy: SitePolicy, state_dir: Path, run_id: str = "",
                evaluate_received: bool = False) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Train the received global model on the site's training cases for ``federation.local-epochs`` epochs, in
    batches of ``train.site-batch-size``.

    Args:
        global_state: the global model's state dict, as received.
        server_round, total_rounds: this round (from 1) and the federation's rounds: where the local epochs sit in
            the cosine schedule, and whether Adam's state is kept for a next round.
        federation_id: keys the site's ledgers and Adam's state (it survives ``resume-from``).
        policy: the site's own rules, checked before anything else.
        state_dir: the site's state directory (its privacy ledger and evaluation count).
        run_id: the Flower run, for the ledger's lines.
        evaluate_received: score the received model (the previous round's) on the test split before training.

    Returns:
        ``(state, metrics)``: the trained state dict on the CPU, None when a privacy budget refused the round.

    Raises:
        PolicyRefusal: the run breaks a rule of the site's policy; nothing was trained (or evaluated).
        BrainTumNetError: the site's data or the settings are unusable.
        FloatingPointError: training diverged.
    """
    start = time.perf_counter()
    check_training(policy, profile.data, profile.privacy)  # before the data are opened (or a cache prepared)
    epochs = profile.federation.local_epochs
    device = pick_device(site.device)
    prepared = open_site(site, profile.data)
    model = _global_model(global_state, profile).to(device)  # before the optimizer: a restored Adam lands there too
    anchor = ({k: v.detach().clone() for k, v in model.state_dict().items()}
              if profile.train.fedprox_mu > 0 else None)
    memory, optimizer = _optimizer(profile, site, federation_id, model)
    case_ids = cross_validation_cases(prepared, profile, site)
    received = {}
    if evaluate_received:  # the previous round's global model, before this round changes it
        _admit_evaluation(policy, state_dir, site, prepared, profile, federation_id, run_id, server_round - 1)
        scoring = time.perf_counter()
        received = {RECEIVED_PREFIX + k: v for k, v in _evaluation(model, prepared, profile, device, site,
                                                                    server_round - 1, policy).items()}
        received[EVALUATE_SECONDS] = time.perf_counter() - scoring
    # The ledger's lock is held from reading the ε spent so far to appending this round's: a second run at this
    # site waits, then counts this round too.
    with (PrivacyLedger(state_dir, site.name, site.cache).locked() if profile.privacy.enabled
          else nullcontext()) as ledger:
        dp = _private_training(profile, policy, ledger, federation_id)
        log.info("site %s: round %d, training %d epoch(s) on %s (FedProx mu=%g%s)", site.name, server_round,
                 epochs, device, profile.train.fedprox_mu,
                 f", DP-SGD, epsilon so far {dp.epsilon:.3f} per slice" if dp else "")
        try:
            stats = train_model(model, [prepared], at_site(profile), device, epochs=epochs,
                                epoch_offset=(server_round - 1) * epochs, total_epochs=total_rounds * epochs,
                                proximal_to=anchor, case_ids=case_ids, progress=False, privacy=dp,
                                optimizer=optimizer)
        except PrivacyBudgetSpent as spent:
            # Not an error: the site has done its share. One clear line here; the centre logs it by site name.
            log.warning("site %s: round %d not trained: %s", site.name, server_round, spent)
            return None, {**{k: math.nan for k in TRAIN_KEYS}, WEIGHT_KEY: 0, DP_EPSILON: spent.spent,
                          DP_BUDGET_SPENT: 1, **received, SECONDS: time.perf_counter() - start}
        dp_metrics = (_spend(dp, ledger, profile, policy, site, federation_id, run_id, server_round)
                      if dp is not None else {})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if memory is not None and server_round < total_rounds:
        memory.save(optimizer)
    elif memory is not None:
        memory.forget()  # the last round: nothing continues from it
    metrics = {k: _finite(stats[k]) for k in TRAIN_KEYS}
    metrics[WEIGHT_KEY] = int(stats[WEIGHT_KEY])
    loss = metrics["train_loss"]
    metrics.update(dp_metrics)
    metrics.update(received)
    metrics[SECONDS] = time.perf_counter() - start
    log.info("site %s: round %d trained on %d slices in %.1f s, loss %.4f", site.name, server_round,
             metrics[WEIGHT_KEY], metrics[SECONDS], loss)
    return state, metrics


def evaluate_round(global_state: StateDict, profile: Profile, site: SiteRuntime, *, server_round: int | None,
                   federation_id: str, policy: SitePolicy, state_dir: Path, run_id: str = "",
                   split: str | None = "test") -> dict[str, Any]:
    """The received global model on the site's ``split`` (None = every case: the external hospital, which never
    trains, validates on its whole cohort): every key of EVAL_KEYS, ``num-examples`` (cases) and ``seconds``.

    Raises:
        PolicyRefusal: the data settings, the evaluation cap or the test split's size breaks the site's policy;
            nothing was evaluated.
    """
    start = time.perf_counter()
    check_data(policy, profile.data)  # before the data are opened (or a cache prepared)
    prepared = open_site(site, profile.data)
    _admit_evaluation(policy, state_dir, site, prepared, profile, federation_id, run_id, server_round, split)
    metrics = _evaluation(_global_model(global_state, profile), prepared, profile, pick_device(site.device), site,
                          server_round, policy, split)
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


def _private_training(profile: Profile, policy: SitePolicy, ledger: PrivacyLedger | None,
                      federation_id: str) -> PrivateTraining | None:
    """DP-SGD for this round, with the federation's history and the site's caps from its ledger (None without DP)."""
    if ledger is None:
        return None
    limits = [EpsilonLimit(f"site policy max-epsilon-{scope}", cap, ledger.history(fid), policy.delta)
              for scope, cap, fid in (("per-federation", policy.max_epsilon_per_federation, federation_id),
                                      ("lifetime", policy.max_epsilon_lifetime, None))]
    return PrivateTraining(profile.privacy, ledger.history(federation_id), limits=limits,
                           min_noise_multiplier=policy.min_noise_multiplier)


def _spend(dp: PrivateTraining, ledger: PrivacyLedger, profile: Profile, policy: SitePolicy, site: SiteRuntime,
           federation_id: str, run_id: str, server_round: int) -> dict[str, float]:
    """Append the trained round to the ledger (the lock is still held); the reply's DP metrics, losses masked."""
    entry = ledger.record(dp, federation_id=federation_id, run_id=run_id, server_round=server_round,
                          before=ledger.history(federation_id))
    spent, delta, k = entry["epsilon_federation"], profile.privacy.delta, profile.data.slices_per_case
    group_eps, group_delta = group_privacy(spent, delta, k)
    log.info("site %s: round %d: DP-SGD with sigma %.3f, sample rate %.4f; this federation's epsilon is now %.3f per "
             "slice (record-level DP) at delta %g (run budget %g); per patient (%d slices, group privacy of "
             "(epsilon, delta)-DP: k*epsilon, k*e^((k-1)*epsilon)*delta) epsilon %.3g at delta %.3g%s; the site's "
             "lifetime epsilon %.3f per slice at delta %g; ledger %s", site.name, server_round, dp.noise_multiplier,
             dp.sample_rate, spent, delta, profile.privacy.budget, k, group_eps, group_delta,
             " (no guarantee: delta >= 1)" if group_delta >= 1 else "", ledger.epsilon(None, policy.delta),
             policy.delta, ledger.path)
    # The losses are plain means over the training slices, outside DP-SGD's guarantee: they stay here.
    return {**{k: math.nan for k in TRAIN_KEYS}, DP_EPSILON: spent, DP_BUDGET_SPENT: 0}


def _admit_evaluation(policy: SitePolicy, state_dir: Path, site: SiteRuntime, prepared, profile: Profile,
                      federation_id: str, run_id: str, server_round, split: str | None = "test") -> None:
    """Count this evaluation against the site's caps, before it runs (PolicyRefusal when it may not)."""
    test = prepared.slices.iloc[prepared.indices(split, profile.data.task)]
    EvaluationLog(state_dir, site.name, site.cache).admit(
        policy, federation_id=federation_id, run_id=run_id, server_round=server_round,
        test_cases=int(test["case_id"].nunique()))


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
                server_round, policy: SitePolicy, split: str | None = "test") -> dict[str, Any]:
    """The model on the site's ``split`` (None = every case): every key of EVAL_KEYS (rounded as the site's policy
    says) and ``num-examples`` (cases)."""
    start = time.perf_counter()
    found = evaluate_model(model, [prepared], split, profile, device, progress=False)
    # Keys fixed and always present; an undefined value (e.g. AUC with one class in the test split) stays NaN and
    # the centre averages each metric over the sites where it is defined.
    metrics: dict[str, Any] = {k: float(found.get(k, math.nan)) for k in EVAL_KEYS}
    metrics[WEIGHT_KEY] = int(found[WEIGHT_KEY])
    log.info("site %s: round %s's global model evaluated on %d %s cases in %.1f s: dice_tumor %.4f, acc %.4f",
             site.name, server_round, metrics[WEIGHT_KEY], split or "all", time.perf_counter() - start,
             metrics["dice_tumor"], metrics["acc"])
    return rounded(metrics, EVAL_KEYS, policy.metric_decimals)


def _global_model(state: StateDict, profile: Profile) -> nn.Module:
    """The received global model, refused before any work when a tensor's dtype is not the model's: loading would
    convert it silently, and the reply (packed in the received layout) could then not be sent, after a round's
    training (and, with DP, its ε) had been spent."""
    model = model_with_weights(profile, state, class_names(profile.data.task), source="the global model received")
    for name, mine in model.state_dict().items():
        if name in state and state[name].dtype != mine.dtype:
            raise BrainTumNetError(f"the global model received: tensor {name!r} is {state[name].dtype}, this site's "
                                   f"model holds {mine.dtype}; the centre runs another version of BrainTumNet")
    return model


def _finite(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"training diverged (loss {value}); lower train.learning-rate")
    return value
