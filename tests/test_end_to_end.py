"""The whole mail path, end to end: two hosts on one machine, each a full run_all.py.

Host A (127.0.0.2) serves bendcable.com, host B (127.0.0.3) serves blockallspam.com; a
dnsmasq started here publishes their MX and A records. Mail goes from alice at A, through
A's submission port, A's spool and smtp_out, over SMTP to B's MX listener, into B's spool
and Maildir, and out again over POP3: the classic path of Internet mail.
"""

import poplib
import random
import re
import smtplib
import threading
import uuid
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from hosts_support import DELIVERY_WAIT, PASSWORD, Host, run_tool
from support import free_port, require_tool, wait_for
from dnsmasq_server import host_record, mx_host, start_dnsmasq



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
        try:
            host_a.start()
            host_b.start()
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

    def deferred_listing():
        listing = host_a.mta("queue").stdout.decode()
        return listing if "deferred" in listing else None
    listing = wait_for(deferred_listing, DELIVERY_WAIT, "the message to be deferred")
    assert "gregoryway@blockallspam.com" in listing
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
        # Mid-load: the kill lands among sessions, after a number of acknowledgements the
        # seed chooses (a count, not a time, so that a busy machine still kills under load).
        target = rng.randint(5, 60)
        wait_for(lambda: len(acknowledged) >= target, 60, "%d acknowledged messages" % target)
        host.kill()
        stop.set()
        for sender in senders:
            sender.join(30)
        assert acknowledged, "no message was acknowledged before the kill"
        host.start()
        try:
            def delivered():
                try:
                    counts = count_tokens(host.pop3_messages("alice@bendcable.com"))
                except (OSError, poplib.error_proto):   # pop3d still starting after the crash
                    return None
                return counts if acknowledged <= set(counts) else None
            counts = wait_for(delivered, DELIVERY_WAIT, "every acknowledged message over POP3")
            missing = acknowledged - set(counts)
            duplicates = sum(n - 1 for n in counts.values())
            print("seed %d: %d acknowledged, %d delivered, %d duplicates"
                  % (seed, len(acknowledged), len(counts), duplicates))
            assert not missing
            assert duplicates <= 6       # at most one in flight per client
        finally:
            host.stop()
