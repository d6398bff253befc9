"""--cpus: each daemon keeps to the CPUs it is given, and run_all gives each role one."""

import os
import re
import signal
import subprocess
import sys

import pytest

import plumbing
import run_all
from support import ROOT, children_of, wait_for
from test_run_all import ports_args, run_all as run_all_command, start, stop, wait_for_text

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                                reason="this system cannot bind a process to CPUs")

LAST_CPU = (os.cpu_count() or 1) - 1


@pytest.mark.parametrize("text, cpus", [
    ("", set()), ("0", {0}), (" 0 ", {0}), ("0,0", {0}), ("0-%d" % LAST_CPU, set(range(LAST_CPU + 1))),
    ("%d,0" % LAST_CPU, {0, LAST_CPU}),
])
def test_a_cpu_list_is_read_as_linux_writes_it(text, cpus):
    assert plumbing.parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["a", "-1", "0-", "1-0", "0;1", "0x1", str(LAST_CPU + 1), "0-4096"])
def test_a_bad_cpu_list_is_refused_with_its_reason(text):
    with pytest.raises(ValueError, match="cpus: "):
        plumbing.parse_cpus(text)


def test_run_all_gives_smtp_in_and_mta_a_cpu_each_first():
    plan = run_all.cpu_plan("0-%d" % LAST_CPU)
    assert plan["smtp_in"] == 0
    assert plan["mta"] == (1 if LAST_CPU else 0)
    assert set(plan) == set(run_all.CPU_ORDER)
    assert run_all.cpu_plan("none") == {}
    assert set(run_all.cpu_plan("0").values()) == {0}
    allowed = sorted(os.sched_getaffinity(0))
    assert run_all.cpu_plan("auto", ["pop3d", "mta"]) == {"mta": allowed[0],
                                                          "pop3d": allowed[1 % len(allowed)]}


def thread_cpus(pid):
    """{thread id: its Cpus_allowed_list} of every thread of the process."""
    found = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        found[tid] = line.split()[1]
        except FileNotFoundError:
            pass                       # a thread that ended meanwhile
    return found


DAEMONS = {
    "smtp_in": ["--listen", "127.0.0.1:0", "--spf", "off", "--dmarc", "off", "--domain", "example.test"],
    "pop3d": ["--listen", "127.0.0.1:0", "--domain", "example.test"],
    "mta": ["--domain", "example.test"],
    "smtp_out": ["--dns", "127.0.0.1:9"],
}
READY = {"smtp_in": "listening on", "pop3d": "listening on", "mta": "watching", "smtp_out": "watching"}


@pytest.mark.parametrize("role", sorted(DAEMONS))
def test_every_daemon_and_all_its_threads_keep_to_the_cpu_given(tmp_path, role):
    cpu = str(LAST_CPU)
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, role + ".py"), "--spool", str(tmp_path / "spool"),
             "--cpus", cpu] + DAEMONS[role],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_for_text(log_path, READY[role])

        def with_workers():            # the worker threads start as the daemon comes up
            threads = thread_cpus(process.pid)
            return threads if len(threads) > 1 else None
        threads = wait_for(with_workers, 10, "a thread beside the main one")
        assert set(threads.values()) == {cpu}
        assert "config: cpus=%s" % cpu in log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


@pytest.mark.parametrize("role", sorted(DAEMONS))
def test_a_cpu_the_machine_lacks_stops_the_daemon_with_one_line(tmp_path, role):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, role + ".py"), "--spool", str(tmp_path / "spool"),
         "--cpus", str(LAST_CPU + 1)] + DAEMONS[role],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert done.stderr.strip() == "%s: cpus: this machine has CPUs 0-%d, not %d" % (
        role, LAST_CPU, LAST_CPU + 1)


def child_pids(log):
    return {line.split("started ", 1)[1].split(",")[0]: int(line.rsplit("=", 1)[1])
            for line in log.splitlines() if ", pid=" in line and "started " in line}


def test_run_all_places_each_role_as_its_plan_says(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), "--cpus", "auto", *ports_args())
    try:
        pids = child_pids(wait_for_text(tmp_path / "run_all.log", "Next steps:"))
        plan = run_all.cpu_plan("auto")
        assert set(pids) == set(plan)
        every = set(run_all.listed_cpus("auto"))
        # smtp_out listens on nothing, so "Next steps:" may come before it keeps to its CPU
        wait_for(lambda: os.sched_getaffinity(pids["smtp_out"]) == {plan["smtp_out"]}, 10,
                 "smtp_out on CPU %d" % plan["smtp_out"])
        for name in ("smtp_in", "submission", "pop3d", "mta"):  # processes = auto: a worker a CPU
            if len(every) == 1:
                assert os.sched_getaffinity(pids[name]) == every and not children_of(pids[name])
                continue
            assert os.sched_getaffinity(pids[name]) == every, name
            workers = wait_for(lambda: children_of(pids[name])
                               if len(children_of(pids[name])) == len(every) else None, 10)
            assert sorted(tuple(os.sched_getaffinity(pid)) for pid in workers) == [
                (cpu,) for cpu in sorted(every)], name
    finally:
        assert stop(process) == 0


def test_run_all_leaves_placement_to_the_system_by_default(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), *ports_args())
    try:
        pids = child_pids(wait_for_text(tmp_path / "run_all.log", "Next steps:"))
        assert len(pids) == 5
        for pid in pids.values():
            assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
    finally:
        assert stop(process) == 0


def test_run_all_check_reports_a_cpu_the_machine_lacks(tmp_path):
    done = run_all_command("--check", "--spool", str(tmp_path / "spool"), "--cpus",
                           "0-%d" % (LAST_CPU + 1), *ports_args())
    assert done.returncode == 1
    assert b"cpus: this machine has CPUs 0-%d, not %d" % (LAST_CPU, LAST_CPU + 1) in done.stderr


@pytest.mark.skipif(LAST_CPU < 1, reason="needs two CPUs")
@pytest.mark.parametrize("role", ["pop3d", "smtp_in"])
def test_workers_keep_one_cpu_each_of_those_given_and_auto_counts_them(tmp_path, role):
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, role + ".py"), "--spool", str(tmp_path / "spool"),
             "--cpus", "0-1", "--processes", "auto"] + DAEMONS[role],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        text = wait_for_text(log_path, "serving from 2 worker processes")
        workers = [int(pid) for pid in re.findall(r"worker (\d+) started on CPU", text)]
        assert len(workers) == 2
        # The master logs a worker as soon as it has forked it; the worker keeps to its
        # CPU a moment later, before it starts any thread.
        wait_for(lambda: [os.sched_getaffinity(pid) for pid in workers] == [{0}, {1}],
                 10, "each worker on its own CPU")
        for pid, cpu in zip(workers, ("0", "1")):
            assert set(thread_cpus(pid).values()) == {cpu}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
