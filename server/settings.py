"""What the centre is told to do, beside the typed ``Profile``: its own run-config keys (:class:`ServerSettings`) and
the server optimizer's hyperparameters with the defaults filled in (:func:`server_optimizer_params`).

Also :class:`FederationError`, raised when the federation cannot go on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from braintumnet.errors import BrainTumNetError
from braintumnet.protocol import EVALUATE_ONLY, site_entry

# strategy.server-optimizer -> the Flower class whose server step it runs (server/optimizers.py composes them).
FLOWER_OPTIMIZERS: dict[str, type[FedAvg]] = {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
                                              "fedadagrad": FedAdagrad}


class FederationError(BrainTumNetError):
    """The federation cannot go on (e.g. not enough sites connected in time)."""


@dataclass(frozen=True)
class ServerSettings:
    """The centre's run-config keys (``[tool.flwr.app.config]``), beside the typed ``Profile``.

    Args:
        checkpoint_dir: run folders, the embedded MLflow store; relative paths resolve against the SuperLink's
            working directory (logged as absolute).
        resume_from: "" (fresh start), "latest", a run folder or a checkpoint file.
        external_data: "" or a public benchmark set the centre scores every round (a site folder or a prepared cache
            folder), filed as ``benchmark``. Never a hospital's cohort: the external hospital is an evaluate-only
            site whose data stay there (docs/federation.md, "The external hospital").
        cache_dir: where the centre prepares ``external_data``; "" = ``$BRAINTUMNET_CACHE`` or ``.cache/braintumnet``.
        sites: the names of the sites expected (for the waiting log) and, in simulation, partition i's name.
        evaluate_only: the expected sites with the ``evaluate-only`` role (entries ``NAME:evaluate-only`` of the run
            config's ``sites``).
        mlflow_experiment: MLflow experiment name; "" turns MLflow off.
        audit_messages: describe every message sent and received in ``audit.jsonl`` in the run folder.
        evaluate_in_train: each train message asks the sites to score the global model they receive (the previous
            round's) before training, and only the last round has an evaluate message: one model download per site
            per round instead of two. Round r's federated metrics then arrive with round r+1's train replies.
    """

    checkpoint_dir: Path
    resume_from: str = ""
    external_data: str = ""
    cache_dir: str = ""
    sites: tuple[str, ...] = ()
    evaluate_only: tuple[str, ...] = ()
    mlflow_experiment: str = "braintumnet-fl"
    audit_messages: bool = False
    evaluate_in_train: bool = True

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> "ServerSettings":
        """The centre's keys, typed by the package's one reader (``braintumnet.config.app_config``: one boolean
        parser; a value of the wrong type is refused with the key's name)."""
        from braintumnet.config import app_config

        app = app_config(cfg)
        try:
            entries = [site_entry(entry) for entry in app.sites]
        except ValueError as exc:
            raise BrainTumNetError(f"run config: {exc}") from None
        return cls(checkpoint_dir=app.checkpoint_root, resume_from=app.resume_from, external_data=app.external_data,
                   cache_dir=app.cache_dir, sites=tuple(name for name, _ in entries),
                   evaluate_only=tuple(name for name, role in entries if role == EVALUATE_ONLY),
                   mlflow_experiment=app.mlflow_experiment, audit_messages=app.audit_messages,
                   evaluate_in_train=app.evaluate_in_train)

    @property
    def training_sites(self) -> tuple[str, ...]:
        """The expected sites that train."""
        return tuple(s for s in self.sites if s not in self.evaluate_only)


def server_optimizer_arguments(profile) -> dict[str, float]:
    """The keyword arguments Flower's server-optimizer class receives (none for ``none``): the run config's values,
    and where ``strategy.server-learning-rate`` is 0 the optimizer's default: ours where we measured one
    (``braintumnet.config.SERVER_LEARNING_RATES``), else Flower's own for that class."""
    opt = profile.server
    if opt.optimizer == "none":
        return {}
    if opt.optimizer == "fedavgm":
        lr, args = "server_learning_rate", {"server_momentum": opt.momentum}
    else:
        # eta_l, the sites' learning rate, is only shown in Flower's summary: the sites' own Adam uses theirs.
        lr, args = "eta", {"eta_l": profile.train.learning_rate, "tau": opt.tau}
        if opt.optimizer != "fedadagrad":  # FedAdagrad has no moment decays (Flower fixes beta_1 = beta_2 = 0)
            args.update(beta_1=opt.beta_1, beta_2=opt.beta_2)
    from braintumnet.config import SERVER_LEARNING_RATES

    default = SERVER_LEARNING_RATES.get(opt.optimizer,
                                        inspect.signature(FLOWER_OPTIMIZERS[opt.optimizer]).parameters[lr].default)
    return {lr: opt.learning_rate if opt.learning_rate > 0 else default, **args}


def server_optimizer_params(profile) -> dict[str, Any]:
    """``name`` (``strategy.server-optimizer``) and the hyperparameters its server step uses, Flower's defaults filled
    in (for logs, ``metrics.json`` and MLflow)."""
    args = server_optimizer_arguments(profile)
    args.pop("eta_l", None)
    return {"name": profile.server.optimizer, **args}
