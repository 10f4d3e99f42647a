"""Evaluation speed: seconds per evaluated test case, the price every federated round pays on each site's test split.

A test case is scored on every slice of its head as one volume (``engine.evaluate_cases``: batched inference, then
3-D Dice, IoU, HD95 and HD on the foreground's bounding box, and the case's type). The cases are synthetic prepared
sites built in memory (no phantom, no disk): ``depth`` axial slices of 3 mm at ``img_size`` px over 240 mm, a head
with one lesion (tumour inside edema) on a few of them. Two models go through the same ``engine.evaluate_cases``:

* ``scoring``: a stand-in that thresholds the image (the predicted tumour a little smaller than the reference, a
  false-positive speck on a tumour-free slice): everything but the network, i.e. data loading, batching, the
  post-processing, the 3-D metrics and the classification figures; measured again without the post-processing
  (``model.postprocess = none``) beside it, for its price;
* ``BrainTumNet``: the profile's model (untrained: its cost does not depend on its weights), so the whole evaluation.

``python -m bench --only evaluation`` writes ``evaluation.json`` / ``evaluation.md`` and prints the figures.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from bench.common import Context, median, table, write_result
from braintumnet.config import resolve
from braintumnet.data.cache import PreparedSite
from braintumnet.postprocess import with_rule

FOV_MM, SLICE_MM = 240.0, 3.0
TUMOUR, EDEMA, HEAD = 0.9, 0.25, 0.45  # image intensities of the synthetic scan


def _settings(ctx: Context) -> dict:
    if ctx.tiny:
        return {"sizes": {32: {"profile": "quick", "data.img-size": 32, "model.feature-size": 8}},
                "cases": 2, "depth": 12, "reps": 1}
    if ctx.quick:
        return {"sizes": {64: {"profile": "quick"}, 256: {"profile": "quick", "data.img-size": 256}},
                "cases": 3, "depth": 50, "reps": 2}
    return {"sizes": {64: {"profile": "quick"}, 256: {"profile": "paper"}}, "cases": 4, "depth": 50, "reps": 3}


def synthetic_site(img_size: int, n_cases: int, depth: int, seed: int = 0) -> PreparedSite:
    """A prepared test site in memory: ``n_cases`` cases of ``depth`` contiguous slices each (SYNTHETIC)."""
    rng = np.random.default_rng(seed)
    pixel = FOV_MM / img_size
    rows, cols = np.mgrid[:img_size, :img_size] * pixel - FOV_MM / 2
    z = (np.arange(depth) - (depth - 1) / 2) * SLICE_MM
    images, masks, records = [], [], []
    types = ("glioma", "metastasis", "meningioma")
    for case in range(n_cases):
        centre = rng.uniform(-25, 25, 3)
        head = (rows[None] / 90) ** 2 + (cols[None] / 75) ** 2 + (z[:, None, None] / 75) ** 2 <= 1
        r = np.sqrt((z[:, None, None] - centre[0]) ** 2 + (rows[None] - centre[1]) ** 2
                    + (cols[None] - centre[2]) ** 2)
        mask = np.where(r <= 15, 1, np.where(r <= 25, 2, 0)) * head
        # Brightest at the lesion's centre: the stand-in's tumour threshold then cuts a smaller tumour than the mask.
        image = np.where(mask == 1, TUMOUR - 0.2 * r / 15, np.where(mask == 2, EDEMA, HEAD * head))
        images.append(np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1).astype(np.float16))
        masks.append(mask.astype(np.uint8))
        records += [{"case_id": f"c{case:03d}", "tumor_type": types[case % 3], "split": "test", "z_index": k,
                     "spacing_y_mm": pixel, "spacing_x_mm": pixel, "spacing_z_mm": SLICE_MM} for k in range(depth)]
    return PreparedSite(site="bench", images=np.concatenate(images), masks=np.concatenate(masks),
                        slices=pd.DataFrame(records))


class Thresholds(nn.Module):
    """A stand-in segmenter and classifier at no network cost: bright -> tumour, dim -> edema, a tumour speck in a
    corner of each batch's first slice (a false positive); class probabilities from the mean intensity."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor) -> SimpleNamespace:
        x = image[:, 0]
        tumour, edema = x > 0.8, (x > 0.2) & (x < 0.3)
        tumour[0, :2, :2] = True
        seg = torch.stack([torch.full_like(x, 0.5), tumour.float(), edema.float()], 1)  # argmax: the labels
        cls = torch.stack([x.mean((1, 2)) * (k + 1) for k in range(self.num_classes)], 1)
        return SimpleNamespace(seg_logits=seg, cls_logits=cls)


def seconds_per_case(run_config: dict, n_cases: int = 3, depth: int = 50, reps: int = 1,
                     device: str = "cpu") -> dict:
    """Seconds per evaluated case through ``engine.evaluate_cases`` at the run config's image size: ``scoring``
    (the stand-in: everything but the network) and ``total`` (BrainTumNet at the config's width), medians of
    ``reps`` runs."""
    from braintumnet.data.contract import class_names
    from braintumnet.engine import build_model
    from braintumnet.scoring import evaluate_cases

    profile = resolve(run_config)
    raw = with_rule(profile, "none")
    size = profile.data.img_size
    site = synthetic_site(size, n_cases, depth)
    dev = torch.device(device)
    stand_in = Thresholds(len(class_names(profile.data.task)))
    # Side by side in each run: the stand-in with the profile's post-processing and without any, then the network.
    models = {"scoring": (stand_in, profile), "scoring_raw": (stand_in, raw), "total": (build_model(profile), profile)}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, (model, scored_with) in models.items():
            start = time.perf_counter()
            metrics, _ = evaluate_cases(model, [site], "test", scored_with, dev, progress=False)
            times[name].append((time.perf_counter() - start) / n_cases)
            assert metrics["n_cases"] == n_cases
    return {"img_size": size, "feature_size": profile.model.feature_size, "cases": n_cases, "slices_per_case": depth,
            "postprocess": profile.model.postprocess, "scoring_s_per_case": median(times["scoring"]),
            "scoring_without_postprocess_s_per_case": median(times["scoring_raw"]),
            "total_s_per_case": median(times["total"]), "runs": times}


def run(ctx: Context) -> dict:
    s = _settings(ctx)
    found = {}
    for size, run_config in s["sizes"].items():
        found[size] = seconds_per_case(run_config, s["cases"], s["depth"], s["reps"], ctx.device)
        f = found[size]
        ctx.say(f"evaluation at {size} px ({f['slices_per_case']} slices a case): {f['scoring_s_per_case']:.3f} s a "
                f"case for scoring ({f['scoring_without_postprocess_s_per_case']:.3f} s without post-processing), "
                f"{f['total_s_per_case']:.3f} s with BrainTumNet (width {f['feature_size']})")
    rows = [[size, f["feature_size"], f["slices_per_case"], f["scoring_without_postprocess_s_per_case"],
             f["scoring_s_per_case"], f["scoring_s_per_case"] / f["scoring_without_postprocess_s_per_case"],
             f["total_s_per_case"]]
            for size, f in found.items()]
    doc = {"sizes": {str(k): v for k, v in found.items()}}
    return write_result(ctx, "evaluation", "Evaluation: seconds per test case (whole scan, 3-D metrics)", doc,
                        [("Seconds per evaluated case (medians)",
                          table(["px", "BrainTumNet width", "slices a case", "scoring s/case, no post-processing",
                                 "scoring s/case, largest lesion kept", "post-processing ratio", "total s/case"],
                                rows))],
                        [f"Synthetic cases (SYNTHETIC, built in memory): {s['cases']} a size, {s['depth']} slices of "
                         f"{SLICE_MM:g} mm each, one lesion; {s['reps']} run(s), medians. 'scoring' is "
                         "engine.evaluate_cases with a thresholding stand-in for the network (loading, batching, "
                         "3-D metrics, classification), with the profile's post-processing (model.postprocess: the "
                         "largest lesion kept) and without it (none), side by side in each run; 'total' with an "
                         "untrained BrainTumNet of that width, post-processing included."])
