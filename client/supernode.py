"""``flower-supernode`` with shorter waits: ``python client/supernode.py ARGS`` takes ``flower-supernode``'s arguments.

Flower 1.42's SuperNode looks for a new message at the SuperLink, and when there is none sleeps a fixed 3 s (on
average 1.5 s of every message's latency, two messages a round); it then waits for the ClientApp's reply, and for
each of its objects, in fixed 0.5 s steps; an object of a message not uploaded yet is asked for again after 1 s,
doubling. None of this is configurable. Here the local waits for the reply check every 0.05 s (they read the
SuperNode's own memory), a missing object is asked for again after 0.05 s, doubling to 1 s, and the look for a new
message follows when one is likely:

- right after a reply has gone out the next message is near (the round's evaluation follows its training; the next
  round follows the evaluation once the slowest site has answered), so the SuperLink is asked again after a tenth of
  the time since that reply, at least every ``FAST_LOOK_S`` (0.1 s);
- as the wait grows the looks space out, to every ``BRAINTUMNET_SUPERNODE_PULL_S`` seconds (default 1.0) once the
  site has been idle for ten times that long: each look is a write at the SuperLink's state, so an idle federation
  of three sites makes three writes a second, not thirty.

A message is so picked up within about 5 % of the time the site waited for it (for a short wait, within 0.1 s),
where Flower's fixed 3 s made it 1.5 s on average. Everything else is Flower's own ``flower-supernode``: TLS, node
authentication, heartbeats, the Runtime API.

The waits are literal ``time.sleep(3)`` and ``time.sleep(0.5)`` calls in ``flwr.supernode.start_client_internal``;
this module swaps that module's ``time`` for one whose ``sleep`` maps those two values, and wraps its
``_push_messages`` (which sends the reply) to note when a reply went out. Only on Flower 1.42.x (the
version whose source was read; tests/federation/test_executor.py checks those calls are still there): on another
version the SuperNode runs unchanged, with a warning.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("braintumnet.supernode")
FLOWER_PULL_S = 3  # Flower 1.42's sleep after an empty look for messages
FLOWER_REPLY_WAIT_S = 0.5  # its sleep while the reply (or one of its objects) is not there yet
REPLY_WAIT_S = 0.05
DEFAULT_PULL_S = 1.0
# The SuperNode sees a message as soon as its header is at the SuperLink, often while the centre is still uploading
# its objects; Flower then retries each missing object after 1 s, doubling to 10 s (a whole second lost on most
# messages once the SuperNode looks often). Retry after 0.05 s instead, doubling to 1 s, for at most 30 min (Flower:
# 500 tries, about 80 min; 500 tries at 1 s would give up after 8 min, too soon for a slow link's upload of the
# paper-size model).
OBJECT_RETRY = {"initial_backoff": 0.05, "backoff_cap": 1.0, "max_tries_per_object": None, "max_time": 1800.0}
FAST_LOOK_S = 0.1  # the shortest wait between looks, right after a reply
LOOK_FRACTION = 0.1  # the wait between looks, as a share of the time since the last reply


class _ShorterWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the same, with two sleeps shortened.

    ``replied()`` notes that a reply went out; the wait after an empty look is then :func:`look_wait` of the time
    since, and ``pull_s`` before the first reply.
    """

    def __init__(self, pull_s: float):
        self.pull_s = pull_s
        self.last_reply: float | None = None

    def replied(self) -> None:
        self.last_reply = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_PULL_S:
            idle = None if self.last_reply is None else time.monotonic() - self.last_reply
            seconds = look_wait(idle, self.pull_s)
        elif seconds == FLOWER_REPLY_WAIT_S:
            seconds = REPLY_WAIT_S
        time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def look_wait(idle: float | None, pull_s: float) -> float:
    """Seconds until the next look for a message, ``idle`` seconds after the last reply (None: none yet)."""
    if idle is None:
        return pull_s
    return min(pull_s, max(FAST_LOOK_S, LOOK_FRACTION * idle))


def pull_interval() -> float:
    raw = os.environ.get("BRAINTUMNET_SUPERNODE_PULL_S", str(DEFAULT_PULL_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= FLOWER_PULL_S:
        raise SystemExit(f"error: BRAINTUMNET_SUPERNODE_PULL_S={raw!r}: give seconds between 0.1 and 3")
    return value


def shorten_waits(pull_s: float) -> bool:
    """Patch Flower's SuperNode loop; False (and nothing changed) on a Flower version other than 1.42.x."""
    from client.executor import SUPPORTED_FLOWER, flower_version, supported

    if not supported(flower_version()):
        log.warning("Flower %s: the SuperNode keeps its own waits (shortened on %sx only)", flower_version(),
                    SUPPORTED_FLOWER)
        return False
    from flwr.supernode import start_client_internal as internal

    waits = _ShorterWaits(pull_s)
    internal.time = waits
    internal.pull_objects = _timed_pull(internal.pull_objects)
    internal._push_messages = _noting_replies(internal._push_messages, waits)
    return True


def _noting_replies(push_messages, waits: _ShorterWaits):
    """Flower's ``_push_messages`` (wait for the ClientApp's reply, send it), noting when it returns: the next
    message is likely soon after."""

    def push(*args, **kwargs):
        try:
            return push_messages(*args, **kwargs)
        finally:
            waits.replied()

    return push


def _timed_pull(pull_objects):
    """Flower's ``pull_objects`` as the SuperNode uses it (a message's objects from the SuperLink), retrying an object
    not there yet sooner (:data:`OBJECT_RETRY`) and logging how long a message's transfer took: its ClientApp waits
    for it (the executor logs that wait as ``pull``)."""

    def pull(object_ids, *args, **kwargs):
        start = time.monotonic()
        result = pull_objects(object_ids, *args, **{**OBJECT_RETRY, **kwargs})
        log.info("received %d objects from the SuperLink in %.2f s", len(result), time.monotonic() - start)
        return result

    return pull


def main() -> None:
    handler = logging.StreamHandler()  # Flower logs through its own handler; the root logger stays quiet
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    shorten_waits(pull_interval())
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # Flower names its exit events after the program
    sys.exit(flower_supernode())


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: the repository's packages, not this folder, on the path
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    main()
