"""run_all.py: one command that runs every role, checks its configuration, and supervises."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from run_all import STOP_GRACE
from support import ROOT, SLACK, free_ports, wait_for


def run_all(*argv, cwd=ROOT, timeout=60):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_all.py")] + list(argv),
                          cwd=cwd, capture_output=True, timeout=timeout)


def ports_args():
    smtp, submission, pop3 = free_ports(3)
    return ["--smtp", "127.0.0.1:%d" % smtp, "--submission", "127.0.0.1:%d" % submission,
            "--pop3", "127.0.0.1:%d" % pop3]


def test_check_passes_on_a_good_configuration(tmp_path):
    result = run_all("--check", "--spool", str(tmp_path / "spool"), *ports_args())
    assert result.returncode == 0, result.stderr.decode()
    assert b"configuration OK" in result.stderr


def test_check_reports_a_busy_port_and_a_bad_certificate(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        bad_cert = tmp_path / "cert.pem"
        bad_cert.write_text("not a certificate\n")
        result = run_all("--check", "--spool", str(tmp_path / "spool"),
                         "--smtp", "127.0.0.1:%d" % port, "--tls-cert", str(bad_cert),
                         "--tls-key", str(bad_cert))
    err = result.stderr.decode()
    assert result.returncode == 1
    assert "SMTP: cannot listen on 127.0.0.1:%d" % port in err
    assert "tls: cannot load" in err
    assert "Traceback" not in err


def test_check_reports_an_unwritable_spool(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_all("--check", "--spool", str(blocker / "spool"), *ports_args())
    assert result.returncode == 1
    assert b"spool:" in result.stderr and b"Traceback" not in result.stderr


def test_check_reports_a_bad_retry_schedule(tmp_path):
    result = run_all("--check", "--spool", str(tmp_path / "spool"), "--retry-schedule", "soon",
                     *ports_args())
    assert result.returncode == 1
    assert (b"run_all: retry_schedule: 'soon' is not a wait such as 30s, 5m, 1h or 2d\n"
            in result.stderr)


def test_bad_flag_value_is_one_clear_line(tmp_path):
    result = run_all("--max-size", "huge", "--spool", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "run_all: max_size: not a number: 'huge'"


def test_help_lists_every_design_flag():
    out = run_all("--help").stdout.decode()
    for flag in ("--spool", "--domain", "--hostname", "--smtp", "--submission", "--pop3",
                 "--tls-cert", "--tls-key", "--dns", "--relay-host", "--remote-port",
                 "--relay-network", "--idle-timeout", "--max-size", "--config", "--user", "--check"):
        assert flag in out


def start(tmp_path, *argv):
    log = open(tmp_path / "run_all.log", "wb")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_all.py")] + list(argv),
                               cwd=str(tmp_path), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    return process


def wait_for_text(path, text, timeout=20):
    """The log at path once text is in it; fails the test, showing the log, if it never is."""
    def logged():
        content = path.read_text(errors="replace")
        return content if text in content else None
    try:
        return wait_for(logged, timeout, "%r in the log" % text)
    except AssertionError as exc:
        raise AssertionError("%s:\n%s" % (exc, path.read_text(errors="replace"))) from None


def count_in_log(path, text):
    return path.read_text(errors="replace").count(text)


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_defaults_create_the_spool_and_print_the_next_steps(tmp_path):
    ports = ports_args()
    process = start(tmp_path, *ports)       # spool and domain from the embedded defaults
    try:
        log = wait_for_text(tmp_path / "run_all.log", "Next steps:")
        assert (tmp_path / "mailspool").is_dir()
        assert "add-user alice@localhost" in log
        assert "listening: SMTP %s" % ports[1] in log
    finally:
        assert stop(process) == 0


def test_the_spool_is_closed_to_other_users(tmp_path):
    # docs/spool.md: folders 0700, files 0600. Settings name the TLS key and the networks
    # allowed to relay; the doorbells and the flow FIFO are the daemons' own.
    process = start(tmp_path, *ports_args())
    spool = tmp_path / "mailspool"
    try:
        wait_for_text(tmp_path / "run_all.log", "Next steps:")
        wait_for(lambda: (spool / "run" / "flow").exists(), 20, "the router's FIFO")
        wrong = []
        for folder, dirs, files in os.walk(str(spool)):
            for path in [folder] + [os.path.join(folder, name) for name in dirs + files]:
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077 or \
                        (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)) and \
                        st.st_mode & 0o077:
                    wrong.append("%s %o" % (path, st.st_mode & 0o777))
        assert not wrong
        assert any(name.endswith(".ini") for name in os.listdir(str(spool / "run")))
    finally:
        assert stop(process) == 0


def test_a_role_that_dies_is_restarted(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), *ports_args())
    try:
        log = wait_for_text(tmp_path / "run_all.log", "Next steps:")
        line = next(l for l in log.splitlines() if "started mta, pid=" in l)
        pid = int(line.rsplit("=", 1)[1])
        os.kill(pid, signal.SIGKILL)
        wait_for_text(tmp_path / "run_all.log", "mta exited with status -9, restarting")
        wait_for(lambda: count_in_log(tmp_path / "run_all.log", "started mta, pid=") == 2, 10,
                 "mta to be started again")
    finally:
        stop(process)


def test_sigterm_stops_every_role_within_seconds(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), *ports_args())
    log = wait_for_text(tmp_path / "run_all.log", "Next steps:")
    pids = [int(l.rsplit("=", 1)[1]) for l in log.splitlines() if ", pid=" in l]
    assert len(pids) == 5
    started = time.monotonic()
    assert stop(process) == 0
    assert time.monotonic() - started < STOP_GRACE + SLACK
    assert "did not stop" not in (tmp_path / "run_all.log").read_text()     # no SIGKILL needed
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_pop3_keeps_its_rfc_1939_autologout_unless_told_otherwise(tmp_path):
    import run_all
    config = dict(run_all.DEFAULTS, spool=str(tmp_path))
    children = run_all.child_settings(config, {}, set())
    assert children["pop3d"]["idle_timeout"] == 600.0
    assert children["smtp_in"]["idle_timeout"] == 300.0
    children = run_all.child_settings(dict(config, idle_timeout="120"), {}, {"idle_timeout"})
    assert children["pop3d"]["idle_timeout"] == children["smtp_in"]["idle_timeout"] == 120.0


def test_every_role_logs_its_settings_in_one_shape(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), "--domain", "a.test",
                    "--domain", "b.test", "--verbose", *ports_args())
    try:
        roles = {"run_all", "smtp_in", "mta", "smtp_out", "pop3d"}

        def every_role_logged():
            log = (tmp_path / "run_all.log").read_text()
            return roles <= set(re.findall(r"(\w+)\[\d+\]: config: verbose", log)) and log
        log = wait_for(every_role_logged, 20, "every role's settings in the log")
    finally:
        stop(process)
    settings = [line.split(" ", 1)[1] for line in log.splitlines()
                if re.match(r"\S+ \w+\[\d+\]: config", line)]
    assert all(re.match(r"\w+\[\d+\]: config: [a-z0-9_]+=", line) for line in settings), settings
    for role in ("run_all", "smtp_in", "mta", "smtp_out", "pop3d"):
        assert any(re.match(r"%s\[\d+\]: config: verbose=yes\Z" % role, line)
                   for line in settings), role
        if role != "smtp_out":
            assert any(re.match(r"%s\[\d+\]: config: domain=a.test, b.test\Z" % role, line)
                       for line in settings), role


def test_the_listening_summary_comes_before_the_settings(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), *ports_args())
    try:
        wait_for_text(tmp_path / "run_all.log", "config: verbose=no")
        log = (tmp_path / "run_all.log").read_text()
    finally:
        stop(process)
    assert log.index("listening: SMTP") < log.index("config: ")
    children = [line for line in log.splitlines() if re.search(r"(smtp_in|mta|pop3d)\[\d+\]: config:", line)]
    assert not children        # under run_all, each role's list only with --verbose




# --- One configuration for every role ---

def write_config(tmp_path, text):
    path = tmp_path / "mail.ini"
    path.write_text(text)
    return str(path)


def test_every_key_of_the_config_file_reaches_its_role(tmp_path):
    import configparser
    config = write_config(tmp_path, "\n".join([
        "[DEFAULT]", "queue_lifetime = 86400", "delay_warning = 600", "domain = example.com",
        "[smtp_in]", "max_recipients = 50", "max_per_address = 500",
        "[submission]", "max_recipients = 20",
        "[smtp_out]", "max_connections = 10",
        "[pop3d]", "max_connections = 30", ""]))
    result = run_all("--check", "--print-config", "--config", config, "--spool",
                     str(tmp_path / "spool"), *ports_args())
    assert result.returncode == 0, result.stderr
    printed = result.stdout.decode()
    children = {}
    for block in printed.split("# ")[1:]:
        name, _, text = block.partition(":")
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(text.split("\n", 1)[1])
        children[name] = parser[parser.sections()[0]]
    assert set(children) == {"smtp_in", "submission", "mta", "smtp_out", "pop3d"}
    assert children["smtp_in"]["max_recipients"] == "50"
    assert children["smtp_in"]["max_per_address"] == "500"
    assert children["submission"]["max_recipients"] == "20"
    assert children["submission"]["max_per_address"] == "500"      # [smtp_in] under it
    assert children["smtp_out"]["max_connections"] == "10"
    assert children["pop3d"]["max_connections"] == "30"
    assert children["mta"]["queue_lifetime"] == "86400"
    assert float(children["smtp_out"]["queue_lifetime"]) == 86400
    assert float(children["smtp_out"]["delay_warning"]) == 600
    assert children["pop3d"]["domain"] == "example.com"
    assert children["smtp_out"]["my_listeners"] == children["smtp_in"]["listen"]   # loop check


def test_a_flag_wins_over_the_config_file(tmp_path):
    config = write_config(tmp_path, "[smtp_in]\nmax_size = 1000\n[DEFAULT]\nspf = off\n")
    result = run_all("--check", "--print-config", "--config", config, "--max-size", "2000",
                     "--spool", str(tmp_path / "spool"), *ports_args())
    assert result.returncode == 0, result.stderr
    assert "max_size = 1000" not in result.stdout.decode()
    assert result.stdout.decode().count("max_size = 2000") == 3      # smtp_in twice, mta
    assert "spf = off" in result.stdout.decode()


@pytest.mark.parametrize("text, error", [
    ("[smtp_in]\nmax_recipientz = 5\n", "[smtp_in] max_recipientz: no such setting for smtp_in"),
    ("[DEFAULT]\nqueue_lifetim = 5\n", "[DEFAULT] queue_lifetim: no such setting for any role"),
    ("[smtpin]\nmax_recipients = 5\n", "[smtpin]: no such section"),
    ("[pop3d]\nmax_recipients = 5\n", "[pop3d] max_recipients: no such setting for pop3d"),
    ("[smtp_in]\nlisten = 0.0.0.0:25\n", "[smtp_in] listen: run_all sets it from smtp"),
])
def test_an_unknown_key_stops_check_and_start_naming_file_section_and_key(tmp_path, text, error):
    config = write_config(tmp_path, text)
    for argv in (["--check"], []):
        result = run_all(*argv, "--config", config, "--spool", str(tmp_path / "spool"),
                         *ports_args(), timeout=30)
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert "%s: %s" % (config, error) in err, err
        assert "Traceback" not in err


def test_a_bad_value_in_a_role_section_is_one_line(tmp_path):
    config = write_config(tmp_path, "[smtp_out]\nmax_connections = many\n")
    result = run_all("--check", "--config", config, "--spool", str(tmp_path / "spool"))
    assert result.returncode == 1
    assert result.stderr.decode() == "run_all: [smtp_out] max_connections: not a number: 'many'\n"


def test_check_refuses_two_listeners_on_one_address(tmp_path):
    port, other = free_ports(2)
    result = run_all("--check", "--spool", str(tmp_path / "spool"), "--smtp", "127.0.0.1:%d" % port,
                     "--submission", "127.0.0.1:%d" % other, "--pop3", "127.0.0.1:%d" % port)
    assert result.returncode == 1
    assert "SMTP and POP3 both listen on 127.0.0.1:%d" % port in result.stderr.decode()
    result = run_all("--check", "--spool", str(tmp_path / "spool"), "--smtp", "0.0.0.0:%d" % port,
                     "--submission", "127.0.0.1:%d" % port, "--pop3", "")
    assert result.returncode == 1 and b"both listen on" in result.stderr


def test_sighup_reloads_instead_of_killing_run_all(tmp_path):
    config = write_config(tmp_path, "[smtp_out]\nmax_connections = 10\n")
    process = start(tmp_path, "--config", config, "--spool", str(tmp_path / "spool"),
                    *ports_args())
    try:
        log = wait_for_text(tmp_path / "run_all.log", "Next steps:")
        before = [int(l.rsplit("=", 1)[1]) for l in log.splitlines() if ", pid=" in l]
        with open(config, "w") as f:
            f.write("[smtp_out]\nmax_connections = 11\n")
        process.send_signal(signal.SIGHUP)
        wait_for_text(tmp_path / "run_all.log", "reload: restarting smtp_out")
        wait_for_text(tmp_path / "run_all.log", "reload: nothing to reload")   # mta got a HUP
        assert process.poll() is None
        wait_for(lambda: count_in_log(tmp_path / "run_all.log", "started smtp_out, pid=") == 2,
                 20, "smtp_out to be started again")
        log = (tmp_path / "run_all.log").read_text()
        after = [int(l.rsplit("=", 1)[1]) for l in log.splitlines() if ", pid=" in l]
        assert len(after) == 6 and set(before) < set(after)
        with open(tmp_path / "spool" / "run" / "smtp_out.ini") as f:
            assert "max_connections = 11" in f.read()
    finally:
        assert stop(process) == 0


def test_children_stop_when_run_all_is_killed(tmp_path):
    process = start(tmp_path, "--spool", str(tmp_path / "spool"), *ports_args())
    log = wait_for_text(tmp_path / "run_all.log", "Next steps:")
    pids = [int(l.rsplit("=", 1)[1]) for l in log.splitlines() if ", pid=" in l]
    assert len(pids) == 5
    process.kill()                    # SIGKILL: run_all can do nothing about it
    process.wait(10)

    def running(pid):
        try:
            with open("/proc/%d/status" % pid) as f:
                return "State:\tZ" not in f.read()
        except FileNotFoundError:
            return False
    try:
        wait_for(lambda: not any(running(pid) for pid in pids), 10,
                 "every role to stop after run_all died")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
