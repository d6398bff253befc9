"""Shared fixtures of the test suite; the helpers they use are in support.py."""

import subprocess

import pytest

import support  # noqa: F401 - puts the repository on sys.path
from support import require_tool


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for "localhost", made with `openssl req`."""
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


TEST_SCRYPT_N, TEST_SCRYPT_P = 2 ** 14, 1  # the suite's password hashes: 40 ms each, not 400


@pytest.fixture(autouse=True, scope="session")
def quick_password_hashes():
    """Hashes made in this process use scrypt N=TEST_SCRYPT_N, p=TEST_SCRYPT_P instead of
    the production parameters (mailbox_store.SCRYPT_N, SCRYPT_P): the suite makes and checks
    many. The format is the same, and roles started as processes keep the production values
    (replacing the suite's hashes at login)."""
    import mailbox_store
    production = mailbox_store.SCRYPT_N, mailbox_store.SCRYPT_P
    mailbox_store.SCRYPT_N, mailbox_store.SCRYPT_P = TEST_SCRYPT_N, TEST_SCRYPT_P
    yield
    mailbox_store.SCRYPT_N, mailbox_store.SCRYPT_P = production


@pytest.fixture(autouse=True, scope="session")
def no_system_resolver(tmp_path_factory):
    """No test asks the system's resolver. In this process, a resolver built without servers
    (one that would read /etc/resolv.conf) reads a resolv.conf naming an address on loopback
    where nothing listens, so a lookup a test forgot to point at its own dnsmasq fails at
    once and never leaves the machine. Tests that start roles as processes pass --dns."""
    import dnsstub
    path = tmp_path_factory.mktemp("resolv") / "resolv.conf"
    path.write_text("nameserver 127.0.0.254\noptions timeout:1 attempts:1\n")
    defaults = dnsstub.Resolver.__init__.__kwdefaults__
    original = defaults["resolv_conf"]
    defaults["resolv_conf"] = str(path)
    yield
    defaults["resolv_conf"] = original
