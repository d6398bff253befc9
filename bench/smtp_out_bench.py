"""Outbound delivery speed: messages per second delivered to one local SMTP sink.

Every row sends N messages (one recipient each, SIZE bytes) to the same sink in the same
run, at 1 and 20 concurrent connections, with connection reuse:

- smtp_out:    smtp_out.OutboundDaemon + Deliverer through --relay-host to the sink: the
               worker pool, per-destination caps, pipelined transactions and RSET between
               messages on kept connections, with the claims held in memory: the engine.
- smtp_out+spool: the same over the real spool: N messages routed into outbound/ by
               mta.py first, then one --once pass (claim with flock, read, deliver,
               append each result, file away). This is the row to compare with Postfix.
- postfix:     Postfix's qmgr + smtp(8) client (a separate instance from bench/peers.py,
               relayhost = the sink; needs root, skipped with a note otherwise). The N
               messages are put in its queue first (defer_transports = smtp), then released
               with a flush; the time runs from the flush to the N-th message at the sink.
- smtp-source: Postfix's load client (-d: many messages per session), protocol only.
- smtplib:     a plain Python smtplib loop (sendmail per message, one SMTP per thread).

The sink is Postfix's smtp-sink (C, no disk); its running counter says when N arrived.
Prints medians with min-max over --repeats; --json FILE keeps every run. Loopback only;
every wait is bounded; processes started here are stopped by their PID.

Run: python3 bench/smtp_out_bench.py [--messages 2000] [--size 1024] [--conc 1,20] [--repeats 3]
"""

import argparse
import json
import os
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))

import smtp_out  # noqa: E402
import peers  # noqa: E402  (bench/, the script's own folder)

HOST = "127.0.0.1"
WAIT_LIMIT = 300.0                 # seconds any one run may take


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def message_bytes(number, size):
    head = b"From: bench@bench.test\r\nTo: user@remote.test\r\nSubject: bench %d\r\n\r\n" % number
    line = b"x" * 76 + b"\r\n"
    return head + (line * (size // len(line) + 1))[:size]


# --- The sink ---

class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, with its running message counter read live."""

    def __init__(self):
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.port = free_port()
        self.count = 0
        self.changed = threading.Condition()
        self.process = subprocess.Popen(
            [binary, "-c", "-u", "nobody", "%s:%d" % (HOST, self.port), "1024"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection((HOST, self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("smtp-sink did not start")
                time.sleep(0.05)

    def _read(self):
        pattern = re.compile(rb"mesg=(\d+)")
        tail = b""
        while True:
            block = self.process.stdout.read(4096)
            if not block:
                return
            tail = (tail + block)[-200:]
            found = pattern.findall(tail)
            if found:
                with self.changed:
                    self.count = int(found[-1])
                    self.changed.notify_all()

    def wait_for(self, count, timeout=WAIT_LIMIT):
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= count, timeout)

    def stop(self):
        self.process.terminate()
        self.process.wait(5)


# --- smtp_out: in-memory claims, and the real spool ---

def relay_config(sink, conc):
    return {"relay_host": "%s:%d" % (HOST, sink.port), "relay_tls": smtp_out.TLS_NONE,
            "hostname": "bench.test", "max_connections": conc, "max_per_destination": conc}


def run_smtp_out(sink, messages, conc):
    """The delivery engine alone: claims held in memory, results kept in memory."""
    from smtp_out_support import MemoryClaim
    config = relay_config(sink, conc)
    claims = [MemoryClaim("M%05d" % i, "bench@bench.test", ["user%d@remote.test" % i], m)
              for i, m in enumerate(messages)]
    daemon = smtp_out.OutboundDaemon(config, None, smtp_out.Deliverer(config))
    start = time.perf_counter()
    daemon.start()
    try:
        for batch in [daemon.submit(claim) for claim in claims]:
            batch.done.wait(WAIT_LIMIT)
    finally:
        daemon.stop()
    elapsed = time.perf_counter() - start
    sent = sum(c.statuses() == ["delivered"] for c in claims)
    if sent != len(messages):
        raise RuntimeError("smtp_out delivered %d of %d" % (sent, len(messages)))
    return elapsed


def run_smtp_out_spool(sink, messages, conc):
    """The whole outbound path: N messages routed into the spool's outbound/ by mta.py,
    then one `--once` pass: claim (flock, read), deliver, append the result, file away."""
    import mailbox_store
    import mta
    spool = tempfile.mkdtemp(prefix="smtp-out-bench-spool-")
    try:
        queue = mta.Queue(spool, hostname="bench.test")
        queue.create()
        router = mta.Router(queue, mailbox_store.Store(spool, ["bench.test"]))
        for i, message in enumerate(messages):
            router.handle(queue.enqueue("bench@bench.test", ["user%d@remote.test" % i], message))
        if len(queue.ids(mta.OUTBOUND)) != len(messages):
            raise RuntimeError("mta routed %d of %d" % (len(queue.ids(mta.OUTBOUND)), len(messages)))
        config = relay_config(sink, conc)
        daemon = smtp_out.OutboundDaemon(config, queue, smtp_out.Deliverer(config))
        before = sink.count
        start = time.perf_counter()
        daemon.run_once(timeout=WAIT_LIMIT)
        elapsed = time.perf_counter() - start
        left = len(queue.ids(mta.OUTBOUND)) + len(queue.ids(mta.DEFERRED))
        if left or not sink.wait_for(before + len(messages), 10):
            raise RuntimeError("smtp_out left %d messages queued" % left)
        return elapsed
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def run_smtplib(sink, messages, conc):
    shares = [messages[i::conc] for i in range(conc)]
    errors = []

    def client(share):
        try:
            with smtplib.SMTP(HOST, sink.port, "bench.test", timeout=30) as smtp:
                for n, message in enumerate(share):
                    smtp.sendmail("bench@bench.test", ["user%d@remote.test" % n], message)
        except (OSError, smtplib.SMTPException) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_LIMIT)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("smtplib: %s" % errors[0])
    return elapsed


def run_smtp_source(sink, messages, conc, size):
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    before = sink.count
    start = time.perf_counter()
    subprocess.run([binary, "-4", "-d", "-s", str(conc), "-m", str(len(messages)), "-l", str(size),
                    "-f", "bench@bench.test", "-t", "user@remote.test", "-M", "bench.test",
                    "%s:%d" % (HOST, sink.port)], check=True, timeout=WAIT_LIMIT,
                   stdout=subprocess.DEVNULL)
    if not sink.wait_for(before + len(messages)):
        raise RuntimeError("smtp-source: the sink saw %d" % (sink.count - before))
    return time.perf_counter() - start


# --- Postfix as the peer ---

class Postfix:
    """A throwaway Postfix instance whose only way out is smtp(8) to the sink."""

    def __init__(self, sink):
        self.run = tempfile.mkdtemp(prefix="smtp-out-bench-postfix-")
        try:
            self.instance = peers.Postfix(self.run, relay_port=sink.port)
            self.port = self.instance.port
            self.instance.settings({
                "smtp_tls_security_level": "none", "smtp_connection_cache_on_demand": "yes",
                "defer_transports": "smtp", "default_destination_recipient_limit": "50",
                "queue_run_delay": "3600s", "minimal_backoff_time": "3600s",
                "maximal_backoff_time": "3600s"})
            self.instance.start()
        except BaseException:
            shutil.rmtree(self.run, ignore_errors=True)
            raise

    def settings(self, values):
        self.instance.settings(values)

    def queued(self):
        total = 0
        for name in ("incoming", "active", "deferred", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.run, "queue", name)):
                total += len(files)
        return total

    def measure(self, sink, messages, conc, size):
        """Queue N messages (deferred), then time a flush until the sink has them all."""
        self.settings({"defer_transports": "smtp", "default_destination_concurrency_limit": str(conc),
                       "initial_destination_concurrency": str(conc),
                       "smtp_destination_concurrency_limit": str(conc)})
        self.reload()
        binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
        subprocess.run([binary, "-4", "-d", "-s", "4", "-m", str(len(messages)), "-l", str(size),
                        "-f", "bench@bench.test", "-t", "user@remote.test", "-M", "bench.test",
                        "%s:%d" % (HOST, self.port)], check=True, timeout=WAIT_LIMIT,
                       stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT_LIMIT
        while self.deferred() < len(messages):
            if time.monotonic() > deadline:
                raise RuntimeError("postfix queued only %d" % self.deferred())
            time.sleep(0.05)
        self.settings({"defer_transports": ""})
        before = sink.count
        start = time.perf_counter()
        self.reload()
        self.instance.flush()
        if not sink.wait_for(before + len(messages)):
            raise RuntimeError("postfix delivered %d" % (sink.count - before))
        return time.perf_counter() - start

    def deferred(self):
        total = 0
        for _, _, files in os.walk(os.path.join(self.run, "queue", "deferred")):
            total += len(files)
        return total

    def reload(self):
        self.instance.reload()

    def stop(self):
        self.instance.stop()
        shutil.rmtree(self.run, ignore_errors=True)


# --- Main ---

def summarize(times, count):
    rates = sorted(count / t for t in times)
    return statistics.median(rates), rates[0], rates[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--conc", default="1,20")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-postfix", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not (shutil.which("smtp-sink") or os.path.exists("/usr/sbin/smtp-sink")):
        print("smtp_out_bench: needs Postfix's smtp-sink (python3 bench/peers.py install)",
              file=sys.stderr)
        return 1
    levels = [int(c) for c in args.conc.split(",")]
    messages = [message_bytes(i, args.size) for i in range(args.messages)]
    sink = SmtpSink()
    postfix = None
    notes = []
    if not args.no_postfix:
        try:
            postfix = Postfix(sink)
        except (peers.PeerMissing, OSError, subprocess.SubprocessError) as exc:
            notes.append("postfix peer skipped: %s" % exc)
    runners = [("smtp_out", lambda c: run_smtp_out(sink, messages, c))]
    try:
        import mta  # noqa: F401
        runners.append(("smtp_out+spool", lambda c: run_smtp_out_spool(sink, messages, c)))
    except ImportError:
        notes.append("smtp_out+spool skipped: mta.py not importable")
    if postfix:
        runners.append(("postfix", lambda c: postfix.measure(sink, messages, c, args.size)))
    runners.append(("smtp-source", lambda c: run_smtp_source(sink, messages, c, args.size)))
    runners.append(("smtplib", lambda c: run_smtplib(sink, messages, c)))
    raw = []
    try:
        results = {}
        for repeat in range(args.repeats):
            for conc in levels:
                for name, run in runners:       # interleaved, so ratios are side by side
                    elapsed = run(conc)
                    results.setdefault((name, conc), []).append(elapsed)
                    raw.append({"client": name, "conc": conc, "repeat": repeat,
                                "messages": args.messages, "size": args.size, "seconds": elapsed})
    finally:
        if postfix:
            postfix.stop()
        sink.stop()
    print("outbound delivery to smtp-sink, %d x %d B messages, one recipient each, "
          "median (min-max) of %d" % (args.messages, args.size, args.repeats))
    print("%-15s %5s %22s %10s" % ("client", "conc", "msgs/s", "vs postfix"))
    for (name, conc), times in results.items():
        median, low, high = summarize(times, args.messages)
        ratio = ""
        if ("postfix", conc) in results:
            ratio = "%.2fx" % (median / summarize(results[("postfix", conc)], args.messages)[0])
        print("%-15s %5d %9.0f (%5.0f-%5.0f) %10s" % (name, conc, median, low, high, ratio))
    for note in notes:
        print("note:", note)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"runs": raw, "notes": notes}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
