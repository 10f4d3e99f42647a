"""``braintumnet init``: a site folder's ``dataset.json`` and ``cases.csv`` written from what a hospital exported.

Two sources are read (docs/data.md, "From a PACS export to a site folder"):

- an nnU-Net folder: ``imagesTr/{case}_0000.nii.gz`` images and ``labelsTr/{case}.nii.gz`` masks (the CE-T1 channel's
  files when its ``dataset.json`` names several channels);
- a DICOM export: every file under it is read (headers only) and grouped by ``SeriesInstanceUID``; each MR series,
  in a folder of its own, becomes a case, with its mask expected at ``labelsTr/{case}.nii.gz``.

What only the hospital knows, each case's tumour type and split, is left empty: ``braintumnet check`` then says
"fill in" until it is done. Nothing existing is ever overwritten, and only these two files are written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from braintumnet.data import nnunet
from braintumnet.data.contract import CASES_COLUMNS, CASES_CSV, DATASET_JSON, LABELS, MODALITY, SCANNER_COLUMNS
from braintumnet.data.contract import TUMOR_TYPES
from braintumnet.data.site import SITE_NAME, _read_dataset_json  # the contract's own reading of dataset.json
from braintumnet.errors import BrainTumNetError

logger = logging.getLogger("braintumnet.data")

MASKS_DIR = "labelsTr"  # where the DICOM path expects each case's mask, as nnU-Net names it
# Header tags read from every file of a DICOM export (pixels are never read here).
_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "PatientID",
         "StudyDate", "NumberOfFrames", "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength",
         "SliceThickness"]
# Columns written for the hospital's eyes only: ignored by the contract and never copied into the cache.
INFO_COLUMNS = ("patient_id", "study_date", "series_description")


@dataclass
class InitReport:
    """What ``init_site`` wrote.

    Args:
        site_dir: the site folder.
        source: what the cases were found in, for the summary ("nnU-Net imagesTr/labelsTr" or "DICOM export").
        cases: the rows written to ``cases.csv``.
        written: the files written; ``kept``: an existing ``dataset.json`` that was used as it is.
        notes: things the hospital should look at (series skipped, masks still to draw, several series per study).
    """

    site_dir: Path
    source: str
    cases: pd.DataFrame
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        masks = self.cases["mask"].tolist()
        found = sum((self.site_dir / m).is_file() for m in masks)
        lines = [f"{self.site_dir}: wrote {' and '.join(self.written)} ({len(self.cases)} cases from the "
                 f"{self.source})" + (f"; kept the existing {', '.join(self.kept)}" if self.kept else ""),
                 f"  masks: {found} found, {len(masks) - found} still to draw and save at the path in the mask column"]
        lines += [f"  note: {n}" for n in self.notes]
        types = f"{', '.join(TUMOR_TYPES[:-1])} or {TUMOR_TYPES[-1]}"
        lines += [f"  still to fill in, in {CASES_CSV}: tumor_type ({types}) and split (train or test) of every case",
                  f"  then: braintumnet check {self.site_dir}"]
        return "\n".join(lines)


def init_site(site_dir: Path, source: Path | None = None, *, site: str | None = None, series: str | None = None,
              progress: bool = True) -> InitReport:
    """Write ``site_dir/cases.csv`` (and ``dataset.json`` unless one exists) from an nnU-Net folder or DICOM export.

    Args:
        site_dir: the site folder; it must hold ``source``, as ``cases.csv`` paths are relative to it.
        source: the nnU-Net folder (it has ``imagesTr``) or the DICOM export; default ``site_dir`` itself.
        site: the site's name in a new ``dataset.json`` (default: the folder's name).
        series: DICOM only: keep the series whose SeriesDescription matches this regular expression (any case).
        progress: show a progress bar while reading DICOM headers.

    Raises:
        BrainTumNetError: a missing folder, a source outside the site folder, an existing ``cases.csv``, an invalid
            existing ``dataset.json``, no cases found, a DICOM folder mixing series.
    """
    root = Path(os.path.normpath(Path(site_dir).absolute()))
    source = root if source is None else Path(os.path.normpath(Path(source).absolute()))
    if not root.is_dir():
        raise BrainTumNetError(f"{root}: no such site folder; create it and put the export (or a link to it) inside")
    if not source.is_dir():
        raise BrainTumNetError(f"{source}: no such folder; give the nnU-Net folder or the DICOM export with --from")
    if source != root and root not in source.parents:
        raise BrainTumNetError(f"{source} is outside the site folder {root}: cases.csv paths are relative to the site "
                               f"folder; move the export into it, or link it there (ln -s {source} {root}/export)")
    cases_path, json_path = root / CASES_CSV, root / DATASET_JSON
    if cases_path.exists():
        raise BrainTumNetError(f"{cases_path}: exists, and init never overwrites a file; rename or delete it to write "
                               "a new one")
    meta = _read_dataset_json(json_path) if json_path.exists() else None
    if (source / "imagesTr").is_dir():
        source_meta = meta or _source_dataset_json(source)
        cases, notes = _nnunet_cases(root, source, source_meta)
        kind = "nnU-Net imagesTr/labelsTr folder"
    else:
        cases, notes = _dicom_cases(root, source, series, progress)
        source_meta, kind = None, "DICOM export"
    report = InitReport(root, kind, cases, notes=notes)
    if meta is None:
        name = site or root.name
        if not SITE_NAME.fullmatch(name):
            raise BrainTumNetError(f"{root}: {name!r} cannot name the site (letters, digits, _ - .): give a name "
                                   "with --site")
        _write_new(json_path, json.dumps(_contract_json(name, source_meta), indent=2) + "\n")
        report.written.append(DATASET_JSON)
    else:
        report.kept.append(DATASET_JSON)
    _write_new(cases_path, cases.to_csv(index=False, lineterminator="\n"))
    report.written.append(CASES_CSV)
    return report


def _write_new(path: Path, text: str) -> None:
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": fails rather than overwrite, even in a race
            f.write(text)
    except FileExistsError:
        raise BrainTumNetError(f"{path}: exists, and init never overwrites a file; rename or delete it") from None


def _contract_json(name: str, source_meta: dict | None) -> dict:
    """A new contract ``dataset.json``: label names from an nnU-Net source's, all tumour types (narrow as needed)."""
    labels = {str(k): v for k, v in LABELS.items()}
    if source_meta and all(isinstance(v, int) for v in source_meta["labels"].values()):  # nnU-Net: name → value
        labels = {str(v): k for k, v in sorted(source_meta["labels"].items(), key=lambda kv: kv[1])}
    elif source_meta:
        labels = {str(k): v for k, v in source_meta["labels"].items()}
    return {"site": name, "modality": MODALITY, "labels": labels, "tumor_types": list(TUMOR_TYPES),
            "description": "written by braintumnet init; keep in tumor_types only the types this site has"}


def _source_dataset_json(source: Path) -> dict | None:
    """An nnU-Net folder's own ``dataset.json`` (inside the site folder), checked as the contract would read it."""
    path = source / DATASET_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrainTumNetError(f"{path}: not valid JSON ({exc}); fix it, or move it out of the way") from None
    meta, problem = nnunet.with_contract_keys(path, meta) if isinstance(meta, dict) else (meta, "not a JSON object")
    problem = problem or nnunet.labels_problem(meta.get("labels"))
    if problem:
        raise BrainTumNetError(f"{path}: {problem}")
    return meta


def _nnunet_cases(root: Path, source: Path, meta: dict | None) -> tuple[pd.DataFrame, list[str]]:
    """One row per ``imagesTr`` image of the CE-T1 channel, its mask at ``labelsTr/{case}{ending}``."""
    channel = nnunet.ce_t1_channel((meta or {}).get("channel_names")) or "0"
    ending = (meta or {}).get("file_ending", ".nii.gz")
    suffix = f"_{int(channel):04d}{ending}"
    images = sorted(p for p in (source / "imagesTr").iterdir() if p.name.endswith(suffix) and not
                    p.name.startswith("."))
    if not images:
        raise BrainTumNetError(f"{source / 'imagesTr'}: no image named CASE{suffix}; name the CE-T1 images as "
                               f"nnU-Net does (e.g. case001{suffix}), or give a DICOM export")
    rows, notes = [], []
    for image in images:
        case_id = image.name[: -len(suffix)]
        mask = source / "labelsTr" / f"{case_id}{ending}"
        rows.append({"case_id": case_id, "image": _relative(image, root), "mask": _relative(mask, root)})
    labels = source / "labelsTr"
    orphans = sorted({p.name for p in labels.glob(f"*{ending}")} - {f"{r['case_id']}{ending}" for r in rows}) \
        if labels.is_dir() else []
    if orphans:
        notes.append(f"{len(orphans)} mask(s) in labelsTr have no image and were left out: {', '.join(orphans[:5])}")
    if channel != "0":
        notes.append(f"the CE-T1 images are channel {channel} (_{int(channel):04d}), as dataset.json names them")
    return _table(rows), notes


def _dicom_cases(root: Path, source: Path, pattern: str | None, progress: bool) -> tuple[pd.DataFrame, list[str]]:
    """One row per MR series (grouped by SeriesInstanceUID) that has a folder of its own."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        wanted = re.compile(pattern, re.IGNORECASE) if pattern else None
    except re.error as exc:
        raise BrainTumNetError(f"--series {pattern!r} is not a regular expression ({exc})") from None
    files = sorted(p for p in _walk(source) if p.name.upper() != "DICOMDIR")
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    folders: dict[Path, set[str]] = defaultdict(set)
    foreign: dict[Path, list[str]] = defaultdict(list)  # files that are not DICOM, by folder
    for path in tqdm(files, desc="reading DICOM headers", unit="file", disable=not progress):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            foreign[path.parent].append(path.name)  # not DICOM: a report, a NIfTI mask, a viewer's files
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"(none: {path.parent})")
        series[uid].append((path, ds))
        folders[path.parent].add(uid)
    if not series:
        raise BrainTumNetError(f"{source}: holds no DICOM file and no imagesTr folder; give the folder of a PACS "
                               "export (one folder per series) or of an nnU-Net dataset")
    notes, kept, problems = [], [], []
    skipped: dict[str, int] = defaultdict(int)
    for uid, members in series.items():
        first = members[0][1]
        modality = str(first.get("Modality", ""))
        if modality == "SEG":
            skipped["DICOM-SEG (export each mask as NIfTI instead: labelsTr/CASE.nii.gz)"] += 1
        elif modality != "MR":
            skipped[f"{modality or 'no Modality'} (not MR)"] += 1
        elif int(first.get("NumberOfFrames", 1) or 1) > 1:
            skipped["multi-frame MR (export single-frame files)"] += 1
        elif wanted and not wanted.search(str(first.get("SeriesDescription", ""))):
            skipped[f"SeriesDescription not matching --series {pattern!r}"] += 1
        else:
            where = {p.parent for p, _ in members}
            folder = min(where)
            if len(where) > 1:
                problems.append(f"series {uid} is spread over {len(where)} folders ({_relative(folder, root)} "
                                "...): put its files into one folder")
            elif folder == root:
                problems.append("DICOM files lie in the site folder itself: move each series into a sub-folder")
            elif len(folders[folder]) > 1:
                problems.append(f"{_relative(folder, root)} mixes {len(folders[folder])} series: give each series a "
                                "folder of its own")
            elif foreign[folder]:
                problems.append(f"{_relative(folder, root)} also holds {len(foreign[folder])} file(s) that are not "
                                f"DICOM ({foreign[folder][0]} ...): move them out of the series' folder")
            else:
                kept.append((folder, first))
    if problems:
        shown = "; ".join(sorted(set(problems))[:5]) + (" ..." if len(set(problems)) > 5 else "")
        raise BrainTumNetError(f"{source}: {shown}. The contract reads one series per folder: export from the PACS "
                               "with one folder per series, or convert with dcm2niix (docs/data.md)")
    if not kept:
        raise BrainTumNetError(f"{source}: no usable MR series ({_skipped(skipped)})")
    kept.sort(key=lambda item: str(item[0]))
    ids = _case_ids([folder for folder, _ in kept], source)
    rows = [{"case_id": case_id, "image": _relative(folder, root), "mask": f"{MASKS_DIR}/{case_id}.nii.gz",
             **_header_columns(ds)} for case_id, (folder, ds) in zip(ids, kept)]
    if skipped:
        notes.append(f"series left out: {_skipped(skipped)}")
    studies = defaultdict(list)
    for row, (_, ds) in zip(rows, kept):
        studies[str(ds.get("StudyInstanceUID", row["case_id"]))].append(row["case_id"])
    several = [cases for cases in studies.values() if len(cases) > 1]
    if several:
        notes.append(f"{len(several)} stud(ies) gave several series (e.g. {', '.join(several[0][:3])}): keep only "
                     "the CE-T1 row of each case (see series_description), or rerun with --series")
    return _table(rows), notes


def _walk(folder: Path):
    """Every file under ``folder``, skipping hidden files and folders."""
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(parent) / n for n in sorted(names) if not n.startswith("."))


def _case_ids(folders: list[Path], source: Path) -> list[str]:
    """The series folder's name, or its path below the export joined by "_" where names repeat (SER0001 ...)."""
    leaf = [f.name for f in folders]
    names = leaf if len(set(leaf)) == len(leaf) else \
        ["_".join(f.relative_to(source).parts) if f != source else f.name for f in folders]
    ids, seen = [], set()
    for name in names:
        case_id = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-") or "case"
        unique, n = case_id, 2
        while unique in seen:
            unique, n = f"{case_id}_{n}", n + 1
        seen.add(unique)
        ids.append(unique)
    return ids


def _header_columns(ds) -> dict[str, str]:
    """The optional scanner columns (copied into the cache's slice table) and the hospital's info columns."""
    def text(keyword: str) -> str:
        return " ".join(str(ds.get(keyword, "") or "").split())

    return {"field_strength_t": text("MagneticFieldStrength"), "manufacturer": text("Manufacturer"),
            "scanner_model": text("ManufacturerModelName"), "slice_thickness_mm": text("SliceThickness"),
            "patient_id": text("PatientID"), "study_date": text("StudyDate"),
            "series_description": text("SeriesDescription")}


def _table(rows: list[dict]) -> pd.DataFrame:
    """``cases.csv``: the contract's columns with tumor_type and split empty, then whatever else the rows carry."""
    table = pd.DataFrame(rows)
    table["tumor_type"], table["split"] = "", ""
    extra = [c for c in (*SCANNER_COLUMNS, *INFO_COLUMNS) if c in table.columns]
    return table[[*CASES_COLUMNS, *extra]]


def _skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()
