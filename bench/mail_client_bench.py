#!/usr/bin/env python3
"""mail_client_bench.py - how fast mail_client.py fetches and sends, beside the stdlib clients.

Starts pop3d.py (and, for send, smtp_in.py --submission) as their own processes on free
loopback ports over a throw-away spool, then measures, each row --repeats times, interleaved:

  fetch small   msgs/s  `fetch --keep` of N x 4 KB messages into a new Maildir: RETR, write,
                        fsync, rename, fsync new/, UIDL recorded and fsync'd, per message
  fetch large   MB/s    the same for M x 1 MB messages
  retr small    msgs/s  RETR only, nothing stored: mail_client.POP3Client beside poplib.POP3
  retr large    MB/s    likewise for the 1 MB messages
  send          msgs/s  one message per session (connect, EHLO, AUTH, MAIL, RCPT, DATA, QUIT)
                        through mail_client.send() (smtp_out.SMTPClient) beside smtplib

Loopback only; every network step has a timeout. Prints medians with min-max.

    python3 bench/mail_client_bench.py [--small 1000] [--large 20] [--sends 200] [--repeats 3] [--json FILE]
"""

import argparse
import json
import os
import poplib
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mail_client  # noqa: E402
import mailbox_store  # noqa: E402

USER, PASSWORD = "bench@bench.test", "benchpw"     # sends
SMALL, LARGE = "small@bench.test", "large@bench.test"  # the two maildrops fetched
LINE = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:76] + b"\n"
MESSAGE = (b"From: bench@bench.test\r\nTo: bench@bench.test\r\nSubject: send bench\r\n"
           b"Message-ID: <send@bench.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
           + b"x" * 1000 + b"\r\n")


def make_message(index, size):
    header = (b"From: sender@bench.test\nTo: bench@bench.test\nSubject: bench %d\n"
              b"Message-ID: <%d@bench.test>\n\n" % (index, index))
    return header + LINE * ((size - len(header)) // len(LINE))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(role, args, port, timeout=20.0):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, role)] + args,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("%s did not start on port %d" % (role, port))


def fetch_config(port, user, maildir):
    config = dict(mail_client.FETCH_DEFAULTS)
    config.update(server="127.0.0.1:%d" % port, user=user, password_env="BENCH_PASSWORD",
                  tls="none", maildir=maildir, keep=True, quiet=True, timeout=30.0)
    return config


def time_fetch(port, work, user, numbers):
    """Seconds for one `fetch --keep` of user's whole maildrop into a fresh Maildir."""
    maildir = tempfile.mkdtemp(dir=work)
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        status = mail_client.fetch(fetch_config(port, user, maildir), err=devnull)
    elapsed = time.perf_counter() - started
    stored = len(os.listdir(os.path.join(maildir, "new")))
    shutil.rmtree(maildir)
    if status != 0 or stored != len(numbers):
        raise SystemExit("fetch failed: status %d, %d stored" % (status, stored))
    return elapsed


def time_retr_ours(port, user, numbers):
    client = mail_client.POP3Client("127.0.0.1", port, tls="none", timeout=30.0)
    client.open()
    client.login(user, PASSWORD)
    started = time.perf_counter()
    octets = sum(len(client.retr(number, 1 << 30)) for number in numbers)
    elapsed = time.perf_counter() - started
    client.quit()
    return elapsed, octets


def time_retr_poplib(port, user, numbers):
    client = poplib.POP3("127.0.0.1", port, timeout=30.0)
    client.user(user)
    client.pass_(PASSWORD)
    started = time.perf_counter()
    octets = sum(client.retr(number)[2] for number in numbers)
    elapsed = time.perf_counter() - started
    client.quit()
    return elapsed, octets


def time_send_ours(port, count):
    config = dict(mail_client.SEND_DEFAULTS)
    config.update(server="127.0.0.1:%d" % port, user=USER, password_env="BENCH_PASSWORD",
                  tls="none", helo="bench.test", timeout=30.0, to=[USER])
    config["from"] = USER
    out = open(os.devnull, "w")
    started = time.perf_counter()
    for _ in range(count):
        if mail_client.send(config, MESSAGE, out=out) != 0:
            raise SystemExit("send failed")
    return time.perf_counter() - started


def time_send_smtplib(port, count):
    started = time.perf_counter()
    for _ in range(count):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.test", timeout=30.0) as client:
            client.login(USER, PASSWORD)
            client.sendmail(USER, [USER], MESSAGE)
    return time.perf_counter() - started


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def show(name, unit, values):
    s = summary(values)
    print("%-28s %9.1f %-7s (min %.1f, max %.1f)" % (name, s["median"], unit, s["min"], s["max"]))
    return s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="4 KB messages (default 1000)")
    parser.add_argument("--large", type=int, default=20, help="1 MB messages (default 20)")
    parser.add_argument("--sends", type=int, default=200, help="messages per send run (default 200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    os.environ["BENCH_PASSWORD"] = PASSWORD
    work = tempfile.mkdtemp(prefix="mail-client-bench-")
    processes = []
    try:
        spool = os.path.join(work, "spool")
        store = mailbox_store.Store(spool, ["bench.test"], hostname="bench")
        for user in (USER, SMALL, LARGE):
            store.add_user(user, PASSWORD)
        for index in range(args.small):
            store.deliver(SMALL, make_message(index, 4096), "sender@bench.test")
        for index in range(args.large):
            store.deliver(LARGE, make_message(index, 1 << 20), "sender@bench.test")
        pop3_port, smtp_port = free_port(), free_port()
        processes.append(start("pop3d.py", ["--spool", spool, "--listen",
                                            "127.0.0.1:%d" % pop3_port], pop3_port))
        if args.sends:
            processes.append(start("smtp_in.py", [
                "--spool", spool, "--listen", "127.0.0.1:%d" % smtp_port, "--submission",
                "--domain", "bench.test", "--hostname", "bench.test"], smtp_port))
        small = list(range(1, args.small + 1))
        large = list(range(1, args.large + 1))
        rows = {key: [] for key in ("fetch_small", "fetch_large", "retr_small_ours",
                                    "retr_small_poplib", "retr_large_ours", "retr_large_poplib",
                                    "send_ours", "send_smtplib")}
        time_fetch(pop3_port, work, SMALL, small)                  # warm-up: page cache
        for _ in range(args.repeats):
            rows["fetch_small"].append(len(small) / time_fetch(pop3_port, work, SMALL, small))
            rows["fetch_large"].append(
                len(large) * (1 << 20) / time_fetch(pop3_port, work, LARGE, large) / 1e6)
            seconds, _ = time_retr_ours(pop3_port, SMALL, small)
            rows["retr_small_ours"].append(len(small) / seconds)
            seconds, _ = time_retr_poplib(pop3_port, SMALL, small)
            rows["retr_small_poplib"].append(len(small) / seconds)
            seconds, octets = time_retr_ours(pop3_port, LARGE, large)
            rows["retr_large_ours"].append(octets / seconds / 1e6)
            seconds, octets = time_retr_poplib(pop3_port, LARGE, large)
            rows["retr_large_poplib"].append(octets / seconds / 1e6)
            if args.sends:
                rows["send_ours"].append(args.sends / time_send_ours(smtp_port, args.sends))
                rows["send_smtplib"].append(args.sends / time_send_smtplib(smtp_port, args.sends))
        print("%d x 4 KB + %d x 1 MB messages, %d sends, %d repeats (median, min-max)"
              % (args.small, args.large, args.sends, args.repeats))
        results = {
            "fetch 4 KB": show("fetch --keep 4 KB", "msgs/s", rows["fetch_small"]),
            "fetch 1 MB": show("fetch --keep 1 MB", "MB/s", rows["fetch_large"]),
            "retr 4 KB mail_client": show("RETR 4 KB, mail_client", "msgs/s", rows["retr_small_ours"]),
            "retr 4 KB poplib": show("RETR 4 KB, poplib", "msgs/s", rows["retr_small_poplib"]),
            "retr 1 MB mail_client": show("RETR 1 MB, mail_client", "MB/s", rows["retr_large_ours"]),
            "retr 1 MB poplib": show("RETR 1 MB, poplib", "MB/s", rows["retr_large_poplib"]),
        }
        if args.sends:
            results["send mail_client"] = show("send 1 KB, mail_client", "msgs/s", rows["send_ours"])
            results["send smtplib"] = show("send 1 KB, smtplib", "msgs/s", rows["send_smtplib"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results, "raw": rows}, f, indent=2)
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
