"""mta.py: the spool, the router, bounces and the admin CLI, on real files and processes.

In-process routers run on a thread with a 60 s backup scan, so a delivery within seconds
shows the doorbell worked. Router processes are started with sys.executable and ended by
their PID only.
"""

import email
import errno
import json
import logging
import mailbox
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

import mailbox_store
import mta
import plumbing
import support
from support import ROOT, wait_for

DOMAIN = "example.com"
HOSTNAME = "mail.example.com"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\nSubject: hello\r\n"
           b"Message-ID: <m1@example.com>\r\n\r\nHi Bob.\r\n")


# --- Helpers ---

def write_users(spool, addresses):
    """A users file with placeholder hashes: nobody logs in here, and scrypt is slow."""
    with open(os.path.join(spool, "users"), "a") as f:
        for address in addresses:
            f.write("%s:$placeholder$\n" % address)


def write_aliases(spool, text):
    with open(os.path.join(spool, "aliases"), "w") as f:
        f.write(text)


def maildir_files(spool, address):
    local, domain = address.split("@")
    new = os.path.join(spool, "mail", domain, local, "Maildir", "new")
    try:
        return sorted(os.path.join(new, name) for name in os.listdir(new))
    except FileNotFoundError:
        return []


def read_mail(spool, address):
    messages = []
    for path in maildir_files(spool, address):
        with open(path, "rb") as f:
            messages.append(email.message_from_bytes(f.read()))
    return messages


def queue_files(spool):
    found = []
    for folder in mta.QUEUE_FOLDERS:
        path = os.path.join(spool, "queue", folder)
        if os.path.isdir(path):
            found += [(folder, name) for name in os.listdir(path)]
    return found


def queue_empty(spool):
    return not queue_files(spool)


def dsn_fields(message):
    """(per-message block, [per-recipient blocks]) of a parsed DSN."""
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = message.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    blocks = status.get_payload()
    return blocks[0], blocks[1:], headers.get_payload(decode=True)


class FakeClock:
    def __init__(self, now=None):
        self.now = time.time() if now is None else now

    def __call__(self):
        return self.now


def run_cli(spool, *args, stdin=b"", timeout=30):
    return subprocess.run([sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool,
                           "--domain", DOMAIN, "--hostname", HOSTNAME] + list(args),
                          input=stdin, capture_output=True, timeout=timeout)


def start_router_process(spool, log_path, *extra):
    """One router process (--processes 1: a kill -9 of this pid stops all its routing;
    tests/test_processes.py covers the router's worker processes)."""
    log_file = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool, "--domain", DOMAIN,
         "--hostname", HOSTNAME, "--scan-interval", "1", "--processes", "1"] + list(extra),
        stdout=subprocess.DEVNULL, stderr=log_file)
    log_file.close()
    return process


def stop_process(process):
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


# --- Fixtures ---

@pytest.fixture
def spool(tmp_path):
    path = str(tmp_path / "spool")
    os.makedirs(path)
    write_users(path, ["alice@example.com", "bob@example.com", "carol@example.com"])
    return path


@pytest.fixture
def store(spool):
    return mailbox_store.Store(spool, [DOMAIN], HOSTNAME)


@pytest.fixture
def queue(spool):
    return mta.Queue(spool, hostname=HOSTNAME, postmaster="postmaster@" + DOMAIN)


@pytest.fixture
def router(queue, store):
    """A router on a thread; its backup scan is slow, so only the doorbell makes it quick."""
    router = mta.Router(queue, store)
    runner = mta.QueueRunner(queue, mta.INCOMING, "mta", router.handle, workers=2,
                             scan_interval=60.0, on_scan=router.periodic)
    thread = threading.Thread(target=runner.serve_forever, daemon=True)
    thread.start()
    yield router
    runner.stop(grace=5)
    thread.join(10)


# --- Enqueue and the queue file ---

def test_enqueue_writes_one_readable_file_and_returns_its_queue_id(spool):
    queue_id = mta.enqueue(spool, "alice@example.com", ["bob@example.com", "x@remote.test"], MESSAGE,
                           client_address="192.0.2.7", client_helo="client.test",
                           auth_user="alice@example.com", protocol="ESMTPSA")
    path = os.path.join(spool, "queue", "incoming", queue_id)
    with open(path, "rb") as f:
        data = f.read()
    head, _, rest = data.partition(b"\n\n")
    assert head.decode().split("\n") == [
        "MTA-Queue-File: 1", "Queue-ID: " + queue_id, head.decode().split("\n")[2],
        "Sender: <alice@example.com>", "Client-Address: 192.0.2.7", "Client-HELO: client.test",
        "Auth-User: alice@example.com", "Protocol: ESMTPSA", "Recipient: <bob@example.com>",
        "Recipient: <x@remote.test>", "Message-Size: %-20d" % len(MESSAGE)]
    assert rest == MESSAGE
    state = mta.parse_queue_file(data, queue_id)
    assert state.envelope.recipients == ["bob@example.com", "x@remote.test"]
    assert abs(state.envelope.arrival - time.time()) < 60
    assert os.listdir(os.path.join(spool, "queue", "tmp")) == []
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_queue_writer_streams_the_message_and_fills_in_its_size_at_commit(spool, queue, store):
    blocks = [b"Subject: streamed\r\n\r\n"] + [b"%06d........\r\n" % n for n in range(20000)]
    with mta.QueueWriter(spool, "alice@example.com", ["bob@example.com"], protocol="ESMTP") as writer:
        tmp = os.path.join(spool, "queue", "tmp", writer.queue_id)
        for block in blocks:
            writer.write(block)
        assert os.path.exists(tmp) and queue_empty(spool)       # nothing visible before commit
        queue_id = writer.commit()
    assert not os.path.exists(tmp)
    message = b"".join(blocks)
    with open(queue.path(mta.INCOMING, queue_id), "rb") as f:
        data = f.read()
    assert b"\nMessage-Size: %-20d\n\n" % len(message) in data
    state = mta.parse_queue_file(data, queue_id)
    assert state.envelope.size == len(message) == writer.size
    assert data[state.message_offset:] == message
    mta.Router(queue, store).handle(queue_id)
    delivered, = maildir_files(spool, "bob@example.com")
    with open(delivered, "rb") as f:
        assert f.read() == (b"Return-Path: <alice@example.com>\r\n"
                            b"Delivered-To: bob@example.com\r\n" + message)
    assert queue_empty(spool)


def test_a_small_message_is_written_whole_at_commit(spool, queue):
    writer = mta.QueueWriter(spool, "alice@example.com", ["bob@example.com"])
    writer.write(MESSAGE[:10])
    writer.write(MESSAGE[10:])
    assert os.listdir(os.path.join(spool, "queue", "tmp")) == []     # nothing on disk yet
    queue_id = writer.commit()
    with open(queue.path(mta.INCOMING, queue_id), "rb") as f:
        state = mta.parse_queue_file(f.read(), queue_id)
    assert state.envelope.size == len(MESSAGE) and os.listdir(os.path.join(spool, "queue", "tmp")) == []


def test_a_queue_writer_takes_another_id_when_its_own_is_taken(spool, monkeypatch):
    ids = iter(["0000000000000000B1", "0000000000000000B2"])
    monkeypatch.setattr(mta.plumbing, "new_queue_id", lambda: next(ids))
    mta.make_spool(spool)
    taken = os.path.join(spool, "queue", "tmp", "0000000000000000B1")
    with open(taken, "wb") as f:
        f.write(b"another writer's file")
    assert mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE) == "0000000000000000B2"
    with open(taken, "rb") as f:
        assert f.read() == b"another writer's file"
    with open(os.path.join(spool, "queue", "incoming", "0000000000000000B2"), "rb") as f:
        assert b"Queue-ID: 0000000000000000B2\n" in f.read()


def test_an_aborted_queue_writer_leaves_nothing(spool):
    writer = mta.QueueWriter(spool, "alice@example.com", ["bob@example.com"])
    writer.write(b"Subject: half\r\n")
    writer.abort()
    with pytest.raises(mta.SpoolError):
        writer.write(b"more")
    with pytest.raises(RuntimeError):
        with mta.QueueWriter(spool, "alice@example.com", ["bob@example.com"]) as writer:
            writer.write(b"Subject: interrupted\r\n")
            raise RuntimeError("the client went away")
    assert os.listdir(os.path.join(spool, "queue", "tmp")) == [] and queue_empty(spool)


def test_a_claimed_message_is_read_from_its_file_in_blocks_and_its_header_alone(spool, queue):
    header = b"Received: one\r\nSubject: big\r\n\r\n"
    message = header + b"x" * (3 * mta.COPY_BLOCK + 5)
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test"], message)
    with queue.claim(mta.INCOMING, queue_id) as claim:
        assert len(claim.message) == len(message)
        blocks = list(claim.message.blocks())
        assert [len(b) for b in blocks] == [mta.COPY_BLOCK] * 3 + [len(header) + 5]
        assert b"".join(blocks) == message == claim.message.read()
        assert claim.message.header() == header[:-2]
        assert claim.message.header(10) == header[:10]
        claim.close()
    with pytest.raises(ValueError):
        claim.message.read()                   # only while the claim is held


def test_enqueue_refuses_addresses_that_cannot_be_queued(spool):
    for sender, recipients in (("a@b\r\nRecipient: <x@y>", ["bob@example.com"]),
                               ("alice@example.com", []), ("alice@example.com", ["bo\nb@x"]),
                               ("alice@example.com", [""]), ("alice@example.com", ["x" * 600])):
        with pytest.raises(ValueError):
            mta.enqueue(spool, sender, recipients, MESSAGE)
    with pytest.raises(ValueError):
        mta.enqueue(spool, "", ["bob@example.com"], MESSAGE, queue_id="../etc")
    assert queue_empty(spool)


def test_enqueue_with_a_queue_id_already_queued_fails_and_keeps_the_first(spool):
    mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE, queue_id="ABC123")
    with pytest.raises(mta.SpoolError) as caught:
        mta.enqueue(spool, "eve@example.com", ["bob@example.com"], b"other", queue_id="ABC123")
    assert caught.value.errno == errno.EEXIST
    with open(os.path.join(spool, "queue", "incoming", "ABC123"), "rb") as f:
        assert f.read().endswith(MESSAGE)
    assert os.listdir(os.path.join(spool, "queue", "tmp")) == []


# --- Routing and local delivery ---

def test_enqueued_message_reaches_the_maildir_and_leaves_the_queue(spool, router):
    queue_id = mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    wait_for(lambda: maildir_files(spool, "bob@example.com"), timeout=5)
    box = mailbox.Maildir(os.path.join(spool, "mail", DOMAIN, "bob", "Maildir"), create=False)
    (message,) = box.values()
    assert message["Return-Path"] == "<alice@example.com>"
    assert message["Delivered-To"] == "bob@example.com"
    assert message["Subject"] == "hello"
    assert message.get_payload() == "Hi Bob.\r\n" or message.get_payload() == "Hi Bob.\n"
    wait_for(lambda: queue_empty(spool), timeout=5)
    assert queue_id


def test_alias_chain_and_sub_addressing_deliver_one_copy_each(spool, router):
    write_aliases(spool, "team: staff, carol\nstaff: bob, alice\n")
    mta.enqueue(spool, "x@remote.test", ["team@example.com", "bob+news@example.com"], MESSAGE)
    wait_for(lambda: queue_empty(spool))
    assert [len(maildir_files(spool, a)) for a in ("alice@example.com", "bob@example.com",
                                                   "carol@example.com")] == [1, 1, 1]
    (message,) = read_mail(spool, "bob@example.com")
    assert message["Delivered-To"] == "bob@example.com"


def test_unknown_user_gets_a_dsn_that_the_email_package_parses(spool, router):
    queue_id = mta.enqueue(spool, "alice@example.com", ["ghost@example.com", "bob@example.com"],
                           MESSAGE, client_address="192.0.2.7", client_helo="client.test")
    wait_for(lambda: maildir_files(spool, "alice@example.com"))
    (dsn,) = read_mail(spool, "alice@example.com")
    assert dsn["Return-Path"] == "<>"
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@%s>" % HOSTNAME
    assert dsn["To"] == "alice@example.com"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, (block,), headers = dsn_fields(dsn)
    assert per_message["Reporting-MTA"] == "dns; " + HOSTNAME
    assert per_message["Received-From-MTA"] == "dns; client.test (192.0.2.7)"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert block["Final-Recipient"] == "rfc822; ghost@example.com"
    assert block["Original-Recipient"] is None
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; " + mta.R550_USER_UNKNOWN
    assert block["Remote-MTA"] is None
    assert b"Subject: hello" in headers and b"Hi Bob" not in headers
    assert queue_id in dsn.get_payload()[0].get_payload()
    assert len(maildir_files(spool, "bob@example.com")) == 1
    wait_for(lambda: queue_empty(spool))


def test_alias_loop_bounces_with_5_4_6(spool, router):
    write_aliases(spool, "ping: pong\npong: ping\n")
    mta.enqueue(spool, "alice@example.com", ["ping@example.com"], MESSAGE)
    (dsn,) = wait_for(lambda: read_mail(spool, "alice@example.com"))
    _, (block,), _ = dsn_fields(dsn)
    assert (block["Status"], block["Final-Recipient"]) == ("5.4.6", "rfc822; ping@example.com")


def test_aliases_listing_each_other_deliver_once_and_a_huge_one_bounces_5_2_4(spool, router, monkeypatch):
    monkeypatch.setattr(mailbox_store, "MAX_ALIAS_RECIPIENTS", 3)
    write_aliases(spool, "ping: pong, bob\npong: ping, carol\n"
                         "crowd: %s\n" % ", ".join("u%d@remote.example" % n for n in range(4)))
    mta.enqueue(spool, "alice@example.com", ["ping@example.com", "crowd@example.com"], MESSAGE)
    (dsn,) = wait_for(lambda: read_mail(spool, "alice@example.com"))
    _, (block,), _ = dsn_fields(dsn)
    assert (block["Status"], block["Final-Recipient"]) == ("5.2.4", "rfc822; crowd@example.com")
    assert len(read_mail(spool, "bob@example.com")) == len(read_mail(spool, "carol@example.com")) == 1


def test_more_received_fields_than_the_hop_limit_bounce_with_5_4_6(spool, router):
    looping = b"".join(b"Received: from hop%d.test by mx.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % n
                       for n in range(51)) + MESSAGE
    fine = b"".join(b"Received: from hop%d.test\r\n" % n for n in range(50)) + MESSAGE
    mta.enqueue(spool, "alice@example.com", ["bob@example.com"], looping)
    mta.enqueue(spool, "alice@example.com", ["carol@example.com"], fine)
    (dsn,) = wait_for(lambda: read_mail(spool, "alice@example.com"))
    _, (block,), _ = dsn_fields(dsn)
    assert block["Status"] == "5.4.6" and "51 Received" in block["Diagnostic-Code"]
    wait_for(lambda: queue_empty(spool))
    assert maildir_files(spool, "bob@example.com") == []
    assert len(maildir_files(spool, "carol@example.com")) == 1


def test_delivered_to_naming_the_recipient_is_a_loop(spool, router):
    write_aliases(spool, "list: bob, carol\n")
    message = b"Delivered-To: bob@example.com\r\n" + MESSAGE
    mta.enqueue(spool, "alice@example.com", ["list@example.com"], message)
    (dsn,) = wait_for(lambda: read_mail(spool, "alice@example.com"))
    _, (block,), _ = dsn_fields(dsn)
    assert block["Status"] == "5.4.6"
    assert block["Final-Recipient"] == "rfc822; bob@example.com"
    assert block["Original-Recipient"] == "rfc822; list@example.com"
    wait_for(lambda: queue_empty(spool))
    assert maildir_files(spool, "bob@example.com") == []
    assert len(maildir_files(spool, "carol@example.com")) == 1


def test_bounce_of_a_null_sender_message_goes_to_the_postmaster(spool, router):
    mta.enqueue(spool, "", ["ghost@example.com"], MESSAGE)
    # postmaster@example.com has no user or alias: mailbox_store routes it to the first user.
    (dsn,) = wait_for(lambda: read_mail(spool, "alice@example.com"))
    assert dsn["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert dsn["To"] == "postmaster@example.com"
    _, (block,), _ = dsn_fields(dsn)
    assert block["Final-Recipient"] == "rfc822; ghost@example.com"
    # A bounce of this bounce would be queued before the bounce's own file goes: once the
    # queue is empty, nothing more is coming.
    wait_for(lambda: queue_empty(spool))
    assert len(read_mail(spool, "alice@example.com")) == 1


def test_failed_double_bounce_is_dropped_with_a_log_line(spool, queue, store, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    queue_id = queue.enqueue("", ["postmaster@remote.test"], MESSAGE)
    mta.Router(queue, store).handle(queue_id)
    claim = queue.claim_outbound(queue_id)
    with claim:
        (recipient,) = claim.groups["remote.test"]
        claim.failed(recipient, "550 5.1.1 no such user", remote_mta="mx.remote.test")
    assert queue_empty(spool)
    assert "status=dropped (undeliverable double bounce)" in caplog.text


def test_local_disk_error_defers_then_flush_delivers(spool, queue, router, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    maildir = os.path.join(spool, "mail", DOMAIN, "bob", "Maildir")
    os.makedirs(maildir)
    with open(os.path.join(maildir, "tmp"), "w") as f:
        f.write("a file where the tmp/ folder should be")
    queue_id = mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    wait_for(lambda: ("deferred", queue_id) in queue_files(spool))
    ((_, _, _, state),) = queue.listing()
    (recipient,) = state.recipients
    assert (recipient.status, recipient.dsn) == ("deferred", "4.3.0")
    assert recipient.next_attempt > time.time() + mta.retry_delay(1) - 60
    os.unlink(os.path.join(maildir, "tmp"))
    assert queue.flush() == 1
    wait_for(lambda: maildir_files(spool, "bob@example.com"))
    wait_for(lambda: queue_empty(spool))
    assert "status=deferred (451 4.3.0 Local delivery failed" in caplog.text


# --- The outbound queue (smtp_out's side) ---

def tmp_file(folder, name, hours_old):
    """A file in folder, last written and read hours_old hours ago."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"half a message")
    then = time.time() - hours_old * 3600
    os.utime(path, (then, then))
    return path


def test_router_removes_stale_tmp_files_of_the_queue_and_every_maildir_hourly(spool, queue, store, caplog):
    store.deliver("bob@example.com", MESSAGE, "")          # a real Maildir with new/ mail
    maildirs = [store.maildir_path(a) for a in ("alice@example.com", "bob@example.com")]
    queue.create()
    queue_tmp = os.path.join(spool, "queue", "tmp")
    old = [tmp_file(os.path.join(maildirs[0], "tmp"), "1.M1P1.dead", 37),
           tmp_file(os.path.join(maildirs[1], "tmp"), "2.M2P2.dead", 100),
           tmp_file(queue_tmp, "0000DEADBEEF", 2)]
    kept = [tmp_file(os.path.join(maildirs[0], "tmp"), "3.M3P3.slow", 35),
            tmp_file(os.path.join(maildirs[1], "tmp"), "4.M4P4.live", 0),
            tmp_file(queue_tmp, "0000CAFEF00D", 0.5)] + maildir_files(spool, "bob@example.com")
    router = mta.Router(queue, store)
    caplog.set_level(logging.INFO)
    router.periodic()
    router.sweeper.join(10)
    assert [os.path.exists(p) for p in old] == [False] * 3
    assert [os.path.exists(p) for p in kept] == [True] * 4
    removals = sorted(r.getMessage() for r in caplog.records if "status=removed" in r.getMessage())
    assert removals == [
        "0000DEADBEEF: file=queue/tmp/0000DEADBEEF, age=2h, status=removed (stale tmp file)",
        "user=<alice@example.com>, file=mail/example.com/alice/Maildir/tmp/1.M1P1.dead, "
        "age=37h, status=removed (stale tmp file)",
        "user=<bob@example.com>, file=mail/example.com/bob/Maildir/tmp/2.M2P2.dead, "
        "age=100h, status=removed (stale tmp file)"]
    # The backup scan runs every few seconds; the sweep, at most once an hour.
    again = tmp_file(os.path.join(maildirs[0], "tmp"), "5.M5P5.dead", 40)
    sweeper = router.sweeper
    router.periodic()
    assert router.sweeper is sweeper and os.path.exists(again)
    router.next_sweep = time.monotonic()                     # an hour later
    router.periodic()
    router.sweeper.join(10)
    assert not os.path.exists(again)


def test_remote_recipients_wait_in_outbound_grouped_by_domain_and_wake_smtp_out(spool, queue, router):
    doorbell = mta.WakeSocket(spool, "smtp_out")
    try:
        queue_id = mta.enqueue(spool, "alice@example.com",
                               ["x@remote.test", "bob@example.com", "Y@Remote.TEST", "z@other.test"],
                               MESSAGE)
        wait_for(lambda: ("outbound", queue_id) in queue_files(spool))
        assert doorbell.wait(5)
    finally:
        doorbell.close()
    claim = queue.claim_outbound(queue_id)
    with pytest.raises(mta.QueueBusy):
        queue.claim_outbound(queue_id)
    with claim:
        assert claim.message.read() == MESSAGE and claim.envelope.sender == "alice@example.com"
        assert {d: [r.address for r in rs] for d, rs in claim.groups.items()} == {
            "remote.test": ["x@remote.test", "Y@remote.test"], "other.test": ["z@other.test"]}
        x, y = claim.groups["remote.test"]
        claim.delivered(x, "250 2.0.0 queued as 1234", remote_mta="mx.remote.test")
        claim.deferred(y, "451 4.7.1 greylisted", remote_mta="mx.remote.test")
        claim.delivered(claim.groups["other.test"][0], "250 ok", remote_mta="mx.other.test")
    assert queue_files(spool) == [("deferred", queue_id)]
    mtime = os.stat(queue.path(mta.DEFERRED, queue_id)).st_mtime
    assert abs(mtime - (time.time() + mta.retry_delay(1))) < 30
    assert len(maildir_files(spool, "bob@example.com")) == 1
    assert maildir_files(spool, "alice@example.com") == []          # no DSN for a deferral


def test_an_outbound_runner_gets_remote_work_as_smtp_out_would(spool, queue, router):
    sent = []

    def handle(queue_id):              # what smtp_out's handler does, minus the SMTP
        claim = queue.claim_outbound(queue_id)
        if claim is None:
            return
        with claim:
            for domain, recipients in claim.groups.items():
                for recipient in recipients:
                    sent.append((claim.envelope.sender, recipient.address, claim.message.read()))
                    claim.delivered(recipient, "250 2.0.0 OK", remote_mta="mx." + domain)

    runner = mta.QueueRunner(queue, mta.OUTBOUND, "smtp_out", handle, workers=2, scan_interval=60)
    thread = threading.Thread(target=runner.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for(lambda: runner.doorbell is not None)
        mta.enqueue(spool, "alice@example.com", ["x@remote.test", "bob@example.com"], MESSAGE)
        wait_for(lambda: sent and queue_empty(spool), timeout=10)
    finally:
        runner.stop(grace=5)
        thread.join(10)
    assert sent == [("alice@example.com", "x@remote.test", MESSAGE)]
    assert len(maildir_files(spool, "bob@example.com")) == 1


def test_claim_released_with_untried_groups_stays_in_outbound(spool, queue, store):
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test", "y@other.test"], MESSAGE)
    mta.Router(queue, store).handle(queue_id)
    with queue.claim_outbound(queue_id) as claim:
        claim.delivered(claim.groups["remote.test"][0], "250 ok", remote_mta="mx.remote.test")
    assert queue.ids(mta.OUTBOUND) == [queue_id]
    with queue.claim_outbound(queue_id) as claim:
        assert list(claim.groups) == ["other.test"]


def test_permanent_remote_failure_is_bounced_with_remote_mta(spool, queue, store):
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test"], MESSAGE)
    router = mta.Router(queue, store)
    router.handle(queue_id)
    with queue.claim_outbound(queue_id) as claim:
        claim.failed(claim.groups["remote.test"][0], "550 5.1.1 <x@remote.test>: no such user",
                     remote_mta="mx.remote.test")
    assert queue.ids(mta.OUTBOUND) == []
    for dsn_id in queue.ids(mta.INCOMING):
        router.handle(dsn_id)
    (dsn,) = read_mail(spool, "alice@example.com")
    _, (block,), _ = dsn_fields(dsn)
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.remote.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <x@remote.test>: no such user"
    assert queue_empty(spool)


def test_log_names_the_relay_and_the_dsn_the_remote_host(spool, queue, store, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test", "y@remote.test"], MESSAGE)
    router = mta.Router(queue, store)
    router.handle(queue_id)
    with queue.claim_outbound(queue_id) as claim:
        x, y = claim.groups["remote.test"]
        claim.failed(x, "550 5.1.1 no such user", remote_mta="mx.remote.test",
                     relay="mx.remote.test[192.0.2.7]:25")
        # A record from before the two were apart: "mta" held name[address]:port.
        claim.record({"event": "failed", "rcpt": y.index, "at": time.time(), "dsn": "5.1.1",
                      "mta": "mx2.remote.test[192.0.2.8]:25", "reply": "550 5.1.1 gone"})
        assert (y.remote_mta, y.relay) == ("mx2.remote.test", "mx2.remote.test[192.0.2.8]:25")
    assert "to=<x@remote.test>, relay=mx.remote.test[192.0.2.7]:25, " in caplog.text
    for dsn_id in queue.ids(mta.INCOMING):
        router.handle(dsn_id)
    (dsn,) = read_mail(spool, "alice@example.com")
    _, blocks, _ = dsn_fields(dsn)
    assert [b["Remote-MTA"] for b in blocks] == ["dns; mx.remote.test", "dns; mx2.remote.test"]


def deferred_file(queue, when, name=None):
    """A queue file put into deferred/ by another process, due at when."""
    name = name or mta.enqueue(queue.spool_dir, "alice@example.com", ["x@remote.test"], MESSAGE)
    os.utime(queue.path(mta.INCOMING, name), (when, when))
    os.rename(queue.path(mta.INCOMING, name), queue.path(mta.DEFERRED, name))
    return name


def settle(queue):
    """deferred/ last changed long ago, as on an idle spool."""
    os.utime(queue.path(mta.DEFERRED), (time.time() - 60, time.time() - 60))


def test_the_schedule_moves_what_a_stat_of_every_file_moves(spool, store, tmp_path):
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock)
    schedule = mta.DeferredSchedule(queue)
    offsets = [-50, -1, 0.5, 3, 3, 10, 20, 40, 1000]
    for offset in offsets:
        deferred_file(queue, clock.now + offset)
    other = str(tmp_path / "copy")
    shutil.copytree(spool, other, copy_function=shutil.copy2)
    plain = mta.Queue(other, hostname=HOSTNAME, clock=clock)
    start = clock.now
    for step in [0, 1, 2, 5, 9, 30, 60]:
        clock.now = start + step
        assert schedule.requeue_due() == plain.requeue_due()
        assert queue.ids(mta.DEFERRED) == plain.ids(mta.DEFERRED)
        assert queue.ids(mta.INCOMING) == plain.ids(mta.INCOMING)
        if step == 9:                                    # another writer's file, due at once
            name = deferred_file(queue, clock.now - 1)
            shutil.copy2(queue.path(mta.DEFERRED, name), plain.path(mta.DEFERRED, name))


def test_the_idle_schedule_stats_the_folder_only(spool, store, monkeypatch):
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock)
    schedule = mta.DeferredSchedule(queue)
    names = [deferred_file(queue, clock.now + 3600) for _ in range(5)]
    settle(queue)
    assert schedule.requeue_due() == 0
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(mta.os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    monkeypatch.setattr(mta.os, "scandir", lambda *a: pytest.fail("listed an unchanged folder"))
    for _ in range(3):
        assert schedule.requeue_due() == 0
    assert stats == [queue.path(mta.DEFERRED)] * 3
    monkeypatch.undo()
    clock.now += 3601
    assert schedule.requeue_due() == 5 and sorted(queue.ids(mta.INCOMING)) == sorted(names)


def test_a_file_another_process_defers_is_found_and_one_missed_waits_for_the_rescan(spool, store):
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock)
    router = mta.Router(queue, store)
    deferred_file(queue, clock.now + 3600)
    settle(queue)
    assert router.schedule.requeue_due() == 0
    found = deferred_file(queue, clock.now - 1)         # smtp_out or flush, say
    assert router.schedule.requeue_due() == 1 and queue.ids(mta.INCOMING) == [found]
    router.handle(found)
    # A change the folder's mtime does not show (two in one timestamp tick): the schedule
    # misses it until the rescan, which stats every file.
    settle(queue)
    assert router.schedule.requeue_due() == 0
    before = os.stat(queue.path(mta.DEFERRED))
    missed = deferred_file(queue, clock.now - 1)
    os.utime(queue.path(mta.DEFERRED), ns=(before.st_atime_ns, before.st_mtime_ns))
    assert router.schedule.requeue_due() == 0 and missed in queue.ids(mta.DEFERRED)
    router.schedule.next_rescan = time.monotonic()          # RESCAN_INTERVAL later
    assert router.schedule.requeue_due() == 1 and missed in queue.ids(mta.INCOMING)


def test_a_file_back_in_deferred_with_an_earlier_time_is_retried_on_time(spool, store):
    """The router forgets what it claims: the next stay in deferred/ is read afresh."""
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock)
    router = mta.Router(queue, store)
    name = deferred_file(queue, clock.now + 3600)
    settle(queue)
    router.schedule.requeue_due()
    assert queue.flush() == 1                                # another process moves it
    router.handle(name)                                      # on to outbound/
    with queue.claim_outbound(name) as claim:                # smtp_out defers it: 5 minutes
        claim.deferred(claim.groups["remote.test"][0], "451 4.4.1 no answer from host")
    when = os.stat(queue.path(mta.DEFERRED, name)).st_mtime
    assert when < clock.now + 3600
    settle(queue)
    clock.now = when + 0.001
    assert router.schedule.requeue_due() == 1


@pytest.mark.parametrize("mover", ["plain", "schedule"])
def test_five_day_retry_schedule_with_a_fake_clock(spool, store, mover):
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock)
    router = mta.Router(queue, store)
    requeue_due = queue.requeue_due if mover == "plain" else router.schedule.requeue_due
    arrival = clock.now
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test"], MESSAGE)
    router.handle(queue_id)
    attempts_at = []
    for _ in range(500):
        if queue.ids(mta.DEFERRED):
            when = os.stat(queue.path(mta.DEFERRED, queue_id)).st_mtime
            clock.now = when - 1
            assert requeue_due() == 0
            clock.now = when + 0.001
            assert requeue_due() == 1
        for name in queue.ids(mta.INCOMING):
            router.handle(name)        # the message itself, and the DSNs to alice
        if queue_id not in queue.ids(mta.OUTBOUND):
            break
        with queue.claim_outbound(queue_id) as claim:
            attempts_at.append(clock.now - arrival)
            claim.deferred(claim.groups["remote.test"][0], "451 4.4.1 no answer from host",
                           remote_mta="mx.remote.test")
    for name in queue.ids(mta.INCOMING):
        router.handle(name)
    assert queue_empty(spool)
    gaps = [round(b - a) for a, b in zip(attempts_at, attempts_at[1:])]
    assert gaps[:5] == [mta.retry_delay(n) for n in range(1, 6)] == [300, 600, 1200, 2400, 3600]
    assert set(gaps[5:]) == {3600}
    assert attempts_at[-2] < mta.QUEUE_LIFETIME <= attempts_at[-1]
    delayed, failed = sorted(read_mail(spool, "alice@example.com"),
                             key=lambda m: email.utils.parsedate_to_datetime(m["Date"]))
    assert delayed["Subject"] == "Delayed Mail (still being retried)"
    _, (block,), _ = dsn_fields(delayed)
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    until = email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp()
    assert abs(until - (arrival + mta.QUEUE_LIFETIME)) < 1
    warned_at = email.utils.parsedate_to_datetime(delayed["Date"]).timestamp() - arrival
    assert mta.DELAY_WARNING - 1 <= warned_at < mta.DELAY_WARNING + 3600
    _, (block,), _ = dsn_fields(failed)
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Diagnostic-Code"] == "smtp; 451 4.4.1 no answer from host"
    assert block["Remote-MTA"] == "dns; mx.remote.test"
    assert block["Will-Retry-Until"] is None


def test_retry_delay_doubles_from_five_minutes_to_an_hour():
    assert [mta.retry_delay(n) for n in range(1, 8)] == [300, 600, 1200, 2400, 3600, 3600, 3600]
    assert mta.parse_retry_schedule(mta.DEFAULTS["retry_schedule"]) == mta.RETRY_SCHEDULE


def test_retry_schedule_setting_takes_units_and_its_last_step_repeats():
    assert mta.parse_retry_schedule("30s, 2m 1.5h,1d") == (30, 120, 5400, 86400)
    assert mta.parse_retry_schedule("90") == (90,)
    assert [mta.retry_delay(n, (60, 120)) for n in range(1, 5)] == [60, 120, 120, 120]


@pytest.mark.parametrize("text", ["", " , ", "5x", "-5m", "0s", "5 m", "1e3", "m", "inf", "5m;1h"])
def test_bad_retry_schedule_is_a_clear_error(text):
    with pytest.raises(ValueError, match="retry_schedule"):
        mta.parse_retry_schedule(text)
    with pytest.raises(ValueError, match="retry_schedule"):
        mta.Queue("/nonexistent", retry_schedule=text)


def test_queue_defers_by_its_own_retry_schedule(spool, store):
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock, retry_schedule="1m,7m")
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test"], MESSAGE)
    mta.Router(queue, store).handle(queue_id)
    waits, folder = [], mta.OUTBOUND
    for _ in range(3):
        with queue.claim(folder, queue_id) as claim:
            (recipient,) = claim.recipients
            claim.deferred(recipient, "451 4.4.1 no answer", remote_mta="mx.remote.test")
            waits.append(recipient.next_attempt - clock.now)
        folder = mta.DEFERRED                  # where the claim filed it away
    assert waits == [60, 420, 420]


def test_mta_refuses_a_bad_retry_schedule_in_one_line(tmp_path, capsys):
    argv = ["--spool", str(tmp_path), "--retry-schedule", "5m,soon", "queue"]
    assert mta.main(argv) == mta.EX_CONFIG
    err = capsys.readouterr().err
    assert err == "mta: retry_schedule: 'soon' is not a wait such as 30s, 5m, 1h or 2d\n"


# --- Crash safety and concurrency ---

def test_torn_state_record_is_cut_before_the_next_append(spool, queue, store, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test", "bob@example.com"], MESSAGE)
    with open(queue.path(mta.INCOMING, queue_id), "ab") as f:
        f.write(b'{"event": "route", "from": 0, "rcpt": 0, "to": [{"kind": "loc')
    mta.Router(queue, store).handle(queue_id)
    with open(queue.path(mta.OUTBOUND, queue_id), "rb") as f:
        data = f.read()
    state = mta.parse_queue_file(data, queue_id)
    tail = data[state.message_offset + state.envelope.size:]
    records = [json.loads(line) for line in tail.splitlines()]
    assert [r["event"] for r in records] == ["route", "route", "delivered"]
    assert "cut an incomplete state record" in caplog.text
    assert len(maildir_files(spool, "bob@example.com")) == 1


def test_garbage_in_the_spool_is_quarantined_and_the_queue_moves_on(spool, router, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    incoming = os.path.join(spool, "queue", "incoming")
    os.makedirs(incoming, exist_ok=True)
    truncated = mta.envelope_bytes(mta.Envelope("0000000000000000A2", "alice@example.com",
                                                ["bob@example.com"], time.time(), size=100))
    garbage = {
        "0000000000000000A1": b"hello, I am not a queue file\n",
        "0000000000000000A2": truncated + b"only part of the message",
        "0000000000000000A3": b"MTA-Queue-File: 1\nQueue-ID: 0000000000000000A3\n\n",
        "0000000000000000A4": b"\xff\xfe" * 100,
        "notes.txt": b"a person left this here\n",
    }
    for name, data in garbage.items():
        with open(os.path.join(incoming, name), "wb") as f:
            f.write(data)
    os.mkdir(os.path.join(incoming, "0000000000000000A5"))
    os.mkfifo(os.path.join(incoming, "0000000000000000A6"))
    os.symlink("/etc/passwd", os.path.join(incoming, "0000000000000000A7"))
    mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    wait_for(lambda: len(os.listdir(os.path.join(spool, "queue", "quarantine"))) == 8)
    assert sorted(os.listdir(os.path.join(spool, "queue", "quarantine"))) == sorted(
        list(garbage) + ["0000000000000000A5", "0000000000000000A6", "0000000000000000A7"])
    wait_for(lambda: queue_empty(spool))
    assert len(maildir_files(spool, "bob@example.com")) == 1
    assert caplog.text.count("status=quarantined") == 8
    assert "message truncated" in caplog.text
    mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    wait_for(lambda: len(maildir_files(spool, "bob@example.com")) == 2)


def test_router_kill_9_mid_100_recipient_message_then_restart(tmp_path):
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    users = ["u%03d@example.com" % n for n in range(100)]
    write_users(spool, users)
    body = b"".join(b"line %05d of a larger message\r\n" % n for n in range(1500))
    queue_id = mta.enqueue(spool, "alice@example.com", users, MESSAGE + body)
    path = os.path.join(spool, "queue", "incoming", queue_id)
    router = start_router_process(spool, str(tmp_path / "router.log"))
    try:
        def delivered_records():
            try:
                with open(path, "rb") as f:
                    return f.read().count(b'"event": "delivered"')
            except FileNotFoundError:
                return 100
        wait_for(lambda: delivered_records() >= 20, timeout=60, interval=0.001)
        os.kill(router.pid, signal.SIGKILL)
        router.wait(timeout=10)
        recorded = delivered_records()
    finally:
        stop_process(router)
    on_disk = sum(len(maildir_files(spool, u)) for u in users)
    assert 20 <= recorded < 100, "the kill came after the whole message was delivered"
    assert on_disk - recorded <= 1                 # one delivery may lack its record...
    router = start_router_process(spool, str(tmp_path / "router.log"))
    try:
        wait_for(lambda: queue_empty(spool), timeout=60)
    finally:
        os.kill(router.pid, signal.SIGTERM)
        assert router.wait(timeout=20) == 0
    counts = [len(maildir_files(spool, u)) for u in users]
    duplicates = sum(counts) - len(users)
    assert min(counts) == 1, "a recipient got nothing"
    assert duplicates == 0, "%d duplicates" % duplicates     # ...and is not made again
    for user in users[:3] + users[-3:]:
        (message,) = read_mail(spool, user)[:1]
        assert message["Delivered-To"] == user


def test_a_delivery_whose_record_a_crash_lost_is_not_made_again(spool, queue, store, caplog):
    """The router died after the Maildir rename and before the queue file was removed (a
    one-pass delivery appends no record): the next router finds the file by its name, in
    cur/ where a POP3 session has filed it meanwhile, and delivers nothing."""
    caplog.set_level(logging.INFO, logger="mta")
    queue_id = mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    path = queue.path(mta.INCOMING, queue_id)
    with open(path, "rb") as f:
        left_by_the_crash = f.read()
    mta.Router(queue, store).handle(queue_id)
    delivered, = maildir_files(spool, "bob@example.com")
    assert queue_empty(spool)
    with open(path, "wb") as f:
        f.write(left_by_the_crash)
    cur = os.path.join(os.path.dirname(os.path.dirname(delivered)), "cur")
    os.rename(delivered, os.path.join(cur, os.path.basename(delivered) + ":2,S"))
    mta.Router(queue, store).handle(queue_id)       # the router, started again
    assert maildir_files(spool, "bob@example.com") == []
    assert os.listdir(cur) == [os.path.basename(delivered) + ":2,S"]
    assert queue_empty(spool)
    assert "status=delivered (%s)" % mta.R250_ALREADY_DELIVERED in caplog.text


def doorbells(run):
    return [name for name in os.listdir(run) if name.endswith(".sock")] \
        if os.path.isdir(run) else []


def test_two_router_processes_never_deliver_a_message_twice(tmp_path):
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    write_users(spool, ["bob@example.com", "carol@example.com"])
    routers = [start_router_process(spool, str(tmp_path / ("router%d.log" % n)), "--workers", "3")
               for n in range(2)]
    run = os.path.join(spool, "run")
    try:
        # A doorbell is bound once the signal handlers are in place: both routers are up.
        wait_for(lambda: len(doorbells(run)) == 2, timeout=30)
        for n in range(60):
            message = b"X-Test-Id: %d\r\n" % n + MESSAGE
            mta.enqueue(spool, "alice@example.com", ["bob@example.com", "carol@example.com"], message)
        wait_for(lambda: queue_empty(spool), timeout=90)
        wait_for(lambda: sum(len(maildir_files(spool, a)) for a in ("bob@example.com", "carol@example.com")) >= 120)
    finally:
        for router in routers:
            os.kill(router.pid, signal.SIGTERM)
        for router in routers:
            assert router.wait(timeout=20) == 0
    for address in ("bob@example.com", "carol@example.com"):
        ids = sorted(int(m["X-Test-Id"]) for m in read_mail(spool, address))
        assert ids == list(range(60))
    logs = [open(tmp_path / ("router%d.log" % n)).read() for n in range(2)]
    assert sum(log.count("status=delivered") for log in logs) == 120


def test_router_daemon_stops_cleanly_on_sigterm(tmp_path):
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    router = start_router_process(spool, str(tmp_path / "router.log"))
    run = os.path.join(spool, "run")
    try:
        wait_for(lambda: doorbells(run), timeout=20)
    finally:
        os.kill(router.pid, signal.SIGTERM)
        assert router.wait(timeout=20) == 0
    # The doorbell goes; the flow FIFO stays, for the smtp_in that may hold it open.
    assert os.listdir(run) == [mta.FLOW_FIFO]


def test_wake_removes_the_sockets_of_daemons_that_are_gone(spool):
    doorbell = mta.WakeSocket(spool, "mta")
    doorbell.sock.close()              # as if its process was killed: the file stays
    assert os.path.exists(doorbell.path)
    mta.wake(spool, "mta")
    assert not os.path.exists(doorbell.path)


def test_enqueue_rings_the_router_before_syncing_incoming_and_returns_after(spool, monkeypatch):
    events = []
    real_sync = mta._fsync_dir
    monkeypatch.setattr(mta, "wake", lambda spool_dir, role="mta", queue_id=None:
                        events.append("wake " + role))
    monkeypatch.setattr(mta, "_fsync_dir", lambda path: events.append("fsync " + os.path.basename(path))
                        or real_sync(path))
    mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    events.append("returned")
    assert events == ["wake mta", "fsync incoming", "returned"]


def test_a_failed_sync_of_incoming_fails_enqueue_and_leaves_nothing(spool, monkeypatch):
    def broken(path):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(mta, "_fsync_dir", broken)
    with pytest.raises(mta.SpoolError) as caught:
        mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
    assert caught.value.errno == errno.EIO
    assert queue_files(spool) == []
    assert os.listdir(os.path.join(spool, "queue", "tmp")) == []


def test_wake_lists_the_run_folder_again_only_when_it_changed(spool, monkeypatch):
    first = mta.WakeSocket(spool, "mta")
    run = os.path.dirname(first.path)
    old = time.time() - 60
    os.utime(run, (old, old))          # a folder quiet for a while: its listing is kept
    listings = []
    real_listdir = os.listdir
    monkeypatch.setattr(mta.os, "listdir", lambda path: listings.append(path) or real_listdir(path))
    try:
        for _ in range(3):
            mta.wake(spool, "mta")
            assert first.wait(5)
        assert listings.count(run) == 1
        second = mta.WakeSocket(spool, "mta")          # a daemon starts: run/ changes
        try:
            mta.wake(spool, "mta")
            assert first.wait(5) and second.wait(5)
            assert listings.count(run) == 2
        finally:
            second.close()
    finally:
        first.close()


def test_a_message_rings_only_the_router_process_whose_share_its_id_is_in(spool):
    shared = [mta.WakeSocket(spool, "mta", (number, 2)) for number in range(2)]
    plain = mta.WakeSocket(spool, "mta")               # a router of one process: every ring
    try:
        assert [os.path.basename(bell.path).rsplit(".", 2)[1] for bell in shared] == [
            "0of2", "1of2"]
        for _ in range(6):
            queue_id = plumbing.new_queue_id()
            mta.wake(spool, "mta", queue_id)
            owner = mta.share_of(queue_id, 2)
            assert shared[owner].wait(5) and plain.wait(5)
            assert not shared[1 - owner].wait(0.05)
        mta.wake(spool, "mta")                         # no id: every one
        assert all(bell.wait(5) for bell in shared + [plain])
    finally:
        for bell in shared + [plain]:
            bell.close()


def test_a_doorbell_bound_in_the_tick_of_a_listing_is_still_rung(spool):
    first = mta.WakeSocket(spool, "mta")
    try:
        mta.wake(spool, "mta")         # lists run/ within the same clock tick as the bind
        second = mta.WakeSocket(spool, "mta")
        try:
            mta.wake(spool, "mta")
            assert second.wait(5)
        finally:
            second.close()
    finally:
        first.close()


def test_a_doorbell_deeper_than_a_socket_address_allows_is_still_rung(tmp_path):
    spool = str(tmp_path / ("d" * 60) / ("e" * 60) / "spool")
    assert len(os.path.join(spool, "run", "mta.1.1.sock")) > mta.MAX_UNIX_PATH
    bell = mta.WakeSocket(spool, "mta")                # bound through /proc/self/fd
    try:
        assert os.path.exists(bell.path)
        mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)
        assert bell.wait(5)
    finally:
        bell.close()


def test_a_backlogged_router_still_routes_every_message_promptly(spool, queue, store):
    router = mta.Router(queue, store)
    runner = mta.QueueRunner(queue, mta.INCOMING, "mta", router.handle, workers=1, scan_interval=60.0)
    thread = threading.Thread(target=runner.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for(lambda: runner.doorbell is not None)
        ids = [mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE) for _ in range(60)]
        wait_for(lambda: len(maildir_files(spool, "bob@example.com")) == 60, timeout=30)
        wait_for(lambda: queue_empty(spool))
    finally:
        runner.stop(grace=5)
        thread.join(10)
    assert len(set(ids)) == 60


def run_sharing(queue, shares, count):
    """Run a QueueRunner of incoming/ for each share, (number, how many), with a handler that
    takes a file out of the folder; queue count messages. {name: [share numbers that
    handled it, in order]} and the names in the order handled."""
    handled, order, lock = {}, [], threading.Lock()

    def handler(number):
        def handle(name):
            with lock:
                handled.setdefault(name, []).append(number)
                order.append(name)
            os.unlink(queue.path(mta.INCOMING, name))
        return handle
    runners = []
    for share in shares:
        runner = mta.QueueRunner(queue, mta.INCOMING, "mta", handler(share[0]), workers=1,
                                 scan_interval=60.0)
        runner.share = share
        runners.append((runner, threading.Thread(target=runner.serve_forever, daemon=True)))
    for runner, thread in runners:
        thread.start()
        wait_for(lambda: runner.doorbell is not None)
    try:
        for _ in range(count):
            queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
        wait_for(lambda: not queue.ids(mta.INCOMING), timeout=30)
    finally:
        for runner, thread in runners:
            runner.stop(grace=5)
            thread.join(10)
    return handled, order


def test_runners_sharing_a_folder_each_take_the_names_that_hash_to_them(queue, monkeypatch):
    monkeypatch.setattr(mta, "STEAL_AFTER", 60.0)      # however slow the machine, no steals
    monkeypatch.setattr(mta, "STEAL_IDLE", 60.0)
    handled, _ = run_sharing(queue, [(0, 2), (1, 2)], 40)
    assert len(handled) == 40
    for name, numbers in handled.items():
        assert numbers == [zlib.crc32(name.encode()) % 2], name


def test_a_runner_takes_the_names_of_a_share_whose_process_is_gone_once_they_waited(
        queue, monkeypatch):
    monkeypatch.setattr(mta, "STEAL_IDLE", 60.0)       # only STEAL_AFTER, for this one
    handled, order = run_sharing(queue, [(0, 2)], 20)
    others = [name for name in order if zlib.crc32(name.encode()) % 2 == 1]
    assert others and len(others) < 20
    assert all(numbers == [0] for numbers in handled.values()) and len(handled) == 20
    assert order[-len(others):] == others    # its own first; the others' after STEAL_AFTER


def test_a_runner_with_a_worker_free_takes_another_shares_names_soon(queue, monkeypatch):
    monkeypatch.setattr(mta, "STEAL_AFTER", 60.0)      # not this way, in this test
    started = time.monotonic()
    handled, order = run_sharing(queue, [(0, 2)], 20)
    assert len(handled) == 20 and all(numbers == [0] for numbers in handled.values())
    assert any(zlib.crc32(name.encode()) % 2 == 1 for name in order)
    assert time.monotonic() - started < 30


# --- A full disk ---

def test_full_disk_enqueue_raises_enospc_and_leaves_nothing(tmp_path):
    """A real ENOSPC: the spool on a 256 KiB tmpfs (needs root to mount)."""
    mount_point = str(tmp_path / "small")
    os.makedirs(mount_point)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount_point],
                            capture_output=True, timeout=30)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.decode().strip())
    try:
        spool = os.path.join(mount_point, "spool")
        with pytest.raises(mta.SpoolError) as caught:
            mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE + b"x" * 1024 * 1024)
        assert caught.value.errno == errno.ENOSPC
        assert isinstance(caught.value, OSError)
        assert queue_files(spool) == []
        assert os.listdir(os.path.join(spool, "queue", "tmp")) == []
        mta.enqueue(spool, "alice@example.com", ["bob@example.com"], MESSAGE)   # room for a small one
        assert len(queue_files(spool)) == 1
    finally:
        subprocess.run(["umount", mount_point], capture_output=True, timeout=30)


def test_file_size_limit_enqueue_raises_spool_error_and_leaves_nothing(spool):
    """The same error path without root: RLIMIT_FSIZE makes write() fail with EFBIG."""
    script = ("import resource, signal, sys, mta\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
              "try:\n"
              "    mta.enqueue(sys.argv[1], 'alice@example.com', ['bob@example.com'], b'x' * 200000)\n"
              "except mta.SpoolError as exc:\n"
              "    print(exc.errno)\n")
    result = subprocess.run([sys.executable, "-c", script, spool], cwd=ROOT, capture_output=True,
                            timeout=30)
    assert result.stdout.decode().strip() == str(errno.EFBIG), result.stderr.decode()
    assert queue_files(spool) == []
    assert os.listdir(os.path.join(spool, "queue", "tmp")) == []


# --- The admin CLI ---

def test_queue_listing_shows_each_recipient_state_in_text_and_json(spool, queue, store):
    waiting = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    routed = queue.enqueue("carol@example.com", ["x@remote.test"], MESSAGE)
    mta.Router(queue, store).handle(routed)
    with queue.claim_outbound(routed) as claim:
        claim.deferred(claim.groups["remote.test"][0], "451 4.7.1 Greylisted, try later",
                       remote_mta="mx.remote.test", relay="mx.remote.test[192.0.2.7]:25")
    result = run_cli(spool, "queue")
    assert result.returncode == 0
    text = result.stdout.decode()
    assert waiting in text and routed in text
    assert "<bob@example.com> unrouted pending" in text
    assert "<x@remote.test> remote deferred, 1 attempt, next " in text
    assert "(451 4.7.1 Greylisted, try later)" in text
    assert " in 2 messages" in text
    result = run_cli(spool, "queue", "--json")
    report = json.loads(result.stdout)
    by_id = {m["queue_id"]: m for m in report["messages"]}
    assert by_id[waiting]["folder"] == "incoming"
    (r,) = by_id[routed]["recipients"]
    assert (r["status"], r["dsn"], r["remote_mta"], r["attempts"]) == ("deferred", "4.7.1", "mx.remote.test", 1)
    assert r["relay"] == "mx.remote.test[192.0.2.7]:25"
    assert r["next_attempt"] > time.time() + 200
    assert by_id[routed]["sender"] == "carol@example.com"
    assert report["quarantined"] == []


@pytest.mark.parametrize("as_json", [False, True])
def test_queue_listing_prints_each_chunk_before_reading_the_next(spool, queue, monkeypatch,
                                                                capsys, as_json):
    ids = [queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE) for _ in range(3)]
    monkeypatch.setattr(mta, "LISTING_CHUNK", 1)
    real_read_entries = queue.read_entries
    printed = []

    def read_entries(folder, names):
        printed.append(capsys.readouterr().out)           # what was out before these files
        yield from real_read_entries(folder, names)
    monkeypatch.setattr(queue, "read_entries", read_entries)
    assert mta.print_queue(queue, as_json) == 0
    rest = capsys.readouterr().out
    assert ids[0] in printed[1] and ids[1] in printed[2]          # streamed, not gathered
    whole = "".join(printed) + rest
    if as_json:
        assert json.loads(whole) == {"messages": mta.queue_report(queue), "quarantined": []}
    else:
        assert whole.endswith(" in 3 messages\n")


def write_deferred(spool, count):
    """COUNT deferred queue files written directly (no fsync each: a test's big queue)."""
    now = time.time()
    for number in range(count):
        queue_id = "%018X" % (0x661F000000000000 + number)
        data = b"Subject: %d\r\n\r\nhi\r\n" % number
        envelope = mta.Envelope(queue_id, "bench@example.com", ["x%d@remote.test" % number],
                                now - 60, len(data), "127.0.0.1", "client.test", "", "ESMTP")
        records = mta.record_bytes(
            {"event": "route", "from": 0, "rcpt": 0, "at": now - 59,
             "to": [{"kind": "remote", "address": "x%d@remote.test" % number}]},
            {"event": "deferred", "rcpt": 0, "at": now - 58, "next": now + 3600 + number,
             "dsn": "4.4.1", "mta": "", "relay": "", "reply": "451 4.4.1 try later"})
        with open(os.path.join(spool, "queue", "deferred", queue_id), "wb") as f:
            f.write(mta.envelope_bytes(envelope) + data + records)


@pytest.mark.parametrize("as_json", [False, True])
def test_queue_listing_read_by_several_processes_is_the_listing_of_one(spool, queue, as_json):
    queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)     # incoming/ too
    write_deferred(spool, 2 * mta.LISTING_CHUNK + 7)           # three chunks, the last short
    with open(os.path.join(spool, "queue", "deferred", "FFFFFFFFFFFFFFFFFF"), "wb") as f:
        f.write(b"not a queue file")                           # listed as unreadable
    option = ["--json"] if as_json else []
    one = run_cli(spool, "--processes", "1", "queue", *option)
    three = run_cli(spool, "--processes", "3", "queue", *option)
    assert one.returncode == three.returncode == 0 and three.stderr == b""
    assert three.stdout == one.stdout
    if as_json:
        messages = json.loads(three.stdout)["messages"]
        assert len(messages) == 2 * mta.LISTING_CHUNK + 9
        assert [m["queue_id"] for m in messages] == queue.ids(mta.INCOMING) + queue.ids(mta.DEFERRED)
    else:
        assert three.stdout.decode().endswith(" in %d messages\n" % (2 * mta.LISTING_CHUNK + 9))
        assert b"FFFFFFFFFFFFFFFFFF   deferred         16  (unreadable)" in three.stdout


def failing_on_item_one(item):
    if item == 1:
        raise RuntimeError("a reading process fails")
    return item * 10


def test_a_listing_process_that_fails_is_an_error_not_a_short_listing():
    results = mta._in_processes(failing_on_item_one, [0, 1, 2, 3], 2)
    assert next(results) == 0
    with pytest.raises(OSError, match="ended early"):
        next(results)                       # item 1 was the child's
    assert support.children_of(os.getpid()) == []


def test_a_listing_stopped_early_leaves_no_process_behind():
    results = mta._in_processes(lambda item: "x" * 100000, list(range(200)), 3)
    assert next(results) == "x" * 100000
    started = time.monotonic()
    results.close()                         # the reader had enough (`mta.py queue | head`)
    assert time.monotonic() - started < 5
    assert support.children_of(os.getpid()) == []


def test_flush_makes_deferred_recipients_due_and_wakes_smtp_out(spool, queue, store):
    queue_id = queue.enqueue("alice@example.com", ["x@remote.test"], MESSAGE)
    router = mta.Router(queue, store)
    router.handle(queue_id)
    with queue.claim_outbound(queue_id) as claim:
        claim.deferred(claim.groups["remote.test"][0], "421 4.4.2 timeout")
    assert queue.ids(mta.DEFERRED) == [queue_id]
    doorbell = mta.WakeSocket(spool, "smtp_out")
    try:
        result = run_cli(spool, "flush")
        assert result.returncode == 0 and b"1 deferred message flushed" in result.stdout
        assert doorbell.wait(5)
    finally:
        doorbell.close()
    router.handle(queue_id)
    claim = queue.claim_outbound(queue_id)
    with claim:
        assert [r.address for r in claim.groups["remote.test"]] == ["x@remote.test"]
        claim.delivered(claim.groups["remote.test"][0], "250 ok", remote_mta="mx.remote.test")
    assert queue_empty(spool)


def test_delete_removes_one_message_or_all_and_logs_it(spool, queue):
    first = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    queue.enqueue("alice@example.com", ["carol@example.com"], MESSAGE)
    queue.enqueue("alice@example.com", ["x@remote.test"], MESSAGE)
    result = run_cli(spool, "delete", first)
    assert result.returncode == 0
    assert ("%s: removed (deleted by the administrator)" % first).encode() in result.stderr
    assert run_cli(spool, "delete", first).returncode == 1
    assert run_cli(spool, "delete").returncode == mta.EX_USAGE
    result = run_cli(spool, "delete", "--all")
    assert result.returncode == 0 and b"2 messages deleted" in result.stdout
    assert queue_empty(spool)


def test_sendmail_t_reads_to_cc_bcc_removes_bcc_and_adds_missing_fields(spool):
    text = (b"To: Bob <bob@example.com>, carol\nCc: \"X\" <x@remote.test>\nBcc: dave@other.test\n"
            b"Subject: report\n\nline one\n.\nafter the dot\n")
    result = run_cli(spool, "sendmail", "-t", "-f", "cron@example.com", stdin=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""         # cron mails any output
    ((folder, queue_id),) = queue_files(spool)
    with open(os.path.join(spool, "queue", folder, queue_id), "rb") as f:
        state = mta.parse_queue_file(f.read(), queue_id)
        f.seek(state.message_offset)
        message_bytes = f.read(state.envelope.size)
    assert state.envelope.sender == "cron@example.com"
    assert state.envelope.recipients == ["bob@example.com", "carol@example.com", "x@remote.test",
                                         "dave@other.test"]
    assert state.envelope.protocol == "local"
    assert b"\r\n" in message_bytes and b"\n" not in message_bytes.replace(b"\r\n", b"")
    message = email.message_from_bytes(message_bytes)
    assert message["Bcc"] is None and b"dave" not in message_bytes
    assert message["From"] == "cron@example.com"
    assert message["Message-ID"] == "<%s@%s>" % (queue_id, HOSTNAME)
    assert email.utils.parsedate_to_datetime(message["Date"])
    assert message["Received"].startswith("by %s (mta.py sendmail" % HOSTNAME)
    assert message.get_payload() == "line one\r\n"                # "." alone ended it
    result = run_cli(spool, "sendmail", "-oi", "bob", stdin=b"Subject: x\n\nline one\n.\nafter the dot\n")
    assert result.returncode == 0
    newest = max(name for _, name in queue_files(spool))
    with open(os.path.join(spool, "queue", "incoming", newest), "rb") as f:
        data = f.read()
    assert data.endswith(b"line one\r\n.\r\nafter the dot\r\n")
    assert mta.parse_queue_file(data, newest).envelope.recipients == ["bob@example.com"]


def test_sendmail_exit_codes_follow_sysexits(spool, tmp_path):
    assert run_cli(spool, "sendmail", stdin=b"Subject: x\n\nno one\n").returncode == mta.EX_USAGE
    assert run_cli(spool, "sendmail", "-t", stdin=b"Subject: x\n\nno one\n").returncode == mta.EX_USAGE
    assert run_cli(spool, "sendmail", "-Z", "bob").returncode == mta.EX_USAGE
    assert run_cli(spool, "sendmail", "bad address@@x", stdin=b"x\n").returncode == mta.EX_DATAERR
    result = run_cli(spool, "--max-size", "100", "sendmail", "bob", stdin=b"x" * 200)
    assert result.returncode == mta.EX_DATAERR
    blocked = str(tmp_path / "a-file")
    open(blocked, "w").close()
    result = run_cli(os.path.join(blocked, "spool"), "sendmail", "bob", stdin=b"Subject: x\n\nhi\n")
    assert result.returncode == mta.EX_CONFIG and b"no spool at" in result.stderr
    assert queue_empty(spool)


# --- Pure helpers ---

def test_prepare_submission_keeps_the_body_and_folded_fields():
    data = (b"From alice Mon Jan  1 00:00:00 2024\nFrom: Alice <alice@example.com>\n"
            b"To: bob@example.com,\n  carol@example.com\nBcc: x@y.test,\n\tz@y.test\n\nbody\n")
    message, recipients = mta.prepare_submission(data, sender="alice@example.com", queue_id="Q1",
                                                 hostname=HOSTNAME, now=0, extract=True)
    assert recipients == ["bob@example.com", "carol@example.com", "x@y.test", "z@y.test"]
    assert message.count(b"From: ") == 1 and b"Bcc" not in message and b"z@y.test" not in message
    assert message.endswith(b"\r\n\r\nbody\r\n")
    assert b"To: bob@example.com,\r\n  carol@example.com\r\n" in message
    message, _ = mta.prepare_submission(b"no header at all\n", sender="a@b.test", queue_id="Q2",
                                        hostname=HOSTNAME, now=0, full_name="A Person")
    assert message.endswith(b"Message-ID: <Q2@%s>\r\n\r\nno header at all\r\n" % HOSTNAME.encode())
    assert b"From: A Person <a@b.test>\r\n" in message


def test_dsn_fields_stay_ascii_for_utf8_addresses_and_replies():
    envelope = mta.Envelope("Q1", "s@example.com", ["j\u00f6rg@example.com"], time.time(),
                            client_helo="h\u00e9lo.test", client_address="192.0.2.7")
    recipient = mta.Recipient(0, "j\u00f6rg@example.com", "j\u00f6rg@example.com", "local",
                              status="failed", reply="550 5.1.1 N\u00fcscht", dsn="5.1.1")
    data = mta.build_dsn(envelope, b"Subject: x\r\n", [recipient], action="failed",
                         hostname=HOSTNAME, to="s@example.com", now=time.time())
    per_message, (block,), _ = dsn_fields(email.message_from_bytes(data))
    # RFC 6533 3: the utf-8 address type, non-ASCII as \x{HEX}, never RFC 2047 words.
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.com"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 N\\x{FC}scht"
    assert per_message["Received-From-MTA"] == "dns; h\\x{E9}lo.test (192.0.2.7)"


def test_state_records_edited_by_hand_are_skipped_not_obeyed(spool, queue, store, caplog):
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    with open(queue.path(mta.INCOMING, queue_id), "ab") as f:
        f.write(b'{"event": "route", "from": -1, "rcpt": 0, "to": []}\n'
                b'{"event": "delivered", "rcpt": -1, "at": 1}\nnot json at all\n')
    mta.Router(queue, store).handle(queue_id)
    assert "skipped 3 unreadable state records" in caplog.text
    assert len(maildir_files(spool, "bob@example.com")) == 1
    assert queue_empty(spool)


def test_bare_postmaster_reaches_the_postmaster_of_the_first_domain(spool, router):
    mta.enqueue(spool, "x@remote.test", ["postmaster"], MESSAGE)
    wait_for(lambda: maildir_files(spool, "alice@example.com"))
    wait_for(lambda: queue_empty(spool))


def test_no_delay_notice_about_a_bounce(spool, store):
    clock = FakeClock()
    queue = mta.Queue(spool, hostname=HOSTNAME, clock=clock)
    queue_id = queue.enqueue("", ["x@remote.test"], MESSAGE)
    mta.Router(queue, store).handle(queue_id)
    clock.now += mta.DELAY_WARNING + 1
    with queue.claim_outbound(queue_id) as claim:
        claim.deferred(claim.groups["remote.test"][0], "451 4.4.1 later")
    assert queue.ids(mta.INCOMING) == []          # no DSN queued
    ((_, _, _, state),) = queue.listing()
    assert state.recipients[0].warned


def test_build_dsn_status_codes_lose_leading_zeros_and_reject_garbage():
    assert mta.normal_status("5.01.001") == "5.1.1"
    assert mta.reply_status("550 5.7.1 no") == "5.7.1"
    assert mta.reply_status("451 try later") == "4.0.0"
    assert mta.reply_status("garbage", "5.0.0") == "5.0.0"
    with pytest.raises(ValueError):
        mta.normal_status("5.1")


# --- Header fields prepended at commit (the "prepend" record) ---

SIGNATURE_FIELDS = ("DKIM-Signature: v=1; a=ed25519-sha256; d=example.com; s=sel;\r\n"
                    "\tb=c2lnbmF0dXJl\r\nAuthentication-Results: mail.example.com; none\r\n")


def test_prepend_is_a_record_after_the_message_and_message_size_stays_as_received(spool, queue):
    with mta.QueueWriter(spool, "alice@example.com", ["x@remote.test"]) as writer:
        writer.write(MESSAGE)
        writer.prepend(SIGNATURE_FIELDS.split("Authentication")[0])
        writer.prepend("Authentication" + SIGNATURE_FIELDS.split("Authentication")[1])
        queue_id = writer.commit()
    with open(queue.path(mta.INCOMING, queue_id), "rb") as f:
        data = f.read()
    state = mta.parse_queue_file(data, queue_id)
    assert state.envelope.size == len(MESSAGE)
    assert data[state.message_offset:state.message_offset + len(MESSAGE)] == MESSAGE
    record = json.loads(data[state.message_offset + len(MESSAGE):].split(b"\n")[0])
    # Each prepend() goes on top of the ones before it.
    assert record["event"] == "prepend"
    assert record["text"] == ("Authentication" + SIGNATURE_FIELDS.split("Authentication")[1]
                              + SIGNATURE_FIELDS.split("Authentication")[0])
    with queue.claim(mta.INCOMING, queue_id) as claim:
        assert len(claim.message) == len(record["text"]) + len(MESSAGE)
        assert claim.message.read() == record["text"].encode() + MESSAGE
        assert claim.message.header().startswith(record["text"].encode())
        assert claim.message.header().endswith(b"Message-ID: <m1@example.com>\r\n")
        assert claim.message.header(20) == record["text"].encode()[:20]


def test_a_queue_writer_reads_back_what_it_wrote_before_commit(spool, queue):
    big = b"Subject: big\r\n\r\n" + b"y" * (2 * mta.COPY_BLOCK + 7) + b"\r\n"
    for message in (MESSAGE, big):
        with mta.QueueWriter(spool, "alice@example.com", ["bob@example.com"]) as writer:
            for offset in range(0, len(message), 1000):
                writer.write(message[offset:offset + 1000])
            assert b"".join(writer.blocks()) == message
            assert b"".join(writer.blocks(7)) == message
            writer.commit()


def test_a_prepended_message_is_delivered_locally_with_the_fields_on_top(spool, queue, store):
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE,
                             prepend=SIGNATURE_FIELDS)
    mta.Router(queue, store).handle(queue_id)
    delivered, = maildir_files(spool, "bob@example.com")
    with open(delivered, "rb") as f:
        assert f.read() == (b"Return-Path: <alice@example.com>\r\n"
                            b"Delivered-To: bob@example.com\r\n"
                            + SIGNATURE_FIELDS.encode() + MESSAGE)
    assert queue_empty(spool)


def test_a_dsn_returns_the_prepended_fields_with_the_header(spool, queue, store):
    queue_id = queue.enqueue("alice@example.com", ["ghost@example.com"], MESSAGE,
                             prepend=SIGNATURE_FIELDS)
    router = mta.Router(queue, store)
    router.handle(queue_id)
    for dsn_id in queue.ids(mta.INCOMING):
        router.handle(dsn_id)
    (dsn,) = read_mail(spool, "alice@example.com")
    _, _, headers = dsn_fields(dsn)
    assert headers.startswith(b"DKIM-Signature: v=1;") and b"Subject: hello" in headers


@pytest.mark.parametrize("text", [
    "", "no colon here\r\n", "Subject: no line end", "Subject: bare\nLF\r\n",
    "Subject: bare\rCR\r\n", "Subject: x\r\n\r\nbody\r\n", " continued: first\r\n",
    "Subject: nul\x00\r\n", "X-Big: " + "x" * mta.MAX_PREPEND + "\r\n", b"Subject: bytes\r\n"])
def test_prepend_refuses_what_is_not_header_fields(spool, text):
    with mta.QueueWriter(spool, "alice@example.com", ["bob@example.com"]) as writer:
        writer.write(MESSAGE)
        with pytest.raises(ValueError):
            writer.prepend(text)
        writer.prepend("X-Fine: yes\r\n\tfolded\r\n")


@pytest.mark.parametrize("record", [
    b'{"event": "prepend", "text": "no colon\\r\\n"}\n',
    b'{"event": "prepend", "text": 5}\n',
    b'{"event": "prepend"}\n',
    b'{"event": "prepend", "text": "X-A: 1\\r\\nX-B',                  # torn
])
def test_a_bad_or_torn_prepend_record_is_skipped_like_any_bad_record(spool, queue, store, record):
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    with open(queue.path(mta.INCOMING, queue_id), "ab") as f:
        f.write(record)
    with open(queue.path(mta.INCOMING, queue_id), "rb") as f:
        state = mta.parse_queue_file(f.read(), queue_id)
    assert state.prepend == b"" and (state.bad_records or state.torn_tail)
    mta.Router(queue, store).handle(queue_id)
    delivered, = maildir_files(spool, "bob@example.com")
    with open(delivered, "rb") as f:
        assert f.read().endswith(b"Delivered-To: bob@example.com\r\n" + MESSAGE)


def test_a_prepend_record_after_other_records_is_not_obeyed(spool, queue):
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    with open(queue.path(mta.INCOMING, queue_id), "ab") as f:
        f.write(b'{"event": "flush", "at": 1}\n{"event": "prepend", "text": "X-Late: 1\\r\\n"}\n')
    with open(queue.path(mta.INCOMING, queue_id), "rb") as f:
        state = mta.parse_queue_file(f.read(), queue_id)
    assert state.prepend == b"" and state.bad_records == 1


def test_an_old_queue_file_without_a_prepend_record_reads_as_before(spool, queue):
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    with queue.claim(mta.INCOMING, queue_id) as claim:
        assert claim.message.read() == MESSAGE and len(claim.message) == len(MESSAGE)


# --- Queue files used again (free/) ---

def free_files(spool):
    return sorted(os.listdir(os.path.join(spool, "queue", mta.FREE)))


def read_mail_bodies(spool, address):
    bodies = []
    for path in maildir_files(spool, address):
        with open(path, "rb") as f:
            bodies.append(f.read())
    return bodies


def test_a_finished_small_file_goes_into_free_as_it_is_and_the_next_message_is_written_over_it(
        spool, queue, store):
    long_message = MESSAGE + b"x" * 2000 + b"\r\n"
    first = queue.enqueue("alice@example.com", ["bob@example.com"], long_message)
    path = queue.path(mta.INCOMING, first)
    inode, size = os.stat(path).st_ino, os.stat(path).st_size
    assert size <= mta.FREE_KEEP
    mta.Router(queue, store).handle(first)
    assert queue_empty(spool) and free_files(spool) == [first]
    assert os.path.getsize(os.path.join(spool, "queue", mta.FREE, first)) >= size   # kept
    assert os.listdir(queue.path(mta.TMP)) == []
    # A shorter message, written over it: nothing of the first may be left after its end.
    second = queue.enqueue("carol@example.com", ["bob@example.com"], MESSAGE)
    assert free_files(spool) == [] and os.listdir(queue.path(mta.TMP)) == []
    path = queue.path(mta.INCOMING, second)
    assert os.stat(path).st_ino == inode                  # the same file, used again
    with open(path, "rb") as f:
        data = f.read()
    assert b"x" * 100 not in data and len(data) < size
    state = mta.parse_queue_file(data, second)
    assert state.envelope.sender == "carol@example.com" and state.recipients == []
    assert state.envelope.size == len(MESSAGE)
    mta.Router(queue, store).handle(second)
    bodies = read_mail_bodies(spool, "bob@example.com")
    assert sum(body.endswith(long_message) for body in bodies) == 1
    assert sum(body.endswith(MESSAGE) and not body.endswith(long_message) for body in bodies) == 1
    # And a longer one over that: written whole.
    third = queue.enqueue("dave@example.com", ["bob@example.com"], long_message + b"more\r\n")
    assert os.stat(queue.path(mta.INCOMING, third)).st_ino == inode
    mta.Router(queue, store).handle(third)
    assert any(body.endswith(long_message + b"more\r\n")
               for body in read_mail_bodies(spool, "bob@example.com"))


def test_a_finished_large_file_is_emptied_before_a_writer_can_take_it(spool, queue, store,
                                                                       monkeypatch):
    """A file over FREE_KEEP is emptied, so that free/ never holds much disk; emptied once in
    free/, it could be emptied under a writer that took it meanwhile."""
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"],
                             MESSAGE + b"x" * mta.FREE_KEEP + b"\r\n")
    real_ftruncate = os.ftruncate
    seen = []

    def ftruncate(fd, length):
        seen.append(free_files(spool))                   # what writers could take now
        return real_ftruncate(fd, length)
    monkeypatch.setattr(mta.os, "ftruncate", ftruncate)
    mta.Router(queue, store).handle(queue_id)
    assert seen == [[]] and free_files(spool) == [queue_id]
    assert os.path.getsize(os.path.join(spool, "queue", mta.FREE, queue_id)) == 0
    assert os.listdir(queue.path(mta.TMP)) == []


def test_free_holds_at_most_free_files_and_the_rest_are_unlinked(spool, queue, store, monkeypatch):
    monkeypatch.setattr(mta, "FREE_FILES", 3)
    monkeypatch.setattr(mta, "FREE_RECOUNT", 1)
    ids = [queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE) for _ in range(6)]
    router = mta.Router(queue, store)
    for queue_id in ids:
        router.handle(queue_id)
    assert len(free_files(spool)) == 3 and queue_empty(spool)
    assert os.listdir(queue.path(mta.TMP)) == []
    assert len(maildir_files(spool, "bob@example.com")) == 6


def test_a_spool_without_free_removes_finished_files_as_before(spool, queue, store):
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    os.rmdir(os.path.join(spool, "queue", mta.FREE))      # a spool made by an older version
    mta.Router(queue, store).handle(queue_id)
    assert queue_empty(spool) and not os.path.exists(os.path.join(spool, "queue", mta.FREE))
    assert os.listdir(queue.path(mta.TMP)) == []
    assert queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)   # made anew


def test_what_free_holds_besides_emptied_files_is_passed_over(spool, queue):
    free = os.path.join(spool, "queue", mta.FREE)
    queue.create()
    os.mkdir(os.path.join(free, "a-folder"))              # cannot be linked: not a file
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    with open(queue.path(mta.INCOMING, queue_id), "rb") as f:
        assert mta.parse_queue_file(f.read(), queue_id).envelope.size == len(MESSAGE)
    assert free_files(spool) == ["a-folder"]


def test_a_writer_keeps_a_free_file_only_when_it_removed_its_free_name(spool, queue, monkeypatch):
    """Two writers that linked the same free/ file: the one whose unlink() of the free/ name
    failed (the other's came first) lets it go and writes a file of its own."""
    queue.create()
    free = os.path.join(spool, "queue", mta.FREE)
    other = queue.path(mta.TMP, "0000000000000000F2")    # the other writer's link
    open(os.path.join(free, "0000000000000000F1"), "wb").close()
    real_unlink = os.unlink

    def unlink_after_the_other_writer(path, *args, **kwargs):
        if os.path.dirname(path) == free:
            os.link(path, other)                          # the other writer linked it too,
            real_unlink(path)                             # and its unlink() came first
        return real_unlink(path, *args, **kwargs)
    monkeypatch.setattr(mta.os, "unlink", unlink_after_the_other_writer)
    queue_id = queue.enqueue("alice@example.com", ["bob@example.com"], MESSAGE)
    monkeypatch.undo()
    path = queue.path(mta.INCOMING, queue_id)
    assert os.stat(path).st_ino != os.stat(other).st_ino
    assert os.path.getsize(other) == 0                    # nothing written into the other's
    with open(path, "rb") as f:
        assert mta.parse_queue_file(f.read(), queue_id).envelope.size == len(MESSAGE)
    assert os.listdir(queue.path(mta.TMP)) == ["0000000000000000F2"]


def test_writers_and_routers_at_once_lose_and_mix_up_nothing(spool, queue, store):
    """Eight writers queue while two routers deliver and put the files back in free/: every
    message reaches the Maildir whole, once, and nothing is quarantined."""
    routers = [mta.Router(queue, store) for _ in range(2)]
    sent = {}
    lock = threading.Lock()
    done = threading.Event()

    def writer(number):
        for k in range(40):
            body = b"Subject: %d.%d\r\n\r\nbody %d.%d\r\n" % (number, k, number, k)
            queue_id = mta.enqueue(spool, "alice@example.com", ["bob@example.com"], body)
            with lock:
                sent[queue_id] = body

    def router(r):
        while not done.is_set() or queue.ids(mta.INCOMING):
            for queue_id in queue.ids(mta.INCOMING):
                try:
                    r.handle(queue_id)
                except mta.QueueBusy:
                    pass
            time.sleep(0.001)
    threads = [threading.Thread(target=router, args=(r,)) for r in routers]
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads + writers:
        thread.start()
    for thread in writers:
        thread.join(120)
    done.set()
    for thread in threads:
        thread.join(120)
    assert len(sent) == 320 and queue_empty(spool)
    assert os.listdir(queue.path(mta.QUARANTINE)) == []
    bodies = read_mail_bodies(spool, "bob@example.com")
    assert len(bodies) == 320
    assert sorted(body.split(b"\r\n", 2)[2] for body in bodies) == sorted(sent.values())
    assert free_files(spool) and os.listdir(queue.path(mta.TMP)) == []
