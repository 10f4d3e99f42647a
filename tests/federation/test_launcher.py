"""The site launcher and the site config format: settings, the SuperNode command, and one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from braintumnet.errors import BrainTumNetError
from client.run import split_address
from client.site_processes import supernode_command
from client.sites import SiteSettings, site_from_context, site_settings

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_then_site_then_flags(tmp_path):
    cfg = write(tmp_path / "sites.toml", """
[defaults]
superlink = "fl.example.org:8000"
cache = "cache"
device = "cpu"
[defaults.run-config]
profile = "quick"
data = { img-size = 64 }
[site.yibin]
data = "data/yibin"
port = 9101
[site.yibin.run-config]
"data.slices-per-case" = 4
""")
    s = site_settings(cfg, "yibin", {"superlink": "127.0.0.1:9999", "device": None})
    assert s.data == tmp_path / "data" / "yibin" and s.cache == tmp_path / "cache"  # relative to the file
    assert (s.superlink, s.device, s.port) == ("127.0.0.1:9999", "cpu", 9101)
    assert s.run_config == {"profile": "quick", "data.img-size": 64, "data.slices-per-case": 4}


def test_unknown_site_names_the_known_ones(tmp_path):
    cfg = write(tmp_path / "sites.toml", '[site.yibin]\ndata = "x"\n[site.plagh]\ndata = "y"\n')
    with pytest.raises(BrainTumNetError, match=r"unknown site 'xiangya': .* describes plagh, yibin"):
        site_settings(cfg, "xiangya")
    with pytest.raises(BrainTumNetError, match=r"unknown key\(s\) \['insecure'\]"):
        site_settings(write(tmp_path / "bad.toml", '[site.yibin]\ndata = "x"\ninsecure = true\n'), "yibin")


@pytest.mark.parametrize("data", ["/data/yibin", "/data/with spaces", '/data/with "quotes"', "C:\\data\\yibin"])
def test_node_config_survives_flowers_parser(data):
    """Flower's --node-config parser (the one flower-supernode uses) gets every value back intact."""
    from flwr.common.config import parse_config_args

    s = SiteSettings(name="yibin", data=Path(data), cache=Path("/c"), device="cuda:1")
    parsed = parse_config_args([s.node_config()])
    assert parsed == {"site-name": "yibin", "data-path": data, "cache-dir": "/c", "device": "cuda:1"}
    assert site_from_context(parsed, {}).data == Path(data)
    with pytest.raises(BrainTumNetError, match="both"):
        SiteSettings(name="x", data=Path("/it's \"odd\""), cache=Path("/c")).node_config()


def test_simulation_maps_partitions_to_sites(tmp_path):
    run_config = {"sites": "yibin, plagh ,jinling", "cache-dir": str(tmp_path), "phantom-scale": 0.02}
    site = site_from_context({"partition-id": 1, "num-partitions": 3}, run_config)
    assert site.name == "plagh" and site.data == tmp_path / "phantom-s0.02-seed0" / "plagh"
    with pytest.raises(BrainTumNetError, match="partition 3 has no site"):
        site_from_context({"partition-id": 3}, run_config)


def test_supernode_command(tmp_path):
    tls = SiteSettings(name="yibin", data=tmp_path, cache=tmp_path, superlink="fl.example.org:8000",
                       root_certificates=Path("/ca.crt"), auth_key=Path("/key"))
    cmd = supernode_command(tls, 9101)
    assert cmd[1:5] == ["--superlink", "fl.example.org:8000", "--root-certificates", "/ca.crt"]
    assert "--auth-supernode-private-key" in cmd and "--insecure" not in cmd
    assert cmd[-4:] == ["--host", "127.0.0.1", "--port", "9101"]
    plain = supernode_command(SiteSettings(name="yibin", data=tmp_path, cache=tmp_path), 9102)
    assert "--insecure" in plain
    # With the site executor: process isolation, the shared secret, Flower's SuperNode through client/supernode.py.
    isolated = supernode_command(tls, 9103, tmp_path / "secret")
    assert isolated[:2] == [sys.executable, str(REPO / "client" / "supernode.py")]
    assert isolated[isolated.index("--isolation") + 1] == "process"
    assert isolated[isolated.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "secret")
    assert split_address("[::1]:8000") == ("::1", 8000)


def launch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "client" / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, code, message", [
    (["--site", "nowhere"], 2, "unknown site 'nowhere'"),
    (["--site", "yibin"], 2, "refusing to connect without TLS"),
    (["--site", "yibin", "--root-certificates", "/etc/hostname"], 2, "not a readable PEM CA certificate"),
    (["--site", "yibin", "--insecure", "--auth-key", "/nonexistent"], 2, "needs TLS"),
    (["--site", "yibin", "--insecure", "--data", "/nonexistent/site"], 2, "no such site folder"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, code, message):
    cfg = write(tmp_path / "sites.toml", f'[defaults]\nsuperlink = "127.0.0.1:{closed_port()}"\n'
                                         f'[site.yibin]\ndata = "{tmp_path}"\n')
    res = launch("--config", str(cfg), *args)
    assert res.returncode == code, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in res.stderr.splitlines() if line.startswith("error:"))]


def test_unreachable_superlink_retries_then_says_so(tmp_path, phantom_root):
    cfg = write(tmp_path / "sites.toml", f'[site.yibin]\ndata = "{phantom_root / "yibin"}"\n')
    res = launch("--config", str(cfg), "--site", "yibin", "--insecure", "--superlink",
                 f"127.0.0.1:{closed_port()}", "--connect-retries", "2")
    assert res.returncode == 3, res.stderr
    assert "retrying in 1 s (1/2)" in res.stderr
    assert "is not reachable (Connection refused) after 2 tries" in res.stderr
    assert "WITHOUT TLS" in res.stderr  # --insecure is loud


def test_check_prints_the_preflight(tmp_path, phantom_root, cache_root):
    cfg = write(tmp_path / "sites.toml", f'[defaults]\ncache = "{cache_root}"\n[defaults.run-config]\n'
                                         f'"data.img-size" = 32\n"data.slices-per-case" = 3\n'
                                         f'[site.plagh]\ndata = "{phantom_root / "plagh"}"\nport = 9177\n')
    res = launch("--config", str(cfg), "--site", "plagh", "--insecure", "--superlink",
                 f"127.0.0.1:{closed_port()}", "--check")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "== preflight: site plagh ==" in out and "glioma" in out and "train" in out and "test" in out
    assert "TLS:            OFF (--insecure)" in out and "NOT reachable" in out
    assert "127.0.0.1:9177" in out and 'site-name="plagh"' in out


def test_check_without_tls_settings_runs_the_whole_preflight_then_fails(tmp_path, phantom_root, cache_root):
    """The README's `python client/run.py --site yibin --check`: every finding is shown, the missing TLS setting
    among them, and the check still fails (exit 2), as starting would."""
    cfg = write(tmp_path / "sites.toml", f'[defaults]\ncache = "{cache_root}"\n[defaults.run-config]\n'
                                         f'"data.img-size" = 32\n"data.slices-per-case" = 3\n'
                                         f'[site.plagh]\ndata = "{phantom_root / "plagh"}"\n')
    res = launch("--config", str(cfg), "--site", "plagh", "--superlink", f"127.0.0.1:{closed_port()}", "--check")
    assert res.returncode == 2, res.stderr
    assert "== preflight: site plagh ==" in res.stdout and "NOT reachable" in res.stdout
    assert "TLS:            NOT READY: refusing to connect without TLS" in res.stdout
    assert "refusing to connect without TLS" in res.stderr and "Traceback" not in res.stderr


def test_allowed_apps_required_with_tls_and_listed_by_check(tmp_path, phantom_root, cache_root):
    """With TLS a site runs only listed apps: no list, no start (the check says so); --check lists the hashes."""
    ca = _certificates(tmp_path)["ca"]
    base = (f'[defaults]\ncache = "{cache_root}"\nroot-certificates = "{ca}"\n[defaults.run-config]\n'
            f'"data.img-size" = 32\n"data.slices-per-case" = 3\n[site.plagh]\ndata = "{phantom_root / "plagh"}"\n')
    cfg = write(tmp_path / "sites.toml", base)
    res = launch("--config", str(cfg), "--site", "plagh", "--superlink", f"127.0.0.1:{closed_port()}", "--check")
    assert res.returncode == 2, res.stderr
    assert "allowed apps:   NOT READY: no allowed-apps file" in res.stdout
    assert "set allowed-apps" in res.stderr and "--fab-hash" in res.stderr and "Traceback" not in res.stderr

    allowed = write(tmp_path / "allowed-apps", f"# our apps\n{'ab' * 32}\n{'cd' * 32}  # v2\n")
    write(cfg, base + 'allowed-apps = "allowed-apps"\n')
    res = launch("--config", str(cfg), "--site", "plagh", "--superlink", f"127.0.0.1:{closed_port()}", "--check")
    assert res.returncode == 0, res.stderr
    assert f"allowed apps:   {allowed} (2 apps: {'ab' * 6}, {'cd' * 6})" in res.stdout
    assert "can be changed by this site's own processes" in res.stderr  # the admin is told to make it read-only

    write(allowed, "abc\n")
    res = launch("--config", str(cfg), "--site", "plagh", "--superlink", f"127.0.0.1:{closed_port()}")
    assert res.returncode == 2 and f"{allowed}:1: 'abc' is not a SHA-256 FAB hash" in res.stderr, res.stderr


def test_a_separate_executor_needs_the_shared_secret_and_an_allow_list(tmp_path, phantom_root, cache_root):
    """On bare metal the executor runs as its own service (deploy/systemd): the launcher then starts the SuperNode
    alone and needs the secret both share, and the executor refuses to start without an allow-list."""
    ca = _certificates(tmp_path)["ca"]
    allowed = write(tmp_path / "allowed-apps", f"{'ab' * 32}\n")
    allowed.chmod(0o444)
    base = (f'[defaults]\ncache = "{cache_root}"\nroot-certificates = "{ca}"\n[defaults.run-config]\n'
            f'"data.img-size" = 32\n"data.slices-per-case" = 3\n[site.plagh]\ndata = "{phantom_root / "plagh"}"\n'
            f'allowed-apps = "{allowed}"\n')
    cfg = write(tmp_path / "sites.toml", base)
    args = ("--config", str(cfg), "--site", "plagh", "--superlink", f"127.0.0.1:{closed_port()}", "--check",
            "--executor", "separate")
    res = launch(*args)
    assert res.returncode == 2 and "set superexec-secret" in res.stderr and "Traceback" not in res.stderr, res.stderr
    secret = write(tmp_path / "superexec.secret", "s" * 64)
    secret.chmod(0o600)
    write(cfg, base + f'superexec-secret = "{secret}"\n')
    res = launch(*args)
    assert res.returncode == 0, res.stderr
    assert "enforced by the separate site executor" in res.stdout

    executor = subprocess.run([sys.executable, str(REPO / "client" / "executor.py"), "--runtime-api-address",
                               f"127.0.0.1:{closed_port()}", "--superexec-auth-secret-file", str(secret)],
                              capture_output=True, text=True, timeout=120)
    assert executor.returncode == 2 and "no --allowed-apps FILE" in executor.stderr, executor.stderr


def test_fab_hash_is_the_hash_the_executor_checks(tmp_path):
    import hashlib

    fab = write(tmp_path / "app.fab", "not really a zip, but a file's hash is its hash")
    res = launch("--fab-hash", str(fab))
    assert res.returncode == 0 and res.stdout.split() == [hashlib.sha256(fab.read_bytes()).hexdigest(), str(fab)]
    res = launch("--fab-hash", str(tmp_path / "missing.fab"))
    assert res.returncode == 2 and "cannot read the FAB" in res.stderr and "Traceback" not in res.stderr


def test_an_unwritable_cache_is_one_line_naming_the_path(tmp_path, phantom_root):
    blocker = write(tmp_path / "a-file", "")
    res = launch("--site", "plagh", "--data", str(phantom_root / "plagh"), "--cache", str(blocker / "cache"),
                 "--insecure", "--superlink", f"127.0.0.1:{closed_port()}", "--check")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"error: {blocker / 'cache'}" in res.stderr and "may read and write it" in res.stderr


# ---- TLS: the launcher's probe names the cause of a certificate problem ------------------------------------------


def _certificates(root: Path) -> dict[str, Path]:
    """A CA, a second CA, and server certificates (valid for localhost; expired) signed by the first CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_pem(path: Path, obj) -> Path:
        data = (obj.public_bytes(serialization.Encoding.PEM) if isinstance(obj, x509.Certificate) else
                obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        path.write_bytes(data)
        return path

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - day).not_valid_after(now + day)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("test CA")
    _, other_cert = ca("another CA")
    out = {"ca": write_pem(root / "ca.pem", ca_cert), "other_ca": write_pem(root / "other.pem", other_cert)}
    for label, start, end in (("good", now - day, now + day), ("expired", now - 3 * day, now - 2 * day)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[f"{label}_cert"] = write_pem(root / f"{label}.pem", cert)
        out[f"{label}_key"] = write_pem(root / f"{label}.key", key)
    return out


@pytest.fixture()
def https_server(tmp_path):
    """Start a tiny HTTPS server answering /health with the given certificate; yields ``start(cert, key) -> port``."""
    import http.server
    import ssl
    import threading

    servers = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    def start(cert: Path, key: Path) -> int:
        server = http.server.HTTPServer(("127.0.0.1", 0), Health)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("case, message", [
    ("ok", None),
    ("wrong CA", "is not the CA that signed the SuperLink's certificate"),
    ("wrong name", "certificate does not name 127.0.0.1"),
    ("expired", "certificate has expired"),
    ("plaintext to TLS", "probably uses TLS: pass --root-certificates"),
])
def test_tls_probe_names_the_problem(tmp_path, https_server, case, message):
    from client.run import LaunchError, probe_superlink

    certs = _certificates(tmp_path)
    served = "expired" if case == "expired" else "good"
    port = https_server(certs[f"{served}_cert"], certs[f"{served}_key"])
    host = "127.0.0.1" if case == "wrong name" else "localhost"
    ca = {"wrong CA": certs["other_ca"], "plaintext to TLS": None}.get(case, certs["ca"])
    if message is None:
        assert probe_superlink(f"{host}:{port}", ca, tries=1, fatal=True) == "reachable"
        return
    with pytest.raises(LaunchError, match=message) as err:
        probe_superlink(f"{host}:{port}", ca, tries=1, fatal=True)
    assert err.value.exit_code == 3


# A stand-in for the SuperNode and the executor: notes each stop signal it gets, and takes ``delay`` seconds to say
# goodbye (a second signal then arrives during its handler, as it would during Flower's deactivation).
_CHILD = """
import os, pathlib, signal, sys, time
log, delay = pathlib.Path(sys.argv[1]), float(sys.argv[2])
def stop(signum, frame):
    with log.open("a") as f:
        f.write(f"{signum}\\n")
    time.sleep(delay)
    sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, stop)
log.with_suffix(".pid").write_text(str(os.getpid()))
log.write_text("")
while True:
    time.sleep(0.05)
"""

# The launcher's run_site with the two stand-ins as its commands.
_LAUNCHER = """
import sys
sys.path.insert(0, sys.argv[1])
from client import site_processes as sp
child = [sys.executable, "-c", sys.argv[2]]
sp.superexec_secret = lambda settings: None
sp.site_executor_usable = lambda settings: True
sp.supernode_command = lambda settings, port, secret=None: [*child, sys.argv[3], "1.0"]
sp.executor_command = lambda settings, port, secret: [*child, sys.argv[4], "0"]
sys.exit(sp.run_site(None, 0, "fork"))
"""


@pytest.mark.parametrize("how", ["operator", "terminal", "launcher killed"])
def test_a_stop_reaches_each_site_process_once(tmp_path, how):
    """systemd (KillMode=mixed) and ``docker stop`` signal the launcher, a terminal's Ctrl-C signals its whole process
    group: either way the SuperNode and the executor get one signal each, from the launcher (a second one would kill
    Flower's SuperNode before it says goodbye to the SuperLink). A launcher killed outright still stops them."""
    import os
    import signal
    import time

    logs = {name: tmp_path / f"{name}.signals" for name in ("supernode", "executor")}
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(REPO), _CHILD, str(logs["supernode"]),
                                 str(logs["executor"])], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all(p.exists() for p in logs.values()):
            assert time.monotonic() < deadline and launcher.poll() is None, "the stand-ins did not start"
            time.sleep(0.05)
        if how == "operator":
            launcher.send_signal(signal.SIGTERM)
        elif how == "terminal":
            os.killpg(launcher.pid, signal.SIGINT)
        else:
            launcher.kill()
        launcher.wait(timeout=30)
        expected = {"operator": signal.SIGTERM, "terminal": signal.SIGINT, "launcher killed": signal.SIGTERM}[how]
        deadline = time.monotonic() + 10
        while any(p.read_text() == "" for p in logs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # long enough for a second signal to arrive during the stand-ins' 1 s goodbye
        assert {name: p.read_text().split() for name, p in logs.items()} == {
            "supernode": [str(int(expected))], "executor": [str(int(expected))]}
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid_file in tmp_path.glob("*.pid"):  # a stand-in the launcher failed to stop
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
