"""What DKIM verification (and DMARC) costs smtp_in on the MX: accepted messages per second.

Starts a dnsmasq on loopback publishing the signer's key record and a DMARC record
(tests/dnsmasq_server.py), and one in-process smtp_in.SMTPServer per setting, all asking
that dnsmasq: "off" (dkim_verify no, dmarc off), "dkim" (dkim_verify yes) and "dkim+dmarc"
(dmarc tag too); SPF is off in all three. One client session per run sends COUNT signed
messages of about 1 KB (MAIL, RCPT, DATA, each durable before its 250), one at a time; the
runs alternate between the settings so that all see the same machine load. dnsstub's cache
is warm after the first message, which is what a busy MX mostly sees. Client and server
share one process (and its GIL): compare the settings, not the absolute figures with
bench/smtp_bench.py's.

With --postfix (root; bench/peers.py installs it), a benchmark Postfix instance takes the
same messages in the same rounds (it checks no signature), and each setting's ratio to it is
printed: what verification costs against a peer that does none.

Printed: accepted messages per second, median (min-max) over the repeats.
Run: python3 bench/smtp_in_dkim_bench.py [--count 300] [--repeats 5] [--algorithm rsa|ed25519]
                                         [--postfix]
"""

import argparse
import json
import logging
import os
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import dkim  # noqa: E402
import mailbox_store  # noqa: E402
import peers  # noqa: E402
import smtp_in  # noqa: E402
from dnsmasq_server import start_dnsmasq, txt_record  # noqa: E402

SETTINGS = {
    "off": {"dkim_verify": "no", "dmarc": "off"},
    "dkim": {"dkim_verify": "yes", "dmarc": "off"},
    "dkim+dmarc": {"dkim_verify": "yes", "dmarc": "tag"},
}
DOMAIN = "sender.bench.test"
SELECTOR = "bench"
RUN_TIMEOUT = 60.0             # seconds one SMTP command may take


def signed_message(key, size=1024):
    """A message of about SIZE octets signed for DOMAIN (relaxed/relaxed)."""
    header = ("From: Bench <bench@%s>\r\nTo: <bob@example.test>\r\nSubject: bench\r\n"
              "Date: Sun, 06 Dec 2026 04:00:00 +0000\r\nMessage-ID: <bench@%s>\r\n\r\n"
              % (DOMAIN, DOMAIN)).encode()
    line = b"The quick brown fox jumps over the lazy dog, once more for the bench.\r\n"
    text = header + line * max(1, (size - len(header)) // len(line))
    return dkim.sign(text, key, DOMAIN, SELECTOR) + text


def one_run(port, count, message, recipient="bob@example.test"):
    """Accepted messages per second over COUNT messages in one session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=RUN_TIMEOUT) as client:
        client.ehlo("client.bench.test")
        started = time.perf_counter()
        for _ in range(count):
            client.sendmail("bench@" + DOMAIN, [recipient], message)
        elapsed = time.perf_counter() - started
    return count / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="messages per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    parser.add_argument("--postfix", action="store_true",
                        help="also a benchmark Postfix instance, for ratios (needs root)")
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)
    key = dkim.generate_rsa_key() if args.algorithm == "rsa" else dkim.generate_ed25519_key()
    message = signed_message(key)
    record = dkim.key_record_text(key)
    zone = [txt_record("%s._domainkey.%s" % (SELECTOR, DOMAIN),
                       *[record[i:i + 255] for i in range(0, len(record), 255)]),
            txt_record("_dmarc." + DOMAIN, "v=DMARC1; p=none")]
    spool = tempfile.mkdtemp(prefix="smtp-in-dkim-bench-")
    servers = {}
    runs = {name: [] for name in SETTINGS}
    postfix = None
    try:
        if args.postfix:
            try:
                os.chmod(spool, 0o755)             # Postfix's own users must get in
                postfix = peers.Postfix(os.path.join(spool, "postfix"))
                postfix.start()
                runs["postfix"] = []
            except peers.PeerMissing as exc:
                print("# postfix skipped: %s" % exc)
                postfix = None
        with start_dnsmasq(zone) as dns:
            for name, settings in SETTINGS.items():
                where = os.path.join(spool, name)
                mailbox_store.Store(where, ["example.test"]).add_user("bob@example.test",
                                                                      "bench-password")
                server = smtp_in.SMTPServer(("127.0.0.1", 0), dict(
                    settings, spool=where, domain=["example.test"],
                    hostname="mx.example.test", spf="off", dns=dns.address,
                    max_commands=10 * args.count + 10, anvil_exempt=["127.0.0.1"]))
                threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
                servers[name] = server
            for _ in range(args.repeats):
                for name in SETTINGS:
                    runs[name].append(one_run(servers[name].port, args.count, message))
                if postfix is not None:
                    runs["postfix"].append(one_run(postfix.port, args.count, message,
                                                   "user@bench.test"))
    finally:
        for server in servers.values():
            server.stop(grace=0.5)
        if postfix is not None:
            postfix.stop()
        shutil.rmtree(spool, ignore_errors=True)
    print("# smtp_in_dkim_bench, loadavg %s, %d runs of %d %d-octet messages signed with %s"
          % (open("/proc/loadavg").read().split()[0], args.repeats, args.count, len(message),
             args.algorithm))
    peer = statistics.median(runs["postfix"]) if runs.get("postfix") else None
    for name in runs:
        values = runs[name]
        ratio = "  %.2fx postfix" % (statistics.median(values) / peer) if peer else ""
        print("%-11s %7.1f accepted/s (%.1f-%.1f)%s"
              % (name, statistics.median(values), min(values), max(values), ratio))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "accepted_per_second": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
