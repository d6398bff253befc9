#!/usr/bin/env python3
"""cpu_bench.py - the CPU time smtp_in and the router spend on each message, user and system.

Starts smtp_in.py and mta.py (one process each by default, --processes 1, so that each
figure is one process's; a role's worker processes are counted with it when there are
some) on a fresh spool under TMPDIR, sends --count 1 KB messages with Postfix's
smtp-source from --clients sessions at once (one message a session; --reuse: many), waits
until every one is in the Maildir, and prints per message: each role's user and system CPU
time (from /proc/PID/stat), the accepted and delivered rates, and the files quarantined
(there must be none). --repeats rounds, each on a spool of its own; medians with min-max.

--router-args and --smtp-in-args, given more than once, name variants of the roles' extra
arguments: each round then runs every variant in turn, so that they share the minutes of
the machine, and each gets its own lines. Given both more than once, the Nth of each make
the Nth variant; given once, an option goes with every variant.

--floor adds a round of bench/floor.py's floor+spool server to each repeat: the CPU time a
message costs a threaded Python server that does nothing but its two durable files and
the bytes on the wire, beside what it costs smtp_in and the router together.

It is how a change to what a message costs the system is measured: run it at two commits
(in two checkouts) in the same minutes, or as variants. The figures follow the disk: on ext4
without a journal, making a file near many recent deletions costs much more
(docs/performance.md), so each round's spool is a folder of its own in a block group of its
own (chattr +T), the spools are deleted only at the end, and the cost of making a file
under TMPDIR is printed: after a run that deleted thousands of files there, wait a few
minutes or use another folder.

Run: TMPDIR=/var/tmp python3 bench/cpu_bench.py [--count 2000] [--clients 10] [--repeats 3] [--reuse]
       [--router-args "--workers 2" --router-args "--workers 4"] [--smtp-in-args "--processes auto"]
Needs smtp-source (Debian: postfix). Loopback only; each round ends by --timeout.
"""

import argparse
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import floor  # noqa: E402  (bench/: the least a threaded Python server can do)
import run_bench  # noqa: E402  (bench/: the cost of making a file under TMPDIR)
import smtp_bench  # noqa: E402  (bench/: its password hash, smtp-source path, folder spread)

DOMAIN = "bench.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid):
    """(user, system) CPU seconds of process pid and of its children, alive now."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    user, system = int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        children = []
    for child in children:
        child_user, child_system = cpu_times(child)
        user, system = user + child_user, system + child_system
    return user, system


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout, what):
    until = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > until:
            raise RuntimeError("timed out waiting for %s" % what)
        time.sleep(0.02)


def send(port, count, clients, timeout, reuse):
    """count 1 KB messages to 127.0.0.1:port with smtp-source, from clients sessions at once,
    one message a session (reuse: many)."""
    subprocess.run([smtp_bench.SMTP_SOURCE, "-4"] + (["-d"] if reuse else [])
                   + ["-s", str(clients), "-m", str(count),
                      "-l", "1024", "-f", "sender@" + DOMAIN, "-t", "user@" + DOMAIN,
                      "-M", "client.bench.test", "127.0.0.1:%d" % port],
                   check=True, timeout=timeout, capture_output=True)


def one_round(count, clients, timeout, work, smtp_in_args=(), router_args=(), reuse=False):
    """([(user, system) µs a message of smtp_in, of the router], accepted/s, delivered/s,
    files quarantined)."""
    spool = os.path.join(work, "spool")
    os.makedirs(spool)
    with open(os.path.join(spool, "users"), "w") as f:
        f.write("user@%s:%s\n" % (DOMAIN, smtp_bench.cheap_password_hash("x")))
    port = free_port()
    common = ["--spool", spool, "--domain", DOMAIN, "--hostname", "mx.bench.test",
              "--processes", "1"]                  # the variants' arguments come after
    logs = open(os.path.join(work, "roles.log"), "wb")
    roles = [subprocess.Popen([sys.executable, os.path.join(ROOT, "smtp_in.py"), "--listen",
                               "127.0.0.1:%d" % port, "--max-per-address", "200", "--spf", "off",
                               "--dkim-verify", "no", "--dmarc", "off", "--max-commands",
                               "10000000"] + common + list(smtp_in_args),
                              stdout=logs, stderr=logs),
             subprocess.Popen([sys.executable, os.path.join(ROOT, "mta.py")] + common
                              + list(router_args), stdout=logs, stderr=logs)]
    new = os.path.join(spool, "mail", DOMAIN, "user", "Maildir", "new")
    try:
        if not smtp_bench.wait_port(port, timeout):
            raise RuntimeError("smtp_in did not start")
        before = [cpu_times(role.pid) for role in roles]
        started = time.perf_counter()
        send(port, count, clients, timeout, reuse)
        elapsed = time.perf_counter() - started
        wait_for(lambda: os.path.isdir(new) and len(os.listdir(new)) >= count, timeout,
                 "the Maildir")
        delivered = time.perf_counter() - started
        time.sleep(0.5)                # the router's last log lines and state
        after = [cpu_times(role.pid) for role in roles]
        quarantined = len(os.listdir(os.path.join(spool, "queue", "quarantine")))
    finally:
        for role in roles:
            role.terminate()
        for role in roles:
            role.wait(timeout=30)
        logs.close()
    per_message = [((a[0] - b[0]) / count * 1e6, (a[1] - b[1]) / count * 1e6)
                   for b, a in zip(before, after)]
    return per_message, count / elapsed, count / delivered, quarantined


def floor_round(count, clients, timeout, work, reuse=False):
    """((user, system) µs a message of bench/floor.py's floor+spool server, accepted/s)."""
    server = floor.Floor("smtp", os.path.join(work, "Maildir"), spool=os.path.join(work, "spool"))
    with server:
        before = cpu_times(server.process.pid)
        started = time.perf_counter()
        send(server.port, count, clients, timeout, reuse)
        elapsed = time.perf_counter() - started
        after = cpu_times(server.process.pid)
    return (((after[0] - before[0]) / count * 1e6, (after[1] - before[1]) / count * 1e6),
            count / elapsed)


def summary(values, unit):
    return "%6.0f%s (%.0f-%.0f)" % (statistics.median(values), unit, min(values), max(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="messages a round (max 20000)")
    parser.add_argument("--clients", type=int, default=10, help="sessions at once (max 100)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (max 10)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a round may take")
    parser.add_argument("--reuse", action="store_true",
                        help="many messages a session (smtp-source -d), not one")
    parser.add_argument("--smtp-in-args", action="append",
                        help="more arguments for smtp_in; repeat it to compare variants")
    parser.add_argument("--router-args", action="append",
                        help="more arguments for the router; repeat it to compare variants")
    parser.add_argument("--floor", action="store_true",
                        help="also a round of bench/floor.py's floor+spool server each repeat")
    args = parser.parse_args(argv)
    if not (1 <= args.count <= 20000 and 1 <= args.clients <= 100 and 1 <= args.repeats <= 10):
        parser.error("--count 1-20000, --clients 1-100, --repeats 1-10")
    smtp_in_variants, router_variants = args.smtp_in_args or [""], args.router_args or [""]
    count = max(len(smtp_in_variants), len(router_variants))
    if min(len(smtp_in_variants), len(router_variants)) not in (1, count) or count > 4:
        parser.error("at most 4 variants, and as many of each option when both are repeated")
    variants = [(smtp_in_variants[n % len(smtp_in_variants)],
                 router_variants[n % len(router_variants)]) for n in range(count)]
    if not os.path.exists(smtp_bench.SMTP_SOURCE):
        print("cpu_bench: smtp-source is not installed (Debian: postfix)", file=sys.stderr)
        return 1
    results = {variant: [] for variant in variants}
    floor_rounds = []
    creation = run_bench.file_creation_us()
    workdir = tempfile.mkdtemp(prefix="cpu-bench-")
    smtp_bench.spread_folders(workdir)     # each round's spool in a block group of its own
    try:
        for _ in range(args.repeats):
            for variant in variants:
                results[variant].append(one_round(
                    args.count, args.clients, args.timeout, tempfile.mkdtemp(dir=workdir),
                    shlex.split(variant[0]), shlex.split(variant[1]), args.reuse))
            if args.floor:
                floor_rounds.append(floor_round(args.count, args.clients, args.timeout,
                                                tempfile.mkdtemp(dir=workdir), args.reuse))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("cpu bench: %d x 1 KB messages, %d sessions at once, %s, %d rounds, spool in %s "
          "(making a file there: %.0f us before the first round)"
          % (args.count, args.clients, "many messages a session" if args.reuse else
             "one message a session", args.repeats, tempfile.gettempdir(), creation))
    for variant, rounds in results.items():
        for role, arguments in (("smtp_in", variant[0]), ("router", variant[1])):
            if len(variants) > 1 or arguments:
                print("%s arguments: %s" % (role, arguments or "(none)"))
        for index, role in enumerate(("smtp_in", "router")):
            print("%-8s user %s  system %s  per message" % (
                role, summary([r[0][index][0] for r in rounds], " us"),
                summary([r[0][index][1] for r in rounds], " us")))
        print("accepted %s messages/s, delivered %s; quarantined %d" % (
            summary([r[1] for r in rounds], ""), summary([r[2] for r in rounds], ""),
            sum(r[3] for r in rounds)))
    if floor_rounds:
        print("floor+spool (bench/floor.py), all its processes:")
        print("%-8s user %s  system %s  per message" % (
            "floor", summary([r[0][0] for r in floor_rounds], " us"),
            summary([r[0][1] for r in floor_rounds], " us")))
        print("accepted %s messages/s" % summary([r[1] for r in floor_rounds], ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
