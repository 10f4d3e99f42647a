"""Differential privacy per site: DP-SGD with Opacus (sample level) and the site's privacy ledger (docs/privacy.md).

What a site's DP-SGD protects: each training **slice** (the sample ``train_model`` draws), within that site. A case
contributes ``slices_per_case`` slices, so the guarantee for a whole case is weaker (group privacy); see the docs.

- **Accounting** is Opacus's RDP accountant; its history is a list of ``(noise_multiplier, sample_rate, steps)``
  tuples. ε is cumulative over a federation's rounds: the site restores the history before training, Opacus adds this
  round's steps, and the site stores the result again (:class:`PrivacyLedger`). Flower starts a fresh ClientApp
  process for every message, so the history has to live outside the process.
- **Sampling** is Opacus's Poisson sampling (``make_private(poisson_sampling=True)``): the accountant's amplification
  by subsampling assumes it. Batches vary in size and can be empty; an empty batch is still a (noise-only) step.
- **σ from a target ε**: Opacus's ``get_noise_multiplier`` over all planned epochs of the federation
  (``num-server-rounds`` × local epochs), from a zero start, so a site that trains every round ends at ε ≈ target.
  ``make_private_with_epsilon`` is not used: it assumes an empty history and would spend the whole target in each
  round.
- **Randomness the centre cannot replay.** The run's ``train.seed`` is in the run config, which the centre knows, so
  DP-SGD's noise and its Poisson sampling draw from generators seeded from the operating system's entropy instead:
  with the seed, anyone could recompute the noise (and subtract it) and the batches (and undo the amplification by
  subsampling). DP training is therefore not bit-for-bit reproducible. The generators are PyTorch's, not a CSPRNG
  (Opacus's ``secure_mode`` needs ``torchcsprng``, not a dependency).
- **Budget**: a round is trained only if the ε after it (computed before training: σ, q and the number of steps are
  known in advance) stays within the cap, so the cap is never overspent; a refused round raises
  :class:`PrivacyBudgetSpent` before any step.

Nothing here imports ``flwr``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from braintumnet.config import PrivacyConfig
from braintumnet.errors import BrainTumNetError
from braintumnet.io import PRIVATE, atomic_write_json

log = logging.getLogger("braintumnet.privacy")

History = list[tuple[float, float, int]]
# Slack when comparing a planned ε with the cap: composing a round's RDP onto a restored history and computing it
# for all steps at once differ in the last bits; without slack, a run planned to end exactly at target-epsilon
# could refuse its last round.
CAP_SLACK = 1e-6


class PrivacyBudgetSpent(BrainTumNetError):
    """Training this round would take the site's cumulative ε above ``dp.max-epsilon``; no step was taken."""

    def __init__(self, spent: float, after: float, budget: float, delta: float):
        self.spent, self.after, self.budget = spent, after, budget
        super().__init__(
            f"privacy budget spent: epsilon {spent:.3f} so far, {after:.3f} after this round, dp.max-epsilon "
            f"{budget:g} (delta {delta:g}); this site no longer trains in this federation and still evaluates. "
            "Raise dp.max-epsilon or dp.noise-multiplier for a new federation to train further")


def epsilon(history: Iterable[Sequence], delta: float) -> float:
    """Cumulative ε at ``delta`` of an RDP history (0 for an empty one), by Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, q, steps in _tuples(history):  # merge equal (σ, q) runs: RDP is linear in steps, one evaluation each
        if accountant.history and accountant.history[-1][:2] == (sigma, q):
            accountant.history[-1] = (sigma, q, accountant.history[-1][2] + steps)
        else:
            accountant.history.append((sigma, q, steps))
    return accountant.get_epsilon(delta) if accountant.history else 0.0


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, epochs: int) -> float:
    """σ that takes ε from 0 to ``target_epsilon`` after ``epochs`` epochs at ``sample_rate`` (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      epochs=epochs, accountant="rdp"))


@dataclass
class PrivateTraining:
    """DP-SGD for one call of ``braintumnet.engine.train_model``: plan the round, wrap, train, unwrap, account.

    Args:
        config: the run's ``dp.*`` settings.
        history: the site's accountant history so far (:meth:`PrivacyLedger.load`); updated in place by
            :meth:`detach`.

    Example::

        dp = PrivateTraining(profile.privacy, ledger.load())
        train_model(model, sites, profile, device, epochs=1, privacy=dp)
        ledger.save(dp.history, dp.epsilon)
    """

    config: PrivacyConfig
    history: History = field(default_factory=list)
    noise_multiplier: float = math.nan
    sample_rate: float = math.nan
    _engine: object = None

    def __post_init__(self) -> None:
        self.history = _tuples(self.history)

    @property
    def epsilon(self) -> float:
        """The cumulative ε at ``dp.delta`` of :attr:`history`."""
        return epsilon(self.history, self.config.delta)

    def plan(self, num_examples: int, steps_per_epoch: int, epochs: int, total_epochs: int) -> float:
        """Check δ and the budget for a round of ``epochs`` epochs; returns σ.

        Args:
            num_examples: training slices (n); δ must be below 1/n.
            steps_per_epoch: the non-private loader's batches per epoch; Opacus samples each slice with rate
                ``1 / steps_per_epoch``, so an epoch is that many steps of expected size n·q.
            epochs: this round's epochs.
            total_epochs: all planned epochs of the federation (for σ from ``dp.target-epsilon``).

        Raises:
            BrainTumNetError: δ is not below 1/n.
            PrivacyBudgetSpent: the ε after this round would exceed ``dp.max-epsilon``.
        """
        cfg = self.config
        if cfg.delta * num_examples >= 1:
            raise BrainTumNetError(
                f"dp.delta={cfg.delta:g} is not below 1/n for this site's n={num_examples} training slices: "
                f"any δ ≥ 1/n allows leaking a whole slice. Set dp.delta below {1 / num_examples:.1e}")
        self.sample_rate = 1.0 / steps_per_epoch
        self.noise_multiplier = cfg.noise_multiplier or noise_for_target(
            cfg.target_epsilon, cfg.delta, self.sample_rate, max(total_epochs, epochs))
        spent = self.epsilon
        after = epsilon(self.history + [(self.noise_multiplier, self.sample_rate, epochs * steps_per_epoch)],
                        cfg.delta)
        if after > cfg.budget * (1 + CAP_SLACK):
            raise PrivacyBudgetSpent(spent, after, cfg.budget, cfg.delta)
        return self.noise_multiplier

    def attach(self, model: nn.Module, optimizer, loader: DataLoader):
        """Wrap for DP-SGD (call :meth:`plan` first): per-sample gradients, clipping, noise, Poisson sampling.

        Returns:
            ``(GradSampleModule, DPOptimizer, DPDataLoader)``; the caller's ``model`` object is the wrapped module,
            so its state-dict keys stay those of the plain model.
        """
        from opacus import PrivacyEngine

        device = next(model.parameters()).device  # Opacus draws the noise on the parameters' device
        noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        loader.generator = torch.Generator().manual_seed(secrets.randbits(63))  # DPDataLoader samples with it
        with warnings.catch_warnings():
            # "Secure RNG turned off": deliberate and documented (docs/privacy.md); one warning per round is noise.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = list(self.history)
        self._engine = engine
        return engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                   noise_multiplier=self.noise_multiplier, max_grad_norm=self.config.max_grad_norm,
                                   poisson_sampling=True, noise_generator=noise)

    def detach(self, wrapped: nn.Module) -> nn.Module:
        """Remove Opacus's hooks and per-sample gradients; keep the accountant's new history. Returns the module."""
        if self._engine is not None:
            self.history = _tuples(self._engine.accountant.history)
            self._engine = None
        return wrapped.to_standard_module() if hasattr(wrapped, "to_standard_module") else wrapped


class PrivacyLedger:
    """One site's accountant history for one federation, in a JSON file in the site's cache folder.

    ``<cache>/privacy/<site>/<federation-id>.json``. Kept on disk rather than in Flower's ``context.state`` (which
    does persist across the messages of a run, in both deployment and simulation, Flower 1.42) because a SuperNode
    holds that state in memory: a SuperNode restart would silently reset ε to 0, and a federation resumed with
    ``resume-from`` is a new Flower run with a new context. The federation id survives both. Every trained round
    is added, also one that a resumed federation repeats: its first update was sent, so it was spent.
    """

    def __init__(self, cache_root: Path, site: str, federation_id: str):
        self.path = Path(cache_root) / "privacy" / _safe(site) / f"{_safe(federation_id)}.json"

    def load(self) -> History:
        if not self.path.is_file():
            return []
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return _tuples(doc["history"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Starting again from 0 would understate ε: refuse instead.
            raise BrainTumNetError(f"{self.path}: unreadable privacy ledger ({type(exc).__name__}); restore it from "
                                   "a backup, or start a new federation (a new ledger)") from None

    def save(self, history: History, spent: float, delta: float, server_round: int) -> Path:
        """Write atomically; ``rounds`` keeps the ε after each trained round for the site's own records."""
        rounds = []
        if self.path.is_file():
            try:
                rounds = json.loads(self.path.read_text(encoding="utf-8")).get("rounds", [])
            except (OSError, ValueError):
                rounds = []
        rounds.append({"round": server_round, "epsilon": spent})
        doc = {"accountant": "rdp", "delta": delta, "history": [list(h) for h in history], "rounds": rounds}
        return atomic_write_json(self.path, doc, indent=1, mode=PRIVATE)


def _tuples(history: Iterable[Sequence]) -> History:
    """Opacus merges consecutive equal ``(σ, q)`` steps only when entries are tuples (JSON gives lists)."""
    return [(float(s), float(q), int(n)) for s, q, n in history]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"
