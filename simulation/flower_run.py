"""Run the federated arm on Flower's own Simulation Engine: ``flwr run . local`` with a private FLWR_HOME.

The same ServerApp and ClientApp as a real deployment; Flower's managed local SuperLink and Ray run the sites. We
start them, wait for ``flwr ls`` to say the run finished (``flwr run`` exits 0 even when a run fails), and stop
every process that carries our FLWR_HOME, so nothing outlives the study. The private FLWR_HOME holds only the
``local`` connection, written here; the number of simulated sites and their resources come with each run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from braintumnet.data.cache import sigterm_as_exit
from braintumnet.errors import BrainTumNetError

# The Flower app's project folder (pyproject.toml's [tool.flwr.app]): `flwr run` builds the app from it.
APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# How often the run's status is asked of Flower while its files show no end (run_federated).
STATUS_EVERY_S = 30.0
# $FLWR_HOME/config.toml: Flower's managed local simulation SuperLink, the only connection the study uses.
LOCAL_CONNECTION = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the federated arm's simulated sites run (Flower's Ray backend).

    Args:
        ray_address: join this running Ray cluster (``ray start --head`` prints it) instead of starting a private
            one; None = a private Ray instance on this machine.
        cpus_per_site, gpus_per_site: Ray resources each simulated site reserves (``client-resources-num-*``).
    """

    ray_address: str | None = None
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_carrying(marker: str) -> list[int]:
    """Our processes whose environment holds ``marker``: the local SuperLink, Ray and ClientApps of this run."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def run_federated(run_config: dict, workdir: Path, *, num_sites: int = 3, cpus_per_site: int = 1,
                  gpus_per_site: float = 0.0, ray_address: str | None = None, mlflow_uri: str | None = None,
                  timeout_s: float = 3600.0, threads_per_site: int | None = None, log=print) -> Path:
    """Submit one run and wait for it; returns the server's run folder (``checkpoint-dir/run-<id>``).

    Args:
        num_sites: simulated SuperNodes (partition i is site i of the run config's ``sites``, evaluate-only sites
            included: an entry ``NAME:evaluate-only`` is such a partition).
        cpus_per_site, gpus_per_site: Ray resources each simulated site reserves.
        threads_per_site: the sites' OpenMP / torch threads (default ``cpus_per_site``). Fewer threads than reserved
            CPUs keeps a site from spinning on cores that other work holds (Ray counts CPUs, it does not pin them).
        ray_address: join this running Ray cluster (``RAY_ADDRESS``, which the Simulation Engine's ``ray.init()``
            honours) instead of starting a private Ray instance. Every Ray node must have this package installed.
        mlflow_uri: the ServerApp's MLflow store (``MLFLOW_TRACKING_URI``).
        timeout_s: the longest wait for the next round (the first included) before the run is stopped as stalled.
    """
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(LOCAL_CONNECTION)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": str(threads_per_site or cpus_per_site),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    spec = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    federation = (f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site} "
                  f"client-resources-num-gpus={gpus_per_site}")

    def flwr(*args: str) -> dict:
        res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], cwd=APP_DIR, env=env,
                             capture_output=True, text=True, timeout=600)
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            raise BrainTumNetError(f"flwr {args[0]} gave no answer: {(res.stderr or res.stdout)[-400:]}") from None

    # SIGTERM (`kill`, `timeout`, a batch scheduler) raises SystemExit here, so the finally clause still stops the
    # SuperLink, Ray and the ClientApps instead of leaving them running without the study.
    with sigterm_as_exit():
        try:
            started = flwr("run", ".", "local", "--run-config", spec, "--federation-config", federation)
            if not started.get("success"):
                raise BrainTumNetError(f"flwr run refused the federated arm: {started}")
            run_id = started["run-id"]
            run_dir = Path(run_config["checkpoint-dir"]) / f"run-{run_id}"
            # The deadline counts from the last round aggregated: a run that keeps finishing rounds on a slow or
            # shared machine goes on; one that makes no progress for timeout_s is stopped.
            deadline, shown, asked = time.monotonic() + timeout_s, 0, -math.inf
            while True:
                rounds = _rounds_done(run_dir)
                if rounds > shown:
                    shown, deadline = rounds, time.monotonic() + timeout_s
                    log(f"  federated: round {rounds}/{run_config['num-server-rounds']} aggregated")
                # The run's files show its progress for free; `flwr ls` (a new Python process: about 1.5 s of CPU)
                # is asked only when the run may have ended: once its final model is written, and otherwise every
                # STATUS_EVERY_S, so that a failed run is still noticed. Asked every poll, it took a third of a core
                # from the simulated sites on a 2-core machine.
                if (run_dir / "final.pt").exists() or time.monotonic() - asked >= STATUS_EVERY_S:
                    asked = time.monotonic()
                    status = flwr("ls", "local", "--run-id", str(run_id))["runs"][0]["status"]
                    if status.startswith("finished"):
                        break
                if time.monotonic() > deadline:
                    raise BrainTumNetError(
                        f"federated run {run_id} aggregated no round for {timeout_s:.0f} s (rounds done: {shown} of "
                        f"{run_config['num-server-rounds']}); see {home}/local-superlink/")
                time.sleep(3)
            if status != "finished:completed":
                raise BrainTumNetError(f"federated run {run_id} ended as {status}; see {home}/local-superlink/")
            return run_dir
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in processes_carrying(f"FLWR_HOME={home}"):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(2)


def _rounds_done(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "metrics.json").read_text()).get("rounds", []))
    except (OSError, ValueError):
        return 0
