"""run_all.py - start every role on one host from one config, and supervise them.

Each role runs as its own child process, the same file a user can run alone:

    smtp_in.py (MX)   smtp_in.py --submission   mta.py   smtp_out.py   pop3d.py

run_all writes the effective settings to SPOOL/run/run_all.ini, starts each child with
`--config` on that file (plus the one listen address that tells two smtp_in apart), merges
their logs on its own stderr (every line carries the role's name), restarts a child that
dies with a growing backoff, and on SIGTERM or SIGINT stops them all within a few seconds.
Nothing acknowledged is lost on a stop: each role keeps its work in the spool.

Run: python3 run_all.py                     (embedded defaults: ./mailspool, localhost, 2525/2587/1110)
     python3 run_all.py --check             (validate the configuration and exit)
"""

import argparse
import configparser
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import mailbox_store
import mta
import plumbing

__all__ = ["DEFAULTS", "Supervisor", "check_config", "main"]

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = {
    "spool": "./mailspool",
    "domain": ["localhost"],
    "hostname": "",
    "smtp": "127.0.0.1:2525",
    "submission": "127.0.0.1:2587",
    "smtps": "",
    "pop3": "127.0.0.1:1110",
    "pop3s": "",
    "tls_cert": "",
    "tls_key": "",
    "dns": "",
    "relay_host": "",
    "relay_auth_file": "",
    "remote_port": 25,
    "relay_network": [],
    "idle_timeout": "",              # each role's own: SMTP 300 s, POP3 600 s (RFC 1939 3)
    "max_size": 35 * 1024 * 1024,
    "spf": "tag",
    "anvil_penalty": 0.5,            # the anvil and stress mode of smtp_in and pop3d
    "anvil_max_penalty": 15.0,
    "anvil_soft_errors": 10,
    "anvil_forget": 600.0,
    "anvil_exempt": [],
    "stress_threshold": 0.8,
    "stress_idle_timeout": 10.0,
    "stress_session_timeout": 120.0,
    "retry_schedule": "5m,10m,20m,40m,1h",
    "cpus": "auto",
    "user": "",
    "syslog": False,
    "verbose": False,
}

HELP = {
    **plumbing.ANVIL_HELP,
    "smtp": "HOST:PORT of the MX listener (\"\" turns it off)",
    "submission": "HOST:PORT of the submission listener, AUTH required (\"\" turns it off)",
    "smtps": "HOST:PORT of an implicit-TLS submission listener, e.g. 0.0.0.0:465",
    "pop3": "HOST:PORT of the POP3 listener (\"\" turns it off)",
    "pop3s": "HOST:PORT of an implicit-TLS POP3 listener, e.g. 0.0.0.0:995",
    "relay_auth_file": "file with the smarthost's user name and password",
    "idle_timeout": "seconds to wait for a client's next command, for every server "
                    "(default: SMTP 300, POP3 600)",
    "spf": "SPF check of MAIL FROM on the MX (RFC 7208): off; tag, adding Received-SPF and "
           "Authentication-Results; or reject, also refusing a fail (550 5.7.23)",
    "cpus": "CPUs to give the roles, one each in turn, e.g. 2-5 (auto: those run_all may "
            "use; none: leave it to the system)",
}

# Settings every role reads from the [DEFAULT] section of the generated file.
SHARED_KEYS = ("spool", "domain", "hostname", "tls_cert", "tls_key", "dns", "idle_timeout",
               "max_size", "relay_network", "retry_schedule", "user", "syslog", "verbose",
               *plumbing.ANVIL_HELP)

# The order in which roles are given CPUs: smtp_in and mta, which every inbound message
# crosses, get one each first.
CPU_ORDER = ("smtp_in", "mta", "smtp_out", "pop3d", "submission")

RESTART_DELAYS = (1, 2, 5, 10, 30)   # seconds before restarting a role that died, growing
STABLE_AFTER = 60                    # a role up this long has its backoff reset
STOP_GRACE = 8                       # seconds a role gets to stop before SIGKILL
READY_TIMEOUT = 10                   # seconds to wait for the listeners to open

log = logging.getLogger("run_all")


# --- The children ---

def cpu_plan(setting, names=CPU_ORDER):
    """{role name: CPU number} for the cpus setting: one CPU per role, in CPU_ORDER, taken
    in turn from the CPUs listed ("auto": those this process may use); {} for "none".

    Each role keeps to one CPU (see plumbing.run_on_cpus); with two CPUs, smtp_in and mta
    run side by side. Raises ValueError for a bad setting.
    """
    setting = setting.strip().lower()
    if setting in ("none", ""):
        return {}
    if setting == "auto":
        if not hasattr(os, "sched_getaffinity"):
            return {}
        cpus = sorted(os.sched_getaffinity(0))
    else:
        cpus = sorted(plumbing.parse_cpus(setting))
    order = [name for name in CPU_ORDER if name in names]
    return {name: cpus[number % len(cpus)] for number, name in enumerate(order)}


def role_commands(config, ini_path):
    """(name, argv) of each child process the configuration asks for."""
    python = sys.executable

    def role(file_name, *extra):
        return [python, os.path.join(HERE, file_name), "--config", ini_path] + list(extra)

    commands = []
    if config["smtp"]:
        commands.append(("smtp_in", role("smtp_in.py", "--listen", config["smtp"])))
    if config["submission"] or config["smtps"]:
        extra = ["--submission", "--listen", config["submission"] or config["smtps"]]
        if config["submission"] and config["smtps"]:
            extra += ["--smtps-listen", config["smtps"]]
        commands.append(("submission", role("smtp_in.py", *extra)))
    commands.append(("mta", role("mta.py")))
    commands.append(("smtp_out", role("smtp_out.py")))
    if config["pop3"] or config["pop3s"]:
        extra = ["--listen", config["pop3"] or config["pop3s"]]
        if config["pop3"] and config["pop3s"]:
            extra += ["--pop3s-listen", config["pop3s"]]
        commands.append(("pop3d", role("pop3d.py", *extra)))
    plan = cpu_plan(config["cpus"], [name for name, _ in commands])
    return [(name, argv + ["--cpus", str(plan[name])] if name in plan else argv)
            for name, argv in commands]


def write_role_config(config, path):
    """Write the settings the roles read: shared ones in [DEFAULT], the rest per role."""
    parser = configparser.ConfigParser(interpolation=None)
    for key in SHARED_KEYS:
        if config[key] not in ("", []):
            parser["DEFAULT"][key] = plumbing.config_text(config[key])
    parser["smtp_in"] = {"spf": config["spf"]}
    parser["smtp_out"] = {"remote_port": plumbing.config_text(config["remote_port"])}
    for key in ("relay_host", "relay_auth_file"):
        if config[key]:
            parser["smtp_out"][key] = config[key]
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        parser.write(f)
    os.replace(temporary, path)


class Child:
    """One supervised role process."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv
        self.process = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0

    def start(self):
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        log.info("started %s, pid=%d", self.name, self.process.pid)


class Supervisor:
    """Runs the children, restarts the ones that die, stops them all when asked."""

    def __init__(self, commands):
        self.children = [Child(name, argv) for name, argv in commands]

    def run(self, stop):
        """Start every child; restart dead ones with backoff until the stop event is set."""
        for child in self.children:
            child.start()
        while not stop.wait(0.2):
            now = time.monotonic()
            for child in self.children:
                if child.process is None:
                    if now >= child.restart_at:
                        child.start()
                    continue
                status = child.process.poll()
                if status is None:
                    if now - child.started > STABLE_AFTER:
                        child.failures = 0
                    continue
                delay = RESTART_DELAYS[min(child.failures, len(RESTART_DELAYS) - 1)]
                child.failures += 1
                child.process = None
                child.restart_at = now + delay
                log.warning("%s exited with status %s, restarting in %d s", child.name, status, delay)
        self.stop()

    def stop(self):
        """SIGTERM every child, then SIGKILL those still running after the grace."""
        running = [c.process for c in self.children if c.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        until = time.monotonic() + STOP_GRACE
        for process in running:
            try:
                process.wait(max(0.1, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %d s, killing it", process.pid, STOP_GRACE)
                process.kill()
                process.wait()


# --- Checks ---

def listen_addresses(config):
    """(label, host, port) of every listener the configuration opens."""
    labels = (("smtp", "SMTP", 25), ("submission", "submission", 587), ("smtps", "SMTPS", 465),
              ("pop3", "POP3", 110), ("pop3s", "POP3S", 995))
    return [(label,) + plumbing.parse_hostport(config[key], port)
            for key, label, port in labels if config[key]]


def check_config(config):
    """Return a list of problems (empty when the configuration can run)."""
    problems = []
    try:
        addresses = listen_addresses(config)
    except ValueError as exc:
        return ["listen address: %s" % exc]
    for label, host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            problems.append("%s: cannot listen on %s:%d: %s" % (label, host, port, exc.strerror))
        finally:
            probe.close()
    if bool(config["tls_cert"]) != bool(config["tls_key"]):
        problems.append("tls: give both --tls-cert and --tls-key")
    elif config["tls_cert"]:
        try:
            plumbing.server_tls_context(config["tls_cert"], config["tls_key"])
        except (OSError, ssl.SSLError) as exc:
            problems.append("tls: cannot load %s / %s: %s" % (config["tls_cert"], config["tls_key"], exc))
    try:
        cpu_plan(config["cpus"])
    except ValueError as exc:
        problems.append(str(exc))
    try:
        plumbing.Anvil.from_config(config)
    except ValueError as exc:
        problems.append(str(exc))
    if config["spf"] not in ("off", "tag", "reject"):
        problems.append("spf: %r is not one of off, tag, reject" % config["spf"])
    try:
        mta.parse_retry_schedule(config["retry_schedule"])
    except ValueError as exc:
        problems.append(str(exc))
    if (config["smtps"] or config["pop3s"]) and not config["tls_cert"]:
        problems.append("tls: the SMTPS and POP3S listeners need --tls-cert and --tls-key")
    spool = config["spool"]
    try:
        os.makedirs(spool, exist_ok=True)
        probe_path = os.path.join(spool, ".write-test-%d" % os.getpid())
        with open(probe_path, "w") as f:
            f.write("ok")
        os.unlink(probe_path)
    except OSError as exc:
        problems.append("spool: %s is not writable: %s" % (spool, exc.strerror or exc))
        return problems
    store = mailbox_store.Store(spool, config["domain"], config["hostname"] or None)
    for domain in config["domain"]:
        try:
            if not store.expand("postmaster@" + domain):
                raise mailbox_store.UnknownUser(domain)
        except (mailbox_store.UnknownUser, mailbox_store.AliasLoop, mailbox_store.AddressError) as exc:
            problems.append("postmaster@%s has no destination (%s): add an alias or a user"
                            % (domain, exc))
    return problems


def give_spool_to(spool, user):
    """Started as root with --user: the roles drop to that user, so it must own the spool."""
    import pwd
    entry = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(spool):
        for name in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            os.lchown(name, entry.pw_uid, entry.pw_gid)


def listening_ports():
    """Ports in LISTEN state on this host, from /proc/net/tcp{,6}; None where there is none."""
    ports = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        found = True
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A":        # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if found else None


def is_listening(host, port):
    """True when something listens on host:port. Reads the kernel's table where it can,
    so that no probe connection shows up in the roles' logs; connects elsewhere."""
    ports = listening_ports()
    if ports is not None:
        return port in ports
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until_listening(addresses, timeout=READY_TIMEOUT):
    """True once every address has a listener, False after timeout seconds."""
    until = time.monotonic() + timeout
    while not all(is_listening(host, port) for _, host, port in addresses):
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


def next_steps(config, addresses):
    """The few lines a new user needs after the first start."""
    domain = config["domain"][0]
    where = dict((label, "%s:%d" % (host, port)) for label, host, port in addresses)
    spool = config["spool"]
    lines = ["Next steps:",
             "  add a user:    python3 mailbox_store.py --spool %s add-user alice@%s" % (spool, domain)]
    if "SMTP" in where:
        lines.append("  send to them:  swaks --server %s --to alice@%s --from me@%s"
                     % (where["SMTP"], domain, domain))
    if "POP3" in where:
        lines.append("  read it:       curl -u alice@%s:PASSWORD pop3://%s/1" % (domain, where["POP3"]))
    return "\n".join(lines)


# --- main ---

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="run_all.py", description="Run every mail role on this host from one config.")
    plumbing.add_options(parser, DEFAULTS, HELP)
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration (ports, certificate, spool, postmaster) and exit")
    args = parser.parse_args(argv)
    try:
        config = plumbing.load_config("run_all", DEFAULTS, args)
    except ValueError as exc:
        print("run_all: %s" % exc, file=sys.stderr)
        return 1
    plumbing.setup_logging("run_all", config["syslog"], config["verbose"])
    config["spool"] = os.path.abspath(config["spool"])

    problems = check_config(config)
    for problem in problems:
        print("run_all: %s" % problem, file=sys.stderr)
    if args.check:
        print("run_all: configuration %s" % ("has problems" if problems else "OK"), file=sys.stderr)
        return 1 if problems else 0
    if any(not problem.startswith("postmaster@") for problem in problems):
        return 1

    plumbing.log_config(log, config)
    run_dir = os.path.join(config["spool"], "run")
    os.makedirs(run_dir, exist_ok=True)
    ini_path = os.path.join(run_dir, "run_all.ini")
    write_role_config(config, ini_path)
    if config["user"] and os.getuid() == 0:
        give_spool_to(config["spool"], config["user"])

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    supervisor = Supervisor(role_commands(config, ini_path))
    addresses = listen_addresses(config)

    def announce():
        if wait_until_listening(addresses):
            listening = ", ".join("%s %s:%d" % a for a in addresses)
            print("run_all: listening: %s; spool %s" % (listening, config["spool"]), file=sys.stderr)
            print(next_steps(config, addresses), file=sys.stderr, flush=True)
        else:
            log.warning("not every listener opened within %d s; see the roles' messages",
                        READY_TIMEOUT)

    threading.Thread(target=announce, daemon=True).start()
    supervisor.run(stop)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
