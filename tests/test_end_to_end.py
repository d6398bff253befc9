"""The whole mail path, end to end: two hosts on one machine, each a full run_all.py.

Host A (127.0.0.2) serves bendcable.com, host B (127.0.0.3) serves blockallspam.com; a
dnsmasq started here publishes their MX and A records. Mail goes from alice at A, through
A's submission port, A's spool and smtp_out, over SMTP to B's MX listener, into B's spool
and Maildir, and out again over POP3: the classic path of Internet mail.
"""

import os
import poplib
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from support import ROOT, free_port, require_tool, wait_for
from dnsmasq_server import host_record, mx_host, start_dnsmasq

PASSWORD = "correct horse battery"
DELIVERY_WAIT = 30.0       # seconds a message may take to cross both hosts


def run_tool(*argv, stdin=None):
    """Run one of the role files as a command; return its CompletedProcess."""
    return subprocess.run([sys.executable] + list(argv), cwd=ROOT, input=stdin,
                          capture_output=True, timeout=60)


class Host:
    """One mail host: a run_all.py process group with its own spool and addresses."""

    def __init__(self, tmp_path, name, ip, domains, dns, mx_port, extra=()):
        self.name = name
        self.ip = ip
        self.domains = domains
        self.spool = str(tmp_path / name)
        self.smtp_port = mx_port
        self.submission_port = free_port(ip)
        self.pop3_port = free_port(ip)
        self.dns = dns
        self.log_path = str(tmp_path / (name + ".log"))
        self.extra = list(extra)           # more run_all.py options
        self.process = None

    def start(self):
        argv = [sys.executable, os.path.join(ROOT, "run_all.py"), "--spool", self.spool,
                "--hostname", "mail." + self.domains[0],
                "--smtp", "%s:%d" % (self.ip, self.smtp_port),
                "--submission", "%s:%d" % (self.ip, self.submission_port),
                "--pop3", "%s:%d" % (self.ip, self.pop3_port),
                "--dns", self.dns, "--remote-port", str(self.smtp_port)]
        for domain in self.domains:
            argv += ["--domain", domain]
        argv += self.extra
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        for port in (self.smtp_port, self.submission_port, self.pop3_port):
            wait_for_port(self.ip, port, self)

    def stop(self):
        """SIGTERM run_all and wait for it: the clean stop a user gets with Ctrl-C."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self):
        """kill -9 of run_all and every role it started (they share its process group)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        self.process = None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def add_user(self, address):
        result = run_tool("mailbox_store.py", "--spool", self.spool, "add-user", address,
                          stdin=(PASSWORD + "\n").encode())
        assert result.returncode == 0, result.stderr.decode()

    def mta(self, *argv):
        return run_tool("mta.py", "--spool", self.spool, *argv)

    def pop3_messages(self, user):
        """Every message in user's mailbox, read over POP3 without deleting it."""
        client = poplib.POP3(self.ip, self.pop3_port, timeout=10)
        try:
            client.user(user)
            client.pass_(PASSWORD)
            count, _ = client.stat()
            return [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
        finally:
            client.quit()

    def wait_for_messages(self, user, count, timeout=DELIVERY_WAIT):
        until = time.monotonic() + timeout
        while True:
            messages = self.pop3_messages(user)
            if len(messages) >= count or time.monotonic() > until:
                return messages
            time.sleep(0.2)


def wait_for_port(ip, port, host, timeout=20.0):
    until = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            if host.process.poll() is not None or time.monotonic() > until:
                raise AssertionError("%s did not open %s:%d\n%s" % (host.name, ip, port, host.log()))
            time.sleep(0.05)


@pytest.fixture
def internet(tmp_path):
    """dnsmasq with both domains' records, and the two hosts, started."""
    require_tool("dnsmasq", "dnsmasq-base")
    mx_port = free_port("127.0.0.2")
    records = [
        mx_host("blockallspam.com", "mail.blockallspam.com", 0),
        host_record("mail.blockallspam.com", "127.0.0.3"),
        mx_host("bendcable.com", "mail.bendcable.com", 0),
        host_record("mail.bendcable.com", "127.0.0.2"),
        # A domain whose preferred MX is down: mail must go to the backup, host B.
        mx_host("backup.test", "down.backup.test", 0),
        host_record("down.backup.test", "127.0.0.4"),
        mx_host("backup.test", "mail.blockallspam.com", 10),
    ]
    with start_dnsmasq(records) as dns:
        host_a = Host(tmp_path, "A", "127.0.0.2", ["bendcable.com"], dns.address, mx_port)
        host_b = Host(tmp_path, "B", "127.0.0.3", ["blockallspam.com", "backup.test"],
                      dns.address, mx_port)
        host_a.add_user("alice@bendcable.com")
        host_b.add_user("gregoryway@blockallspam.com")
        host_b.add_user("gregoryway@backup.test")
        host_a.start()
        host_b.start()
        try:
            yield host_a, host_b
        finally:
            host_a.stop()
            host_b.stop()


def submit(host, sender, recipient, subject, body="Hello from the other host.\n"):
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message.set_content(body)
    with smtplib.SMTP(host.ip, host.submission_port, timeout=20) as client:
        client.login(sender, PASSWORD)
        client.send_message(message)


def headers_of(raw):
    return BytesParser().parsebytes(raw, headersonly=True)


def test_mail_crosses_from_one_host_to_the_other_through_mx(internet):
    host_a, host_b = internet
    submit(host_a, "alice@bendcable.com", "gregoryway@blockallspam.com", "First contact")
    messages = host_b.wait_for_messages("gregoryway@blockallspam.com", 1)
    assert len(messages) == 1
    message = headers_of(messages[0])
    assert message["Subject"] == "First contact"
    received = message.get_all("Received")
    assert len(received) == 2
    assert "by mail.blockallspam.com" in received[0]       # hop 2: B's MX took it from A
    assert "by mail.bendcable.com" in received[1]          # hop 1: A's submission port
    assert "ESMTPA" in received[1]                         # RFC 3848: authenticated
    assert message["Return-Path"] == "<alice@bendcable.com>"
    assert message["Delivered-To"] == "gregoryway@blockallspam.com"


def test_unknown_recipient_at_the_far_end_bounces_to_the_sender(internet):
    host_a, host_b = internet
    submit(host_a, "alice@bendcable.com", "nobody@blockallspam.com", "Lost letter")
    messages = host_a.wait_for_messages("alice@bendcable.com", 1)
    assert len(messages) == 1
    bounce = BytesParser().parsebytes(messages[0])
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    report = [part for part in bounce.walk() if part.get_content_type() == "message/delivery-status"]
    text = report[0].as_string()
    assert "nobody@blockallspam.com" in text
    assert "Status: 5.1.1" in text
    assert "Action: failed" in text
    assert bounce["Return-Path"] == "<>"


def test_mail_waits_while_the_far_host_is_down_and_flush_delivers_it(internet):
    host_a, host_b = internet
    host_b.stop()
    submit(host_a, "alice@bendcable.com", "gregoryway@blockallspam.com", "Patience")
    until = time.monotonic() + DELIVERY_WAIT
    while True:
        listing = host_a.mta("queue").stdout.decode()
        if "deferred" in listing or time.monotonic() > until:
            break
        time.sleep(0.2)
    assert "gregoryway@blockallspam.com" in listing and "deferred" in listing
    host_b.start()
    assert host_a.mta("flush").returncode == 0
    messages = host_b.wait_for_messages("gregoryway@blockallspam.com", 1)
    assert [headers_of(m)["Subject"] for m in messages] == ["Patience"]


def test_mail_goes_to_the_backup_mx_when_the_preferred_one_is_down(internet):
    host_a, host_b = internet
    submit(host_a, "alice@bendcable.com", "gregoryway@backup.test", "Via the backup")
    messages = host_b.wait_for_messages("gregoryway@backup.test", 1)
    assert [headers_of(m)["Subject"] for m in messages] == ["Via the backup"]


def test_mx_pointing_back_at_this_host_bounces_at_once_instead_of_looping(tmp_path):
    """loop.test's MX, under a name of its own, is this host's MX listener, which relays
    for 127.0.0.0/8: smtp_out knows that listener (run_all hands it --smtp), so the mail
    bounces with 5.4.6 before any connection, instead of going round 50 times."""
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq([mx_host("loop.test", "mx.loop.test", 10),
                        host_record("mx.loop.test", "127.0.0.2")]) as dns:
        host = Host(tmp_path, "A", "127.0.0.2", ["bendcable.com"], dns.address,
                    free_port("127.0.0.2"), extra=["--relay-network", "127.0.0.0/8"])
        host.add_user("alice@bendcable.com")
        host.start()
        try:
            sent = run_tool("mta.py", "--spool", host.spool, "sendmail", "-f",
                            "alice@bendcable.com", "u@loop.test",
                            stdin=b"Subject: round and round\n\nhi\n")
            assert sent.returncode == 0, sent.stderr.decode()
            (bounce,) = host.wait_for_messages("alice@bendcable.com", 1)
        finally:
            host.stop()
    text = bounce.decode("utf-8", "replace")
    assert "Status: 5.4.6" in text and "mail for loop.test loops back to myself" in text
    assert text.count("Subject: round and round") == 1
    returned = text.split("Subject: round and round")[0].rsplit("text/rfc822-headers", 1)[1]
    assert returned.count("Received:") == 1        # only sendmail's: it never went round
    assert not re.search(r"smtp_in\[\d+\]: \w+: client=", host.log())   # no message came in


# --- Crash safety ---

def send_tokens(host, recipient, tokens, acknowledged, lock, stop):
    """Send one message per token, one session each; record the ones answered 250."""
    for token in tokens:
        if stop.is_set():
            return
        try:
            with smtplib.SMTP(host.ip, host.smtp_port, timeout=10) as client:
                client.sendmail("load@example.net", [recipient],
                                b"Subject: token %s\r\n\r\ntoken %s\r\n" % (token.encode(), token.encode()))
            with lock:
                acknowledged.add(token)
        except (OSError, smtplib.SMTPException):
            pass       # the host was killed under this session: no 250, no promise


def count_tokens(messages):
    counts = {}
    for raw in messages:
        token = headers_of(raw)["Subject"].split()[-1]
        counts[token] = counts.get(token, 0) + 1
    return counts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_of_every_process_loses_no_acknowledged_message(tmp_path, seed):
    require_tool("dnsmasq", "dnsmasq-base")
    rng = random.Random(seed)
    with start_dnsmasq([]) as dns:
        host = Host(tmp_path, "A", "127.0.0.2", ["bendcable.com"], dns.address,
                    free_port("127.0.0.2"))
        host.add_user("alice@bendcable.com")
        host.start()
        tokens = [uuid.uuid4().hex for _ in range(400)]
        acknowledged, lock, stop = set(), threading.Lock(), threading.Event()
        senders = [threading.Thread(target=send_tokens,
                                    args=(host, "alice@bendcable.com", tokens[i::6],
                                          acknowledged, lock, stop))
                   for i in range(6)]
        for sender in senders:
            sender.start()
        wait_for(lambda: acknowledged, 30, "a first acknowledged message")   # a busy machine
        time.sleep(rng.uniform(0.1, 1.0))      # mid-load: the kill lands among sessions
        host.kill()
        stop.set()
        for sender in senders:
            sender.join(30)
        assert acknowledged, "no message was acknowledged before the kill"
        host.start()
        try:
            until = time.monotonic() + DELIVERY_WAIT
            while True:
                try:
                    counts = count_tokens(host.pop3_messages("alice@bendcable.com"))
                except (OSError, poplib.error_proto):   # pop3d still starting after the crash
                    counts = {}
                if acknowledged <= set(counts) or time.monotonic() > until:
                    break
                time.sleep(0.2)
            missing = acknowledged - set(counts)
            duplicates = sum(n - 1 for n in counts.values())
            print("seed %d: %d acknowledged, %d delivered, %d duplicates"
                  % (seed, len(acknowledged), len(counts), duplicates))
            assert not missing
            assert duplicates <= 6       # at most one in flight per client
        finally:
            host.stop()
