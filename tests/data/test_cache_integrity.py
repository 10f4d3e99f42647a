"""A damaged or half-written cache is noticed and named: truncated arrays, a stop request mid-write, stale folders."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from braintumnet.data import cache
from braintumnet.data.loading import SiteRuntime, open_site
from braintumnet.data.prepare import prepare_site
from braintumnet.errors import BrainTumNetError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prepared(tiny_site, data_cfg, tmp_path):
    site_dir = tiny_site().add("a").add("b", "metastasis", seed=1).write()
    report = prepare_site(site_dir, tmp_path / "cache", data_cfg, progress=False)
    return site_dir, report.cache_dir


def test_a_truncated_array_is_named_and_prepared_again(prepared, data_cfg, tmp_path, caplog):
    """A cut copy of images.npy passed the fingerprint check, was reused, and then failed every round."""
    site_dir, cache_dir = prepared
    images = cache_dir / cache.IMAGES
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(BrainTumNetError, match=r"images\.npy: \d+ bytes where .* cut short.*prepare it again"):
        cache.load_prepared(cache_dir)
    older = {k: v for k, v in cache.read_meta(cache_dir).items() if k != "arrays"}  # a cache from before the manifest
    assert "cut short" in cache.array_problem(cache_dir, older)
    runtime = SiteRuntime("yibin", None, tmp_path / "cache")
    with pytest.raises(BrainTumNetError, match=r"images\.npy: .* cut short"):
        open_site(runtime, data_cfg)  # no data folder to prepare it from: say what is wrong

    with caplog.at_level(logging.WARNING, logger="braintumnet.data"):
        report = prepare_site(site_dir, tmp_path / "cache", data_cfg, progress=False)
    assert not report.reused and "images.npy" in caplog.text and "preparing the cache again" in caplog.text
    assert cache.load_prepared(cache_dir).images.shape == (8, 32, 32)


def test_an_array_of_the_wrong_shape_or_type_is_named(prepared, data_cfg, tmp_path):
    site_dir, cache_dir = prepared
    masks = cache_dir / cache.MASKS
    np.save(masks, np.zeros((8, 32, 32), np.int16))
    assert cache.array_problem(cache_dir, cache.read_meta(cache_dir)).startswith(
        f"{masks}: holds a (8, 32, 32) int16 array, but prepared.json says (8, 32, 32) uint8")
    np.save(masks, np.zeros((7, 32, 32), np.uint8))
    with pytest.raises(BrainTumNetError, match=r"masks\.npy: holds a \(7, 32, 32\) uint8 array"):
        cache.load_prepared(cache_dir)
    site = open_site(SiteRuntime("yibin", site_dir, tmp_path / "cache"), data_cfg)  # with data: prepared again
    assert site.masks.shape == (8, 32, 32)


def test_a_stop_request_mid_write_leaves_no_temporary_folder(tmp_path):
    """SIGTERM while the cache is written: the process exits 143 and its hidden .tmp-* folder is gone."""
    out = tmp_path / "cache" / "yibin" / "32px_4sl"
    script = textwrap.dedent(f"""
        import os, signal, time
        import numpy as np
        import pandas as pd
        from braintumnet.data import cache

        real_save = np.save

        def save_then_stop(path, array, *args, **kwargs):  # the stop request comes while the cache is written
            real_save(path, array, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        np.save = save_then_stop
        cache.write_prepared({str(out)!r}, np.zeros((2, 32, 32)), np.zeros((2, 32, 32)), pd.DataFrame({{"a": [1, 2]}}),
                             {{}}, pd.DataFrame())
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert list(out.parent.iterdir()) == []  # neither the cache nor a .32px_4sl.tmp-* folder


def test_stale_temporary_folders_are_removed_and_live_ones_kept(prepared, data_cfg):
    site_dir, cache_dir = prepared
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = cache.this_host()
    dead = cache_dir.parent / f".{cache_dir.name}.tmp-{host}.{gone.stdout.strip()}-x1"
    live = cache_dir.parent / f".{cache_dir.name}.tmp-{host}.{os.getpid()}-x2"
    old_style = cache_dir.parent / f".{cache_dir.name}.tmp-k2j3h4"  # before writers named their process
    recent_old_style = cache_dir.parent / f".{cache_dir.name}.old-q8w7e6"
    other = cache_dir.parent / ".notes.tmp-x3"  # not the cache's: never touched
    for folder in (dead, live, old_style, recent_old_style, other):
        (folder / "images.npy").parent.mkdir(parents=True, exist_ok=True)
        (folder / "images.npy").write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    for path in (old_style, old_style / "images.npy", other, other / "images.npy"):
        os.utime(path, (hours_ago, hours_ago))

    report = prepare_site(site_dir, cache_dir.parents[1], data_cfg, progress=False)
    assert report.reused
    left = sorted(p.name for p in cache_dir.parent.iterdir() if p.name.startswith("."))
    assert left == sorted([live.name, recent_old_style.name, other.name])
