"""Start a hospital's SuperNode: ``python client/run.py --site yibin [--superlink HOST:PORT] [--insecure] ...``.

Steps: read the site's settings (site config file, flags override it), check them (TLS or an explicit ``--insecure``,
certificate and key files, the FAB allow-list, the data folder, the device), reach the SuperLink (retrying with
backoff), check and prepare the site's cache, print a preflight summary, then start the real ``flower-supernode``
(the right ``--node-config``, its own local port, so several sites can share one host) with the site executor
(``client/executor.py``) beside it, and stay as their parent until either stops.

The SuperNode runs with ``--isolation process`` and a SuperExec secret (a new 0600 file per launch unless the site
config names ``superexec-secret``): only the site executor, which holds the secret, can take its ClientApp tasks. The
executor runs each message in a child forked from a warm process instead of a fresh ``flwr-clientapp`` (seconds
instead of tens of seconds per message) and refuses any app whose FAB hash is not on the site's allow-list
(``allowed-apps``, required with TLS; with ``--insecure`` and no list every app runs, with a warning).
``--executor flower`` keeps Flower's own per-message processes (no allow-list there: only with ``--insecure``).

``--check`` stops after the preflight. ``--fab-hash FILE.fab`` (or the app's folder) prints the SHA-256 an admin adds
to the allow-list. A problem prints one line (what, and the fix) and exits non-zero.

Exit codes: 0 ok, 2 a settings or data problem (a file that cannot be read or written included), 3 SuperLink
unreachable or TLS failure, 4 no usable case, 130 interrupted; otherwise the SuperNode's own exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from braintumnet.errors import EXIT_NOTHING_USABLE, EXIT_USER_ERROR, BrainTumNetError  # noqa: E402
from client.allowlist import fab_hash, read_allowlist  # noqa: E402
from client.site_processes import LaunchError, run_site  # noqa: E402
from client.sites import DEFAULT_SITES_FILE, REPO, SiteSettings, site_settings  # noqa: E402

log = logging.getLogger("braintumnet.client")
EXIT_UNREACHABLE = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python client/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", help="the site's name, as in the site config and its dataset.json")
    p.add_argument("--config", type=Path, default=None,
                   help=f"site config file (default: $BRAINTUMNET_SITES or {DEFAULT_SITES_FILE.relative_to(REPO)})")
    p.add_argument("--superlink", help="the centre's SuperLink as HOST:PORT")
    p.add_argument("--data", type=Path, help="the site folder (dataset.json, cases.csv, images)")
    p.add_argument("--cache", type=Path, help="prepared-cache root")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--root-certificates", type=Path, metavar="CA",
                   help="CA certificate (PEM) that signed the SuperLink's certificate: turns TLS on")
    p.add_argument("--auth-key", type=Path, metavar="KEY", help="SuperNode authentication private key (needs TLS)")
    p.add_argument("--insecure", action="store_true", help="connect WITHOUT TLS (trusted test networks only)")
    p.add_argument("--port", type=int, help="this SuperNode's local Runtime API port (default: a free one)")
    p.add_argument("--run-config", default=None,
                   help="run-config overrides that set the data settings to prepare, as in flwr run -c, e.g. "
                   "'data.img-size=32 data.slices-per-case=10'")
    p.add_argument("--connect-retries", type=int, default=5,
                   help="tries to reach the SuperLink, waiting 1, 2, 4, ... s between them (default 5)")
    p.add_argument("--allowed-apps", type=Path, metavar="FILE",
                   help="the FAB allow-list: SHA-256 hashes of the apps this site runs, one per line")
    p.add_argument("--executor", choices=("site", "separate", "flower"), default="site",
                   help="site (default): warm forked ClientApps with the allow-list, started beside the SuperNode; "
                   "separate: the SuperNode alone, for a site executor run by its own service under another user "
                   "(needs superexec-secret in the site config); flower: Flower's own fresh process per message, "
                   "no allow-list (only with --insecure)")
    p.add_argument("--check", action="store_true",
                   help="stop after the preflight (data, cache, connection, allowed apps)")
    p.add_argument("--fab-hash", type=Path, metavar="FAB",
                   help="print the SHA-256 of a .fab file (flwr build writes one), or of the FAB flwr run builds "
                   "from an app folder, for the allow-list; then exit")
    args = p.parse_args(argv)
    if args.site is None and args.fab_hash is None:
        p.error("--site is required (or --fab-hash FAB)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)-8s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.fab_hash is not None:
            print(f"{fab_hash(args.fab_hash)}  {args.fab_hash}")
            return 0
        settings = load_settings(args)
        not_ready = None
        try:
            tls = check_security(args, settings)
        except LaunchError as exc:
            if not args.check:
                raise
            # A preflight shows every finding, not only the first: the data, cache, device and SuperLink are
            # checked too, and the missing security setting is reported beside them (and still fails the check).
            not_ready, tls = exc, f"NOT READY: {exc}"
        try:
            apps = check_apps(args, settings)
        except LaunchError as exc:
            if not args.check:
                raise
            not_ready, apps = not_ready or exc, f"NOT READY: {exc}"
        if not settings.data.is_dir():
            raise LaunchError(f"{settings.data}: no such site folder for site {settings.name}; set data in the site "
                              "config or pass --data DIR (the folder with dataset.json and cases.csv)")
        reach = probe_superlink(settings.superlink, settings.root_certificates,
                                tries=1 if args.check else max(args.connect_retries, 1), fatal=not args.check)
        device = check_device(settings.device)
        report, profile = prepare(settings, args.run_config)
        port = settings.port or free_port()
        print(preflight(settings, report, profile, device, tls, reach, port, apps), flush=True)
        if not_ready is not None:
            raise not_ready  # the preflight above is complete; starting would be refused for this reason
        if args.check:
            return 0  # quarantined cases are listed above and left out; no usable case at all raised already
        return run_site(settings, port, args.executor)
    except BrainTumNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
    except OSError as exc:  # a full disk, a folder without permission: the path and the reason, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; check that the path exists, that this user may read and write "
              "it, and that its disk has free space", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def load_settings(args: argparse.Namespace) -> SiteSettings:
    path = args.config or Path(os.environ.get("BRAINTUMNET_SITES", DEFAULT_SITES_FILE))
    overrides = {"data": args.data, "cache": args.cache, "device": args.device, "superlink": args.superlink,
                 "root-certificates": args.root_certificates, "auth-key": args.auth_key, "port": args.port,
                 "allowed-apps": args.allowed_apps}
    return site_settings(path, args.site, overrides)


def check_security(args: argparse.Namespace, settings: SiteSettings) -> str:
    """TLS unless ``--insecure`` was given explicitly; certificate and key files must be readable and well-formed."""
    ca, key = settings.root_certificates, settings.auth_key
    if args.insecure and ca is not None:
        raise LaunchError(f"--insecure and root-certificates ({ca}) both given: drop --insecure to use TLS, or "
                          "remove root-certificates from the site config for a plaintext test")
    if not args.insecure and ca is None:
        raise LaunchError("refusing to connect without TLS: pass --root-certificates CA.pem (or set "
                          "root-certificates in the site config); for a test on a trusted network only, --insecure")
    if key is not None and ca is None:
        raise LaunchError("SuperNode authentication (--auth-key) needs TLS: add --root-certificates CA.pem")
    if ca is not None:
        if not ca.is_file():
            raise LaunchError(f"{ca}: no such CA certificate; give the CA file the centre sent you (PEM)")
        try:
            ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise LaunchError(f"{ca}: not a readable PEM CA certificate ({exc}); ask the centre for its CA file "
                              "(-----BEGIN CERTIFICATE-----)") from None
    fp = _check_private_key(key) if key is not None else None
    if args.insecure:
        print("\n" + "!" * 78 + "\n!! WARNING: --insecure: this site talks to the SuperLink WITHOUT TLS. Model\n"
              "!! weights and metrics cross the network in plain text and anyone on the path can\n"
              "!! impersonate the centre. Use only for tests on a trusted network.\n" + "!" * 78 + "\n",
              file=sys.stderr, flush=True)
        return "OFF (--insecure)"
    return f"on (CA {ca})" + (f", node authentication with {key} ({fp})" if key else ", no node authentication")


def check_apps(args: argparse.Namespace, settings: SiteSettings) -> str:
    """The FAB allow-list: required with TLS (a production site), optional with ``--insecure`` (every app runs)."""
    path = settings.allowed_apps
    if args.executor == "flower" and not args.insecure:
        raise LaunchError("--executor flower runs every app the centre sends (Flower's own processes check no "
                          "allow-list): use it with --insecure only, or leave it out")
    if path is None:
        if not args.insecure:
            raise LaunchError(f"no allowed-apps file: with TLS this site runs only the apps its admin listed; set "
                              f"allowed-apps = \"FILE\" in [site.{settings.name}] of the site config (or pass "
                              "--allowed-apps FILE), one SHA-256 per line; python client/run.py --fab-hash APP.fab "
                              "prints an app's hash")
        log.warning("no allowed-apps file: EVERY app the SuperLink sends runs at this site (--insecure test mode)")
        return "ANY app (no allowed-apps file; --insecure test mode)"
    if args.executor == "flower":
        return f"NOT CHECKED (--executor flower ignores {path})"
    if args.executor == "separate":
        if settings.superexec_secret is None:
            raise LaunchError(f"--executor separate: the site executor runs as its own service and must share the "
                              f"SuperNode's secret: set superexec-secret = \"FILE\" in [site.{settings.name}] of the "
                              "site config (the file the executor's --superexec-auth-secret-file names)")
        hashes = read_allowlist(path)
        return (f"{path} ({len(hashes)} apps), enforced by the separate site executor: start it with "
                f"--allowed-apps {path}")
    hashes = read_allowlist(path)  # unreadable or malformed: a user error naming the file and line
    if os.access(path, os.W_OK):
        log.warning("%s can be changed by this site's own processes: make it read-only for them (owned by the "
                    "admin, e.g. chmod 644 as root), so an app cannot add itself", path)
    shown = ", ".join(sorted(h[:12] for h in hashes)) or "none: every run will be refused"
    return f"{path} ({len(hashes)} app{'s' if len(hashes) != 1 else ''}: {shown})"


def _check_private_key(key: Path) -> str:
    """The key as ``flower-supernode --auth-supernode-private-key`` loads it (an OpenSSH elliptic-curve key on a NIST
    curve, unencrypted); returns its public key's fingerprint, the one ``braintumnet certs`` printed."""
    if not key.is_file():
        raise LaunchError(f"{key}: no such private key; give the site's key file (deploy/README.md, "
                          "\"Certificates and keys\")")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from braintumnet.certs import fingerprint

    make = ("make one with braintumnet certs DIR --keys-only --site NAME (or ssh-keygen -t ecdsa -b 384 -N \"\" "
            "-f KEY) and have the centre register its .pub")
    data = key.read_bytes()
    try:
        private = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        form = "a PEM key" if data.lstrip().startswith(b"-----BEGIN") and b"OPENSSH" not in data[:60] else "unusable"
        raise LaunchError(f"{key}: {form} ({exc}); Flower 1.42 loads only unencrypted OpenSSH private keys: {make}"
                          ) from None
    curves = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1, ec.SECP224R1, ec.SECP192R1)
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, curves):
        raise LaunchError(f"{key}: not an elliptic-curve key on a NIST curve ({type(private).__name__}), which "
                          f"Flower's node authentication needs: {make}")
    if key.stat().st_mode & 0o077:
        log.warning("%s can be read by other users (mode %o): chmod 600 %s", key, key.stat().st_mode & 0o777, key)
    return fingerprint(private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH))


def check_device(pref: str) -> str:
    from braintumnet.engine import pick_device

    device = pick_device(pref)  # raises BrainTumNetError for cuda without a GPU
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def probe_superlink(address: str, ca: Path | None, *, tries: int, fatal: bool) -> str:
    """Reach ``address``: TCP with retries and backoff, then the TLS handshake (if TLS) and the health endpoint."""
    host, port = split_address(address)
    last = ""
    for attempt in range(tries):
        try:
            with socket.create_connection((host, port), timeout=5):
                break
        except OSError as exc:
            last = exc.strerror or str(exc)
            if attempt + 1 < tries:
                wait = 2 ** attempt
                log.warning("SuperLink %s not reachable (%s); retrying in %d s (%d/%d)", address, last, wait,
                            attempt + 1, tries)
                time.sleep(wait)
    else:
        message = (f"SuperLink {address} is not reachable ({last}) after {tries} tries: check the address and "
                   "port, that the centre's flower-superlink runs, and that a firewall lets this host through")
        if fatal:
            raise LaunchError(message, EXIT_UNREACHABLE)
        return f"NOT reachable ({last})"
    scheme = "https" if ca is not None else "http"
    context = None
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with socket.create_connection((host, port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            raise LaunchError(_certificate_advice(address, ca, exc), EXIT_UNREACHABLE) from None
        except (ssl.SSLError, OSError) as exc:
            raise LaunchError(f"TLS handshake with {address} failed ({getattr(exc, 'reason', None) or exc}): is the "
                              "SuperLink running with TLS (--ssl-certfile ...)? A plaintext SuperLink needs "
                              "--insecure here", EXIT_UNREACHABLE) from None
    try:
        with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=5, context=context) as res:
            ok = res.status == 200
    except urllib.error.HTTPError as exc:
        ok = exc.code < 500  # an HTTP answer at all means a web server speaking our scheme is there
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        hint = (" The SuperLink probably uses TLS: pass --root-certificates CA.pem instead of --insecure."
                if ca is None else "")
        message = f"SuperLink {address} accepted the connection but did not answer over {scheme} ({exc}).{hint}"
        if fatal:
            raise LaunchError(message, EXIT_UNREACHABLE) from None
        return f"NOT usable ({exc})"
    return "reachable" if ok else "reachable (health check answered with an error)"


def _certificate_advice(address: str, ca: Path, exc: ssl.SSLCertVerificationError) -> str:
    reason = (exc.verify_message or str(exc)).lower()
    if "expired" in reason:
        fix = "the SuperLink's certificate has expired: the centre must issue a new one"
    elif "hostname" in reason or "ip address mismatch" in reason:
        fix = (f"the SuperLink's certificate does not name {split_address(address)[0]}: connect with a name it "
               "lists, or the centre must add this name/IP to its certificate's SANs")
    elif "self-signed" in reason or "local issuer" in reason or "unable to get" in reason:
        fix = f"{ca} is not the CA that signed the SuperLink's certificate: ask the centre for the right CA file"
    else:
        fix = "check the CA file and the SuperLink's certificate"
    return f"certificate check for {address} failed ({exc.verify_message or exc}): {fix}"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise LaunchError(f"superlink={address!r}: use HOST:PORT, e.g. fl.example.org:8000 (no https://)")
    return host.strip("[]"), int(port)


def prepare(settings: SiteSettings, run_config_arg: str | None):
    """Check and prepare the site's cache for the data settings of the run config the site expects: the site config's
    ``run-config`` table and ``--run-config`` over the typed defaults (``braintumnet.config.resolve``)."""
    from braintumnet.config import parse_overrides, resolve
    from braintumnet.data.prepare import prepare_site

    run_config = dict(settings.run_config)
    try:
        run_config.update(parse_overrides([run_config_arg]) if run_config_arg else {})
        profile = resolve(run_config)
    except ValueError as exc:
        raise LaunchError(f"run config: {exc}") from None
    report = prepare_site(settings.data, settings.cache, profile.data, progress=sys.stderr.isatty())
    if report.site != settings.name:
        raise LaunchError(f"{settings.data}/dataset.json says site {report.site!r}, but this is site "
                          f"{settings.name!r}: point --data at {settings.name}'s folder")
    if report.exit_code == EXIT_NOTHING_USABLE:
        raise LaunchError(f"site {settings.name}: no usable case in {settings.data} (see the problems above)",
                          EXIT_NOTHING_USABLE)
    return report, profile


def preflight(settings: SiteSettings, report, profile, device: str, tls: str, reach: str, port: int,
              apps: str = "") -> str:
    lines = ["", f"== preflight: site {settings.name} ==", report.summary(),
             f"data settings:  {profile.data.img_size} px, {profile.data.slices_per_case} slices per case, "
             f"task {profile.data.task}",
             f"device:         {device}",
             f"SuperLink:      {settings.superlink} ({reach})",
             f"TLS:            {tls}",
             f"allowed apps:   {apps}",
             f"local port:     127.0.0.1:{port} (this SuperNode's Runtime API)",
             f"node config:    {settings.node_config()}", ""]
    if settings.auth_key is not None:
        lines.insert(-1, "If the SuperNode stops with \"Failed to activate SuperNode\" (exit code 305), the centre has "
                         f"not registered this key: it runs flwr supernode register {settings.name}.pub CONNECTION "
                         f"--name {settings.name}, comparing the fingerprint above.")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
