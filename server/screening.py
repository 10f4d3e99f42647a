"""Reply screening: which replies of a phase the centre aggregates, and why each other one is left out.

Flower's FedAvg raises ``InconsistentMessageReplies`` (and the ServerApp exits) when one site sends different keys;
here each reply is checked and a bad one is logged with the site's name and left out. :func:`screen_replies` runs
the steps in order:

1. attribute each reply to a site (``server/sites.py``; a SuperLink-made error reply is traced back to the node the
   instruction went to);
2. log and drop error replies;
3. take the metric keys most replies share as the round's;
4. set aside train replies of sites whose privacy budget is spent (``dp_budget_spent = 1``, no arrays): they are
   recorded, not aggregated;
5. reject bad replies (:func:`reply_problem`: one ArrayRecord with the global model's keys, shapes, dtypes and finite
   values; one MetricRecord with a finite positive integer ``num-examples`` and the round's keys);
6. record what each kept reply reported;
7. log the sites that did not reply in time, and who was kept.

Train replies then pass the update-norm bound (:func:`bound_norms`, ``robust.norm-factor``, ``server/robust.py``), and
their weights are capped (:func:`cap_weights`, ``robust.max-weight-share``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from braintumnet.protocol import DP_BUDGET_SPENT, DP_EPSILON, SITE, SITE_NAME, WEIGHT_KEY
from server.robust import norm_outliers, update_norm, weight_cap
from server.rounds import RoundRecord
from server.sites import SiteNames
from server.transport import Exchange

log = logging.getLogger("braintumnet.server")

Reply = tuple[str, Message]  # (site name, message)


def screen_replies(replies: list[Message], exchange: Exchange, phase: str, reference: ArrayRecord | None, *,
                   names: SiteNames, record: RoundRecord, dp_budget: float) -> list[Reply]:
    """The replies of one phase that can be aggregated, as (site, message); the rest are logged and recorded.

    Args:
        replies: what came back.
        exchange: the send-and-receive they came back from.
        phase: "train" or "evaluate".
        reference: the global model sent (train), or None (evaluate replies carry no arrays).
        names: the site names, completed from the replies' ``site`` records.
        record: the round: receives each site's metrics and the rejected replies.
        dp_budget: ``dp.max-epsilon`` (for the log of a site whose budget is spent).
    """
    good = _without_errors(_attributed(replies, exchange, names), phase, record.round)
    expected = _round_metric_keys(good)
    kept = []
    for site, msg in good:
        if reference is not None and budget_spent(msg, expected):
            _set_aside(site, msg, phase, record, dp_budget)
            continue
        problem = reply_problem(msg.content, reference, expected)
        if problem:
            log.warning("round %d: %s reply from %s rejected: %s", record.round, phase, site, problem)
            record.reject(phase, site, problem)
            continue
        record.report(site, phase, dict(_metrics(msg.content)))
        kept.append((site, msg))
    _log_outcome(replies, exchange, phase, record.round, names, kept)
    return kept


def bound_norms(kept: list[Reply], reference: ArrayRecord, norm_factor: float, record: RoundRecord) -> list[Reply]:
    """Drop train replies whose update norm is far above the round's median (``robust.norm-factor``); each site's
    norm goes into its train metrics (``metrics.json`` and MLflow)."""
    norms = {site: update_norm(next(iter(m.content.array_records.values())), reference) for site, m in kept}
    for site, norm in norms.items():
        record.sites[site]["train"]["update_norm"] = norm
    outliers = norm_outliers(norms, norm_factor)
    for site, reason in outliers.items():
        log.warning("round %d: train reply from %s rejected: %s", record.round, site, reason)
        record.reject("train", site, reason)
    return [(site, m) for site, m in kept if site not in outliers]


def cap_weights(kept: list[Reply], share: float, record: RoundRecord) -> list[RecordDict]:
    """The kept train replies' contents, each site's ``num-examples`` clipped to the round's cap
    (``robust.max-weight-share``, :func:`server.robust.weight_cap`); a clipped site is logged and its cap recorded in
    its train metrics (``weight_capped``). What the site reported stays in its metrics."""
    weights = {site: float(_metrics(m.content)[WEIGHT_KEY]) for site, m in kept}
    cap = weight_cap(list(weights.values()), share)
    contents = []
    for site, msg in kept:
        content = msg.content
        if cap is not None and weights[site] > cap:
            log.warning("round %d: train reply from %s: %s %g clipped to %.6g (robust.max-weight-share %g of %d "
                        "sites)", record.round, site, WEIGHT_KEY, weights[site], cap, share, len(kept))
            record.sites[site]["train"]["weight_capped"] = cap
            name = next(iter(content.metric_records))
            content = RecordDict({**dict(content.items()), name: MetricRecord({**_metrics(content), WEIGHT_KEY: cap})})
        contents.append(content)
    return contents


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
            # An integer reply would skip the NaN check and count 0 in the update norm, then be cast back unchecked.
            if array.dtype != reference[key].dtype:
                return f"array {key} has dtype {array.dtype}, the global model's is {reference[key].dtype}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = _metrics(content)
    weight = metrics.get(WEIGHT_KEY)
    if not _is_count(weight):
        return f"{WEIGHT_KEY} must be a finite positive integer, got {weight!r}"
    if metric_keys is not None and set(metrics) != metric_keys:
        return (f"metric keys differ from the other sites' (missing {sorted(metric_keys - set(metrics))}, "
                f"extra {sorted(set(metrics) - metric_keys)})")
    return None


def budget_spent(msg: Message, expected: set[str] | None) -> bool:
    """A train reply of a site that refused to train (privacy budget spent), with the round's metric keys."""
    if len(msg.content.metric_records) != 1:
        return False
    metrics = _metrics(msg.content)
    return (expected is None or set(metrics) == expected) and metrics.get(DP_BUDGET_SPENT) == 1


def _is_count(value) -> bool:
    """A finite positive whole number (``inf`` passes ``> 0`` and would make the weighted mean NaN)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, float) and math.isfinite(value) and value > 0 and value.is_integer()


# ---- the steps -----------------------------------------------------------------------------------------------------

def _attributed(replies: Iterable[Message], exchange: Exchange, names: SiteNames) -> Iterator[Reply]:
    """Each reply with its site: the node its instruction went to (a SuperLink-made error reply comes from the
    SuperLink), named by the ``site`` record it carries or as known before."""
    for msg in replies:
        node = exchange.sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        claimed = msg.content.config_records.get(SITE) if not msg.has_error() else None
        if claimed is not None and SITE_NAME in claimed:
            names.learn(node, str(claimed[SITE_NAME]))
        yield names.name(node), msg


def _without_errors(replies: Iterable[Reply], phase: str, server_round: int) -> list[Reply]:
    """The replies that are not errors; each error is logged with its site."""
    good = []
    for site, msg in replies:
        if msg.has_error():
            log.warning("round %d: %s: %s error from %s: %s", server_round, phase, phase, site, msg.error.reason)
            continue
        good.append((site, msg))
    return good


def _round_metric_keys(replies: list[Reply]) -> set[str] | None:
    """The metric keys most replies share (every site must send them), or None if no reply has one MetricRecord."""
    keys = Counter(frozenset(_metrics(m.content).keys()) for _, m in replies if len(m.content.metric_records) == 1)
    return set(keys.most_common(1)[0][0]) if keys else None


def _set_aside(site: str, msg: Message, phase: str, record: RoundRecord, dp_budget: float) -> None:
    """A site whose privacy budget is spent: its metrics (its ε) are recorded, its reply is not aggregated."""
    metrics = dict(_metrics(msg.content))
    record.report(site, phase, metrics)
    log.info("round %d: %s's privacy budget is spent (epsilon %.3f, dp.max-epsilon %g): it no longer trains and is "
             "left out of the aggregation; it still evaluates", record.round, site,
             float(metrics.get(DP_EPSILON, math.nan)), dp_budget)


def _log_outcome(replies: list[Message], exchange: Exchange, phase: str, server_round: int, names: SiteNames,
                 kept: list[Reply]) -> None:
    """Name each site that did not reply in time, then who was kept of those asked."""
    answered = {m.metadata.reply_to_message_id for m in replies}
    for mid, node in exchange.sent.items():
        if mid not in answered:
            log.warning("round %d: no %s reply from %s within round-timeout-s=%.0f s; left out of this round",
                        server_round, phase, names.name(node), exchange.timeout or 0)
    sent_to = sorted(names.name(n) for n in exchange.sent.values())
    log.info("round %d: %s replies from %d of %d site(s): %s", server_round, phase, len(kept), len(sent_to),
             ", ".join(s for s, _ in kept) or "none")


def _metrics(content: RecordDict) -> MetricRecord:
    """A reply's one MetricRecord."""
    return next(iter(content.metric_records.values()))
