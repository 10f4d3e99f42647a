"""Which node is which site, and waiting for enough of them.

- **Names.** A node's site name is ``NodeInfo.name`` when the SuperLink knows it (SuperNode authentication), else the
  ``site`` record its ClientApp sends; a site that restarts comes back as a new node and takes its name along.
- **Never waits silently.** Sampling logs which nodes are connected (by site name once known) and which expected
  sites are missing, every 15 s, and gives up after ``wait-for-nodes-s`` with an error saying what to do.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence

from flwr.serverapp import Grid

from server.settings import FederationError
from server.transport import retry_busy

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


def sample_nodes(grid: Grid, names: SiteNames, *, fraction: float, min_nodes: int, min_available: int,
                 wait_s: float, expected: Sequence[str], phase: str, server_round: int) -> list[int]:
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

    Raises:
        FederationError: fewer than ``max(min_available, min_nodes)`` nodes connected after ``wait_s``.
    """
    need = max(min_available, min_nodes)
    start = time.monotonic()
    last_log = -math.inf
    while True:
        nodes = retry_busy(lambda: list(grid.get_nodes()), "get nodes")
        for info in nodes:
            if info.name:
                names.learn(info.node_id, info.name)
        if len(nodes) >= need:
            break
        waited = time.monotonic() - start
        connected = names.names_of([n.node_id for n in nodes]) or "none"
        connected_sites = {names.get(n.node_id) for n in nodes}
        missing = [s for s in expected if s not in connected_sites]
        if waited >= wait_s:
            raise FederationError(
                f"round {server_round} ({phase}): gave up after waiting {wait_s:.0f} s (wait-for-nodes-s) for nodes: "
                f"{len(nodes)} connected ({connected}), {need} needed (min-available-nodes="
                f"{min_available}, min-{phase}-nodes={min_nodes}). Start the missing sites with "
                f"python client/run.py --site NAME, or lower min-available-nodes / min-{phase}-nodes")
        if waited - last_log >= WAIT_LOG_EVERY_S:
            last_log = waited
            log.warning("round %d (%s): waiting for nodes: %d connected (%s), %d needed; expected sites not "
                        "seen yet: %s; giving up in %.0f s (wait-for-nodes-s=%.0f)", server_round, phase, len(nodes),
                        connected, need, ", ".join(missing) or "-", wait_s - waited, wait_s)
        time.sleep(1.0)
    ids = [n.node_id for n in nodes]
    size = max(int(len(ids) * fraction), min_nodes)
    return random.sample(ids, min(size, len(ids)))
