"""The data pipeline: ``prepare`` throughput in cases per minute for DICOM and NIfTI sites, and the
prepared cache's load time at the start of a ClientApp.

* Prepare: the same phantom cohort (same seed and scale, so the same cases) written once as NIfTI and once as DICOM
  series; each repetition prepares every internal site of each format into a fresh cache (``prepare_site``, one
  worker, as ``braintumnet prepare`` does by default), the formats taking turns. Cases per minute = cases / wall time.
* Cache load: a cold ``python`` process per repetition, as a ClientApp starts for every message, timing the import
  of ``braintumnet.data.cache`` and ``load_prepared`` (memory maps; the OS page cache is warm after the first run),
  then the read of one training batch from the maps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Context, interleaved, median, ratio, table, write_result
from braintumnet.config import resolve
from braintumnet.data.contract import SITES

LOAD_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from braintumnet.data.cache import load_prepared
t1 = time.perf_counter()
site = load_prepared(sys.argv[1])
t2 = time.perf_counter()
import numpy as np
batch = np.asarray(site.images[: int(sys.argv[2])], dtype=np.float32).sum()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_batch_s": t3 - t2, "n_slices": len(site)}))
"""


def _settings(ctx: Context) -> dict:
    if ctx.tiny:
        return {"scale": 0.03, "reps": 1, "load_reps": 1, "formats": ("nifti",),
                "profiles": {"tiny": {"profile": "quick",
                                                                               "data.img-size": 32,
                                                                               "data.slices-per-case": 3}}}
    return {"scale": 0.03 if ctx.quick else 0.1, "reps": 2 if ctx.quick else 3, "load_reps": 3 if ctx.quick else 7,
            "formats": ("nifti", "dicom"),
            "profiles": {"quick": {"profile": "quick"}, "paper": {"profile": "paper"}}}


def _prepare_all(root: Path, cfg, cache_root: Path) -> int:
    from braintumnet.data.prepare import prepare_site

    cases = 0
    with tempfile.TemporaryDirectory(dir=cache_root) as cache:
        for site in SITES:
            report = prepare_site(root / site, Path(cache), cfg, progress=False, workers=1)
            assert not report.reused, "a fresh cache was reused"
            cases += len(report.usable)
    return cases


def _cases(root: Path) -> int:
    import pandas as pd

    return int(sum(len(pd.read_csv(root / s / "cases.csv")) for s in SITES))


def run(ctx: Context) -> dict:
    s = _settings(ctx)
    cohorts = {fmt: ctx.phantom(s["scale"], fmt) for fmt in s["formats"]}
    n_cases = {fmt: _cases(c.out) for fmt, c in cohorts.items()}
    scratch = ctx.workdir / "prepare-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    prepare, load = {}, {}
    for name, run_config in s["profiles"].items():
        cfg = resolve(run_config).data
        ctx.say(f"data: prepare {sum(n_cases.values())} cases at {cfg.img_size} px, {cfg.slices_per_case} slices")
        times = interleaved({fmt: (lambda c=c: _prepare_all(c.out, cfg, scratch)) for fmt, c in cohorts.items()},
                            reps=s["reps"], warmup=0)
        prepare[name] = {fmt: {"cases": n_cases[fmt], "seconds": t, "cases_per_min": 60 * n_cases[fmt] / median(t)}
                         for fmt, t in times.items()}
        prepare[name]["dicom_vs_nifti"] = ratio(prepare[name].get("dicom", {}).get("cases_per_min"),
                                                prepare[name]["nifti"]["cases_per_min"])
        # The cache a ClientApp opens: the largest internal site at these settings.
        from braintumnet.data.loading import prepare_and_load

        sites = [prepare_and_load(cohorts["nifti"].out / site, ctx.cache, cfg, progress=False)
                 for site in SITES]
        biggest = max(sites, key=len)
        runs = []
        for _ in range(s["load_reps"]):
            out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(biggest.path), "16"], capture_output=True,
                                 text=True, timeout=300, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        load[name] = {"site": biggest.site, "n_slices": len(biggest), "img_size": cfg.img_size,
                      "cache_mib": sum(p.stat().st_size for p in Path(biggest.path).iterdir()) / 2**20,
                      **{k: median([r[k] for r in runs]) for k in ("import_s", "load_s", "first_batch_s")},
                      "runs": runs}
    doc = {"scale": s["scale"], "cases": n_cases, "generation_s": {f: c.seconds for f, c in cohorts.items()},
           "prepare": prepare, "cache_load": load}
    return write_result(ctx, "data", "Data pipeline: prepare throughput and cache load time", doc, _sections(doc),
                        [f"Phantom cohort (SYNTHETIC) at scale {s['scale']}: {n_cases['nifti']} internal cases per "
                         f"format; prepare uses one worker process; {s['reps']} interleaved repetitions, medians."])


def _sections(doc: dict) -> list[tuple[str, list[str]]]:
    rows = []
    for name, p in doc["prepare"].items():
        dicom = p.get("dicom", {})
        rows.append([name, p["nifti"]["cases_per_min"], dicom.get("cases_per_min"), p["dicom_vs_nifti"],
                     median(p["nifti"]["seconds"]), median(dicom.get("seconds", []))])
    sections = [("Prepare throughput (cases per minute, one worker)",
                 table(["data settings", "NIfTI cases/min", "DICOM cases/min", "DICOM / NIfTI", "NIfTI s",
                        "DICOM s"], rows))]
    rows = [[name, c["site"], c["n_slices"], c["img_size"], c["cache_mib"], c["import_s"], c["load_s"],
             c["first_batch_s"], c["import_s"] + c["load_s"] + c["first_batch_s"]]
            for name, c in doc["cache_load"].items()]
    sections.append(("Prepared-cache load at the start of a ClientApp (cold process, medians)",
                     table(["data settings", "site", "slices", "px", "cache MiB", "import s", "load_prepared s",
                            "first batch s", "total s"], rows)))
    rows = [[f, g, doc["cases"][f]] for f, g in doc["generation_s"].items()]
    sections.append(("Phantom generation (for reference)", table(["format", "seconds", "cases (all sites)"], rows)))
    return sections
