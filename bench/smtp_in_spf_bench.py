"""What SPF costs smtp_in per MAIL command: --spf off against --spf tag, same session shape.

Starts a dnsmasq on loopback publishing `v=spf1 mx -all` for the sender's domain (tests/
dnsmasq_server.py), and one in-process smtp_in.SMTPServer per policy, all asking that
dnsmasq. One client session per run sends COUNT pairs of MAIL FROM and RSET, one at a time,
and waits for both replies each time; the runs alternate between the policies so that both
see the same machine load. dnsstub's cache is warm after the first MAIL, which is what a busy
MX mostly sees (a cold check adds its DNS round trips: see bench/bench_spf.py).

Printed: microseconds per MAIL+RSET, median (min-max) over the repeats, and the difference.
Run: python3 bench/smtp_in_spf_bench.py [--count 2000] [--repeats 7] [--json FILE]
"""

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import smtp_in  # noqa: E402
from dnsmasq_server import host_record, mx_host, start_dnsmasq, txt_record  # noqa: E402

ZONE = [txt_record("bench.test", "v=spf1 mx -all"), mx_host("bench.test", "mx.bench.test"),
        host_record("mx.bench.test", "127.0.0.1")]
POLICIES = ("off", "tag")
RUN_TIMEOUT = 60.0             # seconds one run may take


def one_run(port, count):
    """Microseconds per MAIL+RSET over COUNT pairs in one session."""
    with socket.create_connection(("127.0.0.1", port), timeout=RUN_TIMEOUT) as sock:
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"EHLO client.bench.test\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        started = time.perf_counter()
        for _ in range(count):
            sock.sendall(b"MAIL FROM:<sender@bench.test>\r\nRSET\r\n")
            mail, rset = replies.readline(), replies.readline()
            if not (mail.startswith(b"250") and rset.startswith(b"250")):
                raise RuntimeError("unexpected replies %r %r" % (mail, rset))
        elapsed = time.perf_counter() - started
        sock.sendall(b"QUIT\r\n")
    return elapsed / count * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="MAIL+RSET pairs per run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)
    spool = tempfile.mkdtemp(prefix="smtp-in-spf-bench-")
    servers = {}
    runs = {policy: [] for policy in POLICIES}
    try:
        with start_dnsmasq(ZONE) as dns:
            for policy in POLICIES:
                server = smtp_in.SMTPServer(("127.0.0.1", 0), {
                    "spool": os.path.join(spool, policy), "domain": ["example.test"],
                    "hostname": "mx.example.test", "spf": policy, "dns": dns.address,
                    "max_commands": 3 * args.count})
                threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
                servers[policy] = server
            for _ in range(args.repeats):
                for policy in POLICIES:
                    runs[policy].append(one_run(servers[policy].port, args.count))
    finally:
        for server in servers.values():
            server.stop(grace=0.5)
        shutil.rmtree(spool, ignore_errors=True)
    print("# smtp_in_spf_bench, loadavg %s, %d runs of %d MAIL+RSET pairs, dnsstub cache warm"
          % (open("/proc/loadavg").read().split()[0], args.repeats, args.count))
    for policy in POLICIES:
        values = runs[policy]
        print("--spf %-4s %7.0f us per MAIL+RSET (%.0f-%.0f)"
              % (policy, statistics.median(values), min(values), max(values)))
    print("SPF check, median difference: %.0f us per MAIL"
          % (statistics.median(runs["tag"]) - statistics.median(runs["off"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "us_per_mail_rset": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
