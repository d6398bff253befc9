"""Helpers for tests/test_smtp_in.py: servers on 127.0.0.1 port 0, a raw client, the spool.

The store holds two users and an alias, made once per test session (password hashing is
slow on purpose) and copied into each test's spool.
"""

import os
import socket
import ssl
import threading

import pytest

import mailbox_store
from support import spool_copy, spool_template
import mta
import smtp_in

DOMAIN = "example.com"
HOSTNAME = "mx.example.com"
USERS = {"alice@example.com": "alice-secret", "bob@example.com": "bob-secret"}
ALIASES = {"sales": ["alice@example.com"]}


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """A spool with the users and aliases above; copy it, never change it."""
    return spool_template(tmp_path_factory, DOMAIN, HOSTNAME, USERS, ALIASES)


@pytest.fixture
def spool(tmp_path, store_template):
    return spool_copy(store_template, tmp_path)


@pytest.fixture
def start_smtp(spool):
    """start(**config) -> a running SMTPServer on 127.0.0.1, port 0, stopped after the test."""
    servers = []

    def start(handler_class=None, server_options=None, **config):
        # SPF off unless a test asks for it: no DNS question leaves loopback, and messages
        # carry only our Received: (tests/test_smtp_in_spf.py checks SPF against dnsmasq).
        # 127.0.0.1 is exempt from the anvil: tests make many errors from it (tests/test_anvil.py
        # covers the anvil).
        settings = {"spool": str(spool), "domain": [DOMAIN], "hostname": HOSTNAME, "spf": "off",
                    "dkim_verify": "no", "dmarc": "off",
                    "anvil_exempt": ["127.0.0.1"]}
        settings.update(config)
        server = smtp_in.SMTPServer(("127.0.0.1", 0), settings, **(server_options or {}))
        if handler_class is not None:
            server.RequestHandlerClass = handler_class
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0.1)


class RawClient:
    """A line-level SMTP client on a plain socket, for what smtplib will not send."""

    def __init__(self, server_or_port, timeout=5.0, source="127.0.0.1"):
        port = getattr(server_or_port, "port", server_or_port)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def reply(self):
        """Read one reply; return (code, [lines]) or (None, []) at EOF."""
        lines = []
        while True:
            line = self.file.readline(4096)
            if not line:
                return None, lines
            assert line.endswith(b"\r\n"), line
            lines.append(line[:-2].decode("utf-8"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode("utf-8"))

    def command(self, line):
        self.send(line + "\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.reply()

    def starttls(self):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def at_eof(self):
        return self.file.read() == b""

    def close(self):
        self.sock.close()


def greeted(server, ehlo="client.example.org"):
    """A RawClient past the greeting and EHLO."""
    client = RawClient(server)
    assert client.reply()[0] == 220
    assert client.command("EHLO " + ehlo)[0] == 250
    return client


def message(subject="test", body="Hello.\r\n", sender="someone@example.org", to="bob@example.com"):
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\n%s"
            % (sender, to, subject, subject.replace(" ", "."), body)).encode("utf-8")


def spool_messages(spool_dir):
    """Every message waiting in the spool's queue, oldest first, read with mta's own parser:
    a list of (sender, recipients, message bytes), the fields of a "prepend" record on top
    as every reader of the queue sees them (mta.MessageFile)."""
    found = []
    for folder in (mta.INCOMING, mta.OUTBOUND, mta.DEFERRED):
        path = os.path.join(str(spool_dir), "queue", folder)
        for name in os.listdir(path) if os.path.isdir(path) else ():
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
            state = mta.parse_queue_file(data, name)
            envelope = state.envelope
            message = state.prepend + data[state.message_offset:state.message_offset + envelope.size]
            found.append((name, (envelope.sender, envelope.recipients, message)))
    return [entry for _, entry in sorted(found)]


def route_all(spool_dir):
    """Run mta's router over every queued message, as its daemon would: local recipients
    end up in their Maildirs."""
    store = mailbox_store.Store(str(spool_dir), [DOMAIN], HOSTNAME)
    queue = mta.Queue(str(spool_dir), hostname=HOSTNAME)
    router = mta.Router(queue, store)
    for queue_id in queue.ids(mta.INCOMING):
        router.handle(queue_id)


def maildir_messages(spool_dir, user):
    """The messages in user's Maildir new/, as bytes."""
    store = mailbox_store.Store(str(spool_dir), [DOMAIN], HOSTNAME)
    new = os.path.join(store.maildir_path(user), "new")
    found = []
    for name in sorted(os.listdir(new)) if os.path.isdir(new) else ():
        with open(os.path.join(new, name), "rb") as f:
            found.append(f.read())
    return found



