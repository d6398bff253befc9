"""Past one host: two MX hosts on one shared mailbox store, and a backup MX, end to end.

Hosts A (127.0.0.2) and B (127.0.0.3) each run a complete run_all.py on a spool of their
own, and share one store folder (users, aliases, mail/), as two hosts share an NFS mount.
dnsmasq publishes shared.test with two MX records of equal preference, one per host. Host S
(127.0.0.4) is the sender: its own run_all.py, whose smtp_out finds shared.test's MX hosts
through dnsmasq; so does a real Postfix, in a mount namespace whose /etc/resolv.conf
names a dnsmasq of its own. B is also the backup MX (preference 20) of backup.test, whose
primary P (127.0.0.5) starts only once B has held its mail for a while.
"""

import email
import email.parser
import importlib.util
import os
import poplib
import random
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage

import pytest

from hosts_support import PASSWORD, Host
from support import ROOT, free_port, require_tool, wait_for
from dnsmasq_server import host_record, mx_host, start_dnsmasq

import mailbox_store
import mta
import pop3d
import smtp_in

LOAD = 200                 # messages the sender sends to the shared store in the main run
KILL_AFTER = 50            # delivered messages before host B is killed
# S's smtp_out sessions at once. Killing B may cost one duplicate per session of S's to B
# at that moment (RFC 5321 6.1, RFC 1047): B had the message on disk but its 250 was lost
# with it, so S sent the message again, through A. B's own router never delivers one twice.
SENDER_SESSIONS = 8
DELIVERY_WAIT = 60.0       # seconds the whole load may take to arrive
SETTINGS = """\
[DEFAULT]
delay_warning = 3
[mta]
scan_interval = 1
[smtp_out]
poll_interval = 1
max_connections = %d
""" % SENDER_SESSIONS
FAST_RETRIES = ["--retry-schedule", "2s"]


def log_count(host, recipient, status):
    """Lines of host's log with a result of status for recipient."""
    return sum(1 for line in host.log().splitlines()
               if "to=<%s>" % recipient in line and "status=%s " % status in line)


def maildir_subjects(store, address):
    """The Subject of every message in address's Maildir (new/ and cur/) of store."""
    local, domain = address.split("@")
    maildir = os.path.join(store, "mail", domain, local, "Maildir")
    subjects = []
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(maildir, sub))
        except FileNotFoundError:
            continue
        for name in names:
            try:
                with open(os.path.join(maildir, sub, name), "rb") as f:
                    subjects.append(email.message_from_binary_file(f)["Subject"])
            except FileNotFoundError:
                continue               # moved to cur/ meanwhile; seen on the next look
    return subjects


def maildir_copies(store, address):
    """(Subject, accepting host, its queue id) of every message in address's Maildir, from
    the Received: field the accepting host's smtp_in put on top."""
    local, domain = address.split("@")
    maildir = os.path.join(store, "mail", domain, local, "Maildir")
    copies = []
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(maildir, sub)):
            with open(os.path.join(maildir, sub, name), "rb") as f:
                header = email.parser.BytesHeaderParser().parse(f)
            received = " ".join(header["Received"].split())
            by = re.search(r" by (\S+) with \S+ id (\w+)", received)
            copies.append((header["Subject"], by.group(1), by.group(2)))
    return copies


def new_message(sender, recipient, subject):
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message.set_content("A message for a store two hosts share.\n")
    return message


def submit(host, sender, recipient, subjects):
    """Send one message per subject through host's submission port, on one connection."""
    with smtplib.SMTP(host.ip, host.submission_port, timeout=30) as client:
        client.login(sender, PASSWORD)
        for subject in subjects:
            client.send_message(new_message(sender, recipient, subject))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """dnsmasq, hosts A and B on one store, the sender S; P (backup.test) made, not started."""
    require_tool("dnsmasq", "dnsmasq-base")
    tmp_path = tmp_path_factory.mktemp("multihost")
    mx_port = free_port("127.0.0.2")
    records = [
        mx_host("shared.test", "mx-a.shared.test", 10),
        mx_host("shared.test", "mx-b.shared.test", 10),
        host_record("mx-a.shared.test", "127.0.0.2"),
        host_record("mx-b.shared.test", "127.0.0.3"),
        mx_host("sender.test", "mail.sender.test", 10),
        host_record("mail.sender.test", "127.0.0.4"),
        mx_host("backup.test", "primary.backup.test", 10),
        mx_host("backup.test", "mx-b.shared.test", 20),
        host_record("primary.backup.test", "127.0.0.5"),
    ]
    store = str(tmp_path / "store")
    with start_dnsmasq(records) as dns:
        options = dict(settings=SETTINGS, extra=FAST_RETRIES)
        host_a = Host(tmp_path, "A", "127.0.0.2", ["shared.test"], dns.address, mx_port,
                      hostname="mx-a.shared.test", store=store, **options)
        host_b = Host(tmp_path, "B", "127.0.0.3", ["shared.test"], dns.address, mx_port,
                      hostname="mx-b.shared.test", store=store, settings=SETTINGS,
                      extra=FAST_RETRIES + ["--relay-domain", "backup.test"])
        sender = Host(tmp_path, "S", "127.0.0.4", ["sender.test"], dns.address, mx_port,
                      **options)
        primary = Host(tmp_path, "P", "127.0.0.5", ["backup.test"], dns.address, mx_port,
                       hostname="primary.backup.test", **options)
        for address in ("crowd@shared.test", "reader@shared.test", "waiting@shared.test"):
            host_a.add_user(address)
        sender.add_user("sender@sender.test")
        primary.add_user("owner@backup.test")
        hosts = (host_a, host_b, sender)
        try:
            for host in hosts:
                host.start()
            yield host_a, host_b, sender, primary
        finally:
            for host in hosts + (primary,):
                host.stop()


def test_two_hosts_share_one_store_and_a_killed_host_loses_nothing(cluster):
    host_a, host_b, sender, _ = cluster
    subjects = ["load %03d" % n for n in range(LOAD)]
    first, second = subjects[:LOAD * 3 // 5], subjects[LOAD * 3 // 5:]
    submit(sender, "sender@sender.test", "crowd@shared.test", first)
    wait_for(lambda: len(maildir_subjects(host_a.store, "crowd@shared.test")) >= KILL_AFTER,
             DELIVERY_WAIT, "the first deliveries")
    host_b.kill()              # kill -9 in the middle of the run
    held = sum(len(os.listdir(os.path.join(host_b.spool, "queue", folder)))
               for folder in ("incoming", "deferred"))
    submit(sender, "sender@sender.test", "crowd@shared.test", second)
    time.sleep(2)              # B stays down a while: S's sessions to it fail meanwhile
    host_b.start()             # its queue holds what it acknowledged before it died
    wait_for(lambda: set(maildir_subjects(host_a.store, "crowd@shared.test")) >= set(subjects),
             DELIVERY_WAIT, "every message in the one Maildir")
    wait_for(lambda: all(host.queue_is_empty() for host in (sender, host_a, host_b)),
             DELIVERY_WAIT, "every queue empty: no copy is still on its way")
    copies = maildir_copies(host_a.store, "crowd@shared.test")
    found = [subject for subject, _, _ in copies]
    # A message twice under one queue id: a host's router delivered it twice. Twice under
    # two: the sender sent it twice, its first 250 lost with the killed host (RFC 5321 6.1).
    redelivered = len(copies) - len({(host, queue_id) for _, host, queue_id in copies})
    resent = len({(subject, host, queue_id) for subject, host, queue_id in copies}) - len(set(found))
    a_took = log_count(host_a, "crowd@shared.test", "delivered")
    b_took = log_count(host_b, "crowd@shared.test", "delivered")
    print("multihost: sent %d, delivered %d, distinct %d; duplicates: %d sent again after "
          "a lost 250, %d delivered twice by one router; A %d, B %d; left in B's queue by the "
          "kill %d" % (LOAD, len(found), len(set(found)), resent, redelivered, a_took, b_took,
                       held))
    assert set(found) == set(subjects)
    assert redelivered == 0
    assert resent <= SENDER_SESSIONS
    assert a_took > 0 and b_took > 0, "both MX hosts of equal preference took some"
    assert host_a.uidls("crowd@shared.test") == host_b.uidls("crowd@shared.test")
    assert len(host_a.uidls("crowd@shared.test")) == len(found)


def send_direct(host, recipient, subjects):
    with smtplib.SMTP(host.ip, host.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        for subject in subjects:
            client.send_message(new_message("someone@elsewhere.test", recipient, subject))


def test_pop3_sessions_on_either_host_see_one_maildrop(cluster):
    host_a, host_b, _, _ = cluster
    send_direct(host_a, "reader@shared.test", ["one", "two"])
    send_direct(host_b, "reader@shared.test", ["three"])
    wait_for(lambda: len(maildir_subjects(host_a.store, "reader@shared.test")) == 3, 20,
             "three messages")
    holder = host_a.pop3("reader@shared.test")
    try:
        with pytest.raises(poplib.error_proto) as refused:
            host_b.pop3("reader@shared.test")
        assert b"[IN-USE]" in refused.value.args[0]
    finally:
        holder.quit()
    uidls = host_a.uidls("reader@shared.test")
    assert uidls == host_b.uidls("reader@shared.test")
    client = host_b.pop3("reader@shared.test")
    client.dele(1)
    client.quit()
    assert host_a.uidls("reader@shared.test") == uidls[1:]
    # A user added on A logs in on B at once: the users file is read again when it changes.
    host_a.add_user("newcomer@shared.test")
    assert host_b.uidls("newcomer@shared.test") == []


def test_a_killed_pop3_session_frees_the_maildrop_for_the_other_host(cluster, tmp_path):
    host_a, host_b, _, _ = cluster
    script = ("import mailbox_store, sys, time\n"
              "box = mailbox_store.Store(sys.argv[1]).open_mailbox('reader@shared.test')\n"
              "print('locked', flush=True)\n"
              "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, host_a.store], cwd=ROOT,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(poplib.error_proto) as refused:
            host_b.pop3("reader@shared.test")
        assert b"[IN-USE]" in refused.value.args[0]
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
    host_b.pop3("reader@shared.test").quit()


def test_mail_waits_in_the_local_queue_while_the_store_is_away(cluster):
    host_a, _, _, _ = cluster
    mail = os.path.join(host_a.store, "mail")
    users = os.path.join(host_a.store, "users")
    # The mail folder becomes a file: no Maildir can be made or written, even by root.
    os.makedirs(mail, exist_ok=True)
    os.rename(mail, mail + ".away")
    try:
        with open(mail, "w") as f:
            f.write("not a folder\n")
        send_direct(host_a, "waiting@shared.test", ["queued %d" % n for n in range(5)])
        wait_for(lambda: log_count(host_a, "waiting@shared.test", "deferred") >= 5, 20,
                 "five deferred deliveries")
        # The whole store gone (an unmounted NFS share): recipients get 4xx, not 5xx.
        os.rename(users, users + ".away")
        try:
            with smtplib.SMTP(host_a.ip, host_a.smtp_port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail("someone@elsewhere.test")
                code, reply = client.rcpt("waiting@shared.test")
                assert code == 451, reply
                assert reply.decode() in smtp_in.R451_STORE_UNAVAILABLE % "waiting@shared.test"
            with pytest.raises(poplib.error_proto) as refused:
                host_a.pop3("waiting@shared.test")
            assert refused.value.args[0].decode() == pop3d.ERR_STORE_UNAVAILABLE
        finally:
            os.rename(users + ".away", users)
    finally:
        if os.path.isfile(mail):
            os.unlink(mail)
        os.rename(mail + ".away", mail)
    assert maildir_subjects(host_a.store, "waiting@shared.test") == []
    host_a.mta("flush")
    wait_for(lambda: len(maildir_subjects(host_a.store, "waiting@shared.test")) >= 5, 20,
             "the queued messages")
    wait_for(host_a.queue_is_empty, 20, "A's queue empty: nothing more on its way")
    found = maildir_subjects(host_a.store, "waiting@shared.test")
    assert sorted(found) == ["queued %d" % n for n in range(5)]


def test_backup_mx_keeps_the_mail_until_the_primary_returns(cluster):
    _, host_b, sender, primary = cluster
    subjects = ["held %d" % n for n in range(5)]
    submit(sender, "sender@sender.test", "owner@backup.test", subjects)
    # The primary is down: S gives the mail to B, the backup, which holds it.
    wait_for(lambda: log_count(host_b, "owner@backup.test", "queued") >= 5, 20,
             "the backup MX taking the mail")
    wait_for(lambda: any("delayed" in s.lower() for s in
                         maildir_subjects(sender.store, "sender@sender.test")), 30,
             "a delay notice to the sender")
    assert not os.path.exists(os.path.join(host_b.store, "mail", "backup.test"))
    primary.start()
    wait_for(lambda: len(maildir_subjects(primary.store, "owner@backup.test")) >= 5, 30,
             "the held mail at the primary")
    wait_for(lambda: all(host.queue_is_empty() for host in (sender, host_b)), 30,
             "the sender's and the backup's queues empty: nothing more on its way")
    assert sorted(maildir_subjects(primary.store, "owner@backup.test")) == subjects
    assert "loops back to myself" not in host_b.log()


# --- The backup MX's policy, without the network ---

def test_backup_mx_refuses_unknown_recipients_when_its_store_knows_the_domain(tmp_path):
    store = mailbox_store.Store(str(tmp_path))
    store.add_user("known@backup.test", PASSWORD)
    server = smtp_in.SMTPServer(("127.0.0.1", 0), {"spool": str(tmp_path / "spool"),
                                                   "store": str(tmp_path),
                                                   "domain": ["here.test"],
                                                   "relay_domain": ["backup.test", "other.test"]})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with smtplib.SMTP(*server.server_address, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("someone@elsewhere.test")
            assert client.rcpt("known@backup.test")[0] == 250
            assert client.rcpt("nobody@backup.test")[0] == 550
            assert client.rcpt("anyone@other.test")[0] == 250     # cannot know: takes all
            assert client.rcpt("someone@third.test")[0] == 554    # still no open relay
    finally:
        server.shutdown()
        server.server_close()


def test_router_sends_relay_domain_mail_on_even_when_the_store_knows_the_users(tmp_path):
    store = mailbox_store.Store(str(tmp_path))
    store.add_user("known@backup.test", PASSWORD)
    router = mta.Router(mta.Queue(str(tmp_path)), store, relay_domains=["Backup.Test."])
    assert router.resolve("known@backup.test", 1, set()) == [("remote", "known@backup.test", "")]


# --- A real Postfix as the sender ---

def load_peers():
    """bench/peers.py, which knows how to run a private Postfix instance (and imports
    bench/pidfile.py)."""
    bench = os.path.join(ROOT, "bench")
    spec = importlib.util.spec_from_file_location("bench_peers", os.path.join(bench, "peers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, bench)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(bench)
    return module


def start_dns_on_port_53(records):
    """dnsmasq serving records on port 53 of a loopback address of its own (127.53.X.Y; a
    resolv.conf names a server without a port), with its queries logged."""
    failure = None
    for _ in range(5):
        address = "127.53.%d.%d" % (random.randint(1, 254), random.randint(1, 254))
        try:
            return start_dnsmasq(records, host=address, port=53, log_queries=True)
        except RuntimeError as exc:            # the address is taken: another one
            failure = exc
    raise failure


def test_postfix_delivers_through_both_hosts_into_the_one_store(cluster):
    """Postfix finds shared.test's two MX hosts of equal preference in DNS, as any sender
    would, and spreads its mail over them (RFC 5321 5.1). It asks only the system resolver:
    it runs in a mount namespace of its own whose /etc/resolv.conf names a dnsmasq on
    127.53.X.Y:53, which nothing outside the namespace sees. relayhost shared.test:PORT
    (no brackets) looks up MX records and connects to each MX host on PORT, the one port
    both hosts listen on."""
    if os.geteuid() != 0:
        pytest.skip("needs root: Postfix drops to its own users, and its mount namespace "
                    "(unshare, mount --bind) needs root too (CI runs as root)")
    require_tool("postfix", "postfix")
    require_tool("unshare", "util-linux")
    require_tool("mount", "mount")
    host_a, host_b, _, _ = cluster
    peers = load_peers()
    if peers.missing("postfix"):
        pytest.skip(peers.missing("postfix"))
    host_a.add_user("postfix@shared.test")
    # Postfix's own users must reach its folders: pytest's tmp_path is closed to them.
    workdir = tempfile.mkdtemp(prefix="multihost-postfix-")
    os.chmod(workdir, 0o755)
    subjects = ["postfix %02d" % n for n in range(40)]
    records = [mx_host("shared.test", "mx-a.shared.test", 10),
               mx_host("shared.test", "mx-b.shared.test", 10),
               host_record("mx-a.shared.test", host_a.ip),
               host_record("mx-b.shared.test", host_b.ip)]
    try:
        with start_dns_on_port_53(records) as dns:
            resolv_conf = os.path.join(workdir, "resolv.conf")
            with open(resolv_conf, "w") as f:
                f.write("nameserver %s\noptions timeout:2 attempts:2\n" % dns.host)
            os.chmod(resolv_conf, 0o644)
            postfix = peers.Postfix(workdir, resolv_conf=resolv_conf)
            postfix.settings({"relayhost": "shared.test:%d" % host_a.smtp_port,
                              "relay_transport": "smtp", "default_transport": "smtp",
                              "smtp_helo_name": "postfix.sender.test",
                              # A new connection, and a new random pick, for each message.
                              "smtp_connection_cache_on_demand": "no"})
            try:
                postfix.start()
                with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
                    for subject in subjects:
                        client.send_message(new_message("someone@sender.test",
                                                        "postfix@shared.test", subject))
                wait_for(lambda: len(maildir_subjects(host_a.store, "postfix@shared.test")) >= 40,
                         40, "Postfix's messages")
            finally:
                postfix.stop()
            queries = dns.log()
            with open(os.path.join(workdir, "postfix.log"), errors="replace") as f:
                postfix_log = f.read()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wait_for(lambda: host_a.queue_is_empty() and host_b.queue_is_empty(), 20,
             "both hosts' queues empty: nothing more on its way")
    assert "query[MX] shared.test" in queries
    for host in (host_a, host_b):
        assert "relay=%s[%s]:%d" % (host.hostname, host.ip, host.smtp_port) in postfix_log
    found = maildir_subjects(host_a.store, "postfix@shared.test")
    assert sorted(found) == subjects
    assert log_count(host_a, "postfix@shared.test", "delivered") > 0
    assert log_count(host_b, "postfix@shared.test", "delivered") > 0
    assert host_a.uidls("postfix@shared.test") == host_b.uidls("postfix@shared.test")


def test_an_alias_into_a_relay_domain_is_sent_on_too(tmp_path):
    store = mailbox_store.Store(str(tmp_path), ["here.test"])
    store.add_user("known@backup.test", PASSWORD)
    store.add_alias("team@here.test", ["known@backup.test"])
    router = mta.Router(mta.Queue(str(tmp_path)), store, relay_domains=["backup.test"])
    assert router.resolve("team@here.test", 1, set()) == [("remote", "known@backup.test", "")]


def test_maildir_names_carry_each_hosts_name(tmp_path):
    """Two hosts on one store, even with the same pid, never pick the same name."""
    mailbox_store.Store(str(tmp_path)).add_user("user@shared.test", PASSWORD)
    names = set()
    for hostname in ("mx-a.shared.test", "mx-b.shared.test"):
        store = mailbox_store.Store(str(tmp_path), ["shared.test"], hostname)
        path = store.deliver("user@shared.test", b"Subject: x\r\n\r\nbody\r\n", "a@b.test")
        assert os.path.basename(path).split(",")[0].endswith("." + hostname)
        names.add(os.path.basename(path))
    assert len(names) == 2


# --- The store's locks ---

@pytest.mark.parametrize("ofd", [True, False], ids=["ofd", "flock-fallback"])
def test_lock_file_conflicts_between_two_opens_and_frees_on_close(tmp_path, monkeypatch, ofd):
    if not ofd:
        monkeypatch.setattr(mailbox_store, "_OFD_SETLK", None)
    elif mailbox_store._OFD_SETLK is None:
        pytest.skip("no open file description locks here")
    path = str(tmp_path / "maildrop.lock")
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    second = os.open(path, os.O_RDWR)
    try:
        assert mailbox_store.lock_file(first)
        assert not mailbox_store.lock_file(second)     # same process, another open file
        os.close(first)
        first = None
        assert mailbox_store.lock_file(second)
    finally:
        for fd in (first, second):
            if fd is not None:
                os.close(fd)


def test_the_maildrop_lock_is_a_posix_lock_other_hosts_see(tmp_path):
    """What an NFS client passes to the server is a POSIX (fcntl) lock: a lockf() probe from
    another process sees the maildrop lock, as a flock() probe would not on NFS."""
    if mailbox_store._OFD_SETLK is None:
        pytest.skip("no open file description locks here")
    store = mailbox_store.Store(str(tmp_path), ["shared.test"])
    store.add_user("user@shared.test", PASSWORD)
    probe = ("import fcntl, sys\n"
             "fd = open(sys.argv[1], 'r+')\n"
             "try:\n"
             "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError:\n"
             "    print('held')\n"
             "else:\n"
             "    print('free')\n")
    lock_path = os.path.join(os.path.dirname(store.maildir_path("user@shared.test")),
                             "maildrop.lock")
    with store.open_mailbox("user@shared.test"):
        held = subprocess.run([sys.executable, "-c", probe, lock_path], capture_output=True,
                              text=True, timeout=30)
    free = subprocess.run([sys.executable, "-c", probe, lock_path], capture_output=True,
                          text=True, timeout=30)
    assert (held.stdout.strip(), free.stdout.strip()) == ("held", "free")
