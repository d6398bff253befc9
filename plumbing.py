"""plumbing.py - shared server plumbing for the mail roles.

Written once and imported by every daemon (smtp_in, pop3d, mta, smtp_out, run_all):

- ThreadedServer / ConnectionHandler: a threaded socketserver with connection caps in
  total and per client address, idle and session timeouts that shrink under stress (most
  slots in use, as Postfix's stress mode), IPv4 and IPv6 listeners, implicit TLS, STARTTLS,
  a graceful shutdown, and one short, rate-limited log line for an unexpected error;
- Anvil: failed logins and errors per client address and login name, shared by every
  session of a process, turned into a penalty that grows and is forgotten (Dovecot's
  auth_penalty, Postfix's smtpd_soft_error_limit);
- LineReader: a bounded line reader that reads in blocks and reports how each line ended
  (CRLF, bare LF or bare CR), which SMTP needs against smuggling;
- ClientConnection: the same bounded reads, and TLS, for a protocol client;
- TLS contexts, strict SASL PLAIN and LOGIN decoding (RFC 4616, RFC 4954);
- configuration (defaults, then an INI file, then flags), logging in the shape of
  Postfix (docs/operating.md), queue ids, and dropping root privileges.

This module knows no mail protocol: a role subclasses the server and the handler, or the
client connection.
"""

import argparse
import base64
import binascii
import collections
import configparser
import encodings.idna  # noqa: F401 - loaded now: see drop_privileges
import functools
import ipaddress
import json
import logging
import logging.handlers
import mmap
import os
import queue
import secrets
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass

__all__ = [
    "Anvil", "AnvilClient", "AnvilGone", "ClientConnection", "ConnectionHandler", "DEFAULT_GRACE",
    "LOCAL_SPOOL", "Line", "LineReader", "LoginThrottled", "MAX_SASL_RESPONSE", "Master",
    "READ_BLOCK", "ReadTimeout", "SASLError", "SERVER_DEFAULTS", "SERVER_HELP", "SPOOL_ENV",
    "SUPERVISOR_ENV", "SYSTEM_SPOOL", "ServerStopping", "SignalWake", "ThreadedServer", "add_options",
    "auth_failure_delay", "become_spool_owner", "config_text", "config_value", "daemon_settings",
    "decode_base64", "decode_plain", "drop_privileges", "find_spool", "is_loopback", "is_spool",
    "load_config", "log_config", "log_internal_error", "new_queue_id", "parse_cpus",
    "parse_hostport", "read_ini", "reader_went_away", "reload_tls", "run_on_cpus",
    "serve_until_signalled", "server_tls_context", "settings_of", "setup_logging", "spool_path",
    "stderr_is_journal", "store_is_apart", "store_path", "wait_readable", "worker_processes",
]

READ_BLOCK = 65536                 # bytes asked of the kernel per recv
WAIT_SLICE = 0.5                   # seconds between checks for a server shutdown while idle
MAX_SASL_RESPONSE = 12288          # octets of base64; RFC 4954 4 lets a server bound it
BUSY_SEND_TIMEOUT = 2.0            # seconds to hand a busy reply to a refused client
DEFAULT_GRACE = 5.0                # seconds open sessions get on shutdown
WORKER_IDLE_LIFETIME = 60.0        # seconds a pooled session thread waits for work, then ends
PARENT_CHECK = 1.0                 # seconds between checks that run_all is still there
ACCEPT_YIELD = 0.001               # seconds a worker with more sessions than another waits
                                   # before it takes a new connection (see get_request)

# Where the spool is when no --spool or config names it (see find_spool).
SPOOL_ENV = "MAILTOOLKIT_SPOOL"
SYSTEM_SPOOL = "/var/spool/mailtoolkit"
LOCAL_SPOOL = "./mailspool"
SPOOL_MARKERS = ("queue", "users", "run", "mail", "aliases")   # what a spool folder holds
# run_all sets this to its pid in each child: a child whose parent is gone stops.
SUPERVISOR_ENV = "MAILTOOLKIT_SUPERVISOR"
STRESS_LEAVE_SHARE = 0.75          # stress ends below this share of the slots that began it
CRASH_LOG_LIMIT = 10               # "internal error" lines per CRASH_LOG_PERIOD, per process
CRASH_LOG_PERIOD = 60.0            # seconds
ANVIL_MAX_RECORDS = 100000         # addresses and login names an anvil remembers; oldest go
ANVIL_IPV6_PREFIX = 64             # an IPv6 client is counted by its /64 (one site, RFC 6177)
MAX_LOGIN_KEY = 255                # characters of a login name an anvil keeps
ANVIL_KEY_CACHE = 4096             # client addresses whose anvil key is remembered
ANVIL_FREE_CHECKS = 4              # password checks at once an address with no failure may make
ANVIL_DATAGRAM = 65536             # octets of a question to the master's anvil, or its answer
ANVIL_TIMEOUT = 10.0               # seconds a worker waits for its master's anvil to answer
ANVIL_DELAY_REFRESH = 0.1          # seconds a worker trusts an address's reply delay
MAX_PROCESSES = 64                 # worker processes a role may have
AUTO_PROCESSES = 8                 # at most this many for processes = auto (one per CPU)
WORKER_RESTART_DELAY = 1.0         # seconds before a master replaces a worker that died
WORKER_STOP_MARGIN = 3.0           # seconds past the grace before a master kills its workers

CRLF, LF, CR = b"\r\n", b"\n", b"\r"

log = logging.getLogger("plumbing")


# --- Errors and data types ---

class ReadTimeout(Exception):
    """The client was idle too long, or its whole session ran past its deadline."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason           # "idle" or "session"


class ServerStopping(Exception):
    """The server is shutting down while the session waited for its next line."""


class SASLError(ValueError):
    """A SASL response that is not valid base64 or not a valid PLAIN/LOGIN message."""


class LoginThrottled(Exception):
    """The anvil will not check a password from this address now: too many failures."""


@dataclass
class Line:
    """One line read from a client: its bytes without the ending, and the ending seen.

    ending is CRLF, LF or CR, or b"" when the connection closed after a partial line.
    too_long is True when the line passed the reader's limit: data is then empty, and
    the rest of the line was read and thrown away.
    """
    data: bytes
    ending: bytes
    too_long: bool = False


# --- Bounded line reader ---

class LineReader:
    """Reads lines from a socket in blocks, bounded in length and in time.

    before_wait is called each time the reader must wait for the network; a protocol uses
    it to flush pipelined replies only when the client has nothing more buffered. limits,
    when given, returns the (idle_timeout, deadline) in force now, asked again while the
    reader waits: a server under stress shortens them for sessions already waiting.
    """

    def __init__(self, sock, idle_timeout=300.0, deadline=None, stop_event=None,
                 before_wait=None, limits=None):
        self.sock = sock
        self.buffer = bytearray()
        self.idle_timeout = idle_timeout
        self.deadline = deadline               # time.monotonic() value, or None
        self.stop_event = stop_event
        self.before_wait = before_wait
        self.limits = limits
        self.interruptible = True              # False while a transaction is in flight
        self.eof = False
        self.poller = None                     # (fd, select.poll object) of the last wait

    def discard_buffer(self):
        """Forget what is buffered (RFC 3207 5: nothing sent before TLS may be used after)."""
        self.buffer.clear()

    def readline(self, limit):
        """Return the next Line (at most limit bytes before its ending), or None at EOF."""
        scanned = 0
        discarding = False
        while True:
            end, width = self._find_ending(scanned)
            if end >= 0:
                ending = bytes(self.buffer[end:end + width])
                data = b"" if discarding else bytes(self.buffer[:end])
                del self.buffer[:end + width]
                if not discarding and end > limit:
                    discarding = True
                return Line(b"" if discarding else data, ending, discarding)
            if len(self.buffer) > limit:
                # Keep a trailing CR: it may be the first half of a CRLF.
                keep = 1 if self.buffer.endswith(CR) else 0
                del self.buffer[:len(self.buffer) - keep]
                discarding = True
            scanned = max(0, len(self.buffer) - 1)
            if self.eof or not self._fill():
                self.eof = True
                if discarding:
                    self.buffer.clear()
                    return Line(b"", b"", True)
                if not self.buffer:
                    return None
                data = bytes(self.buffer)
                self.buffer.clear()
                if data.endswith(CR):
                    return Line(data[:-1], CR)
                return Line(data, b"")

    def _find_ending(self, start):
        """Index and width of the first line ending at or after start, or (-1, 0).

        A CR at the very end of the buffer is undecided (CRLF or bare CR) until more data
        comes, unless the connection has closed.
        """
        buf = self.buffer
        lf = buf.find(LF, start)
        cr = buf.find(CR, start, lf if lf >= 0 else len(buf))
        if cr < 0:
            return (lf, 1) if lf >= 0 else (-1, 0)
        if cr + 1 < len(buf):
            return (cr, 2) if buf[cr + 1] == 10 else (cr, 1)
        return (cr, 1) if self.eof else (-1, 0)

    def read_block(self):
        """Return whatever is buffered or the next block from the socket; b"" at EOF."""
        if not self.buffer and (self.eof or not self._fill()):
            self.eof = True
            return b""
        block = bytes(self.buffer)
        self.buffer.clear()
        return block

    def _fill(self):
        """Read one block into the buffer; False at EOF. Raises ReadTimeout, ServerStopping."""
        if self.before_wait is not None:
            self.before_wait()
        idle_timeout, deadline = self.idle_timeout, self.deadline
        waiting_since = time.monotonic()
        while True:
            if self.limits is not None:
                idle_timeout, deadline = self.limits()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise ReadTimeout("session")
            if self._readable_now():
                break
            idle_until = waiting_since + idle_timeout
            if now >= idle_until:
                raise ReadTimeout("idle")
            if self.interruptible and self.stop_event is not None and self.stop_event.is_set():
                raise ServerStopping()
            wait = min(WAIT_SLICE, idle_until - now)
            if deadline is not None:
                wait = min(wait, deadline - now)
            ready = self._wait_readable(max(wait, 0))
            if ready is None:          # the socket was closed under us by a forced shutdown
                return False
            if ready:
                break
        # A non-blocking socket (timeout 0) is read as it is: poll() has waited already,
        # and recv() then skips the poll() a socket with a timeout makes before each call.
        if self.sock.gettimeout() not in (0.0, idle_timeout):    # a system call each
            self.sock.settimeout(idle_timeout)
        try:
            block = self.sock.recv(READ_BLOCK)
        except (ssl.SSLWantReadError, BlockingIOError):    # a TLS record not yet complete
            return True                                     # (or nothing after all): again
        except socket.timeout:
            raise ReadTimeout("idle") from None
        if not block:
            return False
        self.buffer += block
        return True

    def _readable_now(self):
        """True when a TLS socket already holds decrypted bytes poll() cannot see."""
        pending = getattr(self.sock, "pending", None)
        return bool(pending and pending())

    def _wait_readable(self, timeout):
        """Wait up to timeout seconds for the socket: True when readable, None when closed.

        poll(), not select(): select() refuses a descriptor past FD_SETSIZE (1024), which a
        server holding many connections soon hands out. The poll object is kept while the
        socket's descriptor stays the same.
        """
        fd = self.sock.fileno()
        if fd < 0:
            return None
        if not hasattr(select, "poll"):
            return wait_readable(self.sock, timeout)
        if self.poller is None or self.poller[0] != fd:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            self.poller = (fd, poller)
        events = self.poller[1].poll(timeout * 1000.0)
        if events and events[0][1] & select.POLLNVAL:
            return None
        return bool(events)


def wait_readable(sock, timeout):
    """True when sock has data (or EOF) to read within timeout seconds; None when closed.

    Uses poll() where there is one: select() fails on a descriptor past FD_SETSIZE.
    """
    fd = sock.fileno()
    if fd < 0:
        return None
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(max(timeout, 0) * 1000.0)
        if events and events[0][1] & select.POLLNVAL:
            return None
        return bool(events)
    try:
        ready, _, _ = select.select([sock], [], [], max(timeout, 0))
    except ValueError:
        return None
    return bool(ready)


# --- Addresses ---

def is_loopback(ip: str) -> bool:
    """True for an address of this very machine: 127.0.0.0/8, ::1, or IPv4-mapped
    ::ffff:127.x.y.z. A host name (even "localhost") is not an address: False."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# --- Anvil: penalties per client address and login name ---

# The settings of Anvil.from_config, of stress mode and of the worker processes, with the
# help their flags show; a server role lists these keys, with its defaults, in its DEFAULTS.
SERVER_DEFAULTS = {                # the anvil, stress mode and processes of every server role
    "processes": "auto",
    "anvil_penalty": 0.5,
    "anvil_max_penalty": 15.0,
    "anvil_soft_errors": 10,
    "anvil_forget": 600.0,
    "anvil_exempt": [],
    "stress_threshold": 0.8,
    "stress_idle_timeout": 10.0,
    "stress_session_timeout": 120.0,
}
SERVER_HELP = {
    "processes": "worker processes of the role, sharing its connection caps and one anvil "
                 "(the router's share the queue, and `mta.py queue` reads it with as many) "
                 "(auto: one per CPU the role may use, at most 8; 1: one process, no master)",
    "anvil_penalty": "seconds of the first penalty for a client address that failed a login "
                     "(or passed anvil_soft_errors); it doubles with each further failure "
                     "(0: no penalties)",
    "anvil_max_penalty": "largest penalty in seconds; a login that would wait longer for its "
                         "turn is refused unchecked",
    "anvil_soft_errors": "errors (bad commands, unknown recipients) a client address may make "
                         "before every reply to it is slowed by the penalty",
    "anvil_forget": "seconds without a failure after which an address or login name is "
                    "forgotten",
    "anvil_exempt": "a CIDR network the anvil never slows (repeatable), e.g. your relay "
                    "networks; loopback is not exempt unless listed",
    "stress_threshold": "share of max_connections in use at which stress mode begins "
                        "(0: never)",
    "stress_idle_timeout": "seconds to wait for a client's next command under stress",
    "stress_session_timeout": "seconds a whole session may last under stress",
}


class _Record:
    """What an anvil knows of one client address or login name."""

    __slots__ = ("failures", "errors", "pending", "next_turn", "last")

    def __init__(self, now):
        self.failures = 0              # failed logins
        self.errors = 0                # refused commands
        self.pending = 0               # password checks in flight
        self.next_turn = now           # monotonic time of the next password check allowed
        self.last = now                # time of the last failure or error


class Anvil:
    """Failed logins and errors per client address (and failed logins per login name),
    shared by every session of a process, turned into penalties that grow and are forgotten.

    Logins (as Dovecot's auth_penalty): an address that failed logins gets one password check
    per penalty, which starts at `penalty` seconds and doubles with each failure up to
    `max_penalty`. A session asks login_turn() before checking a password: it waits its
    turn, so fifty connections from one address guess no faster than one, and a correct
    password from that address waits too (like Dovecot); an address with no failures, or
    another address, never waits. A turn further away than max_penalty is refused: the
    password is not checked at all (LoginThrottled). One check in flight per address is free,
    so a client that logs in and out never waits. A login name that failed from anywhere
    slows the failure replies for that name by the same penalty, never a correct login.

    Errors (as Postfix's smtpd_soft_error_limit): past `soft_errors` refused commands
    (unknown recipients, syntax errors) from an address, every reply to it waits the penalty
    of the errors beyond that limit, so probing recipients slows to a crawl.

    A record is forgotten `forget` seconds after its last failure; at most ANVIL_MAX_RECORDS
    are kept, the oldest dropped first. Addresses in an `exempt` network are never counted.
    IPv6 clients are counted by their /64. clock is injectable for tests.

    Connections (as Dovecot's anvil counts them): connect() and disconnect() keep the open
    connections of each listener, in all and per client address, for ThreadedServer's caps.
    A role that serves from several processes keeps one Anvil in its master process, and
    the workers ask it through an AnvilClient, so every count and penalty spans them all.
    """

    def __init__(self, penalty=0.5, max_penalty=15.0, soft_errors=10, forget=600.0,
                 exempt=(), clock=time.monotonic):
        self.penalty_start = float(penalty)
        self.max_penalty = float(max_penalty)
        self.soft_errors = int(soft_errors)
        self.forget = float(forget)
        self.exempt_networks = [ipaddress.ip_network(text.strip(), strict=False)
                                for text in exempt if text.strip()]
        self.clock = clock
        self.slots_lock = threading.Lock()
        self.in_use = {}               # listener -> connections open, guarded by slots_lock
        self.per_address = {}          # (listener, client address) -> connections, same lock
        self.records_lock = threading.Lock()
        # ("ip", key) or ("login", name) -> _Record, least recently failed first
        self.records = collections.OrderedDict()
        # Asked once per command: parsing the address costs 7.6 us, a cached key 0.6 us.
        self.client_key = functools.lru_cache(maxsize=ANVIL_KEY_CACHE)(self.client_key)

    @classmethod
    def from_config(cls, config):
        """An anvil from a role's settings (the anvil_* keys of SERVER_HELP); ValueError if bad."""
        try:
            settings = dict(SERVER_DEFAULTS, **config)
            return cls(penalty=float(settings["anvil_penalty"]),
                       max_penalty=float(settings["anvil_max_penalty"]),
                       soft_errors=int(settings["anvil_soft_errors"]),
                       forget=float(settings["anvil_forget"]),
                       exempt=settings["anvil_exempt"])
        except ValueError as exc:
            raise ValueError("anvil: %s" % exc) from None

    # -- keys --

    def client_key(self, ip):
        """The key an address is counted under: IPv4 as is, IPv6 by its /64; None if exempt."""
        try:
            address = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return ("ip", ip)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.exempt_networks):
            return None
        if address.version == 6:
            network = ipaddress.ip_network("%s/%d" % (address, ANVIL_IPV6_PREFIX), strict=False)
            return ("ip", str(network))
        return ("ip", str(address))

    def penalty(self, count):
        """Seconds of penalty after count failures: 0, then penalty doubling to max_penalty."""
        if count <= 0 or self.penalty_start <= 0 or self.max_penalty <= 0:
            return 0.0
        return min(self.penalty_start * 2.0 ** min(count - 1, 64), self.max_penalty)

    def _record(self, key, now, create=False):
        """The live record of key (guarded by records_lock), or None; stale ones go."""
        record = self.records.get(key)
        if record is not None and self._stale(record, now):
            del self.records[key]
            record = None
        if record is None and create:
            record = self.records[key] = _Record(now)
            self._prune(now)
        return record

    def _stale(self, record, now):
        return (now - record.last >= self.forget and not record.pending
                and record.next_turn <= now)

    def _prune(self, now):
        while self.records:
            key, oldest = next(iter(self.records.items()))
            if len(self.records) <= ANVIL_MAX_RECORDS and not self._stale(oldest, now):
                return
            del self.records[key]

    def _touch(self, key, record, now):
        record.last = now
        self.records.move_to_end(key)

    # -- logins --

    def login_turn(self, ip):
        """(seconds to wait, allowed) before checking a password from ip.

        allowed False: after that wait, refuse without checking (the turn is too far away).
        Every allowed turn must be followed by one login_done().
        """
        key = self.client_key(ip)
        if key is None:
            return 0.0, True
        now = self.clock()
        with self.records_lock:
            record = self._record(key, now, create=True)
            turn = max(now, record.next_turn)
            if turn - now > self.max_penalty > 0:
                return self.max_penalty, False
            record.pending += 1
            # Checks in flight count as failures until they are known, so that a burst of
            # connections queues like a run of failures; but an address that has not failed
            # may have ANVIL_FREE_CHECKS at once (the clients of an office behind one NAT
            # address polling together), one that has, a single one.
            free = ANVIL_FREE_CHECKS if not record.failures else 1
            charged = record.failures + max(record.pending - free, 0)
            record.next_turn = turn + self.penalty(charged)
            return turn - now, True

    def login_done(self, ip, login, ok):
        """Record the outcome of a check login_turn() allowed; return the seconds a failure
        reply waits for the login name's own penalty (0 after a success)."""
        key = self.client_key(ip)
        if key is None:
            return 0.0
        now = self.clock()
        name = ("login", login.strip().lower()[:MAX_LOGIN_KEY]) if login else None
        with self.records_lock:
            record = self._record(key, now, create=True)
            record.pending = max(record.pending - 1, 0)
            if ok:
                return 0.0
            record.failures += 1
            record.next_turn = max(record.next_turn, now + self.penalty(record.failures))
            self._touch(key, record, now)
            if name is None:
                return 0.0
            named = self._record(name, now, create=True)
            named.failures += 1
            self._touch(name, named, now)
            # The failure that made the count does not wait for itself.
            return self.penalty(named.failures - 1)

    def failures(self, ip):
        """Failed logins counted for ip's address now."""
        return self._count(self.client_key(ip), "failures")

    # -- errors --

    def error(self, ip):
        """Count one refused command from ip."""
        key = self.client_key(ip)
        if key is None:
            return
        now = self.clock()
        with self.records_lock:
            record = self._record(key, now, create=True)
            record.errors += 1
            self._touch(key, record, now)

    def errors(self, ip):
        """Refused commands counted for ip's address now."""
        return self._count(self.client_key(ip), "errors")

    def reply_delay(self, ip):
        """Seconds every reply to ip waits: the penalty of its errors past soft_errors."""
        if not self.records:           # nobody penalised: no address parsing, no lock
            return 0.0
        return self.penalty(self.errors(ip) - self.soft_errors)

    def _count(self, key, field):
        if key is None or not self.records:
            return 0
        with self.records_lock:
            record = self._record(key, self.clock())
            return getattr(record, field) if record is not None else 0

    # -- connections --

    def connect(self, listener, ip, max_connections, max_per_address):
        """Take one of listener's slots for a connection from ip: the number of its slots
        in use after that, or None when a cap refuses it (max_connections in all,
        max_per_address from one address). Every slot taken is given back by disconnect()."""
        key = (listener, ip)
        with self.slots_lock:
            in_use = self.in_use.get(listener, 0)
            if in_use >= max_connections or self.per_address.get(key, 0) >= max_per_address:
                return None
            self.in_use[listener] = in_use + 1
            self.per_address[key] = self.per_address.get(key, 0) + 1
            return in_use + 1

    def disconnect(self, listener, ip):
        """Give back a slot connect() took; return the number of listener's slots in use."""
        key = (listener, ip)
        with self.slots_lock:
            left = self.per_address.get(key, 0) - 1
            if left > 0:
                self.per_address[key] = left
            else:
                self.per_address.pop(key, None)
            in_use = max(self.in_use.get(listener, 0) - 1, 0)
            self.in_use[listener] = in_use
            return in_use


# --- Internal errors: one line each, and not too many ---

class _LogLimit:
    """At most limit events per period seconds; counts the rest for one summary line."""

    def __init__(self, limit, period, clock=time.monotonic):
        self.limit = limit
        self.period = period
        self.clock = clock
        self.lock = threading.Lock()
        self.window_start = None
        self.logged = 0
        self.suppressed = 0

    def take(self):
        """(may this event be logged, how many were suppressed in the period just ended)."""
        now = self.clock()
        with self.lock:
            ended = 0
            if self.window_start is None or now - self.window_start >= self.period:
                ended, self.suppressed = self.suppressed, 0
                self.window_start, self.logged = now, 0
            if self.logged < self.limit:
                self.logged += 1
                return True, ended
            self.suppressed += 1
            return False, ended


_crash_log_limit = _LogLimit(CRASH_LOG_LIMIT, CRASH_LOG_PERIOD)


def log_internal_error(logger, exc, where):
    """Log an unexpected exception as one line, "internal error WHERE: Type: message"; the
    traceback only when logger logs DEBUG. A flood is cut to CRASH_LOG_LIMIT lines per
    CRASH_LOG_PERIOD, then one line counting the rest (logged with the next one after)."""
    allowed, suppressed = _crash_log_limit.take()
    if suppressed:
        logger.error("internal error: %d more suppressed in the last %gs", suppressed,
                     CRASH_LOG_PERIOD)
    if not allowed:
        return
    message = str(exc)
    if len(message) > 200:
        message = message[:200] + "..."
    logger.error("internal error %s: %s: %r", where, type(exc).__name__, message,
                 exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None)



# --- Threaded server and connection handler ---

class ConnectionHandler(socketserver.BaseRequestHandler):
    """Base of a protocol session: buffered replies, a LineReader, TLS, error boundary.

    A role overrides session() and may override the replies sent on timeout, shutdown
    and internal error (timeout_reply, stopping_reply, crash_reply, as text lines).
    An unexpected exception is logged as one line (its type and message, and the client),
    at most CRASH_LOG_LIMIT a minute per process; the traceback only at DEBUG (--verbose).
    """

    timeout_reply = ""
    stopping_reply = ""
    crash_reply = ""
    log = log

    def setup(self):
        self.sock = self.request
        self.client_ip = self.client_address[0]
        self.client_port = self.client_address[1]
        self.output = bytearray()
        self.tls = False
        server = self.server
        self.session_started = time.monotonic()
        deadline = None
        if server.session_timeout:
            deadline = self.session_started + server.session_timeout
        self.reader = LineReader(self.sock, server.idle_timeout, deadline,
                                 server.stopping, self.flush, self.limits)
        # Non-blocking: the reader waits in poll() (with its timeouts) before each recv(),
        # and flush() sends without a poll() first; each would be one more system call,
        # and one more hand-over of the GIL, per line.
        self.sock.settimeout(0.0)

    @property
    def is_loopback(self):
        return is_loopback(self.client_ip)

    def limits(self):
        """(idle timeout, session deadline) in force now: shorter while the server is
        under stress (see ThreadedServer)."""
        server = self.server
        idle, deadline = server.idle_timeout, self.reader.deadline
        if server.stressed:
            idle = min(idle, server.stress_idle_timeout)
            if server.stress_session_timeout:
                cut = self.session_started + server.stress_session_timeout
                deadline = cut if deadline is None else min(deadline, cut)
        return idle, deadline

    def handle(self):
        try:
            if self.server.implicit_tls:
                self.wrap_tls()
            self.session()
            self.flush()
        except ReadTimeout as exc:
            self.log.info("timeout after %s from [%s]", exc.reason, self.client_ip)
            self.send_final(self.timeout_reply)
        except ServerStopping:
            self.send_final(self.stopping_reply)
        except (ConnectionError, ssl.SSLError, socket.timeout) as exc:
            self.log.info("lost connection from [%s] (%s)", self.client_ip, exc)
        except Exception as exc:
            log_internal_error(self.log, exc, "in session with [%s]" % self.client_ip)
            self.send_final(self.crash_reply)

    def session(self):
        raise NotImplementedError

    # -- the anvil --

    def pause(self, seconds):
        """Wait seconds (a penalty) before the next reply; a server shutdown cuts it short
        by raising ServerStopping."""
        if seconds > 0 and self.server.stopping.wait(seconds):
            raise ServerStopping()

    def checked_login(self, login, verify):
        """verify() (a password check: the user, or None) under the server's anvil.

        Waits this address's turn first, so a penalised address guesses no faster for
        having many connections; then records the outcome, and before a failure waits the
        login name's own penalty. Raises LoginThrottled, unchecked, when the turn is too
        far away; ServerStopping when the server stops during a wait.
        """
        anvil = self.server.anvil
        wait, allowed = anvil.login_turn(self.client_ip)
        if not allowed:
            self.pause(wait)
            raise LoginThrottled()
        user = None
        try:
            self.pause(wait)
            user = verify()
        finally:
            delay = anvil.login_done(self.client_ip, login, user is not None)
        if user is None:
            self.pause(delay)
        return user

    def count_error(self):
        """Count a refused command against the client's address (see Anvil.error)."""
        self.server.anvil.error(self.client_ip)

    def reply_delay(self):
        """Seconds the next reply waits for this address's errors (see Anvil.reply_delay)."""
        return self.server.anvil.reply_delay(self.client_ip)

    def write(self, line):
        """Queue one reply line (str or bytes, without CRLF); sent at the next flush."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.output += line + CRLF

    def flush(self):
        if self.output:
            data = bytes(self.output)
            self.output.clear()
            self.send_all(data)

    def send_all(self, data):
        """sendall(): on the non-blocking socket, one send() when the data fits the socket's
        buffer (a reply always does), else the rest waiting at most the idle timeout."""
        if self.sock.gettimeout() != 0.0:
            self.sock.sendall(data)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        if sent < len(data):
            self.sock.settimeout(self.limits()[0])
            try:
                self.sock.sendall(memoryview(data)[sent:])
            finally:
                self.sock.settimeout(0.0)

    def send_final(self, line):
        """Best effort: send a last line and stop; the client may already be gone."""
        try:
            if line:
                self.write(line)
            self.sock.settimeout(BUSY_SEND_TIMEOUT)
            self.flush()
        except (OSError, ValueError):
            pass

    def wrap_tls(self):
        """Handshake as TLS server on this connection; the reader then reads through TLS."""
        self.reader.discard_buffer()
        self.output.clear()
        self.sock.settimeout(self.limits()[0])
        self.sock = self.server.tls_context.wrap_socket(self.sock, server_side=True)
        self.server.replace_socket(self.request, self.sock)
        self.sock.settimeout(0.0)      # handshake done: non-blocking again, as in setup()
        self.reader.sock = self.sock
        self.tls = True

    def start_tls(self, ready_line):
        """STARTTLS/STLS: send ready_line, drop buffered plaintext, then handshake.

        Discarding what the client pipelined behind the command closes the STARTTLS
        command-injection hole (CVE-2011-0411).
        """
        self.write(ready_line)
        self.flush()
        self.wrap_tls()


class _Slot:
    """One open connection: the client's address and the socket its session uses now."""

    def __init__(self, ip, sock):
        self.ip = ip
        self.sock = sock


class ThreadedServer(socketserver.ThreadingTCPServer):
    """A thread per connection, with caps in total and per client address.

    Sessions run on long-lived worker threads (see the speed section below): an accepted
    connection goes to an idle worker, and a new worker starts only when none is idle, so
    there are never more than max_connections; a worker idle for WORKER_IDLE_LIFETIME
    seconds ends, so a burst does not keep its threads for ever.

    busy_reply is the protocol's own "too busy" line, sent to a client refused by a cap.

    Stress mode (as Postfix's): once stress_threshold of max_connections are in use, every
    session, new or already waiting, gets stress_idle_timeout per command and at most
    stress_session_timeout in all, so idle connections cannot hold the slots; it ends when
    fewer than STRESS_LEAVE_SHARE of that many are in use. Entering and leaving are logged.
    anvil counts the connections for the caps, and the penalties: the process's Anvil,
    shared between its listeners (a new one when None), or in a worker process of a Master
    an AnvilClient of the master's.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    busy_reply = ""
    worker_pool = True             # False: a new thread per connection (ThreadingMixIn)
    slots = None                   # a Master's worker: every worker's connections (WorkerSlots)

    def __init__(self, address, handler_class, *, max_connections=200, max_per_address=50,
                 idle_timeout=300.0, session_timeout=None, tls_context=None,
                 implicit_tls=False, stress_threshold=0.8, stress_idle_timeout=10.0,
                 stress_session_timeout=120.0, anvil=None, bind_and_activate=True):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.idle_timeout = idle_timeout
        self.session_timeout = session_timeout
        self.stress_threshold = float(stress_threshold)
        self.stress_idle_timeout = float(stress_idle_timeout)
        self.stress_session_timeout = float(stress_session_timeout)
        self.stressed = False          # read without a lock; changed under connections_lock
        self.anvil = anvil if anvil is not None else Anvil()
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.stopping = threading.Event()
        self.serving = False
        self.connections_lock = threading.Lock()
        self.connections = {}          # accepted socket -> _Slot, guarded by connections_lock
        self.work = queue.SimpleQueue()    # (request, client_address), or None: a worker ends
        self.workers_lock = threading.Lock()
        self.workers = 0               # worker threads alive, guarded by workers_lock
        self.idle_workers = 0          # of which waiting for work and not yet promised a job
        super().__init__(address, handler_class, bind_and_activate)
        # The anvil counts connections per listener; every process serving it sees this name.
        self.listener = "[%s]:%d" % self.server_address[:2]

    @property
    def port(self):
        return self.server_address[1]

    def active_connections(self):
        with self.connections_lock:
            return len(self.connections)

    def serve_forever(self, poll_interval=0.5):
        self.serving = True
        super().serve_forever(poll_interval)

    def get_request(self):
        """Accept a connection. In a worker of a Master that serves more sessions than
        another worker, first wait ACCEPT_YIELD: the kernel wakes every worker for each
        connection and the first to accept() gets it, so without this one worker could
        take most of a burst (8 POP3 clients split 7 to 1 as often as 4 to 4) and hand the
        interpreter between its threads while the other's CPU idles. When a less busy
        worker took the connection meanwhile, accept() fails and this one waits again."""
        if self.slots is not None and self.slots.busier(self.active_connections()):
            time.sleep(ACCEPT_YIELD)
        return super().get_request()

    def process_request(self, request, client_address):
        ip = client_address[0]
        in_use = None
        if not self.stopping.is_set():
            in_use = (self.slots or self.anvil).connect(self.listener, ip, self.max_connections,
                                                        self.max_per_address)
        if in_use is not None:
            with self.connections_lock:
                self.connections[request] = _Slot(ip, request)
            self._update_stress(in_use)
        if in_use is None:
            log.warning("connection from [%s] refused: too many connections", ip)
            self.refuse(request)
            return
        if not self.worker_pool:
            # The plain form: socketserver.ThreadingMixIn starts a thread per connection.
            socketserver.ThreadingMixIn.process_request(self, request, client_address)
            return
        self.start_session(request, client_address)

    # --- Speed: sessions on long-lived worker threads instead of a thread per connection;
    #     starting a thread (and waiting for it to run) cost about a third of a short SMTP
    #     session's CPU, measured by bench/smtp_bench.py (1 KB, 20 clients: 2.9 -> 2.4 ms
    #     of smtp_in CPU per message). The plain form is ThreadingMixIn.process_request
    #     (worker_pool = False); tests/test_plumbing.py runs the same sessions on both. ---

    def start_session(self, request, client_address):
        """Hand the connection to an idle worker, or to a new one when none is idle."""
        with self.workers_lock:
            start_worker = not self.idle_workers
            if start_worker:
                self.workers += 1
            else:
                self.idle_workers -= 1 # that worker takes this connection
        if start_worker:
            threading.Thread(target=self.worker, daemon=True,
                             name="session-%d" % self.workers).start()
        self.work.put((request, client_address))

    def worker(self):
        """A session thread: serve connections from the queue until idle too long or stopped.

        Each connection put on the queue has a worker promised to it (an idle one, or one
        started for it), so none waits behind a busy session.
        """
        try:
            while True:
                try:
                    job = self.work.get(timeout=WORKER_IDLE_LIFETIME)
                except queue.Empty:
                    with self.workers_lock:
                        if not self.idle_workers:
                            continue   # every idle worker is promised a job: take one
                        self.idle_workers -= 1
                    return
                if job is None:
                    return
                self.process_request_thread(*job)      # handle, then shutdown_request
                with self.workers_lock:
                    self.idle_workers += 1
        finally:
            with self.workers_lock:
                self.workers -= 1

    # --- End of the speed section ---

    def refuse(self, request):
        try:
            request.settimeout(BUSY_SEND_TIMEOUT)
            if self.busy_reply and not self.implicit_tls:
                request.sendall(self.busy_reply.encode("ascii") + CRLF)
        except OSError:
            pass
        super().shutdown_request(request)

    def replace_socket(self, request, sock):
        """Record that the session on request now talks through sock (after TLS)."""
        with self.connections_lock:
            slot = self.connections.get(request)
            if slot is not None:
                slot.sock = sock

    def shutdown_request(self, request):
        with self.connections_lock:
            slot = self.connections.pop(request, None)
        if slot is not None:
            self._update_stress((self.slots or self.anvil).disconnect(self.listener, slot.ip))
            if slot.sock is not request:
                slot.sock.close()
        super().shutdown_request(request)

    def _update_stress(self, in_use):
        """Enter or leave stress mode for in_use of the listener's slots, and log a change."""
        threshold = self.stress_threshold * self.max_connections
        with self.connections_lock:
            entered = (not self.stressed and self.stress_threshold > 0
                       and in_use >= max(threshold, 1))
            left = self.stressed and in_use < threshold * STRESS_LEAVE_SHARE
            if entered or left:
                self.stressed = entered
        if entered:
            log.warning("stress: entering stress mode, %d of %d connections in use; idle "
                        "timeout %gs, session limit %gs", in_use, self.max_connections,
                        self.stress_idle_timeout, self.stress_session_timeout)
        elif left:
            log.warning("stress: leaving stress mode, %d of %d connections in use",
                        in_use, self.max_connections)

    def handle_error(self, request, client_address):
        log_internal_error(log, sys.exc_info()[1], "with [%s]" % client_address[0])

    def stop(self, grace=DEFAULT_GRACE):
        """Stop accepting, let sessions end within grace seconds, then cut the rest.

        Sessions waiting for their next command are told the server is stopping at once;
        a transaction in flight (a message being received) may finish within the grace.
        """
        self.stopping.set()
        if self.serving:
            self.shutdown()
        self.server_close()
        until = time.monotonic() + grace
        while self.active_connections() and time.monotonic() < until:
            time.sleep(0.05)
        with self.connections_lock:
            left = [slot.sock for slot in self.connections.values()]
        for sock in left:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.workers_lock:
            workers = self.workers
        for _ in range(workers):       # each ends once its session (if any) has
            self.work.put(None)


def serve_until_signalled(servers, on_stop=None, grace=DEFAULT_GRACE, on_reload=None,
                          processes=1, cpus=""):
    """Serve every server on its own thread until SIGTERM or SIGINT, then stop them all.

    SIGHUP calls on_reload() (from this thread, not the signal handler); without one it is
    logged and ignored, never fatal. Under run_all (SUPERVISOR_ENV set), the servers also
    stop once run_all is gone, whatever killed it: the parent pid changes. With processes
    above 1, a Master serves them from that many worker processes instead (spread over the
    CPUs of the role's cpus setting, one each).
    """
    if processes > 1:
        return Master(servers, processes, on_stop, grace, on_reload, cpus).run()
    return _serve(servers, on_stop, grace, on_reload, _supervisor(), "run_all")


def _supervisor():
    """The pid of the run_all this process runs under (SUPERVISOR_ENV), or None."""
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    return int(supervisor) if supervisor.isdigit() else None


class SignalWake:
    """A socket that turns readable when a signal arrives (signal.set_wakeup_fd, made in
    the main thread), to wait on in select(); wait() returns the numbers of the signals
    that came. The signal handlers then only note what was asked, or do nothing. A handler
    must not set a threading.Event that the main thread waits on: it runs in the main
    thread, which may be inside that Event's wait() holding its lock, and would wait for
    itself for ever (a daemon that ignores SIGTERM)."""

    def __init__(self):
        self.sock, self.writer = socket.socketpair()
        self.sock.setblocking(False)
        self.writer.setblocking(False)
        signal.set_wakeup_fd(self.writer.fileno())

    def drain(self):
        """The numbers of the signals that came since the last look (one octet each)."""
        numbers = set()
        try:
            while True:
                data = self.sock.recv(512)
                if not data:
                    break
                numbers.update(data)
        except BlockingIOError:
            pass
        return numbers

    def wait(self, timeout=None):
        """drain() once a signal arrives, or set() after timeout seconds (None: no limit)."""
        try:
            if select.select([self.sock], [], [], timeout)[0]:
                return self.drain()
        except InterruptedError:
            pass
        return set()

    def close(self):
        signal.set_wakeup_fd(-1)
        self.sock.close()
        self.writer.close()


def _serve(servers, on_stop, grace, on_reload, parent, parent_name):
    """serve_until_signalled in one process; it also stops once process parent is gone."""
    asked = set()                  # "stop", "reload": what the signals asked for

    def on_signal(signum, frame):
        asked.add("reload" if signum == signal.SIGHUP else "stop")

    wake = SignalWake()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    while "stop" not in asked:
        wake.wait(PARENT_CHECK)
        if "reload" in asked and "stop" not in asked:
            asked.discard("reload")
            _reload(on_reload)
        if parent is not None and os.getppid() != parent:
            log.warning("%s (pid %d) is gone: stopping", parent_name, parent)
            break
    if on_stop is not None:
        on_stop()
    for server in servers:
        server.stop(grace)
    wake.close()
    return 0


def _reload(on_reload):
    if on_reload is None:
        log.info("reload: nothing to reload (users and aliases are read again when they change)")
        return
    try:
        on_reload()
    except Exception as exc:       # a bad new file keeps the old settings: never fatal
        log.error("reload failed, keeping the old settings: %s", exc)


def reload_tls(servers, cert_file, key_file):
    """SIGHUP: load the certificate and key again and give the new context to every TLS
    server; sessions already in TLS keep theirs, the next handshake uses the new one."""
    if not cert_file:
        log.info("reload: no TLS certificate configured")
        return
    context = server_tls_context(cert_file, key_file or cert_file)
    for server in servers:
        if server.tls_context is not None:
            server.tls_context = context
    log.info("reload: TLS certificate %s loaded", cert_file)


# --- Several processes per role: a master, its workers, and the anvil they share ---

def worker_processes(config):
    """The processes setting of a role's config as a number: "auto" is one per CPU this
    process may run on (after --cpus), at most AUTO_PROCESSES; ValueError unless 1 to
    MAX_PROCESSES."""
    text = str(config.get("processes", SERVER_DEFAULTS["processes"])).strip()
    if text == "auto":
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return max(1, min(len(usable) if usable else os.cpu_count() or 1, AUTO_PROCESSES))
    processes = config_value("processes", text, 1)
    if not 1 <= processes <= MAX_PROCESSES:
        raise ValueError("processes: %d is not within 1 to %d" % (processes, MAX_PROCESSES))
    return processes


class AnvilGone(Exception):
    """A worker's master no longer answers its anvil questions."""


class AnvilClient:
    """The anvil of a worker process: the methods of Anvil that sessions use, each a
    question to the master's Anvil (see Master). The connection caps are kept apart, in
    memory all workers share (WorkerSlots).

    A question is one JSON datagram [method, arguments...] on the worker's socket, answered
    by one; a lock keeps one question at a time. reply_delay() is asked before every reply,
    so an address's delay is remembered for ANVIL_DELAY_REFRESH seconds, and every error()
    brings it up to date: an address that errs on a session of this process is slowed at
    once, one that errs on another worker's within ANVIL_DELAY_REFRESH. When the master
    stops answering, each question raises AnvilGone (the session ends, nothing is let
    through unchecked) and the worker stops.
    """

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(ANVIL_TIMEOUT)
        self.lock = threading.Lock()
        self.gone = False
        self.delays = {}               # client address -> (reply delay, monotonic expiry)

    def ask(self, method, *args):
        question = json.dumps([method, *args]).encode("utf-8")
        with self.lock:
            if not self.gone:
                try:
                    self.sock.send(question)
                    return json.loads(self.sock.recv(ANVIL_DATAGRAM))
                except (OSError, ValueError) as exc:
                    self.gone = True
                    log.error("the master's anvil does not answer (%s): stopping", exc)
                    os.kill(os.getpid(), signal.SIGTERM)
        raise AnvilGone("the master's anvil does not answer")

    def login_turn(self, ip):
        wait, allowed = self.ask("login_turn", ip)
        return wait, allowed

    def login_done(self, ip, login, ok):
        return self.ask("login_done", ip, login[:MAX_LOGIN_KEY * 2] if login else login, ok)

    def error(self, ip):
        self._remember(ip, self.ask("error", ip))

    def reply_delay(self, ip):
        delay, expiry = self.delays.get(ip, (0.0, 0.0))
        if time.monotonic() < expiry:
            return delay
        return self._remember(ip, self.ask("reply_delay", ip))

    def _remember(self, ip, delay):
        if len(self.delays) >= ANVIL_KEY_CACHE:
            self.delays.clear()
        self.delays[ip] = (delay, time.monotonic() + ANVIL_DELAY_REFRESH)
        return delay


class _Worker:
    """A worker process as its master knows it: its place, its socket, and the password
    checks it has in flight in the anvil (given back if it dies, with its connections)."""

    def __init__(self, number, pid, sock):
        self.number = number           # 0 to processes - 1; a replacement takes the same
        self.pid = pid
        self.sock = sock
        self.checks = collections.Counter()    # client address -> password checks in flight


NO_WORKER = 2 ** 62                # the sessions a dead worker's slot shows until replaced
_V4_MAPPED = bytes(10) + b"\xff\xff"  # an IPv4 address in IPv6's form, RFC 4291 2.5.5.2
_NO_ADDRESS = bytes(16)            # a WorkerSlots entry no address has taken


class WorkerSlots:
    """The connections every worker process of a Master holds on one listener, in memory
    the master maps before it forks, so that each worker checks the caps without asking
    the master: max_connections against the sum of the workers' sessions, max_per_address
    against the sum of their counts for the address.

    Each worker has a region of its own: its sessions, then a table of (address, count)
    entries found by hash(address), which the workers share with the master that forked
    them (and its hash seed, random at each start), probing on to the next entry. A worker
    writes only its own region, under its own lock; the others only read it. An address
    whose count falls to 0 keeps its entry until the table is three quarters full of
    addresses, when the worker writes it again with the live ones only.

    What it gives up against one process asking one anvil: two workers that accept at the
    same instant may each let in the last connection a cap allows (a cap may be passed by
    one connection a worker), and a worker that reads another's table while that one
    writes it again may miss an address there. What it saves: a question to the master
    and its answer at each connection and each disconnection, a sixth of smtp_in's CPU in
    a one-message session (bench/cpu_bench.py, 10 sessions, two workers).

    The same counts steer accept(): a worker that serves more sessions than another lets
    that one go first (busier()).
    """

    ENTRY = 24                     # an address (16 octets, IPv4 as ::ffff:a.b.c.d), a count

    def __init__(self, workers, max_connections):
        self.workers = workers
        self.entries = 256
        while self.entries < 2 * max_connections:
            self.entries *= 2
        self.region = 8 + self.ENTRY * self.entries
        self.memory = mmap.mmap(-1, self.region * workers)
        self.counts = memoryview(self.memory).cast("q")
        self.number = 0                # set in the worker process to its number
        self.used = 0                  # entries of this worker's table that hold an address
        self.lock = threading.Lock()   # the worker's threads take turns at its region

    def _key(self, ip):
        """(16-octet key, the entry to look at first) of client address ip."""
        ip = ip.split("%", 1)[0]       # fe80::1%eth0: the interface is not the client
        if ":" in ip:
            key = socket.inet_pton(socket.AF_INET6, ip)
        else:
            key = _V4_MAPPED + socket.inet_aton(ip)
        return key, self._first(key)

    def _first(self, key):
        """The entry of a table to look at first for key (then the next ones, in turn)."""
        return hash(key) & (self.entries - 1)

    def _sessions_index(self, number):
        """Where in counts worker number's sessions are (the first word of its region)."""
        return self.region * number // 8

    @staticmethod
    def _count_index(offset):
        """Where in counts the count of the entry at octet offset is (after its address)."""
        return offset // 8 + 2

    def _find(self, number, key, start):
        """The octet offset of key's entry in worker number's table, and whether it holds
        key (False: the empty entry where it would go; None: a full table)."""
        memory, mask = self.memory, self.entries - 1
        table = self.region * number + 8
        index = start
        for _ in range(self.entries):
            offset = table + self.ENTRY * index
            held = memory[offset:offset + 16]
            if held == key:
                return offset, True
            if held == _NO_ADDRESS:
                return offset, False
            index = (index + 1) & mask
        return None, None

    def _live(self):
        """The numbers of the workers alive (not forgotten)."""
        return [number for number in range(self.workers)
                if self.counts[self._sessions_index(number)] != NO_WORKER]

    def _sessions(self):
        return sum(self.counts[self._sessions_index(number)] for number in self._live())

    def _connections(self, key, start):
        total = 0
        for number in self._live():
            offset, found = self._find(number, key, start)
            if found:
                total += self.counts[self._count_index(offset)]
        return total

    def _put(self, offset, key, count):
        """Give the entry at offset its address and count (the count first: a worker that
        reads the entry meanwhile sees no address, or the address with a count)."""
        self.counts[self._count_index(offset)] = count
        self.memory[offset:offset + 16] = key

    def connect(self, listener, ip, max_connections, max_per_address):
        """As Anvil.connect: the sessions in use after this one, or None when a cap
        refuses it. listener is this object's own."""
        key, start = self._key(ip)
        with self.lock:
            sessions = self._sessions()
            if sessions >= max_connections or self._connections(key, start) >= max_per_address:
                return None
            offset, found = self._find(self.number, key, start)
            if not found:
                if found is None or self.used >= self.entries * 3 // 4:
                    self._rewrite()
                    offset, _ = self._find(self.number, key, start)
                self._put(offset, key, 0)
                self.used += 1
            self.counts[self._count_index(offset)] += 1
            self.counts[self._sessions_index(self.number)] += 1
        return sessions + 1

    def disconnect(self, listener, ip):
        """Give back what connect() took: the sessions still in use."""
        key, start = self._key(ip)
        with self.lock:
            offset, found = self._find(self.number, key, start)
            if found:
                self.counts[self._count_index(offset)] -= 1
            self.counts[self._sessions_index(self.number)] -= 1
            return self._sessions()

    def _rewrite(self):
        """Write this worker's table again with the addresses that hold connections."""
        table = self.region * self.number + 8
        size = self.ENTRY * self.entries
        live = []
        for offset in range(table, table + size, self.ENTRY):
            count = self.counts[self._count_index(offset)]
            if count > 0:
                live.append((bytes(self.memory[offset:offset + 16]), count))
        self.memory[table:table + size] = bytes(size)
        for key, count in live:
            offset, _ = self._find(self.number, key, self._first(key))
            self._put(offset, key, count)
        self.used = len(live)

    def start(self, number):
        """In a new worker process: this is worker number, holding nothing yet."""
        self.number = number
        self.used = 0
        base = self.region * number
        self.memory[base:base + self.region] = bytes(self.region)     # a predecessor's

    def forget(self, number):
        """Worker number is gone (in the master): what it held is given back, and the
        others no longer let it go first."""
        base = self.region * number
        self.memory[base + 8:base + self.region] = bytes(self.region - 8)
        self.counts[self._sessions_index(number)] = NO_WORKER

    def busier(self, sessions):
        """True when some other worker serves fewer sessions than this one's SESSIONS."""
        return any(self.counts[self._sessions_index(number)] < sessions
                   for number in range(self.workers) if number != self.number)


class Master:
    """A role's listeners served by several worker processes that share one anvil, as the
    masters of Postfix and Dovecot run a service's processes.

    The listeners are bound, and privileges dropped, before: the master forks `processes`
    workers, each of which serves every listener on its own threads, and the kernel hands
    each new connection to whichever worker accepts it first; a worker serving more
    sessions than another lets that one go first. The connection caps span all workers
    through counters they share (WorkerSlots), given back by the master when a worker
    dies. The master serves no session; it answers the workers' anvil questions
    (AnvilClient) from the one Anvil of the servers, so the login penalties and the reply
    delays span all workers as they would one process. It runs no thread of its own
    (forking a threaded process could copy a lock while held): one select() waits for
    questions, signals and dead workers alike. The "servers" may also be queue runners
    (the router's mta.QueueRunner): no listener and no anvil; their workers share the
    queue through its locks, each told its share of the folder (its number and how many
    there are: the runner's share attribute).

    When cpus (the role's setting) names several CPUs, worker number i keeps to the i-th
    of them, in turn: its threads then hand the interpreter's lock over on one CPU (see
    run_on_cpus), and the workers do not crowd onto one.

    SIGTERM or SIGINT stops every worker, each letting its sessions end within grace, then
    the master; SIGHUP is passed on (on_reload runs in each worker). A worker that dies is
    replaced after WORKER_RESTART_DELAY seconds, and what it held in the anvil (connection
    slots, password checks in flight) is given back. A worker stops once its master is
    gone; the master, once run_all is, as a single process would.
    """

    def __init__(self, servers, processes, on_stop=None, grace=DEFAULT_GRACE, on_reload=None,
                 cpus=""):
        self.servers = servers
        self.processes = processes
        self.cpus = sorted(parse_cpus(cpus))
        self.on_stop = on_stop
        self.grace = grace
        self.on_reload = on_reload
        self.anvil = getattr(servers[0], "anvil", None)     # a queue runner asks none
        self.workers = {}              # the master's end of a worker's socket -> _Worker
        self.asked = set()             # "stop", "reload": what the signals asked for
        self.restarts = []             # (monotonic time, worker number) of replacements due

    def run(self):
        if threading.active_count() > 1:
            raise RuntimeError("a master forks its workers before any thread starts")
        for server in self.servers:
            # The workers race for each connection: the losers must not block in accept(),
            # and the busier ones let the others go first (ThreadedServer.get_request).
            if hasattr(server, "socket"):
                server.socket.setblocking(False)
                server.slots = WorkerSlots(self.processes, server.max_connections)
        self.wake = SignalWake()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self.on_signal)
        supervisor = _supervisor()
        for number in range(self.processes):
            self.start_worker(number)
        log.info("serving from %d worker processes", self.processes)
        while "stop" not in self.asked:
            self.wait_and_answer(PARENT_CHECK)
            if "reload" in self.asked:
                self.asked.discard("reload")
                log.info("reload: passed on to %d workers", len(self.workers))
                self.signal_workers(signal.SIGHUP)
            now = time.monotonic()
            while self.restarts and self.restarts[0][0] <= now and "stop" not in self.asked:
                number = self.restarts.pop(0)[1]
                try:
                    self.start_worker(number)
                except OSError as exc:             # no memory or no process left to fork
                    log.error("cannot start a worker: %s; trying again in %gs", exc,
                              WORKER_RESTART_DELAY)
                    self.restarts.append((now + WORKER_RESTART_DELAY, number))
            if supervisor is not None and os.getppid() != supervisor:
                log.warning("run_all (pid %d) is gone: stopping", supervisor)
                break
        self.stop_workers()
        for server in self.servers:
            if hasattr(server, "server_close"):
                server.server_close()
        return 0

    def on_signal(self, signum, frame):
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.asked.add("stop")
        elif signum == signal.SIGHUP:
            self.asked.add("reload")

    def start_worker(self, number):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        master = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            code = 1
            try:
                mine.close()
                code = self.worker(number, theirs, master)
            except BaseException as exc:           # never back into the master's loop
                log_internal_error(log, exc, "in worker")
            finally:
                os._exit(code)
        theirs.close()
        mine.setblocking(False)
        self.workers[mine] = _Worker(number, pid, mine)
        cpu = self.cpu_of(number)
        log.info("worker %d started%s", pid, "" if cpu is None else " on CPU %d" % cpu)

    def cpu_of(self, number):
        """The CPU worker number keeps to, or None (cpus names fewer than two)."""
        return self.cpus[number % len(self.cpus)] if len(self.cpus) > 1 else None

    def worker(self, number, sock, master):
        """The worker's life, in the child process: serve until told to stop, or until
        process master is gone."""
        self.wake.close()              # the worker's own is made in _serve
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for other in list(self.workers):
            other.close()
        cpu = self.cpu_of(number)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if self.anvil is not None:
            client = AnvilClient(sock)
            for server in self.servers:
                server.anvil = client
        for server in self.servers:
            if hasattr(server, "share"):           # a queue runner: its share of the folder
                server.share = (number, self.processes)
            if getattr(server, "slots", None) is not None:
                server.slots.start(number)
        return _serve(self.servers, self.on_stop, self.grace, self.on_reload, master,
                      "the master")

    def wait_and_answer(self, timeout):
        """Wait up to timeout for a question, a signal or a dead worker, and see to them."""
        try:
            ready, _, _ = select.select([self.wake.sock] + list(self.workers), [], [], timeout)
        except InterruptedError:
            ready = []
        for sock in ready:
            if sock is self.wake.sock:
                self.wake.drain()
            elif sock in self.workers:
                self.answer_all(self.workers[sock])
        self.reap()

    def answer_all(self, worker):
        while True:
            try:
                question = worker.sock.recv(ANVIL_DATAGRAM)
            except OSError:            # BlockingIOError: every question is answered
                return
            try:
                answer = self.answer(worker, *json.loads(question))
            except Exception as exc:
                log_internal_error(log, exc, "in the anvil, for worker %d" % worker.pid)
                answer = None
            try:
                worker.sock.send(json.dumps(answer).encode("ascii"))
            except OSError:
                return

    def answer(self, worker, method, *args):
        """One anvil question of a worker: Anvil's answer, and what the worker now holds."""
        anvil = self.anvil
        if method == "login_turn":
            wait, allowed = anvil.login_turn(*args)
            if allowed:
                worker.checks[args[0]] += 1
            return wait, allowed
        if method == "login_done":
            worker.checks[args[0]] -= 1
            return anvil.login_done(*args)
        if method == "error":
            anvil.error(*args)
            return anvil.reply_delay(*args)
        if method == "reply_delay":
            return anvil.reply_delay(*args)
        raise ValueError("unknown question %r" % method)

    def reap(self):
        """Collect dead workers, give back what they held, and plan their replacements."""
        for sock, worker in list(self.workers.items()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0:
                continue
            del self.workers[sock]
            sock.close()
            for ip, count in worker.checks.items():
                for _ in range(count):
                    self.anvil.login_done(ip, None, True)
            for server in self.servers:
                if getattr(server, "slots", None) is not None:
                    server.slots.forget(worker.number)     # its connections given back
            if "stop" in self.asked:
                log.info("worker %d stopped", pid)
                continue
            log.warning("worker %d ended (%s): another in %gs", pid, _exit_text(status),
                        WORKER_RESTART_DELAY)
            self.restarts.append((time.monotonic() + WORKER_RESTART_DELAY, worker.number))

    def signal_workers(self, signum):
        for worker in self.workers.values():
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass

    def stop_workers(self):
        """SIGTERM to every worker; answer their last questions (sessions closing give
        their slots back) until all are gone, or SIGKILL after the grace and a margin."""
        self.asked.add("stop")
        self.signal_workers(signal.SIGTERM)
        until = time.monotonic() + self.grace + WORKER_STOP_MARGIN
        while self.workers and time.monotonic() < until:
            self.wait_and_answer(0.05)
        if self.workers:
            log.warning("%d workers still running after %gs: killing them",
                        len(self.workers), self.grace + WORKER_STOP_MARGIN)
            self.signal_workers(signal.SIGKILL)
            until = time.monotonic() + WORKER_STOP_MARGIN
            while self.workers and time.monotonic() < until:
                self.wait_and_answer(0.05)


def _exit_text(status):
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


# --- TLS ---

def server_tls_context(cert_file, key_file):
    """A server context: TLS 1.2 or newer, no compression, the server's cipher order."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert_file, key_file)
    return context


# --- The client's end of a connection ---

class ClientConnection:
    """A client's connection to a line-protocol server: one socket, its LineReader, TLS,
    and every step bounded in time (smtp_out's SMTP client, mail_client's POP3 client).

    It fails in one way. The subclass's failure(kind, detail) returns the exception to
    raise: kind "connect" (detail: the reason), "timeout" or "lost" (the stage: what the
    client was doing), "garbage" (a line past its limit; the stage) or "tls" (the reason).
    The socket is closed first, except for "connect", where there is none.
    """

    sock = None
    reader = None
    address = ""                   # the server's IP address once connected
    tls_active = False

    def failure(self, kind, detail):
        raise NotImplementedError

    def open_socket(self, host, port, timeout, source_address=None):
        """Connect within timeout seconds; the reader then waits timeout for each line."""
        try:
            self.sock = socket.create_connection((host, port), timeout, source_address)
        except socket.timeout:
            raise self.failure("timeout", "connecting") from None
        except OSError as exc:
            raise self.failure("connect", exc.strerror or str(exc)) from None
        # Commands are whole writes already; Nagle would only delay them.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.address = self.sock.getpeername()[0]
        self.reader = LineReader(self.sock, timeout)
        self.tls_active = False

    def handshake(self, context, server_name, timeout):
        """TLS as the client, now (STARTTLS/STLS, or implicit TLS before the greeting).

        RFC 3207 5, RFC 2595 4: bytes the server sent before the handshake would be
        plaintext injected into the TLS session; such a server fails here.
        """
        if self.reader.buffer:
            self.close()
            raise self.failure("tls", "server sent data before the TLS handshake")
        self.sock.settimeout(timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_name)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self.close()
            raise self.failure("tls", getattr(exc, "reason", None) or str(exc)) from None
        self.reader.sock = self.sock
        self.tls_active = True

    def send_bytes(self, data, timeout, stage):
        """Send data whole within timeout seconds."""
        if self.sock is None:
            raise self.failure("lost", stage)
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except socket.timeout:
            self.close()
            raise self.failure("timeout", stage) from None
        except (OSError, ValueError):
            self.close()
            raise self.failure("lost", stage) from None

    def read_line(self, limit, timeout, stage):
        """The next line's bytes (without its ending; a bare LF ends one too), waiting at
        most timeout seconds; a line longer than limit is "garbage"."""
        if self.sock is None:
            raise self.failure("lost", stage)
        self.reader.idle_timeout = timeout
        try:
            line = self.reader.readline(limit)
        except ReadTimeout:
            self.close()
            raise self.failure("timeout", stage) from None
        except (OSError, ValueError):
            line = None
        if line is None or not line.ending:
            self.close()
            raise self.failure("lost", stage)
        if line.too_long:
            self.close()
            raise self.failure("garbage", stage)
        return line.data

    def read_block(self, timeout, stage):
        """Whatever the server sent next (buffered bytes first), waiting at most timeout."""
        if self.sock is None:
            raise self.failure("lost", stage)
        self.reader.idle_timeout = timeout
        try:
            block = self.reader.read_block()
        except ReadTimeout:
            self.close()
            raise self.failure("timeout", stage) from None
        except (OSError, ValueError):
            block = b""
        if not block:
            self.close()
            raise self.failure("lost", stage)
        return block

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None


# --- SASL (RFC 4616 PLAIN, and the LOGIN mechanism's base64 steps) ---

def decode_base64(text, limit=MAX_SASL_RESPONSE):
    """Strictly decode one base64 SASL response; "=" is the empty response (RFC 4954 4)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if len(text) > limit:
        raise SASLError("response too long")
    if text == "=":
        return b""
    if not text or len(text) % 4:
        raise SASLError("invalid base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("invalid base64") from None


def decode_plain(text):
    """Decode a PLAIN response into (authzid, authcid, password), RFC 4616 2."""
    message = decode_base64(text)
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN needs exactly two NUL separators")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SASLError("PLAIN fields must be UTF-8") from None
    if not authcid or not password:
        raise SASLError("PLAIN needs a user name and a password")
    return authzid, authcid, password


def auth_failure_delay(failures):
    """Seconds to wait before answering a failed login: each failure slower than the last."""
    return min(0.5 * 2 ** (failures - 1), 8.0) if failures > 0 else 0.0


# --- Configuration: defaults, then the INI file, then flags ---

def parse_hostport(text, default_port):
    """Split "host", "host:port", "[v6]" or "[v6]:port" into (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError("no host in %r" % text)
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("bad port in %r" % text)
    return host, int(port)


# The options several roles share, defined once: key -> help text. A role lists the keys
# it takes in its DEFAULTS; a list default makes a repeatable flag.
SHARED_HELP = {
    "spool": "spool directory shared by all roles (default: $%s, else %s)" % (SPOOL_ENV, LOCAL_SPOOL),
    "store": "folder of the mailbox store (users, aliases, mail/), e.g. an NFS mount shared "
             "by several hosts (default: the spool itself)",
    "domain": "a local mail domain (repeatable)",
    "hostname": "this host's name, used in greetings and headers",
    "listen": "HOST:PORT to listen on",
    "tls_cert": "PEM certificate chain for TLS",
    "tls_key": "PEM private key for TLS",
    "dns": "DNS server HOST[:PORT], instead of /etc/resolv.conf",
    "relay_host": "send all outbound mail through this smarthost HOST[:PORT]",
    "remote_port": "port outbound delivery connects to (default 25)",
    "relay_network": "a CIDR network allowed to relay without AUTH (repeatable)",
    "idle_timeout": "seconds to wait for the client's next command",
    "max_size": "largest message accepted, in bytes",
    "max_connections": "concurrent connections in total",
    "max_per_address": "concurrent connections per client address",
    "retry_schedule": "waits between delivery tries, e.g. 5m,10m,20m,40m,1h; the last repeats",
    "user": "user to run as after binding the ports (when started as root)",
    "cpus": "CPUs this process may run on, e.g. 0 or 0-3,6 (empty: any)",
    "syslog": "also log to syslog (/dev/log)",
    "verbose": "log debugging detail",
}


def add_options(parser, defaults, help_texts=None, suppress=False):
    """Add --config and one flag per key of defaults; unset flags stay None.

    help_texts gives the help of the role's own keys; shared keys have theirs here. With
    suppress, an unset flag sets nothing at all: for a subcommand's parser, so that the
    same flags may come before or after the subcommand.
    """
    unset = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="FILE", default=unset,
                        help="INI file ([DEFAULT] and one section per role)")
    for key, default in defaults.items():
        flag = "--" + key.replace("_", "-")
        help_text = (help_texts or {}).get(key) or SHARED_HELP.get(key, key.replace("_", " "))
        if isinstance(default, bool):
            parser.add_argument(flag, dest=key, action="store_const", const=True, default=unset,
                                help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=key, action="append", default=unset, metavar="VALUE",
                                help=help_text)
        else:
            if default != "":
                help_text = "%s (default: %s)" % (help_text, default)
            parser.add_argument(flag, dest=key, default=unset, metavar=key.upper(), help=help_text)
    return parser


def config_value(key, text, default):
    """A setting given as text (INI file, flag) or as a value, made the type of its
    default: yes/no for a bool, a comma- or space-separated list for a list, a number.
    Text "" (two double quotes, as one writes an empty value) is the empty text.
    Raises ValueError naming the key."""
    if isinstance(text, str) and text.strip() == '""':
        text = ""
    if isinstance(default, bool):
        value = str(text).strip().lower()
        if value in ("1", "yes", "true", "on"):
            return True
        if value in ("0", "no", "false", "off", ""):
            return False
        raise ValueError("%s: not a yes/no value: %r" % (key, text))
    if isinstance(default, list):
        if isinstance(text, list):
            return [item for value in text for item in config_value(key, value, default)]
        return [item for item in str(text).replace(",", " ").split() if item]
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError("%s: not a number: %r" % (key, text)) from None
    return text


def daemon_settings(role, description, defaults, help_texts, argv=None):
    """The opening every daemon's main() shares: its command line (--help and usage errors
    end the process, as argparse does), then its settings (defaults, config file, flags)
    with the spool found (spool_path), and the process kept to its CPUs. Raises ValueError
    with a line for the role to print."""
    parser = argparse.ArgumentParser(prog=role + ".py", description=description)
    args = add_options(parser, defaults, help_texts).parse_args(argv)
    config = load_config(role, defaults, args)
    config["spool"] = spool_path(config["spool"])
    if "store" in config:
        config["store"] = store_path(config["store"], config["spool"])
    run_on_cpus(config["cpus"])
    return config


def read_ini(path):
    """{section: {key: text}} of an INI file as written, [DEFAULT] a section like the others
    (not merged into each). Raises ValueError naming the file when it cannot be read."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ValueError("cannot read config %s: %s" % (path, exc)) from None
    return {name: dict(parser.items(name, raw=True)) for name in parser.sections()}


def load_config(section, defaults, args=None, path=None):
    """Return the role's settings: its defaults, then the INI file's, then the flags given.

    The INI file (args.config, or path) has a [DEFAULT] section for shared settings and one
    section per role named after its file. A key of the role's own section that the role
    does not know is an error; [DEFAULT] may hold keys of other roles. Raises ValueError
    with a readable message for a bad value, an unknown key or an unreadable file.
    """
    config = dict(defaults)
    path = (getattr(args, "config", None) if args is not None else None) or path
    if path:
        sections = read_ini(path)
        for key in sections.get(section, {}):
            if key not in defaults:
                raise ValueError("%s: [%s] %s: no such setting" % (path, section, key))
        values = dict(sections.get("DEFAULT", {}))
        values.update(sections.get(section, {}))
        for key, text in values.items():
            if key in defaults:
                config[key] = config_value(key, text, defaults[key])
    for key, default in defaults.items():
        value = getattr(args, key, None) if args is not None else None
        if value is not None:
            config[key] = config_value(key, value, default)
    return config


def settings_of(defaults, config=None):
    """A server's settings from config, a dict with any keys of defaults, each a value or
    the text an INI file holds; the other keys keep their defaults. Keys defaults does not
    have pass through unchanged (for a caller's own)."""
    settings = dict(defaults)
    for key, value in (config or {}).items():
        if key in defaults:
            value = config_value(key, value, defaults[key])
        settings[key] = value
    return settings


def config_text(value) -> str:
    """A setting as the INI file writes it: yes/no, a comma-separated list, or the text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def log_config(log, config) -> None:
    """Log the effective settings at startup, one per line: "config: key=value", sorted.

    Under run_all they are logged only with --verbose: run_all --print-config shows them all,
    and its summary of the listeners stays readable at the top of its output.
    """
    level = logging.DEBUG if os.environ.get(SUPERVISOR_ENV) else logging.INFO
    for key in sorted(config):
        log.log(level, "config: %s=%s", key, config_text(config[key]))


# --- Logging and queue ids ---

def stderr_is_journal():
    """True when stderr is systemd's journal, which stamps each line itself: systemd sets
    JOURNAL_STREAM to the device and inode of the stream it connected (systemd.exec(5))."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return device.isdigit() and inode.isdigit() and (st.st_dev, st.st_ino) == (int(device), int(inode))


class _Formatter(logging.Formatter):
    """ "role[pid]: message", after an ISO 8601 local time when stamped."""

    def formatTime(self, record, datefmt=None):
        when = time.localtime(record.created)
        return "%s.%03d%s" % (time.strftime("%Y-%m-%dT%H:%M:%S", when), record.msecs,
                              time.strftime("%z", when))


def setup_logging(role, syslog=False, verbose=False):
    """Log one line per event as "role[pid]: message" on stderr (and syslog when asked).

    A process runs one role, so every line carries that role's name, the plumbing's too.
    Lines on stderr start with the time, unless syslog or the journal adds its own.
    """
    plain = logging.Formatter(role + "[%(process)d]: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = _stderr_handler()
    has_syslog = syslog and os.path.exists("/dev/log")
    if has_syslog or stderr_is_journal():
        stderr.setFormatter(plain)
    else:
        stderr.setFormatter(_Formatter("%(asctime)s " + role + "[%(process)d]: %(message)s"))
    root.addHandler(stderr)
    if has_syslog:
        handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(plain)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if syslog and not has_syslog:
        log.warning("syslog: there is no /dev/log on this host; logging to stderr only")
    return logging.getLogger(role)


# --- Speed: log lines written without a lock, and records made without looking up the
#     caller; measured by bench/smtp_bench.py (50 clients: every session thread logs a few
#     lines per message, and behind StreamHandler's lock they queued up as a convoy) ---
#
# The plain form is logging.StreamHandler(sys.stderr) with logging's default settings;
# tests/test_plumbing.py checks that both write the same lines.

def _stderr_handler():
    """The handler of stderr: _LineHandler, or a StreamHandler where stderr has no fd."""
    # A daemon logs a few lines per message: skip the caller, thread and process look-ups
    # the format never shows (the logging HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    try:
        return _LineHandler(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):      # a stderr without a file descriptor
        return logging.StreamHandler()


class _LineHandler(logging.Handler):
    """Writes each record as one line, with one write() and no lock.

    logging.StreamHandler holds its lock across the write; under load the writer that
    waits in write() (or, back from it, for the GIL) makes every other thread that logs
    queue behind it. One write() of a line is atomic without a lock for lines up to
    PIPE_BUF (4096 octets) on a pipe, and at any length on a file opened for appending.
    """

    def __init__(self, fd):
        super().__init__()
        self.fd = fd

    def handle(self, record):
        """Filter and emit the record, without the lock Handler.handle takes."""
        allowed = self.filter(record)
        if allowed:
            self.emit(allowed if isinstance(allowed, logging.LogRecord) else record)
        return allowed

    def emit(self, record):
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)

# --- End of the speed section ---


_queue_id_lock = threading.Lock()
_last_queue_time = [0]


def new_queue_id():
    """A queue id unique on this host and sortable by time: 13 hex digits of microseconds
    since the epoch (strictly rising within a process), then 5 random (18 characters)."""
    with _queue_id_lock:
        now = max(time.time_ns() // 1000, _last_queue_time[0] + 1)
        _last_queue_time[0] = now
    return "%013X%05X" % (now, secrets.randbits(20))


# --- CPUs ---

def parse_cpus(text: str) -> set:
    """The CPU numbers of a list such as "0", "0,2" or "0-3,6"; the empty set for "".

    Raises ValueError for anything else, or a CPU this machine does not have.
    """
    cpus = set()
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if not first.isdigit() or not (last.isdigit() if dash else True):
            raise ValueError("cpus: not a CPU list: %r" % text)
        first, last = int(first), int(last) if dash else int(first)
        if last < first:
            raise ValueError("cpus: empty range %r" % item)
        cpus.update(range(first, last + 1))
    machine = os.cpu_count() or 1
    missing = sorted(cpu for cpu in cpus if cpu >= machine)
    if missing:
        raise ValueError("cpus: this machine has CPUs 0-%d, not %s"
                         % (machine - 1, ",".join(map(str, missing))))
    return cpus


def run_on_cpus(text: str) -> None:
    """Keep this process on the CPUs of the list text (see parse_cpus); "" leaves it be.

    CPython lets one thread run Python at a time and hands that lock over at each
    blocking system call. A daemon whose threads are spread over CPUs pays for each
    hand-over with a wake-up of another CPU and a switch there; on one CPU the threads
    take turns without that (smtp_in: 56 context switches per message on two CPUs, 18
    on one). Call it before starting threads: threads inherit it. Raises ValueError for
    a bad list, or where the system cannot bind a process to CPUs.
    """
    cpus = parse_cpus(text)
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cpus: this system cannot bind a process to CPUs")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ValueError("cpus: %s: %s" % (text, exc.strerror)) from None


# --- Privileges and the spool's owner ---

def drop_privileges(user):
    """When running as root and user is given, become that user (after binding ports), with
    the user's groups (a group may grant the TLS key). Raises ValueError, naming the user
    and the reason, when that fails.

    The roles import every module they use at start, before this: once it has run, the
    Python library itself may be out of the user's reach (an interpreter installed under
    /root), and a module the standard library loads on first use (the IDNA codec behind
    socket.getfqdn(), concurrent.futures' thread pool) would then fail to load.
    """
    if not user or os.getuid() != 0:
        return
    import pwd
    try:
        entry = pwd.getpwnam(user)
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except KeyError:
        raise ValueError("cannot become user %s: no such user" % user) from None
    except OSError as exc:
        raise ValueError("cannot become user %s: %s" % (user, exc.strerror or exc)) from None


def become_spool_owner(spool):
    """An admin tool run as root becomes the owner of the spool before it touches it.

    Everything it then writes (users, aliases, queue files, doorbell rings) belongs to that
    owner, the user the daemons run as, with the same modes a daemon would give it, and no
    file is ever root's for a moment. A spool owned by root is left as root's.
    Raises ValueError when the switch fails.
    """
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(spool)
    except OSError:
        return
    if st.st_uid == 0:
        return
    try:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    except OSError as exc:
        raise ValueError("cannot become the owner (uid %d) of %s: %s"
                         % (st.st_uid, spool, exc.strerror or exc)) from None


def spool_path(given=""):
    """The spool a daemon uses: the one given, else $MAILTOOLKIT_SPOOL, else ./mailspool."""
    return os.path.abspath(given or os.environ.get(SPOOL_ENV, "") or LOCAL_SPOOL)


def store_path(given, spool):
    """The mailbox store's folder (users, aliases, mail/): the one given, else the spool.

    Several hosts may share one store (an NFS mount); each keeps its own spool, whose queue
    and run/ folder must never be shared."""
    return os.path.abspath(given) if given else spool


def store_is_apart(store, spool):
    """True when the store setting names a folder other than the spool's (spool_path)."""
    return bool(store) and os.path.abspath(store) != spool_path(spool)


def reader_went_away():
    """After a BrokenPipeError on stdout (`mta.py queue | head`): point stdout at /dev/null,
    so that the interpreter's last flush at exit does not complain; the command then ends
    quietly, with status 1 (the listing was cut short)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return 1


def is_spool(path):
    """True for a folder that looks like a spool: it holds a queue, users, mail or run/."""
    try:
        return any(os.path.exists(os.path.join(path, name)) for name in SPOOL_MARKERS)
    except (OSError, ValueError):
        return False


def find_spool(given=""):
    """The spool an admin tool works on: the one given (--spool or the config); else the
    environment's MAILTOOLKIT_SPOOL; else ./mailspool when it is a spool; else
    /var/spool/mailtoolkit when it is one. Raises ValueError when the folder is missing or
    not a spool: an admin tool never makes a new spool by accident."""
    candidates = [given or os.environ.get(SPOOL_ENV, "")]
    if not candidates[0]:
        candidates = [LOCAL_SPOOL, SYSTEM_SPOOL]
    for candidate in candidates:
        if is_spool(candidate):
            return os.path.abspath(candidate)
    if len(candidates) > 1:
        raise ValueError("no spool in %s or %s: give --spool DIR or set %s"
                         % (LOCAL_SPOOL, SYSTEM_SPOOL, SPOOL_ENV))
    if not os.path.isdir(candidates[0]):
        raise ValueError("no spool at %s (no such folder)" % candidates[0])
    raise ValueError("%s is not a spool (it has none of %s)"
                     % (candidates[0], ", ".join(SPOOL_MARKERS)))
