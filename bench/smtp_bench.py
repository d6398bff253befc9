#!/usr/bin/env python3
"""smtp_bench.py - accepted messages per second of smtp_in.py, beside peers, in one run.

Starts smtp_in.py (and mta.py's router, when present, so that mail flows on into the
Maildir as it would in production), the peer aiosmtpd (a durable Maildir handler, from
bench/peers.py and its venv) and, with --postfix, a separate benchmark Postfix instance
(bench/peers.py; a peer that is not installed is skipped with a one-line note); then sends N messages with Postfix's smtp-source for every message size, client
count and mode (--modes: "session" is one SMTP session per message, "reuse" many messages
per session, smtp-source -d), visiting the targets in turn in each repeat so that the
ratios come from the same minutes of a noisy machine. Every server is durable: fsync
before the 250 (smtp_in through mta.enqueue, aiosmtpd in its handler, Postfix by default).

accepted/s = N / wall time of smtp-source (every 250 received). deliv/s = N / time until
N files are in the target's Maildir new/ (Postfix and our router deliver after the 250).

--e2e-count N then sends N messages one at a time to each target and measures, with a
raw-socket client and a poller of new/ (every 0.5 ms), the time from the 250 after DATA to
the file in new/ (0 when it was there before the 250); and, with --pop3, the time until a fresh POP3 session's STAT counts it (our
pop3d on smtp_in's spool; for Postfix, a Dovecot reading Postfix's Maildir). Every POP3
poll is a whole session (connect, USER/PASS, STAT, QUIT), so its own cost is printed too.

--floor also runs bench/floor.py's two yardsticks, the least a threaded Python server of
our shape can do: "floor" makes each message one durable Maildir file before its 250,
"floor+spool" makes it durable in a spool file before the 250 and in the Maildir after it
(two, as a mail system with a queue does). Each cell then prints what the floors reach
against Postfix: how far any Python server of this shape gets on this machine.

--memory runs a fresh smtp_in (and router) alone under 50 concurrent smtp-source sessions
sending 100 KB messages and prints its peak RSS (VmHWM).

Run (as root for --postfix; the peers are installed once with bench/peers.py):
    python3 bench/peers.py install
    python3 bench/smtp_bench.py --postfix --json bench/results/smtp.json
    python3 bench/smtp_bench.py --postfix --pop3 --modes session,reuse --e2e-count 200 --memory
Every server listens on 127.0.0.1 only; every run is bounded by --timeout.
"""

import argparse
import base64
import hashlib
import json
import os
import poplib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import run_all  # noqa: E402  (its child_cpus places our roles as run_all does)
import floor  # noqa: E402  (bench/, the script's own folder)
import peers  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
DOMAIN = "bench.test"
RCPT = "user@bench.test"
SENDER = "sender@bench.test"
POP3_USER, POP3_PASSWORD = "bench0", peers.POP3_PASSWORD     # peers.Dovecot's users
MEMORY_CLIENTS, MEMORY_SIZE, MEMORY_MESSAGES = 50, 102400, 500


# --- small helpers ---

def free_port():
    for _ in range(200):
        port = random.randint(11000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def wait_port(port, timeout=20.0):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.recv(512)
                return True
        except OSError:
            time.sleep(0.1)
    return False


def count_files(folder):
    try:
        with os.scandir(folder) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0


def spread_folders(workdir):
    """Best effort: have ext4 place each target's folder in workdir in a block group of its
    own (chattr +T: workdir's subfolders are spread as top-level ones are). Without it they
    share one group, and on ext4 without a journal the files one target deletes by the
    thousand (Postfix, a queue file a message) make every target's new files there costlier
    to create for minutes (docs/performance.md), which no host running one server sees."""
    chattr = shutil.which("chattr")
    if chattr:
        subprocess.run([chattr, "+T", workdir], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def clean_maildir(maildir):
    """Empty new/ and cur/ by moving their files into a folder beside the Maildir, which
    goes with the work folder at the end. Deleting thousands of files would make the next
    runs' files, every peer's, costlier to create for minutes on ext4 without a journal
    (docs/performance.md); no server's mailboxes are emptied by the thousand just before
    mail comes."""
    aside = maildir.rstrip("/") + ".read"
    os.makedirs(aside, exist_ok=True)
    for sub in ("new", "cur"):
        folder = os.path.join(maildir, sub)
        if os.path.isdir(folder):
            for entry in os.scandir(folder):
                os.rename(entry.path, os.path.join(aside, entry.name))


def wait_quiet(maildir, quiet=1.5, timeout=120):
    """Wait until the count in new/ stops changing (a previous backlog has drained)."""
    folder = os.path.join(maildir, "new")
    last, changed, started = count_files(folder), time.monotonic(), time.monotonic()
    while time.monotonic() - started < timeout:
        time.sleep(0.2)
        now = count_files(folder)
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed >= quiet:
            return


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(value):
    if value != value:
        return "nan"
    return "%.0f" % value if abs(value) >= 100 else "%.1f" % value if abs(value) >= 10 else "%.2f" % value


def spread(values):
    values = [v for v in values if v == v]
    return "%s-%s" % (fmt(min(values)), fmt(max(values))) if values else "-"


# --- load: smtp-source, or a small threaded stdlib client where it is missing ---

def python_source(port, count, conc, size, timeout, reuse=False):
    import smtplib
    body = (b"X" * 76 + b"\r\n") * max(1, size // 78)
    text = b"From: <%s>\r\nTo: <%s>\r\nSubject: bench\r\n\r\n" % (SENDER.encode(), RCPT.encode()) + body
    left = [count]
    lock = threading.Lock()
    errors = []

    def take():
        with lock:
            left[0] -= 1
            return left[0] >= 0

    def worker():
        try:
            if reuse:
                with smtplib.SMTP("127.0.0.1", port, "bench-client.test", timeout=timeout) as client:
                    while take():
                        client.sendmail(SENDER, [RCPT], text)
                return
            while take():
                with smtplib.SMTP("127.0.0.1", port, "bench-client.test", timeout=timeout) as client:
                    client.sendmail(SENDER, [RCPT], text)
        except (OSError, smtplib.SMTPException) as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors[0] if errors else None


def run_load(target, count, conc, size, timeout, reuse=False):
    """Send count messages; return (wall seconds, delivered-by seconds or nan, error or None).

    reuse sends many messages per session (smtp-source -d), else one session per message.
    """
    new = os.path.join(target["maildir"], "new") if target.get("maildir") else None
    base = count_files(new) if new else 0
    started = time.perf_counter()
    if os.path.exists(SMTP_SOURCE):
        command = [SMTP_SOURCE, "-4", "-s", str(conc), "-m", str(count), "-l", str(size),
                   "-f", SENDER, "-t", RCPT, "-M", "bench-client.test", "127.0.0.1:%d" % target["port"]]
        if reuse:
            command.insert(1, "-d")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            error = None if done.returncode == 0 and "fatal" not in done.stderr else (
                done.stderr.strip()[-300:] or "rc=%d" % done.returncode)
        except subprocess.TimeoutExpired:
            error = "smtp-source timed out after %ss" % timeout
    else:
        error = python_source(target["port"], count, conc, size, timeout, reuse)
    wall = time.perf_counter() - started
    delivered = float("nan")
    if new and not error:
        until = time.perf_counter() + max(60.0, 5 * wall)
        while time.perf_counter() < until:
            if count_files(new) >= base + count:
                delivered = time.perf_counter() - started
                break
            time.sleep(0.005)
        else:
            error = "only %d of %d messages reached %s" % (count_files(new) - base, count, new)
    return wall, delivered, error


# --- end-to-end latency and memory ---

def cheap_password_hash(password):
    """A valid scrypt line with the smallest cost: a POP3 poll then measures the mailbox,
    not the password hash (peers.Dovecot compares PLAIN passwords)."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=2, r=1, p=1, dklen=32)
    b64 = lambda data: base64.b64encode(data).decode().rstrip("=")
    return "$scrypt$n=2,r=1,p=1$%s$%s" % (b64(salt), b64(key))


def smtp_transaction(port, message, timeout=30.0):
    """One session, one message, over a raw socket: (time of connect, time of the 250 after
    DATA), both time.perf_counter(). message ends with CRLF and has no line starting with "."."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        replies = sock.makefile("rb")

        def expect(code, command=None):
            if command:
                sock.sendall(command)
            while True:
                line = replies.readline(1024)
                if not line:
                    raise OSError("connection closed waiting for %d" % code)
                if line[3:4] != b"-":
                    break
            if int(line[:3]) != code:
                raise OSError("%r answered %r" % (command, line))
            return time.perf_counter()

        expect(220)
        expect(250, b"HELO bench-client.test\r\n")
        expect(250, b"MAIL FROM:<%s>\r\n" % SENDER.encode())
        expect(250, b"RCPT TO:<%s>\r\n" % RCPT.encode())
        expect(354, b"DATA\r\n")
        accepted = expect(250, message + b".\r\n")
        try:
            expect(221, b"QUIT\r\n")
        except OSError:
            pass
    return started, accepted


class NewWatch(threading.Thread):
    """Polls a Maildir's new/ every interval seconds and notes when each X-Bench-Id first
    appears there (seen: id -> time.perf_counter())."""

    def __init__(self, maildir, interval=0.0005):
        super().__init__(daemon=True)
        self.folder = os.path.join(maildir, "new")
        self.interval = interval
        self.known = set(os.listdir(self.folder))
        self.seen = {}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def scan(self, stamp=None):
        """Read the files new since the last scan; date what they carry stamp (default now)."""
        with self.lock:
            now = time.perf_counter() if stamp is None else stamp
            for name in set(os.listdir(self.folder)) - self.known:
                self.known.add(name)
                try:
                    with open(os.path.join(self.folder, name), "rb") as f:
                        head = f.read(16384)
                except OSError:
                    continue
                start = head.find(b"X-Bench-Id: ")
                if start >= 0:
                    end = head.find(b"\n", start)
                    self.seen.setdefault(head[start + 12:end].strip().decode(), now)

    def run(self):
        while not self.done.is_set():
            self.scan()
            time.sleep(self.interval)


def new_latency(port, maildir, count, size, wait=10.0):
    """[seconds from the 250 after DATA to the file in new/], [seconds connect .. 250], missing."""
    body = (b"X" * 76 + b"\r\n") * max(1, size // 78)
    watch = NewWatch(maildir)
    watch.start()
    latency, transaction, missing = [], [], 0
    try:
        for number in range(count):
            bench_id = uuid.uuid4().hex
            message = b"From: <%s>\r\nTo: <%s>\r\nSubject: e2e %d\r\nX-Bench-Id: %s\r\n\r\n" % (
                SENDER.encode(), RCPT.encode(), number, bench_id.encode()) + body
            started, accepted = smtp_transaction(port, message)
            transaction.append(accepted - started)
            watch.scan(stamp=accepted)         # there already when the 250 came: latency 0
            until = time.perf_counter() + wait
            while bench_id not in watch.seen and time.perf_counter() < until:
                time.sleep(0.0002)
            if bench_id in watch.seen:
                # The poller may date the file a little before our read of the 250 returned:
                # it was there when the 250 came, latency 0.
                latency.append(max(0.0, watch.seen[bench_id] - accepted))
            else:
                missing += 1
    finally:
        watch.done.set()
        watch.join()
    return latency, transaction, missing


def pop3_count(port, user, password, timeout):
    """Messages a fresh POP3 session sees: connect, USER/PASS, STAT, QUIT."""
    client = poplib.POP3("127.0.0.1", port, timeout=timeout)
    try:
        client.user(user)
        client.pass_(password)
        return client.stat()[0]
    finally:
        try:
            client.quit()
        except (OSError, poplib.error_proto):
            client.close()


def pop3_visibility(target, count, size, timeout=10.0):
    """[seconds from the 250 after DATA until a fresh POP3 session counts the message],
    missing count, [seconds one poll session takes]."""
    pop3 = target["pop3"]
    clean_maildir(target["maildir"])
    body = (b"X" * 76 + b"\r\n") * max(1, size // 78)
    seen, polls, missing = [], [], 0
    base = pop3_count(pop3["port"], pop3["user"], pop3["password"], timeout)
    for number in range(count):
        message = b"From: <%s>\r\nTo: <%s>\r\nSubject: e2e %d\r\n\r\n" % (
            SENDER.encode(), RCPT.encode(), number) + body
        _, t250 = smtp_transaction(target["port"], message)
        until = t250 + timeout
        while True:
            started = time.perf_counter()
            visible = pop3_count(pop3["port"], pop3["user"], pop3["password"], timeout)
            now = time.perf_counter()
            polls.append(now - started)
            if visible >= base + number + 1:
                seen.append(now - t250)
                break
            if now > until:
                missing += 1
                base -= 1
                break
    return seen, missing, polls


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def measure_e2e(targets, args, results):
    """250 -> new/ and 250 -> visible over POP3, one message at a time."""
    print("\n# end-to-end, %d sequential %d B messages, one session each (ms)" % (args.e2e_count, args.e2e_size))
    print("%-12s %-8s %9s %9s %9s %8s %12s" % ("target", "to", "p50", "p99", "max", "missing", "poll p50"),
          flush=True)
    for target in targets:
        if not target["maildir"]:
            continue
        wait_quiet(target["maildir"])
        clean_maildir(target["maildir"])
        lat, txn, missing = new_latency(target["port"], target["maildir"], args.e2e_count, args.e2e_size)
        rows = [("new/", lat, missing, [])]
        if target.get("pop3"):
            wait_quiet(target["maildir"])
            seen, lost, polls = pop3_visibility(target, args.e2e_count, args.e2e_size)
            rows.append(("pop3", seen, lost, polls))
        for where, values, lost, polls in rows:
            ms = [v * 1000 for v in values]
            print("%-12s %-8s %9s %9s %9s %8d %12s" % (
                target["name"], where, fmt(percentile(ms, 0.5)), fmt(percentile(ms, 0.99)),
                fmt(max(ms)) if ms else "nan", lost, fmt(percentile(polls, 0.5) * 1000) if polls else "-"),
                flush=True)
            results.append({"target": target["name"], "to": where, "latency_s": values,
                            "missing": lost, "poll_s": polls,
                            "txn_s": txn if where == "new/" else []})


def vm_kib(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def measure_memory(workdir, args):
    """Peak RSS of a fresh smtp_in under 50 sessions at once, each sending 100 KB messages."""
    servers = Servers(os.path.join(workdir, "memory"))
    os.makedirs(servers.workdir)
    try:
        # One process: the sessions' memory is then all this pid's, not spread over workers.
        servers.start_ours(args.smtp_in_arg + ["--processes=1"], router=not args.no_router,
                           cpus=args.cpus)
        servers.wait_ready()
        target, process = servers.targets[0], servers.processes[0]
        idle = vm_kib(process.pid, "VmRSS")
        wall, _, error = run_load(target, MEMORY_MESSAGES, MEMORY_CLIENTS, MEMORY_SIZE, args.timeout)
        peak = vm_kib(process.pid, "VmHWM")
    finally:
        servers.stop()
    print("\n# memory: smtp_in, %d sessions at once x %d B messages (%d messages, %.1f s): "
          "RSS idle %.1f MiB, peak %.1f MiB%s" % (MEMORY_CLIENTS, MEMORY_SIZE, MEMORY_MESSAGES, wall,
                                                 idle / 1024, peak / 1024,
                                                 "  ERROR: " + error if error else ""), flush=True)
    return {"clients": MEMORY_CLIENTS, "message_bytes": MEMORY_SIZE, "messages": MEMORY_MESSAGES,
            "idle_rss_mib": idle / 1024, "peak_rss_mib": peak / 1024, "error": error}


# --- the servers ---

class Servers:
    """Starts the targets and ends every process it started, by PID."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.processes = []
        self.peers = []                # bench/peers.py's servers, each stops its own
        self.targets = []

    def spawn(self, name, command):
        with open(os.path.join(self.workdir, name + ".log"), "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=log)
        self.processes.append(process)
        return process

    def start_ours(self, extra, router=True, pop3=False, cpus="auto"):
        spool = os.path.join(self.workdir, "smtp_in-spool")
        os.makedirs(spool)
        users = os.open(os.path.join(spool, "users"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(users, "w") as f:
            f.write("%s:%s\n" % (RCPT, cheap_password_hash(POP3_PASSWORD)))
        port = free_port()
        # Postfix exempts $mynetworks from its per-client limit; a 50-client run from one
        # address needs the same headroom here, as a client's next session may be accepted
        # before its previous one has been counted out. Many messages per session need
        # more than the default 1000 commands a session (Postfix has no such limit). SPF
        # is off, as in the peers: its DNS lookups would leave the loopback. Each role gets
        # the CPUs run_all would give it (--cpus none: wherever the system puts it), which
        # depend on its worker processes: smtp_in's are the last --processes=N of extra.
        given = [flag.split("=", 1)[1] for flag in extra if flag.startswith("--processes=")]
        processes = {"smtp_in": (given or ["auto"])[-1], "mta": "auto", "pop3d": "auto"}

        def on_cpu(role):
            placed = run_all.child_cpus(cpus, role, processes[role])
            return ["--cpus", placed] if placed else []

        self.spawn("smtp_in", [sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool", spool, "--listen",
                    "127.0.0.1:%d" % port, "--domain", DOMAIN, "--hostname", "mx.bench.test",
                    "--max-per-address", "200", "--max-commands", "10000000", "--spf", "off",
                    "--dkim-verify", "no", "--dmarc", "off"]
                   + on_cpu("smtp_in") + extra)
        maildir = None
        if router and os.path.exists(os.path.join(ROOT, "mta.py")):
            self.spawn("mta", [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool,
                        "--domain", DOMAIN, "--hostname", "mx.bench.test"] + on_cpu("mta"))
            maildir = os.path.join(spool, "mail", DOMAIN, "user", "Maildir")
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        self.add("smtp_in", port, maildir)
        if pop3 and maildir:
            pop3_port = free_port()
            self.spawn("pop3d", [sys.executable, os.path.join(ROOT, "pop3d.py"), "--spool", spool,
                        "--listen", "127.0.0.1:%d" % pop3_port, "--hostname", "pop.bench.test",
                        "--domain", DOMAIN] + on_cpu("pop3d"))
            self.targets[-1]["pop3"] = {"port": pop3_port, "user": RCPT, "password": POP3_PASSWORD}

    def start_peer(self, name, make):
        """Start the peer make() builds; a peer that cannot run is skipped with a note."""
        try:
            peer = make()
            self.peers.append(peer)
            return peer.start()
        except peers.PeerMissing as exc:
            print("# %s skipped: %s" % (name, exc), flush=True)
            return None

    def start_aiosmtpd(self, executor):
        name = "aiosmtpd" + ("-ex%d" % executor if executor else "")
        folder = os.path.join(self.workdir, name)
        aiosmtpd = self.start_peer(name, lambda: peers.Aiosmtpd(folder, executor=executor))
        if aiosmtpd:
            self.add(name, aiosmtpd.port, aiosmtpd.maildir)

    def start_postfix(self, pop3=False):
        folder = os.path.join(self.workdir, "postfix")
        postfix = self.start_peer("postfix", lambda: peers.Postfix(folder))
        if not postfix:
            return
        self.add("postfix", postfix.port, postfix.maildir)
        if pop3:
            # Dovecot reads Postfix's Maildir: 250 -> visible over POP3 for the peers.
            folder = os.path.join(self.workdir, "dovecot")
            dovecot = self.start_peer("dovecot", lambda: peers.Dovecot(folder, maildir=postfix.maildir))
            if dovecot:
                self.targets[-1]["pop3"] = {"port": dovecot.port, "user": POP3_USER,
                                            "password": POP3_PASSWORD}

    def start_floors(self):
        """bench/floor.py's SMTP yardsticks: one durable file a message, and two."""
        for name, spool in (("floor", False), ("floor+spool", True)):
            folder = os.path.join(self.workdir, name)
            os.makedirs(folder)
            server = floor.Floor("smtp", os.path.join(folder, "Maildir"),
                                 spool=os.path.join(folder, "spool") if spool else None,
                                 log_path=os.path.join(self.workdir, name + ".log"))
            self.peers.append(server)
            server.start()
            self.add(name, server.port, server.maildir)

    def add(self, name, port, maildir):
        self.targets.append({"name": name, "port": port, "maildir": maildir})

    def wait_ready(self):
        for target in list(self.targets):
            if not wait_port(target["port"]):
                print("# %s did not start on port %d; dropped" % (target["name"], target["port"]))
                self.targets.remove(target)
            elif target.get("pop3") and not wait_port(target["pop3"]["port"]):
                print("# the POP3 server of %s did not start; no POP3 latency" % target["name"])
                del target["pop3"]

    def stop(self):
        for peer in reversed(self.peers):
            peer.stop()
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


# --- the measurement ---

def measure(targets, sizes, concs, modes, args, results):
    header = "%-12s %-7s %7s %4s %6s %10s %14s %10s %14s" % (
        "target", "mode", "size", "conc", "N", "accepted/s", "(min-max)", "deliv/s", "(min-max)")
    peers = [t["name"] for t in targets if t["name"] != "smtp_in"]
    print("# our roles: --cpus %s (run_all's default is none)" % args.cpus, flush=True)
    print(header + "".join(" %12s" % ("vs " + name) for name in peers), flush=True)
    for mode in modes:
        reuse = mode == "reuse"
        for size in sizes:
            for conc in concs:
                counts = {}
                for target in targets:                     # a short probe sizes N per target
                    if target["maildir"]:
                        wait_quiet(target["maildir"])
                        clean_maildir(target["maildir"])
                    probe = max(20, 5 * conc)
                    wall, _, error = run_load(target, probe, conc, size, args.timeout, reuse)
                    rate = probe / wall if not error else 0
                    counts[target["name"]] = max(args.min_n, min(args.max_n, int(rate * args.seconds)))
                    if error:
                        print("# probe error %s: %s" % (target["name"], error), flush=True)
                accepted = {t["name"]: [] for t in targets}
                delivered = {t["name"]: [] for t in targets}
                errors = {t["name"]: None for t in targets}
                for _ in range(args.repeats):
                    for target in targets:                 # interleaved, target by target
                        if target["maildir"]:
                            wait_quiet(target["maildir"])
                            clean_maildir(target["maildir"])
                        count = counts[target["name"]]
                        wall, until, error = run_load(target, count, conc, size, args.timeout, reuse)
                        if error:
                            errors[target["name"]] = error
                        accepted[target["name"]].append(float("nan") if error else count / wall)
                        delivered[target["name"]].append(float("nan") if error or until != until
                                                          else count / until)
                ours = median(accepted.get("smtp_in", []))
                for target in targets:
                    name = target["name"]
                    line = "%-12s %-7s %7d %4d %6d %10s %14s %10s %14s" % (
                        name, mode, size, conc, counts[name], fmt(median(accepted[name])),
                        spread(accepted[name]), fmt(median(delivered[name])), spread(delivered[name]))
                    if name == "smtp_in":
                        line += "".join(" %12s" % fmt(ours / median(accepted[p])) if median(accepted[p])
                                        else " %12s" % "-" for p in peers)
                    if errors[name]:
                        line += "  ERROR: " + errors[name]
                    if name.startswith("floor") and median(accepted.get("postfix", [0])) > 0:
                        line += "  (%s of Postfix)" % fmt(median(accepted[name])
                                                         / median(accepted["postfix"]))
                    print(line, flush=True)
                    results.append({"target": name, "mode": mode, "size": size, "conc": conc,
                                    "n": counts[name], "accepted_per_s": accepted[name],
                                    "delivered_per_s": delivered[name], "error": errors[name]})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,102400", help="message sizes in bytes")
    parser.add_argument("--conc", default="1,10,50", help="concurrent clients")
    parser.add_argument("--modes", default="session",
                        help="session (one SMTP session per message), reuse (many per session), or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="aimed length of one run")
    parser.add_argument("--min-n", type=int, default=50)
    parser.add_argument("--max-n", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--no-aiosmtpd", action="store_true")
    parser.add_argument("--aiosmtpd-executor", type=int, default=8,
                        help="also run aiosmtpd with a thread pool of this size (0: no)")
    parser.add_argument("--postfix", action="store_true", help="also run a benchmark Postfix (root)")
    parser.add_argument("--pop3", action="store_true",
                        help="also run pop3d (and, with --postfix, Dovecot) for the POP3 latency")
    parser.add_argument("--e2e-count", type=int, default=0,
                        help="messages for the end-to-end latency, one at a time (0: skip)")
    parser.add_argument("--e2e-size", type=int, default=1024)
    parser.add_argument("--no-load", action="store_true", help="skip the accepted/s runs")
    parser.add_argument("--floor", action="store_true",
                        help="also run bench/floor.py's SMTP yardsticks (floor, floor+spool)")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of a fresh smtp_in under 50 sessions x 100 KB")
    parser.add_argument("--smtp-in-arg", action="append", default=[], help="extra smtp_in.py flag")
    parser.add_argument("--cpus", default="auto",
                        help="CPUs for our roles, as run_all's --cpus (default auto: as run_all "
                             "--cpus auto places them; none: no binding, run_all's default)")
    parser.add_argument("--no-router", action="store_true",
                        help="do not run mta.py's router beside smtp_in (acceptance alone)")
    parser.add_argument("--json", help="write every raw run here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    concs = [int(x) for x in args.conc.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"session", "reuse"}:
        parser.error("--modes takes session and/or reuse")
    workdir = tempfile.mkdtemp(prefix="smtp-bench-")
    os.chmod(workdir, 0o755)                           # Postfix's own users must get in
    spread_folders(workdir)
    servers = Servers(workdir)
    results, e2e, memory = [], [], None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        try:
            servers.start_ours(args.smtp_in_arg, router=not args.no_router, pop3=args.pop3,
                               cpus=args.cpus)
            if not args.no_aiosmtpd:
                servers.start_aiosmtpd(0)
                if args.aiosmtpd_executor:
                    servers.start_aiosmtpd(args.aiosmtpd_executor)
            if args.postfix:
                servers.start_postfix(pop3=args.pop3)
            if args.floor:
                servers.start_floors()
            servers.wait_ready()
            print("# smtp_bench %s, loadavg %s, client %s, %d repeats, durable (fsync before 250)"
                  % (started, open("/proc/loadavg").read().split()[0],
                     "smtp-source" if os.path.exists(SMTP_SOURCE) else "python smtplib threads",
                     args.repeats), flush=True)
            if not args.no_load:
                measure(servers.targets, sizes, concs, modes, args, results)
            if args.e2e_count > 0:
                measure_e2e(servers.targets, args, e2e)
        finally:
            servers.stop()
        if args.memory:
            memory = measure_memory(workdir, args)
    finally:                           # the folder goes whatever failed above
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"started": started, "args": vars(args), "runs": results, "e2e": e2e,
                       "memory": memory}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
