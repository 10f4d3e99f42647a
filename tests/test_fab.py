"""The app bundle (FAB) that ``flwr run`` uploads and every site unpacks for every message holds the apps' code only.

Built with Flower's own builder, as ``flwr run`` and ``flwr build`` build it from ``[tool.flwr.app] fab-include``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_files

REPO = Path(__file__).resolve().parents[1]
CODE = ("braintumnet/", "client/", "server/")
FLOWER_FILES = {"pyproject.toml", "LICENSE", ".info/CONTENT"}  # the config, the license fab-format 1 requires, manifest
# The apps' code is ~0.7 MB today; with the study, benchmarks, docs and their results it was over 2 MB.
MAX_BYTES = 1_500_000
SKIPPED = {"venv", "runs", "phantom", "mlruns", "node_modules", "__pycache__"}


def _app_files() -> dict[str, Path]:
    """The checkout's files as ``flwr run`` collects them (``flwr.cli.utils.collect_files``), less the virtual
    environments and caches: walking CI's 50,000-file venv takes Flower 15 s, and fab-include's patterns, anchored at
    the app's top folders, leave all of them out anyway."""
    files = {}
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED and not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():
                files[path.relative_to(REPO).as_posix()] = path
    return files


def test_fab_holds_the_apps_code_only(tmp_path):
    fab, _ = build_fab_from_files(_app_files())
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        names = z.namelist()
        z.extractall(tmp_path)
    stray = [n for n in names if n not in FLOWER_FILES and not (n.startswith(CODE) and n.endswith(".py"))]
    assert not stray, f"the FAB carries more than code: {stray[:20]}"
    assert len(fab) < MAX_BYTES, f"the FAB is {len(fab):,} bytes"
    assert {"client/app.py", "server/app.py", "braintumnet/site_round.py"} <= set(names)

    # Every repository module the ServerApp and the ClientApp import is in the bundle: import them from the unpacked
    # FAB (first on sys.path, as Flower puts it) and list those that still came from the checkout.
    probe = ("import json, sys; import client.app, server.app; "
             f"print(json.dumps(sorted(m.__name__ for m in list(sys.modules.values()) "
             f"if str(getattr(m, '__file__', None) or '').startswith({str(REPO) + '/'!r}) "
             # installed packages are not the app's code, even where the environment lives inside the clone (CI)
             f"and not str(getattr(m, '__file__', None) or '').startswith(sys.prefix + '/'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    missing = json.loads(done.stdout.strip().splitlines()[-1])
    assert not missing, f"the apps import modules the FAB leaves out: {missing}"
