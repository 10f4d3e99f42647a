"""The typed sections of a run's settings (frozen dataclasses) and the named profiles, sets of them.

Profiles are named sets of overrides (``quick`` for a 2-core CPU, ``standard`` for the CPU figures we quote,
``paper`` for the paper's settings on a GPU, §2.1.2 and §2.1.4). ``braintumnet.config.run_config`` types a run
config into them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from braintumnet.errors import BrainTumNetError
from braintumnet.labels import REGIONS, TASKS
from braintumnet.postprocess import POSTPROCESS_RULES

GATE_REGIONS = tuple(REGIONS)
MODEL_MODES = ("multitask", "two-stage")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean")
# The centre's server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization"); "none" = FedAvg's aggregate
# is the new global model. The default is ServerOptimizerConfig.optimizer (pyproject.toml's must agree: test_config).
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# Server learning rates we chose by measurement where they differ from Flower's defaults: averaging three sites' Adam
# steps keeps their common direction and shrinks the rest, and a step about sqrt(3) times the average gave back the
# progress FedAvg lost against pooled training on the three-hospital phantom (docs/federation.md).
SERVER_LEARNING_RATES = {"fedavgm": 1.7}


class ConfigError(BrainTumNetError, ValueError):
    """A run-config value that cannot work; the message names the key and the fix. A ValueError like the others."""


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing (§2.1.2) and the classification task.

    Args:
        img_size: slices are resampled to ``fov_mm / img_size`` mm per pixel and cropped/padded to this size.
        slices_per_case: representative axial slices per case (the paper uses 20).
        fov_mm: in-plane field of view kept around the brain's centre, in mm.
        task: ``3class`` (glioma/metastasis/meningioma) or ``binary`` (glioma/metastasis).
    """

    img_size: int = 256
    slices_per_case: int = 20
    fov_mm: float = 240.0
    task: str = "3class"

    def __post_init__(self) -> None:
        if self.img_size < 32 or self.img_size % 16:
            raise ValueError(f"img_size={self.img_size}: use a multiple of 16, at least 32")
        if self.slices_per_case < 1:
            raise ValueError(f"slices_per_case={self.slices_per_case}: use at least 1")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: use one of {sorted(TASKS)}")


@dataclass(frozen=True)
class ModelConfig:
    """BrainTumNet's width and switches (§2.2). Keyword names match ``BrainTumNet``'s constructor, but for
    ``postprocess``, which is applied to its output."""

    feature_size: int = 32
    num_heads: int = 4
    window_size: int = 4
    topk_ratio: float = 0.5
    gate_region: str = "tumor"
    mode: str = "multitask"
    dropout_rate: float = 0.3
    # Detached by default: the classification loss through the gate collapsed segmentation (docs/model-card.md).
    gate_gradient: bool = False
    shared_features: bool = False
    shared_gradient: float = 1.0
    gate_floor: float = 0.0
    # How a case's predicted labels are cleaned before they are scored or written (braintumnet/postprocess.py); not
    # a network argument (build_model leaves it out).
    postprocess: str = "largest-lesion"

    def __post_init__(self) -> None:
        if self.postprocess not in POSTPROCESS_RULES:
            raise ValueError(f"postprocess={self.postprocess!r}: use one of {POSTPROCESS_RULES}")
        if self.gate_region not in GATE_REGIONS:
            raise ValueError(f"gate_region={self.gate_region!r}: use one of {GATE_REGIONS}")
        if self.mode not in MODEL_MODES:
            raise ValueError(f"mode={self.mode!r}: use one of {MODEL_MODES}")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio={self.topk_ratio}: use a value in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (§2.1.4): Adam, lr 1e-4 with cosine decay, batch 16, loss weights 1.0 / 0.7.

    ``cv_folds`` / ``cv_fold`` (cross-validation, docs/study.md): with ``cv_folds`` = k ≥ 2 every site splits its own
    training cases into k folds stratified by tumour type (seeded by ``seed``) and leaves fold ``cv_fold`` (1..k)
    out of training; 0 = train on every training case.
    """

    epochs: int = 250
    batch_size: int = 16
    # The batch a site trains with on its own data (a federated round, the study's local-only arms); 0 = batch_size.
    # About batch_size / 3 for three sites makes their averaged steps as many per epoch as pooled training's: it closed
    # the federated model's Dice gap at equal epochs on the quick and standard phantoms, with the hospitals alone
    # trained in the same batch (docs/federation.md, "Each site's batch"). quick and standard use 3; paper keeps 0.
    site_batch_size: int = 0
    learning_rate: float = 1e-4
    weight_seg: float = 1.0
    weight_cls: float = 0.7
    seg_ce_weight: float = 0.3  # the cross-entropy's weight inside DiceCE (losses.MultiTaskLoss lambda_ce)
    warmup_epochs: float = 0.0  # linear learning-rate warm-up before the cosine decay (0 = none)
    # tau of the logit-adjusted classification loss against the training data's own class prior (losses.py); each
    # site uses its own prior, which never leaves it. 0 = the paper's plain cross-entropy.
    logit_adjustment: float = 0.0
    rotation_deg: float = 30.0
    flip_prob: float = 0.5
    seed: int = 0
    amp: bool = True  # mixed precision, CUDA only
    num_workers: int = 0
    fedprox_mu: float = 0.0
    cv_folds: int = 0
    cv_fold: int = 0
    keep_optimizer_state: bool = True  # federated: each site continues its Adam across rounds (optimizer_state.py)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.site_batch_size < 0:
            raise ConfigError(f"train.batch-size={self.batch_size}, train.site-batch-size={self.site_batch_size}: "
                              "use at least 1 slice per batch (a site batch of 0 = the pooled batch)")
        if not (self.seg_ce_weight >= 0 and math.isfinite(self.seg_ce_weight)):
            raise ConfigError(f"train.seg-ce-weight={self.seg_ce_weight}: use a number >= 0 (0 = Dice alone)")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise ConfigError(f"train.warmup-epochs={self.warmup_epochs}: use a number of epochs >= 0 (0 = none)")
        if not (self.logit_adjustment >= 0 and math.isfinite(self.logit_adjustment)):
            raise ConfigError(f"train.logit-adjustment={self.logit_adjustment}: use a number >= 0 (0 = plain "
                              "cross-entropy)")
        if self.cv_folds and not (self.cv_folds >= 2 and 1 <= self.cv_fold <= self.cv_folds):
            raise ConfigError(f"cv.folds={self.cv_folds}, cv.fold={self.cv_fold}: use cv.folds >= 2 with cv.fold "
                              "between 1 and cv.folds, or cv.folds=0 for no cross-validation")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and FedAvg node counts. The defaults work for one, two or three sites."""

    num_rounds: int = 10
    local_epochs: int = 1
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 1
    min_evaluate_nodes: int = 1
    min_available_nodes: int = 1
    wait_for_nodes_s: float = 600.0
    round_timeout_s: float = 3600.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy per site: DP-SGD with Opacus, sample level (docs/privacy.md).

    Args:
        enabled: train with DP-SGD (per-slice clipping and Gaussian noise, Poisson sampling, no AMP).
        noise_multiplier: σ, the noise's standard deviation relative to ``max_grad_norm``; 0 = derive σ from
            ``target_epsilon``.
        target_epsilon: the ε a site reaches after all planned rounds (``num-server-rounds`` × local epochs);
            σ is computed from it; 0 = use ``noise_multiplier``. Give exactly one of the two.
        max_grad_norm: the per-slice gradient clipping bound C.
        delta: δ of (ε, δ)-DP; it must be below 1/n for a site's n training slices (checked at the site).
        max_epsilon: the budget. A site never trains a round that would take its cumulative ε above it; it still
            evaluates. 0 = ``target_epsilon`` when that is given, else no cap.
    """

    enabled: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "target_epsilon", "max_epsilon"):
            if getattr(self, name) < 0:
                raise ConfigError(f"dp.{name.replace('_', '-')}={getattr(self, name)}: use a value >= 0")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"dp.max-grad-norm={self.max_grad_norm}: use a positive clipping bound, e.g. 1.0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta={self.delta}: use a value in (0, 1) below 1/n for n training slices, "
                              "e.g. 1e-5")
        if self.enabled and (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError(
                f"dp.enabled=true with dp.noise-multiplier={self.noise_multiplier} and dp.target-epsilon="
                f"{self.target_epsilon}: set exactly one of them (the other to 0), e.g. dp.noise-multiplier=1.0")

    @property
    def budget(self) -> float:
        """The cap on a site's cumulative ε (``inf`` = none)."""
        cap = self.max_epsilon or self.target_epsilon
        return cap if cap > 0 else math.inf


@dataclass(frozen=True)
class RobustConfig:
    """How the centre screens and combines the sites' updates (docs/privacy.md, "Update validation").

    Args:
        aggregation: ``fedavg`` (weighted by training slices), ``median`` (coordinate-wise) or ``trimmed-mean``
            (coordinate-wise, unweighted, dropping ``trim_fraction`` of the sites at each end).
        trim_fraction: for ``trimmed-mean``, in [0, 0.5).
        norm_factor: each top-level module (parameter group) of a train reply's update ``w_site - w_global`` is
            clipped onto ``norm_factor`` × that group's lower-median update norm (the round's own with 3+ replies,
            else carried from the last 5 aggregated rounds); 0 turns the bound off. Only non-finite updates are
            rejected.
        max_weight_share: with 3 or more train replies, no site's ``num-examples`` may carry more than this share of
            the aggregate's weight (larger ones are clipped); 0 turns the cap off. In [0, 1).
    """

    aggregation: str = "fedavg"
    # 0.34 trims one site of three at each end; 0.2 would trim nothing below five replies and the round be refused.
    trim_fraction: float = 0.34
    norm_factor: float = 10.0
    max_weight_share: float = 0.5

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"strategy.aggregation={self.aggregation!r}: use one of {AGGREGATIONS}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"strategy.trim-fraction={self.trim_fraction}: use a value in [0, 0.5)")
        if self.norm_factor < 0 or 0 < self.norm_factor <= 1:
            raise ConfigError(f"robust.norm-factor={self.norm_factor}: use 0 (off) or a factor above 1, e.g. 10")
        if not 0.0 <= self.max_weight_share < 1.0:
            raise ConfigError(f"robust.max-weight-share={self.max_weight_share}: use 0 (off) or a share in (0, 1), "
                              "e.g. 0.5")


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The centre's server optimizer: a step on the robust aggregate (docs/federation.md, "Server optimizer").

    The sites' aggregated update ``delta = aggregate - global`` is treated as a pseudo-gradient: ``fedavgm`` adds
    momentum to it, ``fedadam`` / ``fedyogi`` / ``fedadagrad`` scale it per coordinate by running moments (the maths is
    Flower's ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``).

    Args:
        optimizer: one of ``SERVER_OPTIMIZERS``; ``none`` = FedAvg (the aggregate is the new global model).
        learning_rate: the server learning rate (eta); 0 = the optimizer's default: ours for fedavgm
            (``SERVER_LEARNING_RATES``), else Flower's (0.1 for fedadam and fedadagrad, 0.01 for fedyogi).
        momentum: fedavgm's momentum (0 = none: with learning rate 1 that is FedAvg).
        beta_1: fedadam / fedyogi: the first moment's decay (fedadagrad has none).
        beta_2: fedadam / fedyogi: the second moment's decay.
        tau: fedadam / fedyogi / fedadagrad: the adaptivity floor added to sqrt(v); larger = closer to momentum SGD.
    """

    # FedAvgM without momentum at server learning rate 1.7 (about the square root of three sites): chosen by
    # measurement on the three-hospital phantom (docs/federation.md, "Server optimizer").
    optimizer: str = "fedavgm"
    learning_rate: float = 0.0
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError(f"strategy.server-optimizer={self.optimizer!r}: use one of {SERVER_OPTIMIZERS}")
        if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"strategy.server-learning-rate={self.learning_rate}: use a positive number, or 0 for "
                              "the optimizer's default")
        for key, value in (("server-momentum", self.momentum), ("server-beta1", self.beta_1),
                           ("server-beta2", self.beta_2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"strategy.{key}={value}: use a value in [0, 1), e.g. 0.9")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"strategy.server-tau={self.tau}: use a positive number, e.g. 1e-3 (it keeps the "
                              "adaptive step finite where an update is zero)")


@dataclass(frozen=True)
class Profile:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    federation: FederationConfig
    privacy: PrivacyConfig = PrivacyConfig()
    robust: RobustConfig = RobustConfig()
    server: ServerOptimizerConfig = ServerOptimizerConfig()


PROFILES: dict[str, Profile] = {
    # A 2-core CPU runs the whole simulation study (the README's main job) in about 10 minutes. Each site trains in
    # batches of 3, about the pooled 8 over three sites: the global model then takes about the pooled model's steps.
    "quick": Profile(
        DataConfig(img_size=64, slices_per_case=8),
        ModelConfig(feature_size=8, num_heads=2),
        TrainConfig(epochs=30, batch_size=8, site_batch_size=3, learning_rate=1e-3),
        FederationConfig(num_rounds=10, local_epochs=3),
    ),
    # Hours on a CPU: the figures we quote for CPU. Each site trains in batches of 3, as in quick.
    "standard": Profile(
        DataConfig(img_size=64, slices_per_case=10),
        ModelConfig(feature_size=16, num_heads=4),
        TrainConfig(epochs=40, batch_size=8, site_batch_size=3, learning_rate=1e-3),
        FederationConfig(num_rounds=20, local_epochs=2),
    ),
    # The paper's settings: 256x256, 20 slices per case, 250 epochs, lr 1e-4, batch 16 (§2.1.2, §2.1.4).
    "paper": Profile(DataConfig(), ModelConfig(), TrainConfig(), FederationConfig(num_rounds=125, local_epochs=2)),
}


def at_site(profile: Profile) -> Profile:
    """``profile`` as a site trains with it on its own data (a federated round, a local-only arm): the batch is
    ``train.site-batch-size`` (0: the pooled one). Pooled (centralized) training keeps ``train.batch-size``."""
    return dataclasses.replace(profile, train=dataclasses.replace(profile.train, batch_size=site_batch(profile.train)))


def site_batch(train: TrainConfig) -> int:
    """The batch a site trains with: ``train.site-batch-size``, or the pooled batch when that is 0."""
    return train.site_batch_size or train.batch_size


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: use one of {sorted(PROFILES)}") from None


def to_dict(profile: Profile) -> dict[str, Any]:
    """A flat ``section.field`` dict, for checkpoints and MLflow params."""
    return {f"{s}.{k}": v for s, d in dataclasses.asdict(profile).items() for k, v in d.items()}


def from_dict(flat: Mapping[str, Any]) -> Profile:
    """Inverse of ``to_dict`` (a checkpoint describes itself)."""
    sections: dict[str, dict[str, Any]] = {f.name: {} for f in fields(Profile)}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    types = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "federation": FederationConfig,
             "privacy": PrivacyConfig, "robust": RobustConfig,
             "server": ServerOptimizerConfig}  # older checkpoints lack the later sections: their defaults apply
    if not sections["server"]:
        sections["server"] = {"optimizer": "none"}  # written before the server optimizer existed: plain FedAvg
    return Profile(**{s: types[s](**v) for s, v in sections.items()})
