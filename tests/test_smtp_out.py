"""smtp_out.py: the SMTP client against scripted sinks and a real server, MX routing with a
real dnsmasq, and the outbound queue daemon end to end over 127.0.0.0/8."""

import logging
import os
import re
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import smtp_out
from support import SLACK, require_tool, wait_for
from smtp_out import SMTPClient, Timeouts
from smtp_out_support import Script, Sink

FAST = Timeouts.scaled(0.005)          # 1.5 s greeting, 0.6 s data start, 3 s end of data


@pytest.fixture
def sinks():
    started = []

    def start(host="127.0.0.1", **options):
        sink = Sink.start(host, **options)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.close()


def client_for(sink, **options):
    host, port = sink.server_address[:2]
    options.setdefault("timeouts", FAST)
    return SMTPClient(host, port, helo_name="client.test", **options)


def send(sink, sender, recipients, message, **options):
    with client_for(sink, **options) as client:
        client.open()
        return client.send_message(sender, recipients, message)


# --- Pure helpers ---

def test_encode_data_dot_stuffs_and_ends_with_crlf_dot_crlf():
    assert smtp_out.encode_data(b".a\r\nb\r\n.\r\n..c") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert smtp_out.encode_data(b"") == b".\r\n"


def test_encode_data_turns_bare_lf_and_cr_into_crlf_so_nothing_smuggles_an_end():
    wire = smtp_out.encode_data(b"a\n.\nMAIL FROM:<x@y>\r.\rb\r\n.\n")
    assert wire == b"a\r\n..\r\nMAIL FROM:<x@y>\r\n..\r\nb\r\n..\r\n.\r\n"
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")


def whole_message_encoding(message):
    """encode_data() as it was written for a message in memory: the contract of the
    block-by-block encoder."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text.startswith(b"."):
        text = b"." + text
    text = text.replace(b"\n.", b"\n..")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n") + b".\r\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b"\r\n."]), max_size=30),
       st.lists(st.integers(0, 60), max_size=6))
def test_encode_data_blocks_agrees_with_the_whole_message_encoding_however_split(parts, cuts):
    message = b"".join(parts)
    blocks, start = [], 0
    for cut in sorted(cuts):
        blocks.append(message[start:cut])
        start = max(start, cut)
    blocks.append(message[start:])
    wire = b"".join(smtp_out.encode_data_blocks(blocks))
    assert wire == whole_message_encoding(message) == smtp_out.encode_data(message)


def test_reply_status_comes_from_the_enhanced_code_or_the_class():
    assert smtp_out.Reply(550, ["5.1.1 no such user"]).status == "5.1.1"
    assert smtp_out.Reply(550, ["no such user"]).status == "5.0.0"
    assert smtp_out.Reply(451, ["5.1.1 mismatched class"]).status == "4.0.0"
    local = smtp_out.Reply.local("4.4.1 connect to x failed")
    assert (local.code, local.status, local.text, local.remote) == (451, "4.4.1", "connect to x failed", False)


# --- The SMTP client against scripted servers ---

def test_pipelined_transaction_gives_each_recipient_its_own_result(sinks):
    sink = sinks(script=Script(rcpt_replies={"no@x.test": "550 5.1.1 no such user",
                                             "later@x.test": "451 4.2.0 try later"}))
    results = send(sink, "a@b.test", ["ok@x.test", "no@x.test", "later@x.test"], b"Subject: t\r\n\r\nhi\r\n")
    assert [(r.recipient, r.reply.code, r.reply.status) for r in results] == [
        ("ok@x.test", 250, "2.0.0"), ("no@x.test", 550, "5.1.1"), ("later@x.test", 451, "4.2.0")]
    assert [r.delivered for r in results] == [True, False, False]
    assert [r.permanent for r in results] == [False, True, False]
    (message,) = sink.wait_for(1)
    assert message.rcpt_to == ["ok@x.test"] and message.data == b"Subject: t\r\n\r\nhi\r\n"
    assert "SIZE=" in message.mail_params
    # RFC 2920 3.1: MAIL, the RCPTs, then DATA last of the group.
    assert sink.commands[1:6] == ["MAIL FROM:<a@b.test> SIZE=18", "RCPT TO:<ok@x.test>",
                                  "RCPT TO:<no@x.test>", "RCPT TO:<later@x.test>", "DATA"]


def test_dotted_body_arrives_byte_identical_and_a_smuggled_end_stays_inside(sinks):
    sink = sinks()
    body = b"".join(b"." * (i % 5) + b"line %d\r\n" % i for i in range(2000))
    body += b".\r\n..\r\n.\r\nMAIL FROM:<evil@x>\r\n"
    message = b"Subject: dots\r\n\r\n" + body
    results = send(sink, "a@b.test", ["ok@x.test"], message)
    assert results[0].delivered
    smuggle = b"Subject: s\r\n\r\nx\n.\nMAIL FROM:<evil@x>\nRCPT TO:<v@x>\nDATA\nbad\n.\n"
    assert send(sink, "a@b.test", ["ok@x.test"], smuggle)[0].delivered
    received = sink.wait_for(2)
    assert len(received) == 2 and received[0].data == message
    assert received[1].data == smuggle.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert not any(c.startswith("MAIL FROM:<evil") for c in sink.commands)


def test_all_recipients_refused_sends_no_message_and_the_session_stays_usable(sinks):
    sink = sinks(script=Script(rcpt_default="550 5.1.1 unknown"))
    with client_for(sink) as client:
        client.open()
        results = client.send_message("a@b.test", ["x@x.test", "y@x.test"], b"\r\n")
        assert [r.reply.code for r in results] == [550, 550]
        assert client.rset().code == 250 and client.connected
    assert sink.received == []


def test_connection_reuse_carries_several_messages_with_rset_between(sinks):
    sink = sinks()
    with client_for(sink) as client:
        client.open()
        for n in range(3):
            if n:
                assert client.rset().code == 250
            assert client.send_message("a@b.test", ["r%d@x.test" % n], b"n: %d\r\n" % n)[0].delivered
    received = sink.wait_for(3)
    assert {m.connection for m in received} == {1} and sink.sessions == 1


def test_server_without_ehlo_gets_helo_and_commands_one_at_a_time(sinks):
    sink = sinks(script=Script(ehlo=False, extensions=[]))
    with client_for(sink) as client:
        client.open()
        assert not client.esmtp and client.extensions == {}
        results = client.send_message("a@b.test", ["ok@x.test", "two@x.test"], b"7bit\r\n")
    assert all(r.delivered for r in results)
    assert sink.wait_for(1)[0].mail_params == ""
    assert sink.pipelining_violations == 0 and "HELO client.test" in sink.commands


def test_server_without_pipelining_or_8bitmime_gets_lockstep_and_8bit_bounces(sinks):
    sink = sinks(script=Script(extensions=["SIZE 1000"]))
    with client_for(sink) as client:
        client.open()
        assert client.send_message("a@b.test", ["ok@x.test"], b"plain\r\n")[0].delivered
        (result,) = client.send_message("a@b.test", ["ok@x.test"], "caf\u00e9\r\n".encode())
    assert result.permanent and result.reply.status == "5.6.3" and not result.reply.remote
    assert sink.pipelining_violations == 0 and len(sink.received) == 1


def test_8bit_message_carries_body_8bitmime(sinks):
    sink = sinks()
    assert send(sink, "a@b.test", ["ok@x.test"], "caf\u00e9\r\n".encode())[0].delivered
    assert "BODY=8BITMIME" in sink.wait_for(1)[0].mail_params


def test_message_over_the_server_size_bounces_before_mail_from(sinks):
    sink = sinks(script=Script(extensions=["PIPELINING", "SIZE 100"]))
    (result,) = send(sink, "a@b.test", ["ok@x.test"], b"x" * 101)
    assert result.permanent and result.reply.status == "5.3.4"
    assert not any(c.startswith("MAIL") for c in sink.commands)


def test_utf8_address_needs_smtputf8_else_that_recipient_bounces_with_5_6_7(sinks):
    with_utf8 = sinks()
    results = send(with_utf8, "a@b.test", ["j\u00f6rg@x.test"], b"\r\n")
    assert results[0].delivered and "SMTPUTF8" in with_utf8.wait_for(1)[0].mail_params
    without = sinks(script=Script(extensions=["PIPELINING", "8BITMIME"]))
    results = send(without, "a@b.test", ["j\u00f6rg@x.test", "plain@x.test"], b"\r\n")
    assert results[0].permanent and results[0].reply.status == "5.6.7"
    assert results[1].delivered and without.wait_for(1)[0].rcpt_to == ["plain@x.test"]


def test_address_with_line_break_is_refused_locally(sinks):
    sink = sinks()
    results = send(sink, "a@b.test", ["x@y.test>\r\nRSET", "ok@x.test"], b"\r\n")
    assert results[0].reply.status == "5.1.3" and results[1].delivered
    assert all("RSET" != c for c in sink.commands[:4])


def test_mail_from_refused_applies_to_every_recipient(sinks):
    sink = sinks(script=Script(mail_reply="553 5.7.1 sender refused"))
    results = send(sink, "a@b.test", ["x@x.test", "y@x.test"], b"\r\n")
    assert [(r.reply.code, r.permanent) for r in results] == [(553, True), (553, True)]


def test_end_of_data_reply_applies_to_every_accepted_recipient(sinks):
    sink = sinks(script=Script(end_reply="452 4.3.1 out of space",
                               rcpt_replies={"bad@x.test": "550 5.1.1 unknown"}))
    results = send(sink, "a@b.test", ["x@x.test", "bad@x.test", "y@x.test"], b"\r\n")
    assert [r.reply.code for r in results] == [452, 550, 452]


def test_greeting_554_and_421_are_temporary_errors(sinks):
    for greeting in ("554 5.7.1 go away", "421 4.3.2 busy"):
        sink = sinks(script=Script(greeting=greeting))
        with pytest.raises(smtp_out.DeliveryError) as caught:
            client_for(sink).open()
        assert not caught.value.permanent and greeting[:3] in str(caught.value)


def test_connection_refused_is_a_temporary_4_4_1(sinks):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(smtp_out.DeliveryError) as caught:
        SMTPClient("127.0.0.1", port, helo_name="c.test", timeouts=FAST).open()
    assert not caught.value.permanent and caught.value.reply.status == "4.4.1"


@pytest.mark.parametrize("stage", ["greeting", "mail", "end"])
def test_stalling_server_times_out_as_temporary_4_4_2(sinks, stage):
    timeouts = Timeouts.scaled(0.002)
    limit = {"greeting": timeouts.greeting, "mail": timeouts.mail, "end": timeouts.data_end}[stage]
    sink = sinks(script=Script(stall=stage, stall_seconds=30))
    client = client_for(sink, timeouts=timeouts)
    started = time.monotonic()
    try:
        client.open()
        (result,) = client.send_message("a@b.test", ["x@x.test"], b"\r\n")
        reply = result.reply
    except smtp_out.DeliveryError as exc:
        reply = exc.reply
    assert reply.status == "4.4.2" and "timed out" in reply.text and not reply.permanent
    assert limit - 0.05 <= time.monotonic() - started < limit + SLACK
    assert not client.connected


def test_421_in_the_middle_of_a_transaction_defers_with_its_text(sinks):
    sink = sinks(script=Script(rcpt_default="421 4.3.2 shutting down"))
    (result,) = send(sink, "a@b.test", ["x@x.test"], b"\r\n")
    assert result.reply.code == 421 and "shutting down" in result.reply.text


def test_garbage_reply_is_a_temporary_protocol_error():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b"220 hi\r\n")
        conn.recv(100)
        conn.sendall(b"25O-garbage\r\n")
        conn.settimeout(10)
        try:
            while conn.recv(100):      # open until the client has read the garbage and left
                pass
        except OSError:
            pass
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(smtp_out.DeliveryError) as caught:
        SMTPClient(*listener.getsockname(), helo_name="c.test", timeouts=FAST).open()
    listener.close()
    assert caught.value.reply.status == "4.5.0" and not caught.value.permanent


# --- TLS and AUTH ---

def test_opportunistic_starttls_accepts_a_self_signed_certificate(sinks, tls_files):
    sink = sinks(tls_files=tls_files)
    with client_for(sink) as client:
        client.open()
        assert client.tls_active and "STARTTLS" not in client.extensions
        assert client.send_message("a@b.test", ["x@x.test"], b"\r\n")[0].delivered
    assert sink.wait_for(1)[0].tls


def test_verified_tls_refuses_an_unknown_certificate_as_temporary(sinks, tls_files):
    sink = sinks(tls_files=tls_files)
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client_for(sink, tls=smtp_out.TLS_REQUIRED, tls_verify=True, server_name="localhost").open()
    assert caught.value.reply.status == "4.7.5" and not caught.value.permanent


def test_verified_tls_accepts_a_certificate_from_the_given_ca_file(sinks, tls_files):
    sink = sinks(tls_files=tls_files)
    with client_for(sink, tls=smtp_out.TLS_REQUIRED, tls_verify=True, tls_ca_file=tls_files[0],
                    server_name="localhost") as client:
        client.open()
        assert client.tls_active


def test_failed_handshake_falls_back_to_plaintext_unless_tls_is_required(sinks, tls_files):
    sink = sinks(tls_files=tls_files, script=Script(tls_break=True))
    with client_for(sink) as client:
        client.open()
        assert not client.tls_active
        assert client.send_message("a@b.test", ["x@x.test"], b"\r\n")[0].delivered
    assert sink.sessions == 2
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client_for(sink, tls=smtp_out.TLS_REQUIRED).open()
    assert caught.value.reply.status == "4.7.5"


def test_starttls_called_by_hand_raises_a_temporary_delivery_error_when_the_handshake_fails(
        sinks, tls_files):
    sink = sinks(tls_files=tls_files, script=Script(tls_break=True))
    client = client_for(sink, tls=smtp_out.TLS_NONE)
    client.open()
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client.starttls()
    assert caught.value.reply.status == "4.7.5" and not caught.value.permanent
    assert not client.connected


def test_no_downgrade_goes_on_in_the_clear_only_when_starttls_is_not_offered(sinks, tls_files):
    mode = smtp_out.TLS_OPPORTUNISTIC_NO_DOWNGRADE
    with client_for(sinks(), tls=mode) as client:          # no STARTTLS offered: clear
        client.open()
        assert not client.tls_active
        assert client.send_message("a@b.test", ["x@x.test"], b"\r\n")[0].delivered
    with client_for(sinks(tls_files=tls_files), tls=mode) as client:
        client.open()
        assert client.tls_active
    broken = sinks(tls_files=tls_files, script=Script(tls_break=True))
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client_for(broken, tls=mode).open()
    assert caught.value.reply.status == "4.7.5" and not caught.value.permanent
    assert broken.sessions == 1 and "MAIL" not in " ".join(broken.commands)
    refusing = sinks(tls_files=tls_files,
                     script=Script(starttls_reply="454 4.7.0 TLS not available"))
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client_for(refusing, tls=mode).open()
    assert "454 4.7.0" in caught.value.reply.text and not caught.value.permanent
    assert refusing.commands[-1] == "QUIT" and refusing.sessions == 1


def test_required_tls_without_starttls_offered_defers_4_7_4(sinks):
    sink = sinks()
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client_for(sink, tls=smtp_out.TLS_REQUIRED).open()
    assert caught.value.reply.status == "4.7.4" and not caught.value.permanent


def test_implicit_tls_handshakes_before_the_greeting(sinks, tls_files):
    sink = sinks(tls_files=tls_files, implicit_tls=True)
    with client_for(sink, implicit_tls=True) as client:
        client.open()
        assert client.tls_active and client.greeting.code == 220


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_plain_and_login_over_tls(sinks, tls_files, mechanism):
    sink = sinks(tls_files=tls_files, script=Script(users={"u@b.test": "s3cret"}))
    with client_for(sink) as client:
        client.open()
        client.extensions["AUTH"] = mechanism
        assert client.login("u@b.test", "s3cret").code == 235
        assert client.send_message("u@b.test", ["x@x.test"], b"\r\n")[0].delivered
    assert sink.wait_for(1)[0].auth_user == "u@b.test"


def test_auth_refused_is_temporary_and_the_password_is_not_logged(sinks, tls_files, caplog):
    sink = sinks(tls_files=tls_files, script=Script(users={"u@b.test": "s3cret"}))
    caplog.set_level("DEBUG", logger="smtp_out")
    with client_for(sink) as client:
        client.open()
        with pytest.raises(smtp_out.DeliveryError) as caught:
            client.login("u@b.test", "wrong-password")
    assert caught.value.reply.code == 535 and not caught.value.permanent
    assert "wrong-password" not in caplog.text and "d3JvbmctcGFzc3dvcmQ" not in caplog.text


def test_auth_is_not_sent_in_clear_to_a_remote_address():
    client = SMTPClient("192.0.2.1", 25, helo_name="c.test")
    with pytest.raises(smtp_out.DeliveryError) as caught:
        client.login("u", "p")
    assert caught.value.reply.status == "4.7.0"


# --- A real SMTP server as the peer ---

def test_client_delivers_to_postfix_smtp_sink():
    sink_bin = require_tool("smtp-sink", "postfix")
    # smtp-sink runs as nobody, who cannot enter pytest's private tmp_path.
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="smtp-sink-"))
    os.chmod(tmp_path, 0o777)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []     # only root may switch
    process = subprocess.Popen([sink_bin] + as_user + ["-d", str(tmp_path) + "/%M", "-c",
                                "127.0.0.1:%d" % port, "10"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        def listening():
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return True
            except OSError:
                return False
        wait_for(listening, 10, "smtp-sink to listen")
        message = b"Subject: peer\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
        with SMTPClient("127.0.0.1", port, helo_name="c.test", timeouts=FAST) as client:
            client.open()
            assert "PIPELINING" in client.extensions
            results = client.send_message("a@b.test", ["x@x.test", "y@x.test"], message)
        assert all(r.delivered for r in results), results
        files = wait_for(lambda: [p for p in tmp_path.rglob("*") if p.is_file()], 10,
                         "smtp-sink to write the message")
        dump = files[0].read_bytes()             # smtp-sink stores LF line ends
        assert message.replace(b"\r\n", b"\n") in dump and b"<y@x.test>" in dump
    finally:
        process.terminate()
        process.wait(5)
        shutil.rmtree(tmp_path)


# --- Destinations: MX routing with a real dnsmasq ---

import dnsstub  # noqa: E402
from dnsmasq_server import host_record, mx_host, null_mx, start_dnsmasq  # noqa: E402

HOSTNAME = "out.test"                  # this host, for self-MX detection


@pytest.fixture(scope="module")
def dns():
    require_tool("dnsmasq", "dnsmasq-base")
    records = [
        mx_host("two.test", "mx1.two.test", 10), mx_host("two.test", "mx2.two.test", 20),
        host_record("mx1.two.test", "127.0.0.2"), host_record("mx2.two.test", "127.0.0.3"),
        host_record("implicit.test", "127.0.0.4"),
        null_mx("nomail.test"),
        mx_host("self.test", HOSTNAME, 10), mx_host("self.test", "mx2.two.test", 20),
        mx_host("backup.test", "mx1.two.test", 5), mx_host("backup.test", HOSTNAME, 10),
        mx_host("backup.test", "mx2.two.test", 20), host_record(HOSTNAME, "127.0.0.9"),
        # An MX under another name whose address is this host's own MX listener.
        mx_host("loop.test", "mx.loop.test", 10), host_record("mx.loop.test", "127.0.0.1"),
    ]
    with start_dnsmasq(records) as server:
        yield server


def same_port_sinks(sinks, hosts, **options):
    """Sinks on each of hosts, all on one port (as MX delivery uses one remote port)."""
    for _ in range(20):
        first = sinks(hosts[0], **options)
        port = first.server_address[1]
        try:
            return port, [first] + [sinks(h, port=port, **options) for h in hosts[1:]]
        except OSError:
            continue
    raise RuntimeError("no common free port")


def deliverer(dns, port, **config):
    settings = {"hostname": HOSTNAME, "remote_port": port}
    settings.update({f.name + "_timeout": getattr(FAST, f.name) for f in
                     smtp_out.dataclasses.fields(Timeouts)})
    settings.update(config)
    return smtp_out.Deliverer(settings, dnsstub.Resolver([dns.address], timeout=1, attempts=1))


def test_mail_goes_to_the_best_mx(dns, sinks):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"])
    outcomes, client = deliverer(dns, port).deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    assert [(o.status, o.relay) for o in outcomes] == [("sent", "mx1.two.test[127.0.0.2]:%d" % port)]
    assert len(mx1.wait_for(1)) == 1 and mx2.received == []
    client.quit()


def test_first_mx_down_falls_back_to_the_next(dns, sinks):
    port, (mx2,) = same_port_sinks(sinks, ["127.0.0.3"])
    outcomes, _ = deliverer(dns, port).deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    assert outcomes[0].status == "sent" and outcomes[0].relay.startswith("mx2.two.test[127.0.0.3]")
    assert mx2.wait_for(1)[0].rcpt_to == ["u@two.test"]


def test_temporary_reply_tries_the_next_mx_but_a_permanent_one_does_not(dns, sinks):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"])
    mx1.script.rcpt_replies = {"grey@two.test": "451 4.7.1 greylisted",
                               "gone@two.test": "550 5.1.1 no such user"}
    outcomes, _ = deliverer(dns, port).deliver(
        "two.test", "a@b.test", ["grey@two.test", "gone@two.test", "ok@two.test"], b"m\r\n")
    assert [o.status for o in outcomes] == ["sent", "bounced", "sent"]
    assert outcomes[0].relay.startswith("mx2.") and outcomes[1].relay.startswith("mx1.")
    assert outcomes[1].reply.text == "550 5.1.1 no such user"
    assert [m.rcpt_to for m in mx2.wait_for(1)] == [["grey@two.test"]]


def test_every_mx_deferring_defers_with_the_last_reply(dns, sinks):
    port, sinks_ = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"],
                                   script=Script(greeting="421 4.3.2 busy"))
    (outcome,), _ = deliverer(dns, port).deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    assert outcome.status == "deferred" and "421 4.3.2 busy" in outcome.reply.text


def test_implicit_mx_is_the_domain_itself(dns, sinks):
    port, (sink,) = same_port_sinks(sinks, ["127.0.0.4"])
    (outcome,), _ = deliverer(dns, port).deliver("implicit.test", "a@b.test", ["u@implicit.test"], b"m\r\n")
    assert outcome.status == "sent" and outcome.relay.startswith("implicit.test[127.0.0.4]")


def test_null_mx_and_nxdomain_bounce_at_once(dns):
    d = deliverer(dns, 9)
    (null,), _ = d.deliver("nomail.test", "a@b.test", ["u@nomail.test"], b"m\r\n")
    (missing,), _ = d.deliver("missing.test", "a@b.test", ["u@missing.test"], b"m\r\n")
    assert (null.status, null.reply.status, null.relay) == ("bounced", "5.1.10", "none")
    assert (missing.status, missing.reply.status) == ("bounced", "5.1.2")


def test_dns_timeout_defers_with_4_4_3(sinks):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    resolver = dnsstub.Resolver(["127.0.0.1:%d" % silent.getsockname()[1]], timeout=0.2, attempts=1)
    d = smtp_out.Deliverer({"hostname": HOSTNAME}, resolver)
    (outcome,), _ = d.deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    silent.close()
    assert (outcome.status, outcome.reply.status) == ("deferred", "4.4.3")


def test_being_the_best_mx_is_a_loop_5_4_6(dns, sinks):
    port, (mx2,) = same_port_sinks(sinks, ["127.0.0.3"])
    (outcome,), _ = deliverer(dns, port).deliver("self.test", "a@b.test", ["u@self.test"], b"m\r\n")
    assert (outcome.status, outcome.reply.status) == ("bounced", "5.4.6")
    assert mx2.received == []


def test_a_backup_mx_only_tries_better_preferences(dns, sinks):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"])
    mx1.script.greeting = "421 4.3.2 busy"
    (outcome,), _ = deliverer(dns, port).deliver("backup.test", "a@b.test", ["u@backup.test"], b"m\r\n")
    assert outcome.status == "deferred" and mx2.sessions == 0


def test_self_detected_by_address_too(dns, sinks):
    port, _ = same_port_sinks(sinks, ["127.0.0.3"])
    d = deliverer(dns, port, hostname="other.test", my_addresses=["127.0.0.9"])
    (outcome,), _ = d.deliver("self.test", "a@b.test", ["u@self.test"], b"m\r\n")
    assert outcome.reply.status == "5.4.6"


def test_a_server_greeting_with_my_own_hostname_is_a_loop_5_4_6(dns, sinks):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"],
                                       script=Script(greeting="220 OUT.test ESMTP ready"))
    (outcome,), client = deliverer(dns, port).deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    assert (outcome.status, outcome.reply.status, outcome.reply.text) == (
        "bounced", "5.4.6", "mail for two.test loops back to myself")
    assert outcome.relay == "mx1.two.test[127.0.0.2]:%d" % port and client is None
    assert mx1.commands[-1:] == ["QUIT"] and mx1.received == [] and mx2.sessions == 0


def test_an_ehlo_reply_with_my_own_hostname_is_a_loop_too_but_a_submission_client_does_not_care(dns, sinks):
    port, (mx1,) = same_port_sinks(sinks, ["127.0.0.2"], script=Script(name="out.test."))
    (outcome,), _ = deliverer(dns, port).deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    assert (outcome.status, outcome.reply.status) == ("bounced", "5.4.6")
    assert send(mx1, "a@b.test", ["u@two.test"], b"m\r\n")[0].delivered   # no my_name given


def test_a_backup_mx_greeting_as_myself_defers_4_4_6_and_tries_nothing_after_it(dns, sinks):
    port, (mx2,) = same_port_sinks(sinks, ["127.0.0.3"], script=Script(greeting="220 out.test"))
    (outcome,), _ = deliverer(dns, port).deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
    assert (outcome.status, outcome.reply.status) == ("deferred", "4.4.6")
    assert outcome.relay.startswith("mx2.two.test[127.0.0.3]") and mx2.received == []


def test_an_mx_address_and_port_of_my_own_listener_is_a_loop_without_connecting(dns, sinks):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"])
    for listener in ("127.0.0.2:%d" % port, "0.0.0.0:%d" % port, "[::]:%d" % port):
        d = deliverer(dns, port, my_listeners=[listener])
        (outcome,), _ = d.deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
        assert (outcome.status, outcome.reply.status) == ("bounced", "5.4.6"), listener
    assert mx1.sessions == mx2.sessions == 0
    # The same port on another address, or another port, is another server.
    for listener in ("127.0.0.9:%d" % port, "127.0.0.2:%d" % (port + 1 if port < 65535 else 1)):
        d = deliverer(dns, port, my_listeners=[listener])
        (outcome,), client = d.deliver("two.test", "a@b.test", ["u@two.test"], b"m\r\n")
        assert outcome.status == "sent" and outcome.relay.startswith("mx1."), listener
        client.quit()


def test_local_addresses_are_found_without_binding():
    assert smtp_out.is_local_address("127.0.0.1") and smtp_out.is_local_address("127.3.2.1")
    assert smtp_out.is_local_address("0.0.0.0") and smtp_out.is_local_address("::1")
    assert not smtp_out.is_local_address("203.0.113.254")     # RFC 5737 TEST-NET-3
    assert not smtp_out.is_local_address("not an address")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        try:
            plain.connect(("203.0.113.254", 9))     # no packet: just the route's source
        except OSError:
            pytest.skip("no route beyond loopback")
        mine = plain.getsockname()[0]              # an interface address of this machine
    assert smtp_out.is_local_address(mine)


def test_my_listeners_take_addresses_or_names_and_refuse_garbage():
    assert smtp_out.parse_listener("[::]:25") == [("::", 25)]
    assert ("127.0.0.1", 2525) in smtp_out.parse_listener("localhost:2525")   # /etc/hosts
    with pytest.raises(ValueError):
        smtp_out.parse_listener("127.0.0.1:port")


# --- The worker pool, over in-memory claims ---

from smtp_out_support import MemoryClaim  # noqa: E402


def relay_config(sink, **extra):
    config = {"relay_host": "%s:%d" % sink.server_address[:2], "relay_tls": "none",
              "hostname": HOSTNAME}
    config.update({f.name + "_timeout": getattr(FAST, f.name)
                   for f in smtp_out.dataclasses.fields(Timeouts)})
    config.update(extra)
    return config


def run_claims(config, claims, resolver=None):
    daemon = smtp_out.OutboundDaemon(config, None, smtp_out.Deliverer(config, resolver))
    daemon.start()
    try:
        for batch in [daemon.submit(claim) for claim in claims]:
            assert batch.done.wait(20)
    finally:
        daemon.stop()


def test_120_recipients_go_in_transactions_of_50_on_one_connection(sinks):
    sink = sinks()
    recipients = ["u%03d@x.test" % i for i in range(120)]
    claim = MemoryClaim("Q1", "a@b.test", recipients, b"Subject: many\r\n\r\nhi\r\n")
    run_claims(relay_config(sink, max_connections=1), [claim])
    received = sink.wait_for(3)
    assert [len(m.rcpt_to) for m in received] == [50, 50, 20]
    assert sink.sessions == 1 and sink.commands.count("RSET") == 2
    assert claim.statuses() == ["delivered"] * 120
    status, reply, _, relay, remote_mta = claim.recipients[0].result
    assert reply == "250 2.0.0 OK queued" and re.fullmatch(r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+", relay)
    assert remote_mta == "127.0.0.1"                   # the relay host as configured


def test_connections_stay_within_the_total_and_per_destination_caps(dns, sinks):
    port, (mx1,) = same_port_sinks(sinks, ["127.0.0.2"])
    claims = [MemoryClaim("Q%02d" % i, "a@b.test", ["u%d@two.test" % i], b"m\r\n") for i in range(40)]
    config = {"hostname": HOSTNAME, "remote_port": port, "max_connections": 6,
              "max_per_destination": 3}
    config.update({f.name + "_timeout": getattr(FAST, f.name)
                   for f in smtp_out.dataclasses.fields(Timeouts)})
    run_claims(config, claims, dnsstub.Resolver([dns.address], timeout=1, attempts=1))
    assert len(mx1.wait_for(40)) == 40
    assert 1 <= mx1.max_active <= 3 and mx1.sessions <= 10
    assert all(c.statuses() == ["delivered"] for c in claims)


# --- The whole outbound path over the spool (mta.py's queue and router) ---

import email  # noqa: E402
import mailbox  # noqa: E402

import mailbox_store  # noqa: E402
import mta  # noqa: E402

SENDER = "sender@local.test"


class Clock:
    """The queue's injectable clock: starts at a fixed time, moves only when told."""

    def __init__(self, start=1_800_000_000.0):
        self.now = start

    def __call__(self):
        return self.now


class Spool:
    """A spool with mta's queue and router, a local sender with a Maildir, and smtp_out."""

    def __init__(self, path, clock=None, lifetime=mta.QUEUE_LIFETIME, delay_warning=mta.DELAY_WARNING):
        self.path = str(path)
        self.clock = clock or Clock()
        self.queue = mta.Queue(self.path, hostname=HOSTNAME, lifetime=lifetime,
                               delay_warning=delay_warning, clock=self.clock)
        self.queue.create()
        self.store = mailbox_store.Store(self.path, ["local.test"])
        self.store.add_user(SENDER, "password-1")
        self.router = mta.Router(self.queue, self.store)

    def send(self, recipients, message, sender=SENDER):
        queue_id = self.queue.enqueue(sender, recipients, message)
        self.route()
        return queue_id

    def route(self):
        for _ in range(5):                 # a DSN queued while routing is routed too
            names = self.queue.ids(mta.INCOMING)
            if not names:
                return
            for name in names:
                self.router.handle(name)

    def retry_due(self):
        self.queue.requeue_due()
        self.route()

    def deliver(self, config, resolver=None):
        daemon = smtp_out.OutboundDaemon(config, self.queue, smtp_out.Deliverer(config, resolver))
        handled = daemon.run_once(timeout=20)
        self.route()                       # DSNs smtp_out's results queued
        return handled

    def queued(self):
        return sum(len(self.queue.ids(f)) for f in (mta.INCOMING, mta.OUTBOUND, mta.DEFERRED))

    def next_attempt(self):
        (name,) = self.queue.ids(mta.DEFERRED)
        return os.stat(os.path.join(self.path, "queue", mta.DEFERRED, name)).st_mtime

    def sender_mail(self):
        path = self.store.maildir_path(SENDER)
        if not os.path.isdir(path):
            return []
        box = mailbox.Maildir(path, create=False)
        return [email.message_from_bytes(box.get_bytes(key)) for key in sorted(box.keys())]


def dsn_fields(message):
    """The per-recipient fields of a DSN's message/delivery-status part."""
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    (status,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    return blocks[0], blocks[1:]


def mx_config(port, **extra):
    config = {"hostname": HOSTNAME, "remote_port": port}
    config.update({f.name + "_timeout": getattr(FAST, f.name)
                   for f in smtp_out.dataclasses.fields(Timeouts)})
    config.update(extra)
    return config


@pytest.fixture
def resolver(dns):
    return dnsstub.Resolver([dns.address], timeout=1, attempts=1)


def test_spool_message_reaches_the_mx_and_leaves_the_queue(tmp_path, sinks, resolver):
    port, (mx1,) = same_port_sinks(sinks, ["127.0.0.2"])
    spool = Spool(tmp_path)
    body = b"Subject: hello\r\n\r\n" + b"".join(b".%d\r\n..\r\n.\r\n" % i for i in range(300))
    spool.send(["a@two.test", "b@two.test"], body)
    assert spool.deliver(mx_config(port), resolver) == 1
    (message,) = mx1.wait_for(1)
    assert message.rcpt_to == ["a@two.test", "b@two.test"] and message.mail_from == SENDER
    assert message.data == body and spool.queued() == 0


def test_a_large_message_goes_from_the_queue_file_to_the_relay_byte_exact(tmp_path, sinks):
    # Dot lines, and a CRLF, straddling the queue file's block boundaries: each is
    # stuffed and ended as in one piece.
    block = mta.COPY_BLOCK
    line = b"x" * 998 + b"\r\n"
    body = (line * (3 * block // len(line)))[:3 * block - 3]
    body = body[:block - 1] + b"\r\n.dot at a block start\r\n" + body[block + 24:]
    message = b"Subject: large\r\n\r\n" + body + b"\r\n..\r\n" + line * 20000   # ~20 MB
    sink = sinks(script=Script(extensions=["PIPELINING", "SIZE 52428800", "8BITMIME"]))
    spool = Spool(tmp_path)
    spool.send(["far@two.test"], message)
    assert spool.deliver(relay_config(sink)) == 1
    (received,) = sink.wait_for(1)
    assert len(received.data) == len(message) and received.data == message
    assert spool.queued() == 0


def test_4xx_defers_and_succeeds_after_flush(tmp_path, sinks, resolver):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"],
                                       script=Script(rcpt_default="451 4.7.1 greylisted"))
    spool = Spool(tmp_path)
    spool.send(["u@two.test"], b"Subject: grey\r\n\r\nx\r\n")
    spool.deliver(mx_config(port), resolver)
    assert spool.queue.ids(mta.DEFERRED) and mx1.received == []
    mx1.script.rcpt_default = mx2.script.rcpt_default = "250 2.1.5 OK"
    assert spool.queue.flush() == 1        # what `mta.py flush` does
    spool.route()
    spool.deliver(mx_config(port), resolver)
    assert len(mx1.wait_for(1)) == 1 and spool.queued() == 0


def test_5xx_bounces_with_a_dsn_in_the_senders_mailbox(tmp_path, sinks, resolver, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    port, (mx1,) = same_port_sinks(sinks, ["127.0.0.2"])
    mx1.script.rcpt_replies = {"gone@two.test": "550 5.1.1 <gone@two.test>: no such user"}
    spool = Spool(tmp_path)
    spool.send(["gone@two.test", "here@two.test"], b"Subject: mixed\r\nMessage-ID: <m1@local.test>\r\n\r\nx\r\n")
    spool.deliver(mx_config(port), resolver)
    assert mx1.wait_for(1)[0].rcpt_to == ["here@two.test"] and spool.queued() == 0
    (dsn,) = spool.sender_mail()
    per_message, (block,) = dsn_fields(dsn)
    assert per_message["Reporting-MTA"] == "dns; " + HOSTNAME
    assert block["Final-Recipient"] == "rfc822; gone@two.test" and block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@two.test>: no such user"
    assert block["Remote-MTA"] == "dns; mx1.two.test"         # RFC 3464 2.3.5: the host name
    assert "to=<gone@two.test>, relay=mx1.two.test[127.0.0.2]:%d," % port in caplog.text
    assert b"Message-ID: <m1@local.test>" in dsn.as_bytes()


def test_null_mx_and_nxdomain_bounce_from_the_spool_at_once(tmp_path, resolver):
    spool = Spool(tmp_path)
    spool.send(["u@nomail.test", "v@missing.test"], b"Subject: x\r\n\r\nx\r\n")
    spool.deliver(mx_config(9), resolver)
    (dsn,) = spool.sender_mail()
    _, blocks = dsn_fields(dsn)
    assert sorted(b["Status"] for b in blocks) == ["5.1.10", "5.1.2"] and spool.queued() == 0


def test_stalling_remote_times_out_and_the_retry_succeeds(tmp_path, sinks, resolver):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"],
                                       script=Script(stall="end", stall_seconds=3))
    spool = Spool(tmp_path)
    spool.send(["u@two.test"], b"Subject: slow\r\n\r\nx\r\n")
    config = mx_config(port, data_end_timeout=0.3)
    spool.deliver(config, resolver)
    assert spool.queue.ids(mta.DEFERRED)
    mx1.script.stall = mx2.script.stall = None
    spool.clock.now = spool.next_attempt()
    spool.retry_due()
    spool.deliver(config, resolver)
    assert len(mx1.wait_for(1) + mx2.received) >= 1 and spool.queued() == 0


def test_tls_verify_defers_a_self_signed_mx_which_opportunistic_tls_accepts(tmp_path, sinks, resolver, tls_files):
    port, (mx1, mx2) = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"], tls_files=tls_files)
    spool = Spool(tmp_path)
    spool.send(["u@two.test"], b"Subject: tls\r\n\r\nx\r\n")
    spool.deliver(mx_config(port, tls_verify=True), resolver)
    assert spool.queue.ids(mta.DEFERRED) and mx1.received == mx2.received == []
    spool.queue.flush()
    spool.route()
    spool.deliver(mx_config(port), resolver)
    assert mx1.wait_for(1)[0].tls and spool.queued() == 0


def test_the_five_day_schedule_retries_warns_and_finally_bounces(tmp_path, sinks, resolver):
    port, _ = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"],
                              script=Script(greeting="421 4.3.2 try later"))
    spool = Spool(tmp_path)
    arrival = spool.clock.now
    spool.send(["u@two.test"], b"Subject: doomed\r\n\r\nx\r\n")
    attempts = []
    for _ in range(200):                   # the default schedule makes about 125
        attempts.append(spool.clock.now)
        spool.deliver(mx_config(port), resolver)
        if not spool.queue.ids(mta.DEFERRED):
            break
        spool.clock.now = spool.next_attempt()
        spool.retry_due()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[:6] == [mta.retry_delay(n) for n in range(1, 7)]
    assert max(gaps) == mta.retry_delay(100)
    assert attempts[-1] - arrival >= mta.QUEUE_LIFETIME > attempts[-2] - arrival
    delayed, failed = spool.sender_mail()
    (_, (warning,)), (_, (final,)) = dsn_fields(delayed), dsn_fields(failed)
    assert warning["Action"] == "delayed" and warning["Status"].startswith("4.")
    assert final["Action"] == "failed" and final["Status"] == "4.4.7"
    assert "421 4.3.2 try later" in final["Diagnostic-Code"] and spool.queued() == 0


def test_shortened_queue_lifetime_bounces_with_4_4_7(tmp_path, sinks, resolver):
    port, _ = same_port_sinks(sinks, ["127.0.0.2", "127.0.0.3"], script=Script(greeting="421 4.3.2 busy"))
    spool = Spool(tmp_path, lifetime=600, delay_warning=0)
    spool.send(["u@two.test"], b"Subject: short\r\n\r\nx\r\n")
    spool.deliver(mx_config(port), resolver)
    spool.clock.now = spool.next_attempt()         # 300 s: still within the lifetime
    spool.retry_due()
    spool.deliver(mx_config(port), resolver)
    assert spool.sender_mail() == [] and spool.queue.ids(mta.DEFERRED)
    spool.clock.now = spool.next_attempt()         # 900 s: past it
    spool.retry_due()
    spool.deliver(mx_config(port), resolver)
    (dsn,) = spool.sender_mail()
    assert dsn_fields(dsn)[1][0]["Status"] == "4.4.7" and spool.queued() == 0


# --- The command line: smarthost with AUTH, and kill -9 during delivery ---

SMTP_OUT = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         "smtp_out.py")]


def test_smarthost_with_auth_over_verified_tls_from_the_command_line(tmp_path, sinks, tls_files):
    relay = sinks(tls_files=tls_files, script=Script(users={"relay-user": "pa:ss w0rd"}))
    spool = Spool(tmp_path / "spool", clock=time.time)
    queue_id = spool.send(["x@two.test", "y@elsewhere.test"], b"Subject: via relay\r\n\r\nx\r\n")
    auth_file = tmp_path / "relay-auth"
    auth_file.write_text("# smarthost login\nrelay-user:pa:ss w0rd\n")
    auth_file.chmod(0o600)
    result = subprocess.run(SMTP_OUT + [
        "--spool", spool.path, "--relay-host", "127.0.0.1:%d" % relay.server_address[1],
        "--relay-auth-file", str(auth_file), "--tls-ca-file", tls_files[0],
        "--hostname", HOSTNAME, "--once"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (message,) = relay.wait_for(1)
    assert message.auth_user == "relay-user" and message.tls
    assert message.rcpt_to == ["x@two.test", "y@elsewhere.test"] and spool.queued() == 0
    assert "pa:ss w0rd" not in result.stderr
    line = [l for l in result.stderr.splitlines() if "to=<x@two.test>" in l][0]
    assert re.fullmatch(r"\S+ smtp_out\[\d+\]: %s: to=<x@two\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                        r"delay=[\d.]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 OK queued\)" % queue_id, line)


def test_retry_schedule_from_the_command_line_sets_the_next_attempt(tmp_path):
    spool = Spool(tmp_path / "spool", clock=time.time)
    spool.send(["x@two.test"], b"Subject: later\r\n\r\nx\r\n")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]            # nobody listens there once it is closed
    result = subprocess.run(SMTP_OUT + [
        "--spool", spool.path, "--relay-host", "127.0.0.1:%d" % port, "--relay-tls", "none",
        "--retry-schedule", "7m,1h", "--once"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ((_, _, _, state),) = spool.queue.listing()
    (recipient,) = state.recipients
    assert recipient.status == "deferred" and recipient.dsn == "4.4.1"
    assert recipient.next_attempt - recipient.last_attempt == pytest.approx(420)
    bad = subprocess.run(SMTP_OUT + ["--spool", spool.path, "--retry-schedule", "7 min", "--once"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr == ("smtp_out: retry_schedule: 'min' is not a wait such as 30s, 5m, 1h "
                          "or 2d\n")


def test_smarthost_certificate_is_verified_by_default(tmp_path, sinks, tls_files):
    relay = sinks(tls_files=tls_files)
    spool = Spool(tmp_path / "spool", clock=time.time)
    spool.send(["x@two.test"], b"Subject: via relay\r\n\r\nx\r\n")
    result = subprocess.run(SMTP_OUT + [
        "--spool", spool.path, "--relay-host", "127.0.0.1:%d" % relay.server_address[1],
        "--hostname", HOSTNAME, "--once"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and relay.received == []
    assert "dsn=4.7.5, status=deferred" in result.stderr and spool.queue.ids(mta.DEFERRED)


def test_credentials_are_refused_on_the_command_line_and_a_bad_file_is_one_error_line(tmp_path):
    bad = tmp_path / "auth"
    bad.write_text("no colon here\n")
    bad.chmod(0o600)
    result = subprocess.run(SMTP_OUT + ["--spool", str(tmp_path), "--relay-host", "127.0.0.1:1",
                                        "--relay-auth-file", str(bad), "--once"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("smtp_out: ")
    assert len(result.stderr.splitlines()) == 1
    result = subprocess.run(SMTP_OUT + ["--spool", str(tmp_path), "--relay-password", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_kill_9_during_delivery_then_restart_delivers_every_message(tmp_path, sinks):
    relay = sinks(script=Script(end_delay=0.02))
    spool = Spool(tmp_path / "spool", clock=time.time)
    count, conns = 60, 4
    for n in range(count):
        spool.queue.enqueue(SENDER, ["r%d@two.test" % n], b"Subject: n%d\r\n\r\nbody %d\r\n" % (n, n))
    spool.route()
    assert len(spool.queue.ids(mta.OUTBOUND)) == count
    common = ["--spool", spool.path, "--relay-host", "127.0.0.1:%d" % relay.server_address[1],
              "--relay-tls", "none", "--hostname", HOSTNAME, "--max-connections", str(conns)]
    daemon = subprocess.Popen(SMTP_OUT + common, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        relay.wait_for(count // 3, timeout=30)
        daemon.kill()                      # SIGKILL, in the middle of deliveries
        daemon.wait(10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    daemon.stderr.close()
    before = len(relay.received)
    assert 0 < before < count
    result = subprocess.run(SMTP_OUT + common + ["--once"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    subjects = [m.data.split(b"\r\n")[0] for m in relay.wait_for(count)]
    assert set(subjects) == {b"Subject: n%d" % n for n in range(count)}     # none lost
    assert len(subjects) - count <= conns      # at most the transactions in flight repeat
    assert spool.queued() == 0


# --- Our own smtp_in as the remote MX: two hosts, end to end ---

def test_mx_pointing_at_our_own_smtp_in_bounces_once_with_5_4_6_instead_of_looping(tmp_path, resolver):
    """loop.test's MX is 127.0.0.1, where our own smtp_in (same hostname, relaying for
    127.0.0.0/8, on the same spool) listens: it greets with our name, and the sender gets
    one bounce at once instead of the message going round until the hop limit."""
    import smtp_in
    spool = Spool(tmp_path, clock=time.time)
    server = smtp_in.SMTPServer(("127.0.0.1", 0), {
        "spool": spool.path, "domain": ["local.test"], "hostname": HOSTNAME, "spf": "off", "dmarc": "off",
        "relay_network": ["127.0.0.0/8"]}, store=spool.store)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        spool.send(["u@loop.test"], b"Subject: round and round\r\n\r\nhi\r\n")
        for _ in range(3):                 # what went round would be routed out again
            spool.deliver(mx_config(server.server_address[1]), resolver)
    finally:
        server.stop(grace=0.5)
    assert spool.queued() == 0
    (bounce,) = spool.sender_mail()
    _, (fields,) = dsn_fields(bounce)
    assert (fields["Status"], fields["Final-Recipient"]) == ("5.4.6", "rfc822; u@loop.test")
    assert "mail for loop.test loops back to myself" in fields["Diagnostic-Code"]


def test_dotted_body_crosses_to_our_smtp_in_byte_identical(tmp_path, resolver):
    import smtp_in
    remote = tmp_path / "remote"
    remote_store = mailbox_store.Store(str(remote), ["two.test"], "mx1.two.test")
    remote_store.add_user("u@two.test", "password-2")
    server = smtp_in.SMTPServer(("127.0.0.2", 0), {"spool": str(remote), "domain": ["two.test"],
                                                    "hostname": "mx1.two.test", "spf": "off",
                                                    "dmarc": "off"},
                                store=remote_store)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        spool = Spool(tmp_path / "local", clock=time.time)
        body = b"".join(b"." * (n % 4) + b"line %d\r\n" % n for n in range(3000))
        message = b"Subject: dots\r\nMessage-ID: <dots@local.test>\r\n\r\n" + body + b".\r\n"
        spool.send(["u@two.test"], message)
        spool.deliver(mx_config(server.server_address[1]), resolver)
        assert spool.queued() == 0 and spool.sender_mail() == []
    finally:
        server.stop(grace=0.5)
    remote_queue = mta.Queue(str(remote), hostname="mx1.two.test")
    router = mta.Router(remote_queue, remote_store)
    for name in remote_queue.ids(mta.INCOMING):
        router.handle(name)
    box = mailbox.Maildir(remote_store.maildir_path("u@two.test"), create=False)
    (key,) = box.keys()
    delivered = box.get_bytes(key)
    assert delivered.endswith(message) and b"Received: from " in delivered


def test_prepended_header_fields_are_sent_on_top_and_counted_in_size(tmp_path, sinks):
    fields = "DKIM-Signature: v=1; d=local.test;\r\n\tb=c2lnbmF0dXJl\r\n"
    message = b"From: sender@local.test\r\nSubject: signed\r\n\r\nbody\r\n"
    sink = sinks()
    spool = Spool(tmp_path)
    spool.queue.enqueue(SENDER, ["far@two.test"], message, prepend=fields)
    spool.route()
    assert spool.deliver(relay_config(sink)) == 1
    (received,) = sink.wait_for(1)
    assert received.data == fields.encode() + message
    assert "SIZE=%d" % len(received.data) in received.mail_params
    assert spool.queued() == 0
