"""Flow control (in_flow_delay): smtp_in keeps to the router's pace.

A real router process (`mta.py`) and smtp_in servers on 127.0.0.1 driven by smtplib. The
router is stopped with SIGSTOP to play one that falls behind, and goes on with SIGCONT.
"""

import fcntl
import os
import signal
import smtplib
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

import mta
from smtpin_support import (  # noqa: F401  (fixtures)
    DOMAIN, HOSTNAME, maildir_messages, message, spool, start_smtp, store_template)
from support import ROOT, SLACK, listening_port, wait_for

QUICK = 0.25                       # seconds; a MAIL that took no token answers well within


@pytest.fixture
def router(spool):
    """A router process on the spool, its tokens put; stopped (SIGKILL) after the test."""
    log_path = os.path.join(os.path.dirname(spool), "router.log")
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool, "--domain",
             DOMAIN, "--hostname", HOSTNAME, "--scan-interval", "1", "--processes", "1"],
            stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait_for(lambda: tokens(spool) == mta.FLOW_TOKENS, 20, "the router's tokens")
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def tokens(spool):
    """The tokens in SPOOL/run/flow now, or None before the router made it."""
    path = os.path.join(spool, mta.RUN_DIR, mta.FLOW_FIFO)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    finally:
        os.close(fd)


def timed_mail(client):
    """Seconds MAIL took to answer 250; one message sent to bob after it."""
    client.ehlo_or_helo_if_needed()
    started = time.monotonic()
    code, _ = client.mail("someone@example.org")
    waited = time.monotonic() - started
    assert code == 250
    assert client.rcpt("bob@example.com")[0] == 250
    assert client.data(message())[0] == 250
    return waited


def test_mail_waits_for_a_router_that_falls_behind_then_goes_on_when_it_routes(
        spool, start_smtp, router):
    patient = start_smtp(in_flow_delay=0.5)
    very_patient = start_smtp(in_flow_delay=30)
    os.kill(router.pid, signal.SIGSTOP)
    sent = 0
    with smtplib.SMTP("127.0.0.1", patient.port, timeout=30) as client:
        # The router's tokens let smtp_in run FLOW_TOKENS messages ahead of it.
        for _ in range(mta.FLOW_TOKENS):
            assert timed_mail(client) < QUICK
            sent += 1
        assert tokens(spool) == 0
        # Then a MAIL waits for it, in_flow_delay at most, and is accepted all the same.
        waited = timed_mail(client)
        sent += 1
        assert 0.45 <= waited < 0.5 + SLACK
    # A MAIL that may wait long goes on as soon as the router routes again.
    with smtplib.SMTP("127.0.0.1", very_patient.port, timeout=60) as client:
        client.ehlo()                  # before the clock starts: only MAIL may wait
        threading.Timer(0.5, os.kill, (router.pid, signal.SIGCONT)).start()
        waited = timed_mail(client)
        sent += 1
        assert 0.45 <= waited < 0.5 + SLACK
    # Every message routed once, and the tokens topped up again.
    wait_for(lambda: len(maildir_messages(spool, "bob@example.com")) == sent, 60,
             "%d messages in bob's Maildir" % sent)
    wait_for(lambda: tokens(spool) == mta.FLOW_TOKENS, 20, "the tokens topped up")
    time.sleep(0.5)
    assert len(maildir_messages(spool, "bob@example.com")) == sent


def test_the_worker_processes_of_smtp_in_share_the_tokens(spool, router):
    # smtp_in as an operator starts it, with two worker processes: each opens the FIFO
    # and reads the tokens for its own sessions, and together they take FLOW_TOKENS.
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool", spool, "--listen",
         "127.0.0.1:0", "--domain", DOMAIN, "--hostname", HOSTNAME, "--processes", "2",
         "--in-flow-delay", "0.5", "--spf", "off", "--dkim-verify", "no", "--dmarc", "off",
         "--anvil-exempt", "127.0.0.1"], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        port, _ = listening_port(process, r"listening on 127\.0\.0\.1:(\d+)")
        threading.Thread(target=process.stderr.read, daemon=True).start()   # drain the log
        os.kill(router.pid, signal.SIGSTOP)
        quick = 0
        for _ in range(mta.FLOW_TOKENS // 10):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:   # either worker
                quick += sum(timed_mail(client) < QUICK for _ in range(10))
        assert quick == mta.FLOW_TOKENS and tokens(spool) == 0
        for _ in range(2):             # whichever worker serves it, no token is left
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                assert 0.45 <= timed_mail(client) < 0.5 + SLACK
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_router_that_keeps_up_costs_no_wait(spool, start_smtp, router):
    server = start_smtp(in_flow_delay=30)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        waits = [timed_mail(client) for _ in range(2 * mta.FLOW_TOKENS)]
    assert max(waits) < 30 and sum(waits) < SLACK, waits
    wait_for(lambda: len(maildir_messages(spool, "bob@example.com")) == len(waits), 60)


@pytest.mark.parametrize("with_router", [False, True], ids=["no router", "delay 0"])
def test_no_wait_without_a_router_or_with_in_flow_delay_0(spool, start_smtp, request,
                                                          with_router):
    # No router: nothing would put tokens back, and the mail waits in incoming/ anyway.
    # in_flow_delay = 0: flow control off, whatever the router does.
    if with_router:
        router = request.getfixturevalue("router")
        os.kill(router.pid, signal.SIGSTOP)
    server = start_smtp(in_flow_delay=0 if with_router else 30)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        for _ in range(mta.FLOW_TOKENS + 10):
            assert timed_mail(client) < QUICK


def test_a_router_without_the_fifo_is_never_waited_for(spool, start_smtp, router):
    # A router of an older version binds its doorbell but puts no tokens: without the FIFO
    # smtp_in must not wait, nor make the FIFO and then wait on it.
    os.kill(router.pid, signal.SIGSTOP)
    os.unlink(os.path.join(spool, mta.RUN_DIR, mta.FLOW_FIFO))
    server = start_smtp(in_flow_delay=30)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        for _ in range(mta.FLOW_TOKENS + 10):
            assert timed_mail(client) < QUICK
    assert tokens(spool) is None


def test_a_removed_fifo_is_made_anew_and_both_sides_find_it(spool, start_smtp, router):
    server = start_smtp(in_flow_delay=0.3)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        timed_mail(client)             # smtp_in has the FIFO open
        os.unlink(os.path.join(spool, mta.RUN_DIR, mta.FLOW_FIFO))
        # The router makes it anew within FLOW_RECHECK and puts its tokens there.
        wait_for(lambda: tokens(spool) == mta.FLOW_TOKENS, mta.FLOW_RECHECK + 2 + SLACK,
                 "a new FIFO with its tokens")
        timed_mail(client)             # at most in_flow_delay on the old one, then the new
        waits = [timed_mail(client) for _ in range(20)]
    assert max(waits) < QUICK, waits


def test_in_flow_delay_out_of_range_is_refused(spool):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool", spool, "--listen",
         "127.0.0.1:0", "--in-flow-delay", "-1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "in_flow_delay: -1 is not between 0 and 60 seconds" in result.stderr
    assert "Traceback" not in result.stderr
