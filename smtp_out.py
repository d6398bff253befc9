"""smtp_out.py - outbound delivery: the SMTP client and the outbound queue daemon (RFC 5321).

Takes the remote recipients mta.py put in the outbound queue (SPOOL/queue/outbound/, see
mta.py), finds each domain's mail servers with dnsstub (RFC 5321 5.1: MX by preference,
implicit MX, RFC 7505 null MX), speaks SMTP to them (ESMTP extensions SIZE RFC 1870,
8BITMIME RFC 6152, PIPELINING RFC 2920, STARTTLS RFC 3207, AUTH RFC 4954, SMTPUTF8
RFC 6531; enhanced status codes RFC 3463) and records each recipient's result on mta's
claim of the message: delivered, deferred (mta retries it on its schedule until the queue
lifetime ends, then bounces it with 4.4.7) or failed (mta bounces it with an RFC 3464
report whose Diagnostic-Code is the remote reply). It writes nothing else.

A result is appended to the queue file the moment the server has answered, so a crash
delivers a recipient twice only if it falls between the remote 250 and that one write().

Mail never goes to this host itself (RFC 5321 5.1). An MX host is this host when its name
is our hostname, one of its addresses is in my_addresses, or one of its addresses with the
remote port is one of my_listeners, our own MX listeners (run_all sets it from --smtp; a
0.0.0.0 or :: listener stands for every address of this machine). Only MX hosts preferred
to it are tried, and when it is the best, the recipients bounce at once: 5.4.6 "mail for
DOMAIN loops back to myself". A server we do connect to is this host when its greeting or
its EHLO reply begins with our hostname (Postfix's check): 5.4.6 again when it is the best
MX or the relay host, 4.4.6 (and no server after it) when it is a backup.

The SMTPClient class is public and reusable on its own (a submission client uses it too):
connect, EHLO with HELO fallback, STARTTLS (opportunistic or required, verified or not),
implicit TLS on port 465, AUTH PLAIN/LOGIN, pipelined MAIL/RCPT/DATA, per-recipient results.

Run: python3 smtp_out.py --spool /var/spool/mail [--dns 127.0.0.1:53] [--remote-port 25] [--once]
     python3 smtp_out.py --spool DIR --relay-host smtp.example.net:587 --relay-auth-file F
"""

import base64
import collections
import dataclasses
import ipaddress
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field

import dnsstub
import mta
import plumbing

__all__ = [
    "DEFAULTS", "HELP", "Deliverer", "DeliveryError", "HandshakeError", "Hop", "LoopBack", "Outcome",
    "OutboundDaemon", "RecipientResult", "Reply", "SMTPClient", "TLS_MODES", "TLS_NONE",
    "TLS_OPPORTUNISTIC", "TLS_OPPORTUNISTIC_NO_DOWNGRADE", "TLS_REQUIRED", "Timeouts",
    "client_tls_context", "encode_data", "encode_data_blocks", "is_local_address", "main",
    "message_blocks", "needs_smtputf8", "plan_hops", "read_credentials",
]

log = logging.getLogger("smtp_out")

# --- Constants ---

SMTP_PORT = 25                     # RFC 5321 4.5.4
SUBMISSIONS_PORT = 465             # RFC 8314 3.3: implicit TLS for submission
MAX_REPLY_LINE = 2048              # RFC 5321 4.5.3.1.5 says 512; be lenient with servers
MAX_REPLY_LINES = 100              # a multi-line reply longer than this is garbage
SEND_BLOCK = 1 << 20               # bytes handed to the kernel per send of message data
MAX_RCPT = 50                      # recipients per transaction (RFC 5321 4.5.3.1.8 asks 100 of servers)
POLL_INTERVAL = 60.0               # seconds between queue scans when no wake-up comes
WORKER_IDLE = 1.0                  # seconds an idle worker sleeps between looks at the jobs
PATH_BREAKERS = re.compile("[\x00-\x1f\x7f<>]")   # what may not stand inside <...>
ONCE_SLICE = 500                   # messages claimed at once by --once

TLS_NONE = "none"                  # never STARTTLS
TLS_OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered; plaintext when not or on failure
TLS_OPPORTUNISTIC_NO_DOWNGRADE = "opportunistic-no-downgrade"  # plaintext only when not offered
TLS_REQUIRED = "required"          # no TLS, no mail (deferred)
TLS_MODES = (TLS_NONE, TLS_OPPORTUNISTIC, TLS_OPPORTUNISTIC_NO_DOWNGRADE, TLS_REQUIRED)

DEFAULTS = {
    "spool": "",                   # plumbing.spool_path: $MAILTOOLKIT_SPOOL, else ./mailspool
    "hostname": "",                # default: socket.getfqdn(); sent in EHLO
    "dns": "",                     # default: the nameservers of /etc/resolv.conf
    "remote_port": SMTP_PORT,
    "relay_host": "",
    "relay_auth_file": "",         # "user:password" on one line; never a flag value
    "relay_tls": TLS_REQUIRED,     # one of TLS_MODES, for the relay host
    "relay_insecure": False,       # do not verify the relay host's certificate
    "tls_verify": False,           # MX delivery: require TLS and a verified certificate
    "tls_ca_file": "",             # CA bundle for verification instead of the system's
    "my_addresses": [],            # this host's public addresses, for self-MX detection
    "my_listeners": [],            # HOST:PORT of this host's own MX listeners (smtp_in)
    "max_connections": 20,
    "max_per_destination": 10,
    "max_rcpt": MAX_RCPT,
    "max_mx_addresses": 5,
    "max_mx_sessions": 2,
    "poll_interval": POLL_INTERVAL,
    "queue_lifetime": float(mta.QUEUE_LIFETIME),   # as mta's: a deferral past it bounces (4.4.7)
    "delay_warning": float(mta.DELAY_WARNING),     # first delay notice to the sender
    "retry_schedule": mta.DEFAULTS["retry_schedule"],  # as mta's: waits between tries
    # Seconds allowed per stage of a session (Timeouts); RFC 5321 4.5.3.2 where it gives one.
    "connect_timeout": 30.0,       # not in the RFC; Postfix's smtp_connect_timeout
    "greeting_timeout": 300.0,     # 4.5.3.2.1 initial 220 message: 5 minutes
    "ehlo_timeout": 300.0,         # as for MAIL
    "starttls_timeout": 300.0,     # the 220 to STARTTLS and the handshake
    "auth_timeout": 300.0,
    "mail_timeout": 300.0,         # 4.5.3.2.2 MAIL command: 5 minutes
    "rcpt_timeout": 300.0,         # 4.5.3.2.3 RCPT command: 5 minutes
    "data_start_timeout": 120.0,   # 4.5.3.2.4 DATA initiation: 2 minutes
    "data_block_timeout": 180.0,   # 4.5.3.2.5 each data block sent: 3 minutes
    "data_end_timeout": 600.0,     # 4.5.3.2.6 DATA termination: 10 minutes
    "rset_timeout": 20.0,          # not in the RFC; Postfix's smtp_rset_timeout
    "quit_timeout": 20.0,          # likewise, we only wait to be polite
    "once": False,
    "cpus": "",
    "user": "",                    # started as root: run as this user (after reading the files)
    "syslog": False,
    "verbose": False,
}

HELP = {
    "hostname": "name sent in EHLO and checked against MX targets (default: the FQDN)",
    "relay_auth_file": "file with one line user:password for AUTH to the relay host",
    "relay_tls": "TLS to the relay host: none, opportunistic, opportunistic-no-downgrade or "
                 "required",
    "relay_insecure": "do not verify the relay host's certificate",
    "tls_verify": "MX delivery: require STARTTLS with a verified certificate, else defer",
    "tls_ca_file": "PEM CA bundle to verify certificates with (default: the system's)",
    "my_addresses": "an address of this host, for self-MX detection (repeatable)",
    "my_listeners": "HOST:PORT where this host's own MX (smtp_in) listens, for self-MX "
                    "detection; HOST 0.0.0.0 or :: means every address of this machine "
                    "(repeatable; run_all sets it from --smtp)",
    "max_connections": "outbound SMTP sessions at once, in total",
    "max_per_destination": "outbound SMTP sessions at once per destination domain",
    "max_rcpt": "recipients per transaction",
    "max_mx_addresses": "server addresses tried per delivery attempt",
    "max_mx_sessions": "SMTP sessions completed per delivery attempt",
    "poll_interval": "seconds between queue scans when no wake-up comes",
    "queue_lifetime": "seconds a message may stay queued before it bounces (as mta's)",
    "delay_warning": "seconds queued before the sender gets a delay notice (as mta's)",
    "retry_schedule": "waits between tries, e.g. 5m,10m,20m,40m,1h; the last repeats (as mta's)",
    "once": "deliver what is due now, then exit",
    "user": "user to run as when started as root (after reading relay_auth_file)",
}
# RFC 5321 4.5.3.2: how long the client waits at each step of a session.
HELP.update(("%s_timeout" % step, "seconds to wait for the %s (RFC 5321 4.5.3.2)" % what)
            for step, what in (("connect", "TCP connection"), ("greeting", "220 greeting"),
                               ("ehlo", "EHLO reply"), ("starttls", "STARTTLS reply and handshake"),
                               ("auth", "AUTH replies"), ("mail", "MAIL reply"),
                               ("rcpt", "RCPT reply"), ("data_start", "354 after DATA"),
                               ("data_block", "server to take each block of the message"),
                               ("data_end", "reply after the final dot"), ("rset", "RSET reply"),
                               ("quit", "QUIT reply")))

# --- Replies this side makes up (local reasons; the first word is the enhanced code) ---
# They become Reply objects with remote=False, so nobody takes them for a server's words.

R_CONNECT_FAILED = "4.4.1 connect to %s failed: %s"
R_TIMEOUT = "4.4.2 conversation with %s timed out while %s"
R_LOST = "4.4.2 lost connection with %s while %s"
R_PROTOCOL = "4.5.0 %s sent a malformed reply while %s"
R_GREETING_REFUSED = "4.3.2 %s refused to talk to me: %s"
R_TLS_NOT_OFFERED = "4.7.4 TLS is required, but was not offered by %s"
R_TLS_FAILED = "4.7.5 TLS with %s failed: %s"
R_AUTH_PLAINTEXT = "4.7.0 refusing to send credentials to %s without TLS"
R_AUTH_NO_MECHANISM = "4.7.0 %s offers no AUTH mechanism this client has (PLAIN, LOGIN)"
R_AUTH_NOT_OFFERED = "4.7.0 %s does not offer AUTH"
R_TOO_BIG = "5.3.4 message size %d exceeds the limit of %d announced by %s"
R_NEED_SMTPUTF8 = "5.6.7 %s does not support SMTPUTF8, needed for <%s>"
R_NEED_8BITMIME = "5.6.3 the message has 8-bit data and %s does not support 8BITMIME"
R_BAD_ADDRESS = "5.1.3 bad address syntax <%s>"
R_BAD_SENDER = "5.1.7 bad sender address syntax <%s>"
R_MX_LOOP = "5.4.6 mail for %s loops back to myself"
R_MX_LOOP_LATER = "4.4.6 mail for %s loops back to myself"     # a backup MX was this host
R_DNS = "%s %s"                    # the resolver's status and reason


# --- Errors and data types ---

@dataclass
class Reply:
    """One SMTP reply: the code, its text lines, and whether a server sent it.

    A local reply (remote=False) stands for a reason found on this side (a timeout, a
    refused connection, a size limit); its code is 451 or 554 and its first word the
    enhanced status, so callers treat both kinds alike.
    """
    code: int
    lines: list = field(default_factory=list)
    remote: bool = True

    @classmethod
    def local(cls, text):
        """A reply for a local reason; text starts with its enhanced status code."""
        return cls(451 if text.startswith("4") else 554, [text], remote=False)

    @property
    def ok(self):
        return 200 <= self.code < 400

    @property
    def permanent(self):
        return self.code >= 500

    @property
    def status(self):
        """The RFC 3463 enhanced status code, or the class's X.0.0 when the reply has none."""
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        parts = first.split(".")
        if (len(parts) == 3 and all(p.isdigit() and len(p) <= 3 for p in parts)
                and parts[0] == str(self.code // 100)):
            return first
        return "%d.0.0" % (self.code // 100)

    @property
    def text(self):
        """The reply as one line, for logs and bounces (a local one without its code)."""
        joined = " ".join(line.strip() for line in self.lines)
        if self.remote:
            return "%d %s" % (self.code, joined)
        return joined.split(" ", 1)[1] if " " in joined else joined

    def __str__(self):
        return self.text


class DeliveryError(Exception):
    """A delivery attempt failed. STYLE rule 10: decided once, where the answer arrives.

    permanent=True means "bounce now", False "retry later". reply is a Reply (remote, or
    local for reasons such as timeouts).
    """

    def __init__(self, reply, permanent=None):
        if isinstance(reply, str):
            reply = Reply.local(reply)
        super().__init__(reply.text)
        self.reply = reply
        self.permanent = reply.permanent if permanent is None else permanent


@dataclass
class RecipientResult:
    """The outcome for one recipient: the RCPT reply when it was refused, else the reply
    to the end of DATA (RFC 5321 3.3: it applies to every accepted recipient)."""
    recipient: str
    reply: Reply

    @property
    def delivered(self):
        return 200 <= self.reply.code < 300

    @property
    def permanent(self):
        return self.reply.permanent


@dataclass
class Timeouts:
    """Seconds allowed per stage; the defaults are DEFAULTS' NAME_timeout keys."""
    connect: float = DEFAULTS["connect_timeout"]
    greeting: float = DEFAULTS["greeting_timeout"]
    ehlo: float = DEFAULTS["ehlo_timeout"]
    starttls: float = DEFAULTS["starttls_timeout"]
    auth: float = DEFAULTS["auth_timeout"]
    mail: float = DEFAULTS["mail_timeout"]
    rcpt: float = DEFAULTS["rcpt_timeout"]
    data_start: float = DEFAULTS["data_start_timeout"]
    data_block: float = DEFAULTS["data_block_timeout"]
    data_end: float = DEFAULTS["data_end_timeout"]
    rset: float = DEFAULTS["rset_timeout"]
    quit: float = DEFAULTS["quit_timeout"]

    @classmethod
    def scaled(cls, factor):
        """Every default multiplied by factor (tests use short ones)."""
        return cls(**{f.name: f.default * factor for f in dataclasses.fields(cls)})


@dataclass
class Hop:
    """One server address to try for a destination, in order."""
    name: str                      # the MX host name (TLS SNI and verification, logs)
    address: str                   # an IP address, or a name the system resolves
    port: int
    preference: int = 0


@dataclass
class Outcome:
    """What one delivery attempt did for one recipient, as logged and recorded."""
    recipient: str
    reply: Reply
    relay: str = "none"            # name[address]:port of the server that answered (the log)
    remote_mta: str = ""           # that server's host name (the DSN's Remote-MTA)

    @property
    def status(self):
        if 200 <= self.reply.code < 300:
            return "sent"
        return "bounced" if self.reply.permanent else "deferred"


class LoopBack(DeliveryError):
    """The server named itself with this host's own name (in its greeting or its reply to
    EHLO): talking to it is talking to ourselves. Deliverer makes it R_MX_LOOP."""

    def __init__(self, peer, name):
        super().__init__("4.4.6 %s greeted me with my own hostname %s" % (peer, name))
        self.name = name


class HandshakeError(DeliveryError):
    """The TLS handshake failed (temporary, 4.7.5); the connection is closed and unusable.

    Opportunistic TLS catches it to try again in the clear on a new connection.
    """

    def __init__(self, peer, reason):
        super().__init__(R_TLS_FAILED % (peer, reason))


# --- Pure helpers ---

def encode_data(message):
    """The DATA payload for message bytes: CRLF line ends, dot-stuffed, ending CRLF.CRLF.

    RFC 5321 2.3.8 and 4.1.1.4: every bare CR and bare LF becomes CRLF, so no sequence in
    a relayed message can end the DATA early at the next hop (SMTP smuggling); RFC 5321
    4.5.2: a line starting with "." gets a second one.
    """
    return b"".join(encode_data_blocks([message]))


def encode_data_blocks(blocks):
    """encode_data() for a message given as an iterable of bytes blocks: yields the
    payload block by block, never joining them.

    What straddles two blocks is carried over: a CR at the end of a block (the first half
    of a CRLF, or a bare CR), and whether the next block begins a line (its "." is doubled).
    """
    carry = b""
    line_start = True              # the next octet begins a line
    sent = False
    for block in blocks:
        text = carry + block if carry else block
        carry = b""
        if text.endswith(b"\r"):
            text, carry = text[:-1], b"\r"
        if not text:
            continue
        if b"\r" in text:         # a memchr(): text without CR skips two replace() passes
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if line_start and text[:1] == b".":
            text = b"." + text
        text = text.replace(b"\n.", b"\n..")
        line_start = text.endswith(b"\n")
        sent = True
        yield text.replace(b"\n", b"\r\n")
    if carry:                      # a CR at the very end: a line end
        yield b"\r\n"
    elif sent and not line_start:
        yield b"\r\n"
    yield b".\r\n"


def message_blocks(message):
    """The message as an iterable of bytes blocks: message is bytes, or an mta.MessageFile
    (any object with len() and blocks()), read from its queue file as it is sent."""
    if isinstance(message, (bytes, bytearray)):
        return (message,)
    return message.blocks()


def needs_smtputf8(address):
    """True when an address is not plain ASCII (RFC 6531 3.4)."""
    return not address.isascii()


def has_8bit(message):
    """True when a message (see message_blocks) needs 8BITMIME (RFC 6152): any octet
    above 127."""
    return not all(block.isascii() for block in message_blocks(message))


def valid_path(address):
    """True when an address can go between < and > without breaking the command line
    (RFC 5321 4.5.3.1.3: a path is at most 256 octets)."""
    return (len(address) <= 256 and (address == "" or "@" in address)
            and not PATH_BREAKERS.search(address))


def client_tls_context(verify=False, ca_file=None):
    """A client context: TLS 1.2 or newer; verified (system CAs or ca_file) or not.

    Unverified is what opportunistic MX delivery does everywhere (RFC 7435): it still
    defeats a passive listener, and a certificate check would fail for most MX hosts.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    if verify:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if ca_file:
            context.load_verify_locations(ca_file)
        else:
            context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def parse_ehlo(reply):
    """The extensions of an EHLO reply: keyword (upper case) -> parameter text."""
    extensions = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


# --- SMTP client ---

class SMTPClient(plumbing.ClientConnection):
    """One SMTP connection to one server address, driven step by step or whole.

    client = SMTPClient("192.0.2.7", 25, helo_name="mail.example.com", server_name="mx.example.net")
    client.open()                                    # greeting, EHLO/HELO, STARTTLS per policy
    client.login(user, password)                     # optional AUTH PLAIN/LOGIN
    results = client.send_message(sender, recipients, message_bytes)
    client.quit()

    open() and login() raise DeliveryError. send_message() never raises for a failed
    transaction: each recipient gets a RecipientResult, and a lost connection shows as a
    local transient reply for those not yet answered (then client.connected is False).
    tls is TLS_NONE, TLS_OPPORTUNISTIC (STARTTLS when offered; a failed handshake is
    retried once in plaintext on a new connection, RFC 7435), TLS_OPPORTUNISTIC_NO_DOWNGRADE
    (plaintext only when STARTTLS is not offered; an offered one that is refused or fails
    raises DeliveryError, for a client whose password follows) or TLS_REQUIRED (deferred
    without it).
    tls_verify checks the certificate against server_name (system CAs, or tls_ca_file).
    implicit_tls (default: port 465) starts TLS before the greeting (RFC 8314).
    my_name, when given, is this host's own name: a server whose greeting or EHLO reply
    names it is this host, and open() raises LoopBack (what Postfix checks against
    myhostname). A submission client leaves it out: there the server may be this host.
    """

    def __init__(self, host, port=SMTP_PORT, *, helo_name, server_name=None,
                 tls=TLS_OPPORTUNISTIC, tls_verify=False, tls_ca_file=None, tls_context=None,
                 implicit_tls=None, timeouts=None, source_address=None, my_name=None):
        if tls not in TLS_MODES:
            raise ValueError("tls must be one of %s" % ", ".join(TLS_MODES))
        self.host = host
        self.port = port
        self.helo_name = helo_name
        self.server_name = server_name or host
        self.implicit_tls = port == SUBMISSIONS_PORT if implicit_tls is None else implicit_tls
        self.tls = TLS_REQUIRED if self.implicit_tls else tls
        self.tls_verify = tls_verify
        self.tls_context = tls_context or client_tls_context(tls_verify, tls_ca_file)
        self.timeouts = timeouts or Timeouts()
        self.source_address = source_address
        self.my_name = (my_name or "").lower().rstrip(".")
        self.address = host            # the IP address once connected
        self.extensions = {}           # EHLO keyword -> parameters; empty after HELO
        self.esmtp = False
        self.greeting = None
        self.transactions = 0          # completed on this connection (for reuse decisions)

    # -- what callers read --

    @property
    def peer(self):
        """The server as logs name it: name[address]:port."""
        return "%s[%s]:%d" % (self.server_name, self.address, self.port)

    @property
    def connected(self):
        return self.sock is not None

    def failure(self, kind, detail):
        """The DeliveryError for a failed step (plumbing.ClientConnection): all temporary."""
        if kind == "tls":
            return HandshakeError(self.peer, detail)
        text = {"connect": R_CONNECT_FAILED, "timeout": R_TIMEOUT, "lost": R_LOST,
                "garbage": R_PROTOCOL}[kind]
        return DeliveryError(text % (self.peer, detail))

    @property
    def max_size(self):
        """The server's SIZE limit (RFC 1870 4), or None when it has none or gives none."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def auth_mechanisms(self):
        return self.extensions.get("AUTH", "").upper().split()

    def supports(self, keyword):
        return keyword.upper() in self.extensions

    # -- connection --

    def open(self):
        """Connect, read the greeting, EHLO (or HELO), STARTTLS as the policy says."""
        try:
            self._open(starttls=self.tls != TLS_NONE)
        except HandshakeError as exc:
            if self.tls != TLS_OPPORTUNISTIC:
                raise
            # RFC 7435 4: opportunistic TLS falls back to a clear connection, a new one,
            # since a failed handshake leaves the old one in no known state.
            log.info("%s; trying again without TLS", exc.reply.text)
            self._open(starttls=False)

    def _open(self, starttls):
        self.close()
        self.connect()
        if self.implicit_tls:
            self.handshake(self.tls_context, self.server_name, self.timeouts.starttls)
        self.read_greeting()
        self.ehlo()
        if not self.tls_active and starttls:
            if self.supports("STARTTLS"):
                self.starttls()
            elif self.tls == TLS_REQUIRED:
                self.quit()
                raise DeliveryError(R_TLS_NOT_OFFERED % self.peer)

    def connect(self):
        """Open the TCP connection (connect timeout)."""
        source = (self.source_address, 0) if self.source_address else None
        self.open_socket(self.host, self.port, self.timeouts.connect, source)
        self.extensions, self.esmtp, self.transactions = {}, False, 0

    def read_greeting(self):
        """RFC 5321 3.1: a 220 greeting; anything else means this server will not talk now.

        A 554 greeting is treated as temporary, so the next MX host is tried (what Postfix
        does with smtp_skip_5xx_greeting): the server may be one of several behind the name.
        """
        reply = self.read_reply(self.timeouts.greeting, "receiving the initial greeting")
        self.greeting = reply
        if reply.code != 220:
            self.quit()
            raise DeliveryError(Reply.local(R_GREETING_REFUSED % (self.peer, reply.text)))
        self.check_loop(reply)
        return reply

    def check_loop(self, reply):
        """RFC 5321 4.2 and 4.1.1.1: the greeting and the EHLO reply begin with the server's
        domain. When that is my_name, the server is this host: QUIT, raise LoopBack."""
        words = reply.lines[0].split(None, 1) if reply.lines else []
        if self.my_name and words and words[0].lower().rstrip(".") == self.my_name:
            self.quit()
            raise LoopBack(self.peer, words[0])

    def ehlo(self):
        """EHLO, falling back to HELO when the server does not know it (RFC 5321 4.1.4)."""
        reply = self.command("EHLO " + self.helo_name, self.timeouts.ehlo, "sending EHLO")
        if reply.code == 250:
            self.check_loop(reply)
            self.esmtp = True
            self.extensions = parse_ehlo(reply)
            return reply
        if reply.code >= 500:
            reply = self.command("HELO " + self.helo_name, self.timeouts.ehlo, "sending HELO")
            if reply.code == 250:
                self.check_loop(reply)
                self.esmtp = False
                self.extensions = {}
                return reply
        self.quit()
        raise DeliveryError(reply)       # 5xx to HELO too: this server will not take mail

    def starttls(self):
        """STARTTLS (RFC 3207), then EHLO again: what was learnt before TLS is forgotten.

        Raises HandshakeError (a temporary DeliveryError) when the handshake fails. A
        refusal lets the session go on in the clear, unless the policy is required or
        no-downgrade: then it raises DeliveryError too.
        """
        reply = self.command("STARTTLS", self.timeouts.starttls, "sending STARTTLS")
        if reply.code != 220:
            if self.tls in (TLS_REQUIRED, TLS_OPPORTUNISTIC_NO_DOWNGRADE):
                self.quit()
                raise DeliveryError(R_TLS_FAILED % (self.peer, reply.text))
            return reply                 # refused: the session goes on in the clear
        # RFC 3207 5: bytes read past the 220 would be injected plaintext: refused there.
        self.handshake(self.tls_context, self.server_name, self.timeouts.starttls)
        self.extensions = {}
        self.ehlo()
        return reply

    def login(self, username, password):
        """AUTH PLAIN (RFC 4616) or LOGIN with the credentials; only over TLS or loopback.

        A refusal raises DeliveryError marked temporary: wrong credentials are ours to fix,
        and the mail should wait for that rather than bounce.
        """
        if not self.tls_active and not plumbing.is_loopback(self.address):
            raise DeliveryError(R_AUTH_PLAINTEXT % self.peer)
        mechanisms = self.auth_mechanisms
        if not mechanisms:
            raise DeliveryError(R_AUTH_NOT_OFFERED % self.peer)
        timeout, stage = self.timeouts.auth, "authenticating"
        if "PLAIN" in mechanisms:
            token = b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
            reply = self.command("AUTH PLAIN " + base64.b64encode(token).decode("ascii"),
                                 timeout, stage, secret=True)
        elif "LOGIN" in mechanisms:
            reply = self.command("AUTH LOGIN", timeout, stage)
            for value in (username, password):
                if reply.code != 334:
                    break
                reply = self.command(base64.b64encode(value.encode("utf-8")).decode("ascii"),
                                     timeout, stage, secret=True)
        else:
            raise DeliveryError(R_AUTH_NO_MECHANISM % self.peer)
        if reply.code == 334:            # a challenge we have no answer for: cancel
            reply = self.command("*", timeout, stage)  # RFC 4954 4
        if reply.code != 235:
            raise DeliveryError(reply, permanent=False)
        return reply

    # -- one command each (RFC 5321 4.1.1) --

    def mail(self, sender, size=None, smtputf8=False, body_8bit=False):
        """MAIL FROM with SIZE= (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531)."""
        return self.command(self._mail_line(sender, size, smtputf8,
                                            body_8bit and self.supports("8BITMIME")),
                            self.timeouts.mail, "sending MAIL FROM")

    def rcpt(self, recipient):
        return self.command("RCPT TO:<%s>" % recipient, self.timeouts.rcpt, "sending RCPT TO")

    def data(self, message):
        """DATA, the message (CRLF line ends, dot-stuffed), and the reply to its end."""
        reply = self.command("DATA", self.timeouts.data_start, "sending DATA")
        if reply.code != 354:
            return reply
        return self.send_data(encode_data_blocks(message_blocks(message)))

    def rset(self):
        return self.command("RSET", self.timeouts.rset, "sending RSET")

    def quit(self):
        """QUIT and close, best effort: the server may already be gone."""
        if self.sock is not None:
            try:
                self.command("QUIT", self.timeouts.quit, "sending QUIT")
            except DeliveryError:
                pass
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.quit()

    # -- a whole transaction --

    def send_message(self, sender, recipients, message, reset=False):
        """One mail transaction; returns a RecipientResult for each recipient, in order.

        Pipelines MAIL, every RCPT and DATA in one write when the server offers PIPELINING
        (RFC 2920 3.1), else one command at a time. Checks first what this server can take:
        its SIZE (RFC 1870 6.1), SMTPUTF8 for non-ASCII addresses (RFC 6531 3.4, 5.6.7),
        8BITMIME for 8-bit data (RFC 6152 3, 5.6.3); those failures are permanent.
        reset=True sends RSET first (in the same write when pipelining), for a connection
        that carried a transaction before.
        """
        results = {}
        if not valid_path(sender):
            return self._all(recipients, Reply.local(R_BAD_SENDER % sender))
        if self.max_size is not None and len(message) > self.max_size:
            return self._all(recipients, Reply.local(
                R_TOO_BIG % (len(message), self.max_size, self.peer)))
        body_8bit = has_8bit(message)
        if body_8bit and not self.supports("8BITMIME"):
            return self._all(recipients, Reply.local(R_NEED_8BITMIME % self.peer))
        smtputf8 = self.supports("SMTPUTF8")
        if needs_smtputf8(sender) and not smtputf8:
            return self._all(recipients, Reply.local(R_NEED_SMTPUTF8 % (self.peer, sender)))
        usable = []
        for recipient in recipients:
            if not valid_path(recipient) or not recipient:
                results[recipient] = Reply.local(R_BAD_ADDRESS % recipient)
            elif needs_smtputf8(recipient) and not smtputf8:
                results[recipient] = Reply.local(R_NEED_SMTPUTF8 % (self.peer, recipient))
            elif recipient not in usable:
                usable.append(recipient)
        if usable:
            use_utf8 = smtputf8 and (needs_smtputf8(sender) or any(map(needs_smtputf8, usable)))
            mail_line = self._mail_line(sender, len(message) if self.supports("SIZE") else None,
                                        use_utf8, body_8bit)
            try:
                if self.supports("PIPELINING"):
                    self._transaction_pipelined(mail_line, usable, message, reset, results)
                else:
                    self._transaction_lockstep(mail_line, usable, message, reset, results)
                self.transactions += 1
            except DeliveryError as exc:
                # The connection is gone: recipients already refused keep their reply.
                self.close()
                for recipient in usable:
                    if recipient not in results or not results[recipient].permanent:
                        results[recipient] = exc.reply
        return [RecipientResult(r, results[r]) for r in recipients]

    def _transaction_pipelined(self, mail_line, recipients, message, reset, results):
        lines = [mail_line] + ["RCPT TO:<%s>" % r for r in recipients] + ["DATA"]
        self.send_lines((["RSET"] if reset else []) + lines, self.timeouts.mail,
                        "sending MAIL FROM")
        if reset:
            self._check_rset(self.read_reply(self.timeouts.rset, "sending RSET"))
        mail = self.read_reply(self.timeouts.mail, "sending MAIL FROM")
        replies = {}
        for recipient in recipients:
            replies[recipient] = self.read_reply(self.timeouts.rcpt, "sending RCPT TO")
            if not replies[recipient].ok:
                results[recipient] = replies[recipient]
        data = self.read_reply(self.timeouts.data_start, "sending DATA")
        accepted = [r for r in recipients if replies[r].ok] if mail.ok else []
        if data.code == 354 and not accepted:
            # RFC 2920 3.1: DATA was accepted with no valid recipient; end an empty
            # message at once (the server must refuse it) to keep the session in step.
            self.send_data([b".\r\n"])
            data = Reply.local(R_PROTOCOL % (self.peer, "sending DATA"))
        final = self._finish(accepted, data, message)
        for recipient in recipients:
            results[recipient] = mail if not mail.ok else (
                final if replies[recipient].ok else replies[recipient])

    def _transaction_lockstep(self, mail_line, recipients, message, reset, results):
        if reset:
            self._check_rset(self.rset())
        mail = self.command(mail_line, self.timeouts.mail, "sending MAIL FROM")
        if not mail.ok:
            results.update((r, mail) for r in recipients)
            return
        replies = {}
        for recipient in recipients:
            replies[recipient] = results[recipient] = self.rcpt(recipient)
        accepted = [r for r in recipients if replies[r].ok]
        if not accepted:
            self.rset()
            return
        data = self.command("DATA", self.timeouts.data_start, "sending DATA")
        final = self._finish(accepted, data, message)
        results.update((r, final) for r in accepted)

    def _check_rset(self, reply):
        if reply.code != 250:
            raise DeliveryError(reply, permanent=False)

    def _finish(self, accepted, data, message):
        """Send the message after a 354, or bring the session back to a clean state."""
        if accepted and data.code == 354:
            return self.send_data(encode_data_blocks(message_blocks(message)))
        if data.ok:                    # a 2xx to DATA itself makes no sense
            data = Reply.local(R_PROTOCOL % (self.peer, "sending DATA"))
        self.rset()
        return data

    def _all(self, recipients, reply):
        return [RecipientResult(r, reply) for r in recipients]

    def _mail_line(self, sender, size, smtputf8, body_8bit):
        line = "MAIL FROM:<%s>" % sender
        if size is not None and self.supports("SIZE"):
            line += " SIZE=%d" % size
        if body_8bit:
            line += " BODY=8BITMIME"
        if smtputf8:
            line += " SMTPUTF8"
        return line

    # -- the wire --

    def command(self, line, timeout, stage, secret=False):
        """Send one command line and return its reply."""
        self.send_lines([line], timeout, stage, secret)
        return self.read_reply(timeout, stage)

    def send_lines(self, lines, timeout, stage, secret=False):
        data = "".join(line + "\r\n" for line in lines).encode("utf-8")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("> %s %s", self.peer, "<redacted>" if secret else lines)
        self.send_bytes(data, timeout, stage)

    def send_data(self, payload):
        """Send an encoded DATA payload (an iterable of bytes blocks) in blocks, each under
        the data-block timeout, and return the reply to its end (RFC 5321 4.5.3.2.5,
        4.5.3.2.6)."""
        for block in payload:
            view = memoryview(block)
            for start in range(0, len(view), SEND_BLOCK):
                self.send_bytes(view[start:start + SEND_BLOCK], self.timeouts.data_block,
                                "sending message body")
        return self.read_reply(self.timeouts.data_end, "waiting for the end of data reply")

    def read_reply(self, timeout, stage):
        """Read one (multi-line) reply, bounded in length, line count and time."""
        code, lines = None, []
        while True:
            data = self.read_line(MAX_REPLY_LINE, timeout, stage)
            # RFC 5321 4.2: Reply-code [ SP textstring ] CRLF, or code "-" text on all
            # but the last line; every line carries the same code.
            if (len(data) < 3 or not data[:3].isdigit()
                    or data[:1] not in b"2345" or (len(data) > 3 and data[3:4] not in b" -")
                    or (code is not None and int(data[:3]) != code)
                    or len(lines) >= MAX_REPLY_LINES):
                self.close()
                raise DeliveryError(R_PROTOCOL % (self.peer, stage))
            code = int(data[:3])
            lines.append(data[4:].decode("utf-8", "replace"))
            if data[3:4] != b"-":
                reply = Reply(code, lines)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("< %s %s", self.peer, reply.text)
                if code == 421:
                    # RFC 5321 3.8: the server is closing the channel; its last word.
                    self.close()
                    raise DeliveryError(reply, permanent=False)
                return reply


# --- Destinations: where a domain's mail goes, and one delivery attempt ---

def recipient_domain(address):
    """The domain of an address, lower-cased, without a trailing dot."""
    return address.rpartition("@")[2].rstrip(".").lower()


def is_local_address(address):
    """True when address belongs to this machine: loopback, the unspecified address, or
    an address of one of its interfaces.

    An interface address is found by the route to it: a UDP socket "connected" to an
    address of this machine (no packet is sent) takes that very address as its source.
    (Binding to it would be simpler, but succeeds for any address where the
    ip_nonlocal_bind sysctl is set.)
    """
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return ipaddress.ip_address(probe.getsockname()[0].partition("%")[0]) == ip
    except OSError:
        return False


def parse_listener(text):
    """[(address, port)] of a my_listeners entry HOST:PORT; a host name stands for each of
    its addresses (looked up once, at start). Raises ValueError for a bad entry."""
    host, port = plumbing.parse_hostport(text, SMTP_PORT)
    try:
        ipaddress.ip_address(host)
        return [(host, port)]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError("my_listeners: cannot resolve %r: %s" % (host, exc)) from None
    return list(dict.fromkeys((info[4][0], port) for info in found))


def listener_matches(listener, address, port):
    """True when a connection to address:port would reach listener, an (address, port)
    pair whose address 0.0.0.0 or :: stands for every address of this machine."""
    host, listen_port = listener
    if listen_port != port:
        return False
    try:
        wanted = ipaddress.ip_address(host)
        if wanted.is_unspecified:
            return is_local_address(address)
        return wanted == ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False


def plan_hops(mx_hosts, port, my_names=(), my_addresses=(), my_listeners=()):
    """The addresses to try, in order, from dnsstub MXHosts (RFC 5321 5.1).

    If this host is one of the MX hosts, it must not deliver to itself or to anything it
    prefers less: only better-preference hosts remain, and when it is the best there is,
    the mail loops (none remain; the caller bounces with 5.4.6). An MX host is this host
    when its name is one of my_names, one of its addresses is in my_addresses, or one of
    its addresses with port reaches one of my_listeners ((host, port) pairs, see
    listener_matches()).
    """
    names = {name.lower().rstrip(".") for name in my_names if name}
    own = set(my_addresses)

    def is_me(mx):
        return (mx.name.lower().rstrip(".") in names or bool(own.intersection(mx.addresses))
                or any(listener_matches(listener, address, port)
                       for listener in my_listeners for address in mx.addresses))
    mine = [mx.preference for mx in mx_hosts if is_me(mx)]
    if mine:
        limit = min(mine)
        mx_hosts = [mx for mx in mx_hosts if mx.preference < limit]
        if not mx_hosts:
            return []
    return [Hop(mx.name, address, port, mx.preference)
            for mx in mx_hosts for address in mx.addresses]


def dns_error_reply(error):
    """A local Reply for a dnsstub error: its status (4.4.3, 5.1.2, 5.1.10, 5.4.4)."""
    status = getattr(error, "status", "4.4.3")
    if getattr(error, "permanent", False) and not status.startswith("5"):
        status = "5.1.2"
    return Reply.local(R_DNS % (status, error))


class Deliverer:
    """Delivers one message to the recipients of one destination, server after server.

    destination is a domain (its MX hosts from the resolver) or, with a relay host, all
    mail goes to that one server. RFC 5321 5.1: each address of each MX in order; a failed
    connection, a timeout or a refused greeting moves on to the next address, and so does
    any temporary reply for the recipients it left (a permanent one is final). At most
    max_mx_addresses addresses and max_mx_sessions completed sessions per attempt (Postfix's
    smtp_mx_address_limit and smtp_mx_session_limit), so one attempt stays bounded in time.
    """

    def __init__(self, config, resolver=None, credentials=None):
        self.config = config
        self.resolver = resolver
        self.credentials = credentials           # (user, password) for the relay host
        self.timeouts = timeouts_from(config)
        relay = config.get("relay_host") or ""
        self.relay = plumbing.parse_hostport(relay, SMTP_PORT) if relay else None
        self.helo_name = config.get("hostname") or socket.getfqdn()
        self.my_names = [self.helo_name] + list(config.get("my_names") or [])
        self.my_addresses = list(config.get("my_addresses") or [])
        self.my_listeners = [pair for listener in config.get("my_listeners") or []
                             for pair in parse_listener(listener)]
        if self.relay:
            verify = not config.get("relay_insecure", False)
            self.tls = config.get("relay_tls", TLS_REQUIRED)
        else:
            verify = config.get("tls_verify", False)
            self.tls = TLS_REQUIRED if verify else TLS_OPPORTUNISTIC
        self.tls_verify = verify
        self.tls_context = client_tls_context(verify, config.get("tls_ca_file") or None)

    def destination(self, recipient):
        """The key recipients are grouped by: their domain, or the relay host."""
        if self.relay:
            return "[%s]:%d" % self.relay
        return recipient_domain(recipient)

    def hops(self, destination):
        """The servers to try for destination; raises DeliveryError when there are none."""
        if self.relay:
            host, port = self.relay
            return [Hop(host, host, port)]
        try:
            mx_hosts = self.resolver.mx_hosts(destination)
        except dnsstub.DNSError as exc:
            raise DeliveryError(dns_error_reply(exc)) from None
        hops = plan_hops(mx_hosts, int(self.config.get("remote_port") or SMTP_PORT),
                         self.my_names, self.my_addresses, self.my_listeners)
        if not hops:
            raise DeliveryError(R_MX_LOOP % destination)
        return hops

    def client(self, hop):
        return SMTPClient(hop.address, hop.port, helo_name=self.helo_name, server_name=hop.name,
                          tls=self.tls, tls_verify=self.tls_verify, tls_context=self.tls_context,
                          timeouts=self.timeouts, my_name=self.helo_name)

    def open(self, hop):
        """A ready session with hop (STARTTLS and AUTH done); raises DeliveryError."""
        client = self.client(hop)
        client.open()
        if self.relay and self.credentials:
            try:
                client.login(*self.credentials)
            except DeliveryError:
                client.quit()
                raise
        return client

    def deliver(self, destination, sender, recipients, message, client=None):
        """Try to deliver; return (outcomes in recipient order, a client worth keeping).

        client is an open session to reuse (RSET first); when it fails the attempt goes on
        with fresh connections. Never raises for delivery trouble: every recipient gets an
        Outcome, sent, deferred or bounced.
        """
        pending = list(recipients)
        done = {}

        def settle(results, relay, remote_mta):
            for result in results:
                outcome = Outcome(result.recipient, result.reply, relay, remote_mta)
                if result.delivered or result.permanent:
                    done[result.recipient] = outcome
                    pending.remove(result.recipient)
                else:
                    last[result.recipient] = outcome

        last = {}
        if client is not None:
            settle(client.send_message(sender, pending, message, reset=True), client.peer,
                   client.server_name)
            if pending or not client.connected:
                client.quit()
                client = None
        if pending:
            client = self._attempt(destination, sender, pending, message, settle, last)
        for recipient in pending:
            done[recipient] = last[recipient]
        return [done[r] for r in recipients], client

    def _attempt(self, destination, sender, pending, message, settle, last):
        def fail_all(reply, relay="none", remote_mta=""):
            for recipient in pending:
                last[recipient] = Outcome(recipient, reply, relay, remote_mta)

        try:
            hops = self.hops(destination)
        except DeliveryError as exc:
            fail_all(exc.reply)
            if exc.permanent:
                settle([RecipientResult(r, exc.reply) for r in list(pending)], "none", "")
            return None
        sessions = 0
        for hop in hops[:max(1, int(self.config.get("max_mx_addresses", 5)))]:
            try:
                client = self.open(hop)
            except LoopBack as exc:
                # Postfix's rule: the best MX (or the relay host) being this host is a loop
                # to bounce now; a backup MX, one to wait out while the better ones are down.
                # Either way no server after it may be tried (RFC 5321 5.1).
                best = hop.preference == hops[0].preference
                log.warning("%s", exc.reply.text)
                reply = Reply.local((R_MX_LOOP if best else R_MX_LOOP_LATER) % destination)
                relay = "%s[%s]:%d" % (hop.name, hop.address, hop.port)
                fail_all(reply, relay, hop.name)
                if best:
                    settle([RecipientResult(r, reply) for r in list(pending)], relay, hop.name)
                return None
            except DeliveryError as exc:
                relay = "%s[%s]:%d" % (hop.name, hop.address, hop.port)
                fail_all(exc.reply, relay, hop.name)
                if exc.permanent:           # a 5xx to HELO: this server will not take it
                    settle([RecipientResult(r, exc.reply) for r in list(pending)], relay, hop.name)
                    return None
                continue
            sessions += 1
            settle(client.send_message(sender, list(pending), message), client.peer,
                   client.server_name)
            if not pending and client.connected:
                return client
            client.quit()
            if not pending or sessions >= int(self.config.get("max_mx_sessions", 2)):
                break
        return None


def timeouts_from(config):
    """Timeouts from the config keys connect_timeout, greeting_timeout, ... (seconds)."""
    values = {}
    for item in dataclasses.fields(Timeouts):
        value = config.get(item.name + "_timeout")
        if value is not None:
            values[item.name] = float(value)
    return Timeouts(**values)


# --- The outbound queue daemon ---

@dataclass
class Job:
    """One transaction to make: one message, up to max_rcpt recipients of one destination."""
    claim: object                  # the mta.Claim holding the message (or a stand-in)
    destination: str
    recipients: list               # addresses, each once
    targets: dict                  # address -> [mta.Recipient] to record the result on
    batch: "Batch"


class Batch:
    """The jobs made from one claimed message; done once each is recorded or dropped.

    on_done(claim) runs on the thread that finishes the last job (--once releases the
    claim there, so files are put away by the workers, in parallel).
    """

    def __init__(self, claim, on_done=None):
        self.claim = claim
        self.on_done = on_done
        self.left = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def finished(self):
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.close()

    def close(self):
        try:
            if self.on_done is not None:
                self.on_done(self.claim)
        except Exception:
            log.exception("%s: cannot put the message away", self.claim.queue_id)
        finally:
            self.done.set()


class OutboundDaemon:
    """Worker threads that deliver the recipients of claimed outbound messages.

    A claim (mta.Queue.claim_outbound) gives a message and its due remote recipients;
    submit() cuts it into jobs: its recipients for one destination, at most max_rcpt per
    transaction. Each worker is one SMTP session: it takes a job whose destination has a
    free slot (max_connections in all, max_per_destination each), and when it is done it
    takes the next job for the same destination over the same connection (RSET between),
    so many messages to one place share a connection. Results go straight back to the
    claim (one appended record each) as soon as the server has answered.
    """

    def __init__(self, config, queue, deliverer):
        self.config = config
        self.queue = queue             # an mta.Queue
        self.deliverer = deliverer
        self.max_connections = int(config.get("max_connections", 20))
        self.max_per_destination = int(config.get("max_per_destination", 10))
        self.max_rcpt = max(1, int(config.get("max_rcpt", MAX_RCPT)))
        self.jobs_lock = threading.Condition()   # guards jobs and active
        self.jobs = collections.OrderedDict()    # destination -> deque of Jobs waiting
        self.active = {}               # destination -> sessions open or being opened
        self.stopping = threading.Event()
        self.workers = []

    # -- taking work --

    def handle(self, queue_id):
        """Deliver one outbound message (mta.QueueRunner calls this on its threads)."""
        claim = self.queue.claim_outbound(queue_id)
        if claim is None:
            return
        with claim:                    # leaving it queues the DSNs and files the message away
            self.submit(claim).done.wait()

    def submit(self, claim, on_done=None):
        """Cut claim's due recipients into jobs for the workers; return their Batch."""
        batch = Batch(claim, on_done)
        groups = collections.OrderedDict()
        for recipients in claim.groups.values():
            for recipient in recipients:
                destination = self.deliverer.destination(recipient.address)
                groups.setdefault(destination, collections.OrderedDict()).setdefault(
                    recipient.address, []).append(recipient)
        jobs = []
        for destination, targets in groups.items():
            addresses = list(targets)
            for start in range(0, len(addresses), self.max_rcpt):
                chunk = addresses[start:start + self.max_rcpt]
                jobs.append(Job(claim, destination, chunk, {a: targets[a] for a in chunk}, batch))
        batch.left = len(jobs)
        if not jobs:
            batch.close()
            return batch
        with self.jobs_lock:
            for job in jobs:
                self.jobs.setdefault(job.destination, collections.deque()).append(job)
            self.jobs_lock.notify_all()
        return batch

    def _take(self, destination=None):
        """Under jobs_lock: the next job, for destination when given (connection reuse)."""
        if destination is not None:
            waiting = self.jobs.get(destination)
            if not waiting:
                return None
            job = waiting.popleft()
            if not waiting:
                del self.jobs[destination]
            return job
        for name, waiting in self.jobs.items():
            if self.active.get(name, 0) < self.max_per_destination:
                job = waiting.popleft()
                if not waiting:
                    del self.jobs[name]
                self.active[name] = self.active.get(name, 0) + 1
                return job
        return None

    # -- workers --

    def start(self):
        self.stopping.clear()
        for number in range(self.max_connections):
            thread = threading.Thread(target=self.worker, name="smtp_out-%d" % number,
                                      daemon=True)
            thread.start()
            self.workers.append(thread)

    def worker(self):
        while not self.stopping.is_set():
            with self.jobs_lock:
                job = self._take()
                if job is None:
                    self.jobs_lock.wait(WORKER_IDLE)
                    continue
            try:
                self.run_destination(job)
            finally:
                with self.jobs_lock:
                    self.active[job.destination] -= 1
                    if not self.active[job.destination]:
                        del self.active[job.destination]
                    self.jobs_lock.notify_all()

    def run_destination(self, job):
        """Deliver job, then more jobs for its destination over the same connection."""
        client = None
        try:
            while job is not None:
                current, job = job, None
                try:
                    client = self.deliver(current, client)
                finally:
                    current.batch.finished()
                if client is None or self.stopping.is_set():
                    break
                with self.jobs_lock:
                    job = self._take(current.destination)
        except Exception:
            # The boundary: log and go on; unrecorded recipients stay due in the spool.
            log.exception("internal error delivering to %s", current.destination)
        finally:
            if client is not None:
                client.quit()

    def deliver(self, job, client):
        """One transaction for job; record every recipient's result; return the client."""
        claim = job.claim
        outcomes, client = self.deliverer.deliver(job.destination, claim.envelope.sender,
                                                  job.recipients, claim.message, client)
        # A crash between the server's 250 and this write() delivers twice; nothing
        # else happens in between.
        for outcome in outcomes:
            # The log names the address talked to, the DSN the host (RFC 3464 2.3.5).
            relay = "" if outcome.relay == "none" else outcome.relay
            host = outcome.remote_mta
            reply, status = outcome.reply.text, outcome.reply.status
            for recipient in job.targets[outcome.recipient]:
                if outcome.status == "sent":
                    claim.delivered(recipient, reply, remote_mta=host, relay=relay)
                elif outcome.status == "bounced":
                    claim.failed(recipient, reply, dsn=status, remote_mta=host, relay=relay)
                else:
                    claim.deferred(recipient, reply, dsn=status, remote_mta=host, relay=relay)
        return client

    # -- running --

    def run_once(self, timeout=None):
        """One pass over the due work (--once): every message in outbound/ now, claimed
        at most ONCE_SLICE at a time, each handed to the workers as soon as it is claimed
        and put away by the worker that finishes it. Returns the messages handled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        handled = 0
        self.start()
        try:
            names = self.queue.ids(mta.OUTBOUND)
            for start in range(0, len(names), ONCE_SLICE):
                batches = []
                try:
                    for name in names[start:start + ONCE_SLICE]:
                        try:
                            claim = self.queue.claim_outbound(name)
                        except mta.QueueBusy:
                            continue           # a running daemon has it
                        if claim is not None:
                            batches.append(self.submit(claim, on_done=mta.Claim.release))
                    for batch in batches:
                        left = None if deadline is None else max(0.0, deadline - time.monotonic())
                        if not batch.done.wait(left):
                            self.stop()
                finally:
                    for batch in batches:      # after a timeout: the file stays due
                        batch.claim.close()
                handled += len(batches)
                if self.stopping.is_set():
                    break
        finally:
            self.stop()
        return handled

    def serve(self):
        """Run as a daemon until SIGTERM/SIGINT: mta's QueueRunner hands over the files
        of outbound/ as they come (a wake-up datagram, or its periodic scan)."""
        self.start()
        runner = mta.QueueRunner(self.queue, mta.OUTBOUND, "smtp_out", self.handle,
                                 workers=self.max_connections * 2,
                                 scan_interval=float(self.config.get("poll_interval", POLL_INTERVAL)))
        try:
            return plumbing.serve_until_signalled([runner], on_stop=self.stop)
        finally:
            self.stop()

    def stop(self, grace=5.0):
        """Workers finish their transaction and stop; waiting jobs are dropped (their
        recipients stay due in the spool) and their batches let go."""
        self.stopping.set()
        with self.jobs_lock:
            dropped = [job for waiting in self.jobs.values() for job in waiting]
            self.jobs.clear()
            self.jobs_lock.notify_all()
        for job in dropped:
            job.batch.finished()
        until = time.monotonic() + grace
        for thread in self.workers:
            thread.join(max(0.0, until - time.monotonic()))
        self.workers = [t for t in self.workers if t.is_alive()]


# --- Command line ---

def read_credentials(path):
    """(user, password) from the first non-comment line "user:password" of path.

    Credentials never come from the command line, where any local user can read them
    with ps; a file readable by others gets a warning.
    """
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                user, colon, password = line.partition(":")
                if colon and user and password:
                    return user, password
                break
    raise ValueError("%s: expected one line user:password" % path)


def main(argv=None):
    try:
        config = plumbing.daemon_settings(
            "smtp_out", "Deliver the outbound queue through DNS MX or a relay host.", DEFAULTS,
            HELP, argv)
    except ValueError as exc:
        print("smtp_out: %s" % exc, file=sys.stderr)
        return 1
    plumbing.setup_logging("smtp_out", config["syslog"], config["verbose"])
    try:
        if config["relay_tls"] not in TLS_MODES:
            raise ValueError("relay_tls: one of %s" % ", ".join(TLS_MODES))
        if config["relay_host"]:
            plumbing.parse_hostport(config["relay_host"], SMTP_PORT)
        for listener in config["my_listeners"]:
            parse_listener(listener)
        queue = mta.Queue(config["spool"], hostname=config["hostname"] or None,
                          lifetime=float(config["queue_lifetime"]),
                          delay_warning=float(config["delay_warning"]),
                          retry_schedule=config["retry_schedule"])
        credentials = None
        if config["relay_auth_file"]:
            credentials = read_credentials(config["relay_auth_file"])
        resolver = dnsstub.Resolver([config["dns"]] if config["dns"] else None)
        # Root is needed no further: the relay password file is read. Everything this
        # process parses comes from other hosts (DNS answers, SMTP replies).
        plumbing.drop_privileges(config["user"])
    except (OSError, ValueError) as exc:
        print("smtp_out: %s" % exc, file=sys.stderr)
        return 1
    plumbing.log_config(log, config)
    daemon = OutboundDaemon(config, queue, Deliverer(config, resolver, credentials))
    if config["once"]:
        daemon.run_once()
        return 0
    return daemon.serve()


if __name__ == "__main__":
    sys.exit(main())
