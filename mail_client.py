"""mail_client.py - send and fetch mail from the shell: submission and POP3 client.

send: submits one message to a mail server (RFC 6409 submission, RFC 5321) through
smtp_out's SMTPClient: STARTTLS (RFC 3207) or implicit TLS (RFC 8314), AUTH PLAIN/LOGIN
(RFC 4954), one result per recipient on stdout, and an exit status that is 0 only when
every recipient was accepted. The message comes from stdin or is built from --subject and
--body (with Date, Message-ID, From and To, RFC 5322 3.6).

fetch: downloads a POP3 maildrop (RFC 1939; CAPA RFC 2449, STLS RFC 2595, AUTH PLAIN
RFC 5034, response codes RFC 3206) into a Maildir (tmp/, fsync, rename into new/, fsync)
or an mbox (locked append, fsync). A message is marked for deletion on the server only
once it is on the local disk; the unique-ids (UIDL) of the messages stored are kept in a
state file, so that a connection lost half-way neither loses nor duplicates mail, and
--keep fetches only what is new.

Passwords come from --password-file, from the environment variable --password-env names,
or from a prompt on the terminal; never from the command line, where ps shows them.

Run: python3 mail_client.py send --server mail.example.com --from me@example.com \\
         --to you@example.org --user me@example.com --password-env MAIL_PASSWORD < message
     python3 mail_client.py fetch --server mail.example.com:995 --user me@example.com \\
         --password-file ~/.mailpass --maildir ~/Maildir [--keep] [--limit N]
"""

import argparse
import base64
import dataclasses
import email.message
import email.policy
import email.utils
import errno
import fcntl
import getpass
import logging
import os
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

import mailbox_store
import plumbing
import smtp_out

__all__ = [
    "ClientError", "EXIT_FAILED", "EXIT_OK", "EXIT_TEMPFAIL", "EXIT_USAGE", "FETCH_DEFAULTS",
    "FetchResult", "MaildirWriter", "MboxWriter", "POP3Client", "POP3Error", "SEND_DEFAULTS",
    "UIDLState", "UsageError", "account_key", "build_message", "complete_header", "fetch",
    "main", "mboxrd_escape", "open_submission", "read_password", "response_code", "send",
    "valid_uid",
]

log = logging.getLogger("mail_client")

# --- Constants ---

SUBMISSION_PORT = 587              # RFC 6409 3.1
SUBMISSIONS_PORT = 465             # RFC 8314 7.3: implicit TLS submission
POP3_PORT = 110                    # RFC 1939 3
POP3S_PORT = 995                   # RFC 8314 7.3: implicit TLS POP3
MAX_COMMAND_LINE = 255             # RFC 2449 4: octets, including the CRLF
MAX_RESPONSE_LINE = 512            # RFC 2449 4: octets of a response line, including the CRLF
MAX_LISTING = 1_000_000            # lines of a LIST, UIDL or CAPA answer before it is garbage
MAX_UIDL = 70                      # RFC 1939 7: a unique-id is 1 to 70 characters
MBOX_LOCK_WAIT = 10.0              # seconds to wait for another program's lock on an mbox
PROGRESS_INTERVAL = 1.0            # seconds between progress lines when stderr is not a terminal

TLS_NONE = smtp_out.TLS_NONE
TLS_OPPORTUNISTIC = smtp_out.TLS_OPPORTUNISTIC
TLS_REQUIRED = smtp_out.TLS_REQUIRED
TLS_MODES = (TLS_REQUIRED, TLS_OPPORTUNISTIC, TLS_NONE)

# Exit statuses (sysexits.h where one fits): scripts retry on 75, not on 1. The server's
# word decides (5xx, -ERR at login or with [AUTH]/[SYS/PERM]); the network, TLS and busy
# servers are worth another try later, as smtp_out treats them.
EXIT_OK = 0
EXIT_FAILED = 1                    # refused for good: a recipient, the login, a message
EXIT_USAGE = 2                     # bad flags, no password source (argparse uses 2 too)
EXIT_TEMPFAIL = 75                 # EX_TEMPFAIL: try again later

# Resp-codes (RFC 2449 8, RFC 3206) that say whether trying again later can help.
TEMPORARY_CODES = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP")
PERMANENT_CODES = ("AUTH", "SYS/PERM")

CRLF = b"\r\n"
TERMINATOR = b"\r\n.\r\n"       # RFC 1939 3: the end of a multi-line response

_COMMON = {
    "server": "",                  # HOST[:PORT]; required
    "user": "",                    # login name; send: AUTH only when given
    "password_file": "",
    "password_env": "",
    "tls": TLS_OPPORTUNISTIC,
    "implicit_tls": False,         # default: on for ports 465 and 995
    "insecure": False,
    "ca_file": "",
    "timeout": 60.0,
    "verbose": False,
}
SEND_DEFAULTS = dict(_COMMON, **{
    "from": "",
    "subject": "",
    "body": "",
    "helo": "",                    # default: this host's FQDN
})
FETCH_DEFAULTS = dict(_COMMON, **{
    "maildir": "",
    "mbox": "",
    "keep": False,
    "limit": 0,                    # 0: no limit
    "state_file": "",              # default: MAILDIR/mail_client.uidl or MBOX.uidl
    "max_size": 64 * 1024 * 1024,
    "quiet": False,
})

HELP = {
    "server": "the server as HOST[:PORT] (send: port 587, 465 = implicit TLS; "
              "fetch: port 110, 995 = implicit TLS)",
    "user": "login name (send: AUTH only when given)",
    "password_file": "read the password from the first line of this file",
    "password_env": "read the password from this environment variable",
    "tls": "required, opportunistic (STARTTLS/STLS when offered) or none",
    "implicit_tls": "TLS from the first byte (default for ports 465 and 995)",
    "insecure": "do not verify the server's certificate",
    "ca_file": "PEM file of certificates to trust instead of the system's",
    "timeout": "seconds to wait for the server at each step",
    "verbose": "log the whole dialogue on stderr (passwords redacted)",
    "from": "sender address; also the From: of a message built from --subject",
    "to": "a recipient address (repeatable)",
    "subject": "build the message: this subject, the body from --body or stdin",
    "body": "build the message with this body text",
    "helo": "name sent in EHLO (default: this host's FQDN)",
    "maildir": "deliver into this Maildir (created when missing)",
    "mbox": "append to this mbox file instead",
    "keep": "leave the messages on the server; fetch only new ones next time",
    "limit": "download at most this many messages in this run (0: all)",
    "state_file": "where the unique-ids of the messages already fetched are kept",
    "max_size": "leave messages larger than this many octets on the server",
    "quiet": "no progress lines",
}

# --- What the client says (stdout results, stderr diagnostics) ---

RESULT_LINE = "to=<%s>, status=%s (%s)"     # one per recipient on stdout
SUMMARY_LINE = ("fetch: server=%s, user=<%s>, retrieved=%d, size=%d, deleted=%d, "
                "already=%d, left=%d, status=%s")
PROGRESS_LINE = "fetch: %d/%d messages, %d octets"
E_NO_SERVER = "--server is required"
E_NO_SENDER = "--from needs an address"
E_NO_RECIPIENT = "at least one --to is required"
E_BAD_ADDRESS = "not an address: %r"
E_NO_DESTINATION = "give --maildir DIR or --mbox FILE (one of them)"
E_NO_USER = "--user is required"
E_NO_TERMINAL = ("no password source: use --password-file or --password-env, "
                 "or run on a terminal to be asked")
E_EMPTY_PASSWORD = "the password from %s is empty"
E_NO_ENV = "environment variable %s is not set"
E_BAD_PASSWORD = "a password may not contain CR, LF or NUL"
E_BAD_USER = "a user name may not be empty or contain CR, LF or NUL"
E_POP3_LOST = "lost connection with %s while %s"
E_POP3_TIMEOUT = "%s did not answer in time while %s"
E_POP3_GARBAGE = "%s sent a malformed response while %s"
E_POP3_CONNECT = "cannot connect to %s: %s"
E_POP3_TLS = "TLS with %s failed: %s"
E_POP3_NO_STLS = "TLS is required, but %s does not offer STLS"
E_POP3_PLAINTEXT = "refusing to send a password to %s without TLS"
E_POP3_NO_LOGIN = "%s offers no login this client has (USER, SASL PLAIN)"
E_NO_UIDL = "%s does not support UIDL, which --keep needs"
E_TOO_BIG = "larger than %d octets (--max-size)"
E_TOO_BIG_CLOSED = "message %d is more than twice --max-size (%d octets); connection closed"
E_STATE_BUSY = "another fetch is using %s"
E_MBOX_BUSY = "%s is locked by another program"


# --- Errors and data types ---

class ClientError(Exception):
    """A failure to report on one stderr line; temporary ones exit 75, others 1."""

    def __init__(self, text, temporary=False):
        super().__init__(text)
        self.temporary = temporary


class UsageError(ClientError):
    """Bad or missing settings: exit 2."""


class POP3Error(ClientError):
    """An -ERR from the server, or a local reason (timeout, lost connection, garbage).

    RFC 3206 response codes decide temporary or not when the server sends one.
    """

    def __init__(self, text, temporary=True):
        code = response_code(text)
        if code in TEMPORARY_CODES:
            temporary = True
        elif code in PERMANENT_CODES:
            temporary = False
        super().__init__(text, temporary)
        self.code = code


@dataclass
class FetchResult:
    """What one fetch run did, for the summary line and the exit status."""
    retrieved: int = 0
    octets: int = 0
    deleted: int = 0
    already: int = 0               # on the server and already stored here before
    left: int = 0                  # still to fetch: --limit, too big, or the run stopped
    skipped: list = field(default_factory=list)   # a POP3Error per message left behind


# --- Pure helpers ---

def parse_address(text):
    """The bare address of "Name <addr>" or "addr"; raises UsageError when there is none."""
    address = email.utils.parseaddr(text)[1]
    if "@" not in address or any(c in address for c in "<>\r\n "):
        raise UsageError(E_BAD_ADDRESS % text)
    return address


def build_message(sender, recipients, subject, body, now=None):
    """A text/plain message with Date, Message-ID, From, To and Subject (RFC 5322 3.6).

    Non-ASCII header text becomes encoded words (RFC 2047); a non-ASCII body is sent
    quoted-printable, so the message is 7-bit clean and any server takes it.
    """
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(now, localtime=True)
    message["Message-ID"] = email.utils.make_msgid(domain=parse_address(sender).rpartition("@")[2])
    if not body.endswith("\n"):
        body += "\n"
    message.set_content(body, cte=None if body.isascii() else "quoted-printable")
    return message.as_bytes()


def complete_header(message, sender_domain, now=None):
    """message with a Date and a Message-ID field added when its header lacks them.

    RFC 5322 3.6: Date is required and Message-ID should be there; the originator is the
    right one to add them. Fields are added in the message's own line ending.
    """
    crlf = message.find(b"\r\n")
    eol = b"\r\n" if 0 <= crlf == message.find(b"\n") - 1 else b"\n"
    end = message.find(eol + eol)
    head = message[:end] if end >= 0 else message
    names = set()
    for line in head.split(eol):
        if line[:1] not in (b" ", b"\t"):
            names.add(line.split(b":", 1)[0].strip().lower())
    added = b""
    if b"date" not in names:
        added += b"Date: " + email.utils.formatdate(now, localtime=True).encode("ascii") + eol
    if b"message-id" not in names:
        added += (b"Message-ID: " + email.utils.make_msgid(domain=sender_domain).encode("utf-8")
                  + eol)
    return added + message


def smtp_timeouts(seconds):
    """smtp_out.Timeouts with every stage at seconds, but the end of DATA at least the
    RFC 5321 4.5.3.2.6 ten minutes: a server may scan a large message for a while."""
    values = {f.name: seconds for f in dataclasses.fields(smtp_out.Timeouts)}
    values["data_end"] = max(seconds, smtp_out.Timeouts().data_end)
    return smtp_out.Timeouts(**values)


def result_status(reply):
    """sent, refused (5xx: permanent) or deferred (4xx and local reasons: try later)."""
    if 200 <= reply.code < 300:
        return "sent"
    return "refused" if reply.permanent else "deferred"


def response_code(text):
    """The RFC 2449 8 resp-code of an -ERR line ("IN-USE", "SYS/TEMP"), or ""."""
    rest = text[4:].lstrip(" ") if text.startswith("-ERR") else ""
    if rest.startswith("["):
        code, closed, _ = rest[1:].partition("]")
        if closed:
            return code.upper()
    return ""


def valid_uid(uid):
    """RFC 1939 7: a unique-id is 1 to 70 characters in 0x21-0x7E."""
    return 0 < len(uid) <= MAX_UIDL and all(0x21 <= ord(c) <= 0x7E for c in uid)


def mboxrd_escape(message):
    """The message as an mboxrd entry body: LF line ends, ">" added to every line that
    matches ^>*From , ending in exactly one LF (the separator blank line follows)."""
    text = message.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    escaped = [b">" + line if line.lstrip(b">").startswith(b"From ") else line for line in lines]
    return b"\n".join(escaped) + b"\n"


def envelope_sender(message):
    """The Return-Path address of a message, for an mbox "From " line; else MAILER-DAEMON."""
    for line in message.split(b"\n", 200)[:200]:
        if not line.strip():
            break
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"return-path":
            address = value.strip().strip(b"<>").decode("ascii", "replace")
            if address and all(0x21 <= ord(c) <= 0x7E for c in address):
                return address
            break
    return "MAILER-DAEMON"


# --- Passwords ---

def read_password(config, prompt, environ=None):
    """The password from config's password_file, else its password_env, else the terminal.

    Never from the command line: every local user can read that with ps. A password file
    readable by others gets a warning. Raises UsageError when there is no source.
    """
    environ = os.environ if environ is None else environ
    if config["password_file"]:
        path = os.path.expanduser(config["password_file"])
        try:
            mode = os.stat(path).st_mode
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError("cannot read %s: %s" % (path, exc)) from None
        if mode & 0o077:
            log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
        source = path
    elif config["password_env"]:
        name = config["password_env"]
        if name not in environ:
            raise UsageError(E_NO_ENV % name)
        password, source = environ[name], "$" + name
    else:
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | getattr(os, "O_NOCTTY", 0)))
        except OSError:
            # getpass would fall back to stdin, which holds the message for send.
            raise UsageError(E_NO_TERMINAL) from None
        password, source = getpass.getpass(prompt), "the terminal"
    if not password:
        raise UsageError(E_EMPTY_PASSWORD % source)
    if any(c in password for c in "\r\n\0"):
        raise UsageError(E_BAD_PASSWORD)
    return password


# --- POP3 client ---

class POP3Client(plumbing.ClientConnection):
    """One POP3 session (RFC 1939) with CAPA, STLS and AUTH PLAIN, bounded in every read.

    client = POP3Client("pop.example.com", 110, tls=TLS_OPPORTUNISTIC)
    client.open()                          # greeting, CAPA, STLS as the policy says
    client.login(user, password)           # AUTH PLAIN when offered, else USER/PASS
    sizes, uids = client.listing(), client.uidl()
    data = client.retr(1, max_size)        # LF line ends, unstuffed
    client.dele(1); client.quit()          # deletions happen at QUIT (RFC 1939 6)

    Every failure raises POP3Error. tls is as in smtp_out (none, opportunistic, required),
    but an offered STLS that fails is an error, never a fall-back to plaintext: the
    password would follow. implicit_tls (default: port 995) starts TLS at once.

    Not poplib: it raises on a line over 2048 octets and leaves the session out of step
    (smtp_in takes message lines of 64 KiB, so one such message would stop every later
    fetch), keeps a whole RETR as a list of lines with no size bound, and has no AUTH PLAIN.
    """

    def __init__(self, host, port=POP3_PORT, *, tls=TLS_OPPORTUNISTIC, tls_context=None,
                 implicit_tls=None, timeout=60.0, server_name=None):
        if tls not in TLS_MODES:
            raise ValueError("tls must be none, opportunistic or required")
        self.host = host
        self.address = host            # the IP address once connected
        self.port = port
        self.server_name = server_name or host
        self.implicit_tls = port == POP3S_PORT if implicit_tls is None else implicit_tls
        self.tls = TLS_REQUIRED if self.implicit_tls else tls
        self.tls_context = tls_context or smtp_out.client_tls_context(True)
        self.timeout = timeout
        self.capabilities = {}         # CAPA keyword (upper case) -> argument text

    @property
    def peer(self):
        return "%s:%d" % (self.server_name, self.port)

    def failure(self, kind, detail):
        """The POP3Error for a failed step (plumbing.ClientConnection): all temporary."""
        text = {"connect": E_POP3_CONNECT, "timeout": E_POP3_TIMEOUT, "lost": E_POP3_LOST,
                "garbage": E_POP3_GARBAGE, "tls": E_POP3_TLS}[kind]
        return POP3Error(text % (self.peer, detail))

    # -- connection --

    def open(self):
        """Connect, read the greeting, learn the capabilities, STLS as the policy says."""
        self.open_socket(self.host, self.port, self.timeout)
        if self.implicit_tls:
            self.handshake(self.tls_context, self.server_name, self.timeout)
        self.read_status("reading the greeting")
        self.capa()
        if self.tls != TLS_NONE and not self.tls_active:
            if "STLS" in self.capabilities:
                self.stls()
            elif self.tls == TLS_REQUIRED:
                raise POP3Error(E_POP3_NO_STLS % self.peer)

    def capa(self):
        """RFC 2449 5: the capabilities; none when the server does not know CAPA."""
        if not self.optional_command("CAPA", "asking CAPA"):
            self.capabilities = {}
            return self.capabilities
        capabilities = {}
        for line in self.read_multiline("reading CAPA"):
            keyword, _, argument = line.decode("ascii", "replace").strip().partition(" ")
            if keyword:
                capabilities[keyword.upper()] = argument.strip()
        self.capabilities = capabilities
        return capabilities

    def stls(self):
        """RFC 2595 4: STLS, the handshake, then CAPA again (what came before is void)."""
        self.command("STLS", "asking STLS")
        # RFC 2595 4: bytes the server sent behind its +OK would be injected plaintext.
        self.handshake(self.tls_context, self.server_name, self.timeout)
        self.capa()

    def login(self, user, password):
        """AUTH PLAIN (RFC 5034, RFC 4616) when offered, else USER and PASS (RFC 1939 7).

        Only over TLS or to a loopback address: a password never crosses a network in
        the clear. A refused login is permanent unless the server's code says otherwise.
        """
        if not self.tls_active and not plumbing.is_loopback(self.address):
            raise POP3Error(E_POP3_PLAINTEXT % self.peer)
        if any(c in user for c in "\r\n\0") or not user:
            raise POP3Error(E_BAD_USER, temporary=False)
        mechanisms = self.capabilities.get("SASL", "").upper().split()
        stage = "logging in"
        if "PLAIN" in mechanisms:
            token = b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
            response = base64.b64encode(token).decode("ascii")
            if len("AUTH PLAIN ") + len(response) + 2 <= MAX_COMMAND_LINE:
                return self.command("AUTH PLAIN " + response, stage, secret=True, temporary=False)
            # RFC 5034 4: too long for an initial response; answer the "+ " instead.
            self.send("AUTH PLAIN")
            line = self.read_line(MAX_RESPONSE_LINE, self.timeout, stage)
            if not line.startswith(b"+ ") and line != b"+":
                raise POP3Error(line.decode("utf-8", "replace"), temporary=False)
            return self.command(response, stage, secret=True, temporary=False)
        if "USER" in self.capabilities or not self.capabilities:
            self.command("USER " + user, stage, temporary=False)
            return self.command("PASS " + password, stage, secret=True, temporary=False)
        raise POP3Error(E_POP3_NO_LOGIN % self.peer, temporary=False)

    # -- TRANSACTION state (RFC 1939 5) --

    def stat(self):
        """(messages, octets) in the maildrop."""
        fields = self.command("STAT", "asking STAT").split()
        if len(fields) < 3 or not (fields[1].isdigit() and fields[2].isdigit()):
            raise POP3Error(E_POP3_GARBAGE % (self.peer, "asking STAT"))
        return int(fields[1]), int(fields[2])

    def listing(self):
        """{message number: size in octets} from LIST."""
        self.command("LIST", "asking LIST")
        sizes = {}
        for number, value in self._pairs("reading LIST"):
            if not value.isdigit():
                raise POP3Error(E_POP3_GARBAGE % (self.peer, "reading LIST"))
            sizes[number] = int(value)
        return sizes

    def uidl(self):
        """{message number: unique-id} from UIDL, or None when the server has no UIDL.

        An id that breaks RFC 1939 7 is left out: that message is treated as new.
        """
        if not self.optional_command("UIDL", "asking UIDL"):
            return None
        return {number: uid for number, uid in self._pairs("reading UIDL") if valid_uid(uid)}

    def _pairs(self, stage):
        for line in self.read_multiline(stage):
            number, _, value = line.decode("ascii", "replace").strip().partition(" ")
            if not number.isdigit():
                raise POP3Error(E_POP3_GARBAGE % (self.peer, stage))
            yield int(number), value.strip()

    def retr(self, number, max_size):
        """Message number as bytes with LF line ends, unstuffed (RFC 1939 3).

        The response is read in blocks up to CRLF.CRLF, then unstuffed and converted
        whole (a lone CR or LF inside a line stays as it came). A message over max_size
        octets raises POP3Error (not temporary) once its end was read, so the session
        goes on; one more than twice that size closes the connection.
        """
        stage = "retrieving message %d" % number
        self.command("RETR %d" % number, stage)
        # A CRLF in front lets an empty message (".<CRLF>" at once) end like any other.
        data = bytearray(CRLF)
        scanned = 0
        skipped = 0                    # octets thrown away once the message was too big
        while True:
            end = data.find(TERMINATOR, scanned)
            if end >= 0:
                break
            if len(data) > max_size + len(TERMINATOR):
                skipped += len(data) - len(TERMINATOR)
                del data[:-len(TERMINATOR)]
                if skipped > 2 * max_size:
                    self.close()       # not worth reading to its end
                    raise POP3Error(E_TOO_BIG_CLOSED % (number, max_size), temporary=False)
            scanned = max(0, len(data) - len(TERMINATOR) + 1)
            data += self.read_block(self.timeout, stage)
        # Whatever came after the end belongs to the next response.
        self.reader.buffer[0:0] = data[end + len(TERMINATOR):]
        if skipped or end - len(CRLF) > max_size:
            raise POP3Error(E_TOO_BIG % max_size, temporary=False)
        del data[end + 2:]
        message = bytes(data).replace(b"\r\n.", b"\r\n")[2:]
        return message.replace(b"\r\n", b"\n")

    def dele(self, number):
        return self.command("DELE %d" % number, "deleting message %d" % number)

    def quit(self):
        """QUIT: the server removes what was deleted (RFC 1939 6). True on +OK."""
        try:
            self.command("QUIT", "sending QUIT")
            return True
        except POP3Error as exc:
            log.warning("%s", exc)
            return False
        finally:
            self.close()

    # -- the wire --

    def optional_command(self, line, stage):
        """A command the server may not know (CAPA, UIDL): True on +OK, False on an -ERR
        without a response code; an -ERR with one is real trouble and raises POP3Error."""
        try:
            self.command(line, stage)
        except POP3Error as exc:
            if exc.code:
                raise
            return False
        return True

    def command(self, line, stage, secret=False, temporary=True):
        """Send one command; return its +OK line as text, or raise POP3Error on -ERR
        (temporary says what an -ERR without a response code means here)."""
        self.send(line, secret)
        return self.read_status(stage, temporary)

    def send(self, line, secret=False):
        verb = line.split(" ", 1)[0]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("> %s %s", self.peer, verb + " <redacted>" if secret else line)
        self.send_bytes(line.encode("utf-8") + b"\r\n", self.timeout, "sending " + verb)

    def read_status(self, stage, temporary=True):
        """The status line: its text on +OK; POP3Error (with the server's text) on -ERR.
        Lines are bounded in length and time (RFC 1939 ends them with CRLF; a bare LF is
        taken too)."""
        data = self.read_line(MAX_RESPONSE_LINE, self.timeout, stage)
        text = data.decode("utf-8", "replace")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("< %s %s", self.peer, text)
        if data.startswith(b"+OK"):
            return text
        if data.startswith(b"-ERR"):
            raise POP3Error(text, temporary)
        self.close()
        raise POP3Error(E_POP3_GARBAGE % (self.peer, stage))

    def read_multiline(self, stage):
        """The lines of a multi-line listing up to the lone ".", unstuffed (RFC 1939 3);
        more than MAX_LISTING lines is garbage."""
        for _ in range(MAX_LISTING):
            line = self.read_line(MAX_RESPONSE_LINE, self.timeout, stage)
            if line == b".":
                return
            yield line[1:] if line.startswith(b".") else line
        self.close()
        raise POP3Error(E_POP3_GARBAGE % (self.peer, stage))


# --- Local mailboxes ---

class MaildirWriter:
    """Durable delivery into a Maildir of one's own, through mailbox_store.maildir_deliver
    (tmp/NAME written and fsync'd, renamed into new/, new/ fsync'd).

    mailbox_store.Store.deliver() serves the users of a spool (it wants a user known to
    the store and adds Return-Path and Delivered-To); this writes the message as it came
    into any directory.
    """

    def __init__(self, path, hostname=None):
        self.path = os.path.expanduser(path)
        self.hostname = hostname or socket.gethostname()
        mailbox_store.make_maildir(self.path)

    def __str__(self):
        return self.path

    def add(self, message):
        """Write message durably; return the path of the new file."""
        return mailbox_store.maildir_deliver(self.path, message, self.hostname)

    def close(self):
        pass


class MboxWriter:
    """Appends to an mbox file in the mboxrd form: a "From " line, the message with
    ^>*From lines quoted, a blank line. Each append holds an fcntl (POSIX) lock, as
    mutt and procmail take, is fsync'd, and is cut back off the file if it fails."""

    def __init__(self, path):
        self.path = os.path.expanduser(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        mailbox_store.make_dirs(folder)
        created = not os.path.exists(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            mailbox_store.fsync_dir(folder)

    def __str__(self):
        return self.path

    def add(self, message):
        self._lock()
        try:
            start = os.lseek(self.fd, 0, os.SEEK_END)
            prefix = b""
            if start:
                # The entry before must end in a blank line, else ours would join it.
                os.lseek(self.fd, start - min(start, 2), os.SEEK_SET)
                tail = os.read(self.fd, 2)
                prefix = b"" if tail == b"\n\n" else (b"\n" if tail.endswith(b"\n") else b"\n\n")
            entry = (prefix + b"From " + envelope_sender(message).encode("ascii") + b" "
                     + time.asctime(time.gmtime()).encode("ascii") + b"\n"
                     + mboxrd_escape(message) + b"\n")
            try:
                mailbox_store.write_all(self.fd, entry)
                os.fsync(self.fd)
            except BaseException:
                os.ftruncate(self.fd, start)
                raise
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        return self.path

    def _lock(self):
        until = time.monotonic() + MBOX_LOCK_WAIT
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > until:
                    raise ClientError(E_MBOX_BUSY % self.path, temporary=True) from None
            time.sleep(0.1)

    def close(self):
        os.close(self.fd)


class UIDLState:
    """The unique-ids (RFC 1939 7) of the messages of one account already stored locally.

    The file holds lines "ACCOUNT UID" for every account fetched into one mailbox. A new
    id is appended once its message is durable, and before the message is marked
    deleted, so a run cut short leaves nothing behind that the next run fetches twice.
    flock() keeps two runs on one state file apart.
    """

    def __init__(self, path, account):
        self.path = os.path.expanduser(path)
        self.account = account
        self.uids = set()
        self.other_lines = []
        self.fd = None
        self._open_locked()
        self._load()

    def _open_locked(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        for _ in range(10):
            created = not os.path.exists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ClientError(E_STATE_BUSY % self.path, temporary=True) from None
            # save() renames a new file over the path: make sure ours is still the one.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self.fd = fd
                if created:
                    mailbox_store.fsync_dir(folder)
                return
            os.close(fd)
        raise ClientError(E_STATE_BUSY % self.path, temporary=True)

    def _load(self):
        with open(self.path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").strip()
                if not line or line.startswith("#"):
                    continue
                account, _, uid = line.partition(" ")
                if account == self.account:
                    if valid_uid(uid):
                        self.uids.add(uid)
                else:
                    self.other_lines.append(line)

    def __contains__(self, uid):
        return uid in self.uids

    def add(self, uid):
        """Record uid, after its message is durable, in one write(): a killed process
        cannot lose it. No fsync: a power failure that loses it can only make its message
        come again (the server keeps it until QUIT), never lose it."""
        os.write(self.fd, ("%s %s\n" % (self.account, uid)).encode("utf-8"))
        self.uids.add(uid)

    def save(self, keep):
        """Rewrite the file with this account's ids cut down to keep (what the server still
        holds): write, fsync, rename, fsync the directory."""
        self.uids &= keep
        lines = ["# mail_client: unique-ids of messages already fetched, one per line"]
        lines += self.other_lines
        lines += ["%s %s" % (self.account, uid) for uid in sorted(self.uids)]
        mailbox_store.write_atomically(self.path, "\n".join(lines) + "\n", 0o600)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Progress:
    """Progress lines on stderr: rewritten in place on a terminal, else one a second."""

    def __init__(self, total, stream, enabled=True):
        self.total = total
        self.stream = stream
        self.enabled = enabled and total > 0
        self.tty = self.enabled and stream.isatty()
        self.last = 0.0
        self.shown = False

    def update(self, done, octets):
        if not self.enabled:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < (0.1 if self.tty else PROGRESS_INTERVAL):
            return
        self.last = now
        self.shown = True
        text = PROGRESS_LINE % (done, self.total, octets)
        self.stream.write("\r" + text if self.tty else text + "\n")
        self.stream.flush()

    def stop(self):
        """End the line rewritten in place, if one was shown."""
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --- The two commands ---

def server_address(config, default_port):
    if not config["server"]:
        raise UsageError(E_NO_SERVER)
    try:
        return plumbing.parse_hostport(config["server"], default_port)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def tls_context(config, implicit_tls):
    """The client context: verified against the system's CAs or --ca-file, or not at all.

    With --tls none (and no implicit TLS) nothing is verified, since nothing will be:
    loading the system's CAs costs more than a whole loopback session.
    """
    if config["tls"] not in TLS_MODES:
        raise UsageError("--tls must be required, opportunistic or none")
    verify = not config["insecure"] and (config["tls"] != TLS_NONE or implicit_tls)
    ca_file = os.path.expanduser(config["ca_file"]) if config["ca_file"] else None
    try:
        return smtp_out.client_tls_context(verify, ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("cannot load %s: %s" % (ca_file, exc)) from None


def open_submission(config, host, port, context, implicit_tls):
    """An SMTPClient past EHLO and STARTTLS as config's tls says; raises DeliveryError.

    smtp_out's opportunistic mode falls back to plaintext when an offered STARTTLS
    fails (RFC 7435, right for MX delivery). A person who asked for a verified server
    wants an error instead, before any password is sent: so opportunistic here is
    smtp_out's no-downgrade mode, in the clear only with a server that offers no STARTTLS.
    """
    tls = config["tls"]
    if tls == TLS_OPPORTUNISTIC:
        tls = smtp_out.TLS_OPPORTUNISTIC_NO_DOWNGRADE
    client = smtp_out.SMTPClient(
        host, port, helo_name=config["helo"] or socket.getfqdn(), tls=tls,
        tls_verify=context.verify_mode == ssl.CERT_REQUIRED, tls_context=context,
        implicit_tls=implicit_tls, timeouts=smtp_timeouts(config["timeout"]))
    client.open()
    return client


def send(config, message, out=None):
    """Submit message to config's server; print one line per recipient; return the exit
    status: 0 when every recipient was accepted, 1 when one was refused, 75 when one
    could not be sent for now."""
    out = out or sys.stdout
    host, port = server_address(config, SUBMISSION_PORT)
    if not config["from"]:
        raise UsageError(E_NO_SENDER)
    sender = parse_address(config["from"])
    if not config["to"]:
        raise UsageError(E_NO_RECIPIENT)
    recipients = [parse_address(text) for text in config["to"]]
    implicit_tls = config["implicit_tls"] or port == SUBMISSIONS_PORT
    context = tls_context(config, implicit_tls)
    password = read_password(config, "Password for %s: " % config["user"]) if config["user"] else None
    client = None
    try:
        client = open_submission(config, host, port, context, implicit_tls)
        if password is not None:
            client.login(config["user"], password)
        results = client.send_message(sender, recipients, message)
    except smtp_out.DeliveryError as exc:
        if client is not None:
            client.close()
        log.error("send: %s", exc.reply.text)
        return EXIT_FAILED if exc.reply.permanent else EXIT_TEMPFAIL
    client.quit()
    for result in results:
        print(RESULT_LINE % (result.recipient, result_status(result.reply), result.reply.text),
              file=out)
    if all(result.delivered for result in results):
        return EXIT_OK
    return EXIT_FAILED if any(r.permanent for r in results) else EXIT_TEMPFAIL


def account_key(user, host):
    """How the state file names an account: user@host, the user %-quoted. Not the port:
    one maildrop reached on 110 and on 995 is one account."""
    return "%s@%s" % (urllib.parse.quote(user, safe="@"), host.lower())


def fetch(config, err=None):
    """Download config's maildrop into its Maildir or mbox; return the exit status."""
    err = err or sys.stderr
    host, port = server_address(config, POP3_PORT)
    if not config["user"]:
        raise UsageError(E_NO_USER)
    if bool(config["maildir"]) == bool(config["mbox"]):
        raise UsageError(E_NO_DESTINATION)
    implicit_tls = config["implicit_tls"] or port == POP3S_PORT
    context = tls_context(config, implicit_tls)
    password = read_password(config, "Password for %s: " % config["user"])
    if config["maildir"]:
        mailbox = MaildirWriter(config["maildir"])
        state_path = os.path.join(mailbox.path, "mail_client.uidl")
    else:
        mailbox = MboxWriter(config["mbox"])
        state_path = mailbox.path + ".uidl"
    user = config["user"]
    try:
        state = UIDLState(config["state_file"] or state_path, account_key(user, host))
    except BaseException:
        mailbox.close()
        raise
    client = POP3Client(host, port, tls=config["tls"], tls_context=context,
                        implicit_tls=implicit_tls, timeout=config["timeout"])
    result = FetchResult()
    status = "done"
    try:
        exit_status = _fetch_session(config, client, password, mailbox, state, result, err)
    except ClientError as exc:
        log.error("fetch: %s", exc)
        status = "failed"
        exit_status = EXIT_TEMPFAIL if exc.temporary else EXIT_FAILED
    except OSError as exc:             # the local disk: nothing was deleted on the server
        log.error("fetch: cannot write to %s: %s", mailbox, exc)
        status = "failed"
        exit_status = EXIT_TEMPFAIL
    finally:
        client.close()
        state.close()
        mailbox.close()
    if exit_status and status == "done":
        status = "partial"
    print(SUMMARY_LINE % ("%s:%d" % (host, port), user, result.retrieved, result.octets,
                          result.deleted, result.already, result.left, status), file=err)
    return exit_status


def _fetch_session(config, client, password, mailbox, state, result, err):
    """The POP3 session of fetch(): each message stored, its id recorded, then deleted."""
    keep = config["keep"]
    client.open()
    client.login(config["user"], password)
    sizes = client.listing()
    uids = client.uidl()
    if uids is None:
        if keep:
            raise POP3Error(E_NO_UIDL % client.peer, temporary=False)
        log.warning("%s has no UIDL: after a lost connection some messages may come twice",
                    client.peer)
        uids = {}
    todo, deleted, quit_ok, progress = [], set(), False, None
    try:
        for number in sorted(sizes):
            uid = uids.get(number)
            if uid is None or uid not in state:
                todo.append(number)
                continue
            result.already += 1
            if not keep:
                # Stored by a run that lost its connection before QUIT, so the server
                # kept it (RFC 1939 6): delete it now, never fetch it twice.
                client.dele(number)
                deleted.add(uid)
        if config["limit"] > 0:
            todo = todo[:config["limit"]]
        progress = Progress(len(todo), err, not config["quiet"])
        for number in todo:
            uid = uids.get(number)
            try:
                if sizes[number] > config["max_size"]:
                    raise POP3Error(E_TOO_BIG % config["max_size"], temporary=False)
                message = client.retr(number, config["max_size"])
            except POP3Error as exc:
                if client.sock is None:
                    raise              # the session is gone; what is stored stays stored
                result.skipped.append(exc)         # an -ERR for this message only
                log.warning("fetch: message %d left on the server: %s", number, exc)
                continue
            mailbox.add(message)           # durable before anything else happens to it
            if uid is not None:
                state.add(uid)
            result.retrieved += 1
            result.octets += len(message)
            if not keep:
                client.dele(number)
                deleted.add(uid)
            progress.update(result.retrieved, result.octets)
        quit_ok = client.quit()
    finally:
        if progress is not None:
            progress.stop()
        result.left = len(sizes) - result.already - result.retrieved
        if quit_ok:
            result.deleted = len(deleted)
        # Forget the ids the server no longer holds: those deleted at QUIT, and those
        # some other client removed (the file stays as small as the maildrop).
        state.save(set(uids.values()) - (deleted if quit_ok else set()))
    if not quit_ok or any(exc.temporary for exc in result.skipped):
        return EXIT_TEMPFAIL
    return EXIT_FAILED if result.skipped else EXIT_OK


# --- Command line ---

def read_message(config, stdin):
    """The message to send: built from --subject/--body (a body from stdin when --body is
    not given), or read whole from stdin with a missing Date or Message-ID added."""
    if not config["from"]:
        raise UsageError(E_NO_SENDER)
    if not config["to"]:
        raise UsageError(E_NO_RECIPIENT)     # before stdin is read
    sender = parse_address(config["from"])
    if config["subject"] or config["body"]:
        body = config["body"]
        if not body:
            body = stdin.read().decode("utf-8", "replace")
        return build_message(config["from"], config["to"], config["subject"], body)
    message = stdin.read()
    if not message.strip():
        raise UsageError("no message on stdin")
    return complete_header(message, sender.rpartition("@")[2])


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mail_client.py", description="Send mail through a submission server, fetch it "
        "from a POP3 server. Settings: built-in defaults, then the INI file's [send] or "
        "[fetch] section, then flags.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    send_parser = plumbing.add_options(commands.add_parser(
        "send", help="submit one message (stdin, or --subject/--body)", allow_abbrev=False,
        description="Submit one message; one result line per recipient on stdout; exit 0 "
        "when all were accepted, 1 when one was refused, 75 when one should be tried again."),
        SEND_DEFAULTS, HELP)
    # Not a plumbing list option: those split on spaces and commas, and "Bob <b@x>" has one.
    send_parser.add_argument("--to", action="append", default=[], metavar="ADDRESS",
                             help=HELP["to"])
    plumbing.add_options(commands.add_parser(
        "fetch", help="download a POP3 maildrop into a Maildir or an mbox", allow_abbrev=False,
        description="Download every message (or only new ones with --keep) into a Maildir "
        "or an mbox; a message is deleted on the server only once it is on the local disk."),
        FETCH_DEFAULTS, HELP)
    args = parser.parse_args(argv)
    defaults = SEND_DEFAULTS if args.command == "send" else FETCH_DEFAULTS
    try:
        config = plumbing.load_config(args.command, defaults, args)
    except ValueError as exc:
        print("mail_client: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    if args.command == "send":
        config["to"] = args.to
    plumbing.setup_logging("mail_client", verbose=config["verbose"])
    try:
        if args.command == "send":
            return send(config, read_message(config, sys.stdin.buffer))
        return fetch(config)
    except UsageError as exc:
        print("mail_client: %s: %s" % (args.command, exc), file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        log.error("%s: %s", args.command, exc)
        return EXIT_TEMPFAIL if exc.temporary else EXIT_FAILED
    except OSError as exc:
        log.error("%s: %s", args.command, exc)
        return EXIT_TEMPFAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
