"""The site's processes: Flower's SuperNode and the site executor beside it, started and supervised by
``python client/run.py`` once its preflight passed (:func:`run_site`).

The SuperNode runs in process isolation with the launch's SuperExec secret, through ``client/supernode.py`` (Flower's
SuperNode with shorter waits); the executor (``client/executor.py``) holds the same secret and the site's allow-list.
On a Flower version the executor does not support, Flower's own per-message processes run instead, unless the site
has an allow-list, which only the executor enforces (docs/federation.md, "The site executor and the allow-list").
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from braintumnet.errors import EXIT_USER_ERROR, BrainTumNetError
from braintumnet.processes import die_with_parent
from client.sites import REPO, SiteSettings

log = logging.getLogger("braintumnet.client")


class LaunchError(BrainTumNetError):
    """A problem that stops the launch; ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


def supernode_command(settings: SiteSettings, port: int, secret: Path | None = None) -> list[str]:
    """``flower-supernode`` for this site; with ``secret``, in process isolation for the site executor, through
    ``client/supernode.py`` (Flower's SuperNode with shorter waits between looks for a message)."""
    exe = shutil.which("flower-supernode", path=str(Path(sys.executable).parent)) or shutil.which("flower-supernode")
    if exe is None:
        raise LaunchError("flower-supernode not found: install the project (pip install -e .) in this environment")
    cmd = [exe] if secret is None else [sys.executable, str(REPO / "client" / "supernode.py")]
    cmd += ["--superlink", settings.superlink]
    if settings.root_certificates is not None:
        cmd += ["--root-certificates", str(settings.root_certificates)]
    else:
        cmd += ["--insecure"]
    if settings.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(settings.auth_key)]
    if secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    cmd += ["--node-config", settings.node_config(), "--host", "127.0.0.1", "--port", str(port)]
    return cmd


def executor_command(settings: SiteSettings, port: int, secret: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "client" / "executor.py"), "--runtime-api-address", f"127.0.0.1:{port}",
           "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid())]
    if settings.allowed_apps is not None:
        cmd += ["--allowed-apps", str(settings.allowed_apps)]
    else:  # the launcher allows that only with --insecure (check_apps)
        cmd += ["--allow-any-app"]
    return cmd


def superexec_secret(settings: SiteSettings) -> Path:
    """The site config's secret file, or a new random one for this launch (mode 0600, in the cache's state folder)."""
    if settings.superexec_secret is not None:
        path = settings.superexec_secret
        if not path.is_file() or path.stat().st_size == 0:
            raise LaunchError(f"{path}: the superexec-secret file is missing or empty; put a random secret in it "
                              "(e.g. head -c 32 /dev/urandom > FILE; chmod 600 FILE) or drop the key for a new "
                              "one per launch")
        if path.stat().st_mode & 0o077:
            log.warning("%s can be read by other users (mode %o): chmod 600 %s", path, path.stat().st_mode & 0o777,
                        path)
        return path
    state = settings.cache / "state"
    state.mkdir(parents=True, exist_ok=True)
    path = state / f"superexec-{settings.name}.secret"
    from braintumnet.io import PRIVATE, atomic_write_text  # numpy with it: only once the SuperNode is to start

    return atomic_write_text(path, secrets.token_hex(32), mode=PRIVATE)


def site_executor_usable(settings: SiteSettings) -> bool:
    """The site executor relies on Flower 1.42's internals; on another version it cannot run, and the allow-list
    cannot be enforced: refused when an allow-list is configured, Flower's own processes otherwise (a warning)."""
    from client.executor import SUPPORTED_FLOWER, flower_version, supported

    version = flower_version()
    if supported(version):
        return True
    if settings.allowed_apps is not None:
        raise LaunchError(f"this site's allow-list ({settings.allowed_apps}) is enforced by the site executor, which "
                          f"supports Flower {SUPPORTED_FLOWER}x only, and this is Flower {version}: install Flower "
                          "1.42 (pip install -e .) or update the executor")
    log.warning("Flower %s: the site executor supports %sx only; using Flower's own process per message (slower)",
                version, SUPPORTED_FLOWER)
    return False


def run_site(settings: SiteSettings, port: int, executor: str) -> int:
    """Start the SuperNode (and the site executor) and wait; when one stops, stop the other. Returns its exit code.

    A stop (SIGTERM from systemd or compose, Ctrl-C) reaches each child exactly once, from here: the children run in
    their own sessions, so a terminal's Ctrl-C does not reach them directly, and one already signalled is not
    signalled again. Flower's SuperNode takes a second signal as a hard kill (its handler restores the default one),
    which would skip its goodbye to the SuperLink: the centre would then wait up to a minute, the SuperLink's
    heartbeat patience, before it counts the site out of a round in flight, instead of at once. Each child also gets
    SIGTERM when this launcher dies, however it dies (Linux)."""
    env = dict(os.environ)
    if executor == "separate":  # the executor runs in its own service (deploy/systemd), under a user without the key
        commands = {"SuperNode": supernode_command(settings, port, superexec_secret(settings))}
    elif executor == "flower" or not site_executor_usable(settings):
        # Flower's SuperExec checks for a new message every second by default; a ClientApp then starts sooner.
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        commands = {"SuperNode": supernode_command(settings, port)}
    else:
        secret = superexec_secret(settings)
        commands = {"SuperNode": supernode_command(settings, port, secret),
                    "site executor": executor_command(settings, port, secret)}
    for what, cmd in commands.items():
        log.info("starting the %s: %s", what, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    procs = {what: subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
             for what, cmd in commands.items()}
    signalled: set[str] = set()

    def forward(signum, frame):  # systemd / compose / Ctrl-C stop the launcher: stop both, then exit with their code
        for what, proc in procs.items():
            if proc.poll() is None and what not in signalled:
                signalled.add(what)
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while all(proc.poll() is None for proc in procs.values()):
        time.sleep(0.5)
    first, code = next((what, proc.returncode) for what, proc in procs.items() if proc.returncode is not None)
    for what, proc in procs.items():
        if proc.poll() is None:
            if what not in signalled:
                log.info("the %s stopped (exit code %s): stopping the %s", first, code, what)
                signalled.add(what)
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return code if code >= 0 else 128 - code

