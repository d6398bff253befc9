"""smtp_in.py, mta.py sendmail and run_all.py with DKIM (RFC 6376) and DMARC (RFC 7489):
signing on the way out, verifying on the MX. Keys come from `dkim.py keygen` or dkim.py's
own generators, the key, SPF and DMARC records from a real dnsmasq, signatures are
checked by dkimpy too (imported beside our dkim.py, see tests/dkim_support.py)."""

import base64
import logging
import os
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time

import pytest

import dkim
import dnsstub
import mailbox_store
import mta
import smtp_in
from support import ROOT, SLACK, free_ports, require_tool, wait_for
from dkim_support import import_dkimpy
from dnsmasq_server import start_dnsmasq, txt_record
from smtpin_support import (  # noqa: F401  (fixtures)
    DOMAIN, HOSTNAME, USERS, spool, spool_messages, start_smtp, store_template)
from test_smtp_in_spf import DeadNameserver, header_fields

ALICE = "alice@example.com"
SELECTOR = "mail"                      # our key for example.com, made by keygen
SENDER_KEY = dkim.generate_ed25519_key()
DNS_BUDGET = 1.0                       # dkim_timeout where the nameserver never answers

TEXT = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.com>\r\n"
        b"Subject: signed on the way out\r\nDate: Sun, 06 Dec 2026 04:00:00 +0000\r\n"
        b"Message-ID: <out.1@example.com>\r\n\r\nHello Bob,\r\n\r\nthe figures.\r\n")


def zone_strings(line):
    """The character-strings of a zone-file TXT line as keygen prints it."""
    return re.findall(r'"([^"]*)"', line)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A spool's dkim/ folder holding an RSA key for example.com made by `dkim.py keygen`,
    and the zone lines it printed."""
    where = tmp_path_factory.mktemp("keygen-spool")
    (where / "queue").mkdir()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "dkim.py"), "keygen", "--domain",
                          DOMAIN, "--selector", SELECTOR, "--spool", str(where)],
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = [line for line in run.stdout.decode().splitlines() if "_domainkey" in line]
    return where / "dkim", zone_strings(printed[0])


@pytest.fixture(scope="module")
def dns(keys):
    require_tool("dnsmasq", "dnsmasq-base")
    _, strings = keys
    assert len(strings) == 2               # a 2048-bit key: two strings of at most 255
    records = [
        txt_record("%s._domainkey.%s" % (SELECTOR, DOMAIN), *strings),
        txt_record("s1._domainkey.sender.test", dkim.key_record_text(SENDER_KEY)),
        txt_record("sender.test", "v=spf1 ip4:127.0.0.1 -all"),
        txt_record("_dmarc.sender.test", "v=DMARC1; p=reject"),
        txt_record("_dmarc.strict.test", "v=DMARC1; p=reject"),
        txt_record("_dmarc.quar.test", "v=DMARC1; p=quarantine"),
    ]
    with start_dnsmasq(records) as server:
        yield server


@pytest.fixture
def dkimpy():
    module = import_dkimpy()
    if module is None:
        pytest.skip("dkimpy not installed (pip install dkimpy)")
    return module


@pytest.fixture
def signing_spool(spool, keys):
    folder, _ = keys
    shutil.copytree(str(folder), str(spool / "dkim"))
    return spool


def dnsfunc_for(dns):
    """dkimpy's dnsfunc, answered by the dnsmasq (each record's strings joined)."""
    resolver = dnsstub.Resolver([dns.address], timeout=2, attempts=1)

    def dnsfunc(name, timeout=5):
        try:
            records = resolver.txt(name.decode().rstrip("."), raw=True)
        except dnsstub.DNSError:
            return None
        return records[0] if records else None
    return dnsfunc


def our_verdict(message, dns):
    return [r.result for r in dkim.verify(message, dkim.DNSResolver(
        dnsstub.Resolver([dns.address], timeout=2, attempts=1)))]


def submit(server, text, sender=ALICE, rcpt="bob@example.com"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("laptop.example.com")
        client.login(sender, USERS[sender])
        client.sendmail(sender, [rcpt], text)


def deliver_mx(server, text, sender="user@sender.test", rcpt="bob@example.com"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.sendmail(sender, [rcpt], text)
    return spool_messages(server.spool_dir)[-1][2]           # the newest


def signed_by_sender(text, domain="sender.test"):
    """TEXT signed by dkimpy with the key sender.test publishes (s1)."""
    module = import_dkimpy()
    if module is None:
        pytest.skip("dkimpy not installed (pip install dkimpy)")
    return module.sign(text, b"s1", domain.encode(), base64.b64encode(SENDER_KEY.seed),
                       canonicalize=(b"relaxed", b"relaxed"),
                       signature_algorithm=b"ed25519-sha256") + text


def mx_text(author="user@sender.test", subject="inbound"):
    return ("From: <%s>\r\nTo: <bob@example.com>\r\nSubject: %s\r\n"
            "Message-ID: <%s@sender.test>\r\n\r\nHello.\r\n" % (author, subject, subject)).encode()


def our_authentication_results(data):
    return [f for f in header_fields(data)
            if f.lower().startswith("authentication-results: " + HOSTNAME)]


# --- Pure helpers ---

def test_one_field_holds_spf_dkim_and_dmarc_and_nothing_checked_gives_none():
    assert smtp_in.authentication_results_field(HOSTNAME) == ""
    results = [dkim.DKIMResult("pass", domain="sender.test", selector="s1", b_text="abcdefghij")]
    dmarc = dkim.DMARCResult("pass", "sender.test", policy="reject", record_domain="sender.test")
    field = smtp_in.authentication_results_field(HOSTNAME, None, results, dmarc)
    assert field == ("Authentication-Results: mx.example.com;\r\n"
                     "\tdkim=pass header.d=sender.test header.s=s1 header.b=abcdefgh;\r\n"
                     "\tdmarc=pass header.from=sender.test policy.dmarc=reject\r\n")


@pytest.mark.parametrize("policy", smtp_in.DMARC_POLICIES)
def test_dmarc_policies_are_checked(policy):
    assert smtp_in.check_dmarc_policy(policy) == policy
    with pytest.raises(ValueError, match="dmarc: 'reject' is not one of off, tag, enforce"):
        smtp_in.check_dmarc_policy("reject")


def test_the_newest_key_signs_and_a_new_one_is_read_without_a_restart(tmp_path):
    folder = tmp_path / "dkim" / "example.org"
    folder.mkdir(parents=True)
    old, new = dkim.generate_ed25519_key(), dkim.generate_ed25519_key()
    (folder / "old.key").write_text(dkim.private_key_pem(old))
    os.utime(str(folder / "old.key"), (1000, 1000))
    assert dkim.spool_key(str(tmp_path), "Example.ORG") == ("old", old)
    (folder / "new.key").write_text(dkim.private_key_pem(new))
    assert dkim.spool_key(str(tmp_path), "example.org") == ("new", new)
    assert dkim.spool_key(str(tmp_path), "nokey.example") is None
    (folder / "new.key").write_text("garbage\n")
    with pytest.raises(dkim.DKIMError, match="new.key"):
        dkim.spool_key(str(tmp_path), "example.org")


# --- Signing: submission, sendmail ---

def test_submission_signs_mail_of_a_local_domain_and_dkimpy_and_we_verify_it(
        start_smtp, signing_spool, dns, dkimpy):
    server = start_smtp(submission=True)
    submit(server, TEXT)
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b" d=example.com; s=mail;" in data and b"h=from:from:to:subject:date:message-id" in data
    assert data.endswith(TEXT)
    assert dkimpy.verify(data, dnsfunc=dnsfunc_for(dns))
    assert our_verdict(data, dns) == ["pass"]
    assert our_verdict(data.replace(b"the figures", b"other figures"), dns) == ["fail"]
    # The queue file keeps the message as received: the field is a "prepend" record.
    (name,) = os.listdir(os.path.join(str(signing_spool), "queue", "incoming"))
    with open(os.path.join(str(signing_spool), "queue", "incoming", name), "rb") as f:
        state = mta.parse_queue_file(f.read(), name)
    assert state.prepend.startswith(b"DKIM-Signature:") and data.endswith(TEXT)


def test_mail_whose_from_is_not_local_is_not_signed(start_smtp, signing_spool):
    server = start_smtp(submission=True)
    submit(server, TEXT.replace(b"From: Alice <alice@example.com>", b"From: <alice@other.test>"))
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert b"DKIM-Signature" not in data


def test_dkim_sign_no_sends_unsigned(start_smtp, signing_spool):
    server = start_smtp(submission=True, dkim_sign="no")
    submit(server, TEXT)
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert data.startswith(b"Received: ")


def test_a_broken_key_sends_the_mail_unsigned_with_one_log_line(start_smtp, spool, caplog):
    caplog.set_level(logging.INFO, logger="smtp_in")
    (spool / "dkim" / DOMAIN).mkdir(parents=True)
    (spool / "dkim" / DOMAIN / "broken.key").write_text("-----BEGIN PRIVATE KEY-----\nxx\n")
    server = start_smtp(submission=True)
    submit(server, TEXT)
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert b"DKIM-Signature" not in data
    lines = [r.getMessage() for r in caplog.records if "dkim: cannot sign" in r.getMessage()]
    assert len(lines) == 1 and "broken.key" in lines[0] and "sent unsigned" in lines[0]
    assert not any(r.exc_info for r in caplog.records)


def test_sendmail_signs_mail_of_a_local_domain(signing_spool, dns, dkimpy):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", str(signing_spool),
         "--domain", DOMAIN, "--hostname", HOSTNAME, "sendmail", "-f", ALICE, "bob@example.com"],
        input=TEXT.replace(b"\r\n", b"\n"), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [(_, _, data)] = spool_messages(signing_spool)
    assert data.startswith(b"DKIM-Signature: ") and b"Received: by mx.example.com" in data
    assert dkimpy.verify(data, dnsfunc=dnsfunc_for(dns))
    assert our_verdict(data, dns) == ["pass"]


def test_sendmail_with_dkim_sign_no_does_not_sign(signing_spool):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", str(signing_spool),
         "--domain", DOMAIN, "--dkim-sign", "no", "sendmail", "-f", ALICE, "bob@example.com"],
        input=TEXT, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [(_, _, data)] = spool_messages(signing_spool)
    assert b"DKIM-Signature" not in data


# --- Verifying on the MX ---

def mx(start_smtp, dns, **config):
    settings = {"spf": "tag", "dns": dns.address, "dkim_verify": "yes", "dmarc": "tag"}
    settings.update(config)
    return start_smtp(**settings)


def test_a_good_signature_passes_dkim_and_dmarc_in_one_field_with_spf(start_smtp, dns):
    server = mx(start_smtp, dns)
    data = deliver_mx(server, signed_by_sender(mx_text()))
    fields = header_fields(data)
    # header.b is quoted when "/" or "=" is among its 8 characters (RFC 8601 2.2).
    assert re.fullmatch(r"Authentication-Results: mx\.example\.com;\tspf=pass "
                        r"smtp\.mailfrom=user@sender\.test;\tdkim=pass header\.d=sender\.test "
                        r'header\.s=s1 header\.b=([A-Za-z0-9+]{8}|"[A-Za-z0-9+/=]{8}");'
                        r"\tdmarc=pass header\.from=sender\.test policy\.dmarc=reject",
                        fields[0]), fields[0]
    assert fields[1].startswith("Received-SPF: pass ") and fields[2].startswith("Received: ")
    assert fields[3].startswith("DKIM-Signature: ")
    assert len(our_authentication_results(data)) == 1


def test_a_tampered_message_fails_dkim(start_smtp, dns):
    server = mx(start_smtp, dns)
    data = deliver_mx(server, signed_by_sender(mx_text()).replace(b"Hello.", b"Hello!"))
    (field,) = our_authentication_results(data)
    assert "dkim=fail (" in field and "header.d=sender.test" in field
    assert "dmarc=pass" in field                         # SPF still passes, aligned


@pytest.mark.parametrize("policy", ["tag", "enforce"])
def test_a_forged_from_under_p_reject_is_refused_only_when_enforced(start_smtp, dns, policy,
                                                                    caplog):
    caplog.set_level(logging.INFO, logger="smtp_in")
    server = mx(start_smtp, dns, dmarc=policy)
    text = signed_by_sender(mx_text(author="ceo@strict.test"))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.mail("user@sender.test")
        client.rcpt("bob@example.com")
        code, reply = client.data(text)
        if policy == "enforce":
            assert (code, reply.decode()) == (550, smtp_in.R550_DMARC_REJECT[4:] % "strict.test")
            assert client.noop()[0] == 250               # the session goes on
    queued = spool_messages(server.spool_dir)
    if policy == "enforce":
        assert queued == []
        assert os.listdir(os.path.join(str(server.spool_dir), "queue", "tmp")) == []
        assert any("status=rejected (DMARC policy of strict.test)" in r.getMessage()
                   for r in caplog.records)
    else:
        assert code == 250
        (field,) = our_authentication_results(queued[0][2])
        assert "dkim=pass header.d=sender.test" in field
        assert "dmarc=fail header.from=strict.test policy.dmarc=reject" in field


def test_quarantine_under_enforce_is_marked(start_smtp, dns):
    server = mx(start_smtp, dns, dmarc="enforce")
    data = deliver_mx(server, mx_text(author="someone@quar.test"))
    fields = header_fields(data)
    assert fields[0] == "X-Spam-Flag: YES"
    assert "dmarc=fail header.from=quar.test policy.dmarc=quarantine" in fields[1]
    tagged = mx(start_smtp, dns, dmarc="tag")
    data = deliver_mx(tagged, mx_text(author="someone@quar.test"))
    assert b"X-Spam-Flag" not in data


def test_a_senders_own_x_spam_flag_is_removed_under_enforce_only(start_smtp, dns):
    forged = (b"X-Spam-Flag: NO\r\n"
              b"x-spam-flag :\r\n  NO, folded\r\n") + mx_text(author="someone@plain.test")
    server = mx(start_smtp, dns, dmarc="enforce")
    data = deliver_mx(server, forged)
    assert b"spam-flag" not in data.lower() and b"folded" not in data
    assert b"Subject: inbound" in data                  # the fields after them stay
    data = deliver_mx(server, forged.replace(b"someone@plain.test", b"someone@quar.test"))
    assert [f for f in header_fields(data) if "spam-flag" in f.lower()] == ["X-Spam-Flag: YES"]
    tagged = mx(start_smtp, dns, dmarc="tag")
    assert b"X-Spam-Flag: NO" in deliver_mx(tagged, forged)     # not ours to judge there


def test_spf_off_still_checks_dkim_and_dmarc_with_spf_none(start_smtp, dns):
    server = mx(start_smtp, dns, spf="off")
    data = deliver_mx(server, signed_by_sender(mx_text()))
    (field,) = our_authentication_results(data)
    assert "spf=" not in field and "dkim=pass" in field and "dmarc=pass" in field
    assert not header_fields(data)[2].startswith("Received-SPF")


def test_nothing_checked_adds_no_authentication_results(start_smtp, dns):
    server = mx(start_smtp, dns, spf="off", dkim_verify="no", dmarc="off")
    data = deliver_mx(server, signed_by_sender(mx_text()))
    assert header_fields(data)[0].startswith("Received: ")
    assert our_authentication_results(data) == []


def test_a_silent_nameserver_gives_temperror_and_the_mail_is_accepted_in_time(
        start_smtp, dns, caplog):
    caplog.set_level(logging.INFO, logger="smtp_in")
    dead = DeadNameserver()
    try:
        server = start_smtp(spf="off", dns=dead.address, dkim_verify="yes", dmarc="enforce",
                            dkim_timeout=DNS_BUDGET)
        started = time.monotonic()
        data = deliver_mx(server, signed_by_sender(mx_text()))
        elapsed = time.monotonic() - started
        assert dead.questions() >= 1
    finally:
        dead.sock.close()
    assert elapsed < DNS_BUDGET + SLACK                 # not dkim.DEFAULT_TIMEOUT's 10 s
    (field,) = our_authentication_results(data)
    assert "dkim=temperror" in field and "dmarc=temperror" in field
    assert any(", dkim=temperror, dmarc=temperror" in r.getMessage() for r in caplog.records)


def test_forged_authentication_results_claiming_our_name_are_removed(start_smtp, dns):
    server = mx(start_smtp, dns)
    forged = (b"Authentication-Results: mx.example.com; dkim=pass header.d=strict.test;"
              b" dmarc=pass\r\n" + mx_text(author="ceo@strict.test"))
    data = deliver_mx(server, forged)
    (field,) = our_authentication_results(data)
    assert field == header_fields(data)[0]
    assert "dkim=none" in field and "dmarc=fail" in field and b"dmarc=pass" not in data


def test_the_mx_does_not_verify_mail_of_authenticated_users(start_smtp, signing_spool, dns):
    server = mx(start_smtp, dns, submission=True)
    submit(server, TEXT)
    [(_, _, data)] = spool_messages(server.spool_dir)
    assert our_authentication_results(data) == [] and data.startswith(b"DKIM-Signature")


# --- run_all: submission signs, POP3 reads it back ---

def test_run_all_signs_submitted_mail_that_pop3_returns_verifiable(tmp_path, keys, dns, dkimpy):
    spool = tmp_path / "spool"
    store = mailbox_store.Store(str(spool), [DOMAIN], HOSTNAME)
    store.add_user(ALICE, USERS[ALICE])
    store.add_user("bob@example.com", USERS["bob@example.com"])
    shutil.copytree(str(keys[0]), str(spool / "dkim"))
    smtp, submission, pop3 = free_ports(3)
    log_path = tmp_path / "run_all.log"
    with open(str(log_path), "wb") as log:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run_all.py"), "--spool", str(spool),
             "--domain", DOMAIN, "--hostname", HOSTNAME, "--dns", dns.address,
             "--smtp", "127.0.0.1:%d" % smtp, "--submission", "127.0.0.1:%d" % submission,
             "--pop3", "127.0.0.1:%d" % pop3, "--dmarc", "enforce"],
            cwd=str(tmp_path), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        wait_for(lambda: "Next steps:" in log_path.read_text(errors="replace"), 20,
                 "run_all's listeners")
        with smtplib.SMTP("127.0.0.1", submission, timeout=10) as client:
            client.login(ALICE, USERS[ALICE])
            client.sendmail(ALICE, ["bob@example.com"], TEXT)

        def fetched():
            pop = poplib.POP3("127.0.0.1", pop3, timeout=10)
            try:
                pop.user("bob@example.com")
                pop.pass_(USERS["bob@example.com"])
                count, _ = pop.stat()
                return b"\r\n".join(pop.retr(1)[1]) + b"\r\n" if count else None
            finally:
                pop.quit()
        data = wait_for(fetched, 20, "the message in bob's mailbox")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text
    signed = data[data.index(b"DKIM-Signature:"):]
    assert dkimpy.verify(signed, dnsfunc=dnsfunc_for(dns))
    assert our_verdict(signed, dns) == ["pass"]
