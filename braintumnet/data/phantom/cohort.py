"""``generate_cohort``: the whole phantom cohort on disk, one site folder per hospital plus the external site.

OUT/
    phantom.json        what was generated (seed, scale, test_scale, format) and whether it finished; marks OUT as ours
    plan.csv            the cohort plan, one row per case (type, split, atypical tag, location, scanner)
    preview.png         with ``preview=True``: a contact sheet of each type at each site
    yibin/ plagh/ jinling/ external/    site folders in the site data contract (docs/data.md)
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from braintumnet.data.contract import EXTERNAL_SITE, SITES, TUMOR_TYPES, TUMOUR_LABEL
from braintumnet.data.phantom.plan import check_scale, check_seed, cohort_plan, held_out_scale
from braintumnet.data.phantom.scanner import PROFILES, SITE_PROFILES
from braintumnet.data.phantom.writer import FORMATS, write_case, write_site_files
from braintumnet.errors import BrainTumNetError
from braintumnet.io import atomic_write_json

log = logging.getLogger(__name__)

MARKER = "phantom.json"
GENERATOR = "braintumnet.data.phantom"
PREVIEW = "preview.png"
PLAN_CSV = "plan.csv"
OWN_ENTRIES = (*SITES, EXTERNAL_SITE, MARKER, PREVIEW, PLAN_CSV)  # all a rerun may delete; nothing else


@dataclass(frozen=True, eq=False)
class CohortSummary:
    """What ``generate_cohort`` wrote.

    Args:
        out: the output folder.
        plan: the cohort plan (``cohort_plan``), one row per case written.
        fmt, scale, seed, workers, test_scale: as given.
        seconds: wall-clock time of the whole run.
        case_cpu_seconds: CPU time spent drawing and writing the cases, summed over workers.
        disk_bytes: size of everything written.
        preview: path of the contact sheet, or None.
    """

    out: Path
    plan: pd.DataFrame
    fmt: str
    scale: float
    seed: int
    workers: int
    seconds: float
    case_cpu_seconds: float
    disk_bytes: int
    preview: Path | None = None
    test_scale: float | None = None

    def counts(self) -> pd.DataFrame:
        """Cases per site: one column per tumour type, then train and test."""
        types = self.plan.pivot_table(index="site", columns="tumor_type", values="case_id", aggfunc="count",
                                      fill_value=0)
        splits = self.plan.pivot_table(index="site", columns="split", values="case_id", aggfunc="count",
                                       fill_value=0)
        table = pd.concat([types.reindex(columns=list(TUMOR_TYPES), fill_value=0),
                           splits.reindex(columns=["train", "test"], fill_value=0)], axis=1)
        return table.reindex([s for s in (*SITES, EXTERNAL_SITE) if s in table.index])

    def summary(self) -> str:
        n = len(self.plan)
        lines = [
            f"Phantom cohort written to {self.out} (SYNTHETIC: drawn from a brain template, NOT patient data)",
            f"  {n} cases, format {self.fmt}, scale {self.scale:g}, seed {self.seed}: {self.seconds:.1f} s on "
            f"{self.workers} worker(s) ({self.case_cpu_seconds / max(n, 1):.2f} CPU s per case), "
            f"{self.disk_bytes / 1e9:.3f} GB on disk",
        ]
        if self.test_scale:  # generate_cohort keeps it only where it is above the scale
            lines.append(f"  test and external sets held out at scale {self.test_scale:g} (test-only cases added "
                         "after each site's own; the training cases are those of scale "
                         f"{self.scale:g})")
        table = self.counts()
        table["scanner"] = [_scanner_text(SITE_PROFILES[s]) for s in table.index]
        lines += ["  " + line for line in table.to_string().splitlines()]
        total = table[["train", "test"]].sum()
        lines.append(f"  total: {int(total['train'])} train, {int(total['test'])} test")
        if self.preview:
            lines.append(f"  preview: {self.preview}")
        return "\n".join(lines)


def _scanner_text(profile: str) -> str:
    p = PROFILES[profile]
    size = "x".join(f"{s:g}" for s in p.spacing_mm)
    return f"{p.manufacturer} {p.scanner_model} {p.field_strength_t:g} T, {size} mm"


def generate_cohort(out: Path, *, scale: float = 1.0, seed: int = 0, fmt: str = "nifti", preview: bool = False,
                    workers: int | None = None, progress: bool = True,
                    test_scale: float | None = None) -> CohortSummary:
    """Write the phantom cohort (§2.1.1's 485 internal cases over three hospitals, plus 51 external) into ``out``.

    Args:
        out: output folder; created if needed. It must be empty, new, or a previous phantom output (which is
            replaced; nothing else in it is touched).
        scale: shrinks every count in proportion (see ``cohort_plan``); 1.0 is the paper's cohort.
        seed: the same seed gives byte-identical files.
        fmt: ``"nifti"`` (``imagesTr/{case}_0000.nii.gz``) or ``"dicom"`` (a series folder ``dicom/{case}/``).
            Masks are NIfTI either way.
        preview: also write ``preview.png``, a contact sheet of each tumour type at each site.
        workers: processes drawing cases in parallel (default: the CPU count, at most 8).
        progress: show a progress bar.
        test_scale: hold out the test and external sets of this larger scale (see ``cohort_plan``): more cases to
            score a small cohort's models on, the same cases to train them on.

    Raises:
        ValueError: a bad ``scale``, ``test_scale``, ``seed``, ``fmt`` or ``workers``.
        BrainTumNetError: ``out`` is a file, or a non-empty folder that is not a phantom output.

    Examples::

        summary = generate_cohort(Path("data/phantom"), scale=0.05, preview=True)
        print(summary.summary())
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: use one of {', '.join(FORMATS)}")
    check_scale(scale)
    if test_scale is not None:
        check_scale(test_scale, "test_scale")  # before _claim: a typo must not cost the previous cohort
    test_scale = held_out_scale(scale, test_scale)  # not above the scale: nothing added, none recorded
    check_seed(seed)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r}: use a positive integer, or None for one per CPU core")
    start = time.perf_counter()
    out = Path(out)
    _claim(out)
    plan = cohort_plan(scale, seed, test_scale)
    workers = min(workers or min(os.cpu_count() or 1, 8), len(plan))
    _write_marker(out, dict(scale=scale, test_scale=test_scale, seed=seed, format=fmt, cases=len(plan),
                            complete=False))
    plan.to_csv(out / PLAN_CSV, index=False, lineterminator="\n")
    for site, rows in plan.groupby("site", sort=False):
        write_site_files(out / site, site, rows, fmt)

    # The first case of each site x type is shown in the preview.
    shown = set(plan.groupby(["site", "tumor_type"], sort=False)["case_id"].first()) if preview else set()
    tasks = [(row, seed, fmt, str(out / row["site"]), row["case_id"] in shown) for row in plan.to_dict("records")]
    panels, cpu = {}, 0.0
    for case_id, case_cpu, panel in _run(tasks, workers, progress):
        cpu += case_cpu
        if panel is not None:
            panels[case_id] = panel
    preview_path = None
    if preview:
        from braintumnet.data.phantom.preview import contact_sheet

        preview_path = out / PREVIEW
        contact_sheet([panels[c] for c in plan["case_id"] if c in panels], preview_path)
    seconds = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    _write_marker(out, dict(scale=scale, test_scale=test_scale, seed=seed, format=fmt, cases=len(plan),
                            complete=True))
    summary = CohortSummary(out=out, plan=plan, fmt=fmt, scale=scale, seed=seed, workers=workers,
                            seconds=seconds, case_cpu_seconds=cpu, disk_bytes=disk, preview=preview_path,
                            test_scale=test_scale)
    log.info("phantom: %d cases in %.1f s, %.2f GB", len(plan), seconds, disk / 1e9)
    return summary


def _claim(out: Path) -> None:
    """Make ``out`` an empty folder to write into, refusing anything that is not ours."""
    if out.exists() and not out.is_dir():
        raise BrainTumNetError(f"{out}: is a file; give --out a folder (new or empty) for the phantom cohort")
    if out.is_dir() and any(out.iterdir()):
        if _read_marker(out) is None:
            raise BrainTumNetError(
                f"{out}: folder is not empty and holds no phantom cohort ({MARKER} missing), so nothing was written; "
                f"give --out a new or empty folder (e.g. {out / 'phantom'})"
            )
        for name in OWN_ENTRIES:  # only what a previous run wrote; anything else the user put there stays
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def complete_cohort(root: Path) -> dict | None:
    """What ``root``'s ``phantom.json`` says (``scale``, ``test_scale``, ``seed``, ``format``, ``cases``) if
    ``root`` holds a phantom cohort whose generation finished, else None: the one test of "the phantom cohort is
    there"."""
    info = _read_marker(Path(root))
    return info if info is not None and info.get("complete") is True else None


def _read_marker(root: Path) -> dict | None:
    """``root``'s ``phantom.json`` if this generator wrote it (finished or not), else None."""
    try:
        info = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("generator") == GENERATOR else None


def _write_marker(out: Path, info: dict) -> None:
    atomic_write_json(out / MARKER, {"generator": GENERATOR, "synthetic": True, **info})


def _run(tasks: list, workers: int, progress: bool):
    """Yield ``_make_case`` results as cases are written, in any order (files do not depend on it)."""
    from tqdm.auto import tqdm

    from braintumnet.data.phantom.lesions import candidates

    candidates()  # built (with the anatomy) before forking, so every worker shares it instead of rebuilding it
    bar = None
    try:
        if workers == 1:
            bar = tqdm(total=len(tasks), unit="case", desc="phantom", disable=not progress)
            with _one_blas_thread():  # as in the workers, so the same seed gives the same bits either way
                for task in tasks:
                    yield _make_case(task)
                    bar.update()
            return
        methods = mp.get_all_start_methods()
        context = mp.get_context("fork" if "fork" in methods else None)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
        try:
            pending = {pool.submit(_make_case, task) for task in tasks}
            bar = tqdm(total=len(tasks), unit="case", desc="phantom", disable=not progress)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()  # a worker's exception is raised here
                    bar.update()
        finally:  # on an error or Ctrl-C, drop the queued cases instead of drawing them all first
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()


def _one_blas_thread():
    """One BLAS thread: the pool already uses every core, and a fixed thread count keeps float sums reproducible."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn; without it, only speed and cross-run bit-identity may suffer
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _init_worker() -> None:
    _one_blas_thread()  # a limit set without ``with`` stays for the life of the worker


def _make_case(task) -> tuple[str, float, dict | None]:
    """Draw and write one case (runs in a worker); returns its id, CPU seconds and preview panel (or None)."""
    from braintumnet.data.phantom.render import render_case

    row, seed, fmt, site_dir, want_panel = task
    start = time.process_time()
    case = render_case(row, seed)
    write_case(Path(site_dir), row["case_id"], case, fmt, seed)
    return row["case_id"], time.process_time() - start, (_panel(row, case) if want_panel else None)


def _panel(row: dict, case) -> dict:
    """The axial slice with the most tumour, for the contact sheet."""
    z = int(np.argmax((case.mask == TUMOUR_LABEL).sum(axis=(0, 1))))
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    return dict(site=row["site"], case_id=row["case_id"], tumor_type=row["tumor_type"], atypical=row["atypical"],
                location=row["location"], n_lesions=row["n_lesions"], image=case.image[:, :, z],
                mask=case.mask[:, :, z], spacing=spacing[:2], scanner=_scanner_text(row["scanner"]))
