#!/usr/bin/env python3
"""smtp_bench.py - accepted messages per second of smtp_in.py, beside peers, in one run.

Starts smtp_in.py (and mta.py's router, when present, so that mail flows on into the
Maildir as it would in production), the peer aiosmtpd (a durable Maildir handler, from the
shared bench harness and its venv) and, with --postfix, a separate benchmark Postfix
instance; then sends N messages with Postfix's smtp-source (one SMTP session per message)
for every message size and client count, visiting the targets in turn in each repeat so
that the ratios come from the same minutes of a noisy machine. Every server is durable:
fsync before the 250 (smtp_in through mta.enqueue, aiosmtpd in its handler, Postfix by
default).

accepted/s = N / wall time of smtp-source (every 250 received). deliv/s = N / time until
N files are in the target's Maildir new/ (Postfix and our router deliver after the 250).

Run (as root for --postfix; the harness copy needs ./setup_env.sh run once):
    cp -r ../shared/bench /tmp/smtpin-peer-bench && (cd /tmp/smtpin-peer-bench && ./setup_env.sh)
    python3 bench/smtp_bench.py --peer-bench /tmp/smtpin-peer-bench --postfix --json bench/results/smtp.json
Every server listens on 127.0.0.1 only; every run is bounded by --timeout.
"""

import argparse
import json
import os
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
DOMAIN = "bench.test"
RCPT = "user@bench.test"
SENDER = "sender@bench.test"


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


def clean_maildir(maildir):
    for sub in ("new", "cur"):
        folder = os.path.join(maildir, sub)
        if os.path.isdir(folder):
            for entry in os.scandir(folder):
                os.unlink(entry.path)


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

def python_source(port, count, conc, size, timeout):
    import smtplib
    body = (b"X" * 76 + b"\r\n") * max(1, size // 78)
    text = b"From: <%s>\r\nTo: <%s>\r\nSubject: bench\r\n\r\n" % (SENDER.encode(), RCPT.encode()) + body
    left = [count]
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                with smtplib.SMTP("127.0.0.1", port, "bench-client.test", timeout=timeout) as client:
                    client.sendmail(SENDER, [RCPT], text)
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(str(exc))
                return

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors[0] if errors else None


def run_load(target, count, conc, size, timeout):
    """Send count messages; return (wall seconds, delivered-by seconds or nan, error or None)."""
    new = os.path.join(target["maildir"], "new") if target.get("maildir") else None
    base = count_files(new) if new else 0
    started = time.perf_counter()
    if os.path.exists(SMTP_SOURCE):
        command = [SMTP_SOURCE, "-4", "-s", str(conc), "-m", str(count), "-l", str(size),
                   "-f", SENDER, "-t", RCPT, "-M", "bench-client.test", "127.0.0.1:%d" % target["port"]]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            error = None if done.returncode == 0 and "fatal" not in done.stderr else (
                done.stderr.strip()[-300:] or "rc=%d" % done.returncode)
        except subprocess.TimeoutExpired:
            error = "smtp-source timed out after %ss" % timeout
    else:
        error = python_source(target["port"], count, conc, size, timeout)
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


# --- the servers ---

class Servers:
    """Starts the targets and ends every process it started, by PID."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.processes = []
        self.postfix_pid_file = None
        self.targets = []

    def spawn(self, name, command):
        with open(os.path.join(self.workdir, name + ".log"), "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=log)
        self.processes.append(process)
        return process

    def start_ours(self, extra, router=True):
        spool = os.path.join(self.workdir, "smtp_in-spool")
        os.makedirs(spool)
        subprocess.run([sys.executable, os.path.join(ROOT, "mailbox_store.py"), "--spool", spool,
                        "add-user", RCPT], input=b"bench-password\n", check=True, capture_output=True)
        port = free_port()
        # Postfix exempts $mynetworks from its per-client limit; a 50-client run from one
        # address needs the same headroom here, as a client's next session may be accepted
        # before its previous one has been counted out.
        self.spawn("smtp_in", [sys.executable, os.path.join(ROOT, "smtp_in.py"), "--spool", spool, "--listen",
                    "127.0.0.1:%d" % port, "--domain", DOMAIN, "--hostname", "mx.bench.test",
                    "--max-per-address", "200"] + extra)
        maildir = None
        if router and os.path.exists(os.path.join(ROOT, "mta.py")):
            self.spawn("mta", [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool,
                        "--domain", DOMAIN, "--hostname", "mx.bench.test"])
            maildir = os.path.join(spool, "mail", DOMAIN, "user", "Maildir")
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        self.add("smtp_in", port, maildir)

    def start_aiosmtpd(self, harness, executor):
        python = os.path.join(harness, ".venv", "bin", "python")
        script = os.path.join(harness, "peers", "aiosmtpd", "maildir_server.py")
        if not (os.path.exists(python) and os.path.exists(script)):
            print("# aiosmtpd skipped: no %s (run the harness's setup_env.sh)" % python)
            return
        port = free_port()
        maildir = os.path.join(self.workdir, "aiosmtpd-%d" % executor, "Maildir")
        command = [python, script, "--port", str(port), "--maildir", maildir]
        if executor:
            command += ["--executor", str(executor)]
        self.spawn("aiosmtpd-%d" % executor, command)
        self.add("aiosmtpd" + ("-ex%d" % executor if executor else ""), port, maildir)

    def start_postfix(self, harness):
        run = os.path.join(self.workdir, "postfix")
        port, sink = free_port(), free_port()
        subprocess.run([os.path.join(harness, "peers", "postfix", "setup.sh"), run, str(port), str(sink)],
                       check=True, capture_output=True)
        # "postfix start" exits 1 silently without a tty when it cannot log; script(1) gives one.
        subprocess.run(["script", "-qc", "postfix -c %s start" % os.path.join(run, "conf"), "/dev/null"],
                       check=True, capture_output=True, timeout=60)
        self.postfix_pid_file = os.path.join(run, "queue", "pid", "master.pid")
        self.add("postfix", port, os.path.join(run, "vmail", "user", "Maildir"))

    def add(self, name, port, maildir):
        self.targets.append({"name": name, "port": port, "maildir": maildir})

    def wait_ready(self):
        for target in list(self.targets):
            if not wait_port(target["port"]):
                print("# %s did not start on port %d; dropped" % (target["name"], target["port"]))
                self.targets.remove(target)

    def stop(self):
        if self.postfix_pid_file and os.path.exists(self.postfix_pid_file):
            with open(self.postfix_pid_file) as f:
                pid = int(f.read().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


# --- the measurement ---

def measure(targets, sizes, concs, args, results):
    header = "%-12s %7s %4s %6s %10s %14s %10s %14s" % (
        "target", "size", "conc", "N", "accepted/s", "(min-max)", "deliv/s", "(min-max)")
    peers = [t["name"] for t in targets if t["name"] != "smtp_in"]
    print(header + "".join(" %12s" % ("vs " + name) for name in peers), flush=True)
    for size in sizes:
        for conc in concs:
            counts = {}
            for target in targets:                     # a short probe sizes N per target
                if target["maildir"]:
                    wait_quiet(target["maildir"])
                    clean_maildir(target["maildir"])
                probe = max(20, 5 * conc)
                wall, _, error = run_load(target, probe, conc, size, args.timeout)
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
                    wall, until, error = run_load(target, count, conc, size, args.timeout)
                    if error:
                        errors[target["name"]] = error
                    accepted[target["name"]].append(float("nan") if error else count / wall)
                    delivered[target["name"]].append(float("nan") if error or until != until
                                                      else count / until)
            ours = median(accepted.get("smtp_in", []))
            for target in targets:
                name = target["name"]
                line = "%-12s %7d %4d %6d %10s %14s %10s %14s" % (
                    name, size, conc, counts[name], fmt(median(accepted[name])), spread(accepted[name]),
                    fmt(median(delivered[name])), spread(delivered[name]))
                if name == "smtp_in":
                    line += "".join(" %12s" % fmt(ours / median(accepted[p])) if median(accepted[p])
                                    else " %12s" % "-" for p in peers)
                if errors[name]:
                    line += "  ERROR: " + errors[name]
                print(line, flush=True)
                results.append({"target": name, "size": size, "conc": conc, "n": counts[name],
                                "accepted_per_s": accepted[name], "delivered_per_s": delivered[name],
                                "error": errors[name]})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,102400", help="message sizes in bytes")
    parser.add_argument("--conc", default="1,10,50", help="concurrent clients")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="aimed length of one run")
    parser.add_argument("--min-n", type=int, default=50)
    parser.add_argument("--max-n", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--peer-bench", default="/tmp/smtpin-peer-bench",
                        help="a writable copy of the shared bench harness (with .venv)")
    parser.add_argument("--no-aiosmtpd", action="store_true")
    parser.add_argument("--aiosmtpd-executor", type=int, default=8,
                        help="also run aiosmtpd with a thread pool of this size (0: no)")
    parser.add_argument("--postfix", action="store_true", help="also run a benchmark Postfix (root)")
    parser.add_argument("--smtp-in-arg", action="append", default=[], help="extra smtp_in.py flag")
    parser.add_argument("--no-router", action="store_true",
                        help="do not run mta.py's router beside smtp_in (acceptance alone)")
    parser.add_argument("--json", help="write every raw run here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    concs = [int(x) for x in args.conc.split(",")]
    workdir = tempfile.mkdtemp(prefix="smtp-bench-")
    os.chmod(workdir, 0o755)                           # Postfix's own users must get in
    servers = Servers(workdir)
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        servers.start_ours(args.smtp_in_arg, router=not args.no_router)
        if not args.no_aiosmtpd:
            servers.start_aiosmtpd(args.peer_bench, 0)
            if args.aiosmtpd_executor:
                servers.start_aiosmtpd(args.peer_bench, args.aiosmtpd_executor)
        if args.postfix:
            servers.start_postfix(args.peer_bench)
        servers.wait_ready()
        print("# smtp_bench %s, loadavg %s, client %s, %d repeats, durable (fsync before 250)"
              % (started, open("/proc/loadavg").read().split()[0],
                 "smtp-source" if os.path.exists(SMTP_SOURCE) else "python smtplib threads",
                 args.repeats), flush=True)
        measure(servers.targets, sizes, concs, args, results)
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"started": started, "args": vars(args), "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
