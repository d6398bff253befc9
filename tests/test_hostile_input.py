"""Arbitrary bytes as command lines, over real sockets on 127.0.0.1, to every server's command
parser (smtp_in as MX and as submission, pop3d): each line gets a protocol reply, and no
input ever reaches a traceback or an "internal error" in the log."""

import base64
import logging
import shutil
import socket
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import mailbox_store
import pop3d
import smtp_in
from smtpin_support import DOMAIN, HOSTNAME, RawClient, store_template  # noqa: F401

SMTP_VERBS = [b"", b"EHLO ", b"HELO ", b"MAIL FROM:", b"RCPT TO:", b"MAIL FROM:<", b"RCPT TO:<",
              b"AUTH ", b"AUTH PLAIN ", b"AUTH LOGIN ", b"VRFY ", b"NOOP ", b"DATA", b"RSET",
              b"STARTTLS", b"HELP ", b"EXPN "]
POP3_VERBS = [b"", b"USER ", b"PASS ", b"AUTH ", b"AUTH PLAIN ", b"APOP ", b"CAPA", b"STLS",
              b"STAT", b"LIST ", b"RETR ", b"TOP ", b"UIDL ", b"DELE ", b"NOOP", b"RSET"]
TEXT = st.binary(max_size=300).filter(lambda data: b"\n" not in data)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def lines_of(verbs):
    """Command lines (without their CRLF): a verb and random bytes (high bytes, NUL, bare
    CR), pure random bytes, or a line far past every limit."""
    return st.lists(st.one_of(
        st.tuples(st.sampled_from(verbs), TEXT).map(lambda parts: parts[0] + parts[1]),
        TEXT,
        st.sampled_from([b"A" * 3000, b"\xff" * 600, b"\r" * 40, b"USER \xff@x", b"PASS x",
                         b"\x00" * 10, b"NOOP\rRCPT TO:<bob@example.com>"])),
        min_size=1, max_size=4)


class Trouble(logging.Handler):
    """Keeps every record that carries a traceback or reports an internal error."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.exc_info or "internal error" in record.getMessage() \
                or "Traceback" in record.getMessage():
            self.records.append(record)


@pytest.fixture(scope="module")
def trouble():
    handler = Trouble()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def start(server):
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def smtp_server(tmp_path_factory, store_template, **config):
    spool = tmp_path_factory.mktemp("hostile") / "spool"
    shutil.copytree(str(store_template), str(spool))
    # The anvil counts, but penalties of 0 keep the test quick.
    settings = {"spool": str(spool), "domain": [DOMAIN], "hostname": HOSTNAME, "spf": "off",
                "dkim_verify": "no", "dmarc": "off",
                "max_errors": 1000, "anvil_penalty": 0}
    settings.update(config)
    return start(smtp_in.SMTPServer(("127.0.0.1", 0), settings))


@pytest.fixture(scope="module")
def mx_server(tmp_path_factory, store_template):
    server = smtp_server(tmp_path_factory, store_template)
    yield server
    server.stop(grace=0.1)


@pytest.fixture(scope="module")
def submission_server(tmp_path_factory, store_template):
    server = smtp_server(tmp_path_factory, store_template, submission=True)
    yield server
    server.stop(grace=0.1)


@pytest.fixture(scope="module")
def pop3_server(tmp_path_factory):
    store = mailbox_store.Store(str(tmp_path_factory.mktemp("hostile-pop3") / "spool"),
                                ["example.com"], hostname="mx.example.com")
    store.add_user("alice@example.com", "alice pw")
    server = start(pop3d.POP3Server(("127.0.0.1", 0), {"idle_timeout": 10}, store=store,
                                    failure_delay=lambda failures: 0,
                                    anvil=pop3d.plumbing.Anvil(penalty=0)))
    yield server
    server.stop(grace=0.1)


def smtp_session(server, lines, trouble):
    client = RawClient(server, timeout=20)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.example.org")[0] == 250
        for line in lines:
            client.send(line + b"\r\n")
            code, replies = client.reply()
            assert code is not None and 200 <= code < 600, (line, replies)
            if b"\r" in line:
                assert replies == [smtp_in.R500_BARE_CR], (line, replies)
            if code == 334:
                code, replies = client.command("*")
                assert code == 501, replies
            elif code == 354:
                code, replies = client.command(".")
                assert code in (250, 550, 552, 554), replies
            if code in (221, 421):
                assert client.at_eof()
                break
        else:
            assert client.command("NOOP") == (250, [smtp_in.R250_OK])
    finally:
        client.close()
    assert trouble.records == []


@SETTINGS
@given(lines=lines_of(SMTP_VERBS))
@example(lines=[b"MAIL FROM:<a@example.org>", b"XXXX\rRCPT TO:<bob@example.com>", b"DATA"])
@example(lines=[b"RCPT TO:<\xff@example.com>", b"EHLO \xc3(", b"\x00\x80\r\r"])
def test_mx_answers_every_line_with_a_reply_code(mx_server, trouble, lines):
    smtp_session(mx_server, lines, trouble)


@SETTINGS
@given(lines=lines_of(SMTP_VERBS))
@example(lines=[b"AUTH PLAIN " + base64.b64encode(b"\0\xff@x\0x"), b"AUTH LOGIN \xff\xfe"])
@example(lines=[b"AUTH LOGIN " + base64.b64encode(b"\xff@x"), b"AUTH PLAIN =\r"])
def test_submission_answers_every_line_with_a_reply_code(submission_server, trouble, lines):
    smtp_session(submission_server, lines, trouble)


POP3_CLOSING = (pop3d.ERR_TOO_MANY_ERRORS, pop3d.ERR_AUTH_CLOSING, pop3d.ERR_AUTH_THROTTLED)
POP3_MULTILINE = (pop3d.OK_CAPA, pop3d.OK_MECHANISMS)


@SETTINGS
@given(lines=lines_of(POP3_VERBS))
@example(lines=[b"USER \xff@x", b"PASS x"])
@example(lines=[b"USER \xc3(", b"PASS \xff", b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0x")])
def test_pop3d_answers_every_line_with_ok_or_err(pop3_server, trouble, lines):
    sock = socket.create_connection(("127.0.0.1", pop3_server.port), timeout=20)
    reader = sock.makefile("rb")
    try:
        assert reader.readline().startswith(b"+OK")
        for line in lines:
            sock.sendall(line + b"\r\n")
            reply = reader.readline().decode("utf-8").rstrip("\r\n")
            if reply == pop3d.CONTINUE_EMPTY.rstrip("\r\n") or reply == "+":
                sock.sendall(b"*\r\n")
                reply = reader.readline().decode("utf-8").rstrip("\r\n")
            assert reply.startswith(("+OK", "-ERR")), (line, reply)
            if b"\r" in line:
                assert reply == pop3d.ERR_BARE_CR, (line, reply)
            if reply in POP3_MULTILINE:
                while reader.readline() != b".\r\n":
                    pass
            if reply in POP3_CLOSING or reply.startswith("+OK %s POP3 server signing off"
                                                         % pop3_server.hostname):
                assert reader.read() == b""
                break
        else:
            sock.sendall(b"QUIT\r\n")
            assert reader.readline().startswith(b"+OK")
    finally:
        reader.close()
        sock.close()
    assert trouble.records == []
