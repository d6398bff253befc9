"""crash_bench.py - kill -9 the whole system under load, again and again; count what survives.

Starts run_all.py on 127.0.0.2 with its own spool, sends messages with unique tokens from
several concurrent clients (one SMTP session each), kills every process of run_all with
SIGKILL at a random moment, restarts it, and after the last round lets the queue drain and
counts the tokens over POP3. Every message that got a 250 after DATA must be there; the
script reports duplicates (a crash between a delivery and its state record).

Run: python3 bench/crash_bench.py [--rounds 10] [--messages 300] [--clients 6] [--seed N] [--json]
Bounded: every round ends by itself; the whole run stops after --max-seconds. Loopback only.
"""

import argparse
import json
import os
import poplib
import random
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.2"
USER, DOMAIN, PASSWORD = "alice", "crash.test", "crash-bench-pw"
DRAIN_SECONDS = 60


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class System:
    """run_all.py in its own process group, so that one killpg ends all of it."""

    def __init__(self, spool):
        self.spool = spool
        self.ports = {"smtp": free_port(), "submission": free_port(), "pop3": free_port()}
        self.process = None

    def start(self):
        argv = [sys.executable, os.path.join(ROOT, "run_all.py"), "--spool", self.spool,
                "--domain", DOMAIN, "--hostname", "mail." + DOMAIN, "--spf", "off", "--dmarc", "off",
                "--dns", "127.0.0.1:9"]
        for name, port in self.ports.items():
            argv += ["--" + name, "%s:%d" % (HOST, port)]
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        until = time.monotonic() + 20
        for port in self.ports.values():
            while True:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > until:
                        raise SystemExit("crash_bench: run_all did not start")
                    time.sleep(0.05)

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        # The roles die a moment after run_all. Until the last is gone, a listener of the
        # killed system could answer the next start()'s probe, and that round's clients
        # would then find no server at all.
        until = time.monotonic() + 10
        while time.monotonic() < until:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return                     # not started, or killed and not started again
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def send(port, tokens, acknowledged, lock, stop):
    for token in tokens:
        if stop.is_set():
            return
        try:
            with smtplib.SMTP(HOST, port, timeout=10) as client:
                client.sendmail("load@example.net", ["%s@%s" % (USER, DOMAIN)],
                                "Subject: token %s\r\n\r\ntoken %s\r\n" % (token, token))
            with lock:
                acknowledged.add(token)
        except (OSError, smtplib.SMTPException):
            pass


def delivered_tokens(port):
    client = poplib.POP3(HOST, port, timeout=30)
    try:
        client.user("%s@%s" % (USER, DOMAIN))
        client.pass_(PASSWORD)
        counts = {}
        for number in range(1, client.stat()[0] + 1):
            for line in client.top(number, 0)[1]:
                if line.startswith(b"Subject: token "):
                    token = line.split()[-1].decode()
                    counts[token] = counts.get(token, 0) + 1
        return counts
    finally:
        client.quit()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--messages", type=int, default=300, help="messages per round")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="crash-bench-") as folder:
        spool = os.path.join(folder, "spool")
        subprocess.run([sys.executable, os.path.join(ROOT, "mailbox_store.py"), "--spool", spool,
                        "add-user", "%s@%s" % (USER, DOMAIN)], input=(PASSWORD + "\n").encode(),
                       check=True, capture_output=True)
        system = System(spool)
        acknowledged, lock = set(), threading.Lock()
        rounds = []
        try:
            for number in range(args.rounds):
                if time.monotonic() > deadline:
                    break
                system.start()
                stop = threading.Event()
                tokens = [uuid.uuid4().hex for _ in range(args.messages)]
                before = len(acknowledged)
                senders = [threading.Thread(target=send, args=(system.ports["smtp"],
                                                               tokens[i::args.clients],
                                                               acknowledged, lock, stop))
                           for i in range(args.clients)]
                for sender in senders:
                    sender.start()
                kill_after = rng.uniform(0.2, 2.0)
                time.sleep(kill_after)
                system.kill()
                stop.set()
                for sender in senders:
                    sender.join(30)
                rounds.append({"round": number + 1, "kill_after": round(kill_after, 3),
                               "acknowledged": len(acknowledged) - before})
                print("round %d: killed after %.2f s, %d acknowledged"
                      % (number + 1, kill_after, len(acknowledged) - before), file=sys.stderr)
            system.start()
            until = time.monotonic() + DRAIN_SECONDS
            while True:
                counts = delivered_tokens(system.ports["pop3"])
                if acknowledged <= set(counts) or time.monotonic() > until:
                    break
                time.sleep(0.5)
        finally:                       # an error must not leave the system running
            system.stop()
    missing = len(acknowledged - set(counts))
    duplicates = sum(n - 1 for n in counts.values())
    result = {"rounds": rounds, "acknowledged": len(acknowledged), "delivered": len(counts),
              "missing": missing, "duplicates": duplicates}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("rounds %d, acknowledged %d, delivered %d (incl. unacknowledged), missing %d, "
              "duplicates %d" % (len(rounds), len(acknowledged), len(counts), missing, duplicates))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
