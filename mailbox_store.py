"""mailbox_store.py - Maildir mailboxes, users with hashed passwords, and aliases.

The store every other role reads and writes through. Its files, all under the spool, or
under the folder the roles' `store` setting names (one store several hosts share):

    SPOOL/users                          one line per user: ADDRESS:HASH (mode 0600); a
                                         line counts once its LF is written
    SPOOL/aliases                        /etc/aliases shape: "name: target, target"
    SPOOL/store.lock                     locked (lock_file) while users or aliases is rewritten
    SPOOL/mail/DOMAIN/LOCAL/Maildir/     the user's Maildir: tmp/, new/, cur/
    SPOOL/mail/DOMAIN/LOCAL/maildrop.lock  locked by the POP3 session holding the maildrop

Delivery writes tmp/NAME, fsyncs it, renames it into new/ and fsyncs new/ (the Maildir
rule), so any Maildir reader (mutt, Dovecot) can open the mailbox. In new/ the name is
"SECONDS.M<usec>P<pid>Q<counter>R<random>.<host>,S=<file size>,W=<size with CRLF>",
or, for the router's deliveries, "SECONDS.M<usec>I<queue id>R<recipient digest>.<host>,..."
with the time the message arrived: one name for every attempt, so that an attempt
repeated after a crash finds the first one's file and delivers nothing (maildir_deliver).
Sizes come from the name, without a stat of each file; they are counted while the message
is copied in blocks, so a message is never held whole in memory to be delivered. A message keeps the bytes it came
with (CRLF or LF line ends); W= is the size POP3 sends (RFC 1939 11: CRLF line ends).
A delivery that dies half-way leaves its file in tmp/; remove_stale_tmp() (run hourly by
mta's router) removes those untouched for MAILDIR_TMP_AGE (36 hours, the Maildir rule).

Run: python3 mailbox_store.py --spool DIR add-user alice@example.com
     python3 mailbox_store.py --store DIR add-user ...  (a store kept apart from the spool)
     python3 mailbox_store.py --spool DIR passwd ADDRESS | del-user ADDRESS [--purge]
     python3 mailbox_store.py --spool DIR list-users | list-aliases
     python3 mailbox_store.py --spool DIR add-alias NAME TARGET... | del-alias NAME
"""

import argparse
import array
import base64
import contextlib
import fcntl
import gc
import getpass
import hashlib
import hmac
import itertools
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import dnsstub
import plumbing

__all__ = [
    "AddressError", "AliasLoop", "AlreadyDelivered", "AliasTooBig", "CRLFSize", "Mailbox", "MailboxBusy",
    "MessageInfo", "Store",
    "UnknownUser", "canonical_address", "crlf_size", "fsync_dir", "hash_password",
    "lock_file", "maildir_deliver", "main", "make_dirs", "make_maildir", "verify_password",
    "write_all",
    "write_atomically",
]

USERS_FILE = "users"
ALIASES_FILE = "aliases"
STORE_LOCK = "store.lock"
MAIL_DIR = "mail"
MAILDROP_LOCK = "maildrop.lock"
MAILDIR_SUBDIRS = ("tmp", "new", "cur")

MAX_LOCAL_PART = 64                # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255                   # RFC 5321 4.5.3.1.2
MAX_LABEL = 63                     # RFC 1035 2.3.4
MAX_ALIAS_DEPTH = 20               # nested alias expansions before AliasLoop
MAX_ALIAS_RECIPIENTS = 1000        # final recipients of one address before AliasTooBig
                                   # (Postfix's virtual_alias_expansion_limit)
MAX_PASSWORD = 1024                # characters; longer is refused before hashing
MAX_UIDL = 70                      # RFC 1939 7: unique-id is 1 to 70 characters
DELIVERY_ID_PATTERN = re.compile(r"[0-9A-Za-z]{1,64}\Z")    # a delivery id in a Maildir name
UIDL_PATTERN = re.compile(r"[\x21-\x7e]{1,%d}\Z" % MAX_UIDL)     # RFC 1939 7
READ_BLOCK = 256 * 1024            # bytes read from a message file at a time
# Maildir spec (cr.yp.to/proto/maildir.html): a tmp/ file not accessed for 36 hours is a
# dead delivery's, safe to delete (Dovecot does so too). A live one is written in seconds.
MAILDIR_TMP_AGE = 36 * 3600

# Password hashes, in PHC-like strings with the parameters in the line. New hashes use
# these; a stored hash made with others (older parameters, or PBKDF2) is replaced at the
# user's next successful login. The test suite lowers them (tests/conftest.py) for speed.
# scrypt's work is N * r * p, its memory 128 * r * N octets (the p passes run one after
# the other). N=2^14, r=8, p=8 does the work of OWASP's N=2^17, p=1 (about 0.4 s) in 16
# MiB instead of 128, and is above OWASP's own N=2^14, r=8, p=5 row: a server that hashes
# for several logins at once stays small. bench/pop3_bench.py --mem-clients 10 measures it.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 8
SCRYPT_MAXMEM = 256 * 1024 * 1024  # scrypt's limit per computation: a stored hash asking
                                   # more never matches (earlier versions' N=2^17, r=8
                                   # takes 128 MiB and still does)
PBKDF2_ITERATIONS = 600_000        # OWASP 2023 figure for PBKDF2-HMAC-SHA256
HASH_THREADS = 2                   # hashes at once, per process: 2 x 16 MiB at most
SALT_BYTES = 16
KEY_BYTES = 32
LOGIN_CACHE_TTL = 3600.0           # seconds a verified password is remembered (Dovecot's
LOGIN_CACHE_SIZE = 10000           # auth_cache_ttl); logins remembered per process

# RFC 2142 and RFC 5321 4.5.1: these local parts of every local domain reach a person.
ROLE_ACCOUNTS = ("postmaster", "abuse")

# RFC 5322 3.2.3 specials (and space) never appear in a dot-atom local part; "/" and "\"
# would make a path. Quoted local parts are refused: they cannot name a file safely.
LOCAL_PART_FORBIDDEN = frozenset('/\\"(),:;<>@[] ')
DOMAIN_LABEL_EXTRA = frozenset("-_")

log = logging.getLogger("mailbox_store")


# --- Errors and data types ---

class AddressError(ValueError):
    """An address that is malformed or must not name a file."""


class UnknownUser(LookupError):
    """A local address with no user and no alias."""


class AliasLoop(ValueError):
    """Alias expansion that cannot end well: a chain deeper than MAX_ALIAS_DEPTH, or a loop
    of aliases that reaches no mailbox at all (a loop with members just delivers to them)."""


class AliasTooBig(AliasLoop):
    """Alias expansion reaching more than MAX_ALIAS_RECIPIENTS addresses. An AliasLoop, so
    that every caller refusing a runaway expansion refuses this one too."""


class _HashChanged(Exception):
    """The users line no longer holds the hash just verified: a password change won."""


class MailboxBusy(Exception):
    """The maildrop is locked by another session (RFC 2449 8.1.1 [IN-USE])."""


class AlreadyDelivered(Exception):
    """A delivery with this delivery id is in the Maildir already (at .path): an earlier
    attempt got it there, and its result was lost (a crash before it was recorded)."""

    def __init__(self, path):
        super().__init__("already delivered as %s" % path)
        self.path = path


class MessageInfo:
    """One message of an open mailbox; number and uid are fixed for the session.

    A view made when asked for: the mailbox keeps its messages in one list and a few
    arrays (Mailbox._listing), about 150 octets a message, not in an object each.
    """
    __slots__ = ("mailbox", "number")

    def __init__(self, mailbox, number: int):
        self.mailbox = mailbox
        self.number = number

    @property
    def uid(self) -> str:
        """RFC 1939 7 unique-id: stable, 0x21-0x7E, <= 70 chars."""
        return _uid_for(_unique_part(self.mailbox._listing.names[self.number - 1]))

    @property
    def size(self) -> int:
        """Octets POP3 sends: CRLF line ends, before byte-stuffing."""
        return self.mailbox._listing.sizes[self.number - 1]

    @property
    def file_size(self) -> int:
        """Octets in the file (may differ from size: LF line ends)."""
        return self.mailbox._listing.file_sizes[self.number - 1]

    @property
    def path(self) -> str:
        """Where the file is, as far as this session knows."""
        return self.mailbox._path(self.number - 1)

    @property
    def deleted(self) -> bool:
        return bool(self.mailbox._marks[self.number - 1] & _DELETED)

    @property
    def retrieved(self) -> bool:
        return bool(self.mailbox._marks[self.number - 1] & _RETRIEVED)


@dataclass
class _Listing:
    """A Maildir's messages in number order, one entry each in every field."""
    names: list = field(default_factory=list)                     # file names
    in_cur: bytearray = field(default_factory=bytearray)          # 1: in cur/, 0: in new/
    sizes: array.array = field(default_factory=lambda: array.array("q"))        # POP3 octets
    file_sizes: array.array = field(default_factory=lambda: array.array("q"))   # file octets
    measured: bytearray = field(default_factory=bytearray)        # 1: sizes not in the name


_DELETED, _RETRIEVED = 1, 2            # bits of Mailbox._marks
_FLIP = bytes.maketrans(b"\x00\x01", b"\x01\x00")      # in_cur -> in new/


@dataclass
class _Expansion:
    """The running state of one address's alias expansion."""
    out: list = field(default_factory=list)          # final addresses, as found
    skipped: list = field(default_factory=list)      # (alias, target) without a mailbox
    cycles: list = field(default_factory=list)       # paths cut where an alias came round
    done: set = field(default_factory=set)           # local addresses expanded already
    strict: bool = False                             # a cycle raises AliasLoop (add-alias)


class _LoginCache:
    """Logins whose password was verified lately, so that a mail client that logs in every
    minute costs one password hash an hour instead of one a login (as Dovecot's auth_cache).

    An entry is keyed by an HMAC of the user and the password under a key made at start and
    never written anywhere: the cache holds no password, nor anything to guess one from
    offline. It is valid while the user's stored hash is the one it was verified against (a
    new password voids it) and for LOGIN_CACHE_TTL seconds. Failed logins are never
    remembered: every guess still costs a full hash.
    """

    def __init__(self, ttl=LOGIN_CACHE_TTL, size=LOGIN_CACHE_SIZE, clock=time.monotonic):
        self.key = secrets.token_bytes(32)
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self.lock = threading.Lock()
        self.entries = OrderedDict()   # HMAC -> (stored hash, expiry), oldest first; lock

    def _digest(self, user, password):
        text = (user + "\0" + password).encode("utf-8", "surrogatepass")
        return hmac.new(self.key, text, hashlib.sha256).digest()

    def verified(self, user, password, stored) -> bool:
        """True when this user logged in with this password lately, against stored."""
        digest = self._digest(user, password)
        with self.lock:
            entry = self.entries.get(digest)
            if entry is None:
                return False
            if entry[0] != stored or entry[1] <= self.clock():
                del self.entries[digest]
                return False
            return True

    def remember(self, user, password, stored):
        digest = self._digest(user, password)
        with self.lock:
            self.entries.pop(digest, None)
            self.entries[digest] = (stored, self.clock() + self.ttl)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


@dataclass
class _Tables:
    """A snapshot of the users and aliases files; replaced whole, never changed."""
    users: dict = field(default_factory=dict)        # address -> password hash, file order
    by_local: dict = field(default_factory=dict)     # local part -> [addresses]
    aliases: dict = field(default_factory=dict)      # name (local or address) -> [targets]
    user_domains: frozenset = frozenset()
    signature: tuple = ()
    users_read: tuple = (None, 0, 0, 0)              # (inode, octets, lines, CRC-32) read
    users_data: bytes = b""                          # the users file as read


# --- Addresses ---

def _split_address(address):
    """Validate an address; return (local part as written, lower-cased domain)."""
    if not isinstance(address, str):
        raise AddressError("address must be text")
    if not address.isascii():
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:             # surrogates: bytes that were not UTF-8
            raise AddressError("address is not valid UTF-8: %r" % address) from None
    if address.count("@") != 1:
        raise AddressError("address needs exactly one @: %r" % address)
    local, domain = address.split("@")
    if not local or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part empty or longer than %d octets: %r" % (MAX_LOCAL_PART, address))
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError("local part has a leading, trailing or double dot: %r" % address)
    for char in local:
        if char in LOCAL_PART_FORBIDDEN or not char.isprintable():
            raise AddressError("character %r not allowed in a local part: %r" % (char, address))
    return local, _check_domain(domain, address)


def _check_domain(domain, address):
    domain = domain.lower()
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain empty or too long: %r" % address)
    if domain.startswith("[") and domain.endswith("]"):
        # RFC 5321 4.1.3 address literal: only digits, hex, dots and colons.
        inner = domain[1:-1]
        if inner and all(c.isascii() and (c.isalnum() or c in ".:") for c in inner):
            return domain
        raise AddressError("bad address literal: %r" % address)
    for label in domain.split("."):
        if (not label or len(label) > MAX_LABEL or label[0] == "-" or label[-1] == "-"
                or not all(c.isalnum() or c in DOMAIN_LABEL_EXTRA for c in label)):
            raise AddressError("bad domain: %r" % address)
    return domain


def canonical_address(address: str) -> str:
    """Validate address and return it with domain and local part lower-cased."""
    local, domain = _split_address(address)
    return local.lower() + "@" + domain


def _check_local_part(name):
    """Validate a bare local part (an alias name or target without a domain)."""
    _split_address(name + "@localhost")
    return name.lower()


# --- Passwords ---

def _b64(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str) -> str:
    """Hash with scrypt (or PBKDF2-HMAC-SHA256 where scrypt is missing) and a random salt."""
    secret = password.encode("utf-8")
    salt = secrets.token_bytes(SALT_BYTES)
    if hasattr(hashlib, "scrypt"):
        key = hashlib.scrypt(secret, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                             maxmem=SCRYPT_MAXMEM, dklen=KEY_BYTES)
        return "$scrypt$n=%d,r=%d,p=%d$%s$%s" % (SCRYPT_N, SCRYPT_R, SCRYPT_P, _b64(salt), _b64(key))
    key = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS, KEY_BYTES)
    return "$pbkdf2-sha256$i=%d$%s$%s" % (PBKDF2_ITERATIONS, _b64(salt), _b64(key))


def _derive(secret, stored):
    """Return (key derived from secret with stored's scheme, stored key), or None if malformed.

    Parameters are bounded: a hand-edited line must not make a login cost minutes.
    """
    try:
        _, scheme, params, salt, key = stored.split("$")
        values = dict(item.split("=", 1) for item in params.split(","))
        salt, key = _unb64(salt), _unb64(key)
        if scheme == "scrypt":
            n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
            if not (1 < n <= 2 ** 20 and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16
                    and 0 < len(key) <= 64):
                return None
            return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM,
                                  dklen=len(key)), key
        if scheme == "pbkdf2-sha256":
            iterations = int(values["i"])
            if not (0 < iterations <= 10_000_000 and 0 < len(key) <= 64):
                return None
            return hashlib.pbkdf2_hmac("sha256", secret, salt, iterations, len(key)), key
    except (ValueError, KeyError, TypeError, AttributeError, MemoryError):
        return None
    return None


def verify_password(password: str, stored: str) -> bool:
    """True when password matches the stored hash; compared in constant time."""
    derived = _derive(password.encode("utf-8", "surrogateescape"), stored)
    return derived is not None and hmac.compare_digest(derived[0], derived[1])


def _outdated(stored):
    """True when stored is not what hash_password() would make now: PBKDF2 where scrypt
    exists, fewer PBKDF2 iterations, or other scrypt parameters (a smaller N, r or p, or
    the N=2^17, p=1 of earlier versions, whose 128 MiB a login should no longer cost)."""
    try:
        _, scheme, params, _, _ = stored.split("$")
        values = {key: int(value) for key, value in
                  (item.split("=", 1) for item in params.split(","))}
        if scheme == "scrypt":
            return (values["n"], values["r"], values["p"]) != (SCRYPT_N, SCRYPT_R, SCRYPT_P)
        if scheme == "pbkdf2-sha256":
            return hasattr(hashlib, "scrypt") or values["i"] < PBKDF2_ITERATIONS
    except (ValueError, KeyError):
        return False
    return False


def _check_password(password):
    if not password:
        raise ValueError("the password is empty")
    if len(password) > MAX_PASSWORD:
        raise ValueError("the password is longer than %d characters" % MAX_PASSWORD)
    if any(c in password for c in "\0\r\n"):
        raise ValueError("the password contains NUL, CR or LF")


# --- Locks: one kind for every lock of the store, seen by every host that shares it ---

# struct flock (fcntl(2)): l_type, l_whence, l_start, l_len (0: to the end), l_pid (0 for
# an open file description lock).
_FLOCK = struct.Struct("hhqqi")
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)      # Linux 3.15+, Python 3.9+
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", None)


def lock_file(fd: int, wait: bool = False) -> bool:
    """Lock the whole file open at fd for writing; False when another holds it and not wait.

    An open file description lock (F_OFD_SETLK): a POSIX record lock, which an NFS client
    passes on to the server (NLM, NFSv4), so hosts sharing the store see each other's
    locks; owned, as a flock() is, by the open file rather than the process, so two POP3
    sessions of one process conflict too; dropped by the kernel when the descriptor is
    closed or its process dies (kill -9 included). flock() and POSIX locks do not see each
    other on a local Linux file system, so every lock of the store is taken here, one kind.
    Where there are no OFD locks (not Linux) it falls back to flock(), local to one host.
    """
    if _OFD_SETLK is None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, _OFD_SETLKW if wait else _OFD_SETLK, request)
        return True
    except (BlockingIOError, PermissionError):     # EAGAIN or EACCES: held elsewhere
        if wait:
            raise
        return False


# --- Files: directory fsync, directories, atomic rewrite ---

class _DirectorySync:
    """Group commit of one directory's fsync among the threads of this process.

    fsync() of a directory makes durable every entry made in it (create, rename, link)
    before that fsync began. A thread that has just renamed a file into the directory
    therefore needs not an fsync of its own, but any fsync that *begins after* its
    rename. While one fsync runs, threads that arrive wait; when it ends, one of them
    begins the next, which covers them all. N writers at once then cost about two
    fsyncs between them instead of N, and none returns before its entry is durable.
    """

    def __init__(self):
        self.changed = threading.Condition()    # guards the counters below
        self.started = 0               # fsyncs begun; the last one is number `started`
        self.finished = 0              # fsyncs ended; all up to this number are done
        self.failed = 0                # number of the last fsync that raised, and why:
        self.error = (0, "")           # (errno, strerror)
        self.users = 0                 # threads in fsync_dir for this directory; _syncs_lock

    def sync(self, path):
        with self.changed:
            wanted = self.started + 1          # the first fsync to begin after our change
            while self.finished < wanted:
                if self.started > self.finished:
                    self.changed.wait()        # one is running; it may have begun too early
                    continue
                self.started += 1
                number = self.started
                self.changed.release()
                try:
                    _fsync_now(path)
                except OSError as exc:
                    self.failed, self.error = number, (exc.errno, exc.strerror)
                    raise
                finally:
                    self.changed.acquire()
                    self.finished = number
                    self.changed.notify_all()
            if self.failed >= wanted:          # the fsync that was to cover us failed
                raise OSError(self.error[0], self.error[1], path)


_syncs_lock = threading.Lock()
_syncs = {}                            # directory path -> _DirectorySync while in use


def _fsync_now(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory, so that the entries just made in it survive a crash.

    Threads syncing the same directory at once share fsyncs (see _DirectorySync): this
    returns once an fsync of path that began after the call has ended, and raises the
    OSError of that fsync if it failed.
    """
    with _syncs_lock:
        sync = _syncs.get(path)
        if sync is None:
            sync = _syncs[path] = _DirectorySync()
        sync.users += 1
    try:
        sync.sync(path)
    finally:
        with _syncs_lock:
            sync.users -= 1
            if not sync.users:
                del _syncs[path]


def make_dirs(path: str) -> None:
    """Create path and missing parents (mode 0700), fsyncing each parent that gained one,
    so that the first message of a new mailbox does not hang on a directory entry that a
    crash could lose."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    make_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    fsync_dir(parent)


def write_all(fd: int, data: bytes) -> None:
    """os.write() until all of data is written (one write may take only a part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_durably(temporary, final, data, mode, make_folders=None):
    """The write-fsync-rename rule: data into the new file temporary (mode exactly, whatever
    the umask), fsync, rename to final, fsync final's directory. A failure leaves nothing.

    data is bytes or an iterable of bytes blocks, copied as they come (never joined).
    final is a path, or a function (octets written, their size with CRLF line ends) -> path
    for a name that holds the sizes. make_folders, when given, is called once a folder
    turns out to be missing (at the open or at the rename), and that step is tried again.
    Returns the final path.
    """
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileNotFoundError:
        if make_folders is None:
            raise
        make_folders()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        sizes = CRLFSize()
        try:
            os.fchmod(fd, mode)
            for block in ((data,) if isinstance(data, (bytes, bytearray)) else data):
                write_all(fd, block)
                sizes.add(block)
            os.fsync(fd)
        finally:
            os.close(fd)
        if callable(final):
            final = final(sizes.size, sizes.crlf_size)
        try:
            os.rename(temporary, final)
        except FileNotFoundError:
            if make_folders is None or not os.path.exists(temporary):
                raise
            make_folders()
            os.rename(temporary, final)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return final


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Write text to a temporary file, fsync, rename over path, fsync the directory."""
    temporary = "%s.tmp.%d.%s" % (path, os.getpid(), secrets.token_hex(4))
    _write_durably(temporary, path, text.encode("utf-8"), mode)


def _file_signature(path):
    """What tells a changed file from the one read before: (mtime_ns, size, inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _subfolders(path):
    """Names of the folders in path (symbolic links not followed); [] when it is missing."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _read_users(path):
    """(inode, the users file's octets up to and with its last LF); (None, b"") if missing.

    add-user appends one line with one write(); a crash in the middle can leave a last
    line without its LF. That line is not counted (nor the user in it): the next writer
    removes it.
    """
    try:
        with open(path, "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            data = f.read()
    except FileNotFoundError:
        return None, b""
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("users: last line has no line end (an add-user cut short), ignored")
    return inode, data[:end]


def _users_lines(data):
    return data.decode("utf-8", "replace").splitlines()


# --- Users and aliases files ---

def _parse_users(lines, first=1, warn=True):
    """ADDRESS:HASH lines; "#" comments and blank lines skipped; bad lines logged (lines
    are numbered from first) unless warn is False."""
    users = {}
    for number, line in enumerate(lines, first):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        address, _, stored = text.rpartition(":")
        try:
            address = canonical_address(address)
        except AddressError:
            if warn:
                log.warning("users:%d: bad address, line ignored", number)
            continue
        if not stored.startswith("$"):
            if warn:
                log.warning("users:%d: <%s>: no password hash, line ignored", number, address)
            continue
        users.setdefault(address, stored)
    return users


def _alias_entries(lines):
    """Split aliases lines into entries: (name or None, [raw lines]).

    As in /etc/aliases, a line starting with white space continues the entry above;
    comments and blank lines are entries of their own with name None.
    """
    entries = []
    for line in lines:
        if line[:1].isspace() and line.strip() and entries and entries[-1][0] is not None:
            entries[-1][1].append(line)
        elif not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            entries.append((None, [line]))
        else:
            entries.append((line.split(":", 1)[0].strip().lower(), [line]))
    return entries


def _check_alias_name(name):
    name = name.strip()
    return canonical_address(name) if "@" in name else _check_local_part(name)


def _check_alias_target(target):
    """A target is an address (local or remote) or a bare local part of the same domain."""
    target = target.strip()
    if target.startswith(("|", "/", ":include:")):
        raise AddressError("only addresses are allowed as targets, not %r" % target)
    if "@" in target:
        local, domain = _split_address(target)
        return local + "@" + domain
    return _check_local_part(target)


def _parse_aliases(lines):
    aliases = {}
    for name, raw in _alias_entries(lines):
        if name is None:
            if raw[0].strip() and not raw[0].lstrip().startswith("#"):
                log.warning("aliases: line without a colon ignored: %r", raw[0][:80])
            continue
        try:
            name = _check_alias_name(name)
            text = " ".join(line.strip() for line in raw).split(":", 1)[1]
            targets = [_check_alias_target(t) for t in text.split(",") if t.strip()]
        except AddressError as exc:
            log.warning("aliases: entry %r ignored: %s", name, exc)
            continue
        if not targets:
            log.warning("aliases: entry %r has no target, ignored", name)
            continue
        if name in aliases:
            log.warning("aliases: %r defined twice, the last one wins", name)
        aliases[name] = targets
    return aliases


def _format_alias(name, targets):
    return "%s: %s" % (name, ", ".join(targets))


# --- Speed: a new user is seen without parsing the users file again, measured by bench/users_bench.py ---
# The plain form is Store._load's: parse every line (about 2.5 us each: 25 ms at 10,000
# users, on the request after each add-user). add-user only appends, so when the file is
# the same inode and still starts with the octets read last time (same CRC-32 of them),
# the users are those read then plus those of the new lines. Anything else - a rewrite by
# passwd, del-user or an editor (a new inode, or other octets), a shorter file - is parsed
# whole, unless it differs from the octets read last time only in a few lines that change
# or remove users named nowhere else (passwd, del-user: _users_rewritten). Those lines are
# found by comparing the two (memcmp of the common start and end), and applied to the
# tables read before. tests/test_mailbox_store.py checks that both give the same tables.

def _users_read(inode, data):
    """What _users_grown() needs to know of the users file just read."""
    return (inode, len(data), data.count(b"\n"), zlib.crc32(data))


def _users_grown(previous, inode, data):
    """(users, by_local, user_domains) of previous plus the lines data has after those
    previous was made from; None when data does not continue them (parse it whole)."""
    old_inode, old_size, old_lines, old_crc = previous.users_read
    if inode is None or inode != old_inode or len(data) < old_size:
        return None
    if zlib.crc32(data[:old_size]) != old_crc:
        return None
    added = _parse_users(_users_lines(data[old_size:]), old_lines + 1)
    users = dict(previous.users)
    by_local = dict(previous.by_local)
    domains = set()
    for address, stored in added.items():
        if address in users:
            continue
        users[address] = stored
        local, domain = address.split("@")
        by_local[local] = by_local.get(local, []) + [address]    # the old list is shared
        domains.add(domain)
    return users, by_local, previous.user_domains | domains


MAX_REWRITTEN_LINES = 50           # more changed lines than this: parse the file whole


def _common_prefix(a, b, block=65536):
    """How many octets a and b have in common at their start."""
    length, same = min(len(a), len(b)), 0
    while same + block <= length and a[same:same + block] == b[same:same + block]:
        same += block
    high = min(length, same + block)
    while same < high:                 # binary search in the block that differs
        middle = (same + high + 1) // 2
        if a[same:middle] == b[same:middle]:
            same = middle
        else:
            high = middle - 1
    return same


def _common_suffix(a, b, length, block=65536):
    """How many octets (at most length) a and b have in common at their end."""
    same = 0
    while same + block <= length and a[len(a) - same - block:len(a) - same] == \
            b[len(b) - same - block:len(b) - same]:
        same += block
    high = min(length, same + block)
    while same < high:
        middle = (same + high + 1) // 2
        if a[len(a) - middle:len(a) - same] == b[len(b) - middle:len(b) - same]:
            same = middle
        else:
            high = middle - 1
    return same


def _users_rewritten(previous, data):
    """(users, by_local, user_domains) of previous with the lines data has instead of its
    own applied, when data is previous's file with a few lines changed or removed (passwd,
    del-user) and each user those lines name has no other line; else None."""
    old = previous.users_data
    if not old or not data or not previous.signature:
        return None
    start = _common_prefix(old, data)
    start = old.rfind(b"\n", 0, start) + 1                    # back to a line's start
    tail = _common_suffix(old, data, min(len(old), len(data)) - start)
    old_end = len(old) - tail
    if old_end > start and old[old_end - 1:old_end] != b"\n":
        old_end = old.find(b"\n", old_end) + 1                # on to the next line's start
    new_end = len(data) - (len(old) - old_end)
    if old_end < start or new_end < start:
        return None
    old_lines = _users_lines(old[start:old_end])
    new_lines = _users_lines(data[start:new_end])
    if max(len(old_lines), len(new_lines)) > MAX_REWRITTEN_LINES:
        return None
    was = _parse_users(old_lines, warn=False)
    now = _parse_users(new_lines, old.count(b"\n", 0, start) + 1)
    if not set(now) <= set(was) or list(now) != [a for a in was if a in now]:
        return None                    # a new user, or a new order: parse it whole
    before, after = data[:start].lower(), data[new_end:].lower()
    for address in was:
        needle = address.encode("utf-8") + b":"
        if (not address.isascii() or previous.users.get(address) != was[address]
                or needle in before or needle in after):
            return None                # the user may have another line: parse it whole
    users = dict(previous.users)
    by_local = previous.by_local
    for address in was:
        if address in now:
            users[address] = now[address]                       # keeps its place
            continue
        del users[address]
        local = address.split("@")[0]
        if by_local is previous.by_local:
            by_local = dict(by_local)
        by_local[local] = [a for a in by_local[local] if a != address]
        if not by_local[local]:
            del by_local[local]
    user_domains = previous.user_domains
    if len(users) < len(previous.users):
        user_domains = frozenset(a.split("@")[1] for a in users)
    return users, by_local, user_domains


# --- Maildir names, sizes and delivery ---

_delivery_counter = itertools.count(1)


def _maildir_host(hostname):
    # Maildir spec (cr.yp.to/proto/maildir.html): "/" and ":" in the host name are
    # written as \057 and \072 so that the name stays one path component without ":".
    return hostname.replace("/", "\\057").replace(":", "\\072")


class CRLFSize:
    """Counts the octets of text fed in blocks, and what they come to once every line ends
    in CRLF and a final CRLF is added if missing (the Maildir W= size, RFC 1939 11).

    A CRLF split between two blocks counts once, as it does in one block.
    """

    def __init__(self):
        self.size = 0
        self._crlf = 0
        self._last = b""

    def add(self, block: bytes) -> None:
        if not block:
            return
        self.size += len(block)
        self._crlf += len(block) + block.count(b"\n")
        if b"\r" in block:            # a count costs per line; LF-only text needs one
            self._crlf -= block.count(b"\r\n")
        if self._last == b"\r" and block[:1] == b"\n":
            self._crlf -= 1
        self._last = block[-1:]

    @property
    def crlf_size(self) -> int:
        return self._crlf + (2 if self._last and self._last != b"\n" else 0)


def crlf_size(data: bytes) -> int:
    """Octets of data once every line ends in CRLF and a final CRLF is added if missing."""
    sizes = CRLFSize()
    sizes.add(data)
    return sizes.crlf_size


def make_maildir(path: str) -> None:
    """Create a Maildir's tmp/, new/ and cur/ (and the folders above) when missing."""
    for sub in MAILDIR_SUBDIRS:
        make_dirs(os.path.join(path, sub))


def maildir_deliver(maildir: str, message, hostname: Optional[str] = None,
                    delivery_id: Optional[str] = None, arrival: Optional[float] = None,
                    look_in_cur: bool = False) -> str:
    """Write message durably into the Maildir at maildir; return the path of the new file.

    message is bytes, or an iterable of bytes blocks copied one at a time (a message
    streamed from the queue file is never whole in memory). The Maildir rule: tmp/NAME
    written and fsync'd, renamed into new/NAME,S=<file size>,W=<size with CRLF line ends>
    (the sizes POP3 needs, counted while copying), new/ fsync'd; a failure leaves nothing
    behind. The Maildir is created when missing. NAME is unique across processes and hosts
    (hostname, default this host's name, is part of it).

    Without delivery_id NAME is new each time: "SECONDS.M<usec>P<pid>Q<counter>R<random>.
    <host>". With one (letters and digits; the router gives the queue id and a digest of
    the recipient) NAME is the same for every attempt of that delivery: "SECONDS.M<usec>
    I<delivery id>.<host>", its time arrival (when the message came; time.time() form).
    Before the rename the file is looked for in new/, and with look_in_cur in cur/ too
    (where a reader may have moved it); when it is there, nothing is delivered and
    AlreadyDelivered is raised. So an attempt repeated after a crash that came between the
    rename and the record of it does not deliver the message twice. What this cannot
    catch: a copy that a reader has deleted meanwhile (a POP3 DELE between the crash and
    the next attempt), or one moved to cur/ when look_in_cur is off.
    """
    host = _maildir_host(hostname or socket.gethostname())
    now = time.time_ns() // 1000
    unique = "P%dQ%dR%s" % (os.getpid(), next(_delivery_counter), secrets.token_hex(8))
    if delivery_id is None:
        base = "%d.M%06d%s.%s" % (now // 1_000_000, now % 1_000_000, unique, host)
    else:
        if not DELIVERY_ID_PATTERN.match(delivery_id) or arrival is None:
            raise ValueError("a delivery id is letters and digits, with an arrival time")
        micros = round(arrival * 1_000_000)
        base = "%d.M%06dI%s.%s" % (micros // 1_000_000, micros % 1_000_000, delivery_id, host)
    new = os.path.join(maildir, "new")

    def final(size, crlf):
        path = os.path.join(new, "%s,S=%d,W=%d" % (base, size, crlf))
        if delivery_id is not None:
            found = _delivered_as(maildir, path, look_in_cur)
            if found:
                raise AlreadyDelivered(found)
        return path
    # The temporary name is new each time: an attempt cut short leaves its own debris.
    temporary = os.path.join(maildir, "tmp", "%d.M%06d%s.%s" % (now // 1_000_000,
                                                               now % 1_000_000, unique, host))
    # The mailbox's first message makes its folders. (Looking before each delivery would
    # cost three stat() calls every time.)
    return _write_durably(temporary, final, message, 0o600,
                          make_folders=lambda: make_maildir(maildir))


def _delivered_as(maildir, path, look_in_cur):
    """The path under which the message that path names (in new/) is in the Maildir
    already, or None. new/ costs one stat. cur/ is read from the Maildir index while cur/
    is as the index saw it, else listed: a stale index hides nothing."""
    if os.path.exists(path):
        return path
    if not look_in_cur:
        return None
    base = _unique_part(os.path.basename(path))
    cur = os.path.join(maildir, "cur")
    try:
        st = os.stat(cur)
    except FileNotFoundError:
        return None
    index = _read_index(maildir)
    # The index's folders seen are "new;cur" (_seen_text()); cur/ must be as it saw it.
    cur_seen = _seen_text([(st.st_mtime_ns, st.st_ino)])
    if index is not None and index[0].partition(";")[2] == cur_seen:
        names = itertools.compress(index[1].names, index[1].in_cur)
    else:
        names = os.listdir(cur)
    return next((os.path.join(cur, name) for name in names if _unique_part(name) == base), None)


def _name_fields(name):
    """(base, {"S": size, "W": size}) from "base,S=1,W=2:2,flags"; absent sizes omitted."""
    base = name.split(":", 1)[0]
    unique, *attributes = base.split(",")
    sizes = {}
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        if key in ("S", "W") and value.isdigit():
            sizes[key] = int(value)
    return unique, base, sizes


def _unique_part(name):
    """The part of a Maildir name before its sizes and flags: "base" of "base,S=1:2,S"."""
    return name.split(":", 1)[0].split(",", 1)[0]


def _uid_for(unique):
    """RFC 1939 7: the unique part of the name if it is printable ASCII and short enough,
    else a hash of it; both stable across sessions, renames for flags, and restarts."""
    if UIDL_PATTERN.match(unique):
        return unique
    return hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()


def _time_key(name):
    seconds = name.split(".", 1)[0]
    return (int(seconds) if seconds.isdigit() else 0, name)


def _open_message(path, raw):
    if raw:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return open(path, "rb")


def _file_blocks(fd, block_size, expected):
    """Yield the blocks of open file fd up to its end. A read shorter than asked for that
    brings the total to EXPECTED octets (the size listed) was at the end already: a file
    gives short reads only there, so the read() that would return b"" is not made (RETR of
    a small message: one read(), not two)."""
    total = 0
    while True:
        block = os.read(fd, block_size)
        if not block:
            return
        yield block
        total += len(block)
        if len(block) < block_size and total >= expected:
            return


def _crlf_blocks(blocks):
    """Yield the bytes of BLOCKS with every line ending made CRLF, ending in CRLF."""
    pending = b""
    last = b""
    for block in blocks:
        if not block:
            continue
        data = pending + block if pending else block
        # A CR at the end of a block may be the first half of a CRLF: keep it back.
        if data.endswith(b"\r"):
            data, pending = data[:-1], b"\r"
        else:
            pending = b""
        if data:
            last = data[-1:]
            if b"\r" in data:       # a memchr(): LF-only text skips a replace() pass
                data = data.replace(b"\r\n", b"\n")
            yield data.replace(b"\n", b"\r\n")
    if pending:
        last = pending
        yield pending
    if last and last != b"\n":
        yield b"\r\n"


def _crlf_top(f, body_lines, block_size=READ_BLOCK):
    """Yield the header, the blank line and body_lines lines of the body (RFC 1939 TOP)."""
    in_header = True
    at_line_start = True
    pending = b""
    ended = True
    while True:
        piece = f.readline(block_size)
        if not piece:
            break
        if pending:
            piece, pending = pending + piece, b""
        complete = piece.endswith(b"\n")
        if not complete and piece.endswith(b"\r"):
            piece, pending = piece[:-1], b"\r"
            if not piece:
                continue
        blank_line = at_line_start and piece in (b"\n", b"\r\n")
        yield piece.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        ended = complete
        at_line_start = complete
        if in_header:
            if blank_line:
                in_header = False
                if body_lines <= 0:
                    return
        elif complete:
            body_lines -= 1
            if body_lines <= 0:
                return
    if pending:
        yield pending
        ended = False
    if not ended:
        yield b"\r\n"


def _measure(path):
    """(file size, CRLF size) of a file whose name does not carry them: read it whole."""
    size = 0
    with open(path, "rb") as f:
        for block in _crlf_blocks(iter(lambda: f.read(READ_BLOCK), b"")):
            size += len(block)
        file_size = f.tell()
    return file_size, size


def _scan(maildir, measure=None):
    """The messages of new/ and cur/ as a _Listing, oldest first (by the seconds that
    start the name, then the name). Sizes come from ,S= and ,W= in the name; a file
    whose name lacks them is measured: measure(path, name), by default read whole."""
    measure = measure or (lambda path, name: _measure(path))
    found = []
    for in_cur, sub in ((0, "new"), (1, "cur")):
        folder = os.path.join(maildir, sub)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith("."):
                continue
            sizes = _name_fields(name)[2]
            file_size, size = sizes.get("S"), sizes.get("W")
            measured = file_size is None or size is None
            if measured:
                try:
                    file_size, size = measure(os.path.join(folder, name), name)
                except (FileNotFoundError, IsADirectoryError):
                    continue
            found.append((_time_key(name), in_cur, size, file_size, measured))
    found.sort()
    return _Listing(names=[entry[0][1] for entry in found],
                    in_cur=bytearray(entry[1] for entry in found),
                    sizes=array.array("q", [entry[2] for entry in found]),
                    file_sizes=array.array("q", [entry[3] for entry in found]),
                    measured=bytearray(entry[4] for entry in found))


# --- Speed: a POP3 login lists a settled Maildir from one index file, measured by bench/maildir_bench.py ---
# The plain form is _scan(): list new/ and cur/, parse every name, read whole each file
# whose name has no ,W= (400 MB a login for 100,000 such files), sort. The listing it
# makes is kept in Maildir/INDEX_FILE with the (mtime_ns, inode) of new/ and cur/ taken
# before the listing began. Any writer that adds, removes or renames a file in a folder
# changes that folder's mtime; so while both are unchanged the index is the listing, and
# is read instead (three arrays and the names in one piece, checked by a CRC-32). A
# folder changed within RECENT_CHANGE seconds of the listing is not trusted (two changes
# in one timestamp tick look like one): such an index never matches. When a folder has
# changed, both are listed again; the index's entries still there keep their place and
# sizes, and the new names are put in order (_updated_listing; _scan() again when most
# changed). A file without ,W= that the index measured, of the same file size (one stat),
# is not read again. The index is a cache: it is written without
# fsync, and a missing, torn or foreign one is ignored. tests/test_mailbox_store.py checks
# that both give the same listing while other writers change the Maildir.

INDEX_FILE = "mailtoolkit.index"
INDEX_MAGIC = b"mailtoolkit-maildir-index 2"
RECENT_CHANGE = 2.0                # seconds; a folder changed this recently is listed again
LARGE_LISTING = 10000              # messages; such a listing is followed by gc.collect()


def _folders_seen(maildir):
    """(mtime_ns, inode) of new/ and of cur/ (None for one missing), and whether both
    changed long enough ago to be trusted."""
    seen, settled = [], True
    now = time.time_ns()
    for sub in ("new", "cur"):
        try:
            st = os.stat(os.path.join(maildir, sub))
        except FileNotFoundError:
            seen.append(None)
            continue
        seen.append((st.st_mtime_ns, st.st_ino))
        settled = settled and now - st.st_mtime_ns > RECENT_CHANGE * 1e9
    return tuple(seen), settled


def _read_index(maildir):
    """(folders seen, _Listing) from the index; None when it is missing or not whole."""
    try:
        with open(os.path.join(maildir, INDEX_FILE), "rb") as f:
            data = f.read()
        end = data.find(b"\n", 0, 256)
        if end < 0:
            return None
        head, body = data[:end], memoryview(data)[end + 1:]      # no copy of the body
        magic, count, names_length, crc, seen = head.rsplit(b" ", 4)
        count, names_length, crc = int(count), int(names_length), int(crc)
        if magic != INDEX_MAGIC or zlib.crc32(body) != crc or len(body) != 18 * count + names_length:
            return None
        listing = _Listing(in_cur=bytearray(body[16 * count:17 * count]),
                           measured=bytearray(body[17 * count:18 * count]))
        listing.sizes.frombytes(body[:8 * count])
        listing.file_sizes.frombytes(body[8 * count:16 * count])
        names = str(body[18 * count:], "utf-8", "surrogateescape")
        listing.names = names.split("\n") if count else []
        if len(listing.names) != count:
            return None
        return seen.decode("ascii"), listing
    except (OSError, ValueError):
        return None


def _seen_text(seen):
    return ";".join("-" if s is None else "%d,%d" % s for s in seen)


def _write_index(maildir, seen, listing):
    """Keep listing in the index, for folders as seen (None: never to be matched)."""
    names = "\n".join(listing.names).encode("utf-8", "surrogateescape")
    if listing.names and names.count(b"\n") != len(listing.names) - 1:
        return                         # a name with a LF, which the index cannot hold
    body = (listing.sizes.tobytes() + listing.file_sizes.tobytes() + bytes(listing.in_cur)
            + bytes(listing.measured) + names)
    head = b"%s %d %d %d %s\n" % (INDEX_MAGIC, len(listing.names), len(names), zlib.crc32(body),
                                   (_seen_text(seen) if seen else "unsettled").encode("ascii"))
    path = os.path.join(maildir, INDEX_FILE)
    temporary = "%s.tmp.%d.%s" % (path, os.getpid(), secrets.token_hex(4))
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, head + body)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc.strerror)
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _indexed_listing(maildir):
    """_scan(maildir), from the index when new/ and cur/ are as it saw them."""
    seen, settled = _folders_seen(maildir)
    index = _read_index(maildir)
    if index is not None and index[0] == _seen_text(seen):
        return index[1]
    measured = None                    # unique part -> (file size, size), made when needed

    def measure(path, name):
        nonlocal measured
        if measured is None:
            old = index[1] if index is not None else _Listing()
            measured = {_unique_part(name): (old.file_sizes[i], old.sizes[i])
                        for i, name in enumerate(old.names) if old.measured[i]}
        known = measured.get(_unique_part(name))
        if known is not None and os.stat(path).st_size == known[0]:
            return known
        return _measure(path)
    listing = None
    if index is not None:
        listing = _updated_listing(maildir, index[1], measure)
    if listing is None:
        listing = _scan(maildir, measure)
    _write_index(maildir, seen if settled else None, listing)
    if len(listing.names) >= LARGE_LISTING:
        # The listing made and dropped a few short-lived objects per message; CPython keeps
        # some of each kind on free lists, scattered over the allocator's arenas, which then
        # cannot go back to the system even once the session ends (100,000 messages: 35
        # MiB kept). A full collection empties those lists (about 10 ms here).
        gc.collect()
    return listing


def _updated_listing(maildir, old, measure):
    """What _scan() gives, made from old (a listing of the same Maildir, in _scan()'s order)
    and one listing of the folders: old's entries still there keep their place and sizes,
    new ones are put in order. None when most of it changed (_scan() is as quick then)."""
    present = []
    for sub in ("new", "cur"):
        try:
            present.append({n for n in os.listdir(os.path.join(maildir, sub))
                            if not n.startswith(".")})
        except FileNotFoundError:
            present.append(set())
    had = (set(itertools.compress(old.names, old.in_cur.translate(_FLIP))),
           set(itertools.compress(old.names, old.in_cur)))
    if (had[0] <= present[0] and had[1] <= present[1]
            and not any(_resized(maildir, old, i)
                        for i in itertools.compress(range(len(old.names)), old.measured))):
        kept = range(len(old.names))   # nothing went: the usual case, new mail came
    else:
        kept = [i for i, name in enumerate(old.names) if name in present[old.in_cur[i]]
                and not (old.measured[i] and _resized(maildir, old, i))]
        had = ({old.names[i] for i in kept if not old.in_cur[i]},
               {old.names[i] for i in kept if old.in_cur[i]})
    added = [(name, in_cur) for in_cur in (0, 1) for name in present[in_cur] - had[in_cur]]
    if len(added) > max(100, len(old.names) // 10):
        return None
    entries = []                       # (key, in_cur, name, size, file_size, measured) to add
    for name, in_cur in added:
        sizes = _name_fields(name)[2]
        file_size, size = sizes.get("S"), sizes.get("W")
        if file_size is None or size is None:
            try:
                file_size, size = measure(os.path.join(maildir, ("new", "cur")[in_cur], name), name)
            except (FileNotFoundError, IsADirectoryError):
                continue
        entries.append(((_time_key(name), in_cur), in_cur, name, size, file_size,
                        int("S" not in sizes or "W" not in sizes)))
    entries.sort()
    if (isinstance(kept, range) and entries and (not kept
            or (_time_key(old.names[-1]), old.in_cur[-1]) < entries[0][0])):
        # All of old, then the new messages after it (they are the newest): no merge.
        return _Listing(
            names=old.names + [entry[2] for entry in entries],
            in_cur=old.in_cur + bytearray(entry[1] for entry in entries),
            sizes=old.sizes + array.array("q", [entry[3] for entry in entries]),
            file_sizes=old.file_sizes + array.array("q", [entry[4] for entry in entries]),
            measured=old.measured + bytearray(entry[5] for entry in entries))
    order = []                         # old index, or -1 - entries index, in _scan()'s order
    position = 0
    for number, entry in enumerate(entries):
        low, high = position, len(kept)
        while low < high:              # binary search: the first kept entry after this one
            middle = (low + high) // 2
            i = kept[middle]
            if (_time_key(old.names[i]), old.in_cur[i]) < entry[0]:
                low = middle + 1
            else:
                high = middle
        order.extend(kept[position:low])
        order.append(-1 - number)
        position = low
    order.extend(kept[position:])
    return _Listing(
        names=[old.names[i] if i >= 0 else entries[-1 - i][2] for i in order],
        in_cur=bytearray(old.in_cur[i] if i >= 0 else entries[-1 - i][1] for i in order),
        sizes=array.array("q", [old.sizes[i] if i >= 0 else entries[-1 - i][3] for i in order]),
        file_sizes=array.array("q", [old.file_sizes[i] if i >= 0 else entries[-1 - i][4]
                                     for i in order]),
        measured=bytearray(old.measured[i] if i >= 0 else entries[-1 - i][5] for i in order))


def _resized(maildir, listing, i):
    """True when entry i's file (measured, not sized by its name) is not of the size
    measured: read it again. A vanished file counts as resized: it is looked for again."""
    try:
        path = os.path.join(maildir, ("new", "cur")[listing.in_cur[i]], listing.names[i])
        return os.stat(path).st_size != listing.file_sizes[i]
    except OSError:
        return True


# --- Mailbox: the POP3 side ---

class Mailbox:
    """A user's Maildir opened for one POP3 session, holding the exclusive maildrop lock.

    Message numbers are fixed when the mailbox is opened (RFC 1939 5). delete() only marks;
    commit() (the UPDATE state, on QUIT) removes what was marked. close() releases the lock;
    the kernel releases it too when the process dies, so a crashed session blocks nothing.
    """

    def __init__(self, user, maildir, lock_fd):
        self.user = user
        self.maildir = maildir
        self._lock_fd = lock_fd
        self._listing = _indexed_listing(maildir)
        self._marks = bytearray(len(self._listing.names))     # _DELETED | _RETRIEVED
        # new/ and cur/ with their separator, so that a RETR's path is one concatenation
        # (os.path.join costs about 2 us a call).
        self._folders = (os.path.join(maildir, "new", ""), os.path.join(maildir, "cur", ""))

    def _path(self, index):
        return self._folders[self._listing.in_cur[index]] + self._listing.names[index]

    @property
    def messages(self) -> list:
        """Every message, deleted or not, in number order."""
        return [MessageInfo(self, number) for number in range(1, len(self) + 1)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self):
        return len(self._listing.names)

    def message(self, number: int) -> Optional[MessageInfo]:
        """The message with this number, or None when there is none or it is deleted."""
        if not 1 <= number <= len(self) or self._marks[number - 1] & _DELETED:
            return None
        return MessageInfo(self, number)

    def listing(self) -> list:
        """Messages not marked deleted, in number order."""
        marks = self._marks
        return [MessageInfo(self, index + 1) for index in range(len(self))
                if not marks[index] & _DELETED]

    def stat(self) -> tuple:
        """(count, octets) of the messages not marked deleted (RFC 1939 5 STAT)."""
        sizes = self._listing.sizes
        if not self.marked()[0]:
            return len(self), sum(sizes)
        live = [index for index, marks in enumerate(self._marks) if not marks & _DELETED]
        return len(live), sum(sizes[index] for index in live)

    def marked(self) -> tuple:
        """(messages marked deleted, messages retrieved) in this session."""
        counts = [self._marks.count(value) for value in range(4)]
        return counts[_DELETED] + counts[3], counts[_RETRIEVED] + counts[3]

    def delete(self, number: int) -> bool:
        if self.message(number) is None:
            return False
        self._marks[number - 1] |= _DELETED
        return True

    def reset(self):
        """Unmark every deleted message (RFC 1939 5 RSET)."""
        for index in range(len(self)):
            self._marks[index] &= ~_DELETED

    def _open(self, index, raw=False):
        """Open message index's file: a binary file object, or with raw=True a descriptor
        (RETR: no file object to make, and no fstat() that making it costs). Another
        Maildir client may have moved the file to cur/."""
        try:
            return _open_message(self._path(index), raw)
        except FileNotFoundError:
            unique = self._listing.names[index].split(":", 1)[0]
            cur = os.path.join(self.maildir, "cur")
            for name in os.listdir(cur):
                if name.split(":", 1)[0] == unique:
                    self._listing.names[index] = name
                    self._listing.in_cur[index] = 1
                    return _open_message(self._path(index), raw)
            raise

    def read(self, number: int, body_lines: Optional[int] = None) -> Iterator[bytes]:
        """Yield the message in blocks with CRLF line ends, exactly info.size octets.

        With body_lines, yield the header, the blank line and that many body lines (TOP).
        Raises FileNotFoundError when the file vanished; byte-stuffing is the caller's.
        """
        index = number - 1
        if body_lines is not None:
            with self._open(index) as f:
                yield from _crlf_top(f, body_lines)
            return
        self._marks[index] |= _RETRIEVED
        size, file_size = self._listing.sizes[index], self._listing.file_sizes[index]
        block_size = min(READ_BLOCK, file_size + 1)     # a small message in one read
        fd = self._open(index, raw=True)
        try:
            blocks = _file_blocks(fd, block_size, file_size)
            if size == file_size == os.fstat(fd).st_size:
                # Delivered with CRLF and a final newline: the file is what is sent.
                yield from blocks
            else:
                yield from _crlf_blocks(blocks)
        finally:
            os.close(fd)

    def commit(self) -> int:
        """RFC 1939 6 UPDATE: remove deleted messages, file retrieved ones as seen in cur/.

        Returns how many were removed. Raises OSError when a removal failed.
        """
        removed = 0
        failures = []
        touched = set()
        for index, marks in enumerate(self._marks):
            if not marks:
                continue
            try:
                if marks & _DELETED:
                    try:
                        os.unlink(self._path(index))
                    except FileNotFoundError:
                        self._open(index).close()
                        os.unlink(self._path(index))
                    removed += 1
                    touched.add(os.path.dirname(self._path(index)))
                elif not self._listing.in_cur[index]:
                    # Maildir: a message seen by the user moves to cur/ with the S flag.
                    name = self._listing.names[index].split(":", 1)[0] + ":2,S"
                    os.rename(self._path(index), os.path.join(self.maildir, "cur", name))
                    touched.update((os.path.join(self.maildir, "new"),
                                    os.path.join(self.maildir, "cur")))
            except FileNotFoundError:
                continue
            except OSError as exc:
                failures.append(exc)
        for folder in touched:
            fsync_dir(folder)
        if failures:
            raise failures[0]
        return removed

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)    # closing the descriptor drops the lock
            self._lock_fd = None


# --- Store ---

class Store:
    """Users, aliases and Maildirs under one spool directory. Thread-safe.

    The users and aliases files are re-read whenever their (mtime_ns, size, inode)
    changes, so a daemon sees a new user or alias without a restart. add-user appends a
    line to the users file; passwd and del-user rewrite it (a new inode).
    """

    def __init__(self, spool_dir: str, domains: Iterable[str] = (), hostname: Optional[str] = None):
        self.spool_dir = os.fspath(spool_dir)
        self.domains = [_check_domain(d.strip(), d) for d in domains if d.strip()]
        self.hostname = hostname or socket.gethostname()
        self.users_path = os.path.join(self.spool_dir, USERS_FILE)
        self.aliases_path = os.path.join(self.spool_dir, ALIASES_FILE)
        self.lock_path = os.path.join(self.spool_dir, STORE_LOCK)
        self.tables_lock = threading.Lock()
        self._tables_cache = _Tables()
        self._snapshots = threading.local()    # .tables: this thread's view inside snapshot()
        self._dummy_hash = None
        # Password hashes are computed on a few long-lived threads: 200 logins at once then
        # wait their turn instead of taking 16 MiB each, and the memory scrypt frees is
        # reused by the next hash instead of staying behind in each connection thread's
        # malloc arena.
        self.hash_pool = ThreadPoolExecutor(HASH_THREADS, "password-hash")
        self.login_cache = _LoginCache()

    # -- tables --

    @contextlib.contextmanager
    def snapshot(self):
        """Within the block, this thread sees users and aliases as they were when it began.

        One look at the files (two stat() calls) then serves a whole routing decision -
        expand(), is_local_domain(), deliver() - which also sees one consistent view.
        """
        self._snapshots.tables = self._tables()
        try:
            yield self
        finally:
            self._snapshots.tables = None

    def _tables(self):
        pinned = getattr(self._snapshots, "tables", None)
        if pinned is not None:
            return pinned
        signature = (_file_signature(self.users_path), _file_signature(self.aliases_path))
        with self.tables_lock:
            tables = self._tables_cache
            if tables.signature != signature:
                tables = self._load(signature)
                self._tables_cache = tables
            return tables

    def _load(self, signature):
        previous = self._tables_cache
        if previous.signature and signature[1] == previous.signature[1]:
            aliases = previous.aliases
        else:
            aliases = _parse_aliases(_read_lines(self.aliases_path))
        inode, data = _read_users(self.users_path)
        grown = _users_grown(previous, inode, data)
        if grown is None:
            grown = _users_rewritten(previous, data)
        if grown is not None:
            users, by_local, user_domains = grown
        else:
            users = _parse_users(_users_lines(data))
            by_local = {}
            for address in users:
                by_local.setdefault(address.split("@")[0], []).append(address)
            user_domains = frozenset(a.split("@")[1] for a in users)
        return _Tables(users=users, by_local=by_local, aliases=aliases,
                       user_domains=user_domains, signature=signature,
                       users_read=_users_read(inode, data), users_data=data)

    def is_local_domain(self, domain: str) -> bool:
        """True for a configured domain or the domain of a user in the store."""
        domain = domain.lower().rstrip(".")
        return domain in self.domains or domain in self._tables().user_domains

    def _primary_domain(self, tables):
        if self.domains:
            return self.domains[0]
        if tables.users:
            return next(iter(tables.users)).split("@")[1]
        return self.hostname.lower()

    # -- expansion --

    def expand(self, address: str) -> list:
        """Final destinations of address: local user addresses and remote addresses.

        Aliases are expanded recursively; "user+tag@d" reaches "user@d" when "user+tag"
        itself is not a user or alias; postmaster and abuse always have a destination.
        Each alias is expanded once, as sendmail and Postfix do: in a loop of aliases
        (a: b, x; b: a, y) every member gets one copy, and an alias reached again adds
        nothing. Raises AddressError, UnknownUser, AliasLoop (deeper than MAX_ALIAS_DEPTH,
        or a loop with no mailbox in it), AliasTooBig (over MAX_ALIAS_RECIPIENTS).
        """
        tables = self._tables()
        if "@" not in address and address.lower() in ROLE_ACCOUNTS:
            address = address + "@" + self._primary_domain(tables)  # RFC 5321 4.5.1
        expansion = _Expansion()
        self._expand(tables, address, (), expansion)
        for alias, target in expansion.skipped:
            log.warning("alias %s: target <%s> has no mailbox, skipped", alias, target)
        finals = list(dict.fromkeys(expansion.out))
        if not finals:                 # nothing raised: every way led round a loop
            raise AliasLoop("alias loop without a mailbox: %s" % " -> ".join(expansion.cycles[0]))
        for cycle in expansion.cycles:
            log.warning("alias loop %s cut: its members get one copy each", " -> ".join(cycle))
        if len(finals) > MAX_ALIAS_RECIPIENTS:
            raise AliasTooBig("alias %s reaches %d addresses, more than %d"
                              % (address, len(finals), MAX_ALIAS_RECIPIENTS))
        return finals

    def _quiet_expand(self, tables, address, strict=False):
        expansion = _Expansion(strict=strict)
        self._expand(tables, address, (), expansion)
        return expansion.out

    def _expand(self, tables, address, path, expansion):
        if len(path) > MAX_ALIAS_DEPTH:
            raise AliasLoop("alias expansion deeper than %d: %s" % (MAX_ALIAS_DEPTH, " -> ".join(path)))
        local, domain = _split_address(address)
        if not (domain in self.domains or domain in tables.user_domains):
            expansion.out.append(local + "@" + domain)
            return
        local = local.lower()
        address = local + "@" + domain
        if address in path:
            # sendmail semantics: "alice: alice, bob" keeps a copy in alice's own mailbox.
            if address in tables.users:
                expansion.out.append(address)
                return
            if expansion.strict:
                raise AliasLoop("alias loop: %s" % " -> ".join(path + (address,)))
            expansion.cycles.append(path + (address,))
            return                     # its members come from its first expansion
        if address in expansion.done:
            return                     # reached another way already; out holds its members
        path += (address,)
        for candidate in self._candidates(local):
            targets = tables.aliases.get(candidate + "@" + domain) or tables.aliases.get(candidate)
            if targets is not None:
                reached = False
                for target in targets:
                    if "@" not in target:
                        target = target + "@" + domain
                    try:
                        self._expand(tables, target, path, expansion)
                        reached = True
                    except UnknownUser:
                        # Like Postfix, a stale target fails alone; the others still get mail.
                        expansion.skipped.append((address, target))
                if not reached:
                    raise UnknownUser("alias %s has no target with a mailbox" % address)
                expansion.done.add(address)
                return
            if candidate + "@" + domain in tables.users:
                expansion.out.append(candidate + "@" + domain)
                expansion.done.add(address)
                return
        role = local.split("+", 1)[0]
        if role in ROLE_ACCOUNTS:
            self._route_role(tables, role, domain, path, expansion)
            expansion.done.add(address)
            return
        raise UnknownUser("no such user: %s" % address)

    @staticmethod
    def _candidates(local):
        """The local part itself, then without its +tag (sub-addressing)."""
        base = local.split("+", 1)[0]
        return (local, base) if base and base != local else (local,)

    def _route_role(self, tables, role, domain, path, expansion):
        """Route postmaster or abuse mail when no alias or user of that name exists.

        abuse goes where postmaster goes; postmaster goes to the first user of the domain
        in the users file, else the first user of the store; with no users at all, to a
        "postmaster" mailbox of the domain, kept until someone adds that user.
        """
        if role == "abuse":
            self._expand(tables, "postmaster@" + domain, path, expansion)
            return
        for address in tables.users:
            if address.endswith("@" + domain):
                expansion.out.append(address)
                return
        expansion.out.append(next(iter(tables.users)) if tables.users else "postmaster@" + domain)

    def recipient_exists(self, address: str) -> bool:
        """True when expand(address) finds a destination (used at RCPT time); False for
        an unknown or malformed address. Raises AliasLoop: a loop is the site's fault,
        not the sender's, and deserves its own answer (5.4.6)."""
        try:
            return bool(self.expand(address))
        except (AddressError, UnknownUser):
            return False

    def sender_addresses(self, user: str) -> set:
        """The user's address and every alias address whose expansion includes it."""
        user = canonical_address(user)
        tables = self._tables()
        addresses = {user}
        local_domains = sorted(set(self.domains) | tables.user_domains)
        for name in tables.aliases:
            names = [name] if "@" in name else [name + "@" + d for d in local_domains]
            for address in names:
                try:
                    if user in self._quiet_expand(tables, address):
                        addresses.add(address)
                except (AddressError, UnknownUser, AliasLoop):
                    continue
        return addresses

    # -- delivery --

    def maildir_path(self, user: str) -> str:
        local, domain = canonical_address(user).split("@")
        return os.path.join(self.spool_dir, MAIL_DIR, domain, local, "Maildir")

    def _may_receive(self, tables, user):
        if user in tables.users:
            return True
        local, domain = user.split("@")
        return (local == "postmaster" and not tables.users
                and (domain in self.domains or domain in tables.user_domains))

    def deliver(self, user: str, message, return_path: str, delivery_id: Optional[str] = None,
                arrival: Optional[float] = None, look_in_cur: bool = False) -> str:
        """Deliver durably into user's Maildir; return the path of the new file.

        message is bytes or an iterable of bytes blocks (see maildir_deliver, which also
        says what delivery_id, arrival and look_in_cur do). Prepends Return-Path and
        Delivered-To (RFC 5321 4.4) in the line ending of the message's first line (LF when
        its first block holds no line end). Raises UnknownUser when user has no mailbox,
        AlreadyDelivered when delivery_id is in the Maildir already, OSError on disk trouble.
        """
        user = canonical_address(user)
        tables = self._tables()
        if not self._may_receive(tables, user):
            raise UnknownUser("no such user: %s" % user)
        whole = isinstance(message, (bytes, bytearray))
        blocks = iter((message,) if whole else message)
        first = next(blocks, b"")
        first_line_end = first.find(b"\n")
        crlf = first_line_end > 0 and first[first_line_end - 1] == 0x0D
        eol = b"\r\n" if crlf else b"\n"
        clean_path = "".join(c for c in return_path if c.isprintable() and c not in "<>")
        header = (b"Return-Path: <" + clean_path.encode("utf-8", "replace") + b">" + eol
                  + b"Delivered-To: " + user.encode("utf-8") + eol)
        # With the first block: a message of one block is written with one write().
        content = header + message if whole else itertools.chain((header + first,), blocks)
        return maildir_deliver(self.maildir_path(user), content, self.hostname, delivery_id,
                               arrival, look_in_cur)

    # -- authentication --

    def authenticate(self, login: str, password: str) -> Optional[str]:
        """The canonical user address when login and password match, else None.

        login is a full address or a bare local part that names one user only. An unknown
        login costs one hash computation too, so timing does not reveal which users exist.
        """
        tables = self._tables()
        user = self._find_login(tables, login)
        stored = tables.users.get(user) if user else None
        if stored is None or not password or len(password) > MAX_PASSWORD:
            self.hash_pool.submit(verify_password, password[:MAX_PASSWORD], self._dummy()).result()
            return None
        if self.login_cache.verified(user, password, stored):
            return user
        if not self.hash_pool.submit(verify_password, password, stored).result():
            return None
        if _outdated(stored):
            stored = self._upgrade_hash(user, password, stored) or stored
        self.login_cache.remember(user, password, stored)
        return user

    def _upgrade_hash(self, user, password, stored):
        """Replace user's outdated hash with one of today's parameters, now that the
        password is known to be right, and return it. Best effort: a failure is logged and
        returns None, and the login it follows succeeds all the same."""
        def change(lines):
            for index, line in enumerate(lines):
                if _parse_users([line]).get(user) == stored:
                    lines[index] = "%s:%s" % (user, fresh)
                    return
            raise _HashChanged(user)

        try:
            fresh = self.hash_pool.submit(hash_password, password).result()
            self._locked_rewrite(self.users_path, 0o600, change)
        except _HashChanged:
            return None
        except (OSError, ValueError, MemoryError) as exc:
            log.warning("<%s>: cannot upgrade the password hash: %s", user, exc)
            return None
        log.info("<%s>: password hash upgraded to %s", user, fresh.rsplit("$", 2)[0])
        return fresh

    def _find_login(self, tables, login):
        login = login.strip()
        if "@" in login:
            try:
                return canonical_address(login)
            except (AddressError, UnicodeError):   # UnicodeError: a name from bad UTF-8
                return None
        matches = tables.by_local.get(login.lower(), [])
        return matches[0] if len(matches) == 1 else None

    def _dummy(self):
        if self._dummy_hash is None:
            self._dummy_hash = self.hash_pool.submit(hash_password, secrets.token_hex(16)).result()
        return self._dummy_hash

    # -- POP3 maildrop --

    def open_mailbox(self, user: str) -> Mailbox:
        """Lock user's maildrop for one session and list its messages. Raises MailboxBusy."""
        user = canonical_address(user)
        if user not in self._tables().users:
            raise UnknownUser("no such user: %s" % user)
        maildir = self.maildir_path(user)
        make_maildir(maildir)
        lock_path = os.path.join(os.path.dirname(maildir), MAILDROP_LOCK)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # lock_file: held by this open file (a second session of this process conflicts
            # too) and seen by other hosts sharing the store; the kernel drops it when the
            # process dies.
            locked = lock_file(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            raise MailboxBusy("maildrop of %s is locked by another session" % user)
        try:
            return Mailbox(user, maildir, fd)
        except BaseException:
            os.close(fd)
            raise

    def remove_stale_tmp(self, max_age: float = MAILDIR_TMP_AGE) -> int:
        """Remove the files in every Maildir's tmp/ under SPOOL/mail/ neither written nor
        read for max_age seconds: deliveries that died half-way. Logs each; returns how
        many went. One pass lists every mailbox: call it now and then, not per message."""
        root = os.path.join(self.spool_dir, MAIL_DIR)
        now = time.time()
        removed = 0
        for domain in _subfolders(root):
            for local in _subfolders(os.path.join(root, domain)):
                tmp = os.path.join(root, domain, local, "Maildir", "tmp")
                try:
                    entries = list(os.scandir(tmp))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    log.warning("cannot list %s: %s", tmp, exc.strerror)
                    continue
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        age = now - max(st.st_mtime, st.st_atime)
                        if age <= max_age:
                            continue
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        log.warning("cannot remove %s: %s", entry.path, exc.strerror)
                        continue
                    removed += 1
                    log.info("user=<%s@%s>, file=%s, age=%dh, status=removed (stale tmp file)",
                             local, domain, os.path.relpath(entry.path, self.spool_dir),
                             age // 3600)
        return removed

    def mailbox_usage(self, user: str) -> tuple:
        """(messages, octets on disk) in user's Maildir, from the sizes in the file names."""
        maildir = self.maildir_path(user)
        count = octets = 0
        for sub in ("new", "cur"):
            folder = os.path.join(maildir, sub)
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                size = _name_fields(entry.name)[2].get("S")
                if size is None:
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue
                count += 1
                octets += size
        return count, octets

    # -- user and alias management (the CLI) --

    @contextlib.contextmanager
    def _store_lock(self):
        """Hold the store lock: one writer of the users and aliases files at a time."""
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            lock_file(fd, wait=True)
            yield
        finally:
            os.close(fd)

    def _locked_rewrite(self, path, mode, change):
        """Under the store lock, read path's lines, let change() edit them, write atomically.

        The lock serialises concurrent add-user runs, so no change is lost. A users line
        without its LF (an add-user cut short) is dropped.
        """
        with self._store_lock():
            if path == self.users_path:
                lines = _users_lines(_read_users(path)[1])
            else:
                lines = _read_lines(path)
            result = change(lines)
            write_atomically(path, "".join(line + "\n" for line in lines), mode)
            return result

    def _locked_append_user(self, address, stored):
        """Under the store lock, append address's line to the users file with one write()
        and fsync it, unless the user exists (ValueError). A last line without its LF, left
        by a crash, is cut off first. The file is not rewritten: N add-user runs cost N
        appends, and a reader that saw the file before reads only the new line."""
        line = ("%s:%s\n" % (address, stored)).encode("utf-8")
        with self._store_lock():
            try:
                fd = os.open(self.users_path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                write_atomically(self.users_path, line.decode("utf-8"), 0o600)
                return
            try:
                with open(fd, "rb", closefd=False) as f:
                    data = f.read()
                end = data.rfind(b"\n") + 1
                # Only a line holding "address:" can name the user: parse when one may.
                if (address + ":") in data[:end].decode("utf-8", "replace").lower():
                    if address in _parse_users(_users_lines(data[:end])):
                        raise ValueError("user %s already exists" % address)
                if end < len(data):
                    log.warning("users: last line had no line end (an add-user cut short), "
                                "removed")
                    os.ftruncate(fd, end)
                if os.write(fd, line) != len(line):
                    os.ftruncate(fd, end)
                    raise OSError("users: short write")
                os.fsync(fd)
            finally:
                os.close(fd)

    def list_users(self) -> list:
        """User addresses in the order of the users file."""
        return list(self._tables().users)

    def add_user(self, address: str, password: str) -> str:
        address = canonical_address(address)
        _check_password(password)
        stored = hash_password(password)
        self._locked_append_user(address, stored)
        return address

    def set_password(self, address: str, password: str) -> str:
        address = canonical_address(address)
        _check_password(password)
        stored = hash_password(password)

        def change(lines):
            for index, line in enumerate(lines):
                if _parse_users([line]).get(address):
                    lines[index] = "%s:%s" % (address, stored)
                    return
            raise UnknownUser("no such user: %s" % address)
        self._locked_rewrite(self.users_path, 0o600, change)
        return address

    def delete_user(self, address: str, purge: bool = False) -> str:
        """Remove the user; its mail stays on disk unless purge is True."""
        address = canonical_address(address)

        def change(lines):
            kept = [line for line in lines if not _parse_users([line]).get(address)]
            if len(kept) == len(lines):
                raise UnknownUser("no such user: %s" % address)
            lines[:] = kept
        self._locked_rewrite(self.users_path, 0o600, change)
        if purge:
            shutil.rmtree(os.path.dirname(self.maildir_path(address)), ignore_errors=True)
        return address

    def list_aliases(self) -> list:
        """(name, [targets]) pairs in the order of the aliases file."""
        return list(self._tables().aliases.items())

    def add_alias(self, name: str, targets: Iterable[str]) -> list:
        """Add targets to alias name (creating it); refuses a change that makes a loop.

        Delivery copes with a loop written into the aliases file by hand (each member
        gets one copy, see expand()); this tool still refuses to make one, which is
        nearly always a typing mistake.
        """
        name = _check_alias_name(name)
        targets = [_check_alias_target(t) for t in targets]
        if not targets:
            raise ValueError("an alias needs at least one target")

        def change(lines):
            entries = _alias_entries(lines)
            old = _parse_aliases(lines).get(name, [])
            merged = list(dict.fromkeys(old + targets))
            self._check_no_loop(name, dict(_parse_aliases(lines), **{name: merged}))
            for index, (entry_name, _) in enumerate(entries):
                if entry_name is not None and _check_alias_name_quiet(entry_name) == name:
                    entries[index] = (name, [_format_alias(name, merged)])
                    break
            else:
                entries.append((name, [_format_alias(name, merged)]))
            lines[:] = [line for _, raw in entries for line in raw]
            return merged
        return self._locked_rewrite(self.aliases_path, 0o644, change)

    def _check_no_loop(self, name, aliases):
        tables = self._tables()
        trial = _Tables(users=tables.users, by_local=tables.by_local, aliases=aliases,
                        user_domains=tables.user_domains, signature=tables.signature)
        domains = [name.split("@")[1]] if "@" in name else (
            sorted(set(self.domains) | tables.user_domains) or [self._primary_domain(tables)])
        for domain in domains:
            address = name if "@" in name else name + "@" + domain
            try:
                self._quiet_expand(trial, address, strict=True)
            except (UnknownUser, AddressError):
                continue

    def delete_alias(self, name: str) -> str:
        name = _check_alias_name(name)

        def change(lines):
            entries = _alias_entries(lines)
            kept = [(n, raw) for n, raw in entries
                    if n is None or _check_alias_name_quiet(n) != name]
            if len(kept) == len(entries):
                raise UnknownUser("no such alias: %s" % name)
            lines[:] = [line for _, raw in kept for line in raw]
        self._locked_rewrite(self.aliases_path, 0o644, change)
        return name


def _check_alias_name_quiet(name):
    try:
        return _check_alias_name(name)
    except AddressError:
        return None


# --- Command line ---

def _read_new_password(stdin=None):
    """Prompt twice on a terminal; read one line when stdin is not a terminal."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        if first != getpass.getpass("Repeat password: "):
            raise ValueError("the passwords do not match")
        return first
    return stdin.readline().rstrip("\r\n")


def _command(args, store):
    if args.command == "add-user":
        print("added %s" % store.add_user(args.address, _read_new_password()))
    elif args.command == "passwd":
        address = canonical_address(args.address)
        if address not in store.list_users():
            raise UnknownUser("no such user: %s" % address)
        print("password changed for %s" % store.set_password(address, _read_new_password()))
    elif args.command == "del-user":
        address = store.delete_user(args.address, purge=args.purge)
        print("deleted %s%s" % (address, " and its mail" if args.purge else " (mail kept)"))
    elif args.command == "list-users":
        for address in store.list_users():
            count, octets = store.mailbox_usage(address)
            print("%s %d messages %d bytes" % (address, count, octets))
    elif args.command == "add-alias":
        name = _check_alias_name(args.name)
        print(_format_alias(name, store.add_alias(name, args.targets)))
    elif args.command == "del-alias":
        print("deleted alias %s" % store.delete_alias(args.name))
    elif args.command == "list-aliases":
        for name, targets in store.list_aliases():
            print(_format_alias(name, targets))
    return 0


def _parser():
    parser = dnsstub.usage_parser(
        prog="mailbox_store.py", description="Manage the users, aliases and Maildirs of a mail spool.")
    spool_help = ("spool directory (default: $%s, else %s or %s when it is a spool)"
                  % (plumbing.SPOOL_ENV, plumbing.LOCAL_SPOOL, plumbing.SYSTEM_SPOOL))
    store_help = ("the store's folder (users, aliases, mail/), when it is not the spool: "
                  "the folder several hosts share")
    parser.add_argument("--spool", default="", help=spool_help)
    parser.add_argument("--store", default="", help=store_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, text):
        # --spool and --store again, so that they may follow the command too.
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--spool", default=argparse.SUPPRESS, help=spool_help)
        sub.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
        return sub

    for name, text in (("add-user", "add a user; password from a prompt or one line of stdin"),
                       ("passwd", "change a user's password")):
        command(name, text).add_argument("address")
    delete = command("del-user", "delete a user (mail kept unless --purge)")
    delete.add_argument("address")
    delete.add_argument("--purge", action="store_true", help="also delete the user's Maildir")
    command("list-users", "users with message count and bytes")
    alias = command("add-alias", "add targets to an alias (created if new)")
    alias.add_argument("name", help="a bare local part (every local domain) or an address")
    alias.add_argument("targets", nargs="+", metavar="TARGET")
    command("del-alias", "delete an alias").add_argument("name")
    command("list-aliases", "aliases as in the aliases file")
    return parser


def _spool_for(args):
    """The store to work on: --store, else the spool (plumbing.find_spool); add-user alone
    may start a new one."""
    if args.store:
        store = os.path.abspath(args.store)
        if not os.path.isdir(store):
            if args.command != "add-user":
                raise ValueError("no store at %s (no such folder)" % store)
            make_dirs(store)
        return store
    try:
        return plumbing.find_spool(args.spool)
    except ValueError:
        if args.command != "add-user":
            raise
    spool = os.path.abspath(args.spool or os.environ.get(plumbing.SPOOL_ENV, "")
                            or plumbing.LOCAL_SPOOL)
    make_dirs(spool)
    print("mailbox_store: created a new spool at %s" % spool, file=sys.stderr)
    return spool


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(format="mailbox_store: %(message)s", level=logging.WARNING)
    try:
        spool = _spool_for(args)
        plumbing.become_spool_owner(spool)
        return _command(args, Store(spool))
    except BrokenPipeError:        # `list-users | head`: the reader had enough
        return plumbing.reader_went_away()
    except (ValueError, LookupError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        print("mailbox_store: %s" % message, file=sys.stderr)
        return 1
    except OSError as exc:
        print("mailbox_store: %s" % exc, file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("mailbox_store: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
