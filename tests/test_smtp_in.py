"""smtp_in.py: the pure helpers directly, then real servers on 127.0.0.1 with real clients
(smtplib, swaks, curl, openssl s_client) and raw sockets for what clients will not send."""

import base64
import concurrent.futures
import errno
import logging
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import mailbox_store
import mta
import smtp_in
from support import SLACK, listening_port, openssl_starttls, require_tool, wait_for
from dnsmasq_server import host_record, ptr_record, start_dnsmasq
from smtpin_support import (  # noqa: F401  (fixtures)
    DOMAIN, HOSTNAME, USERS, RawClient, greeted, maildir_messages, message,
    route_all, spool, spool_messages, start_smtp, store_template)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALICE, ALICE_PW = "alice@example.com", USERS["alice@example.com"]


def b64(data):
    return base64.b64encode(data).decode("ascii")


def send_transaction(client, sender="someone@example.org", rcpt="bob@example.com", data=None):
    assert client.command("MAIL FROM:<%s>" % sender)[0] == 250
    assert client.command("RCPT TO:<%s>" % rcpt)[0] == 250
    assert client.command("DATA")[0] == 354
    client.send((data if data is not None else message()) + b".\r\n")
    return client.reply()


# --- Pure helpers ---

def test_split_command_upper_cases_the_verb_and_trims_spaces():
    assert smtp_in.split_command("mail FROM:<a@b.c>  ") == ("MAIL", "FROM:<a@b.c>")
    assert smtp_in.split_command("NOOP") == ("NOOP", "")
    assert smtp_in.split_command("") == ("", "")


@pytest.mark.parametrize("arg, expected", [
    ("TO:<bob@example.com>", ("bob@example.com", "")),
    ("to:<Bob@EXAMPLE.com> X=1", ("Bob@example.com", "X=1")),
    ("TO:<@relay.example,@other.example:bob@example.com>", ("bob@example.com", "")),
    ("TO:<\"bob\"@example.com>", ("bob@example.com", "")),
    ("TO:<\"john doe\"@example.com>", ("\"john doe\"@example.com", "")),
    ("TO:<\"bob@remote.example\"@example.com>", ("\"bob@remote.example\"@example.com", "")),
    ("TO:<\"a>b\"@example.com>", ("\"a>b\"@example.com", "")),
    ("TO:<Postmaster>", ("Postmaster", "")),
    ("TO: <bob@example.com>", ("bob@example.com", "")),
    ("TO:bob@example.com", ("bob@example.com", "")),
    ("TO:<bob@[192.0.2.1]>", ("bob@[192.0.2.1]", "")),
    ("TO:<bob@[IPv6:2001:db8::1]>", ("bob@[IPv6:2001:db8::1]", "")),
    ("TO:<jörg@bücher.example>", ("jörg@bücher.example", "")),
])
def test_parse_path_accepts_rfc_5321_paths(arg, expected):
    assert smtp_in.parse_path(arg, "TO:") == expected


def test_parse_path_null_reverse_path_and_parameters():
    assert smtp_in.parse_path("FROM:<>", "FROM:") == ("", "")
    assert smtp_in.parse_path("FROM:<> SIZE=10 BODY=8BITMIME", "FROM:") == ("", "SIZE=10 BODY=8BITMIME")


@pytest.mark.parametrize("arg", [
    "TO:", "TO:<>x", "TO:<bob@example.com", "TO:bob@example.com>", "FROM:<bob@example.com>",
    "TO:<bob@@example.com>", "TO:<bob@-example.com>", "TO:<bob@exa_mple.com>",
    "TO:<bob@example..com>", "TO:<.bob@example.com>", "TO:<bob.@example.com>",
    "TO:<bob smith@example.com>", "TO:<bob@[192.0.2.300]>", "TO:<bob@[foo]>",
    "TO:<\"unterminated@example.com>", "TO:<@relay.example:>", "TO:<%s@example.com>" % ("x" * 65),
    "TO:<bob@%s.com>" % ("a" * 64), "TO:<bob@%s>" % ".".join(["abcdefgh"] * 40),
    "TO:<bob@example.com>SIZE=1",
])
def test_parse_path_refuses_bad_syntax(arg):
    assert smtp_in.parse_path(arg, "TO:") is None


def test_parse_mail_params():
    assert smtp_in.parse_mail_params("size=100  BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}
    assert smtp_in.parse_mail_params("") == {}
    for bad in ("SIZE=1 size=2", "-X=1", "X=", "X=a=b"):
        with pytest.raises(ValueError):
            smtp_in.parse_mail_params(bad)


def test_split_address_removes_quotes():
    assert smtp_in.split_address('"a\\"b@c"@example.com') == ('a"b@c', "example.com")
    assert smtp_in.split_address("bob@example.com") == ("bob", "example.com")
    assert smtp_in.split_address("postmaster") == ("postmaster", "")


def test_protocol_names_follow_rfc_3848_and_6531():
    assert smtp_in.protocol_name(False, False, False) == "SMTP"
    assert smtp_in.protocol_name(True, False, False) == "ESMTP"
    assert smtp_in.protocol_name(True, True, False) == "ESMTPS"
    assert smtp_in.protocol_name(True, False, True) == "ESMTPA"
    assert smtp_in.protocol_name(True, True, True) == "ESMTPSA"
    assert smtp_in.protocol_name(True, True, True, smtputf8=True) == "UTF8SMTPSA"


def test_received_header_has_the_rfc_5321_fields():
    import datetime
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    header = smtp_in.received_header("mx.example.net", "192.0.2.7", "mail.example.net",
                                     HOSTNAME, "ESMTPS", "QID1", "bob@example.com", when)
    assert header == (b"Received: from mx.example.net (mail.example.net [192.0.2.7])\r\n"
                      b"\tby mx.example.com with ESMTPS id QID1\r\n"
                      b"\tfor <bob@example.com>; Mon, 06 May 2024 07:08:09 +0000\r\n")
    header = smtp_in.received_header("my_pc (x)", "2001:db8::1", None, HOSTNAME, "ESMTP", "Q2",
                                     None, when).decode()
    assert header.startswith("Received: from [IPv6:2001:db8::1] ([IPv6:2001:db8::1] "
                             "helo=my_pc \\(x\\))\r\n")
    assert "for <" not in header and "id Q2;\r\n" in header


def test_count_hops_reads_only_the_header_section():
    text = b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: in the body\r\n"
    assert smtp_in.count_hops(text) == 2


def collect(chunks, max_size=10_000, max_line=smtp_in.MAX_TEXT_LINE):
    collector = smtp_in.MessageCollector(max_size, max_line)
    leftover = b""
    for chunk in chunks:
        assert not collector.done
        leftover = collector.feed(chunk)
    return collector, leftover


def test_collector_ends_only_at_crlf_dot_crlf_and_unstuffs_dots():
    data = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nnot yet\r\n...\r\n.\r\nMAIL FROM:<a@b.c>\r\n"
    collector, leftover = collect([data])
    assert collector.done and collector.refusal() is None
    assert collector.message() == b"Subject: x\r\n\r\n.leading dot\r\n"
    assert leftover == b"not yet\r\n...\r\n.\r\nMAIL FROM:<a@b.c>\r\n"


def test_collector_finds_the_end_split_at_every_offset():
    data = b"line one\r\n..two\r\nthree\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(data)):
        for second in range(cut, len(data)):
            chunks = [data[:cut], data[cut:second], data[second:]]
            collector = smtp_in.MessageCollector(1000)
            leftover = b""
            for chunk in chunks:
                if chunk and not collector.done:
                    leftover += collector.feed(chunk)
                elif chunk:
                    leftover += chunk
            assert collector.done
            assert collector.message() == b"line one\r\n.two\r\nthree\r\n"
            assert leftover == b"QUIT\r\n"


def test_collector_empty_message():
    collector, leftover = collect([b".\r\n"])
    assert collector.done and collector.message() == b"" and leftover == b""


SMUGGLING_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
                      b"\r\n\x00.\r\n", b"\r\n.\n", b"\r\r\n.\r\r\n", b"\n\n.\n\n", b"\r\n.\r\r\n"]


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=repr)
def test_collector_never_ends_at_a_smuggling_variant_and_refuses_the_message(variant):
    smuggled = (b"Subject: first\r\n\r\nbody" + variant
                + b"MAIL FROM:<spoof@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nevil\r\n")
    collector, leftover = collect([smuggled])
    assert not collector.done
    leftover = collector.feed(b".\r\nNOOP\r\n")
    assert collector.done and leftover == b"NOOP\r\n"
    assert collector.refusal() in (smtp_in.R550_BARE_LINE_ENDING, smtp_in.R550_NUL)


def test_collector_past_max_size_reads_to_the_end_but_keeps_nothing():
    chunk = b"x" * 70 + b"\r\n"
    collector = smtp_in.MessageCollector(1000)
    for _ in range(100):
        assert collector.feed(chunk) == b""
    assert len(collector.data) <= 4
    assert collector.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert collector.refusal() == smtp_in.R552_TOO_BIG


def test_collector_line_limit():
    collector, _ = collect([b"a" * 998 + b"\r\n.\r\n"], max_size=10 ** 6, max_line=1000)
    assert collector.refusal() is None
    collector, _ = collect([b"b" * 600, b"b" * 600 + b"\r\nshort\r\n.\r\n"], max_size=10 ** 6,
                           max_line=1000)
    assert collector.refusal() == smtp_in.R552_LINE_TOO_LONG % 1000
    collector, _ = collect([b"ok\r\n" + b"c" * 3000 + b"\r\nok\r\n" * 300 + b".\r\n"],
                           max_size=10 ** 6, max_line=1000)
    assert collector.refusal() == smtp_in.R552_LINE_TOO_LONG % 1000


def test_collector_line_limit_counts_octets_without_the_crlf_or_a_doubled_dot():
    for line, refused in ((b"a" * 1000, False), (b"a" * 1001, True),
                          (b".." + b"a" * 999, False), (b".." + b"a" * 1000, True)):
        collector, _ = collect([b"x\r\n" + line + b"\r\ny\r\n.\r\n"], max_line=1000)
        assert (collector.refusal() is not None) == refused, line[:3]
        # the same line split across blocks, and as the only line
        collector, _ = collect([line[:500], line[500:] + b"\r\n.\r\n"], max_line=1000)
        assert (collector.refusal() is not None) == refused, line[:3]


def test_collector_passes_whole_lines_on_and_holds_only_the_unended_one():
    lines = b"".join(b".%d stuffed\r\n" % n for n in range(60000))     # about 800 KB
    chunks = []
    collector = smtp_in.MessageCollector(10 ** 7, sink=chunks.append)
    held = 0
    for start in range(0, len(lines), 65536):
        collector.feed(lines[start:start + 65536])
        held = max(held, len(collector.tail))
    assert collector.feed(b".\r\n") == b"" and collector.done
    assert collector.refusal() is None and collector.data == bytearray()
    assert all(chunk.endswith(b"\r\n") for chunk in chunks)
    assert b"".join(chunks) == lines.replace(b"\r\n.", b"\r\n")[1:]
    assert held < 40


MESSAGE_PIECES = [b"a", b".", b"\r\n", b"\r", b"\n", b"\0", b"\r\n.\r\n", b"..", b"x" * 30]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(MESSAGE_PIECES), max_size=25), st.lists(st.integers(0, 200), max_size=6))
@example(pieces=[b"x" * 30] * 5, cuts=[23])     # a line too long, and then too big
def test_collector_gives_the_same_text_end_and_verdict_however_the_blocks_fall(pieces, cuts):
    data = b"".join(pieces) + b"\r\n.\r\nQUIT\r\n"
    whole, leftover = collect([data], max_size=150, max_line=20)
    blocks, start = [], 0
    for cut in sorted(cuts):
        blocks.append(data[start:cut])
        start = max(start, cut)
    blocks.append(data[start:])
    chunks = []
    split = smtp_in.MessageCollector(150, 20, sink=chunks.append)
    rest = b""
    for block in blocks:
        if split.done:
            rest += block
        elif block:
            rest += split.feed(block)
    assert split.done and rest == leftover
    assert split.refusal() == whole.refusal()
    if whole.refusal() is None:
        assert b"".join(chunks) == whole.message()


HEADER_SAMPLES = [
    b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: in the body\r\n",
    b"Authentication-Results: mx.example.com; spf=pass\r\nSubject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\nAuthentication-Results : (c) MX.example.com.;\r\n\tdkim=pass\r\n"
    b"Authentication-Results: other.example; spf=fail\r\n\r\n"
    b"Authentication-Results: mx.example.com; in the body\r\n",
    b"\r\nReceived: after an empty header\r\n",
    b"Received: only a header\r\nAuthentication-Results: mx.example.com; x=y\r\n",
]


@pytest.mark.parametrize("sample", HEADER_SAMPLES)
def test_header_filter_agrees_with_count_hops_and_remove_authentication_results(sample):
    lines = sample.splitlines(keepends=True)
    for cut in range(len(lines) + 1):          # fed in whole lines, as the collector gives them
        out = []
        headers = smtp_in.HeaderFilter(HOSTNAME, out.append)
        for chunk in (b"".join(lines[:cut]), b"".join(lines[cut:])):
            if chunk:
                headers.feed(chunk)
        headers.finish()
        assert b"".join(out) == smtp_in.remove_authentication_results(sample, HOSTNAME)
        if not sample.startswith(b"\r\n"):
            assert headers.hops == smtp_in.count_hops(sample)


def test_header_filter_removes_every_x_spam_flag_field_of_the_header_when_asked():
    sample = (b"X-Spam-Flag: NO\r\nSubject: x\r\nx-spam-flag :\r\n\tNO\r\n  folded\r\n"
              b"Authentication-Results: mx.example.com; spf=pass\r\nX-Spam-Flag: YES\r\n"
              b"To: y\r\n\r\nX-Spam-Flag: NO in the body stays\r\n")
    expected = b"Subject: x\r\nTo: y\r\n\r\nX-Spam-Flag: NO in the body stays\r\n"
    lines = sample.splitlines(keepends=True)
    for cut in range(len(lines) + 1):
        for remove, want in ((True, expected),
                             (False, smtp_in.remove_authentication_results(sample, HOSTNAME))):
            out = []
            headers = smtp_in.HeaderFilter(HOSTNAME, out.append, remove_spam_flag=remove)
            for chunk in (b"".join(lines[:cut]), b"".join(lines[cut:])):
                if chunk:
                    headers.feed(chunk)
            headers.finish()
            assert b"".join(out) == want


def test_header_filter_holds_at_most_one_bounded_authentication_results_field():
    out = []
    headers = smtp_in.HeaderFilter(HOSTNAME, out.append)
    headers.feed(b"Subject: x\r\nAuthentication-Results: other.example;\r\n")
    for _ in range(200):
        headers.feed(b"\t" + b"c" * 1000 + b"\r\n")     # one field of 200 KB, folded
        assert headers.held is None or len(headers.held) <= smtp_in.MAX_HELD_FIELD
    headers.feed(b"To: y\r\n\r\nbody\r\n")
    headers.finish()
    assert b"".join(out) == b"Subject: x\r\nTo: y\r\n\r\nbody\r\n"     # removed: too long


def test_parse_networks_and_membership():
    networks = smtp_in.parse_networks(["192.0.2.0/24", " ::1 ", ""])
    assert [str(n) for n in networks] == ["192.0.2.0/24", "::1/128"]
    with pytest.raises(ValueError):
        smtp_in.parse_networks(["300.1.1.0/24"])


# --- Greeting, EHLO, basic commands (smtplib) ---

def test_greeting_and_ehlo_keywords(start_smtp):
    server = start_smtp()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        code, ehlo = client.ehlo("client.example.org")
        assert code == 250
        lines = ehlo.decode().split("\n")
        assert lines[0] == "%s greets [127.0.0.1]" % HOSTNAME
        assert {"PIPELINING", "SIZE %d" % (35 * 1024 * 1024), "8BITMIME", "ENHANCEDSTATUSCODES",
                "SMTPUTF8", "AUTH PLAIN LOGIN"} <= set(lines)
        assert "STARTTLS" not in lines       # no certificate configured
    raw = RawClient(server)
    assert raw.reply() == (220, ["220 %s ESMTP" % HOSTNAME])


def test_message_is_spooled_with_a_received_header_and_250_names_the_queue_id(start_smtp, spool):
    server = start_smtp()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org")
        client.rcpt("bob@example.com")
        code, text = client.data(message("hello"))
    assert code == 250
    queue_id = re.match(r"2\.0\.0 OK: queued as ([0-9A-F]{18})$", text.decode()).group(1)
    [(sender, recipients, data)] = spool_messages(spool)
    assert (sender, recipients) == ("someone@example.org", ["bob@example.com"])
    received, rest = data.split(b"\r\nFrom:", 1)
    assert received.startswith(b"Received: from client.example.org ([127.0.0.1])\r\n"
                               b"\tby mx.example.com with ESMTP id " + queue_id.encode())
    assert b"\tfor <bob@example.com>; " in received
    assert rest.endswith(b"Subject: hello\r\nMessage-ID: <hello@example.org>\r\n\r\nHello.\r\n")
    route_all(spool)                                   # mta's router takes it from here
    [delivered] = maildir_messages(spool, "bob@example.com")
    assert delivered.startswith(b"Return-Path: <someone@example.org>\r\n"
                                b"Delivered-To: bob@example.com\r\n" + received)


def test_helo_gives_protocol_smtp_and_refuses_esmtp_parameters(start_smtp, spool):
    server = start_smtp()
    client = RawClient(server)
    client.reply()
    assert client.command("HELO old.example.org") == (250, ["250 " + HOSTNAME])
    assert client.command("MAIL FROM:<a@example.org> SIZE=10")[0] == 555
    assert send_transaction(client, sender="a@example.org")[0] == 250
    assert b" with SMTP id " in spool_messages(spool)[0][2]


def test_commands_out_of_order_get_503(start_smtp):
    server = start_smtp()
    client = RawClient(server)
    client.reply()
    assert client.command("MAIL FROM:<a@example.org>") == (503, [smtp_in.R503_NEED_HELO])
    assert client.command("RCPT TO:<bob@example.com>") == (503, [smtp_in.R503_NEED_MAIL])
    assert client.command("DATA") == (503, [smtp_in.R503_NEED_MAIL])
    client.command("EHLO client.example.org")
    assert client.command("MAIL FROM:<a@example.org>")[0] == 250
    assert client.command("MAIL FROM:<a@example.org>") == (503, [smtp_in.R503_NESTED_MAIL])
    assert client.command("DATA") == (503, [smtp_in.R503_NEED_RCPT])
    assert client.command("RSET") == (250, [smtp_in.R250_RESET])
    assert client.command("RCPT TO:<bob@example.com>") == (503, [smtp_in.R503_NEED_MAIL])


def test_unknown_command_bad_syntax_and_unknown_parameter(start_smtp):
    client = greeted(start_smtp())
    assert client.command("FOO bar") == (500, [smtp_in.R500_UNKNOWN])
    assert client.command("SMTP_X") == (500, [smtp_in.R500_UNKNOWN])
    assert client.command("EHLO") == (501, [smtp_in.R501_HELO_SYNTAX])
    assert client.command("EHLO " + "h" * 256) == (501, [smtp_in.R501_HELO_SYNTAX])  # header line
    assert client.command("HELO two words") == (501, [smtp_in.R501_HELO_SYNTAX])
    assert client.command("MAIL FROM:<bad address>") == (501, [smtp_in.R501_BAD_SENDER])
    assert client.command("MAIL FROM:<a@example.org> SIZE=1 SIZE=2") == (501, [smtp_in.R501_SYNTAX])
    assert client.command("MAIL FROM:<a@example.org> RET=HDRS") == (
        555, [smtp_in.R555_UNKNOWN_PARAMETER % "RET"])
    for size in ("big", "\u00b2", "\u0661", "1" * 21, "-1"):        # ², Arabic-Indic one
        assert client.command("MAIL FROM:<a@example.org> SIZE=" + size) == (
            555, [smtp_in.R555_BAD_PARAMETER % "SIZE"])
    assert client.command("MAIL FROM:<a@example.org> BODY=BINARYMIME")[0] == 555
    assert client.command("MAIL FROM:<a@example.org> BODY=8BITMIME AUTH=<>")[0] == 250
    assert client.command("RCPT TO:<bob@example.com> NOTIFY=NEVER") == (
        555, [smtp_in.R555_UNKNOWN_PARAMETER % "NOTIFY"])
    assert client.command("RSET x") == (501, [smtp_in.R501_NO_ARGUMENTS])
    assert client.command("QUIT now") == (501, [smtp_in.R501_NO_ARGUMENTS])


def test_vrfy_expn_help_noop_quit(start_smtp):
    client = greeted(start_smtp())
    assert client.command("VRFY alice") == (252, [smtp_in.R252_CANNOT_VRFY])
    assert client.command("VRFY nobody-at-all") == (252, [smtp_in.R252_CANNOT_VRFY])
    assert client.command("VRFY")[0] == 501
    assert client.command("EXPN sales") == (502, [smtp_in.R502_NOT_IMPLEMENTED])
    assert client.command("HELP")[0] == 214
    assert client.command("NOOP anything") == (250, [smtp_in.R250_OK])
    assert client.command("QUIT") == (221, [smtp_in.R221_BYE % HOSTNAME])
    assert client.at_eof()


def test_every_reply_but_greeting_and_ehlo_has_an_enhanced_code():
    pattern = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")
    skipped = {"R220_GREETING", "R250_HELO", "R334_CHALLENGE", "R354_START_INPUT"}
    replies = {name: value for name, value in vars(smtp_in).items()
               if re.match(r"R\d{3}_", name) and name not in skipped}
    assert len(replies) > 50
    for name, value in replies.items():
        assert pattern.match(value), name
        assert value[0] == value[4], name           # RFC 3463 2: same class


# --- Recipients and relay control ---

def test_null_reverse_path_and_bare_postmaster_are_accepted(start_smtp, spool):
    client = greeted(start_smtp())
    assert send_transaction(client, sender="", rcpt="postmaster")[0] == 250
    [(sender, recipients, _)] = spool_messages(spool)
    assert sender == "" and recipients == ["postmaster@example.com"]


def test_unknown_local_user_is_refused_at_rcpt_with_550_5_1_1(start_smtp):
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("RCPT TO:<nobody@example.com>") == (
        550, [smtp_in.R550_UNKNOWN_USER % "nobody@example.com"])
    assert client.command("RCPT TO:<Bob@Example.COM>")[0] == 250


def test_looping_alias_is_refused_at_rcpt_with_550_5_4_6(start_smtp, spool):
    with open(os.path.join(str(spool), "aliases"), "a") as aliases:
        aliases.write("ping: pong\npong: ping\n")
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("RCPT TO:<ping@example.com>") == (
        550, [smtp_in.R550_ALIAS_LOOP % "ping@example.com"])
    assert client.command("RCPT TO:<nobody@example.com>") == (
        550, [smtp_in.R550_UNKNOWN_USER % "nobody@example.com"])
    assert client.command("RCPT TO:<sales@example.com>")[0] == 250


def test_aliases_listing_each_other_are_accepted_and_each_member_gets_one_copy(start_smtp, spool):
    with open(os.path.join(str(spool), "aliases"), "a") as aliases:
        aliases.write("ping: pong, alice\npong: ping, bob, alice\n")
    server = start_smtp()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org")
        assert client.rcpt("ping@example.com")[0] == 250
        assert client.rcpt("pong@example.com")[0] == 250
        assert client.data(message("round", to="ping@example.com"))[0] == 250
    route_all(spool)
    for user in ("alice@example.com", "bob@example.com"):
        (delivered,) = maildir_messages(spool, user)
        assert b"Subject: round\r\n" in delivered


def test_alias_expanding_past_the_recipient_bound_is_refused_at_rcpt(start_smtp, spool, monkeypatch):
    monkeypatch.setattr(mailbox_store, "MAX_ALIAS_RECIPIENTS", 3)
    with open(os.path.join(str(spool), "aliases"), "a") as aliases:
        aliases.write("crowd: %s\n" % ", ".join("u%d@remote.example" % n for n in range(4)))
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("RCPT TO:<crowd@example.com>") == (
        550, [smtp_in.R550_ALIAS_TOO_BIG % "crowd@example.com"])


def test_aliases_and_sub_addresses_are_accepted_at_rcpt(start_smtp, spool):
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("RCPT TO:<sales@example.com>")[0] == 250
    assert client.command("RCPT TO:<alice+lists@example.com>")[0] == 250
    assert client.command("RCPT TO:<abuse@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message() + b".\r\n")
    assert client.reply()[0] == 250
    [(_, recipients, _)] = spool_messages(spool)
    assert recipients == ["sales@example.com", "alice+lists@example.com", "abuse@example.com"]


@pytest.mark.parametrize("rcpt", [
    "victim@remote.example",                       # plain relay attempt
    "victim%remote.example@example.com",           # % hack
    "remote.example!victim@example.com",           # bang path (UUCP)
    "@example.com:victim@remote.example",          # source route ending outside
    "\"victim@remote.example\"@example.com",       # quoted local part with @
    "\"victim%remote.example\"@example.com",
    "victim@[192.0.2.1]",                          # address literal
    "victim@example.com.remote.example",           # look-alike domain
])
def test_unauthenticated_relay_attempts_get_554_5_7_1(start_smtp, spool, rcpt):
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    code, lines = client.command("RCPT TO:<%s>" % rcpt)
    assert code == 554 and " 5.7.1 " in lines[0]
    assert client.command("DATA") == (554, [smtp_in.R554_NO_VALID_RECIPIENTS])
    assert spool_messages(spool) == []


def test_source_route_to_a_local_user_is_accepted_and_dropped(start_smtp, spool):
    client = greeted(start_smtp())
    assert send_transaction(client, rcpt="@relay.example,@x.example:bob@example.com")[0] == 250
    assert spool_messages(spool)[0][1] == ["bob@example.com"]


def test_relay_network_may_relay(start_smtp, spool):
    client = greeted(start_smtp(relay_network=["127.0.0.0/8"]))
    assert send_transaction(client, rcpt="friend@remote.example")[0] == 250
    assert spool_messages(spool)[0][1] == ["friend@remote.example"]


def test_recipient_limit_gives_452_4_5_3_and_keeps_the_first(start_smtp, spool):
    client = greeted(start_smtp(max_recipients=3))
    client.command("MAIL FROM:<a@example.org>")
    for user in ("bob", "bob", "alice", "sales"):                 # a repeat is queued once
        assert client.command("RCPT TO:<%s@example.com>" % user)[0] == 250
    assert client.command("RCPT TO:<postmaster@example.com>")[0] == 452
    assert client.command("DATA")[0] == 354
    client.send(message() + b".\r\n")
    assert client.reply()[0] == 250
    assert spool_messages(spool)[0][1] == ["bob@example.com", "alice@example.com", "sales@example.com"]


def test_default_limit_is_100_recipients(start_smtp):
    client = greeted(start_smtp(relay_network=["127.0.0.1/32"]))
    client.command("MAIL FROM:<a@example.org>")
    client.send("".join("RCPT TO:<r%d@remote.example>\r\n" % n for n in range(101)))
    codes = [client.reply()[0] for _ in range(101)]
    assert codes == [250] * 100 + [452]


def test_domainless_malformed_and_non_ascii_addresses(start_smtp):
    client = greeted(start_smtp())
    assert client.command("MAIL FROM:<alice>") == (553, [smtp_in.R553_SENDER_NEEDS_DOMAIN % "alice"])
    assert client.command("MAIL FROM:<jörg@example.org>") == (553, [smtp_in.R553_NEED_SMTPUTF8])
    assert client.command("MAIL FROM:<a@example.org>")[0] == 250
    assert client.command("RCPT TO:<bob>") == (553, [smtp_in.R553_NEED_DOMAIN % "bob"])
    assert client.command("RCPT TO:<bob@@example.com>") == (501, [smtp_in.R501_BAD_RECIPIENT])
    assert client.command("RCPT TO:<>") == (501, [smtp_in.R501_BAD_RECIPIENT])
    assert client.command("RCPT TO:<jörg@example.com>") == (553, [smtp_in.R553_NEED_SMTPUTF8])


def test_smtputf8_message_is_accepted_with_protocol_utf8smtp(start_smtp, spool):
    server = start_smtp(relay_network=["127.0.0.1/32"])
    client = greeted(server)
    assert client.command("MAIL FROM:<jörg@bücher.example> SMTPUTF8 BODY=8BITMIME")[0] == 250
    assert client.command("RCPT TO:<zoë@remote.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send("Subject: grüße\r\n\r\n8-bit text: ☃\r\n.\r\n".encode("utf-8"))
    assert client.reply()[0] == 250
    [(sender, recipients, data)] = spool_messages(spool)
    assert sender == "jörg@bücher.example" and recipients == ["zoë@remote.example"]
    assert b" with UTF8SMTP id " in data and "☃".encode() in data


# --- Size and line limits ---

def test_size_parameter_over_the_limit_is_refused_at_mail(start_smtp):
    client = greeted(start_smtp(max_size=1000))
    assert client.command("MAIL FROM:<a@example.org> SIZE=1001") == (552, [smtp_in.R552_TOO_BIG])
    assert client.command("MAIL FROM:<a@example.org> SIZE=1000")[0] == 250


def test_body_past_the_limit_is_read_to_its_end_refused_and_the_session_goes_on(start_smtp, spool):
    client = greeted(start_smtp(max_size=10_000))
    body = (b"y" * 98 + b"\r\n") * 2000                  # 200 KB, 20 times the limit
    assert send_transaction(client, data=message(body=body.decode()))[0] == 552
    assert spool_is_empty(spool)
    assert send_transaction(client, data=message(body="small\r\n"))[0] == 250
    assert len(spool_messages(spool)) == 1


def test_smtplib_gets_552_for_a_message_too_big(start_smtp):
    server = start_smtp(max_size=2000)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["bob@example.com"], b"x" * 5000)
        assert refused.value.smtp_code == 552
        client.ehlo_or_helo_if_needed()
        client.esmtp_features.pop("size")                # now only DATA can tell
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@example.org", ["bob@example.com"], b"x" * 5000)
        assert refused.value.smtp_code == 552


def test_text_lines_of_998_pass_and_lines_past_the_limit_get_552(start_smtp, spool):
    client = greeted(start_smtp())
    assert send_transaction(client, data=message(body="z" * 998 + "\r\n"))[0] == 250
    long_line = "w" * (smtp_in.MAX_TEXT_LINE + 1) + "\r\n"
    code, lines = send_transaction(client, data=message(body=long_line))
    assert (code, lines) == (552, [smtp_in.R552_LINE_TOO_LONG % smtp_in.MAX_TEXT_LINE])
    assert len(spool_messages(spool)) == 1
    assert os.listdir(os.path.join(str(spool), "queue", "tmp")) == []


def test_command_line_past_2_kib_gets_500_and_the_session_goes_on(start_smtp):
    client = greeted(start_smtp())
    assert client.command("NOOP " + "x" * 1500)[0] == 250           # lenient past 512
    assert client.command("NOOP " + "x" * 5000) == (500, [smtp_in.R500_LINE_TOO_LONG])
    assert client.command("NOOP")[0] == 250


@pytest.mark.parametrize("line", [b"NOOP \x00x", b"MAIL FROM:<a\x01@example.org>", b"NOOP\x7f",
                                  b"NOOP \xff\xfe", b"NO\x1bOP", b"NOOP\tx",
                                  "RCPT TO:<a\u2028b@example.com>".encode(), b"NOOP \xc2\x85"],
                         ids=repr)
def test_nul_and_control_characters_in_commands_are_refused(start_smtp, line):
    client = greeted(start_smtp())
    assert client.command(line) == (500, [smtp_in.R500_BAD_CHARACTERS])
    assert client.command("NOOP")[0] == 250


def test_bare_cr_ends_no_command_and_bare_lf_is_tolerated(start_smtp):
    client = greeted(start_smtp())
    client.send(b"NOOP\rNOOP\r\nNOOP\n")
    assert client.reply() == (500, [smtp_in.R500_BARE_CR])     # "NOOP\rNOOP" is one line
    assert client.reply()[0] == 250
    assert client.command("QUIT")[0] == 221


def test_a_command_line_with_a_bare_cr_is_refused_whole(start_smtp, spool):
    client = greeted(start_smtp())
    assert client.command("MAIL FROM:<a@example.org>")[0] == 250
    client.send(b"XXXX\rRCPT TO:<bob@example.com>\r\nNOOP\r\n")
    assert client.reply() == (500, [smtp_in.R500_BARE_CR])
    assert client.reply() == (250, [smtp_in.R250_OK])          # the NOOP: nothing between
    assert client.command("DATA") == (503, [smtp_in.R503_NEED_RCPT])   # no RCPT ran
    client.send(b"RCPT TO:<bob@example.com>\rX\rRCPT TO:<alice@example.com>\n")
    assert client.reply() == (500, [smtp_in.R500_BARE_CR])
    client.send(b"A" * 5000 + b"\rRCPT TO:<bob@example.com>\r\n")     # past the limit too
    assert client.reply() == (500, [smtp_in.R500_BARE_CR])
    assert client.command("DATA") == (503, [smtp_in.R503_NEED_RCPT])


# --- Pipelining, early talkers, smuggling ---

def test_pipelined_commands_are_answered_in_order(start_smtp, spool):
    client = greeted(start_smtp())
    client.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
                "RCPT TO:<nobody@example.com>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(5)] == [250, 250, 550, 250, 354]
    client.send(message() + b".\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
                b"DATA\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(message("second") + b".\r\nQUIT\r\n")
    assert [client.reply()[0] for _ in range(2)] == [250, 221]
    assert [m[0] for m in spool_messages(spool)] == ["a@example.org", "b@example.org"]


def test_pipelined_transaction_with_no_valid_recipient_gets_554_at_data(start_smtp):
    client = greeted(start_smtp())
    client.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\nNOOP\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 554, 554, 250]


def test_replies_wait_in_the_buffer_while_commands_are_pipelined(start_smtp):
    client = greeted(start_smtp())
    client.send("NOOP\r\n" * 50)
    replies = client.sock.recv(65536)
    while replies.count(b"\r\n") < 50:
        replies += client.sock.recv(65536)
    assert replies == b"250 2.0.0 OK\r\n" * 50


def test_early_talker_gets_554_and_is_disconnected(start_smtp, spool):
    server = start_smtp(greet_pause=0.5)
    client = RawClient(server)
    client.send("EHLO spam.example\r\nMAIL FROM:<a@example.org>\r\n")
    assert client.reply() == (554, [smtp_in.R554_EARLY_TALKER])
    assert client.at_eof()
    polite = RawClient(server)
    assert polite.reply()[0] == 220                   # one that waits is served
    assert polite.command("EHLO client.example.org")[0] == 250


def test_crlf_dot_crlf_split_across_packets_ends_the_data(start_smtp, spool):
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<bob@example.com>")
    client.command("DATA")
    for piece in (message() + b"..dotted\r", b"\n.", b"\r", b"\n"):
        client.send(piece)
        time.sleep(0.05)       # one packet each: what is tested (on a busy machine some meet)
    assert client.reply()[0] == 250
    assert spool_messages(spool)[0][2].endswith(b"Hello.\r\n.dotted\r\n")


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=repr)
def test_smuggled_second_message_never_becomes_a_message(start_smtp, spool, variant):
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<bob@example.com>")
    assert client.command("DATA")[0] == 354
    client.send(b"From: <a@example.org>\r\nSubject: first\r\n\r\nfirst" + variant
                + b"MAIL FROM:<spoof@example.com>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
                + b"Subject: smuggled\r\n\r\nevil\r\n.\r\nNOOP\r\n")
    code, lines = client.reply()
    assert code == 550 and lines[0] in (smtp_in.R550_BARE_LINE_ENDING, smtp_in.R550_NUL)
    assert client.reply() == (250, [smtp_in.R250_OK])            # the NOOP, nothing between
    assert client.command("RCPT TO:<bob@example.com>")[0] == 503  # no transaction survived
    assert spool_is_empty(spool)                                  # nor a file in queue/tmp


def test_smuggling_with_a_clean_first_message_still_gives_one_message(start_smtp, spool):
    client = greeted(start_smtp())
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<bob@example.com>")
    client.command("DATA")
    client.send(b"Subject: one\r\n\r\ntext\r\n..\r\nMAIL FROM:<spoof@example.com>\r\n.\r\n")
    assert client.reply()[0] == 250
    [(_, _, data)] = spool_messages(spool)
    assert data.endswith(b"text\r\n.\r\nMAIL FROM:<spoof@example.com>\r\n")


# --- STARTTLS and AUTH ---

def tls_config(tls_files, **extra):
    cert, key = tls_files
    return dict(tls_cert=cert, tls_key=key, **extra)


def test_starttls_then_auth_gives_esmtpsa_and_the_user_may_relay(start_smtp, spool, tls_files):
    server = start_smtp(**tls_config(tls_files))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        client.ehlo("client.example.org")
        assert client.has_extn("starttls")
        client.starttls()
        client.ehlo("client.example.org")
        assert not client.has_extn("starttls")
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["friend@remote.example"], message(sender=ALICE))
    [(sender, recipients, data)] = spool_messages(spool)
    assert (sender, recipients) == (ALICE, ["friend@remote.example"])
    assert b" with ESMTPSA id " in data


def test_starttls_resets_the_session_and_needs_a_new_ehlo(start_smtp, tls_files):
    client = greeted(start_smtp(**tls_config(tls_files)))
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("STARTTLS") == (220, [smtp_in.R220_READY_FOR_TLS])
    client.starttls()
    assert client.command("MAIL FROM:<a@example.org>") == (503, [smtp_in.R503_NEED_HELO])
    assert client.command("EHLO client.example.org")[0] == 250
    assert client.command("RCPT TO:<bob@example.com>") == (503, [smtp_in.R503_NEED_MAIL])
    assert client.command("STARTTLS") == (503, [smtp_in.R503_TLS_ACTIVE])


def test_plaintext_pipelined_behind_starttls_is_discarded(start_smtp, spool, tls_files):
    client = greeted(start_smtp(**tls_config(tls_files)))
    client.send("STARTTLS\r\nEHLO injected.example\r\nMAIL FROM:<injected@example.org>\r\n"
                "RCPT TO:<bob@example.com>\r\n")
    assert client.reply() == (220, [smtp_in.R220_READY_FOR_TLS])
    client.starttls()
    assert client.command("RCPT TO:<bob@example.com>") == (503, [smtp_in.R503_NEED_MAIL])
    assert client.command("EHLO client.example.org")[0] == 250
    assert client.command("RCPT TO:<bob@example.com>") == (503, [smtp_in.R503_NEED_MAIL])


def test_starttls_without_a_certificate_is_not_implemented(start_smtp):
    client = greeted(start_smtp())
    assert client.command("STARTTLS") == (502, [smtp_in.R502_NOT_IMPLEMENTED])


def test_openssl_s_client_starttls_session(start_smtp, spool, tls_files):
    openssl = require_tool("openssl")
    server = start_smtp(**tls_config(tls_files))
    out = openssl_starttls(openssl, server.port, "smtp",
                           b"EHLO tls.example.org\nMAIL FROM:<a@example.org>\n"
                           b"RCPT TO:<bob@example.com>\nDATA\nSubject: via openssl\n\nhi\n.\nQUIT\n")
    assert b"250 2.0.0 OK: queued as" in out and b"221 2.0.0" in out
    [(_, _, data)] = spool_messages(spool)
    assert b"from tls.example.org" in data and b" with ESMTPS id " in data


class NotLoopbackHandler(smtp_in.SMTPHandler):
    """Plays a client from elsewhere: the policy must not count on loopback."""

    @property
    def is_loopback(self):
        return False


def test_auth_is_offered_off_loopback_only_after_starttls(start_smtp, tls_files):
    server = start_smtp(NotLoopbackHandler, **tls_config(tls_files))
    client = RawClient(server)
    client.reply()
    code, lines = client.command("EHLO client.example.org")
    assert "250-AUTH PLAIN LOGIN" not in lines and "250-STARTTLS" in lines
    assert client.command("AUTH PLAIN " + b64(b"\0alice@example.com\0alice-secret")) == (
        538, [smtp_in.R538_ENCRYPTION_REQUIRED])
    client.command("STARTTLS")
    client.starttls()
    code, lines = client.command("EHLO client.example.org")
    assert "250-AUTH PLAIN LOGIN" in lines
    assert client.command("AUTH PLAIN " + b64(b"\0alice@example.com\0alice-secret")) == (
        235, [smtp_in.R235_AUTH_OK])


def test_auth_plain_with_and_without_initial_response_and_login(start_smtp):
    server = start_smtp()
    client = greeted(server)
    assert client.command("AUTH PLAIN") == (334, ["334 "])
    assert client.command(b64(b"\0alice@example.com\0alice-secret"))[0] == 235
    assert client.command("AUTH PLAIN x") == (503, [smtp_in.R503_ALREADY_AUTHENTICATED])
    client = greeted(server)
    assert client.command("AUTH login") == (334, ["334 " + smtp_in.LOGIN_USERNAME])
    assert client.command(b64(b"bob")) == (334, ["334 " + smtp_in.LOGIN_PASSWORD])
    assert client.command(b64(b"bob-secret"))[0] == 235
    client = greeted(server)
    assert client.command("AUTH LOGIN " + b64(b"alice@example.com"))[0] == 334
    assert client.command(b64(b"alice-secret"))[0] == 235


def test_auth_cancel_bad_base64_and_unknown_mechanism(start_smtp):
    client = greeted(start_smtp())
    assert client.command("AUTH CRAM-MD5") == (504, [smtp_in.R504_UNKNOWN_MECHANISM])
    assert client.command("AUTH") == (501, [smtp_in.R501_SYNTAX])
    client.command("AUTH PLAIN")
    assert client.command("*") == (501, [smtp_in.R501_AUTH_CANCELLED])
    assert client.command("AUTH PLAIN not-base64!") == (501, [smtp_in.R501_BAD_SASL])
    assert client.command("AUTH PLAIN =") == (501, [smtp_in.R501_BAD_SASL])
    client.command("AUTH LOGIN")
    client.command(b64(b"alice"))
    assert client.command("*") == (501, [smtp_in.R501_AUTH_CANCELLED])
    client.command("MAIL FROM:<a@example.org>")
    assert client.command("AUTH PLAIN x") == (503, [smtp_in.R503_IN_TRANSACTION])
    assert client.command("NOOP")[0] == 250


def test_auth_before_ehlo_and_wrong_authzid_fail(start_smtp):
    client = RawClient(start_smtp())
    client.reply()
    assert client.command("AUTH PLAIN x") == (503, [smtp_in.R503_NEED_EHLO])
    client.command("HELO client.example.org")
    assert client.command("AUTH PLAIN x") == (503, [smtp_in.R503_NEED_EHLO])
    client.command("EHLO client.example.org")
    assert client.command("AUTH PLAIN " + b64(b"bob@example.com\0alice@example.com\0alice-secret"))[0] == 535


def test_failed_logins_get_535_each_slower_and_close_after_three(start_smtp, caplog):
    client = greeted(start_smtp())
    times = []
    for attempt in range(3):
        started = time.monotonic()
        assert client.command("AUTH PLAIN " + b64(b"\0alice@example.com\0wrong%d" % attempt)) == (
            535, [smtp_in.R535_AUTH_FAILED])
        times.append(time.monotonic() - started)
    assert client.at_eof()
    assert times[0] >= 0.45 and times[1] >= 0.95 and times[2] >= 1.9
    failures = [r.getMessage() for r in caplog.records if "auth failed" in r.getMessage()]
    assert len(failures) == 3 and "client=[127.0.0.1]" in failures[0]
    assert "wrong" not in " ".join(r.getMessage() for r in caplog.records)


def test_swaks_auth_plain_and_login(start_smtp, spool):
    swaks = require_tool("swaks")
    server = start_smtp()
    for mechanism in ("PLAIN", "LOGIN"):
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1:%d" % server.port, "--helo", "swaks.example.org",
             "--from", ALICE, "--to", "friend@remote.example", "--auth", mechanism,
             "--auth-user", ALICE, "--auth-password", ALICE_PW, "--header", "Subject: " + mechanism,
             "--timeout", "10"], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert [m[1] for m in spool_messages(spool)] == [["friend@remote.example"]] * 2
    assert all(b" with ESMTPA id " in m[2] for m in spool_messages(spool))


def test_swaks_pipelining_mx_delivery_and_starttls(start_smtp, spool, tls_files):
    swaks = require_tool("swaks")
    server = start_smtp(**tls_config(tls_files))
    for extra in (["--pipeline"], ["--tls"]):
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1:%d" % server.port, "--helo", "mx.example.org",
             "--from", "someone@example.org", "--to", "bob@example.com", "--timeout", "10"] + extra,
            capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout.decode()
    assert len(spool_messages(spool)) == 2
    assert b" with ESMTPS id " in spool_messages(spool)[1][2]


def test_swaks_relay_attempt_is_refused(start_smtp, spool):
    swaks = require_tool("swaks")
    server = start_smtp()
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1:%d" % server.port, "--from", "spammer@example.org",
         "--to", "victim@remote.example", "--timeout", "10"], capture_output=True, timeout=30)
    assert result.returncode != 0
    assert b"554 5.7.1 <victim@remote.example>: Relay access denied" in result.stdout
    assert spool_messages(spool) == []


# --- Submission ---

def test_submission_requires_auth_before_mail(start_smtp):
    client = greeted(start_smtp(submission=True))
    assert client.command("MAIL FROM:<alice@example.com>") == (530, [smtp_in.R530_AUTH_REQUIRED])


def test_submission_sender_must_be_the_user_or_one_of_its_aliases(start_smtp, spool):
    client = greeted(start_smtp(submission=True))
    assert client.command("AUTH PLAIN " + b64(b"\0alice\0alice-secret"))[0] == 235
    assert client.command("MAIL FROM:<bob@example.com>") == (
        553, [smtp_in.R553_NOT_OWNER % ("bob@example.com", ALICE)])
    assert client.command("MAIL FROM:<>")[0] == 553
    assert client.command("MAIL FROM:<evil@remote.example>")[0] == 553
    for sender in ("Alice@Example.com", "sales@example.com", "alice+news@example.com"):
        assert client.command("MAIL FROM:<%s>" % sender)[0] == 250
        assert client.command("RSET")[0] == 250
    assert send_transaction(client, sender=ALICE, rcpt="friend@remote.example")[0] == 250
    [(_, _, data)] = spool_messages(spool)
    assert b" with ESMTPA id " in data


def test_curl_submission(start_smtp, spool, tmp_path):
    curl = require_tool("curl")
    server = start_smtp(submission=True)
    mail = tmp_path / "mail.txt"
    mail.write_bytes(message("from curl", sender=ALICE, to="friend@remote.example"))
    result = subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", "20",
         "smtp://127.0.0.1:%d/curl.example.org" % server.port, "--mail-from", ALICE,
         "--mail-rcpt", "friend@remote.example", "--user", "%s:%s" % (ALICE, ALICE_PW),
         "--upload-file", str(mail)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    [(sender, recipients, data)] = spool_messages(spool)
    assert (sender, recipients) == (ALICE, ["friend@remote.example"])
    assert b"from curl.example.org" in data and b"Subject: from curl" in data


def test_implicit_tls_listener_is_a_submission_port(start_smtp, spool, tls_files):
    server = start_smtp(server_options={"implicit_tls": True, "submission": True},
                        **tls_config(tls_files))
    import ssl
    context = ssl.create_default_context(cafile=tls_files[0])
    with smtplib.SMTP_SSL("127.0.0.1", server.port, timeout=5, context=context) as client:
        client.ehlo("client.example.org")
        assert not client.has_extn("starttls") and client.has_extn("auth")
        code, _ = client.mail(ALICE)
        assert code == 530
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["bob@example.com"], message(sender=ALICE))
    assert b" with ESMTPSA id " in spool_messages(spool)[0][2]


# --- The spool: 250 only once durable ---

def test_a_text_line_of_65536_octets_passes_and_one_of_65537_gets_552(start_smtp, spool):
    client = greeted(start_smtp())
    exact = "v" * smtp_in.MAX_TEXT_LINE + "\r\n"
    stuffed = ".." + "d" * (smtp_in.MAX_TEXT_LINE - 1) + "\r\n"   # the doubled dot is not counted
    assert send_transaction(client, data=message(body=exact + stuffed))[0] == 250
    longer = "w" * (smtp_in.MAX_TEXT_LINE + 1) + "\r\n"
    assert send_transaction(client, data=message(body=longer)) == (
        552, [smtp_in.R552_LINE_TOO_LONG % smtp_in.MAX_TEXT_LINE])
    (_, _, queued), = spool_messages(spool)
    assert queued.endswith(exact.encode() + stuffed[1:].encode())


def test_a_message_cut_off_mid_data_leaves_nothing_in_the_spool(start_smtp, spool):
    server = start_smtp()
    for cut_after in (0, 10, 3 * 65536 + 7):
        client = greeted(server)
        assert client.command("MAIL FROM:<a@example.org>")[0] == 250
        assert client.command("RCPT TO:<bob@example.com>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(message(body="partial line\r\n" * 20000)[:cut_after])
        tmp = os.path.join(str(spool), "queue", "tmp")
        if cut_after > 65536:
            assert wait_for(lambda: os.listdir(tmp) != [])   # it was being written
        client.file.close()            # the connection closes with its last reference
        client.close()
        assert wait_for(lambda: os.listdir(tmp) == [])
    assert spool_is_empty(spool)


def test_a_message_that_times_out_mid_data_leaves_nothing_in_the_spool(start_smtp, spool):
    client = greeted(start_smtp(idle_timeout=0.5))
    assert client.command("MAIL FROM:<a@example.org>")[0] == 250
    assert client.command("RCPT TO:<bob@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message(body="more to come\r\n" * 10000))
    assert client.reply() == (421, [smtp_in.R421_TIMEOUT])
    assert client.at_eof()
    assert spool_is_empty(spool)


def test_a_large_message_arrives_byte_exact_in_the_maildir(start_smtp, spool):
    line = b"0123456789" * 7 + b"..\r\n"
    text = b"Subject: large\r\n\r\n" + b"".join(
        (b"." if n % 1000 == 0 else b"") + line for n in range(300000))      # about 25 MB
    server = start_smtp()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
        client.sendmail("a@example.org", ["bob@example.com"], text)
    route_all(spool)
    (delivered,) = maildir_messages(spool, "bob@example.com")
    assert delivered.endswith(b"\r\n" + text) and delivered.count(b"\r\nReceived: ") == 1
    assert delivered.startswith(b"Return-Path: <a@example.org>\r\nDelivered-To: bob@example.com\r\n"
                                b"Received: from ")


def smtp_in_process(tmp_path, spool, *flags):
    """smtp_in.py as its own process on 127.0.0.1 (its log in a file), and its port."""
    log_path = str(tmp_path / "smtp_in.log")
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool", str(spool), "--listen",
         "127.0.0.1:0", "--domain", DOMAIN, "--hostname", HOSTNAME, "--spf", "off",
         "--dkim-verify", "no", "--dmarc", "off"] + list(flags),
        stderr=log_file)
    log_file.close()
    found = []

    def listening():
        with open(log_path) as f:
            found[:] = re.findall(r"listening on 127\.0\.0\.1:(\d+)", f.read())
        return found or process.poll() is not None
    wait_for(listening, 20)
    assert found, open(log_path).read()
    return process, int(found[0])


def vm_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def test_memory_stays_bounded_while_sessions_send_30_mb_messages(tmp_path, spool):
    # A correctness bound, not a speed figure: the message never sits whole in memory.
    sessions, size = 4, 30 * 1024 * 1024
    line = b"z" * 78 + b"\r\n"
    payload = b"Subject: big\r\n\r\n" + line * (size // len(line)) + b".\r\n"
    # One process, so that the sessions' memory is this pid's (not a worker's).
    process, port = smtp_in_process(tmp_path, spool, "--max-size", str(40 * 1024 * 1024),
                                    "--processes", "1")
    try:
        def send(_):
            client = RawClient(port, timeout=60)
            assert client.reply()[0] == 220
            assert client.command("EHLO load.example.org")[0] == 250
            assert client.command("MAIL FROM:<a@example.org>")[0] == 250
            assert client.command("RCPT TO:<bob@example.com>")[0] == 250
            assert client.command("DATA")[0] == 354
            view = memoryview(payload)
            for start in range(0, len(view), 1 << 20):
                client.sock.sendall(view[start:start + (1 << 20)])
            reply = client.reply()
            client.close()
            return reply[0]
        with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
            assert list(pool.map(send, range(sessions))) == [250] * sessions
        peak = vm_kib(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(10)
    assert len(spool_messages(spool)) == sessions
    assert peak < 100 * 1024, "smtp_in peaked at %d KiB" % peak


def test_250_comes_only_after_the_queue_file_is_committed(start_smtp, spool, monkeypatch):
    real_commit = mta.QueueWriter.commit
    returned = []

    def slow_commit(self):
        time.sleep(0.3)        # a slow disk: a 250 sent before the commit would come first
        queue_id = real_commit(self)
        returned.append(time.monotonic())
        return queue_id

    monkeypatch.setattr(mta.QueueWriter, "commit", slow_commit)
    client = greeted(start_smtp())
    assert send_transaction(client)[0] == 250
    seen = time.monotonic()
    assert returned and returned[0] <= seen
    assert len(spool_messages(spool)) == 1


def spool_is_empty(spool):
    """Nothing queued and nothing being written (queue/tmp/ empty)."""
    tmp = os.path.join(str(spool), "queue", "tmp")
    return spool_messages(spool) == [] and (not os.path.isdir(tmp) or os.listdir(tmp) == [])


@pytest.mark.parametrize("stage", ["open", "write", "commit"])
@pytest.mark.parametrize("error, reply", [
    (errno.EIO, smtp_in.R451_SPOOL_ERROR), (errno.ENOSPC, smtp_in.R452_SPOOL_FULL)])
def test_spool_failure_is_a_temporary_error_and_nothing_is_acknowledged(
        start_smtp, spool, monkeypatch, error, reply, stage):
    class FailingWriter(mta.QueueWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.writes = 0
            if stage == "open":
                self.fail()

        def fail(self):
            self.abort()               # what the real one does when the disk fails it
            raise mta.SpoolError(error, os.strerror(error))

        def write(self, data):
            self.writes += 1
            if stage == "write" and self.writes == 2:
                self.fail()
            super().write(data)

        def commit(self):
            if stage == "commit":
                self.fail()
            return super().commit()

    monkeypatch.setattr(mta, "QueueWriter", FailingWriter)
    client = greeted(start_smtp())
    if stage == "open":                # RFC 5321 4.3.2: DATA itself gets the 451 or 452
        assert client.command("MAIL FROM:<a@example.org>")[0] == 250
        assert client.command("RCPT TO:<bob@example.com>")[0] == 250
        assert client.command("DATA") == (int(reply[:3]), [reply])
    else:
        assert send_transaction(client, data=message(body="line\r\n" * 20000)) == (
            int(reply[:3]), [reply])
    assert client.command("NOOP")[0] == 250
    assert spool_is_empty(spool)


def test_message_with_too_many_received_headers_is_refused_as_a_loop(start_smtp, spool):
    client = greeted(start_smtp())
    hops = b"".join(b"Received: from a%d.example by b.example; Mon, 6 May 2024 07:08:09 +0000\r\n"
                    % n for n in range(smtp_in.MAX_HOPS))
    assert send_transaction(client, data=hops + message()) == (554, [smtp_in.R554_TOO_MANY_HOPS])
    assert spool_is_empty(spool)
    assert send_transaction(client, data=hops[:-80] + message())[0] == 250


def test_reverse_lookup_name_appears_in_received(start_smtp, spool):
    asked = []

    def lookup(ip):
        asked.append(ip)
        return "client.example.net"

    client = greeted(start_smtp(server_options={"reverse_lookup": lookup}))
    send_transaction(client)
    send_transaction(client)
    assert asked == ["127.0.0.1"]                      # once per session
    assert b"Received: from client.example.org (client.example.net [127.0.0.1])" in \
        spool_messages(spool)[0][2]


# --- Limits on sessions ---

def test_too_many_errors_get_421_and_a_closed_connection(start_smtp):
    client = greeted(start_smtp(max_errors=5))
    for _ in range(4):
        assert client.command("BOGUS")[0] == 500
    assert client.command("BOGUS")[0] == 500
    assert client.reply() == (421, [smtp_in.R421_TOO_MANY_ERRORS])
    assert client.at_eof()


def test_an_accepted_message_forgives_earlier_errors(start_smtp):
    client = greeted(start_smtp(max_errors=3))
    client.command("BOGUS")
    client.command("BOGUS")
    assert send_transaction(client)[0] == 250
    client.command("BOGUS")
    client.command("BOGUS")
    assert client.command("NOOP")[0] == 250


def test_too_many_commands_get_421(start_smtp):
    client = greeted(start_smtp(max_commands=5))
    for _ in range(4):
        assert client.command("NOOP")[0] == 250
    assert client.command("NOOP") == (421, [smtp_in.R421_TOO_MANY_COMMANDS])
    assert client.at_eof()


def test_connection_caps_send_421_4_7_0(start_smtp):
    server = start_smtp(max_connections=2, max_per_address=1)
    first = RawClient(server)
    assert first.reply()[0] == 220
    second = RawClient(server)
    assert second.reply() == (421, [smtp_in.R421_BUSY])
    other = RawClient(server, source="127.0.0.2")
    assert other.reply()[0] == 220
    third = RawClient(server, source="127.0.0.3")
    assert third.reply() == (421, [smtp_in.R421_BUSY])


def test_slow_client_is_dropped_after_the_idle_timeout_while_others_work(start_smtp, spool):
    server = start_smtp(idle_timeout=0.6)
    slow = greeted(server)
    slow.send("MAIL FROM:<slow@exa")                  # and then nothing
    started = time.monotonic()
    for n in range(3):
        client = greeted(server)
        assert send_transaction(client, sender="fast%d@example.org" % n)[0] == 250
        client.command("QUIT")
    assert slow.reply() == (421, [smtp_in.R421_TIMEOUT])
    assert 0.5 <= time.monotonic() - started < 0.6 + SLACK
    assert slow.at_eof()
    assert len(spool_messages(spool)) == 3


def test_client_stalling_in_data_is_dropped_and_nothing_is_queued(start_smtp, spool):
    client = greeted(start_smtp(idle_timeout=0.5))
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<bob@example.com>")
    client.command("DATA")
    client.send(b"Subject: half\r\n\r\nhalf a mess")
    assert client.reply() == (421, [smtp_in.R421_TIMEOUT])
    assert spool_messages(spool) == []


def test_session_time_limit(start_smtp):
    client = greeted(start_smtp(idle_timeout=5, session_timeout=0.8))
    started = time.monotonic()
    with pytest.raises(OSError):
        while time.monotonic() - started < 30:
            client.send("NOOP\r\n")
            time.sleep(0.02)           # a busy client, never idle: what is tested
    assert time.monotonic() - started < 0.8 + SLACK


def test_fifty_concurrent_clients_ten_messages_each_arrive_once(start_smtp, spool):
    server = start_smtp()

    def one_client(n):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            for m in range(10):
                client.sendmail("c%d@example.org" % n, ["bob@example.com"],
                                message("c%d m%d" % (n, m)))
        return n

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        assert sorted(pool.map(one_client, range(50))) == list(range(50))
    expected = sorted(b"c%d m%d" % (n, m) for n in range(50) for m in range(10))
    subjects = [re.search(rb"Subject: (c\d+ m\d)", m[2]).group(1) for m in spool_messages(spool)]
    assert sorted(subjects) == expected
    route_all(spool)
    delivered = maildir_messages(spool, "bob@example.com")
    assert sorted(re.search(rb"Subject: (c\d+ m\d)", m).group(1) for m in delivered) == expected
    assert spool_messages(spool) == []


def test_shutdown_tells_an_idle_client_and_lets_data_finish(start_smtp, spool):
    server = start_smtp()
    idle = greeted(server)
    busy = greeted(server)
    busy.command("MAIL FROM:<a@example.org>")
    busy.command("RCPT TO:<bob@example.com>")
    busy.command("DATA")
    busy.send(b"Subject: in flight\r\n\r\n")
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 3})
    stopper.start()
    assert idle.reply() == (421, [smtp_in.R421_SHUTTING_DOWN])
    busy.send(b"last line\r\n.\r\n")
    assert busy.reply()[0] == 250
    assert busy.reply() == (421, [smtp_in.R421_SHUTTING_DOWN])
    stopper.join(5)
    assert len(spool_messages(spool)) == 1


# --- Random input ---

@pytest.fixture(scope="module")
def random_input_server(tmp_path_factory, store_template):
    spool = tmp_path_factory.mktemp("random") / "spool"
    shutil.copytree(str(store_template), str(spool))
    server = smtp_in.SMTPServer(("127.0.0.1", 0), {"spool": str(spool), "domain": [DOMAIN],
                                                   "hostname": HOSTNAME, "max_errors": 1000,
                                                   "spf": "off", "dkim_verify": "no", "dmarc": "off",
                                                   "anvil_exempt": ["127.0.0.1"]})
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.stop(grace=0.1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(["", "EHLO ", "HELO ", "MAIL FROM:", "RCPT TO:", "MAIL FROM:<",
                               "RCPT TO:<a@", "AUTH ", "AUTH PLAIN ", "AUTH LOGIN ", "VRFY ",
                               "NOOP ", "DATA", "RSET", "STARTTLS", "mail from:<> ",
                               "MAIL FROM:<a@example.org> SIZE=", "RCPT TO:<bob@example.com> ",
                               "MAIL FROM:<a@example.org> SMTPUTF8 BODY="]),
       tail=st.binary(max_size=600).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
def test_random_command_lines_get_well_formed_replies_and_the_server_goes_on(
        random_input_server, prefix, tail):
    client = greeted(random_input_server)
    if not prefix.upper().startswith("MAIL"):
        client.command("MAIL FROM:<a@example.org>")
    client.send(prefix.encode() + tail + b"\r\n")
    code, lines = client.reply()
    assert code is not None and 200 <= code < 600, lines
    assert all(re.match(r"^\d{3}[ -]", line) for line in lines)
    if code == 334:
        assert client.command("*")[0] == 501
    elif code == 354:
        client.send(b".\r\n")
        assert client.reply()[0] in (250, 550, 552)
    assert client.command("NOOP") == (250, [smtp_in.R250_OK])
    client.close()


# --- Logs and the command line ---

def test_logs_connect_accept_reject_and_disconnect(start_smtp, caplog):
    caplog.set_level(logging.INFO, logger="smtp_in")
    client = greeted(start_smtp())
    port = client.sock.getsockname()[1]
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<x@remote.example>")
    client.command("RCPT TO:<bob@example.com>")
    client.command("DATA")
    client.send(message() + b".\r\n")
    queue_id = client.reply()[1][0].split()[-1]
    client.command("QUIT")
    client.at_eof()
    assert wait_for(lambda: any("disconnect" in r.getMessage() for r in caplog.records))
    # The server is shared by the module's tests: this session's lines start at its connect.
    lines = [r.getMessage() for r in caplog.records if r.name == "smtp_in"]
    lines = lines[lines.index("connect from [127.0.0.1]:%d" % port):]
    assert any(line.startswith("NOQUEUE: client=[127.0.0.1], helo='client.example.org', cmd=RCPT, "
                               "from=<a@example.org>, arg='TO:<x@remote.example>', status=rejected "
                               "(554 5.7.1 <x@remote.example>: Relay access denied)")
               for line in lines)
    assert any(re.match(r"%s: client=\[127\.0\.0\.1\], helo='client.example.org', "
                        r"from=<a@example.org>, size=\d+, nrcpt=1, proto=ESMTP, tls=none, "
                        r"auth=none, spf=unchecked, dkim=unchecked, dmarc=unchecked$" % queue_id, line) for line in lines)
    assert re.match(r"disconnect from \[127\.0\.0\.1\]: ehlo=1, mail=1, rcpt=1/2, data=1, "
                    r"quit=1, commands=6, accepted=1, rejected=1, time=", lines[-1])


def test_server_settings_may_be_given_as_the_ini_file_writes_them(spool):
    server = smtp_in.SMTPServer(("127.0.0.1", 0), {
        "spool": str(spool), "domain": "example.com, example.org", "submission": "no",
        "max_size": "5000", "relay_network": "192.0.2.0/24 198.51.100.0/24"},
        bind_and_activate=False)
    try:
        assert server.domains == ["example.com", "example.org"]
        assert server.submission is False and server.max_size == 5000
        assert len(server.relay_networks) == 2
        with pytest.raises(ValueError, match="max_size: not a number"):
            smtp_in.SMTPServer(("127.0.0.1", 0), {"spool": str(spool), "max_size": "big"},
                               bind_and_activate=False)
    finally:
        server.server_close()


def test_main_serves_from_a_config_file_and_stops_on_sigterm(spool, tmp_path):
    ini = tmp_path / "mail.ini"
    ini.write_text("[DEFAULT]\nspool = %s\n[smtp_in]\nlisten = 127.0.0.1:0\ndomain = %s\n"
                   "hostname = %s\nidle_timeout = 30\nspf = off\ndkim_verify = no\ndmarc = off\n"
                   % (spool, DOMAIN, HOSTNAME))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "smtp_in.py"), "--config",
                                str(ini), "--max-size", "5000"],
                               stderr=subprocess.PIPE)
    try:
        port, lines = listening_port(process, r"listening on 127\.0\.0\.1:(\d+) \(mx\)")
        assert any(line.endswith(" smtp_in[%d]: config: max_size=5000\n" % process.pid)
                   for line in lines)
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            assert client.ehlo()[1].decode().count("SIZE 5000") == 1
            client.sendmail("a@example.org", ["bob@example.com"], message())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    assert len(spool_messages(spool)) == 1


def test_main_reports_bad_settings_in_one_line(tmp_path):
    for argv in (["--max-size", "big"], ["--relay-network", "10.0.0.0/33"],
                 ["--listen", "127.0.0.1:99999"], ["--smtps-listen", "127.0.0.1:0"]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool",
                                 str(tmp_path)] + argv, capture_output=True, timeout=30)
        assert result.returncode == 1, argv
        assert result.stderr.decode().startswith("smtp_in: "), result.stderr


def test_help_lists_the_design_flags():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "smtp_in.py"), "--help"],
                            capture_output=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--spool", "--listen", "--submission", "--domain", "--hostname", "--tls-cert",
                 "--tls-key", "--relay-network", "--idle-timeout", "--session-timeout",
                 "--max-size", "--max-recipients", "--max-errors", "--max-connections",
                 "--max-per-address", "--smtps-listen", "--dns", "--config", "--user", "--syslog"):
        assert flag in result.stdout.decode()


def test_make_reverse_lookup_is_optional():
    lookup = smtp_in.make_reverse_lookup("127.0.0.1:9")
    try:
        import dnsstub  # noqa: F401
    except ImportError:
        assert lookup is None
    else:
        assert lookup("127.0.0.1") is None             # nothing answers on port 9


def test_reverse_lookup_through_dnsmx_is_forward_confirmed(start_smtp, spool, tmp_path):
    require_tool("dnsmasq", "dnsmasq-base")
    records = [ptr_record("99.0.0.127.in-addr.arpa", "good.example.test"),
               host_record("good.example.test", "127.0.0.99"),
               ptr_record("98.0.0.127.in-addr.arpa", "liar.example.test"),
               host_record("liar.example.test", "127.0.0.1")]
    with start_dnsmasq(records) as dns:
        lookup = smtp_in.make_reverse_lookup(dns.address)
        assert lookup("127.0.0.99") == "good.example.test"
        assert lookup("127.0.0.98") is None            # its name does not lead back to it
        assert lookup("127.0.0.97") is None            # no PTR record
        server = start_smtp(server_options={"reverse_lookup": lookup})
        client = RawClient(server, source="127.0.0.99")
        client.reply()
        client.command("EHLO client.example.org")
        assert send_transaction(client)[0] == 250
    assert (b"Received: from client.example.org (good.example.test [127.0.0.99])"
            in spool_messages(spool)[0][2])
