#!/usr/bin/env python3
"""queue_bench.py - what a large deferred queue costs: the idle router, `mta.py queue`,
and a restart, beside Postfix's `postqueue -p` on a queue of the same size.

Ours: a spool with --messages deferred messages (1 KB each, one remote recipient, next
attempt in an hour: queue files written directly, as the router leaves them, without an
fsync each) and one new local message in incoming/. Then:

- restart to first delivery: from starting `mta.py` (the router) until the local message is
  in its Maildir (interpreter start, imports, first listing of the queue included);
- idle CPU: the router's user+system CPU seconds over --idle seconds once settled (after
  its first two periodic scans), scaled to one minute;
- `mta.py queue` and `mta.py queue --json` into /dev/null: wall time and peak RSS.

Postfix (unless --no-postfix; needs root): a throwaway instance (bench/peers.Postfix) with
defer_transports = smtp gets --messages 1 KB messages for a remote recipient from
smtp-source; once all are in its deferred queue, `postqueue -p` into /dev/null is timed the
same way. Each timed figure is the median of --repeats with min-max.

Run: python3 bench/queue_bench.py [--messages 50000] [--idle 60] [--repeats 3] [--no-postfix]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mta  # noqa: E402
import plumbing  # noqa: E402
import peers  # noqa: E402

DOMAIN = "bench.test"
USER = "user@bench.test"
WAIT_LIMIT = 600.0                 # seconds any one step may take
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def summary(values, unit=""):
    return "%.3f%s (%.3f-%.3f)" % (statistics.median(values), unit, min(values), max(values))


def message(number):
    body = b"x" * 76 + b"\r\n"
    header = (b"From: bench@bench.test\r\nTo: someone@remote.test\r\nSubject: queue %d\r\n\r\n"
              % number)
    return header + body * ((1024 - len(header)) // len(body))


def fill_spool(spool, count):
    """count deferred messages and one new local one; returns the local one's queue id."""
    queue = mta.Queue(spool, hostname="mx.bench.test")
    queue.create()
    with open(os.path.join(spool, "users"), "w") as f:
        f.write("%s:$placeholder$\n" % USER)
    deferred = queue.path(mta.DEFERRED)
    now = time.time()
    for number in range(count):
        queue_id = plumbing.new_queue_id()
        data = message(number)
        envelope = mta.Envelope(queue_id, "bench@bench.test", ["someone@remote.test"],
                                now - 60, len(data), "127.0.0.1", "bench", "", "ESMTP")
        records = mta.record_bytes(
            {"event": "route", "from": 0, "rcpt": 0, "at": now - 59,
             "to": [{"kind": "remote", "address": "someone@remote.test"}]},
            {"event": "deferred", "rcpt": 0, "at": now - 58, "next": now + 3600,
             "dsn": "4.4.1", "mta": "", "relay": "", "reply": "451 4.4.1 try later"})
        path = os.path.join(deferred, queue_id)
        with open(path, "wb") as f:
            f.write(mta.envelope_bytes(envelope) + data + records)
        os.utime(path, (now + 3600, now + 3600))
    return queue.enqueue("bench@bench.test", [USER], message(-1))


def cpu_seconds(pid):
    """CPU seconds (user and system) of process pid and of its live children: the router's
    master and its worker processes."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue                   # ended meanwhile
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def run_timed(command):
    """(wall seconds, peak RSS in MiB) of command with its output to /dev/null."""
    # As a user runs it: PYTHONUNBUFFERED (set in some shells and CI) would make every
    # entry of the listing a write() of its own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError("%s exited %d" % (command[:3], proc.returncode))
    return elapsed, usage.ru_maxrss / 1024


def bench_ours(count, idle, repeats):
    spool = tempfile.mkdtemp(prefix="queue-bench-")
    figures = {}
    try:
        started = time.perf_counter()
        fill_spool(spool, count)
        print("ours: %d deferred messages written in %.1f s" % (count, time.perf_counter() - started))
        new = os.path.join(spool, "mail", DOMAIN, "user", "Maildir", "new")
        start = time.perf_counter()
        router = subprocess.Popen([sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool,
                                   "--domain", DOMAIN], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            while not (os.path.isdir(new) and os.listdir(new)):
                if time.perf_counter() - start > WAIT_LIMIT or router.poll() is not None:
                    raise RuntimeError("the router delivered nothing")
                time.sleep(0.001)
            figures["first_delivery"] = time.perf_counter() - start
            print("ours: restart to first delivery       %.3f s" % figures["first_delivery"])
            # Settled: the first scans are over (the one at start stats every file; the next,
            # mta.SCAN_INTERVAL later, lists deferred/ again, changed seconds before by fill).
            time.sleep(mta.SCAN_INTERVAL + 5)
            before = cpu_seconds(router.pid)
            time.sleep(idle)
            used = cpu_seconds(router.pid) - before
            figures["idle_cpu_per_minute"] = used * 60 / idle
            print("ours: idle router CPU (all processes) %.3f CPU-s per minute (%.2f in %d s)"
                  % (figures["idle_cpu_per_minute"], used, idle))
        finally:
            router.terminate()
            router.wait(timeout=60)
        for option in ([], ["--json"]):
            runs = [run_timed([sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool,
                               "queue"] + option) for _ in range(repeats)]
            name = "queue" + "".join(" " + o for o in option)
            figures[name] = [r[0] for r in runs]
            print("ours: mta.py %-12s               %s, peak RSS %.1f MiB"
                  % (name, summary(figures[name], " s"), max(r[1] for r in runs)))
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    return figures


def bench_postfix(count, repeats):
    run = tempfile.mkdtemp(prefix="queue-bench-postfix-")
    try:
        postfix = peers.Postfix(run, relay_port=peers.free_port())
        postfix.settings({"defer_transports": "smtp", "queue_run_delay": "3600s",
                          "minimal_backoff_time": "3600s", "maximal_backoff_time": "3600s"})
        postfix.start()
        try:
            started = time.perf_counter()
            binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
            subprocess.run([binary, "-4", "-d", "-s", "8", "-m", str(count), "-l", "1024",
                            "-f", "bench@bench.test", "-t", "someone@remote.test",
                            "%s:%d" % (peers.HOST, postfix.port)], check=True,
                           timeout=WAIT_LIMIT, stdout=subprocess.DEVNULL)
            deferred = os.path.join(run, "queue", "deferred")
            while sum(len(files) for _, _, files in os.walk(deferred)) < count:
                if time.perf_counter() - started > WAIT_LIMIT:
                    raise RuntimeError("postfix deferred too few")
                time.sleep(0.2)
            print("postfix: %d deferred messages queued in %.1f s"
                  % (count, time.perf_counter() - started))
            postqueue = shutil.which("postqueue") or "/usr/sbin/postqueue"
            runs = [run_timed([postqueue, "-c", postfix.conf, "-p"]) for _ in range(repeats)]
            times = [r[0] for r in runs]
            print("postfix: postqueue -p                 %s, peak RSS %.1f MiB (postqueue "
                  "alone; showq does the reading)" % (summary(times, " s"),
                                                      max(r[1] for r in runs)))
            return times
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50000, help="deferred messages (1-200000)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measured (5-600)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timed figure (1-20)")
    parser.add_argument("--no-postfix", action="store_true", help="ours only")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    if not (1 <= args.messages <= 200000 and 5 <= args.idle <= 600 and 1 <= args.repeats <= 20):
        parser.error("messages 1-200000, idle 5-600, repeats 1-20")
    figures = {"ours": bench_ours(args.messages, args.idle, args.repeats)}
    if not args.no_postfix:
        try:
            figures["postqueue"] = bench_postfix(args.messages, args.repeats)
        except (peers.PeerMissing, OSError, subprocess.SubprocessError, RuntimeError) as exc:
            print("postfix: skipped: %s" % exc)
    if "postqueue" in figures:
        ours, theirs = statistics.median(figures["ours"]["queue"]), statistics.median(figures["postqueue"])
        print("ratio: mta.py queue / postqueue -p = %.2f" % (ours / theirs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
