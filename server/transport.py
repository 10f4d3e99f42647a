"""Sending and receiving: Flower's Grid with a record of each exchange, polling for replies when they are due
(``server/polling.py``: from each site's last reported seconds), and reads retried while the SuperLink is busy.

Each exchange is recorded (:class:`Exchange`): where each message went (to name the site of a reply, or of a missing
one), how long it took and how many array bytes moved per node. With the message audit on, every message sent and
received is described (``server/audit.py``).

Over a real network (Flower's ``HttpGrid``: a deployment) the model travels packed (:mod:`braintumnet.packing`: one
flat array per dtype instead of one array per tensor, its layout in the instruction's config record; Flower sends one
request per object, and a model message took about three times as long unpacked, bench/results/transfer.md). Each
instruction's ``arrays`` are packed as they are sent and each reply's unpacked as it arrives, in the layout sent to
that node, so the strategy and the screening see the state dict as before; a reply whose packed arrays do not fit
that layout is replaced by an error reply naming the problem. The Simulation Engine passes messages in memory: there
nothing is packed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

from braintumnet.packing import PackingError, decode_layout, encode_layout, is_packed, layout_of, pack, unpack
from braintumnet.protocol import ARRAYS, CONFIG, EVALUATE_SECONDS, METRICS, PACKED_LAYOUT, SECONDS
from server.audit import describe_exchange
from server.polling import ReplyForecast, next_poll_wait

log = logging.getLogger("braintumnet.server")

# Flower's network grid pulls a reply's objects with Flower's own retry, after 1 s and doubling to 10 s: a reply seen
# while its site is still uploading (likely, now that replies are polled for when due) waited a whole second. On the
# Flower version whose source was read, the grid's pull retries after 0.05 s, doubling to 1 s, for at most 30 min
# (Flower: 500 tries, about 80 min, during which the pull blocks the round); a slow hospital link uploading the
# paper-size model (one 42 MB object packed) at 1 Mbit/s needs about 6 min. Elsewhere it is left as it is, with a
# warning.
OBJECT_RETRY = {"initial_backoff": 0.05, "backoff_cap": 1.0, "max_tries_per_object": None, "max_time": 1800.0}
OBJECT_RETRY_FLOWER = "1.42."
BUSY_RETRIES = 6  # a SuperLink under load answers 500 ("database is locked") now and then: retry reads


@dataclass
class Exchange:
    """One send-and-receive: where each message went, what came back, how long it took and how many bytes moved."""

    sent: dict[str, int] = field(default_factory=dict)  # message id -> node id
    replies: list[Message] = field(default_factory=list)
    seconds: float = 0.0
    timeout: float | None = None
    bytes_out: dict[int, int] = field(default_factory=dict)  # node id -> array bytes sent
    bytes_in: dict[int, int] = field(default_factory=dict)  # node id -> array bytes received
    polls: int = 0  # reads of the SuperLink for replies


class RecordingGrid(Grid):
    """Flower's Grid, plus a record of each exchange (for site names, bytes and timing) and retried reads.

    ``audit``, when given, receives a description (``server.audit.describe_message``) of every message sent and
    received (the state dict as the strategy sees it, packed or not on the wire). ``pack``: send the model packed
    and unpack the replies (None: when ``grid`` is Flower's network grid).
    """

    def __init__(self, grid: Grid, audit: Callable[[list[dict]], Any] | None = None, pack: bool | None = None):
        self._grid = grid
        self.last = Exchange()
        self.audit = audit
        self.pack = isinstance(grid, HttpGrid) if pack is None else pack
        self.forecast = ReplyForecast()
        if isinstance(grid, HttpGrid):
            retry_objects_sooner()

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
        shared: dict = {}  # the strategy sends one global model to every site: packed once an exchange
        wire = [packed(m, shared) for m in messages] if self.pack else messages
        exchange = Exchange(bytes_out={m.metadata.dst_node_id: array_bytes(m.content) for m in wire},
                            timeout=timeout)
        ids = list(self._grid.push_messages(wire)) if wire else []
        exchange.sent = {mid: m.metadata.dst_node_id for mid, m in zip(ids, wire) if mid}
        sent_by_id = {mid: m for mid, m in zip(ids, wire) if mid}
        waiting = set(exchange.sent)
        deadline = None if timeout is None else start + timeout
        asked_before = 0.0
        while waiting and (deadline is None or time.monotonic() < deadline):
            # A reply this poll returns reached the SuperLink after the poll before asked and before this one did
            # (not before this one returned: the pull includes downloading the replies' objects).
            asked = time.monotonic() - start
            got = retry_busy(lambda: list(self._grid.pull_messages(list(waiting))), "pull replies")
            exchange.polls += 1
            earliest, seen, asked_before = asked_before, asked, asked
            for m in got:
                sent = sent_by_id.get(m.metadata.reply_to_message_id)
                node = exchange.sent.get(m.metadata.reply_to_message_id)
                if node is not None and not m.has_error():
                    exchange.bytes_in[node] = array_bytes(m.content)  # as it travelled, packed or not
                    self.forecast.observe(node, sent.metadata.message_type, earliest, seen, reported_seconds(m))
                    scoring = reported_seconds(m, EVALUATE_SECONDS)  # a train reply that scored the model it got
                    if scoring is not None:
                        self.forecast.expect(node, MessageType.EVALUATE, scoring)
                exchange.replies.append(unpacked(m, sent))
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting:
                due = (self.forecast.due(sent_by_id[mid].metadata.dst_node_id, sent_by_id[mid].metadata.message_type)
                       for mid in waiting)
                time.sleep(next_poll_wait(time.monotonic() - start, due))
        exchange.seconds = time.monotonic() - start
        self.last = exchange
        if self.audit is not None:
            self.audit(describe_exchange(messages, exchange.replies, exchange.sent))
        return exchange.replies


def retry_objects_sooner() -> bool:
    """Make Flower's network grid retry a reply's missing objects sooner (:data:`OBJECT_RETRY`); False (and nothing
    changed) on a Flower version other than the one whose grid was read."""
    from importlib.metadata import version

    from flwr.superlink.grid import http_grid

    if not version("flwr").startswith(OBJECT_RETRY_FLOWER):
        log.warning("Flower %s: replies' objects are pulled with Flower's own retry (sooner on %sx only)",
                    version("flwr"), OBJECT_RETRY_FLOWER)
        return False
    if getattr(http_grid.pull_objects, "retries_sooner", False):
        return True
    flower_pull = http_grid.pull_objects

    def pull_objects(*args, **kwargs):
        return flower_pull(*args, **{**OBJECT_RETRY, **kwargs})

    pull_objects.retries_sooner = True
    http_grid.pull_objects = pull_objects
    return True


def reported_seconds(reply: Message, key: str = SECONDS) -> float | None:
    """The seconds of work a site reports in its reply's metrics under ``key`` (None when there are none, or not a
    number)."""
    metrics = reply.content.metric_records.get(METRICS) if reply.has_content() else None
    value = None if metrics is None else metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else None


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


def packed(msg: Message, shared: dict | None = None) -> Message:
    """The instruction with its model packed and the layout in its config record (a new message; the strategy's own
    is left as it is), or ``msg`` itself when it carries no model. ``shared``: packed models by the id of the
    strategy's ArrayRecord, so that instructions carrying the same one share one packed copy (packed, and hashed by
    Flower, once)."""
    if not msg.has_content() or ARRAYS not in msg.content.array_records:
        return msg
    record = msg.content.array_records[ARRAYS]
    shared = {} if shared is None else shared
    if id(record) not in shared:
        state = {k: a.numpy() for k, a in record.items()}
        shared[id(record)] = (ArrayRecord({k: Array(v) for k, v in pack(state).items()}),
                              encode_layout(layout_of(state)))
    arrays, layout = shared[id(record)]
    content = RecordDict(dict(msg.content.items()))
    content[ARRAYS] = arrays
    config = msg.content.config_records.get(CONFIG)
    content[CONFIG] = ConfigRecord({**(dict(config) if config is not None else {}), PACKED_LAYOUT: layout})
    meta = msg.metadata
    return Message(content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                   group_id=meta.group_id or None, ttl=meta.ttl)


def sent_layout(sent: Message | None):
    """The layout a packed instruction carried (None when it was not sent packed)."""
    if sent is None or not sent.has_content() or CONFIG not in sent.content.config_records:
        return None
    raw = sent.content.config_records[CONFIG].get(PACKED_LAYOUT)
    return None if raw is None else decode_layout(raw)


def unpacked(reply: Message, sent: Message | None) -> Message:
    """A reply with a packed model (as its instruction was sent) turned back into one array per tensor, in the layout
    sent; an error reply naming the problem when it does not fit. Other replies as they are."""
    if reply.has_error() or not reply.has_content() or ARRAYS not in reply.content.array_records:
        return reply
    arrays = reply.content.array_records[ARRAYS]
    if not is_packed(arrays):
        return reply  # one array per tensor: the screening checks it as any reply
    try:
        layout = sent_layout(sent)
        if layout is None:
            raise PackingError("a packed model came back to an instruction that sent none")
        state = unpack(_numpy(arrays), layout)
    except PackingError as exc:  # the screening logs and records it under the site's name
        return Message(metadata=reply.metadata,
                       error=Error(code=ErrorCode.UNKNOWN, reason=f"packed model refused: {exc}"))
    reply.content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return reply


def _numpy(arrays: ArrayRecord) -> dict:
    try:
        return {k: a.numpy() for k, a in arrays.items()}
    except Exception as exc:  # noqa: BLE001 - whatever a malformed Array raises when decoded: refuse, never crash
        raise PackingError(f"an array could not be decoded ({type(exc).__name__})") from None


def array_bytes(content: RecordDict) -> int:
    """The bytes of a message's arrays (what a model download or upload costs)."""
    return sum(record.count_bytes() for record in content.array_records.values())
