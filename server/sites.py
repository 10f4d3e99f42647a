"""Which node is which site, and waiting for enough of them.

- **Names.** A node's site name is ``NodeInfo.name`` when the SuperLink knows it (SuperNode authentication), else the
  ``site`` record its ClientApp sends; a site that restarts comes back as a new node and takes its name along.
- **Roles.** A node's role (``training`` or ``evaluate-only``, the site's own node config) is asked once with a query
  message before any model is sent to it (``server/strategy.py``); sampling then picks among the nodes of the phase's
  role only (``eligible``), and waits for enough nodes that may take part.
- **Never waits silently.** Sampling logs which nodes are connected (by site name once known) and which expected
  sites are missing, every 15 s, and gives up after ``wait-for-nodes-s`` with an error saying what to do.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from braintumnet.protocol import ROLE, ROLES, SITE, SITE_NAME, TRAINING
from server.settings import FederationError
from server.transport import Exchange, retry_busy

log = logging.getLogger("braintumnet.server")

WAIT_LOG_EVERY_S = 15.0


class SiteNames:
    """Node id -> site name, learnt as the federation goes.

    Args:
        known: names known before (a resumed run starts from its checkpoint's ``site-nodes``: node ids survive
            restarts), keyed by node id or its string.
    """

    def __init__(self, known: Mapping[int | str, str] | None = None):
        self._by_node: dict[int, str] = {int(n): s for n, s in (known or {}).items()}

    def learn(self, node: int, name: str) -> None:
        """``node`` says it is site ``name``; a node already known by another name keeps it (logged)."""
        if self._by_node.get(node) not in (None, name):
            log.warning("node %s reported site %r but is known as %r; keeping %r", node, name, self._by_node[node],
                        self._by_node[node])
            return
        if name in self._by_node.values() and self._by_node.get(node) != name:
            # A site that restarted comes back as a new node; its old node is gone.
            self._by_node = {n: s for n, s in self._by_node.items() if s != name}
        self._by_node[node] = name

    def get(self, node: int) -> str | None:
        """The node's site name, or None while it is unknown."""
        return self._by_node.get(node)

    def name(self, node: int) -> str:
        """The node's site name, or ``node <id>`` while it is unknown."""
        return self._by_node.get(node, f"node {node}")

    def names_of(self, nodes: Iterable[int]) -> str:
        return ", ".join(sorted(self.name(n) for n in nodes))

    def by_site(self, per_node: Mapping[int, int]) -> dict[str, int]:
        return {self.name(n): v for n, v in per_node.items()}

    def as_meta(self) -> dict[str, str]:
        """The names as a checkpoint's ``site-nodes`` holds them (JSON keys are strings)."""
        return {str(n): s for n, s in self._by_node.items()}


class SiteRoles:
    """Node id -> role (``training`` or ``evaluate-only``), learnt by asking each new node with a query message.

    A site states its role from its own node config; the centre only asks. A node that does not answer stays unknown
    (never sampled, asked again next round); a node that answers without a role is a training site (an evaluate-only
    ClientApp always states its role, and refuses a train message anyway).
    """

    def __init__(self, names: SiteNames):
        self.names = names
        self._by_node: dict[int, str] = {}
        self._asked: set[int] = set()  # asked this round

    def new_round(self) -> None:
        self._asked = set()

    def get(self, node: int) -> str | None:
        return self._by_node.get(node)

    def of_role(self, ids: Iterable[int], role: str) -> tuple[list[int], int]:
        """``(the nodes known to have role, how many are known to have another)``."""
        ids = list(ids)
        return ([n for n in ids if self._by_node.get(n) == role],
                sum(self._by_node.get(n) not in (None, role) for n in ids))

    def ask(self, grid: Grid, ids: Iterable[int], server_round: int,
            queries: Callable[[list[int]], Iterable[Message]], timeout: float) -> None:
        """Send ``queries(nodes)`` to the nodes of ``ids`` whose role is unknown and not yet asked this round, and
        learn each answer's site name and role."""
        ask = [n for n in ids if n not in self._by_node and n not in self._asked]
        if not ask:
            return
        self._asked.update(ask)
        replies = list(grid.send_and_receive(queries(ask), timeout=timeout))
        sent = getattr(grid, "last", Exchange()).sent
        answered = []
        for msg in replies:
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                log.warning("round %d: %s did not answer the role query (%s); not sampled this round",
                            server_round, self.names.name(node), msg.error.reason)
                continue
            site = msg.content.config_records.get(SITE)
            role = str(site.get(ROLE, TRAINING)) if site is not None else TRAINING
            if role not in ROLES:
                log.warning("round %d: %s answered the role query with role %r, not one of %s; not sampled",
                            server_round, self.names.name(node), role, ", ".join(ROLES))
                continue
            if site is not None and SITE_NAME in site:
                self.names.learn(node, str(site[SITE_NAME]))
            self._by_node[node] = role
            answered.append(node)
        for node in sorted(set(ask) - {sent.get(m.metadata.reply_to_message_id) for m in replies}):
            log.warning("round %d: no answer to the role query from %s within %.0f s; not sampled this round",
                        server_round, self.names.name(node), timeout)
        if answered:
            log.info("round %d: roles: %s", server_round,
                     ", ".join(f"{self.names.name(n)} {self._by_node[n]}" for n in sorted(answered)))


def split_exchange(replies: list[Message], exchange: Exchange,
                   nodes: set[int]) -> tuple[tuple[list[Message], Exchange], tuple[list[Message], Exchange]]:
    """An exchange split into the part of the nodes not in ``nodes`` and the part of ``nodes`` (the training sites'
    and the evaluate-only sites' evaluate replies), each to be screened and logged on its own."""
    parts = []
    for keep in (lambda node: node not in nodes, lambda node: node in nodes):
        sent = {mid: node for mid, node in exchange.sent.items() if keep(node)}
        part = Exchange(sent=sent, replies=[m for m in replies if m.metadata.reply_to_message_id in sent],
                        seconds=exchange.seconds, timeout=exchange.timeout,
                        bytes_out={n: b for n, b in exchange.bytes_out.items() if keep(n)},
                        bytes_in={n: b for n, b in exchange.bytes_in.items() if keep(n)})
        parts.append((part.replies, part))
    return parts[0], parts[1]


def sample_nodes(grid: Grid, names: SiteNames, *, fraction: float, min_nodes: int, min_available: int,
                 wait_s: float, expected: Sequence[str], phase: str, server_round: int,
                 eligible: Callable[[list[int]], tuple[list[int], int]] | None = None) -> list[int]:
    """Wait (bounded, loudly) until enough nodes are connected, then sample like FedAvg does.

    Args:
        grid: Flower's grid.
        names: the site names, completed from ``NodeInfo.name`` on the way.
        fraction: ``fraction-train`` or ``fraction-evaluate``.
        min_nodes: ``min-train-nodes`` or ``min-evaluate-nodes``.
        min_available: ``min-available-nodes``.
        wait_s: ``wait-for-nodes-s``: how long to wait before giving up.
        expected: the sites expected (``sites``), named in the waiting log while they are missing.
        phase: "train" or "evaluate" (for the log).
        server_round: the global round (for the log).
        eligible: ``fn(connected node ids) -> (the nodes to sample from, how many are known to have another
            role)``; None = every connected node. ``min_nodes`` counts the connected nodes less the other role's.

    Raises:
        FederationError: fewer than ``min_available`` nodes connected, or fewer than ``min_nodes`` of them not known
            to have another role, after ``wait_s``.
    """
    need = max(min_available, min_nodes)
    start = time.monotonic()
    last_log = -math.inf
    while True:
        nodes = retry_busy(lambda: list(grid.get_nodes()), "get nodes")
        for info in nodes:
            if info.name:
                names.learn(info.node_id, info.name)
        ids = [n.node_id for n in nodes]
        chosen, other_role = eligible(ids) if eligible is not None else (ids, 0)
        if len(ids) >= min_available and len(ids) - other_role >= min_nodes:
            break
        waited = time.monotonic() - start
        connected = (names.names_of([n.node_id for n in nodes]) or "none") + (
            f"; {other_role} of them evaluate-only, which never train" if other_role else "")
        connected_sites = {names.get(n.node_id) for n in nodes}
        missing = [s for s in expected if s not in connected_sites]
        if waited >= wait_s:
            raise FederationError(
                f"round {server_round} ({phase}): gave up after waiting {wait_s:.0f} s (wait-for-nodes-s) for nodes: "
                f"{len(nodes)} connected ({connected}), "
                f"{need} needed (min-available-nodes={min_available}, min-{phase}-nodes={min_nodes}). Start the "
                "missing sites with python client/run.py --site NAME, or lower min-available-nodes / "
                f"min-{phase}-nodes")
        if waited - last_log >= WAIT_LOG_EVERY_S:
            last_log = waited
            log.warning("round %d (%s): waiting for nodes: %d connected (%s), %d needed; expected sites not "
                        "seen yet: %s; giving up in %.0f s (wait-for-nodes-s=%.0f)", server_round, phase, len(nodes),
                        connected, need, ", ".join(missing) or "-", wait_s - waited, wait_s)
        time.sleep(1.0)
    size = max(int(len(chosen) * fraction), min_nodes)
    return random.sample(chosen, min(size, len(chosen)))
