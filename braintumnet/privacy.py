"""Differential privacy per site: DP-SGD with Opacus (sample level) and the site's privacy ledger (docs/privacy.md).

What a site's DP-SGD protects: each training **slice** (the sample ``train_model`` draws), within that site: ε is
record-level, per slice. A case contributes ``slices_per_case`` slices, so the guarantee for a whole case (a
patient) is that of a group of k slices (:func:`group_privacy`), much weaker; see the docs.

- **Accounting** is Opacus's RDP accountant; its history is a list of ``(noise_multiplier, sample_rate, steps)``
  tuples. The site's :class:`PrivacyLedger` holds one line per trained round of every federation, in the site's
  state directory; a federation's ε is the RDP composition of its lines, the site's lifetime ε that of all lines.
  Flower starts a fresh ClientApp process for every message, so the history has to live outside the process.
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
  known in advance) stays within every cap (the run's ``dp.max-epsilon`` and the site policy's per-federation and
  lifetime caps, :class:`EpsilonLimit`), so no cap is ever overspent; a refused round raises
  :class:`PrivacyBudgetSpent` before any step.

Nothing here imports ``flwr``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from braintumnet.config import PrivacyConfig
from braintumnet.errors import BrainTumNetError
from braintumnet.site_policy import LEDGER, check_noise_floor, safe_name, site_journal

log = logging.getLogger("braintumnet.privacy")

History = list[tuple[float, float, int]]
# Slack when comparing a planned ε with the cap: composing a round's RDP onto a restored history and computing it
# for all steps at once differ in the last bits; without slack, a run planned to end exactly at target-epsilon
# could refuse its last round.
CAP_SLACK = 1e-6


class PrivacyBudgetSpent(BrainTumNetError):
    """Training this round would take an ε above one of the caps (``rule``); no step was taken.

    Attributes:
        spent: this federation's ε so far at the run's ``dp.delta`` (what the reply reports).
        after, budget, rule: the ε the round would have reached under the cap that refused it, the cap, its name.
    """

    def __init__(self, rule: str, spent: float, so_far: float, after: float, budget: float, delta: float):
        self.rule, self.spent, self.after, self.budget = rule, spent, after, budget
        advice = ("Raise dp.max-epsilon or dp.noise-multiplier for a new federation to train further"
                  if rule == "dp.max-epsilon" else "the site's own policy sets this cap (its site config)")
        scope = "in any federation" if rule.endswith("lifetime") else "in this federation"
        super().__init__(
            f"privacy budget spent: epsilon {so_far:.3f} so far, {after:.3f} after this round, {rule} {budget:g} "
            f"(per slice, delta {delta:g}); this site no longer trains {scope} and still evaluates. {advice}")


@dataclass(frozen=True)
class EpsilonLimit:
    """A cap on the ε of ``history`` at ``delta`` (besides the run's own ``dp.max-epsilon``), named ``rule``."""

    rule: str
    cap: float
    history: History
    delta: float


def epsilon(history: Iterable[Sequence], delta: float) -> float:
    """Cumulative ε at ``delta`` of an RDP history (0 for an empty one), as Opacus's RDP accountant computes it.

    The accountant sums ``compute_rdp(q, σ, steps)`` over its history; that is ``steps`` × the RDP of one step, so
    the per-step RDP of each ``(σ, q)`` is computed once per process and scaled (a site's ledger holds the same
    ``(σ, q)`` on many lines, and each RDP evaluation costs about 0.1-0.3 s here).
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    history = _tuples(history)
    if not history:
        return 0.0
    total = sum(np.asarray(_rdp_of_one_step(sigma, q)) * steps for sigma, q, steps in history)
    eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(sigma: float, q: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return tuple(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


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
        history: this federation's accountant history so far (:meth:`PrivacyLedger.history`); updated in place by
            :meth:`detach`.
        limits: the site policy's caps, checked with the run's ``dp.max-epsilon`` before the round.
        min_noise_multiplier: the site policy's floor on σ (checked once σ is known).

    Example::

        with PrivacyLedger(state_dir, "yibin").locked() as ledger:
            dp = PrivateTraining(profile.privacy, ledger.history("fed-1"))
            train_model(model, sites, profile, device, epochs=1, privacy=dp)
            ledger.record(dp, federation_id="fed-1", run_id="7", server_round=1, before=ledger.history("fed-1"))
    """

    config: PrivacyConfig
    history: History = field(default_factory=list)
    limits: Sequence[EpsilonLimit] = ()
    min_noise_multiplier: float = 0.0
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
            PolicyRefusal: σ is below the site's ``min-noise-multiplier``.
            PrivacyBudgetSpent: the ε after this round would exceed ``dp.max-epsilon`` or a site cap.
        """
        cfg = self.config
        if cfg.delta * num_examples >= 1:
            raise BrainTumNetError(
                f"dp.delta={cfg.delta:g} is not below 1/n for this site's n={num_examples} training slices: "
                f"any δ ≥ 1/n allows leaking a whole slice. Set dp.delta below {1 / num_examples:.1e}")
        self.sample_rate = 1.0 / steps_per_epoch
        self.noise_multiplier = cfg.noise_multiplier or noise_for_target(
            cfg.target_epsilon, cfg.delta, self.sample_rate, max(total_epochs, epochs))
        check_noise_floor(self.noise_multiplier, self.min_noise_multiplier)
        this_round = (self.noise_multiplier, self.sample_rate, epochs * steps_per_epoch)
        for limit in (EpsilonLimit("dp.max-epsilon", cfg.budget, self.history, cfg.delta), *self.limits):
            if not (limit.cap > 0 and math.isfinite(limit.cap)):
                continue
            after = epsilon(limit.history + [this_round], limit.delta)
            if after > limit.cap * (1 + CAP_SLACK):
                raise PrivacyBudgetSpent(limit.rule, self.epsilon, epsilon(limit.history, limit.delta), after,
                                         limit.cap, limit.delta)
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
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm, poisson_sampling=True, noise_generator=noise)
        dp_loader.collate_fn = EmptyBatchCollate(loader.collate_fn, loader.dataset)
        return wrapped, dp_optimizer, dp_loader

    def detach(self, wrapped: nn.Module) -> nn.Module:
        """Remove Opacus's hooks and per-sample gradients; keep the accountant's new history. Returns the module."""
        if self._engine is not None:
            self.history = _tuples(self._engine.accountant.history)
            self._engine = None
        return wrapped.to_standard_module() if hasattr(wrapped, "to_standard_module") else wrapped


class EmptyBatchCollate:
    """The DP loader's collate: an empty Poisson-sampled batch as zero-length tensors with the dataset's keys.

    Why: Opacus (1.5, 1.6) builds an empty batch that comes first in an epoch from ``dataset[0]`` as if a sample were a
    tuple of tensors, and our samples are dicts (``image``, ``mask``, ``label``): the site's round failed with a
    TypeError. With n slices at sample rate q an epoch starts empty with probability (1 - q)^n: 3 % for 12 slices in
    batches of 3 (q = 1/4). The empty batch is then a noise-only step, as any other empty batch.
    """

    def __init__(self, collate, dataset) -> None:
        self.collate, self.dataset, self.template = collate, dataset, None

    def __call__(self, batch: list):
        if batch:
            return self.collate(batch)
        if self.template is None:  # read once, and only when needed: a sample draws the augmentation's randomness
            self.template = self.collate([self.dataset[0]])
        return {key: value[:0] for key, value in self.template.items()}


class PrivacyLedger:
    """The site's ε ledger: one JSON line per trained round of every federation, in the site's state directory.

    ``<state-dir>/<site>/privacy-ledger.jsonl``, append-only, one line per spent round: ``federation_id``,
    ``run_id``, ``round``, ``epsilon`` (that round alone) and ``epsilon_federation`` (the federation's after it), both
    at ``delta`` (the run's ``dp.delta``), ``noise_multiplier``, ``sample_rate``, ``steps``, ``time``. Not the cache
    (a cache may be wiped and rebuilt; the ledger may not), and not Flower's ``context.state`` (memory only: a
    SuperNode restart or a resumed federation, a new Flower run, would start from 0).

    Read, train and append inside one :meth:`locked` block: the lock is held across all of it, so a second run at
    this site waits and then reads the first one's line. A ledger that goes missing after its first line is an error
    (:class:`braintumnet.site_policy.Journal`). Every trained round is added, also one that a resumed federation
    repeats: its first update was sent, so it was spent.

    Args:
        state_dir: the site's state directory (``state-dir`` of its site config).
        site: the site's name.
        cache_root: the site's cache root: a witness that the ledger exists goes there, and a ledger of the previous
            format (``<cache>/privacy/<site>/<federation-id>.json``) is taken over from there once.
    """

    FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "federation_id": str, "noise_multiplier": (int, float), "sample_rate": (int, float), "steps": int}

    def __init__(self, state_dir: Path, site: str, cache_root: Path | None = None):
        self.journal = site_journal(state_dir, site, LEDGER, cache_root)
        self.path = self.journal.path
        self._legacy = Path(cache_root) / "privacy" / safe_name(site) if cache_root is not None else None
        self.entries: list[dict] = []

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the ledger's lock, with its lines read (:attr:`entries`)."""
        with self.journal.locked():
            self.entries = self.journal.entries()
            for number, entry in enumerate(self.entries, 1):
                if not all(isinstance(entry.get(k), t) for k, t in self.FIELDS.items()):
                    raise BrainTumNetError(f"{self.path}, line {number}: not a ledger line (it needs "
                                           f"{sorted(self.FIELDS)}); restore the file from a backup")
            if not self.entries and self._legacy is not None and self._legacy.is_dir():
                self._take_over_legacy()
            yield self

    def history(self, federation_id: str | None = None) -> History:
        """The accountant history of one federation, or of every federation (the site's lifetime)."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries
                if federation_id is None or e["federation_id"] == federation_id]

    def epsilon(self, federation_id: str | None, delta: float) -> float:
        """ε at ``delta`` of one federation (or of all of them: the lifetime), by RDP composition of its lines."""
        return epsilon(self.history(federation_id), delta)

    def record(self, dp: PrivateTraining, *, federation_id: str, run_id: str, server_round: int,
               before: History) -> dict:
        """Append the round ``dp`` just trained (its history beyond ``before``); returns the line."""
        steps = sum(n for _, _, n in dp.history) - sum(n for _, _, n in before)
        delta = dp.config.delta
        this_round = (dp.noise_multiplier, dp.sample_rate, steps)
        entry = {"federation_id": federation_id, "run_id": str(run_id), "round": server_round,
                 "epsilon": epsilon([this_round], delta),
                 "epsilon_federation": epsilon(self.history(federation_id) + [this_round], delta),
                 "noise_multiplier": dp.noise_multiplier, "sample_rate": dp.sample_rate, "steps": steps,
                 "delta": delta}
        self._append(entry)
        return entry

    def _append(self, entry: dict) -> None:
        self.journal.append(entry)
        self.entries.append(entry)

    def _take_over_legacy(self) -> None:
        """Copy the previous format's per-federation ledgers in, once, so their ε keeps counting."""
        for old in sorted(self._legacy.glob("*.json")):
            try:
                doc = json.loads(old.read_text(encoding="utf-8"))
                history, delta = _tuples(doc["history"]), float(doc.get("delta", 1e-5))
            except (OSError, ValueError, KeyError, TypeError):
                raise BrainTumNetError(f"{old}: unreadable privacy ledger of the previous format; restore it from a "
                                       "backup before this site trains again") from None
            for sigma, q, steps in history:
                self._append({"federation_id": old.stem, "run_id": "migrated", "round": None,
                              "epsilon": epsilon([(sigma, q, steps)], delta), "epsilon_federation": None,
                              "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": delta,
                              "migrated_from": str(old)})
            log.info("privacy ledger: took over %s (%d entries) into %s", old, len(history), self.path)


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """The (ε, δ) a group of ``k`` records gets from (ε, δ)-DP per record: ``(k·ε, k·e^((k-1)ε)·δ)``.

    Group privacy for (ε, δ)-DP (Dwork & Roth 2014, §2.3; Vadhan 2017, Lemma 2.2). Here a record is a slice and the
    group a patient's ``slices_per_case`` slices. The δ bound grows fast: at or above 1 it says nothing (inf when the
    exponential overflows).
    """
    try:
        group_delta = k * math.exp((k - 1) * eps) * delta
    except OverflowError:
        group_delta = math.inf
    return k * eps, group_delta


def _tuples(history: Iterable[Sequence]) -> History:
    """Opacus merges consecutive equal ``(σ, q)`` steps only when entries are tuples (JSON gives lists)."""
    return [(float(s), float(q), int(n)) for s, q, n in history]
