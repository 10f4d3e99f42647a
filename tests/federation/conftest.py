"""Fixtures for the federation tests; the process harness is in harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import Federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory, phantom_root, cache_root):
    """The session's tiny phantom cohort (tests/conftest.py) served by a SuperLink and three sites on loopback."""
    if not Path("/proc").is_dir():
        pytest.skip("the loopback federation tests read /proc to stop every process they start (Linux)")
    fed = Federation(tmp_path_factory.mktemp("federation"), phantom_root, cache_root)
    try:
        yield fed
    finally:
        fed.stop_all()
