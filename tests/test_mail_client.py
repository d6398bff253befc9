"""mail_client.py against our own servers: smtp_in (submission) and pop3d, on 127.0.0.1."""

import email
import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest

import mail_client
from support import wait_for
from smtp_out_support import Script, Sink
from mail_client_support import (  # noqa: F401 (fixtures)
    CuttingProxy, ScriptedPOP3, USERS, fill_mailbox, maildir_subjects, mbox_subjects,
    server_messages, servers, spool, spooled_messages, start_pop3, start_submission, store,
    store_template)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIL_CLIENT = os.path.join(ROOT, "mail_client.py")
ALICE, BOB = "alice@example.com", "bob@example.com"
MESSAGE = (b"From: <alice@example.com>\r\nTo: <bob@example.com>\r\nSubject: hello bob\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <hello@example.com>\r\n\r\n"
           b"Hi.\r\n")


@pytest.fixture
def password_env(monkeypatch):
    monkeypatch.setenv("ALICE_PASSWORD", USERS[ALICE])
    return ["--user", ALICE, "--password-env", "ALICE_PASSWORD"]


def run(argv, capsys, stdin=b""):
    """main(argv) in this process with stdin; returns (status, stdout, stderr)."""
    read_stdin = sys.stdin

    class Stdin:
        buffer = __import__("io").BytesIO(stdin)

    sys.stdin = Stdin()
    try:
        status = mail_client.main(argv)
    finally:
        sys.stdin = read_stdin
        logging.getLogger().handlers.clear()      # they write to this test's capture
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def cli(args, stdin=b"", env=None):
    """python3 mail_client.py ARGS as a subprocess with no terminal; a CompletedProcess."""
    environment = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, MAIL_CLIENT] + args, input=stdin, capture_output=True,
                          timeout=60, env=environment, cwd=ROOT, start_new_session=True)


def send_args(server, ca_file, *extra):
    return ["send", "--server", "127.0.0.1:%d" % server.port, "--from", ALICE,
            "--ca-file", ca_file, "--timeout", "10"] + list(extra)


def fetch_args(server, destination, *extra, kind="--maildir"):
    return ["fetch", "--server", "127.0.0.1:%d" % getattr(server, "port", server),
            kind, str(destination), "--timeout", "10"] + list(extra)


# --- send ---

def test_send_with_starttls_and_auth_from_the_command_line_reaches_the_spool(
        start_submission, spool, tls_files):
    server = start_submission()
    result = cli(send_args(server, tls_files[0], "--to", BOB, "--user", ALICE,
                           "--password-env", "SECRET"), MESSAGE, {"SECRET": USERS[ALICE]})
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith("to=<bob@example.com>, status=sent (250 ")
    queued = spooled_messages(spool)
    assert len(queued) == 1 and b"Subject: hello bob" in queued[0]
    assert b"with ESMTPSA" in queued[0]           # RFC 3848: STARTTLS and AUTH were used


def test_refused_recipient_gives_non_zero_status_and_is_named(
        start_submission, spool, tls_files, password_env, capsys):
    server = start_submission()
    status, out, err = run(send_args(server, tls_files[0], "--to", BOB, "--to",
                                     "nobody@example.com", *password_env), capsys, MESSAGE)
    assert status == mail_client.EXIT_FAILED
    lines = out.splitlines()
    assert lines[0].startswith("to=<bob@example.com>, status=sent (250 ")
    assert lines[1].startswith("to=<nobody@example.com>, status=refused (550 ")
    assert len(spooled_messages(spool)) == 1      # bob still gets it


def test_message_built_from_subject_and_body_has_date_message_id_from_and_to(
        start_submission, spool, tls_files, password_env, capsys):
    server = start_submission()
    status, out, err = run(send_args(server, tls_files[0], "--to", "Bob <bob@example.com>",
                                   "--subject", "Grüße", "--body", "Straße\n.dot line",
                                   *password_env), capsys)
    assert status == 0, err
    queued = spooled_messages(spool)[0]
    message = email.message_from_bytes(queued[queued.index(b"Received:"):],
                                       policy=email.policy.default)
    assert message["From"] == ALICE and message["To"] == "Bob <bob@example.com>"
    assert str(message["Subject"]) == "Grüße"
    assert message["Date"] and message["Message-ID"].endswith("@example.com>")
    assert message.get_content().replace("\r\n", "\n") == "Straße\n.dot line\n"
    assert queued.isascii()                       # 7-bit clean: quoted-printable, RFC 2047


def test_body_from_stdin_when_only_a_subject_is_given(
        start_submission, spool, tls_files, password_env, capsys):
    server = start_submission()
    status, _, _ = run(send_args(server, tls_files[0], "--to", BOB, "--subject", "note",
                                 *password_env), capsys, b"from stdin\n")
    assert status == 0
    assert b"\r\n\r\nfrom stdin\r\n" in spooled_messages(spool)[0]


def test_unverified_certificate_stops_before_any_password_or_mail(
        start_submission, spool, password_env, capsys):
    server = start_submission()
    argv = ["send", "--server", "127.0.0.1:%d" % server.port, "--from", ALICE, "--to", BOB,
            "--timeout", "10"] + password_env
    status, out, err = run(argv, capsys, MESSAGE)
    assert status == mail_client.EXIT_TEMPFAIL
    assert "TLS with 127.0.0.1[127.0.0.1]:%d failed" % server.port in err and out == ""
    assert "CERTIFICATE_VERIFY_FAILED" in err and "without TLS" not in err
    assert spooled_messages(spool) == []
    status, out, err = run(argv + ["--insecure"], capsys, MESSAGE)
    assert status == 0 and "status=sent" in out


def test_tls_none_does_not_use_the_offered_starttls(start_submission, spool, password_env,
                                                    capsys):
    server = start_submission()
    status, out, _ = run(["send", "--server", "127.0.0.1:%d" % server.port, "--from", ALICE,
                          "--to", BOB, "--tls", "none"] + password_env, capsys, MESSAGE)
    assert status == 0 and "status=sent" in out
    assert b"with ESMTPA" in spooled_messages(spool)[0]   # AUTH in the clear: loopback only


def test_opportunistic_tls_goes_on_in_the_clear_only_when_no_starttls_is_offered(
        start_submission, spool, password_env, capsys):
    server = start_submission(tls=False)
    status, out, _ = run(["send", "--server", "127.0.0.1:%d" % server.port, "--from", ALICE,
                          "--to", BOB] + password_env, capsys, MESSAGE)
    assert status == 0 and "status=sent" in out
    assert b"with ESMTPA" in spooled_messages(spool)[0]


def test_opportunistic_send_makes_one_connection_and_no_plaintext_after_a_failed_starttls(
        tls_files, password_env, capsys):
    users = {ALICE: USERS[ALICE]}
    plain = Sink.start(script=Script(users=users))
    broken = Sink.start(tls_files=tls_files, script=Script(users=users, tls_break=True))
    try:
        status, out, _ = run(["send", "--server", "127.0.0.1:%d" % plain.port, "--from", ALICE,
                              "--to", BOB, "--timeout", "10"] + password_env, capsys, MESSAGE)
        assert status == 0 and "status=sent" in out
        assert plain.sessions == 1                     # no second try when STARTTLS is absent
        status, out, err = run(["send", "--server", "127.0.0.1:%d" % broken.port, "--from",
                                ALICE, "--to", BOB, "--timeout", "10", "--insecure"]
                               + password_env, capsys, MESSAGE)
        assert status == mail_client.EXIT_TEMPFAIL and out == "" and "4.7.5" not in out
        assert "TLS with 127.0.0.1[127.0.0.1]:%d failed" % broken.port in err
        assert broken.sessions == 1 and "AUTH" not in broken.commands
    finally:
        plain.close()
        broken.close()


def test_tls_required_without_starttls_fails(start_submission, spool, password_env, capsys):
    server = start_submission(tls=False)
    status, _, err = run(["send", "--server", "127.0.0.1:%d" % server.port, "--from", ALICE,
                          "--to", BOB, "--tls", "required"] + password_env, capsys, MESSAGE)
    assert status == mail_client.EXIT_TEMPFAIL and "TLS is required" in err
    assert spooled_messages(spool) == []


def test_implicit_tls_submission(start_submission, spool, tls_files, password_env, capsys):
    server = start_submission(implicit_tls=True)
    status, out, _ = run(send_args(server, tls_files[0], "--to", BOB, "--implicit-tls",
                                   *password_env), capsys, MESSAGE)
    assert status == 0 and "status=sent" in out
    assert b"with ESMTPSA" in spooled_messages(spool)[0]


def test_wrong_password_exits_1_and_sends_nothing(start_submission, spool, tls_files,
                                                   monkeypatch, capsys):
    server = start_submission()
    monkeypatch.setenv("WRONG", "not-it")
    status, out, err = run(send_args(server, tls_files[0], "--to", BOB, "--user", ALICE,
                                     "--password-env", "WRONG"), capsys, MESSAGE)
    assert status == mail_client.EXIT_FAILED and "535" in err and out == ""
    assert spooled_messages(spool) == []


def test_password_from_a_file_and_a_warning_when_others_can_read_it(
        start_submission, spool, tls_files, tmp_path):
    server = start_submission()
    secret = tmp_path / "secret"
    secret.write_text(USERS[ALICE] + "\n")
    secret.chmod(0o644)
    result = cli(send_args(server, tls_files[0], "--to", BOB, "--user", ALICE,
                           "--password-file", str(secret)), MESSAGE)
    assert result.returncode == 0, result.stderr
    assert b"readable by others" in result.stderr
    secret.chmod(0o600)
    result = cli(send_args(server, tls_files[0], "--to", BOB, "--user", ALICE,
                           "--password-file", str(secret)), MESSAGE)
    assert result.returncode == 0 and b"readable" not in result.stderr
    assert len(spooled_messages(spool)) == 2


def test_no_password_source_and_no_terminal_is_a_usage_error(tmp_path):
    result = cli(["send", "--server", "127.0.0.1:1", "--from", ALICE, "--to", BOB,
                  "--user", ALICE], MESSAGE)
    assert result.returncode == mail_client.EXIT_USAGE
    assert b"no password source" in result.stderr


def test_a_password_is_never_taken_from_the_command_line():
    result = cli(["send", "--server", "127.0.0.1:1", "--from", ALICE, "--to", BOB,
                  "--password", "secret"], MESSAGE)
    assert result.returncode == 2 and b"unrecognized arguments" in result.stderr


def test_missing_date_and_message_id_are_added_to_a_stdin_message():
    message = b"From: a@example.com\nSubject: x\n\nbody\n"
    completed = mail_client.complete_header(message, "example.com")
    head = completed.split(b"\n\n")[0]
    assert head.startswith(b"Date: ") and b"\nMessage-ID: <" in head
    assert mail_client.complete_header(MESSAGE, "example.com") == MESSAGE
    folded = b"Subject: x\r\n date: folded, not a field\r\n\r\nDate: in the body\r\n"
    assert mail_client.complete_header(folded, "example.com").startswith(b"Date: ")


# --- fetch ---

def test_fetch_100_messages_cut_after_50_then_again_gives_each_exactly_once(
        start_pop3, store, tmp_path, password_env, capsys):
    server = start_pop3(tls=False)
    subjects = fill_mailbox(store, ALICE, 100)
    proxy = CuttingProxy(server.port, "RETR", nth=51)
    maildir = tmp_path / "Maildir"
    try:
        status, _, err = run(fetch_args(proxy.port, maildir, *password_env), capsys)
    finally:
        proxy.close()
    assert status == mail_client.EXIT_TEMPFAIL, err
    assert "retrieved=50," in err and "status=failed" in err
    assert len(maildir_subjects(maildir)) == 50
    assert wait_for(lambda: server.active_connections() == 0)
    assert server_messages(store, ALICE) == 100   # no QUIT, so nothing was removed
    status, _, err = run(fetch_args(server, maildir, *password_env), capsys)
    assert status == 0, err
    assert "retrieved=50," in err and "already=50," in err and "deleted=100," in err
    assert maildir_subjects(maildir) == sorted(subjects)
    assert server_messages(store, ALICE) == 0


def test_message_cut_in_the_middle_is_not_stored(start_pop3, store, tmp_path, password_env,
                                                 capsys):
    server = start_pop3(tls=False)
    subjects = fill_mailbox(store, ALICE, 5, body=b"x" * 5000 + b"\r\n")
    proxy = CuttingProxy(server.port, "RETR", nth=3, forward=True, reply_bytes=1000)
    mbox = tmp_path / "inbox.mbox"
    try:
        status, _, _ = run(fetch_args(proxy.port, mbox, *password_env, kind="--mbox"), capsys)
    finally:
        proxy.close()
    assert status == mail_client.EXIT_TEMPFAIL
    assert mbox_subjects(mbox) == sorted(subjects[:2])
    assert wait_for(lambda: server.active_connections() == 0)
    status, _, _ = run(fetch_args(server, mbox, *password_env, kind="--mbox"), capsys)
    assert status == 0
    assert mbox_subjects(mbox) == sorted(subjects)
    assert all(m.get_payload() == "x" * 5000 + "\n" for m in __import__("mailbox").mbox(str(mbox)))


def test_lost_reply_to_quit_fetches_nothing_twice(start_pop3, store, tmp_path, password_env,
                                                  capsys):
    server = start_pop3(tls=False)
    fill_mailbox(store, ALICE, 10)
    proxy = CuttingProxy(server.port, "QUIT", forward=True)
    maildir = tmp_path / "Maildir"
    try:
        status, _, err = run(fetch_args(proxy.port, maildir, *password_env), capsys)
    finally:
        proxy.close()
    assert status == mail_client.EXIT_TEMPFAIL and "retrieved=10," in err
    assert wait_for(lambda: server.active_connections() == 0)
    assert server_messages(store, ALICE) == 0     # the server did its UPDATE
    fill_mailbox(store, ALICE, 1, start=10)
    status, _, err = run(fetch_args(server, maildir, *password_env), capsys)
    assert status == 0 and "retrieved=1," in err
    assert len(maildir_subjects(maildir)) == 11
    state = (maildir / "mail_client.uidl").read_text()
    assert "alice@example.com@127.0.0.1 " not in state   # ids of removed mail forgotten


def test_keep_twice_fetches_each_message_once(start_pop3, store, tmp_path, password_env,
                                              capsys):
    server = start_pop3()
    subjects = fill_mailbox(store, ALICE, 5)
    maildir = tmp_path / "Maildir"
    args = fetch_args(server, maildir, "--keep", "--insecure", *password_env)
    status, _, err = run(args, capsys)
    assert status == 0 and "retrieved=5," in err
    status, _, err = run(args, capsys)
    assert status == 0 and "retrieved=0," in err and "already=5," in err
    assert maildir_subjects(maildir) == sorted(subjects)
    assert server_messages(store, ALICE) == 5
    subjects += fill_mailbox(store, ALICE, 3, start=5)
    status, _, err = run(args, capsys)
    assert status == 0 and "retrieved=3," in err and "deleted=0," in err
    assert maildir_subjects(maildir) == sorted(subjects)


def test_limit_downloads_at_most_n_and_the_rest_waits(start_pop3, store, tmp_path,
                                                      password_env, capsys):
    server = start_pop3(tls=False)
    subjects = fill_mailbox(store, ALICE, 10)
    maildir = tmp_path / "Maildir"
    status, _, err = run(fetch_args(server, maildir, "--limit", "4", *password_env), capsys)
    assert status == 0 and "retrieved=4," in err and "left=6," in err
    assert maildir_subjects(maildir) == sorted(subjects[:4])
    assert server_messages(store, ALICE) == 6
    status, _, err = run(fetch_args(server, maildir, *password_env), capsys)
    assert maildir_subjects(maildir) == sorted(subjects)


def test_stls_with_a_trusted_certificate_and_implicit_tls(start_pop3, store, tmp_path,
                                                          tls_files, password_env, capsys):
    fill_mailbox(store, ALICE, 2)
    server = start_pop3()
    maildir = tmp_path / "Maildir"
    status, _, err = run(fetch_args(server, maildir, "--keep", "--tls", "required",
                                    "--ca-file", tls_files[0], "--verbose", *password_env),
                         capsys)
    assert status == 0, err
    assert "> 127.0.0.1:%d STLS" % server.port in err
    assert "AUTH <redacted>" in err and USERS[ALICE] not in err
    implicit = start_pop3(implicit_tls=True)
    status, _, err = run(fetch_args(implicit, tmp_path / "other", "--implicit-tls",
                                    "--ca-file", tls_files[0], *password_env), capsys)
    assert status == 0 and "retrieved=2," in err


def test_credentials_too_long_for_one_auth_line_answer_the_continuation(
        start_pop3, store, tmp_path, monkeypatch, capsys):
    server = start_pop3()
    fill_mailbox(store, "carol@example.com", 1)
    monkeypatch.setenv("CAROL", USERS["carol@example.com"])
    status, _, err = run(fetch_args(server, tmp_path / "M", "--insecure", "--verbose", "--user",
                                    "carol@example.com", "--password-env", "CAROL"), capsys)
    assert status == 0 and "retrieved=1," in err
    assert "> 127.0.0.1:%d AUTH PLAIN\n" % server.port in err   # RFC 5034 4: no initial response


def test_no_password_goes_to_a_remote_server_without_tls():
    client = mail_client.POP3Client("192.0.2.1", 110, tls="none")
    with pytest.raises(mail_client.POP3Error, match="without TLS"):
        client.login("alice", "secret")           # refused before any byte is sent


def test_a_server_named_localhost_gets_the_password_in_the_clear(start_pop3, store, tmp_path,
                                                                  password_env, capsys):
    server = start_pop3(tls=False)                 # the connected address decides, not the name
    fill_mailbox(store, ALICE, 1)
    args = ["fetch", "--server", "localhost:%d" % server.port, "--maildir",
            str(tmp_path / "M"), "--timeout", "10", "--tls", "none"] + password_env
    status, _, err = run(args, capsys)
    assert status == 0 and "retrieved=1," in err


def test_untrusted_certificate_stops_the_fetch_before_the_password(
        start_pop3, store, tmp_path, password_env, capsys):
    fill_mailbox(store, ALICE, 1)
    server = start_pop3()
    status, _, err = run(fetch_args(server, tmp_path / "Maildir", *password_env), capsys)
    assert status == mail_client.EXIT_TEMPFAIL and "CERTIFICATE_VERIFY_FAILED" in err
    assert server_messages(store, ALICE) == 1


def test_plaintext_sent_behind_the_stls_reply_ends_the_session(tmp_path, password_env, capsys):
    server = ScriptedPOP3([], stls_reply=b"+OK begin TLS\r\n+OK [injected] logged in\r\n")
    try:
        status, _, err = run(fetch_args(server.port, tmp_path / "M", "--insecure",
                                        *password_env), capsys)
    finally:
        server.close()
    assert status == mail_client.EXIT_TEMPFAIL and "TLS with" in err
    assert "USER" not in server.commands and "PASS" not in server.commands


def test_tls_required_but_no_stls_offered(start_pop3, tmp_path, password_env, capsys):
    server = start_pop3(tls=False)
    status, _, err = run(fetch_args(server, tmp_path / "M", "--tls", "required",
                                    *password_env), capsys)
    assert status == mail_client.EXIT_TEMPFAIL and "does not offer STLS" in err


def test_fetch_with_a_wrong_password_exits_1_and_keeps_the_mail(
        start_pop3, store, tmp_path, monkeypatch, capsys):
    server = start_pop3(tls=False)
    fill_mailbox(store, ALICE, 1)
    monkeypatch.setenv("WRONG", "nope")
    status, _, err = run(fetch_args(server, tmp_path / "M", "--user", ALICE, "--password-env",
                                    "WRONG"), capsys)
    assert status == mail_client.EXIT_FAILED and "[AUTH]" in err
    assert server_messages(store, ALICE) == 1


def test_maildrop_in_use_is_temporary(start_pop3, store, tmp_path, password_env, capsys):
    server = start_pop3(tls=False)
    with store.open_mailbox(ALICE):
        status, _, err = run(fetch_args(server, tmp_path / "M", *password_env), capsys)
    assert status == mail_client.EXIT_TEMPFAIL and "[IN-USE]" in err


def test_state_file_held_by_another_run_is_temporary(start_pop3, tmp_path, password_env,
                                                     capsys):
    server = start_pop3(tls=False)
    maildir = tmp_path / "Maildir"
    mail_client.MaildirWriter(str(maildir))
    with open(str(maildir / "mail_client.uidl"), "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        status, _, err = run(fetch_args(server, maildir, *password_env), capsys)
    assert status == mail_client.EXIT_TEMPFAIL and "another fetch is using" in err


def test_maildir_writer_delivers_through_the_store_with_both_sizes_in_the_name(tmp_path):
    writer = mail_client.MaildirWriter(str(tmp_path / "Maildir"), hostname="client.example")
    assert sorted(os.listdir(str(tmp_path / "Maildir"))) == ["cur", "new", "tmp"]
    message = b"Subject: x\n\nbody\n"
    path = writer.add(message)
    assert open(path, "rb").read() == message
    assert os.path.basename(path).endswith(".client.example,S=%d,W=%d" % (
        len(message), len(message.replace(b"\n", b"\r\n"))))


def test_state_file_stays_private_after_it_is_rewritten(tmp_path):
    state = mail_client.UIDLState(str(tmp_path / "state.uidl"), "alice@pop.example")
    state.add("uid-1")
    state.save({"uid-1"})
    state.close()
    assert os.stat(str(tmp_path / "state.uidl")).st_mode & 0o777 == 0o600
    assert "alice@pop.example uid-1" in (tmp_path / "state.uidl").read_text()


def test_long_lines_and_leading_dots_arrive_intact_with_lf_line_ends(
        start_pop3, store, tmp_path, password_env, capsys):
    server = start_pop3(tls=False)
    body = b"a" * 3000 + b"\r\n.\r\n..two\r\nend\r\n"
    fill_mailbox(store, ALICE, 1, body=body)
    maildir = tmp_path / "Maildir"
    status, _, _ = run(fetch_args(server, maildir, *password_env), capsys)
    assert status == 0
    (name,) = os.listdir(str(maildir / "new"))
    data = (maildir / "new" / name).read_bytes()
    assert b"\r" not in data and data.endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))
    assert data.startswith(b"Return-Path: <sender@example.org>\n")


def test_a_bare_cr_before_a_dot_does_not_end_the_message(start_pop3, store, tmp_path,
                                                         password_env, capsys):
    server = start_pop3(tls=False)
    fill_mailbox(store, ALICE, 1, body=b"one\r.\r\nafter the dot\r\n")
    fill_mailbox(store, ALICE, 1, start=1)
    maildir = tmp_path / "Maildir"
    status, _, _ = run(fetch_args(server, maildir, *password_env), capsys)
    assert status == 0
    files = [(maildir / "new" / name).read_bytes() for name in os.listdir(str(maildir / "new"))]
    assert len(files) == 2
    assert any(data.endswith(b"\n\none\r.\nafter the dot\n") for data in files)


def test_garbage_from_the_server_is_a_clear_error(tmp_path, password_env, capsys):
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        connection, _ = listener.accept()
        with connection:
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            connection.recv(1024)

    threading.Thread(target=answer, daemon=True).start()
    try:
        status, _, err = run(fetch_args(listener.getsockname()[1], tmp_path / "M",
                                        *password_env), capsys)
    finally:
        listener.close()
    assert status == mail_client.EXIT_TEMPFAIL
    assert "malformed response while reading the greeting" in err and "Traceback" not in err


def test_odd_but_valid_retr_responses_split_into_single_octets(tmp_path, password_env,
                                                               capsys):
    server = ScriptedPOP3([
        b".\r\n",                                      # an empty message
        b"..\r\n...two\r\n.x\r\n.\r\n",                 # stuffed lines
        b"Subject: a\r\n\r\nbare\nLF and bare\rCR\r\n.\r\n",
        b"no final line end, the server added one\r\n.\r\n",
    ])
    maildir = tmp_path / "Maildir"
    try:
        status, _, err = run(fetch_args(server.port, maildir, *password_env), capsys)
    finally:
        server.close()
    assert status == 0, err
    assert "USER" in server.commands and server.commands.count("DELE") == 4
    stored = sorted((maildir / "new" / name).read_bytes()
                    for name in os.listdir(str(maildir / "new")))
    assert stored == sorted([b"", b".\n..two\nx\n", b"Subject: a\n\nbare\nLF and bare\rCR\n",
                             b"no final line end, the server added one\n"])


def test_an_err_to_one_retr_skips_that_message_and_the_run_goes_on(tmp_path, password_env,
                                                                   capsys):
    server = ScriptedPOP3([b"one\r\n.\r\n", None, b"three\r\n.\r\n"], chunk=4096)
    maildir = tmp_path / "Maildir"
    try:
        status, _, err = run(fetch_args(server.port, maildir, *password_env), capsys)
    finally:
        server.close()
    assert status == mail_client.EXIT_TEMPFAIL
    assert "message 2 left on the server: -ERR [SYS/TEMP] unavailable" in err
    assert "retrieved=2," in err and "left=1," in err and server.commands.count("DELE") == 2


def test_keep_needs_uidl(tmp_path, password_env, capsys):
    server = ScriptedPOP3([b"Subject: a\r\n\r\nx\r\n.\r\n"], uidl=False)
    try:
        status, _, err = run(fetch_args(server.port, tmp_path / "M", "--keep", *password_env),
                             capsys)
        assert status == mail_client.EXIT_FAILED and "does not support UIDL" in err
        assert "RETR" not in server.commands
        status, _, err = run(fetch_args(server.port, tmp_path / "M", *password_env), capsys)
        assert status == 0 and "has no UIDL" in err and "retrieved=1," in err
    finally:
        server.close()


def test_a_message_longer_than_its_list_size_is_bounded_by_max_size(tmp_path, password_env,
                                                                    capsys):
    server = ScriptedPOP3([b"a" * 3000 + b"\r\n.\r\n", b"ok\r\n.\r\n", b"b" * 9000 + b"\r\n.\r\n",
                           b"never reached\r\n.\r\n"], chunk=4096, listed_size=10)
    maildir = tmp_path / "Maildir"
    try:
        status, _, err = run(fetch_args(server.port, maildir, "--max-size", "2000",
                                        *password_env), capsys)
    finally:
        server.close()
    assert status == mail_client.EXIT_FAILED and "status=failed" in err
    assert "message 1 left on the server: larger than 2000 octets" in err
    assert "message 3 is more than twice --max-size (2000 octets)" in err
    assert [(maildir / "new" / n).read_bytes() for n in os.listdir(str(maildir / "new"))] == [b"ok\n"]


def test_message_over_max_size_is_left_on_the_server(start_pop3, store, tmp_path,
                                                     password_env, capsys):
    server = start_pop3(tls=False)
    fill_mailbox(store, ALICE, 1)
    fill_mailbox(store, ALICE, 1, start=1, body=b"y" * 4000 + b"\r\n")
    fill_mailbox(store, ALICE, 1, start=2)
    maildir = tmp_path / "Maildir"
    status, _, err = run(fetch_args(server, maildir, "--max-size", "1000", *password_env),
                         capsys)
    assert status == mail_client.EXIT_FAILED
    assert "message 2 left on the server: larger than 1000 octets" in err
    assert maildir_subjects(maildir) == ["message 0", "message 2"]
    assert server_messages(store, ALICE) == 1


def test_mbox_quotes_from_lines_mboxrd(start_pop3, store, tmp_path, password_env, capsys):
    server = start_pop3(tls=False)
    fill_mailbox(store, ALICE, 2, body=b"From here\r\n>From there\r\nno newline at the end")
    mbox = tmp_path / "mail" / "inbox"
    status, _, _ = run(fetch_args(server, mbox, *password_env, kind="--mbox"), capsys)
    assert status == 0
    data = mbox.read_bytes()
    assert data.startswith(b"From sender@example.org ")
    assert data.count(b"\n>From here\n>>From there\nno newline at the end\n\n") == 2
    assert mbox_subjects(mbox) == ["message 0", "message 1"]


def test_fetch_from_the_command_line_shows_progress(start_pop3, store, tmp_path):
    server = start_pop3(tls=False)
    fill_mailbox(store, ALICE, 20)
    secret = tmp_path / "secret"
    secret.write_text(USERS[ALICE])
    secret.chmod(0o600)
    result = cli(fetch_args(server, tmp_path / "Maildir", "--user", ALICE, "--password-file",
                            str(secret)))
    assert result.returncode == 0, result.stderr
    assert b"fetch: 20/20 messages, " in result.stderr
    assert b"retrieved=20," in result.stderr and b"status=done" in result.stderr
    assert len(maildir_subjects(tmp_path / "Maildir")) == 20


def test_fetch_needs_exactly_one_destination(capsys, password_env):
    status, _, err = run(["fetch", "--server", "127.0.0.1:1"] + password_env, capsys)
    assert status == mail_client.EXIT_USAGE and "--maildir" in err


# --- pure helpers ---

@pytest.mark.parametrize("line, escaped", [
    (b"From me", b">From me"), (b">From me", b">>From me"), (b"From", b"From"),
    (b" From me", b" From me"), (b">>From x", b">>>From x"), (b"Fromage", b"Fromage"),
])
def test_mboxrd_escape_quotes_every_from_line(line, escaped):
    assert mail_client.mboxrd_escape(b"Subject: x\r\n\r\n" + line + b"\r\n") == (
        b"Subject: x\n\n" + escaped + b"\n")


@pytest.mark.parametrize("line, code", [
    ("-ERR [IN-USE] locked", "IN-USE"), ("-ERR [SYS/TEMP] later", "SYS/TEMP"),
    ("-ERR [auth] no", "AUTH"), ("-ERR no code", ""), ("-ERR [unclosed", ""), ("+OK [x]", ""),
])
def test_response_code(line, code):
    assert mail_client.response_code(line) == code


def test_response_codes_decide_temporary_or_permanent():
    assert mail_client.POP3Error("-ERR [IN-USE] x", temporary=False).temporary
    assert not mail_client.POP3Error("-ERR [AUTH] x", temporary=True).temporary
    assert mail_client.POP3Error("-ERR x").temporary


@pytest.mark.parametrize("uid, valid", [
    ("abc", True), ("x" * 70, True), ("x" * 71, False), ("", False), ("a b", False),
    ("caf\u00e9", False),
])
def test_valid_uid(uid, valid):
    assert mail_client.valid_uid(uid) is valid


def test_account_key_quotes_what_would_break_a_state_line():
    assert mail_client.account_key("a b@x", "Mail.Example.COM") == "a%20b@x@mail.example.com"
