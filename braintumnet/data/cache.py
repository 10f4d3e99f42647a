"""The prepared-site cache: one folder per site and data setting, written atomically, loaded by memory map.

Layout (docs/data.md, "The prepared cache")::

    CACHE_ROOT/<site>/<img_size>px_<slices_per_case>sl/
        images.npy      N×H×W float16, intensities in [0, 1]
        masks.npy       N×H×W uint8, labels 0/1/2
        slices.csv      one row per slice (row i describes images[i]): case_id, tumor_type, split, z_index,
                        spacing_y_mm, spacing_x_mm, spacing_z_mm, then the site's scanner columns; a training case
                        holds its representative slices, a test case every slice inside the head, in axial order
        prepared.json   site, data config, counts, source fingerprint, code version, created
        quarantine.csv  case_id, path, problem: the cases left out

A process that restarts every federated round calls ``load_prepared``; it maps the arrays instead of reading them,
so a 150-case site at 256 px opens in well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from braintumnet.config import DataConfig
from braintumnet.data.contract import SPLITS, TASKS
from braintumnet.errors import BrainTumNetError

IMAGES, MASKS, SLICES, META, QUARANTINE = "images.npy", "masks.npy", "slices.csv", "prepared.json", "quarantine.csv"
SLICE_COLUMNS = ("case_id", "tumor_type", "split", "z_index", "spacing_y_mm", "spacing_x_mm", "spacing_z_mm")
QUARANTINE_COLUMNS = ("case_id", "path", "problem")


def prepared_dir(cache_root: Path, site: str, data_cfg: DataConfig) -> Path:
    """``cache_root/<site>/<img_size>px_<slices_per_case>sl``: parseable back into the settings it holds."""
    return Path(cache_root) / site / f"{data_cfg.img_size}px_{data_cfg.slices_per_case}sl"


@dataclass(frozen=True, eq=False)
class PreparedSite:
    """A prepared site, opened read-only.

    Args:
        site: the site's name.
        images: ``N×H×W`` float16 memory map.
        masks: ``N×H×W`` uint8 memory map.
        slices: ``slices.csv``; row ``i`` describes ``images[i]``.
        meta: ``prepared.json``.
        path: the cache folder.
    """

    site: str
    images: np.ndarray
    masks: np.ndarray
    slices: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.slices)

    def cases(self, split: str | None = None) -> pd.DataFrame:
        """One row per case (``split`` None = all): case_id, tumor_type, split, n_slices and scanner columns."""
        table = self.slices if split is None else self.slices[self.slices["split"] == split]
        counts = table.groupby("case_id", sort=False).size()
        drop = [c for c in ("z_index", "spacing_y_mm", "spacing_x_mm", "spacing_z_mm") if c in table.columns]
        cases = table.drop_duplicates("case_id").drop(columns=drop).reset_index(drop=True)
        return cases.assign(n_slices=counts.loc[cases["case_id"]].to_numpy())

    def indices(self, split: str | None = None, task: str | None = None) -> np.ndarray:
        """Row indices of the slices in ``split`` whose tumour type is a class of ``task`` (None = no filter)."""
        keep = np.ones(len(self.slices), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split={split!r}: use one of {SPLITS}")
            keep &= (self.slices["split"] == split).to_numpy()
        if task is not None:
            keep &= self.slices["tumor_type"].isin(TASKS[task]).to_numpy()
        return np.flatnonzero(keep)


def write_prepared(
    out_dir: Path,
    images: np.ndarray,
    masks: np.ndarray,
    slices: pd.DataFrame,
    meta: dict[str, Any],
    quarantine: pd.DataFrame,
) -> None:
    """Write a cache folder atomically: everything goes to a hidden sibling, which then replaces ``out_dir``.

    A reader never sees half a cache; a crash leaves at most a ``.tmp-*`` folder next to it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        np.save(tmp / IMAGES, np.ascontiguousarray(images, dtype=np.float16))
        np.save(tmp / MASKS, np.ascontiguousarray(masks, dtype=np.uint8))
        slices.to_csv(tmp / SLICES, index=False)
        quarantine.reindex(columns=list(QUARANTINE_COLUMNS)).to_csv(tmp / QUARANTINE, index=False)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        if out_dir.exists():  # two renames: the old folder moves aside only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(cache_dir: Path) -> dict[str, Any] | None:
    """``prepared.json`` of a complete cache folder, or None if there is none (or it is incomplete)."""
    cache_dir = Path(cache_dir)
    if not all((cache_dir / name).is_file() for name in (IMAGES, MASKS, SLICES, META, QUARANTINE)):
        return None
    try:
        return json.loads((cache_dir / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_slices(cache_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """``slices.csv``; a case id stays a string, even "007" or "nan", while scanner columns parse as numbers."""
    as_text = {c: str for c in ("case_id", "tumor_type", "split")}
    return pd.read_csv(Path(cache_dir) / SLICES, usecols=columns, converters=as_text)


def read_quarantine(cache_dir: Path) -> pd.DataFrame:
    return pd.read_csv(Path(cache_dir) / QUARANTINE, dtype=str, keep_default_na=False)


def load_prepared(cache_dir: Path) -> PreparedSite:
    """Open a prepared site; the arrays are memory-mapped, not read.

    Raises:
        BrainTumNetError: no complete cache in ``cache_dir``, or its files disagree.
    """
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)
    if meta is None:
        raise BrainTumNetError(f"{cache_dir}: no prepared site here; run `braintumnet prepare SITE_DIR --cache DIR`")
    slices = read_slices(cache_dir)
    # np.load cannot memory-map zero bytes: an empty site (all cases quarantined) is read normally.
    mmap = "r" if len(slices) else None
    images, masks = np.load(cache_dir / IMAGES, mmap_mode=mmap), np.load(cache_dir / MASKS, mmap_mode=mmap)
    if not len(images) == len(masks) == len(slices):
        raise BrainTumNetError(f"{cache_dir}: {IMAGES}, {MASKS} and {SLICES} disagree in length; delete the folder "
                               "and run `braintumnet prepare` again")
    return PreparedSite(site=meta["site"], images=images, masks=masks, slices=slices, meta=meta, path=cache_dir)
