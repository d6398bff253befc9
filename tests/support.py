"""Helpers the tests share: the repository root, outside tools, waiting, daemons' logs.

Interop tests use real outside tools (curl, swaks, openssl, dnsmasq, dig). Outside CI a
missing tool skips its test with the Debian package to install; with MAIL_REQUIRE_TOOLS=1
(set by .ci/run) a missing tool fails the test instead. Fixtures live in conftest.py.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Seconds a busy machine (two cores, other work beside the suite) may add to a wait timed by
# the wall clock. A test that a timeout or a penalty ends in time bounds it by the configured
# seconds plus SLACK, set up so that the wrong behaviour would take far longer. How fast
# something is gets measured by bench/, never by a timed test.
SLACK = 3.0


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


def wait_for(predicate, timeout=10.0, what="", interval=0.02):
    """Poll predicate until it returns something true, and return that; after timeout
    seconds fail the test, saying what was awaited."""
    until = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError("timed out after %.0f s waiting for %s"
                                 % (timeout, what or getattr(predicate, "__name__", "a condition")))
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    """A port free on host now. Only for run_all, whose listeners are given before it starts
    (and may race another process for the port); a daemon started alone listens on port 0
    and its port is read back with listening_port()."""
    return free_ports(1, host)[0]


def free_ports(count, host="127.0.0.1"):
    """count different ports free on host now (each socket held until all are chosen, so
    that the kernel cannot hand out one port twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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


def children_of(pid):
    """The pids of the live processes whose parent is pid (a role's worker processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue                   # ended meanwhile
        if int(parent) == pid and state != "Z":
            found.append(int(entry))
    return sorted(found)


def openssl_starttls(openssl, port, protocol, lines):
    """Run `openssl s_client -starttls PROTOCOL` and type lines once the handshake is done
    (typing earlier races its STARTTLS dialogue): -brief says when, and is quiet otherwise."""
    client = subprocess.Popen(
        [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-starttls", protocol,
         "-crlf", "-brief", "-ign_eof", "-nocommands", "-verify_quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(20, client.kill)       # a handshake that never ends
    watchdog.start()
    said = []
    try:
        for line in iter(client.stderr.readline, b""):
            said.append(line)
            if line.startswith(b"CONNECTION ESTABLISHED"):
                break
    finally:
        watchdog.cancel()
    if not said or not said[-1].startswith(b"CONNECTION ESTABLISHED"):
        client.kill()
        client.wait(20)
        pytest.fail("openssl s_client made no TLS connection:\n%s"
                    % b"".join(said).decode(errors="replace"))
    stdout, _ = client.communicate(lines, timeout=20)
    return stdout


def spool_template(tmp_path_factory, domain, hostname, users, aliases=None):
    """A spool holding users ({address: password}) and aliases ({name: [targets]}), made
    once per test session (each password costs a hash): copy it with spool_copy(), never
    change it."""
    import mailbox_store
    spool = tmp_path_factory.mktemp("template-spool")
    store = mailbox_store.Store(str(spool), [domain], hostname)
    for address, password in users.items():
        store.add_user(address, password)
    for name, targets in (aliases or {}).items():
        store.add_alias(name, targets)
    return spool


def spool_copy(template, tmp_path):
    """A test's own copy of a spool_template() at tmp_path/spool."""
    path = tmp_path / "spool"
    shutil.copytree(str(template), str(path))
    return path
