"""A user's pooled dataset, split by hospital into the per-site folders the study (and the ClientApp) read.

The pooled folder follows the site contract of docs/data.md (``dataset.json`` + ``cases.csv``) with one more column
in ``cases.csv`` naming each case's hospital (``--site-column``, e.g. ``hospital``). Splitting writes, per hospital,
a folder holding only the two contract files; ``cases.csv`` points at the pooled folder's images and masks by paths
relative to the hospital's folder, so nothing is copied and the pooled folder is never written to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from braintumnet.data.contract import CASES_CSV, DATASET_JSON, EXTERNAL_SITE, SITES
from braintumnet.data.site import SITE_NAME, load_site
from braintumnet.errors import BrainTumNetError
from braintumnet.io import atomic_write_text


@dataclass(frozen=True)
class StudySites:
    """Where the study's site folders are and which of them train.

    Args:
        root: a folder holding one site folder per name.
        internal: the hospitals that train (each has a train and a test split).
        external: the hospital no model ever trains on, or None when the data have none.
        synthetic: True for the phantom cohort.
    """

    root: Path
    internal: tuple[str, ...]
    external: str | None
    synthetic: bool

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.internal, *((self.external,) if self.external else ()))


def phantom_sites(root: Path) -> StudySites:
    return StudySites(Path(root), SITES, EXTERNAL_SITE, synthetic=True)


def split_pooled(data: Path, site_column: str, out: Path, external: str | None = EXTERNAL_SITE) -> StudySites:
    """Write ``out/<hospital>/{dataset.json,cases.csv}`` for every value of ``site_column``.

    Args:
        data: the pooled folder (``dataset.json`` + ``cases.csv`` with ``site_column``).
        site_column: the ``cases.csv`` column naming each case's hospital.
        out: where the per-site folders go (created; never inside ``data``).
        external: the hospital used only for external validation; None or a name absent from the data = no
            external site. Its split column is ignored: every one of its cases is evaluated.

    Raises:
        BrainTumNetError: no such column, an empty or unusable hospital name, a case id used twice, fewer than two
            training hospitals, or a training hospital without train or test cases.
    """
    data, out = Path(data).absolute(), Path(out).absolute()
    pooled = load_site(data)  # checks dataset.json and the cases.csv columns, naming the file and the fix
    raw = pd.read_csv(data / CASES_CSV, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    raw.columns = [str(c).strip() for c in raw.columns]
    if site_column not in raw.columns:
        raise BrainTumNetError(f"{data / CASES_CSV}: no column {site_column!r} naming each case's hospital; the "
                               f"columns are {', '.join(raw.columns)}: pass --site-column with one of them")
    cases = pooled.cases.assign(_site=raw[site_column].str.strip().to_numpy())
    bad = cases[~cases["_site"].map(lambda s: bool(SITE_NAME.fullmatch(s)))]
    if len(bad):
        lines = ", ".join(f"line {r} ({s!r})" for r, s in zip(bad["row"][:5], bad["_site"][:5]))
        raise BrainTumNetError(f"{data / CASES_CSV}: {site_column} must name a hospital (letters, digits, _ - .); "
                               f"fix {lines}")
    dupes = cases[cases.duplicated("case_id", keep=False)]
    if len(dupes):
        # One case in two hospitals would leak test cases into training elsewhere.
        raise BrainTumNetError(f"{data / CASES_CSV}: case id(s) {sorted(set(dupes['case_id']))[:5]} appear more than"
                               " once; every case must belong to exactly one hospital")
    names = list(dict.fromkeys(cases["_site"]))
    external = external if external in names else None
    internal = tuple(n for n in names if n != external)
    if len(internal) < 2:
        raise BrainTumNetError(f"{data / CASES_CSV}: {site_column} names {len(internal)} training hospital(s) "
                               f"({', '.join(internal)}); a federation needs at least two")
    for name in internal:
        splits = set(cases.loc[cases["_site"] == name, "split"])
        if not {"train", "test"} <= splits:
            raise BrainTumNetError(f"{data / CASES_CSV}: hospital {name!r} has no "
                                   f"{' and no '.join(sorted({'train', 'test'} - splits))} cases; each training "
                                   "hospital needs both splits")
    meta = json.loads((data / DATASET_JSON).read_text(encoding="utf-8"))
    for name in names:
        site_dir = out / name
        site_dir.mkdir(parents=True, exist_ok=True)
        rows = cases[cases["_site"] == name].drop(columns=["row", "_site"]).copy()
        for column in ("image", "mask"):
            # Relative to the hospital's folder, as the contract reads paths (a cache's fingerprint names each file
            # relative to its site folder, which an absolute path elsewhere is not).
            rows[column] = [os.path.relpath(data / p, site_dir) for p in rows[column]]
        types = [t for t in meta["tumor_types"] if t in set(rows["tumor_type"])] or meta["tumor_types"]
        _write_if_changed(site_dir / DATASET_JSON, json.dumps({**meta, "site": name, "tumor_types": types,
                                                                "description": f"{name}: split from {data}"},
                                                               indent=2))
        _write_if_changed(site_dir / CASES_CSV, rows.to_csv(index=False))
    return StudySites(out, internal, external, synthetic=pooled.synthetic)


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` already holds it, and then whole or not at all: a study run again into its
    folder, or its workers splitting the same data (simulation/workers.py), leave the files others read alone."""
    try:
        same = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):  # not there yet, or not text: write it
        same = False
    if not same:
        atomic_write_text(path, text)
