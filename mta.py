"""mta.py - the spool, the router, bounces and the admin CLI (RFC 5321, RFC 3463, RFC 3464).

mta.py owns the queue that every role writes to or reads from. The life of a message:

1. A QueueWriter (smtp_in during DATA, block by block as the message arrives) or
   enqueue() (`mta.py sendmail` and bounces, a message in memory; the same code) writes
   ONE file, the envelope then the message, to queue/tmp/, fsyncs it, links it to
   queue/incoming/ID, rings the router's doorbell and fsyncs that directory. It returns
   only then, so a 250 reply means the message is on disk.
2. The router (this file's daemon) claims the file with flock(), expands each recipient
   through mailbox_store (aliases, user+tag), delivers local ones into their Maildirs,
   fails unknown users and mail loops, and records each result in the file before it
   delivers the next recipient. Failures are reported in one DSN (RFC 3464) to the sender.
   A recipient in a --relay-domain (this host is a backup MX for it) is always remote.
3. Remote recipients wait in queue/outbound/ for smtp_out, which claims the file the same
   way, takes the due recipients grouped by domain, records each result and releases it.
4. A message with recipients to retry waits in queue/deferred/ with its mtime set to its
   next attempt; the router's periodic scan moves it back to incoming/ once due (`flush`:
   at once), and the router sends its remote recipients on to outbound/ again. After DELAY_WARNING in the queue the sender gets a delay notice; after
   QUEUE_LIFETIME the recipient fails with 4.4.7 and is bounced.
5. When every recipient is delivered, or failed and reported, the file is removed: moved
   to queue/free/ (emptied first when larger than FREE_KEEP), where a writer takes it for
   a new message and writes over it (a file is made only when free/ has none, and
   unlinked when it holds about FREE_FILES).

Spool layout (mailbox_store owns SPOOL/users, SPOOL/aliases and SPOOL/mail/, which move to
the folder --store names when the store is kept apart, shared by several hosts; the queue
and run/ are this host's own):

    SPOOL/queue/tmp/ID            being written (QueueWriter); older than an hour is debris,
                                  removed by the router's hourly sweep (with the Maildirs'; a
                                  writer whose file was removed fails at commit: 451)
    SPOOL/queue/incoming/ID       the router's work: new mail, or a local retry now due
    SPOOL/queue/outbound/ID       smtp_out's work: remote recipients due now
    SPOOL/queue/deferred/ID       waiting; the file's mtime is its earliest next attempt
    SPOOL/queue/quarantine/NAME   files that are not valid queue files, moved aside
    SPOOL/queue/free/NAME         files of finished messages, for writers to use again
    SPOOL/run/ROLE.PID.N.sock     each daemon's doorbell: a UNIX datagram socket
    SPOOL/run/flow                FIFO of flow-control tokens: the router puts one for each
                                  message it routes, smtp_in takes one per MAIL (FlowGate)

A queue file is text a person can read: the envelope, a blank line, exactly Message-Size
octets of message as received (CRLF line ends), then state records, one JSON object per
line, only ever appended. The message is written as it arrives, after the envelope, so
Message-Size is first written as a field of SIZE_WIDTH characters (0, then spaces) and
filled in (the number, then spaces) with pwrite() once the message is complete, before
the fsync; readers strip the spaces. No
role holds a whole message in memory: the router and smtp_out read it from the file in
COPY_BLOCK blocks (claim.message is a MessageFile), and the header alone, at most
MAX_HEADER octets, for routing (Received: hops, Delivered-To:) and MAX_DSN_HEADERS for a
bounce.

    MTA-Queue-File: 1
    Queue-ID: 018A5F3C2B1D04E7A2
    Arrival: 1700000000.123456
    Sender: <alice@example.net>
    Client-Address: 203.0.113.5
    Client-HELO: mx.example.net
    Auth-User:
    Protocol: ESMTP
    Recipient: <list@example.com>
    Message-Size: 2048                (padded with spaces to 20 characters)

    ...the message...
    {"event": "route", "from": 0, "rcpt": 0, "at": 1700000000.1, "to": [
        {"kind": "local", "address": "bob@example.com"}, {"kind": "remote", "address": "x@example.org"}]}
    {"event": "delivered", "rcpt": 0, "at": 1700000000.2, "dsn": "2.0.0", "mta": "", "relay": "",
        "reply": "250 ..."}
    {"event": "deferred", "rcpt": 1, "at": ..., "next": ..., "dsn": "4.4.1", "mta": "...",
        "relay": "...", "reply": "..."}
    {"event": "failed", "rcpt": 1, "at": ..., "dsn": "5.1.1", "mta": "...", "relay": "...",
        "reply": "..."}
    {"event": "notified", "rcpt": 1, "action": "failed", "dsn_id": "018A5F..."}
    {"event": "flush", "at": ...}

A "prepend" record, {"event": "prepend", "text": "DKIM-Signature: ...\r\n\tb=...\r\n"},
holds header fields known only once the whole message was read (smtp_in's DKIM and DMARC
results, a DKIM-Signature): QueueWriter.commit() writes it as the first record, right
after the message and before the fsync, so the message is never rewritten. Every reader
goes through MessageFile, which puts its text on top of the message (blocks(), len(),
header()): local delivery, smtp_out, a DSN's returned header. Message-Size stays the
octets as received; `mta.py queue` shows the file's size on disk, record included. Its
text must be whole header fields with CRLF line ends, at most MAX_PREPEND octets
(check_prepend()); one that is not, or that comes after another record, is a bad record,
skipped. A file without one reads as the message alone, as before.

Each record is one line (the long ones above are folded to fit the page). A "route"
record turns one envelope recipient (from) into final recipients numbered from rcpt on; kind is
local, remote or error (an error carries its "reply" and is failed at once). "mta" is the
host name of the server that answered (the DSN's Remote-MTA), "relay" where it was reached,
name[address]:port (the log's relay=). A recipient is done when delivered, or failed and
"notified" (its DSN is queued or was dropped).

Durability and concurrency:

- Two fsyncs per accepted message (the file, then incoming/), none per state change: a
  record is one write(), so a kill -9 cannot lose it. A power failure can lose the last
  records, which only means a recipient is delivered again, never that mail is lost. A
  torn last record is cut off before the next append. A record is written before the
  next side effect (the next delivery, a DSN, moving the file); a file removed when done
  never needs its last records, so a one-pass local delivery costs no append at all.
- A file is only handled under an exclusive flock(); after locking, the claimer checks the
  file is still at its name (the holder before may have moved it), so several threads or
  router processes on one spool never handle one message at once. The kernel drops the
  lock of a killed process: nothing is left stuck.
- A crash between a local delivery and the write() of its "delivered" record (or the
  removal of the file) does not deliver that recipient twice: the Maildir file's name is
  the same at every attempt (Router.deliver), and the next attempt finds it and records
  the recipient as delivered. A remote recipient is sent twice when the crash fell
  between the remote 250 and its record (RFC 5321 6.1 allows the duplicate).
- The router is also the queue manager: smtp_out needs it running for its retries.
- Each daemon binds SPOOL/run/ROLE.PID.N.sock (ROLE.PID.N.IofK.sock for worker process I of
  K, which takes the queue ids that hash to I: share_of()); wake(spool, role, queue_id)
  sends a datagram to every socket of the role, or of the processes sharing a folder only
  to the one whose share the id is in, removing those whose process is gone. A woken
  daemon lists its folder; every SCAN_INTERVAL seconds it lists it anyway.

The API smtp_out uses (all in __all__):

    queue = mta.Queue(spool_dir, hostname=..., clock=time.time)
    runner = mta.QueueRunner(queue, mta.OUTBOUND, "smtp_out", handle, workers=8)
    plumbing.serve_until_signalled([runner])      # or runner.serve_forever()/stop()

    def handle(queue_id):                         # called on a worker thread
        claim = queue.claim_outbound(queue_id)    # None: gone; raises QueueBusy: taken
        if claim is None:
            return
        with claim:                               # leaving it releases the claim
            for domain, recipients in claim.groups.items():
                ... send claim.message (len(), blocks()) from claim.envelope.sender ...
                claim.delivered(rcpt, reply, remote_mta="mx.example.org",
                                relay="mx.example.org[192.0.2.7]:25")
                claim.deferred(rcpt, reply, dsn="4.4.1")
                claim.failed(rcpt, reply, dsn="5.1.1", remote_mta="mx.example.org",
                             relay="mx.example.org[192.0.2.7]:25")

deferred() picks the next attempt (the queue's retry schedule, retry_delay()) and fails
the recipient with 4.4.7 once the message is older than the queue lifetime. Releasing the
claim queues one DSN for the new failures (never to a null sender: a double bounce goes to
the postmaster, and a failed double bounce is dropped with a log line), a delay notice when
due, and files the message away. Queue.send_dsn() is that DSN step on its own; build_dsn()
builds the bytes.

Run: python3 mta.py --spool DIR --domain example.com [--hostname mail.example.com]
     python3 mta.py --spool DIR queue [--json] | flush | delete ID | delete --all
     python3 mta.py --spool DIR --domain D sendmail [-t] [-f FROM] [-i] [RCPT ...] < message
"""

import contextlib
import email.generator  # noqa: F401 - as_bytes() would load it on first use (see plumbing.drop_privileges)
import email.utils
import errno
import fcntl
import functools
import getpass
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import pickle
import re
import select
import socket
import stat
import struct
import sys
import termios
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from queue import SimpleQueue
from typing import Callable, Iterable, Iterator, Optional

import dkim
import dnsstub
import mailbox_store
import plumbing

__all__ = [
    "DEFAULTS", "DELAY_WARNING", "HELP", "QUEUE_LIFETIME", "RUN_DIR", "DEFERRED", "INCOMING",
    "FLOW_FIFO", "FLOW_RECHECK", "FLOW_TOKENS", "FlowGate", "FlowTokens", "open_flow",
    "OUTBOUND", "Claim", "DeferredSchedule", "Envelope", "MessageFile", "Queue", "QueueBusy",
    "QueueFileError",
    "QueueRunner", "QueueWriter", "Recipient", "Router", "SpoolError", "WakeSocket",
    "RETRY_SCHEDULE", "build_dsn", "check_prepend", "dkim_signature", "enqueue", "main",
    "parse_queue_file", "parse_retry_schedule", "prepare_submission", "relay_domain_set",
    "retry_delay", "share_of",
    "wake",
]

# Timing, in seconds.
HOP_LIMIT = 50                     # Received: fields; RFC 5321 6.3 counts them (Postfix: 50)
RECIPIENT_DIGEST = 8               # hex digits of the recipient's digest in a delivery id
QUEUE_LIFETIME = 5 * 86400         # RFC 5321 4.5.4.1: give up after at least 4-5 days
DELAY_WARNING = 4 * 3600           # first "delayed" DSN (RFC 3464 2.3.3)
# Waits after the 1st, 2nd, ... failed attempt, the last one repeating (see retry_delay()).
RETRY_SCHEDULE = (300.0, 600.0, 1200.0, 2400.0, 3600.0)
RETRY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}     # of the retry_schedule setting
NOTIFY_RETRY = 60                  # retry of a DSN that could not be queued
SCAN_INTERVAL = 10.0               # backup scan when no doorbell rings
BUSY_RETRY = 0.2                   # look again at a file another process holds
LIST_PAUSE = 0.05                  # a backlogged runner lists its folder at most this often
STEAL_AFTER = 1.0                  # a name of another process's share waits this long for it,
STEAL_IDLE = 0.05                  # or this long when this process has a worker free
ERROR_RETRY = 60.0                 # look again at a file whose handling raised
TMP_DEBRIS_AGE = 3600              # a tmp/ file this old belongs to a dead writer
FREE_FILES = 1000                  # about as many finished queue files kept in free/ for reuse
FREE_RECOUNT = 32                  # free/ is counted again after this many files put there
FREE_TRIES = 8                     # names of free/ a writer tries before it makes a new file
FREE_KEEP = 4096                   # a file put in free/ keeps its octets up to this size
TMP_SWEEP_INTERVAL = 3600          # the router removes tmp/ debris (queue, Maildirs) this often
RESCAN_INTERVAL = 600.0            # the router stats every deferred/ file this often anyway
RECENT_CHANGE = 2.0                # a folder changed this recently is listed again next time
DELETE_WAIT = 5.0                  # `delete` waits this long for a busy file

DEFAULTS = {
    "spool": "",                   # daemon: plumbing.spool_path; admin: plumbing.find_spool
    "store": "",                   # plumbing.store_path: the spool itself
    "domain": [],
    "relay_domain": [],
    "hostname": "",
    "workers": 2,                  # more threads a process wait longer for the interpreter
    "processes": "auto",
    "scan_interval": SCAN_INTERVAL,
    "hop_limit": HOP_LIMIT,
    "queue_lifetime": QUEUE_LIFETIME,
    "delay_warning": DELAY_WARNING,
    "retry_schedule": ",".join("%dh" % (wait // 3600) if wait % 3600 == 0 else "%dm" % (wait // 60)
                               for wait in RETRY_SCHEDULE),
    "max_size": 35 * 1024 * 1024,
    "dkim_sign": "yes",
    "cpus": "",
    "user": "",
    "syslog": False,
    "verbose": False,
}

HELP = {                           # the help of the keys plumbing.SHARED_HELP does not know
    "workers": "threads routing messages at once, in each router process",
    "processes": "router processes sharing the queue, or processes reading it for `queue` "
                 "(auto: one per CPU the router may use, at most 8; 1: one process, no master)",
    "scan_interval": "seconds between scans of the queue when no doorbell rings",
    "hop_limit": "Received: fields before a message is bounced as a mail loop (5.4.6)",
    "queue_lifetime": "seconds a message may stay queued before it bounces (4.4.7)",
    "delay_warning": "seconds queued before the sender gets a delay notice (0: never)",
    "dkim_sign": "yes or no: `sendmail` signs mail whose From domain is local and has a key "
                 "in SPOOL/dkim/DOMAIN/ (DKIM, RFC 6376)",
    "relay_domain": "a domain this host is a backup MX for (repeatable): its mail goes on "
                    "to the domain's better MX hosts, never into a local Maildir",
}

# Spool layout: SPOOL/queue/FOLDER/ID and SPOOL/run/ROLE.PID.N.sock
QUEUE_DIR = "queue"
TMP, INCOMING, OUTBOUND, DEFERRED, QUARANTINE = "tmp", "incoming", "outbound", "deferred", "quarantine"
FREE = "free"                      # finished queue files, for writers to use again
QUEUE_FOLDERS = (INCOMING, OUTBOUND, DEFERRED)
RUN_DIR = "run"
FILE_MAGIC = "MTA-Queue-File: 1"
MAX_ENVELOPE = 1024 * 1024         # octets of envelope before the blank line
MAX_ADDRESS = 512                  # RFC 5321 4.5.3.1.3 allows 256 for a path; some slack
MAX_INFO = 255                     # client address, HELO, auth user, protocol
MAX_REPLY = 1000                   # characters of a reply kept in a state record
MAX_UNIX_PATH = 107                # sun_path is 108 octets with its NUL
MAX_DSN_HEADERS = 64 * 1024        # octets of the original header returned in a DSN
MAX_HEADER = 1024 * 1024           # octets of a message's header the router reads (hops, loops)
SIZE_WIDTH = 20                    # Message-Size digits, space-padded (2**64 has 20)
COPY_BLOCK = 64 * 1024             # octets of message read or written at a time
LISTING_CHUNK = 500                # queue files `mta.py queue` reads in one go (a process's share)
LENGTH_PREFIX = struct.Struct("!I")  # before each part a listing process sends
MAX_PREPEND = 64 * 1024            # octets of header fields a "prepend" record may put on top
MAX_PENDING_PIECES = 64            # a QueueWriter writes once this many pieces wait (IOV_MAX 1024)


# Replies recorded for recipients the router fails or defers; the enhanced status code
# (RFC 3463) in each becomes the DSN's Status field.
R250_DELIVERED = "250 2.0.0 Delivered to maildir"
R250_ALREADY_DELIVERED = "250 2.0.0 Already in the maildir (an earlier attempt), not delivered again"
R451_LOCAL_ERROR = "451 4.3.0 Local delivery failed: %s"
R452_SYSTEM_FULL = "452 4.3.1 Insufficient system storage"
R452_MAILBOX_FULL = "452 4.2.2 Mailbox full"
R550_USER_UNKNOWN = "550 5.1.1 User unknown"
R553_BAD_ADDRESS = "553 5.1.3 Bad destination mailbox address syntax"
R554_TOO_MANY_HOPS = "554 5.4.6 Too many hops (%d Received: fields), mail loop?"
R554_DELIVERED_TO_LOOP = "554 5.4.6 Mail loop: Delivered-To: already names this recipient"
R554_ALIAS_LOOP = "554 5.4.6 Alias expansion loop"
R554_ALIAS_TOO_BIG = "554 5.2.4 Alias expansion too large"      # RFC 3463 3.3: list expansion
DSN_EXPIRED = "4.4.7"              # RFC 3463 3.5: delivery time expired

# sysexits.h, the exit codes of `sendmail` that scripts and cron act on.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75
EX_CONFIG = 78

QUEUE_ID_PATTERN = re.compile(r"[0-9A-Za-z]{1,64}\Z")
# A "prepend" record's text: whole header fields (RFC 5322 2.2: a name of printable
# characters but colon, then folded lines each ending in CRLF), no other CR, LF or NUL.
PREPEND_PATTERN = re.compile(r"(?:[!-9;-~]+:[^\r\n\x00]*\r\n(?:[ \t][^\r\n\x00]*\r\n)*)+\Z")
RETRY_STEP_PATTERN = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)\Z")
STATUS_PATTERN = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")
REPLY_STATUS_PATTERN = re.compile(r"[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b")

log = logging.getLogger("mta")


# --- Errors and data types ---

class SpoolError(OSError):
    """enqueue() could not make the message durable; nothing partial was left behind."""


class QueueBusy(Exception):
    """The queue file is claimed by another thread or process."""


class QueueFileError(ValueError):
    """A file in the queue that is not a valid queue file."""


class UsageError(Exception):
    """A command line the CLI cannot act on (exit status EX_USAGE)."""


@dataclass
class Envelope:
    """The SMTP envelope and its trace: who sent what to whom, from where, and when."""
    queue_id: str
    sender: str                    # "" is the null reverse-path
    recipients: list               # the RCPT TO addresses as given
    arrival: float
    size: int = 0
    client_address: str = ""
    client_helo: str = ""
    auth_user: str = ""
    protocol: str = ""


@dataclass
class Recipient:
    """One final recipient after alias expansion, with its delivery state."""
    index: int                     # "rcpt" in the state records
    address: str
    original: str                  # the envelope recipient it was expanded from
    kind: str                      # "local", "remote" or "error"
    status: str = "pending"        # pending, deferred, delivered or failed
    attempts: int = 0
    last_attempt: float = 0.0
    next_attempt: float = 0.0      # deferred only
    reply: str = ""                # the last reply (SMTP text), for logs and DSNs
    dsn: str = ""                  # RFC 3463 status code of the last result
    remote_mta: str = ""           # host name of the server that answered (DSN Remote-MTA)
    relay: str = ""                # where it was reached, name[address]:port (log relay=)
    notified: bool = False         # a failed DSN is queued (or was dropped)
    warned: bool = False           # a delayed DSN is queued

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def done(self) -> bool:
        return self.status == "delivered" or (self.status == "failed" and self.notified)

    def due(self, now: float) -> bool:
        return self.status == "pending" or (self.status == "deferred" and self.next_attempt <= now)


@dataclass
class QueueState:
    """A parsed queue file: the envelope and what its state records say."""
    envelope: Envelope
    message_offset: int
    recipients: list = field(default_factory=list)     # [Recipient], by index
    routed: set = field(default_factory=set)           # envelope recipient numbers routed
    torn_tail: int = 0             # octets of an incomplete last record
    bad_records: int = 0
    prepend: bytes = b""           # header fields read before the message (a "prepend" record)
    applied: int = 0               # records applied

    @property
    def unrouted(self) -> list:
        return [n for n in range(len(self.envelope.recipients)) if n not in self.routed]

    def apply(self, record: dict):
        """Change the state as record says; raises KeyError, IndexError, ValueError, TypeError."""
        event = record["event"]
        if event == "prepend":
            # Written by QueueWriter.commit() as the first record; anywhere else it would
            # change a message already (partly) delivered.
            if self.applied:
                raise ValueError("prepend record after another record")
            self.prepend = check_prepend(record["text"]).encode("utf-8")
            self.applied += 1
            return
        self.applied += 1
        if event == "flush":
            at = float(record["at"])
            for recipient in self.recipients:
                if recipient.status == "deferred":
                    recipient.next_attempt = min(recipient.next_attempt, at)
            return
        if event == "route":
            self._route(record)
            return
        recipient = self.recipients[_index(record["rcpt"], len(self.recipients))]
        if event == "notified":
            if record["action"] == "delayed":
                recipient.warned = True
            else:
                recipient.notified = True
            return
        if event not in ("delivered", "deferred", "failed"):
            raise ValueError("unknown event %r" % event)
        recipient.status = event
        recipient.attempts += 1
        recipient.last_attempt = float(record["at"])
        recipient.reply = clean_text(record.get("reply", ""), MAX_REPLY)
        recipient.dsn = checked_status(record.get("dsn", ""))
        recipient.remote_mta = clean_text(record.get("mta", ""), MAX_INFO)
        recipient.relay = clean_text(record.get("relay", ""), MAX_INFO)
        if not recipient.relay and "[" in recipient.remote_mta:
            # A record written before the two were apart: "mta" held name[address]:port.
            recipient.relay = recipient.remote_mta
            recipient.remote_mta = recipient.remote_mta.partition("[")[0]
        if event == "deferred":
            recipient.next_attempt = float(record["next"])

    def _route(self, record):
        origin = _index(record["from"], len(self.envelope.recipients))
        original = self.envelope.recipients[origin]
        if origin in self.routed or int(record["rcpt"]) != len(self.recipients):
            raise ValueError("route record out of order")
        routes = list(record["to"])
        for route in routes:
            if route["kind"] not in ("local", "remote", "error"):
                raise ValueError("bad route kind %r" % (route["kind"],))
            check_address_text(route["address"])
        for route in routes:
            recipient = Recipient(len(self.recipients), route["address"], original, route["kind"])
            if route["kind"] == "error":
                recipient.status = "failed"
                recipient.attempts = 1
                recipient.last_attempt = float(record.get("at", 0))
                recipient.reply = clean_text(route["reply"], MAX_REPLY)
                recipient.dsn = reply_status(recipient.reply, "5.0.0")
            self.recipients.append(recipient)
        self.routed.add(origin)


# --- Pure helpers ---

def _index(value, length):
    """A record's recipient number, checked: negative numbers would index from the end."""
    if not isinstance(value, int) or not 0 <= value < length:
        raise ValueError("recipient number %r out of range" % (value,))
    return value


def check_prepend(text: str) -> str:
    """TEXT when it may go on top of a message: whole header fields with CRLF line ends,
    at most MAX_PREPEND octets; raises ValueError otherwise."""
    if not isinstance(text, str) or len(text) > MAX_PREPEND or not PREPEND_PATTERN.match(text):
        raise ValueError("prepended text is not header fields ending in CRLF, or too long")
    if len(text.encode("utf-8")) > MAX_PREPEND:
        raise ValueError("prepended text longer than %d octets" % MAX_PREPEND)
    return text


def valid_queue_id(name: str) -> bool:
    return bool(QUEUE_ID_PATTERN.match(name))


def retry_delay(attempts: int, schedule: tuple = RETRY_SCHEDULE) -> float:
    """Seconds to wait after the attempts-th failed attempt: that step of schedule, its
    last step once the attempts outnumber the steps (default 5, 10, 20, 40 min, then 1 h).

    RFC 5321 4.5.4.1 asks for at least 30 minutes between tries; like Postfix the first
    tries come sooner, because most temporary failures (greylisting) clear in minutes.
    """
    return float(schedule[min(max(attempts, 1), len(schedule)) - 1])


def parse_retry_schedule(text: str) -> tuple:
    """The seconds of a retry_schedule setting, "5m,10m,20m,40m,1h" (units s, m, h, d; a
    bare number is seconds; commas or spaces between). Raises ValueError saying why."""
    steps = []
    for item in str(text).replace(",", " ").split():
        found = RETRY_STEP_PATTERN.match(item.lower())
        seconds = float(found.group(1)) * RETRY_UNITS[found.group(2) or "s"] if found else 0
        if not seconds > 0:
            raise ValueError("retry_schedule: %r is not a wait such as 30s, 5m, 1h or 2d" % item)
        steps.append(seconds)
    if not steps:
        raise ValueError("retry_schedule: no wait given (e.g. 5m,10m,20m,40m,1h)")
    return tuple(steps)


def reply_status(reply: str, default: str = "") -> str:
    """The RFC 3463 status code in an SMTP reply ("550 5.1.1 ..."), else one from its class."""
    found = REPLY_STATUS_PATTERN.match(reply or "")
    if found:
        return normal_status(found.group(1))
    if reply[:1] in ("4", "5") and reply[1:3].isdigit():
        return reply[0] + ".0.0"
    return default


def normal_status(status: str) -> str:
    """RFC 3464 2.3.4: a status code has no leading zeros in its sub-fields."""
    found = STATUS_PATTERN.match(status or "")
    if not found:
        raise ValueError("not an RFC 3463 status code: %r" % (status,))
    return ".".join(str(int(part)) for part in found.groups())


def checked_status(text) -> str:
    """normal_status(text), or "" when text is not a status code (a record edited by hand)."""
    try:
        return normal_status(str(text))
    except ValueError:
        return ""


def clean_text(text, limit: int) -> str:
    """One line of printable text: CR, LF and control characters become spaces."""
    text = str(text or "")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return text[:limit]


def check_address_text(address: str, allow_empty: bool = False) -> str:
    """An envelope address as text that fits one line of a queue file; raises ValueError."""
    if not isinstance(address, str):
        raise ValueError("an address must be str, not %s" % type(address).__name__)
    if not address and not allow_empty:
        raise ValueError("empty recipient address")
    if len(address) > MAX_ADDRESS or not address.isprintable() or address.strip() != address:
        raise ValueError("address not allowed in the queue: %r" % address[:80])
    return address


def dsn_text(text: str) -> str:
    """Text for a message/delivery-status field, which is ASCII: other characters become
    \\x{HEX} (RFC 6533 3, utf-8-addr-xtext)."""
    return "".join(c if c.isascii() else "\\x{%X}" % ord(c) for c in text)


def dsn_address(address: str) -> str:
    """An address-type and address for Final-Recipient and Original-Recipient (RFC 6533 3)."""
    return ("rfc822; " if address.isascii() else "utf-8; ") + dsn_text(address)


def rfc5322_date(timestamp: float) -> str:
    """A date-time with a numeric zone, as RFC 5322 3.3 and RFC 3464 2.3.7 want."""
    return email.utils.format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))


def header_block(message: bytes) -> bytes:
    """The message's header section, without the blank line that ends it."""
    crlf = message.find(b"\r\n\r\n")
    # A bare-LF blank line counts only before the first CRLF one (no search past it).
    lf = message.find(b"\n\n", 0, len(message) if crlf < 0 else crlf + 1)
    if lf >= 0:
        return message[:lf + 1]
    return message if crlf < 0 else message[:crlf + 2]


def header_fields(block: bytes) -> list:
    """[(lower-case name, unfolded value)] of a header section (RFC 5322 2.2.3)."""
    fields = []
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line.strip())
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name.strip().lower(), [value.strip()]))
    return [(name.decode("ascii", "replace"), b" ".join(parts).decode("utf-8", "replace"))
            for name, parts in fields]


def envelope_bytes(envelope: Envelope) -> bytes:
    """The text that starts a queue file, up to and including the blank line."""
    lines = [FILE_MAGIC,
             "Queue-ID: " + envelope.queue_id,
             "Arrival: %.6f" % envelope.arrival,
             "Sender: <%s>" % envelope.sender,
             "Client-Address: " + envelope.client_address,
             "Client-HELO: " + envelope.client_helo,
             "Auth-User: " + envelope.auth_user,
             "Protocol: " + envelope.protocol]
    lines += ["Recipient: <%s>" % address for address in envelope.recipients]
    lines += ["Message-Size: %s" % _size_field(envelope.size), "", ""]
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def _size_field(size):
    """Message-Size's value: the number, then spaces to SIZE_WIDTH characters, so that
    QueueWriter can fill it in with pwrite() once the message is written."""
    return ("%d" % size).ljust(SIZE_WIDTH)


def _unbracket(value, key):
    if not (value.startswith("<") and value.endswith(">")):
        raise QueueFileError("%s is not in angle brackets" % key)
    return value[1:-1]


def parse_envelope(head: bytes, name: str) -> tuple:
    """(Envelope, offset of the message) from the start of a queue file; QueueFileError."""
    end = head.find(b"\n\n", 0, MAX_ENVELOPE)
    if end < 0:
        raise QueueFileError("no end of envelope in the first %d octets" % MAX_ENVELOPE)
    try:
        lines = head[:end].decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise QueueFileError("envelope is not UTF-8") from None
    if lines[0] != FILE_MAGIC:
        raise QueueFileError("not a queue file (no %r line)" % FILE_MAGIC)
    fields, recipients = {}, []
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not colon:
            raise QueueFileError("envelope line without a colon")
        if key == "recipient":
            recipients.append(check_address_text(_unbracket(value, "Recipient")))
        else:
            fields[key] = value
    try:
        envelope = Envelope(
            queue_id=fields["queue-id"],
            sender=check_address_text(_unbracket(fields["sender"], "Sender"), allow_empty=True),
            recipients=recipients,
            arrival=float(fields["arrival"]),
            size=int(fields["message-size"]),
            client_address=fields.get("client-address", ""),
            client_helo=fields.get("client-helo", ""),
            auth_user=fields.get("auth-user", ""),
            protocol=fields.get("protocol", ""))
    except KeyError as exc:
        raise QueueFileError("envelope has no %s field" % exc.args[0]) from None
    except ValueError as exc:
        raise QueueFileError("bad envelope field: %s" % exc) from None
    if envelope.queue_id != name:
        raise QueueFileError("Queue-ID %r is not the file name" % envelope.queue_id[:80])
    if not recipients:
        raise QueueFileError("envelope has no recipient")
    if envelope.size < 0 or not math.isfinite(envelope.arrival):
        raise QueueFileError("bad Message-Size or Arrival")
    return envelope, end + 2


def parse_records(state: QueueState, tail: bytes):
    """Apply the state records in tail; skip bad ones, note an incomplete last one."""
    lines = tail.split(b"\n")
    state.torn_tail = len(lines[-1])       # b"" when tail ends with a newline
    for line in lines[:-1]:
        try:
            # Decoded here: json.loads() of bytes would first guess their encoding.
            record = json.loads(line.decode("utf-8"))
            state.apply(record)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            state.bad_records += 1


def parse_queue_file(data: bytes, name: str) -> QueueState:
    """Parse a whole queue file; raises QueueFileError when it is not one."""
    envelope, offset = parse_envelope(data, name)
    if offset + envelope.size > len(data):
        raise QueueFileError("message truncated: %d of %d octets"
                             % (len(data) - offset, envelope.size))
    state = QueueState(envelope, offset)
    parse_records(state, data[offset + envelope.size:])
    return state


def record_bytes(*records: dict) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


# --- Files ---

# The store's durable-write helpers serve the queue too: one piece of code for one job.
_write_all = mailbox_store.write_all
_fsync_dir = mailbox_store.fsync_dir


def _read_all(fd, size, offset=0):
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_state(fd, file_size, name):
    """(QueueState, the file's first octets) of an open queue file, reading its envelope
    and its state records; of its message only what the first read of COPY_BLOCK octets
    holds. Raises QueueFileError when it is not a queue file."""
    head = os.pread(fd, min(file_size, COPY_BLOCK), 0)
    if b"\n\n" not in head and len(head) < file_size:
        head = _read_all(fd, min(file_size, MAX_ENVELOPE + 2))
    envelope, offset = parse_envelope(head, name)
    end = offset + envelope.size
    if end > file_size:
        raise QueueFileError("message truncated: %d of %d octets"
                             % (file_size - offset, envelope.size))
    state = QueueState(envelope, offset)
    # A small file is whole in head already: no second read for its records.
    tail = head[end:file_size] if len(head) >= file_size else _read_all(fd, file_size - end, end)
    parse_records(state, tail)
    return state, head


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def _unix_address(folder, name):
    """The address of socket NAME in folder; a long path goes through /proc/self/fd."""
    path = os.path.join(folder, name)
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield path
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield "/proc/self/fd/%d/%s" % (fd, name)
    finally:
        os.close(fd)


_spools_made = set()


def make_spool(spool_dir: str):
    """Create the queue and run folders if missing (once per process and spool)."""
    if spool_dir in _spools_made:
        return
    queue = os.path.join(spool_dir, QUEUE_DIR)
    folders = [spool_dir, queue, os.path.join(spool_dir, RUN_DIR)]
    folders += [os.path.join(queue, name)
                for name in (TMP, INCOMING, OUTBOUND, DEFERRED, QUARANTINE, FREE)]
    for folder in folders:     # makedirs() gives its mode to the last folder only
        os.makedirs(folder, mode=0o700, exist_ok=True)
    _spools_made.add(spool_dir)


# --- Speed: queue files are used again, measured by bench/cpu_bench.py ---
# The plain form: a new file for each message (open() with O_CREAT | O_EXCL in tmp/), and
# an unlink() once it is done. Making a file costs more the more files were deleted in its
# directory's block group in the last minutes: ext4 without a journal passes over each of
# them (ialloc.c, recently_deleted()), and a busy spool deletes one a message. With 10
# smtp-source clients here that was 28% of smtp_in's CPU (perf), 1.1-1.3 ms of system time
# a message; it is 0.6-0.7 ms with files used again, and the rate 15-20% higher. The file of
# a finished message is moved to free/ (Queue.discard(), while about FREE_FILES are there),
# and a writer takes one from there when it can: the queue makes and frees no inodes.
# Taking is a link() to tmp/ID (FileExistsError when tmp/ID exists, as with O_EXCL) and the
# unlink() of the free/ name: of writers that linked the same file, only the one whose
# unlink() succeeds keeps it. A file larger than FREE_KEEP is emptied before it is in free/;
# a smaller one keeps its octets and its disk block, which the writer writes over and then
# cuts to what it wrote (QueueWriter.commit()): emptying it would free the block and the
# writer's fsync allocate one again, 100 us of system time or more a message (cProfile of
# the router). Each process keeps the names of one listing of free/.

_free_names = {}                   # free/ path -> names listed there, not yet tried


def _reused_file(spool_dir, path):
    """(descriptor, size) of a queue file from free/, linked at path (FileExistsError if
    path exists), to be written from its start and cut to what was written; None when
    free/ has none to take (then the caller makes one)."""
    free = os.path.join(spool_dir, QUEUE_DIR, FREE)
    for _ in range(FREE_TRIES):
        names = _free_names.get(free)
        if not names:
            try:
                names = _free_names[free] = os.listdir(free)
            except OSError:
                return None
            if not names:
                return None
        try:
            name = names.pop()         # atomic: threads of a process share the list
        except IndexError:
            continue
        source = os.path.join(free, name)
        try:
            os.link(source, path)
        except FileExistsError:
            raise                      # tmp/ID is taken: the caller picks another id
        except FileNotFoundError:
            continue                   # another writer took it
        except OSError:                # not a file, or not ours (protected_hardlinks)
            _unlink_quietly(source)
            continue
        try:
            os.unlink(source)
        except FileNotFoundError:      # another writer linked it too, and keeps it
            _unlink_quietly(path)
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:                # not ours to write (left by another user): make one
            _unlink_quietly(path)
            return None
        try:
            return fd, os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            _unlink_quietly(path)
            return None
    return None


# --- End of the speed section ---


# --- Enqueue and wake-up ---

def enqueue(spool_dir: str, sender: str, recipients: list, message: bytes, *,
            queue_id: Optional[str] = None, client_address: Optional[str] = None,
            client_helo: Optional[str] = None, auth_user: Optional[str] = None,
            protocol: Optional[str] = None, arrival: Optional[float] = None,
            prepend: str = "") -> str:
    """Write message and envelope durably into queue/incoming/, wake the router, return the id.
    PREPEND: header fields to go on top of the message (QueueWriter.prepend()).

    Raises ValueError, before anything is written, when the message cannot be queued: no
    recipient, an address that is empty (a recipient), not printable, longer than
    MAX_ADDRESS or with white space at its ends, or a malformed queue_id; callers check
    addresses first. Raises SpoolError (an OSError with the cause's errno) when the
    message could not be made durable, leaving nothing behind. A message that arrives in
    blocks goes through QueueWriter instead, the same code.
    """
    while True:
        writer = QueueWriter(spool_dir, sender, recipients, queue_id=queue_id,
                             client_address=client_address, client_helo=client_helo,
                             auth_user=auth_user, protocol=protocol, arrival=arrival)
        try:
            if prepend:
                writer.prepend(prepend)
            writer.write(message)
            return writer.commit()
        except SpoolError as exc:
            # A queue id of our own making already in incoming/: make another one.
            if queue_id is not None or exc.errno != errno.EEXIST:
                raise


class QueueWriter:
    """One queue file written as its message arrives: the constructor starts it, write()
    appends message octets, commit() makes it durable and returns the queue id, abort()
    (or leaving a `with` block without commit) removes it. smtp_in streams each message
    through one; enqueue() is the same for a message already in memory.

    Octets go to tmp/ID in blocks: they wait in memory (by reference, so pass bytes) until
    COPY_BLOCK of them are pending, and the file is created with the first block. Memory
    stays bounded by about two blocks whatever the message size, and a small message is
    written as enqueue() always wrote one: created, one write(), at commit. The envelope
    goes first; when the message outgrows the first block, Message-Size (SIZE_WIDTH
    characters, space-padded) is filled in with pwrite() at commit. Then: fsync the file,
    link it to incoming/ID, wake the router, fsync incoming/. Only then does commit()
    return, so a 250 sent after it means the message is on disk.

    Before commit, blocks() reads back what was written so far (for DKIM, which needs the
    whole message), and prepend() adds header fields to go on top of the message: they
    are written at commit, right after the message, as the file's first state record
    ({"event": "prepend", "text": ...}), so the message itself is never rewritten.

    The constructor raises ValueError as enqueue() does; every method raises SpoolError
    (an OSError with the cause's errno) when the file cannot be written, and then leaves
    nothing behind.
    """

    def __init__(self, spool_dir: str, sender: str, recipients: list, *,
                 queue_id: Optional[str] = None, client_address: Optional[str] = None,
                 client_helo: Optional[str] = None, auth_user: Optional[str] = None,
                 protocol: Optional[str] = None, arrival: Optional[float] = None):
        self.spool_dir = os.fspath(spool_dir)
        recipients = [check_address_text(address) for address in recipients]
        if not recipients:
            raise ValueError("no recipients")
        check_address_text(sender, allow_empty=True)
        if queue_id is not None and not valid_queue_id(queue_id):
            raise ValueError("bad queue id %r" % queue_id)
        self.envelope = Envelope(
            queue_id=queue_id or plumbing.new_queue_id(), sender=sender, recipients=recipients,
            arrival=time.time() if arrival is None else arrival,
            client_address=clean_text(client_address, MAX_INFO),
            client_helo=clean_text(client_helo, MAX_INFO),
            auth_user=clean_text(auth_user, MAX_INFO), protocol=clean_text(protocol, MAX_INFO))
        self.own_id = queue_id is None         # another id may be picked when it is taken
        self.size = 0                  # octets of message written so far
        self.fd = None                 # tmp/ID once created
        self.temporary = None
        self.leftover = 0              # octets the file had when taken from free/
        self.pending = [envelope_bytes(self.envelope)]     # not written yet, envelope first
        self.pending_size = 0          # octets of message in pending
        self.message_offset = 0        # where the message starts in the file, once created
        self.prepended = ""            # header fields for the "prepend" record
        self.closed = False
        self.committed = False
        try:
            make_spool(self.spool_dir)
        except OSError as exc:
            self._fail(exc)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            self.abort()

    def _fail(self, exc):
        self.abort()
        raise SpoolError(exc.errno, "cannot queue the message: %s" % (exc.strerror or exc)) from exc

    def _check_open(self):
        if self.closed:
            raise SpoolError(errno.EBADF, "cannot queue the message: the queue file is closed")

    def write(self, data: bytes):
        """Append octets of the message."""
        self._check_open()
        self.size += len(data)
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= COPY_BLOCK or len(self.pending) >= MAX_PENDING_PIECES:
            try:
                self._flush()
            except OSError as exc:
                self._fail(exc)

    def prepend(self, text: str):
        """Put header fields (CRLF line ends) on top of the message, above any prepended
        before; ValueError when they are not header fields or too long (check_prepend())."""
        self._check_open()
        self.prepended = check_prepend(check_prepend(text) + self.prepended)

    def blocks(self, block_size: int = COPY_BLOCK):
        """Yield the message written so far, in blocks, as it will be queued (without
        what prepend() adds); for use before commit()."""
        self._check_open()
        pending = self.pending[1:] if self.fd is None else list(self.pending)
        on_disk = self.size - self.pending_size
        try:
            for offset in range(0, on_disk, block_size):
                size = min(block_size, on_disk - offset)
                data = os.pread(self.fd, size, self.message_offset + offset)
                if len(data) < size:
                    raise OSError(errno.EIO, "queue file shorter than what was written")
                yield data
        except OSError as exc:
            self._fail(exc)
        for piece in pending:
            yield bytes(piece)

    def _flush(self):
        if self.fd is None:
            self._create()
        pieces, self.pending, self.pending_size = self.pending, [], 0
        while pieces:                  # writev() may take only a part
            written = os.writev(self.fd, pieces)
            while pieces and written >= len(pieces[0]):
                written -= len(pieces.pop(0))
            if written:
                pieces[0] = memoryview(pieces[0])[written:]

    def _create(self):
        """Create tmp/ID; pending[0] is the envelope still (nothing is written before)."""
        while True:
            temporary = os.path.join(self.spool_dir, QUEUE_DIR, TMP, self.queue_id)
            try:
                reused = _reused_file(self.spool_dir, temporary)
                if reused is None:
                    self.fd = os.open(temporary,
                                      os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                else:
                    self.fd, self.leftover = reused
            except FileExistsError:
                if not self.own_id:
                    raise              # another writer's file: not ours to remove
                self.envelope.queue_id = plumbing.new_queue_id()
                self.pending[0] = envelope_bytes(self.envelope)
                continue
            self.temporary = temporary
            self.message_offset = len(self.pending[0])
            return

    def commit(self) -> str:
        """Fill in Message-Size, then the write-fsync-link rule; return the queue id.

        The router is woken before the fsync of incoming/: it reads a whole, fsync'd file,
        and does its work while the directory's entry is made durable (the caller's 250
        still waits for that). Should that fsync fail, the file is removed and commit()
        fails; a router already at work may still deliver it, so the message may come
        twice (the client sends it again), never not at all.
        """
        self._check_open()
        incoming = os.path.join(self.spool_dir, QUEUE_DIR, INCOMING)
        try:
            self.envelope.size = self.size
            if self.prepended:         # the first state record, right after the message
                self.pending.append(record_bytes({"event": "prepend", "text": self.prepended}))
            if self.fd is None:        # the envelope is still in memory: write it whole
                self.pending[0] = envelope_bytes(self.envelope)
                self._flush()
            else:
                self._flush()
                head = envelope_bytes(self.envelope)
                at = len(head) - 2 - SIZE_WIDTH        # Message-Size's value
                if os.pwrite(self.fd, head[at:at + SIZE_WIDTH], at) != SIZE_WIDTH:
                    raise OSError(errno.EIO, "short write of Message-Size")
            if self.leftover:          # a file from free/ may hold more than was written
                end = os.lseek(self.fd, 0, os.SEEK_CUR)
                if end < self.leftover:
                    os.ftruncate(self.fd, end)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            # link(), unlike rename(), never replaces a queued message that has the same id.
            os.link(self.temporary, os.path.join(incoming, self.queue_id))
        except OSError as exc:
            self._fail(exc)
        self.committed = self.closed = True
        _unlink_quietly(self.temporary)
        wake(self.spool_dir, "mta", self.queue_id)
        try:
            _fsync_dir(incoming)
        except BaseException as exc:
            _unlink_quietly(os.path.join(incoming, self.queue_id))
            if isinstance(exc, OSError):
                raise SpoolError(exc.errno, "cannot queue the message: %s"
                                 % (exc.strerror or exc)) from exc
            raise
        return self.queue_id

    def abort(self):
        """Close and remove the file being written; nothing is left behind."""
        self.closed = True
        self.pending, self.pending_size = [], 0
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.temporary is not None and not self.committed:
            _unlink_quietly(self.temporary)


def share_of(name: str, count: int) -> int:
    """Which of count processes sharing a queue folder takes the file name (0 to count-1)."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape")) % count


def wake(spool_dir: str, role: str = "mta", queue_id: Optional[str] = None) -> None:
    """Best effort: ring the doorbell of every running daemon of role (a datagram each);
    of processes that share its folder, only the one queue_id's file falls to, if given."""
    run = os.path.join(os.fspath(spool_dir), RUN_DIR)
    try:
        bells = _doorbells(run, role)
    except OSError:
        return
    sock = _ringer()
    for name, address, share in bells:
        if share is not None and queue_id is not None and \
                share_of(queue_id, share[1]) != share[0]:
            continue                   # the file falls to another process
        try:
            if address is None:        # a path too long for a socket address
                with _unix_address(run, name) as address:
                    sock.sendto(b"!", address)
            else:
                sock.sendto(b"!", address)
        except BlockingIOError:
            pass                       # its queue is full: it has wake-ups waiting already
        except (ConnectionRefusedError, FileNotFoundError):
            _unlink_quietly(os.path.join(run, name))   # its process is gone
        except OSError:
            pass


# wake() runs once per message queued: it lists SPOOL/run/ again only when that folder has
# changed, and rings from one socket kept for the process (sendto() is thread-safe).
DOORBELLS_SETTLE = 1.0             # seconds; a folder changed more recently is listed anew
_doorbells_lock = threading.Lock()
_doorbells_known = {}              # (run folder, role) -> (its mtime_ns, bells); _doorbells_lock
_ringers = []                      # the process's ringing socket, once made; _doorbells_lock


def _doorbells(run, role):
    """[(name, socket address or None when the path is too long for one, share or None)] of
    the doorbells of role in the run folder, from the last listing while the folder's mtime
    is unchanged. share is (number, count) of a bell named ROLE.PID.N.NUMBERofCOUNT.sock."""
    st = os.stat(run)
    with _doorbells_lock:
        known = _doorbells_known.get((run, role))
    if known is not None and known[0] == st.st_mtime_ns:
        return known[1]
    bells = []
    for name in os.listdir(run):
        if name.startswith(role + ".") and name.endswith(".sock"):
            path = os.path.join(run, name)
            bells.append((name, path if len(os.fsencode(path)) <= MAX_UNIX_PATH else None,
                          _bell_share(name)))
    # mtimes are coarse (a clock tick): a socket bound in the tick of the listing would
    # not change it, so only a listing of a folder quiet for a while is kept.
    if time.time() - st.st_mtime > DOORBELLS_SETTLE:
        with _doorbells_lock:
            _doorbells_known[(run, role)] = (st.st_mtime_ns, bells)
    return bells


def _bell_share(name):
    """(number, count) from a doorbell name ending in .NUMBERofCOUNT.sock, else None."""
    tag = name[:-len(".sock")].rsplit(".", 1)[-1]
    number, of, count = tag.partition("of")
    if of and number.isdigit() and count.isdigit() and int(number) < int(count):
        return int(number), int(count)
    return None


def _ringer():
    with _doorbells_lock:
        if not _ringers:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            _ringers.append(sock)
        return _ringers[0]


_socket_serial = itertools.count()


class WakeSocket:
    """A daemon's doorbell: a datagram socket at SPOOL/run/ROLE.PID.N.sock, or with share
    (number, count: a process among count that share a folder) ROLE.PID.N.NUMBERofCOUNT.sock,
    rung only for the files that fall to it."""

    def __init__(self, spool_dir: str, role: str, share: Optional[tuple] = None):
        self.folder = os.path.join(os.fspath(spool_dir), RUN_DIR)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self.name = "%s.%d.%d%s.sock" % (role, os.getpid(), next(_socket_serial),
                                         ".%dof%d" % share if share else "")
        self.path = os.path.join(self.folder, self.name)
        _unlink_quietly(self.path)     # left by a dead process that had our pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with _unix_address(self.folder, self.name) as address:
            self.sock.bind(address)
        self.sock.setblocking(False)

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout seconds for a ring; swallow every ring waiting. True if rung."""
        if not plumbing.wait_readable(self.sock, timeout):
            return False
        while True:
            try:
                self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return True

    def ring(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                with _unix_address(self.folder, self.name) as address:
                    sock.sendto(b"!", address)
            except OSError:
                pass

    def close(self):
        self.sock.close()
        _unlink_quietly(self.path)


# --- Flow control: smtp_in keeps to the router's pace ---
#
# As Postfix's in_flow_delay: the FIFO SPOOL/run/flow holds tokens, one octet each. The
# router puts one for every message it takes from incoming/ while there are fewer than
# FLOW_TOKENS, and tops them up to FLOW_TOKENS when it has nothing to do; smtp_in takes
# one before it accepts a MAIL, and when there is none waits for one, at most its
# in_flow_delay. Mail that comes faster than the router routes it is then slowed to the
# router's pace, FLOW_TOKENS messages ahead at most, instead of piling up in incoming/
# where each message waits longer for its mailbox, and the sessions get a 250 a little
# later rather than a 451 when the disk fills. A FIFO is a counter that needs no lock
# and that any process of the spool's user can open; the kernel keeps its octets while
# one process has it open.

FLOW_FIFO = "flow"                 # in SPOOL/run/
FLOW_TOKENS = 100                  # how far ahead of the router smtp_in may run (Postfix: 100)
FLOW_POLL = 0.1                    # seconds; smtp_in's reader looks again this often
FLOW_RECHECK = 5.0                 # seconds; the router checks this often that its FIFO is
                                   # still the one at SPOOL/run/flow


def _flow_path(spool_dir):
    return os.path.join(os.fspath(spool_dir), RUN_DIR, FLOW_FIFO)


def _is_flow(fd, spool_dir):
    """True when fd is the FIFO now at SPOOL/run/flow (not one removed or replaced since)."""
    try:
        there, ours = os.stat(_flow_path(spool_dir)), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)


def open_flow(spool_dir: str, create: bool = True) -> int:
    """A non-blocking descriptor of SPOOL/run/flow, made if missing when create. Opened for
    reading and writing, so that it never reads as closed and a write never fails for want
    of a reader. Raises OSError (FileNotFoundError when missing and not create; also when
    something other than a FIFO has the name)."""
    path = _flow_path(spool_dir)
    if create:
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            pass
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EEXIST, "not a FIFO", path)
    return fd


def _reopen_flow(fd, spool_dir, create):
    """Point fd at the FIFO now at SPOOL/run/flow when it holds another (one removed or
    replaced since), keeping its number: dup2() swaps the file in one step, so threads
    that read, write or poll fd meanwhile see the old FIFO or the new one, never a closed
    or reused descriptor. Raises OSError as open_flow() does."""
    if _is_flow(fd, spool_dir):
        return
    new = open_flow(spool_dir, create)
    try:
        os.dup2(new, fd, inheritable=False)
    finally:
        os.close(new)


class FlowTokens:
    """The router's side: taken() after each message routed, idle() when it has none."""

    def __init__(self, spool_dir: str):
        self.spool_dir = spool_dir
        self.fd = open_flow(spool_dir)
        self.recheck = time.monotonic() + FLOW_RECHECK

    def count(self) -> int:
        """The tokens waiting in the FIFO."""
        return struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"))[0]

    def taken(self):
        if self.count() < FLOW_TOKENS:
            self._put(1)

    def idle(self):
        if time.monotonic() >= self.recheck:
            # Someone removed run/flow (an operator tidying up): make it anew, or smtp_in
            # and this router would each hold a FIFO the other never sees.
            self.recheck = time.monotonic() + FLOW_RECHECK
            try:
                _reopen_flow(self.fd, self.spool_dir, create=True)
            except OSError as exc:
                log.warning("cannot make %s anew: %s", _flow_path(self.spool_dir), exc)
        self._put(FLOW_TOKENS - self.count())

    def _put(self, count):
        if count > 0:
            try:
                os.write(self.fd, b"." * count)
            except OSError:
                pass                   # full (64 KB): there are tokens enough


class FlowGate:
    """smtp_in's side: wait() takes a token, waiting up to delay seconds for one.

    One thread of the process reads the FIFO for all the sessions waiting, so that a token
    wakes one session, not every one that waits. No wait while no router runs (no router
    doorbell in SPOOL/run/): nothing would put tokens, and the mail waits in incoming/ for
    the router anyway. The router makes the FIFO before it binds its doorbell; smtp_in
    never makes it, so a router without flow control (an older version) is never waited
    for, and smtp_in looks for the FIFO again every FLOW_RECHECK seconds. A FIFO that
    cannot be opened otherwise means no flow control, and a warning.
    """

    def __init__(self, spool_dir: str, delay: float):
        self.spool_dir = os.fspath(spool_dir)
        self.delay = delay
        self.lock = threading.Lock()
        self.given = threading.Condition(self.lock)    # sessions wait on it for a token,
        self.asked = threading.Condition(self.lock)    # the reader for a session to wait
        self.fd = None                 # opened on first use, in the process that uses it
        self.broken = False
        self.look_again = 0.0          # time.monotonic() to look for a missing FIFO again
        self.granted = 0               # tokens read for sessions; lock
        self.wanted = 0                # sessions waiting for a token; lock
        self.reader = None

    def wait(self) -> float:
        """Take a token; return the seconds waited for it (0.0 when there was one)."""
        if self.delay <= 0 or not self._router_running():
            return 0.0
        fd = self.fd if self.fd is not None else self._open()
        if fd is None:
            return 0.0
        try:
            if os.read(fd, 1):
                return 0.0
        except BlockingIOError:
            pass
        with self.lock:
            if self.granted:           # read for a session that had stopped waiting
                self.granted -= 1
                return 0.0
            started = time.monotonic()
            deadline = started + self.delay
            self.wanted += 1
            if self.reader is None:
                self.reader = threading.Thread(target=self._read, name="smtp-flow",
                                               daemon=True)
                self.reader.start()
            self.asked.notify()
            while not self.granted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.given.wait(left)
            if self.granted:
                self.granted -= 1
            else:
                self._reopen()         # in case run/flow was removed or replaced meanwhile
            self.wanted -= 1
        return time.monotonic() - started

    def _router_running(self):
        try:
            return bool(_doorbells(os.path.join(self.spool_dir, RUN_DIR), "mta"))
        except OSError:
            return False

    def _open(self):
        with self.lock:
            if self.fd is None and not self.broken and time.monotonic() >= self.look_again:
                try:
                    self.fd = open_flow(self.spool_dir, create=False)
                except FileNotFoundError:
                    self.look_again = time.monotonic() + FLOW_RECHECK
                except OSError as exc:
                    self.broken = True
                    log.warning("flow control off: cannot open %s: %s",
                                _flow_path(self.spool_dir), exc)
            return self.fd

    def _reopen(self):
        try:
            _reopen_flow(self.fd, self.spool_dir, create=False)
        except FileNotFoundError:
            pass                       # the router has not made it anew yet
        except OSError as exc:
            log.warning("flow control: cannot open %s anew: %s", _flow_path(self.spool_dir),
                        exc)

    def _read(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)    # the same number if the FIFO is replaced
        while True:
            with self.lock:
                while self.wanted <= self.granted:
                    self.asked.wait()
                short = self.wanted - self.granted
            poller.poll(FLOW_POLL * 1000)
            try:
                tokens = len(os.read(self.fd, short))
            except BlockingIOError:
                continue
            with self.lock:
                self.granted += tokens
                self.given.notify(tokens)


# --- Bounces: delivery status notifications (RFC 3464, RFC 6522) ---

def build_dsn(envelope: Envelope, original_headers: bytes, recipients: list, *, action: str,
              hostname: str, to: str, now: float, retry_until: Optional[float] = None,
              message_id: Optional[str] = None, subject: Optional[str] = None) -> bytes:
    """A multipart/report DSN about recipients of the message with envelope (RFC 3464).

    action is "failed" or "delayed" (RFC 3464 2.3.3). The report has a short text for a
    person, a message/delivery-status part and the original header (text/rfc822-headers).
    """
    if action == "failed":
        subject = subject or "Undelivered Mail Returned to Sender"
        intro = ("Your message could not be delivered to one or more recipients.\n"
                 "The mail system gave up on the addresses below; the header of your\n"
                 "message is attached.\n")
    else:
        subject = subject or "Delayed Mail (still being retried)"
        intro = ("Your message has not yet been delivered to the addresses below.\n"
                 "This is a warning only: the mail system keeps trying until %s.\n"
                 "You do not need to send the message again.\n" % rfc5322_date(retry_until or now))
    lines = ["This is the mail system at %s (queue id %s)." % (hostname, envelope.queue_id), "", intro]
    for recipient in recipients:
        via = "" if recipient.original == recipient.address else " (expanded from <%s>)" % recipient.original
        expired = " (delivery time expired)" if recipient.dsn == DSN_EXPIRED else ""
        lines.append("<%s>%s%s: %s" % (recipient.address, via, expired, recipient.reply or recipient.dsn))
    text = "\n".join(lines) + "\n"

    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "Mail Delivery System <MAILER-DAEMON@%s>" % hostname
    report["To"] = to
    report["Subject"] = subject
    report["Date"] = rfc5322_date(now)
    report["Message-ID"] = message_id or email.utils.make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"          # RFC 3834 5
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))

    # RFC 3464 2.2: per-message fields, then one block of per-recipient fields each.
    per_message = Message()
    per_message["Reporting-MTA"] = "dns; " + hostname
    if envelope.client_helo:
        per_message["Received-From-MTA"] = dsn_text("dns; %s (%s)" % (envelope.client_helo,
                                                                      envelope.client_address))
    per_message["Arrival-Date"] = rfc5322_date(envelope.arrival)
    blocks = [per_message]
    for recipient in recipients:
        block = Message()
        if recipient.original != recipient.address:
            block["Original-Recipient"] = dsn_address(recipient.original)
        block["Final-Recipient"] = dsn_address(recipient.address)
        block["Action"] = action
        block["Status"] = normal_status(recipient.dsn or ("4.0.0" if action == "delayed" else "5.0.0"))
        if recipient.remote_mta:
            block["Remote-MTA"] = dsn_text("dns; " + recipient.remote_mta)
        if recipient.reply:
            block["Diagnostic-Code"] = dsn_text("smtp; " + recipient.reply)
        if recipient.last_attempt:
            block["Last-Attempt-Date"] = rfc5322_date(recipient.last_attempt)
        if action == "delayed" and retry_until:
            block["Will-Retry-Until"] = rfc5322_date(retry_until)
        blocks.append(block)
    status = Message()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(blocks)
    report.attach(status)

    headers = original_headers[:MAX_DSN_HEADERS]
    if len(original_headers) > MAX_DSN_HEADERS:
        headers = headers[:headers.rfind(b"\n") + 1]
    headers_text = headers.decode("utf-8", "replace").replace("\r\n", "\n")
    report.attach(MIMEText(headers_text, "rfc822-headers",
                           "us-ascii" if headers_text.isascii() else "utf-8"))
    return report.as_bytes(policy=compat32.clone(linesep="\r\n"))


# --- The queue: claims, state changes, DSNs, filing away ---

class MessageFile:
    """The message inside a claimed queue file, read from the file when asked (in blocks),
    never held whole: len() is its size, blocks() copies it, header() is its header.

    The header fields of a "prepend" record (claim.state.prepend) come first: they are
    part of the message as every reader sees it (counted in len(), yielded first by
    blocks(), the top of header()), while Message-Size stays the octets as received.

    It reads through its claim's descriptor, so it works only while the claim is held;
    start is the message's first octets when they were read already (the claim reads the
    file's first COPY_BLOCK octets with the envelope), not read again.
    """

    def __init__(self, claim, start=b""):
        self.claim = claim
        self.start = start
        self.prefix = claim.state.prepend

    def __len__(self):
        return len(self.prefix) + self.claim.envelope.size

    def _pread(self, size, offset):
        """SIZE octets of the message as received, from OFFSET (the prefix not counted)."""
        if offset + size <= len(self.start) and self.claim.fd is not None:
            return self.start[offset:offset + size]
        fd = self.claim.fd
        if fd is None:
            raise ValueError("%s: the claim is released" % self.claim.queue_id)
        data = os.pread(fd, size, self.claim.state.message_offset + offset)
        if len(data) < size:
            raise OSError(errno.EIO, "queue file %s shorter than its Message-Size"
                          % self.claim.queue_id)
        return data

    def blocks(self, block_size: int = COPY_BLOCK):
        """Yield the message in blocks of at most block_size octets, the prefix first."""
        if self.prefix:
            if self.claim.fd is None:
                raise ValueError("%s: the claim is released" % self.claim.queue_id)
            yield self.prefix
        size = self.claim.envelope.size
        for offset in range(0, size, block_size):
            yield self._pread(min(block_size, size - offset), offset)

    def header(self, limit: int = MAX_HEADER) -> bytes:
        """The message's header section (see header_block()), of at most limit octets read,
        the prefix's fields first."""
        size = min(len(self), limit)
        data = self.prefix[:size]
        while len(data) < size:
            offset = len(data) - len(self.prefix)
            data += self._pread(min(COPY_BLOCK, size - len(data)), offset)
            if b"\n\n" in data or b"\r\n\r\n" in data:
                break
        return header_block(data)

    def read(self) -> bytes:
        """The whole message at once: for tests and small tools, not for the daemons."""
        return b"".join(self.blocks())


class Claim:
    """A queue file this process has locked (flock) for as long as it handles it.

    claim.message is a MessageFile: the message stays in the file and is read in blocks.

    Record results with delivered(), deferred() and failed(); they are thread-safe, so
    smtp_out may work on several domains of one message at once, and each is written to
    the file at once. Leave the `with` block (or call release()) to queue the DSNs and
    move the file where its state says.

    With autocommit off (the router), records wait in memory until commit(): the router
    commits before each delivery after the first, so a crash re-delivers at most the one
    recipient whose record was not written yet, and a message done in one pass is removed
    without a single append.
    """

    def __init__(self, queue, folder, queue_id, fd, state, head=b""):
        self.queue = queue
        self.folder = folder
        self.queue_id = queue_id
        self.fd = fd
        self.state = state
        self.envelope = state.envelope
        self.recipients = state.recipients
        # The file's first octets, read with the envelope: often the whole message.
        self.message = MessageFile(self, head[state.message_offset:
                                              state.message_offset + state.envelope.size])
        self.groups = {}               # claim_outbound(): domain -> [Recipient] due now
        self.autocommit = True
        self.staged = []               # records applied but not written yet; state_lock
        self.state_lock = threading.Lock()     # guards self.state, self.staged, appends

    @property
    def path(self) -> str:
        return self.queue.path(self.folder, self.queue_id)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.release()
        else:
            self.close()               # leave the file where it is; it is looked at again

    def record(self, *records: dict):
        """Apply state records; append them to the file now, or at commit() without autocommit."""
        with self.state_lock:
            for record in records:
                self.state.apply(record)
            self.staged.extend(records)
            if self.autocommit:
                self._write_staged()

    def commit(self):
        """Append the records not written yet, in one write()."""
        with self.state_lock:
            self._write_staged()

    def _write_staged(self):
        if self.staged:
            data, self.staged = record_bytes(*self.staged), []
            _write_all(self.fd, data)

    def log_result(self, recipient, status, reply):
        relay = (recipient.relay or recipient.remote_mta
                 or ("local" if recipient.kind == "local" else "none"))
        original = "" if recipient.original == recipient.address else ", orig_to=<%s>" % recipient.original
        log.info("%s: to=<%s>%s, relay=%s, delay=%.2f, dsn=%s, status=%s (%s)",
                 self.queue_id, recipient.address, original, relay,
                 max(self.queue.clock() - self.envelope.arrival, 0), recipient.dsn or "-",
                 status, reply)

    def delivered(self, recipient: Recipient, reply: str = "250 2.0.0 OK", remote_mta: str = "",
                  relay: str = ""):
        """The recipient has the message (a Maildir file, or a 2xx from remote_mta).

        remote_mta is the answering server's host name, for a DSN's Remote-MTA (RFC 3464
        2.3.5); relay is where it was reached, name[address]:port, for the log. Likewise
        in deferred() and failed().
        """
        reply = clean_text(reply, MAX_REPLY)
        self.record({"event": "delivered", "rcpt": recipient.index, "at": self.queue.clock(),
                     "dsn": reply_status(reply, "2.0.0"), "mta": clean_text(remote_mta, MAX_INFO),
                     "relay": clean_text(relay, MAX_INFO), "reply": reply})
        self.log_result(recipient, "sent" if remote_mta or relay else "delivered", reply)

    def deferred(self, recipient: Recipient, reply: str, dsn: Optional[str] = None,
                 remote_mta: str = "", relay: str = ""):
        """A temporary failure: try again as the queue's retry schedule says, or fail once
        expired."""
        now = self.queue.clock()
        reply = clean_text(reply, MAX_REPLY)
        dsn = normal_status(dsn) if dsn else reply_status(reply, "4.0.0")
        if now - self.envelope.arrival >= self.queue.lifetime:
            # RFC 5321 4.5.4.1: give up; RFC 3463 3.5 X.4.7 says why.
            self.failed(recipient, reply, DSN_EXPIRED, remote_mta, relay)
            return
        self.record({"event": "deferred", "rcpt": recipient.index, "at": now,
                     "next": now + self.queue.retry_delay(recipient.attempts + 1), "dsn": dsn,
                     "mta": clean_text(remote_mta, MAX_INFO), "relay": clean_text(relay, MAX_INFO),
                     "reply": reply})
        self.log_result(recipient, "deferred", reply)

    def failed(self, recipient: Recipient, reply: str, dsn: Optional[str] = None,
               remote_mta: str = "", relay: str = ""):
        """A permanent failure: the sender gets a DSN when the claim is released."""
        reply = clean_text(reply, MAX_REPLY)
        dsn = normal_status(dsn) if dsn else reply_status(reply, "5.0.0")
        self.record({"event": "failed", "rcpt": recipient.index, "at": self.queue.clock(),
                     "dsn": dsn, "mta": clean_text(remote_mta, MAX_INFO),
                     "relay": clean_text(relay, MAX_INFO), "reply": reply})
        self.log_result(recipient, "bounced", reply)

    def release(self):
        """Queue DSNs for new failures and delays, move or remove the file, unlock it."""
        if self.fd is None:
            return
        try:
            self.queue.notify(self)
            self.queue.file_away(self)
        finally:
            self.close()

    def close(self):
        """Unlock without filing away (the file stays in its folder)."""
        if self.fd is not None:
            os.close(self.fd)          # drops the flock
            self.fd = None


class Queue:
    """The spool's queue, as the router, smtp_out and the admin CLI see it.

    clock is the time source for every decision (due, expired, delay notice); tests pass
    a fake one to run the five-day schedule in a second. postmaster receives double
    bounces ("postmaster" alone is routed to the first local domain's postmaster).
    retry_schedule is the waits between tries, in seconds or as the retry_schedule
    setting's text ("5m,10m,20m,40m,1h"; the last repeats); ValueError when it is bad.
    """

    def __init__(self, spool_dir: str, *, hostname: Optional[str] = None,
                 lifetime: float = QUEUE_LIFETIME, delay_warning: float = DELAY_WARNING,
                 postmaster: str = "postmaster", clock: Callable[[], float] = time.time,
                 retry_schedule=RETRY_SCHEDULE):
        self.spool_dir = os.fspath(spool_dir)
        self.hostname = hostname or socket.gethostname()
        self.lifetime = lifetime
        self.delay_warning = delay_warning
        if isinstance(retry_schedule, str):
            retry_schedule = parse_retry_schedule(retry_schedule)
        if not retry_schedule or not all(step > 0 for step in retry_schedule):
            raise ValueError("retry_schedule: give one or more waits longer than 0 s")
        self.retry_schedule = tuple(float(step) for step in retry_schedule)
        self.postmaster = postmaster
        self.clock = clock
        self._free_lock = threading.Lock()     # guards the two counts discard() keeps:
        self._freed = 0                        # files it put in free/ or unlinked
        self._free_count = None                # files in free/ as last counted, plus since

    def path(self, folder: str, name: str = "") -> str:
        return os.path.join(self.spool_dir, QUEUE_DIR, folder, name)

    def retry_delay(self, attempts: int) -> float:
        """Seconds to wait after the attempts-th failed attempt, by this queue's schedule."""
        return retry_delay(attempts, self.retry_schedule)

    def create(self):
        make_spool(self.spool_dir)

    def ids(self, folder: str) -> list:
        """Names in a queue folder, oldest queue id first (ids sort by arrival time)."""
        try:
            return sorted(os.listdir(self.path(folder)))
        except FileNotFoundError:
            return []

    def enqueue(self, sender: str, recipients: list, message: bytes, **info) -> str:
        """enqueue() into this spool, with the arrival time from this queue's clock; raises
        ValueError and SpoolError as enqueue() does."""
        info.setdefault("arrival", self.clock())
        return enqueue(self.spool_dir, sender, recipients, message, **info)

    # -- claiming --

    def _open_locked(self, folder, name):
        """(fd, stat) of queue/FOLDER/NAME locked by us; None if gone. Raises QueueBusy,
        QueueFileError (not a regular file)."""
        path = self.path(folder, name)
        try:
            # O_NONBLOCK: a FIFO dropped into the queue must not hang us on open or read.
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise QueueFileError("cannot open: %s" % exc.strerror) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueBusy(name) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise QueueFileError("not a regular file")
            # The holder before us may have moved or removed the file: it is not ours then.
            try:
                now_at_path = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now_at_path = None
            if (st.st_nlink == 0 or now_at_path is None
                    or (now_at_path.st_ino, now_at_path.st_dev) != (st.st_ino, st.st_dev)):
                os.close(fd)
                return None
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def claim(self, folder: str, queue_id: str) -> Optional[Claim]:
        """Lock and read queue/FOLDER/QUEUE_ID. None when it is gone, or was not a queue
        file (then it is quarantined). Raises QueueBusy when someone else holds it."""
        if not valid_queue_id(queue_id):
            self.quarantine(folder, queue_id, "not a queue id")
            return None
        try:
            opened = self._open_locked(folder, queue_id)
            if opened is None:
                return None
            fd, st = opened
        except QueueFileError as exc:
            self.quarantine(folder, queue_id, str(exc))
            return None
        try:
            state, head = _read_state(fd, st.st_size, queue_id)
            if state.torn_tail:
                # An append cut short (a crash mid-write): drop it before appending more.
                log.warning("%s: cut an incomplete state record of %d octets", queue_id, state.torn_tail)
                os.ftruncate(fd, st.st_size - state.torn_tail)
            if state.bad_records:
                log.warning("%s: skipped %d unreadable state records", queue_id, state.bad_records)
        except QueueFileError as exc:
            self.quarantine(folder, queue_id, str(exc))
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return Claim(self, folder, queue_id, fd, state, head)

    def claim_outbound(self, queue_id: str) -> Optional[Claim]:
        """Claim outbound/QUEUE_ID for delivery; claim.groups maps each destination domain
        to its remote recipients due now. None when gone; raises QueueBusy when taken."""
        claim = self.claim(OUTBOUND, queue_id)
        if claim is None:
            return None
        now = self.clock()
        for recipient in claim.recipients:
            if recipient.kind == "remote" and recipient.due(now):
                claim.groups.setdefault(recipient.domain, []).append(recipient)
        return claim

    def quarantine(self, folder: str, name: str, reason: str):
        """Move a bad file aside to queue/quarantine/, with a log line."""
        source = self.path(folder, name)
        target = self.path(QUARANTINE, name)
        if os.path.lexists(target):
            target = "%s.%s" % (target, plumbing.new_queue_id())
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s/%r: cannot quarantine: %s", folder, name, exc)
            return
        shown = name if valid_queue_id(name) else repr(name)   # a person's file name, quoted
        log.warning("%s: status=quarantined (%s; moved from %s/ to %s/%s)", shown, reason,
                    folder, QUARANTINE, os.path.basename(target))

    # -- after handling: DSNs and filing away --

    def notify(self, claim: Claim):
        """Queue one DSN for the newly failed recipients and one for newly delayed ones."""
        now = self.clock()
        failed = [r for r in claim.recipients if r.status == "failed" and not r.notified]
        delayed = []
        if self.delay_warning and now - claim.envelope.arrival >= self.delay_warning:
            delayed = [r for r in claim.recipients if r.status == "deferred" and not r.warned]
        for recipients, action in ((failed, "failed"), (delayed, "delayed")):
            if not recipients:
                continue
            claim.commit()             # what happened so far is on disk before the DSN is
            try:
                dsn_id = self.send_dsn(claim, recipients, action)
            except SpoolError as exc:
                log.error("%s: cannot queue the %s notification: %s", claim.queue_id, action, exc)
                continue
            claim.record(*({"event": "notified", "rcpt": r.index, "action": action,
                            "dsn_id": dsn_id or ""} for r in recipients))

    def send_dsn(self, claim: Claim, recipients: list, action: str) -> Optional[str]:
        """Build and enqueue a DSN about recipients of claim; return its queue id, or None
        when it must not be sent. A DSN has the null reverse-path (RFC 5321 3.6.3) and is
        never sent to one (4.5.5): a failed bounce goes to the postmaster (a double bounce),
        and a failure of mail to the postmaster is dropped with a log line."""
        envelope = claim.envelope
        subject = None
        if envelope.sender:
            to = envelope.sender
        elif action == "delayed":
            return None                # no delay notices about a bounce
        elif any(r.original.partition("@")[0].lower() == "postmaster" for r in recipients):
            log.warning("%s: from=<>, to=<%s>, status=dropped (undeliverable double bounce)",
                        envelope.queue_id, recipients[0].original)
            return None
        else:
            to = self.postmaster
            subject = "Postmaster Copy: Undelivered Mail"
        dsn_id = plumbing.new_queue_id()
        header_to = to if "@" in to else "%s@%s" % (to, self.hostname)
        original_headers = claim.message.header(MAX_DSN_HEADERS + 1)
        message = build_dsn(envelope, original_headers, recipients, action=action,
                            hostname=self.hostname, to=header_to, now=self.clock(),
                            retry_until=envelope.arrival + self.lifetime,
                            message_id="<%s@%s>" % (dsn_id, self.hostname), subject=subject)
        self.enqueue("", [to], message, queue_id=dsn_id, protocol="local")
        kind = {"failed": "non-delivery", "delayed": "delay"}[action]
        log.info("%s: %s %s notification: %s", envelope.queue_id,
                 "sender" if envelope.sender else "postmaster", kind, dsn_id)
        return dsn_id

    def discard(self, claim: Claim):
        """Remove the claimed file from the queue: into free/, for a writer to use again
        (emptied when larger than FREE_KEEP; see _reused_file), or unlinked when free/ holds
        about FREE_FILES already or the file has another name too."""
        with self._free_lock:
            self._freed += 1
            if self._free_count is None or self._freed % FREE_RECOUNT == 0:
                try:
                    self._free_count = len(os.listdir(self.path(FREE)))
                except OSError:
                    self._free_count = FREE_FILES
            room = self._free_count < FREE_FILES
            self._free_count += room
        st = os.fstat(claim.fd) if room else None
        if st is None or st.st_nlink != 1:
            os.unlink(claim.path)
            return
        free = os.path.join(self.path(FREE), claim.queue_id)
        if st.st_size <= FREE_KEEP:
            try:                       # as it is: a writer writes over it (_reused_file)
                os.rename(claim.path, free)
            except OSError:            # free/ is missing (a spool made by an older version)
                os.unlink(claim.path)
            return
        # Emptied under a name of its own in tmp/, then put where writers take files:
        # emptied in free/, it could be a writer's file already. A crash in between leaves
        # a tmp/ file, which the router's sweep removes.
        private = self.path(TMP, claim.queue_id)
        try:
            os.rename(claim.path, private)
        except OSError:
            os.unlink(claim.path)
            return
        try:
            os.ftruncate(claim.fd, 0)
            os.rename(private, free)
        except OSError:                # free/ is missing (a spool made by an older version)
            _unlink_quietly(private)

    def file_away(self, claim: Claim):
        """Remove a finished file, else move it to the folder whose work it holds now."""
        now = self.clock()
        live = [r for r in claim.recipients if not r.done]
        if not live and not claim.state.unrouted:
            self.discard(claim)        # records still staged go with it
            log.info("%s: removed", claim.queue_id)
            return
        claim.commit()
        if claim.state.unrouted or any(r.kind == "local" and r.due(now) for r in live):
            target = INCOMING
        elif any(r.kind == "remote" and r.due(now) for r in live):
            target = OUTBOUND
        else:
            target = DEFERRED
            waiting = [r.next_attempt for r in live if r.status == "deferred"]
            when = min(waiting) if waiting else now + NOTIFY_RETRY
            if any(r.status == "failed" for r in live):
                when = min(when, now + NOTIFY_RETRY)     # a DSN still to be queued
            os.utime(claim.fd, (when, when))
        if target == claim.folder:
            return                     # e.g. smtp_out left some due groups for later
        os.rename(claim.path, self.path(target, claim.queue_id))
        claim.folder = target
        if target == OUTBOUND:
            wake(self.spool_dir, "smtp_out", claim.queue_id)
        elif target == INCOMING:
            wake(self.spool_dir, "mta", claim.queue_id)

    # -- the deferred folder --

    def _move_locked(self, folder, name, target, record=None):
        """Move queue/FOLDER/NAME to TARGET under its lock, first appending record."""
        try:
            opened = self._open_locked(folder, name)
        except QueueBusy:
            return False
        except QueueFileError as exc:
            self.quarantine(folder, name, str(exc))
            return False
        if opened is None:
            return False
        fd, _ = opened
        try:
            if record is not None:
                _write_all(fd, record_bytes(record))
            os.rename(self.path(folder, name), self.path(target, name))
        finally:
            os.close(fd)
        return True

    def requeue_due(self) -> int:
        """Move deferred messages whose next attempt has come to incoming/ (for the router)."""
        now = self.clock()
        moved = 0
        try:
            entries = list(os.scandir(self.path(DEFERRED)))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not valid_queue_id(entry.name):
                self.quarantine(DEFERRED, entry.name, "not a queue id")
                continue
            try:
                due = entry.stat(follow_symlinks=False).st_mtime <= now
            except FileNotFoundError:
                continue
            if due and self._move_locked(DEFERRED, entry.name, INCOMING):
                moved += 1
        return moved

    def flush(self) -> int:
        """Make every deferred recipient due now and wake the router and smtp_out."""
        record = {"event": "flush", "at": self.clock()}
        moved = sum(self._move_locked(DEFERRED, name, INCOMING, record)
                    for name in self.ids(DEFERRED) if valid_queue_id(name))
        wake(self.spool_dir, "mta")
        wake(self.spool_dir, "smtp_out")
        return moved

    def clean_tmp(self) -> int:
        """Remove tmp/ files left by writers that died (not written for TMP_DEBRIS_AGE);
        log each and return how many went."""
        now = time.time()
        try:
            entries = list(os.scandir(self.path(TMP)))
        except FileNotFoundError:
            return 0
        removed = 0
        for entry in entries:
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if age <= TMP_DEBRIS_AGE:
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            removed += 1
            name = clean_text(entry.name, MAX_INFO)
            log.info("%s: file=%s/%s/%s, age=%dh, status=removed (stale tmp file)",
                     name, QUEUE_DIR, TMP, name, age // 3600)
        return removed

    # -- the admin's view --

    def delete(self, queue_id: str) -> bool:
        """Remove a message from the queue (admin), waiting a little if it is busy.

        Returns False when there is no such message; raises QueueBusy when it stays busy.
        """
        if not valid_queue_id(queue_id):
            return False
        deadline = time.monotonic() + DELETE_WAIT
        while True:
            busy = False
            for folder in QUEUE_FOLDERS:
                try:
                    opened = self._open_locked(folder, queue_id)
                except QueueBusy:
                    busy = True
                    continue
                except QueueFileError:
                    continue
                if opened is None:
                    continue
                try:
                    os.unlink(self.path(folder, queue_id))
                finally:
                    os.close(opened[0])
                log.info("%s: removed (deleted by the administrator)", queue_id)
                return True
            if not busy:
                return False
            if time.monotonic() >= deadline:
                raise QueueBusy(queue_id)
            time.sleep(0.05)

    def entries(self) -> Iterator[tuple]:
        """(folder, name, file size, QueueState or None if unreadable) of each queue file,
        one at a time as it is read (a large queue is never held whole), without locking."""
        for folder in QUEUE_FOLDERS:
            yield from self.read_entries(folder, self.ids(folder))

    def read_entries(self, folder: str, names: list) -> Iterator[tuple]:
        """entries() of the files NAMES in FOLDER; a name no longer there is left out."""
        try:
            folder_fd = os.open(self.path(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            return
        try:
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                                 dir_fd=folder_fd)
                except OSError:
                    continue
                size = 0
                try:
                    size = os.fstat(fd).st_size
                    state, _ = _read_state(fd, size, name)
                except (OSError, QueueFileError):
                    state = None
                finally:
                    os.close(fd)
                yield folder, name, size, state
        finally:
            os.close(folder_fd)

    def listing(self) -> list:
        """[(folder, name, file size, QueueState or None if unreadable)], without locking."""
        return list(self.entries())

    def quarantined(self) -> list:
        return self.ids(QUARANTINE)


# --- Speed: the idle router does not stat every deferred file, measured by bench/queue_bench.py ---
# The plain form is Queue.requeue_due(): every SCAN_INTERVAL, stat each file of deferred/
# and move those due (50,000 deferred messages: 1.2 CPU-s a minute, idle). The schedule
# remembers each file's next attempt (its mtime) from one stat, in a heap. A file in
# deferred/ is not changed in place (it is moved in with its mtime set, and moved out);
# so the folder is listed again only when its mtime changed (or changed within
# RECENT_CHANGE seconds: a second change in the same timestamp tick shows no difference),
# and only names not seen before are stat()ed. A file the router claims from incoming/ is
# forgotten: when it comes back to deferred/, it is a new name to the schedule. A due entry
# is stat()ed again before it moves, so an entry that is early costs one stat; every
# RESCAN_INTERVAL seconds everything is stat()ed anyway (what the plain form does each
# time), so nothing the schedule missed waits longer than that. tests/test_mta.py checks
# that it moves what the plain form moves.

class DeferredSchedule:
    """When each file of queue/deferred/ is due, for Router.periodic(); thread-safe."""

    def __init__(self, queue: Queue):
        self.queue = queue
        self.lock = threading.Lock()
        self.due = {}                  # name -> next attempt (the mtime seen); lock
        self.heap = []                 # (next attempt, name), stale ones skipped; lock
        self.folder_seen = None        # (mtime_ns, inode) of deferred/ when last listed
        self.next_rescan = 0.0         # time.monotonic() of the next stat of every file

    def forget(self, name: str):
        with self.lock:
            self.due.pop(name, None)

    def _add(self, name, when):
        with self.lock:
            self.due[name] = when
            heapq.heappush(self.heap, (when, name))

    def _look(self, name, entry=None):
        """stat one deferred file into the schedule; False when it is gone."""
        if not valid_queue_id(name):
            self.queue.quarantine(DEFERRED, name, "not a queue id")
            return False
        try:
            st = (entry.stat(follow_symlinks=False) if entry is not None
                  else os.stat(self.queue.path(DEFERRED, name), follow_symlinks=False))
        except FileNotFoundError:
            self.forget(name)
            return False
        self._add(name, st.st_mtime)
        return True

    def _refresh(self):
        """List deferred/ when it changed: stat new names, drop names gone."""
        folder = self.queue.path(DEFERRED)
        rescan = time.monotonic() >= self.next_rescan
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            return
        seen = (st.st_mtime_ns, st.st_ino)
        if not rescan and seen == self.folder_seen:
            return
        recent = time.time() - st.st_mtime < RECENT_CHANGE
        self.folder_seen = None if recent else seen
        with os.scandir(folder) as listing:
            entries = list(listing)
        names = {entry.name for entry in entries}
        with self.lock:
            for name in [n for n in self.due if n not in names]:
                del self.due[name]
            if rescan:
                self.due.clear()
                self.heap = []
            known = set(self.due)
        for entry in entries:
            if entry.name not in known:
                self._look(entry.name, entry)
        with self.lock:
            if len(self.heap) > 2 * len(self.due) + 64:       # mostly stale entries
                self.heap = [(when, name) for name, when in self.due.items()]
                heapq.heapify(self.heap)
        if rescan:
            self.next_rescan = time.monotonic() + RESCAN_INTERVAL

    def requeue_due(self) -> int:
        """Move the deferred messages whose next attempt has come to incoming/."""
        self._refresh()
        now = self.queue.clock()
        moved = 0
        while True:
            with self.lock:
                if not self.heap or self.heap[0][0] > now:
                    break
                when, name = heapq.heappop(self.heap)
                if self.due.get(name) != when:
                    continue                   # stale: moved, forgotten or seen again
                del self.due[name]
            try:
                st = os.stat(self.queue.path(DEFERRED, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_mtime > now:
                self._add(name, st.st_mtime)   # its time changed: wait for it
            elif self.queue._move_locked(DEFERRED, name, INCOMING):
                moved += 1
            elif os.path.exists(self.queue.path(DEFERRED, name)):
                self._add(name, now + SCAN_INTERVAL)     # busy: look again next time
        return moved


# --- The router ---

class Router:
    """Routes queue/incoming/: aliases, local delivery, the outbound queue, bounces."""

    def __init__(self, queue: Queue, store, *, hop_limit: int = HOP_LIMIT,
                 relay_domains: Iterable[str] = ()):
        self.queue = queue
        self.store = store
        self.hop_limit = hop_limit
        self.started = queue.clock()   # mail that came before may have been cut short
        self.relay_domains = relay_domain_set(relay_domains)
        self.next_sweep = 0.0          # time.monotonic() of the next sweep_tmp()
        self.sweeper = None            # the thread of the last sweep_tmp()
        self.schedule = DeferredSchedule(queue)

    def handle(self, queue_id: str):
        """Route one incoming message (the QueueRunner's handler)."""
        claim = self.queue.claim(INCOMING, queue_id)
        if claim is None:
            return
        self.schedule.forget(queue_id)         # its next stay in deferred/ is a new one
        with claim, self.store.snapshot():     # one view of users and aliases per message
            self.route(claim)

    def periodic(self):
        """The slow scan's extra work: due retries back to incoming/ (what
        Queue.requeue_due() does, from the schedule), and every TMP_SWEEP_INTERVAL the
        tmp/ debris of the queue and of every Maildir."""
        self.schedule.requeue_due()
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + TMP_SWEEP_INTERVAL
            # On a thread of its own: listing every Maildir of a large spool takes a while
            # (0.1 s for 10,000 with a warm cache), and the runner that calls periodic()
            # must go on handing out new mail meanwhile.
            self.sweeper = threading.Thread(target=self.sweep_tmp, name="mta-tmp-sweep",
                                            daemon=True)
            self.sweeper.start()

    def sweep_tmp(self):
        """Remove what writers that died left in tmp/ folders: queue/tmp/ files older than
        TMP_DEBRIS_AGE, Maildir tmp/ files older than mailbox_store.MAILDIR_TMP_AGE."""
        try:
            self.queue.clean_tmp()
            self.store.remove_stale_tmp()
        except Exception:
            log.exception("tmp/ sweep failed")

    def route(self, claim: Claim):
        claim.autocommit = False
        envelope = claim.envelope
        if claim.state.unrouted:
            if len(claim.state.unrouted) == len(envelope.recipients):
                log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", envelope.queue_id,
                         envelope.sender, envelope.size, len(envelope.recipients))
            self.expand_recipients(claim)
        now = self.queue.clock()
        due = [r for r in claim.recipients if r.kind == "local" and r.due(now)]
        for number, recipient in enumerate(due):
            if number:
                claim.commit()         # the last delivery's record lands before the next one
            self.deliver(claim, recipient)

    def expand_recipients(self, claim: Claim):
        """Record one route record per envelope recipient not routed yet."""
        fields = header_fields(claim.message.header())
        hops = sum(1 for name, _ in fields if name == "received")
        delivered_to = {value.strip(" <>").lower() for name, value in fields if name == "delivered-to"}
        seen = {(r.kind, r.address.lower()) for r in claim.recipients if r.kind != "error"}
        records, rcpt = [], len(claim.recipients)
        for origin in claim.state.unrouted:
            original = claim.envelope.recipients[origin]
            routes = []
            for kind, address, reply in self.resolve(original, hops, delivered_to):
                if kind != "error" and (kind, address.lower()) in seen:
                    continue           # two RCPTs, or aliases, that reach the same mailbox
                seen.add((kind, address.lower()))
                route = {"kind": kind, "address": address}
                if reply:
                    route["reply"] = reply
                routes.append(route)
            records.append({"event": "route", "from": origin, "rcpt": rcpt,
                            "at": self.queue.clock(), "to": routes})
            rcpt += len(routes)
        first_new = len(claim.recipients)
        claim.record(*records)         # written before the second delivery, if it comes to one
        for recipient in claim.recipients[first_new:]:
            if recipient.kind == "error":
                claim.log_result(recipient, "bounced", recipient.reply)
            elif recipient.kind == "remote":
                log.info("%s: to=<%s>, relay=smtp_out, status=queued (remote delivery)",
                         claim.queue_id, recipient.address)

    def resolve(self, address: str, hops: int, delivered_to: set) -> list:
        """[(kind, final address, error reply or "")] for one envelope recipient."""
        if hops > self.hop_limit:
            # RFC 5321 6.3: counting Received: fields catches loops between systems.
            return [("error", address, R554_TOO_MANY_HOPS % hops)]
        if self.relays(address):
            # RFC 5321 5.1: a backup MX keeps the mail only until a better MX takes it;
            # even a store that knows the domain's users is not where it is delivered.
            return [("remote", address, "")]
        try:
            finals = self.store.expand(address)
        except mailbox_store.AddressError:
            return [("error", address, R553_BAD_ADDRESS)]
        except mailbox_store.UnknownUser:
            return [("error", address, R550_USER_UNKNOWN)]
        except mailbox_store.AliasTooBig:
            return [("error", address, R554_ALIAS_TOO_BIG)]
        except mailbox_store.AliasLoop:
            return [("error", address, R554_ALIAS_LOOP)]
        routes = []
        for final in finals:
            if final.lower() in delivered_to or address.lower() in delivered_to:
                routes.append(("error", final, R554_DELIVERED_TO_LOOP))
            elif self.store.is_local_domain(final.rpartition("@")[2]) and not self.relays(final):
                routes.append(("local", final, ""))
            else:
                routes.append(("remote", final, ""))
        return routes

    def relays(self, address: str) -> bool:
        """True when address is in a relay_domain: mail this host is a backup MX for."""
        return address.rpartition("@")[2].lower().rstrip(".") in self.relay_domains

    def deliver(self, claim: Claim, recipient: Recipient):
        """Maildir delivery through mailbox_store, then the recipient's state record.

        The Maildir file is named after this host, the queue id and the recipient (see
        delivery_id()), the same name at every attempt: an attempt that finds it there
        (the last one's record was lost with a crash) records the recipient as delivered
        and delivers nothing. A reader may have moved it to cur/ meanwhile, so cur/ is
        looked at too when an earlier attempt may have got that far: the message was tried
        before, or came before this router started (a router that died may have had it).
        """
        envelope = claim.envelope
        earlier = recipient.attempts > 0 or envelope.arrival <= self.started
        try:
            # Copied from the queue file in blocks: the message is never whole in memory.
            self.store.deliver(recipient.address, claim.message.blocks(), envelope.sender,
                               delivery_id(claim.queue_id, recipient.address), envelope.arrival,
                               look_in_cur=earlier)
        except mailbox_store.AlreadyDelivered:
            claim.delivered(recipient, R250_ALREADY_DELIVERED)
        except mailbox_store.UnknownUser:
            claim.failed(recipient, R550_USER_UNKNOWN)     # removed since it was routed
        except mailbox_store.AddressError:
            claim.failed(recipient, R553_BAD_ADDRESS)
        except OSError as exc:
            claim.deferred(recipient, local_error_reply(exc))
        else:
            claim.delivered(recipient, R250_DELIVERED)


def delivery_id(queue_id: str, address: str) -> str:
    """The name of one local delivery in the Maildir (mailbox_store.maildir_deliver): the
    queue id, unique on this host (the Maildir name adds the host's name), and a digest of
    the recipient, short enough for a POP3 UIDL (RFC 1939 7: at most 70 characters)."""
    digest = hashlib.sha256(address.lower().encode("utf-8", "surrogateescape")).hexdigest()
    return "%sR%s" % (queue_id, digest[:RECIPIENT_DIGEST])


def relay_domain_set(domains: Iterable[str]) -> frozenset:
    """The relay_domain setting as a set of lower-case names without a trailing dot."""
    return frozenset(d.strip().lower().rstrip(".") for d in domains if d.strip())


def local_error_reply(exc: OSError) -> str:
    """The temporary reply recorded for a Maildir delivery that hit an OS error."""
    if exc.errno == errno.ENOSPC:
        return R452_SYSTEM_FULL
    if exc.errno == errno.EDQUOT:
        return R452_MAILBOX_FULL
    return R451_LOCAL_ERROR % clean_text(exc.strerror or exc, 200)


# --- The daemon loop, shared with smtp_out ---

class QueueRunner:
    """Hands each file of one queue folder to handle(queue_id) on a few worker threads.

    The role's doorbell wakes it within milliseconds; every scan_interval seconds it lists
    the folder anyway and calls on_scan. A name being handled here is never handed out
    twice; when handle() raises QueueBusy (another process has it) the runner looks again
    after BUSY_RETRY, after any other exception (logged) after ERROR_RETRY. serve_forever()
    and stop(grace) fit plumbing.serve_until_signalled().

    Several processes that run the folder share it: share, set by plumbing.Master in each
    worker process, is (this one's number, how many). A process takes the names whose hash
    falls to its number, and another's name only once that has waited STEAL_AFTER seconds
    (its process is busy, or gone), or STEAL_IDLE seconds when a worker of this one is
    free (as many as are free, oldest first). Without the shares all of them would race to
    claim each new file, and all but one would open it, fail to lock it and hold it for
    BUSY_RETRY, for nothing. The doorbell carries the share in its name, and wake() given a
    queue id rings only the process the file falls to; the others see the file at their
    next listing.
    """

    def __init__(self, queue: Queue, folder: str, role: str, handle: Callable[[str], None], *,
                 workers: int = 2, scan_interval: float = SCAN_INTERVAL,
                 on_scan: Optional[Callable[[], None]] = None):
        self.queue = queue
        self.flow = None               # the router's FlowTokens (serve()): a token a file
        self.folder = folder
        self.handle = handle
        self.scan_interval = scan_interval
        self.on_scan = on_scan
        self.role = role
        self.doorbell = None           # bound by serve_forever(), which then lists the folder
        self.work = SimpleQueue()
        self.pending_lock = threading.Lock()
        self.pending = set()           # names queued or being handled; pending_lock
        self.held = {}                 # name -> monotonic time to look again; pending_lock
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.serving = False
        self.share = None              # (number, count) of the processes running folder
        self.others = {}               # name of another share -> monotonic time first listed
        self.threads = [threading.Thread(target=self._work, name="%s-worker-%d" % (role, n), daemon=True)
                        for n in range(max(1, workers))]

    def serve_forever(self):
        self.serving = True
        self.queue.create()
        shared = self.share is not None and self.share[1] > 1
        self.doorbell = WakeSocket(self.queue.spool_dir, self.role,
                                   self.share if shared else None)
        log.info("watching %s (doorbell %s)", self.queue.path(self.folder), self.doorbell.path)
        for thread in self.threads:
            thread.start()
        next_scan = 0.0
        # New mail first: the first periodic scan (on_scan) may take a while on a large queue.
        self._dispatch(time.monotonic())
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_scan:
                    next_scan = now + self.scan_interval
                    if self.on_scan is not None:
                        try:
                            self.on_scan()
                        except Exception:
                            log.exception("periodic scan failed")
                wait = self._dispatch(now)
                if self.flow is not None and self.idle():
                    self.flow.idle()
                self.doorbell.wait(min(next_scan - now, wait))
                if self.backlogged():
                    # Each listing is a pass over the whole folder, and every worker has
                    # its next file waiting: let them catch up before listing again.
                    self.stopping.wait(LIST_PAUSE)
        finally:
            for _ in self.threads:
                self.work.put(None)
            for thread in self.threads:
                thread.join()
            self.doorbell.close()
            self.stopped.set()

    def backlogged(self) -> bool:
        with self.pending_lock:
            return len(self.pending) >= 2 * len(self.threads)

    def idle(self) -> bool:
        with self.pending_lock:
            return not self.pending

    def _dispatch(self, now):
        """Queue every name of this process's not pending or held; return seconds until a
        hold runs out or another share's name may be taken."""
        try:
            names, look_again = self._ours(self.queue.ids(self.folder), now)
        except OSError as exc:
            log.error("cannot list %s/: %s", self.folder, exc)
            return self.scan_interval
        with self.pending_lock:
            for name, until in list(self.held.items()):
                if until <= now:
                    del self.held[name]
            fresh = [n for n in names if n not in self.pending and n not in self.held]
            self.pending.update(fresh)
            wait = min(self.held.values(), default=now + self.scan_interval) - now
        wait = min(wait, look_again - now)
        for name in fresh:
            self.work.put(name)
        return max(wait, 0.001)

    def _ours(self, names, now):
        """(the names this process takes, when to look again at the others'): all of them,
        or with a share, those that hash to its number, those of other shares listed
        STEAL_AFTER seconds ago or more, and, while workers are free, as many others listed
        STEAL_IDLE seconds ago or more."""
        if self.share is None or self.share[1] < 2:
            return names, math.inf
        number, count = self.share
        mine = [share_of(name, count) == number for name in names]
        with self.pending_lock:        # workers free once this process's new names are queued
            free = len(self.threads) - len(self.pending) - sum(
                1 for name, own in zip(names, mine)
                if own and name not in self.pending and name not in self.held)
        ours, others = [], {}
        for name, own in zip(names, mine):     # oldest first
            if own:
                ours.append(name)
                continue
            since = self.others.get(name, now)
            waited = now - since
            if waited >= STEAL_AFTER or (free > 0 and waited >= STEAL_IDLE):
                ours.append(name)
                free -= waited < STEAL_AFTER
            else:
                others[name] = since
        self.others = others           # names gone from the folder are forgotten
        if not others:
            return ours, math.inf
        return ours, min(others.values()) + (min(STEAL_IDLE, STEAL_AFTER) if free > 0
                                             else STEAL_AFTER)

    def _work(self):
        while True:
            name = self.work.get()
            if name is None:
                return
            hold = 0.0
            try:
                if not self.stopping.is_set():
                    self.handle(name)
            except QueueBusy:
                hold = BUSY_RETRY
            except Exception:
                log.exception("%r: handling failed; trying again in %d s", name, ERROR_RETRY)
                hold = ERROR_RETRY
            with self.pending_lock:
                self.pending.discard(name)
                if hold:
                    self.held[name] = time.monotonic() + hold
            if self.flow is not None and not hold:
                self.flow.taken()
            if hold:
                self.doorbell.ring()   # let the dispatcher set its timer for the hold
            elif self.others and self.work.empty():
                self.doorbell.ring()   # idle, and another share has names waiting: take some

    def stop(self, grace: float = plumbing.DEFAULT_GRACE):
        """Finish the messages being handled (within grace seconds), then return."""
        self.stopping.set()
        if not self.serving:
            return
        if self.doorbell is not None:
            self.doorbell.ring()
        self.stopped.wait(grace)


# --- sendmail: local submission ---

def read_submission(stream, max_size: int, dot_ends: bool) -> bytes:
    """Read a message from stdin: to EOF, or (sendmail without -i) to a line of ".".

    Raises ValueError when it is longer than max_size.
    """
    lines, size = [], 0
    for line in iter(lambda: stream.readline(65536), b""):
        if dot_ends and line.rstrip(b"\r\n") == b".":
            break
        size += len(line)
        if size > max_size:
            raise ValueError("message larger than %d octets" % max_size)
        lines.append(line)
    return b"".join(lines)


def prepare_submission(data: bytes, *, sender: str, queue_id: str, hostname: str,
                       now: float, extract: bool = False, full_name: str = "",
                       uid: Optional[int] = None) -> tuple:
    """(message, recipients from the header) of a locally submitted message.

    Line ends become CRLF; a leading mbox "From " line is dropped; a Received: trace field
    is prepended (RFC 5321 4.4); From, Date and Message-ID are added when missing
    (RFC 5322 3.6); with extract (-t) the To, Cc and Bcc addresses are returned, and Bcc
    fields are removed (RFC 5322 3.6.3).
    """
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    header, body_start = [], len(lines)
    for number, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and header:
            header[-1].append(line)
        elif re.match(rb"[!-9;-~]+:", line):
            header.append([line])
        else:
            body_start = number + (1 if line == b"" else 0)
            break
    body = lines[body_start:]
    names = {field[0].split(b":", 1)[0].strip().lower() for field in header}
    recipients = []
    if extract:
        values = [b" ".join(part.strip() for part in field).split(b":", 1)[1].decode("utf-8", "replace")
                  for field in header
                  if field[0].split(b":", 1)[0].strip().lower() in (b"to", b"cc", b"bcc")]
        recipients = [address for _, address in email.utils.getaddresses(values) if address]
    header = [field for field in header if field[0].split(b":", 1)[0].strip().lower() != b"bcc"]
    date = rfc5322_date(now)
    who = "from userid %d" % uid if uid is not None else "local"
    trace = ["Received: by %s (mta.py sendmail, %s)" % (hostname, who),
             "\tid %s; %s" % (queue_id, date)]
    added = []
    if b"from" not in names:
        added.append("From: " + (email.utils.formataddr((full_name, sender)) if full_name else sender))
    if b"date" not in names:
        added.append("Date: " + date)
    if b"message-id" not in names:
        added.append("Message-ID: <%s@%s>" % (queue_id, hostname))
    out = [line.encode("utf-8") for line in trace]
    out += [line for field in header for line in field]
    out += [line.encode("utf-8") for line in added]
    out.append(b"")
    out += body
    return b"\r\n".join(out) + b"\r\n", recipients


def _header_of(blocks, limit=MAX_HEADER) -> bytes:
    """The header section at the start of an iterable of blocks, reading no further."""
    data = b""
    for block in blocks:
        data += block
        if b"\r\n\r\n" in data or len(data) >= limit:
            break
    return header_block(data[:limit])


def dkim_signature(message, spool_dir: str, is_local_domain: Callable[[str], bool], *,
                   queue_id: str = "", logger: logging.Logger = log) -> Optional[str]:
    """The DKIM-Signature field (RFC 6376, text ending in CRLF) for a message whose From
    domain is local and has a key in SPOOL/dkim/DOMAIN/ (dkim.spool_key()), or None.

    MESSAGE is bytes, or a function giving its blocks anew (read twice: the header for
    From, then all of it to sign). Relaxed/relaxed, dkim.DEFAULT_SIGNED_HEADERS, From
    signed once more than it occurs. A broken key is one log line, and no signature:
    the mail goes unsigned rather than not at all.
    """
    blocks = (lambda: (message,)) if isinstance(message, (bytes, bytearray)) else message
    try:
        domain = dkim.from_domain(_header_of(blocks()))
    except dkim.DKIMError:
        return None                    # no single From address: nothing to sign for
    if not is_local_domain(domain):
        return None                    # mail relayed for others is theirs to sign
    try:
        found = dkim.spool_key(spool_dir, domain)
        if found is None:
            return None
        selector, key = found
        return dkim.sign(blocks(), key, domain, selector).decode("ascii")
    except (OSError, ValueError) as exc:               # dkim.DKIMError is a ValueError
        logger.error("%s: dkim: cannot sign for %s, sent unsigned (%s)", queue_id or "-",
                     domain, exc)
        return None


def invoking_user() -> tuple:
    """(uid, login name) of whoever runs the command, before it becomes the spool's owner."""
    uid = os.getuid()
    try:
        return uid, getpass.getuser()
    except (KeyError, OSError):
        return uid, "uid%d" % uid


def sendmail(args, config, invoker=None) -> int:
    """`sendmail`: queue a message from stdin; exit codes from sysexits.h.

    A bare name (no "@") gets the first local domain, as Postfix appends $myorigin. invoker
    is (uid, login) of the user who ran it (the process may be the spool's owner since).
    """
    uid, login = invoker or invoking_user()
    hostname = config["hostname"] or socket.gethostname()
    local_domain = config["domain"][0] if config["domain"] else _store_domain(config["store"])

    def qualify(address):
        address = address.strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        if address and "@" not in address:
            if not local_domain:
                raise UsageError("no local domain to add to %r: give --domain, or run "
                                 "run_all once on this spool" % address)
            address = address + "@" + local_domain
        return address

    sender = qualify(login if args.sender is None else args.sender)
    try:
        if sender:
            mailbox_store.canonical_address(sender)
    except mailbox_store.AddressError:
        print("mta sendmail: bad sender address: %r" % args.sender, file=sys.stderr)
        return EX_DATAERR
    options = set(args.option or ())
    dot_ends = not (args.ignore_dots or "i" in options)
    try:
        data = read_submission(sys.stdin.buffer, config["max_size"], dot_ends)
    except ValueError as exc:
        print("mta sendmail: %s" % exc, file=sys.stderr)
        return EX_DATAERR
    queue_id = plumbing.new_queue_id()
    message, found = prepare_submission(
        data, sender=sender or "MAILER-DAEMON@" + hostname, queue_id=queue_id, hostname=hostname,
        now=time.time(), extract=args.extract, full_name=args.full_name or "", uid=uid)
    recipients = []
    for address in list(args.recipients) + found:
        address = qualify(address)
        try:
            mailbox_store.canonical_address(address)
        except mailbox_store.AddressError:
            print("mta sendmail: bad recipient address: %r" % address, file=sys.stderr)
            return EX_DATAERR
        if address not in recipients:
            recipients.append(address)
    if not recipients:
        print("mta sendmail: no recipients (give them as arguments, or use -t)", file=sys.stderr)
        return EX_USAGE
    signature = None
    if plumbing.config_value("dkim_sign", config["dkim_sign"], False):
        store = mailbox_store.Store(config["spool"], config["domain"], hostname)
        signature = dkim_signature(message, config["spool"], store.is_local_domain,
                                   queue_id=queue_id)
    try:
        enqueue(config["spool"], sender, recipients, message, queue_id=queue_id,
                auth_user=login, protocol="local", prepend=signature or "")
    except SpoolError as exc:
        print("mta sendmail: %s" % exc.strerror, file=sys.stderr)
        return EX_TEMPFAIL
    log.info("%s: uid=%d, from=<%s>, size=%d, nrcpt=%d, dkim=%s (queued)", queue_id, uid,
             sender, len(message), len(recipients), "signed" if signature else "none")
    return EX_OK


def _store_domain(store):
    """The first domain of the store's users, for a sendmail run with no --domain."""
    users = mailbox_store.Store(store).list_users()
    return users[0].split("@", 1)[1] if users else ""


# --- The admin CLI ---

def _time_text(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def queue_report(queue: Queue) -> list:
    """The queue as plain data (the "messages" of the `queue --json` output)."""
    return list(queue_entries(queue))


def queue_entries(queue: Queue) -> Iterator[dict]:
    """queue_report()'s entries one at a time, as the files are read."""
    for entry in queue.entries():
        yield _entry_data(*entry)


def _entry_data(folder, name, size, state):
    """One message of the `queue --json` output, from an entry of Queue.entries()."""
    if state is None:
        return {"queue_id": name, "folder": folder, "size": size, "error": "unreadable"}
    envelope = state.envelope
    recipients = [{"address": envelope.recipients[n], "original": envelope.recipients[n],
                   "kind": "unrouted", "status": "pending"} for n in state.unrouted]
    for r in state.recipients:
        recipients.append({
            "address": r.address, "original": r.original, "kind": r.kind, "status": r.status,
            "attempts": r.attempts, "last_attempt": r.last_attempt or None,
            "next_attempt": r.next_attempt if r.status == "deferred" else None,
            "dsn": r.dsn, "reply": r.reply, "remote_mta": r.remote_mta, "relay": r.relay})
    return {"queue_id": name, "folder": folder, "size": size,
            "arrival": envelope.arrival, "sender": envelope.sender,
            "client_address": envelope.client_address, "client_helo": envelope.client_helo,
            "auth_user": envelope.auth_user, "protocol": envelope.protocol,
            "recipients": recipients}


def print_queue(queue: Queue, as_json: bool, processes: int = 1) -> int:
    """Print the queue as its files are read, LISTING_CHUNK at a time (`postqueue -p`
    streams too). With processes > 1, that many processes read the files (see
    _in_processes); the output is the same as with one."""
    write = sys.stdout.write
    chunks = [(folder, names[start:start + LISTING_CHUNK])
              for folder in QUEUE_FOLDERS for names in (queue.ids(folder),)
              for start in range(0, len(names), LISTING_CHUNK)]
    if as_json:
        # One object, {"messages": [...], "quarantined": [...]}, one message a line.
        write('{"messages": [')
    count = total = 0
    for text, number, size in _in_processes(
            functools.partial(_listing_part, queue, as_json), chunks, processes):
        if not number:
            continue
        if as_json:
            write(",\n" if count else "\n")
        elif not count:
            write("%-20s %-9s %9s  %-19s  %s\n" % ("-Queue ID-", "-Folder-", "-Size-",
                                                  "-Arrival Time-", "-Sender/Recipients-"))
        write(text)
        count += number
        total += size
    quarantined = queue.quarantined()
    if as_json:
        write('],\n "quarantined": %s}\n' % json.dumps(quarantined))
        return 0
    if not count:
        write("Mail queue is empty\n")
    else:
        write("-- %d KiB in %d message%s\n" % ((total + 1023) // 1024, count,
                                              "" if count == 1 else "s"))
    if quarantined:
        write("-- %d file%s in %s\n" % (len(quarantined), "" if len(quarantined) == 1 else "s",
                                        queue.path(QUARANTINE)))
    return 0


def _listing_part(queue, as_json, chunk):
    """(text, messages, octets) of one chunk (folder, names) of the listing."""
    folder, names = chunk
    texts = []
    octets = 0
    for entry in queue.read_entries(folder, names):
        texts.append(json.dumps(_entry_data(*entry)) if as_json else _entry_text(*entry))
        octets += entry[2]
    return (",\n" if as_json else "").join(texts), len(texts), octets


def _in_processes(function, items, processes):
    """function(item) for each of ITEMS, in their order, computed by up to PROCESSES
    processes: this one computes items 0, P, 2P... and forked children the others, each
    child sending its results down a pipe (pickled, length first) while this one prints.
    A child that stops early (it failed) raises OSError here; when the caller stops early
    (`| head`), the children find their pipe closed and end."""
    processes = max(1, min(processes, len(items)))
    if processes == 1:
        yield from map(function, items)
        return
    children = []
    try:
        for k in range(1, processes):
            children.append(_forked(function, items[k::processes],
                                    [pipe for _, pipe in children]))
        for index, item in enumerate(items):
            k = index % processes
            yield function(item) if k == 0 else _received(children[k - 1][1])
    finally:
        for _, pipe in children:
            pipe.close()
        for pid, _ in children:
            os.waitpid(pid, 0)


def _forked(function, items, inherited):
    """(pid, pipe to read) of a child that sends function(item) for each item; INHERITED
    are the read ends of the children before it, closed in the child so that each child
    sees the end of its own pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return pid, os.fdopen(read_end, "rb")
    status = 1
    try:
        os.close(read_end)
        for pipe in inherited:
            pipe.close()
        with os.fdopen(write_end, "wb") as pipe:
            for item in items:
                data = pickle.dumps(function(item), pickle.HIGHEST_PROTOCOL)
                pipe.write(LENGTH_PREFIX.pack(len(data)) + data)
        status = 0
    except BaseException:          # the reader stopped, or a failure: the parent sees EOF
        pass
    finally:
        os._exit(status)           # no exit handlers, no flush of the parent's buffers


def _received(pipe):
    length = pipe.read(LENGTH_PREFIX.size)
    data = pipe.read(LENGTH_PREFIX.unpack(length)[0]) if len(length) == LENGTH_PREFIX.size else b""
    if not data:
        raise OSError(errno.EIO, "a process reading the queue ended early")
    return pickle.loads(data)


def _entry_text(folder, name, size, state):
    """The lines `mta.py queue` prints for one message (what queue_entries() gives)."""
    if state is None:
        return "%-20s %-9s %9d  (unreadable)\n" % (name, folder, size)
    envelope = state.envelope
    lines = ["%-20s %-9s %9d  %-19s  <%s>" % (name, folder, size, _time_text(envelope.arrival),
                                             envelope.sender)]
    for n in state.unrouted:
        lines.append("    <%s> unrouted pending" % envelope.recipients[n])
    for r in state.recipients:
        line = "    <%s> %s %s" % (r.address, r.kind, r.status)
        if r.original != r.address:
            line += " (for <%s>)" % r.original
        if r.attempts:
            line += ", %d attempt%s" % (r.attempts, "" if r.attempts == 1 else "s")
        if r.status == "deferred" and r.next_attempt:
            line += ", next %s" % _time_text(r.next_attempt)
        if r.reply and r.status != "delivered":
            line += " (%s)" % r.reply
        lines.append(line)
    return "\n".join(lines) + "\n"


def delete_command(queue: Queue, args) -> int:
    if args.all == bool(args.queue_id):
        raise UsageError("delete needs a queue id or --all, not both")
    names = [args.queue_id] if args.queue_id else [
        name for folder in QUEUE_FOLDERS for name in queue.ids(folder)]
    removed = 0
    for name in names:
        try:
            removed += queue.delete(name)
        except QueueBusy:
            print("mta: %s is being delivered; try again" % name, file=sys.stderr)
            return EX_TEMPFAIL
    if args.queue_id and not removed:
        print("mta: %s: no such message in the queue" % args.queue_id, file=sys.stderr)
        return 1
    print("%d message%s deleted" % (removed, "" if removed == 1 else "s"))
    return 0


def serve(config) -> int:
    """The router daemon: routes incoming/ until SIGTERM or SIGINT."""
    hostname = config["hostname"] or socket.gethostname()
    domains = config["domain"]
    try:
        plumbing.drop_privileges(config["user"])
        store = mailbox_store.Store(config["store"], domains, hostname)
        queue = Queue(config["spool"], hostname=hostname, lifetime=config["queue_lifetime"],
                      delay_warning=config["delay_warning"],
                      retry_schedule=config["retry_schedule"],
                      postmaster=("postmaster@" + domains[0]) if domains else "postmaster")
        queue.create()
        router = Router(queue, store, hop_limit=config["hop_limit"],
                        relay_domains=config["relay_domain"])
        runner = QueueRunner(queue, INCOMING, "mta", router.handle, workers=config["workers"],
                             scan_interval=config["scan_interval"], on_scan=router.periodic)
    except (OSError, KeyError, ValueError) as exc:
        print("mta: cannot start on spool %s: %s" % (config["spool"], exc), file=sys.stderr)
        return 1
    plumbing.log_config(log, config)
    try:
        runner.flow = FlowTokens(queue.spool_dir)
    except OSError as exc:
        log.warning("flow control off: cannot open %s/%s: %s", RUN_DIR, FLOW_FIFO, exc)
    # Several router processes share incoming/ as threads do: each file is handled under a
    # flock (see the module docstring), and smtp_in rings the one a new file falls to.
    return plumbing.serve_until_signalled([runner], processes=plumbing.worker_processes(config),
                                          cpus=config["cpus"])


def build_parser():
    """The command line of the daemon and of the admin commands; a usage error exits with
    EX_USAGE (dnsstub.usage_parser)."""
    parser = dnsstub.usage_parser(prog="mta.py", description="The spool's router daemon (no "
                                  "command), or an admin command on the queue.")
    plumbing.add_options(parser, DEFAULTS, HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=type(parser))

    def command(name, text):
        # The shared options again, so that they may follow the command too.
        return plumbing.add_options(commands.add_parser(name, help=text), DEFAULTS, HELP,
                                    suppress=True)

    listing = command("queue", "list the queue, like mailq")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    command("flush", "retry every deferred recipient now")
    delete = command("delete", "remove a message (or all) from the queue")
    delete.add_argument("queue_id", nargs="?", metavar="ID")
    delete.add_argument("--all", action="store_true", help="remove every message")
    submit = command("sendmail", "queue a message read from stdin")
    submit.add_argument("-t", dest="extract", action="store_true",
                        help="also send to the To, Cc and Bcc addresses (Bcc is removed)")
    submit.add_argument("-f", dest="sender", metavar="FROM", help="envelope sender (\"\" for <>)")
    submit.add_argument("-F", dest="full_name", metavar="NAME", help="full name for an added From:")
    submit.add_argument("-i", dest="ignore_dots", action="store_true",
                        help="a line with a single dot does not end the message")
    submit.add_argument("-o", dest="option", action="append", metavar="OPTION",
                        help="sendmail option; -oi is the same as -i, others are ignored")
    submit.add_argument("recipients", nargs="*", metavar="RCPT")
    return parser


def admin_config(args) -> dict:
    """The settings of an admin command: as the daemon's, but the spool must exist already
    (plumbing.find_spool), and without --config the settings run_all wrote for the router
    into the spool (SPOOL/run/mta.ini) stand in for a config file: domains, host name."""
    config = plumbing.load_config("mta", DEFAULTS, args)
    spool = plumbing.find_spool(config["spool"])
    written = os.path.join(spool, RUN_DIR, "mta.ini")
    if not getattr(args, "config", None) and os.path.exists(written):
        config = plumbing.load_config("mta", DEFAULTS, args, path=written)
    config["spool"] = spool
    config["store"] = plumbing.store_path(config["store"], spool)
    return config


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help (0) or a usage error (EX_USAGE)
        return exc.code
    try:
        config = plumbing.load_config("mta", DEFAULTS, args)
        parse_retry_schedule(config["retry_schedule"])
        plumbing.config_value("dkim_sign", config["dkim_sign"], False)
        plumbing.parse_cpus(config["cpus"])
        plumbing.worker_processes(config)
    except ValueError as exc:
        print("mta: %s" % exc, file=sys.stderr)
        return EX_CONFIG
    try:
        if args.command is None:
            config["spool"] = plumbing.spool_path(config["spool"])
            config["store"] = plumbing.store_path(config["store"], config["spool"])
            plumbing.run_on_cpus(config["cpus"])   # the router daemon; the CLI runs anywhere
        else:
            config = admin_config(args)
    except ValueError as exc:
        print("mta: %s" % exc, file=sys.stderr)
        return EX_CONFIG if args.command in (None, "sendmail") else 1
    plumbing.setup_logging("mta", config["syslog"], config["verbose"])
    if args.command == "sendmail" and not config["verbose"]:
        logging.getLogger().setLevel(logging.WARNING)    # cron mails whatever lands on stderr
    if args.command is None:
        return serve(config)
    invoker = invoking_user()
    queue = Queue(config["spool"], hostname=config["hostname"] or None)
    try:
        plumbing.become_spool_owner(config["spool"])
        if args.command == "sendmail":
            return sendmail(args, config, invoker)
        if args.command == "queue":
            return print_queue(queue, args.json, plumbing.worker_processes(config))
        if args.command == "flush":
            flushed = queue.flush()
            print("%d deferred message%s flushed" % (flushed, "" if flushed == 1 else "s"))
            return 0
        return delete_command(queue, args)
    except BrokenPipeError:        # `mta.py queue | head`: the reader had enough
        return plumbing.reader_went_away()
    except UsageError as exc:
        print("mta: %s" % exc, file=sys.stderr)
        return EX_USAGE
    except ValueError as exc:
        print("mta: %s" % exc, file=sys.stderr)
        return EX_TEMPFAIL if args.command == "sendmail" else 1
    except OSError as exc:
        print("mta: %s" % exc, file=sys.stderr)
        return EX_TEMPFAIL if args.command == "sendmail" else 1


if __name__ == "__main__":
    sys.exit(main())
