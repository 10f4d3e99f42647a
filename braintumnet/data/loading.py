"""Site folder -> prepared, memory-mapped site: prepare once (or reuse the cache), then load.

:func:`open_site` is how a federated site finds its data in each round: the prepared cache if it is there, else the
cache prepared from the site folder under a lock (simulated sites share one cache root), with the phantom cohort
generated first when a simulated site's folder does not exist yet.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from braintumnet.config import DataConfig
from braintumnet.data.cache import (PreparedSite, array_problem, load_prepared, prepared_dir, read_meta,
                                    remove_stale_temporaries, sigterm_as_exit, temporary_dir)
from braintumnet.data.prepare import prepare_site
from braintumnet.errors import EXIT_NOTHING_USABLE, BrainTumNetError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; caches are still written atomically, at worst twice
    fcntl = None

log = logging.getLogger("braintumnet.data")


@dataclass(frozen=True)
class SiteRuntime:
    """What a site's process needs to find its site: name, data folder, cache root and device preference."""

    name: str
    data: Path | None
    cache: Path
    device: str = "auto"
    phantom: tuple[float, int] | None = None  # simulation: (scale, seed) to generate the data folder if missing


def default_cache_root() -> Path:
    """``$BRAINTUMNET_CACHE`` or ``./.cache/braintumnet``: prepared slices never go into a site folder."""
    return Path(os.environ.get("BRAINTUMNET_CACHE", ".cache/braintumnet")).absolute()


def prepare_and_load(site_dir: Path, cache_root: Path, data_cfg: DataConfig, progress: bool = True) -> PreparedSite:
    report = prepare_site(Path(site_dir), Path(cache_root), data_cfg, progress=progress)
    log.info(report.summary())
    if report.exit_code == EXIT_NOTHING_USABLE:
        raise BrainTumNetError(f"{site_dir}: no case could be prepared; fix the cases named in the log above")
    return load_prepared(report.cache_dir)


def load_sites(site_dirs: Sequence[Path], cache_root: Path, data_cfg: DataConfig,
               progress: bool = True) -> list[PreparedSite]:
    return [prepare_and_load(d, cache_root, data_cfg, progress) for d in site_dirs]


def open_site(site: SiteRuntime, data_cfg: DataConfig) -> PreparedSite:
    """The site's prepared cache for ``data_cfg``, preparing it first if it is missing (e.g. new data settings).

    Returns:
        A ``PreparedSite`` (memory-mapped).

    Raises:
        BrainTumNetError: no cache and no data folder to prepare it from, or the data folder is unusable.
    """
    cache_dir = prepared_dir(site.cache, site.name, data_cfg)
    remove_stale_temporaries(cache_dir.parent, cache_dir.name)  # what a killed writer left (a live one's stay)
    if _intact(cache_dir):
        return load_prepared(cache_dir)
    if site.data is None:
        if read_meta(cache_dir) is not None:
            load_prepared(cache_dir)  # raises, naming the damaged file and the fix
        raise BrainTumNetError(f"site {site.name}: no prepared cache at {cache_dir} and no data-path to prepare it "
                               "from; run python client/run.py --site NAME --check with the run's data settings")
    if site.phantom is not None and not site.data.exists():
        ensure_phantom(site.data.parent, *site.phantom)
    with file_lock(site.cache / f".{site.name}.lock"):
        if not _intact(cache_dir):  # missing, or damaged (prepare_site says which file and prepares it again)
            log.info("site %s: preparing the cache for %d px, %d slices per case in %s", site.name,
                     data_cfg.img_size, data_cfg.slices_per_case, cache_dir)
            return prepare_and_load(site.data, site.cache, data_cfg, progress=False)
    return load_prepared(cache_dir)


def _intact(cache_dir: Path) -> bool:
    """A complete cache whose array files are what its ``prepared.json`` describes (header and size only)."""
    meta = read_meta(cache_dir)
    return meta is not None and array_problem(cache_dir, meta) is None


def ensure_phantom(root: Path, scale: float, seed: int) -> Path:
    """Generate the phantom cohort into ``root`` unless it is there; concurrent callers wait for the first one."""
    from braintumnet.data.phantom import complete_cohort, generate_cohort

    root = Path(root)
    if complete_cohort(root) is not None:
        return root
    with file_lock(root.parent / f".{root.name}.lock"):
        if complete_cohort(root) is not None:
            return root
        remove_stale_temporaries(root.parent, root.name)  # a generation killed before it could clean up
        log.info("generating the synthetic phantom cohort (scale %g, seed %d) into %s", scale, seed, root)
        with sigterm_as_exit():
            tmp = temporary_dir(root, "tmp")
            try:
                generate_cohort(tmp / "cohort", scale=scale, seed=seed, fmt="nifti", progress=False)
                if root.exists():
                    shutil.rmtree(root)
                os.replace(tmp / "cohort", root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return root


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``): simulated sites sharing one cache take turns preparing it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
