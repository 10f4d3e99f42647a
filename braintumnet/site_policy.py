"""A hospital's own rules for what a federation may do with its data, and the site's append-only journals.

The run config is the centre's: it can switch DP off, pick a tiny noise multiplier, set no ε cap, ask for new data
settings (each one a new prepared cache) or evaluate without end. What a site allows is the site's decision, so the
rules live in the site's own config (``client/sites.toml``, a ``policy`` table per site, typed here once as
:class:`SitePolicy`) and the site checks every message against them before it trains or evaluates. A run that breaks
a rule is refused with :class:`PolicyRefusal`, which names the rule only (the centre sees that, never a count or a
value of the site's data; the detail goes to the site's own log).

What a site must remember across runs (the ε it spent, the evaluations it answered) lives in its **state
directory** (``state-dir`` in the site config), not in the cache: a cache can be wiped and rebuilt at any time, a
ledger cannot. Each record is a :class:`Journal`: an append-only JSON-lines file written under an exclusive ``flock``
that the caller holds across read, check, work and append, so two runs at one site take turns instead of both
reading the same ε. A marker file beside it (and a witness in the site's cache) says that the journal exists: a
journal that goes missing afterwards is an error, not a fresh start.

Nothing here imports ``flwr``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from braintumnet.config import DataConfig
from braintumnet.errors import BrainTumNetError

try:
    import fcntl
except ImportError:  # Windows: no site runs there (the SuperNode images are Linux), but the core must import
    fcntl = None

log = logging.getLogger("braintumnet.client")

# The data settings a run may ask for are pinned as a whole: every field of DataConfig, by its run-config name.
DATA_KEYS = {"img-size": "img_size", "slices-per-case": "slices_per_case", "fov-mm": "fov_mm", "task": "task"}


class PolicyRefusal(BrainTumNetError):
    """A run asked for something the site's policy does not allow; nothing was trained or evaluated.

    ``str()`` names the rule only, so it can travel to the centre; :attr:`detail` (the run's value against the
    site's limit) stays in the site's log.
    """

    def __init__(self, rule: str, detail: str):
        self.rule, self.detail = rule, detail
        super().__init__(f"refused by the site's policy, rule {rule}")


@dataclass(frozen=True)
class SitePolicy:
    """What this site allows a federation to do. Field ``x_y`` is key ``x-y`` of a site config's ``policy`` table.

    The defaults are a hospital's: DP-SGD required with a floor on the noise, single-digit ε per federation and a
    lifetime cap, evaluations capped, no metric from a handful of test cases, three decimals. ε here is per training
    slice (record-level DP), at ``delta``; see docs/privacy.md for what it means for a patient.

    Args:
        dp_required: train only runs with ``dp.enabled = true``.
        min_noise_multiplier: the smallest σ a run may train with (given, or derived from ``dp.target-epsilon``);
            0 = any.
        max_epsilon_per_federation: the most ε one federation may spend at this site; 0 = no cap.
        max_epsilon_lifetime: the most ε all federations together may ever spend at this site; 0 = no cap.
        delta: δ of the site's caps; a run with a larger ``dp.delta`` is refused.
        max_evaluations_per_federation: evaluations (each releases metrics over the test split) one federation may
            ask for, evaluate-in-train included; 0 = no cap.
        min_test_cases: no evaluation on a test split with fewer cases (an aggregate of a few cases is close to a
            single patient's values).
        metric_decimals: evaluation metrics are rounded to this many decimals before they leave; -1 = not rounded.
        allowed_data: the data settings a run may ask for (each asks for a prepared cache of its own); None = any.
    """

    dp_required: bool = True
    min_noise_multiplier: float = 0.8
    max_epsilon_per_federation: float = 8.0
    max_epsilon_lifetime: float = 16.0
    delta: float = 1e-5
    max_evaluations_per_federation: int = 200
    min_test_cases: int = 10
    metric_decimals: int = 3
    allowed_data: tuple[DataConfig, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("min_noise_multiplier", "max_epsilon_per_federation", "max_epsilon_lifetime",
                     "max_evaluations_per_federation", "min_test_cases"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_key(name)}={getattr(self, name)}: use a value >= 0 (0 = no limit)")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta}: use a value in (0, 1), e.g. 1e-5")
        if self.metric_decimals < -1:
            raise ValueError(f"metric-decimals={self.metric_decimals}: use a number of decimals, or -1 for none")

    def summary(self) -> list[str]:
        """One line per rule, for the site's preflight and log."""
        def cap(value: float) -> str:
            return f"{value:g}" if value else "no cap"

        data = ("any" if self.allowed_data is None else "; ".join(
            f"{d.img_size} px, {d.slices_per_case} slices per case, {d.fov_mm:g} mm, {d.task}"
            for d in self.allowed_data))
        dp = "required" if self.dp_required else "not required"
        decimals = "full precision" if self.metric_decimals < 0 else f"{self.metric_decimals} decimals"
        return [
            f"DP-SGD:         {dp}, noise multiplier >= {self.min_noise_multiplier:g}, delta <= {self.delta:g}",
            (f"epsilon caps:   {cap(self.max_epsilon_per_federation)} per federation, "
             f"{cap(self.max_epsilon_lifetime)} over the site's lifetime (per slice, at delta {self.delta:g})"),
            (f"evaluations:    {cap(self.max_evaluations_per_federation)} per federation, at least "
             f"{self.min_test_cases} test cases, metrics rounded to {decimals}"),
            f"data settings:  {data}"]


# Simulated sites are the tester's own synthetic hospitals: nothing to protect, every setting allowed.
SIMULATION_POLICY = SitePolicy(dp_required=False, min_noise_multiplier=0.0, max_epsilon_per_federation=0.0,
                               max_epsilon_lifetime=0.0, delta=0.5, max_evaluations_per_federation=0,
                               min_test_cases=0, metric_decimals=-1, allowed_data=None)

def _key(name: str) -> str:
    return name.replace("_", "-")


POLICY_KEYS = tuple(_key(f.name) for f in fields(SitePolicy))


def policy_from_table(table: Mapping[str, Any], default_data: DataConfig, where: str) -> SitePolicy:
    """Type a site config's ``policy`` table; ``allowed-data`` defaults to ``[default_data]``.

    Args:
        table: the merged ``[defaults.policy]`` and ``[site.NAME.policy]`` keys.
        default_data: the data settings the site prepares its cache for (its ``run-config`` table's).
        where: the file and table, for messages.

    Raises:
        BrainTumNetError: an unknown key (the message lists the known ones) or a value of the wrong type or range.
    """
    unknown = sorted(set(table) - set(POLICY_KEYS))
    if unknown:
        raise BrainTumNetError(f"{where}: unknown policy key(s) {unknown}; known keys: {sorted(POLICY_KEYS)}")
    values: dict[str, Any] = {}
    for f in fields(SitePolicy):
        key = _key(f.name)
        if key not in table or f.name == "allowed_data":
            continue
        value, default = table[key], f.default
        if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, (bool, int, float)) or (
                isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int)):
            raise BrainTumNetError(f"{where}: {key} = {value!r}: expected {type(default).__name__}, e.g. "
                                   f"{key} = {json.dumps(default)}")
        values[f.name] = value
    values["allowed_data"] = _allowed_data(table.get("allowed-data"), default_data, where)
    try:
        return SitePolicy(**values)
    except ValueError as exc:
        raise BrainTumNetError(f"{where}: {exc}") from None


def _allowed_data(value: Any, default_data: DataConfig, where: str) -> tuple[DataConfig, ...]:
    if value is None:
        return (default_data,)
    example = 'allowed-data = [{ img-size = 256, slices-per-case = 20 }]'
    if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) for v in value):
        raise BrainTumNetError(f"{where}: allowed-data must be a list of tables, e.g. {example}")
    out = []
    for entry in value:
        bad = sorted(set(entry) - set(DATA_KEYS))
        if bad:
            raise BrainTumNetError(f"{where}: allowed-data has unknown key(s) {bad}; known keys: {sorted(DATA_KEYS)}")
        try:  # a key left out takes DataConfig's default (the paper's), so every entry pins all settings
            out.append(DataConfig(**{DATA_KEYS[k]: v for k, v in entry.items()}))
        except (TypeError, ValueError) as exc:
            raise BrainTumNetError(f"{where}: allowed-data entry {dict(entry)}: {exc}") from None
    return tuple(out)


def check_data(policy: SitePolicy, data: DataConfig) -> None:
    """Refuse data settings the site has not allowed (before a cache for them could be prepared)."""
    if policy.allowed_data is not None and data not in policy.allowed_data:
        raise PolicyRefusal("allowed-data", f"the run asks for {data}; the site allows {list(policy.allowed_data)}")


def check_training(policy: SitePolicy, data: DataConfig, privacy) -> None:
    """What can be checked before the site opens its data: the data settings, DP on, σ (when given), δ.

    Args:
        privacy: the run's :class:`braintumnet.config.PrivacyConfig`. A σ derived from ``dp.target-epsilon`` is
            known only once the site's sample rate is: :class:`braintumnet.privacy.PrivateTraining` checks it then.
    """
    check_data(policy, data)
    if not privacy.enabled:
        if policy.dp_required:
            raise PolicyRefusal("dp-required", "the run has dp.enabled=false; this site trains only with DP-SGD")
        return
    check_noise_floor(privacy.noise_multiplier, policy.min_noise_multiplier)
    if privacy.delta > policy.delta:
        raise PolicyRefusal("delta", f"the run's dp.delta={privacy.delta:g} is above the site's {policy.delta:g}")


def check_noise_floor(sigma: float, minimum: float) -> None:
    """Refuse a noise multiplier below the site's ``min-noise-multiplier`` (0 = σ not known yet)."""
    if sigma and sigma < minimum:
        raise PolicyRefusal("min-noise-multiplier", f"the run's noise multiplier {sigma:.4g} is below the site's "
                                                    f"minimum {minimum:g}")


def check_evaluation(policy: SitePolicy, done: int, test_cases: int) -> None:
    """Refuse an evaluation beyond the cap (``done`` = this federation's evaluations so far) or on too few cases."""
    cap = policy.max_evaluations_per_federation
    if cap and done >= cap:
        raise PolicyRefusal("max-evaluations-per-federation",
                            f"this federation has had {done} evaluations; the site allows {cap}")
    if test_cases < policy.min_test_cases:
        raise PolicyRefusal("min-test-cases", f"the test split has {test_cases} cases; the site's minimum is "
                                              f"{policy.min_test_cases}")


def rounded(metrics: Mapping[str, Any], keys, decimals: int) -> dict[str, Any]:
    """``metrics`` with the float values of ``keys`` rounded to ``decimals`` (-1 = unchanged; NaN stays NaN)."""
    out = dict(metrics)
    if decimals >= 0:
        for k in keys:
            if isinstance(out.get(k), float) and math.isfinite(out[k]):
                out[k] = round(out[k], decimals)
    return out


def default_state_dir() -> Path:
    """``$BRAINTUMNET_STATE``, else ``$XDG_STATE_HOME/braintumnet``, else ``~/.local/state/braintumnet``."""
    explicit = os.environ.get("BRAINTUMNET_STATE")
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser().absolute() / "braintumnet"


class Journal:
    """An append-only JSON-lines file under an exclusive lock, with a marker (and a witness) that it exists.

    ``<folder>/<name>.jsonl`` holds the lines, ``<name>.lock`` is what ``flock`` locks (the journal itself may not
    exist yet), ``<name>.started`` is written before the first line. ``witness`` (a folder in the site's cache, which
    outlives a lost state directory in a container without a volume for it) records where the journal lives. Read
    and append only inside :meth:`locked`.
    """

    def __init__(self, folder: Path, name: str, witness: Path | None = None):
        folder = Path(folder)
        self.path = folder / f"{name}.jsonl"
        self.lock_path = folder / f"{name}.lock"
        self.marker = folder / f"{name}.started"
        self.witness = Path(witness) / f"{name}.witness.json" if witness is not None else None
        self._held = False

    @contextmanager
    def locked(self) -> Iterator[Journal]:
        """Hold the journal's lock; a second process (another run at this site) waits here until it is released."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.lock_path, "a+b") as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for %s: another run at this site holds it", self.lock_path)
                    fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = True
            try:
                yield self
            finally:
                self._held = False
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        """Every line, in order; [] for a journal that never existed.

        Raises:
            BrainTumNetError: the journal is missing although its marker or witness says it existed, or a line is
                unreadable. Starting again from nothing would forget what the site has spent: never silently.
        """
        self._require_lock()
        if not self.path.is_file():
            witnesses = [str(self.marker)] if self.marker.is_file() else []
            if str(self.path) in self._witnessed():
                witnesses.append(str(self.witness))
            if witnesses:
                raise BrainTumNetError(
                    f"{self.path}: the site's journal is missing, but {' and '.join(witnesses)} say(s) it existed. "
                    "Restore it from a backup; to start a new one knowingly, an administrator removes "
                    f"{' and '.join(witnesses)} (docs/privacy.md, 'Resetting a ledger')")
            return []
        out = []
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict):
                    raise BrainTumNetError(f"{self.path}, line {number}: unreadable journal line (a crash while "
                                           "writing?); restore the file from a backup, or an administrator removes "
                                           "that last partial line") from None
                out.append(entry)
        return out

    def _witnessed(self) -> list[str]:
        """The journals the cache's witness says existed (an unreadable witness vouches for none)."""
        if self.witness is None or not self.witness.is_file():
            return []
        try:
            content = json.loads(self.witness.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(content, dict):
            return []
        listed = content.get("journals", [content.get("journal")])  # the first format named one journal
        return [str(p) for p in listed if isinstance(p, str)] if isinstance(listed, list) else []

    def append(self, entry: Mapping[str, Any]) -> None:
        """Add one line (with its time), flushed to disk before returning."""
        # imported here: braintumnet.io brings numpy, which the launcher (client/sites.py) does not need
        from braintumnet.io import PRIVATE, atomic_write_json, plain

        self._require_lock()
        if not self.marker.is_file():
            atomic_write_json(self.marker, {"journal": self.path.name, "started": time.time()}, mode=PRIVATE)
        journals = self._witnessed()
        if self.witness is not None and str(self.path) not in journals:
            # one cache may serve several state folders (a simulated site and a deployed one): the witness lists each
            atomic_write_json(self.witness, {"journals": [*journals, str(self.path)]}, mode=PRIVATE)
        line = json.dumps(plain({**entry, "time": time.time()}), allow_nan=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _require_lock(self) -> None:
        if not self._held:
            raise RuntimeError(f"{self.path}: read and append only inside Journal.locked()")


# The site's journals in its state directory: the privacy ledger (braintumnet.privacy) and the evaluation count.
LEDGER = "privacy-ledger"
EVALUATIONS = "evaluations"


def site_journal(state_dir: Path, site: str, name: str, cache_root: Path | None = None) -> Journal:
    """Journal ``name`` of ``site``: ``<state_dir>/<site>/<name>.jsonl``; its witness in ``<cache>/.site-state/<site>``
    (``cache_root`` None: no witness)."""
    folder = safe_name(site)
    witness = Path(cache_root) / ".site-state" / folder if cache_root is not None else None
    return Journal(Path(state_dir) / folder, name, witness)


class EvaluationLog:
    """The evaluations this site has answered: one line each (federation id, run id, round, time) in its state
    directory, so ``max-evaluations-per-federation`` survives new runs and a wiped cache.

    Args:
        state_dir: the site's state directory.
        site: the site's name.
        cache_root: where the witness that the log exists goes (the site's cache root).
    """

    def __init__(self, state_dir: Path, site: str, cache_root: Path | None = None):
        self.journal = site_journal(state_dir, site, EVALUATIONS, cache_root)

    def admit(self, policy: SitePolicy, *, federation_id: str, run_id: str, server_round: Any,
              test_cases: int) -> None:
        """Check the evaluation caps and count this evaluation (before it runs: a failed one still counts).

        Raises:
            PolicyRefusal: the federation has had its evaluations, or the test split is too small.
        """
        with self.journal.locked():
            done = sum(1 for e in self.journal.entries() if e.get("federation_id") == federation_id)
            check_evaluation(policy, done, test_cases)
            self.journal.append({"federation_id": federation_id, "run_id": str(run_id),
                                 "round": server_round if isinstance(server_round, int) else None})


def safe_name(name: str) -> str:
    """A site or federation name as a file name: letters, digits, ``-_.`` kept, anything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"
