"""`flwr run . local` with the committed connection file trains over the three phantom hospitals (issue 4, point 7).

About a minute on 2 cores: Ray keeps one process per simulated site, so the stack is imported once, not per message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import BIN, REPO, TINY, _carrying, free_port

pytestmark = pytest.mark.timeout(1200)


def test_flwr_run_local_trains_the_three_phantom_hospitals(tmp_path, phantom_root, cache_root):
    home = tmp_path / "flwr-home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "flwr-home" / "config.toml", home / "config.toml")  # the committed file, as is
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           # Flower's managed local SuperLink listens on fixed ports unless told otherwise.
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    runs = tmp_path / "runs"
    config = {**TINY, "num-server-rounds": 1, "checkpoint-dir": str(runs), "cache-dir": str(cache_root),
              "phantom-dir": str(phantom_root)}
    spec = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    pyproject = (REPO / "pyproject.toml").read_bytes()

    def flwr(*args: str) -> dict:
        res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        return json.loads(res.stdout[res.stdout.index("{"):])

    try:
        started = flwr("run", ".", "local", "--run-config", spec)
        assert started["success"], started
        run_id = started["run-id"]
        deadline = time.monotonic() + 1000
        while time.monotonic() < deadline:
            run = flwr("ls", "local", "--run-id", run_id)["runs"][0]
            if run["status"].startswith("finished"):
                break
            time.sleep(5)
        assert run["status"] == "finished:completed", run
        metrics = json.loads((runs / f"run-{run_id}" / "metrics.json").read_text())["rounds"]
        assert set(metrics[0]["sites"]) == {"yibin", "plagh", "jinling"}  # partition i is site i
        assert (runs / f"run-{run_id}" / "final.pt").is_file()
        assert (REPO / "pyproject.toml").read_bytes() == pyproject  # `flwr run` did not rewrite it
    finally:
        # The local SuperLink and Ray outlive `flwr run`; every process of ours carries this FLWR_HOME.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _carrying(f"FLWR_HOME={home}"):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
