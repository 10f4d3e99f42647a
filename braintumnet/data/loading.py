"""Site folder -> prepared, memory-mapped site: prepare once (or reuse the cache), then load."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from braintumnet.config import DataConfig
from braintumnet.data.cache import PreparedSite, load_prepared
from braintumnet.data.prepare import prepare_site
from braintumnet.errors import EXIT_NOTHING_USABLE, BrainTumNetError

log = logging.getLogger("braintumnet.data")


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
