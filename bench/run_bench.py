#!/usr/bin/env python3
"""run_bench.py - the whole bench suite, side by side with the peers, in one run.

Runs the per-role scripts of this folder one after the other, each with --json, then
prints one table: our figure, the peer's from the same minutes, their ratio, the target
and whether it was met. Sections (--sections, default all, in this order):

  smtp      smtp_bench.py: accepted/s and delivered/s of smtp_in (with the router and the
            Maildir behind it) beside Postfix and aiosmtpd, 1/10/50 clients x 1 KB/100 KB,
            one session per message and many per session; 250 -> Maildir new/ and 250 ->
            visible over POP3 (pop3d; Dovecot reading Postfix's Maildir); peak RSS of
            smtp_in under 50 sessions x 100 KB
  pop3      pop3_bench.py beside Dovecot (bench/peers.py, started here, stopped by its PID):
            4 KB msgs/s and 1 MB MB/s at 1 and 8 clients (pop3d with its default
            --processes auto); peak RSS of one pop3d process, 10 x 50 MB
  dns       dns_bench.py under a Python that has dnspython: mx_hosts cached and uncached,
            the same queries from a bare socket loop (the floor), and the dnsmx.py CLI
            process against dig
  outbound  smtp_out_bench.py: messages/s to smtp-sink at 1 and 20 connections, beside
            Postfix's smtp(8) client

--floor adds bench/floor.py's yardsticks to the smtp and pop3 sections: the least a
threaded Python server of our shape can do (no protocol work, nothing but the durable
files and the bytes on the wire), each with its ratio against the same peer. A target
beyond the floor's ratio asks more than any Python server of this shape gets here.

Everything listens on 127.0.0.1; each section is bounded by --section-timeout (its
scripts bound every run inside); every process is ended by its PID (the scripts end
theirs; Dovecot, started here, by its pid file). The peers come from bench/peers.py; one
that is not installed is skipped with a one-line note and its column stays empty. Postfix
and Dovecot need root:

    python3 bench/peers.py install                                  # once: apt-get and a venv
    python3 bench/run_bench.py --out bench/results/run            # about 25 minutes
    python3 bench/run_bench.py --sections smtp --quick             # one section, fewer runs

--summarize DIR prints the table again from a previous run's JSON files.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import peers

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("smtp", "pop3", "dns", "outbound")


# --- helpers ---

def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(value):
    if value != value:
        return "-"
    if abs(value) >= 100:
        return "%.0f" % value
    return "%.1f" % value if abs(value) >= 10 else "%.2f" % value


def figure(values, unit=""):
    """'median (min-max)' of repeated runs."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    text = fmt(statistics.median(values)) + unit
    return text + (" (%s-%s)" % (fmt(min(values)), fmt(max(values))) if len(values) > 1 else "")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def file_creation_us(count=200):
    """Median microseconds to make an empty file in a new folder under TMPDIR, where the
    sections keep their spools. On ext4 without a journal it is 10-20 us on a quiet disk and
    up to 50 times that for minutes after many files were deleted nearby; every server's
    figures (ours and the peers') follow it."""
    folder = tempfile.mkdtemp(prefix="run-bench-files-")
    times = []
    try:
        for number in range(count):
            path = os.path.join(folder, str(number))
            started = time.perf_counter()
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times)


def run_section(name, command, out_dir, timeout):
    """Run one script, its output shown and kept in OUT_DIR/NAME.txt; False on failure."""
    print("\n=== %s: %s" % (name, " ".join(command)), flush=True)
    started = time.monotonic()
    with open(os.path.join(out_dir, name + ".txt"), "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            deadline = started + timeout
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                if time.monotonic() > deadline:
                    break
            process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if process.poll() is None:
                print("# %s passed its %d s bound; stopping it" % (name, timeout), flush=True)
                # SIGINT to its own process group: the script's finally blocks stop the
                # daemons it started, and our daemons stop on SIGINT as on SIGTERM.
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
    print("# %s took %.0f s, exit status %s" % (name, time.monotonic() - started, process.returncode),
          flush=True)
    return process.returncode == 0


# --- the summary table ---

def load(out_dir, name):
    path = os.path.join(out_dir, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verdict(value, target, higher_is_better=True):
    if value != value:
        return "not measured"
    return "met" if (value >= target if higher_is_better else value <= target) else "MISSED"


def smtp_rows(data):
    rows = []
    runs = {(r["target"], r.get("mode", "session"), r["size"], r["conc"]): r for r in data["runs"]}
    order = lambda key: (key[1] != "session", key[2], key[3])     # one session per message first
    for (target, mode, size, conc), run in sorted(runs.items(), key=lambda kv: order(kv[0])):
        if target != "smtp_in":
            continue
        ours = run["accepted_per_s"]
        label = "SMTP accepted/s, %s, %d clients, %s" % (
            "1 KB" if size == 1024 else "%d KB" % (size // 1024), conc,
            "1 msg/session" if mode == "session" else "many msgs/session")
        postfix = runs.get(("postfix", mode, size, conc))
        aiosmtpd = runs.get(("aiosmtpd", mode, size, conc))
        ratio = median(ours) / median(postfix["accepted_per_s"]) if postfix else float("nan")
        peers = []
        if postfix:
            peers.append("Postfix " + figure(postfix["accepted_per_s"]))
        if aiosmtpd:
            peers.append("aiosmtpd " + figure(aiosmtpd["accepted_per_s"]))
        target_text, met = "", ""
        if conc in (10, 50):
            target_text, met = ">= 2.0x Postfix", verdict(ratio, 2.0)
        rows.append((label, figure(ours), "; ".join(peers) or "-", fmt(ratio), target_text, met))
        delivered = median(run["delivered_per_s"]) / median(ours) if median(ours) else float("nan")
        rows.append(("  delivered/s of the same runs", figure(run["delivered_per_s"]),
                     "Postfix " + figure(postfix["delivered_per_s"]) if postfix else "-",
                     "%s of accepted" % fmt(delivered), ">= 0.95 of accepted", verdict(delivered, 0.95)))
        for name in ("floor", "floor+spool"):
            yardstick = runs.get((name, mode, size, conc))
            if yardstick:
                rows.append(floor_row("  %s of the same runs (bench/floor.py)" % name,
                                      yardstick["accepted_per_s"], "Postfix",
                                      postfix and postfix["accepted_per_s"]))
    e2e = {(row["target"], row["to"]): row for row in data.get("e2e", [])}
    for where, label in (("new/", "250 -> Maildir new/, ms"), ("pop3", "250 -> visible over POP3, ms")):
        ours, peer = e2e.get(("smtp_in", where)), e2e.get(("postfix", where))
        if not ours:
            continue
        ms = sorted(v * 1000 for v in ours["latency_s"])
        pick = lambda values, q: values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")
        ours_text = "p50 %s, p99 %s, max %s" % (fmt(pick(ms, 0.5)), fmt(pick(ms, 0.99)), fmt(ms[-1] if ms else float("nan")))
        peer_text, ratio = "-", float("nan")
        if peer:
            pms = sorted(v * 1000 for v in peer["latency_s"])
            peer_text = "Postfix%s p50 %s, p99 %s, max %s" % (
                "+Dovecot" if where == "pop3" else "", fmt(pick(pms, 0.5)), fmt(pick(pms, 0.99)),
                fmt(pms[-1] if pms else float("nan")))
            ratio = pick(ms, 0.5) / pick(pms, 0.5) if pms else float("nan")
        if where == "pop3":
            polls = sorted(ours["poll_s"])
            ours_text += " (a poll session: %s)" % fmt(pick(polls, 0.5) * 1000)
            if peer:
                peer_text += " (a poll session: %s)" % fmt(pick(sorted(peer["poll_s"]), 0.5) * 1000)
            rows.append((label, ours_text, peer_text, fmt(ratio), "", ""))
            continue
        rows.append((label, ours_text, peer_text, fmt(ratio), "p50 <= 0.5x Postfix",
                     verdict(ratio, 0.5, False)))
        spread = pick(ms, 0.99) / pick(ms, 0.5) if ms else float("nan")
        rows.append(("  p99 / p50 of ours", fmt(spread), "", "", "<= 3", verdict(spread, 3.0, False)))
    rows.extend(rss_rows("peak RSS, smtp_in, 50 sessions x 100 KB", data.get("memory")))
    return rows


def floor_row(label, values, peer_name, peer_values, unit=""):
    """The row of a bench/floor.py yardstick: its figure, the peer's, and their ratio: how
    far against that peer the least a Python server of our shape can do gets."""
    ratio = median(values) / median(peer_values) if peer_values else float("nan")
    return (label, figure(values, unit),
            "%s %s" % (peer_name, figure(peer_values, unit)) if peer_values else "-",
            fmt(ratio), "", "")


def rss_rows(label, memory):
    """The row of a peak-RSS measurement (target: under 100 MB), or none if it did not run."""
    if not memory:
        return []
    mib = memory["peak_rss_mib"]
    return [(label, "%.1f MiB" % mib, "", "", "< 100 MB", verdict(mib * 1.048576, 100, False))]


def pop3_rows(data):
    rows = []
    series = {(r["class"], r["conc"], r["server"]): r["values"] for r in data["rows"]}
    for (cls, conc, server), values in sorted(series.items()):
        if not server.startswith("pop3d"):
            continue
        peer = series.get((cls, conc, "dovecot"))
        ratio = median(values) / median(peer) if peer else float("nan")
        unit = " msgs/s" if cls == "small" else " MB/s"
        label = "POP3 %s, %d client%s" % ("4 KB msgs/s" if cls == "small" else "1 MB MB/s", conc,
                                         "" if conc == 1 else "s")
        goal = 1.0 if cls == "small" else 1.5
        rows.append((label, figure(values, unit), "Dovecot " + figure(peer, unit) if peer else "-",
                     fmt(ratio), ">= %.1fx Dovecot" % goal, verdict(ratio, goal)))
        yardstick = series.get((cls, conc, "floor"))
        if yardstick:
            rows.append(floor_row("  floor of the same runs (bench/floor.py)", yardstick,
                                  "Dovecot", peer, unit))
    rows.extend(rss_rows("peak RSS, pop3d, 10 clients x 50 MB", data.get("memory")))
    return rows


def dns_rows(data):
    rows = []
    get = lambda name: data.get(name) or {}
    cached = get("cached mx_hosts")
    if cached:
        rows.append(("DNS mx_hosts cached, us", figure(cached["values"]), "", "", "< 20 us",
                     verdict(cached["median"], 20.0, False)))
    ours = get("uncached MX+A, dnsmx")
    peer_name = data.get("peer")
    peer = get("uncached MX+A, " + peer_name) if peer_name else {}
    if ours:
        ratio = data.get("ratio", float("nan"))
        rows.append(("DNS uncached MX + A, us", figure(ours["values"]),
                     "%s %s" % (peer_name, figure(peer["values"])) if peer else "-", fmt(ratio),
                     "<= 0.25x dnspython", verdict(ratio, 0.25, False)))
    floor = get("uncached MX+A, floor")
    if floor:
        rows.append(floor_row("  floor of the same runs (a bare socket loop)", floor["values"],
                              peer_name, peer.get("values")))
    mx_hosts = get("uncached mx_hosts, dnsmx")
    if mx_hosts:
        rows.append(("DNS mx_hosts uncached (1 query), us", figure(mx_hosts["values"]), "", "", "", ""))
    cli, dig = get("CLI process, dnsmx.py"), get("CLI process, dig")
    if cli:
        ratio = data.get("cli_ratio", float("nan"))
        rows.append(("DNS CLI process, ms", figure([v / 1000 for v in cli["values"]]),
                     "dig " + figure([v / 1000 for v in dig["values"]]) if dig else "-", fmt(ratio),
                     "<= dig", verdict(ratio, 1.0, False)))
    return rows


def outbound_rows(data):
    rows = []
    times = {}
    for run in data["runs"]:
        times.setdefault((run["client"], run["conc"]), []).append(run["messages"] / run["seconds"])
    for (client, conc), rates in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if client not in ("smtp_out", "smtp_out+spool"):
            continue
        peer = times.get(("postfix", conc))
        ratio = median(rates) / median(peer) if peer else float("nan")
        rows.append(("outbound msgs/s, %s, %d connection%s" % (client, conc, "" if conc == 1 else "s"),
                     figure(rates), "Postfix " + figure(peer) if peer else "-", fmt(ratio), "", ""))
    return rows


def summarize(out_dir):
    rows = []
    for name, build in (("smtp", smtp_rows), ("pop3", pop3_rows), ("dns", dns_rows),
                        ("outbound", outbound_rows)):
        data = load(out_dir, name)
        if data is not None:
            rows.extend(build(data))
    print("\n| measure | ours | peer, same run | ratio | target | |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


# --- main ---

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="any of " + ",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="fewer and shorter runs (2 repeats, 2 s each; for a first look)")
    parser.add_argument("--out", help="folder for the JSON and text of each section (default: a temp dir)")
    parser.add_argument("--section-timeout", type=float, default=1500.0, help="seconds per section")
    parser.add_argument("--summarize", metavar="DIR", help="only print the table of a previous run")
    parser.add_argument("--cpus", default="auto", choices=("auto", "none"),
                        help="placement of our daemons in the smtp and pop3 sections, as run_all's "
                             "--cpus (default auto: a CPU for each process; none: run_all's "
                             "default, the system places them)")
    parser.add_argument("--floor", action="store_true",
                        help="also run bench/floor.py's yardsticks in the smtp and pop3 sections: "
                             "the least a threaded Python server can do, beside the peers")
    parser.add_argument("--processes", default="auto",
                        help="smtp_in's and pop3d's --processes in the smtp and pop3 sections "
                             "(default auto, their own default: one per CPU each may use)")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error("unknown sections: %s" % ", ".join(sorted(unknown)))
    out_dir = os.path.abspath(args.out or tempfile.mkdtemp(prefix="run-bench-"))
    os.makedirs(out_dir, exist_ok=True)
    repeats = 2 if args.quick else args.repeats
    seconds = "2" if args.quick else "3"
    python = sys.executable
    print("# run_bench %s, loadavg %s, %d cores, our daemons --cpus %s --processes %s, "
          "results in %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), loadavg(), os.cpu_count(),
                             args.cpus, args.processes, out_dir), flush=True)
    print("# making a file in %s: %.0f us (median; high for minutes after mass deletions "
          "there, see docs/performance.md)" % (tempfile.gettempdir(), file_creation_us()),
          flush=True)
    failed = []
    for section in sections:
        json_path = os.path.join(out_dir, section + ".json")
        if section == "smtp":
            command = [python, os.path.join(HERE, "smtp_bench.py"), "--postfix", "--pop3", "--aiosmtpd-executor", "0", "--modes", "session,reuse",
                       "--repeats", str(repeats), "--seconds", seconds,
                       "--e2e-count", "50" if args.quick else "200", "--memory", "--json", json_path,
                       "--cpus", args.cpus, "--smtp-in-arg=--processes=" + args.processes]
            command += ["--floor"] if args.floor else []
            ok = run_section(section, command, out_dir, args.section_timeout)
        elif section == "pop3":
            command = [python, os.path.join(HERE, "pop3_bench.py"), "--repeats", str(repeats),
                       "--passes", "1" if args.quick else "2", "--conc", "1,8", "--json", json_path,
                       "--cpus", args.cpus, "--processes", args.processes]
            command += ["--floor"] if args.floor else []
            workdir = tempfile.mkdtemp(prefix="run-bench-dovecot-")
            try:
                with peers.Dovecot(workdir, small=1000, large=100) as dovecot:
                    command += ["--target", "dovecot=127.0.0.1:%d" % dovecot.port]
                    ok = run_section(section, command, out_dir, args.section_timeout)
            except peers.PeerMissing as exc:
                print("# pop3: dovecot skipped: %s" % exc, flush=True)
                ok = run_section(section, command, out_dir, args.section_timeout)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        elif section == "dns":
            # dnspython, the peer, lives in bench/peers.py's venv (or in this Python);
            # without it the script measures dnsmx alone and says so.
            interpreter = peers.venv_python("dns.resolver") or python
            if interpreter == python and importlib.util.find_spec("dns") is None:
                print("# dns: dnspython skipped: %s" % peers.missing("dnspython"), flush=True)
            command = [interpreter, os.path.join(HERE, "dns_bench.py"),
                       "--repeats", str(max(repeats, 3) if args.quick else 7),
                       "--count", "100" if args.quick else "200", "--cli-count", "10" if args.quick else "20",
                       "--json"]
            text_path = os.path.join(out_dir, "dns.txt")
            ok = run_section(section, command, out_dir, args.section_timeout)
            if ok:                     # dns_bench prints its JSON on stdout
                shutil.copyfile(text_path, json_path)
        elif peers.missing("smtp-sink"):
            print("\n# outbound skipped: %s" % peers.missing("smtp-sink"), flush=True)
            ok = True
        else:
            command = [python, os.path.join(HERE, "smtp_out_bench.py"), "--repeats", str(repeats),
                       "--messages", "500" if args.quick else "1000", "--conc", "1,20", "--json", json_path]
            ok = run_section(section, command, out_dir, args.section_timeout)
        if not ok:
            failed.append(section)
    print("\n# run_bench done %s, loadavg %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), loadavg()))
    summarize(out_dir)
    if failed:
        print("\nsections that failed: %s (see %s)" % (", ".join(failed), out_dir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
