"""The federated arm joins a running Ray cluster (a local Ray head) instead of starting its own.

Slow (a Ray head start plus a federated run, 3-4 minutes on 2 cores) and kept out of CI: the federated arm itself is
covered by tests/test_study.py; this only adds the cluster connection. Run with ``pytest -m slow tests/test_study_ray.py``.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulation.flower_run import Cluster, free_port
from simulation.study import run_study

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_federated_arm_runs_on_a_running_ray_head(phantom_root, tiny_run_config, tmp_path):
    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}"  # Ray's socket paths must stay short
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "3",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(15)
        overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
        overrides.update({"num-server-rounds": 1, "train.local-epochs": 1})
        doc = run_study(tmp_path, "quick", phantom=phantom_root, device="cpu", overrides=overrides,
                        cluster=Cluster(ray_address=f"127.0.0.1:{port}"))
        assert "federated" in doc
        # The Simulation Engine was a driver of *this* head: its log lives in the head's session folder.
        assert list((temp / "session_latest" / "logs").glob("python-core-driver-*.log"))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
