"""smtp_in.py with SPF (RFC 7208) and Authentication-Results (RFC 8601): real servers on
127.0.0.1, a real dnsmasq publishing the SPF records, smtplib, swaks and raw sockets as
clients. A "dead" nameserver is a bound UDP socket that never answers (and tells whether it
was asked at all)."""

import configparser
import logging
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

import plumbing
import run_all
import smtp_in
from support import SLACK, listening_port, require_tool
from dnsmasq_server import host_record, start_dnsmasq, txt_record
from smtpin_support import (  # noqa: F401  (fixtures)
    DOMAIN, HOSTNAME, USERS, RawClient, greeted, message, spool, spool_messages,
    start_smtp, store_template)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALICE = "alice@example.com"
SHORT_TIMEOUT = 0.5            # spf_timeout where the nameserver never answers
FORGED_EXPLANATION = "forged.test says: 127.0.0.1 is not a mail server of forged.test"

ZONE = [
    txt_record("allowed.test", "v=spf1 a:mail.allowed.test -all"),
    host_record("mail.allowed.test", "127.0.0.1"),
    txt_record("forged.test", "v=spf1 ip4:192.0.2.0/24 -all exp=why.forged.test"),
    txt_record("why.forged.test", "%{i} is not a mail server of %{d}"),
    txt_record("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
    txt_record("helo.test", "v=spf1 a -all"),
    host_record("helo.test", "127.0.0.1"),
    txt_record("badhelo.test", "v=spf1 -all"),
]


@pytest.fixture(scope="module")
def dns():
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE) as server:
        yield server


class DeadNameserver:
    """A UDP socket on loopback that takes questions and never answers them."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]

    def questions(self):
        """How many datagrams arrived since the last call (at most 1000 are read)."""
        count = 0
        for _ in range(1000):
            try:
                self.sock.recv(4096)
            except BlockingIOError:
                break
            count += 1
        return count


@pytest.fixture
def dead_dns():
    server = DeadNameserver()
    yield server
    server.sock.close()


def header_fields(data):
    """The fields of a message's header section, unfolded, in order."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    return [field.replace("\r\n", "") for field in re.split(r"\r\n(?![ \t])", head)]


def trace_fields(data):
    """The first three header fields: ours (Authentication-Results, Received-SPF, Received)."""
    return header_fields(data)[:3]


def send(server, sender, rcpt="bob@example.com", ehlo="client.example.org", data=None):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo(ehlo)
        client.sendmail(sender, [rcpt], data or message(sender=sender))
    [(_, _, spooled)] = spool_messages(server.spool_dir)
    return spooled


def swaks_command(port, sender, *extra):
    swaks = require_tool("swaks")
    return [swaks, "--server", "127.0.0.1:%d" % port, "--helo", "client.example.org",
            "--from", sender, "--to", "bob@example.com", "--timeout", "10"] + list(extra)


# --- Pure helpers: removing forged Authentication-Results ---

@pytest.mark.parametrize("value, expected", [
    (" mx.example.com; spf=pass", "mx.example.com"),
    (" MX.Example.COM.; spf=pass", "mx.example.com"),
    (" (a (nested) comment, with \\) inside) mx.example.com; none", "mx.example.com"),
    ("\r\n\tmx.example.com 1;\r\n\tspf=pass", "mx.example.com"),
    (' "mx.example.com"; none', "mx.example.com"),
    (" other.example; spf=pass", "other.example"),
    (" (never closed mx.example.com; spf=pass", ""),
    ("", ""),
])
def test_authserv_id_is_read_after_comments_and_folding(value, expected):
    assert smtp_in.authserv_id(value) == expected


def test_only_our_authentication_results_are_removed_and_only_from_the_header_section():
    message = (b"Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=a@b.example\r\n"
               b"Subject: hi\r\n"
               b"authentication-results :\r\n\t(forged) MX.EXAMPLE.COM.;\r\n\tdkim=pass\r\n"
               b"Authentication-Results: other.example; spf=fail\r\n"
               b"Authentication-Results: mx.example.com.evil.example; spf=pass\r\n"
               b"\r\n"
               b"Authentication-Results: mx.example.com; in the body, kept\r\n")
    assert smtp_in.remove_authentication_results(message, "mx.example.com") == (
        b"Subject: hi\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Authentication-Results: mx.example.com.evil.example; spf=pass\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.com; in the body, kept\r\n")


def test_a_message_without_our_fields_is_returned_as_is_not_copied():
    message = b"Subject: hi\r\nAuthentication-Results: other.example; none\r\n\r\nbody\r\n"
    assert smtp_in.remove_authentication_results(message, HOSTNAME) is message
    headless = b"\r\nAuthentication-Results: mx.example.com; none\r\n"   # all body
    assert smtp_in.remove_authentication_results(headless, HOSTNAME) is headless
    only_header = b"Authentication-Results: mx.example.com; none\r\n"
    assert smtp_in.remove_authentication_results(only_header, HOSTNAME) == b""


# --- Tag mode (the default): headers on top, mail accepted ---

def test_pass_is_marked_above_our_received_header(start_smtp, dns):
    server = start_smtp(spf="tag", dns=dns.address)
    auth_results, received_spf, received = trace_fields(send(server, "user@allowed.test"))
    assert auth_results == ("Authentication-Results: mx.example.com;"
                            "\tspf=pass smtp.mailfrom=user@allowed.test")
    assert received_spf.startswith(
        "Received-SPF: pass (mx.example.com: domain of user@allowed.test designates 127.0.0.1"
        " as permitted sender)")
    for pair in ("receiver=mx.example.com;", "client-ip=127.0.0.1;",
                 "envelope-from=\"user@allowed.test\";", "helo=client.example.org;",
                 "identity=mailfrom;", 'mechanism="a:mail.allowed.test";'):
        assert pair in received_spf
    assert received.startswith("Received: from client.example.org ([127.0.0.1])")


def test_fail_in_tag_mode_is_accepted_and_marked(start_smtp, dns):
    assert smtp_in.DEFAULTS["spf"] == "tag"                  # the default policy
    server = start_smtp(spf="tag", dns=dns.address)
    result = subprocess.run(swaks_command(server.port, "someone@forged.test"),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode()
    [(_, _, data)] = spool_messages(server.spool_dir)
    auth_results, received_spf, _ = trace_fields(data)
    assert "spf=fail smtp.mailfrom=someone@forged.test" in auth_results
    assert received_spf.startswith("Received-SPF: fail (mx.example.com: domain of "
                                   "someone@forged.test does not designate 127.0.0.1 ")
    assert "mechanism=-all;" in received_spf


def test_temperror_in_tag_mode_only_adds_headers(start_smtp, dead_dns, caplog):
    caplog.set_level(logging.INFO, logger="smtp_in")
    server = start_smtp(spf="tag", dns=dead_dns.address, spf_timeout=SHORT_TIMEOUT)
    started = time.monotonic()
    data = send(server, "someone@allowed.test")
    assert time.monotonic() - started < SHORT_TIMEOUT + SLACK
    auth_results, received_spf, _ = trace_fields(data)
    assert "spf=temperror" in auth_results
    assert received_spf.startswith("Received-SPF: temperror (mx.example.com: error in "
                                   "processing during lookup of someone@allowed.test: TXT "
                                   "allowed.test: no answer from " + dead_dns.address)
    assert dead_dns.questions() == 1           # one try: spf_timeout is shorter than a try
    logged = [r.getMessage() for r in caplog.records if r.name == "smtp_in"]
    assert any(line.startswith("spf: client=[127.0.0.1], helo='client.example.org', "
                               "from=<someone@allowed.test>, result=temperror (TXT ")
               for line in logged)
    assert any(re.search(r", auth=none, spf=temperror, dkim=unchecked, dmarc=unchecked$", line)
               for line in logged)


def test_null_sender_is_checked_against_the_helo_name(start_smtp, dns):
    server = start_smtp(spf="tag", dns=dns.address)
    client = greeted(server, ehlo="helo.test")
    assert client.command("MAIL FROM:<>")[0] == 250
    assert client.command("RCPT TO:<bob@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message(sender="mailer-daemon@helo.test") + b".\r\n")
    assert client.reply()[0] == 250
    client.close()
    [(sender, _, data)] = spool_messages(server.spool_dir)
    auth_results, received_spf, _ = trace_fields(data)
    assert sender == ""
    assert auth_results == "Authentication-Results: mx.example.com;\tspf=pass smtp.helo=helo.test"
    assert 'envelope-from="";' in received_spf and "identity=helo;" in received_spf


def test_smtputf8_sender_is_checked_and_marked(start_smtp, dns):
    server = start_smtp(spf="tag", dns=dns.address)
    client = greeted(server)
    assert client.command("MAIL FROM:<d\u00f6rte@allowed.test> SMTPUTF8")[0] == 250
    assert client.command("RCPT TO:<bob@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message() + b".\r\n")
    assert client.reply()[0] == 250
    client.close()
    [(_, _, data)] = spool_messages(server.spool_dir)
    auth_results, received_spf, _ = trace_fields(data)
    assert 'spf=pass smtp.mailfrom="d\u00f6rte@allowed.test"' in auth_results
    assert received_spf.startswith("Received-SPF: pass ")


# --- Reject mode ---

def test_reject_mode_refuses_a_forged_sender_with_550_5_7_23_and_the_explanation(start_smtp, dns):
    server = start_smtp(spf="reject", dns=dns.address)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.example.org")
        assert client.mail("someone@forged.test") == (550, b"5.7.23 " + FORGED_EXPLANATION.encode())
        assert client.mail("user@allowed.test")[0] == 250      # the session goes on
        client.rcpt("bob@example.com")
        assert client.data(message())[0] == 250
    result = subprocess.run(swaks_command(server.port, "another@forged.test"),
                            capture_output=True, timeout=30)
    assert result.returncode != 0
    assert ("<** 550 5.7.23 " + FORGED_EXPLANATION) in result.stdout.decode()
    [(sender, _, data)] = spool_messages(server.spool_dir)
    assert sender == "user@allowed.test"
    assert "spf=pass" in trace_fields(data)[0]


def test_reject_mode_refuses_only_fail(start_smtp, dns):
    server = start_smtp(spf="reject", dns=dns.address)
    client = greeted(server, ehlo="badhelo.test")
    for sender, code, result in (("a@soft.test", 250, "softfail"),
                                 ("a@unpublished.test", 250, "none"),
                                 ("", 550, "fail")):       # <>: the HELO name, -all
        reply = client.command("MAIL FROM:<%s>" % sender)
        assert reply[0] == code, (sender, reply)
        if code == 250:
            assert client.command("RSET")[0] == 250
    assert reply[1] == ["550 5.7.23 badhelo.test does not allow 127.0.0.1 to send mail for it"
                        " (SPF)"]
    assert client.command("EHLO [127.0.0.1]")[0] == 250    # a literal HELO: none, accepted
    assert client.command("MAIL FROM:<>")[0] == 250
    client.close()


def test_temperror_in_reject_mode_is_451_4_7_24(start_smtp, dead_dns):
    server = start_smtp(spf="reject", dns=dead_dns.address, spf_timeout=SHORT_TIMEOUT)
    client = greeted(server)
    started = time.monotonic()
    code, lines = client.command("MAIL FROM:<someone@allowed.test>")
    assert time.monotonic() - started < SHORT_TIMEOUT + SLACK
    assert dead_dns.questions() == 1
    assert (code, lines) == (451, ["451 4.7.24 SPF check of the sender's domain failed for now,"
                                   " try again later"])
    assert client.command("RCPT TO:<bob@example.com>")[0] == 503     # no transaction began
    client.close()
    assert spool_messages(server.spool_dir) == []


# --- Who is not checked ---

def test_submission_is_not_checked(start_smtp, dead_dns):
    server = start_smtp(submission=True, spf="reject", dns=dead_dns.address,
                        spf_timeout=SHORT_TIMEOUT)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("laptop.example.com")
        client.login(ALICE, USERS[ALICE])
        client.sendmail(ALICE, ["friend@remote.example"], message(sender=ALICE))
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert trace_fields(data)[0].startswith("Received: from laptop.example.com")
    assert b"Received-SPF:" not in data and b"Authentication-Results:" not in data
    assert dead_dns.questions() == 0


def test_relay_network_client_is_not_checked(start_smtp, dead_dns):
    server = start_smtp(spf="reject", dns=dead_dns.address, spf_timeout=SHORT_TIMEOUT,
                        relay_network=["127.0.0.2/32"])
    trusted = RawClient(server, source="127.0.0.2")
    assert trusted.reply()[0] == 220
    assert trusted.command("EHLO office.example.com")[0] == 250
    assert trusted.command("MAIL FROM:<someone@forged.test>")[0] == 250
    assert trusted.command("RCPT TO:<friend@remote.example>")[0] == 250
    assert trusted.command("DATA")[0] == 354
    trusted.send(message() + b".\r\n")
    assert trusted.reply()[0] == 250
    trusted.close()
    assert dead_dns.questions() == 0
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert b"Received-SPF:" not in data
    stranger = greeted(server)                  # 127.0.0.1 is outside the relay network
    assert stranger.command("MAIL FROM:<someone@forged.test>")[0] == 451
    stranger.close()
    assert dead_dns.questions() >= 1


def test_spf_off_asks_no_question_and_adds_no_header(start_smtp, dead_dns):
    server = start_smtp(spf="off", dns=dead_dns.address)
    data = send(server, "someone@forged.test")
    assert trace_fields(data)[0].startswith("Received: ")
    assert b"Received-SPF:" not in data and b"Authentication-Results:" not in data
    assert dead_dns.questions() == 0


# --- Forged Authentication-Results (RFC 8601 5) ---

@pytest.mark.parametrize("policy", ["tag", "off"])
def test_forged_authentication_results_with_our_hostname_are_removed(start_smtp, dns, policy):
    server = start_smtp(spf=policy, dns=dns.address)
    forged = (b"Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=ceo@example.com\r\n"
              b"Authentication-Results: (looks legitimate)\r\n\tMX.example.com.; dkim=pass\r\n"
              b"Authentication-Results: relay.other.example; spf=pass\r\n"
              + message(sender="someone@forged.test"))
    data = send(server, "someone@forged.test", data=forged)
    fields = header_fields(data)
    claims = [f for f in fields if f.lower().startswith("authentication-results:")]
    if policy == "tag":
        assert fields[0].startswith("Authentication-Results: mx.example.com;\tspf=fail")
        assert claims == [fields[0], "Authentication-Results: relay.other.example; spf=pass"]
    else:
        assert claims == ["Authentication-Results: relay.other.example; spf=pass"]
    assert b"ceo@example.com" not in data and b"dkim=pass" not in data


# --- Configuration: the command line and run_all ---

def test_command_line_reject_mode_with_dns(tmp_path, spool, dns):
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool", str(spool), "--listen",
         "127.0.0.1:0", "--domain", DOMAIN, "--hostname", HOSTNAME, "--spf", "reject",
         "--dns", dns.address], stderr=subprocess.PIPE)
    try:
        port, lines = listening_port(process, r"listening on 127\.0\.0\.1:(\d+) \(mx\)")
        assert any(line.endswith(" smtp_in[%d]: config: spf=reject\n" % process.pid)
                   for line in lines)
        result = subprocess.run(swaks_command(port, "someone@forged.test"),
                                capture_output=True, timeout=30)
        assert "<** 550 5.7.23 " + FORGED_EXPLANATION in result.stdout.decode()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.example.org")
            client.sendmail("user@allowed.test", ["bob@example.com"], message())
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
    log = "".join(lines) + process.stderr.read().decode()
    assert re.search(r"cmd=MAIL, arg='FROM:<someone@forged\.test>', status=rejected "
                     r"\(550 5\.7\.23 forged\.test says: ", log)
    assert re.search(r"from=<user@allowed\.test>, size=\d+, nrcpt=1, proto=ESMTP, tls=none, "
                     r"auth=none, spf=pass, dkim=none, dmarc=none\n", log)


@pytest.mark.parametrize("argv, error", [
    (["--spf", "maybe"], "smtp_in: spf: 'maybe' is not one of off, tag, reject\n"),
    (["--spf-timeout", "0"], "smtp_in: spf_timeout: 0 is not between 0 and 3600 seconds\n"),
    (["--dns", "ns.example"], "smtp_in: bad nameserver 'ns.example': HOST must be an IP "
                              "address\n"),
])
def test_bad_spf_settings_are_one_line_and_exit_1(tmp_path, argv, error):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool",
                             str(tmp_path), "--listen", "127.0.0.1:0"] + argv,
                            capture_output=True, timeout=30)
    assert (result.returncode, result.stderr.decode()) == (1, error)


def test_run_all_passes_spf_to_smtp_in(tmp_path):
    path = str(tmp_path / "smtp_in.ini")
    children = run_all.child_settings(dict(run_all.DEFAULTS, spool=str(tmp_path), spf="reject"),
                                      {}, set())
    with open(path, "w") as f:
        f.write(run_all.settings_text("smtp_in", children["smtp_in"]))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    assert parser["smtp_in"]["spf"] == "reject"

    class Args:
        config = path
    assert plumbing.load_config("smtp_in", smtp_in.DEFAULTS, Args())["spf"] == "reject"
    problems = run_all.check_config(dict(run_all.DEFAULTS, spool=str(tmp_path), smtp="",
                                         submission="", pop3="", spf="always"))
    assert "spf: 'always' is not one of off, tag, reject" in problems
    assert run_all.DEFAULTS["spf"] == smtp_in.DEFAULTS["spf"] == "tag"
