"""A site's Adam state between federated rounds, kept in the site's cache (never sent anywhere).

Why: §2.1.4 trains with Adam. A site that builds a fresh Adam for every round restarts its moment estimates from 0
every few epochs, and Adam's first steps after a restart are sign-like steps of size ``lr`` on every weight. Measured
on the quick study's data: centralized training cut into 10 chunks of 3 epochs with a fresh Adam per chunk ended at
tumour Dice 0.000, where the same 30 epochs with one Adam reached 0.233. With the moments kept, each site continues
its own Adam across rounds while the weights it starts from are the new global average (the usual "local optimizer
state" FedAvg variant). It does not make up for the other cost of FedAvg at equal epochs: the global model moves by
one site's steps per round, not by the sum of them (docs/study.md).

The state is keyed by the federation id the centre sends (it survives ``resume-from`` and a SuperNode restart) and
lives at ``<cache>/optimizer/<site>/<federation-id>.pt``. The file is deleted after the last round. Adam's moments
are functions of the site's gradients, so they stay with the data, like the data itself. Under DP-SGD they are
functions of the privatised gradients (post-processing), so keeping them costs no ε.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from braintumnet.io import PRIVATE, atomic_write

log = logging.getLogger("braintumnet.optimizer_state")


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Adam (§2.1.4); the learning rate is set again at every step by the cosine schedule."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate)


class OptimizerMemory:
    """One site's optimizer state for one federation, in ``<cache>/optimizer/<site>/<federation-id>.pt``."""

    def __init__(self, cache_root: Path, site: str, federation_id: str):
        self.path = Path(cache_root) / "optimizer" / _safe(site) / f"{_safe(federation_id)}.pt"

    def restore(self, optimizer: torch.optim.Optimizer) -> bool:
        """Load the saved state into ``optimizer`` when it fits; True when it did.

        A missing file is the first round. An unreadable file or one that does not fit this model (other shapes)
        is logged and ignored: Adam then starts afresh, which costs accuracy, never correctness.
        """
        if not self.path.is_file():
            return False
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            _check_fits(state, optimizer)
            optimizer.load_state_dict(state)
        except Exception as exc:  # any unreadable or foreign file: start afresh rather than fail the round
            log.warning("%s: optimizer state not used (%s: %s); Adam starts afresh this round", self.path,
                        type(exc).__name__, exc)
            return False
        return True

    def save(self, optimizer: torch.optim.Optimizer) -> Path:
        """Write atomically (a crash mid-write leaves the previous round's state)."""
        return atomic_write(self.path, lambda f: torch.save(optimizer.state_dict(), f), mode=PRIVATE)

    def forget(self) -> None:
        """After the last round: nothing will continue from it."""
        self.path.unlink(missing_ok=True)


def _check_fits(state: dict, optimizer: torch.optim.Optimizer) -> None:
    """``Optimizer.load_state_dict`` checks the number of parameters, not their shapes: check the shapes too."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state.get("state", {})
    for index, param in enumerate(params):
        for name, value in saved.get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"parameter {index} has shape {tuple(param.shape)}, the saved {name} "
                                 f"{tuple(value.shape)}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"
