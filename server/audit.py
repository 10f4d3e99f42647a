"""The message audit (``audit-messages = true``): what every message the centre sends or receives carries.

Each message is described by record names and kinds, arrays by shape and dtype only (never their contents), config
and metric items with their values (they are what the centre sees anyway) and the error reason of an error reply.
The run folder appends the descriptions to ``audit.jsonl`` (``server.checkpoints.RunFolder.append_audit``).

After each phase the screening's decisions follow (:func:`describe_screening`): per Flower node id, the site it
claimed and what became of its reply (kept, clipped with each group's norm and bound, rejected with the reason), and
the round's aggregate when it was refused. Two nodes claiming one site name are two entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message


def describe_exchange(sent: Iterable[Message], replies: Iterable[Message], nodes: Mapping[str, int]) -> list[dict]:
    """One send-and-receive's descriptions: the instructions sent, then the replies (``nodes``: message id -> the node
    the instruction went to, which an error reply made by the SuperLink is traced back to)."""
    return ([describe_message(m, "to-site", node=m.metadata.dst_node_id) for m in sent]
            + [describe_message(m, "from-site", node=nodes.get(m.metadata.reply_to_message_id)) for m in replies])


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
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_screening(server_round: int, phase: str, outcomes: Mapping[int, dict], refused: str | None = None) -> dict:
    """The screening's decisions of one phase for the audit: per node id, its site and the outcome of its reply
    (``server.rounds.RoundRecord.outcomes``); ``refused``: why the round's aggregate was not applied."""
    entry: dict[str, Any] = {"direction": "screening", "type": phase, "round": server_round,
                             "replies": [{"node": node, **_plain(dict(o))} for node, o in sorted(outcomes.items())]}
    if refused is not None:
        entry["refused"] = refused
    return entry
