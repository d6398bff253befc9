#!/usr/bin/env python3
"""peers.py - the servers the bench measures ours against, installed, configured, started
and stopped from here, on 127.0.0.1 only.

  postfix    a separate Postfix instance (never the system's): its only listener is
             127.0.0.1:PORT, every recipient of bench.test goes by virtual(8) into one
             Maildir, fsync left on (the default); nothing can leave but, when asked, to a
             relay on 127.0.0.1, or to the MX hosts a DNS server on loopback names (in a
             mount namespace of its own, see Postfix). Needs root (Postfix drops to its
             own users).
  smtp-sink, smtp-source   Postfix's SMTP sink and load client (the postfix package).
  dovecot    Dovecot POP3 only, on 127.0.0.1:PORT, users bench0..15 (password benchpw)
             from a passwd-file, all reading one Maildir as uid nobody. Needs root.
  aiosmtpd   aiosmtpd with a Maildir handler that writes, fsyncs and renames before its 250,
             run by the interpreter of bench/run/venv.
  dnspython  the DNS peer of dns_bench.py, in the same venv.
  dnsmasq, dig   the DNS server and client of dns_bench.py (tests/dnsmasq_server.py runs it).

Each peer writes its configuration, queue, mail and logs into a folder the caller gives
(a temporary one under TMPDIR from the command line), listens on a free or chosen port,
is waited for until it answers, and is stopped by the PID it wrote or we started. A peer
that is not installed raises PeerMissing, whose text is one line: callers print it and go on.

Run:
    python3 bench/peers.py install        # apt-get install (root) + bench/run/venv (pip)
    python3 bench/peers.py status         # what is installed, one line per peer
    python3 bench/peers.py start dovecot  # one peer by hand, until Ctrl-C or --seconds
"""

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pidfile import stop_by_pid_file

__all__ = [
    "APT_PACKAGES", "Aiosmtpd", "Dovecot", "OwnProcess", "PeerMissing", "Postfix", "VENV",
    "free_port", "main", "make_maildir", "missing", "tool", "venv_python", "wait_port",
]

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_DIR = os.path.join(HERE, "run")
VENV = os.path.join(RUN_DIR, "venv")
HOST = "127.0.0.1"
DOMAIN = "bench.test"
POP3_USERS = 16                                   # bench0..bench15
POP3_PASSWORD = "benchpw"
START_TIMEOUT = 30.0                              # seconds a peer may take to answer

# Debian packages: what each provides.
APT_PACKAGES = {
    "postfix": ["postfix", "smtp-sink", "smtp-source", "postconf", "postqueue"],
    "dovecot-pop3d": ["dovecot"],
    "dnsmasq-base": ["dnsmasq"],
    "bind9-dnsutils": ["dig"],
    "bsdutils": ["script"],
}
PIP_PACKAGES = ["aiosmtpd", "dnspython"]


class PeerMissing(Exception):
    """A peer cannot run here; the text says why in one line, and how to install it."""


# --- Small helpers ---

def tool(name):
    """Path of an installed program (also in /usr/sbin for non-root PATHs), or None."""
    return shutil.which(name) or next(
        (p for p in ("/usr/sbin/" + name, "/sbin/" + name) if os.access(p, os.X_OK)), None)


def venv_python(module=None):
    """bench/run/venv's interpreter, or None when it is absent or cannot import module."""
    python = os.path.join(VENV, "bin", "python")
    if not os.access(python, os.X_OK):
        return None
    if module and subprocess.run([python, "-c", "import " + module], capture_output=True,
                                 timeout=60).returncode != 0:
        return None
    return python


def missing(peer):
    """Why peer cannot run here (one line), or None when it can."""
    hint = "python3 bench/peers.py install"
    if peer in ("postfix", "dovecot"):
        if not tool(peer):
            return "%s not installed (%s)" % (peer, hint)
        if os.geteuid() != 0:
            return "%s needs root" % peer
        if peer == "dovecot" and not all(_user_exists(u) for u in ("dovecot", "dovenull")):
            return "dovecot's users dovecot and dovenull missing (%s)" % hint
        return None
    if peer in ("aiosmtpd", "dnspython"):
        module = "dns.resolver" if peer == "dnspython" else peer
        return None if venv_python(module) else "%s not in %s (%s)" % (peer, VENV, hint)
    if peer in ("smtp-sink", "smtp-source", "dnsmasq", "dig"):
        return None if tool(peer) else "%s not installed (%s)" % (peer, hint)
    raise ValueError("unknown peer %r" % peer)


def _user_exists(name):
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def free_port():
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_port(port, timeout=START_TIMEOUT):
    """True once something on 127.0.0.1:port accepts and greets (or closes), within timeout."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                sock.recv(512)
                return True
        except OSError:
            time.sleep(0.1)
    return False


def make_maildir(path, small=0, large=0):
    """A Maildir at path holding small ~4 KB and large ~1 MB messages in cur/ (LF line ends),
    the mailbox Dovecot serves in pop3_bench.py's comparison."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"abcd\n"           # 77 octets
    for number in range(small + large):
        size = 4096 if number < small else 1048576
        head = (b"From: sender@bench.test\nTo: user@bench.test\nSubject: bench %d\n"
                b"Message-ID: <%d@bench.test>\n\n" % (number, number))
        message = head + line * ((size - len(head)) // len(line))
        name = "1700000000.M%dP1.bench,S=%d:2,S" % (number, len(message))
        with open(os.path.join(path, "cur", name), "wb") as f:
            f.write(message)


def _chown_tree(path, uid, gid):
    for folder, dirs, files in os.walk(path):
        os.chown(folder, uid, gid)
        for name in files:
            os.chown(os.path.join(folder, name), uid, gid)


def _nobody():
    import pwd
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


# --- Postfix ---

# main.cf of the benchmark instance. Loopback and IPv4 only, no DNS (unless the instance
# has a resolv.conf of its own), no way out but the relay; queue, data, mail and log under
# the instance's folder; the rest Postfix's defaults (fsync of queue files and of each
# delivered file included).
POSTFIX_MAIN = """\
compatibility_level = 3.6
config_directory = {run}/conf
queue_directory = {run}/queue
data_directory = {run}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench-{port}
maillog_file = {run}/postfix.log
maillog_file_prefixes = {run}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
myhostname = mta.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination = $myhostname
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
smtp_dns_support_level = {dns}
smtp_host_lookup = dns
relayhost = {relayhost}
default_transport = {transport}
relay_transport = {transport}
local_transport = error:no local delivery in the benchmark instance
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = bench.test
virtual_mailbox_base = {run}/vmail
virtual_mailbox_maps = static:user/Maildir/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 100
"""

# master.cf: the SMTP listener on 127.0.0.1:PORT only, the services delivery needs, no chroot.
POSTFIX_SERVICES = [
    # name, type, private, unprivileged, chroot, wakeup, process limit, command
    ("{host}:{port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("local", "unix", "-", "n", "n", "-", "-", "local"),
    ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


class Postfix:
    """A throwaway Postfix instance in workdir: SMTP on 127.0.0.1:port, virtual delivery of
    every bench.test recipient into self.maildir; with relay_port, everything else goes by
    smtp(8) to 127.0.0.1:relay_port, else nothing leaves.

    With resolv_conf (a resolv.conf naming a DNS server on loopback, port 53), smtp(8) looks
    MX and A records up, and the instance sees that file as /etc/resolv.conf: start() runs
    it in a mount namespace of its own (unshare(1)) where the file is bound over
    /etc/resolv.conf, which nothing outside the namespace sees. Postfix asks the system
    resolver (libc) and no other; this way it asks the caller's server alone. The namespace
    ends with the instance's last process (stop()). Needs unshare and mount (util-linux).
    """

    def __init__(self, workdir, port=None, relay_port=None, resolv_conf=None):
        problem = missing("postfix")
        if problem:
            raise PeerMissing(problem)
        if resolv_conf and not (tool("unshare") and tool("mount")):
            raise PeerMissing("unshare and mount not installed (apt-get install util-linux mount)")
        self.resolv_conf = resolv_conf and os.path.abspath(resolv_conf)
        self.run = os.path.abspath(workdir)
        self.port = port or free_port()
        self.conf = os.path.join(self.run, "conf")
        self.maildir = os.path.join(self.run, "vmail", "user", "Maildir")
        self.pid_file = os.path.join(self.run, "queue", "pid", "master.pid")
        uid, gid = _nobody()
        for folder in (self.conf, os.path.join(self.run, "queue"), os.path.join(self.run, "data")):
            os.makedirs(folder, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
        # Postfix's own users must get into the folder; the mail belongs to nobody.
        os.chmod(self.run, 0o755)
        os.chmod(os.path.join(self.run, "queue"), 0o755)
        _chown_tree(os.path.join(self.run, "vmail"), uid, gid)
        shutil.chown(os.path.join(self.run, "data"), "postfix")
        relay = "[%s]:%d" % (HOST, relay_port) if relay_port else ""
        transport = "smtp" if relay_port else "error:nothing leaves the benchmark instance"
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN.format(run=self.run, port=self.port, relayhost=relay,
                                        transport=transport, uid=uid, gid=gid,
                                        dns="enabled" if resolv_conf else "disabled"))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            for service in POSTFIX_SERVICES:
                f.write("%-12s %-10s %-3s %-3s %-3s %-6s %-3s %s\n"
                        % tuple(field.format(host=HOST, port=self.port) for field in service))
        # "postfix check" creates the queue's subfolders with their owners and modes.
        subprocess.run([tool("postfix"), "-c", self.conf, "check"], capture_output=True, timeout=60)

    def start(self):
        """Start the master and wait until the listener greets; returns self."""
        # Without a tty, "postfix start" may fail without a word; script(1) gives it one.
        command = "%s -c %s start" % (shlex.quote(tool("postfix")), shlex.quote(self.conf))
        if self.resolv_conf:
            # The master (and every process it starts) stays in the new mount namespace.
            command = "%s --mount --propagation private -- sh -c %s" % (
                shlex.quote(tool("unshare")),
                shlex.quote("%s --bind %s /etc/resolv.conf && exec %s" % (
                    shlex.quote(tool("mount")), shlex.quote(self.resolv_conf), command)))
        if tool("script"):
            started = subprocess.run([tool("script"), "-qc", command, "/dev/null"],
                                     capture_output=True, text=True, timeout=60)
        else:
            started = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                     timeout=60)
        if started.returncode != 0 or not wait_port(self.port):
            self.stop()
            raise PeerMissing("postfix did not start (see %s/postfix.log): %s"
                              % (self.run, (started.stdout + started.stderr).strip()[-200:]))
        return self

    def settings(self, values):
        """Set main.cf parameters (postconf -e); reload() makes a running instance read them."""
        subprocess.run([tool("postconf"), "-c", self.conf, "-e"]
                       + ["%s=%s" % item for item in values.items()],
                       check=True, capture_output=True, timeout=30)

    def reload(self):
        subprocess.run([tool("postfix"), "-c", self.conf, "reload"], check=True,
                       capture_output=True, timeout=60)

    def flush(self):
        subprocess.run([tool("postqueue"), "-c", self.conf, "-f"], check=True, timeout=60)

    def stop(self):
        stop_by_pid_file(self.pid_file)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# --- Dovecot ---

# POP3 only on 127.0.0.1:PORT, plaintext logins (loopback), passwd-file users reading one
# Maildir; its runtime, state and log under the instance's folder. Login processes keep
# Dovecot's default (one per connection).
DOVECOT_CONF = """\
instance_name = dovecot-bench-{port}
base_dir = {run}/base
state_dir = {run}/state
log_path = {run}/dovecot.log
info_log_path = {run}/dovecot.log
protocols = pop3
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 100
mail_location = maildir:{maildir}
pop3_uidl_format = %08Xu%08Xv
mail_max_userip_connections = 64
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {run}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {run}/users
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


class Dovecot:
    """A throwaway Dovecot in workdir serving maildir (default: its own, made with
    make_maildir(small, large)) to users bench0..15, password benchpw, on 127.0.0.1:port."""

    def __init__(self, workdir, maildir=None, small=0, large=0, port=None):
        problem = missing("dovecot")
        if problem:
            raise PeerMissing(problem)
        self.run = os.path.abspath(workdir)
        self.port = port or free_port()
        self.maildir = maildir or os.path.join(self.run, "mail", "Maildir")
        self.config = os.path.join(self.run, "dovecot.conf")
        self.pid_file = os.path.join(self.run, "base", "master.pid")
        for sub in ("base", "state"):
            os.makedirs(os.path.join(self.run, sub), exist_ok=True)
        os.chmod(self.run, 0o755)
        uid, gid = _nobody()
        if maildir is None:
            make_maildir(self.maildir, small, large)
            _chown_tree(os.path.join(self.run, "mail"), uid, gid)
        with open(self.config, "w") as f:
            f.write(DOVECOT_CONF.format(run=self.run, port=self.port, host=HOST,
                                        maildir=self.maildir))
        with open(os.path.join(self.run, "users"), "w") as f:
            for number in range(POP3_USERS):
                f.write("bench%d:{PLAIN}%s:%d:%d::%s::\n" % (number, POP3_PASSWORD, uid, gid,
                                                           os.path.dirname(self.maildir)))

    def start(self):
        """Start Dovecot (it forks away) and wait until it greets; returns self."""
        with open(os.path.join(self.run, "start.log"), "ab") as log:   # no pipes: it forks
            started = subprocess.run([tool("dovecot"), "-c", self.config], stdout=log,
                                     stderr=log, timeout=60)
        if started.returncode != 0 or not wait_port(self.port):
            self.stop()
            raise PeerMissing("dovecot did not start (see %s/start.log and dovecot.log)" % self.run)
        return self

    def stop(self):
        stop_by_pid_file(self.pid_file)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# --- aiosmtpd ---

class OwnProcess:
    """A server run as a process this script starts (self.process): stopped by SIGTERM to
    that process, then SIGKILL if it lingers."""

    process = None

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class Aiosmtpd(OwnProcess):
    """aiosmtpd from bench/run/venv on 127.0.0.1:port storing into workdir/Maildir, fsync
    before the 250: in the event loop, or with executor > 0 in a pool of that many threads."""

    def __init__(self, workdir, executor=0, port=None):
        self.python = venv_python("aiosmtpd")
        if not self.python:
            raise PeerMissing(missing("aiosmtpd"))
        self.port = port or free_port()
        self.maildir = os.path.join(os.path.abspath(workdir), "Maildir")
        self.log_path = os.path.join(os.path.abspath(workdir), "aiosmtpd.log")
        self.command = [self.python, os.path.abspath(__file__), "serve-aiosmtpd", "--port",
                        str(self.port), "--maildir", self.maildir, "--executor", str(executor)]
        self.process = None

    def start(self):
        os.makedirs(os.path.dirname(self.maildir), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        if not wait_port(self.port):
            self.stop()
            raise PeerMissing("aiosmtpd did not start (see %s)" % self.log_path)
        return self


def serve_aiosmtpd(port, maildir, executor):
    """The aiosmtpd peer's process: accept any mail, store it durably, then answer 250."""
    import asyncio
    import concurrent.futures
    import threading
    from aiosmtpd.controller import Controller

    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    counter = iter(range(1, 1 << 62))
    counter_lock = threading.Lock()

    def store(data):
        with counter_lock:
            number = next(counter)
        name = "%d.P%dQ%d.aiosmtpd" % (time.time_ns(), os.getpid(), number)
        path = os.path.join(maildir, "tmp", name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, os.path.join(maildir, "new", name))

    pool = concurrent.futures.ThreadPoolExecutor(executor) if executor else None

    class MaildirHandler:
        async def handle_DATA(self, server, session, envelope):
            data = b"Return-Path: <%s>\r\nDelivered-To: %s\r\n" % (
                envelope.mail_from.encode(), envelope.rcpt_tos[0].encode()) + envelope.original_content
            if pool is None:
                store(data)                # as most handlers do: the loop waits for the fsync
            else:
                await asyncio.get_running_loop().run_in_executor(pool, store, data)
            return "250 2.0.0 OK"

    controller = Controller(MaildirHandler(), hostname=HOST, port=port,
                            server_hostname="aiosmtpd.bench.test", data_size_limit=64 << 20)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    controller.start()
    try:
        stop.wait()
    finally:
        controller.stop()
    return 0


# --- Installing and reporting ---

def install(use_apt=True, use_pip=True):
    """apt-get install the missing Debian packages (root), then the venv with the pip ones."""
    status = 0
    if use_apt:
        wanted = [package for package, programs in APT_PACKAGES.items()
                  if not all(tool(program) for program in programs)]
        if not _venv_works():
            wanted.append("python3-venv")
        if wanted and os.geteuid() != 0:
            print("peers: apt-get needs root; as root run: apt-get install %s" % " ".join(wanted))
            status = 1
        elif wanted:
            status = max(status, _apt_install(wanted))
        else:
            print("peers: Debian packages already installed")
    if use_pip:
        python = os.path.join(VENV, "bin", "python")
        if not os.access(python, os.X_OK):
            os.makedirs(RUN_DIR, exist_ok=True)
            if subprocess.run([sys.executable, "-m", "venv", VENV], timeout=300).returncode != 0:
                print("peers: cannot make %s (apt-get install python3-venv)" % VENV)
                return 1
        print("peers: pip install %s into %s" % (" ".join(PIP_PACKAGES), VENV), flush=True)
        if subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                          + PIP_PACKAGES, timeout=600).returncode != 0:
            status = 1
    return status


def _venv_works():
    return subprocess.run([sys.executable, "-c", "import ensurepip, venv"],
                          capture_output=True, timeout=60).returncode == 0


def _apt_install(packages):
    """Install packages without configuring or starting any system mail service."""
    # Postfix asks which mail server this machine is: none; and no package starts its
    # daemon meanwhile (policy-rc.d answering 101 "action forbidden", unless one is there).
    subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select "
                   "No configuration\n", text=True, timeout=60)
    policy = "/usr/sbin/policy-rc.d"
    added_policy = not os.path.exists(policy)
    if added_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        print("peers: apt-get install %s" % " ".join(packages), flush=True)
        subprocess.run(["apt-get", "-q", "update"], env=env, timeout=600)
        done = subprocess.run(["apt-get", "-q", "-y", "--no-install-recommends", "install"]
                              + packages, env=env, timeout=1800)
    finally:
        if added_policy:
            os.unlink(policy)
    return 0 if done.returncode == 0 else 1


def versions():
    """{peer: version text or the reason it cannot run}."""
    def first_line(command):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError as exc:
            return str(exc)
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    report = {}
    for peer, command in (("postfix", [tool("postconf") or "postconf", "-d", "-h", "mail_version"]),
                          ("dovecot", [tool("dovecot") or "dovecot", "--version"]),
                          ("smtp-sink", None), ("smtp-source", None),
                          ("dnsmasq", [tool("dnsmasq") or "dnsmasq", "--version"]),
                          ("dig", [tool("dig") or "dig", "-v"])):
        problem = missing(peer)
        report[peer] = problem or ("ok " + first_line(command) if command else "ok " + tool(peer))
    for peer, expression in (("aiosmtpd", "import aiosmtpd; print(aiosmtpd.__version__)"),
                             ("dnspython", "import dns.version; print(dns.version.version)")):
        problem = missing(peer)
        report[peer] = problem or "ok " + first_line([venv_python(), "-c", expression])
    return report


# --- Main ---

def run_one(name, seconds):
    """Start one peer in a temporary folder, print where it listens, stop it on Ctrl-C,
    SIGTERM or after seconds."""
    workdir = tempfile.mkdtemp(prefix="bench-%s-" % name)
    peer = {"postfix": lambda: Postfix(workdir),
            "dovecot": lambda: Dovecot(workdir, small=1000, large=100),
            "aiosmtpd": lambda: Aiosmtpd(workdir)}[name]
    try:
        with peer() as running:
            print("%s on %s:%d (folder %s), for at most %d s; Ctrl-C stops it"
                  % (name, HOST, running.port, workdir, seconds), flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                time.sleep(seconds)
            except KeyboardInterrupt:
                pass
    except PeerMissing as exc:
        print("peers: %s skipped: %s" % (name, exc), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("install", help="apt-get install the peers (root) and pip "
                                "install aiosmtpd and dnspython into " + VENV)
    setup.add_argument("--no-apt", action="store_true", help="only the venv")
    setup.add_argument("--no-pip", action="store_true", help="only the Debian packages")
    commands.add_parser("status", help="one line per peer: its version, or why it cannot run")
    start = commands.add_parser("start", help="run one peer on 127.0.0.1 until Ctrl-C")
    start.add_argument("peer", choices=["postfix", "dovecot", "aiosmtpd"])
    start.add_argument("--seconds", type=int, default=3600, help="stop it after this long")
    serve = commands.add_parser("serve-aiosmtpd", help="the aiosmtpd peer's own process")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--maildir", required=True)
    serve.add_argument("--executor", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "install":
        status = install(use_apt=not args.no_apt, use_pip=not args.no_pip)
        for peer, text in versions().items():
            print("%-12s %s" % (peer, text))
        return status
    if args.command == "status":
        for peer, text in versions().items():
            print("%-12s %s" % (peer, text))
        return 0
    if args.command == "start":
        return run_one(args.peer, args.seconds)
    return serve_aiosmtpd(args.port, args.maildir, args.executor)


if __name__ == "__main__":
    sys.exit(main())
