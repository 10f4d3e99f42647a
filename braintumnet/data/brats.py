"""``braintumnet import-brats``: a public BraTS release as one pooled site folder of the contract (docs/data.md).

Recognised releases, found anywhere below the BraTS folder by their file names:

- **BraTS 2023** (and later) ``BraTS-GLI-*`` (glioma), ``BraTS-MET-*`` (metastases), ``BraTS-MEN-*`` (meningioma):
  ``CASE/CASE-t1c.nii.gz`` and ``CASE/CASE-seg.nii.gz``, labels 1 NETC (non-enhancing tumour core), 2 SNFH
  (surrounding non-enhancing FLAIR hyperintensity), 3 ET (enhancing tumour);
- **BraTS 2021** (and 2018-2020, same scheme) gliomas: ``CASE/CASE_t1ce.nii.gz`` and ``CASE/CASE_seg.nii.gz``, labels
  1 NCR/NET (necrotic and non-enhancing core), 2 ED (peritumoral edema), 4 ET.

The contract's masks: tumour (1) = enhancing tumour and the non-enhancing / necrotic core (BraTS' "tumour core"),
edema (2) = SNFH / ED. Any other label value is a problem of that case, never remapped. The contrast-enhanced T1 is
referenced where it lies (``cases.csv`` holds its path relative to the output folder); only the relabelled masks are
written. BraTS images are skull-stripped and resampled to 1 mm on a 240×240×155 grid, so preparing them involves no
resampling through the plane.

Hospitals: from a CSV naming each case's institution (``--institutions``), one institution held out as the
``external`` site; or, without one, a seeded split stratified by tumour type into ``yibin``, ``plagh``, ``jinling``
and ``external``. The result is a pooled folder with a ``hospital`` column that ``python -m simulation --data``
splits by hospital.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from braintumnet.data.contract import (CASES_CSV, DATASET_JSON, EDEMA_LABEL, EXTERNAL_SITE, MODALITY, SITES,
                                       TUMOR_TYPES, TUMOUR_LABEL)
from braintumnet.data.site import SITE_NAME
from braintumnet.errors import BrainTumNetError
from braintumnet.io import atomic_write_json, atomic_write_text

HOSPITAL_COLUMN = "hospital"  # what python -m simulation --data reads by default (--site-column)
LABELS_DIR = "labelsTr"


@dataclass(frozen=True)
class Release:
    """One BraTS labelling scheme: how its files are named and what its label values mean."""

    name: str
    image: str  # the CE-T1 file's suffix after the case id
    seg: str
    tumour: tuple[int, ...]  # enhancing tumour + non-enhancing / necrotic core
    edema: tuple[int, ...]


BRATS_2023 = Release("BraTS 2023", "-t1c.nii.gz", "-seg.nii.gz", tumour=(1, 3), edema=(2,))
BRATS_2021 = Release("BraTS 2021", "_t1ce.nii.gz", "_seg.nii.gz", tumour=(1, 4), edema=(2,))
# The tumour type of each BraTS 2023 collection (the case id's second part); BraTS 2021 is glioma only.
COLLECTION_TYPES = {"GLI": "glioma", "MET": "metastasis", "MEN": "meningioma"}
BRATS_2023_ID = re.compile(r"BraTS-([A-Z]+)-\d+-\d+")


@dataclass(frozen=True)
class BratsCase:
    case_id: str
    image: Path
    seg: Path | None
    release: Release
    tumor_type: str | None  # None: a collection of none of the three types


@dataclass
class ImportReport:
    """What ``import_brats`` wrote and what it left out, and why."""

    out: Path
    cases: pd.DataFrame
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> reason

    @property
    def exit_code(self) -> int:
        return 3 if self.skipped else 0  # 3: some cases left out (the CLI's "quarantined")

    def summary(self) -> str:
        by = self.cases[HOSPITAL_COLUMN]
        types = [t for t in TUMOR_TYPES if t in set(self.cases["tumor_type"])]
        table = pd.concat([pd.crosstab(by, self.cases["split"]).reindex(columns=["train", "test"], fill_value=0),
                           pd.crosstab(by, self.cases["tumor_type"]).reindex(columns=types, fill_value=0)], axis=1)
        lines = [f"imported {len(self.cases)} BraTS cases into {self.out}", table.to_string()]
        if self.skipped:
            lines.append(f"left out {len(self.skipped)} case(s):")
            lines += [f"  {case}: {why}" for case, why in list(self.skipped.items())[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        lines.append(f"next: braintumnet check {self.out}   then: python -m simulation --data {self.out}")
        return "\n".join(lines)


def import_brats(brats_dir: Path, out: Path, *, institutions: Path | None = None,
                 institution_column: str = "institution", external_institution: str | None = None,
                 seed: int = 0, external_fraction: float = 0.2, test_fraction: float = 0.2,
                 workers: int = 1, progress: bool = False) -> ImportReport:
    """Write ``out/{dataset.json, cases.csv, labelsTr/CASE.nii.gz}`` from the BraTS cases below ``brats_dir``.

    Args:
        brats_dir: a BraTS release as distributed (one folder per case), or a folder holding several releases.
        out: the new pooled site folder (created; it must not hold ``cases.csv`` or ``dataset.json`` yet, and must
            lie outside ``brats_dir``, which is only read).
        institutions: a CSV with a ``case_id`` column and ``institution_column`` naming each case's hospital;
            None: a seeded split into yibin / plagh / jinling / external.
        external_institution: with ``institutions``, the institution kept for external validation only.
        seed: the seeded split's and the train/test split's seed.
        external_fraction: without ``institutions``, the share of each tumour type held out as ``external``.
        test_fraction: the share of each training hospital's cases of each type in its test split.
        workers: processes relabelling the masks.

    Raises:
        BrainTumNetError: no BraTS case found, the output exists or lies inside the BraTS folder, BraTS 2021 and
            BraTS-GLI 2023 together (the same patients twice), a case id twice, a bad institutions CSV, or a fraction
            outside [0, 1).
    """
    brats_dir, out = Path(brats_dir).absolute(), Path(out).absolute()
    _check_arguments(brats_dir, out, external_fraction, test_fraction)
    found = find_cases(brats_dir)
    skipped = {c.case_id: why for c in found if (why := _unusable(c))}
    usable = [c for c in found if c.case_id not in skipped]
    _some_usable(brats_dir, usable, skipped)
    if institutions is not None:  # before the long part: a case without an institution stops the import at once
        ids = pd.DataFrame({"case_id": [c.case_id for c in usable]})
        named = dict(zip(ids["case_id"], hospitals_from_csv(ids, Path(institutions), institution_column,
                                                            external_institution)))
    (out / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    args = [(c.seg, c.release, out / LABELS_DIR / f"{c.case_id}.nii.gz") for c in usable]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            outcomes = list(_progress(pool.map(_relabel_args, args, chunksize=4), len(args), progress))
    else:
        outcomes = list(_progress(map(_relabel_args, args), len(args), progress))
    for case, problem in zip(list(usable), outcomes):
        if problem:
            skipped[case.case_id] = problem
    usable = [c for c in usable if c.case_id not in skipped]
    _some_usable(brats_dir, usable, skipped)
    cases = pd.DataFrame({
        "case_id": [c.case_id for c in usable],
        "image": [os.path.relpath(c.image, out) for c in usable],
        "mask": [f"{LABELS_DIR}/{c.case_id}.nii.gz" for c in usable],
        "tumor_type": [c.tumor_type for c in usable],
        "brats_release": [c.release.name for c in usable],
    })
    if institutions is not None:
        cases[HOSPITAL_COLUMN] = cases["case_id"].map(named)
    else:
        cases[HOSPITAL_COLUMN] = seeded_hospitals(cases, seed, external_fraction)
    cases["split"] = train_test_split(cases, seed, test_fraction)
    cases = cases[["case_id", "image", "mask", "tumor_type", "split", HOSPITAL_COLUMN, "brats_release"]]
    _write_contract(out, brats_dir, cases)
    return ImportReport(out, cases, skipped)


def find_cases(brats_dir: Path) -> list[BratsCase]:
    """Every BraTS case below ``brats_dir``, by its CE-T1 file's name, sorted by case id."""
    cases: dict[str, BratsCase] = {}
    for release in (BRATS_2023, BRATS_2021):
        for image in sorted(brats_dir.rglob(f"*{release.image}")):
            case_id = image.name[: -len(release.image)]
            seg = image.with_name(case_id + release.seg)
            if release is BRATS_2023:
                match = BRATS_2023_ID.fullmatch(case_id)
                tumor_type = COLLECTION_TYPES.get(match.group(1)) if match else None
            else:
                tumor_type = "glioma"
            if case_id in cases:
                raise BrainTumNetError(f"{brats_dir}: case {case_id} is there twice ({cases[case_id].image.parent} "
                                       f"and {image.parent}); keep one copy of each release")
            cases[case_id] = BratsCase(case_id, image, seg if seg.is_file() else None, release, tumor_type)
    if not cases:
        raise BrainTumNetError(f"{brats_dir}: no BraTS case found (looked for CASE{BRATS_2023.image} and "
                               f"CASE{BRATS_2021.image} files); give the folder the release was unpacked into")
    releases = {c.release.name for c in cases.values()}
    if BRATS_2021.name in releases and any(c.case_id.startswith("BraTS-GLI-") for c in cases.values()):
        # BraTS-GLI 2023's training cases are BraTS 2021's, renamed: importing both puts patients in two hospitals.
        raise BrainTumNetError(f"{brats_dir}: holds BraTS 2021 and BraTS-GLI 2023, which share their patients; "
                               "import one of them (BraTS-MET and BraTS-MEN may go with either)")
    return sorted(cases.values(), key=lambda c: c.case_id)


def relabel(seg_path: Path, release: Release, out_path: Path) -> str | None:
    """Write the contract's mask of one BraTS segmentation; returns the problem instead when it has none to write."""
    try:
        seg = nib.load(seg_path)
        labels = np.asanyarray(seg.dataobj)
    except Exception as exc:  # a damaged file is this case's problem, never the whole import's
        return f"{seg_path.name} cannot be read ({type(exc).__name__}: {exc}); download the case again"
    if labels.dtype.kind == "f":  # BraTS 2023 stores some masks as floating point
        whole = np.rint(labels)
        if not np.array_equal(whole, labels):
            return f"{seg_path.name} holds values that are not whole numbers, so it is no label map"
        labels = whole.astype(np.int16)
    if labels.ndim != 3:
        return f"{seg_path.name} is not a 3-D label map (shape {labels.shape})"
    values = set(np.unique(labels).astype(int).tolist())
    unknown = values - {0, *release.tumour, *release.edema}
    if unknown:
        return (f"{seg_path.name} has label value(s) {sorted(unknown)}, which {release.name} does not define "
                f"(it uses {sorted({*release.tumour, *release.edema})}); it may belong to another release")
    if not values & set(release.tumour):
        return f"{seg_path.name} has no tumour core (labels {list(release.tumour)}), which the contract needs"
    mask = np.zeros(labels.shape, np.uint8)
    mask[np.isin(labels, release.edema)] = EDEMA_LABEL
    mask[np.isin(labels, release.tumour)] = TUMOUR_LABEL
    image = nib.Nifti1Image(mask, seg.affine, header=seg.header)
    image.header.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    tmp = out_path.with_name(out_path.name + ".tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(out_path)
    return None


def seeded_hospitals(cases: pd.DataFrame, seed: int, external_fraction: float) -> list[str]:
    """Each tumour type's cases shuffled, ``external_fraction`` of them to ``external``, the rest dealt out in turn
    to the three hospitals (each type's deal starting one hospital further on, so the counts stay even)."""
    rng = np.random.default_rng(seed)
    hospital = pd.Series("", index=cases.index)
    for turn, (_, group) in enumerate(cases.groupby("tumor_type", sort=True)):
        order = rng.permutation(group.index.to_numpy())
        n_external = round(len(order) * external_fraction)
        hospital[order[:n_external]] = EXTERNAL_SITE
        for i, index in enumerate(order[n_external:]):
            hospital[index] = SITES[(i + turn) % len(SITES)]
    return hospital.tolist()


def hospitals_from_csv(cases: pd.DataFrame, csv: Path, column: str, external: str | None) -> list[str]:
    """Each case's institution from ``csv`` (columns ``case_id`` and ``column``); ``external`` becomes ``external``."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BrainTumNetError(f"{csv}: not a readable CSV ({exc}); give one with columns case_id,{column}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("case_id", column) if c not in table.columns]
    if missing:
        raise BrainTumNetError(f"{csv}: no column {' or '.join(missing)}; the columns are "
                               f"{', '.join(table.columns)} (pass --institution-column to name the institution's)")
    names = dict(zip(table["case_id"].str.strip(), table[column].str.strip()))
    unknown = [c for c in cases["case_id"] if not names.get(c)]
    if unknown:
        raise BrainTumNetError(f"{csv}: no {column} for {len(unknown)} case(s), e.g. {', '.join(unknown[:5])}; add "
                               "a row for each case, or move the cases out of the BraTS folder to leave them out")
    hospitals = [_site_name(names[c]) for c in cases["case_id"]]
    if external is not None:
        if _site_name(external) not in hospitals:
            raise BrainTumNetError(f"{csv}: no case of institution {external!r}, so none can be held out as the "
                                   f"external site; the institutions are {', '.join(sorted(set(hospitals)))}")
        hospitals = [EXTERNAL_SITE if h == _site_name(external) else h for h in hospitals]
    return hospitals


def train_test_split(cases: pd.DataFrame, seed: int, test_fraction: float) -> list[str]:
    """``test_fraction`` of each training hospital's cases of each type to ``test`` (seeded), at least one test and
    one train case per hospital that has two; the external site's cases are all ``test`` (never trained on)."""
    rng = np.random.default_rng(seed + 1)
    split = pd.Series("train", index=cases.index)
    split[cases[HOSPITAL_COLUMN] == EXTERNAL_SITE] = "test"
    internal = cases[cases[HOSPITAL_COLUMN] != EXTERNAL_SITE]
    for _, hospital in internal.groupby(HOSPITAL_COLUMN, sort=True):
        for _, group in hospital.groupby("tumor_type", sort=True):
            order = rng.permutation(group.index.to_numpy())
            split[order[:round(len(order) * test_fraction)]] = "test"
        mine = split[hospital.index]
        if len(hospital) >= 2 and not (mine == "test").any():
            split[rng.choice(hospital.index.to_numpy())] = "test"
        elif len(hospital) >= 2 and not (mine == "train").any():
            split[rng.choice(hospital.index.to_numpy())] = "train"
    return split.tolist()


# --- helpers ---

def _check_arguments(brats_dir: Path, out: Path, external_fraction: float, test_fraction: float) -> None:
    if not brats_dir.is_dir():
        raise BrainTumNetError(f"{brats_dir}: no such folder; give the folder a BraTS release was unpacked into")
    if out == brats_dir or out.is_relative_to(brats_dir):
        raise BrainTumNetError(f"{out} lies inside the BraTS folder {brats_dir}, which is only read; write the "
                               "site folder elsewhere")
    for name in (CASES_CSV, DATASET_JSON):
        if (out / name).exists():
            raise BrainTumNetError(f"{out / name}: exists and is never overwritten; give a new output folder or "
                                   "delete it")
    for name, value in (("--external-fraction", external_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise BrainTumNetError(f"{name} {value}: give a fraction in [0, 1), e.g. 0.2")


def _some_usable(brats_dir: Path, usable: list[BratsCase], skipped: dict[str, str]) -> None:
    if not usable:
        case, why = next(iter(skipped.items()))
        raise BrainTumNetError(f"{brats_dir}: none of the {len(skipped)} BraTS case(s) can be imported, e.g. "
                               f"{case}: {why}")


def _unusable(case: BratsCase) -> str | None:
    if case.seg is None:
        return (f"no {case.case_id}{case.release.seg} beside the image (a validation or test case without "
                "reference labels)")
    if case.tumor_type is None:
        return f"a BraTS collection of none of the types {', '.join(TUMOR_TYPES)}"
    return None


def _relabel_args(args: tuple) -> str | None:
    return relabel(*args)


def _site_name(name: str) -> str:
    """An institution's name as a site name (letters, digits, _ - .), e.g. "St. Mary's" -> "St._Mary_s"."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")
    if not SITE_NAME.fullmatch(cleaned):
        raise BrainTumNetError(f"institution {name!r} gives no usable site name; use letters and digits")
    return cleaned


def _progress(items, total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="BraTS masks", unit="case", disable=not show)


def _write_contract(out: Path, brats_dir: Path, cases: pd.DataFrame) -> None:
    types = [t for t in TUMOR_TYPES if t in set(cases["tumor_type"])]
    releases: Sequence[str] = sorted(set(cases["brats_release"]))
    meta = {
        "site": "brats",
        "modality": MODALITY,
        "labels": {"0": "background", "1": "tumour (BraTS enhancing tumour + non-enhancing/necrotic core)",
                   "2": "peritumoral edema (BraTS SNFH / ED)"},
        "tumor_types": types,
        "synthetic": False,
        "description": f"{', '.join(releases)} from {brats_dir}, imported by braintumnet import-brats; one "
                       f"'{HOSPITAL_COLUMN}' per case",
    }
    atomic_write_json(out / DATASET_JSON, meta)
    atomic_write_text(out / CASES_CSV, cases.to_csv(index=False))  # written last: a folder with it is a finished import
