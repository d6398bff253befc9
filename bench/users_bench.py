#!/usr/bin/env python3
"""users_bench.py - what one more user costs when the users file already holds many.

For each user count (a users file of placeholder hashes, in a fresh spool) it prints:

- add-user in-process: Store.add_user()'s own work - lock, read the file, check the name
  is free, append one line, fsync - with the hash made beforehand (scrypt, N=2^14, r=8,
  p=8, takes about 0.4 s on its own and is printed apart, once). Beside it, the same step done the
  plain way (parse, rewrite whole, fsync, rename, fsync the folder) for comparison;
- add-user as a command: `python3 mailbox_store.py add-user` wall time, which includes the
  interpreter's start and the scrypt hash; "less start+hash" subtracts the time of a
  fresh interpreter that imports mailbox_store and makes one hash (its 16 MiB are
  touched afresh in each process), measured in the same run;
- pick-up: in a running Store (a role), the first lookup after another Store added a
  user (the new line alone is read), and after another Store changed a password (a
  rewrite: the file is parsed whole);
- the fsync floor of the disk (4 KiB append + fsync), which an add-user cannot go under.

Each figure is the median of --repeats with min-max, in milliseconds.

Run: python3 bench/users_bench.py [--users 1000,10000] [--repeats 5]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mailbox_store  # noqa: E402

PLACEHOLDER = "$scrypt$n=131072,r=8,p=1$" + "A" * 22 + "$" + "B" * 43   # a hash's length
RUN_TIMEOUT = 60.0                 # seconds one add-user command may take


def summary(values):
    return "%7.2f (%.2f-%.2f)" % (statistics.median(values), min(values), max(values))


def make_spool(count):
    spool = tempfile.mkdtemp(prefix="users-bench-")
    with open(os.path.join(spool, "users"), "w") as f:
        for number in range(count):
            f.write("user%d@bench.test:%s\n" % (number, PLACEHOLDER))
    os.chmod(os.path.join(spool, "users"), 0o600)
    return spool


def timed(function, *args):
    start = time.perf_counter()
    function(*args)
    return (time.perf_counter() - start) * 1000


def plain_add(store, address, stored):
    """The plain way, for comparison: parse the file, rewrite it whole."""
    def change(lines):
        if address in mailbox_store._parse_users(lines):
            raise ValueError("exists")
        lines.append("%s:%s" % (address, stored))
    store._locked_rewrite(store.users_path, 0o600, change)


def fsync_floor(folder, repeats):
    path = os.path.join(folder, "floor")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
        os.close(fd)
        times.append((time.perf_counter() - start) * 1000)
    os.unlink(path)
    return times


def cold_hash(repeats):
    """Wall time of a fresh interpreter importing mailbox_store and making one hash."""
    code = "import sys; sys.path.insert(0, %r); import mailbox_store; " \
           "mailbox_store.hash_password('bench')" % ROOT
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=RUN_TIMEOUT)
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench(count, repeats, hash_ms):
    spool = make_spool(count)
    try:
        store = mailbox_store.Store(spool)
        role = mailbox_store.Store(spool)
        role.recipient_exists("user0@bench.test")
        stored = mailbox_store.hash_password("bench")
        appended, rewritten, tail, whole = [], [], [], []
        for number in range(repeats):
            appended.append(timed(store._locked_append_user, "new%d@bench.test" % number,
                                  stored))
            tail.append(timed(role.recipient_exists, "new%d@bench.test" % number))
            rewritten.append(timed(plain_add, store, "plain%d@bench.test" % number, stored))
            role.recipient_exists("user0@bench.test")
            store.set_password("new%d@bench.test" % number, "again")
            whole.append(timed(role.recipient_exists, "new%d@bench.test" % number))
        commands = []
        for number in range(max(1, repeats // 2)):
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(ROOT, "mailbox_store.py"), "--spool",
                            spool, "add-user", "cmd%d@bench.test" % number], input=b"bench\n",
                           check=True, capture_output=True, timeout=RUN_TIMEOUT)
            commands.append((time.perf_counter() - start) * 1000)
        print("%6d users  add-user in-process (append)  %s ms" % (count, summary(appended)))
        print("%6d users  add-user plain (rewrite whole) %s ms" % (count, summary(rewritten)))
        print("%6d users  add-user command, all         %s ms" % (count, summary(commands)))
        print("%6d users  add-user command, less start+hash %s ms" % (
            count, summary([c - hash_ms for c in commands])))
        print("%6d users  role pick-up after add-user   %s ms" % (count, summary(tail)))
        print("%6d users  role pick-up after passwd     %s ms" % (count, summary(whole)))
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default="0,1000,10000",
                        help="comma-separated user counts (default 0,1000,10000; at most 100000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (1-50)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.users.split(",")]
    if not all(0 <= c <= 100000 for c in counts) or not 1 <= args.repeats <= 50:
        parser.error("user counts 0-100000, repeats 1-50")
    hashes = [timed(mailbox_store.hash_password, "bench") for _ in range(3)]
    print("scrypt hash (excluded from in-process figures) %s ms" % summary(hashes))
    colds = cold_hash(3)
    hash_ms = statistics.median(colds)
    print("python3 start + import + one hash, cold process  %s ms" % summary(colds))
    with tempfile.TemporaryDirectory(prefix="users-bench-") as folder:
        print("fsync floor (4 KiB append + fsync)             %s ms"
              % summary(fsync_floor(folder, args.repeats)))
    for count in counts:
        bench(count, args.repeats, hash_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
