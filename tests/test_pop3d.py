"""pop3d over real sockets on 127.0.0.1: poplib, curl, openssl s_client and raw lines."""

import base64
import gc
import hashlib
import logging
import os
import poplib
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import weakref

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mailbox_store
import plumbing
import pop3d
from support import listening_port, require_tool, wait_for
from support import openssl_starttls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALICE, PASSWORD = "alice@example.com", "alice pw"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 4)     # cheap hashes, same format
    store = mailbox_store.Store(str(tmp_path / "spool"), ["example.com"], hostname="mx.example.com")
    store.add_user(ALICE, PASSWORD)
    store.add_user("bob@example.com", "bob pw")
    return store


@pytest.fixture
def start(store):
    servers = []

    def start(server_class=pop3d.POP3Server, **options):
        options.setdefault("failure_delay", lambda failures: 0)
        # Tests make many failures from 127.0.0.1; tests/test_anvil.py covers the anvil.
        options.setdefault("anvil", plumbing.Anvil(exempt=["127.0.0.1"]))
        options.setdefault("idle_timeout", 10)
        keywords = {key: options.pop(key) for key in list(options) if key not in pop3d.DEFAULTS}
        server = server_class(("127.0.0.1", 0), options, store=store, **keywords)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0.2)


def login(server, user=ALICE, password=PASSWORD):
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client


class Raw:
    """A line-level client for what poplib cannot send."""

    def __init__(self, server):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def line(self):
        return self.file.readline().decode("utf-8", "replace").rstrip("\r\n")

    def send(self, text):
        self.sock.sendall(text.encode() + b"\r\n" if isinstance(text, str) else text)

    def command(self, text):
        self.send(text)
        return self.line()

    def body(self):
        """Read a multi-line body up to "."; return its bytes, un-stuffed, with CRLFs."""
        data = bytearray()
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), line[-50:]
            if line == b".\r\n":
                return bytes(data)
            data += line[1:] if line.startswith(b".") else line

    def close(self):
        self.file.close()
        self.sock.close()


def crlf_reference(data):
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out + b"\r\n" if out and not out.endswith(b"\n") else out


def plain(authzid, authcid, password):
    return base64.b64encode(("%s\0%s\0%s" % (authzid, authcid, password)).encode()).decode()


# --- Greeting, CAPA, states ---

def test_capa_lists_the_extensions_before_and_after_login(start, tls_files):
    server = start(tls_context=plumbing.server_tls_context(*tls_files))
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    assert client.getwelcome().startswith(b"+OK mx.example.com")
    capabilities = client.capa()
    for name in ("TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING", "STLS", "AUTH-RESP-CODE"):
        assert name in capabilities
    assert capabilities["SASL"] == ["PLAIN"]
    assert capabilities["IMPLEMENTATION"] == ["pop3d.py"]
    client.user(ALICE)
    client.pass_(PASSWORD)
    after = client.capa()
    assert "STLS" not in after and "USER" not in after and "UIDL" in after
    client.quit()


def test_stls_is_not_offered_without_tls(start):
    raw = Raw(start())
    raw.send("CAPA")
    assert raw.line() == pop3d.OK_CAPA
    assert b"STLS" not in raw.body()
    assert raw.command("STLS") == pop3d.ERR_STLS


def test_commands_in_the_wrong_state_and_unknown_commands_get_err(start):
    raw = Raw(start())
    assert raw.command("STAT") == pop3d.ERR_WRONG_STATE
    assert raw.command("PASS x") == pop3d.ERR_NEED_USER
    assert raw.command("FROB") == pop3d.ERR_UNKNOWN
    assert raw.command("") == pop3d.ERR_UNKNOWN
    assert raw.command("USER " + ALICE) == pop3d.OK_SEND_PASS
    assert raw.command("pass " + PASSWORD).startswith("+OK logged in")
    assert raw.command("USER x") == pop3d.ERR_WRONG_STATE
    assert raw.command("RETR x") == pop3d.ERR_NO_SUCH_MESSAGE
    assert raw.command("TOP 1") == pop3d.ERR_SYNTAX
    assert raw.command("NOOP") == pop3d.OK
    assert raw.command("x" * 300) == pop3d.ERR_LINE_TOO_LONG
    assert raw.command("NOOP") == pop3d.OK


def test_too_many_bad_commands_close_the_connection(start):
    raw = Raw(start())
    replies = [raw.command("BAD") for _ in range(pop3d.MAX_ERRORS)]
    assert replies[-1] == pop3d.ERR_TOO_MANY_ERRORS
    assert raw.file.read() == b""


# --- Sizes, RETR, TOP ---

MESSAGES = [
    b"Subject: crlf\r\n\r\nbody\r\n",
    b"Subject: lf\n\nbody\n",
    b"Subject: dots\n\n.leading dot\n..two dots\n.\nend\n",
    b"Subject: dots crlf\r\n\r\n.\r\n.x\r\n",
    b"Subject: 8bit\r\n\r\n\xe9t\xe9 \xff\xfe\x80 bytes\r\n",
    b"Subject: no final newline\n\nlast line without newline",
    b"Subject: mixed\r\n\nbare\rcr and lf\n",
]


def test_sizes_are_exactly_the_octets_retr_sends(start, store):
    paths = [store.deliver(ALICE, message, "sender@remote.example") for message in MESSAGES]
    raw = Raw(start())
    raw.command("USER " + ALICE)
    assert raw.command("PASS " + PASSWORD).startswith("+OK logged in, %d messages" % len(MESSAGES))
    raw.send("LIST")
    assert re.fullmatch(r"\+OK 7 messages \(\d+ octets\)", raw.line())
    sizes = [int(line.split()[1]) for line in raw.body().decode().splitlines()]
    assert raw.command("STAT") == "+OK %d %d" % (len(MESSAGES), sum(sizes))
    for number, path in enumerate(paths, 1):
        assert raw.command("RETR %d" % number) == pop3d.OK_RETR % sizes[number - 1]
        sent = raw.body()
        assert sent == crlf_reference(open(path, "rb").read())
        assert len(sent) == sizes[number - 1]
        assert raw.command("LIST %d" % number) == "+OK %d %d" % (number, len(sent))
    raw.command("QUIT")


def test_poplib_retr_and_top(start, store):
    store.deliver(ALICE, b"Subject: top\r\nX-A: 1\r\n\r\none\r\n.two\r\nthree\r\n", "s@x")
    client = login(start())
    response, lines, octets = client.retr(1)
    assert lines[-3:] == [b"one", b".two", b"three"]
    assert octets == int(client.list(1).split()[2])
    response, lines, _ = client.top(1, 1)
    assert lines[-3:] == [b"X-A: 1", b"", b"one"]
    response, lines, _ = client.top(1, 0)
    assert lines[-2:] == [b"X-A: 1", b""]
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.top(2, 0)
    client.quit()


def test_large_message_streams_exactly_with_bounded_server_memory(tmp_path, store):
    body = b"".join(b"%07d .line of a large message, some dots\n" % i for i in range(500_000))
    path = store.deliver(ALICE, b"Subject: big\n\n" + body, "s@x")      # ~20 MB, LF line ends
    expected = crlf_reference(open(path, "rb").read())
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "pop3d.py"), "--spool", store.spool_dir,
                               "--listen", "127.0.0.1:0", "--hostname", "mx.example.com",
                               "--processes", "1"],      # the session's memory is this pid's
                              stderr=subprocess.PIPE, cwd=str(tmp_path),
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        port, _ = listening_port(server, r"listening on 127\.0\.0\.1 port (\d+)")
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user(ALICE)
        client.pass_(PASSWORD)
        # The login's scrypt (16 MiB, freed since) is not the streaming's:
        # reset the peak RSS before RETR (Linux proc(5), clear_refs "5").
        with open("/proc/%d/clear_refs" % server.pid, "w") as clear:
            clear.write("5")
        size = int(client.list(1).split()[2])
        assert size == len(expected) > 20_000_000
        sock, f = client.sock, client.file
        sock.sendall(b"RETR 1\r\n")
        assert f.readline() == b"+OK %d octets\r\n" % size
        digest, received = hashlib.sha256(), 0
        while True:
            line = f.readline()
            if line == b".\r\n":
                break
            line = line[1:] if line.startswith(b".") else line
            digest.update(line)
            received += len(line)
        assert received == size and digest.digest() == hashlib.sha256(expected).digest()
        status = open("/proc/%d/status" % server.pid).read()
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
        assert peak_kib < 60_000, "server peak RSS %d KiB for a 20 MB message" % peak_kib
        client.quit()
    finally:
        server.terminate()
        server.wait(10)


# --- DELE, RSET, QUIT, dropped connections ---

def deliver_three(store):
    return [store.deliver(ALICE, b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n), "s@x") for n in range(3)]


def test_dele_then_rset_restores_and_quit_removes(start, store):
    paths = deliver_three(store)
    client = login(start())
    assert client.dele(2).startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.retr(2)
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.dele(2)
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.list(2)
    assert client.stat()[0] == 2
    assert client.list(3).split()[1] == b"3"          # numbers stay fixed for the session
    assert client.rset().startswith(b"+OK maildrop has 3 messages")
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK mx.example.com POP3 server signing off (2 messages deleted)")
    assert [os.path.exists(p) for p in paths] == [False, True, False]


def test_dropped_connection_deletes_nothing_and_frees_the_lock(start, store):
    paths = deliver_three(store)
    server = start()
    client = login(server)
    client.dele(1)
    client.dele(2)
    client.file.close()
    client.sock.close()                                 # no QUIT: no UPDATE state

    def login_once_unlocked():
        try:
            return login(server)
        except poplib.error_proto as exc:
            assert b"IN-USE" in exc.args[0]
            return None
    again = wait_for(login_once_unlocked, 10, "the dropped session to let the mailbox go")
    assert again.stat()[0] == 3
    again.quit()
    assert all(os.path.exists(p) for p in paths)


def test_a_session_lets_its_mailbox_go_when_it_ends(start, store, monkeypatch):
    """Without waiting for a garbage collection: a large listing is memory given back."""
    deliver_three(store)
    opened = []
    real_open = store.open_mailbox

    def open_mailbox(user):
        mailbox = real_open(user)
        opened.append(weakref.ref(mailbox))
        return mailbox
    monkeypatch.setattr(store, "open_mailbox", open_mailbox)
    server = start()
    gc.disable()
    try:
        client = login(server)
        assert client.stat()[0] == 3
        client.quit()
        wait_for(lambda: opened[0]() is None, 10, "the mailbox to be let go")
    finally:
        gc.enable()


def test_second_login_to_a_mailbox_gets_in_use(start, store):
    server = start()
    first = login(server)
    with pytest.raises(poplib.error_proto, match=re.escape("[IN-USE]")):
        login(server)
    with pytest.raises(poplib.error_proto, match=re.escape("[IN-USE]")):
        login(server, "alice", PASSWORD)                 # the bare local part is the same user
    other = login(server, "bob@example.com", "bob pw")  # another user is not blocked
    other.quit()
    first.quit()
    login(server).quit()


def test_message_removed_behind_the_session_gets_sys_temp(start, store):
    paths = deliver_three(store)
    client = login(start())
    os.unlink(paths[1])
    with pytest.raises(poplib.error_proto, match=re.escape("-ERR [SYS/TEMP]")):
        client.retr(2)
    assert client.retr(3)[1][-1] == b"body 2"
    client.dele(2)
    assert client.quit().startswith(b"+OK")


def test_damaged_maildrop_gets_sys_perm(start, store):
    os.makedirs(os.path.join(store.spool_dir, "mail", "example.com"), exist_ok=True)
    open(os.path.join(store.spool_dir, "mail", "example.com", "bob"), "w").close()
    with pytest.raises(poplib.error_proto, match=re.escape("-ERR [SYS/PERM]")):
        login(start(), "bob@example.com", "bob pw")


def test_autologout_closes_an_idle_session_without_update(start, store):
    paths = deliver_three(store)
    server = start(idle_timeout=0.3)
    raw = Raw(server)
    raw.command("USER " + ALICE)
    raw.command("PASS " + PASSWORD)
    assert raw.command("DELE 1") == pop3d.OK_DELE % 1
    assert raw.line() == pop3d.ERR_AUTOLOGOUT
    assert raw.file.read() == b""
    assert os.path.exists(paths[0])


def test_uidl_is_stable_across_sessions_and_restarts(start, store, tmp_path):
    deliver_three(store)
    client = login(start())
    uids = client.uidl()[1]
    assert client.uidl(2).split()[1:] == uids[1].split()
    client.dele(1)
    assert len(client.uidl()[1]) == 2
    client.quit()
    restarted = mailbox_store.Store(store.spool_dir, ["example.com"], hostname="other")
    server = start()
    server.store = restarted
    again = login(server)
    assert again.uidl()[1] == [b"%d %s" % (n, u.split()[1]) for n, u in enumerate(uids[1:], 1)]
    for line in uids:
        uid = line.split()[1]
        assert 0 < len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid)
    again.quit()


# --- Authentication ---

def test_wrong_password_and_unknown_user_get_the_same_answer(start, caplog):
    server = start()
    caplog.set_level(logging.INFO, logger="pop3d")
    raw = Raw(server)
    raw.command("USER " + ALICE)
    assert raw.command("PASS wrong") == pop3d.ERR_AUTH_FAILED
    raw.command("USER nobody@example.com")
    assert raw.command("PASS wrong") == pop3d.ERR_AUTH_FAILED
    assert raw.command("USER ../../etc/passwd@x") == pop3d.OK_SEND_PASS
    assert raw.command("PASS x") == pop3d.ERR_AUTH_CLOSING
    assert raw.file.read() == b""
    failures = [r.getMessage() for r in caplog.records if "login failed" in r.getMessage()]
    assert len(failures) == 3
    assert failures[0] == ("login failed: client=[127.0.0.1], user='alice@example.com', "
                           "method=USER, failures=1 (bad credentials)")


@pytest.mark.parametrize("n, p", [(2 ** 14, 1), (2 ** 17, 1)])    # what earlier versions made
def test_an_older_hash_is_made_again_with_todays_parameters_at_the_next_pop3_login(
        tmp_path, monkeypatch, n, p):
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", n)
    monkeypatch.setattr(mailbox_store, "SCRYPT_P", p)
    old = mailbox_store.hash_password(PASSWORD)
    spool = tmp_path / "spool"
    spool.mkdir()
    users = spool / "users"
    users.write_text("%s:%s\n" % (ALICE, old))
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 14)     # the production parameters
    monkeypatch.setattr(mailbox_store, "SCRYPT_P", 8)
    store = mailbox_store.Store(str(spool), ["example.com"], hostname="mx.example.com")
    server = pop3d.POP3Server(("127.0.0.1", 0), {"idle_timeout": 10}, store=store,
                              failure_delay=lambda failures: 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(poplib.error_proto):
            login(server, password="wrong")
        assert users.read_text() == "%s:%s\n" % (ALICE, old)     # a wrong password: untouched
        client = login(server)
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        server.stop(grace=0.2)
    address, _, fresh = users.read_text().strip().partition(":")
    assert address == ALICE and fresh.startswith("$scrypt$n=16384,r=8,p=8$")
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    assert mailbox_store.verify_password(PASSWORD, fresh)
    assert not mailbox_store.verify_password("wrong", fresh)


def test_each_failed_login_waits_longer(start):
    assert pop3d.POP3Server.__init__.__kwdefaults__["failure_delay"] is plumbing.auth_failure_delay
    asked = []
    server = start(failure_delay=lambda failures: asked.append(failures) or 0.15 * failures)
    raw = Raw(server)
    times = []
    for _ in range(2):
        raw.command("USER " + ALICE)
        started = time.monotonic()
        raw.command("PASS wrong")
        times.append(time.monotonic() - started)
    assert asked == [1, 2]                     # 0.15 s, then 0.3 s
    assert times[0] >= 0.14 and times[1] >= 0.29, times


def test_auth_plain_with_initial_response_continuation_and_cancel(start):
    raw = Raw(start())
    assert raw.command("AUTH PLAIN") == "+ "
    assert raw.command("*") == pop3d.ERR_AUTH_CANCELLED
    assert raw.command("AUTH PLAIN %%%") == pop3d.ERR_AUTH_MALFORMED
    assert raw.command("AUTH PLAIN " + plain("bob@example.com", ALICE, PASSWORD)) == pop3d.ERR_AUTH_FAILED
    assert raw.command("AUTH CRAM-MD5") == pop3d.ERR_MECHANISM
    assert raw.command("AUTH PLAIN") == "+ "
    assert raw.command(plain("", "alice", PASSWORD)).startswith("+OK logged in")
    raw.close()
    raw = Raw(start())
    assert raw.command("AUTH PLAIN " + plain(ALICE, ALICE, PASSWORD)).startswith("+OK logged in")
    raw.send("AUTH")
    assert raw.line() == pop3d.ERR_WRONG_STATE


def test_plaintext_login_needs_tls_on_a_remote_connection(start, store, tls_files):
    class RemoteHandler(pop3d.POP3Handler):
        is_loopback = False

    class RemoteServer(pop3d.POP3Server):
        handler_class = RemoteHandler

    context = plumbing.server_tls_context(*tls_files)
    raw = Raw(start(RemoteServer, tls_context=context))
    raw.send("CAPA")
    raw.line()
    capabilities = raw.body().decode().split("\r\n")
    assert "STLS" in capabilities and "USER" not in capabilities and "SASL PLAIN" not in capabilities
    assert raw.command("USER " + ALICE) == pop3d.ERR_PLAINTEXT
    assert raw.command("AUTH PLAIN " + plain("", ALICE, PASSWORD)) == pop3d.ERR_PLAINTEXT
    assert raw.command("STLS") == pop3d.OK_STLS
    client_context = ssl.create_default_context(cafile=tls_files[0])
    tls = client_context.wrap_socket(raw.sock, server_hostname="localhost")
    f = tls.makefile("rb")
    tls.sendall(b"USER %s\r\nPASS %s\r\nSTAT\r\n" % (ALICE.encode(), PASSWORD.encode()))
    assert f.readline() == b"+OK send your password\r\n"
    assert f.readline().startswith(b"+OK logged in")
    assert f.readline() == b"+OK 0 0\r\n"
    allowed = login(start(RemoteServer, allow_plaintext_auth=True), "bob@example.com", "bob pw")
    allowed.quit()


def test_stls_with_openssl_s_client(start, store, tls_files):
    openssl = require_tool("openssl")
    store.deliver(ALICE, b"Subject: tls\r\n\r\nhi\r\n", "s@x")
    server = start(tls_context=plumbing.server_tls_context(*tls_files))
    out = openssl_starttls(openssl, server.port, "pop3",
                           b"USER %s\nPASS %s\nSTAT\nRETR 1\nQUIT\n" % (ALICE.encode(), PASSWORD.encode()))
    assert b"+OK logged in, 1 messages" in out
    assert b"Subject: tls\r\n\r\nhi\r\n.\r\n" in out
    assert b"+OK mx.example.com POP3 server signing off" in out


def test_plaintext_pipelined_behind_stls_is_discarded(start, tls_files):
    server = start(tls_context=plumbing.server_tls_context(*tls_files))
    raw = Raw(server)
    raw.send(b"STLS\r\nUSER injected@example.com\r\n")
    assert raw.line() == pop3d.OK_STLS
    context = ssl.create_default_context(cafile=tls_files[0])
    tls = context.wrap_socket(raw.sock, server_hostname="localhost")
    tls.sendall(b"PASS " + PASSWORD.encode() + b"\r\n")
    assert tls.makefile("rb").readline() == (pop3d.ERR_NEED_USER + "\r\n").encode()


def test_implicit_tls_listener(start, store, tls_files):
    store.deliver(ALICE, b"Subject: pop3s\r\n\r\nhi\r\n", "s@x")
    server = start(tls_context=plumbing.server_tls_context(*tls_files), implicit_tls=True)
    context = ssl.create_default_context(cafile=tls_files[0])
    client = poplib.POP3_SSL("localhost", server.port, context=context, timeout=10)
    client.user(ALICE)
    client.pass_(PASSWORD)
    assert client.retr(1)[1][-1] == b"hi"
    assert "STLS" not in client.capa()
    client.quit()


# --- curl ---

def test_curl_lists_retrieves_and_deletes(start, store):
    curl = require_tool("curl")
    paths = deliver_three(store)
    contents = [open(p, "rb").read() for p in paths]
    server = start()
    base = "pop3://127.0.0.1:%d/" % server.port
    auth = ["--user", "%s:%s" % (ALICE, PASSWORD), "--max-time", "20", "-sS"]
    listing = subprocess.run([curl] + auth + [base], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split("\r\n")[:3] == [
        "%d %d" % (n, os.path.getsize(p)) for n, p in enumerate(paths, 1)]
    message = subprocess.run([curl] + auth + [base + "2"], capture_output=True, timeout=30)
    assert message.stdout == contents[1]        # as stored: CRLF line ends
    sasl = subprocess.run([curl] + auth + ["--sasl-ir", base + "1"],          # AUTH PLAIN <initial>
                          capture_output=True, timeout=30)
    assert sasl.stdout == contents[0]
    uidl = subprocess.run([curl] + auth + ["-X", "UIDL", base], capture_output=True, timeout=30)
    assert len(uidl.stdout.splitlines()) == 3
    delete = subprocess.run([curl] + auth + ["-X", "DELE", "-I", base + "3"],
                            capture_output=True, timeout=30)
    assert delete.returncode == 0, delete.stderr
    maildir = store.maildir_path(ALICE)
    left = sorted(os.listdir(os.path.join(maildir, "new")) + os.listdir(os.path.join(maildir, "cur")))
    assert [name.split(":")[0] for name in left] == sorted(os.path.basename(p) for p in paths[:2])
    wrong = subprocess.run([curl, "--user", ALICE + ":bad", "-sS", base], capture_output=True, timeout=30)
    assert wrong.returncode != 0


# --- Limits and concurrency ---

def test_connection_cap_sends_sys_temp(start):
    server = start(max_connections=1)
    first = Raw(server)
    assert first.greeting.startswith("+OK")
    second = Raw(server)
    assert second.greeting == pop3d.BUSY == "-ERR [SYS/TEMP] too many connections"


def test_many_users_download_at_once(start, store):
    users = ["user%d@example.com" % n for n in range(8)]
    for user in users:
        store.add_user(user, "pw")
        store.deliver(user, b"Subject: x\n\n" + b"line\n" * 20000, "s@x")
    server = start()
    results = []

    def download(user):
        client = login(server, user, "pw")
        results.append(client.retr(1)[2])
        client.quit()
    threads = [threading.Thread(target=download, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [results[0]] * 8 and len(results) == 8


def test_stuffing_is_right_across_block_boundaries():
    blocks = [b"a\r\n", b".b\r", b"\n.c", b"\r\n", b"..", b"\r\n"]
    assert b"".join(pop3d.stuff_blocks(blocks)) == b"a\r\n..b\r\n..c\r\n...\r\n"
    assert b"".join(pop3d.stuff_blocks([b".x\r\n"])) == b"..x\r\n"


# --- Random command lines ---

VERBS = ["USER", "PASS", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA",
         "AUTH", "STLS", "APOP", "list", "Retr", "XYZZY", "", "QUIT"]
MULTILINE = [re.escape(pop3d.OK_CAPA), re.escape(pop3d.OK_UIDL_ALL), re.escape(pop3d.OK_TOP),
             re.escape(pop3d.OK_MECHANISMS), r"\+OK \d+ messages \(\d+ octets\)", r"\+OK \d+ octets"]
CLOSING = (pop3d.ERR_TOO_MANY_ERRORS, pop3d.ERR_AUTH_CLOSING, "+OK mx.example.com POP3 server signing off")

argument = st.one_of(st.just(""), st.integers(-2, 6).map(str), st.sampled_from(["PLAIN", "*", "=", ALICE]),
                     st.text(st.characters(blacklist_characters="\r\n"), max_size=30),
                     st.integers(1, 4).map(lambda n: "1 " * n))
command = st.one_of(
    st.tuples(st.sampled_from(VERBS), argument).map(lambda va: ("%s %s" % va).encode("utf-8", "surrogatepass")),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.just(b"A" * 300))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logged_in=st.booleans(), lines=st.lists(command, max_size=12))
def test_random_command_lines_always_get_ok_or_err(start_once, logged_in, lines):
    server, store = start_once
    if store.mailbox_usage(ALICE)[0] < 2:
        store.deliver(ALICE, b"Subject: again\n\n.dot\nline\n", "s@x")
    raw = Raw(server)
    assert raw.greeting.startswith("+OK")
    if logged_in:
        raw.command("USER " + ALICE)
        assert raw.command("PASS " + PASSWORD).startswith("+OK logged in")
    last = None
    for line in lines:
        raw.send(line + b"\r\n")
        reply = raw.line()
        if reply == "+ ":
            reply = raw.command("*")
        if not reply:
            assert last is not None and last.startswith(CLOSING), (line, last)
            break
        assert reply.startswith(("+OK", "-ERR")), (line, reply)
        if any(re.fullmatch(pattern, reply) for pattern in MULTILINE):
            raw.body()
        last = reply
    else:
        raw.send("QUIT")
    raw.file.read()          # the session has ended and released the maildrop at EOF
    raw.close()

@pytest.fixture
def start_once(start, store):
    for n in range(3):
        store.deliver(ALICE, b"Subject: %d\n\n.dot\nline\n" % n, "s@x")
    return start(), store
