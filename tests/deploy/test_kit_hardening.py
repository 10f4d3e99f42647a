"""deploy/ enforces what deploy/SECURITY.md promises: the hardening of every container and every systemd unit.

Static checks of the files as written (no Docker engine runs here): each container drops every Linux capability, has
a read-only root filesystem and a non-root user; the site executor, which runs the code the centre sends, sits on an
internal network with the SuperNode alone and never sees the node key; the Flower processes have health checks that
call Flower's own health server; every unit is sandboxed with an address allow-list and its own user; the runbook
keeps the CA key off the SuperLink host. Where systemd-analyze exists, it verifies the units and scores their exposure.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_deploy import DEPLOY, REPO, UNITS, env_example, runbook_commands, substitute, unit_exec_start

yaml = pytest.importorskip("yaml")

SITE = DEPLOY / "site" / "compose.yml"
CENTRE = DEPLOY / "centre" / "compose.yml"
FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec")


def compose(path: Path) -> dict:
    return yaml.safe_load(substitute(path.read_text(), env_example(path)))


def services(path: Path):
    return [(f"{path.parent.name}/{name}", svc) for name, svc in compose(path)["services"].items()]


ALL_SERVICES = services(CENTRE) + services(SITE)


def unit(name: str) -> dict[str, list[str]]:
    """A unit's [Service] keys, each with every value it is given (systemd repeats keys; an empty one resets)."""
    keys: dict[str, list[str]] = {}
    section = None
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys[key] = [] if value == "" and key != "CapabilityBoundingSet" else keys.get(key, []) + [value]
    return keys


def tool(svc: dict, base: Path) -> str:
    """The program a service runs: its entrypoint, its Dockerfile's, or the Flower image's."""
    from test_deploy import entrypoint

    if "build" not in svc and "entrypoint" not in svc and not svc["image"].startswith("flwr/"):
        return svc["image"]  # postgres: its own image's entrypoint
    argv = entrypoint(svc, base)
    return " ".join(argv[:3]) if argv[0] == "python" else Path(argv[0]).name


# ---- containers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,svc", ALL_SERVICES, ids=[n for n, _ in ALL_SERVICES])
def test_every_container_is_locked_down(name, svc):
    """No default capabilities, no privilege gain, a read-only root with a tmpfs for scratch, a non-root user."""
    assert svc.get("cap_drop") == ["ALL"] and not svc.get("cap_add"), f"{name}: cap_drop: [ALL], no cap_add"
    assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: no-new-privileges"
    assert not svc.get("privileged"), name
    assert svc.get("read_only") is True, f"{name}: read_only root filesystem"
    assert "/tmp" in [t.split(":")[0] for t in svc.get("tmpfs", [])], f"{name}: a tmpfs for /tmp"
    assert str(svc.get("user", "root")).split(":")[0] not in ("root", "0"), f"{name}: runs as root"


def test_site_executor_shares_an_internal_network_with_the_supernode_only():
    doc = compose(SITE)
    nets, svcs = doc["networks"], doc["services"]
    assert svcs["clientapp"]["networks"] == ["runtime"] and nets["runtime"]["internal"] is True
    assert {n for n, s in svcs.items() if "runtime" in s.get("networks", [])} == {"supernode", "clientapp"}
    assert any(not (nets[n] or {}).get("internal") for n in svcs["supernode"]["networks"]), "the SuperNode's way out"
    assert "ports" not in svcs["supernode"] and "ports" not in svcs["clientapp"], "nothing listens at a hospital"
    centre = compose(CENTRE)
    assert all((centre["networks"][n] or {}).get("internal") for n in centre["services"]["serverapp"]["networks"])


def test_node_key_is_mounted_into_the_supernode_only():
    doc, env = compose(SITE), env_example(SITE)
    key = f"{env['PKI_DIR']}/{env['SITE']}.key"
    for name, svc in doc["services"].items():
        sources = [v.split(":")[0] for v in svc.get("volumes", [])]
        holds_key = any(s == key or key.startswith(s.rstrip("/") + "/") for s in sources)
        assert holds_key == (name == "supernode"), f"{name}: the node key {key} must be in the SuperNode's only"
    flag = next(a for a in doc["services"]["supernode"]["command"] if a.startswith("--auth-supernode-private-key="))
    targets = [v.split(":")[1] for v in doc["services"]["supernode"]["volumes"]]
    assert flag.split("=", 1)[1] in targets


@pytest.mark.parametrize("path", [CENTRE, SITE], ids=["centre", "site"])
def test_superexec_secret_on_both_ends_and_no_secret_on_a_command_line(path):
    """Only a process holding the secret may take the SuperLink's/SuperNode's tasks; it arrives as a file (a compose
    secret). Passwords and secrets reach a container through its environment or a file, never as a command-line
    value, which every process of the host can read."""
    env = env_example(path)
    secret_values = [v for k, v in env.items() if re.search(r"PASSWORD|SECRET|TOKEN", k)]
    doc = compose(path)
    for name, svc in doc["services"].items():
        for arg in [str(a) for a in (svc.get("entrypoint") or []) + (svc.get("command") or [])]:
            assert not any(v and v in arg for v in secret_values), f"{name}: a secret on its command line: {arg}"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", arg), f"{name}: credentials in a URL: {arg}"
    ends = ("superlink", "serverapp") if path == CENTRE else ("supernode", "clientapp")
    for name in ends:
        svc = doc["services"][name]
        flag = [a for a in svc["command"] if a.startswith("--superexec-auth-secret-file=")]
        assert flag == ["--superexec-auth-secret-file=/run/secrets/superexec"], name
        assert svc.get("secrets") == ["superexec"], name
    assert any(a == "--isolation=process" for a in doc["services"][ends[0]]["command"])


def test_site_state_dir_is_a_persistent_volume():
    """The privacy ledger must outlive the container: a named volume at the executor's state folder."""
    doc = compose(SITE)
    app = doc["services"]["clientapp"]
    state = app["environment"]["BRAINTUMNET_STATE"]
    assert f"state:{state}" in app["volumes"] and "state" in doc["volumes"]
    # The ClientApp reads its policy and state-dir from the site config the SuperNode's node config names.
    from flwr.common.config import parse_config_args  # what flower-supernode does with --node-config

    node_config = next(a for a in doc["services"]["supernode"]["command"] if a.startswith("--node-config="))
    config = parse_config_args([node_config.split("=", 1)[1]])["site-config"]
    assert any(v.split(":")[:2] == ["./sites.toml", config] for v in app["volumes"])
    assert tomllib.loads((DEPLOY / "site" / "sites.toml").read_text())["defaults"]["state-dir"] == state
    assert any(v.split(":")[:2] == ["cache", "/cache"] for v in app["volumes"])


@pytest.mark.parametrize("path", [CENTRE, SITE], ids=["centre", "site"])
def test_flower_processes_have_health_checks_on_their_health_server(path):
    checked = 0
    for name, svc in compose(path)["services"].items():
        if tool(svc, path.parent) not in FLOWER_TOOLS:
            continue
        address = [a.split("=", 1)[1] for a in svc["command"] if a.startswith("--health-server-address=")]
        assert address and address[0].startswith("127.0.0.1:"), f"{name}: --health-server-address on loopback"
        assert address[0] in "".join(svc["healthcheck"]["test"]), f"{name}: the healthcheck calls {address[0]}"
        checked += 1
    assert checked == (2 if path == CENTRE else 1)  # SuperLink and ServerApp runtime; the SuperNode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_check_command_asks_flowers_own_health_server():
    """The compose healthcheck, run as Docker runs it, against the health server Flower starts for
    --health-server-address: healthy while it serves, unhealthy (non-zero) when nothing answers."""
    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    test = compose(SITE)["services"]["supernode"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    serving, closed = _free_port(), _free_port()
    server = run_health_server_grpc_no_tls(f"127.0.0.1:{serving}")
    try:
        def run(port):
            argv = [sys.executable] + [a.replace("127.0.0.1:8081", f"127.0.0.1:{port}") for a in test[2:]]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60)

        assert run(serving).returncode == 0, run(serving).stderr
        dead = run(closed)
        assert dead.returncode != 0 and "UNAVAILABLE" in dead.stderr
    finally:
        server.stop(None)


# ---- images -------------------------------------------------------------------------------------------------------


def dockerfile_steps(path: Path):
    """(user, RUN command) for every RUN, tracking USER; Flower's images start as `app`, others as root."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    base = re.findall(r"^FROM (\S+)", text, re.M)[-1]
    user = "app" if "flwr/" in base else "root"
    for line in text.splitlines():
        if line.startswith("USER "):
            user = line.split()[1]
        elif line.startswith("RUN "):
            yield user, line[4:]
    yield user, None  # the user the container runs as


def test_dockerfiles_write_outside_their_users_folders_only_as_root_and_run_non_root():
    """Flower's images run as `app`, which cannot create folders at /: such steps need USER root, then back."""
    for dockerfile, (user, command) in [(d, step) for d in sorted(DEPLOY.glob("*/*Dockerfile"))
                                        for step in dockerfile_steps(d)]:
        if command is None:
            assert user not in ("root", "0"), f"{dockerfile.name}: the container would run as root"
            continue
        for verb, paths in re.findall(r"\b(mkdir|chown|chmod|touch)\s+((?:-\S+\s+|\S+:\S+\s+|\d+\s+)*(?:/\S+\s*)+)",
                                      command):
            for target in re.findall(r"(?<!\S)(/\S+)", paths):
                if not target.startswith(("/app", "/tmp")):
                    assert user == "root", f"{dockerfile.name}: `{verb} {target}` as {user} fails: use USER root"


def test_images_install_the_site_and_centre_extras_only():
    site = (DEPLOY / "site" / "Dockerfile").read_text()
    centre = (DEPLOY / "centre" / "Dockerfile").read_text()
    assert '".[dicom]"' in site and '".[centre]"' in centre
    for text in (site, centre):
        installs = " ".join(re.findall(r"pip install[^\n]*", text))
        assert "simulation" not in installs and "test" not in re.findall(r"\.\[([^\]]*)\]", installs)


# ---- systemd ------------------------------------------------------------------------------------------------------

UNIT_NAMES = [u.name for u in UNITS]
LOOPBACK = {"localhost", "127.0.0.1", "::1", "127.0.0.0/8"}


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_is_sandboxed(name):
    keys = unit(name)
    one = {k: v[-1] for k, v in keys.items() if v}
    for key, value in {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                       "RestrictSUIDSGID": "yes", "LockPersonality": "yes"}.items():
        assert one.get(key) == value, f"{name}: {key}={value}"
    assert keys.get("CapabilityBoundingSet") == [""], f"{name}: CapabilityBoundingSet= (none)"
    families = set(one.get("RestrictAddressFamilies", "").split())
    assert families and families <= {"AF_UNIX", "AF_INET", "AF_INET6"}, name
    assert keys.get("IPAddressDeny") == ["any"], f"{name}: IPAddressDeny=any and an allow-list"
    allowed = " ".join(keys.get("IPAddressAllow", [])).split()
    assert "localhost" in allowed, name
    for path in " ".join(keys.get("ReadWritePaths", [])).split():
        assert path.startswith(("/var/lib/braintumnet", "/var/cache/braintumnet")), f"{name}: writes {path}"


def test_site_units_allow_the_centre_and_loopback_only():
    node = " ".join(unit("braintumnet-site@.service")["IPAddressAllow"]).split()
    outside = [a for a in node if a not in LOOPBACK]
    assert len(outside) == 1 and ipaddress.ip_network(outside[0]).num_addresses == 1, node  # the SuperLink's address
    assert " ".join(unit("braintumnet-site-executor@.service")["IPAddressAllow"]).split() == ["localhost"]
    assert unit("braintumnet-serverapp.service")["IPAddressAllow"] == ["localhost"]


def test_each_role_has_its_own_user():
    users = {name: unit(name)["User"][-1] for name in UNIT_NAMES}
    assert len(set(users.values())) == len(users), users
    assert "root" not in users.values()


def test_node_key_is_a_credential_of_the_supernode_unit_only():
    node, executor = unit("braintumnet-site@.service"), unit("braintumnet-site-executor@.service")
    assert "node-key:/etc/braintumnet/pki/%i.key" in node["LoadCredential"]
    assert "--auth-key %d/node-key" in node["ExecStart"][-1]
    assert not any(".key" in c for c in executor.get("LoadCredential", []))
    hidden = " ".join(executor["InaccessiblePaths"]).split()
    assert {"-/etc/braintumnet/pki", "-/run/credentials/braintumnet-site@%i.service"} <= set(hidden)


def test_secret_files_reach_units_as_credentials():
    """A key or secret in ExecStart is the unit's own credential copy (%d), never a file its user can read on disk,
    and no secret value is on a command line."""
    checked = 0
    for name in UNIT_NAMES:
        argv = unit_exec_start(DEPLOY / "systemd" / name, {"ExecStart": unit(name)["ExecStart"][-1]})
        for flag, value in itertools.pairwise(argv):
            if re.search(r"key|secret", flag) and flag.startswith("--") and "certfile" not in flag:
                assert value.startswith("/run/credentials/"), f"{name}: {flag} {value} is not a credential"
                checked += 1
        assert not any(re.search(r"://[^/@\s]+:[^/@\s]+@", a) for a in argv), name
    assert checked >= 5  # the TLS key, the node key, and the SuperExec secret of each runtime


def test_superexec_authentication_on_both_ends_of_both_runtimes():
    link = unit_exec_start(DEPLOY / "systemd" / "braintumnet-superlink.service",
                           {"ExecStart": unit("braintumnet-superlink.service")["ExecStart"][-1]})
    assert "--isolation" in link and link[link.index("--isolation") + 1] == "process"
    for name in ("braintumnet-superlink.service", "braintumnet-serverapp.service",
                 "braintumnet-site-executor@.service"):
        keys = unit(name)
        assert "--superexec-auth-secret-file %d/superexec" in keys["ExecStart"][-1], name
        assert any(c.startswith("superexec:/etc/braintumnet/secrets/") for c in keys["LoadCredential"]), name
    assert any(c.startswith("superexec:") for c in unit("braintumnet-site@.service")["LoadCredential"])


def _analyze(tmp_path: Path) -> tuple[list[Path], str]:
    """The units as instance yibin, their programs pointed at this environment and checkout, for systemd-analyze."""
    copies = []
    for u in UNITS:
        text = u.read_text().replace("/opt/braintumnet/.venv/bin", str(Path(sys.executable).parent))
        copy = tmp_path / u.name.replace("@.", "@yibin.")
        copy.write_text(text.replace("/opt/braintumnet/", f"{REPO}/"))
        copies.append(copy)
    return copies, shutil.which("systemd-analyze") or ""


def test_systemd_verifies_the_units_and_scores_them_hardened(tmp_path):
    copies, analyze = _analyze(tmp_path)
    if not analyze:
        pytest.skip("systemd-analyze is not installed here (the static checks above still ran)")
    verify = subprocess.run([analyze, "verify", "--man=no", *map(str, copies)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for copy in copies:
        report = subprocess.run([analyze, "security", "--offline=yes", "--threshold=100", str(copy)],
                                capture_output=True, text=True, timeout=60).stdout
        score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", report).group(1))
        assert score <= 2.0, f"{copy.name}: exposure {score} (systemd-analyze security --offline=yes)"


# ---- runbook and threat model ---------------------------------------------------------------------------------------


def test_runbook_keeps_the_ca_key_off_the_superlink_host():
    """The CA is made and kept on an admin machine (a folder in the admin's home; runs/ for the one-machine trial),
    never with sudo on a server; the centre gets ca.crt, superlink.crt and superlink.key, installed root-owned."""
    made = 0
    for line_no, argv in runbook_commands(DEPLOY / "README.md"):
        words = " ".join(argv)
        if "certs" in argv and Path(argv[argv.index("certs") - 1]).name == "braintumnet":
            assert argv[0] != "sudo", f"deploy/README.md:{line_no}: `{words}` makes the CA on a server"
            folder = argv[argv.index("certs") + 1]
            assert "--keys-only" in argv or folder.startswith(("~/", "runs/")), \
                f"deploy/README.md:{line_no}: `{words}` writes the CA key outside the admin machine's folder"
            made += 1
        assert not any(a.endswith("ca.key") for a in argv), f"deploy/README.md:{line_no}: `{words}` copies the CA key"
    assert made >= 2
    text = (DEPLOY / "README.md").read_text()
    for needed, mode in (("ca.crt", "0644"), ("superlink.crt", "0644"), ("superlink.key", "0600")):
        assert re.search(rf"sudo install -m {mode} [^\n]*{re.escape(needed)}", text), f"the runbook installs {needed}"


def test_threat_model_states_what_is_enforced_now():
    security = (DEPLOY / "SECURITY.md").read_text()
    assert "robust aggregation is not configured" not in security
    for needle in ("trimmed mean", "median", "allow-list", "SuperExec", "cap_drop", "read-only", "IPAddressDeny",
                   "node id", "privacy-ledger", "warm"):
        assert needle.lower() in security.lower(), needle
    assert "<!--" not in security, "a placeholder is left in SECURITY.md"
