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
so a 150-case site at 256 px opens in well under a second. Before that, ``array_problem`` compares each array file's
header and size with ``prepared.json`` (a truncated copy would otherwise pass every check and fail each round).

Writers work in hidden ``.<name>.tmp-<host>.<pid>-*`` folders beside the target and remove them on SIGTERM too
(``sigterm_as_exit``); a folder left by a writer that was killed outright is removed the next time the cache is opened
(``remove_stale_temporaries``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from braintumnet.config import DataConfig
from braintumnet.data.contract import SPLITS, TASKS
from braintumnet.errors import BrainTumNetError

IMAGES, MASKS, SLICES, META, QUARANTINE = "images.npy", "masks.npy", "slices.csv", "prepared.json", "quarantine.csv"
SLICE_COLUMNS = ("case_id", "tumor_type", "split", "z_index", "spacing_y_mm", "spacing_x_mm", "spacing_z_mm")
QUARANTINE_COLUMNS = ("case_id", "path", "problem")
ARRAY_DTYPES = {IMAGES: np.dtype(np.float16), MASKS: np.dtype(np.uint8)}
ARRAYS_KEY = "arrays"  # prepared.json: {file name: {"shape": [...], "dtype": ...}} of the array files written
# A temporary folder whose writer is gone: its process no longer runs on this host, or (another host, or a name
# without a process id) nothing in it changed for this long; a live writer keeps writing files all the time.
STALE_AFTER_S = 3600.0
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)-)?[^/]*")

log = logging.getLogger("braintumnet.data")


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

    A reader never sees half a cache. SIGTERM still removes the ``.tmp-*`` folder; one left by a hard kill is
    removed when the cache is next opened (``remove_stale_temporaries``).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    images = np.ascontiguousarray(images, dtype=ARRAY_DTYPES[IMAGES])
    masks = np.ascontiguousarray(masks, dtype=ARRAY_DTYPES[MASKS])
    # The manifest that array_problem checks the files against, from the arrays themselves.
    meta = {**meta, ARRAYS_KEY: {name: {"shape": list(a.shape), "dtype": a.dtype.name}
                                 for name, a in ((IMAGES, images), (MASKS, masks))}}
    with sigterm_as_exit():
        tmp = temporary_dir(out_dir, "tmp")
        try:
            np.save(tmp / IMAGES, images)
            np.save(tmp / MASKS, masks)
            slices.to_csv(tmp / SLICES, index=False)
            quarantine.reindex(columns=list(QUARANTINE_COLUMNS)).to_csv(tmp / QUARANTINE, index=False)
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
            if out_dir.exists():  # two renames: the old folder moves aside only once the new one is complete
                old = temporary_dir(out_dir, "old")
                os.replace(out_dir, old / out_dir.name)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def temporary_dir(target: Path, kind: str = "tmp") -> Path:
    """A new hidden folder beside ``target`` named after it, this host and this process (see
    ``remove_stale_temporaries``)."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{this_host()}.{os.getpid()}-", dir=target.parent))


def this_host() -> str:
    """This machine's name as temporary folders carry it (letters, digits, _ and - only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` folders in ``folder`` (any name if None) whose writer
    is gone: a process of this host that no longer runs, or nothing changed in ``STALE_AFTER_S``. A folder another
    live process is writing is left alone. Returns the folders removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink() or (name is not None and match["name"] != name):
            continue
        if _writer_gone(path, match["host"], match["pid"]):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an interrupted write", path)
            removed.append(path)
    return removed


def _writer_gone(path: Path, host: str | None, pid: str | None) -> bool:
    if pid is not None and host == this_host() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:  # it runs, as another user
            pass
    try:
        newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.rglob("*"))])
    except OSError:  # it changed while we looked: someone is at work in it
        return False
    return time.time() - newest > STALE_AFTER_S


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM (``systemctl stop``, ``docker stop``, a scheduler) raises ``SystemExit(143)``
    instead of ending the process at once, so ``finally`` clauses remove their temporary folders. Only in the main
    thread, and only where no other handler was installed (that one stays in charge)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def read_meta(cache_dir: Path) -> dict[str, Any] | None:
    """``prepared.json`` of a complete cache folder, or None if there is none (or it is incomplete)."""
    cache_dir = Path(cache_dir)
    if not all((cache_dir / name).is_file() for name in (IMAGES, MASKS, SLICES, META, QUARANTINE)):
        return None
    try:
        return json.loads((cache_dir / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def array_problem(cache_dir: Path, meta: dict[str, Any]) -> str | None:
    """None if ``images.npy`` and ``masks.npy`` are whole and hold the arrays ``prepared.json`` lists under
    ``arrays``, else the first difference, naming the file. Reads each file's header and size only, never the data.

    A cache written before ``arrays`` was recorded is checked for whole files of the expected types, with as many
    masks as images.
    """
    cache_dir = Path(cache_dir)
    manifest = meta.get(ARRAYS_KEY) if isinstance(meta, dict) else None
    shapes = {}
    for name, dtype in ARRAY_DTYPES.items():
        path = cache_dir / name
        header = _npy_header(path)
        if isinstance(header, str):
            return header
        shape, stored, size_needed = header
        expected = manifest.get(name) if isinstance(manifest, dict) else None
        if isinstance(expected, dict):
            expected_shape, expected_dtype = tuple(expected.get("shape", ())), str(expected.get("dtype"))
        else:
            expected_shape, expected_dtype = shape, dtype.name
        if shape != expected_shape or stored.name != expected_dtype:
            return f"{path}: holds a {shape} {stored} array, but {META} says {expected_shape} {expected_dtype}"
        file_size = path.stat().st_size
        if file_size < size_needed:
            return (f"{path}: {file_size} bytes where its {shape} {stored} array needs {size_needed}; the file was "
                    "cut short (a copy or a write was interrupted)")
        if file_size > size_needed:
            return f"{path}: {file_size} bytes where its {shape} {stored} array needs {size_needed}"
        shapes[name] = shape
    if shapes[IMAGES][:1] != shapes[MASKS][:1]:
        return f"{cache_dir}: {IMAGES} holds {shapes[IMAGES][0]} slices and {MASKS} {shapes[MASKS][0]}"
    return None


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | str:
    """``(shape, dtype, file size the data needs)`` from a ``.npy`` file's header, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return f"{path}: .npy format version {version} is not one this package writes"
            shape, _, dtype = read_header(f)
            return tuple(shape), np.dtype(dtype), f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
    except (OSError, ValueError) as exc:
        return f"{path}: not a readable .npy file ({' '.join(str(exc).split())})"


def read_slices(cache_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """``slices.csv``; a case id stays a string, even "007" or "nan", while scanner columns parse as numbers."""
    as_text = {c: str for c in ("case_id", "tumor_type", "split")}
    return pd.read_csv(Path(cache_dir) / SLICES, usecols=columns, converters=as_text)


def read_quarantine(cache_dir: Path) -> pd.DataFrame:
    return pd.read_csv(Path(cache_dir) / QUARANTINE, dtype=str, keep_default_na=False)


def load_prepared(cache_dir: Path) -> PreparedSite:
    """Open a prepared site; the arrays are memory-mapped, not read.

    Raises:
        BrainTumNetError: no complete cache in ``cache_dir``, an array file that is not what ``prepared.json``
            describes (``array_problem``), or files that disagree in length.
    """
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)
    if meta is None:
        raise BrainTumNetError(f"{cache_dir}: no prepared site here; run `braintumnet prepare SITE_DIR --cache DIR`")
    problem = array_problem(cache_dir, meta)
    if problem:
        raise BrainTumNetError(f"{problem}; the prepared cache is damaged: prepare it again from the site folder "
                               "(`braintumnet prepare SITE_DIR --cache DIR`, or the site's launcher `python "
                               "client/run.py --site NAME --check`, which notices and redoes it)")
    slices = read_slices(cache_dir)
    # np.load cannot memory-map zero bytes: an empty site (all cases quarantined) is read normally.
    mmap = "r" if len(slices) else None
    images, masks = np.load(cache_dir / IMAGES, mmap_mode=mmap), np.load(cache_dir / MASKS, mmap_mode=mmap)
    if not len(images) == len(masks) == len(slices):
        raise BrainTumNetError(f"{cache_dir}: {IMAGES}, {MASKS} and {SLICES} disagree in length; delete the folder "
                               "and run `braintumnet prepare` again")
    return PreparedSite(site=meta["site"], images=images, masks=masks, slices=slices, meta=meta, path=cache_dir)
