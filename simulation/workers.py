"""The study's in-process arms (centralized, Table 2's regions, each hospital alone) trained by worker processes
while the federated arm runs, so that a study uses every core.

Why: these models are small, and torch gains little from a second thread on them (on a 2-core Intel Xeon the `quick`
centralized arm trained in 182 s with two threads and 190 s with one), while two arms at one thread each train in
about the time of one; the federated arm's simulated sites also leave cores idle between their waves and rounds.

Each worker is the study's own command with ``--arms`` (``python -m simulation --arms centralized ... --out
<this study's folder>``), so it keeps every arm it trains in the run folder exactly as ``--arms`` does on another
machine (simulation/saved.py), and the study picks those arms up as it reaches them. A worker that fails leaves its
arms to the study, which trains them itself and says so. Workers get one torch thread each unless the machine has
more cores than workers; they never log to MLflow (the study logs each arm it picks up, in one writer).

Each arm of each repetition is claimed before it is trained (a file created exclusively in ``workers/claims/``): a
worker skips an arm the study has claimed, and the study, when it would otherwise wait for a worker, claims and trains
an arm of its repetition that no worker has started. So an arm is trained once, and the study's own process does not
sit idle after its federated arms while a worker still has a queue (the main job's last minute or so was one worker
training the last hospital alone while the study waited).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from braintumnet.processes import die_with_parent
from braintumnet.report.provenance import usable_cores
from simulation import saved

# A worker asks to be sent SIGTERM when the study that started it dies, even by SIGKILL; the study's pid comes in
# this variable, so a worker whose study died before it asked exits at once.
PARENT_ENV = "BRAINTUMNET_STUDY_PID"


def auto_jobs(device_type: str) -> int:
    """Worker processes when ``--jobs`` is not given: one per usable core on a CPU; none on a GPU (the arms would
    share one device, which we have not measured)."""
    return usable_cores() if device_type == "cpu" else 1


def arm_cost(slices: int, batch_size: int) -> float:
    """A rough training cost of one arm, to share the arms fairly between workers: its batches per epoch times a
    batch's cost, which on a CPU is a fixed part plus a part per slice (measured on the `quick` arms: a batch of 3 cost
    about 0.09 s, one of 8 about 0.13 s, so about 7 slices' worth of fixed cost)."""
    return slices / max(1, batch_size) * (batch_size + 7)


def share(costs: dict[str, float], jobs: int) -> list[list[str]]:
    """The arms in at most ``jobs`` lists of about equal cost (each arm, largest first, onto the least loaded list),
    each list in the order the arms were given."""
    loads, groups = [0.0] * max(1, jobs), [[] for _ in range(max(1, jobs))]
    for name in sorted(costs, key=lambda n: -costs[n]):
        i = loads.index(min(loads))
        loads[i] += costs[name]
        groups[i].append(name)
    order = list(costs)
    return [sorted(g, key=order.index) for g in groups if g]


CLAIMS = "claims"


def claim(out: Path, seed: int, fold: int | None, arm: str) -> bool:
    """Claim ``arm`` of repetition ``seed`` (``fold``) for this process: True when no one had (the caller then trains
    it), False when a worker or the study has. Atomic (the file is created exclusively)."""
    folder = Path(out) / "workers" / CLAIMS
    folder.mkdir(parents=True, exist_ok=True)
    name = f"s{seed}" + (f"-f{fold}" if fold is not None else "") + "-" + arm.replace(":", "-")
    try:
        fd = os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def die_with_the_study() -> None:
    """In a worker (``python -m simulation --worker``): end with the study that started it."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    if not die_with_parent():  # not Linux: the study still stops its workers when it ends or is stopped
        return
    if os.getppid() != int(parent):
        sys.exit(f"the study (pid {parent}) that started this worker has ended")


@dataclass
class Worker:
    arms: list[str]
    process: subprocess.Popen
    log: Path


@dataclass
class Workers:
    """Worker processes training arms into the study's run folder ``out``."""

    out: Path
    settings: dict
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def start(cls, out: Path, settings: dict, command: list[str], groups: list[list[str]], threads: int,
              say: Callable[[str], None]) -> Workers:
        """One worker per group of arms: ``command`` (the study's own, less ``--arms``) with ``--arms`` the group."""
        pool = cls(Path(out), settings)
        logs = pool.out / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(logs / CLAIMS, ignore_errors=True)  # a stopped study's claims: its arms not kept are free again
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
        try:
            for i, arms in enumerate(groups, 1):
                log = logs / f"worker-{i}.log"
                with open(log, "ab") as sink:
                    sink.write(f"worker {i}: {', '.join(arms)}\n".encode())
                    sink.flush()
                    process = subprocess.Popen([sys.executable, "-m", "simulation", *command, "--arms",
                                                ",".join(arms)], stdout=sink, stderr=subprocess.STDOUT, env=env)
                pool.workers.append(Worker(arms, process, log))
        except BaseException:
            pool.stop()
            raise
        say(f"  {sum(len(w.arms) for w in pool.workers)} in-process arms in {len(pool.workers)} worker processes "
            f"beside the rest, {threads} torch thread(s) each: "
            + "; ".join(", ".join(w.arms) for w in pool.workers) + f" (logs: {logs})")
        return pool

    def holder(self, arm: str) -> Worker | None:
        return next((w for w in self.workers if arm in w.arms), None)

    def started(self, arm: str) -> bool:
        """Whether the worker holding ``arm`` is up and training: it has claimed an arm."""
        worker = self.holder(arm)
        folder = self.out / "workers" / CLAIMS
        if worker is None or not folder.is_dir():
            return False
        pid = str(worker.process.pid)
        return any(path.read_text().strip() == pid for path in folder.iterdir())

    def wait_for(self, seed: int, fold: int | None, arm: str, meanwhile: Callable[[], bool] | None = None
                 ) -> str | None:
        """Wait until the worker holding ``arm`` has kept it for ``seed`` (``fold``); None when it has (or no worker
        holds it), else why not (the worker ended without it: the study then trains it itself). ``meanwhile()`` is
        called while waiting: it may train another arm here (True) or find none to train (False)."""
        worker = self.holder(arm)
        if worker is None:
            return None
        while saved.load_arm(self.out, self.settings, seed, fold, arm, first=False) is None:
            code = worker.process.poll()
            if code is not None:
                if saved.load_arm(self.out, self.settings, seed, fold, arm, first=False) is not None:
                    return None
                return f"its worker ended with exit code {code} without it (see {worker.log})"
            if meanwhile is None or not meanwhile():
                time.sleep(1.0)
        return None

    def stop(self) -> None:
        """Stop every worker still running (the study is done with them, or is being stopped)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


def override_items(overrides: dict) -> list[str]:
    """``-c`` items that give back ``overrides`` (``parse_overrides`` reads each value as TOML)."""
    items = []
    for key, value in overrides.items():
        items += ["-c", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return items
