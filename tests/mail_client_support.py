"""Helpers for tests/test_mail_client.py: our own servers on 127.0.0.1 port 0, a proxy that
cuts a POP3 session at a chosen command, and readers for Maildirs, mboxes and the spool.

The users are made once per test session (password hashing is slow on purpose) and copied
into each test's spool.
"""

import mailbox
import os
import socket
import threading
import time

import pytest

import mailbox_store
from support import spool_copy, spool_template
import plumbing
import pop3d
import smtp_in

DOMAIN = "example.com"
HOSTNAME = "mail.example.com"
USERS = {"alice@example.com": "alice-secret", "bob@example.com": "bob-secret",
         "carol@example.com": "c" * 200}   # too long for an AUTH PLAIN initial response


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """A spool with the users above; copy it, never change it."""
    return spool_template(tmp_path_factory, DOMAIN, HOSTNAME, USERS)


@pytest.fixture
def spool(tmp_path, store_template):
    return spool_copy(store_template, tmp_path)


@pytest.fixture
def store(spool):
    return mailbox_store.Store(str(spool), [DOMAIN], HOSTNAME)


@pytest.fixture
def servers():
    """A list the test appends its servers to; each is stopped after the test."""
    running = []
    yield running
    for server in running:
        server.stop(grace=0.1)


def serve(server, running):
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    running.append(server)
    return server


@pytest.fixture
def start_pop3(store, servers, tls_files):
    """start(tls=True, implicit_tls=False) -> a running pop3d.POP3Server on port 0."""

    def start(tls=True, implicit_tls=False):
        context = plumbing.server_tls_context(*tls_files) if tls else None
        server = pop3d.POP3Server(("127.0.0.1", 0), {"hostname": HOSTNAME, "idle_timeout": 10.0},
                                  store=store, tls_context=context, implicit_tls=implicit_tls,
                                  failure_delay=lambda failures: 0.0,
                                  anvil=plumbing.Anvil(exempt=["127.0.0.1"]))
        return serve(server, servers)

    return start


@pytest.fixture
def start_submission(spool, store, servers, tls_files):
    """start(tls=True, implicit_tls=False) -> a running smtp_in submission server."""

    def start(tls=True, implicit_tls=False):
        context = plumbing.server_tls_context(*tls_files) if tls else None
        settings = {"spool": str(spool), "domain": [DOMAIN], "hostname": HOSTNAME,
                    "idle_timeout": 10.0, "spf": "off", "dmarc": "off", "anvil_exempt": ["127.0.0.1"]}
        server = smtp_in.SMTPServer(("127.0.0.1", 0), settings, store=store, submission=True,
                                    tls_context=context, implicit_tls=implicit_tls)
        return serve(server, servers)

    return start


def fill_mailbox(store, user, count, start=0, body=b"Hello.\r\n"):
    """Deliver count numbered messages ("Subject: message N") to user; return the subjects."""
    subjects = []
    for number in range(start, start + count):
        subject = "message %d" % number
        store.deliver(user, b"From: <sender@example.org>\r\nTo: <%s>\r\nSubject: %s\r\n"
                      b"Message-ID: <m%d@example.org>\r\n\r\n%s"
                      % (user.encode(), subject.encode(), number, body), "sender@example.org")
        subjects.append(subject)
    return subjects


def maildir_subjects(path):
    """The Subject of every message in a Maildir's new/ and cur/ (duplicates kept)."""
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return sorted(message["Subject"] for message in box)


def mbox_subjects(path):
    return sorted(message["Subject"] for message in mailbox.mbox(str(path), create=False))


def server_messages(store, user):
    with store.open_mailbox(user) as box:
        return len(box)


def spooled_messages(spool_dir):
    """The raw bytes of every queue file under SPOOL/queue (envelope and message)."""
    found = []
    for folder, _, names in os.walk(os.path.join(str(spool_dir), "queue")):
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb") as f:
                found.append(f.read())
    return found




class CuttingProxy:
    """A TCP proxy in front of a server that cuts the session at the nth command `verb`.

    forward=False drops that command and closes both sides at once. forward=True passes it
    on, then lets reply_bytes more octets of the server's answer through before closing the
    client's side (the server's side closes when the server is done or cut off).
    Only the first session that reaches the command is cut; later ones pass untouched.
    """

    def __init__(self, target_port, verb, nth=1, forward=False, reply_bytes=0):
        self.target_port = target_port
        self.verb = verb.upper().encode("ascii")
        self.nth = nth
        self.forward = forward
        self.reply_bytes = reply_bytes
        self.seen = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self):
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self.session, args=(client,), daemon=True).start()

    def session(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        client.settimeout(10)
        budget = [None]                # octets of reply still allowed once cut

        def shut(sock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def down():
            while True:
                try:
                    data = upstream.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                if budget[0] is not None:
                    data = data[:budget[0]]
                    budget[0] -= len(data)
                try:
                    if data:
                        client.sendall(data)
                except OSError:
                    break
                if budget[0] == 0:
                    break
            shut(client)
            shut(upstream)

        threading.Thread(target=down, daemon=True).start()
        pending = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                break
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cut_now = False
                if not self.cut.is_set() and line.upper().startswith(self.verb):
                    self.seen += 1
                    cut_now = self.seen == self.nth
                if cut_now:
                    self.cut.set()
                    if self.forward and self.reply_bytes:
                        budget[0] = self.reply_bytes
                        upstream.sendall(line + b"\n")
                        return
                    if self.forward:
                        budget[0] = 0
                        upstream.sendall(line + b"\n")
                    shut(client)
                    if not self.forward:
                        shut(upstream)
                    return
                upstream.sendall(line + b"\n")
        shut(upstream)

    def close(self):
        self.closing.set()
        self.listener.close()
        self.thread.join(2)


class ScriptedPOP3:
    """A POP3 server on 127.0.0.1 that plays an old, odd server pop3d never is: no CAPA,
    optionally no UIDL, and RETR responses given as raw bytes (stuffed, ending in
    ".<CRLF>") sent `chunk` octets at a time; None answers -ERR [SYS/TEMP]. Serves
    connections one after the other."""

    def __init__(self, responses, uidl=True, chunk=1, listed_size=None, stls_reply=None):
        self.responses = responses
        self.stls_reply = stls_reply           # raw answer to STLS (offered in CAPA when set)
        self.listed_size = listed_size         # what LIST claims for every message
        self.uidl = uidl
        self.chunk = chunk
        self.commands = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.closing.is_set():
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                try:
                    self.session(connection, connection.makefile("rb"))
                except OSError:
                    pass

    def session(self, connection, reader):
        connection.sendall(b"+OK scripted\r\n")
        for line in iter(lambda: reader.readline(1024), b""):
            verb, _, arg = line.strip().decode().partition(" ")
            verb = verb.upper()
            self.commands.append(verb)
            if verb == "LIST":
                listing = b"".join(b"%d %d\r\n" % (i + 1, self.listed_size or len(r or b""))
                                   for i, r in enumerate(self.responses))
                connection.sendall(b"+OK\r\n" + listing + b".\r\n")
            elif verb == "UIDL" and self.uidl:
                listing = b"".join(b"%d uid-%d\r\n" % (i + 1, i + 1)
                                   for i in range(len(self.responses)))
                connection.sendall(b"+OK\r\n" + listing + b".\r\n")
            elif verb == "RETR":
                response = self.responses[int(arg) - 1]
                data = b"-ERR [SYS/TEMP] unavailable\r\n" if response is None else b"+OK\r\n" + response
                for start in range(0, len(data), self.chunk):
                    connection.sendall(data[start:start + self.chunk])
                    time.sleep(0.0005)         # a trickle, the peer played: chunks apart
            elif verb == "CAPA" and self.stls_reply is not None:
                connection.sendall(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")
            elif verb == "STLS" and self.stls_reply is not None:
                connection.sendall(self.stls_reply)
                while connection.recv(4096):           # open until the client leaves
                    pass
                return
            elif verb in ("USER", "PASS", "DELE", "NOOP"):
                connection.sendall(b"+OK\r\n")
            elif verb == "QUIT":
                connection.sendall(b"+OK bye\r\n")
                return
            else:
                connection.sendall(b"-ERR unknown command\r\n")

    def close(self):
        self.closing.set()
        self.listener.close()
        self.thread.join(2)
