"""The site executor (client/executor.py): the Flower 1.42 internals it relies on, and its behaviour in a real
federation (the loopback federation of test_loopback.py runs through it; the checks that need one are there).

Helpers here are shared with test_loopback.py and bench/federation.py: a pinned copy of the app (so the FAB hash the
sites allow is the one ``flwr run`` uploads, even while the working tree changes) and a sentinel app whose
ClientApp records that it was imported and always fails.
"""

from __future__ import annotations

import inspect
import io
import json
import zipfile
from pathlib import Path

import pytest

from client.allowlist import AppNotAllowed, check_allowed, fab_hash, read_allowlist
from client.executor import SUPPORTED_FLOWER, flower_version, supported

REPO = Path(__file__).resolve().parents[2]


def pinned_app(dest: Path, app: Path = REPO) -> tuple[Path, str]:
    """The files of the FAB ``flwr run APP`` would upload, written to ``dest``; returns (folder, FAB hash)."""
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fab.read(name))
    return dest, fab_hash(dest)


def submit_app(fed, app: Path, tiny: bool = True, **run_config) -> str:
    """``flwr run APP loop`` (harness.Federation.submit runs the working tree), with the harness's tiny settings
    unless ``tiny`` is false (an app without BrainTumNet's run config)."""
    from harness import TINY

    base = {**TINY, "checkpoint-dir": str(fed.ckpt), "cache-dir": str(fed.cache)} if tiny else {}
    overrides = {**base, **run_config}
    spec = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    out = fed.flwr("run", str(app), "loop", "--run-config", spec)
    assert out.get("success"), out
    return out["run-id"]


def set_allowlists(fed, lists: dict[str, Path]) -> None:
    """Name each site's allow-list in the harness's site config (before the sites start)."""
    text = fed.sites_file.read_text()
    for site, path in lists.items():
        head = f"[site.{site}]\n"
        assert head in text, text
        text = text.replace(head, f'{head}allowed-apps = "{path}"\n', 1)
    fed.sites_file.write_text(text)


SENTINEL_CLIENT = '''"""Marks its import (a file named after the executor that forked it), then always fails."""
import os
from pathlib import Path

from flwr.clientapp import ClientApp

_marks = Path(os.environ["FLWR_HOME"]) / "sentinel-imports"
_marks.mkdir(exist_ok=True)
(_marks / str(os.getppid())).write_text("imported")

app = ClientApp()


@app.train()
def train(msg, context):
    raise RuntimeError("sentinel ClientApp: fails on purpose")
'''

SENTINEL_SERVER = '''"""One train message to every node; writes each node's reply (or error reason) by its name."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    want = int(context.run_config["nodes"])
    deadline = time.monotonic() + 120
    while len(nodes := list(grid.get_nodes())) < want and time.monotonic() < deadline:
        time.sleep(1)
    names = {n.node_id: n.name for n in nodes}
    messages = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
                for n in names]
    replies = grid.send_and_receive(messages, timeout=120)
    out = {names[r.metadata.src_node_id]: (r.error.reason if r.has_error() else "ok") for r in replies}
    Path(context.run_config["out"]).write_text(json.dumps(out))
'''

SENTINEL_PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sentinelapp"
version = "1.0.0"
license = { file = "LICENSE" }
dependencies = ["flwr>=1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "braintumnet-tests"
fab-format-version = 1
flwr-version-target = "1.42.0"

[tool.flwr.app.components]
serverapp = "sentinelapp.server_app:app"
clientapp = "sentinelapp.client_app:app"

[tool.flwr.app.config]
out = ""
nodes = 3
'''


def sentinel_app(dest: Path) -> tuple[Path, str]:
    """A tiny Flower app (no torch): its ClientApp marks its import and fails; returns (folder, FAB hash)."""
    pkg = dest / "sentinelapp"
    pkg.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(SENTINEL_PYPROJECT)
    (dest / "LICENSE").write_text("Apache-2.0 (test fixture)\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "client_app.py").write_text(SENTINEL_CLIENT)
    (pkg / "server_app.py").write_text(SENTINEL_SERVER)
    return dest, fab_hash(dest)


# ---- the Flower internals the executor relies on (fail loudly when Flower changes them) -------------------------


def test_flower_version_is_the_one_the_executor_supports():
    assert supported(flower_version()), (
        f"Flower {flower_version()} is installed; client/executor.py relies on {SUPPORTED_FLOWER}x internals: "
        "re-check each one this module tests, then update SUPPORTED_FLOWER")
    assert not supported("1.43.0") and not supported("1.4.2")


def test_flower_internals_the_executor_uses():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.superexec import run_superexec as loop
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
    from flwr.supernode.runtime import run_clientapp as runtime

    # run_superexec: the executor comes from the module's get_executor; the keywords client/executor.py passes.
    assert callable(loop.get_executor) and "get_executor(" in inspect.getsource(loop.run_superexec)
    params = inspect.signature(loop.run_superexec).parameters
    assert {"runtime_api_address", "insecure", "superexec_auth_secret", "parent_pid",
            "runtime_dependency_install"} <= set(params)
    assert loop._TASK_POLL_INTERVAL_ENV == "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
    body = inspect.getsource(loop.run_superexec)
    for call in ("executor.reconcile()", "executor.get_eligible_capacity(", "plugin.launch_task("):
        assert call in body, call
    assert {f.name for f in ExecutionSpec.__dataclass_fields__.values()} >= {
        "task_type", "runtime_api_address", "token", "insecure", "task_id", "fab_hash"}
    assert LaunchResult.accepted().status == "accepted" and TaskType.CLIENT_APP in set(TaskType)
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name

    # run_clientapp: the FAB is installed through the module's install_from_fab (bytes) before the app is loaded.
    source = inspect.getsource(runtime.run_clientapp)
    assert source.index("install_from_fab(fab.content") < source.index("load_client_app_fn(")
    assert set(inspect.signature(runtime.run_clientapp).parameters) == {
        "runtime_api_address", "token", "insecure", "certificates", "parent_pid", "runtime_dependency_install"}
    # The message's objects are pulled through the module's pull_and_inflate_object_from_tree, whose retry
    # keywords a child shortens.
    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(runtime.pull_task_input)
    assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(
        inspect.signature(runtime.pull_and_inflate_object_from_tree).parameters)
    # The exit-handler registry a forked child clears (the parent's handlers are not its own).
    assert isinstance(exit_handler.registered_exit_handlers, list)


def test_allowlist_file_format(tmp_path):
    good, other = "a" * 64, "b" * 64
    path = tmp_path / "allowed"
    path.write_text(f"# the hospital's apps\n{good}  # braintumnet 0.1\n\n{good.upper()}\n")
    assert read_allowlist(path) == {good}
    check_allowed(good, path)
    check_allowed(other, None)  # no list: every app
    with pytest.raises(AppNotAllowed, match=f"{other}.*{path}"):
        check_allowed(other, path)
    path.write_text(f"{good}\nnot-a-hash\n")
    with pytest.raises(Exception, match=f"{path}:2: 'not-a-hash' is not a SHA-256"):
        read_allowlist(path)


def test_fab_hash_of_a_folder_is_the_hash_of_its_built_fab(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app, digest = sentinel_app(tmp_path / "app")
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(app))
    assert fab_hash(fab) == digest == fab_hash(pinned_app(tmp_path / "pinned", app)[0])


def test_supernode_waits_the_launcher_shortens(monkeypatch):
    """client/supernode.py maps Flower 1.42's literal sleeps in the SuperNode loop: they must still be there."""
    import time

    from flwr.supernode import start_client_internal as internal

    from client.supernode import FLOWER_PULL_S, FLOWER_REPLY_WAIT_S, REPLY_WAIT_S, _ShorterWaits

    source = inspect.getsource(internal)
    assert source.count(f"time.sleep({FLOWER_PULL_S})") == 1  # after an empty look for messages
    assert source.count(f"time.sleep({FLOWER_REPLY_WAIT_S})") == 2  # waiting for the reply and its objects
    assert internal.time is time or isinstance(internal.time, _ShorterWaits)
    assert "obj_contents = pull_objects(" in source  # the message's objects, timed in the SuperNode's log
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    from client.supernode import OBJECT_RETRY, _timed_pull

    assert set(OBJECT_RETRY) <= set(inspect.signature(pull_objects).parameters)
    calls = []
    _timed_pull(lambda ids, **kw: calls.append(kw) or {})(["a"], pull_object_fn=None)
    assert calls == [{"pull_object_fn": None, **OBJECT_RETRY}]  # a missing object asked for again sooner
    assert "            _push_messages(\n" in source  # the reply's send, looked up in the module when called
    assert list(inspect.signature(internal._push_messages).parameters) == ["state", "object_store", "send",
                                                                            "push_object"]
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    waits = _ShorterWaits(1.0)
    waits.sleep(FLOWER_PULL_S), waits.sleep(FLOWER_REPLY_WAIT_S), waits.sleep(2)
    assert slept == [1.0, REPLY_WAIT_S, 2] and waits.monotonic is time.monotonic


def test_supernode_looks_often_right_after_a_reply_and_rarely_when_idle(monkeypatch):
    """After a reply the next message is near: looks every 0.1 s, spacing out to the configured interval."""
    import time

    from client.supernode import FAST_LOOK_S, FLOWER_PULL_S, _noting_replies, _ShorterWaits, look_wait

    assert look_wait(None, 1.0) == 1.0  # nothing answered yet: the configured interval
    assert look_wait(0.2, 1.0) == FAST_LOOK_S
    assert look_wait(4.0, 1.0) == pytest.approx(0.4)
    assert look_wait(60.0, 1.0) == 1.0
    waits = _ShorterWaits(1.0)
    calls = []
    push = _noting_replies(lambda **kw: calls.append(kw), waits)
    push(state=None, object_store=None, send=None, push_object=None)
    assert len(calls) == 1 and waits.last_reply is not None
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    waits.sleep(FLOWER_PULL_S)
    assert slept == [FAST_LOOK_S]
    waits.last_reply -= 100.0
    waits.sleep(FLOWER_PULL_S)
    assert slept[-1] == 1.0


def test_guarded_install_checks_before_installing_and_lets_the_fabs_modules_win(tmp_path, monkeypatch):
    import hashlib
    import sys
    import types

    from client.executor import AppRefused, guarded_install

    fab = b"the FAB's bytes"
    installed = []
    app_dir = tmp_path / "installed"
    (app_dir / "sentinelpkg").mkdir(parents=True)
    (app_dir / "sentinelpkg" / "__init__.py").write_text("")

    def install(content, *args, **kwargs):
        installed.append(content)
        return app_dir

    allowed = tmp_path / "allowed"
    allowed.write_text("0" * 64 + "\n")
    for listing in (allowed, tmp_path / "missing"):  # not listed; the list unreadable: refused, nothing installed
        with pytest.raises(AppRefused, match=hashlib.sha256(fab).hexdigest()) as refused:
            guarded_install(install, listing)(fab, skip_prompt=True)
        assert str(tmp_path) not in str(refused.value) and installed == []
    allowed.write_text(hashlib.sha256(fab).hexdigest() + "\n")
    monkeypatch.setitem(sys.modules, "sentinelpkg", types.ModuleType("sentinelpkg"))  # the parent's copy
    monkeypatch.setitem(sys.modules, "sentinelpkg.sub", types.ModuleType("sentinelpkg.sub"))
    assert guarded_install(install, allowed)(fab, skip_prompt=True) == app_dir and installed == [fab]
    assert "sentinelpkg" not in sys.modules and "sentinelpkg.sub" not in sys.modules  # re-imported from the FAB
