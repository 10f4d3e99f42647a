"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, one key pair per site.

``braintumnet certs DIR --dns fl.example.org --ip 203.0.113.7 --site yibin --site plagh`` writes::

    DIR/                      0700
      ca.crt  ca.key          the federation's CA (EC P-384, 10 years); ca.key never leaves the centre
      superlink.crt           the SuperLink's certificate (1 year), SANs = --dns/--ip + localhost, 127.0.0.1, ::1
      superlink.key
      sites/NAME/             0700, what the centre sends to hospital NAME (or the site makes its own key)
        ca.crt                a copy of the CA certificate (to verify the SuperLink)
        NAME.key              SuperNode authentication private key: EC P-384, OpenSSH format, unencrypted
        NAME.pub              its public key (OpenSSH), registered with ``flwr supernode register``
      backup-YYYYmmdd-HHMMSS/ whatever a --force, --rotate or a reissue replaced

Keys are 0600, certificates and public keys 0644. The forms are the ones Flower 1.42 loads: the SuperLink takes PEM
files (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``); ``flower-supernode --auth-supernode-private-key`` loads
the key with ``load_ssh_private_key`` and wants an elliptic-curve key; ``flwr supernode register`` loads the public
key with ``load_ssh_public_key`` and wants a NIST curve (``flwr/supernode/cli/flower_supernode.py``,
``flwr/cli/supernode/register.py``).

Running the command again is safe: an existing CA is reused (never overwritten; ``--force`` makes a new one and
moves the old one, and everything it signed, to a backup folder), the SuperLink certificate is kept unless its names
changed or it expires within 30 days (then it is reissued by the same CA, so sites need nothing new), and existing
site keys are kept unless ``--rotate`` is given for them.

The localhost names are always in the SuperLink's certificate: the centre's SuperExec and ServerApps connect
to it on 127.0.0.1 over TLS. Nothing here imports ``flwr``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import shutil
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from braintumnet.errors import BrainTumNetError
from braintumnet.io import atomic_write_bytes

CA_DAYS = 3650
SUPERLINK_DAYS = 365
RENEW_WITHIN_DAYS = 30
LOOPBACK_DNS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
DIR_MODE, KEY_MODE, CERT_MODE = 0o700, 0o600, 0o644


@dataclass
class CertReport:
    """What :func:`make_certs` did, for the command line's summary."""

    folder: Path
    lines: list[str] = field(default_factory=list)
    register: list[str] = field(default_factory=list)
    backup: Path | None = None

    def summary(self) -> str:
        out = [f"certificates and keys in {self.folder}:"] + [f"  {line}" for line in self.lines]
        if self.backup is not None:
            out.append(f"  replaced files were moved to {self.backup}")
        if self.register:
            out += ["", "register each site's public key at the centre (needs a `flwr` connection with this CA):"]
            out += [f"  {cmd}" for cmd in self.register]
        return "\n".join(out)


def _crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


class _Backup:
    """Moves files that are about to be replaced into one ``backup-<time>`` folder, created on first use."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, None

    def move(self, *files: Path) -> None:
        for f in files:
            if not f.exists():
                continue
            if self.path is None:
                self.path = self.folder / f"backup-{_now().strftime('%Y%m%d-%H%M%S')}"
                _mkdir(self.path)
            target = self.path / f.relative_to(self.folder)
            target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            shutil.move(str(f), str(target))


def _pem_key(key) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(folder: Path, force: bool, backup: _Backup, common_name: str, report: CertReport):
    """The CA in ``folder``: reused when both files are there and valid, created when neither is."""
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    crt, key = folder / "ca.crt", folder / "ca.key"
    if crt.exists() or key.exists():
        problem = None
        if not (crt.exists() and key.exists()):
            problem = (f"{crt if crt.exists() else key} exists without "
                       f"{key.name if crt.exists() else crt.name}: this folder holds half a CA")
        else:
            try:
                cert = x509.load_pem_x509_certificate(crt.read_bytes())
                ca_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                problem = f"{crt} / {key}: not a readable PEM CA certificate and unencrypted key ({exc})"
            else:
                if cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
                    problem = f"{key} is not the private key of {crt}"
                elif cert.not_valid_after_utc <= _now():
                    problem = f"the CA {crt} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        if problem is None and not force:
            report.lines.append(f"ca.crt          reused (valid until {cert.not_valid_after_utc:%Y-%m-%d}); "
                                "--force makes a new CA")
            return cert, ca_key, False
        if not force:
            raise BrainTumNetError(f"{problem}. Refusing to overwrite a CA: restore the missing or right file to "
                                   f"reuse it, or pass --force to make a NEW CA (the old files go to a backup "
                                   f"folder in {folder}; every site then needs the new ca.crt)")
        # A new CA invalidates everything the old one signed: move it all aside together.
        backup.move(crt, key, folder / "superlink.crt", folder / "superlink.key",
                    *sorted((folder / "sites").glob("*/ca.crt")))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(ca_key, hashes.SHA384()))
    atomic_write_bytes(key, _pem_key(ca_key), mode=KEY_MODE)
    atomic_write_bytes(crt, _pem_cert(cert), mode=CERT_MODE)
    report.lines.append(f"ca.crt          NEW CA '{common_name}' (valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    return cert, ca_key, True


def _san_set(dns: list[str], ips: list[str]) -> tuple[list[str], list[str]]:
    names = list(dict.fromkeys([*dns, *LOOPBACK_DNS]))
    addresses = []
    for value in [*ips, *LOOPBACK_IPS]:
        try:
            addresses.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise BrainTumNetError(f"--ip {value!r} is not an IP address; give host names with --dns") from None
    for name in names:
        if not name or " " in name or "/" in name or ":" in name:
            raise BrainTumNetError(f"--dns {name!r} is not a host name (no scheme, port or path: fl.example.org)")
    return names, list(dict.fromkeys(addresses))


def certificate_names(cert) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses in a certificate's subjectAltName."""
    x509 = _crypto()[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _superlink_cert(folder: Path, ca_cert, ca_key, dns: list[str], ips: list[str], new_ca: bool,
                    backup: _Backup, report: CertReport) -> None:
    x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _crypto()
    crt, key = folder / "superlink.crt", folder / "superlink.key"
    old = x509.load_pem_x509_certificate(crt.read_bytes()) if crt.exists() and key.exists() else None
    if old is not None and not dns and not ips:  # e.g. adding a site later: keep the names the centre has
        dns, ips = certificate_names(old)
    names, addresses = _san_set(dns, ips)
    if old is not None and not new_ca:
        old_names, old_ips = certificate_names(old)
        same = sorted(old_names) == sorted(names) and sorted(old_ips) == sorted(addresses)
        fresh = old.not_valid_after_utc - _now() > dt.timedelta(days=RENEW_WITHIN_DAYS)
        if same and fresh and old.issuer == ca_cert.subject:
            report.lines.append(f"superlink.crt   kept (valid until {old.not_valid_after_utc:%Y-%m-%d}; "
                                f"names {', '.join(names + addresses)})")
            return
    backup.move(crt, key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    cn = names[0]
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=SUPERLINK_DAYS), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    atomic_write_bytes(key, _pem_key(server_key), mode=KEY_MODE)
    atomic_write_bytes(crt, _pem_cert(cert), mode=CERT_MODE)
    report.lines.append(f"superlink.crt   issued (valid until {cert.not_valid_after_utc:%Y-%m-%d}; "
                        f"names {', '.join(names + addresses)})")
    if names == list(LOOPBACK_DNS) and addresses == list(LOOPBACK_IPS):
        report.lines.append("                (loopback names only: give --dns/--ip for the names the sites use)")


def fingerprint(public_openssh: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it, for comparing a key over the phone."""
    blob = public_openssh.split()[1]
    from base64 import b64decode

    return "SHA256:" + b64encode(hashlib.sha256(b64decode(blob)).digest()).decode().rstrip("=")


def _site_key(folder: Path, site: str, rotate: bool, backup: _Backup, report: CertReport,
              ca_crt: Path | None) -> None:
    _, _, serialization, ec, _, _ = _crypto()
    if not site or not all(c.isalnum() or c in "-_" for c in site):
        raise BrainTumNetError(f"--site {site!r}: use the site's name (letters, digits, - and _), as in "
                               "client/sites.toml")
    home = folder / "sites" / site
    _mkdir(folder / "sites")
    _mkdir(home)
    key, pub = home / f"{site}.key", home / f"{site}.pub"
    if ca_crt is not None:
        atomic_write_bytes(home / "ca.crt", ca_crt.read_bytes(), mode=CERT_MODE)
    if key.exists() and pub.exists() and not rotate:
        report.lines.append(f"sites/{site:<9} key kept ({fingerprint(pub.read_bytes())}); --rotate {site} "
                            "makes a new one")
    else:
        backup.move(key, pub)
        private = ec.generate_private_key(ec.SECP384R1())
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        atomic_write_bytes(key, pem, mode=KEY_MODE)
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
        atomic_write_bytes(pub, public + f" braintumnet-{site}\n".encode(), mode=CERT_MODE)
        report.lines.append(f"sites/{site:<9} NEW key pair ({fingerprint(public)})")
    report.register.append(f"flwr supernode register {pub} CONNECTION --name {site}")


def make_certs(folder: Path, *, dns: list[str] | None = None, ips: list[str] | None = None,
               sites: list[str] | None = None, rotate: list[str] | None = None, keys_only: bool = False,
               force: bool = False, ca_name: str = "BrainTumNet-FL CA") -> CertReport:
    """Create or reuse the CA, (re)issue the SuperLink certificate if needed, and make the sites' key pairs.

    Args:
        folder: where everything goes (created 0700).
        dns: host names the sites use to reach the SuperLink (the localhost names are always added).
        ips: IP addresses the sites use to reach the SuperLink (127.0.0.1 and ::1 are always added).
        sites: site names that need a SuperNode authentication key pair (existing ones are kept).
        rotate: site names whose existing key pair is replaced (the old one moves to a backup folder).
        keys_only: only site key pairs: no CA, no SuperLink certificate (a hospital making its own key).
        force: make a new CA even though one exists (the old CA and everything it signed move to a backup).
        ca_name: the new CA's common name.

    Returns:
        A :class:`CertReport`; its ``summary()`` lists every file and the ``flwr supernode register`` commands.

    Raises:
        BrainTumNetError: half a CA, an unreadable or expired CA without ``--force``, a bad name or address.
    """
    folder = Path(folder).expanduser().absolute()
    sites, rotate = list(dict.fromkeys(sites or [])), list(dict.fromkeys(rotate or []))
    unknown = [s for s in rotate if s not in sites]
    sites += unknown  # --rotate NAME implies --site NAME
    if keys_only and not sites:
        raise BrainTumNetError("--keys-only makes site key pairs only: name them with --site NAME")
    if folder.exists() and not folder.is_dir():
        raise BrainTumNetError(f"{folder}: exists and is not a folder")
    _mkdir(folder)
    report, backup = CertReport(folder), _Backup(folder)
    ca_crt = None
    if not keys_only:
        ca_cert, ca_key, new_ca = _load_ca(folder, force, backup, ca_name, report)
        _superlink_cert(folder, ca_cert, ca_key, dns or [], ips or [], new_ca, backup, report)
        ca_crt = folder / "ca.crt"
    elif dns or ips or force:
        raise BrainTumNetError("--keys-only makes no certificate: drop --dns, --ip and --force")
    for site in sites:
        _site_key(folder, site, site in rotate, backup, report, ca_crt)
    report.backup = backup.path
    return report

