"""The shared server plumbing, over real sockets on 127.0.0.1 with ephemeral ports."""

import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import plumbing
from support import ROOT, SLACK, openssl_starttls, require_tool, wait_for


class EchoHandler(plumbing.ConnectionHandler):
    """A tiny line protocol that reports what the plumbing saw of each line."""

    timeout_reply = "-ERR idle"
    stopping_reply = "-ERR shutting down"
    crash_reply = "-ERR internal"
    endings = {b"\r\n": "CRLF", b"\n": "LF", b"\r": "CR", b"": "EOF"}

    def session(self):
        self.write("+OK ready")
        while True:
            line = self.reader.readline(self.server.line_limit)
            if line is None:
                return
            if line.too_long:
                self.write("-ERR too long")
                continue
            verb, _, arg = line.data.partition(b" ")
            if verb == b"STLS":
                self.start_tls("+OK begin TLS")
            elif verb == b"AUTH":
                try:
                    _, user, _ = plumbing.decode_plain(arg)
                    self.write("+OK " + user)
                except plumbing.SASLError as exc:
                    self.write("-ERR %s" % exc)
            elif verb == b"BEGIN":
                self.reader.interruptible = False
                self.write("+OK in transaction")
            elif verb == b"END":
                self.reader.interruptible = True
                self.write("+OK done")
            elif verb == b"BIG":
                self.write(b"y" * int(arg))
            elif verb == b"THREAD":
                self.write("+OK %d" % threading.get_ident())
            elif verb == b"QUIT":
                self.write("+OK bye")
                return
            else:
                self.write(b"LINE " + self.endings[line.ending].encode() + b" " + line.data)


class EchoServer(plumbing.ThreadedServer):
    busy_reply = "-ERR [SYS/TEMP] busy"
    line_limit = 64


@pytest.fixture
def start_server():
    servers = []

    def start(address=("127.0.0.1", 0), **options):
        server = EchoServer(address, EchoHandler, **options)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0.2)


def connect(server, source="127.0.0.1"):
    sock = socket.create_connection(server.server_address[:2], timeout=5,
                                    source_address=(source, 0))
    return sock, sock.makefile("rb")




def test_greeting_and_crlf_line(start_server):
    sock, f = connect(start_server())
    assert f.readline() == b"+OK ready\r\n"
    sock.sendall(b"hello\r\n")
    assert f.readline() == b"LINE CRLF hello\r\n"


def test_reader_reports_crlf_bare_lf_and_bare_cr(start_server):
    sock, f = connect(start_server())
    f.readline()
    sock.sendall(b"a\r\nb\nc\rd\r\n")
    assert [f.readline() for _ in range(4)] == [
        b"LINE CRLF a\r\n", b"LINE LF b\r\n", b"LINE CR c\r\n", b"LINE CRLF d\r\n"]


def test_cr_split_across_packets_is_still_crlf(start_server):
    sock, f = connect(start_server())
    f.readline()
    sock.sendall(b"abc\r")
    time.sleep(0.1)            # two packets: what is tested (on a busy machine they may meet)
    sock.sendall(b"\nxyz\r\n")
    assert f.readline() == b"LINE CRLF abc\r\n"
    assert f.readline() == b"LINE CRLF xyz\r\n"


def test_overlong_line_is_refused_and_the_session_goes_on(start_server):
    sock, f = connect(start_server())
    f.readline()
    sock.sendall(b"x" * 100_000 + b"\r\nafter\r\n")
    assert f.readline() == b"-ERR too long\r\n"
    assert f.readline() == b"LINE CRLF after\r\n"


def test_line_at_the_limit_passes(start_server):
    sock, f = connect(start_server())
    f.readline()
    sock.sendall(b"y" * 64 + b"\r\n" + b"z" * 65 + b"\r\n")
    assert f.readline() == b"LINE CRLF " + b"y" * 64 + b"\r\n"
    assert f.readline() == b"-ERR too long\r\n"


def test_reader_reads_in_blocks_not_bytes():
    left, right = socket.socketpair()
    try:
        left.sendall(b"one\r\ntwo\r\nthree\r\n")
        reader = plumbing.LineReader(right, idle_timeout=2)
        assert reader.readline(100).data == b"one"
        assert bytes(reader.buffer) == b"two\r\nthree\r\n"
    finally:
        left.close()
        right.close()


def test_partial_line_at_eof_is_returned_without_ending():
    left, right = socket.socketpair()
    left.sendall(b"tail")
    left.close()
    reader = plumbing.LineReader(right, idle_timeout=2)
    assert reader.readline(100) == plumbing.Line(b"tail", b"")
    assert reader.readline(100) is None
    right.close()


HIGH_FD = 1500                         # above select()'s FD_SETSIZE of 1024


@pytest.fixture
def high_socketpair():
    """A socketpair whose reading end is descriptor HIGH_FD (RLIMIT_NOFILE raised if need be)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= HIGH_FD:
        if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
            pytest.skip("RLIMIT_NOFILE hard limit %d is too low" % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH_FD + 1, hard))
    left, right = socket.socketpair()
    with pytest.raises(OSError):
        os.fstat(HIGH_FD)                  # free, so that the test owns it
    os.dup2(right.fileno(), HIGH_FD)
    right.close()
    high = socket.socket(fileno=HIGH_FD)
    yield left, high
    left.close()
    high.close()
    if soft <= HIGH_FD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_reader_waits_on_a_descriptor_above_1023(high_socketpair):
    left, high = high_socketpair
    high.settimeout(0.0)                   # as ConnectionHandler.setup() leaves it
    reader = plumbing.LineReader(high, idle_timeout=5)
    sender = threading.Timer(0.2, left.sendall, args=(b"HELO high\r\n",))
    sender.start()
    try:
        assert reader.readline(100) == plumbing.Line(b"HELO high", b"\r\n")
    finally:
        sender.join()
    left.sendall(b"tail")
    left.shutdown(socket.SHUT_WR)
    assert reader.readline(100) == plumbing.Line(b"tail", b"")
    assert reader.readline(100) is None


def test_wait_readable_on_a_descriptor_above_1023(high_socketpair):
    left, high = high_socketpair
    assert plumbing.wait_readable(high, 0.05) is False
    left.sendall(b"x")
    assert plumbing.wait_readable(high, 5) is True


def test_connection_cap_sends_busy_reply(start_server):
    server = start_server(max_connections=2)
    first, f1 = connect(server)
    second, f2 = connect(server)
    assert f1.readline().startswith(b"+OK")
    assert f2.readline().startswith(b"+OK")
    third, f3 = connect(server)
    assert f3.readline() == b"-ERR [SYS/TEMP] busy\r\n"
    assert f3.read() == b""


def test_per_address_cap_counts_each_client_address(start_server):
    server = start_server(max_connections=10, max_per_address=1)
    first, f1 = connect(server, "127.0.0.1")
    assert f1.readline().startswith(b"+OK")
    second, f2 = connect(server, "127.0.0.1")
    assert f2.readline() == b"-ERR [SYS/TEMP] busy\r\n"
    other, f3 = connect(server, "127.0.0.2")
    assert f3.readline().startswith(b"+OK")


def test_idle_timeout_closes_and_frees_the_slot(start_server):
    server = start_server(max_connections=1, idle_timeout=0.3)
    sock, f = connect(server)
    assert f.readline().startswith(b"+OK")
    assert f.readline() == b"-ERR idle\r\n"
    assert f.read() == b""
    assert wait_for(lambda: server.active_connections() == 0)
    again, f2 = connect(server)
    assert f2.readline().startswith(b"+OK")


def test_session_deadline_ends_a_busy_client(start_server):
    server = start_server(idle_timeout=5, session_timeout=0.5)
    sock, f = connect(server)
    f.readline()
    with pytest.raises(OSError):
        for _ in range(100):
            sock.sendall(b"x" * 10)    # never a whole line, but never idle either:
            time.sleep(0.02)           # the pace of a busy client is what is tested
    assert f.readline() == b"-ERR idle\r\n"


def session_thread(server):
    """One whole session: the id of the thread that served it."""
    sock, f = connect(server)
    f.readline()
    sock.sendall(b"THREAD\r\nQUIT\r\n")
    ident = f.readline().split()[1]
    assert f.readline() == b"+OK bye\r\n"
    f.close()
    sock.close()
    return ident


def test_sessions_run_on_long_lived_worker_threads(start_server):
    server = start_server()
    threads = set()
    for _ in range(10):
        threads.add(session_thread(server))
        assert wait_for(lambda: server.idle_workers == 1)
    assert len(threads) == 1 and server.workers == 1


def test_each_open_session_has_its_own_worker_up_to_the_cap(start_server):
    server = start_server(max_connections=6)
    clients = [connect(server) for _ in range(6)]
    for sock, f in clients:            # every greeting comes at once: none waits for a worker
        assert f.readline() == b"+OK ready\r\n"
    assert server.workers == 6
    seventh, f7 = connect(server)
    assert f7.readline() == b"-ERR [SYS/TEMP] busy\r\n"
    for sock, f in clients:
        sock.sendall(b"QUIT\r\n")
        assert f.readline() == b"+OK bye\r\n"
    assert wait_for(lambda: server.idle_workers == 6)
    assert session_thread(server) and server.workers == 6


def test_idle_workers_end_after_their_lifetime(start_server, monkeypatch):
    monkeypatch.setattr(plumbing, "WORKER_IDLE_LIFETIME", 0.2)
    server = start_server()
    clients = [connect(server) for _ in range(3)]
    for sock, f in clients:
        f.readline()
        f.close()
        sock.close()
    assert wait_for(lambda: server.workers == 0 and server.idle_workers == 0)
    assert session_thread(server)      # a new connection starts a new worker
    assert wait_for(lambda: server.workers == 0)


def test_stop_ends_every_worker_thread(start_server):
    server = start_server()
    clients = [connect(server) for _ in range(4)]
    for sock, f in clients:
        f.readline()
    assert server.workers == 4
    server.stop(grace=1)
    assert wait_for(lambda: server.workers == 0)


def test_a_reply_larger_than_the_socket_buffer_waits_for_a_slow_reader(start_server):
    server = start_server()
    sock, f = connect(server)
    f.readline()
    size = 16 * 1024 * 1024
    sock.sendall(b"BIG %d\r\nTHREAD\r\n" % size)
    time.sleep(0.5)                    # a slow reader, what is tested: the server's first
                                       # send() fills the buffers, and it must wait
    assert f.read(size + 2) == b"y" * size + b"\r\n"
    assert f.readline().startswith(b"+OK ")
    assert server.active_connections() == 1


def test_ipv6_listener(start_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = start_server(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    sock = socket.create_connection(("::1", server.port), timeout=5)
    assert sock.makefile("rb").readline() == b"+OK ready\r\n"


def test_parse_hostport_forms():
    assert plumbing.parse_hostport("[::1]:2525", 25) == ("::1", 2525)
    assert plumbing.parse_hostport("[::1]", 25) == ("::1", 25)
    assert plumbing.parse_hostport("127.0.0.1:2525", 25) == ("127.0.0.1", 2525)
    assert plumbing.parse_hostport("mx.example.org", 25) == ("mx.example.org", 25)
    for bad in ("", ":25", "host:port", "host:99999"):
        with pytest.raises(ValueError):
            plumbing.parse_hostport(bad, 25)


# --- TLS ---

def client_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context




def test_starttls_with_openssl_s_client(start_server, tls_files):
    openssl = require_tool("openssl")
    server = start_server(tls_context=plumbing.server_tls_context(*tls_files))
    stdout = openssl_starttls(openssl, server.port, "pop3", b"after tls\nQUIT\n")
    assert b"LINE CRLF after tls" in stdout
    assert b"+OK bye" in stdout


def test_plaintext_pipelined_behind_starttls_is_discarded(start_server, tls_files):
    server = start_server(tls_context=plumbing.server_tls_context(*tls_files))
    raw, f = connect(server)
    assert f.readline() == b"+OK ready\r\n"
    raw.sendall(b"STLS\r\nINJECTED\r\n")
    assert f.readline() == b"+OK begin TLS\r\n"
    tls = client_context().wrap_socket(raw)
    tls.sendall(b"clean\r\n")
    tf = tls.makefile("rb")
    assert tf.readline() == b"LINE CRLF clean\r\n"


def test_implicit_tls_listener(start_server, tls_files):
    server = start_server(tls_context=plumbing.server_tls_context(*tls_files), implicit_tls=True)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    tls = client_context().wrap_socket(raw)
    f = tls.makefile("rb")
    assert f.readline() == b"+OK ready\r\n"
    assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_context_refuses_tls_1_1(tls_files):
    context = plumbing.server_tls_context(*tls_files)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION


# --- SASL ---

def b64(data):
    import base64
    return base64.b64encode(data).decode()


def test_decode_plain_accepts_a_valid_response():
    assert plumbing.decode_plain(b64(b"\0alice@example.com\0secret")) == (
        "", "alice@example.com", "secret")
    assert plumbing.decode_plain(b64(b"admin\0alice\0pw")) == ("admin", "alice", "pw")


@pytest.mark.parametrize("response", [
    "not base64!", "YWJj=", "YW Jj", b64(b"alice\0secret"), b64(b"\0\0"),
    b64(b"\0alice\0"), b64(b"a\0b\0c\0d"), b64(b"\0\xff\xfe\0pw"), "QQ" * 7000,
])
def test_decode_plain_refuses_bad_responses(response):
    with pytest.raises(plumbing.SASLError):
        plumbing.decode_plain(response)


def test_bad_sasl_over_the_wire_is_an_error_reply(start_server):
    sock, f = connect(start_server())
    f.readline()
    sock.sendall(b"AUTH %%%%\r\nAUTH " + b64(b"\0bob\0pw").encode() + b"\r\n")
    assert f.readline().startswith(b"-ERR invalid base64")
    assert f.readline() == b"+OK bob\r\n"


def test_empty_sasl_response():
    assert plumbing.decode_base64("=") == b""


# --- Graceful shutdown ---

def test_shutdown_tells_an_idle_session_and_closes_it(start_server):
    server = start_server()
    sock, f = connect(server)
    f.readline()
    started = time.monotonic()
    server.stop(grace=10)
    assert f.readline() == b"-ERR shutting down\r\n"
    assert f.read() == b""
    assert time.monotonic() - started < SLACK          # at once, not at the end of the grace
    with pytest.raises(OSError):
        socket.create_connection(server.server_address, timeout=1)


def test_shutdown_lets_a_transaction_finish_within_the_grace(start_server):
    server = start_server()
    sock, f = connect(server)
    f.readline()
    sock.sendall(b"BEGIN\r\n")
    assert f.readline() == b"+OK in transaction\r\n"
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 10})
    stopper.start()
    wait_for(server.stopping.is_set, 10, "the server to begin stopping")
    time.sleep(1.0)                    # the transaction goes on into the grace: what is tested
    sock.sendall(b"END\r\n")
    assert f.readline() == b"+OK done\r\n"
    assert f.readline() == b"-ERR shutting down\r\n"
    stopper.join(10)
    assert not stopper.is_alive()


def test_shutdown_cuts_sessions_left_after_the_grace(start_server):
    server = start_server()
    sock, f = connect(server)
    f.readline()
    sock.sendall(b"BEGIN\r\n")
    f.readline()
    started = time.monotonic()
    server.stop(grace=0.5)
    assert 0.5 <= time.monotonic() - started < 0.5 + SLACK
    assert f.read() == b""


# --- Configuration, logging, queue ids ---

DEFAULTS = {"spool": "./mailspool", "domain": ["localhost"], "max_size": 1024,
            "idle_timeout": 300.0, "syslog": False}


def parse(argv):
    import argparse
    parser = plumbing.add_options(argparse.ArgumentParser(), DEFAULTS)
    return parser.parse_args(argv)


def test_config_defaults_then_ini_then_flags(tmp_path):
    ini = tmp_path / "mail.ini"
    ini.write_text("[DEFAULT]\nspool = /srv/spool\nmax_size = 2048\nunknown = 1\n"
                   "[smtp_in]\nmax_size = 4096\ndomain = a.example, b.example\nsyslog = yes\n")
    config = plumbing.load_config("smtp_in", DEFAULTS, parse(["--config", str(ini)]))
    assert config == {"spool": "/srv/spool", "domain": ["a.example", "b.example"],
                      "max_size": 4096, "idle_timeout": 300.0, "syslog": True}
    config = plumbing.load_config("pop3d", DEFAULTS, parse(
        ["--config", str(ini), "--max-size", "10", "--domain", "c.example", "--domain", "d.example"]))
    assert config["max_size"] == 10 and config["spool"] == "/srv/spool"
    assert config["domain"] == ["c.example", "d.example"]


def test_config_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="max_size"):
        plumbing.load_config("smtp_in", DEFAULTS, parse(["--max-size", "big"]))
    with pytest.raises(ValueError, match="cannot read config"):
        plumbing.load_config("smtp_in", DEFAULTS, parse(["--config", str(tmp_path / "missing.ini")]))
    bad = tmp_path / "bad.ini"
    bad.write_text("no section here\n")
    with pytest.raises(ValueError, match="cannot read config"):
        plumbing.load_config("smtp_in", DEFAULTS, parse(["--config", str(bad)]))


def test_queue_ids_are_unique_and_sorted_by_time():
    ids = [plumbing.new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 18 and i.isalnum() for i in ids)


def test_log_lines_carry_role_and_pid(capfd):
    import logging
    import os
    log = plumbing.setup_logging("smtp_in")
    log.info("%s: client=[%s]", "4F2A9C1E", "192.0.2.1")
    err = capfd.readouterr().err
    assert "smtp_in[%d]: 4F2A9C1E: client=[192.0.2.1]" % os.getpid() in err
    logging.getLogger().handlers.clear()


def test_log_lines_from_many_threads_at_once_each_arrive_whole(capfd):
    import logging
    log = plumbing.setup_logging("mta")
    line = "x" * 300

    def writer(n):
        for i in range(200):
            log.info("T%d-%d %s end", n, i, line)
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    logging.getLogger().handlers.clear()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1600
    assert all(re.match(r"\S+ mta\[", text) and text.endswith(line + " end") for text in lines)
    assert len({text.split()[2] for text in lines}) == 1600


def test_auth_failure_delay_grows():
    delays = [plumbing.auth_failure_delay(n) for n in range(5)]
    assert delays[0] == 0 and delays == sorted(delays) and len(set(delays)) == 5


@pytest.mark.parametrize("ip, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("0:0:0:0:0:0:0:1", True),
    ("::ffff:127.0.0.1", True), ("::ffff:127.1.2.3", True), ("::1%lo", True),
    ("192.0.2.1", False), ("::ffff:192.0.2.1", False), ("128.0.0.1", False),
    ("localhost", False), ("", False), ("127.0.0.1.example", False),
])
def test_is_loopback_knows_the_whole_loopback_net_and_mapped_addresses(ip, loopback):
    assert plumbing.is_loopback(ip) is loopback


def test_log_config_writes_one_key_a_line_in_the_ini_shape(caplog):
    config = {"spool": "/var/spool/mail", "domain": ["a.example", "b.example"],
              "submission": True, "verbose": False, "max_size": 1000, "relay_network": []}
    with caplog.at_level(logging.INFO, logger="test_role"):
        plumbing.log_config(logging.getLogger("test_role"), config)
    assert caplog.messages == [
        "config: domain=a.example, b.example", "config: max_size=1000",
        "config: relay_network=", "config: spool=/var/spool/mail", "config: submission=yes",
        "config: verbose=no"]


class FailingClient(plumbing.ClientConnection):
    def failure(self, kind, detail):
        return RuntimeError(kind, detail)


def test_client_connection_bounds_each_step_and_fails_one_way(start_server, tls_files):
    server = start_server(tls_context=plumbing.server_tls_context(*tls_files))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    client = FailingClient()
    client.open_socket("127.0.0.1", server.port, 5)
    assert client.address == "127.0.0.1" and client.read_line(64, 5, "greeting") == b"+OK ready"
    client.send_bytes(b"STLS\r\n", 5, "sending STLS")
    assert client.read_line(64, 5, "asking STLS") == b"+OK begin TLS"
    client.handshake(context, "localhost", 5)
    assert client.tls_active
    client.send_bytes(b"a line longer than twenty octets\r\n", 5, "sending")
    with pytest.raises(RuntimeError) as caught:
        client.read_line(20, 5, "reading the echo")
    assert caught.value.args == ("garbage", "reading the echo") and client.sock is None
    with pytest.raises(RuntimeError, match="lost"):
        client.send_bytes(b"QUIT\r\n", 5, "sending QUIT")

    client.open_socket("127.0.0.1", server.port, 5)
    assert not client.tls_active and client.read_block(5, "greeting") == b"+OK ready\r\n"
    with pytest.raises(RuntimeError) as caught:
        client.read_line(64, 0.2, "waiting")                 # the server has nothing to say
    assert caught.value.args == ("timeout", "waiting")

    client.open_socket("127.0.0.1", server.port, 5)
    client.send_bytes(b"QUIT\r\n", 5, "sending QUIT")
    assert client.read_line(64, 5, "greeting") == b"+OK ready"
    assert client.read_line(64, 5, "quitting") == b"+OK bye"
    with pytest.raises(RuntimeError) as caught:
        client.read_line(64, 5, "after QUIT")               # the server closed
    assert caught.value.args == ("lost", "after QUIT")

    client.open_socket("127.0.0.1", server.port, 5)
    client.send_bytes(b"STLS\r\nNOOP\r\n", 5, "sending STLS")
    wait_for(lambda: b"begin TLS" in client.sock.recv(256, socket.MSG_PEEK), 10,
             "the greeting and the STLS reply, to be read in one go")
    assert client.read_line(64, 5, "greeting") == b"+OK ready"
    with pytest.raises(RuntimeError) as caught:
        client.handshake(context, "localhost", 5)           # "+OK begin TLS" is still unread
    assert caught.value.args == ("tls", "server sent data before the TLS handshake")

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(RuntimeError, match="connect"):
        client.open_socket("127.0.0.1", port, 5)


def log_once(tmp_path, env, *setup_args):
    """stderr of a process that logs one line, written to a file (so that its device and
    inode can stand for systemd's journal stream)."""
    path = tmp_path / "stderr.txt"
    path.write_bytes(b"")
    st = os.stat(path)
    environment = {k: v.replace("DEV:INO", "%d:%d" % (st.st_dev, st.st_ino)) for k, v in env.items()}
    code = ("import plumbing; log = plumbing.setup_logging('mta', %s); log.info('hello')"
            % ", ".join(setup_args or ("False",)))
    with open(path, "ab") as f:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, stderr=f, timeout=30,
                       env=dict(os.environ, **environment), check=True)
    return path.read_text()


def test_stderr_lines_carry_a_timestamp_unless_the_journal_stamps_them(tmp_path):
    stamped = log_once(tmp_path, {"JOURNAL_STREAM": "1:1"})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} mta\[\d+\]: hello\n",
                        stamped), stamped
    journal = log_once(tmp_path, {"JOURNAL_STREAM": "DEV:INO"})
    assert re.fullmatch(r"mta\[\d+\]: hello\n", journal), journal


def test_syslog_without_dev_log_says_so(tmp_path):
    if os.path.exists("/dev/log"):
        pytest.skip("this host has /dev/log")
    text = log_once(tmp_path, {}, "True")
    assert "syslog: there is no /dev/log on this host; logging to stderr only" in text
    assert text.rstrip().endswith("mta[%s]: hello" % text.split("mta[")[1].split("]")[0])


def test_the_lock_free_log_handler_writes_what_a_stream_handler_writes(tmp_path):
    import logging
    formatter = logging.Formatter("mta[%(process)d]: %(message)s")
    records = [logging.LogRecord("mta", logging.INFO, __file__, 1, message, args, None)
               for message, args in (("%s: to=<%s>, status=sent", ("Q1", "a@b.test")),
                                     ("caf\u00e9 \udcff %r", ("x",)), ("plain", None))]
    fast_path, plain_path = tmp_path / "fast.log", tmp_path / "plain.log"
    with open(fast_path, "ab") as fast_file, open(plain_path, "a", encoding="utf-8",
                                                  errors="backslashreplace") as plain_file:
        fast = plumbing._LineHandler(fast_file.fileno())
        plain = logging.StreamHandler(plain_file)
        for handler in (fast, plain):
            handler.setFormatter(formatter)
            for record in records:
                handler.handle(record)
        plain.flush()
    assert fast_path.read_bytes() == plain_path.read_bytes()
    assert fast_path.read_bytes().count(b"\n") == 3


class PlainEchoServer(EchoServer):
    worker_pool = False


@pytest.mark.parametrize("server_class", [EchoServer, PlainEchoServer], ids=["pool", "plain"])
def test_the_worker_pool_serves_sessions_as_a_thread_per_connection_does(server_class):
    server = server_class(("127.0.0.1", 0), EchoHandler, max_connections=4)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen = []
        for round_ in range(2):                      # a second round reuses pooled workers
            clients = [connect(server) for _ in range(4)]
            for sock, f in clients:                  # all four at once: one thread each
                assert f.readline() == b"+OK ready\r\n"
                sock.sendall(b"THREAD\r\nx %d\r\n" % round_)
            for sock, f in clients:
                seen.append(f.readline())
                assert f.readline() == b"LINE CRLF x %d\r\n" % round_
            assert len(set(seen[-4:])) == 4
            sock5, f5 = connect(server)              # a fifth is over the cap either way
            assert f5.readline() == b"-ERR [SYS/TEMP] busy\r\n"
            sock5.close()
            for sock, f in clients:
                sock.sendall(b"QUIT\r\n")
                assert f.readline() == b"+OK bye\r\n"
                sock.close()
            wait_for(lambda: server.active_connections() == 0, 5, "the sessions to end")
    finally:
        server.stop(grace=0.2)


def as_worker(slots, number):
    slots.number = number
    return slots


def test_a_worker_lets_a_less_busy_one_accept_first_but_never_a_dead_one():
    # Each worker writes its own counters (tests/test_processes.py checks, through /proc,
    # that forked workers see each other's and share a burst of connections evenly).
    slots = plumbing.WorkerSlots(3, 200)
    for number, sessions in ((0, 3), (1, 4), (2, 5)):
        for n in range(sessions):
            assert as_worker(slots, number).connect("l", "10.0.0.%d" % n, 100, 100)
    as_worker(slots, 1)
    assert slots.busier(4)             # worker 0 serves 3
    as_worker(slots, 0)
    assert slots.busier(5) and not slots.busier(3)
    slots.forget(1)                    # worker 1 died, 2 too: never let them go first
    slots.forget(2)
    assert not slots.busier(1000)
    slots.start(1)                     # its replacement starts from none
    as_worker(slots, 0)
    assert slots.busier(1)


def test_the_caps_count_the_connections_of_every_worker_and_not_a_dead_ones():
    slots = plumbing.WorkerSlots(2, 200)
    slots.start(0)
    slots.start(1)
    assert as_worker(slots, 0).connect("l", "192.0.2.1", 5, 2) == 1
    assert as_worker(slots, 1).connect("l", "192.0.2.1", 5, 2) == 2
    assert as_worker(slots, 0).connect("l", "192.0.2.1", 5, 2) is None     # per address
    assert as_worker(slots, 1).connect("l", "192.0.2.1", 5, 2) is None
    assert as_worker(slots, 1).connect("l", "2001:db8::1", 5, 2) == 3       # another address
    assert as_worker(slots, 0).connect("l", "192.0.2.2", 5, 2) == 4
    assert as_worker(slots, 0).connect("l", "192.0.2.3", 5, 2) == 5
    assert as_worker(slots, 1).connect("l", "192.0.2.4", 5, 2) is None      # in all
    assert as_worker(slots, 0).disconnect("l", "192.0.2.1") == 4
    assert as_worker(slots, 1).connect("l", "192.0.2.1", 5, 2) == 5         # given back
    slots.forget(1)                    # worker 1 held 192.0.2.1 twice and 2001:db8::1
    assert as_worker(slots, 0).connect("l", "192.0.2.1", 5, 2) == 3
    assert as_worker(slots, 0).connect("l", "2001:db8::1", 5, 2) == 4
    slots.start(1)                     # the replacement holds nothing
    assert as_worker(slots, 1).connect("l", "192.0.2.1", 5, 2) == 5
    assert as_worker(slots, 1).disconnect("l", "192.0.2.2") == 4            # worker 0's
    assert as_worker(slots, 1).connect("l", "192.0.2.1", 5, 2) is None


def test_a_workers_table_is_written_again_when_addresses_come_and_go():
    # 256 entries (max_connections 100): three quarters of them hold an address after 192
    # addresses, and each new one then writes the table again with the live ones only.
    slots = as_worker(plumbing.WorkerSlots(2, 100), 0)
    slots.start(0)
    for n in range(5):                 # five addresses stay connected throughout
        assert slots.connect("l", "192.0.2.%d" % n, 100, 2) == n + 1
    for n in range(2000):              # 2,000 more come and go, one at a time
        address = "2001:db8::%x" % n if n % 2 else "198.51.%d.%d" % divmod(n, 256)
        assert slots.connect("l", address, 100, 2) == 6
        assert slots.disconnect("l", address) == 5
        assert slots.used <= 192
    for n in range(5):
        assert slots.connect("l", "192.0.2.%d" % n, 100, 2) == 6 + n
        assert slots.connect("l", "192.0.2.%d" % n, 100, 2) is None
    assert slots.connect("l", "fe80::1%eth0", 100, 1) == 11
    assert slots.connect("l", "fe80::1%eth1", 100, 1) is None      # one address
