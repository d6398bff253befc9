"""dns_bench.py - how fast dnsmx.py resolves, against its own dnsmasq on 127.0.0.1.

Measures, in one run against the same dnsmasq:
  - a cached mx_hosts() call;
  - an uncached MX + A resolution: the MX query, then an A query for each MX target;
  - the same three queries made with dnspython, when it can be imported (the peer);
  - an uncached mx_hosts(), which takes addresses from the additional section when the
    server sends them (so here it needs one query where MX + A needs three);
  - the floor: the same four queries sent from a bare loop (a socket of its own for each,
    as the resolver does, the query made once beforehand, the reply's bytes not looked
    at), the least a Python stub can spend on them;
  - the dnsmx.py CLI as a process (`python3 dnsmx.py --server ... NAME MX`) against
    `dig @127.0.0.1 -p PORT NAME MX`, when dig is installed (--cli-count runs of each).
Prints the median time per call with min-max over the repeats, and the dnsmx/dnspython
and CLI/dig ratios. Bounded: --repeats x --count calls at most, and never longer than --max-seconds.
dnsmasq is stopped by its own process id.

Run: python3 bench/dns_bench.py [--repeats 7] [--count 200] [--cli-count 20] [--json]
     (dnspython as the peer: python3 bench/peers.py install --no-apt, then
      bench/run/venv/bin/python bench/dns_bench.py)
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import dnsstub  # noqa: E402  (after the path set-up above)
from dnsmasq_server import dnsmasq_path, host_record, mx_host, start_dnsmasq  # noqa: E402

DOMAIN = "example.test"
ZONE = [mx_host(DOMAIN, "mx1.example.test", 10), mx_host(DOMAIN, "mx2.example.test", 10),
        mx_host(DOMAIN, "mx3.example.test", 20),
        host_record("mx1.example.test", "127.0.0.11", "::11"),
        host_record("mx2.example.test", "127.0.0.12"),
        host_record("mx3.example.test", "127.0.0.13")]
CACHED_CALLS = 20000             # cached calls per repeat (they take microseconds)
CACHED_TARGET_US = 20.0
RATIO_TARGET = 0.25
CLI_PYTHON = "/usr/bin/python3"  # what a user types; pyenv's python3 shim adds ~80 ms


def per_call_us(function, count, deadline):
    """Microseconds per call of FUNCTION over COUNT calls (fewer if the deadline comes)."""
    done = 0
    started = time.perf_counter()
    while done < count and time.monotonic() < deadline:
        function()
        done += 1
    return (time.perf_counter() - started) / max(done, 1) * 1e6


def dnsmx_mx_and_a(resolver):
    answer = resolver.resolve(DOMAIN, "MX", use_cache=False)
    for record in answer.records:
        resolver.resolve(record.data.exchange, "A", use_cache=False)


def bare_loop(address, resolver):
    """A function sending the MX query and the three A queries of dnsmx_mx_and_a from a
    bare socket loop: the queries made once here, the replies received and not parsed."""
    queries = [dnsstub.build_query(DOMAIN, "MX")[1]]
    for record in resolver.resolve(DOMAIN, "MX", use_cache=False).records:
        queries.append(dnsstub.build_query(record.data.exchange, "A")[1])

    def mx_and_a():
        for query in queries:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.settimeout(2)
                sock.connect(address)
                sock.send(query)
                sock.recv(4096)
            finally:
                sock.close()
    return mx_and_a


def dnspython_peer(port):
    """A function doing the same MX + A queries with dnspython, or None without it."""
    try:
        import dns.resolver
        import dns.version
    except ImportError:
        return None, None
    peer = dns.resolver.Resolver(configure=False)
    peer.nameservers = ["127.0.0.1"]
    peer.port = port
    peer.lifetime = 5.0
    peer.cache = None

    def mx_and_a():
        answer = peer.resolve(DOMAIN, "MX")
        for record in answer:
            peer.resolve(record.exchange, "A")
    return mx_and_a, "dnspython %s" % dns.version.version


# The CLI runs as a user's shell runs it: Python may keep the compiled dnsstub.py in
# __pycache__/ (a test runner's PYTHONDONTWRITEBYTECODE would make every run compile it).
CLI_ENVIRONMENT = {name: value for name, value in os.environ.items()
                   if name != "PYTHONDONTWRITEBYTECODE"}


def process_us(command, count, deadline, expect):
    """Microseconds per run of COMMAND (a whole process) over COUNT runs."""
    done = 0
    started = time.perf_counter()
    while done < count and time.monotonic() < deadline:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10,
                                env=CLI_ENVIRONMENT).stdout
        if expect not in output:
            raise RuntimeError("%s printed %r" % (command[0], output[:200]))
        done += 1
    return (time.perf_counter() - started) / max(done, 1) * 1e6


def cli_commands(port):
    """{row name: command} for the dnsmx.py CLI and, when installed, dig."""
    python = CLI_PYTHON if os.path.exists(CLI_PYTHON) else sys.executable
    commands = {"CLI process, dnsmx.py": [python, os.path.join(ROOT, "dnsmx.py"), "--server",
                                          "127.0.0.1:%d" % port, DOMAIN, "MX"]}
    dig = shutil.which("dig")
    if dig:
        commands["CLI process, dig"] = [dig, "@127.0.0.1", "-p", str(port), DOMAIN, "MX"]
    return commands


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def run(repeats, count, max_seconds, cli_count=0):
    deadline = time.monotonic() + max_seconds
    results = {}
    with start_dnsmasq(ZONE) as server:
        cached = dnsstub.Resolver([server.address], timeout=2, attempts=1)
        uncached = dnsstub.Resolver([server.address], timeout=2, attempts=1, cache_size=0)
        peer, peer_name = dnspython_peer(server.port)
        cached.mx_hosts(DOMAIN)
        dnsmx_mx_and_a(uncached)                              # warm up both sides
        if peer:
            peer()
        floor = bare_loop((server.host, server.port), uncached)
        floor()
        series = {"cached mx_hosts": [], "uncached MX+A, dnsmx": [],
                  "uncached MX+A, floor": [], "uncached mx_hosts, dnsmx": []}
        if peer:
            series["uncached MX+A, " + peer_name] = []
        commands = cli_commands(server.port) if cli_count else {}
        for name, command in commands.items():
            series[name] = []
            process_us(command, 1, deadline, "mx1.example.test")     # compiled and cached
        for _ in range(repeats):
            if time.monotonic() >= deadline:
                break
            # Interleaved, so that drift in the machine's load hits every series alike.
            series["cached mx_hosts"].append(
                per_call_us(lambda: cached.mx_hosts(DOMAIN), CACHED_CALLS, deadline))
            series["uncached MX+A, dnsmx"].append(
                per_call_us(lambda: dnsmx_mx_and_a(uncached), count, deadline))
            series["uncached MX+A, floor"].append(per_call_us(floor, count, deadline))
            if peer:
                series["uncached MX+A, " + peer_name].append(per_call_us(peer, count, deadline))
            series["uncached mx_hosts, dnsmx"].append(
                per_call_us(lambda: uncached.mx_hosts(DOMAIN), count, deadline))
            for name, command in commands.items():
                series[name].append(process_us(command, cli_count, deadline, "mx1.example.test"))
        results = {name: summary(values) for name, values in series.items() if values}
    if peer and results:
        ours = results["uncached MX+A, dnsmx"]["median"]
        theirs = results["uncached MX+A, " + peer_name]["median"]
        results["ratio"] = ours / theirs
        results["floor_ratio"] = results["uncached MX+A, floor"]["median"] / theirs
    if "CLI process, dig" in results and "CLI process, dnsmx.py" in results:
        results["cli_ratio"] = (results["CLI process, dnsmx.py"]["median"]
                                / results["CLI process, dig"]["median"])
    results["peer"] = peer_name
    return results


def dnsmasq_version():
    try:
        output = subprocess.run([dnsmasq_path(), "--version"], capture_output=True,
                                text=True, timeout=5).stdout
        return output.split("\n")[0].replace("Dnsmasq version ", "dnsmasq ").split("  ")[0]
    except (OSError, subprocess.SubprocessError, TypeError):
        return "dnsmasq"


def report(results, repeats, count):
    print("dnsmx bench: %s on 127.0.0.1, Python %s, %s; %d repeats, %d uncached calls each"
          % (dnsmasq_version(), platform.python_version(), platform.machine(), repeats, count))
    for name, value in results.items():
        if not isinstance(value, dict):
            continue
        print("  %-34s %9.1f us  (min %.1f - max %.1f)"
              % (name, value["median"], value["min"], value["max"]))
    cached = results.get("cached mx_hosts", {}).get("median")
    if cached is not None:
        print("  cached mx_hosts target < %.0f us: %s"
              % (CACHED_TARGET_US, "met" if cached < CACHED_TARGET_US else "MISSED"))
    if results.get("peer") is None:
        print("  peer missing: dnspython is not importable here, so no ratio "
              "(see the docstring for a venv with it)")
    elif "ratio" in results:
        print("  ratio dnsmx / %s, uncached MX+A: %.2f (target <= %.2f: %s)"
              % (results["peer"], results["ratio"], RATIO_TARGET,
                 "met" if results["ratio"] <= RATIO_TARGET else "MISSED"))
    if "floor_ratio" in results:
        print("  ratio floor / %s, uncached MX+A: %.2f (the least a Python stub spends)"
              % (results["peer"], results["floor_ratio"]))
    if "cli_ratio" in results:
        print("  ratio dnsmx.py CLI / dig, per process: %.2f (target <= 1.0: %s)"
              % (results["cli_ratio"], "met" if results["cli_ratio"] <= 1.0 else "MISSED"))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Bench dnsmx.py against dnsmasq "
                                                 "(and dnspython when importable).")
    parser.add_argument("--repeats", type=int, default=7, help="repeats (default 7, max 50)")
    parser.add_argument("--count", type=int, default=200,
                        help="uncached calls per repeat (default 200, max 5000)")
    parser.add_argument("--cli-count", type=int, default=20,
                        help="runs of the dnsmx.py CLI and of dig per repeat (default 20, 0: skip)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop measuring after this long (default 60)")
    parser.add_argument("--json", action="store_true", help="print raw numbers as JSON")
    args = parser.parse_args(argv)
    if dnsmasq_path() is None:
        print("dns_bench: dnsmasq not installed (apt-get install dnsmasq-base)",
              file=sys.stderr)
        return 1
    repeats = min(max(args.repeats, 1), 50)
    count = min(max(args.count, 1), 5000)
    results = run(repeats, count, min(max(args.max_seconds, 1.0), 600.0),
                  min(max(args.cli_count, 0), 200))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        report(results, repeats, count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
