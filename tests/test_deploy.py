"""Deployed as an operator deploys it: started as root with --user, one config file, admin
tools run as root, signals.

These tests need root (CI runs as root): run_all binds as root, every role becomes the
user, and whatever anyone writes under the spool must end up the user's. The spool lives
in a folder of its own under /tmp that the user may pass through.
"""

import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import textwrap

import pytest

import plumbing
from support import ROOT, children_of, free_port, free_ports, require_tool, wait_for

USER = "nobody"
DOMAIN = "example.com"
PASSWORD = "s3cret-pass"
ALICE = "alice@" + DOMAIN
NO_DNS = "127.0.0.254"     # SPF, DKIM and DMARC ask here, where nothing answers: no lookup
                           # leaves the machine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: run_all --user drops "
                                "privileges only when started as root (CI runs as root)")


def tool(*argv, stdin=b"", env=None):
    """Run a role file as root, the way an operator types it."""
    return subprocess.run([sys.executable] + list(argv), cwd=ROOT, input=stdin,
                          capture_output=True, timeout=60, env=env)


class Deployment:
    """run_all.py started as root with --user nobody and a config file, in its own group."""

    def __init__(self, base, config_text, *extra, ports=None):
        self.base = base
        self.spool = os.path.join(base, "spool")
        self.smtp, self.submission, self.pop3 = ports or free_ports(3)
        self.config = os.path.join(base, "mail.ini")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(base, "run_all.log")
        self.argv = [sys.executable, os.path.join(ROOT, "run_all.py"), "--config", self.config,
                     "--spool", self.spool, "--smtp", "127.0.0.1:%d" % self.smtp,
                     "--submission", "127.0.0.1:%d" % self.submission,
                     "--pop3", "127.0.0.1:%d" % self.pop3, "--user", USER, "--cpus", "none",
                     "--dns", NO_DNS]
        self.argv += list(extra)
        self.process = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.base, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_for_log("Next steps:")

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, text, seconds=20.0, count=1):
        wait_for(lambda: self.log().count(text) >= count, seconds, repr(text) + " in the log")

    def child_pids(self):
        """{role: pid} of the children running now, from run_all's "started" lines."""
        pids = {}
        for line in self.log().splitlines():
            if "]: started " in line and ", pid=" in line:
                name = line.split("]: started ", 1)[1].split(",")[0]
                pids[name] = int(line.rsplit("=", 1)[1])
        return pids

    def stop(self):
        lines = [line for line in self.log().splitlines()
                 if "pop3d[" not in line and "config:" not in line]
        print("\n".join(lines[-200:]))    # shown by pytest when the test failed
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        for pid in self.child_pids().values():     # a child left behind fails a test; end it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None


@pytest.fixture
def base():
    """A folder under /tmp that the user may pass through (pytest's own tmp_path is 0700)."""
    folder = tempfile.mkdtemp(prefix="mail-deploy-")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def process_uid(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line for pid %d" % pid)


def not_owned_by(spool, uid):
    """Every path under spool (itself included) that does not belong to uid."""
    wrong = []
    for folder, dirs, files in os.walk(spool):
        for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            st = os.lstat(path)
            if st.st_uid != uid:
                wrong.append("%s (uid %d, mode %o)" % (path, st.st_uid, st.st_mode & 0o7777))
    return wrong


def pop3_count(port, user=ALICE):
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        return client.stat()[0]
    finally:
        client.quit()


def pop3_messages(port, user=ALICE, password=PASSWORD):
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(user)
        client.pass_(password)
        count = client.stat()[0]
        return [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
    finally:
        client.quit()


def test_a_day_in_the_life_leaves_every_process_and_file_to_the_user(base):
    ports = free_ports(4)
    closed = ports.pop()            # the remote relay: nothing listens there, mail defers
    deployment = Deployment(base, "\n".join([
        "[DEFAULT]",
        "domain = %s" % DOMAIN,
        "hostname = mail.%s" % DOMAIN,
        "[smtp_in]",
        "max_recipients = 7",
        "[smtp_out]",
        "relay_host = 127.0.0.1:%d" % closed,
        "relay_tls = none",
        ""]), ports=ports)
    nobody = pwd.getpwnam(USER).pw_uid
    deployment.start()
    try:
        pids = deployment.child_pids()
        assert set(pids) == {"smtp_in", "submission", "mta", "smtp_out", "pop3d"}
        for name, pid in pids.items():
            # mta has no listener for run_all to wait for: it may still be dropping root.
            wait_for(lambda: process_uid(pid) == nobody, 10, "%s running as %s" % (name, USER))
        per_role = plumbing.worker_processes({})      # auto: one per CPU; 1: no workers

        def workers():
            found = [pid for name in ("smtp_in", "submission", "pop3d")
                     for pid in children_of(pids[name])]
            return (found,) if len(found) == (3 * per_role if per_role > 1 else 0) else None
        (found,) = wait_for(workers, 10, "the workers of smtp_in, submission and pop3d")
        for pid in found:              # forked after the master dropped root
            assert process_uid(pid) == nobody, "worker %d" % pid
        spool = deployment.spool

        # The admin tools, as root, as the README shows them.
        result = tool("mailbox_store.py", "--spool", spool, "add-user", ALICE,
                      stdin=(PASSWORD + "\n").encode())
        assert result.returncode == 0, result.stderr
        result = tool("mailbox_store.py", "add-alias", "postmaster", ALICE, "--spool", spool)
        assert result.returncode == 0, result.stderr

        # Inbound over SMTP, past the recipient limit of the config file's [smtp_in].
        with smtplib.SMTP("127.0.0.1", deployment.smtp, timeout=10) as client:
            client.ehlo("client.example.org")
            client.mail("friend@example.org")
            for n in range(7):
                assert client.rcpt("alice+%d@%s" % (n, DOMAIN))[0] == 250
            assert client.rcpt("alice+7@" + DOMAIN)[0] == 452
            code, _ = client.data(b"Subject: inbound\r\n\r\nhello\r\n")
            assert code == 250

        # Submission with AUTH: one local, one remote recipient (deferred: nothing listens).
        with smtplib.SMTP("127.0.0.1", deployment.submission, timeout=10) as client:
            client.login(ALICE, PASSWORD)
            client.sendmail(ALICE, [ALICE, "someone@remote.test"],
                            b"Subject: submitted\r\n\r\nvia 587\r\n")

        # sendmail as root: a bare name gets the local domain; an unknown user bounces.
        result = tool("mta.py", "--spool", spool, "sendmail", "alice",
                      stdin=b"Subject: from cron\n\nroot's mail\n")
        assert result.returncode == 0, result.stderr
        result = tool("mta.py", "sendmail", "-f", ALICE, "--spool", spool, "no-such-user",
                      stdin=b"Subject: to nobody\n\nbounce me\n")
        assert result.returncode == 0, result.stderr

        wait_for(lambda: pop3_count(deployment.pop3) >= 4, 30, "four messages for alice")
        messages = pop3_messages(deployment.pop3)
        subjects = b"\n".join(messages)
        for subject in (b"Subject: inbound", b"Subject: submitted", b"Subject: from cron",
                        b"Undelivered Mail Returned to Sender"):
            assert subject in subjects
        bounce = next(m for m in messages if b"Undelivered Mail" in m)
        assert b"no-such-user@example.com" in bounce

        # The remote message waits; the admin deletes it as root.
        def deferred_id():
            listing = tool("mta.py", "--spool", spool, "queue").stdout.decode()
            for line in listing.splitlines():
                if line and line[0].isalnum() and "deferred" in line:
                    return line.split()[0]
            return None
        wait_for(lambda: deferred_id() is not None, 30, "the remote message to be deferred")
        queue_id = deferred_id()
        result = tool("mta.py", "--spool", spool, "flush")
        assert result.returncode == 0 and b"1 deferred message flushed" in result.stdout, result
        wait_for(lambda: deferred_id() is not None, 30, "the flushed message to be deferred again")
        result = tool("mta.py", "--spool", spool, "delete", queue_id)
        assert result.returncode == 0 and b"1 message deleted" in result.stdout, result.stderr
        assert b"Mail queue is empty" in tool("mta.py", "--spool", spool, "queue").stdout

        result = tool("mailbox_store.py", "passwd", ALICE, "--spool", spool,
                      stdin=b"another-pass\n")
        assert result.returncode == 0, result.stderr
        assert pop3_messages(deployment.pop3, ALICE, "another-pass")

        wrong = not_owned_by(spool, nobody)
        assert not wrong, wrong
        assert oct(os.stat(os.path.join(spool, "users")).st_mode & 0o777) == "0o600"
        assert "quarantined" not in deployment.log()
        assert "Traceback" not in deployment.log()
    finally:
        deployment.stop()


def make_certificate(folder, name):
    openssl = require_tool("openssl")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=" + name, "-keyout", key + ".new", "-out", cert + ".new"],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key + ".new", 0o600)                  # root's alone, as an ACME client leaves it
    os.replace(key + ".new", key)
    os.replace(cert + ".new", cert)
    return cert, key


def peer_name(client):
    der = client.sock.getpeercert(binary_form=True)
    pem = ssl.DER_cert_to_PEM_cert(der)
    decoded = subprocess.run([require_tool("openssl"), "x509", "-noout", "-subject"],
                             input=pem.encode(), capture_output=True, check=True).stdout
    return decoded.decode().strip()


def starttls_client(port):
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    return client


def test_sighup_loads_a_renewed_certificate_and_changed_settings(base):
    tls = os.path.join(base, "tls")
    os.mkdir(tls, 0o700)                           # closed to the user, as /etc/letsencrypt
    cert, key = make_certificate(tls, "old.example.com")
    deployment = Deployment(base, "[DEFAULT]\ndomain = %s\n[smtp_in]\nmax_recipients = 7\n"
                            % DOMAIN, "--tls-cert", cert, "--tls-key", key)
    deployment.start()
    try:
        before = deployment.child_pids()
        old_session = starttls_client(deployment.smtp)
        assert "old.example.com" in peer_name(old_session)

        make_certificate(tls, "new.example.com")
        os.kill(deployment.process.pid, signal.SIGHUP)
        deployment.wait_for_log("reload: TLS certificate", count=3)   # smtp_in, submission, pop3d
        new_session = starttls_client(deployment.smtp)
        assert "new.example.com" in peer_name(new_session)
        assert old_session.noop()[0] == 250        # a session begun before is not cut
        old_session.quit()
        new_session.quit()
        assert deployment.child_pids() == before   # nothing restarted for a certificate

        with open(deployment.config, "w") as f:
            f.write("[DEFAULT]\ndomain = %s\n[smtp_in]\nmax_recipients = 2\n" % DOMAIN)
        os.kill(deployment.process.pid, signal.SIGHUP)
        deployment.wait_for_log("reload: restarting smtp_in")
        deployment.wait_for_log("]: started smtp_in", count=2)
        after = deployment.child_pids()
        assert after["smtp_in"] != before["smtp_in"] and after["mta"] == before["mta"]

        result = tool("mailbox_store.py", "--spool", deployment.spool, "add-user", ALICE,
                      stdin=(PASSWORD + "\n").encode())
        assert result.returncode == 0, result.stderr

        def limit_applies():
            try:
                with smtplib.SMTP("127.0.0.1", deployment.smtp, timeout=10) as client:
                    client.ehlo("client.example.org")
                    client.mail("friend@example.org")
                    assert client.rcpt("alice+1@" + DOMAIN)[0] == 250
                    assert client.rcpt("alice+2@" + DOMAIN)[0] == 250
                    return client.rcpt("alice+3@" + DOMAIN)[0] == 452
            except (OSError, smtplib.SMTPException):
                return False
        wait_for(limit_applies, 20, "max_recipients = 2 after the reload")
        assert process_uid(after["smtp_in"]) == pwd.getpwnam(USER).pw_uid
    finally:
        deployment.stop()


def test_a_bad_config_on_sighup_keeps_the_running_one(base):
    deployment = Deployment(base, "[DEFAULT]\ndomain = %s\n" % DOMAIN)
    deployment.start()
    try:
        before = deployment.child_pids()
        with open(deployment.config, "w") as f:
            f.write("[smtp_in]\nmax_recipientz = 2\n")
        os.kill(deployment.process.pid, signal.SIGHUP)
        deployment.wait_for_log("reload: keeping the running configuration")
        assert "max_recipientz: no such setting" in deployment.log()
        assert deployment.child_pids() == before and deployment.process.poll() is None
    finally:
        deployment.stop()


def test_a_user_that_cannot_reach_the_spool_is_refused_at_check():
    closed = tempfile.mkdtemp(prefix="mail-closed-")      # 0700: nobody cannot pass
    try:
        result = tool("run_all.py", "--check", "--spool", os.path.join(closed, "spool"),
                      "--user", USER, "--smtp", "127.0.0.1:%d" % free_port(),
                      "--submission", "", "--pop3", "")
        assert result.returncode == 1
        assert b"user nobody cannot reach" in result.stderr
        result = tool("run_all.py", "--check", "--spool", os.path.join(closed, "spool"),
                      "--user", "no-such-user-here", "--smtp", "", "--submission", "", "--pop3", "")
        assert result.returncode == 1 and b"no such user 'no-such-user-here'" in result.stderr
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def test_a_daemon_that_cannot_become_its_user_says_so_in_one_line(base):
    for role, extra in (("smtp_in.py", ["--listen", "127.0.0.1:0"]),
                        ("pop3d.py", ["--listen", "127.0.0.1:0"]),
                        ("mta.py", []), ("smtp_out.py", [])):
        result = tool(role, "--spool", os.path.join(base, "spool"), "--user", "no-such-user-here",
                      *extra)
        err = result.stderr.decode()
        assert result.returncode == 1, (role, err)
        assert "no such user" in err and "Traceback" not in err, (role, err)


# --- The README's "Running on a real host", word for word ---

README = os.path.join(ROOT, "README.md")
UNIT = os.path.join(ROOT, "examples", "mailtoolkit.service")


def readme_real_host_blocks():
    """The shell blocks of the README's "Running on a real host", as a reader copies them."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Running on a real host"):]
    section = section[:section.index("\n## ", 1)]
    return [textwrap.dedent(block) for block in re.findall(r"```sh\n(.*?\n)\s*```", section, re.S)]


def test_the_readme_real_host_steps_work_as_written(base):
    ports = dict(zip((25, 587, 465, 110, 995), free_ports(5)))
    tls = os.path.join(base, "letsencrypt")
    os.mkdir(tls, 0o700)
    cert, key = make_certificate(tls, "mail.example.com")
    spool, config = os.path.join(base, "spool"), os.path.join(base, "mailtoolkit.ini")

    replacements = (("/opt/mailtoolkit", ROOT), ("/etc/mailtoolkit.ini", config),
                    ("/var/spool/mailtoolkit", spool), ("user = mailtoolkit", "user = nobody"),
                    ("/etc/letsencrypt/live/mail.example.com/fullchain.pem", cert),
                    ("/etc/letsencrypt/live/mail.example.com/privkey.pem", key))

    def localise(text):
        """The same commands on loopback, in this test's folders, as nobody."""
        text = re.sub(r"(?<![\w/])(/usr/bin/)?python3 ", lambda m: sys.executable + " ", text)
        for old, new in replacements:
            text = text.replace(old, new)
        return re.sub(r"0\.0\.0\.0:(25|587|465|110|995)\b",
                      lambda m: "127.0.0.1:%d" % ports[int(m.group(1))], text)

    # /var/spool/mailtoolkit is where the admin tools look by default; here the environment
    # names the test's spool instead.
    environment = dict(os.environ, MAILTOOLKIT_SPOOL=spool)

    def shell(script):
        result = subprocess.run(["bash", "-e", "-c", script], cwd=base, env=environment,
                                capture_output=True, timeout=120)
        assert result.returncode == 0, (script, result.stdout, result.stderr)
        return result

    setup, start, use = readme_real_host_blocks()
    useradd, rest = setup.split("\n", 1)
    assert useradd.startswith("useradd --system ") and " mailtoolkit" in useradd
    assert all(old in rest for old, _ in replacements)
    assert all("0.0.0.0:%d" % port in rest for port in ports)
    checked = shell(localise(rest))
    assert b"configuration OK" in checked.stderr

    # systemd: the unit's ExecStart is what `systemctl enable --now` runs.
    assert start.splitlines() == [
        "cp /opt/mailtoolkit/examples/mailtoolkit.service /etc/systemd/system/",
        "systemctl daemon-reload && systemctl enable --now mailtoolkit"]
    with open(UNIT) as f:
        unit = f.read()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", unit, re.M)
    log_path = os.path.join(base, "journal.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(localise(exec_start).split() + ["--dns", NO_DNS], cwd=base,
                                   stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    deployment = Deployment(base, "")
    deployment.process, deployment.log_path = process, log_path
    try:
        deployment.wait_for_log("Next steps:")
        nobody = pwd.getpwnam(USER).pw_uid
        for name, pid in deployment.child_pids().items():
            # mta has no listener for run_all to wait for: it may still be dropping root.
            wait_for(lambda: process_uid(pid) == nobody, 10, "%s running as %s" % (name, USER))
        assert use.splitlines()[-1] == "systemctl reload mailtoolkit"
        shell(localise(use).replace("systemctl reload mailtoolkit", "kill -HUP %d" % process.pid))
        deployment.wait_for_log("reload: TLS certificate", count=3)

        def hello_arrived():
            password = re.search(r"printf '%s\\n' '([^']+)'", setup).group(1)
            return any(b"Subject: hello" in m for m in pop3_messages(ports[110], ALICE, password))
        wait_for(hello_arrived, 30, "the README's message in alice's mailbox")
        assert process.poll() is None
        assert not not_owned_by(spool, nobody)
        assert "Traceback" not in deployment.log()
    finally:
        deployment.stop()
