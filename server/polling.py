"""When to ask the SuperLink for replies: as each site's reply is predicted to arrive, from the seconds it last took.

Every poll of the SuperLink for replies is a write at its state (it marks replies delivered), so polling flat and fast
made an SQLite-backed SuperLink time out on locks on a busy machine, while Flower's own ``Grid.send_and_receive``
waits a flat 3 s, which costs up to 3 s per phase whatever the sites do. The rule here:

- **Without a forecast** (a site's first message, or a kind it never answered before any reply that reported its
  work): the wait grows with the phase, a tenth of the time waited
  so far (the delay in noticing the last reply stays within ~10 % of the phase), never under ``POLL_MIN_S`` nor over
  ``POLL_S``.
- **With a forecast** (:class:`ReplyForecast`): a site's reply to a kind of message (train, evaluate) is expected
  after the seconds of work it reported for the same kind last time plus the rest of that round trip (the
  SuperNode's look, the transfers, the process), the rest taken at the earliest the last reply can have arrived.
  Once the polls are close to the replies that is about the last round trip; the reported work counts where the
  window in which the last reply arrived opened before the site's work can have ended (a site's first reply, seen
  by the growing rule's sparse polls). The centre polls when the next reply is due, then every ``POLL_FAST_S`` for
  ``DUE_WINDOW_S`` (or ``DUE_WINDOW_FRACTION`` of the due time); a reply not there by then is late, and the growing
  rule applies. A forecast only ever brings a poll forward: the growing rule's polls still happen, so a site faster
  than forecast is not waited for longer.
- **A kind the site never answered, another it did**: due after the shortest rest of a round trip it had on a
  kind whose work it reported (a query reply reports none), plus the work expected of it: a train reply says how
  long scoring the received model took (``evaluate_seconds``), which is what an evaluate message asks. This is the
  run's final evaluation, the one evaluate message a training site gets when the train messages score the model they
  carry (``evaluate-in-train``): without a forecast its reply waited for the growing rule's polls, every 0.5 s (in a
  traced one-site round, 0.31 s after it had arrived).

In a round of three sites this adds a handful of polls around the due times, where the growing rule alone left the
last reply unnoticed for up to 10 % of the phase (0.5-3 s).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

POLL_S = 3.0  # the longest wait between polls (a 1 s ceiling saw "database is locked" on a saturated box)
POLL_MIN_S = 0.5  # the shortest wait of the growing rule
POLL_FRACTION = 0.1  # the growing rule's wait as a share of the time waited
POLL_FAST_S = 0.1  # the wait while a forecast reply is just due
DUE_WINDOW_S = 0.5  # how long after its due time a reply is polled for every POLL_FAST_S: at least this long,
DUE_WINDOW_FRACTION = 0.05  # or this share of the due time; after that it is late and the growing rule applies


@dataclass
class ReplyForecast:
    """Per (node id, message type): the seconds of work the site last reported, and the rest of its last round trip.

    ``observe`` after each reply, with the window in which it arrived: after the poll before asked (``earliest_s``,
    seconds after sending; 0 for the first poll) and before the poll that saw it asked (``seen_s``). The rest of the
    round trip is taken at the window's start: the forecast is then early rather than late; an early poll costs one
    write, and the polls that follow come every ``POLL_FAST_S`` while the reply is just due. As polls close in on the
    due time the window narrows, so the forecast sharpens round by round. ``due`` is then ``max(work, earliest_s)``
    of the last reply. ``work_s`` is what the site reported (None when the reply carries no figure, or one that
    cannot be: then the whole round trip counts as work).
    """

    work: dict[tuple[int, str], float] = field(default_factory=dict)
    transfer: dict[tuple[int, str], float] = field(default_factory=dict)
    reported: set[tuple[int, str]] = field(default_factory=set)  # whose last reply reported its work
    expected: dict[tuple[int, str], float] = field(default_factory=dict)  # work told for a kind not yet answered

    def observe(self, node: int, kind: str, earliest_s: float, seen_s: float, work_s: float | None) -> None:
        known = work_s is not None and 0.0 <= work_s <= seen_s
        work = work_s if known else earliest_s
        self.work[(node, kind)] = work
        self.transfer[(node, kind)] = max(0.0, earliest_s - work)
        (self.reported.add if known else self.reported.discard)((node, kind))

    def expect(self, node: int, kind: str, work_s: float) -> None:
        """The work a reply of ``kind`` will take at ``node``, as another reply told (a train reply's
        ``evaluate_seconds``): counts until the node answers that kind itself."""
        if work_s >= 0.0:
            self.expected[(node, kind)] = work_s

    def due(self, node: int, kind: str) -> float | None:
        """Seconds after sending at which the reply is expected: from this kind's last reply; for a kind this node
        never answered, the shortest rest of a round trip of its other kinds plus the work expected of this one (0
        when none was told: the earliest the reply can come); None when the node never answered at all."""
        key = (node, kind)
        if key in self.work:
            return self.work[key] + self.transfer[key]
        # Only kinds whose work was reported: without it the whole round trip counted as work, its rest as 0.
        others = [rest for other, rest in self.transfer.items() if other[0] == node and other in self.reported]
        return min(others) + self.expected.get(key, 0.0) if others else None


def next_poll_wait(elapsed: float, due: Iterable[float | None]) -> float:
    """Seconds to wait before the next poll, ``elapsed`` seconds after sending, with the waiting replies' ``due``
    times (seconds after sending; None: no forecast)."""
    wait = min(POLL_S, max(POLL_MIN_S, POLL_FRACTION * elapsed))
    for when in due:
        if when is None:
            continue
        ahead = when - elapsed
        if ahead > 0:
            wait = min(wait, ahead)
        elif -ahead <= max(DUE_WINDOW_S, DUE_WINDOW_FRACTION * when):
            wait = POLL_FAST_S
    return max(POLL_FAST_S, wait)
