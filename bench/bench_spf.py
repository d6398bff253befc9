"""Bench spf.check_host(): evaluation cost alone, and through dnsstub against a local dnsmasq.

Cases (the same records in both settings): a pass through mx, a pass two includes deep, a
fail at -all after 5 DNS-querying terms, and an exp= explanation. Rows:

- memory: an in-memory resolver, so only parsing, macros and matching are measured;
- dns-cached: a dnsstub.Resolver with its cache warm (what a busy smtp_in mostly sees);
- dns-uncached: a dnsstub.Resolver without cache, every lookup a UDP query to dnsmasq.

Each row runs `--repeats` times; printed: checks/s and µs per check, median (min-max).
Run: python3 bench/bench_spf.py [--seconds 0.5] [--repeats 5] [--json FILE]
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import dnsstub  # noqa: E402
import spf  # noqa: E402

RECORDS = {      # name -> list of (type, value)
    "example.test": [("TXT", "v=spf1 mx include:_spf.provider.test -all"),
                     ("MX", "mx.example.test")],
    "mx.example.test": [("A", "192.0.2.10")],
    "_spf.provider.test": [("TXT", "v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/26 "
                                   "include:_spf2.provider.test ~all")],
    "_spf2.provider.test": [("TXT", "v=spf1 ip4:203.0.113.64/26 a:relay.provider.test -all")],
    "relay.provider.test": [("A", "203.0.113.200")],
    "strict.test": [("TXT", "v=spf1 ip4:192.0.2.0/28 -all exp=why.strict.test")],
    "why.strict.test": [("TXT", "%{i} is not allowed to send mail for %{d}")],
}
CASES = [("pass-mx", "192.0.2.10", "a@example.test"),
         ("pass-2-includes", "203.0.113.200", "a@example.test"),
         ("fail-after-4-terms", "192.0.2.99", "a@example.test"),
         ("fail-with-exp", "192.0.2.99", "a@strict.test")]


class MemoryResolver:
    """spf's resolver interface over RECORDS."""

    def __init__(self, records):
        self.records = {}
        for name, entries in records.items():
            for rtype, value in entries:
                self.records.setdefault((name, rtype), []).append(value)

    def answer(self, name, rtype):
        found = self.records.get((name.lower(), rtype))
        if found:
            return list(found)
        if any(key[0] == name.lower() for key in self.records):
            raise dnsstub.NoDataError("no data", name)
        raise dnsstub.NXDomainError("no such name", name)

    def txt(self, name):
        return [text.encode() for text in self.answer(name, "TXT")]

    def a(self, name):
        return self.answer(name, "A")

    def aaaa(self, name):
        return self.answer(name, "AAAA")

    def mx(self, name):
        return self.answer(name, "MX")

    def ptr(self, ip):
        return self.answer(dnsstub.reverse_name(ip), "PTR")


def dnsmasq_options(records):
    from dnsmasq_server import host_record, mx_host, txt_record
    options = []
    for name, entries in records.items():
        for rtype, value in entries:
            if rtype == "TXT":
                options.append(txt_record(name, value))
            elif rtype == "MX":
                options.append(mx_host(name, value, 10))
            elif rtype == "A":
                options.append(host_record(name, value))
    return options


def measure(make_resolver, ip, sender, seconds):
    """Checks per second over about SECONDS; the resolver is made once per run."""
    resolver = make_resolver()
    expected = spf.check_sender(ip, sender, "h.example", resolver).result
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        result = spf.check_sender(ip, sender, "h.example", resolver)
        count += 1
        if result.result != expected:
            raise RuntimeError("result changed: %s then %s" % (expected, result.result))
        now = time.perf_counter()
        if now >= deadline or count >= 1_000_000:
            return count / (now - start), expected


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per run (default 0.5)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per row (default 5)")
    parser.add_argument("--json", metavar="FILE", help="write every run here")
    args = parser.parse_args(argv)
    args.seconds = min(max(args.seconds, 0.05), 10.0)
    args.repeats = min(max(args.repeats, 1), 50)

    rows = [("memory", lambda: MemoryResolver(RECORDS))]
    server = None
    try:
        from dnsmasq_server import dnsmasq_path, start_dnsmasq
        if dnsmasq_path():
            server = start_dnsmasq(dnsmasq_options(RECORDS))
            address = server.address
            cached = dnsstub.Resolver([address], timeout=2.0, attempts=1)
            rows.append(("dns-cached", lambda: spf.DNSResolver(cached)))
            rows.append(("dns-uncached", lambda: spf.DNSResolver(
                dnsstub.Resolver([address], timeout=2.0, attempts=1, cache_size=0))))
        else:
            print("dnsmasq not installed: memory rows only")
        report = []
        print("%-14s %-20s %-10s %28s %16s" % ("resolver", "case", "result",
                                               "checks/s median (min-max)", "µs/check"))
        for row, make_resolver in rows:
            for case, ip, sender in CASES:
                runs = []
                for _ in range(args.repeats):
                    rate, result = measure(make_resolver, ip, sender, args.seconds)
                    runs.append(rate)
                median = statistics.median(runs)
                print("%-14s %-20s %-10s %10.0f (%.0f-%.0f) %16.1f" % (
                    row, case, result, median, min(runs), max(runs), 1e6 / median))
                report.append({"resolver": row, "case": case, "result": result,
                               "checks_per_second": runs})
    finally:
        if server is not None:
            server.stop()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"python": sys.version.split()[0], "seconds": args.seconds,
                       "rows": report}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
