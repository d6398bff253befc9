#!/usr/bin/env python3
"""memory_bench.py - memory of smtp_in and the router while many large messages arrive.

Starts smtp_in.py and mta.py's router, each its own process as run_all starts them but with
--processes 1 (so that each daemon's sessions and deliveries are one pid's memory), on a
fresh spool on 127.0.0.1 with one local user, then opens --sessions SMTP sessions at once
from one client address, each sending one --size message (dot-stuffed once, sent from one
shared buffer, so the client's own memory does not grow with the sessions). Once every
message is in the user's Maildir it prints, for both daemons, the peak RSS of the run
(VmHWM from /proc/PID/status) and then their RSS (VmRSS) every --poll seconds until both
are under the settled target or --settle seconds have passed, and the figures against the
targets: a peak under --peak-target MiB each, and back under --settled-target MiB within
--settle seconds.

Every count and wait is bounded: the sessions, each socket's timeout, the whole run
(--timeout), the settling time. Everything listens on 127.0.0.1 only.

--rounds N sends the sessions N times, one round after the other, and prints both peaks
and RSS after each round: memory that is given back does not grow from round to round.

Run: python3 bench/memory_bench.py [--sessions 40] [--size-mib 33] [--rounds 1] [--json FILE]
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "bench.test"
USER = "user@bench.test"
HOSTNAME = "mail.bench.test"
SOCKET_TIMEOUT = 300.0             # seconds any one read or write of a session may take
SEND_PIECE = 1 << 20               # octets per sendall() of the shared payload


def make_payload(size):
    """A message of about size octets in 78-character lines, as sent after DATA: already
    dot-stuffed (no line starts with "."), ending in CRLF.CRLF."""
    header = (b"From: bench@client.test\r\nTo: %s\r\nSubject: memory bench\r\n\r\n"
              % USER.encode())
    line = b"m" * 76 + b"\r\n"
    return header + line * max(0, (size - len(header)) // len(line)) + b".\r\n"


def vm_kib(pid, field):
    """A VmXXX field of /proc/PID/status in KiB, or None when the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_for_log(path, pattern, process, seconds):
    """Group 1 of pattern once it appears in the log at path; exits if it does not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            found = re.search(pattern, f.read())
        if found:
            return found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit("no %r in %s" % (pattern, path))


def reply(stream):
    """The code of one (multi-line) SMTP reply."""
    while True:
        line = stream.readline(4096)
        if not line:
            raise ConnectionError("the server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


def session(port, payload):
    """One SMTP session sending payload; returns the reply code after the data."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        stream = sock.makefile("rb")
        try:
            for command, expected in ((None, 220), (b"EHLO client.test", 250),
                                      (b"MAIL FROM:<bench@client.test>", 250),
                                      (b"RCPT TO:<%s>" % USER.encode(), 250), (b"DATA", 354)):
                if command is not None:
                    sock.sendall(command + b"\r\n")
                code = reply(stream)
                if code != expected:
                    return code
            view = memoryview(payload)
            for start in range(0, len(view), SEND_PIECE):
                sock.sendall(view[start:start + SEND_PIECE])
            code = reply(stream)
            sock.sendall(b"QUIT\r\n")
            return code
        finally:
            stream.close()


def start_daemons(base, args):
    spool = os.path.join(base, "spool")
    os.makedirs(spool)
    with open(os.path.join(spool, "users"), "w") as f:
        f.write("%s:$placeholder$\n" % USER)
    logs = {name: os.path.join(base, name + ".log") for name in ("smtp_in", "mta")}
    common = ["--spool", spool, "--domain", DOMAIN, "--hostname", HOSTNAME]
    with open(logs["mta"], "wb") as log:
        router = subprocess.Popen([sys.executable, os.path.join(ROOT, "mta.py")] + common
                                  + ["--processes", "1"],      # every delivery in this pid
                                  stdout=subprocess.DEVNULL, stderr=log)
    with open(logs["smtp_in"], "wb") as log:
        smtp_in = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "smtp_in.py")] + common
            + ["--listen", "127.0.0.1:0", "--spf", "off", "--dkim-verify", "no", "--dmarc", "off",
               "--max-per-address", str(args.sessions + 10),
               "--max-connections", str(args.sessions + 10),
               "--max-size", str(args.size_mib * 1024 * 1024 + 1024 * 1024),
               "--processes", "1"],     # every session's memory in this one pid
            stdout=subprocess.DEVNULL, stderr=log)
    port = int(wait_for_log(logs["smtp_in"], r"listening on 127\.0\.0\.1:(\d+)", smtp_in, 30))
    wait_for_log(logs["mta"], r"(watching) ", router, 30)
    return spool, port, {"smtp_in": smtp_in, "router": router}, logs


def delivered(spool):
    new = os.path.join(spool, "mail", DOMAIN, USER.split("@")[0], "Maildir", "new")
    try:
        return len(os.listdir(new))
    except FileNotFoundError:
        return 0


def run(args, base):
    spool, port, daemons, logs = start_daemons(base, args)
    try:
        start_rss = {name: vm_kib(p.pid, "VmRSS") for name, p in daemons.items()}
        payload = make_payload(args.size_mib * 1024 * 1024)
        started = time.monotonic()
        deadline = started + args.timeout
        codes, rounds = [], []
        for number in range(args.rounds):
            with concurrent.futures.ThreadPoolExecutor(args.sessions) as pool:
                codes += pool.map(lambda _: session(port, payload), range(args.sessions))
            sent = time.monotonic() - started
            while delivered(spool) < codes.count(250) and time.monotonic() < deadline:
                time.sleep(0.2)
            rounds.append({name: (vm_kib(p.pid, "VmHWM"), vm_kib(p.pid, "VmRSS"))
                           for name, p in daemons.items()})
            print("  round %d: %d in the Maildir; smtp_in peak %s KiB, now %s KiB; router "
                  "peak %s KiB, now %s KiB" % ((number + 1, delivered(spool))
                                               + rounds[-1]["smtp_in"] + rounds[-1]["router"]),
                  flush=True)
            if time.monotonic() >= deadline:
                break
        del payload
        accepted = codes.count(250)
        in_maildir = delivered(spool)
        routed = time.monotonic() - started
        peak = {name: vm_kib(p.pid, "VmHWM") for name, p in daemons.items()}
        samples = []
        settle_start = time.monotonic()
        while True:
            waited = time.monotonic() - settle_start
            rss = {name: vm_kib(p.pid, "VmRSS") for name, p in daemons.items()}
            samples.append((round(waited, 1), rss))
            print("  after %4.1f s: smtp_in %s KiB, router %s KiB"
                  % (waited, rss["smtp_in"], rss["router"]), flush=True)
            if all(v is not None and v < args.settled_target * 1024 for v in rss.values()):
                break
            if waited >= args.settle:
                break
            time.sleep(min(args.poll, max(0.0, args.settle - waited)))
        settled_after = samples[-1][0]
        return {"sessions": args.sessions * args.rounds, "size_mib": args.size_mib,
                "accepted": accepted, "rounds": rounds,
                "codes": sorted(set(codes)), "in_maildir": in_maildir, "send_seconds": sent,
                "to_maildir_seconds": routed, "start_rss_kib": start_rss, "peak_kib": peak,
                "rss_samples": samples, "settled": samples[-1][1],
                "settled_after": settled_after, "logs": logs}
    finally:
        for process in daemons.values():
            process.terminate()
        for process in daemons.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def report(result, args):
    mib = lambda kib: "-" if kib is None else "%.0f MiB" % (kib / 1024)   # noqa: E731
    print("%d sessions x %d MiB from one address: %d accepted (replies %s), %d in the Maildir"
          % (result["sessions"], result["size_mib"], result["accepted"], result["codes"],
             result["in_maildir"]))
    print("sent in %.1f s, all in the Maildir after %.1f s"
          % (result["send_seconds"], result["to_maildir_seconds"]))
    print("%-8s %10s %12s %14s   %s" % ("daemon", "start", "peak VmHWM", "VmRSS after",
                                         "targets: peak < %d MiB, < %d MiB within %d s"
                                         % (args.peak_target, args.settled_target, args.settle)))
    ok = result["accepted"] == result["sessions"] == result["in_maildir"]
    for name in ("smtp_in", "router"):
        peak, settled = result["peak_kib"][name], result["settled"][name]
        peak_ok = peak is not None and peak < args.peak_target * 1024
        settled_ok = settled is not None and settled < args.settled_target * 1024
        ok = ok and peak_ok and settled_ok
        print("%-8s %10s %12s %14s   peak %s, settled %s (%.0f s)"
              % (name, mib(result["start_rss_kib"][name]), mib(peak), mib(settled),
                 "ok" if peak_ok else "OVER", "ok" if settled_ok else "OVER",
                 result["settled_after"]))
    print("result: %s" % ("every target met" if ok else "a target missed"))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=40, help="SMTP sessions at once")
    parser.add_argument("--size-mib", type=int, default=33, help="message size, MiB")
    parser.add_argument("--rounds", type=int, default=1,
                        help="send the sessions this many times, one round after the other")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait for the RSS to come down")
    parser.add_argument("--poll", type=float, default=3.0, help="seconds between RSS looks")
    parser.add_argument("--peak-target", type=int, default=150, help="MiB")
    parser.add_argument("--settled-target", type=int, default=80, help="MiB")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the sending and delivering may take")
    parser.add_argument("--keep", action="store_true", help="keep the spool and logs")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args(argv)
    if not (1 <= args.sessions <= 200 and 1 <= args.size_mib <= 200 and 1 <= args.rounds <= 20):
        parser.error("--sessions 1-200, --size-mib 1-200 and --rounds 1-20")
    base = tempfile.mkdtemp(prefix="memory-bench-")
    try:
        result = run(args, base)
        ok = report(result, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if args.keep:
            print("spool and logs kept in %s" % base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
