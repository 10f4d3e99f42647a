"""Reply screening: which replies of a phase the centre aggregates, and why each other one is left out.

Flower's FedAvg raises ``InconsistentMessageReplies`` (and the ServerApp exits) when one site sends different keys;
here each reply is checked and a bad one is logged with the site's name and left out. Every reply is held by the
Flower node id it came from (:class:`Reply`); the site name is what the node claims, so two nodes claiming one name
stay two replies. :func:`screen_replies` runs the steps in order:

1. attribute each reply to its node and that node's site (``server/sites.py``; a SuperLink-made error reply is traced
   back to the node the instruction went to);
2. log and drop error replies;
3. fail closed on a site name claimed by two or more nodes in the phase (a key rotation that left the old SuperNode
   running, or a node impersonating the site): none of that name's replies is used, each is recorded under
   ``NAME (node ID)`` and the warning names the node ids;
4. take the metric keys most replies share as the round's;
5. set aside train replies of sites whose privacy budget is spent (``dp_budget_spent = 1``, no arrays): they are
   recorded, not aggregated;
6. reject bad replies (:func:`reply_problem`: one ArrayRecord with the global model's keys, shapes, dtypes and finite
   values; one MetricRecord with a finite positive integer ``num-examples`` and the round's keys);
7. record what each kept reply reported;
8. log the sites that did not reply in time, and who was kept.

Train replies then pass the update-norm bound (:func:`bound_updates`: per parameter group, an update above its bound
is clipped onto it; ``robust.norm-factor``, ``server/robust.py``), and their weights are capped (:func:`cap_weights`,
``robust.max-weight-share``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from braintumnet.protocol import DP_BUDGET_SPENT, DP_EPSILON, SITE, SITE_NAME, WEIGHT_KEY
from server.robust import GroupNorms, NormReference, clip_update, group_norms, weight_cap, whole_norm
from server.rounds import RoundRecord
from server.sites import SiteNames
from server.transport import Exchange

log = logging.getLogger("braintumnet.server")


@dataclass
class Reply:
    """One node's reply in a phase.

    Args:
        node: the Flower node id it came from (for a SuperLink-made error, the node the instruction went to).
        site: the site name that node claims or is known by.
        msg: the reply.
        label: its name in logs and ``metrics.json``: the site, or ``SITE (node ID)`` when several nodes claim it.
        content: what is aggregated: the reply's content, clipped and weight-capped by the screening.
        norms: the update's norm per parameter group as aggregated (after clipping; train replies).
    """

    node: int
    site: str
    msg: Message
    label: str = ""
    content: RecordDict | None = None
    norms: GroupNorms = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label = self.label or self.site
        if self.content is None and not self.msg.has_error():
            self.content = self.msg.content


def screen_replies(replies: list[Message], exchange: Exchange, phase: str, reference: ArrayRecord | None, *,
                   names: SiteNames, record: RoundRecord, dp_budget: float) -> list[Reply]:
    """The replies of one phase that can be aggregated; the rest are logged and recorded.

    Args:
        replies: what came back.
        exchange: the send-and-receive they came back from.
        phase: "train" or "evaluate".
        reference: the global model sent (train), or None (evaluate replies carry no arrays).
        names: the site names, completed from the replies' ``site`` records.
        record: the round: receives each site's metrics, node and outcome, and the rejected replies.
        dp_budget: ``dp.max-epsilon`` (for the log of a site whose budget is spent).
    """
    attributed = list(_attributed(replies, exchange, names))
    good = _single_claims(_without_errors(attributed, phase, record), phase, record)
    for reply in attributed:
        record.nodes[reply.label] = reply.node
    expected = _round_metric_keys(good)
    kept = []
    for reply in good:
        if reference is not None and budget_spent(reply.msg, expected):
            _set_aside(reply, phase, record, dp_budget)
            continue
        problem = reply_problem(reply.content, reference, expected)
        if problem:
            _reject(record, phase, reply, problem)
            continue
        record.report(reply.label, phase, dict(_metrics(reply.content)))
        record.outcome(phase, reply.node, reply.label, "kept")
        kept.append(reply)
    _log_outcome(replies, exchange, phase, record.round, names, kept)
    return kept


def bound_updates(kept: list[Reply], reference: ArrayRecord, factor: float, carried: NormReference,
                  record: RoundRecord) -> list[Reply]:
    """The train replies with each parameter group's update clipped onto its bound (``robust.norm-factor`` x the
    group's reference norm, ``server.robust.NormReference``); an update whose norm is not finite is rejected. Each
    site's whole update norm goes into its train metrics (``update_norm``, and ``update_norm_clipped`` once clipped),
    each clipped group into the round's ``clipped`` entry with its norm and bound; each reply keeps its group norms as
    aggregated (for the next rounds' carried reference)."""
    finite = []
    for reply in kept:
        reply.norms = group_norms(_arrays(reply.content), reference)
        norm = whole_norm(reply.norms)
        record.sites[reply.label]["train"]["update_norm"] = norm
        if not math.isfinite(norm):
            _reject(record, "train", reply, "the update's norm is not finite")
            continue
        finite.append(reply)
    bounds = carried.bounds([r.norms for r in finite], factor)
    if bounds is None:
        if factor > 0 and finite:
            log.warning("round %d: %d train repl%s and no round aggregated before: no reference norm, so updates are "
                        "not bounded this round (robust.norm-factor needs 3 replies, or an earlier round)",
                        record.round, len(finite), "y" if len(finite) == 1 else "ies")
        return finite
    record.norm_bound = bounds.public()
    for reply in finite:
        scales = bounds.scales(reply.norms)
        if not scales:
            continue
        clipped = clip_update(_arrays(reply.content), reference, scales)
        name = next(iter(reply.content.array_records))
        reply.content = RecordDict({**dict(reply.content.items()), name: clipped})
        before = dict(reply.norms)
        reply.norms = {g: n * scales.get(g, 1.0) for g, n in before.items()}
        groups = {g: {"norm": before[g], "bound": bounds.groups[g]} for g in sorted(scales)}
        record.clip(reply.label, groups)
        record.sites[reply.label]["train"]["update_norm_clipped"] = whole_norm(reply.norms)
        record.outcome("train", reply.node, reply.label, "clipped", groups=groups)
        log.warning("round %d: train reply from %s (node %d): update clipped onto robust.norm-factor %g x %s in %s",
                    record.round, reply.label, reply.node, factor, bounds.source,
                    ", ".join(f"{g} (norm {v['norm']:.4g} -> {v['bound']:.4g})" for g, v in groups.items()))
    return finite


def cap_weights(kept: list[Reply], share: float, record: RoundRecord) -> list[RecordDict]:
    """The kept train replies' contents, each site's ``num-examples`` clipped to the round's cap
    (``robust.max-weight-share``, :func:`server.robust.weight_cap`); a clipped site is logged and its cap recorded in
    its train metrics (``weight_capped``). What the site reported stays in its metrics."""
    weights = {r.node: float(_metrics(r.content)[WEIGHT_KEY]) for r in kept}
    cap = weight_cap(list(weights.values()), share)
    contents = []
    for reply in kept:
        content = reply.content
        if cap is not None and weights[reply.node] > cap:
            log.warning("round %d: train reply from %s: %s %g clipped to %.6g (robust.max-weight-share %g of %d "
                        "sites)", record.round, reply.label, WEIGHT_KEY, weights[reply.node], cap, share, len(kept))
            record.sites[reply.label]["train"]["weight_capped"] = cap
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
    """Each reply with its node (the one its instruction went to: a SuperLink-made error reply comes from the
    SuperLink) and that node's site, named by the ``site`` record it carries or as known before. The name is taken as
    each reply is read: two nodes claiming one name each keep it (``SiteNames`` remembers only the latest)."""
    for msg in replies:
        node = exchange.sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        claimed = msg.content.config_records.get(SITE) if not msg.has_error() else None
        if claimed is not None and SITE_NAME in claimed:
            names.learn(node, str(claimed[SITE_NAME]))
        yield Reply(node=node, site=names.name(node), msg=msg)


def _without_errors(replies: Iterable[Reply], phase: str, record: RoundRecord) -> list[Reply]:
    """The replies that are not errors; each error is logged with its site and node."""
    good = []
    for reply in replies:
        if reply.msg.has_error():
            log.warning("round %d: %s: %s error from %s: %s", record.round, phase, phase, reply.label,
                        reply.msg.error.reason)
            record.outcome(phase, reply.node, reply.label, "error", reason=reply.msg.error.reason)
            continue
        good.append(reply)
    return good


def _single_claims(replies: list[Reply], phase: str, record: RoundRecord) -> list[Reply]:
    """The replies whose site name no other node claims in this phase. Where two or more nodes claim one name, none of
    their replies is used (fail closed: the centre cannot tell the site from an impostor, and keeping either would let
    the other's reply in under the site's name); each is recorded under ``NAME (node ID)``."""
    claims = Counter(r.site for r in replies)
    single = []
    for reply in replies:
        if claims[reply.site] == 1:
            single.append(reply)
            continue
        nodes = sorted(r.node for r in replies if r.site == reply.site)
        reply.label = f"{reply.site} (node {reply.node})"
        reason = (f"nodes {', '.join(map(str, nodes))} all claim site {reply.site!r} this round: none of their "
                  "replies is used (stop the SuperNode that should not run, e.g. the old key's after a key rotation, "
                  "or unregister a node you do not know)")
        _reject(record, phase, reply, reason)
    return single


def _reject(record: RoundRecord, phase: str, reply: Reply, reason: str) -> None:
    node = "" if reply.label.endswith(f"(node {reply.node})") else f" (node {reply.node})"
    log.warning("round %d: %s reply from %s rejected: %s%s", record.round, phase, reply.label, reason, node)
    record.reject(phase, reply.label, reason)
    record.outcome(phase, reply.node, reply.label, "rejected", reason=reason)


def _round_metric_keys(replies: list[Reply]) -> set[str] | None:
    """The metric keys most replies share (every site must send them), or None if no reply has one MetricRecord."""
    keys = Counter(frozenset(_metrics(r.content).keys()) for r in replies if len(r.content.metric_records) == 1)
    return set(keys.most_common(1)[0][0]) if keys else None


def _set_aside(reply: Reply, phase: str, record: RoundRecord, dp_budget: float) -> None:
    """A site whose privacy budget is spent: its metrics (its ε) are recorded, its reply is not aggregated."""
    metrics = dict(_metrics(reply.content))
    record.report(reply.label, phase, metrics)
    record.outcome(phase, reply.node, reply.label, "budget-spent")
    log.info("round %d: %s's privacy budget is spent (epsilon %.3f, dp.max-epsilon %g): it no longer trains and is "
             "left out of the aggregation; it still evaluates", record.round, reply.label,
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
             ", ".join(r.label for r in kept) or "none")


def _metrics(content: RecordDict) -> MetricRecord:
    """A reply's one MetricRecord."""
    return next(iter(content.metric_records.values()))


def _arrays(content: RecordDict) -> ArrayRecord:
    """A train reply's one ArrayRecord."""
    return next(iter(content.array_records.values()))
