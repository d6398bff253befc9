#!/usr/bin/env python3
"""maildir_bench.py - POP3 login + STAT on large Maildirs, pop3d.py beside Dovecot.

For each --counts size it builds a Maildir of that many small messages (about 300 octets;
one in ten named without ,S= and ,W=, as another writer may leave them, so that its size
must be measured), once for pop3d (SPOOL/mail/bench.test/user/Maildir) and once for Dovecot
(bench/peers.Dovecot, users bench0.., same messages). Each server gets one warm-up login
first: for pop3d the verified-login cache then spares the scrypt hash (0.4 s, once an
hour per user and password) and the Maildir index is written; Dovecot builds its index.
Then, interleaved, --repeats times each:

- login+STAT: connect, USER, PASS, STAT, QUIT, timed from connect to the QUIT reply
  (a settled Maildir: nothing changed since the last login);
- ours after a delivery: the same with one new message written into new/ just before
  (pop3d lists the Maildir again; sizes it measured before are not read again).

Also printed for pop3d: its RSS before the first login, at the peak (VmHWM) and after the
sessions, and, in this process, the memory a listed message takes (tracemalloc).

Run: python3 bench/maildir_bench.py [--counts 1000,10000,100000] [--repeats 5] [--no-dovecot]
"""

import argparse
import os
import poplib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mailbox_store  # noqa: E402
import peers  # noqa: E402
import pop3_bench  # noqa: E402

USER = "user@bench.test"
PASSWORD = peers.POP3_PASSWORD
TIMEOUT = 120.0                    # seconds any one session may take


def summary(values):
    return "%8.2f ms (%.2f-%.2f)" % (statistics.median(values), min(values), max(values))


def message(number):
    return (b"From: a@bench.test\r\nTo: user@bench.test\r\nSubject: message %d\r\n\r\n"
            b"%s\r\n" % (number, b"x" * 200))


def fill_maildir(maildir, count):
    """count messages in new/, named as maildir_deliver names them (one in ten without sizes)."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    start = int(time.time()) - count
    for number in range(count):
        data = message(number)
        name = "%d.M%06dP1Q%dR0.bench" % (start + number, number % 1000000, number)
        if number % 10:
            name += ",S=%d,W=%d" % (len(data), len(data))
        with open(os.path.join(maildir, "new", name), "wb") as f:
            f.write(data)
    # Settled: the folders last changed a while ago (as after the last delivery).
    past = time.time() - 60
    for sub in ("new", "cur"):
        os.utime(os.path.join(maildir, sub), (past, past))


def login_stat(port, user):
    """Milliseconds from connect to QUIT's reply; (ms, (count, octets))."""
    start = time.perf_counter()
    client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
    client.user(user)
    client.pass_(PASSWORD)
    stat = client.stat()
    client.quit()
    return (time.perf_counter() - start) * 1000, stat


def rss(pid, key="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def bytes_per_message(spool, count):
    """Memory an open mailbox holds per listed message, measured in this process."""
    store = mailbox_store.Store(spool)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    mailbox = store.open_mailbox(USER)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    mailbox.close()
    return held / max(1, count)


def bench(count, repeats, dovecot_wanted):
    folder = tempfile.mkdtemp(prefix="maildir-bench-")
    os.chmod(folder, 0o755)            # Dovecot's processes, other users, look inside
    server = dovecot = None
    try:
        spool = os.path.join(folder, "spool")
        os.makedirs(spool)
        with open(os.path.join(spool, "users"), "w") as f:
            f.write("%s:%s\n" % (USER, mailbox_store.hash_password(PASSWORD)))
        maildir = os.path.join(spool, "mail", "bench.test", "user", "Maildir")
        started = time.perf_counter()
        fill_maildir(maildir, count)
        note = "built in %.1f s" % (time.perf_counter() - started)
        if dovecot_wanted:
            try:
                dovecot_maildir = os.path.join(folder, "dovecot", "mail", "Maildir")
                fill_maildir(dovecot_maildir, count)
                uid, gid = peers._nobody()
                peers._chown_tree(os.path.join(folder, "dovecot", "mail"), uid, gid)
                dovecot = peers.Dovecot(os.path.join(folder, "dovecot"),
                                        maildir=dovecot_maildir).start()
            except (peers.PeerMissing, OSError, subprocess.SubprocessError) as exc:
                print("dovecot: skipped: %s" % exc)
                dovecot = None
        # one process: the RSS figures are then those of the process serving the session
        server, port = pop3_bench.start_pop3d(spool, TIMEOUT, cpus="none", processes="1")
        idle_rss = rss(server.pid)
        first, stat = login_stat(port, USER)
        ours, theirs, changed = [], [], []
        dovecot_first = login_stat(dovecot.port, "bench0")[0] if dovecot else None
        for number in range(repeats):
            ours.append(login_stat(port, USER)[0])
            if dovecot:
                theirs.append(login_stat(dovecot.port, "bench0")[0])
        for number in range(repeats):
            data = message(count + number)
            path = os.path.join(maildir, "new", "%d.M0P2Q%dR1.bench,S=%d,W=%d"
                                % (time.time(), number, len(data), len(data)))
            with open(path, "wb") as f:
                f.write(data)
            changed.append(login_stat(port, USER)[0])
        time.sleep(0.5)                # the last session's thread has ended
        peak, after = rss(server.pid, "VmHWM"), rss(server.pid)
        print("%6d messages (%s; STAT %s)" % (count, note, stat))
        print("  pop3d  first login (scrypt hash, index written)  %8.2f ms" % first)
        print("  pop3d  login+STAT, settled                       %s" % summary(ours))
        if dovecot:
            print("  dovecot first login (index built)                %8.2f ms" % dovecot_first)
            print("  dovecot login+STAT, settled index                %s" % summary(theirs))
            print("  ratio pop3d / dovecot (medians)                  %8.2f"
                  % (statistics.median(ours) / statistics.median(theirs)))
        print("  pop3d  login+STAT after a delivery               %s" % summary(changed))
        print("  pop3d  RSS: %.1f MiB idle, %.1f MiB peak, %.1f MiB after the sessions"
              % (idle_rss, peak, after))
        print("  memory per listed message (in-process)           %8.0f bytes"
              % bytes_per_message(spool, count + repeats))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if dovecot is not None:
            dovecot.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1000,10000,100000",
                        help="comma-separated Maildir sizes (each 1-200000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed logins per figure (1-50)")
    parser.add_argument("--no-dovecot", action="store_true", help="pop3d only")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    if not all(1 <= c <= 200000 for c in counts) or not 1 <= args.repeats <= 50:
        parser.error("counts 1-200000, repeats 1-50")
    for count in counts:
        bench(count, args.repeats, not args.no_dovecot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
