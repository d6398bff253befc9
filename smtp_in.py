"""smtp_in.py - inbound SMTP server: MX and submission (RFC 5321, enhanced codes RFC 3463).

Accepts mail from other MTAs (MX, port 25) and from users' mail programs (submission, port
587 with AUTH required, RFC 6409; implicit TLS on 465, RFC 8314). Extensions: PIPELINING
(RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC 2034), SMTPUTF8
(RFC 6531), STARTTLS (RFC 3207), AUTH PLAIN and LOGIN (RFC 4954, RFC 4616).

Policy is applied while the client talks: relaying only after AUTH or from --relay-network,
or to a --relay-domain this host is a backup MX for (RFC 5321 5.1), unknown local
recipients refused at RCPT time (mailbox_store), size, line, recipient, error,
command and time limits. Only <CRLF>.<CRLF> ends DATA; a message holding a bare CR, a bare
LF or a NUL is refused whole, so no smuggled second message can exist (see MessageCollector).
Each accepted message gets a Received: header (RFC 5321 4.4, RFC 3848 protocol names).

The message is streamed to the spool as it arrives, never held whole in memory: at DATA a
queue file is started (mta.QueueWriter) with our trace fields at its top, each block read
from the socket goes through MessageCollector (end of data, smuggling and size checks, dot
un-stuffing) and HeaderFilter (hop count, forged Authentication-Results removed) into it,
and the 250 is sent only once commit() has made it durable. A refused, cut-off or
timed-out message leaves no file behind. Memory per session is a socket block, one text
line and at most one held header field (MAX_HELD_FIELD), whatever the message size.

SPF (RFC 7208, through spf.py): MAIL FROM (the HELO name for the null sender) is checked
once per transaction, unless the client authenticated or is in --relay-network. --spf tag
(default) marks the message with Received-SPF (RFC 7208 9.1) and Authentication-Results
(RFC 8601); --spf reject also refuses a fail (550 5.7.23) and defers a temperror (451
4.7.24) at MAIL. Authentication-Results fields that claim this host's name arrive forged
and are removed (RFC 8601 5).

DKIM and DMARC (RFC 6376, RFC 7489, through dkim.py) need the whole message, so they run
after its end, before commit(): the message is read back from the queue file (QueueWriter
.blocks()), and header fields that go on top of it are written with QueueWriter.prepend()
(a state record after the message, see mta.py), never by rewriting it. On the MX, for a
client that may not relay, --dkim-verify checks its signatures and --dmarc evaluates the
From domain's policy with the SPF result of MAIL; ONE Authentication-Results field then
holds spf=, dkim= and dmarc= (the Received-SPF and Received fields stay in the text
written first). --dmarc enforce refuses a fail whose policy is reject (550 5.7.1) and
marks one whose policy is quarantine with X-Spam-Flag: YES; tag only records. DNS time is
bounded by dkim_timeout, and a DNS failure is a temperror, never a refusal. Mail from an
authenticated user whose From domain is local and has a key in SPOOL/dkim/DOMAIN/ gets a
DKIM-Signature (--dkim-sign, mta.dkim_signature()).

Abuse: the process's anvil (plumbing.Anvil) counts failed logins and refused commands per
client address across sessions; a penalised address waits its turn before its password is
checked (454 4.7.0 when that turn is too far away), and past anvil_soft_errors every reply
to it is slowed. A command line holding a bare CR is one bad command up to its LF, refused
whole. With greet_pause, a client that talks before the greeting gets 554 5.5.0.

Flow control (as Postfix's in_flow_delay): each MAIL takes a token the router put in
SPOOL/run/flow for a message it routed, or waits for one at most in_flow_delay seconds
(mta.FlowGate), so that mail coming faster than the router routes it takes its pace.

Reads: users and aliases through mailbox_store (in --store, by default the spool); SPF
records through spf, DKIM keys and DMARC records through dkim, both over dnsstub; signing
keys in SPOOL/dkim/; flow tokens from SPOOL/run/flow.
Writes: the spool, through mta.
Run: python3 smtp_in.py --spool /var/spool/mail --listen 0.0.0.0:25 --domain example.com
     python3 smtp_in.py --spool /var/spool/mail --listen 0.0.0.0:587 --submission \\
         --tls-cert cert.pem --tls-key key.pem --smtps-listen 0.0.0.0:465 --domain example.com
"""

import datetime
import errno
import ipaddress
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from email.utils import format_datetime
from typing import Optional

import dkim
import dnsstub
import mailbox_store
import mta
import plumbing
import spf

__all__ = [
    "DEFAULTS", "DMARC_POLICIES", "HELP", "SPF_POLICIES", "Envelope", "HeaderFilter",
    "MessageCollector", "SMTPHandler", "SMTPServer", "SpooledMessage",
    "address_literal", "authentication_results_field", "authserv_id", "check_dmarc_policy",
    "count_hops", "is_domain", "main", "make_dkim_resolver", "make_reverse_lookup",
    "make_spf_resolver", "message_authentication", "parse_mail_params", "parse_networks",
    "parse_path", "protocol_name", "received_header", "remove_authentication_results",
    "spf_trace_fields", "split_address", "split_command",
]

# --- Constants ---

MAX_COMMAND_LINE = 512         # RFC 5321 4.5.3.1.4, including CRLF: what a client may count on
MAX_COMMAND_LENIENT = 4 * MAX_COMMAND_LINE   # what is taken; longer lines get 500 5.5.2
# RFC 5321 4.5.3.1.6: a text line may hold 1000 octets with its CRLF, not counting a leading
# dot doubled for transparency. Longer lines pass up to MAX_TEXT_LINE octets, counted the
# same way but without the CRLF: 65,536 octets and CRLF pass, 65,537 get 552 5.3.4.
MAX_TEXT_LINE = 65536
MAX_HELD_FIELD = 128 * 1024    # octets of one Authentication-Results field held to read it
MAX_SASL_LINE = plumbing.MAX_SASL_RESPONSE
MAX_LOCAL_PART = 64            # RFC 5321 4.5.3.1.1, octets
MAX_DOMAIN = 255               # RFC 5321 4.5.3.1.2, octets
MAX_PATH = 256                 # RFC 5321 4.5.3.1.3, octets with the angle brackets
MAX_HOPS = 50                  # Received: headers before we call it a mail loop (RFC 5321 6.3)
MAX_AUTH_FAILURES = 3          # failed logins before the connection is closed (docs/security.md)
EARLY_TALKER_LINGER = 1.0      # seconds to read and drop an early talker's lines before closing
REVERSE_DNS_TIMEOUT = 2.0      # seconds for the optional PTR lookup of the Received: header
SPF_POLICIES = ("off", "tag", "reject")
SPF_DNS_TRY = 2.0              # seconds per try of one SPF lookup; two tries per nameserver
DMARC_POLICIES = ("off", "tag", "enforce")
DKIM_DNS_TRY = 2.0             # seconds per try of one DKIM key or DMARC lookup; two tries
QUARANTINE_FIELD = "X-Spam-Flag: YES\r\n"    # a DMARC quarantine under --dmarc enforce
SMTP_PORT, SUBMISSION_PORT, SMTPS_PORT = 25, 587, 465

END_OF_DATA = b"\r\n.\r\n"     # RFC 5321 4.1.1.4: the only end of the mail data
CRLF = b"\r\n"

# Every setting, its default, and the flag or INI key that changes it (plumbing.add_options).
DEFAULTS = {
    "spool": "",                   # plumbing.spool_path: $MAILTOOLKIT_SPOOL, else ./mailspool
    "store": "",                   # plumbing.store_path: the spool itself
    "listen": "127.0.0.1:2525",
    "submission": False,
    "smtps_listen": "",
    "domain": ["localhost"],
    "hostname": "",
    "tls_cert": "",
    "tls_key": "",
    "relay_network": [],
    "relay_domain": [],
    "idle_timeout": 300.0,
    "session_timeout": 1800.0,
    "max_size": 35 * 1024 * 1024,
    "max_recipients": 100,
    "max_errors": 20,
    "max_commands": 1000,
    "max_connections": 200,
    "max_per_address": 50,
    "greet_pause": 0.0,
    "in_flow_delay": 1.0,
    **plumbing.SERVER_DEFAULTS,    # processes, failed logins and errors slowed, stress mode
    "dns": "",
    "reverse_dns": False,
    "spf": "tag",
    "spf_timeout": 10.0,
    "dkim_verify": "yes",
    "dmarc": "tag",
    "dkim_timeout": dkim.DEFAULT_TIMEOUT,
    "dkim_sign": "yes",
    "cpus": "",
    "user": "",
    "syslog": False,
    "verbose": False,
}

HELP = {                       # the help of the keys plumbing.SHARED_HELP does not know
    **plumbing.SERVER_HELP,
    "greet_pause": "seconds to wait before the greeting; a client that talks first is "
                   "refused with 554 (0: no wait and no check)",
    "spf": "SPF check of MAIL FROM (RFC 7208): off; tag, adding Received-SPF and "
           "Authentication-Results; or reject, also refusing a fail (550 5.7.23) and "
           "deferring a DNS failure (451 4.7.24)",
    "spf_timeout": "seconds one SPF check may spend asking the DNS; past it, temperror",
    "in_flow_delay": "seconds a MAIL may wait for the router when mail comes faster than it "
                     "routes it (as Postfix's in_flow_delay; 0: never wait)",
    "dkim_verify": "yes or no: on the MX, check the DKIM signatures of each message (RFC 6376) "
                   "and report them in Authentication-Results",
    "dmarc": "DMARC check of the From domain on the MX (RFC 7489): off; tag, reporting it in "
             "Authentication-Results; or enforce, also refusing a fail under p=reject "
             "(550 5.7.1) and marking one under p=quarantine with X-Spam-Flag: YES",
    "dkim_timeout": "seconds DKIM and DMARC together may spend asking the DNS per message; "
                    "past it, temperror",
    "dkim_sign": "yes or no: sign mail from authenticated users whose From domain is local "
                 "and has a key in SPOOL/dkim/DOMAIN/ (DKIM, RFC 6376)",
    "submission": "a submission listener (RFC 6409): AUTH required before MAIL",
    "smtps_listen": "HOST:PORT of an implicit-TLS submission listener (RFC 8314), e.g. 0.0.0.0:465",
    "session_timeout": "seconds a whole session may last (0: no limit)",
    "relay_domain": "a domain this host is a backup MX for (repeatable): its mail is accepted "
                    "and queued for the better MX; unknown recipients are refused when the "
                    "store knows the domain's users",
    "max_recipients": "recipients per message; past it 452 4.5.3",
    "max_errors": "bad commands per session before 421 and a close",
    "max_commands": "commands per session before 421 and a close",
    "reverse_dns": "look up the client's name for the Received: header (forward-confirmed)",
}

# --- Replies (RFC 5321 4.2; enhanced codes RFC 3463, on all but the greeting and HELO/EHLO
# replies as RFC 2034 4 asks, and not on 334/354 which carry no text of their own) ---

R220_GREETING = "220 %s ESMTP"
R220_READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
R221_BYE = "221 2.0.0 %s closing connection"
R235_AUTH_OK = "235 2.7.0 Authentication successful"
R250_OK = "250 2.0.0 OK"
R250_SENDER_OK = "250 2.1.0 Sender OK"
R250_RECIPIENT_OK = "250 2.1.5 Recipient OK"
R250_RESET = "250 2.0.0 Reset"
R250_QUEUED = "250 2.0.0 OK: queued as %s"
R250_HELO = "250 %s"
R252_CANNOT_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
R214_HELP = ("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS"
             " AUTH; see RFC 5321")
R334_CHALLENGE = "334 %s"
R354_START_INPUT = "354 End data with <CR><LF>.<CR><LF>"
R421_BUSY = "421 4.7.0 Too many connections, try again later"
R421_TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
R421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, closing connection"
R421_INTERNAL_ERROR = "421 4.3.0 Internal error, closing connection"
R421_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
R421_TOO_MANY_COMMANDS = "421 4.7.0 Too many commands, closing connection"
R454_AUTH_THROTTLED = "454 4.7.0 Temporary authentication failure: too many failed logins, try again later"
R451_SPOOL_ERROR = "451 4.3.0 Cannot store the message now, try again later"
R451_STORE_UNAVAILABLE = "451 4.3.0 <%s>: Mailbox store unavailable, try again later"
R452_SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
R452_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
R500_UNKNOWN = "500 5.5.2 Command not recognized"
R500_LINE_TOO_LONG = "500 5.5.2 Line too long"
R500_BAD_CHARACTERS = "500 5.5.2 NUL, control characters or invalid UTF-8 in command"
R500_BARE_CR = "500 5.5.2 Command line ends in a bare CR; use CRLF"
R501_SYNTAX = "501 5.5.4 Syntax error in parameters or arguments"
R501_NO_ARGUMENTS = "501 5.5.4 This command takes no arguments"
R501_HELO_SYNTAX = "501 5.5.4 Syntax: EHLO hostname (or HELO hostname)"
R501_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
R501_BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
R501_AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
R501_BAD_SASL = "501 5.5.2 Invalid SASL response"
R502_NOT_IMPLEMENTED = "502 5.5.1 Command not implemented"
R503_NEED_HELO = "503 5.5.1 Send EHLO or HELO first"
R503_NEED_EHLO = "503 5.5.1 Send EHLO first"
R503_NEED_MAIL = "503 5.5.1 Send MAIL first"
R503_NEED_RCPT = "503 5.5.1 Send RCPT first"
R503_NESTED_MAIL = "503 5.5.1 Sender already given"
R503_IN_TRANSACTION = "503 5.5.1 Not permitted during a mail transaction"
R503_ALREADY_AUTHENTICATED = "503 5.5.1 Already authenticated"
R503_TLS_ACTIVE = "503 5.5.1 TLS already active"
R504_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"
R530_AUTH_REQUIRED = "530 5.7.0 Authentication required"
R535_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
R538_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
R550_UNKNOWN_USER = "550 5.1.1 <%s>: Recipient address rejected: User unknown"
R550_ALIAS_LOOP = "550 5.4.6 <%s>: Recipient address rejected: Alias expansion loop"
R550_ALIAS_TOO_BIG = "550 5.2.4 <%s>: Recipient address rejected: Alias expansion too large"
R550_BARE_LINE_ENDING = "550 5.6.0 Message refused: bare CR or LF in text (RFC 5321 2.3.8); use CRLF"
R550_NUL = "550 5.6.0 Message refused: NUL octet in text"
R550_DMARC_REJECT = "550 5.7.1 Message refused: %s asks to reject mail that fails DMARC (RFC 7489)"
R552_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
R552_LINE_TOO_LONG = "552 5.3.4 Message text line longer than %d octets"
R553_NEED_DOMAIN = "553 5.1.3 <%s>: Address needs a fully qualified domain"
R553_SENDER_NEEDS_DOMAIN = "553 5.1.7 <%s>: Sender address needs a fully qualified domain"
R553_NOT_OWNER = "553 5.7.1 <%s>: Sender address not owned by user %s"
R553_NEED_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"
R554_EARLY_TALKER = "554 5.5.0 Protocol violation: talked before the greeting"
R554_RELAY_DENIED = "554 5.7.1 <%s>: Relay access denied"
R554_ROUTING_DENIED = "554 5.7.1 <%s>: Sender-specified routing is not allowed"
R554_NO_VALID_RECIPIENTS = "554 5.5.1 No valid recipients"
R554_TOO_MANY_HOPS = "554 5.4.6 Too many Received: headers, mail loop?"
R555_UNKNOWN_PARAMETER = "555 5.5.4 Unsupported MAIL or RCPT parameter %s"
R555_BAD_PARAMETER = "555 5.5.4 Bad value for parameter %s"
# SPF's refusals at MAIL (550 5.7.23 with the domain's explanation, 451 4.7.24; RFC 7372 3.2)
# are built by spf.smtp_reply().

# Base64 of "Username:" and "Password:", the LOGIN mechanism's customary challenges.
LOGIN_USERNAME = "VXNlcm5hbWU6"
LOGIN_PASSWORD = "UGFzc3dvcmQ6"

log = logging.getLogger("smtp_in")


# --- Data types ---

@dataclass
class Envelope:
    """One mail transaction: MAIL FROM, its parameters, and the accepted RCPT TO addresses."""
    mail_from: str
    rcpt_to: list = field(default_factory=list)
    size: Optional[int] = None         # the SIZE= the client announced (RFC 1870)
    smtputf8: bool = False             # RFC 6531 3.4
    rejected: int = 0                  # RCPTs refused, for the reply to DATA (RFC 5321 3.3)
    spf_result: Optional[spf.SPFResult] = None   # the SPF check of MAIL FROM; None: not checked


class _Cancelled(Exception):
    """The client answered a SASL challenge with "*" (RFC 4954 4)."""


# --- Pure helpers: commands, paths, parameters ---

ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"     # RFC 5321 4.1.2 (+ RFC 6531 3.3)
DOT_STRING = r"%s+(?:\.%s+)*" % (ATEXT, ATEXT)
QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
SUB_DOMAIN = r"[^\W_](?:(?:[^\W_]|-)*[^\W_])?"                  # Let-dig [Ldh-str], U-labels too
DOMAIN = r"%s(?:\.%s)*" % (SUB_DOMAIN, SUB_DOMAIN)
ADDRESS_LITERAL = r"\[[^\[\]\\\s]+\]"
DOT_STRING_RE = re.compile(DOT_STRING + r"\Z")
DOMAIN_RE = re.compile(DOMAIN + r"\Z")
MAILBOX_RE = re.compile(r"(?P<local>%s|%s)(?:@(?P<domain>%s|%s))?\Z"
                        % (DOT_STRING, QUOTED_STRING, DOMAIN, ADDRESS_LITERAL))
ROUTE_RE = re.compile(r"@(?:%s|%s)(?:,@(?:%s|%s))*:" % (DOMAIN, ADDRESS_LITERAL,
                                                         DOMAIN, ADDRESS_LITERAL))
KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")           # RFC 5321 4.1.2 esmtp-keyword
VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")  # esmtp-value (+ RFC 6531)
SIZE_RE = re.compile(r"[0-9]{1,20}\Z")                              # RFC 1870 6: 1*20DIGIT
XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")  # RFC 3461 4


def split_command(line):
    """Split a command line into (VERB, argument): the verb upper-cased, spaces trimmed."""
    verb, _, arg = line.strip(" ").partition(" ")
    return verb.upper(), arg.strip(" ")


def is_domain(text):
    """True for a syntactically valid domain name (RFC 5321 4.1.2 Domain), A- or U-labels."""
    return (0 < len(text.encode("utf-8")) <= MAX_DOMAIN and DOMAIN_RE.match(text) is not None
            and all(len(label) <= 63 for label in text.split(".")))


def address_literal(text):
    """The IP address inside an address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]"), or None."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def split_address(address):
    """Split "local@domain" into (local part without quotes, domain); domain "" when absent."""
    if address.startswith('"'):
        end = address.rfind('"')
        local, domain = address[1:end], address[end + 2:]
        return re.sub(r"\\(.)", r"\1", local), domain
    local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
    return local, domain


def _quote_local(local):
    """A local part as RFC 5321 4.1.2 writes it: a Dot-string when it can be, else quoted."""
    if DOT_STRING_RE.match(local):
        return local
    return '"%s"' % re.sub(r'(["\\])', r"\\\1", local)


def _find_closing_bracket(text):
    """Index of the ">" that closes a path starting with "<", skipping quoted strings."""
    if '"' not in text:
        return text.find(">")
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def parse_path(arg, prefix="TO:"):
    """Parse the argument of MAIL ("FROM:") or RCPT ("TO:") into (address, parameters text).

    RFC 5321 4.1.2: the address is "" for the null path <>; a source route (<@a,@b:u@d>) is
    accepted and dropped (4.1.1.3); a quoted local part that needs no quotes is unquoted and
    the domain lower-cased. Lenient like common MTAs: a space after the colon and a path
    without angle brackets are accepted. A local part without a domain is returned as is
    (the caller decides: only "postmaster" may lack one). Returns None on bad syntax.
    """
    if arg[:len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix):].lstrip(" ")
    if rest.startswith("<"):
        end = _find_closing_bracket(rest)
        if end < 0:
            return None
        path, params = rest[1:end], rest[end + 1:]
        if params and not params.startswith(" "):
            return None
        if end + 1 > MAX_PATH:
            return None
    else:
        path, _, params = rest.partition(" ")
        if not path or ">" in path or len(path) + 2 > MAX_PATH:
            return None
    if path == "":
        return "", params.strip(" ")
    route = ROUTE_RE.match(path)
    if route:
        path = path[route.end():]
    match = MAILBOX_RE.match(path)
    if match is None:
        return None
    local, domain = split_address(path)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        return None
    if match.group("domain") is None:
        return _quote_local(local), params.strip(" ")
    if domain.startswith("["):
        if address_literal(domain) is None:
            return None
    elif not is_domain(domain):
        return None
    if not domain.startswith("["):
        domain = domain.lower()
    return "%s@%s" % (_quote_local(local), domain), params.strip(" ")


def parse_mail_params(text):
    """Parse "KEY=value KEY2 ..." (RFC 5321 4.1.2 Mail-parameters) into {KEY: value or None}.

    Keywords are upper-cased. Raises ValueError on bad syntax or a repeated keyword.
    """
    params = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not KEYWORD_RE.match(keyword) or (equals and not VALUE_RE.match(value)):
            raise ValueError("bad parameter %r" % item)
        keyword = keyword.upper()
        if keyword in params:
            raise ValueError("repeated parameter %s" % keyword)
        params[keyword] = value if equals else None
    return params


def parse_networks(texts):
    """Turn CIDR strings ("192.0.2.0/24", "::1") into ip_network objects; ValueError if bad."""
    return [ipaddress.ip_network(text.strip(), strict=False) for text in texts if text.strip()]


def _in_networks(ip, networks):
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def protocol_name(esmtp, tls, authenticated, smtputf8=False):
    """The "with" protocol of Received: (RFC 3848 2; RFC 6531 3.7.3 for SMTPUTF8)."""
    if not esmtp:
        return "SMTP"
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "") + ("A" if authenticated else "")


def _comment_text(text):
    """Text safe inside an RFC 5322 comment: no parentheses or backslashes left unescaped."""
    if "(" not in text and ")" not in text and "\\" not in text:
        return text
    return re.sub(r"([()\\])", r"\\\1", text)


_date_made = (None, "")            # (a second of time.time(), Received:'s date for it)


def _date_now():
    """Now as an RFC 5322 date in local time, made once a second (Received: shows seconds)."""
    global _date_made
    second = int(time.time())
    if _date_made[0] != second:
        local = datetime.datetime.fromtimestamp(second).astimezone()
        _date_made = (second, format_datetime(local))
    return _date_made[1]


def received_header(helo, client_ip, client_name, hostname, protocol, queue_id,
                    recipient=None, when=None):
    """The Received: trace header of RFC 5321 4.4, folded, as CRLF-terminated bytes.

    from HELO (NAME [IP]) by HOSTNAME with PROTOCOL id QUEUEID for <RCPT>; DATE
    A HELO that is neither a domain nor an address literal is shown in the comment instead.
    """
    literal = "[IPv6:%s]" % client_ip if ":" in client_ip else "[%s]" % client_ip
    tcp_info = "%s %s" % (client_name, literal) if client_name else literal
    if helo and (is_domain(helo) or address_literal(helo) is not None):
        from_part = helo
    else:
        from_part = literal
        tcp_info += " helo=" + (helo or "none")
    lines = ["Received: from %s (%s)" % (from_part, _comment_text(tcp_info)),
             "\tby %s with %s id %s" % (hostname, protocol, queue_id)]
    date = format_datetime(when) if when else _date_now()
    if recipient:
        lines.append("\tfor <%s>; %s" % (recipient, date))
    else:
        lines[-1] += ";"
        lines.append("\t" + date)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def count_hops(message):
    """The number of Received: headers in the header section of message (bytes)."""
    end = message.find(b"\r\n\r\n")
    header = message[:end] if end >= 0 else message
    return len(re.findall(rb"(?im)^received:", header))


def spf_trace_fields(result, hostname):
    """The Received-SPF field (RFC 7208 9.1) to go above our Received:, CRLF-terminated
    bytes; its Authentication-Results part goes on top at the end (see
    authentication_results_field())."""
    return (spf.received_spf_header(result, hostname) + "\r\n").encode("utf-8")


def authentication_results_field(hostname, spf_result=None, dkim_results=None,
                                 dmarc_result=None):
    """ONE Authentication-Results field (RFC 8601 2.2, HOSTNAME as authserv-id) for what
    was checked: spf= (an spf.SPFResult), dkim= for each signature (dkim.verify()'s list),
    dmarc= (a dkim.DMARCResult); None for what was not. CRLF-terminated text, "" when
    nothing was checked at all."""
    fragments = []
    if spf_result is not None:
        fragments.append(spf.authentication_results_fragment(spf_result))
    fragments += dkim.authentication_results_fragments(dkim_results or (), dmarc_result)
    if not fragments:
        return ""
    return dkim.authentication_results_header(hostname, fragments) + "\r\n"


# A header line that starts a Received: field, one that starts an Authentication-Results field.
RECEIVED_FIELD_RE = re.compile(rb"(?i)received:")
AUTH_RESULTS_NAME_RE = re.compile(rb"(?i)authentication-results[ \t]*:")
SPAM_FLAG_NAME_RE = re.compile(rb"(?i)x-spam-flag[ \t]*:")
# An Authentication-Results field in the header section, its value with continuation lines
# (mail data holds only CRLF line ends: MessageCollector refuses the rest).
AUTH_RESULTS_FIELD_RE = re.compile(rb"(?im)^authentication-results[ \t]*:"
                                   rb"((?:[^\r\n]|\r\n[ \t])*)\r\n")
TOKEN_RE = re.compile(r'[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f]+')        # RFC 2045 5.1 token
QUOTED_VALUE_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')                   # RFC 5322 3.2.4


def authserv_id(value):
    """The authserv-id an Authentication-Results value (str) starts with (RFC 8601 2.2),
    after any comments and folding; lower-cased, without a final dot; "" when none."""
    text = value.replace("\r\n", "")
    position, depth = 0, 0
    while position < len(text):                       # CFWS, comments nest (RFC 5322 3.2.2)
        char = text[position]
        if depth and char == "\\":
            position += 1
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and char not in " \t":
            break
        position += 1
    quoted = QUOTED_VALUE_RE.match(text, position)
    if quoted:
        found = re.sub(r"\\(.)", r"\1", quoted.group(1))
    else:
        token = TOKEN_RE.match(text, position)
        found = token.group() if token else ""
    return found.lower().rstrip(".")


def remove_authentication_results(message, hostname):
    """Remove the Authentication-Results fields whose authserv-id is HOSTNAME (RFC 8601 5):
    they claim a check this host never made. Only the header section is searched, and the
    message (bytes) is returned as is, not copied, when there is nothing to remove."""
    if message.startswith(b"\r\n"):
        return message                                 # an empty header section
    end = message.find(b"\r\n\r\n")
    end = len(message) if end < 0 else end + 2
    ours = hostname.lower().rstrip(".")
    doomed = [match.span() for match in AUTH_RESULTS_FIELD_RE.finditer(message, 0, end)
              if authserv_id(match.group(1).decode("latin-1")) == ours]
    if not doomed:
        return message
    kept, start = [], 0
    for field_start, field_end in doomed:
        kept.append(message[start:field_start])
        start = field_end
    kept.append(message[start:])
    return b"".join(kept)


# --- Pure helper: the DATA phase ---

class MessageCollector:
    """Collects mail data from raw blocks up to <CRLF>.<CRLF> (RFC 5321 4.1.1.4, 4.5.2).

    Pure: fed the bytes as they come, it never touches a socket. Only CR LF "." CR LF ends
    the data. Against SMTP smuggling, text holding a bare CR, a bare LF or a NUL is refused
    whole (550 5.6.0) rather than normalised: RFC 5321 2.3.8 forbids them, and whatever a
    bare "\\n.\\n" or "\\r.\\r" was meant to end stays inside the one refused message, so a
    second MAIL/RCPT/DATA behind it is never run, and no such byte reaches a later hop that
    might read it differently. Text past max_size, or past a line longer than max_line
    (see MAX_TEXT_LINE), is read to its end but not kept.

    The text goes on as it comes, dot-stuffing undone, in chunks of whole lines, to
    sink(bytes) (smtp_in's queue file); with no sink it is kept for message() (tests).
    Nothing more is held than the line not yet ended: memory stays bounded by a block and
    a line, whatever the message size. Once the text is found bad the sink gets nothing
    more; a caller discards what it got when refusal() is not None.
    """

    def __init__(self, max_size, max_line=MAX_TEXT_LINE, sink=None):
        self.max_size = max_size
        self.max_line = max_line
        self.sink = sink
        self.data = bytearray()        # the text so far, when there is no sink
        # The end of the last line passed on, then the line not ended yet: "\r\n" first,
        # the CRLF that ended "DATA", which begins the first line.
        self.tail = CRLF
        self.size = 0                  # octets of text received (dot-stuffed, as sent)
        self.too_big = False
        self.line_too_long = False
        self.nul = False
        self.bare_line_ending = False
        self.done = False

    def feed(self, block):
        """Take the next block; once the end is found, return the bytes that follow it."""
        data = self.tail + block
        end = data.find(END_OF_DATA, max(len(self.tail) - 4, 0))
        if self.too_big or self.line_too_long:
            # Only the end and the size matter now; keep what a split terminator may need.
            # (The tail was counted as text; the octets of it that turn out to begin the
            # terminator are taken off again.)
            self.size += len(block) if end < 0 else end + 2 - len(self.tail)
            self.too_big = self.too_big or self.size > self.max_size
            if end >= 0:
                self.done = True
                return data[end + 5:]
            self.tail = data[-4:]
            return b""
        if end >= 0:
            self.done = True
            self._take(data[2:end + 2])
            self.tail = b""
            return data[end + 5:]
        last = data.rfind(b"\n", 2)
        if last >= 0:
            self._take(data[2:last + 1])
            data = data[last - 1:]
        self.tail = data
        pending = len(data) - 2        # octets of the line not ended yet
        if pending > self.max_line + 2:
            self.line_too_long = True  # longer than max_line with its dot and CR aside
        if self.size + pending > self.max_size:
            self.too_big = True
        if self.too_big or self.line_too_long:
            self.size += pending       # from now on counted as they come
            self.data = bytearray()
            self.tail = data[-4:]
        return b""

    def _take(self, text):
        """Check whole lines of text, then undo the dot-stuffing and pass them on."""
        if not text:
            return
        self.size += len(text)
        if self.size > self.max_size:
            self.too_big = True
            self.data = bytearray()
            return
        if len(text) >= self.max_line + 2 and _line_too_long(text, self.max_line):
            self.line_too_long = True
            self.data = bytearray()
            return
        if b"\0" in text:
            self.nul = True
        crlf = text.count(CRLF)
        if text.count(b"\r") != crlf or text.count(b"\n") != crlf:
            self.bare_line_ending = True
        if self.nul or self.bare_line_ending:
            return
        # RFC 5321 4.5.2: the client doubled a leading "."; remove one. text begins a line.
        if text[:1] == b".":
            text = text[1:]
        text = text.replace(b"\r\n.", CRLF)
        if self.sink is None:
            self.data += text
        else:
            self.sink(text)

    def refusal(self):
        """The reply refusing the message once done, or None when it may be accepted."""
        if self.too_big:
            return R552_TOO_BIG
        if self.line_too_long:
            return R552_LINE_TOO_LONG % self.max_line
        if self.nul:
            return R550_NUL
        if self.bare_line_ending:
            return R550_BARE_LINE_ENDING
        return None

    def message(self):
        """The message text with the dot-stuffing undone (without a sink)."""
        return bytes(self.data)


def _line_length(text, start, end):
    """The length MAX_TEXT_LINE limits, of the line of text from start to its LF at end:
    without its CRLF (or bare LF) and without a leading dot doubled for transparency."""
    length = end - start
    if length and text[end - 1] == 0x0D:
        length -= 1
    if length and text[start] == 0x2E:
        length -= 1
    return length


def _line_too_long(text, max_line):
    """True when a line of text (whole lines, each ending in LF) is longer than max_line,
    as _line_length counts. Only the first and the last line are measured, unless the
    lines in between span more than max_line octets (rare: a block is about that size)."""
    first = text.find(b"\n")
    if _line_length(text, 0, first) > max_line:
        return True
    last = text.rfind(b"\n", 0, len(text) - 1)
    if last < first:
        return False                   # one line only
    if _line_length(text, last + 1, len(text) - 1) > max_line:
        return True
    if last - first - 1 <= max_line:
        return False
    return any(len(line) > max_line and _line_length(line, 0, len(line)) > max_line
               for line in text[first + 1:last].split(b"\n"))


class HeaderFilter:
    """The checks smtp_in makes on a message's header, made as the text streams by:
    counts the Received: fields (the hop limit, RFC 5321 6.3) and removes the
    Authentication-Results fields that claim HOSTNAME (RFC 8601 5), and with
    remove_spam_flag every X-Spam-Flag field (the MX sets that one itself under --dmarc
    enforce, so a sender's own must not stand beside it or pass for it, as SpamAssassin
    removes the X-Spam- fields it finds), passing all the rest on to sink(bytes) at once.
    The header is the lines before the first empty one, as count_hops() and
    remove_authentication_results() read it.

    Fed whole lines (MessageCollector's chunks, CRLF line ends). Memory is bounded: only
    an Authentication-Results field is held, until its last continuation line, and one
    longer than MAX_HELD_FIELD is removed whatever it claims (RFC 8601 5 lets a border
    MTA remove any); everything else, header or body, goes on as it comes.
    """

    def __init__(self, hostname, sink, remove_spam_flag=False):
        self.ours = hostname.lower().rstrip(".")
        self.sink = sink
        self.remove_spam_flag = remove_spam_flag
        self.hops = 0                  # Received: fields seen
        self.in_body = False
        self.held = None               # the Authentication-Results field being read
        self.dropping = False          # skipping the rest of a field (removed, or held
                                       # and over-long)

    def feed(self, text):
        if self.in_body:
            self.sink(text)
            return
        out, start, size = [], 0, len(text)
        while start < size:
            end = text.find(b"\n", start) + 1 or size
            if text[start] in b" \t":                  # a continuation line (RFC 5322 2.2.3)
                if self.held is not None:
                    self.held += text[start:end]
                    if len(self.held) > MAX_HELD_FIELD:
                        self.held, self.dropping = None, True
                elif not self.dropping:
                    out.append(text[start:end])
                start = end
                continue
            self._settle(out)
            if end - start <= 2 and text[start:end] in (CRLF, b"\n"):
                self.in_body = True
                out.append(text[start:])
                break
            if RECEIVED_FIELD_RE.match(text, start):
                self.hops += 1
            if AUTH_RESULTS_NAME_RE.match(text, start):
                self.held = bytearray(text[start:end])
            elif self.remove_spam_flag and SPAM_FLAG_NAME_RE.match(text, start):
                self.dropping = True
            else:
                out.append(text[start:end])
            start = end
        if out:
            self.sink(b"".join(out))

    def finish(self):
        """The end of the message: pass on a field still held (a header without a body)."""
        out = []
        self._settle(out)
        if out:
            self.sink(out[0])

    def _settle(self, out):
        """Decide on the held field, if any: out gets it unless it claims our name."""
        self.dropping = False
        if self.held is None:
            return
        field, self.held = bytes(self.held), None
        value = field.partition(b":")[2]
        if authserv_id(value.decode("latin-1")) != self.ours:
            out.append(field)


class SpooledMessage:
    """A message on its way into the spool during DATA: our trace fields first, then the
    text as HeaderFilter passes it on, into an mta.QueueWriter (see SMTPHandler.open_message).

    Writing stops at the first spool error (kept in error, answered after the data) and
    once the hop limit is reached; abort() removes the file unless it was committed.
    """

    def __init__(self, queue_id, protocol, hostname, remove_spam_flag=False):
        self.queue_id = queue_id
        self.protocol = protocol
        self.header = HeaderFilter(hostname, self.write, remove_spam_flag)
        self.writer = None             # the mta.QueueWriter, once opened
        self.error = None              # the OSError that stopped the writing
        self.verdict = ""              # DKIM and DMARC, or signing, for the log line

    def open(self, writer, prefix):
        self.writer = writer
        self.write(prefix)

    def write(self, data):
        if self.writer is None or self.error is not None or self.header.hops >= MAX_HOPS:
            return
        try:
            self.writer.write(data)
        except OSError as exc:         # mta.SpoolError: the writer removed its file
            self.error = exc

    def abort(self):
        if self.writer is not None:
            self.writer.abort()        # a committed file stays


# --- DNS: the optional reverse lookup, and SPF's resolver ---

def make_reverse_lookup(dns_server="", timeout=REVERSE_DNS_TIMEOUT):
    """Return ip -> forward-confirmed host name or None, through dnsstub.

    dns_server is "HOST[:PORT]", or "" for /etc/resolv.conf. The name is trusted only when
    one of its A/AAAA records is the client's address again, as Postfix does.
    """
    resolver = dnsstub.Resolver([dns_server] if dns_server else None, timeout=timeout,
                                attempts=1, lifetime=timeout * 2)

    def lookup(ip):
        try:
            wanted = ipaddress.ip_address(ip)
            for name in resolver.ptr(ip)[:4]:
                answer = resolver.resolve(name, "AAAA" if wanted.version == 6 else "A")
                if any(ipaddress.ip_address(r.data) == wanted for r in answer.records):
                    return name
        except (dnsstub.DNSError, ValueError, OSError) as exc:
            log.debug("reverse lookup of [%s] failed: %s", ip, exc)
        return None

    return lookup


def make_flow_gate(spool_dir, delay):
    """The mta.FlowGate a MAIL waits at for the router, at most delay seconds (0: never)."""
    delay = float(delay)
    if not 0 <= delay <= 60:
        raise ValueError("in_flow_delay: %g is not between 0 and 60 seconds" % delay)
    return mta.FlowGate(spool_dir, delay)


def make_spf_resolver(policy, dns_server="", timeout=DEFAULTS["spf_timeout"]):
    """The resolver SPF checks use under POLICY (one of SPF_POLICIES), None for "off".

    dns_server is "HOST[:PORT]", or "" for /etc/resolv.conf. Each lookup waits SPF_DNS_TRY
    seconds per try, two tries, and never more than TIMEOUT, so a resolver that does not
    answer costs a MAIL command a few seconds, not the 10 s per nameserver of resolv.conf's
    defaults. Raises ValueError for an unknown policy or a bad nameserver.
    """
    if policy not in SPF_POLICIES:
        raise ValueError("spf: %r is not one of %s" % (policy, ", ".join(SPF_POLICIES)))
    if not 0 < timeout <= 3600:
        raise ValueError("spf_timeout: %g is not between 0 and 3600 seconds" % timeout)
    if policy == "off":
        return None
    resolver = dnsstub.Resolver([dns_server] if dns_server else None,
                                timeout=min(SPF_DNS_TRY, timeout), attempts=2, lifetime=timeout)
    return spf.DNSResolver(resolver)


def check_dmarc_policy(policy):
    """POLICY when it is one of DMARC_POLICIES; ValueError otherwise."""
    if policy not in DMARC_POLICIES:
        raise ValueError("dmarc: %r is not one of %s" % (policy, ", ".join(DMARC_POLICIES)))
    return policy


def make_dkim_resolver(dns_server="", timeout=DEFAULTS["dkim_timeout"]):
    """The resolver DKIM key and DMARC policy lookups use: a dkim.DNSResolver over dnsstub.

    dns_server is "HOST[:PORT]", or "" for /etc/resolv.conf. Each lookup waits DKIM_DNS_TRY
    seconds per try, two tries, and never more than TIMEOUT (dkim.verify() and
    dkim.evaluate_dmarc() bound the whole message on top). Raises ValueError for a bad
    timeout or nameserver.
    """
    if not 0 < timeout <= 3600:
        raise ValueError("dkim_timeout: %g is not between 0 and 3600 seconds" % timeout)
    resolver = dnsstub.Resolver([dns_server] if dns_server else None,
                                timeout=min(DKIM_DNS_TRY, timeout), attempts=2, lifetime=timeout)
    return dkim.DNSResolver(resolver)


def message_authentication(blocks, spf_result, resolver, *, verify=True, dmarc=True,
                           timeout=DEFAULTS["dkim_timeout"]):
    """(DKIM results or None, DMARC result or None) of a whole message on the MX.

    BLOCKS is a function giving the message's blocks anew (read once for DKIM, once more
    for the From field). With VERIFY, dkim.verify() checks its signatures; with DMARC,
    dkim.evaluate_dmarc() judges its From domain (RFC 7489 6.6) with SPF_RESULT (an
    spf.SPFResult, None when SPF was not checked: spf=none) and the DKIM results. Both
    share one DNS budget of TIMEOUT seconds; a DNS failure is a temperror, never raised.
    """
    deadline = time.monotonic() + timeout
    dkim_results = dmarc_result = None
    if verify:
        dkim_results = dkim.verify(blocks(), resolver, timeout=timeout)
    if dmarc:
        try:
            author_domain = dkim.from_domain(blocks())
        except dkim.DKIMError as exc:
            dmarc_result = dkim.DMARCResult("none", reason=str(exc))
        else:
            dmarc_result = dkim.evaluate_dmarc(
                author_domain, spf_result.result if spf_result else "none",
                spf_result.domain if spf_result else "", dkim_results or [], resolver,
                timeout=max(0.0, deadline - time.monotonic()))
    return dkim_results, dmarc_result


# --- Protocol handler ---

class SMTPHandler(plumbing.ConnectionHandler):
    """One SMTP session: one smtp_VERB method per command, one dispatch()."""

    timeout_reply = R421_TIMEOUT
    stopping_reply = R421_SHUTTING_DOWN
    crash_reply = R421_INTERNAL_ERROR
    log = log

    def setup(self):
        super().setup()
        self.helo = None               # the EHLO/HELO argument, None before one
        self.esmtp = False
        self.envelope = None           # the mail transaction in progress
        self.auth_user = None
        self.auth_failures = 0
        self.relay_network = None      # whether client_ip is in relay_networks, once asked
        self.client_name = None        # forward-confirmed reverse DNS name, once looked up
        self.looked_up = False
        self.errors = 0                # 5xx replies since the last accepted message
        self.rejected = 0              # refused commands in the whole session
        self.commands = 0
        self.accepted = 0
        self.counts = {}               # VERB -> [accepted, total], for the disconnect line
        self.closing = False
        self.started = time.monotonic()
        self.log.info("connect from [%s]:%d%s", self.client_ip, self.client_port,
                      " (submission)" if self.server.submission else "")

    def finish(self):
        counters = ", ".join("%s=%s" % (verb.lower(), ok if ok == total else "%d/%d" % (ok, total))
                             for verb, (ok, total) in self.counts.items())
        self.log.info("disconnect from [%s]: %s%scommands=%d, accepted=%d, rejected=%d, time=%.3f",
                      self.client_ip, counters, ", " if counters else "", self.commands,
                      self.accepted, self.rejected, time.monotonic() - self.started)

    # --- session loop ---

    def session(self):
        if not self.tls and self.talks_before_greeting():
            self.refuse("CONNECT", R554_EARLY_TALKER)
            self.write(R554_EARLY_TALKER)
            self.linger()
            return
        self.write(R220_GREETING % self.server.hostname)
        while not self.closing:
            line = self.reader.readline(MAX_COMMAND_LENIENT)
            if line is None or not line.ending:
                return                 # the client closed, perhaps in mid-line
            reply = self.handle_line(line)
            if reply:
                self.pause(self.reply_delay())         # the anvil slows an erring address
                self.write(reply)
            if self.errors >= self.server.max_errors and not self.closing:
                self.write(R421_TOO_MANY_ERRORS)
                self.closing = True

    def talks_before_greeting(self):
        """True when the client sent data before the greeting (RFC 5321 3.1, 4.3.1).

        With greet_pause 0 there is no check: a look without a wait would catch only the
        talkers whose bytes happen to have arrived already.
        """
        if self.server.greet_pause <= 0:
            return False
        ready = plumbing.wait_readable(self.sock, self.server.greet_pause)
        if ready is None:
            return False
        try:
            return bool(ready) and self.sock.recv(1, socket.MSG_PEEK) != b""
        except (BlockingIOError, InterruptedError):
            return False

    def linger(self):
        """Send what is queued, then read and drop the client's lines until it closes, for
        at most EARLY_TALKER_LINGER seconds: closing on unread input would reset the
        connection, and the client might never read the reply."""
        self.flush()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        until = time.monotonic() + EARLY_TALKER_LINGER
        dropped = 0
        while dropped < MAX_COMMAND_LENIENT * 32:
            left = until - time.monotonic()
            if left <= 0 or not plumbing.wait_readable(self.sock, left):
                return
            try:
                block = self.sock.recv(plumbing.READ_BLOCK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not block:
                return
            dropped += len(block)

    def handle_line(self, line):
        """Turn one raw command line into a reply, refusing what is not a clean command."""
        self.commands += 1
        if self.commands > self.server.max_commands:
            self.closing = True
            return R421_TOO_MANY_COMMANDS
        if line.ending == b"\r":                      # long or not: refused whole
            self.discard_rest_of_line()
            return self.refuse("?", R500_BARE_CR)
        if line.too_long:
            return self.refuse("?", R500_LINE_TOO_LONG)
        try:
            text = line.data.decode("utf-8")
        except UnicodeDecodeError:
            return self.refuse("?", R500_BAD_CHARACTERS)
        if not text.isprintable():                     # NUL, TAB, C0/C1 controls, U+2028 ...
            return self.refuse("?", R500_BAD_CHARACTERS)
        return self.dispatch(text)

    def discard_rest_of_line(self):
        """RFC 5321 2.3.8: a bare CR ends no line. What follows it, up to the next LF, is
        part of the same refused command and never runs as a command of its own."""
        while True:
            line = self.reader.readline(MAX_COMMAND_LENIENT)
            if line is None or not line.ending:
                self.closing = True
                return
            if line.ending != b"\r":
                return
            self.commands += 1                         # each piece counts: the loop ends
            if self.commands > self.server.max_commands:
                self.closing = True
                return

    def dispatch(self, text):
        verb, arg = split_command(text)
        handler = getattr(self, "smtp_" + verb, None) if verb.isascii() and verb.isalpha() else None
        if handler is None:
            return self.refuse(verb[:16] or "?", R500_UNKNOWN)
        envelope = self.envelope                       # DATA ends the transaction; log it
        reply = handler(arg)
        counts = self.counts.setdefault(verb, [0, 0])
        counts[1] += 1
        if reply is None or reply[0] in "23":
            counts[0] += 1
            return reply
        return self.refuse(verb, reply, arg, envelope)

    def refuse(self, verb, reply, arg="", envelope=None):
        """Log a refused command (who, which, the reply) and count 5xx errors; return reply."""
        if reply[0] == "5":
            self.errors += 1
            if verb != "AUTH":                         # failed logins are counted apart
                self.count_error()
        self.rejected += 1
        detail = ", arg=%r" % arg[:200] if verb in ("MAIL", "RCPT") and arg else ""
        sender = ", from=<%s>" % envelope.mail_from if envelope is not None else ""
        self.log.info("NOQUEUE: client=[%s], helo=%r, cmd=%s%s%s, status=rejected (%s)",
                      self.client_ip, self.helo, verb, sender, detail, reply)
        return reply

    def reset_transaction(self):
        self.envelope = None

    # --- session state ---

    @property
    def may_relay(self):
        if self.auth_user is not None:
            return True
        if self.relay_network is None:
            self.relay_network = _in_networks(self.client_ip, self.server.relay_networks)
        return self.relay_network

    @property
    def auth_offered(self):
        """RFC 4954 4: plaintext passwords only inside TLS, or on this very machine."""
        return self.tls or self.is_loopback

    def ehlo_keywords(self):
        keywords = ["PIPELINING", "SIZE %d" % self.server.max_size, "8BITMIME",
                    "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.server.tls_context is not None and not self.tls:
            keywords.append("STARTTLS")
        if self.auth_offered:
            keywords.append("AUTH PLAIN LOGIN")
        keywords.append("HELP")
        return keywords

    # --- commands (RFC 5321 4.1.1, in its order, then the extensions) ---

    def smtp_EHLO(self, arg):
        if not arg or " " in arg or not arg.isascii() or len(arg) > MAX_DOMAIN:
            return R501_HELO_SYNTAX
        self.reset_transaction()
        self.helo, self.esmtp = arg, True
        lines = ["%s greets [%s]" % (self.server.hostname, self.client_ip)] + self.ehlo_keywords()
        return "\r\n".join("250%s%s" % ("-" if n < len(lines) - 1 else " ", text)
                           for n, text in enumerate(lines))

    def smtp_HELO(self, arg):
        if not arg or " " in arg or not arg.isascii() or len(arg) > MAX_DOMAIN:
            return R501_HELO_SYNTAX
        self.reset_transaction()
        self.helo, self.esmtp = arg, False
        return R250_HELO % self.server.hostname

    def smtp_MAIL(self, arg):
        if self.helo is None:
            return R503_NEED_HELO
        if self.envelope is not None:
            return R503_NESTED_MAIL
        if self.server.submission and self.auth_user is None:
            return R530_AUTH_REQUIRED
        parsed = parse_path(arg, prefix="FROM:")
        if parsed is None:
            return R501_BAD_SENDER
        sender, param_text = parsed
        if sender and "@" not in sender:
            return R553_SENDER_NEEDS_DOMAIN % sender
        try:
            params = parse_mail_params(param_text)
        except ValueError:
            return R501_SYNTAX
        if params and not self.esmtp:
            return R555_UNKNOWN_PARAMETER % next(iter(params))
        envelope = Envelope(sender, smtputf8="SMTPUTF8" in params)
        for keyword, value in params.items():
            if keyword == "SIZE":                       # RFC 1870 6
                if value is None or not SIZE_RE.match(value):
                    return R555_BAD_PARAMETER % keyword
                envelope.size = int(value)
            elif keyword == "BODY":                     # RFC 6152 2
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return R555_BAD_PARAMETER % keyword
            elif keyword == "SMTPUTF8":                 # RFC 6531 3.4
                if value is not None:
                    return R555_BAD_PARAMETER % keyword
            elif keyword == "AUTH":                     # RFC 4954 5: noted, never trusted
                if value is None or not (value == "<>" or XTEXT_RE.match(value)):
                    return R555_BAD_PARAMETER % keyword
            else:
                return R555_UNKNOWN_PARAMETER % keyword
        if envelope.size is not None and envelope.size > self.server.max_size:
            return R552_TOO_BIG
        if not sender.isascii() and not envelope.smtputf8:
            return R553_NEED_SMTPUTF8
        if self.auth_user is not None and not self.owns_sender(sender):
            return R553_NOT_OWNER % (sender, self.auth_user)
        envelope.spf_result = self.check_spf(sender)
        if envelope.spf_result is not None and self.server.spf_policy == "reject":
            refusal = spf.smtp_reply(envelope.spf_result)   # fail: 550, temperror: 451
            if refusal:
                return refusal
        self.server.flow.wait()        # mail faster than the router routes it: keep its pace
        self.envelope = envelope
        return R250_SENDER_OK

    def check_spf(self, sender):
        """SPF for this transaction (RFC 7208 2.4: MAIL FROM, or HELO for the null sender);
        None when it is not checked: policy off, or a client that authenticated or is in
        --relay-network, which sends as our own users."""
        server = self.server
        if server.spf_policy == "off" or self.may_relay:
            return None
        result = spf.check_sender(self.client_ip, sender, self.helo, server.spf_resolver,
                                  receiver=server.hostname, timeout=server.spf_timeout)
        if result.result == "temperror":
            self.log.warning("spf: client=[%s], helo=%r, from=<%s>, result=temperror (%s)",
                             self.client_ip, self.helo, sender, result.problem)
        return result

    def owns_sender(self, sender):
        """RFC 6409 6.1: an authenticated user may send only as itself or one of its aliases."""
        try:
            address = mailbox_store.canonical_address(sender)
        except mailbox_store.AddressError:
            return False
        owned = self.server.store.sender_addresses(self.auth_user)
        local, _, domain = address.rpartition("@")
        base = local.split("+", 1)[0]                  # sub-addresses of one's own address
        return address in owned or "%s@%s" % (base, domain) in owned

    def smtp_RCPT(self, arg):
        envelope = self.envelope
        if envelope is None:
            return R503_NEED_MAIL
        parsed = parse_path(arg, prefix="TO:")
        if parsed is None or parsed[0] == "":
            return self.rcpt_refused(R501_BAD_RECIPIENT)
        recipient, param_text = parsed
        if param_text:
            try:
                keyword = next(iter(parse_mail_params(param_text)))
            except ValueError:
                return self.rcpt_refused(R501_SYNTAX)
            return self.rcpt_refused(R555_UNKNOWN_PARAMETER % keyword)
        if "@" not in recipient:
            if recipient.lower() != "postmaster":      # RFC 5321 4.5.1
                return self.rcpt_refused(R553_NEED_DOMAIN % recipient)
            recipient = "postmaster@%s" % self.server.primary_domain
        if not recipient.isascii() and not envelope.smtputf8:
            return self.rcpt_refused(R553_NEED_SMTPUTF8)
        if len(envelope.rcpt_to) >= self.server.max_recipients:
            return R452_TOO_MANY_RECIPIENTS            # RFC 5321 4.5.3.1.10: not an error
        refusal = self.recipient_refusal(recipient)
        if refusal:
            return self.rcpt_refused(refusal)
        if recipient not in envelope.rcpt_to:
            envelope.rcpt_to.append(recipient)
        return R250_RECIPIENT_OK

    def rcpt_refused(self, reply):
        self.envelope.rejected += 1
        return reply

    def recipient_refusal(self, recipient):
        """The reply refusing recipient under the relay and mailbox policy, or None."""
        local, domain = split_address(recipient)
        store = self.server.store
        if domain.lower().rstrip(".") in self.server.relay_domains:
            # A backup MX (RFC 5321 5.1) takes the domain's mail from anyone. It can refuse
            # unknown recipients only when its store knows the domain's users (a shared or
            # copied users file); else it takes them all, and the primary bounces later.
            if not store.is_local_domain(domain):
                return None
        elif domain.startswith("[") or not store.is_local_domain(domain):
            if self.may_relay:
                return None
            if self.server.store_unavailable():
                return R451_STORE_UNAVAILABLE % recipient
            return R554_RELAY_DENIED % recipient
        # "%" and "!" hacks and quoted "@" ask us to route onwards (RFC 5321 3.6.1, 4.1.1.3)
        if not self.may_relay and any(char in local for char in "%!@"):
            return R554_ROUTING_DENIED % recipient
        try:
            if store.recipient_exists(recipient):      # aliases, sub-addresses, postmaster
                return None
        except mailbox_store.AliasTooBig:              # RFC 3463 X.2.4: list expansion
            return R550_ALIAS_TOO_BIG % recipient
        except mailbox_store.AliasLoop:                # RFC 3463 X.4.6: routing loop
            return R550_ALIAS_LOOP % recipient
        if self.server.store_unavailable():
            return R451_STORE_UNAVAILABLE % recipient
        return R550_UNKNOWN_USER % recipient

    def smtp_DATA(self, arg):
        envelope = self.envelope
        if envelope is None:
            return R503_NEED_MAIL
        if arg:
            return R501_NO_ARGUMENTS
        if not envelope.rcpt_to:
            return R554_NO_VALID_RECIPIENTS if envelope.rejected else R503_NEED_RCPT
        spooled = self.open_message()
        try:
            if spooled.error is not None:
                return self.spool_failed(spooled)      # RFC 5321 4.3.2: 451 or 452 to DATA
            self.write(R354_START_INPUT)
            self.reader.interruptible = False          # let a shutdown wait for this message
            try:
                collector = self.receive_message(spooled)
            finally:
                self.reader.interruptible = True
            if collector is None:
                self.log.info("lost connection from [%s] during DATA", self.client_ip)
                self.closing = True
                return None
            return collector.refusal() or self.queue_message(spooled)
        finally:
            spooled.abort()                            # a message not queued leaves nothing
            self.reset_transaction()

    def open_message(self):
        """A SpooledMessage in a new queue file, our trace fields already at its top.

        They are known before the text comes: Received: (RFC 5321 4.4), and above it
        Received-SPF when MAIL FROM was checked (its Authentication-Results part waits for
        DKIM and DMARC: see authenticate()). A spool that cannot take a file gives a
        SpooledMessage with its error set (an error writing it comes later, in write()).
        """
        envelope = self.envelope
        queue_id = plumbing.new_queue_id()
        protocol = protocol_name(self.esmtp, self.tls, self.auth_user is not None,
                                 envelope.smtputf8)
        recipient = envelope.rcpt_to[0] if len(envelope.rcpt_to) == 1 else None
        prefix = received_header(self.helo, self.client_ip, self.reverse_name(),
                                 self.server.hostname, protocol, queue_id, recipient)
        if envelope.spf_result is not None:
            prefix = spf_trace_fields(envelope.spf_result, self.server.hostname) + prefix
        # The MX's own X-Spam-Flag (--dmarc enforce) is the only one its users see.
        spooled = SpooledMessage(queue_id, protocol, self.server.hostname,
                                 remove_spam_flag=(self.server.dmarc_policy == "enforce"
                                                   and self.auth_user is None
                                                   and not self.may_relay))
        try:
            spooled.open(mta.QueueWriter(
                self.server.spool_dir, envelope.mail_from, list(envelope.rcpt_to),
                queue_id=queue_id, client_address=self.client_ip, client_helo=self.helo,
                auth_user=self.auth_user, protocol=protocol), prefix)
        except OSError as exc:                         # mta.SpoolError, or worse
            spooled.error = exc
        return spooled

    def receive_message(self, spooled):
        """Read the mail data in blocks into spooled as it comes; None when the client went
        away before its end."""
        collector = MessageCollector(self.server.max_size, sink=spooled.header.feed)
        while not collector.done:
            block = self.reader.read_block()
            if not block:
                return None
            leftover = collector.feed(block)
        self.reader.buffer += leftover                 # pipelined commands after the "."
        return collector

    def queue_message(self, spooled):
        """Make the spooled message durable; 250 only once it is (mta.QueueWriter.commit)."""
        if spooled.header.hops >= MAX_HOPS:
            return R554_TOO_MANY_HOPS
        spooled.header.finish()
        if spooled.error is None:
            try:
                refusal = self.authenticate(spooled)
                if refusal:
                    return refusal
                spooled.writer.commit()
            except OSError as exc:                     # mta.SpoolError, or worse
                spooled.error = exc
        if spooled.error is not None:
            return self.spool_failed(spooled)
        envelope, spf_result = self.envelope, self.envelope.spf_result
        self.log.info("%s: client=%s[%s], helo=%r, from=<%s>, size=%d, nrcpt=%d, proto=%s, "
                      "tls=%s, auth=%s, spf=%s, %s", spooled.queue_id, self.client_name or "",
                      self.client_ip, self.helo, envelope.mail_from, spooled.writer.size,
                      len(envelope.rcpt_to), spooled.protocol,
                      self.sock.version() if self.tls else "none", self.auth_user or "none",
                      spf_result.result if spf_result else "unchecked", spooled.verdict)
        self.accepted += 1
        self.errors = 0                                # Postfix counts errors between messages
        return R250_QUEUED % spooled.queue_id

    def authenticate(self, spooled):
        """DKIM, DMARC or signing once the whole message is written (not committed yet):
        header fields go on top of it through QueueWriter.prepend(). Returns the reply
        refusing it (--dmarc enforce, p=reject), or None to queue it."""
        server, envelope, writer = self.server, self.envelope, spooled.writer
        if self.auth_user is not None:
            signature = None
            if server.dkim_sign:
                signature = mta.dkim_signature(writer.blocks, server.spool_dir,
                                               server.store.is_local_domain,
                                               queue_id=spooled.queue_id, logger=self.log)
            if signature:
                writer.prepend(signature)
            spooled.verdict = "dkim=%s" % ("signed" if signature else "unsigned")
            return None
        checked = not self.may_relay
        dkim_results, dmarc_result = message_authentication(
            writer.blocks, envelope.spf_result, server.dkim_resolver,
            verify=checked and server.dkim_verify, dmarc=checked and server.dmarc_policy != "off",
            timeout=server.dkim_timeout)
        field = authentication_results_field(server.hostname, envelope.spf_result,
                                             dkim_results, dmarc_result)
        spooled.verdict = "dkim=%s, dmarc=%s" % (
            ",".join(r.result for r in dkim_results) if dkim_results else "unchecked",
            dmarc_result.result if dmarc_result else "unchecked")
        if field:
            writer.prepend(field)
        if (server.dmarc_policy == "enforce" and dmarc_result is not None
                and dmarc_result.result == "fail"):
            if dmarc_result.disposition == "reject":
                self.log.info("%s: client=[%s], from=<%s>, %s, status=rejected (DMARC policy "
                              "of %s)", spooled.queue_id, self.client_ip, envelope.mail_from,
                              spooled.verdict, dmarc_result.from_domain)
                return R550_DMARC_REJECT % dmarc_result.from_domain
            if dmarc_result.disposition == "quarantine":
                writer.prepend(QUARANTINE_FIELD)
                spooled.verdict += " (quarantine: %s)" % QUARANTINE_FIELD.strip()
        return None

    def spool_failed(self, spooled):
        """Log a message the spool could not take; the reply asking the client to retry."""
        exc = spooled.error
        self.log.error("%s: client=[%s], from=<%s>, status=deferred (spool: %s)",
                       spooled.queue_id, self.client_ip, self.envelope.mail_from, exc)
        return R452_SPOOL_FULL if exc.errno == errno.ENOSPC else R451_SPOOL_ERROR

    def reverse_name(self):
        """The client's forward-confirmed host name, looked up once per session if enabled."""
        if not self.looked_up and self.server.reverse_lookup is not None:
            self.client_name = self.server.reverse_lookup(self.client_ip)
        self.looked_up = True
        return self.client_name

    def smtp_RSET(self, arg):
        if arg:
            return R501_NO_ARGUMENTS
        self.reset_transaction()
        return R250_RESET

    def smtp_VRFY(self, arg):
        if not arg:
            return R501_SYNTAX
        return R252_CANNOT_VRFY                        # RFC 5321 3.5.3, 7.3: no disclosure

    def smtp_EXPN(self, arg):
        return R502_NOT_IMPLEMENTED                    # RFC 5321 7.3: lists stay private

    def smtp_HELP(self, arg):
        return R214_HELP

    def smtp_NOOP(self, arg):
        return R250_OK

    def smtp_QUIT(self, arg):
        if arg:
            return R501_NO_ARGUMENTS
        self.closing = True
        return R221_BYE % self.server.hostname

    def smtp_STARTTLS(self, arg):
        if arg:
            return R501_NO_ARGUMENTS
        if self.tls:
            return R503_TLS_ACTIVE
        if self.server.tls_context is None:
            return R502_NOT_IMPLEMENTED
        if not self.esmtp:
            return R503_NEED_EHLO
        self.start_tls(R220_READY_FOR_TLS)             # drops plaintext pipelined behind it
        # RFC 3207 4.2: forget everything learned before TLS; the client says EHLO again.
        self.reset_transaction()
        self.helo, self.esmtp, self.auth_user = None, False, None
        return None

    def smtp_AUTH(self, arg):
        if not self.esmtp:
            return R503_NEED_EHLO
        if self.auth_user is not None:
            return R503_ALREADY_AUTHENTICATED
        if self.envelope is not None:
            return R503_IN_TRANSACTION                 # RFC 4954 4
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            return R504_UNKNOWN_MECHANISM if mechanism else R501_SYNTAX
        if not self.auth_offered:
            return R538_ENCRYPTION_REQUIRED
        try:
            if mechanism == "PLAIN":
                login, password, authzid = self.sasl_plain(initial.strip(" "))
            else:
                login, password, authzid = self.sasl_login(initial.strip(" "))
        except plumbing.SASLError:
            return R501_BAD_SASL
        except _Cancelled:
            return R501_AUTH_CANCELLED

        def verify():
            user = self.server.store.authenticate(login, password)
            if user is not None and authzid and authzid.lower() != user.lower():
                return None                            # RFC 4616 2: no proxy authorization
            return user

        try:
            user = self.checked_login(login, verify)
        except plumbing.LoginThrottled:
            self.log.warning("auth refused unchecked: client=[%s], mechanism=%s, login=%r "
                             "(anvil: too many failed logins from this address)",
                             self.client_ip, mechanism, login)
            self.closing = True
            return R454_AUTH_THROTTLED
        if user is None:
            return self.auth_failed(mechanism, login)
        self.auth_user = user
        self.log.info("auth: client=[%s], mechanism=%s, user=%s", self.client_ip, mechanism, user)
        return R235_AUTH_OK

    def sasl_plain(self, initial):
        response = initial if initial else self.sasl_response("")
        authzid, login, password = plumbing.decode_plain(response)
        return login, password, authzid

    def sasl_login(self, initial):
        login = self.sasl_decode(initial if initial else self.sasl_response(LOGIN_USERNAME))
        password = self.sasl_decode(self.sasl_response(LOGIN_PASSWORD))
        if not login or not password:
            raise plumbing.SASLError("LOGIN needs a user name and a password")
        return login, password, ""

    @staticmethod
    def sasl_decode(response):
        try:
            return plumbing.decode_base64(response).decode("utf-8")
        except UnicodeDecodeError:
            raise plumbing.SASLError("not UTF-8") from None

    def sasl_response(self, challenge):
        """Send a 334 challenge and read the client's answer (RFC 4954 4); "*" cancels."""
        self.write(R334_CHALLENGE % challenge)
        line = self.reader.readline(MAX_SASL_LINE)
        if line is None or not line.ending:
            raise ConnectionError("client closed during AUTH")
        if line.ending == b"\r":
            self.discard_rest_of_line()
            raise plumbing.SASLError("bare CR")
        if line.too_long:
            raise plumbing.SASLError("response too long")
        if line.data.strip() == b"*":
            raise _Cancelled()
        return line.data

    def auth_failed(self, mechanism, login):
        """RFC 4954 6: 535 after a delay that grows; close after MAX_AUTH_FAILURES."""
        self.auth_failures += 1
        self.log.warning("auth failed: client=[%s], mechanism=%s, login=%r, failures=%d",
                         self.client_ip, mechanism, login, self.auth_failures)
        self.server.stopping.wait(plumbing.auth_failure_delay(self.auth_failures))
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.closing = True
        return R535_AUTH_FAILED


# --- Server ---

class SMTPServer(plumbing.ThreadedServer):
    """An SMTP listener: MX by default, submission (AUTH required) with submission=True.

    SMTPServer((host, port), config) takes a dict with any keys of DEFAULTS (the rest keep
    their defaults); for tests and run_all: SMTPServer(("127.0.0.1", 0), {"spool": DIR,
    "domain": ["example.com"]}), then serve_forever() on a thread and stop() to end.
    store is a mailbox_store.Store (made from the config when None); tls_context overrides
    tls_cert/tls_key; implicit_tls makes an SMTPS listener (RFC 8314); reverse_lookup is a
    function ip -> host name or None for the Received: header (see make_reverse_lookup);
    spf_resolver, shared between listeners, overrides the one made from spf and dns (see
    make_spf_resolver; any object with spf.DNSResolver's methods); dkim_resolver likewise
    for DKIM and DMARC (make_dkim_resolver; anything with a txt(name) method); flow, shared
    between listeners too, overrides the mta.FlowGate made from in_flow_delay.
    """

    busy_reply = R421_BUSY

    def __init__(self, address, config=None, *, store=None, submission=None, tls_context=None,
                 implicit_tls=False, reverse_lookup=None, spf_resolver=None,
                 dkim_resolver=None, anvil=None, flow=None, bind_and_activate=True):
        settings = plumbing.settings_of(DEFAULTS, config)
        self.spool_dir = plumbing.spool_path(str(settings["spool"]))
        self.hostname = settings["hostname"] or socket.getfqdn()
        self.domains = [domain.lower() for domain in settings["domain"]]
        self.primary_domain = self.domains[0] if self.domains else self.hostname
        self.store = store if store is not None else mailbox_store.Store(
            plumbing.store_path(str(settings["store"]), self.spool_dir), self.domains, self.hostname)
        self.store_apart = plumbing.store_is_apart(settings["store"], settings["spool"])
        self.submission = bool(settings["submission"] if submission is None else submission)
        self.relay_networks = parse_networks(settings["relay_network"])
        self.relay_domains = mta.relay_domain_set(settings["relay_domain"])
        self.max_size = int(settings["max_size"])
        self.max_recipients = int(settings["max_recipients"])
        self.max_errors = int(settings["max_errors"])
        self.max_commands = int(settings["max_commands"])
        self.greet_pause = float(settings["greet_pause"])
        self.flow = flow if flow is not None else make_flow_gate(self.spool_dir,
                                                                 settings["in_flow_delay"])
        self.reverse_lookup = reverse_lookup
        self.spf_policy = settings["spf"]
        self.spf_timeout = float(settings["spf_timeout"])
        if spf_resolver is None:
            spf_resolver = make_spf_resolver(self.spf_policy, settings["dns"], self.spf_timeout)
        self.spf_resolver = spf_resolver
        self.dkim_verify = plumbing.config_value("dkim_verify", settings["dkim_verify"], False)
        self.dkim_sign = plumbing.config_value("dkim_sign", settings["dkim_sign"], False)
        self.dmarc_policy = check_dmarc_policy(settings["dmarc"])
        self.dkim_timeout = float(settings["dkim_timeout"])
        if dkim_resolver is None:
            dkim_resolver = make_dkim_resolver(settings["dns"], self.dkim_timeout)
        self.dkim_resolver = dkim_resolver
        if tls_context is None and settings["tls_cert"]:
            tls_context = plumbing.server_tls_context(settings["tls_cert"],
                                                      settings["tls_key"] or settings["tls_cert"])
        if implicit_tls and tls_context is None:
            raise ValueError("an implicit TLS listener needs tls_cert and tls_key")
        super().__init__(address, SMTPHandler,
                         max_connections=int(settings["max_connections"]),
                         max_per_address=int(settings["max_per_address"]),
                         idle_timeout=float(settings["idle_timeout"]),
                         session_timeout=float(settings["session_timeout"]) or None,
                         tls_context=tls_context, implicit_tls=implicit_tls,
                         stress_threshold=float(settings["stress_threshold"]),
                         stress_idle_timeout=float(settings["stress_idle_timeout"]),
                         stress_session_timeout=float(settings["stress_session_timeout"]),
                         anvil=anvil if anvil is not None else plumbing.Anvil.from_config(settings),
                         bind_and_activate=bind_and_activate)


    def store_unavailable(self):
        """True when the store lives apart from the spool (an NFS mount, say) and its users
        file is missing: the mount is gone, so an unknown recipient or domain is answered
        4xx, to be tried again, rather than refused for good."""
        return self.store_apart and not os.path.exists(self.store.users_path)


# --- Command line ---

def main(argv=None):
    try:
        config = plumbing.daemon_settings(
            "smtp_in", "Inbound SMTP server: MX and submission (RFC 5321).", DEFAULTS, HELP, argv)
        parse_networks(config["relay_network"])
        spf_resolver = make_spf_resolver(config["spf"], config["dns"], config["spf_timeout"])
        dkim_resolver = make_dkim_resolver(config["dns"], float(config["dkim_timeout"]))
        check_dmarc_policy(config["dmarc"])
        for key in ("dkim_verify", "dkim_sign"):
            plumbing.config_value(key, config[key], False)
        anvil = plumbing.Anvil.from_config(config)     # one for every listener and process
        flow = make_flow_gate(plumbing.spool_path(str(config["spool"])), config["in_flow_delay"])
        processes = plumbing.worker_processes(config)
    except ValueError as exc:
        print("smtp_in: %s" % exc, file=sys.stderr)
        return 1
    plumbing.setup_logging("smtp_in", config["syslog"], config["verbose"])
    reverse_lookup = None
    if config["dns"] or config["reverse_dns"]:
        try:
            reverse_lookup = make_reverse_lookup(config["dns"])
        except ValueError as exc:
            print("smtp_in: --dns: %s" % exc, file=sys.stderr)
            return 1
    if config["submission"] and not config["tls_cert"]:
        log.warning("submission without --tls-cert: AUTH is offered on loopback connections only")
    listeners = []
    if config["listen"]:
        listeners.append((config["listen"], config["submission"], False))
    if config["smtps_listen"]:
        listeners.append((config["smtps_listen"], True, True))   # RFC 8314 3.3: submission
    if not listeners:
        print("smtp_in: nothing to listen on (--listen and --smtps-listen are empty)",
              file=sys.stderr)
        return 1
    servers = []
    for where, submission, implicit_tls in listeners:
        default_port = SMTPS_PORT if implicit_tls else SUBMISSION_PORT if submission else SMTP_PORT
        try:
            host, port = plumbing.parse_hostport(where, default_port)
            servers.append(SMTPServer((host, port), config, submission=submission,
                                      implicit_tls=implicit_tls, reverse_lookup=reverse_lookup,
                                      spf_resolver=spf_resolver, dkim_resolver=dkim_resolver,
                                      anvil=anvil, flow=flow))
        except (OSError, ValueError) as exc:           # ssl.SSLError is an OSError
            print("smtp_in: cannot listen on %s: %s" % (where, exc), file=sys.stderr)
            for server in servers:
                server.server_close()
            return 1
    try:
        plumbing.drop_privileges(config["user"])
    except ValueError as exc:
        print("smtp_in: %s" % exc, file=sys.stderr)
        return 1
    plumbing.log_config(log, config)
    for server in servers:
        log.info("listening on %s:%d (%s)", server.server_address[0], server.port,
                 "smtps" if server.implicit_tls else
                 "submission" if server.submission else "mx")

    def reload():
        plumbing.reload_tls(servers, config["tls_cert"], config["tls_key"])
    return plumbing.serve_until_signalled(servers, on_reload=reload, processes=processes,
                                          cpus=config["cpus"])


if __name__ == "__main__":
    sys.exit(main())
