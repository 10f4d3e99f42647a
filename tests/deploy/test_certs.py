"""``braintumnet certs``: a CA reused and never silently replaced, safe permissions, the SANs asked for, and keys in
the forms Flower 1.42's own loaders accept."""

from __future__ import annotations

import argparse
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from braintumnet.certs import make_certs
from braintumnet.errors import BrainTumNetError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture()
def pki(tmp_path):
    folder = tmp_path / "pki"
    make_certs(folder, dns=["fl.example.org"], ips=["203.0.113.7"], sites=["yibin", "plagh"])
    return folder


def test_files_and_permissions(pki):
    assert mode(pki) == 0o700 and mode(pki / "sites") == 0o700 and mode(pki / "sites" / "yibin") == 0o700
    for key in ("ca.key", "superlink.key", "sites/yibin/yibin.key", "sites/plagh/plagh.key"):
        assert mode(pki / key) == 0o600, key
    for public in ("ca.crt", "superlink.crt", "sites/yibin/yibin.pub", "sites/yibin/ca.crt"):
        assert mode(pki / public) == 0o644, public
    assert (pki / "sites" / "yibin" / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
    assert not list(pki.rglob(".*.tmp"))


def test_superlink_certificate_names_and_chain(pki):
    from cryptography import x509

    from braintumnet.certs import certificate_names

    server = cert(pki / "superlink.crt")
    dns, ips = certificate_names(server)
    assert set(dns) == {"fl.example.org", "localhost"}  # localhost: the SuperLink's own SuperExec connects there
    assert set(ips) == {"203.0.113.7", "127.0.0.1", "::1"}
    assert server.issuer == cert(pki / "ca.crt").subject
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Python's own verifier accepts the chain for every name and address in it (what client/run.py's probe does).
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    assert context.cert_store_stats()["x509_ca"] == 1


def test_an_existing_ca_is_reused_and_never_silently_replaced(pki):
    ca_before = (pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes()
    server_before = (pki / "superlink.crt").read_bytes()
    key_before = (pki / "sites" / "yibin" / "yibin.key").read_bytes()
    report = make_certs(pki, sites=["yibin", "jinling"])  # a site added later; no names given
    assert ((pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes()) == ca_before
    assert (pki / "superlink.crt").read_bytes() == server_before  # names kept, still valid: not reissued
    assert (pki / "sites" / "yibin" / "yibin.key").read_bytes() == key_before
    assert (pki / "sites" / "jinling" / "jinling.key").is_file()
    assert "reused" in report.summary() and report.backup is None
    assert "flwr supernode register" in report.summary() and "--name jinling" in report.summary()

    # New names: the SuperLink certificate is reissued by the same CA; the old one is kept in a backup folder.
    report = make_certs(pki, dns=["fl.example.org", "fl2.example.org"])
    assert (pki / "ca.crt").read_bytes() == ca_before[0]
    assert (report.backup / "superlink.crt").read_bytes() == server_before
    assert mode(report.backup) == 0o700 and mode(report.backup / "superlink.key") == 0o600

    # Half a CA is refused, naming the fix; --force makes a new one and keeps the old one.
    (pki / "ca.key").unlink()
    with pytest.raises(BrainTumNetError, match=r"exists without ca.key.*Refusing to overwrite a CA.*--force"):
        make_certs(pki)
    report = make_certs(pki, force=True)
    assert (pki / "ca.crt").read_bytes() != ca_before[0]
    assert (report.backup / "ca.crt").read_bytes() == ca_before[0]
    assert cert(pki / "superlink.crt").issuer == cert(pki / "ca.crt").subject
    make_certs(pki, sites=["yibin"])  # the site's folder gets the new ca.crt
    assert (pki / "sites" / "yibin" / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()


def test_rotate_replaces_one_site_key(pki):
    old = (pki / "sites" / "plagh" / "plagh.pub").read_bytes()
    yibin = (pki / "sites" / "yibin" / "yibin.pub").read_bytes()
    report = make_certs(pki, rotate=["plagh"])
    assert (pki / "sites" / "plagh" / "plagh.pub").read_bytes() != old
    assert (report.backup / "sites" / "plagh" / "plagh.pub").read_bytes() == old
    assert (pki / "sites" / "yibin" / "yibin.pub").read_bytes() == yibin


def test_keys_load_with_flowers_own_loaders(pki):
    """The SuperNode's key loader, ``flwr supernode register``'s public-key loader, and the SuperLink's TLS files."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.common.args import try_obtain_server_certificates
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    site = pki / "sites" / "yibin"
    private, public = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(site / "yibin.key"), auth_supernode_public_key=None))
    assert isinstance(private.curve, ec.SECP384R1)
    assert try_load_public_key(site / "yibin.pub") == public_key_to_bytes(public)  # the key the SuperLink matches
    files = try_obtain_server_certificates(argparse.Namespace(
        ssl_ca_certfile=str(pki / "ca.crt"), ssl_certfile=str(pki / "superlink.crt"),
        ssl_keyfile=str(pki / "superlink.key")))
    assert files is not None and all(b"-----BEGIN" in f for f in files)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # what uvicorn does with --ssl-certfile/--ssl-keyfile
    server.load_cert_chain(pki / "superlink.crt", pki / "superlink.key")


def test_launcher_accepts_the_key_and_refuses_a_pem_one(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from client.run import LaunchError, _check_private_key

    assert _check_private_key(pki / "sites" / "yibin" / "yibin.key").startswith("SHA256:")
    pem = tmp_path / "pem.key"
    pem.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(LaunchError, match="a PEM key .*only unencrypted OpenSSH private keys.*--keys-only"):
        _check_private_key(pem)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(BrainTumNetError, match="not an IP address"):
        make_certs(tmp_path / "a", ips=["fl.example.org"])
    with pytest.raises(BrainTumNetError, match="not a host name"):
        make_certs(tmp_path / "b", dns=["https://fl.example.org"])
    with pytest.raises(BrainTumNetError, match="site's name"):
        make_certs(tmp_path / "c", sites=["../etc"])
    report = make_certs(tmp_path / "d", sites=["yibin"], keys_only=True)  # at a hospital: its key only
    assert not (tmp_path / "d" / "ca.crt").exists() and (tmp_path / "d" / "sites" / "yibin" / "yibin.key").is_file()
    assert "register" in report.summary()


def test_command_line(tmp_path):
    run = [sys.executable, "-m", "braintumnet.cli", "certs", str(tmp_path / "pki"), "--dns", "fl.example.org",
           "--site", "yibin"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "NEW CA" in first.stdout and "fl.example.org" in first.stdout and "SHA256:" in first.stdout
    second = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "reused" in second.stdout and "kept" in second.stdout
    (tmp_path / "pki" / "ca.crt").unlink()
    third = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert third.returncode == 2 and third.stderr.startswith("error: ") and "Traceback" not in third.stderr
