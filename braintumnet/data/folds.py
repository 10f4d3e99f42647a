"""Case-level k-fold splits of the training cases, stratified by tumour type (cross-validation).

Folds are computed from a site's own prepared cache with a seed, so a federated site and the study's centralized
arm derive the same folds without any case id crossing the network.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from braintumnet.data.dataset import select_slices


def case_folds(sites: Sequence, classes: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Split the pooled training cases of ``sites`` into ``k`` folds stratified by tumour type (case level, never
    slice level, so no case has slices on both sides)."""
    cases = select_slices(sites, "train", classes).drop_duplicates("case_id")[["case_id", "label"]]
    if len(cases) < k:
        raise ValueError(f"{k} folds need at least {k} training cases; the data have {len(cases)}")
    labels = cases["label"].to_numpy()
    # Stratify when every class has at least k cases; tiny test cohorts fall back to plain folds.
    if np.bincount(labels).min() >= k:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed).split(cases, labels)
    else:
        splitter = KFold(k, shuffle=True, random_state=seed).split(cases)
    return [cases["case_id"].iloc[held].tolist() for _, held in splitter]


def site_folds(site, classes: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """One site's own folds (each site holds out its own fold i in repetition i)."""
    return case_folds([site], classes, k, seed)


def training_cases_without_fold(site, classes: Sequence[str], k: int, fold: int, seed: int) -> list[str]:
    """The site's training cases minus its fold ``fold`` (0-based) of ``k``."""
    held = set(site_folds(site, classes, k, seed)[fold])
    return sorted(set(select_slices([site], "train", classes)["case_id"]) - held)
