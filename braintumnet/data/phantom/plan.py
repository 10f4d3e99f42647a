"""The cohort plan: which cases each site has, computed without drawing a single voxel.

§2.1.1: 485 internal cases (167 glioma, 156 metastasis, 162 meningioma) from three hospitals, "378 training and 109
test" cases, plus a 51-case external set (17 per type, §3). 378 + 109 = 487, not 485; the phantom keeps the paper's
109 test cases and trains on the other 376 (the test size is what the reported metrics are averaged over).

The three hospitals get different class mixes (non-IID, as real referral patterns are): Yibin is glioma-heavy, PLAGH
(a large oncology centre) metastasis-heavy, Jinling meningioma-heavy. Each site keeps its own test cases, stratified
by type (largest-remainder apportionment of the 109 over the nine site×type cells).

A small cohort can hold out more test cases than its scale gives (``test_scale``): at scale 0.1 the test set is 11
cases and the external set 5, on which an accuracy moves in steps of 0.09 and 0.2, too coarse to tell two models
apart by a few points. The extra cases are test-only and drawn from a generator of their own, after the cohort's
own cases, so the training cases and the first test cases are the very cases of the cohort without them.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from braintumnet.data.contract import EXTERNAL_SITE, SITES, TUMOR_TYPES
from braintumnet.data.phantom.scanner import PROFILES, SITE_PROFILES

# Cases per site and type at scale 1 (rows sum to the paper's 167 / 156 / 162; sites: 152 / 176 / 157).
SITE_MIX = {
    "yibin": {"glioma": 80, "metastasis": 38, "meningioma": 34},
    "plagh": {"glioma": 52, "metastasis": 78, "meningioma": 46},
    "jinling": {"glioma": 35, "metastasis": 40, "meningioma": 82},
}
EXTERNAL_MIX = {t: 17 for t in TUMOR_TYPES}
TEST_CASES = 109  # the paper's test set; the remaining 376 internal cases are training cases
# Atypical cases: one hallmark swapped, so that a model cannot classify on that hallmark alone (~12 % of each type).
ATYPICAL = {"glioma": "no_necrosis", "metastasis": "large_necrotic", "meningioma": "edema"}
ATYPICAL_SHARE = 0.12
GLIOMA_CROSSING_SHARE = 0.15  # butterfly gliomas through the corpus callosum
MENINGIOMA_SITES = {"convexity": 0.5, "falx": 0.25, "skull_base": 0.25}
METASTASIS_COUNTS = {1: 0.5, 2: 0.2, 3: 0.15, 4: 0.15}

PLAN_COLUMNS = ("site", "case_id", "tumor_type", "split", "atypical", "location", "n_lesions", "scanner",
                "field_strength_t", "manufacturer", "scanner_model", "slice_thickness_mm")


def case_rng(seed: int, case_id: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on (seed, case id, purpose): a case looks the same whatever else is drawn."""
    digest = hashlib.sha256(f"{case_id}/{purpose}".encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def largest_remainder(quotas: dict, total: int) -> dict:
    """Integers summing to ``total`` that follow ``quotas`` (Hamilton's method; ties go to the earlier key)."""
    floors = {k: math.floor(q) for k, q in quotas.items()}
    left = total - sum(floors.values())
    order = sorted(quotas, key=lambda k: -(quotas[k] - floors[k]))  # stable: earlier keys win ties
    for k in order[: max(left, 0)]:
        floors[k] += 1
    return floors


def cell_counts(scale: float = 1.0) -> pd.DataFrame:
    """Cases per (site, tumor_type, split) at ``scale``: columns site, tumor_type, train, test."""
    check_scale(scale)
    cells = {(s, t): n for s, mix in SITE_MIX.items() for t, n in mix.items()}
    total = sum(cells.values())
    test_1 = largest_remainder({c: n * TEST_CASES / total for c, n in cells.items()}, TEST_CASES)
    # Every site×type cell keeps at least one case, so tiny cohorts still have every class at every site.
    n = {c: max(1, v) for c, v in largest_remainder({c: v * scale for c, v in cells.items()},
                                                    round(total * scale)).items()}
    test = largest_remainder({c: v * scale for c, v in test_1.items()}, round(TEST_CASES * scale))
    test = {c: min(v, n[c]) for c, v in test.items()}
    for site in SITE_MIX:  # at least one test and one training case per site
        mine = [c for c in cells if c[0] == site]
        if sum(test[c] for c in mine) == 0:
            c = max(mine, key=lambda c: n[c] - test[c])
            test[c] += 1
        if sum(n[c] - test[c] for c in mine) == 0 and sum(n[c] for c in mine) > 1:
            c = max(mine, key=lambda c: test[c])
            test[c] -= 1
    ext = largest_remainder({t: v * scale for t, v in EXTERNAL_MIX.items()}, round(sum(EXTERNAL_MIX.values()) * scale))
    rows = [dict(site=s, tumor_type=t, train=n[(s, t)] - test[(s, t)], test=test[(s, t)]) for s, t in cells]
    rows += [dict(site=EXTERNAL_SITE, tumor_type=t, train=0, test=max(1, v)) for t, v in ext.items()]
    return pd.DataFrame(rows)


def extra_test_counts(scale: float, test_scale: float | None) -> dict[tuple[str, str], int]:
    """Test-only cases per (site, tumor_type) that bring a cohort at ``scale`` up to the test and external sets of
    ``test_scale`` (each cell: the cases it has at ``test_scale`` minus those at ``scale``, never below 0; where
    rounding gives a cell fewer test cases at the larger scale, it keeps its own, so the set is at least
    ``test_scale``'s). Empty when ``test_scale`` is None or not above ``scale``."""
    if test_scale is not None:
        check_scale(test_scale, "test_scale")
    if held_out_scale(scale, test_scale) is None:
        return {}
    have = cell_counts(scale).set_index(["site", "tumor_type"])["test"]
    want = cell_counts(test_scale).set_index(["site", "tumor_type"])["test"]
    return {cell: int(want[cell] - have[cell]) for cell in have.index if want[cell] > have[cell]}


def held_out_scale(scale: float, test_scale: float | None) -> float | None:
    """The test scale a cohort at ``scale`` actually holds out: ``test_scale`` where it is above ``scale``, else None
    (a test scale at or below the cohort's own adds no case)."""
    return test_scale if test_scale is not None and test_scale > scale else None


def check_scale(scale: float, name: str = "scale") -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0 < scale <= 1):
        raise ValueError(f"{name}={scale!r}: use a number in (0, 1]; 1 is the paper's cohort, 0.05 a quick one")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: use a non-negative integer")


def cohort_plan(scale: float = 1.0, seed: int = 0, test_scale: float | None = None) -> pd.DataFrame:
    """One row per case of the phantom cohort, without writing anything.

    Args:
        scale: shrinks every count in proportion (largest-remainder rounding; at least one case per site×type and
            one test case per site). 1.0 gives the paper's 485 + 51 cases.
        seed: which cohort; the same seed gives the same plan and the same files.
        test_scale: hold out test and external sets of this scale's size and type mix instead (above ``scale``;
            None: ``scale``'s own). The extra cases come after each site's own cases (``extra_test_counts``), each
            atypical with probability ``ATYPICAL_SHARE``; every other row is the row of the plan without them.

    Returns:
        ``PLAN_COLUMNS``: site, case_id (``yibin_0001``), tumor_type, split, atypical ("" or a tag from
        ``ATYPICAL``), location, n_lesions, scanner (a ``PROFILES`` name) and the ``cases.csv`` scanner columns.

    Examples::

        plan = cohort_plan(0.05, seed=0)
        plan.groupby(["site", "tumor_type", "split"]).size()
    """
    check_seed(seed)
    counts = cell_counts(scale)
    extra = extra_test_counts(scale, test_scale)
    plan_rng = np.random.default_rng([int(seed), 0x504C414E])
    extra_rng = np.random.default_rng([int(seed), 0x54455354])  # its own stream: plan_rng draws as without extras
    rows = []
    for site in (*SITES, EXTERNAL_SITE):
        cases = []
        for cell in counts[counts["site"] == site].itertuples():
            kinds = ["test"] * cell.test + ["train"] * cell.train
            cases += _drawn(cell.tumor_type, plan_rng.permutation(kinds), plan_rng)
        cases = [cases[k] for k in plan_rng.permutation(len(cases))]  # shuffled: a case id says nothing of its type
        added = []
        for cell in counts[counts["site"] == site].itertuples():
            added += _added(cell.tumor_type, extra.get((site, cell.tumor_type), 0), extra_rng)
        cases += [added[k] for k in extra_rng.permutation(len(added))]
        profile = PROFILES[SITE_PROFILES[site]]
        for i, (tumor_type, split, atypical) in enumerate(cases):
            case_id = f"{site}_{i + 1:04d}"
            location, n_lesions = _layout(tumor_type, atypical, case_rng(seed, case_id, "plan"))
            rows.append(dict(site=site, case_id=case_id, tumor_type=tumor_type, split=split, atypical=atypical,
                             location=location, n_lesions=n_lesions, scanner=profile.name,
                             **profile.scanner_columns()))
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def _drawn(tumor_type: str, splits, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(type, split, atypical tag) for one site×type cell's cases, ``ATYPICAL_SHARE`` of them atypical."""
    n = len(splits)
    atypical = np.zeros(n, bool)
    atypical[rng.permutation(n)[: int(ATYPICAL_SHARE * n + 0.5)]] = True
    return [(tumor_type, str(sp), ATYPICAL[tumor_type] if a else "") for sp, a in zip(splits, atypical)]


def _added(tumor_type: str, n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``n`` added test cases of one site×type cell, each atypical with probability ``ATYPICAL_SHARE``: a cell adds
    a handful, and the 12 % of so few rounds to none, which would leave the added test set without the cases built to
    defeat a one-hallmark classifier."""
    return [(tumor_type, "test", ATYPICAL[tumor_type] if rng.random() < ATYPICAL_SHARE else "") for _ in range(n)]


def _layout(tumor_type: str, atypical: str, rng: np.random.Generator) -> tuple[str, int]:
    if tumor_type == "glioma":
        return ("corpus_callosum" if rng.random() < GLIOMA_CROSSING_SHARE else "white_matter"), 1
    if tumor_type == "metastasis":
        count = 1 if atypical else int(rng.choice(list(METASTASIS_COUNTS), p=list(METASTASIS_COUNTS.values())))
        return "grey_white_junction", count
    return str(rng.choice(list(MENINGIOMA_SITES), p=list(MENINGIOMA_SITES.values()))), 1
