"""The loopback harness: a ``flower-superlink``, sites started with ``python client/run.py``, runs submitted with
``flwr run`` and watched with ``flwr ls``, all real processes, deployed as deploy/README.md says: TLS with a CA made
by ``braintumnet certs``, SuperNode authentication, each site's public key registered under its name.

Every process is started in its own session and stopped in teardown by its process group, together with any
descendant that left the group (Flower's SuperExec starts its children in new sessions). Ports come from probing;
everything is written under pytest's tmp folder.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from braintumnet.certs import make_certs

# The study's Flower runner has the same needs; one copy of each helper.
from simulation.flower_run import free_port
from simulation.flower_run import processes_carrying as _carrying

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = ("yibin", "plagh", "jinling")
ROGUE = "rogue"  # has a key pair made by the same command, never registered
# Small enough for a 2-core CI machine: the data settings of tests/conftest.py's TINY_RUN_CONFIG (so the session's
# prepared caches are reused), the narrowest network, one local epoch.
TINY = {"profile": "quick", "data.img-size": 32, "data.slices-per-case": 3, "model.feature-size": 8,
        "train.batch-size": 8, "train.local-epochs": 1, "round-timeout-s": 240.0}


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (read from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Proc:
    """A process we started: its own session, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict, cwd: Path, nice: int = 0):
        self.name, self.cmd, self.log = name, cmd, log
        self._fh = open(log, "ab")
        self.popen = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the process group and every descendant; SIGKILL whatever is left after ``timeout``."""
        if self.popen.poll() is not None and not _children(self.pid):
            self._fh.close()
            return
        victims = [self.pid] + _children(self.pid)
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        for pid in victims[1:]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.popen.poll() is None:
            time.sleep(0.2)
        for pid in victims + _children(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()

    def stop_as_operator(self, timeout: float = 20.0) -> None:
        """SIGTERM to this process alone, as ``systemctl stop`` (KillMode=mixed) or ``docker stop`` sends it, then wait
        for it to end (a launcher waits for its own children); SIGKILL whatever is left then, or after ``timeout``."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.popen.poll() is None:
            time.sleep(0.2)
        self.stop(signal.SIGKILL, timeout=0)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Federation:
    """One SuperLink, the sites, the ``flwr`` CLI, all under ``root``."""

    def __init__(self, root: Path, phantom: Path, cache: Path):
        self.root, self.phantom, self.cache = root, phantom, cache
        self.port = free_port()
        self.db = root / "superlink.db"
        self.ckpt = root / "runs"
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        # The centre's CA and certificate (localhost names) and a key pair per site, as the runbook makes them.
        self.pki = root / "pki"
        make_certs(self.pki, sites=[*SITES, ROGUE])
        self.ca = self.pki / "ca.crt"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.ca}"\n')
        self.sites_file = root / "sites.toml"
        run_config = "".join(f'"{k}" = {json.dumps(v)}\n' for k, v in TINY.items())
        self.sites_file.write_text(
            f'[defaults]\nsuperlink = "127.0.0.1:{self.port}"\ncache = "{cache}"\ndevice = "cpu"\n'
            f'root-certificates = "{self.ca}"\nstate-dir = "{root / "state"}"\n\n'
            f"[defaults.run-config]\n{run_config}\n"
            # the tiny phantom's sites hold 1-3 test cases; metrics unrounded so tests can compare them exactly
            "[defaults.policy]\ndp-required = false\nmin-test-cases = 1\nmetric-decimals = -1\n\n"
            + "".join(f'[site.{s}]\ndata = "{phantom / s}"\nauth-key = "{self.site_key(s)}"\n\n' for s in SITES))
        self.env = dict(os.environ)
        self.env.update({
            "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "BRAINTUMNET_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
        })
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.superlink: Proc | None = None
        self.superexec: Proc | None = None
        self.sites: dict[str, Proc] = {}
        self._all: list[Proc] = []

    # ---- processes ---------------------------------------------------------------------------------------------

    def site_key(self, site: str) -> Path:
        return self.pki / "sites" / site / f"{site}.key"

    def start_superlink(self) -> Proc:
        cmd = [str(BIN / "flower-superlink"),
               "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.pki / "superlink.crt"),
               "--ssl-keyfile", str(self.pki / "superlink.key"), "--enable-supernode-auth",
               "--host", "127.0.0.1", "--port", str(self.port), "--isolation", "process",
               "--database", str(self.db), "--disable-runtime-dependency-installation"]
        self.superlink = self._start("superlink", cmd, cwd=self.root)
        self._wait_port(self.port, 30, self.superlink)
        # The ServerApp runtime beside it, under a supervisor, as deploy/ runs it (systemd Restart=always, compose
        # restart: unless-stopped): Flower's SuperExec exits on the first 500 from the SuperLink ("database is locked"
        # on a saturated machine), and a SuperLink's own SuperExec is never restarted, so new runs stayed pending.
        # It looks for new runs with a write to the SQLite state every second by default; every 3 s is enough here
        # and leaves the lock to the uploads (docs/federation.md, "Known limits").
        superexec = [str(BIN / "flower-superexec"), "--root-certificates", str(self.ca),
                     "--runtime-api-address", f"127.0.0.1:{self.port}"]
        loop = f"while :; do {shlex.join(superexec)}; echo 'superexec exited; restarting'; sleep 1; done"
        self.superexec = self._start("superexec", ["bash", "-c", loop], cwd=self.root,
                                     env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "3"})
        return self.superlink

    def kill_centre(self, sig: int) -> None:
        """The centre's machine fails: the SuperLink, its SuperExec and the ServerApp under it."""
        self.superexec.stop(sig)
        self.superlink.stop(sig)

    def register(self, site: str) -> str:
        """``flwr supernode register`` the site's public key under its name; returns the node id."""
        out = self.flwr("supernode", "register", str(self.site_key(site).with_suffix(".pub")), "loop",
                        "--name", site)
        assert out.get("success"), out
        return out["node-id"]

    def start_site(self, site: str) -> Proc:
        cmd = [sys.executable, str(REPO / "client" / "run.py"), "--site", site, "--config", str(self.sites_file)]
        # Three sites share this machine with the centre: niced, so their CPU-heavy ClientApps cannot starve the
        # SuperLink (its SQLite state then times out on locks and answers 500s, which Flower does not retry).
        self.sites[site] = self._start(site, cmd, cwd=REPO, nice=10)
        return self.sites[site]

    def deploy(self) -> None:
        """The centre and the three sites, as the runbook starts them: once per module (idempotent)."""
        if self.superlink is not None:
            return
        self.start_superlink()
        for site in SITES:
            self.register(site)
        for site in SITES:
            self.start_site(site)

    def start_supernode(self, name: str, key: Path) -> Proc:
        """A bare ``flower-supernode`` with ``key``: what a host with a key the centre never registered runs."""
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--root-certificates",
               str(self.ca), "--auth-supernode-private-key", str(key), "--node-config", f'site-name="{name}"',
               "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "2"]
        return self._start(name, cmd, cwd=self.root)

    def launcher(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``python client/run.py ARGS`` to completion (for the launcher's refusals; it never gets to the SuperNode)."""
        return subprocess.run([sys.executable, str(REPO / "client" / "run.py"), *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def _start(self, name: str, cmd: list[str], cwd: Path, nice: int = 0, env: dict | None = None) -> Proc:
        proc = Proc(name, cmd, self.root / f"{name}-{len(self._all)}.log", {**self.env, **(env or {})}, cwd, nice)
        self._all.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self._all):
            proc.stop(signal.SIGTERM, timeout=5)
        # A ServerApp or ClientApp whose parent died is re-parented to init; it still carries our FLWR_HOME.
        for pid in _carrying(f"FLWR_HOME={self.home}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _wait_port(port: int, timeout: float, proc: Proc) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"{proc.name} did not open port {port} in {timeout:.0f} s")

    # ---- the flwr CLI --------------------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            raise AssertionError(f"flwr {' '.join(args)} printed no JSON (rc {res.returncode}):\n"
                                 f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}") from None

    def submit(self, **run_config) -> str:
        overrides = {**TINY, "checkpoint-dir": str(self.ckpt), "cache-dir": str(self.cache), **run_config}
        spec = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        out = self.flwr("run", ".", "loop", "--run-config", spec)
        assert out.get("success"), out
        return out["run-id"]

    def status(self, run_id: str) -> dict:
        return self.flwr("ls", "loop", "--run-id", run_id)["runs"][0]

    def wait_finished(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.status(run_id)
            if run["status"].startswith("finished"):
                return run
            time.sleep(5)  # each `flwr ls` is a process start and a SuperLink query; keep the load low
        raise AssertionError(f"run {run_id} not finished after {timeout:.0f} s:\n{self.server_log(run_id)[-4000:]}")

    def server_log(self, run_id: str) -> str:
        res = subprocess.run([str(BIN / "flwr"), "log", run_id, "loop", "--show"], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=60)
        return res.stdout + res.stderr

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "ls", "loop")
        return sum(n["status"] == "online" for n in out.get("nodes", []))

    def wait_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.sites.items():
                if not proc.alive():
                    raise AssertionError(f"site {name} exited:\n{proc.text()[-3000:]}")
            if self.online_nodes() >= count:
                return
            time.sleep(1)
        raise AssertionError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")

    def kill_site(self, site: str, sig: int) -> None:
        """Stop a site as a crash (SIGKILL: every process of the site at once) or an operator (SIGTERM to the
        launcher, which stops the rest) would."""
        proc = self.sites.pop(site)
        proc.stop_as_operator() if sig == signal.SIGTERM else proc.stop(sig, timeout=10)

    def run_dir(self, run_id: str) -> Path:
        return self.ckpt / f"run-{run_id}"
