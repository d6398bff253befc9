#!/usr/bin/env python3
"""mta_bench.py - enqueue-to-Maildir latency and routed messages per second of mta.py.

Starts the router daemon (`mta.py`, a separate process, as in production) on a fresh
spool with one local user, then measures, for each message size:

- latency: one message at a time; `enqueue` is the time mta.enqueue() takes (the part
  smtp_in spends before its 250), `to_maildir` the time from enqueue()'s return until the
  file is in the user's Maildir new/ (what smtp_bench.py calls 250 -> new/), p50/p99;
- throughput: --messages messages enqueued by --threads threads at once; accepted/s is
  messages / time to enqueue them all, delivered/s messages / time until all are in new/.

Each figure is the median of --repeats runs with min-max. The fsync floor (4 KiB write,
fsync, rename, fsync of the directory) is measured on the same disk for comparison: the
path of a message has four fsyncs (two in enqueue, two in the Maildir delivery).

Run: python3 bench/mta_bench.py [--sizes 1024,102400] [--repeats 3] [--json FILE]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mta  # noqa: E402

DOMAIN = "bench.test"
USER = "user@bench.test"
RUN_TIMEOUT = 120.0                # seconds any one run may take
POLL = 0.0002                      # seconds between looks at new/


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values):
    """'median (min-max)' of repeated measurements."""
    return "%.2f (%.2f-%.2f)" % (statistics.median(values), min(values), max(values))


def make_message(size, number):
    header = (b"From: bench@bench.test\r\nTo: user@bench.test\r\nSubject: bench %d\r\n"
              b"X-Bench-Id: %d\r\n\r\n" % (number, number))
    line = b"x" * 76 + b"\r\n"
    body = line * max(0, (size - len(header)) // len(line))
    return header + body + b"." * max(0, size - len(header) - len(body) - 2) + b"\r\n"


def fsync_floor(folder, count=200):
    """p50 milliseconds of a 4 KiB write, fsync, rename, fsync(dir) on this disk."""
    times = []
    data = b"f" * 4096
    for n in range(count):
        start = time.perf_counter()
        temporary, final = os.path.join(folder, "t%d" % n), os.path.join(folder, "f%d" % n)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(temporary, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        times.append(time.perf_counter() - start)
        os.unlink(final)
    return percentile(times, 0.5) * 1000


class Bench:
    def __init__(self, base, workers):
        self.spool = os.path.join(base, "spool")
        os.makedirs(self.spool)
        with open(os.path.join(self.spool, "users"), "w") as f:
            f.write("%s:$placeholder$\n" % USER)
        self.new = os.path.join(self.spool, "mail", DOMAIN, "user", "Maildir", "new")
        self.log = open(os.path.join(base, "router.log"), "wb")
        self.router = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "mta.py"), "--spool", self.spool, "--domain", DOMAIN,
             "--hostname", "mail.bench.test", "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        run = os.path.join(self.spool, "run")
        while not (os.path.isdir(run) and os.listdir(run)):
            if time.monotonic() > deadline or self.router.poll() is not None:
                raise SystemExit("the router did not start; see %s" % self.log.name)
            time.sleep(0.01)

    def delivered(self):
        try:
            return len(os.listdir(self.new))
        except FileNotFoundError:
            return 0

    def clean(self):
        if os.path.isdir(self.new):
            for name in os.listdir(self.new):
                os.unlink(os.path.join(self.new, name))

    def wait_for(self, count, deadline):
        while self.delivered() < count:
            if time.monotonic() > deadline:
                raise SystemExit("timed out: %d of %d delivered" % (self.delivered(), count))
            time.sleep(POLL)
        return time.perf_counter()

    def latency(self, size, count):
        """[(enqueue seconds, enqueue-return-to-new/ seconds)] one message at a time."""
        self.clean()
        results = []
        deadline = time.monotonic() + RUN_TIMEOUT
        for number in range(count):
            message = make_message(size, number)
            start = time.perf_counter()
            mta.enqueue(self.spool, "bench@bench.test", [USER], message)
            queued = time.perf_counter()
            arrived = self.wait_for(number + 1, deadline)
            results.append((queued - start, arrived - queued))
        return results

    def throughput(self, size, count, threads):
        """(accepted/s, delivered/s) for count messages from several threads."""
        self.clean()
        messages = [make_message(size, n) for n in range(count)]
        shares = [messages[n::threads] for n in range(threads)]
        barrier = threading.Barrier(threads + 1)

        def producer(share):
            barrier.wait()
            for message in share:
                mta.enqueue(self.spool, "bench@bench.test", [USER], message)

        workers = [threading.Thread(target=producer, args=(share,)) for share in shares]
        for worker in workers:
            worker.start()
        barrier.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        accepted = time.perf_counter()
        done = self.wait_for(count, time.monotonic() + RUN_TIMEOUT)
        return count / (accepted - start), count / (done - start)

    def close(self):
        if self.router.poll() is None:
            os.kill(self.router.pid, signal.SIGTERM)
            self.router.wait(timeout=30)
        self.log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,102400", help="message sizes in octets")
    parser.add_argument("--count", type=int, default=200, help="messages per latency run")
    parser.add_argument("--messages", type=int, default=500, help="messages per throughput run")
    parser.add_argument("--threads", type=int, default=8, help="enqueueing threads")
    parser.add_argument("--workers", type=int, default=mta.DEFAULTS["workers"],
                        help="router worker threads (default: the router's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to make the spool (default: a temp dir)")
    parser.add_argument("--json", metavar="FILE", help="write every raw run here")
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix="mta-bench-", dir=args.dir)
    raw = {"sizes": {}, "args": vars(args)}
    bench = None
    try:
        floor_dir = os.path.join(base, "floor")
        os.makedirs(floor_dir)
        raw["fsync_floor_ms"] = fsync_floor(floor_dir)
        bench = Bench(base, args.workers)
        print("# mta_bench: router workers=%d, enqueue threads=%d, repeats=%d, spool %s"
              % (args.workers, args.threads, args.repeats, bench.spool))
        print("# fsync floor (4 KiB write+fsync+rename+dir fsync) p50: %.2f ms; a message costs 4 fsyncs"
              % raw["fsync_floor_ms"])
        print("%-8s %-22s %-22s %-22s %-22s %-22s" % (
            "size", "enqueue p50 ms", "to_maildir p50 ms", "to_maildir p99 ms",
            "accepted/s", "delivered/s"))
        for size in (int(s) for s in args.sizes.split(",")):
            runs = []
            for _ in range(args.repeats):
                latencies = bench.latency(size, args.count)
                accepted, delivered = bench.throughput(size, args.messages, args.threads)
                runs.append({
                    "enqueue_p50_ms": percentile([e for e, _ in latencies], 0.5) * 1000,
                    "to_maildir_p50_ms": percentile([d for _, d in latencies], 0.5) * 1000,
                    "to_maildir_p99_ms": percentile([d for _, d in latencies], 0.99) * 1000,
                    "accepted_per_s": accepted, "delivered_per_s": delivered})
            raw["sizes"][size] = runs
            print("%-8d %-22s %-22s %-22s %-22s %-22s" % (
                size, *(summary([run[key] for run in runs]) for key in (
                    "enqueue_p50_ms", "to_maildir_p50_ms", "to_maildir_p99_ms",
                    "accepted_per_s", "delivered_per_s"))))
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
