"""spf.py - Sender Policy Framework: may this client send mail for this domain? (RFC 7208)

check_host() (RFC 7208 4) evaluates the SPF record a domain publishes in a TXT record
against the address of the connecting client: record selection (4.5), every mechanism and
modifier (5, 6), macros (7), and the processing limits that make evaluating a stranger's
record safe (4.6.4). Every DNS lookup goes through a small resolver interface: DNSResolver,
on top of dnsstub, by default; tests pass their own. Pure helpers turn a result into the
Received-SPF (RFC 7208 9.1) and Authentication-Results (RFC 8601) header fields and into the
SMTP refusal of RFC 7372, so that smtp_in only calls them:

    result = spf.check_sender(client_ip, mail_from, helo, resolver, receiver=hostname)
    reply = spf.smtp_reply(result)           # "550 5.7.23 ..." / "451 4.7.24 ..." / None

A library and an admin CLI, not a daemon; reads DNS only, writes nothing.
Run: python3 spf.py --ip ADDR --sender ADDR [--helo NAME] [--dns HOST[:PORT]] [--explain]
"""

import functools
import ipaddress
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional
from urllib.parse import quote

import dnsstub

__all__ = [
    "DNSResolver", "Directive", "Record", "SPFIdentity", "SPFResult", "SPFSyntaxError",
    "authentication_results_fragment", "authentication_results_header", "authres_value",
    "check_host", "check_sender", "describe",
    "expand_macros", "main", "parse_record", "received_spf_header", "smtp_reply",
    "spf_identity",
]

# --- Constants ---

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")  # 2.6
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}          # 4.6.2

MAX_DNS_TERMS = 10        # RFC 7208 4.6.4: include, a, mx, ptr, exists and redirect
MAX_VOID_LOOKUPS = 2      # RFC 7208 4.6.4: terms whose lookup found no such name or no data
MAX_MX_NAMES = 10         # RFC 7208 4.6.4: address lookups an mx mechanism may cause
MAX_PTR_NAMES = 10        # RFC 7208 4.6.4: PTR names a ptr mechanism or %{p} looks at
MAX_DOMAIN_LENGTH = 253   # RFC 7208 7.3: an expanded name is cut from the left to fit
MAX_LABEL_LENGTH = 63     # RFC 1035 2.3.4
MAX_EXPANSION = 4096      # characters one macro-string may expand to; past it, permerror
DEFAULT_TIMEOUT = 20.0    # RFC 7208 4.6.4: a time limit SHOULD allow at least 20 seconds
MAX_HEADER_VALUE = 255    # characters of client-supplied text put into a header field
MAX_COMMENT = 400         # characters of the Received-SPF comment, before quoting
MAX_REPLY_TEXT = 400      # characters of explanation put into an SMTP reply line

DOMAIN_MACROS = "slodipvh"           # RFC 7208 7.2: letters allowed in a domain-spec
EXPLANATION_MACROS = "slodipvhcrt"   # RFC 7208 7.2: c, r and t only in explanation text

EXIT_STATUS = {"pass": 0, "fail": 1, "softfail": 2, "neutral": 3, "none": 4,
               "permerror": 5, "temperror": 6}
EXIT_USAGE = 64                      # sysexits.h EX_USAGE, as dnsmx.py

# --- Replies (RFC 7372 3.2 enhanced status codes for SPF) ---

R550_SPF_FAIL = "550 5.7.23 %s"      # X.7.23 SPF validation failed
R451_SPF_TEMPERROR = "451 4.7.24 SPF check of the sender's domain failed for now, try again later"

# --- Grammar (RFC 7208 12) ---

_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)\Z", re.S)     # name "=" value
_DIRECTIVE = re.compile(r"([-+?~]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.S)
_DUAL_CIDR = re.compile(r"(?:/(0|[1-9][0-9]?))?(?://(0|[1-9][0-9]{0,2}))?\Z")
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IP4 = re.compile(r":(%s(?:\.%s){3})(?:/(0|[1-9][0-9]?))?\Z" % (_QNUM, _QNUM))
_IP6 = re.compile(r":([0-9A-Fa-f:.]+)(?:/(0|[1-9][0-9]{0,2}))?\Z")
_MACRO_EXPAND = re.compile(r"%(?:\{(?P<letter>[A-Za-z])(?P<digits>[0-9]*)(?P<reverse>[rR]?)"
                           r"(?P<delimiters>[-.+,/_=]*)\}|(?P<escape>[%_-]))")
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}                         # RFC 7208 7.1
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")
_NOT_RECORD_TEXT = re.compile(r"[^\x20-\x7e]")      # RFC 7208 3.1: 7-bit ASCII, no controls
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
# RFC 8601 2.2: a value is a token or a quoted-string (RFC 2045 5.1: a token is US-ASCII but
# space, controls and the tspecials ()<>@,;:\"/[]?=); a pvalue may also be an unquoted
# [[local-part] "@"] domain-name, whose domain-name has two labels or more (RFC 6376 3.5).
_MIME_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+\Z")
_PVALUE_ADDRESS = re.compile(
    r"(?:(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)?@)?"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+\Z")

# --- Errors and data types ---


class SPFSyntaxError(ValueError):
    """A record, term or macro-string that RFC 7208 12 does not allow: a permerror."""


class _Stop(Exception):
    """Ends the whole evaluation with temperror or permerror (RFC 7208 2.6.6, 2.6.7)."""

    def __init__(self, result, problem):
        super().__init__(problem)
        self.result = result
        self.problem = problem


class _Macro(NamedTuple):
    """%{letter count r delimiters} (RFC 7208 7.1); `escape` for an upper-case letter."""

    letter: str
    count: int                 # rightmost parts to keep; 0 keeps them all
    reverse: bool
    delimiters: str
    escape: bool


@dataclass(frozen=True)
class Directive:
    """One mechanism with its qualifier (RFC 7208 4.6.1, 5).

    `target` is the parsed domain-spec, () meaning the domain being checked; `network` is
    the ip4 or ip6 network as an integer; `cidr4`/`cidr6` the prefix lengths that apply to
    an IPv4 or IPv6 client.
    """

    text: str                  # as written, for traces and Received-SPF's mechanism=
    qualifier: str
    mechanism: str             # all, include, a, mx, ptr, ip4, ip6 or exists
    target: tuple = ()
    network: int = 0
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class Record:
    """A parsed SPF record: its directives in order and the redirect= and exp= targets."""

    directives: tuple
    redirect: Optional[tuple] = None
    exp: Optional[tuple] = None


class SPFIdentity(NamedTuple):
    """What to check (RFC 7208 2.4): the MAIL FROM identity, or HELO for a null sender."""

    identity: str              # "mailfrom" or "helo"
    domain: str                # <domain> for check_host()
    sender: str                # <sender>: MAIL FROM, or postmaster@HELO


@dataclass
class SPFResult:
    """The outcome of check_host() with what the header fields and the CLI report."""

    result: str                # one of RESULTS
    explanation: str = ""      # exp= text of a fail (RFC 7208 6.2); "" when none was had
    mechanism: str = ""        # the deciding term as written; "default" when none matched
    problem: str = ""          # why none, temperror or permerror
    client_ip: str = ""
    domain: str = ""
    sender: str = ""           # <sender> as evaluated: postmaster@ added (RFC 7208 4.3)
    helo: str = ""
    identity: str = "mailfrom"
    receiver: str = ""
    dns_terms: int = 0         # DNS-querying terms spent, of MAX_DNS_TERMS
    void_lookups: int = 0
    trace: list = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class _Verdict:
    """A domain's answer inside the evaluation; exp is kept for a fail from a mechanism."""

    result: str
    mechanism: str = ""
    problem: str = ""
    exp: Optional[tuple] = None
    exp_domain: str = ""


# --- Parsing (pure) ---


def parse_record(text):
    """Parse the text of an SPF record into a Record (RFC 7208 4.6.1, 12).

    The whole record is checked before anything is evaluated (4.6): any syntax error, in
    any term, raises SPFSyntaxError. Its length is not capped: RFC 7208 3.4's 450 octets
    are advice to publishers, and the term, void and expansion limits bound what a long
    record can make us do. Parsed records are kept by their text (an LRU of 1024).
    """
    return _parse_record(text)


@functools.lru_cache(maxsize=1024)
def _parse_record(text):
    if text[:6].lower() != "v=spf1" or text[6:7] not in ("", " "):
        raise SPFSyntaxError("not an SPF version 1 record")
    bad = _NOT_RECORD_TEXT.search(text)
    if bad:
        raise SPFSyntaxError("character %r at offset %d: a record is printable 7-bit ASCII "
                             "(RFC 7208 3.1)" % (bad.group(), bad.start()))
    directives = []
    modifiers = {}
    for term in text[6:].split(" "):           # RFC 7208 4.6.1: terms are split by spaces
        if not term:
            continue
        modifier = _MODIFIER.match(term)
        if modifier is None:
            directives.append(_parse_directive(term))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise SPFSyntaxError("%s= appears twice (RFC 7208 6)" % name)
            modifiers[name] = parse_domain_spec(value)
        else:
            # RFC 7208 6: unknown modifiers are ignored, but must be valid macro-strings.
            _parse_macro_string(value, EXPLANATION_MACROS)
    return Record(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _parse_directive(term):
    match = _DIRECTIVE.match(term)
    if match is None:
        raise SPFSyntaxError("%r is neither a mechanism nor a modifier (RFC 7208 4.6.1)" % term)
    qualifier, name, rest = match.group(1) or "+", match.group(2).lower(), match.group(3)

    def directive(**parts):
        return Directive(term, qualifier, name, **parts)

    def target_after_colon(text, required):
        if not text and not required:
            return ()
        if not text.startswith(":"):
            raise SPFSyntaxError("%r: expected %s:domain (RFC 7208 5)" % (term, name))
        return parse_domain_spec(text[1:])

    if name == "all":                                   # RFC 7208 5.1
        if rest:
            raise SPFSyntaxError("%r: all takes no argument (RFC 7208 5.1)" % term)
        return directive()
    if name in ("include", "exists"):                   # RFC 7208 5.2, 5.7
        return directive(target=target_after_colon(rest, True))
    if name == "ptr":                                   # RFC 7208 5.5
        return directive(target=target_after_colon(rest, False))
    if name in ("a", "mx"):                             # RFC 7208 5.3, 5.4
        cidr = _DUAL_CIDR.search(rest)
        cidr4 = int(cidr.group(1) or 32)
        cidr6 = int(cidr.group(2) or 128)
        if cidr4 > 32 or cidr6 > 128:
            raise SPFSyntaxError("%r: prefix length out of range (RFC 7208 5.6)" % term)
        return directive(target=target_after_colon(rest[:cidr.start()], False),
                         cidr4=cidr4, cidr6=cidr6)
    if name == "ip4":                                   # RFC 7208 5.6
        match = _IP4.match(rest)
        if match is None or int(match.group(2) or 32) > 32:
            raise SPFSyntaxError("%r: expected ip4:network[/0-32] (RFC 7208 5.6)" % term)
        return directive(network=int(ipaddress.IPv4Address(match.group(1))),
                         cidr4=int(match.group(2) or 32))
    if name == "ip6":
        match = _IP6.match(rest)
        try:
            network = int(ipaddress.IPv6Address(match.group(1))) if match else None
        except ValueError:
            network = None
        if network is None or int(match.group(2) or 128) > 128:
            raise SPFSyntaxError("%r: expected ip6:network[/0-128] (RFC 7208 5.6)" % term)
        return directive(network=network, cidr6=int(match.group(2) or 128))
    raise SPFSyntaxError("unknown mechanism %r (RFC 7208 5)" % name)


def parse_domain_spec(spec, letters=DOMAIN_MACROS):
    """Parse a domain-spec (RFC 7208 7.1) into macro tokens; SPFSyntaxError if invalid.

    domain-spec = macro-string domain-end, where domain-end is a macro-expand or
    "." toplabel ["."]: it is checked as written, before any expansion.
    """
    if not spec:
        raise SPFSyntaxError("empty domain-spec (RFC 7208 7.1)")
    tokens, ends_in_macro = _parse_macro_string(spec, letters)
    if not ends_in_macro:
        tail = tokens[-1][:-1] if tokens[-1].endswith(".") else tokens[-1]
        dot = tail.rfind(".")
        if dot < 0 or not _TOPLABEL.fullmatch(tail[dot + 1:]):
            raise SPFSyntaxError("%r does not end in a valid top label (RFC 7208 7.1)" % spec)
    return tuple(tokens)


def _parse_macro_string(text, letters):
    """Return (tokens, ends_in_macro): literal strings and _Macro items (RFC 7208 7.1)."""
    tokens = []
    ends_in_macro = False
    position = 0
    while position < len(text):
        percent = text.find("%", position)
        if percent != position:
            tokens.append(text[position:] if percent < 0 else text[position:percent])
            ends_in_macro = False
            if percent < 0:
                break
        match = _MACRO_EXPAND.match(text, percent)
        if match is None:
            raise SPFSyntaxError("%r: a %% must start %%{...}, %%%%, %%_ or %%- (RFC 7208 7.1)"
                                 % text[percent:percent + 12])
        if match.group("escape"):
            tokens.append(_ESCAPES[match.group("escape")])
        else:
            letter, digits = match.group("letter"), match.group("digits")
            if letter.lower() not in letters:
                raise SPFSyntaxError("macro letter %r is not allowed here (RFC 7208 7.2)"
                                     % letter)
            if digits and not digits.strip("0"):
                raise SPFSyntaxError("%r: the part count must not be zero (RFC 7208 7.3)"
                                     % match.group())
            count = int(digits or 0) if len(digits) <= 9 else 10 ** 9
            tokens.append(_Macro(letter.lower(), count, bool(match.group("reverse")),
                                 match.group("delimiters") or ".", letter.isupper()))
        ends_in_macro = True
        position = match.end()
    return tokens, ends_in_macro


def _is_spf1(record):
    """RFC 7208 4.5: "v=spf1" (any case) followed by a space or the end of the record."""
    return record[:6].lower() == b"v=spf1" and record[6:7] in (b"", b" ")


def _is_domain(name):
    """A multi-label domain name that can be looked up (RFC 7208 4.3: otherwise none)."""
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    return (len(labels) > 1 and _is_dns_name(name)
            and _TOPLABEL.fullmatch(labels[-1]) is not None)


def _is_dns_name(name):
    """RFC 1035 2.3.4 lengths: a name with an empty or long label cannot be asked."""
    if not 0 < len(name) <= MAX_DOMAIN_LENGTH:
        return False
    labels = name.split(".")
    return "" not in labels and max(map(len, labels)) <= MAX_LABEL_LENGTH


def _is_subdomain(name, domain):
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def _client_address(ip):
    """The client as an ipaddress object; IPv4-mapped IPv6 counts as IPv4 (RFC 7208 5)."""
    address = ipaddress.ip_address(str(ip).strip().split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


# --- Identity and result helpers (pure; what smtp_in calls) ---


def spf_identity(sender, helo):
    """Choose the identity to check (RFC 7208 2.4): MAIL FROM, or for the null reverse-path
    the HELO identity with <sender> postmaster@HELO (RFC 7208 2.3, 4.3)."""
    sender = (sender or "").strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if sender:
        return SPFIdentity("mailfrom", sender.rpartition("@")[2], sender)
    helo = (helo or "").strip()
    return SPFIdentity("helo", helo, "postmaster@" + helo)


_PHRASES = {                    # the comment of Received-SPF, after RFC 7208 9.1's examples
    "pass": "domain of %(who)s designates %(ip)s as permitted sender",
    "fail": "domain of %(who)s does not designate %(ip)s as permitted sender",
    "softfail": "domain of transitioning %(who)s does not designate %(ip)s as permitted sender",
    "neutral": "%(ip)s is neither permitted nor denied by domain of %(who)s",
    "none": "domain of %(who)s does not designate permitted sender hosts",
    "temperror": "error in processing during lookup of %(who)s",
    "permerror": "permanent error in processing domain of %(who)s",
}


def describe(result):
    """One human sentence for RESULT, as in the comment of Received-SPF."""
    who = result.sender if result.identity == "mailfrom" else result.domain
    text = _PHRASES[result.result] % {"who": who, "ip": result.client_ip}
    if result.problem and result.result in ("none", "temperror", "permerror"):
        text += ": " + result.problem
    return text


def received_spf_header(result, receiver=None):
    """The Received-SPF header field (RFC 7208 9.1) for RESULT, folded with CRLF + tab,
    without the final CRLF. RECEIVER defaults to the one given to check_host()."""
    receiver = receiver or result.receiver or "unknown"
    pairs = [("receiver", receiver), ("client-ip", result.client_ip),
             ("envelope-from", result.sender if result.identity == "mailfrom" else ""),
             ("helo", result.helo),
             ("identity", result.identity)]          # RFC 7208 9.1: mailfrom or helo
    if result.mechanism:
        pairs.append(("mechanism", result.mechanism))
    if result.problem:
        pairs.append(("problem", result.problem))
    comment = _comment("%s: %s" % (receiver, describe(result)))
    return _fold("Received-SPF: %s (%s)" % (result.result, comment),
                 ["%s=%s;" % (key, _header_value(value)) for key, value in pairs])


def authentication_results_fragment(result):
    """The spf= part of an Authentication-Results field (RFC 8601 2.7.2) for RESULT:
    spf=RESULT smtp.mailfrom=ADDRESS, or smtp.helo=NAME for the HELO identity."""
    if result.identity == "mailfrom":
        prop = "smtp.mailfrom=" + authres_value(result.sender, address=True)
    else:
        prop = "smtp.helo=" + authres_value(result.helo or result.domain, address=True)
    return "spf=%s %s" % (result.result, prop)


def authentication_results_header(hostname, result):
    """The Authentication-Results header field (RFC 8601 2.2, 2.7.2) for RESULT, with
    HOSTNAME as authserv-id and authentication_results_fragment() as its only part.
    Folded with CRLF + tab, without the final CRLF."""
    return _fold("Authentication-Results: %s;" % authres_value(hostname),
                 authentication_results_fragment(result).split(" ", 1))


def smtp_reply(result):
    """The reply that refuses MAIL FROM when the policy rejects, or None to go on.

    fail gives 550 5.7.23 with the domain's explanation, marked as the domain's words
    (RFC 7208 6.2, 8.4); temperror gives 451 4.7.24 (RFC 7208 8.6, RFC 7372 3.2). Other
    results never refuse: softfail, neutral and none are not grounds for rejection (8.2-8.5),
    and a permerror is the domain's broken record, not proof of forgery (8.7).
    """
    if result.result == "temperror":
        return R451_SPF_TEMPERROR
    if result.result != "fail":
        return None
    if result.explanation:
        text = "%s says: %s" % (result.domain, result.explanation)
    else:
        text = "%s does not allow %s to send mail for it (SPF)" % (result.domain,
                                                                   result.client_ip)
    text = _NOT_RECORD_TEXT.sub("?", text)
    if len(text) > MAX_REPLY_TEXT:
        text = text[:MAX_REPLY_TEXT - 3] + "..."
    return R550_SPF_FAIL % text


def _clip(text, limit=MAX_HEADER_VALUE):
    """Client-supplied text made safe for a header: printable characters only (no CR, LF,
    other controls or line separators), bounded."""
    text = "".join(char for char in str(text) if char.isprintable())
    return text if len(text) <= limit else text[:limit] + "..."


def _comment(text):
    """Header comment text (RFC 5322 3.2.2): parentheses and backslashes quoted. Bounded
    so that even fully quoted the line stays well within 998 octets (RFC 5322 2.1.1)."""
    return re.sub(r"([()\\])", r"\\\1", _clip(text, MAX_COMMENT))


def _header_value(value):
    """A key-value pair's value (RFC 7208 9.1): dot-atom, else quoted-string."""
    value = _clip(value)
    return value if _DOT_ATOM.match(value) else _quoted_string(value)


def authres_value(text, address=False):
    """TEXT as a value of an Authentication-Results field (RFC 8601 2.2): as it is when it
    is a MIME token, else a quoted-string. With address=True, as a pvalue (a property's
    value, such as smtp.mailfrom= or header.d=): an address or domain name (`user@example.com`,
    `@example.com`, `example.com`) stands unquoted too. So `header.b="ab/c+"` is quoted
    ("/" is not a token character) while `smtp.mailfrom=user@example.com` is not. spf= and
    dkim.py's dkim= and dmarc= parts share this rule.

    The text comes from the client, the message or DNS: it is first made printable (no CR,
    LF or other control) and cut to MAX_HEADER_VALUE characters, "..." marking the cut, so
    that even with every character escaped the value stays far within a line (998 octets,
    RFC 5322 2.1.1). Text that is not US-ASCII is always quoted (a quoted-string may hold
    UTF-8, RFC 6532 3.2)."""
    value = _clip(text)
    if _MIME_TOKEN.match(value) or (address and _PVALUE_ADDRESS.match(value)):
        return value
    return _quoted_string(value)


def _quoted_string(value):
    """VALUE in double quotes, its `"` and `\\` escaped (RFC 5322 3.2.4)."""
    return '"%s"' % re.sub(r'(["\\])', r"\\\1", value)


def _fold(head, items, width=78):
    """Join header parts with spaces, folding (CRLF + tab) before a part that would pass
    WIDTH (RFC 5322 2.2.3); a single long part stays whole on its own line."""
    lines = [head]
    for item in items:
        if len(lines[-1]) + 1 + len(item) > width:
            lines.append("\t" + item)
        else:
            lines[-1] += " " + item
    return "\r\n".join(lines)


# --- Evaluation ---


def check_host(ip, domain, sender, helo, resolver=None, *, receiver="unknown",
               timeout=DEFAULT_TIMEOUT, identity="mailfrom"):
    """Evaluate SPF for DOMAIN and client IP (RFC 7208 4); return an SPFResult.

    SENDER is <sender> (an address; "postmaster" is used when it has no local part) and HELO
    the client's HELO name, both used by macros. RESOLVER is any object with txt, a, aaaa,
    mx and ptr methods as DNSResolver's (the default); RECEIVER is this host's name for
    %{r}; past TIMEOUT seconds the result is temperror. A resolver that also has
    until(deadline), as DNSResolver, has each lookup cut off there, so that one slow
    nameserver cannot stretch the check past TIMEOUT. IP must be an IP address
    (ValueError otherwise); nothing a domain publishes can make this raise.
    """
    helo = (helo or "").strip()
    receiver = receiver or "unknown"
    check = _Check(_client_address(ip), sender or "", helo,
                   DNSResolver() if resolver is None else resolver, receiver, timeout)
    domain = (domain or "").strip()
    check.note("check_host(%s, %s, %s), helo %s" % (check.ip, domain, check.sender, helo))
    explanation = ""
    try:
        verdict = check.check_host(domain)
        if verdict.exp is not None:
            explanation = check.explanation(verdict.exp, verdict.exp_domain)
    except _Stop as stop:
        verdict = _Verdict(stop.result, problem=stop.problem)
    check.note("result: %s%s" % (verdict.result, " (%s)" % verdict.problem
                                 if verdict.problem else ""))
    return SPFResult(verdict.result, explanation, verdict.mechanism, verdict.problem,
                     str(check.ip), domain, check.sender, helo, identity, receiver,
                     check.dns_terms, check.void_lookups, check.trace)


def check_sender(ip, mail_from, helo, resolver=None, **options):
    """check_host() for the identity spf_identity() picks: MAIL FROM, or HELO when
    MAIL_FROM is the null reverse-path "" (RFC 7208 2.4). Options as check_host()'s."""
    chosen = spf_identity(mail_from, helo)
    return check_host(ip, chosen.domain, chosen.sender, helo, resolver,
                      identity=chosen.identity, **options)


def expand_macros(text, ip, domain, sender, helo="", resolver=None, *, explanation=False,
                  receiver="unknown"):
    """Expand a macro-string (RFC 7208 7) as check_host() would for DOMAIN; explanation=True
    allows the c, r and t letters of exp text. SPFSyntaxError for a bad macro-string."""
    letters = EXPLANATION_MACROS if explanation else DOMAIN_MACROS
    tokens, _ = _parse_macro_string(text, letters)
    check = _Check(_client_address(ip), sender, helo,
                   DNSResolver() if resolver is None else resolver, receiver, DEFAULT_TIMEOUT)
    try:
        return check.expand(tokens, domain)
    except _Stop as stop:
        raise SPFSyntaxError(stop.problem) from None


class _Check:
    """One check_host() run: its inputs, the limits spent so far, a memo of the lookups
    made (each asked once per run), and the trace that --explain prints."""

    def __init__(self, ip, sender, helo, resolver, receiver, timeout):
        self.ip = ip
        self.ipv4 = ip.version == 4
        self.ip_int = int(ip)
        local, at, sender_domain = sender.strip().rpartition("@")
        if not at:
            sender_domain = sender.strip()
        local = local or "postmaster"                   # RFC 7208 4.3
        self.sender = local + "@" + sender_domain
        self.deadline = time.monotonic() + timeout
        bounded = getattr(resolver, "until", None)     # RFC 7208 4.6.4: the time limit
        self.resolver = bounded(self.deadline) if bounded is not None else resolver
        self.timeout = timeout
        self.values = {                                 # RFC 7208 7.2
            "s": self.sender, "l": local, "o": sender_domain, "h": helo,
            "i": str(ip) if self.ipv4 else ".".join(ip.exploded.replace(":", "")),
            "v": "in-addr" if self.ipv4 else "ip6", "c": str(ip), "r": receiver,
        }
        self.dns_terms = 0
        self.void_lookups = 0
        self.memo = {}                 # (kind, name) -> list, or the dnsstub.DNSError raised
        self.active = []               # domains being evaluated, outermost first
        self.trace = []

    def note(self, text):
        """Add a line to the trace; DNS text is shown with its control characters escaped."""
        if not (text.isascii() and text.isprintable()):
            text = _NOT_RECORD_TEXT.sub(lambda m: "\\x%02x" % ord(m.group()), text)
        self.trace.append("  " * len(self.active) + text)

    # --- check_host() proper, recursively for include and redirect ---

    def check_host(self, domain):
        """RFC 7208 4: the verdict for one domain; temperror and permerror raise _Stop."""
        if not _is_domain(domain):                          # RFC 7208 4.3
            self.note("%r is not a valid domain name: none" % domain)
            return _Verdict("none", problem="%r is not a valid domain name" % domain[:80])
        key = domain.lower().rstrip(".")
        if key in self.active:
            raise _Stop("permerror", "loop: %s includes or redirects to itself" % domain)
        record = self.find_record(domain)
        if record is None:
            return _Verdict("none", problem="%s publishes no SPF record" % domain)
        self.active.append(key)
        try:
            return self.evaluate(record, domain)
        finally:
            self.active.pop()

    def find_record(self, domain):
        """RFC 7208 4.4, 4.5: the one v=spf1 TXT record of DOMAIN, None, or permerror."""
        records = [text for text in self.lookup("txt", domain) if _is_spf1(text)]
        if not records:
            return None
        if len(records) > 1:
            raise _Stop("permerror", "%s has %d SPF records (RFC 7208 4.5)"
                        % (domain, len(records)))
        try:
            return parse_record(records[0].decode("latin-1"))
        except SPFSyntaxError as exc:
            raise _Stop("permerror", "%s: %s" % (domain, exc)) from None

    def evaluate(self, record, domain):
        """RFC 7208 4.6.2, 4.7, 6.1: the first matching mechanism decides; then redirect."""
        for directive in record.directives:
            if getattr(self, "match_" + directive.mechanism)(directive, domain):
                result = QUALIFIERS[directive.qualifier]
                self.note("%s: match, %s" % (directive.text, result))
                if result == "fail" and record.exp is not None:
                    return _Verdict(result, directive.text, exp=record.exp, exp_domain=domain)
                return _Verdict(result, directive.text)
            self.note("%s: no match" % directive.text)
        if record.redirect is None:
            self.note("no mechanism matched: neutral (RFC 7208 4.7)")
            return _Verdict("neutral", "default")
        self.count_dns_term("redirect=")
        target = self.target_name(record.redirect, domain)
        self.note("redirect=%s" % target)
        verdict = self.check_host(target)
        if verdict.result == "none":
            raise _Stop("permerror", "redirect=%s: %s (RFC 7208 6.1)"
                        % (target, verdict.problem))
        return verdict

    # --- Mechanisms (RFC 7208 5), one method each ---

    def match_all(self, directive, domain):
        return True

    def match_include(self, directive, domain):
        self.count_dns_term(directive.text)
        target = self.target_name(directive.target, domain)
        verdict = self.check_host(target)
        if verdict.result == "none":                       # RFC 7208 5.2
            raise _Stop("permerror", "include:%s: %s" % (target, verdict.problem))
        return verdict.result == "pass"

    def match_a(self, directive, domain):
        self.count_dns_term(directive.text)
        target = self.target_name(directive.target, domain)
        return self.in_network(self.addresses(target, counts_void=True), directive)

    def match_mx(self, directive, domain):
        self.count_dns_term(directive.text)
        target = self.target_name(directive.target, domain)
        hosts = self.lookup("mx", target, counts_void=True)
        if len(hosts) > MAX_MX_NAMES:
            raise _Stop("permerror", "%s has %d MX records; an mx mechanism may look up %d "
                        "(RFC 7208 4.6.4)" % (target, len(hosts), MAX_MX_NAMES))
        # A null MX (RFC 7505), exchange "", names no host and is skipped.
        return any(self.in_network(self.addresses(host), directive)
                   for host in hosts if host.strip("."))

    def match_ptr(self, directive, domain):
        self.count_dns_term(directive.text)
        target = self.target_name(directive.target, domain)
        return bool(self.validated_names(target))

    def match_ip4(self, directive, domain):
        shift = 32 - directive.cidr4
        return self.ipv4 and self.ip_int >> shift == directive.network >> shift

    def match_ip6(self, directive, domain):
        shift = 128 - directive.cidr6
        return not self.ipv4 and self.ip_int >> shift == directive.network >> shift

    def match_exists(self, directive, domain):
        self.count_dns_term(directive.text)
        target = self.target_name(directive.target, domain)
        # RFC 7208 5.7: always an A query, whatever the client's address family.
        return bool(self.lookup("a", target, counts_void=True))

    # --- Helpers of the mechanisms ---

    def count_dns_term(self, term):
        """RFC 7208 4.6.4: at most MAX_DNS_TERMS terms that query the DNS per check."""
        self.dns_terms += 1
        self.note("%s: DNS-querying term %d of %d" % (term, self.dns_terms, MAX_DNS_TERMS))
        if self.dns_terms > MAX_DNS_TERMS:
            raise _Stop("permerror", "more than %d DNS-querying terms, at %s (RFC 7208 4.6.4)"
                        % (MAX_DNS_TERMS, term))

    def addresses(self, name, counts_void=False, quiet=False):
        """NAME's addresses of the client's family, as integers."""
        family = socket.AF_INET if self.ipv4 else socket.AF_INET6
        found = []
        for text in self.lookup("a" if self.ipv4 else "aaaa", name, counts_void, quiet):
            try:
                found.append(int.from_bytes(socket.inet_pton(family, text), "big"))
            except (OSError, TypeError, ValueError):
                continue                    # not an address of the client's family
        return found

    def in_network(self, addresses, directive):
        """RFC 7208 5.3: does any address share the client's network of the cidr length?"""
        shift = 32 - directive.cidr4 if self.ipv4 else 128 - directive.cidr6
        return any(address >> shift == self.ip_int >> shift for address in addresses)

    def validated_names(self, target=None):
        """RFC 7208 5.5: the client's PTR names (the first MAX_PTR_NAMES) that are TARGET
        or below it, kept when one of their addresses is the client's. DNS errors here only
        mean no match: the client, not the domain, owns its reverse zone."""
        names = [name.rstrip(".") for name in
                 self.lookup("ptr", str(self.ip), quiet=True)[:MAX_PTR_NAMES]]
        if target is not None:
            names = [name for name in names if _is_subdomain(name, target)]
        return [name for name in names if self.ip_int in self.addresses(name, quiet=True)]

    def target_name(self, tokens, domain):
        """Expand a domain-spec to the name to ask; () is DOMAIN itself. RFC 7208 7.3: a
        trailing dot is dropped and a name past 253 characters loses labels on the left."""
        if not tokens:
            return domain
        name = self.expand(tokens, domain)
        if name.endswith("."):
            name = name[:-1]
        while len(name) > MAX_DOMAIN_LENGTH and "." in name:
            name = name.partition(".")[2]
        return name

    def lookup(self, kind, name, counts_void=False, quiet=False):
        """Ask the resolver (kind: txt, a, aaaa, mx or ptr); [] for no such name or data.

        A temporary failure ends the check with temperror (RFC 7208 5), unless QUIET, where
        it is an empty answer. COUNTS_VOID: this is a term's own lookup, under the void
        lookup limit (RFC 7208 4.6.4).
        """
        key = (kind, name.lower())
        answer = self.memo.get(key)
        if answer is None:
            answer = self.memo[key] = self.ask(kind, name)
            self.note_answer(kind, name, answer, "")
        else:
            self.note_answer(kind, name, answer, " (asked before)")
        if isinstance(answer, dnsstub.DNSError):
            if not answer.permanent and not quiet:
                raise _Stop("temperror", "%s %s: %s" % (kind.upper(), name, answer))
            answer = []
        if not answer and counts_void:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise _Stop("permerror", "more than %d void lookups, at %s %s "
                            "(RFC 7208 4.6.4)" % (MAX_VOID_LOOKUPS, kind.upper(), name))
        return answer

    def ask(self, kind, name):
        """One question to the resolver: its list, or the dnsstub.DNSError it raised."""
        if time.monotonic() > self.deadline:
            raise _Stop("temperror", "no result within %g s (RFC 7208 4.6.4)" % self.timeout)
        if kind != "ptr" and not _is_dns_name(name):
            # RFC 7208 4.3, 5: a name that cannot be asked is a name that does not exist.
            answer = dnsstub.DNSNameError("not a valid domain name: %r" % name[:80])
        else:
            try:
                answer = list(getattr(self.resolver, kind)(name))
            except dnsstub.DNSError as exc:
                answer = exc
        return answer

    def note_answer(self, kind, name, answer, suffix):
        if isinstance(answer, dnsstub.DNSError):
            shown = str(answer)
        else:
            shown = ", ".join('"%s"' % text.decode("latin-1") if isinstance(text, bytes)
                              else str(text) for text in answer) or "no data"
        self.note("%s %s: %s%s" % (kind.upper(), name, shown, suffix))

    # --- Macros (RFC 7208 7) ---

    def expand(self, tokens, domain):
        """Expand parsed macro tokens for DOMAIN; permerror past MAX_EXPANSION characters."""
        pieces = []
        size = 0
        for token in tokens:
            piece = token if isinstance(token, str) else self.macro_value(token, domain)
            size += len(piece)
            if size > MAX_EXPANSION:
                raise _Stop("permerror", "macro expansion longer than %d characters"
                            % MAX_EXPANSION)
            pieces.append(piece)
        return "".join(pieces)

    def macro_value(self, macro, domain):
        """RFC 7208 7.3: split on the delimiters, reverse, keep the rightmost parts, join
        with dots; an upper-case letter URL-escapes the result."""
        if macro.letter == "d":
            value = domain
        elif macro.letter == "p":
            value = self.validated_domain(domain)
        elif macro.letter == "t":
            value = str(int(time.time()))
        else:
            value = self.values[macro.letter]
        if macro.reverse or macro.count or macro.delimiters != ".":
            parts = re.split("[%s]" % re.escape(macro.delimiters), value)
            if macro.reverse:
                parts.reverse()
            if macro.count:
                parts = parts[-macro.count:]
            value = ".".join(parts)
        if macro.escape:
            value = quote(value, safe="")       # keeps only RFC 3986 unreserved characters
        return value

    def validated_domain(self, domain):
        """%{p} (RFC 7208 7.3): DOMAIN itself among the validated names, else one below
        it, else any; "unknown" when there is none."""
        names = self.validated_names()
        for name in names:
            if name.lower() == domain.lower().rstrip("."):
                return name
        for name in names:
            if _is_subdomain(name, domain):
                return name
        return names[0] if names else "unknown"

    # --- Explanation (RFC 7208 6.2) ---

    def explanation(self, tokens, domain):
        """The text exp= points to, expanded; "" when it cannot be had. Its lookups count
        against no limit (RFC 7208 4.6.4) and no failure of it changes the result."""
        try:
            name = self.target_name(tokens, domain)
            records = self.lookup("txt", name, quiet=True)
            if len(records) != 1:
                self.note("exp=%s: %d TXT records, explanation not used" % (name, len(records)))
                return ""
            text = records[0].decode("latin-1")
            if _NOT_RECORD_TEXT.search(text):
                self.note("exp=%s: not 7-bit ASCII text, not used (RFC 7208 6.2)" % name)
                return ""
            text = self.expand(_parse_macro_string(text, EXPLANATION_MACROS)[0], domain)
        except (_Stop, SPFSyntaxError) as exc:
            self.note("exp: %s, explanation not used" % exc)
            return ""
        self.note("exp=%s: %s" % (name, text))
        return text


# --- Default resolver: dnsstub ---


class DNSResolver:
    """SPF's lookups through dnsstub; any object with these five methods can stand in.

    Each method returns a list; it raises a dnsstub.DNSError whose `permanent` flag is True
    when the name or the data does not exist (NXDOMAIN, NODATA, a name that cannot be
    asked: a void lookup) and False for a temporary failure (SERVFAIL, timeout, ...).
    `resolver` is a dnsstub.Resolver; None uses dnsstub's default one (/etc/resolv.conf).
    `deadline` (a time.monotonic() value) cuts every lookup off there; check_host() sets
    it through until().
    """

    def __init__(self, resolver=None, deadline=None):
        self.resolver = resolver
        self.deadline = deadline

    def until(self, deadline):
        """This resolver with every lookup cut off at deadline."""
        return DNSResolver(self.resolver, deadline)

    def dns(self):
        return self.resolver or dnsstub.default_resolver()

    def left(self):
        """Seconds left before the deadline, for dnsstub's lifetime=; None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def txt(self, name):
        """TXT records, each one's strings joined (RFC 7208 3.3), as bytes."""
        return self.dns().txt(name, raw=True, lifetime=self.left())

    def a(self, name):
        return self.dns().resolve(name, "A", lifetime=self.left()).data

    def aaaa(self, name):
        return self.dns().resolve(name, "AAAA", lifetime=self.left()).data

    def mx(self, name):
        """MX exchange names by preference; "" is the root of a null MX (RFC 7505)."""
        records = self.dns().resolve(name, "MX", lifetime=self.left()).records
        return [record.data.exchange for record in
                sorted(records, key=lambda record: record.data.preference)]

    def ptr(self, ip):
        return self.dns().ptr(ip, lifetime=self.left())


# --- Command line ---


def _argument_parser():
    parser = dnsstub.usage_parser(
        prog="spf.py",
        description="Check whether a client address may send mail for a sender's domain "
                    "(SPF, RFC 7208), as a receiving mail server would.",
        epilog="Exit status: 0 pass, 1 fail, 2 softfail, 3 neutral, 4 none, 5 permerror, "
               "6 temperror, 64 bad command line.")
    parser.add_argument("--ip", required=True, metavar="ADDR",
                        help="the client's IPv4 or IPv6 address")
    parser.add_argument("--sender", required=True, metavar="ADDR",
                        help='the MAIL FROM address; "" or "<>" checks the HELO name instead')
    parser.add_argument("--helo", metavar="NAME",
                        help="the client's HELO/EHLO name (default: the sender's domain)")
    parser.add_argument("--dns", action="append", metavar="HOST[:PORT]",
                        help="nameserver to ask instead of those in /etc/resolv.conf; "
                             "may be repeated")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="seconds the whole check may take (default %g)" % DEFAULT_TIMEOUT)
    parser.add_argument("--receiver", default="unknown", metavar="NAME",
                        help="this host's name, for the %%{r} macro")
    parser.add_argument("--explain", action="store_true",
                        help="print each term evaluated and each lookup made")
    return parser


def main(argv=None):
    """Command line: print the result of the check; the exit status tells it too."""
    parser = _argument_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help (0) or a usage error (EXIT_USAGE)
        return exc.code
    sender = args.sender.strip()
    if sender == "<>":
        sender = ""
    helo = args.helo if args.helo is not None else sender.rpartition("@")[2]
    try:
        _client_address(args.ip)
        if not sender and not helo:
            raise ValueError("the null sender needs --helo")
        if not 0 < args.timeout <= 3600:
            raise ValueError("--timeout must be between 0 and 3600 seconds")
        dns = dnsstub.Resolver(args.dns, timeout=min(args.timeout, 5.0), lifetime=args.timeout)
    except ValueError as exc:
        sys.stderr.write("spf: %s\n" % exc)
        return EXIT_USAGE
    try:
        result = check_sender(args.ip, sender, helo, DNSResolver(dns),
                              receiver=args.receiver, timeout=args.timeout)
    except KeyboardInterrupt:
        sys.stderr.write("spf: interrupted\n")
        return EXIT_STATUS["temperror"]
    lines = ["; " + line for line in result.trace] if args.explain else []
    lines.append("%s: %s" % (result.result, describe(result)))
    if result.mechanism:
        lines.append("mechanism: %s" % result.mechanism)
    if result.explanation:
        lines.append("explanation: %s" % result.explanation)
    try:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return EXIT_STATUS[result.result]


if __name__ == "__main__":
    raise SystemExit(main())
