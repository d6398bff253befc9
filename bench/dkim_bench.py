"""Bench DKIM signing and verifying per message: dkim.py beside dkimpy, in the same run.

Messages of about 1 KB and 1 MB, relaxed/relaxed, signed with a 2048-bit RSA key and with an
Ed25519 key; key records from memory (no DNS), so only the canonicalisation, hashing and
public-key arithmetic are measured. Each cell runs for `--seconds` (at least once, at most
`--max-runs` times); printed: ms per message, median of the runs, and messages/s. dkimpy's
columns say "not installed" when it is missing (pip install -r requirements-dev.txt).

Run: python3 bench/dkim_bench.py [--seconds 1.0] [--max-runs 200] [--json FILE]
"""

import argparse
import base64
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import dkim  # noqa: E402
from dkim_support import (MESSAGE, DictResolver, body_of, dkimpy_dnsfunc,  # noqa: E402
                          import_dkimpy)

SIZES = (("1 KB", 1024), ("1 MB", 1 << 20))
MAX_SECONDS = 10.0              # per cell, whatever --seconds says


def timed_runs(function, seconds, max_runs):
    """Run FUNCTION until SECONDS pass (at least once, at most MAX_RUNS); the run times."""
    times = []
    deadline = time.perf_counter() + min(seconds, MAX_SECONDS)
    while not times or (time.perf_counter() < deadline and len(times) < max_runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def cells(seconds, max_runs):
    dkimpy = import_dkimpy()
    rsa_key = dkim.generate_rsa_key(2048)
    ed_key = dkim.generate_ed25519_key()
    records = {"rsa._domainkey.example.test": dkim.key_record_text(rsa_key),
               "ed._domainkey.example.test": dkim.key_record_text(ed_key)}
    resolver = DictResolver(records)
    dnsfunc = dkimpy_dnsfunc(records)
    rows = []
    for size_name, size in SIZES:
        message = MESSAGE + body_of(size - len(MESSAGE))
        for algorithm, key, selector, theirs_key in (
                ("rsa-sha256", rsa_key, "rsa", dkim.private_key_pem(rsa_key).encode()),
                ("ed25519-sha256", ed_key, "ed", base64.b64encode(ed_key.seed))):
            signed = dkim.sign(message, key, "example.test", selector) + message
            row = {"size": size_name, "algorithm": algorithm}
            row["ours sign"] = timed_runs(
                lambda: dkim.sign(message, key, "example.test", selector), seconds, max_runs)
            row["ours verify"] = timed_runs(lambda: dkim.verify(signed, resolver),
                                            seconds, max_runs)
            assert dkim.verify(signed, resolver)[0].result == "pass"
            if dkimpy is not None:
                row["dkimpy sign"] = timed_runs(lambda: dkimpy.sign(
                    message, selector.encode(), b"example.test", theirs_key,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=algorithm.encode()), seconds, max_runs)
                row["dkimpy verify"] = timed_runs(
                    lambda: dkimpy.verify(signed, dnsfunc=dnsfunc), seconds, max_runs)
                assert dkimpy.verify(signed, dnsfunc=dnsfunc)
            rows.append(row)
    return rows, dkimpy is not None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time per cell (default 1.0, at most %g)" % MAX_SECONDS)
    parser.add_argument("--max-runs", type=int, default=200, help="runs per cell at most")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    rows, have_dkimpy = cells(args.seconds, max(1, args.max_runs))
    columns = ["ours sign", "ours verify", "dkimpy sign", "dkimpy verify"]
    print("%-5s %-15s" % ("size", "algorithm") + "".join("%18s" % c for c in columns))
    figures = []
    for row in rows:
        line = "%-5s %-15s" % (row["size"], row["algorithm"])
        entry = {"size": row["size"], "algorithm": row["algorithm"]}
        for column in columns:
            if column not in row:
                line += "%18s" % "not installed"
                continue
            ms = statistics.median(row[column]) * 1000
            entry[column] = {"ms": round(ms, 3), "runs": len(row[column])}
            line += "%18s" % ("%.2f ms (%d/s)" % (ms, 1000 / ms if ms else 0))
        print(line)
        figures.append(entry)
    print("python %s; ms per message, median; dkimpy %s" % (
        sys.version.split()[0], "installed" if have_dkimpy else "not installed"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
