"""Shared fixtures and helpers for the test suite.

Interop tests use real outside tools (curl, swaks, openssl, dnsmasq, dig). Outside CI a
missing tool skips its test with the Debian package to install; with MAIL_REQUIRE_TOOLS=1
(set by .ci/run) a missing tool fails the test instead.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def require_tool(name, package=None):
    """Return the path of NAME; skip (fail under MAIL_REQUIRE_TOOLS=1) when it is missing."""
    path = shutil.which(name) or next(
        (p for p in ("/usr/sbin/" + name, "/sbin/" + name) if os.access(p, os.X_OK)), None)
    if path:
        return path
    message = "%s not installed (apt-get install %s)" % (name, package or name)
    if os.environ.get("MAIL_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def wait_for(predicate, seconds=5.0):
    """Poll predicate until it is true or seconds pass; return its last value."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def listening_port(process, pattern, seconds=20.0):
    """(port, log lines so far) of a daemon started with stderr=PIPE: its log is read line by
    line until pattern (a regex whose group 1 is the port) matches; fails the test if not."""
    lines = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stderr.readline().decode()
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            return int(found.group(1)), lines
        if not line and process.poll() is not None:
            break
    pytest.fail("no %r in the log:\n%s" % (pattern, "".join(lines)))


def openssl_starttls(openssl, port, protocol, lines):
    """Run `openssl s_client -starttls PROTOCOL` and type lines once the handshake is done."""
    client = subprocess.Popen(
        [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-starttls", protocol,
         "-crlf", "-quiet", "-nocommands", "-verify_quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)    # s_client reads stdin at once; typing early races its STARTTLS dialogue
    stdout, _ = client.communicate(lines, timeout=20)
    return stdout


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


TEST_SCRYPT_N = 2 ** 14                # the suite's password hashes: 40 ms each, not 400


@pytest.fixture(autouse=True, scope="session")
def quick_password_hashes():
    """Hashes made in this process use scrypt N=TEST_SCRYPT_N instead of the production
    2^17 (mailbox_store.SCRYPT_N): the suite makes and checks many. The format is the same,
    and roles started as processes keep the production value (upgrading on login)."""
    import mailbox_store
    production = mailbox_store.SCRYPT_N
    mailbox_store.SCRYPT_N = TEST_SCRYPT_N
    yield
    mailbox_store.SCRYPT_N = production


@pytest.fixture(autouse=True, scope="session")
def no_system_resolver(tmp_path_factory):
    """No test asks the system's resolver. In this process, a resolver built without servers
    (one that would read /etc/resolv.conf) reads a resolv.conf naming an address on loopback
    where nothing listens, so a lookup a test forgot to point at its own dnsmasq fails at
    once and never leaves the machine. Tests that start roles as processes pass --dns."""
    import dnsmx
    path = tmp_path_factory.mktemp("resolv") / "resolv.conf"
    path.write_text("nameserver 127.0.0.254\noptions timeout:1 attempts:1\n")
    defaults = dnsmx.Resolver.__init__.__kwdefaults__
    original = defaults["resolv_conf"]
    defaults["resolv_conf"] = str(path)
    yield
    defaults["resolv_conf"] = original
