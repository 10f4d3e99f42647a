"""Score a model: predict slices and turn them into case-level metrics (docs/metrics.md), for every arm.

One path for the study, ``braintumnet evaluate``, the sites' federated evaluation and the benchmarks: a test case is
scored on every slice of its head, chosen without the labels, as one volume, after the checkpoint's post-processing
(``model.postprocess``: the largest lesion kept, by default), which ``braintumnet predict`` applies too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from braintumnet.config import Profile
from braintumnet.data.contract import class_names as task_classes
from braintumnet.data.dataset import SliceDataset, select_slices
from braintumnet.errors import BrainTumNetError
from braintumnet.metrics import EvaluationAccumulator
from braintumnet.model import GATE_LABELS
from braintumnet.labels import TUMOUR_LABEL
from braintumnet.postprocess import postprocess_case


@torch.no_grad()
def predict_slices(
    model: nn.Module, sites: Sequence, table: pd.DataFrame, device: torch.device, batch_size: int = 16,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Label maps (N×H×W uint8, argmax of the segmentation) and class probabilities (N×K) for ``table``'s slices."""
    labels, probs = [], []
    for _, seg, prob, _ in _predicted_batches(model, sites, table, device, batch_size, progress):
        labels.append(seg)
        probs.append(prob)
    return np.concatenate(labels), np.concatenate(probs)


def predict_cases(
    model: nn.Module, sites: Sequence, table: pd.DataFrame, profile: Profile, device: torch.device,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_slices` with each case's labels cleaned by the profile's ``model.postprocess`` rule, as they are
    scored: ``table`` holds whole cases (every slice of each), e.g. to draw a slice as the evaluation saw it."""
    labels, probs = predict_slices(model, sites, table, device, profile.train.batch_size, progress)
    keys, z_index = _case_keys(table), table["z_index"].to_numpy(dtype=int)
    for key in dict.fromkeys(keys):
        rows = np.flatnonzero(keys == key)
        labels[rows] = postprocess_case(labels[rows], z_index[rows], profile.model.postprocess)
    return labels, probs


def most_tumour_slices(
    model: nn.Module, sites: Sequence, cases: Sequence[pd.DataFrame], profile: Profile, device: torch.device,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """For each case (the table of all its slices), the slice with the most reference tumour, as it was scored: its
    table row, its labels (the whole case predicted and post-processed, :func:`predict_cases`) and its class
    probabilities. For figures, which may pick by the labels; scoring never does."""
    picks, offset = [], 0
    for case in cases:
        area = [int((sites[s].masks[r] == TUMOUR_LABEL).sum()) for s, r in zip(case["site_index"], case["row"])]
        picks.append(offset + int(np.argmax(area)))
        offset += len(case)
    whole = pd.concat(cases, ignore_index=True)
    labels, probs = predict_cases(model, sites, whole, profile, device)
    return whole.iloc[picks], labels[picks], probs[picks]


@torch.no_grad()
def _predicted_batches(model: nn.Module, sites: Sequence, table: pd.DataFrame, device: torch.device,
                       batch_size: int, progress: bool):
    """Yield ``(first row, labels B×H×W uint8, class probabilities B×K, reference B×H×W uint8)`` batch by batch, in
    ``table`` order: the caller scores each batch and lets it go, so memory does not grow with the slices."""
    model.to(device).eval()
    loader = DataLoader(SliceDataset(sites, table), batch_size=batch_size, shuffle=False)
    start = 0
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        out = model(batch["image"].to(device))
        # max().indices, not argmax(): the same first-maximum labels, about 9 times faster on the CPU for N×C×H×W.
        labels = out.seg_logits.max(1).indices.to(torch.uint8).cpu().numpy()
        yield start, labels, torch.softmax(out.cls_logits.float(), 1).cpu().numpy(), \
            batch["mask"][:, 0].to(torch.uint8).numpy()
        start += len(labels)


def evaluate_cases(
    model: nn.Module,
    sites: Sequence,
    split: str | None,
    profile: Profile,
    device: torch.device,
    *,
    case_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Case-level metrics (docs/metrics.md) and the per-case table (kept at the site; never sent anywhere).

    A test case is scored on every slice of its head as one volume (3-D Dice, HD95 and HD in mm on its own grid); a
    training case (cross-validation) on its representative slices, each run of neighbouring slices a volume.
    """
    table = _slices_to_score(sites, split, profile, case_ids)
    accumulator = _score(model, sites, table, profile, device, progress)
    return accumulator.summary(), pd.DataFrame(accumulator.case_rows())


def evaluate_sites(
    model: nn.Module, sites: Sequence, split: str | None, profile: Profile, device: torch.device, *,
    progress: bool = True,
) -> tuple[dict[str, float], pd.DataFrame, dict[str, dict[str, float]]]:
    """:func:`evaluate_cases` on the pooled ``sites`` plus each site's own metrics, from one pass of predictions
    (scoring the pool and then every site again would predict every slice twice). Sites without slices of ``split``
    have no entry; with one site, its entry is the pooled metrics."""
    table = _slices_to_score(sites, split, profile, None)
    accumulator = _score(model, sites, table, profile, device, progress)
    metrics, per_case = accumulator.summary(), pd.DataFrame(accumulator.case_rows())
    keys = _case_keys(table)
    per_site = {}
    for index, site in enumerate(sites):
        rows = (table["site_index"] == index).to_numpy()
        if len(sites) == 1:
            per_site[site.site] = metrics
        elif rows.any():
            per_site[site.site] = accumulator.summary(only=np.unique(keys[rows]))
    return metrics, per_case, per_site


def _slices_to_score(sites: Sequence, split: str | None, profile: Profile, case_ids) -> pd.DataFrame:
    table = select_slices(sites, split, task_classes(profile.data.task), case_ids)
    if len(table) == 0:
        raise BrainTumNetError(
            f"no {split or 'any'} slices for task {profile.data.task!r} in sites {[s.site for s in sites]}")
    return table


def _case_keys(table: pd.DataFrame) -> np.ndarray:
    # A case id is unique within its site; prefix the site so pooled evaluation never merges two sites' cases.
    return (table["site"] + "/" + table["case_id"]).to_numpy(dtype=str)


def _score(model: nn.Module, sites: Sequence, table: pd.DataFrame, profile: Profile, device: torch.device,
           progress: bool) -> EvaluationAccumulator:
    """Predict ``table``'s slices batch by batch and score them case by case: a case's slices wait until the batches
    have passed its last one, are cleaned together by the ``model.postprocess`` rule (``braintumnet.postprocess``),
    scored, and let go, so memory holds about one case beside the batch."""
    accumulator = EvaluationAccumulator(task_classes(profile.data.task), GATE_LABELS[profile.model.gate_region])
    keys = _case_keys(table)
    spacing = table[["spacing_y_mm", "spacing_x_mm"]].to_numpy(dtype=float)
    # A cache written before the slice spacing was kept scores every slice in-plane.
    spacing_z = table["spacing_z_mm"].to_numpy(dtype=float) if "spacing_z_mm" in table else None
    z_index, labels = table["z_index"].to_numpy(dtype=int), table["label"].to_numpy()
    tumor_types = table["tumor_type"].to_numpy(dtype=str)
    last = pd.Series(np.arange(len(table))).groupby(keys, sort=False).max().sort_values()
    closing = list(zip(last.to_numpy(), last.index))
    waiting: dict[str, list] = {}  # case key -> its (table rows, labels, class probabilities, reference) so far
    for start, seg, probs, target in _predicted_batches(model, sites, table, device, profile.train.batch_size,
                                                        progress):
        rows = np.arange(start, start + len(seg))
        for key in dict.fromkeys(keys[rows]):
            mine = keys[rows] == key
            waiting.setdefault(key, []).append((rows[mine], seg[mine], probs[mine], target[mine]))
        while closing and closing[0][0] < rows[-1] + 1:
            key = closing.pop(0)[1]
            at, seg_case, probs_case, target_case = (np.concatenate(part) for part in zip(*waiting.pop(key)))
            seg_case = postprocess_case(seg_case, z_index[at], profile.model.postprocess)
            accumulator.update(seg_case, target_case, probs_case, labels[at], [key] * len(at), spacing[at],
                               tumor_types[at].tolist(), z_index=z_index[at],
                               spacing_z_mm=None if spacing_z is None else spacing_z[at])
            accumulator.close([key])
    return accumulator


def evaluate_model(
    model: nn.Module, sites: Sequence, split: str | None, profile: Profile, device: torch.device, *,
    case_ids: Sequence[str] | None = None, progress: bool = True,
) -> dict[str, float]:
    """Aggregate metrics only (safe to send to the server); ``num-examples`` = the number of cases."""
    metrics, _ = evaluate_cases(model, sites, split, profile, device, case_ids=case_ids, progress=progress)
    return aggregate_metrics(metrics)


def aggregate_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation summary (no per-class lists such as the confusion matrix), with
    ``num-examples`` = the number of cases, which FedAvg weights evaluation by."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    out["num-examples"] = int(out["n_cases"])
    return out
