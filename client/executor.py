"""The site executor: runs the SuperNode's ClientApp tasks from a warm parent process, one forked child per task.

Flower starts a fresh ``flwr-clientapp`` process for every message: it imports flwr, torch and MONAI (whose package
``__init__`` pulls mlflow and matplotlib too), installs the app from its FAB and only then runs the site's few
seconds of work, 25-35 s of wall time per message on a small machine. ``python client/run.py`` starts
``flower-supernode --isolation process`` (which then starts no executor of its own) and this module beside it.
The executor authenticates to the SuperNode's local Runtime API with the launch's SuperExec secret (only a process
holding the secret can acquire a task), imports the site's ClientApp once, so every third-party module it needs is in
memory, and forks a child per task. The child runs Flower's own ``run_clientapp`` unchanged (task heartbeats, FAB
install, app loading, reply and task status) with two additions:

- the FAB's SHA-256 is checked against the site's allow-list (:mod:`client.allowlist`) BEFORE the FAB is installed,
  so an app the hospital did not accept never has a line of its code imported; the run gets an error reply;
- after the install, the modules the FAB ships (``client``, ``braintumnet``, ...) are dropped from the inherited
  module table, so the FAB's own code runs, as in a fresh process; only third-party modules stay warm.

Each child starts from the parent's state: nothing of a previous message survives (no model, no Opacus wrapper, no
data loader); Python's and NumPy's global random generators are reseeded from the OS as a fresh process would be.
The parent never initialises CUDA (forking after CUDA is initialised is unsupported): a child on a GPU pays the CUDA
start itself. The parent re-executes itself (a fresh warm parent) after a child exits with an error, and when its
resident memory exceeds ``--max-rss-mb``. A change of app (FAB hash) needs no new parent: the parent holds no app code.

This relies on Flower internals of 1.42 (``run_superexec``'s executor hook, ``run_clientapp``'s use of
``install_from_fab``, the exit-handler registry); another Flower version is refused at start with a clear message
(the launcher then falls back to Flower's own per-message processes), and tests/federation/test_executor.py checks
these internals' signatures.

Exit codes: 0 stopped, 2 a settings problem (secret, allow-list, Flower version).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository's packages, not this folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from braintumnet.errors import BrainTumNetError  # noqa: E402
from client.allowlist import AppNotAllowed, check_allowed  # noqa: E402

log = logging.getLogger("braintumnet.executor")
SUPPORTED_FLOWER = "1.42."  # the internals below are those of Flower 1.42.x
DEFAULT_MAX_RSS_MB = 3072
EXIT_SETTINGS = 2
# A child's exit code when it refused the app: an expected outcome, not a reason to replace the warm parent.
EXIT_REFUSED = 0
CHILD_PULL_RETRY_S = 0.1


class AppRefused(RuntimeError):
    """What the centre sees of a refused app: the hash only (the allow-list's path stays at the site)."""


def flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def supported(version: str) -> bool:
    return version.startswith(SUPPORTED_FLOWER)


def warm_up(app_module: str = "client.app") -> float:
    """Import the site's ClientApp (torch, the MONAI submodules, flwr, ...); returns the seconds it took.

    The first-party modules stay importable but each child drops those its FAB ships, so they are re-read from it.
    Imports only: no tensor operation runs here, so no thread pool (OpenMP) or CUDA context exists at fork time.
    """
    import importlib

    start = time.perf_counter()
    importlib.import_module(app_module)
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import torch

    if torch.cuda.is_initialized():  # a module initialised CUDA at import: children would inherit a broken context
        raise RuntimeError("CUDA was initialised while warming up the executor; forking would be unsafe")
    return time.perf_counter() - start


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ForkExecutor:
    """Flower's executor interface (``launch``, ``reconcile``, ...) for ``run_superexec``, forking warm children."""

    def __init__(self, allowed_apps: Path | None, max_rss_mb: float, root_certificates: bytes | None = None):
        self.allowed_apps = allowed_apps
        self.max_rss_mb = max_rss_mb
        self.root_certificates = root_certificates
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (task id, start time)
        self.recycle: str | None = None
        self.owner = os.getpid()

    # -- the interface run_superexec calls ------------------------------------------------------------------------

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        from flwr.supercore.constant import TaskType

        del insecure, root_certificates_path
        if self.recycle is not None:  # take no new task; reconcile replaces this process once the children are done
            return set(), set()
        return set(supported_task_types) & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"the site executor runs ClientApps only, not {spec.task_type}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(spec.runtime_api_address, spec.token, spec.insecure, self.root_certificates,
                      self.allowed_apps, self.owner)  # never returns
        self.children[pid] = (spec.task_id, time.monotonic())
        log.info("task %d: ClientApp in process %d (FAB %s)", spec.task_id, pid, (spec.fab_hash or "?")[:12])
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children; replace this process when it should be recycled and no child runs."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            task, started = self.children.pop(pid, (None, time.monotonic()))
            code = os.waitstatus_to_exitcode(status)
            log.info("task %s: ClientApp process %d done in %.2f s (exit code %d)", task, pid,
                     time.monotonic() - started, code)
            if code != 0 and self.recycle is None:
                self.recycle = f"the ClientApp of task {task} exited with code {code}"
        if self.recycle is None and self.max_rss_mb and rss_mb() > self.max_rss_mb:
            self.recycle = f"its memory ({rss_mb():.0f} MB) exceeds --max-rss-mb {self.max_rss_mb:g}"
        if self.recycle is not None and not self.children:
            log.warning("executor: starting a fresh warm parent because %s", self.recycle)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

    def close(self) -> None:
        """Nothing to release: a child stops by itself when this process is gone (Flower's parent monitor)."""


def run_child(address: str, token: str, insecure: bool, certificates: bytes | None, allowed_apps: Path | None,
              parent_pid: int) -> None:
    """The forked child: Flower's ``run_clientapp`` with the allow-list check before the install. Exits the process."""
    code = 1
    started = time.monotonic()
    try:
        import numpy as np
        from flwr.supercore.exit import exit_handler
        from flwr.supernode.runtime import run_clientapp as runtime

        # The parent's exit handlers (its Runtime API client, this executor) are not the child's to run.
        exit_handler.registered_exit_handlers.clear()
        # A fresh process seeds these from the OS; a fork would repeat the parent's sequence in every child.
        random.seed()
        np.random.seed(int.from_bytes(os.urandom(4), "little"))
        runtime.install_from_fab = timed("install", guarded_install(runtime.install_from_fab, allowed_apps))
        runtime.pull_task_input = timed("pull", runtime.pull_task_input)
        # The SuperNode creates the task before it has received the message's objects from the SuperLink and stores
        # them only once it has all; until then each pull here is refused, and Flower retries after 1, 2, 4, 8,
        # 10, 10 ... s. A fresh flwr-clientapp spent that time importing; a warm child would mostly wait out the
        # backoff. The SuperNode is local: ask again every CHILD_PULL_RETRY_S (no limit on tries; Flower's overall
        # time limit stays).
        runtime.pull_and_inflate_object_from_tree = functools.partial(
            runtime.pull_and_inflate_object_from_tree, initial_backoff=CHILD_PULL_RETRY_S,
            backoff_cap=CHILD_PULL_RETRY_S, max_tries_per_object=None)
        runtime.push_message = timed("push", runtime.push_message)
        loader = runtime.get_load_client_app_fn
        runtime.get_load_client_app_fn = lambda *a, **k: timed("load", loader(*a, **k))
        runtime.run_clientapp(runtime_api_address=address, token=token, insecure=insecure,
                              certificates=certificates, parent_pid=parent_pid, runtime_dependency_install=False)
        code = 0
    except SystemExit as exc:  # flwr_exit ends run_clientapp with sys.exit(code)
        code = EXIT_REFUSED if refused else exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        total = time.monotonic() - started
        app = total - sum(phases.values())  # the app's own call, mostly; the rest of Flower's steps are small
        log.info("ClientApp process %d: %.2f s in all: %s, app and the rest %.2f s", os.getpid(), total,
                 ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()), app)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


phases: dict[str, float] = {}  # in a child: seconds spent in each of Flower's steps, for the log line above


def timed(name: str, func):
    """``func``, adding its seconds to ``phases[name]`` (pull and push wait for the SuperNode's transfers)."""

    def call(*args, **kwargs):
        start = time.monotonic()
        try:
            return func(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.monotonic() - start

    return call


refused: list[str] = []  # in a child: the FAB it refused (Flower then replies with an error and exits non-zero)


def guarded_install(install, allowed_apps: Path | None):
    """``install_from_fab`` that first refuses a FAB not on the allow-list, then lets the FAB's modules win."""

    def install_allowed(fab_file, *args, **kwargs):
        digest = hashlib.sha256(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()).hexdigest()
        try:
            check_allowed(digest, allowed_apps)
        except BrainTumNetError as exc:  # not listed, or the list unreadable: nothing runs; the path stays here
            log.error("%s", exc)
            refused.append(digest)
            why = "is not on its allow-list" if isinstance(exc, AppNotAllowed) else "could not be checked"
            raise AppRefused(f"the site refused the app: FAB sha256 {digest} {why}") from None
        installed = Path(install(fab_file, *args, **kwargs))
        shipped = {p.stem for p in installed.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
        for name in [m for m in sys.modules if m.split(".", 1)[0] in shipped]:
            del sys.modules[name]
        return installed

    return install_allowed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python client/executor.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's local Runtime API, HOST:PORT")
    p.add_argument("--superexec-auth-secret-file", type=Path, required=True,
                   help="the secret file the SuperNode was started with (--superexec-auth-secret-file)")
    p.add_argument("--allowed-apps", type=Path, default=None,
                   help="the site's FAB allow-list (one SHA-256 per line); required unless --allow-any-app")
    p.add_argument("--allow-any-app", action="store_true",
                   help="run every app the SuperLink sends, with no allow-list (plaintext test federations only)")
    p.add_argument("--max-rss-mb", type=float, default=DEFAULT_MAX_RSS_MB,
                   help=f"start a fresh warm parent when this process's memory exceeds it (default "
                   f"{DEFAULT_MAX_RSS_MB})")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the launcher) is gone")
    p.add_argument("--poll-interval", type=float, default=0.1,
                   help="seconds between two looks for a new task at the SuperNode (default 0.1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s: %(message)s"))
    log.addHandler(handler)  # Flower logs through its own handler; the root logger stays quiet
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise
    args = parse_args(argv)
    if args.allowed_apps is None and not args.allow_any_app:
        print("error: no --allowed-apps FILE: the site executor runs only the apps the site's admin listed (one "
              "SHA-256 per line; python client/run.py --fab-hash APP.fab prints an app's hash); --allow-any-app "
              "runs every app, for plaintext test federations only", file=sys.stderr)
        return EXIT_SETTINGS
    version = flower_version()
    if not supported(version):
        print(f"error: the site executor relies on Flower {SUPPORTED_FLOWER}x internals, this is Flower {version}; "
              "python client/run.py falls back to Flower's own per-message processes (--executor flower)",
              file=sys.stderr)
        return EXIT_SETTINGS
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    try:
        secret = load_superexec_auth_secret(str(args.superexec_auth_secret_file))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(args.poll_interval, 0.01))
    seconds = warm_up()
    log.info("executor (pid %d): warm in %.1f s (%.0f MB); waiting for ClientApp tasks at %s", os.getpid(), seconds,
             rss_mb(), args.runtime_api_address)
    run(args.runtime_api_address, secret, ForkExecutor(args.allowed_apps, args.max_rss_mb), args.parent_pid)
    return 0


def run(address: str, secret: bytes, executor: ForkExecutor, parent_pid: int | None) -> None:
    """Flower's SuperExec loop (authentication, task acquisition, signal handling) with this executor in it."""
    from flwr.supercore.superexec import run_superexec as loop

    loop.get_executor = lambda *args, **kwargs: executor
    loop.run_superexec(runtime_api_address=address, insecure=True, superexec_auth_secret=secret,
                       parent_pid=parent_pid, runtime_dependency_install=False)


if __name__ == "__main__":
    sys.exit(main())
