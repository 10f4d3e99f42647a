"""The hospital's ClientApp: Flower's side of a site's round; the round itself is :mod:`braintumnet.site_round`.

Flower starts a fresh process for every message. Each handler unpacks the message (names of
:mod:`braintumnet.protocol`; a model that came packed, :mod:`braintumnet.packing`, is unpacked here), runs the
core's round on the site's prepared cache (``python client/run.py`` prepares it beforehand) and packs the reply:
``arrays``, the trained state dict (train replies that trained; packed in the layout received when the model came
packed); ``metrics``, aggregate numbers only, with the same keys at every site; ``site``, the site's name only, so
the centre can log per-site metrics when node names are not registered (no TLS / node authentication, simulation).

A **query** asks what the node is: the reply's ``site`` record holds the site's name and its role (``training`` or
``evaluate-only``, from the site's own node config), metadata only: no data are opened, nothing is computed. The
centre sends train messages to training sites only; an evaluate-only site (the external hospital) scores the global
model on all of its cases when asked, and refuses a train message that reaches it anyway with an error reply naming
its role (defence in depth: no training, no arrays leave it).

Before a round does anything, the site checks the run against its own policy (read from the site config the launcher
named in the node config, never from the run config: the centre cannot loosen it). A run that breaks a rule gets an
error reply naming the site and the rule only; the site logs one line with the detail.

Any other exception (say, a case that turns out corrupt) is logged here in full and becomes an error reply that names
the site and the exception type only; the full message can name cases or files and stays at the site.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from braintumnet.config import resolve
from braintumnet.data.loading import SiteRuntime
from braintumnet.errors import BrainTumNetError
from braintumnet.logs import setup_logging
from braintumnet.packing import decode_layout, pack, unpack
from braintumnet.protocol import (ARRAYS, CONFIG, EVALUATE_ONLY, EVALUATE_RECEIVED, FEDERATION_ID, METRICS,
                                  PACKED_LAYOUT, ROLE, SERVER_ROUND, SITE, SITE_NAME, TOTAL_ROUNDS)
from braintumnet.site_policy import PolicyRefusal
from braintumnet.site_round import evaluate_round, train_round
from client.sites import site_from_context, site_policy_from_context, site_role

log = logging.getLogger("braintumnet.client")
app = ClientApp()


class SiteFailure(RuntimeError):
    """What the centre sees of a failed message: the site, the phase and the exception type, nothing else."""


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's name and role, nothing else: what the centre needs before it sends a model."""
    site = _site(context)
    role = site_role(context.node_config, context.run_config)
    return Message(RecordDict({SITE: ConfigRecord({SITE_NAME: site.name, ROLE: role})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = _site(context)
    if site_role(context.node_config, context.run_config) == EVALUATE_ONLY:
        log.warning("site %s: a train message refused: this site's role is %s (its node config); it only scores the "
                    "global model", site.name, EVALUATE_ONLY)
        raise SiteFailure(f"site {site.name}: train refused: this site's role is {EVALUATE_ONLY}")
    return _guarded(site, "train", lambda: _train(msg, context, site))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = _site(context)
    return _guarded(site, "evaluate", lambda: _evaluate(msg, context, site))


def _train(msg: Message, context: Context, site: SiteRuntime) -> Message:
    config = msg.content[CONFIG]
    server_round = int(config[SERVER_ROUND])
    policy, state_dir = site_policy_from_context(context.node_config, site)
    state, metrics = train_round(
        _global_state(msg), resolve(context.run_config), site, server_round=server_round,
        total_rounds=int(config.get(TOTAL_ROUNDS, server_round)), federation_id=_federation(config, context),
        policy=policy, state_dir=state_dir, run_id=str(context.run_id),
        evaluate_received=bool(config.get(EVALUATE_RECEIVED)))
    return _reply(msg, site, metrics, state)


def _evaluate(msg: Message, context: Context, site: SiteRuntime) -> Message:
    config = msg.content[CONFIG]
    policy, state_dir = site_policy_from_context(context.node_config, site)
    # The external hospital validates on its whole cohort; a training site on its test split.
    every_case = site_role(context.node_config, context.run_config) == EVALUATE_ONLY
    metrics = evaluate_round(_global_state(msg), resolve(context.run_config), site,
                             server_round=config.get(SERVER_ROUND), federation_id=_federation(config, context),
                             policy=policy, state_dir=state_dir, run_id=str(context.run_id),
                             split=None if every_case else "test")
    return _reply(msg, site, metrics)


def _federation(config: ConfigRecord, context: Context) -> str:
    """Keys what a site keeps per federation; a centre that sends no federation id gets one per Flower run (the
    site's lifetime ε cap still counts every run)."""
    return str(config.get(FEDERATION_ID, "") or f"run-{context.run_id}")


def _global_state(msg: Message) -> dict:
    """The global model's state dict; unpacked when it came packed (a deployment's centre sends it so, its layout in
    the config record: braintumnet/packing.py). PackingError, a clear message, when it does not fit its layout."""
    layout = _layout(msg)
    if layout is None:
        return msg.content[ARRAYS].to_torch_state_dict()
    vectors = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
    return {k: torch.from_numpy(v.copy()) for k, v in unpack(vectors, layout).items()}


def _layout(msg: Message):
    """The layout a packed instruction carries in its config record (checked), or None when it came unpacked."""
    raw = msg.content[CONFIG].get(PACKED_LAYOUT) if CONFIG in msg.content.config_records else None
    return None if raw is None else decode_layout(raw)


def _reply(msg: Message, site: SiteRuntime, metrics: dict, state: dict | None = None) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({SITE_NAME: site.name})})
    if state is not None:
        layout = _layout(msg)  # a packed instruction gets its reply packed in the same layout, without the layout
        content[ARRAYS] = (ArrayRecord(state) if layout is None else
                           ArrayRecord({k: Array(v) for k, v in pack({k: t.numpy() for k, t in state.items()},
                                                                     layout).items()}))
    return Message(content, reply_to=msg)


def _site(context: Context) -> SiteRuntime:
    setup_logging()
    return site_from_context(context.node_config, context.run_config)


def _guarded(site: SiteRuntime, phase: str, fn: Callable[[], Message]) -> Message:
    try:
        return fn()
    except PolicyRefusal as refusal:  # the rule travels; the run's values against the site's limits stay here
        log.warning("site %s: %s refused by the site's policy, rule %s: %s", site.name, phase, refusal.rule,
                    refusal.detail)
        raise SiteFailure(f"site {site.name}: {phase} refused by the site's policy, rule {refusal.rule}") from None
    except Exception as exc:  # every failure becomes an error reply; the full story stays in this site's log
        log.exception("site %s: %s failed", site.name, phase)
        kind = "a data or settings problem, " if isinstance(exc, BrainTumNetError) else ""
        raise SiteFailure(f"site {site.name}: {phase} failed with {type(exc).__name__} ({kind}details in the "
                          "site's own log, which may name cases and files)") from None
