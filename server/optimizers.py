"""Server optimizers (``strategy.server-optimizer``): Flower's FedAvgM, FedAdam, FedYogi or FedAdagrad composed on
top of :class:`~server.strategy.SiteAwareFedAvg` by the MRO, so their server step moves the model from the screened,
robust aggregate; their state is checkpointed every round and restored on resume.

:func:`make_strategy` builds the centre's strategy for the profile's ``strategy.server-optimizer``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr import __version__ as FLWR_VERSION
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from server.aggregation import cast_like, fedavg_arguments
from server.settings import FLOWER_OPTIMIZERS, FederationError, ServerSettings, server_optimizer_arguments
from server.strategy import SiteAwareFedAvg

log = logging.getLogger("braintumnet.server")

# Flower keeps a server optimizer's state in attributes outside its documented API: they are read for each round's
# checkpoint and set again on resume (container: how Flower holds them, a dict by model key or a list in the model's
# key order), and FedAvgM's current_arrays (the model it steps from) is reset every round. They were checked against
# this flwr minor version; another one is refused, and tests/federation/test_server_optimizer.py fails if they change.
FLOWER_CHECKED = "1.42"
FLOWER_STATE: dict[str, tuple[tuple[str, type], ...]] = {
    "fedavgm": (("momentum_vector", list),),
    "fedadam": (("m_t", dict), ("v_t", dict)),
    "fedyogi": (("m_t", dict), ("v_t", dict)),
    "fedadagrad": (("m_t", dict), ("v_t", dict)),
}
FLOWER_INTERNALS = ("current_arrays",)


def _check_flower_internals(strategy: FedAvg, name: str) -> None:
    """Refuse a Flower whose server-optimizer attributes this module has not been checked against."""
    attributes = [a for a, _ in FLOWER_STATE[name]] + list(FLOWER_INTERNALS)
    missing = [a for a in attributes if not hasattr(strategy, a)]
    if FLWR_VERSION.split(".")[:2] != FLOWER_CHECKED.split(".") or missing:
        raise FederationError(
            f"strategy.server-optimizer={name}: the centre checkpoints and resumes the state of Flower's "
            f"{FLOWER_OPTIMIZERS[name].__name__} through attributes checked with flwr {FLOWER_CHECKED} "
            f"({', '.join(attributes)}); flwr {FLWR_VERSION} is installed"
            + (f" and lacks {', '.join(missing)}" if missing else "")
            + f". Install flwr {FLOWER_CHECKED}.x (pyproject.toml pins it), or use strategy.server-optimizer=none")


class _UnderServerOptimizer(SiteAwareFedAvg):
    """SiteAwareFedAvg as the base a Flower server optimizer builds on.

    FedOpt's and FedAvgM's ``__init__`` end with ``super().__init__(<FedAvg's arguments>)``; in the composed MRO that
    call lands here and goes on to FedAvg's. SiteAwareFedAvg's own arguments are taken by ``_ServerOptimizer``.
    """

    def __init__(self, **fedavg_kwargs):
        FedAvg.__init__(self, **fedavg_kwargs)


class _ServerOptimizer:
    """The top of a composed strategy, e.g. ``SiteAwareFedAdam(_ServerOptimizer, FedAdam, _UnderServerOptimizer)``
    with the MRO _ServerOptimizer -> FedAdam -> FedOpt -> _UnderServerOptimizer -> SiteAwareFedAvg -> FedAvg:

    - ``configure_train``: Flower's first (FedOpt records the global model it steps from), then SiteAwareFedAvg's
      (sampling, messages).
    - ``aggregate_train``: SiteAwareFedAvg's screened, norm-bounded, robust aggregate; Flower's server step on it; then
      here, integer buffers take the aggregate's value and every array gets its initial dtype back.
    - Flower's state arrays are read for each round's checkpoint and restored on resume (``FLOWER_STATE``).
    """

    optimizer_name = ""  # the strategy.server-optimizer value

    def __init__(self, **site):
        profile = site["profile"]
        if profile.server.optimizer != self.optimizer_name:
            raise ValueError(f"{type(self).__name__} runs strategy.server-optimizer={self.optimizer_name}, the profile "
                             f"asks for {profile.server.optimizer}: build the strategy with make_strategy()")
        super().__init__(**fedavg_arguments(profile), **server_optimizer_arguments(profile))
        _check_flower_internals(self, self.optimizer_name)
        self._init_site(**site)
        self._restore: dict[str, np.ndarray] | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs):
        if self._restore is not None:
            self._set_state(self._restore, initial_arrays)
            self._restore = None
        return super().start(grid, initial_arrays, *args, **kwargs)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        # FedAdam's bias correction counts rounds: count the federation's, so a resumed run steps like an unbroken one.
        arrays, metrics = super().aggregate_train(self.round_offset + server_round, replies)
        if arrays is None:
            return arrays, metrics
        # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights: no server step moves them.
        kept = {k for k, dtype in self._dtypes.items() if dtype.kind != "f"}
        stepped = ArrayRecord({k: self._aggregate[k] if k in kept else a for k, a in arrays.items()})
        return cast_like(stepped, self._dtypes), metrics

    def server_optimizer_state(self) -> dict[str, np.ndarray]:
        """Flower's state arrays as ``<attribute>/<model key>``; empty before the first server step."""
        out: dict[str, np.ndarray] = {}
        for attribute, container in FLOWER_STATE[self.optimizer_name]:
            value = getattr(self, attribute)
            if not value:
                continue
            if container is list:
                value = dict(zip(self._dtypes, value, strict=True))
            out.update({f"{attribute}/{k}": np.asarray(v) for k, v in value.items()})
        return out

    def restore_server_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a checkpoint's state (``server_optimizer_state`` of the round resumed); applied in ``start``,
        where it is checked against the model's keys and shapes."""
        self._restore = dict(state)

    def _set_state(self, state: Mapping[str, np.ndarray], model: ArrayRecord) -> None:
        for attribute, container in FLOWER_STATE[self.optimizer_name]:
            parts = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.split("/", 1)[0] == attribute}
            if not parts:
                continue  # saved before the first server step
            wrong = sorted(k for k in set(parts) | set(model)
                           if k not in parts or k not in model or parts[k].shape != tuple(model[k].shape))
            if wrong:
                raise FederationError(
                    f"the saved {self.optimizer_name} state does not fit the model ({attribute} differs at "
                    f"{wrong[:3]}): resume with the checkpoint's run config, or start without resume-from")
            setattr(self, attribute, [parts[k] for k in model] if container is list else {k: parts[k] for k in model})
        log.info("server optimizer %s: state restored (%s)", self.optimizer_name,
                 ", ".join(sorted({k.split("/", 1)[0] for k in state})) or "empty: no step yet")


class SiteAwareFedAvgM(_ServerOptimizer, FedAvgM, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedAvgM (server momentum) on the robust aggregate."""

    optimizer_name = "fedavgm"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # FedAvgM records the global model in its first round only, then keeps its own (uncast) step; the model sent
        # (integer buffers at the aggregate's value, initial dtypes; a checkpoint on resume) is the one to step from.
        self.current_arrays = None
        return super().configure_train(server_round, arrays, config, grid)


class SiteAwareFedAdam(_ServerOptimizer, FedAdam, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedAdam on the robust aggregate."""

    optimizer_name = "fedadam"


class SiteAwareFedYogi(_ServerOptimizer, FedYogi, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedYogi on the robust aggregate."""

    optimizer_name = "fedyogi"


class SiteAwareFedAdagrad(_ServerOptimizer, FedAdagrad, _UnderServerOptimizer):
    """SiteAwareFedAvg with Flower's FedAdagrad on the robust aggregate."""

    optimizer_name = "fedadagrad"


STRATEGIES: dict[str, type[SiteAwareFedAvg]] = {"none": SiteAwareFedAvg, "fedavgm": SiteAwareFedAvgM,
                                                 "fedadam": SiteAwareFedAdam, "fedyogi": SiteAwareFedYogi,
                                                 "fedadagrad": SiteAwareFedAdagrad}


def make_strategy(profile, settings: ServerSettings, **kwargs) -> SiteAwareFedAvg:
    """The centre's strategy for ``strategy.server-optimizer``; ``kwargs`` are SiteAwareFedAvg's other arguments."""
    return STRATEGIES[profile.server.optimizer](profile=profile, settings=settings, **kwargs)
