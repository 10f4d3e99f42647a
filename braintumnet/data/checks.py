"""Per-case checks: each bad-input kind becomes one ``CaseProblem`` naming the case, the file and the fix.

The case is then quarantined and the rest of the site goes on (docs/data.md, "Bad input"). Two kinds are found from
``cases.csv`` alone (``check_table``); the others need the files (``load_case``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from braintumnet.data.contract import CASES_CSV, LABELS, TUMOR_TYPES, TUMOUR_LABEL
from braintumnet.data.dicom_io import FileProblem
from braintumnet.data.readers import Volume, geometry_mismatch, read_volume
from braintumnet.data.site import Site, case_id_problem
from braintumnet.errors import CaseProblem


@dataclass(frozen=True, eq=False)
class Case:
    """A case that passed every check: image float32 and mask uint8, both ``(X, Y, Z)`` on the same RAS+ grid."""

    case_id: str
    image_path: str  # as in cases.csv, for messages
    image: Volume
    mask: np.ndarray


def check_table(site: Site) -> list[CaseProblem]:
    """Problems visible in ``cases.csv`` itself: duplicate, empty or unusable case ids and unknown tumour types."""
    problems = []
    cases = site.cases
    for case_id, rows in cases[cases["case_id"].duplicated(keep=False)].groupby("case_id", sort=False)["row"]:
        lines = ", ".join(str(r) for r in rows)
        problems.append(CaseProblem(case_id, CASES_CSV, f"duplicate case id on lines {lines}: give each case a "
                                    "unique id (all its rows are quarantined until then)"))
    for case_id, tumor_type in cases[["case_id", "tumor_type"]].itertuples(index=False):
        if not case_id:
            problems.append(CaseProblem("(empty)", CASES_CSV, "a row has no case_id: fill it in"))
        elif case_id_problem(case_id):
            problems.append(CaseProblem(case_id, CASES_CSV, case_id_problem(case_id)))
        elif tumor_type not in TUMOR_TYPES:
            problems.append(CaseProblem(case_id, CASES_CSV, f"unknown tumour type {tumor_type!r}: use one of "
                                        f"{', '.join(TUMOR_TYPES)} or remove the case"))
        elif tumor_type not in site.tumor_types:
            problems.append(CaseProblem(case_id, CASES_CSV, f"unknown tumour type {tumor_type!r} for this site: "
                                        "add it to tumor_types in dataset.json"))
    return problems


def load_case(site_root: Path, case: pd.Series) -> Case:
    """Read one ``cases.csv`` row's image and mask and check them.

    Raises:
        CaseProblem: missing file, unreadable or truncated file, 4-D image, DICOM folder mixing series, NaN/Inf
            voxels, mask values outside {0, 1, 2}, no tumour voxel (label 1), image/mask geometry mismatch.
    """
    case_id = case["case_id"]
    image = _read(site_root, case_id, case["image"], "image")
    mask = _read(site_root, case_id, case["mask"], "mask")
    bad = ~np.isfinite(image.array)
    if bad.any():
        raise CaseProblem(case_id, case["image"], f"{int(bad.sum())} voxels are NaN or Inf: re-export the image "
                          "(check the converter's intensity scaling)")
    values = np.unique(mask.array)
    unexpected = values[~np.isin(values, list(LABELS))]
    if len(unexpected):
        shown = ", ".join(f"{v:g}" for v in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CaseProblem(case_id, case["mask"], f"mask values outside {{0, 1, 2}}: {shown}; relabel it "
                          "(0 background, 1 tumour, 2 edema), don't let a tool rescale it")
    if TUMOUR_LABEL not in values:
        raise CaseProblem(case_id, case["mask"], "empty tumour mask (no voxel of label 1): annotate the tumour "
                          "or remove the case from cases.csv")
    mismatch = geometry_mismatch(image, mask)
    if mismatch:
        raise CaseProblem(case_id, case["mask"], f"geometry mismatch: {mismatch}; draw or resample the mask on "
                          "this image's grid")
    return Case(case_id, case["image"], image, mask.array.astype(np.uint8))


def _read(site_root: Path, case_id: str, relative: str, what: str) -> Volume:
    if not relative:
        raise CaseProblem(case_id, CASES_CSV, f"no {what} path given: fill in the {what} column")
    path = site_root / relative
    if not path.exists():
        raise CaseProblem(case_id, relative, f"missing file: no {what} at {path}; fix the path in cases.csv "
                          "(relative to the site folder) or add the file")
    try:
        return read_volume(path)
    except FileProblem as exc:
        raise CaseProblem(case_id, _relative(exc.path, site_root), exc.problem) from None
    except Exception as exc:  # a damage no check foresaw: still this case's problem, never the whole site's
        raise CaseProblem(case_id, relative, f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())}"
                          f"); re-export the {what}, and if it opens in a viewer, report this file's header as a "
                          "BrainTumNet bug") from None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
