#!/usr/bin/env python3
"""abuse_bench.py - password guessing against smtp_in submission and pop3d, and what the anvil
leaves of it.

Builds a throw-away spool with one user (bench@bench.test, real password hashes), starts
`smtp_in.py --submission` and `pop3d.py` on free loopback ports with their default settings
(the anvil on, loopback not exempt), then for each server:

  attack   --connections connections from 127.0.0.1, each making failed guesses (AUTH PLAIN
           with a wrong password, or USER/PASS) for --duration seconds, reconnecting when the
           server closes; a guess counts when the server checked it and said no (535, or
           -ERR [AUTH]); a login refused unchecked (454, -ERR [SYS/TEMP]) is counted apart
  probe    meanwhile, every --probe-every seconds, a correct login from 127.0.0.2: its
           latency from the command to the success reply (target: under 100 ms)

Prints failed guesses per second overall and after the first ten (target: at most 1/s).
--target rcpt probes smtp_in as MX instead: the connections ask RCPT TO for unknown local
addresses, and a guess is a 550 5.1.1; the probe is a delivery from 127.0.0.2 (MAIL, RCPT of
the real user, RSET).
Loopback only; every loop is bounded by --duration, and the servers are stopped at the end.

    python3 bench/abuse_bench.py [--duration 20] [--connections 50] [--target smtp,pop3,rcpt]
    python3 bench/abuse_bench.py --server-flag=--anvil-penalty=0     # without the anvil
"""

import argparse
import base64
import os
import re
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
sys.path.insert(0, ROOT)

import mailbox_store  # noqa: E402

USER, PASSWORD, DOMAIN = "bench@bench.test", "bench-secret", "bench.test"
ATTACKER, PROBE = "127.0.0.1", "127.0.0.2"
READ_SLICE = 0.5               # seconds an attacker waits on a read before checking the clock


def start_server(argv, pattern, seconds=20.0):
    """Start a role on port 0; return (process, port) once its log names the port."""
    process = subprocess.Popen([sys.executable] + argv, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stderr.readline().decode("utf-8", "replace")
        found = re.search(pattern, line)
        if found:
            # Keep reading its log, or the pipe fills and the server blocks.
            threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
            return process, int(found.group(1))
        if not line and process.poll() is not None:
            break
    stop_server(process)
    raise SystemExit("abuse_bench: %s did not start" % argv[0])


def stop_server(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Session:
    """A line client on one connection, reading with short waits so that it can give up."""

    def __init__(self, port, source, deadline):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.sock.settimeout(READ_SLICE)
        self.buffer = b""
        self.deadline = deadline

    def line(self):
        """The next line, or None at EOF or past the deadline."""
        while b"\n" not in self.buffer:
            if time.monotonic() >= self.deadline:
                return None
            try:
                block = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not block:
                return None
            self.buffer += block
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def reply(self):
        """An SMTP reply's last line (multi-line replies skipped to it), or None."""
        while True:
            line = self.line()
            if line is None or line[3:4] != "-":
                return line

    def send(self, text):
        try:
            self.sock.sendall(text.encode() + b"\r\n")
            return True
        except OSError:
            return False

    def close(self):
        self.sock.close()


def plain(login, password):
    return base64.b64encode(("\0%s\0%s" % (login, password)).encode()).decode()


# One protocol's steps: open() a session past the greeting (None if refused), guess() one
# wrong password (its reply, None when the connection is gone), login() the right one.

class SMTP:
    name = "smtp_in submission, AUTH PLAIN"

    @staticmethod
    def open(port, source, deadline):
        session = Session(port, source, deadline)
        if not (session.reply() or "").startswith("220") or not session.send("EHLO bench.test") \
                or not (session.reply() or "").startswith("250"):
            session.close()
            return None
        return session

    @staticmethod
    def guess(session, number):
        if not session.send("AUTH PLAIN " + plain(USER, "guess-%d" % number)):
            return None
        return session.reply()

    failed = staticmethod(lambda reply: reply.startswith("535"))
    refused = staticmethod(lambda reply: reply.startswith("454"))

    @staticmethod
    def login(session):
        session.send("AUTH PLAIN " + plain(USER, PASSWORD))
        return (session.reply() or "").startswith("235")


class RCPT:
    name = "smtp_in MX, RCPT TO unknown recipients"

    @staticmethod
    def open(port, source, deadline):
        session = SMTP.open(port, source, deadline)
        if session is not None and not (session.send("MAIL FROM:<probe@example.org>")
                                        and (session.reply() or "").startswith("250")):
            session.close()
            return None
        return session

    @staticmethod
    def guess(session, number):
        if not session.send("RCPT TO:<nobody%d@%s>" % (number, DOMAIN)):
            return None
        reply = session.reply()
        return None if reply is None or reply.startswith("421") else reply

    failed = staticmethod(lambda reply: reply.startswith("550"))
    refused = staticmethod(lambda reply: reply.startswith("4"))

    @staticmethod
    def login(session):
        session.send("RCPT TO:<%s>" % USER)
        return (session.reply() or "").startswith("250")


class POP3:
    name = "pop3d, USER/PASS"

    @staticmethod
    def open(port, source, deadline):
        session = Session(port, source, deadline)
        if not (session.line() or "").startswith("+OK"):
            session.close()
            return None
        return session

    @staticmethod
    def guess(session, number):
        if not session.send("USER " + USER) or not (session.line() or "").startswith("+OK"):
            return None
        if not session.send("PASS guess-%d" % number):
            return None
        return session.line()

    failed = staticmethod(lambda reply: reply.startswith("-ERR [AUTH]"))
    refused = staticmethod(lambda reply: reply.startswith("-ERR [SYS/TEMP]"))

    @staticmethod
    def login(session):
        session.send("USER " + USER)
        session.line()
        session.send("PASS " + PASSWORD)
        return (session.line() or "").startswith("+OK")


def attack(protocol, port, connections, duration, probe_every):
    """Run the attack and the probe; return the figures."""
    started = time.monotonic()
    deadline = started + duration
    lock = threading.Lock()
    guesses, refused, counter = [], [0], [0]
    latencies, probe_failures = [], [0]

    def attacker():
        while time.monotonic() < deadline:
            try:
                session = protocol.open(port, ATTACKER, deadline)
            except OSError:
                time.sleep(0.1)
                continue
            if session is None:
                time.sleep(0.1)
                continue
            try:
                while time.monotonic() < deadline:
                    with lock:
                        counter[0] += 1
                        number = counter[0]
                    reply = protocol.guess(session, number)
                    if reply is None:
                        break
                    with lock:
                        if protocol.failed(reply):
                            guesses.append(time.monotonic() - started)
                        elif protocol.refused(reply):
                            refused[0] += 1
            finally:
                session.close()

    def prober():
        next_probe = time.monotonic() + 1.0
        while next_probe < deadline:
            time.sleep(max(0.0, next_probe - time.monotonic()))
            next_probe += probe_every
            try:
                session = protocol.open(port, PROBE, deadline + 10)
                if session is None:
                    probe_failures[0] += 1
                    continue
                begun = time.monotonic()
                ok = protocol.login(session)
                elapsed = time.monotonic() - begun
                session.close()
            except OSError:
                ok = False
            if ok:
                latencies.append(elapsed)
            else:
                probe_failures[0] += 1

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(connections)]
    threads.append(threading.Thread(target=prober, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 30)
    elapsed = time.monotonic() - started
    guesses.sort()
    after_ten = None
    if len(guesses) > 10:
        after_ten = (len(guesses) - 10) / max(elapsed - guesses[9], 1e-9)
    return {"guesses": len(guesses), "per_second": len(guesses) / elapsed,
            "after_ten": after_ten, "refused": refused[0], "elapsed": elapsed,
            "latencies": latencies, "probe_failures": probe_failures[0]}


def report(protocol, figures):
    print("%s: %d failed guesses in %.1f s: %.2f/s overall, %s after the first ten "
          "(target <= 1/s); %d refused unchecked or deferred"
          % (protocol.name, figures["guesses"], figures["elapsed"], figures["per_second"],
             "%.3f/s" % figures["after_ten"] if figures["after_ten"] is not None else "none",
             figures["refused"]))
    latencies = figures["latencies"]
    if latencies:
        print("  correct %s from %s: %d, median %.0f ms, max %.0f ms "
              "(target < 100 ms); %d failed"
              % ("recipient" if protocol is RCPT else "login", PROBE, len(latencies),
                 1000 * statistics.median(latencies),
                 1000 * max(latencies), figures["probe_failures"]))
    else:
        print("  correct login from %s: none succeeded (%d failed)"
              % (PROBE, figures["probe_failures"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of attack per server (default 20)")
    parser.add_argument("--connections", type=int, default=50,
                        help="attacking connections from one address (default 50)")
    parser.add_argument("--probe-every", type=float, default=2.0,
                        help="seconds between correct logins from %s (default 2)" % PROBE)
    parser.add_argument("--target", default="smtp,pop3",
                        help="a comma-separated list of smtp, pop3, rcpt (default smtp,pop3)")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="a flag given to both servers, e.g. --server-flag=--anvil-penalty=0 "
                             "(repeatable)")
    args = parser.parse_args(argv)
    targets = [name.strip() for name in args.target.split(",") if name.strip()]
    if not targets or set(targets) - {"smtp", "pop3", "rcpt"}:
        parser.error("--target takes smtp, pop3 and rcpt")
    if not 0 < args.duration <= 600 or not 0 < args.connections <= 500:
        parser.error("--duration must be in (0, 600] and --connections in (0, 500]")
    spool = tempfile.mkdtemp(prefix="abuse-bench-")
    try:
        mailbox_store.Store(spool, [DOMAIN], hostname="bench").add_user(USER, PASSWORD)
        for name in targets:
            if name in ("smtp", "rcpt"):
                protocol, argv, pattern = SMTP if name == "smtp" else RCPT, [
                    os.path.join(ROOT, "smtp_in.py"), "--spool", spool, "--listen",
                    "127.0.0.1:0", "--domain", DOMAIN, "--hostname", "bench", "--spf", "off", "--dkim-verify", "no", "--dmarc", "off"
                ] + (["--submission"] if name == "smtp" else []), \
                    r"listening on 127\.0\.0\.1:(\d+)"
            else:
                protocol, argv, pattern = POP3, [
                    os.path.join(ROOT, "pop3d.py"), "--spool", spool, "--listen",
                    "127.0.0.1:0", "--domain", DOMAIN, "--hostname", "bench"], \
                    r"listening on 127\.0\.0\.1 port (\d+)"
            process, port = start_server(argv + args.server_flag, pattern)
            try:
                figures = attack(protocol, port, args.connections, args.duration,
                                 args.probe_every)
            finally:
                stop_server(process)
            report(protocol, figures)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
