"""A site folder's two contract files, ``dataset.json`` and ``cases.csv``, read and checked (docs/data.md).

Problems here concern the whole site and raise ``BrainTumNetError`` naming the file and the fix; problems with one
case (a bad file, an unknown tumour type, a duplicate id) are left to ``braintumnet.data.checks``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from braintumnet.data import nnunet
from braintumnet.data.contract import CASES_COLUMNS, CASES_CSV, DATASET_JSON, MODALITY, SCANNER_COLUMNS, SPLITS
from braintumnet.data.contract import TUMOR_TYPES
from braintumnet.errors import BrainTumNetError

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A case id names files (predict's outputs) as a site name names a folder: the same characters, so that no id leads a
# path out of its folder ("../x") or hides a file (".x").
CASE_ID = SITE_NAME


def case_id_problem(case_id: str) -> str | None:
    """None for a usable (non-empty) case id, else what is wrong with it and the fix, in one line."""
    if CASE_ID.fullmatch(case_id):
        return None
    return (f"case id {case_id!r} must be a plain name (letters, digits, _ - ., starting with a letter or digit) as "
            "it names output files; rename it in cases.csv")


@dataclass(frozen=True, eq=False)
class Site:
    """One hospital's data as its contract files describe it.

    Args:
        root: the site folder (read only, never written to).
        name: ``dataset.json`` ``site``.
        tumor_types: ``dataset.json`` ``tumor_types``.
        cases: ``cases.csv`` as strings (``CASES_COLUMNS`` plus any ``SCANNER_COLUMNS``), with ``row`` = its line
            number in the file, for messages.
        synthetic: ``dataset.json`` ``synthetic`` (phantom cohorts say true).
        description: ``dataset.json`` ``description``.
    """

    root: Path
    name: str
    tumor_types: tuple[str, ...]
    cases: pd.DataFrame
    synthetic: bool = False
    description: str = ""

    @property
    def scanner_columns(self) -> list[str]:
        return [c for c in SCANNER_COLUMNS if c in self.cases.columns]


def load_site(site_dir: Path) -> Site:
    """Read ``site_dir/dataset.json`` and ``site_dir/cases.csv``.

    Raises:
        BrainTumNetError: missing folder or file, invalid JSON or CSV, a missing key or column, a modality other than
            CE-T1, a label map other than the contract's, a split other than train/test, no cases.
    """
    root = Path(site_dir)
    if not root.is_dir():
        raise BrainTumNetError(f"{root}: no such site folder; give the folder holding {DATASET_JSON} and {CASES_CSV}")
    meta = _read_dataset_json(root / DATASET_JSON)
    cases = _read_cases_csv(root / CASES_CSV)
    return Site(
        root=root,
        name=meta["site"],
        tumor_types=tuple(meta["tumor_types"]),
        cases=cases,
        synthetic=bool(meta.get("synthetic", False)),
        description=str(meta.get("description", "")),
    )


def _read_dataset_json(path: Path) -> dict:
    example = '{"site": "yibin", "modality": "CE-T1", "labels": {...}, "tumor_types": ["glioma", ...]}'
    if not path.is_file():
        raise BrainTumNetError(f"{path}: missing; write it as in docs/data.md, e.g. {example}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrainTumNetError(f"{path}: not valid JSON ({exc}); fix it as in docs/data.md") from None
    if not isinstance(meta, dict):
        raise BrainTumNetError(f"{path}: must hold a JSON object such as {example}")
    meta, problem = nnunet.with_contract_keys(path, meta)  # nnU-Net v2's dataset.json, taken as it is
    if problem:
        raise BrainTumNetError(f"{path}: {problem}")
    missing = [k for k in ("site", "modality", "labels", "tumor_types") if k not in meta]
    if missing:
        raise BrainTumNetError(f"{path}: missing key(s) {', '.join(missing)}; add them as in docs/data.md")
    if not isinstance(meta["site"], str) or not SITE_NAME.fullmatch(meta["site"]):
        # The name becomes a folder of the cache: letters, digits, "_", "-", "." only.
        raise BrainTumNetError(f"{path}: \"site\" must be a name like \"yibin\" (letters, digits, _ - .), "
                               f"not {meta['site']!r}")
    if meta["modality"] != MODALITY:
        raise BrainTumNetError(
            f"{path}: modality {meta['modality']!r} is not supported; BrainTumNet reads contrast-enhanced T1 "
            f"only: set \"modality\": \"{MODALITY}\" if the images are CE-T1"
        )
    problem = nnunet.labels_problem(meta["labels"])
    if problem:
        raise BrainTumNetError(f"{path}: {problem}")
    types = meta["tumor_types"]
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise BrainTumNetError(f"{path}: \"tumor_types\" must be a non-empty list of names, e.g. [\"glioma\"]")
    return meta


def _read_cases_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise BrainTumNetError(f"{path}: missing; write one row per case with columns {','.join(CASES_COLUMNS)}")
    try:
        # All strings: "007" stays a case id, not the number 7.
        # utf-8-sig: a spreadsheet's byte-order mark must not end up in the first column's name.
        cases = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BrainTumNetError(f"{path}: not a readable CSV ({exc}); fix it as in docs/data.md") from None
    cases.columns = [str(c).strip() for c in cases.columns]
    missing = [c for c in CASES_COLUMNS if c not in cases.columns]
    if missing:
        raise BrainTumNetError(
            f"{path}: missing column(s) {', '.join(missing)}; the header must be {','.join(CASES_COLUMNS)} "
            f"(plus optional {','.join(SCANNER_COLUMNS)})"
        )
    if cases.empty:
        raise BrainTumNetError(f"{path}: has no cases; add one row per case")
    cases = cases[[c for c in (*CASES_COLUMNS, *SCANNER_COLUMNS) if c in cases.columns]]
    cases = cases.apply(lambda column: column.str.strip())
    cases.insert(0, "row", range(2, len(cases) + 2))  # line numbers, the header being line 1
    unfilled = [c for c in ("tumor_type", "split") if (cases[c] == "").any()]
    if unfilled:  # what `braintumnet init` leaves empty for the site to fill in: not bad data, work still to do
        rows = cases[(cases[unfilled] == "").any(axis=1)]["row"].tolist()
        what = {"tumor_type": f"tumor_type ({', '.join(TUMOR_TYPES[:-1])} or {TUMOR_TYPES[-1]})",
                "split": f"split ({' or '.join(SPLITS)})"}
        lines = ", ".join(str(r) for r in rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        raise BrainTumNetError(f"{path}: fill in {' and '.join(what[c] for c in unfilled)} on {len(rows)} of "
                               f"{len(cases)} rows (lines {lines}), or delete the row of a case to leave out")
    bad = cases[~cases["split"].isin(SPLITS)]
    if len(bad):
        lines = ", ".join(f"line {r} ({s!r})" for r, s in zip(bad["row"][:5], bad["split"][:5]))
        raise BrainTumNetError(f"{path}: split must be {' or '.join(SPLITS)}; fix {lines}")
    return cases.reset_index(drop=True)
