"""A server role on several processes (--processes N): a master, its workers, one anvil.

The roles run as an operator starts them, `python3 pop3d.py --processes N` and
`python3 smtp_in.py --processes N`, and are driven over real sockets with poplib and
smtplib. Which worker accepts a connection is the kernel's choice, so each test of a
count shared between workers makes enough connections that, were the counts kept per
worker, some would land on a worker that had not counted the others.
"""

import os
import random
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import zlib

import pytest

import mailbox_store
import plumbing
from support import ROOT, SLACK, children_of, listening_port, wait_for

ALICE, PASSWORD = "alice@example.com", "alice pw"
BUSY = b"-ERR [SYS/TEMP] too many connections"


class Daemon:
    """A role started as a process with --processes; its log is gathered as it comes."""

    def __init__(self, argv, cwd, ready=r"listening on 127\.0\.0\.1[ :](?:port )?(\d+)"):
        self.process = subprocess.Popen([sys.executable] + argv, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, cwd=cwd)
        self.lines = []
        try:
            self.port, lines = listening_port(self.process, ready)
            self.lines = list(lines)
            threading.Thread(target=self._gather, daemon=True).start()
            wait_for(lambda: "serving from" in self.log(), 20, "the workers to start")
        except BaseException:
            self.stop()                # a daemon that did not come up must not outlive the test
            raise

    def _gather(self):
        for line in self.process.stderr:
            self.lines.append(line.decode("utf-8", "replace"))

    def log(self):
        return "".join(self.lines)

    def workers(self):
        """The pids of the master's children now."""
        return children_of(self.process.pid)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(plumbing.DEFAULT_GRACE + plumbing.WORKER_STOP_MARGIN + SLACK)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid in children_of(self.process.pid):      # none should be left; end any that is
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def spool(tmp_path):
    store = mailbox_store.Store(str(tmp_path / "spool"), ["example.com"], "mx.example.com")
    store.add_user(ALICE, PASSWORD)
    store.deliver(ALICE, b"Subject: one\n\nfirst\n", "sender@example.org")
    return str(tmp_path / "spool")


@pytest.fixture
def start(tmp_path):
    daemons = []

    def start(role, *flags):
        argv = [os.path.join(ROOT, role), "--hostname", "mx.example.com",
                "--domain", "example.com"] + list(flags)
        if role == "mta.py":           # no listener: ready once it serves from N workers
            daemon = Daemon(argv, str(tmp_path), r"serving from (\d+) worker processes")
        else:
            daemon = Daemon(argv + ["--listen", "127.0.0.1:0"], str(tmp_path))
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def greeting(port, source="127.0.0.1"):
    """A connection's first line, and the connection (None when the server closed it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    line = sock.makefile("rb").readline()
    if line.startswith(b"+OK") or line.startswith(b"220"):
        return line, sock
    sock.close()
    return line, None


class POP3From(poplib.POP3):
    """poplib's client, connecting from a given loopback address."""

    def __init__(self, port, source):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


def pop3_login(port, user=ALICE, password=PASSWORD, source="127.0.0.1"):
    """The reply to PASS (or the error that ended the login) of one POP3 session."""
    client = POP3From(port, source)
    try:
        client.user(user)
        reply = client.pass_(password)
    except poplib.error_proto as exc:
        reply = exc.args[0]
    try:
        client.quit()
    except (poplib.error_proto, OSError):
        pass
    return reply


def test_a_role_serves_from_workers_of_one_master(start, spool):
    daemon = start("pop3d.py", "--spool", spool, "--processes", "3")
    wait_for(lambda: len(daemon.workers()) == 3, 10, "three workers")
    assert daemon.log().count("worker ") >= 3 and "serving from 3 worker processes" in daemon.log()
    for _ in range(6):
        assert pop3_login(daemon.port).startswith(b"+OK logged in, 1 messages")
    serving = set(re.findall(r"pop3d\[(\d+)\]: login: ", daemon.log()))
    assert serving <= {str(pid) for pid in daemon.workers()}, "a session served by the master"


def holder_of(connection, pids):
    """The pid among PIDS whose process has the server's end of CONNECTION open, from
    /proc/net/tcp (the socket's inode) and /proc/PID/fd."""
    client_port = connection.getsockname()[1]
    server_port = connection.getpeername()[1]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.split(":")[1], 16) == server_port and \
                    int(remote.split(":")[1], 16) == client_port:
                break
        else:
            return None
    for pid in pids:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "socket:[%s]" % inode:
                    return pid
            except OSError:
                continue               # closed meanwhile
    return None


def test_a_burst_of_connections_is_shared_evenly_between_the_workers(start, spool):
    # The kernel wakes every worker for a new connection and the first to accept() it gets
    # it; a worker with more sessions than another lets that one go first. Without that,
    # 8 connections in a row could land 7 to 1 (or 8 to 0) as often as 4 to 4.
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2")
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    workers = daemon.workers()
    connections = []
    try:
        for _ in range(8):
            line, sock = greeting(daemon.port)
            assert sock is not None, line
            connections.append(sock)
        holders = [holder_of(sock, workers) for sock in connections]
    finally:
        for sock in connections:
            sock.close()
    assert sorted(holders.count(pid) for pid in workers) == [4, 4], holders


def test_the_per_address_cap_counts_the_connections_of_every_worker(start, spool):
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2", "--max-per-address", "2")
    held = [greeting(daemon.port)[1] for _ in range(2)]
    assert all(held)
    for _ in range(8):       # counted per worker, some would reach the other one, and pass
        line, sock = greeting(daemon.port)
        assert line.rstrip() == BUSY and sock is None
    assert greeting(daemon.port, source="127.0.0.2")[1] is not None     # another address
    held[0].close()
    wait_for(lambda: greeting(daemon.port)[1], 10, "a slot given back to be taken again")


def test_a_burst_from_one_address_passes_its_cap_by_at_most_one_a_worker(start, spool):
    # The workers check the caps on counters they share, without a lock between them:
    # two may let in the last allowed connection at the same instant (docs/plumbing.md).
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2", "--max-per-address", "5")
    results = []
    barrier = threading.Barrier(40)

    def connect():
        barrier.wait(10)
        results.append(greeting(daemon.port))

    threads = [threading.Thread(target=connect) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    held = [sock for _, sock in results if sock is not None]
    try:
        assert len(results) == 40
        assert 5 <= len(held) <= 5 + 1, [line for line, _ in results]
        assert all(line.rstrip() == BUSY for line, sock in results if sock is None)
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: greeting(daemon.port)[1], 10, "the slots given back")


def test_a_failed_login_on_one_worker_spaces_the_checks_on_all(start, spool):
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2", "--anvil-penalty", "1")
    assert pop3_login(daemon.port, "nobody@example.com").startswith(b"-ERR [AUTH]")
    # From now on each password check from the address waits its turn, a penalty (1 s)
    # after the one before, whichever worker makes it.
    started = time.monotonic()
    for _ in range(4):
        assert pop3_login(daemon.port).startswith(b"+OK logged in")
    assert time.monotonic() - started >= 3.0
    assert pop3_login(daemon.port, source="127.0.0.2").startswith(b"+OK logged in")


def test_errors_on_any_worker_slow_every_reply_to_the_address(start, spool):
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2", "--anvil-soft-errors", "2",
                   "--anvil-penalty", "0.5")
    for _ in range(3):                 # three bad commands, each on a session of its own
        _, sock = greeting(daemon.port)
        sock.sendall(b"BOGUS\r\n")
        assert sock.makefile("rb").readline().startswith(b"-ERR unknown command")
        sock.close()
    # One error past the limit: every reply to the address now waits 0.5 s, on each worker
    # (a worker trusts what it last heard of an address for ANVIL_DELAY_REFRESH seconds).
    time.sleep(plumbing.ANVIL_DELAY_REFRESH)
    for _ in range(4):
        _, sock = greeting(daemon.port)
        started = time.monotonic()
        sock.sendall(b"USER %s\r\n" % ALICE.encode())       # no error: the delay stays 0.5 s
        assert sock.makefile("rb").readline().startswith(b"+OK send your password")
        assert time.monotonic() - started >= 0.5
        sock.close()


def test_a_killed_worker_is_replaced_and_gives_back_its_slots(start, spool):
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2", "--max-per-address", "2")
    held = [greeting(daemon.port)[1] for _ in range(2)]
    workers = daemon.workers()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for sock in held:                  # each session ended with its worker
        assert sock.recv(100) == b""
        sock.close()
    wait_for(lambda: daemon.log().count("killed by signal 9") == 2, 10, "both deaths logged")
    wait_for(lambda: len(set(daemon.workers()) - set(workers)) == 2,
             plumbing.WORKER_RESTART_DELAY + plumbing.PARENT_CHECK + SLACK, "two new workers")
    again = [greeting(daemon.port)[1] for _ in range(2)]
    assert all(again), "the dead workers' slots were not given back"
    assert greeting(daemon.port)[0].rstrip() == BUSY
    assert pop3_login(daemon.port, source="127.0.0.2").startswith(b"+OK logged in")


def test_sighup_reloads_every_worker_and_sigterm_stops_them_all(start, spool, tls_files):
    cert, key = tls_files
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2", "--tls-cert", cert,
                   "--tls-key", key)
    workers = daemon.workers()
    daemon.process.send_signal(signal.SIGHUP)
    for pid in workers:
        wait_for(lambda: "pop3d[%d]: reload: TLS certificate %s loaded" % (pid, cert)
                 in daemon.log(), 10, "worker %d to load the certificate again" % pid)
    assert "reload: passed on to 2 workers" in daemon.log()
    _, sock = greeting(daemon.port)    # a session in progress gets the stopping reply
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(plumbing.DEFAULT_GRACE + plumbing.WORKER_STOP_MARGIN + SLACK) == 0
    assert sock.makefile("rb").readline().startswith(b"-ERR [SYS/TEMP] server shutting down")
    assert not any(os.path.exists("/proc/%d" % pid) for pid in workers)   # all reaped
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    for pid in workers:
        assert "worker %d stopped" % pid in daemon.log()


def test_workers_stop_when_their_master_is_killed(start, spool):
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2")
    workers = daemon.workers()
    daemon.process.kill()
    daemon.process.wait(10)

    def gone():
        return not any(os.path.exists("/proc/%d/stat" % pid) and
                       open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] != "Z"
                       for pid in workers)
    wait_for(gone, plumbing.PARENT_CHECK + plumbing.DEFAULT_GRACE + SLACK, "the workers to stop")
    assert "the master (pid %d) is gone: stopping" % daemon.process.pid in daemon.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=5)


def test_smtp_in_on_workers_queues_every_message_and_shares_its_caps(start, spool):
    daemon = start("smtp_in.py", "--spool", spool, "--processes", "2", "--greet-pause", "0",
                   "--max-per-address", "2", "--spf", "off", "--dns", "127.0.0.254")
    for n in range(10):
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("friend@example.org", [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    queued = re.findall(r"smtp_in\[(\d+)\]: [0-9A-F]{18}: client=", daemon.log())
    assert len(queued) == 10 and set(queued) <= {str(pid) for pid in daemon.workers()}
    held = [greeting(daemon.port)[1] for _ in range(2)]
    assert all(held)
    for _ in range(8):
        line, sock = greeting(daemon.port)
        assert line.startswith(b"421") and sock is None


def test_processes_out_of_range_is_refused_with_one_line(spool, tmp_path):
    for value in ("0", str(plumbing.MAX_PROCESSES + 1), "two"):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "pop3d.py"), "--spool", spool,
                                 "--listen", "127.0.0.1:0", "--processes", value],
                                capture_output=True, timeout=30, cwd=str(tmp_path))
        assert result.returncode == 1, result
        assert result.stderr.decode().startswith("pop3d: processes: "), result.stderr


def test_router_workers_share_the_queue_and_one_killed_loses_and_repeats_nothing(start, spool):
    router = start("mta.py", "--spool", spool, "--processes", "2")
    smtp = start("smtp_in.py", "--spool", spool, "--processes", "2", "--greet-pause", "0",
                 "--spf", "off", "--dns", "127.0.0.254")
    victim = router.workers()[0]
    sent = []

    def send(count):
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=30) as client:
            for n in range(count):
                number = len(sent)
                client.sendmail("friend@example.org", [ALICE],
                                b"Subject: token-%d\r\n\r\nhello\r\n" % number)
                sent.append(number)
    send(60)
    os.kill(victim, signal.SIGKILL)    # wherever it was: between a delivery and its record
    send(60)
    new = os.path.join(spool, "mail", "example.com", "alice", "Maildir", "new")

    def delivered():
        names = os.listdir(new)
        return names if len(names) >= len(sent) + 1 else None       # and the first message
    names = wait_for(delivered, 30, "every message in the Maildir")
    tokens = []
    for name in names:
        with open(os.path.join(new, name), "rb") as f:
            found = re.search(rb"Subject: token-(\d+)", f.read())
        if found:
            tokens.append(int(found.group(1)))
    assert sorted(tokens) == list(range(len(sent))), "lost or repeated"
    # A queue file leaves incoming/ after its Maildir file is in new/ (and a file the killed
    # worker held is taken up by the other at its next look): nothing stays behind.
    incoming = os.path.join(spool, "queue", "incoming")
    wait_for(lambda: not os.listdir(incoming), 30, "an empty incoming/")
    assert "worker %d ended (killed by signal 9)" % victim in router.log()


def test_router_workers_each_route_the_share_of_the_queue_that_hashes_to_them(start, spool):
    """Every router process is rung for every message; each takes the queue files whose
    id hashes to its number (the order the master started them in), so that they do not
    race to claim one file. The other's files it takes only after STEAL_AFTER."""
    router = start("mta.py", "--spool", spool, "--processes", "2")
    smtp = start("smtp_in.py", "--spool", spool, "--greet-pause", "0", "--spf", "off",
                 "--dns", "127.0.0.254")
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=30) as client:
        for number in range(30):
            client.sendmail("friend@example.org", [ALICE], b"Subject: %d\r\n\r\nhi\r\n" % number)
    incoming = os.path.join(spool, "queue", "incoming")
    wait_for(lambda: "removed" in router.log() and not os.listdir(incoming), 30,
             "an empty incoming/")
    started = [int(pid) for pid in re.findall(r"worker (\d+) started", router.log())]
    routed = re.findall(r"mta\[(\d+)\]: ([0-9A-F]{18}): to=<[^>]*>, relay=local", router.log())
    assert len(started) == 2 and len(routed) == 30
    for pid, queue_id in routed:
        assert int(pid) == started[zlib.crc32(queue_id.encode()) % 2], queue_id


def test_a_storm_of_signals_never_leaves_a_daemon_deaf_to_sigterm(start, spool):
    """A signal handler that set the threading.Event the main thread waits on deadlocked
    when the signal came while that thread was inside wait() (it holds the Event's lock
    there): the daemon then ignored SIGTERM for ever. Hundreds of SIGHUPs at random
    moments, then SIGTERM: it stops."""
    daemon = start("pop3d.py", "--spool", spool, "--processes", "2")
    worker = daemon.workers()[0]       # it serves as a single process does (_serve)
    for _ in range(3000):
        os.kill(worker, signal.SIGHUP)
        time.sleep(random.random() / 2000)
    os.kill(worker, signal.SIGTERM)
    wait_for(lambda: "worker %d ended" % worker in daemon.log(), plumbing.DEFAULT_GRACE + SLACK,
             "worker %d to stop" % worker)
