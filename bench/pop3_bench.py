#!/usr/bin/env python3
"""pop3_bench.py - POP3 download throughput and memory of pop3d.py, optionally beside another server.

Builds a throw-away spool with users bench0..bench7 (password "benchpw"), each holding the same
1000 x 4 KB and 100 x 1 MB messages (LF line ends, delivered through mailbox_store and hard-linked
between the users), starts `pop3d.py` on a free loopback port and measures with one raw-socket
client per process (each RETR read up to CRLF.CRLF), timed from the moment every client of
the run has logged in:

  small  msgs/s   RETR of every 4 KB message, --passes times, at each --conc
  large  MB/s     RETR of every 1 MB message (1 MB = 1e6 octets of RETR response)
  memory          --mem-clients clients each RETR a --mem-size message at once (users mem0..);
                  the server's peak RSS (VmHWM) and its growth over the idle server

--floor also measures bench/floor.py's POP3 yardstick on bench0's Maildir: the least a
threaded Python server can do per RETR (open, read, close, CRLF and dots, one send), so
that the ratios show what is left to take.

Other servers with the same mailboxes (Dovecot: python3 bench/peers.py start dovecot) are measured
in the same run, interleaved, with --target NAME=HOST:PORT (users bench{i}, password benchpw); the ratio
column compares each to pop3d. pop3d runs with --processes (default auto, as pop3d's own
default: one worker process per CPU it may use); the memory run uses one process, so that
the peak is that of the process serving every client. Loopback only; every run is bounded
by --timeout.

    python3 bench/pop3_bench.py --repeats 3 [--target dovecot=127.0.0.1:PORT] [--json FILE]
"""

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import floor  # noqa: E402  (bench/, the script's own folder)
import mailbox_store  # noqa: E402
import run_all  # noqa: E402  (its child_cpus places pop3d as run_all does)

PASSWORD = "benchpw"
LINE = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:76] + b"\n"


def make_message(index, size):
    header = (b"From: sender@bench.test\nTo: user@bench.test\nSubject: bench %d\n"
              b"Message-ID: <%d@bench.test>\n\n" % (index, index))
    return header + LINE * ((size - len(header)) // len(LINE))


def build_spool(spool, users, small, large, mem_clients, mem_size):
    """Users bench0.. with the same messages (hard links), mem0.. with one big message each."""
    store = mailbox_store.Store(spool, ["bench.test"], hostname="bench")
    for i in range(users):
        store.add_user("bench%d@bench.test" % i, PASSWORD)
    for i in range(mem_clients):
        store.add_user("mem%d@bench.test" % i, PASSWORD)
    for i in range(small + large):
        store.deliver("bench0@bench.test", make_message(i, 4096 if i < small else 1048576), "s@bench.test")
    source = os.path.join(store.maildir_path("bench0@bench.test"), "new")
    for i in range(1, users):
        target = os.path.join(store.maildir_path("bench%d@bench.test" % i), "new")
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(source):
            os.link(os.path.join(source, name), os.path.join(target, name))
    if mem_clients:
        big = store.deliver("mem0@bench.test", make_message(0, mem_size), "s@bench.test")
        for i in range(1, mem_clients):
            target = os.path.join(store.maildir_path("mem%d@bench.test" % i), "new")
            os.makedirs(target, exist_ok=True)
            os.link(big, os.path.join(target, os.path.basename(big)))


def start_pop3d(spool, timeout, cpus="auto", processes="auto"):
    """pop3d on a free port with that many worker processes, on the CPUs run_all would give
    it (cpus as run_all's --cpus)."""
    placed = run_all.child_cpus(cpus, "pop3d", processes)
    on_cpu = (["--cpus", placed] if placed else []) + ["--processes", str(processes)]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "pop3d.py"), "--spool", spool,
                               "--listen", "127.0.0.1:0", "--hostname", "bench",
                               # many clients from one address are the load here, not an
                               # attack: the anvil's documented exemption, as Postfix's
                               # trusted networks
                               "--anvil-exempt", "127.0.0.0/8"] + on_cpu,
                              stderr=subprocess.PIPE, cwd=spool)
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        line = server.stderr.readline()
        found = re.search(rb"listening on 127.0.0.1 port (\d+)", line)
        if found:
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()
            return server, int(found.group(1))
        if not line and server.poll() is not None:
            break
    server.kill()
    raise SystemExit("pop3d did not start")


# --- The client: one process per connection ---

class Session:
    def __init__(self, port, user, timeout):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.reply()
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + PASSWORD.encode())

    def reply(self):
        while b"\r\n" not in self.buffer:
            self._fill()
        end = self.buffer.index(b"\r\n")
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        if not line.startswith(b"+OK"):
            raise RuntimeError("server said %r" % line)
        return line

    def _fill(self):
        block = self.sock.recv(262144)
        if not block:
            raise RuntimeError("connection closed")
        self.buffer += block

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def multiline(self, line):
        """Send line; return the octets of the multi-line body (stuffed, with the end)."""
        self.sock.sendall(line + b"\r\n")
        self.reply()
        while True:
            end = self.buffer.find(b"\r\n.\r\n", max(0, len(self.buffer) - 262144 - 5))
            if end >= 0 or self.buffer.startswith(b".\r\n"):
                size = end + 5 if end >= 0 else 3
                body = bytes(self.buffer[:size])
                del self.buffer[:size]
                return body
            self._fill()

    def close(self):
        try:
            self.command(b"QUIT")
        finally:
            self.sock.close()


def client_run(args):
    port, user, cls, passes, big, timeout, start_line = args
    session = Session(port, user, timeout)
    listing = session.multiline(b"LIST").split(b"\r\n")[:-2]
    numbers = [int(n) for n, size in (line.split() for line in listing)
               if (int(size) < big) == (cls == "small")]
    if start_line is not None:
        start_line.wait(timeout)       # every client logged in: the logins are not timed
    started = time.perf_counter()
    octets = 0
    for _ in range(passes):
        for number in numbers:
            octets += len(session.multiline(b"RETR %d" % number))
    elapsed = time.perf_counter() - started
    session.close()
    return started, started + elapsed, len(numbers) * passes, octets


def measure(ports, user_pattern, cls, conc, passes, big, timeout):
    """(messages/s, MB/s) of conc clients at once, spread over the list ports, from the
    moment all of them are logged in (a login's password hash is not a download)."""
    with multiprocessing.Manager() as manager, multiprocessing.Pool(conc) as pool:
        start_line = manager.Barrier(conc)
        jobs = [(ports[i % len(ports)], user_pattern.format(i=i), cls, passes, big, timeout,
                 start_line) for i in range(conc)]
        results = pool.map(client_run, jobs, chunksize=1)
    wall = max(r[1] for r in results) - min(r[0] for r in results)
    messages = sum(r[2] for r in results)
    octets = sum(r[3] for r in results)
    return messages / wall, octets / wall / 1e6


def memory_run(server, port, clients, timeout):
    """clients RETR their big message at once; return (idle RSS, peak RSS) of the server, MiB."""
    def status(key):
        text = open("/proc/%d/status" % server.pid).read()
        return int(re.search(key + r":\s+(\d+) kB", text).group(1)) / 1024
    idle = status("VmRSS")
    jobs = [(port, "mem%d@bench.test" % i, "large", 1, 65536, timeout, None)
            for i in range(clients)]
    with multiprocessing.Pool(clients) as pool:
        results = pool.map(client_run, jobs, chunksize=1)
    assert all(r[2] == 1 for r in results)
    return idle, status("VmHWM")


def summary(values):
    return "%10.1f (%.1f-%.1f)" % (statistics.median(values), min(values), max(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--conc", default="1,8")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100)
    parser.add_argument("--mem-clients", type=int, default=10)
    parser.add_argument("--mem-size", type=int, default=50 * 1024 * 1024)
    parser.add_argument("--target", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="another POP3 server with users bench{i}/benchpw (loopback only)")
    parser.add_argument("--timeout", type=float, default=120.0, help="socket timeout, seconds")
    parser.add_argument("--cpus", default="auto",
                        help="CPUs for pop3d, as run_all's --cpus (auto: the one run_all gives it; "
                             "none: no binding)")
    parser.add_argument("--processes", default="auto",
                        help="pop3d's --processes for the throughput runs (default auto)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure bench/floor.py's POP3 yardstick (as target floor)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    concs = [int(c) for c in args.conc.split(",")]
    targets = []
    for spec in args.target:
        name, _, hostport = spec.partition("=")
        host, _, port = hostport.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("loopback targets only: %s" % spec)
        targets.append((name, [int(port)], "bench{i}"))
    work = tempfile.mkdtemp(prefix="pop3bench-")
    server = yardstick = None
    try:
        spool = os.path.join(work, "spool")
        build_spool(spool, max(concs), args.small, args.large, args.mem_clients, args.mem_size)
        server, port = start_pop3d(spool, 30, args.cpus, args.processes)
        targets.insert(0, ("pop3d", [port], "bench{i}@bench.test"))
        if args.floor:
            maildir = mailbox_store.Store(spool, ["bench.test"]).maildir_path("bench0@bench.test")
            yardstick = floor.Floor("pop3", maildir).start()
            targets.append(("floor", [yardstick.port], "bench{i}"))
        for name, ports, user in targets:       # untimed warm-up: page cache, logins
            measure(ports, user, "small", 1, 1, 65536, args.timeout)
        rows = {}
        for cls in ("small", "large"):
            for conc in concs:
                for _ in range(args.repeats):
                    for name, ports, user in targets:
                        rate, mbps = measure(ports, user, cls, conc, args.passes, 65536, args.timeout)
                        rows.setdefault((cls, conc, name), []).append(rate if cls == "small" else mbps)
        print("%-6s %4s  %-10s %26s %7s" % ("class", "conc", "server", "median (min-max)", "ratio"))
        for (cls, conc, name), values in rows.items():
            base = statistics.median(rows[(cls, conc, "pop3d")])
            ratio = base / statistics.median(values)
            print("%-6s %4d  %-10s %20s %s %6.2fx" % (cls, conc, name, summary(values),
                                                   "msgs/s" if cls == "small" else "MB/s  ", ratio))
        print("(ratio = pop3d / that server; pop3d's own row is 1.00x)")
        memory = None
        if args.mem_clients:
            server.terminate()
            server.wait(10)
            # fresh, one process: VmHWM counts from its start, and every session is its own
            server, port = start_pop3d(spool, 30, args.cpus, "1")
            idle, peak = memory_run(server, port, args.mem_clients, args.timeout)
            memory = {"clients": args.mem_clients, "message_bytes": args.mem_size,
                      "idle_rss_mib": round(idle, 1), "peak_rss_mib": round(peak, 1)}
            print("memory: %d clients x %.0f MB message: server RSS idle %.1f MiB, peak %.1f MiB"
                  % (args.mem_clients, args.mem_size / 1e6, idle, peak))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": [{"class": c, "conc": n, "server": s, "values": v}
                                    for (c, n, s), v in rows.items()], "memory": memory}, f, indent=1)
    finally:
        if yardstick is not None:
            yardstick.stop()
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
