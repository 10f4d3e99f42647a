"""``check_site`` and ``prepare_site``: a site folder in, a checked report (and a prepared cache) out.

The site folder is only ever read. Each problem is logged as one line (logger ``braintumnet.data``) naming the case,
the file and the fix; the case is quarantined and the rest of the site goes on, unless ``strict`` is set.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from braintumnet import __version__
from braintumnet.config import DataConfig
from braintumnet.data import cache
from braintumnet.data.checks import check_table, load_case
from braintumnet.data.contract import CASES_CSV, DATASET_JSON, SPLITS, TUMOR_TYPES
from braintumnet.data.site import Site, load_site
from braintumnet.errors import EXIT_DATA_PROBLEMS, EXIT_NOTHING_USABLE, BrainTumNetError, CaseProblem

if TYPE_CHECKING:
    from braintumnet.data.preprocess import Slices

logger = logging.getLogger("braintumnet.data")


class StrictFailure(BrainTumNetError):
    """``strict=True`` and at least one case has a problem: nothing was prepared."""

    exit_code = EXIT_DATA_PROBLEMS


@dataclass
class CheckReport:
    """What ``check_site`` found.

    Args:
        site: the site's name.
        site_dir: the site folder.
        usable: one row per usable case: case_id, tumor_type, split.
        problems: one per quarantined case (a case stops at its first problem; a duplicate id is one problem).
        n_cases: rows in ``cases.csv``.
        seconds: wall time.
    """

    site: str
    site_dir: Path
    usable: pd.DataFrame
    problems: list[CaseProblem]
    n_cases: int
    seconds: float = 0.0

    @property
    def n_quarantined(self) -> int:
        return self.n_cases - len(self.usable)

    @property
    def exit_code(self) -> int:
        """0 all usable, ``EXIT_DATA_PROBLEMS`` some quarantined, ``EXIT_NOTHING_USABLE`` none usable."""
        if self.usable.empty:
            return EXIT_NOTHING_USABLE
        return EXIT_DATA_PROBLEMS if self.problems else 0

    def summary(self) -> str:
        """A short table of usable cases by tumour type and split, then the quarantine and time."""
        lines = [f"site {self.site} ({self.site_dir}): {self.n_cases} cases in {CASES_CSV}, "
                 f"{len(self.usable)} usable, {self.n_quarantined} quarantined"]
        counts = _counts(self.usable)
        lines.append(f"  {'tumour type':<12}" + "".join(f"{s:>7}" for s in (*SPLITS, "total")))
        for name in (*TUMOR_TYPES, "all"):
            row = [sum(counts[t][s] for t in TUMOR_TYPES) if name == "all" else counts[name][s] for s in SPLITS]
            lines.append(f"  {name:<12}" + "".join(f"{n:>7}" for n in (*row, sum(row))))
        lines += self._tail()
        return "\n".join(lines)

    def _tail(self) -> list[str]:
        tail = ["  problems: see the log lines above" if self.problems else "  no problems"]
        return tail + [f"  time {self.seconds:.1f} s"]


@dataclass
class PrepareReport(CheckReport):
    """What ``prepare_site`` did: a ``CheckReport`` plus the cache.

    Args:
        cache_dir: the prepared folder (``cache.prepared_dir``).
        reused: True if an up-to-date cache was found and nothing was recomputed.
        n_slices: slices in the cache.
    """

    cache_dir: Path = field(default_factory=Path)
    reused: bool = False
    n_slices: int = 0

    def _tail(self) -> list[str]:
        state = "reused, sources unchanged" if self.reused else "written"
        tail = [f"  cache {self.cache_dir} ({state}): {self.n_slices} slices"]
        if self.problems:
            tail.append(f"  quarantine report: {self.cache_dir / cache.QUARANTINE}")
        return tail + [f"  time {self.seconds:.1f} s"]


def check_site(site_dir: Path, *, progress: bool = True) -> CheckReport:
    """Run every check on a site folder; write nothing.

    Raises:
        BrainTumNetError: a site-level problem (folder, ``dataset.json``, ``cases.csv``).
    """
    start = time.perf_counter()
    site = load_site(site_dir)
    problems, rows = _table_problems(site)
    usable = []
    for row, outcome in _run(site, rows, None, progress, workers=1):
        if isinstance(outcome, CaseProblem):
            problems.append(_log(outcome))
        else:
            usable.append(row)
    return CheckReport(site.name, site.root, _usable_frame(usable), problems, len(site.cases),
                       time.perf_counter() - start)


def prepare_site(
    site_dir: Path,
    cache_root: Path,
    data_cfg: DataConfig,
    *,
    strict: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> PrepareReport:
    """Check and preprocess a site into ``prepared_dir(cache_root, site, data_cfg)``, or reuse an up-to-date cache.

    Args:
        site_dir: the site folder (read only).
        cache_root: where prepared sites live; must not be inside ``site_dir``.
        data_cfg: image size, slices per case, field of view.
        strict: any problem is fatal: raise and write nothing.
        progress: show a progress bar.
        workers: processes for reading and preprocessing cases.

    Raises:
        BrainTumNetError: a site-level problem, or a cache inside the site folder.
        StrictFailure: ``strict`` and a problem (exit code ``EXIT_DATA_PROBLEMS``).
    """
    start = time.perf_counter()
    site = load_site(site_dir)
    root, cache_root = site.root.resolve(), Path(cache_root).resolve()
    if cache_root == root or root in cache_root.parents:
        raise BrainTumNetError(f"cache folder {cache_root} is inside the site folder {root}: the site folder is "
                               "never written to; choose a cache folder outside it")
    out = cache.prepared_dir(cache_root, site.name, data_cfg)
    cache.remove_stale_temporaries(out.parent, out.name)
    fingerprint = source_fingerprint(site)
    meta = cache.read_meta(out)
    if meta and _up_to_date(meta, fingerprint, data_cfg):
        damage = cache.array_problem(out, meta)
        if not damage:
            return _reuse(site, out, meta, strict, start)
        logger.warning("%s; preparing the cache again", damage)
    with cache.sigterm_as_exit():  # a stop request still shuts the workers down and removes the temporary folder
        return _prepare(site, out, fingerprint, data_cfg, strict, progress, workers, start)


def _prepare(site: Site, out: Path, fingerprint: str, data_cfg: DataConfig, strict: bool, progress: bool,
             workers: int, start: float) -> PrepareReport:
    problems, rows = _table_problems(site)
    usable, parts = [], []
    for row, outcome in _run(site, rows, data_cfg, progress, workers):
        if isinstance(outcome, CaseProblem):
            problems.append(_log(outcome))
        else:
            usable.append(row)
            parts.append(outcome)
            if outcome.unchosen_tumour_voxels and row["split"] == "test":
                logger.warning("case %s: %d reference tumour voxels lie outside the scored slices (chosen from the "
                               "image alone) and are not scored; check the image covers the head",
                               row["case_id"], outcome.unchosen_tumour_voxels)
    if strict and problems:
        raise StrictFailure(f"{site.root}: {len(problems)} case(s) with problems (logged above) and strict mode is "
                            "on, so nothing was prepared; fix them, or run without --strict to quarantine them")

    slices = _slice_table(site, usable, parts)
    size = data_cfg.img_size
    images = np.concatenate([p.images for p in parts]) if parts else np.zeros((0, size, size), np.float16)
    masks = np.concatenate([p.masks for p in parts]) if parts else np.zeros((0, size, size), np.uint8)
    quarantine = pd.DataFrame([(p.case_id, p.path, p.problem) for p in problems], columns=cache.QUARANTINE_COLUMNS)
    usable_frame = _usable_frame(usable)
    report = PrepareReport(site.name, site.root, usable_frame, problems, len(site.cases), cache_dir=out,
                           n_slices=len(slices))
    meta = {
        "site": site.name,
        "site_dir": str(site.root.resolve()),
        "synthetic": site.synthetic,
        "data": _data_settings(data_cfg),
        "counts": {"cases": _counts(usable_frame), "slices": len(slices), "cases_in_csv": len(site.cases),
                   "usable": len(usable_frame), "quarantined": report.n_quarantined},
        "fingerprint": fingerprint,
        "code_version": _code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    cache.write_prepared(out, images, masks, slices, meta, quarantine)
    report.seconds = time.perf_counter() - start
    logger.info("%s: prepared %d slices of %d cases into %s", site.name, len(slices), len(usable_frame), out)
    return report


def source_fingerprint(site: Site) -> str:
    """SHA-256 over the contract files' bytes and every referenced file's path, size and modification time."""
    digest = hashlib.sha256()
    for name in (DATASET_JSON, CASES_CSV):
        digest.update(name.encode() + b"\0" + (site.root / name).read_bytes())
    for relative in sorted((set(site.cases["image"]) | set(site.cases["mask"])) - {""}):
        path = site.root / relative
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            stat = f.stat() if f.is_file() else None
            state = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing"
            digest.update(f"{f.relative_to(site.root)}\0{state}\n".encode())
    return digest.hexdigest()


# --- helpers ---


def _table_problems(site: Site) -> tuple[list[CaseProblem], list[dict[str, Any]]]:
    """Problems found in cases.csv, and the rows still to be read (those without one)."""
    problems = [_log(p) for p in check_table(site)]
    bad = {p.case_id for p in problems}
    rows = [row for row in site.cases.to_dict("records") if row["case_id"] not in bad and row["case_id"]]
    return problems, rows


def _run(site: Site, rows: list[dict], cfg: DataConfig | None, progress: bool, workers: int) -> Iterator[tuple]:
    """Yield ``(row, Slices | None | CaseProblem)`` for each row, in order, with a progress bar."""
    jobs = [(site.root, row, cfg) for row in rows]
    bar = tqdm(total=len(jobs), desc=f"{site.name}: {'preparing' if cfg else 'checking'}", unit="case",
               disable=not progress)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) \
        if workers > 1 else None
    outcomes: Iterable = pool.map(_one_case, jobs) if pool else map(_one_case, jobs)
    try:
        with logging_redirect_tqdm() if progress else nullcontext():
            for row, outcome in zip(rows, outcomes):
                bar.update()
                yield row, CaseProblem(*outcome) if isinstance(outcome, tuple) else outcome
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)


def _one_case(job: tuple[Path, dict, DataConfig | None]) -> Slices | tuple[str, str, str] | None:
    """Check (and with a config, preprocess) one case. A problem comes back as a tuple: it pickles."""
    root, row, cfg = job
    try:
        case = load_case(root, pd.Series(row))
        if cfg is None:
            return None
        # Imported here: torch and MONAI take seconds to load, and `check` never needs them.
        from braintumnet.data.preprocess import preprocess_case, scored_slices

        # Training cases keep the representative slices through the tumour; a test case is scored on the whole scan,
        # so its slices are chosen without the labels (docs/data.md, "Which slices").
        z = scored_slices(case.image.array) if row["split"] == "test" else None
        return preprocess_case(case, cfg, z)
    except CaseProblem as p:
        return p.case_id, p.path, p.problem


def _one_thread() -> None:
    import torch  # each worker process uses one core; the pool provides the parallelism

    torch.set_num_threads(1)


def _log(problem: CaseProblem) -> CaseProblem:
    logger.warning("%s", problem)
    return problem


def _usable_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["case_id", "tumor_type", "split"])[["case_id", "tumor_type", "split"]]


def _slice_table(site: Site, rows: list[dict], parts: list[Slices]) -> pd.DataFrame:
    columns = [*cache.SLICE_COLUMNS, *site.scanner_columns]
    records = [
        {**row, "z_index": int(z), "spacing_y_mm": round(p.spacing_mm[0], 6), "spacing_x_mm": round(p.spacing_mm[1], 6),
         "spacing_z_mm": round(p.spacing_z_mm, 6)}
        for row, p in zip(rows, parts)
        for z in p.z_index
    ]
    return pd.DataFrame(records, columns=columns)


def _counts(usable: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {t: {s: int(((usable["tumor_type"] == t) & (usable["split"] == s)).sum()) for s in SPLITS}
            for t in TUMOR_TYPES}


def _data_settings(cfg: DataConfig) -> dict[str, Any]:
    return {"img_size": cfg.img_size, "slices_per_case": cfg.slices_per_case, "fov_mm": float(cfg.fov_mm)}


def _code_version() -> dict[str, Any]:
    from braintumnet.data.preprocess import PREPROCESS_VERSION

    return {"braintumnet": __version__, "preprocess": PREPROCESS_VERSION}


def _up_to_date(meta: dict, fingerprint: str, cfg: DataConfig) -> bool:
    return (meta.get("fingerprint") == fingerprint and meta.get("data") == _data_settings(cfg)
            and meta.get("code_version") == _code_version())


def _reuse(site: Site, out: Path, meta: dict, strict: bool, start: float) -> PrepareReport:
    """A report for an up-to-date cache, read from its own files (problems are logged again)."""
    quarantine = cache.read_quarantine(out)
    problems = [_log(CaseProblem(*row)) for row in quarantine[list(cache.QUARANTINE_COLUMNS)].itertuples(index=False)]
    if strict and problems:
        raise StrictFailure(f"{out}: the up-to-date cache quarantined {len(problems)} case(s) (logged above) and "
                            "strict mode is on; fix them, or run without --strict")
    slices = cache.read_slices(out, ["case_id", "tumor_type", "split"])
    usable = slices.drop_duplicates("case_id").reset_index(drop=True)
    logger.info("%s: sources unchanged since %s, reusing %s", site.name, meta.get("created"), out)
    return PrepareReport(site.name, site.root, usable, problems, len(site.cases), time.perf_counter() - start,
                         cache_dir=out, reused=True, n_slices=len(slices))
