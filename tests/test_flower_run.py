"""The federated arm's processes do not outlive a study that is stopped with SIGTERM (``kill``, ``timeout``, a batch
scheduler), not only one stopped with Ctrl-C."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A study's federated arm whose `flwr run` never answers, beside a process of its Flower run (the SuperLink, Ray or a
# ClientApp: anything carrying its FLWR_HOME); it prints that process's pid, then waits.
STUDY = """
import os, subprocess, sys, time
from pathlib import Path
import simulation.flower_run as flower_run
home = Path(sys.argv[1]) / "flwr-home"
home.mkdir(parents=True)
flower = subprocess.Popen(["sleep", "300"], env={**os.environ, "FLWR_HOME": str(home)})
flower_run.subprocess.run = lambda *a, **k: time.sleep(300)
print(flower.pid, flush=True)
flower_run.run_federated({"checkpoint-dir": sys.argv[1]}, Path(sys.argv[1]))
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_sigterm_stops_the_federated_runs_processes(tmp_path):
    study = subprocess.Popen([sys.executable, "-c", STUDY, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        flower = int(study.stdout.readline())
        time.sleep(1.0)  # inside run_federated's wait
        assert _running(flower)
        study.send_signal(signal.SIGTERM)
        assert study.wait(timeout=30) == 128 + signal.SIGTERM
        assert not _running(flower)
    finally:
        study.kill()
        subprocess.run(["pkill", "-KILL", "-s", str(study.pid)], check=False)
        study.wait()
