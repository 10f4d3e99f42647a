"""What it costs to move the model through Flower: one message there and back, one array per tensor against one flat
array plus a layout.

Flower 1.42 sends a record as a tree of objects, one request per object (at most two at a time on a 2-core machine),
and a message crosses three hops each way (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). The model's
state dict, one Array per tensor, is a few hundred objects; packed into one float32 array it is a handful (Flower cuts
arrays into 5 MiB chunks). This benchmark measures whether that difference matters.

A real ``flower-superlink`` (plaintext, SQLite state on disk) and one ``flower-supernode`` on loopback, with a
trivial app written to the work folder: the ServerApp sends one message at a time to the site and polls every 20 ms
for the reply; the ClientApp turns the received arrays into torch tensors (as the site's ClientApp does) and sends
them straight back in the same form. The two forms alternate message by message. For every message: the total time,
the SuperNode's idle wait before it picked the message up (Flower's fixed 3 s sleep between pulls, not a transfer
cost, left out of the "message" column), the ServerApp's upload and download, the SuperNode's download and upload
(from its log lines, timestamped by a wrapper) and the ClientApp process's start-to-work time.

Two kinds of site: Flower's own SuperNode and per-message ``flwr-clientapp`` process, and the site launcher's
processes (``client/supernode.py`` with its shorter waits and the site executor, ``client/executor.py``).
``python -m bench --only transfer [--quick]`` (the test-size model at both kinds of site, and the paper profile's
model at Flower's unless ``--quick``), or ``python -m bench.transfer [--runs quick/flower,quick/project,paper/flower]
[--reps N] [--add]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Context, median, ratio, table, write_result
from bench.transfer_app import APP_CLIENT, APP_COMMON, APP_PYPROJECT, APP_SERVER, SUPERNODE_WRAPPER

BIN = Path(sys.executable).parent
FORMS = ("per-tensor", "flat")
RUN_SIZES = {"quick": {"profile": "quick", "data.img-size": 32, "data.slices-per-case": 3,
                       "model.feature-size": 8},
             "standard": {"profile": "standard"}, "paper": {"profile": "paper"}}

REPO = Path(__file__).resolve().parents[1]
SITE_KINDS = {"flower": "Flower's own SuperNode and a fresh `flwr-clientapp` process per message",
              "project": "the site launcher's processes: `client/supernode.py` (shorter waits) in process isolation "
                         "and the site executor (`client/executor.py`: a forked warm child per message, asking for "
                         "the message's objects every 0.1 s)"}


def state_dict(run_config: dict) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays, in order."""
    from braintumnet.config.run_config import resolve
    from braintumnet.data.contract import class_names
    from braintumnet.engine import build_model

    profile = resolve(run_config)
    model = build_model(profile, len(class_names(profile.data.task)))
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app(root: Path) -> Path:
    app = root / "app"
    (app / "transferbench").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "LICENSE").write_text("Benchmark app, written by bench/transfer.py.\n")
    for name, text in (("__init__", ""), ("common", APP_COMMON), ("server", APP_SERVER), ("client", APP_CLIENT)):
        (app / "transferbench" / f"{name}.py").write_text(text)
    return app


class Loopback:
    """A plaintext SuperLink (SQLite state on disk) and one SuperNode, stopped by process group."""

    def __init__(self, root: Path, site: str = "flower"):
        self.root, self.site = root, site
        self.port, self.fleet, self.appio = free_port(), free_port(), free_port()
        home = root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    # The executors' task polls (1 s by default) are a fixed cost of every message in both forms;
                    # short here so they blur the comparison less.
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as fh:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--database", str(self.root / "superlink.db"),
                                  "--disable-runtime-dependency-installation"])
        self._wait_port(self.port)
        cmd = [sys.executable, "-c", SUPERNODE_WRAPPER, self.site, str(REPO), "--insecure", "--superlink",
               f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(self.appio)]
        if self.site == "project":
            import secrets

            secret = self.root / "superexec.secret"
            secret.write_text(secrets.token_hex(32))
            secret.chmod(0o600)
            self._start("supernode", [*cmd, "--isolation", "process", "--superexec-auth-secret-file", str(secret)])
            self._start("executor", [sys.executable, str(REPO / "client" / "executor.py"), "--runtime-api-address",
                                     f"127.0.0.1:{self.appio}", "--superexec-auth-secret-file", str(secret),
                                     "--allow-any-app"])
        else:
            self._start("supernode", cmd)

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the SuperLink did not open port {port} in {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        res = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=self.env, cwd=self.root,
                             capture_output=True, text=True, timeout=timeout, check=False)
        try:
            return json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            raise RuntimeError(f"flwr {' '.join(args)}: {res.stdout[-1500:]} {res.stderr[-1500:]}") from None

    def run(self, app: Path, config: dict, timeout: float) -> dict:
        spec = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        out = self.flwr("run", str(app), "loop", "--run-config", spec)
        if not out.get("success"):
            raise RuntimeError(f"flwr run failed: {out}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flwr("ls", "loop", "--run-id", str(out["run-id"]))["runs"][0]
            if run["status"].startswith("finished"):
                return run
            time.sleep(3)
        raise RuntimeError(f"run {out['run-id']} not finished after {timeout:.0f} s")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


SUPERNODE_EVENTS = {"Receiving:": "recv_start", "Received successfully": "recv_end", "Sending:": "send_start",
                    "Sent successfully": "send_end"}


def supernode_events(text: str) -> list[dict[str, float]]:
    """The SuperNode's four timestamps per message, in order: picked up, received, reply found, reply sent."""
    found: list[dict[str, float]] = []
    for line in text.splitlines():
        m = re.match(r"TS (\d+\.\d+) (.*)", line)
        if not m:
            continue
        for marker, key in SUPERNODE_EVENTS.items():
            if m.group(2).startswith(marker):
                if key == "recv_start":
                    found.append({})
                if found:
                    found[-1][key] = float(m.group(1))
    return found


def analyse(messages: list[dict], events: list[dict[str, float]]) -> list[dict]:
    """Each message's phases in seconds."""
    rows = []
    for msg, ev in zip(messages, events):
        total = msg["reply_done"] - msg["push_start"]
        # The SuperNode picks a message up as soon as its header is in (then fetches its objects, retrying with
        # backoff while the upload goes on): only a pick-up after the upload finished is idle time.
        idle = max(0.0, ev["recv_start"] - msg["push_end"])
        rows.append({"form": msg["form"], "rep": msg["rep"], "total_s": total, "idle_s": idle,
                     "message_s": total - idle,
                     "server_upload_s": msg["push_end"] - msg["push_start"],
                     "supernode_download_s": ev["recv_end"] - ev["recv_start"],
                     "clientapp_to_work_s": msg["app_start"] - ev["recv_start"],
                     "clientapp_work_s": msg["app_end"] - msg["app_start"],
                     "clientapp_reply_s": ev["send_start"] - msg["app_end"],
                     "supernode_upload_s": ev["send_end"] - ev["send_start"],
                     "server_download_s": msg["reply_done"] - max(msg["pull_start"], ev["send_end"])})
    return rows


def measure(root: Path, name: str, state: dict[str, np.ndarray], reps: int, say, site: str = "flower") -> dict:
    """One loopback federation, ``reps`` messages of each form; the per-message phases and their medians."""
    work = root / f"{name}-{site}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    np.savez(work / "state.npz", **state)
    app = write_app(work)
    loop = Loopback(work, site)
    try:
        loop.start()
        mib = sum(v.nbytes for v in state.values()) / 2**20
        say(f"transfer: {name}, {site} site: {len(state)} tensors, {mib:.2f} MiB, "
            f"{reps} messages of each form")
        status = loop.run(app, {"state-path": str(work / "state.npz"), "result-path": str(work / "result.json"),
                                "reps": reps}, timeout=600 + 240 * reps)
        if status["status"] != "finished:completed":
            raise RuntimeError(f"run ended as {status['status']}: {status.get('status-details', '')}")
        messages = json.loads((work / "result.json").read_text())
        events = supernode_events((work / "supernode.log").read_text(errors="replace"))
    finally:
        loop.stop()
    if len(events) != len(messages):
        raise RuntimeError(f"{len(messages)} messages but {len(events)} SuperNode receptions in its log")
    rows = [r for r in analyse(messages, events) if r["rep"] >= 0]
    medians = {form: {k: median([r[k] for r in rows if r["form"] == form]) for k in rows[0] if k.endswith("_s")}
               for form in FORMS}
    return {"model": name, "site": site, "tensors": len(state), "mib": sum(v.nbytes for v in state.values()) / 2**20,
            "reps": reps,
            "messages": rows, "medians": medians}


PHASES = [("message_s", "message s (total − idle)"), ("total_s", "total s"), ("idle_s", "SuperNode idle s"),
          ("server_upload_s", "ServerApp upload s"), ("supernode_download_s", "SuperNode download s"),
          ("clientapp_to_work_s", "ClientApp start to work s"), ("clientapp_work_s", "ClientApp unpack+pack s"),
          ("clientapp_reply_s", "ClientApp reply to SuperNode send s"),
          ("supernode_upload_s", "SuperNode upload s"), ("server_download_s", "ServerApp download s")]


def run(ctx: Context, runs: tuple[str, ...] | None = None, reps: int | None = None, add: bool = False) -> dict:
    """``runs``: ``MODEL/SITE`` pairs (RUN_SIZES x SITE_KINDS); ``add``: keep the runs already in
    ``<out>/transfer.json`` that are not run again."""
    runs = runs or (("quick/flower", "quick/project") if ctx.quick else ("quick/flower", "quick/project",
                                                                          "paper/flower"))
    reps = reps or (3 if ctx.tiny else 8)
    kept = {}
    if add and (ctx.out / "transfer.json").is_file():
        kept = json.loads((ctx.out / "transfer.json").read_text()).get("runs", {})
    found = {**kept}
    document = {}
    for key in runs:  # the results so far are written after each run: a later run's failure loses nothing
        name, site = key.split("/")
        try:
            found[key] = measure(ctx.workdir / "transfer", name, state_dict(RUN_SIZES[name]), reps, ctx.say, site)
        except Exception as exc:  # noqa: BLE001 - the federation did not come up or the run failed: a result
            ctx.say(f"transfer: {key} failed: {type(exc).__name__}: {exc}")
            found[key] = {"model": name, "site": site, "error": f"{type(exc).__name__}: {exc}"[:500]}
        document = _write(ctx, found, runs, kept)
    return document


def _write(ctx: Context, found: dict, runs: tuple[str, ...], kept: dict) -> dict:
    rows = []
    for r in found.values():
        if "error" in r:
            rows.append([r["model"], r["site"], *["—"] * 9, r["error"][:80]])
            continue
        a, b = r["medians"]["per-tensor"], r["medians"]["flat"]
        rows.append([r["model"], r["site"], r["tensors"], r["mib"], r["reps"], a["message_s"], b["message_s"],
                     a["message_s"] - b["message_s"], ratio(a["message_s"], b["message_s"]),
                     a["total_s"], b["total_s"], ""])
    head = ["model", "site", "tensors", "MiB", "messages per form", "per-tensor message s", "flat message s",
            "saved s per message", "per-tensor / flat", "per-tensor total s", "flat total s", "error"]
    sections = [("Median seconds per message, there and back", table(head, rows))]
    for r in found.values():
        if "error" in r:
            continue
        sections.append((f"Where a message's time goes: {r['model']} model, {r['site']} site (medians)",
                         table(["phase", *FORMS], [[label, r["medians"]["per-tensor"][k], r["medians"]["flat"][k]]
                                                   for k, label in PHASES])))
    notes = [("A real `flower-superlink` (plaintext, SQLite state on disk) and one site on loopback; a trivial "
              "ClientApp turns the arrays into torch tensors and sends them back. One message at a time, the two "
              "forms alternating. Sites: " + "; ".join(f"`{k}` = {v}" for k, v in SITE_KINDS.items()) + ". "
              "'message' = total minus the SuperNode's idle wait before it picked the message up after the "
              "ServerApp's upload had finished (its sleep between looks for a message: a polling cost that does not "
              "depend on the form). The SuperNode starts fetching a message's objects as soon as its header is in, "
              "retrying with backoff (1 s, doubling) while the upload goes on; Flower's ClientApp does the same "
              "with the SuperNode, so a slow hop delays the next by more than its own time."),
             ("Since this measurement a deployment sends the model packed (`braintumnet/packing.py`, used by "
              "`server/transport.py` and `braintumnet/site_round.py`); the Simulation Engine passes messages in "
              "memory and keeps one array per tensor.")]
    if kept:
        notes.append(f"Runs {', '.join(k for k in kept if k not in runs)} are kept from an earlier invocation on "
                     "this machine (the load average above is this invocation's).")
    return write_result(ctx, "transfer", "Model transfer: one Array per tensor against one flat array",
                        {"runs": found}, sections, notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="quick/flower,quick/project,paper/flower",
                        help=f"comma-separated MODEL/SITE: models {','.join(RUN_SIZES)} (quick = the test size), "
                             f"sites {','.join(SITE_KINDS)}")
    parser.add_argument("--reps", type=int, default=8, help="messages of each form per run (default 8)")
    parser.add_argument("--add", action="store_true",
                        help="keep the runs already in OUT/transfer.json that are not run again")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    runs = tuple(p.strip() for p in args.runs.split(",") if p.strip())
    wrong = [r for r in runs if r.count("/") != 1 or r.split("/")[0] not in RUN_SIZES
             or r.split("/")[1] not in SITE_KINDS]
    if wrong or args.reps < 1:
        parser.error(f"--runs {','.join(wrong)}: use MODEL/SITE with a model of {','.join(RUN_SIZES)} and a site of "
                     f"{','.join(SITE_KINDS)}; --reps: at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="braintumnet-transfer-"))
    try:
        run(Context(out=args.out.absolute(), workdir=workdir, quick=False), runs, args.reps, args.add)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
