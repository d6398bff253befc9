"""run_all.py - start every role on one host from one config, and supervise them.

Each role runs as its own child process, the same file a user can run alone:

    smtp_in.py (MX)   smtp_in.py --submission   mta.py   smtp_out.py   pop3d.py

One INI file configures them all (`--config FILE`): [DEFAULT] for every role, [run_all] for
the listeners and this supervisor, and one section per child ([smtp_in], [submission] on top
of [smtp_in], [mta], [smtp_out], [pop3d]). Every key a role accepts may be set there; a key
no role knows is an error. For each child, run_all resolves its settings (flags given to
run_all first, then the child's own section, then [run_all] and [DEFAULT], then the role's
defaults), writes them whole to SPOOL/run/CHILD.ini and starts the child with `--config` on
that file. The admin tools read SPOOL/run/mta.ini too, to know the local domains.

run_all merges the children's logs on its own stderr (every line carries the role's name),
restarts a child that dies with a growing backoff, and on SIGTERM or SIGINT stops them all
within a few seconds. SIGHUP reloads: the config file is read again, children whose
settings changed are restarted, the others are told to load the TLS certificate again
(users and aliases are read again by every role when they change). If run_all itself dies,
even by SIGKILL, each child notices its parent is gone and stops within seconds. Nothing
acknowledged is lost on a stop: each role keeps its work in the spool.

Started as root with --user, run_all gives the spool to that user; each child binds its
ports, then becomes the user. run_all stays root to restart them, and keeps a copy of the
TLS certificate and key in SPOOL/run/tls/, readable by the user, so that a renewed
certificate is loaded on SIGHUP without a restart.

Run: python3 run_all.py                     (embedded defaults: ./mailspool, localhost, 2525/2587/1110)
     python3 run_all.py --check [--print-config]   (validate the configuration and exit)
"""

import argparse
import configparser
import io
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
import pop3d
import smtp_in
import smtp_out

__all__ = ["CHILDREN", "DEFAULTS", "HELP", "Supervisor", "check_config", "child_settings", "main",
           "settings_text"]

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = {
    "spool": "",                     # plumbing.spool_path: $MAILTOOLKIT_SPOOL, else ./mailspool
    "store": "",                     # plumbing.store_path: the spool itself
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
    "remote_port": smtp_out.DEFAULTS["remote_port"],
    "relay_network": [],
    "relay_domain": [],
    "idle_timeout": "",              # each role's own: SMTP 300 s, POP3 600 s (RFC 1939 3)
    "max_size": smtp_in.DEFAULTS["max_size"],
    "spf": smtp_in.DEFAULTS["spf"],
    "dmarc": smtp_in.DEFAULTS["dmarc"],
    **plumbing.SERVER_DEFAULTS,       # processes, anvil and stress mode of smtp_in and pop3d
    "retry_schedule": mta.DEFAULTS["retry_schedule"],
    "cpus": "none",                  # leave placement to the system, as every peer does
    "user": "",
    "syslog": False,
    "verbose": False,
}

HELP = {
    **plumbing.SERVER_HELP,
    "smtp": "HOST:PORT of the MX listener (\"\" turns it off)",
    "submission": "HOST:PORT of the submission listener, AUTH required (\"\" turns it off)",
    "smtps": "HOST:PORT of an implicit-TLS submission listener, e.g. 0.0.0.0:465",
    "pop3": "HOST:PORT of the POP3 listener (\"\" turns it off)",
    "pop3s": "HOST:PORT of an implicit-TLS POP3 listener, e.g. 0.0.0.0:995",
    "relay_auth_file": "file with the smarthost's user name and password",
    "relay_domain": "a domain this host is a backup MX for (repeatable): accepted, queued, "
                    "and sent on to the domain's better MX hosts",
    "idle_timeout": "seconds to wait for a client's next command, for every server "
                    "(default: SMTP 300, POP3 600)",
    "spf": "SPF check of MAIL FROM on the MX (RFC 7208): off; tag, adding Received-SPF and "
           "Authentication-Results; or reject, also refusing a fail (550 5.7.23)",
    "dmarc": "DMARC check of the From domain on the MX (RFC 7489): off; tag, reporting it in "
             "Authentication-Results; or enforce, also refusing a fail under p=reject "
             "(550 5.7.1) and marking one under p=quarantine",
    "cpus": "CPUs to give the roles, one each in turn, e.g. 2-5 (auto: those run_all may "
            "use; none: leave it to the system); a role with worker processes gets them all, "
            "a worker on each",
}

# The children: name -> (file, INI section, the role's settings). The submission listener
# is smtp_in again; its [submission] section is read on top of [smtp_in].
CHILDREN = {
    "smtp_in": ("smtp_in.py", "smtp_in", smtp_in.DEFAULTS),
    "submission": ("smtp_in.py", "smtp_in", smtp_in.DEFAULTS),
    "mta": ("mta.py", "mta", mta.DEFAULTS),
    "smtp_out": ("smtp_out.py", "smtp_out", smtp_out.DEFAULTS),
    "pop3d": ("pop3d.py", "pop3d", pop3d.DEFAULTS),
}
SECTIONS = ("run_all",) + tuple(CHILDREN)        # besides [DEFAULT]

# Keys run_all sets in each child itself, from smtp, submission, smtps, pop3, pop3s and cpus.
MANAGED_KEYS = ("listen", "smtps_listen", "pop3s_listen", "submission", "cpus")

# The order in which roles are given CPUs: smtp_in and mta, which every inbound message
# crosses, get one each first.
CPU_ORDER = ("smtp_in", "mta", "smtp_out", "pop3d", "submission")

RESTART_DELAYS = (1, 2, 5, 10, 30)   # seconds before restarting a role that died, growing
STABLE_AFTER = 60                    # a role up this long has its backoff reset
STOP_GRACE = 8                       # seconds a role gets to stop before SIGKILL
READY_TIMEOUT = 10                   # seconds to wait for the listeners to open
TLS_COPY_DIR = "tls"                 # SPOOL/run/tls/: the children's copy of cert and key

log = logging.getLogger("run_all")


# --- The children ---

def listed_cpus(setting):
    """The CPUs of the cpus setting, in order: those listed, those this process may use for
    "auto", none for "none". Raises ValueError for a bad setting."""
    setting = setting.strip().lower()
    if setting in ("none", ""):
        return []
    if setting == "auto":
        return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return sorted(plumbing.parse_cpus(setting))


def cpu_plan(setting, names=CPU_ORDER):
    """{role name: CPU number} for the cpus setting: one CPU per role, in CPU_ORDER, taken
    in turn from the CPUs listed ("auto": those this process may use); {} for "none".

    Each role keeps to one CPU (see plumbing.run_on_cpus); with two CPUs, smtp_in and mta
    run side by side. Raises ValueError for a bad setting.
    """
    cpus = listed_cpus(setting)
    order = [name for name in CPU_ORDER if name in names]
    return {name: cpus[number % len(cpus)] for number, name in enumerate(order)} if cpus else {}


def child_cpus(setting, name, processes=1, names=CPU_ORDER):
    """The cpus setting run_all gives child name ("" when it leaves placement alone): its
    CPU in cpu_plan, or, for a role that serves from worker processes (processes not 1),
    every CPU listed, each worker keeping to one of them in turn (see plumbing.Master)."""
    plan = cpu_plan(setting, names)
    if name not in plan:
        return ""
    if str(processes).strip() != "1":
        return ",".join(str(cpu) for cpu in listed_cpus(setting))
    return str(plan[name])


def child_names(config):
    """The children the configuration asks for, in start order."""
    names = []
    if config["smtp"]:
        names.append("smtp_in")
    if config["submission"] or config["smtps"]:
        names.append("submission")
    names += ["mta", "smtp_out"]
    if config["pop3"] or config["pop3s"]:
        names.append("pop3d")
    return names


def check_sections(sections, path):
    """Problems with the config file's sections and keys: a section no child has, a key no
    role knows, a key in a child's section that the child does not take."""
    problems = []
    known_anywhere = set(DEFAULTS).union(*(defaults for _, _, defaults in CHILDREN.values()))
    for section, values in sections.items():
        if section == "DEFAULT":
            known, where = known_anywhere, "any role"
        elif section == "run_all":
            known, where = set(DEFAULTS), "run_all"
        elif section in CHILDREN:
            known, where = set(CHILDREN[section][2]) - set(MANAGED_KEYS), section
        else:
            problems.append("%s: [%s]: no such section (sections: DEFAULT, %s)"
                            % (path, section, ", ".join(SECTIONS)))
            continue
        for key in values:
            if key in MANAGED_KEYS and section in CHILDREN:
                problems.append("%s: [%s] %s: run_all sets it from smtp, submission, smtps, "
                                "pop3, pop3s and cpus" % (path, section, key))
            elif key not in known:
                problems.append("%s: [%s] %s: no such setting for %s" % (path, section, key, where))
    return problems


def child_settings(config, sections, given, tls_files=None):
    """{child: {key: value}}: every setting of every child the configuration starts.

    For each key of the role: a run_all flag given on the command line (given: their keys);
    else the child's own section ([submission] over [smtp_in] for the submission listener);
    else run_all's setting of that name (its defaults, [DEFAULT] and [run_all]); else
    [DEFAULT]; else the role's default. Then the listeners and CPUs run_all decides, and
    tls_files, a (cert, key) pair standing in for the certificate files. Raises ValueError
    for a value that is not of its setting's type.
    """
    names = child_names(config)
    listeners = {
        "smtp_in": {"listen": config["smtp"], "submission": False, "smtps_listen": ""},
        "submission": {"listen": config["submission"], "submission": True,
                       "smtps_listen": config["smtps"]},
        "pop3d": {"listen": config["pop3"], "pop3s_listen": config["pop3s"]},
    }
    result = {}
    for name in names:
        _, section, defaults = CHILDREN[name]
        own = dict(sections.get(section, {}))
        if name == "submission":
            own.update(sections.get("submission", {}))
        settings = {}
        for key, default in defaults.items():
            if key in MANAGED_KEYS:
                continue               # set below
            if key in given:
                value = config[key]
            elif key in own:
                value = own[key]
            elif key in DEFAULTS and config[key] != "":
                value = config[key]
            else:
                value = sections.get("DEFAULT", {}).get(key, default)
            try:
                settings[key] = plumbing.config_value(key, value, default)
            except ValueError as exc:
                raise ValueError("[%s] %s" % (name, exc)) from None
        settings.update((key, value) for key, value in listeners.get(name, {}).items()
                        if key in defaults)
        settings["cpus"] = child_cpus(config["cpus"], name, settings.get("processes", 1), names)
        if name == "smtp_out" and config["smtp"] and config["smtp"] not in settings["my_listeners"]:
            # smtp_out must know our own MX listener: an MX that reaches it is a mail loop.
            settings["my_listeners"] = settings["my_listeners"] + [config["smtp"]]
        if tls_files and settings.get("tls_cert"):
            settings["tls_cert"], settings["tls_key"] = tls_files
        result[name] = settings
    return result


def settings_text(name, settings):
    """The INI text of one child's settings, in the section its role reads."""
    parser = configparser.ConfigParser(interpolation=None)
    parser[CHILDREN[name][1]] = {key: plumbing.config_text(value) for key, value in settings.items()}
    text = io.StringIO()
    parser.write(text)
    return text.getvalue()


def write_child_config(path, text, owner=None):
    """Write one child's settings file atomically, mode 0600; owned by the spool's user
    when given."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if owner is not None:
        os.chown(temporary, *owner)
    os.replace(temporary, path)


def copy_tls_files(config, folder, owner):
    """Copy the certificate and key where the children, once not root, can read them again
    on SIGHUP (SPOOL/run/tls/, mode 0600, owned by the user); return the copies' paths."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chown(folder, *owner)
    copies = []
    for source, name in ((config["tls_cert"], "cert.pem"), (config["tls_key"], "key.pem")):
        target = os.path.join(folder, name)
        temporary = target + ".tmp"
        with open(source, "rb") as f:
            data = f.read()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chown(temporary, *owner)
        os.replace(temporary, target)
        copies.append(target)
    return tuple(copies)


class Child:
    """One supervised role process."""

    def __init__(self, name, argv, settings_text=""):
        self.name = name
        self.argv = argv
        self.settings_text = settings_text
        self.process = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0

    def start(self):
        environment = dict(os.environ, **{plumbing.SUPERVISOR_ENV: str(os.getpid())})
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env=environment)
        self.started = time.monotonic()
        log.info("started %s, pid=%d", self.name, self.process.pid)

    def signal(self, signum):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


class Supervisor:
    """Runs the children, restarts the ones that die, reloads, stops them all when asked.

    commands is [(name, argv, settings text)]; reload(), when given, returns a new such list
    (or None to keep the present one) and is called on SIGHUP.
    """

    def __init__(self, commands, reload=None):
        self.children = [Child(*command) for command in commands]
        self.reload = reload

    def run(self, stop, reload_requested=None):
        """Start every child; restart dead ones with backoff until the stop event is set."""
        for child in self.children:
            child.start()
        while not stop.wait(0.2):
            if reload_requested is not None and reload_requested.is_set():
                reload_requested.clear()
                self.apply_reload()
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

    def apply_reload(self):
        """Restart the children whose command or settings changed, start new ones, stop
        those no longer wanted, and send SIGHUP to the rest (TLS certificate again)."""
        commands = self.reload() if self.reload is not None else None
        if commands is None:
            return
        old = {child.name: child for child in self.children}
        children = []
        for name, argv, text in commands:
            child = old.pop(name, None)
            if child is not None and (child.argv, child.settings_text) == (argv, text):
                child.signal(signal.SIGHUP)
                children.append(child)
                continue
            if child is not None:
                log.info("reload: restarting %s, its settings changed", name)
                self.stop([child])
            else:
                log.info("reload: starting %s", name)
            child = Child(name, argv, text)
            child.start()
            children.append(child)
        for child in old.values():
            log.info("reload: stopping %s, no longer configured", child.name)
        self.stop(list(old.values()))
        self.children = children

    def stop(self, children=None):
        """SIGTERM the children, then SIGKILL those still running after the grace."""
        children = self.children if children is None else children
        running = [c.process for c in children if c.process is not None]
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


def clashing_listeners(addresses):
    """Problems for two listeners on one port where their hosts overlap (the same address,
    or a wildcard such as 0.0.0.0 or :: and anything else of that port)."""
    problems = []
    wildcard = ("0.0.0.0", "::", "")
    for number, (label, host, port) in enumerate(addresses):
        for other_label, other_host, other_port in addresses[:number]:
            if port == other_port and (host == other_host or host in wildcard
                                       or other_host in wildcard):
                problems.append("%s and %s both listen on %s:%d"
                                % (other_label, label, host, port))
    return problems


def user_entry(user):
    """The pwd entry of --user; ValueError when there is no such user."""
    import pwd
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise ValueError("user: no such user %r" % user) from None


def unreachable_folder(spool, entry):
    """The first folder above the spool that the user cannot pass through, or None."""
    folder = os.path.dirname(os.path.abspath(spool))
    while True:
        try:
            st = os.stat(folder)
        except OSError:
            return None                # made by os.makedirs below, as root: checked again
        if st.st_uid == entry.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid == entry.pw_gid:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_config(config, held=()):
    """Return a list of problems (empty when the configuration can run).

    held are the (host, port) pairs this run_all listens on already (a reload): they are
    not probed.
    """
    problems = []
    try:
        addresses = listen_addresses(config)
    except ValueError as exc:
        return ["listen address: %s" % exc]
    problems += clashing_listeners(addresses)
    for label, host, port in addresses:
        if (host, port) in held:
            continue
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
        plumbing.worker_processes(config)
    except ValueError as exc:
        problems.append(str(exc))
    if config["spf"] not in smtp_in.SPF_POLICIES:
        problems.append("spf: %r is not one of %s" % (config["spf"], ", ".join(smtp_in.SPF_POLICIES)))
    try:
        smtp_in.check_dmarc_policy(config["dmarc"])
    except ValueError as exc:
        problems.append(str(exc))
    try:
        mta.parse_retry_schedule(config["retry_schedule"])
    except ValueError as exc:
        problems.append(str(exc))
    if (config["smtps"] or config["pop3s"]) and not config["tls_cert"]:
        problems.append("tls: the SMTPS and POP3S listeners need --tls-cert and --tls-key")
    spool = config["spool"]
    if config["user"]:
        try:
            entry = user_entry(config["user"])
        except ValueError as exc:
            problems.append(str(exc))
        else:
            blocked = unreachable_folder(spool, entry)
            if os.getuid() == 0 and blocked:
                problems.append("spool: user %s cannot reach %s: %s is closed to it (chmod o+x, "
                                "or put the spool elsewhere)" % (config["user"], spool, blocked))
    try:
        os.makedirs(spool, mode=0o700, exist_ok=True)
        probe_path = os.path.join(spool, ".write-test-%d" % os.getpid())
        with open(probe_path, "w") as f:
            f.write("ok")
        os.unlink(probe_path)
    except OSError as exc:
        problems.append("spool: %s is not writable: %s" % (spool, exc.strerror or exc))
        return problems
    store = mailbox_store.Store(plumbing.store_path(config["store"], spool), config["domain"],
                                config["hostname"] or None)
    for domain in config["domain"]:
        try:
            if not store.expand("postmaster@" + domain):
                raise mailbox_store.UnknownUser(domain)
        except (mailbox_store.UnknownUser, mailbox_store.AliasLoop, mailbox_store.AddressError) as exc:
            problems.append("postmaster@%s has no destination (%s): add an alias or a user"
                            % (domain, exc))
    return problems


def give_spool_to(spool, entry):
    """Started as root with --user: the roles drop to that user, so it must own the spool,
    and everything in it (files an admin tool or an older version made as root)."""
    owner = (entry.pw_uid, entry.pw_gid)
    for folder, dirs, files in os.walk(spool):
        for name in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != owner:
                os.lchown(name, *owner)


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

def read_configuration(args):
    """(run_all's settings, the file's sections, {child: settings}, problems) from the flags
    and the config file. Raises ValueError for a bad value or an unreadable file."""
    config = plumbing.load_config("run_all", DEFAULTS, args)
    config["spool"] = plumbing.spool_path(config["spool"])
    if config["store"]:
        config["store"] = os.path.abspath(config["store"])    # the children may start elsewhere
    sections = plumbing.read_ini(args.config) if args.config else {}
    problems = check_sections(sections, args.config)
    given = {key for key in DEFAULTS if getattr(args, key, None) is not None}
    return config, sections, given, problems


def child_commands(children, run_dir, owner):
    """[(name, argv, settings text)], each child's settings written to run_dir/NAME.ini."""
    commands = []
    for name, settings in children.items():
        text = settings_text(name, settings)
        path = os.path.join(run_dir, name + ".ini")
        write_child_config(path, text, owner)
        commands.append((name, [sys.executable, os.path.join(HERE, CHILDREN[name][0]),
                                "--config", path], text))
    return commands


def print_settings(children, run_dir):
    """--print-config: each child's effective settings, as its settings file will hold them."""
    for name, settings in children.items():
        print("# %s: %s" % (name, os.path.join(run_dir, name + ".ini")))
        print(settings_text(name, settings))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="run_all.py", description="Run every mail role on this host from one config.")
    plumbing.add_options(parser, DEFAULTS, HELP)
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration (ports, certificate, spool, postmaster) and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print every child's effective settings (with --check: then exit)")
    args = parser.parse_args(argv)
    try:
        config, sections, given, problems = read_configuration(args)
        children = child_settings(config, sections, given)
    except ValueError as exc:
        print("run_all: %s" % exc, file=sys.stderr)
        return 1
    plumbing.setup_logging("run_all", config["syslog"], config["verbose"])
    run_dir = os.path.join(config["spool"], mta.RUN_DIR)
    if args.print_config:
        print_settings(children, run_dir)
        sys.stdout.flush()
    problems += check_config(config)
    for problem in problems:
        print("run_all: %s" % problem, file=sys.stderr)
    if args.check:
        print("run_all: configuration %s" % ("has problems" if problems else "OK"), file=sys.stderr)
        return 1 if problems else 0
    if any(not problem.startswith("postmaster@") for problem in problems):
        return 1

    owner = entry = None
    if config["user"]:
        if os.getuid() == 0:
            entry = user_entry(config["user"])
            owner = (entry.pw_uid, entry.pw_gid)
        else:
            log.warning("user %s: not started as root; every role runs as uid %d",
                        config["user"], os.getuid())
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        tls_files = None
        if owner and config["tls_cert"]:
            tls_files = copy_tls_files(config, os.path.join(run_dir, TLS_COPY_DIR), owner)
        commands = child_commands(child_settings(config, sections, given, tls_files), run_dir, owner)
        if entry is not None:
            give_spool_to(config["spool"], entry)
    except OSError as exc:
        print("run_all: cannot prepare the spool %s: %s" % (config["spool"], exc), file=sys.stderr)
        return 1
    addresses = listen_addresses(config)

    def reload():
        """SIGHUP: the new commands, or None (and why, in the log) to keep what runs."""
        log.info("reload: reading the configuration again")
        try:
            new, new_sections, new_given, new_problems = read_configuration(args)
            child_settings(new, new_sections, new_given)
        except ValueError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
            return None
        held = {(host, port) for _, host, port in addresses}
        new_problems += check_config(new, held)
        for key in ("spool", "user", "smtp", "submission", "smtps", "pop3", "pop3s"):
            if new[key] != config[key]:
                new_problems.append("%s: changes only with a restart of run_all" % key)
        new_problems = [p for p in new_problems if not p.startswith("postmaster@")]
        for problem in new_problems:
            log.error("reload: %s", problem)
        if new_problems:
            log.error("reload: keeping the running configuration")
            return None
        try:
            new_tls = None
            if owner and new["tls_cert"]:
                new_tls = copy_tls_files(new, os.path.join(run_dir, TLS_COPY_DIR), owner)
            return child_commands(child_settings(new, new_sections, new_given, new_tls),
                                  run_dir, owner)
        except OSError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
            return None

    stop = threading.Event()
    reload_requested = threading.Event()
    # The signals reach the events through a thread of their own (plumbing.SignalWake: a
    # handler that set them could deadlock the main thread waiting on stop).
    wake = plumbing.SignalWake()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: None)

    def watch_signals():
        while True:
            for signum in wake.wait():
                (reload_requested if signum == signal.SIGHUP else stop).set()

    threading.Thread(target=watch_signals, daemon=True).start()
    supervisor = Supervisor(commands, reload)

    def announce():
        if wait_until_listening(addresses):
            listening = ", ".join("%s %s:%d" % a for a in addresses)
            log.info("listening: %s; spool %s", listening, config["spool"])
            print(next_steps(config, addresses), file=sys.stderr, flush=True)
        else:
            log.warning("not every listener opened within %d s; see the roles' messages",
                        READY_TIMEOUT)
        plumbing.log_config(log, config)

    threading.Thread(target=announce, daemon=True).start()
    supervisor.run(stop, reload_requested)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
