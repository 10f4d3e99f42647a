"""Train and evaluate loops shared by every arm: centralized, each ClientApp, local-only and the simulation.

Federated and centralized training differ only in who calls ``train_model`` and with which sites: one loop, so the
arms of the study cannot drift apart. Scoring a model lives in :mod:`braintumnet.scoring`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from contextlib import nullcontext
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.data.utils import worker_init_fn as monai_worker_init
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from braintumnet.config import Profile, TrainConfig
from braintumnet.data.contract import class_names as task_classes
from braintumnet.data.dataset import SliceDataset, augmentation, select_slices
from braintumnet.errors import BrainTumNetError
from braintumnet.losses import MultiTaskLoss, class_log_prior
from braintumnet.model import BrainTumNet
from braintumnet.optimizer_state import make_optimizer
from braintumnet.privacy import PrivateTraining

log = logging.getLogger("braintumnet.engine")


def pick_device(pref: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; ``cuda`` without a GPU is a user error."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise BrainTumNetError(f"device={pref!r} but no CUDA GPU is visible; use device=cpu or auto")
    return torch.device(pref)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(profile: Profile, num_classes: int | None = None, **switches) -> BrainTumNet:
    """BrainTumNet sized by the profile; K from the task unless given; ``switches`` are further ``BrainTumNet``
    arguments (the ablations: ``use_transformer``, ``use_inception``, ``use_cbam``).

    The initial weights are drawn from ``train.seed`` (without touching the global random state), so every arm of a
    study (centralized, local-only, the federated centre) starts from the same weights for the same seed: on a small
    cohort the initial draw alone moved the tumour Dice of one configuration between 0.34 and 0.86.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.train.seed)
        # ModelConfig's fields are BrainTumNet's keyword names (tests/model/test_braintumnet.py checks it), but for
        # the post-processing of its output.
        network = {k: v for k, v in dataclasses.asdict(profile.model).items() if k != "postprocess"}
        return BrainTumNet(in_channels=1, seg_classes=3,
                           num_classes=num_classes or len(task_classes(profile.data.task)),
                           img_size=profile.data.img_size, **network, **switches)


def cosine_lr(base_lr: float, progress: float) -> float:
    """Cosine decay from ``base_lr`` to 0 over the whole schedule (§2.1.4); ``progress`` in [0, 1]."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _stage(profile: Profile, global_epoch: int, total_epochs: int) -> str:
    """Two-stage mode trains segmentation for the first half of the schedule, then classification."""
    if profile.model.mode != "two-stage":
        return "joint"
    return "seg" if global_epoch < _stage_switch(total_epochs) else "cls"


def _stage_switch(total_epochs: int) -> int:
    return max(1, total_epochs // 2)


def warmup_factor(warmup_epochs: float, epoch: float) -> float:
    """Linear learning-rate warm-up over the first ``warmup_epochs`` (1 = none): ``epoch`` counts from 0 and is
    the fraction of the schedule done after this step, so the first step already trains."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch / warmup_epochs)


def schedule_progress(profile: Profile, epoch: float, total_epochs: int) -> float:
    """Where ``epoch`` (fractional, from 0) sits in its cosine schedule, in [0, 1].

    Joint training has one schedule over all epochs. Two-stage training anneals each stage over its own epochs:
    both stages are complete trainings (segmentation, then the classifier on the frozen segmenter), and a classifier
    stage that started where the segmentation stage left the cosine would train at half the learning rate and less.
    """
    if profile.model.mode != "two-stage":
        return epoch / total_epochs
    switch = _stage_switch(total_epochs)
    if epoch < switch:
        return epoch / switch
    return (epoch - switch) / max(total_epochs - switch, 1)


def train_model(
    model: nn.Module,
    sites: Sequence,
    profile: Profile,
    device: torch.device,
    *,
    epochs: int,
    epoch_offset: int = 0,
    total_epochs: int | None = None,
    proximal_to: Mapping[str, torch.Tensor] | None = None,
    case_ids: Sequence[str] | None = None,
    progress: bool = True,
    privacy: PrivateTraining | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on the train split of ``sites`` for ``epochs`` epochs.

    Args:
        epoch_offset, total_epochs: where these epochs sit in the whole schedule, so the cosine learning rate
            (and the two-stage switch) continue across federated rounds: round r trains global epochs
            ``(r-1)·local_epochs ...``.
        proximal_to: FedProx anchor (the global weights received this round); adds ``mu/2·||w - w_global||²`` with
            ``mu = train.fedprox_mu``. None or mu = 0 is plain FedAvg.
        case_ids: restrict to these cases (cross-validation folds).
        privacy: DP-SGD (``braintumnet.privacy``, when ``dp.enabled``): Poisson-sampled batches, per-slice clipping
            and noise, no AMP. ``privacy.history`` holds the accountant's history afterwards; ``model`` keeps its
            plain state-dict keys. FedProx is refused under DP: its proximal gradient would bypass the clipping.
        optimizer: an Adam over ``model``'s parameters to continue (a site's state kept between federated rounds,
            ``braintumnet.optimizer_state``); None = a fresh one. It holds the new state afterwards.
        on_epoch: called after each epoch with the global epoch (from 1) and that epoch's losses (as returned), for
            progress lines where a progress bar has no terminal (the study's arms, its workers' logs).

    Returns:
        ``train_loss``, ``train_loss_seg``, ``train_loss_cls`` (means over the last epoch's slices) and
        ``num-examples``: the number of training slices, which FedAvg weights by.

    Raises:
        PrivacyBudgetSpent: (DP) this round would exceed ``dp.max-epsilon``; raised before any step.
    """
    cfg = profile.train
    table = _training_slices(sites, profile, case_ids)
    loader = _training_loader(sites, table, cfg, epoch_offset)
    model.to(device).train()
    total_epochs = total_epochs or epochs
    optimizer = optimizer or make_optimizer(model, cfg.learning_rate)
    mu = cfg.fedprox_mu if proximal_to is not None else 0.0
    net = model  # what the loop calls: the model itself, or Opacus's wrapper around it
    if privacy is not None:
        net, optimizer, loader = _attach_privacy(privacy, model, optimizer, loader, mu, len(table), epochs,
                                                 total_epochs)
    # AMP is off under DP: Opacus clips fp32 per-sample gradients and its noise calibration assumes them.
    step = _make_step(net, model, optimizer, device, cfg.amp and privacy is None, mu, proximal_to)
    losses = _EpochLoss()
    for epoch in range(epochs):
        global_epoch = epoch_offset + epoch
        criterion = _epoch_criterion(model, profile, table, global_epoch, total_epochs)
        losses = _train_epoch(step, loader, criterion, profile, global_epoch, total_epochs, progress)
        if on_epoch is not None:
            on_epoch(global_epoch + 1, losses.means())
    if privacy is not None:
        privacy.detach(net)
    for p in model.parameters():
        p.requires_grad_(True)
    return {**losses.means(), "num-examples": int(len(table))}


def _training_slices(sites: Sequence, profile: Profile, case_ids: Sequence[str] | None) -> pd.DataFrame:
    table = select_slices(sites, "train", task_classes(profile.data.task), case_ids)
    if len(table) == 0:
        raise BrainTumNetError(
            f"no training slices for task {profile.data.task!r} in sites {[s.site for s in sites]}; "
            "check that cases.csv has split=train rows of the task's tumour types")
    return table


def _training_loader(sites: Sequence, table: pd.DataFrame, cfg: TrainConfig, epoch_offset: int) -> DataLoader:
    """Shuffled, augmented batches, seeded from ``train.seed`` and the epoch offset (each round draws its own)."""
    generator = seed_everything(cfg.seed + epoch_offset)
    return DataLoader(
        SliceDataset(sites, table, augmentation(cfg, seed=cfg.seed + epoch_offset)),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.num_workers,
        worker_init_fn=monai_worker_init if cfg.num_workers else None,
        # A batch of one destabilises GroupNorm statistics less than BN, still noisy.
        drop_last=len(table) > cfg.batch_size,
    )


def _attach_privacy(privacy: PrivateTraining, model: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: DataLoader, mu: float, num_slices: int, epochs: int, total_epochs: int):
    """Plan the round's DP-SGD (which may refuse it) and wrap model, optimizer and loader for it."""
    if mu > 0:
        raise BrainTumNetError(f"dp.enabled with train.fedprox-mu={mu:g}: the proximal term's gradient would "
                               "skip DP-SGD's per-slice clipping; set train.fedprox-mu=0 or dp.enabled=false")
    privacy.plan(num_slices, len(loader), epochs, total_epochs)
    return privacy.attach(model, optimizer, loader)


def _make_step(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               amp: bool, mu: float, proximal_to: Mapping[str, torch.Tensor] | None) -> _Step:
    """What every step of a call uses; AMP only on CUDA, the FedProx anchor only with ``mu`` > 0."""
    use_amp = amp and device.type == "cuda"
    anchor = {k: v.detach().to(device) for k, v in (proximal_to or {}).items()} if mu > 0 else {}
    return _Step(net, model, optimizer, torch.amp.GradScaler("cuda", enabled=use_amp), device, use_amp, mu, anchor)


def _epoch_criterion(model: nn.Module, profile: Profile, table: pd.DataFrame, global_epoch: int,
                     total_epochs: int) -> MultiTaskLoss:
    """The loss of this epoch's stage; in the classification stage of two-stage mode the segmenter is frozen."""
    cfg = profile.train
    stage = _stage(profile, global_epoch, total_epochs)
    criterion = MultiTaskLoss(
        weight_seg=0.0 if stage == "cls" else cfg.weight_seg,
        weight_cls=0.0 if stage == "seg" else cfg.weight_cls,
        lambda_ce=cfg.seg_ce_weight,
        class_log_prior=class_log_prior(table["label"].to_numpy(), len(task_classes(profile.data.task))),
        logit_adjustment=cfg.logit_adjustment,
    )
    if hasattr(model, "segmentation_parameters"):
        for p in model.segmentation_parameters():
            p.requires_grad_(stage != "cls")
    return criterion


def _scheduled_lr(profile: Profile, global_epoch: int, step: int, steps: int, total_epochs: int) -> float:
    """The learning rate of ``step`` (of ``steps``) in ``global_epoch``: cosine decay times the linear warm-up."""
    lr = cosine_lr(profile.train.learning_rate, schedule_progress(profile, global_epoch + step / steps, total_epochs))
    return lr * warmup_factor(profile.train.warmup_epochs, global_epoch + (step + 1) / steps)


def _train_epoch(step: _Step, loader: DataLoader, criterion: MultiTaskLoss, profile: Profile, global_epoch: int,
                 total_epochs: int, progress: bool) -> _EpochLoss:
    """One pass over ``loader`` at the scheduled learning rate; returns the epoch's losses."""
    losses = _EpochLoss()
    steps = len(loader)
    bar = tqdm(loader, desc=f"train epoch {global_epoch + 1}/{total_epochs}", disable=not progress, leave=False)
    for index, batch in enumerate(bar):
        for group in step.optimizer.param_groups:
            group["lr"] = _scheduled_lr(profile, global_epoch, index, steps, total_epochs)
        total, loss, n = step(batch, criterion)
        if n == 0:  # a Poisson-sampled empty batch (DP): a noise-only step above, no loss to average
            continue
        losses.add(total, loss, n)
        bar.set_postfix(loss=f"{losses.sums['loss'] / losses.seen:.3f}")
    return losses


class _EpochLoss:
    """The losses of an epoch, summed over its slices (each batch weighted by its size)."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "seg": 0.0, "cls": 0.0}
        self.seen = 0

    def add(self, total: torch.Tensor, loss, n: int) -> None:
        self.seen += n
        self.sums["loss"] += float(total.detach()) * n
        self.sums["seg"] += float(loss.seg.detach()) * n
        self.sums["cls"] += float(loss.cls.detach()) * n

    def means(self) -> dict[str, float]:
        """``train_loss``, ``train_loss_seg``, ``train_loss_cls`` (0 with no slice seen)."""
        seen = max(self.seen, 1)
        return {"train_loss": self.sums["loss"] / seen, "train_loss_seg": self.sums["seg"] / seen,
                "train_loss_cls": self.sums["cls"] / seen}


@dataclasses.dataclass
class _Step:
    """One optimisation step: forward (under autocast with AMP), the FedProx term, backward through the scaler."""

    net: nn.Module  # what is called: the model itself, or Opacus's wrapper around it
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    mu: float
    anchor: dict[str, torch.Tensor]  # FedProx: the received global weights (empty = plain FedAvg)

    def __call__(self, batch: Mapping[str, torch.Tensor], criterion: MultiTaskLoss):
        """Returns ``(total loss, MultiTaskLoss output, batch size)``."""
        # Default (contiguous) memory format: Opacus's Conv2d per-sample gradients are wrong for channels-last
        # input (found in this project), so nothing here may switch to it.
        image = batch["image"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        with autocast:
            out = self.net(image)
            loss = criterion(out.seg_logits.float(), mask, out.cls_logits.float(), label)
        total = loss.total
        if self.anchor:
            total = total + proximal_term(self.model, self.anchor, self.mu)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, loss, image.shape[0]


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2·||w - w_global||²`` over the parameters named in ``anchor``."""
    return 0.5 * mu * sum((p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor)
