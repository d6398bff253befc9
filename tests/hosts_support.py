"""Whole mail hosts for the end-to-end tests: a run_all.py process group each, on a
loopback address of its own, with its own spool (and maybe a mailbox store shared with
others), its DNS from a dnsmasq the test started."""

import os
import poplib
import signal
import socket
import subprocess
import sys

from support import ROOT, free_ports, wait_for

PASSWORD = "correct horse battery"     # every user the hosts' tests add
DELIVERY_WAIT = 30.0                   # seconds a message may take to cross the hosts


def run_tool(*argv, stdin=None):
    """Run one of the role files as a command; return its CompletedProcess."""
    return subprocess.run([sys.executable] + list(argv), cwd=ROOT, input=stdin,
                          capture_output=True, timeout=60)


class Host:
    """One mail host: run_all.py on ip, MX port mx_port (the one every host's smtp_out
    calls: --remote-port), its own spool under tmp_path, the store (default: the spool),
    hostname (default: mail.DOMAIN), settings written to a config file when given, and
    extra run_all.py options."""

    def __init__(self, tmp_path, name, ip, domains, dns, mx_port, *, hostname=None,
                 store=None, settings=None, extra=()):
        self.name = name
        self.ip = ip
        self.domains = domains
        self.hostname = hostname or "mail." + domains[0]
        self.spool = str(tmp_path / name)
        self.store = store or self.spool
        self.smtp_port = mx_port
        # Chosen together, and other than the MX port: two free_port() calls may get one
        # port twice (run_all then refuses to start).
        self.submission_port, self.pop3_port = [
            port for port in free_ports(3, ip) if port != mx_port][:2]
        self.dns = dns
        self.log_path = str(tmp_path / (name + ".log"))
        self.config_path = None
        if settings is not None:
            self.config_path = str(tmp_path / (name + ".ini"))
            with open(self.config_path, "w") as f:
                f.write(settings)
        self.extra = list(extra)
        self.process = None

    def start(self):
        argv = [sys.executable, os.path.join(ROOT, "run_all.py"), "--spool", self.spool,
                "--store", self.store, "--hostname", self.hostname,
                "--smtp", "%s:%d" % (self.ip, self.smtp_port),
                "--submission", "%s:%d" % (self.ip, self.submission_port),
                "--pop3", "%s:%d" % (self.ip, self.pop3_port),
                "--dns", self.dns, "--remote-port", str(self.smtp_port)]
        if self.config_path:
            argv += ["--config", self.config_path]
        for domain in self.domains:
            argv += ["--domain", domain]
        argv += self.extra
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            for port in (self.smtp_port, self.submission_port, self.pop3_port):
                self.wait_for_port(port)
        except AssertionError:
            self.kill()                # what did start would outlive the test
            raise

    def wait_for_port(self, port, timeout=20.0):
        """Until port takes a connection; fails at once when run_all ends first."""
        def answers():
            try:
                socket.create_connection((self.ip, port), timeout=1).close()
                return "open"
            except OSError:
                return "ended" if self.process.poll() is not None else None
        if wait_for(answers, timeout, "%s on %s:%d" % (self.name, self.ip, port)) == "ended":
            raise AssertionError("%s ended before it opened %s:%d\n%s"
                                 % (self.name, self.ip, port, self.log()))

    def stop(self):
        """SIGTERM run_all and wait for it: the clean stop a user gets with Ctrl-C."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self):
        """kill -9 of run_all and every role it started (they share its process group)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        self.process = None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def add_user(self, address):
        result = run_tool("mailbox_store.py", "--spool", self.spool, "--store", self.store,
                          "add-user", address, stdin=(PASSWORD + "\n").encode())
        assert result.returncode == 0, result.stderr.decode()

    def mta(self, *argv):
        return run_tool("mta.py", "--spool", self.spool, *argv)

    def queue_is_empty(self):
        """Nothing in this host's queue: no delivery, retry or bounce can come from it."""
        return not any(os.listdir(os.path.join(self.spool, "queue", folder))
                       for folder in ("incoming", "outbound", "deferred"))

    def pop3(self, user):
        """A POP3 session logged in as user; the caller quits it."""
        client = poplib.POP3(self.ip, self.pop3_port, timeout=10)
        client.user(user)
        client.pass_(PASSWORD)
        return client

    def pop3_messages(self, user):
        """Every message in user's mailbox, read over POP3 without deleting it."""
        client = self.pop3(user)
        try:
            count, _ = client.stat()
            return [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
        finally:
            client.quit()

    def uidls(self, user):
        client = self.pop3(user)
        try:
            return [line.split()[1] for line in client.uidl()[1]]
        finally:
            client.quit()

    def wait_for_messages(self, user, count, timeout=DELIVERY_WAIT):
        """user's messages over POP3, once there are count of them at least."""
        def enough():
            messages = self.pop3_messages(user)
            return messages if len(messages) >= count else None
        return wait_for(enough, timeout, "%d messages for %s" % (count, user), interval=0.2)
