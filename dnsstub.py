"""dnsstub.py - DNS stub resolver; DNS packets built and parsed by hand.

Finds where mail for a domain goes (RFC 5321 5.1: MX, implicit MX, null MX of RFC 7505) and
answers A, AAAA (RFC 3596), TXT, PTR, CNAME, NS and SOA questions. Wire format RFC 1035 with
EDNS0 (RFC 6891); answers are accepted only from the server asked, with the query's ID and
question (RFC 5452); TCP when the UDP answer is truncated (RFC 7766); a TTL-bound LRU cache
with negative caching (RFC 2308). Every error says whether it is permanent (bounce now) or
temporary (retry later): `DNSError.permanent`.

Reads the nameservers and options of /etc/resolv.conf unless servers are given; writes nothing.
Its command line, a small dig, is dnsmx.py.
"""

# `python3 dnsmx.py` should cost no more than a run of dig, so this module loads little:
# _socket is the C module that socket.py wraps (the same functions, constants and socket
# objects, without the enum and selectors imports that were a quarter of a CLI run), and
# _thread has the lock that threading builds on.
import _socket as socket
import _thread
import itertools
import os
import struct
import sys
import time
from collections import OrderedDict

__all__ = [
    # errors
    "DNSError", "DNSTemporaryError", "DNSTimeoutError", "DNSFormatError", "CNAMELoopError",
    "DNSPermanentError", "NXDomainError", "NoDataError", "NullMXError", "NoAddressError",
    "DNSNameError",
    # data types
    "Record", "MX", "SOA", "Message", "Answer", "MXHost", "Nameserver", "ResolvConf",
    # resolution
    "Resolver", "default_resolver", "set_default_resolver",
    "resolve", "mx_hosts", "ptr", "txt", "resolve_mx",
    # names, wire format, configuration
    "normalize_name", "reverse_name", "dotted", "type_code", "type_name",
    "build_query", "parse_message", "PacketReader",
    "TTLCache",
    "parse_server", "read_resolv_conf", "usage_parser",
]

# --- Constants ---

DNS_PORT = 53                    # RFC 1035 4.2.1
RESOLV_CONF = "/etc/resolv.conf"

TYPE_A = 1                       # RFC 1035 3.2.2
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28                   # RFC 3596 2.1
TYPE_OPT = 41                    # RFC 6891 6.1.1
CLASS_IN = 1                     # RFC 1035 3.2.4
TYPE_NAMES = {TYPE_A: "A", TYPE_NS: "NS", TYPE_CNAME: "CNAME", TYPE_SOA: "SOA",
              TYPE_PTR: "PTR", TYPE_MX: "MX", TYPE_TXT: "TXT", TYPE_AAAA: "AAAA",
              TYPE_OPT: "OPT"}
TYPE_CODES = {text: code for code, text in TYPE_NAMES.items()}

FLAG_QR = 0x8000                 # RFC 1035 4.1.1: this is a response
OPCODE_MASK = 0x7800             # RFC 1035 4.1.1: 0 = standard query
FLAG_AA = 0x0400
FLAG_TC = 0x0200                 # truncated: ask again over TCP
FLAG_RD = 0x0100                 # recursion desired
FLAG_RA = 0x0080
RCODE_MASK = 0x000F

NOERROR = 0                      # RFC 1035 4.1.1 RCODE values
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL",
               NXDOMAIN: "NXDOMAIN", NOTIMP: "NOTIMP", REFUSED: "REFUSED"}

MAX_LABEL_LENGTH = 63            # RFC 1035 2.3.4, octets
MAX_NAME_LENGTH = 255            # RFC 1035 2.3.4, octets on the wire, length octets included
MAX_POINTERS = 64                # compression pointers followed in one name (RFC 1035 4.1.4)
MAX_CNAME_CHAIN = 8              # CNAMEs followed per lookup; RFC 1034 3.6.2 wants short chains
MAX_MX_TARGETS = 16              # MX records looked at; each may cost two lookups
UDP_PAYLOAD = 1232               # RFC 6891 6.2.5 payload size; 1232 from DNS flag day 2020
UDP_PAYLOAD_WITHOUT_EDNS = 512   # RFC 1035 2.3.4
MAX_UDP_RECEIVE = 65535          # read whole datagrams, then judge their size

DEFAULT_TIMEOUT = 5.0            # resolv.conf(5): options timeout:5
DEFAULT_ATTEMPTS = 2             # resolv.conf(5): options attempts:2
MAX_TIMEOUT = 30.0               # resolv.conf(5) caps timeout at 30 s
MAX_ATTEMPTS = 5                 # resolv.conf(5) caps attempts at 5
MAX_NAMESERVERS = 3              # resolv.conf(5): MAXNS
MAX_RESOLV_CONF = 64 * 1024      # octets read from resolv.conf
DEFAULT_CACHE_SIZE = 4096        # cache entries (answers, negative answers, MX plans)
MAX_CACHE_TTL = 86400            # seconds; longer TTLs are cut to a day
MAX_NEGATIVE_TTL = 10800         # RFC 2308 5: negative answers kept at most three hours

EXIT_USAGE = 64                  # sysexits.h EX_USAGE: a CLI's bad command line

# Wire layouts.
HEADER = struct.Struct("!6H")        # RFC 1035 4.1.1: ID, flags, QD/AN/NS/AR counts
QUESTION_TAIL = struct.Struct("!2H")  # RFC 1035 4.1.2: QTYPE, QCLASS after QNAME
RR_HEADER = struct.Struct("!2HIH")   # RFC 1035 4.1.3: TYPE, CLASS, TTL, RDLENGTH after NAME
UINT16 = struct.Struct("!H")         # RFC 1035 3.3.9 MX PREFERENCE; 4.2.2 TCP length
SOA_TIMERS = struct.Struct("!5I")    # RFC 1035 3.3.13: SERIAL REFRESH RETRY EXPIRE MINIMUM
OPT_RR = struct.Struct("!B2HIH")     # RFC 6891 6.1.2: root name, TYPE 41, payload, TTL, RDLEN

# Octets that stand for themselves in a name's text form; others are escaped like dig does.
_PLAIN_NAME_OCTETS = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                      b"-_*/+=!#%&'<>?^`{|}~:,[]")
_PLAIN_NAME_TEXT = _PLAIN_NAME_OCTETS + b"."      # what a name without escapes is made of

# --- Errors and data types ---


class DNSError(Exception):
    """Any resolver failure. `permanent` is the one thing a mail sender must read.

    `status` is the RFC 3463 enhanced status code that fits a bounce or deferral; `name` and
    `rtype` tell which question failed, `rcode` the server's RCODE when there was one.
    """

    permanent = False
    status = "4.4.3"             # RFC 3463: directory server failure

    def __init__(self, message, name=None, rtype=None, rcode=None, ttl=None):
        super().__init__(message)
        self.name = name
        self.rtype = rtype
        self.rcode = rcode
        self.ttl = ttl           # negative-caching time from the SOA (RFC 2308 5), if any


class DNSTemporaryError(DNSError):
    """Try again later: SERVFAIL, REFUSED, no answer in time, a malformed or looping answer."""

    permanent = False


class DNSTimeoutError(DNSTemporaryError):
    """No acceptable answer from any nameserver within the time allowed."""


class DNSFormatError(DNSTemporaryError):
    """A malformed DNS message; the only error the packet parser raises."""


class CNAMELoopError(DNSTemporaryError):
    """A CNAME chain that loops or is longer than MAX_CNAME_CHAIN."""


class DNSPermanentError(DNSError):
    """The answer is final: bounce the mail."""

    permanent = True
    status = "5.1.2"             # RFC 3463: bad destination system address


class NXDomainError(DNSPermanentError):
    """The name does not exist (RCODE NXDOMAIN); `name` is the name that is missing."""


class NoDataError(DNSPermanentError):
    """The name exists but has no record of the type asked (NODATA, RFC 2308 2.2)."""


class NullMXError(DNSPermanentError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""

    status = "5.1.10"            # RFC 7505 4.3


class NoAddressError(DNSPermanentError):
    """No MX host (or the domain itself, for an implicit MX) has an A or AAAA address."""

    status = "5.4.4"             # RFC 3463: unable to route


class DNSNameError(DNSPermanentError, ValueError):
    """Not a valid domain name (too long, empty label, bad IDNA); refused before sending."""


# --- Speed: the data types without dataclasses; about 20 ms off every `python3 dnsmx.py`
#     run (importing dataclasses pulls in inspect, ast and dis), measured by
#     bench/dns_bench.py's one-process-per-query row ---
#
# The plain form of each type below is a frozen dataclass with the same fields in the same
# order, for example
#
#     @dataclass(frozen=True)
#     class MX:
#         preference: int
#         exchange: str
#
# (Nameserver compares, hashes and shows only host and port: field(compare=False, repr=False)
# for the other two; ResolvConf is not frozen.) tests/test_dnsmx.py checks that every type
# behaves as that dataclass does: construction, equality, hashing, repr, immutability, pickle.

class _Fields:
    """What the data types below share, written out instead of @dataclass: importing
    dataclasses (with inspect, ast, dis) and running it cost about 20 ms of a CLI run.

    A type names its fields in __slots__ and its __init__ hands their values to _init() in
    that order. Two values are equal when they are of the same type and their `_compared`
    fields (all of them unless the type says otherwise) are equal; repr() shows the same
    fields. pickle and copy rebuild a value through its constructor.
    """

    __slots__ = ()
    _compared = None             # None: every field in __slots__
    _setters = ()                # each field's slot descriptor __set__, in __slots__ order

    def __init_subclass__(cls, **options):
        super().__init_subclass__(**options)
        cls._setters = tuple(getattr(cls, name).__set__ for name in cls.__slots__)

    def _init(self, *values):
        # A slot's own __set__ goes past _Frozen.__setattr__ as object.__setattr__ would,
        # without looking the slot up by name: Record() 0.92 -> 0.66 us.
        for setter, value in zip(self._setters, values):
            setter(self, value)

    def _key(self):
        return tuple(getattr(self, name) for name in self._compared or self.__slots__)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self._compared or self.__slots__))

    def __reduce__(self):
        return type(self), tuple(getattr(self, name) for name in self.__slots__)


class _Frozen(_Fields):
    """A _Fields type whose values never change once made, so they can be hashed and shared
    between threads and cache entries; assigning a field raises AttributeError."""

    __slots__ = ()

    def __hash__(self):
        return hash(self._key())

    def __setattr__(self, name, value):
        raise AttributeError("cannot assign to field %r of a frozen %s"
                             % (name, type(self).__name__))

    def __delattr__(self, name):
        raise AttributeError("cannot delete field %r of a frozen %s"
                             % (name, type(self).__name__))

# --- End of the speed section ---


class MX(_Frozen):
    """RDATA of an MX record (RFC 1035 3.3.9); exchange "" is the root: a null MX."""

    __slots__ = ("preference", "exchange")

    def __init__(self, preference: int, exchange: str):
        self._init(preference, exchange)


class SOA(_Frozen):
    """RDATA of an SOA record (RFC 1035 3.3.13)."""

    __slots__ = ("mname", "rname", "serial", "refresh", "retry", "expire", "minimum")

    def __init__(self, mname: str, rname: str, serial: int, refresh: int, retry: int,
                 expire: int, minimum: int):
        self._init(mname, rname, serial, refresh, retry, expire, minimum)


class Record(_Frozen):
    """One resource record. Names are text without the trailing dot (the root is "").

    `data` is a str for A, AAAA, CNAME, PTR and NS; MX; SOA; a tuple of bytes for TXT (one
    item per character-string); raw bytes for OPT and unknown types (RFC 3597).
    """

    __slots__ = ("name", "rtype", "rclass", "ttl", "data")

    def __init__(self, name: str, rtype: int, rclass: int, ttl: int, data):
        self._init(name, rtype, rclass, ttl, data)

    @property
    def type_name(self):
        return type_name(self.rtype)


class Message(_Frozen):
    """A parsed DNS message (RFC 1035 4.1). `rcode` includes the EDNS extended bits;
    `additional` is without the OPT Record, which is kept in `opt` (None without EDNS)."""

    __slots__ = ("id", "flags", "rcode", "questions", "answers", "authority", "additional",
                 "opt")

    def __init__(self, id: int, flags: int, rcode: int, questions: tuple, answers: tuple,
                 authority: tuple, additional: tuple, opt=None):
        self._init(id, flags, rcode, questions, answers, authority, additional, opt)

    @property
    def truncated(self):
        return bool(self.flags & FLAG_TC)


class Answer(_Frozen):
    """A successful lookup: `records` of `rtype` owned by `canonical_name`, the end of the
    CNAME chain `cnames` that started at `name`. `ttl` is the lowest TTL involved, counted
    down while the answer sits in the cache; the records keep the TTLs they arrived with.
    """

    __slots__ = ("name", "rtype", "canonical_name", "records", "cnames", "additional", "ttl",
                 "from_cache")

    def __init__(self, name: str, rtype: int, canonical_name: str, records: tuple,
                 cnames: tuple = (), additional: tuple = (), ttl: int = 0,
                 from_cache: bool = False):
        self._init(name, rtype, canonical_name, records, cnames, additional, ttl, from_cache)

    @property
    def data(self):
        return [record.data for record in self.records]


class MXHost(_Frozen):
    """A host to try for a domain's mail, in delivery order (RFC 5321 5.1).

    `addresses` holds the IPv4 addresses first, then the IPv6 ones, each family in the order
    the DNS gave them. `implicit` is True when the domain has no MX and this is the domain
    itself with preference 0.
    """

    __slots__ = ("name", "preference", "addresses", "implicit")

    def __init__(self, name: str, preference: int, addresses: tuple, implicit: bool = False):
        self._init(name, preference, addresses, implicit)


class Nameserver(_Frozen):
    """A nameserver to ask; `sockaddr` and `family` are ready for socket calls. Compared,
    hashed and shown by host and port only: the other two follow from them."""

    __slots__ = ("host", "port", "family", "sockaddr")
    _compared = ("host", "port")

    def __init__(self, host: str, port: int = DNS_PORT, family: int = socket.AF_INET,
                 sockaddr: tuple = ()):
        self._init(host, port, family, sockaddr)

    def __str__(self):
        if ":" in self.host:
            return "[%s]:%d" % (self.host, self.port)
        return "%s:%d" % (self.host, self.port)


class ResolvConf(_Fields):
    """What read_resolv_conf() found: servers and the options timeout, attempts, rotate."""

    __slots__ = ("servers", "timeout", "attempts", "rotate")

    def __init__(self, servers: list, timeout: float = DEFAULT_TIMEOUT,
                 attempts: int = DEFAULT_ATTEMPTS, rotate: bool = False):
        self._init(servers, timeout, attempts, rotate)


# --- Names ---


def type_code(rtype):
    """Return the numeric type for "MX", "mx", "TYPE15" or 15; ValueError if unknown."""
    if isinstance(rtype, int):
        if 0 <= rtype <= 0xFFFF:
            return rtype
        raise ValueError("record type out of range: %r" % rtype)
    text = str(rtype).upper()
    if text in TYPE_CODES:
        return TYPE_CODES[text]
    if text.startswith("TYPE") and text[4:].isdigit():      # RFC 3597 5
        return type_code(int(text[4:]))
    raise ValueError("unknown record type: %r" % rtype)


def type_name(rtype):
    """Return "MX" for 15, "TYPE65" (RFC 3597 5) for a type this module does not know."""
    return TYPE_NAMES.get(rtype) or "TYPE%d" % rtype


def normalize_name(name):
    """Return NAME as this module keys it: ASCII (IDNA for non-ASCII), lower case, no
    trailing dot, the root as "". Raise DNSNameError for anything that cannot be sent.

    Any ASCII octet may stand in a label (RFC 2181 11: a label is any binary string; the
    letters-digits-hyphen rule binds host names only). A space or a control character,
    as an SPF macro can make (RFC 7208 7.3), is kept, and written \\032 in the text form
    as dig writes it; "\\." and "\\DDD" are read as dig's escapes."""
    if not isinstance(name, str):
        raise DNSNameError("domain name must be text, not %s" % type(name).__name__)
    if name.endswith(".") and name != ".":
        name = name[:-1]
    if name in ("", "."):
        return ""
    if not name.isascii():
        name = _idna_encode(name)
    if name.encode("ascii").translate(None, _PLAIN_NAME_TEXT):
        # Escapes, or characters dig would escape: go through the wire labels so that the
        # text matches what the parser makes of the same name.
        return _normalize_escaped(name)
    labels = name.split(".")
    if len(name) > MAX_NAME_LENGTH - 2 or "" in labels or \
            max(map(len, labels)) > MAX_LABEL_LENGTH:
        _check_labels(labels, name)
    return name.lower()


def _idna_encode(name):
    # RFC 3490 ToASCII through the standard library codec (encodings.idna, IDNA 2003).
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise DNSNameError("cannot encode %r with IDNA: %s" % (name, exc)) from None


def _check_labels(labels, name):
    for label in labels:
        if not label:
            raise DNSNameError("empty label in domain name %r" % name)
        if len(label) > MAX_LABEL_LENGTH:
            raise DNSNameError("label longer than %d octets in %r (RFC 1035 2.3.4)"
                               % (MAX_LABEL_LENGTH, name))
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_LENGTH:
        raise DNSNameError("domain name longer than %d octets: %r (RFC 1035 2.3.4)"
                           % (MAX_NAME_LENGTH, name[:40] + "..."))


def _normalize_escaped(name):
    """Normalise a name written with dig's escapes (\\. or \\DDD) through its wire labels."""
    labels = _unescape_labels(name)
    _check_labels(labels, name)
    return _labels_to_text([label.lower() for label in labels])


def _unescape_labels(name):
    labels = []
    label = bytearray()
    index = 0
    while index < len(name):
        char = name[index]
        if char == "\\":
            digits = name[index + 1:index + 4]
            if len(digits) == 3 and digits.isdigit() and int(digits) < 256:
                label.append(int(digits))
                index += 4
                continue
            if index + 1 >= len(name):
                raise DNSNameError("name ends in a lone backslash: %r" % name)
            char = name[index + 1]
            index += 1
        elif char == ".":
            labels.append(bytes(label))
            label = bytearray()
            index += 1
            continue
        if ord(char) > 0x7F:
            raise DNSNameError("unexpected character in domain name %r" % name)
        label.append(ord(char))
        index += 1
    labels.append(bytes(label))
    return labels


def _labels_to_text(labels):
    """Join wire labels into text, escaping like dig (\\. and \\DDD) where needed."""
    if not labels:
        return ""
    joined = b".".join(labels)
    if not joined.translate(None, _PLAIN_NAME_TEXT) and \
            joined.count(b".") == len(labels) - 1:
        return joined.decode("ascii")
    return ".".join(_escape_label(label) for label in labels)


def _escape_label(label):
    out = []
    for octet in label:
        if octet in _PLAIN_NAME_OCTETS:
            out.append(chr(octet))
        elif 0x21 <= octet <= 0x7E:
            out.append("\\" + chr(octet))
        else:
            out.append("\\%03d" % octet)
    return "".join(out)


def _encode_name(name):
    """Wire form of a normalised name (RFC 1035 3.1)."""
    if not name:
        return b"\x00"
    if "\\" in name:
        labels = _unescape_labels(name)
    else:
        labels = name.encode("ascii").split(b".")
    # One bytearray rather than a bytes object per label: 1.0 -> 0.5 us per query.
    wire = bytearray()
    for label in labels:
        wire.append(len(label))
        wire += label
    wire.append(0)
    return bytes(wire)


def reverse_name(ip):
    """Return the in-addr.arpa (RFC 1035 3.5) or ip6.arpa (RFC 3596 2.5) name of an IP."""
    text = str(ip).strip()
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text.split("%")[0])
            nibbles = []
            for octet in reversed(packed):
                nibbles.append("%x.%x" % (octet & 0xF, octet >> 4))
            return ".".join(nibbles) + ".ip6.arpa"
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        raise DNSNameError("not an IP address: %r" % ip) from None
    return "%d.%d.%d.%d.in-addr.arpa" % tuple(reversed(packed))


def dotted(name):
    """Text form with the trailing dot, as dig prints names."""
    return name + "." if name else "."


# --- Wire format ---


def build_query(name, rtype, qid=None, edns=True):
    """Return (id, packet) for one question with RD set and, unless edns is False, an OPT
    record advertising UDP_PAYLOAD octets. NAME is normalised first (DNSNameError)."""
    if qid is None:
        qid = _new_query_id()
    return qid, _build_packet(qid, _encode_name(normalize_name(name)),
                              QUESTION_TAIL.pack(type_code(rtype), CLASS_IN), edns)


def _new_query_id():
    # RFC 5452 9.2: an unpredictable ID. os.urandom is the source secrets.randbits draws
    # on; importing secrets would pull in hashlib and cost milliseconds at start-up.
    return int.from_bytes(os.urandom(2), "big")


def _build_packet(qid, qname, tail, edns):
    if edns:
        header = HEADER.pack(qid, FLAG_RD, 1, 0, 0, 1)
        # RFC 6891 6.1.2-6.1.3: root owner, CLASS = payload size, TTL 0 = version 0, DO clear.
        return header + qname + tail + OPT_RR.pack(0, TYPE_OPT, UDP_PAYLOAD, 0, 0)
    return HEADER.pack(qid, FLAG_RD, 1, 0, 0, 0) + qname + tail


class PacketReader:
    """Reads a DNS message front to back; every read is bounds-checked and a failure names
    its offset. Raises DNSFormatError only."""

    __slots__ = ("data", "offset", "_names", "_names_data")

    def __init__(self, data, offset=0):
        self.data = data
        self.offset = offset
        # read_name(): {offset: (text, octets of its labels, pointers)} of names read in
        # `data`, forgotten if `data` is replaced.
        self._names = {}
        self._names_data = data

    def take(self, count):
        if self.offset + count > len(self.data):
            raise DNSFormatError("truncated at offset %d: %d more octets expected"
                                 % (self.offset, count))
        self.offset += count
        return self.data[self.offset - count:self.offset]

    def unpack(self, layout):
        if self.offset + layout.size > len(self.data):
            raise DNSFormatError("truncated at offset %d: %d more octets expected"
                                 % (self.offset, layout.size))
        values = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return values

    def read_name(self):
        """Read a possibly compressed name (RFC 1035 4.1.4).

        A pointer must point before the start of the labels it was reached from, so every
        jump goes strictly backwards and no loop can form; their number is bounded too.

        Speed: a pointer to the offset where an earlier name of this message started takes
        that name's text instead of reading its labels again (parse_message of dnsmasq's MX
        reply, 12 names: 39 -> 30 us). The walk from that offset was checked then and
        would go the same way now; only the two bounds depend on what came before, so they
        are checked on the sums, and when a sum is over, the labels are read again to fail
        exactly where and as the plain walk fails.
        """
        data = self.data
        size = len(data)
        offset = start = self.offset
        segment_start = offset
        resume = None
        labels = []
        wire_length = 1
        pointers = 0
        suffix = None
        known = self._names
        if self._names_data is not data:
            known.clear()
            self._names_data = data
        while True:
            if offset >= size:
                raise DNSFormatError("name runs past the end of the message at offset %d"
                                     % offset)
            length = data[offset]
            if length == 0:
                offset += 1
                break
            if length <= MAX_LABEL_LENGTH:
                end = offset + 1 + length
                if end > size:
                    raise DNSFormatError("label at offset %d runs past the end" % offset)
                wire_length += length + 1
                if wire_length > MAX_NAME_LENGTH:
                    raise DNSFormatError("name longer than %d octets at offset %d"
                                         % (MAX_NAME_LENGTH, self.offset))
                labels.append(data[offset + 1:end])
                offset = end
            elif length >= 0xC0:
                if offset + 1 >= size:
                    raise DNSFormatError("pointer at offset %d cut short" % offset)
                target = ((length & 0x3F) << 8) | data[offset + 1]
                if target >= segment_start or target < HEADER.size:
                    raise DNSFormatError("compression pointer at offset %d to %d does not "
                                         "point backwards, past the header"
                                         % (offset, target))
                pointers += 1
                if pointers > MAX_POINTERS:
                    raise DNSFormatError("too many compression pointers at offset %d"
                                         % self.offset)
                if resume is None:
                    resume = offset + 2
                offset = segment_start = target
                suffix = known.get(target)
                if suffix is not None and wire_length + suffix[1] <= MAX_NAME_LENGTH and \
                        pointers + suffix[2] <= MAX_POINTERS:
                    wire_length += suffix[1]
                    pointers += suffix[2]
                    break
                suffix = None
            else:
                # RFC 6891 5: extended label types (0x40, 0x80) are not in use.
                raise DNSFormatError("unknown label type 0x%02x at offset %d"
                                     % (length, offset))
        self.offset = offset if resume is None else resume
        text = _labels_to_text(labels)
        if suffix is not None and suffix[0]:          # the known name follows these labels
            text = text + "." + suffix[0] if text else suffix[0]
        known[start] = (text, wire_length - 1, pointers)
        return text

    def read_character_string(self):
        """A <character-string>: one length octet, then that many octets (RFC 1035 3.3)."""
        return self.take(self.take(1)[0])


def _rdata_a(reader, end):
    if end - reader.offset != 4:
        raise DNSFormatError("A record of %d octets at offset %d"
                             % (end - reader.offset, reader.offset))
    return socket.inet_ntoa(reader.take(4))


def _rdata_aaaa(reader, end):
    if end - reader.offset != 16:
        raise DNSFormatError("AAAA record of %d octets at offset %d"
                             % (end - reader.offset, reader.offset))
    return socket.inet_ntop(socket.AF_INET6, reader.take(16))


def _rdata_name(reader, end):
    return reader.read_name()


def _rdata_mx(reader, end):
    preference, = reader.unpack(UINT16)
    return MX(preference, reader.read_name())


def _rdata_txt(reader, end):
    strings = []
    while reader.offset < end:
        strings.append(reader.read_character_string())
    return tuple(strings)


def _rdata_soa(reader, end):
    mname = reader.read_name()
    rname = reader.read_name()
    return SOA(mname, rname, *reader.unpack(SOA_TIMERS))


def _rdata_raw(reader, end):
    return reader.take(end - reader.offset)


_RDATA_PARSERS = {
    TYPE_A: _rdata_a, TYPE_AAAA: _rdata_aaaa, TYPE_MX: _rdata_mx, TYPE_TXT: _rdata_txt,
    TYPE_CNAME: _rdata_name, TYPE_PTR: _rdata_name, TYPE_NS: _rdata_name,
    TYPE_SOA: _rdata_soa,
}


# --- Speed: records made by the parser without the call through type(), __init__ and
#     _init (Record() 0.62 us, _new_record() 0.35 us; nine records in dnsmasq's MX reply),
#     measured by bench/dns_bench.py ---
#
# The plain form is Record(name, rtype, rclass, ttl, data); tests/test_dnsmx.py checks that
# both make equal records.

_set_name, _set_rtype, _set_rclass, _set_ttl, _set_data = Record._setters


def _new_record(name, rtype, rclass, ttl, data):
    record = object.__new__(Record)
    _set_name(record, name)
    _set_rtype(record, rtype)
    _set_rclass(record, rclass)
    _set_ttl(record, ttl)
    _set_data(record, data)
    return record

# --- End of the speed section ---


def _read_record(reader):
    name = reader.read_name()
    rtype, rclass, ttl, rdlength = reader.unpack(RR_HEADER)
    end = reader.offset + rdlength
    if end > len(reader.data):
        raise DNSFormatError("RDATA at offset %d runs past the end" % reader.offset)
    data = _RDATA_PARSERS.get(rtype, _rdata_raw)(reader, end)
    if reader.offset != end:
        raise DNSFormatError("%s RDATA at offset %d does not fill its %d octets"
                             % (type_name(rtype), end - rdlength, rdlength))
    if ttl > 0x7FFFFFFF and rtype != TYPE_OPT:
        ttl = 0                  # RFC 2181 8: a TTL with the top bit set means zero
    return _new_record(name, rtype, rclass, ttl, data)


def parse_message(data):
    """Parse a whole DNS message (RFC 1035 4.1). Raises DNSFormatError and nothing else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DNSFormatError("a DNS message is bytes, not %s" % type(data).__name__)
    reader = PacketReader(bytes(data))
    qid, flags, qdcount, ancount, nscount, arcount = reader.unpack(HEADER)
    questions = []
    for _ in range(qdcount):
        qname = reader.read_name()
        questions.append((qname,) + reader.unpack(QUESTION_TAIL))
    answers = tuple([_read_record(reader) for _ in range(ancount)])
    authority = tuple([_read_record(reader) for _ in range(nscount)])
    additional = []
    opt = None
    rcode = flags & RCODE_MASK
    for _ in range(arcount):
        record = _read_record(reader)
        if record.rtype == TYPE_OPT:
            if opt is not None or record.name:
                raise DNSFormatError("OPT record repeated or not at the root (RFC 6891 6.1.1)")
            opt = record
            rcode |= (record.ttl >> 24) << 4         # RFC 6891 6.1.3: extended RCODE
        else:
            additional.append(record)
    return Message(qid, flags, rcode, tuple(questions), answers, authority, tuple(additional),
                   opt)


def _reply_matches(data, qid, qname, tail):
    """RFC 5452 9.1: same ID, a response, one question equal to ours (names ignore case)."""
    end = HEADER.size + len(qname)
    if len(data) < end + QUESTION_TAIL.size:
        return False
    rid, flags, qdcount = struct.unpack_from("!3H", data)
    return (rid == qid and flags & FLAG_QR and not flags & OPCODE_MASK and qdcount == 1
            and data[HEADER.size:end].lower() == qname and data[end:end + 4] == tail)


# --- Configuration ---


def parse_server(text, default_port=DNS_PORT):
    """Parse HOST[:PORT] with an IP address for HOST: 192.0.2.1, 192.0.2.1:5353, ::1,
    [::1]:53. Raise ValueError otherwise (no names: the resolver cannot look itself up)."""
    if isinstance(text, Nameserver):
        return text
    if isinstance(text, tuple):
        host, port = text
        text = "%s:%s" % text
    else:
        text = str(text).strip()
        host, port = text, default_port
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError("bad nameserver %r: expected [IPv6]:PORT" % text)
            if rest:
                port = rest[1:]
        elif text.count(":") == 1:
            host, port = text.split(":")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError("bad nameserver port in %r" % (text,)) from None
    if not 0 < port < 65536:
        raise ValueError("nameserver port out of range in %r" % (text,))
    if isinstance(host, str) and host.isascii():
        # Text makes getaddrinfo() import the IDNA codec (~4 ms); ASCII needs none of it.
        host = host.encode("ascii")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)[0]
    except (socket.gaierror, UnicodeError, ValueError, TypeError):
        raise ValueError("bad nameserver %r: HOST must be an IP address" % (text,)) from None
    return Nameserver(sockaddr[0], port, family, sockaddr)


def read_resolv_conf(path=RESOLV_CONF):
    """Read nameserver lines and options timeout:N, attempts:N, rotate (resolv.conf(5)).
    A missing file or one without nameservers means the local host, as for the C library."""
    conf = ResolvConf(servers=[])
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_RESOLV_CONF).decode("utf-8", "replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        words = line.split("#")[0].split(";")[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                server = parse_server((words[1], DNS_PORT))    # an address, no port
            except ValueError:
                continue
            if len(conf.servers) < MAX_NAMESERVERS:
                conf.servers.append(server)
        elif words and words[0] == "options":
            for option in words[1:]:
                key, _, value = option.partition(":")
                if key == "timeout" and value.isdigit():
                    conf.timeout = float(min(max(int(value), 1), MAX_TIMEOUT))
                elif key == "attempts" and value.isdigit():
                    conf.attempts = min(max(int(value), 1), MAX_ATTEMPTS)
                elif key == "rotate":
                    conf.rotate = True
    if not conf.servers:
        conf.servers.append(parse_server("127.0.0.1"))
    return conf


# --- Cache ---


class TTLCache:
    """A thread-safe, size-bounded LRU map whose entries expire after their TTL."""

    def __init__(self, maxsize=DEFAULT_CACHE_SIZE, clock=time.monotonic):
        self.maxsize = maxsize
        self.clock = clock
        self._entries = OrderedDict()
        self._lock = _thread.allocate_lock()

    def get(self, key):
        """Return (value, seconds left) or None."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return entry[1], entry[0] - now

    def put(self, key, value, ttl):
        if ttl <= 0 or self.maxsize <= 0:
            return
        expires = self.clock() + min(ttl, MAX_CACHE_TTL)
        with self._lock:
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self):
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)


# --- Transport ---


def _udp_exchange(server, packet, qid, qname, tail, deadline):
    """Send one datagram from a fresh kernel-chosen port; return the first datagram that
    comes from SERVER and matches the query (RFC 5452 9.1). Others are ignored."""
    sock = socket.socket(server.family, socket.SOCK_DGRAM)
    ignored = 0
    try:
        # connect() makes the kernel drop datagrams from any other address or port.
        sock.connect(server.sockaddr)
        sock.send(packet)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            sock.settimeout(remaining)
            data, source = sock.recvfrom(MAX_UDP_RECEIVE)
            if source[:2] == server.sockaddr[:2] and _reply_matches(data, qid, qname, tail):
                return data
            ignored += 1
    except socket.timeout:
        note = ", ignored %d unmatched datagrams" % ignored if ignored else ""
        raise DNSTimeoutError("no answer from %s within the time allowed%s"
                              % (server, note)) from None
    except OSError as exc:
        raise DNSTemporaryError("%s over UDP: %s" % (server, exc.strerror or exc)) from None
    finally:
        sock.close()


def _recv_exactly(sock, count, deadline):
    chunks = []
    received = 0
    while received < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        sock.settimeout(remaining)
        chunk = sock.recv(count - received)
        if not chunk:
            raise DNSFormatError("connection closed after %d of %d octets" % (received, count))
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def _tcp_exchange(server, packet, qid, qname, tail, deadline):
    """One query over TCP with the two-octet length prefix (RFC 1035 4.2.2, RFC 7766 8)."""
    sock = socket.socket(server.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(server.sockaddr)
        sock.sendall(UINT16.pack(len(packet)) + packet)
        length, = UINT16.unpack(_recv_exactly(sock, UINT16.size, deadline))
        data = _recv_exactly(sock, length, deadline)
    except socket.timeout:
        raise DNSTimeoutError("no answer from %s over TCP within the time allowed"
                              % server) from None
    except OSError as exc:
        raise DNSTemporaryError("%s over TCP: %s" % (server, exc.strerror or exc)) from None
    finally:
        sock.close()
    if not _reply_matches(data, qid, qname, tail):
        raise DNSFormatError("TCP answer from %s does not match the query" % server)
    return data


# --- Resolver ---


class Resolver:
    """A stub resolver: asks recursive nameservers, follows CNAMEs, caches answers.

    servers: "HOST[:PORT]" strings, (host, port) pairs or Nameservers; None reads
    /etc/resolv.conf (nameserver lines, options timeout/attempts/rotate). timeout is per
    try; each server is tried `attempts` times. Every public call returns or raises within
    `lifetime` seconds (default timeout x attempts x servers), or within its own shorter
    `lifetime=` argument: a caller with a time budget of its own (an SPF check) passes
    what is left of it. cache_size=0 disables the cache. Safe to share between threads.
    """

    def __init__(self, servers=None, timeout=None, attempts=None,
                 cache_size=DEFAULT_CACHE_SIZE, *, rotate=None, tcp=False, edns=True,
                 lifetime=None, resolv_conf=RESOLV_CONF):
        if servers is None:
            conf = read_resolv_conf(resolv_conf)
        else:
            if isinstance(servers, (str, Nameserver)):
                servers = [servers]
            conf = ResolvConf([parse_server(server) for server in servers])
        if not conf.servers:
            raise ValueError("no nameservers given")
        self.servers = tuple(conf.servers)
        self.timeout = float(conf.timeout if timeout is None else timeout)
        self.attempts = int(conf.attempts if attempts is None else attempts)
        if not self.timeout > 0 or self.attempts < 1:
            raise ValueError("timeout must be positive and attempts at least 1")
        self.rotate = conf.rotate if rotate is None else rotate
        self.tcp = tcp
        self.edns = edns
        self.lifetime = float(lifetime or self.timeout * self.attempts * len(self.servers))
        self.cache = TTLCache(cache_size)
        self._rotation = itertools.count()      # next() on a count is atomic in CPython

    def __repr__(self):
        return "Resolver(servers=[%s], timeout=%g, attempts=%d)" % (
            ", ".join(str(server) for server in self.servers), self.timeout, self.attempts)

    def clear_cache(self):
        """Forget every cached answer, negative answer and delivery plan."""
        self.cache.clear()

    # --- questions ---

    def _deadline(self, lifetime=None):
        """The time.monotonic() value a call must end by: now plus the resolver's lifetime,
        or plus lifetime when that is shorter (0 or less: no time left, DNSTimeoutError)."""
        if lifetime is None or lifetime > self.lifetime:
            lifetime = self.lifetime
        return time.monotonic() + lifetime

    def query(self, name, rtype="A", *, explain=None, lifetime=None):
        """Ask one question without cache or CNAME following; return the reply Message
        (NOERROR or NXDOMAIN). Other RCODEs and failures raise DNSTemporaryError."""
        return self._exchange(normalize_name(name), type_code(rtype), self._deadline(lifetime),
                              explain)

    def resolve(self, name, rtype="A", *, use_cache=True, explain=None, lifetime=None):
        """Return the Answer for NAME and RTYPE, following CNAMEs (at most MAX_CNAME_CHAIN).

        Raises NXDomainError or NoDataError (permanent) when there is no such record, and
        DNSTemporaryError (or a subclass) when the answer could not be had now, that is
        within lifetime seconds when given (else the resolver's own lifetime).
        """
        return self._resolve(normalize_name(name), type_code(rtype), self._deadline(lifetime),
                             explain, use_cache)

    def ptr(self, ip, *, lifetime=None):
        """Names that the PTR records of IP (v4 or v6) point to."""
        answer = self.resolve(reverse_name(ip), TYPE_PTR, lifetime=lifetime)
        return [record.data for record in answer.records]

    def txt(self, name, *, raw=False, lifetime=None):
        """One item per TXT record, its strings joined without separator (RFC 7208 3.3).
        Text is decoded as UTF-8 with undecodable octets replaced; raw=True gives bytes."""
        answer = self.resolve(name, TYPE_TXT, lifetime=lifetime)
        joined = [b"".join(record.data) for record in answer.records]
        if raw:
            return joined
        return [value.decode("utf-8", "replace") for value in joined]

    def mx_hosts(self, domain, *, explain=None, lifetime=None):
        """The hosts to try for mail to DOMAIN, in order (RFC 5321 5.1): MX records by
        preference, equal preferences shuffled, each with its addresses (IPv4 first, then
        IPv6, each in the DNS's order: IPv4 is what most mail paths reach, and receivers
        check IPv6 senders more strictly); the implicit MX when the domain has no MX
        records. Hosts without any address are left out.

        Raises NXDomainError (no such domain), NullMXError (RFC 7505: accepts no mail),
        NoAddressError (no host has an address) - all permanent - or DNSTemporaryError.
        """
        domain = normalize_name(domain)
        cached = self.cache.get((domain, "mx_hosts"))
        if cached is not None:
            if explain:
                explain("cache: delivery plan for %s still valid for %d s"
                        % (dotted(domain), cached[1]))
            return _shuffle_equal_preferences(cached[0], explain)
        groups, ttl = self._mx_plan(domain, self._deadline(lifetime), explain)
        if ttl > 0:
            self.cache.put((domain, "mx_hosts"), groups, ttl)
            if explain:
                explain("cache: delivery plan kept for %d s (the lowest TTL involved)"
                        % min(ttl, MAX_CACHE_TTL))
        return _shuffle_equal_preferences(groups, explain)

    # --- resolution steps ---

    def _resolve(self, name, rtype, deadline, explain, use_cache):
        key = (name, rtype)
        if use_cache:
            cached = self.cache.get(key)
            if cached is not None:
                return _from_cache(cached, name, rtype, explain)
        cnames = []
        seen = {name}
        current = name
        while True:
            message = self._exchange(current, rtype, deadline, explain)
            records, target = _follow_cnames(message.answers, current, rtype, cnames, seen,
                                             explain)
            if records:
                break
            if message.rcode == NXDOMAIN:
                error = NXDomainError("%s does not exist (NXDOMAIN)" % dotted(target),
                                      target, rtype, NXDOMAIN, _negative_ttl(message))
                self._cache_error(key, error, use_cache, explain)
                raise error
            if target == current:
                error = NoDataError("%s has no %s record (NODATA)"
                                    % (dotted(target), type_name(rtype)),
                                    target, rtype, NOERROR, _negative_ttl(message))
                self._cache_error(key, error, use_cache, explain)
                raise error
            # The chain went on to a name this reply does not answer: ask about it.
            if explain:
                explain("%s: the reply stops at the CNAME; asking for %s %s"
                        % (dotted(name), dotted(target), type_name(rtype)))
            current = target
        ttl = min([record.ttl for record in records] + [record.ttl for record in cnames])
        answer = Answer(name, rtype, target, tuple(records), tuple(cnames),
                        message.additional, ttl)
        if use_cache:
            self.cache.put(key, answer, ttl)
        return answer

    def _cache_error(self, key, error, use_cache, explain):
        if use_cache and error.ttl:
            self.cache.put(key, error, error.ttl)
            if explain:
                explain("cache: %s kept for %d s (SOA minimum, RFC 2308 5)"
                        % (RCODE_NAMES[error.rcode] if error.rcode else "NODATA", error.ttl))
        elif explain and use_cache:
            explain("cache: negative answer not kept: no SOA in the reply (RFC 2308 5)")

    def _exchange(self, name, rtype, deadline, explain):
        """Ask the servers in turn until one gives NOERROR or NXDOMAIN; raise the last
        temporary failure when none does before the deadline."""
        qname = _encode_name(name)
        tail = QUESTION_TAIL.pack(rtype, CLASS_IN)
        servers = self.servers
        if self.rotate and len(servers) > 1:
            start = next(self._rotation) % len(servers)
            servers = servers[start:] + servers[:start]
        last_error = None
        for _ in range(self.attempts):
            for server in servers:
                now = time.monotonic()
                if now >= deadline:
                    break
                try:
                    message = self._ask(server, qname, tail, min(deadline, now + self.timeout),
                                        deadline, explain)
                except DNSTemporaryError as exc:
                    exc.name = exc.name or name
                    exc.rtype = exc.rtype or rtype
                    last_error = exc
                    if explain:
                        explain("%s %s: %s" % (dotted(name), type_name(rtype), exc))
                    continue
                if explain:
                    explain("asked %s for %s %s: %s, %d answer(s)%s"
                            % (server, dotted(name), type_name(rtype),
                               RCODE_NAMES.get(message.rcode, message.rcode),
                               len(message.answers),
                               ", %d additional" % len(message.additional)
                               if message.additional else ""))
                if message.rcode in (NOERROR, NXDOMAIN):
                    return message
                last_error = DNSTemporaryError(
                    "%s answered %s for %s %s" % (
                        server, RCODE_NAMES.get(message.rcode, "RCODE %d" % message.rcode),
                        dotted(name), type_name(rtype)), name, rtype, message.rcode)
        if last_error is None:
            last_error = DNSTimeoutError("no answer for %s %s within the time allowed"
                                         % (dotted(name), type_name(rtype)), name, rtype)
        raise last_error

    def _ask(self, server, qname, tail, try_deadline, deadline, explain):
        """One try at one server: UDP, then TCP when the answer is truncated or too big."""
        qname_lower = qname.lower()
        edns = self.edns
        while True:             # at most twice: EDNS, then without it
            qid = _new_query_id()
            packet = _build_packet(qid, qname, tail, edns)
            if self.tcp:
                data = _tcp_exchange(server, packet, qid, qname_lower, tail, try_deadline)
            else:
                data = _udp_exchange(server, packet, qid, qname_lower, tail, try_deadline)
                limit = UDP_PAYLOAD if edns else UDP_PAYLOAD_WITHOUT_EDNS
                if data[2] & (FLAG_TC >> 8) or len(data) > limit:
                    if explain:
                        explain("%s: UDP answer %s; asking again over TCP (RFC 7766 5)"
                                % (server, "truncated (TC)" if data[2] & (FLAG_TC >> 8)
                                   else "larger than %d octets" % limit))
                    tcp_deadline = min(deadline, time.monotonic() + self.timeout)
                    data = _tcp_exchange(server, packet, qid, qname_lower, tail, tcp_deadline)
            message = parse_message(data)
            if message.rcode == FORMERR and edns and message.opt is None:
                # RFC 6891 7: a server that does not know EDNS; ask it again without.
                if explain:
                    explain("%s: FORMERR without OPT; asking again without EDNS" % server)
                edns = False
                continue
            return message

    def _mx_plan(self, domain, deadline, explain):
        """RFC 5321 5.1 decisions; return (groups of MXHosts by preference, ttl to keep)."""
        if explain:
            explain("RFC 5321 5.1: look up the MX records of %s" % dotted(domain))
        try:
            answer = self._resolve(domain, TYPE_MX, deadline, explain, True)
        except NoDataError as exc:
            host = exc.name or domain
            if explain:
                explain("no MX records: implicit MX, %s itself with preference 0 "
                        "(RFC 5321 5.1)" % dotted(host))
            addresses, ttl, failure = self._host_addresses(host, (), deadline, explain)
            if not addresses:
                if failure is not None:
                    raise failure
                raise NoAddressError("%s has no MX record and no A or AAAA address"
                                     % dotted(domain), domain, TYPE_MX) from None
            plan_ttl = min(ttl, exc.ttl or 0) if failure is None else 0
            return ((MXHost(host, 0, addresses, True),),), plan_ttl
        if explain and answer.cnames:
            explain("RFC 5321 5.1: %s is an alias; the MX records of %s are used"
                    % (dotted(domain), dotted(answer.canonical_name)))
        records = answer.records
        if len(records) == 1 and records[0].data.exchange == "":
            if explain:
                explain("null MX (RFC 7505): %s accepts no mail" % dotted(domain))
            raise NullMXError("%s accepts no mail (null MX, RFC 7505)" % dotted(domain),
                              domain, TYPE_MX)
        if explain:
            explain("MX set found: %d record(s)" % len(records))
        ordered = sorted(records, key=lambda record: record.data.preference)
        if explain:
            explain("sorted by preference: %s" % ", ".join(
                "%d %s" % (r.data.preference, dotted(r.data.exchange)) for r in ordered))
        hosts = []
        seen = set()
        ttl = answer.ttl
        failure = None
        for record in ordered[:MAX_MX_TARGETS]:
            target = record.data.exchange.lower()
            if target == "":
                if explain:
                    explain("MX %d . ignored: a null MX among other MX records (RFC 7505 3)"
                            % record.data.preference)
                continue
            if target in seen:
                continue
            seen.add(target)
            addresses, address_ttl, error = self._host_addresses(
                target, answer.additional, deadline, explain)
            if error is not None:
                failure = error
            if not addresses:
                if explain:
                    explain("%s has no address: skipped" % dotted(target))
                continue
            ttl = min(ttl, address_ttl)
            hosts.append(MXHost(target, record.data.preference, addresses))
        if len(ordered) > MAX_MX_TARGETS and explain:
            explain("only the first %d MX records are used" % MAX_MX_TARGETS)
        if not hosts:
            if failure is not None:
                raise failure
            raise NoAddressError("no MX host of %s has an A or AAAA address"
                                 % dotted(domain), domain, TYPE_MX)
        if explain:
            explain("address order within each host: IPv4 first, then IPv6")
        groups = []
        for host in hosts:
            if groups and groups[-1][0].preference == host.preference:
                groups[-1].append(host)
            else:
                groups.append([host])
        # A plan missing a host that failed for now must not outlive this call.
        return tuple(tuple(group) for group in groups), (ttl if failure is None else 0)

    def _host_addresses(self, host, additional, deadline, explain):
        """Return (addresses, ttl, temporary error or None) for one MX target."""
        ipv4 = [r for r in additional if r.rtype == TYPE_A and r.name.lower() == host]
        ipv6 = [r for r in additional if r.rtype == TYPE_AAAA and r.name.lower() == host]
        if ipv4 or ipv6:
            records = ipv4 + ipv6
            if explain:
                explain("%s: %s, from the additional section" % (
                    dotted(host), _describe_addresses(records)))
            return (tuple(r.data for r in records), min(r.ttl for r in records), None)
        addresses = []
        records = []
        ttl = MAX_CACHE_TTL
        failure = None
        for rtype in (TYPE_A, TYPE_AAAA):
            try:
                answer = self._resolve(host, rtype, deadline, explain, True)
            except NXDomainError:
                if explain:
                    explain("%s does not exist (NXDOMAIN)" % dotted(host))
                break
            except DNSPermanentError:
                continue
            except DNSTemporaryError as exc:
                failure = exc
                continue
            if answer.cnames and explain and not records:
                explain("%s is an alias of %s: tolerated, though an MX should name the host "
                        "itself (RFC 2181 10.3)" % (dotted(host),
                                                   dotted(answer.canonical_name)))
            records.extend(answer.records)
            addresses.extend(answer.data)
            ttl = min(ttl, answer.ttl)
        if explain and records:
            explain("%s: %s, looked up" % (dotted(host), _describe_addresses(records)))
        return tuple(addresses), ttl, failure


def _follow_cnames(answers, name, rtype, cnames, seen, explain):
    """Walk the answer section from NAME through CNAMEs; return (records of rtype, the
    name reached). Appends the CNAMEs taken to `cnames`; raises CNAMELoopError."""
    current = name
    for _ in range(len(answers) + 1):
        records = [r for r in answers
                   if r.rtype == rtype and r.rclass == CLASS_IN and r.name.lower() == current]
        if records or rtype == TYPE_CNAME:
            return records, current
        cname = next((r for r in answers
                      if r.rtype == TYPE_CNAME and r.name.lower() == current), None)
        if cname is None:
            return [], current
        target = cname.data.lower()
        cnames.append(cname)
        if explain:
            explain("CNAME followed: %s -> %s" % (dotted(current), dotted(target)))
        if target in seen or len(cnames) > MAX_CNAME_CHAIN:
            raise CNAMELoopError("CNAME chain from %s loops or is longer than %d"
                                 % (dotted(name), MAX_CNAME_CHAIN), name, rtype)
        seen.add(target)
        current = target
    return [], current


def _negative_ttl(message):
    """RFC 2308 5: the lower of the SOA's TTL and its MINIMUM; None without an SOA."""
    for record in message.authority:
        if record.rtype == TYPE_SOA:
            return min(record.ttl, record.data.minimum, MAX_NEGATIVE_TTL)
    return None


def _from_cache(cached, name, rtype, explain):
    value, remaining = cached
    if explain:
        explain("cache: %s %s answered from the cache, %d s left"
                % (dotted(name), type_name(rtype), remaining))
    if isinstance(value, DNSError):
        raise type(value)(str(value), value.name, value.rtype, value.rcode, int(remaining))
    return Answer(value.name, value.rtype, value.canonical_name, value.records, value.cnames,
                  value.additional, int(remaining), from_cache=True)


def _shuffle_equal_preferences(groups, explain):
    plan = []
    for group in groups:
        if len(group) > 1:
            group = _shuffled(group)     # RFC 5321 5.1: spread load over equal preferences
            if explain:
                explain("shuffled equal preference %d: %s" % (
                    group[0].preference, ", ".join(dotted(host.name) for host in group)))
        plan.extend(group)
    return plan


def _shuffled(items):
    """A list of ITEMS in random order (Fisher-Yates). os.urandom, not the random module,
    which costs milliseconds to import; the bias of % is below 2**-28 for up to 16 hosts."""
    items = list(items)
    noise = os.urandom(4 * len(items))
    for index in range(len(items) - 1, 0, -1):
        other = int.from_bytes(noise[4 * index:4 * index + 4], "big") % (index + 1)
        items[index], items[other] = items[other], items[index]
    return items


def _describe_addresses(records):
    return ", ".join("%s %s (ttl %d)" % (r.type_name, r.data, r.ttl) for r in records)


# --- Module-level API over a default resolver ---

_default_resolver = None
_bench_resolvers = {}            # resolve_mx(): one uncached Resolver per (server, port)
_resolvers_lock = _thread.allocate_lock()


def default_resolver():
    """The shared Resolver configured from /etc/resolv.conf, made on first use."""
    global _default_resolver
    with _resolvers_lock:
        if _default_resolver is None:
            _default_resolver = Resolver()
        return _default_resolver


def set_default_resolver(resolver):
    """Make the module-level functions use RESOLVER (for example one built from --dns)."""
    global _default_resolver
    with _resolvers_lock:
        _default_resolver = resolver


def resolve(name, rtype="A", *, lifetime=None):
    """Resolver.resolve() on the default resolver."""
    return default_resolver().resolve(name, rtype, lifetime=lifetime)


def mx_hosts(domain, *, lifetime=None):
    """Resolver.mx_hosts() on the default resolver."""
    return default_resolver().mx_hosts(domain, lifetime=lifetime)


def ptr(ip, *, lifetime=None):
    """Resolver.ptr() on the default resolver."""
    return default_resolver().ptr(ip, lifetime=lifetime)


def txt(name, raw=False, *, lifetime=None):
    """Resolver.txt() on the default resolver."""
    return default_resolver().txt(name, raw=raw, lifetime=lifetime)


def resolve_mx(name, server=None, port=DNS_PORT):
    """MX target names of NAME by preference (DNS order among equals), asked of SERVER
    without cache; [] when the name or its MX records do not exist, ["."] for a null MX.
    Temporary failures raise DNSTemporaryError."""
    if server is None:
        resolver = default_resolver()
    else:
        key = (server, int(port))
        with _resolvers_lock:
            resolver = _bench_resolvers.get(key)
            if resolver is None:
                resolver = Resolver([parse_server(key)], cache_size=0)
                if len(_bench_resolvers) < 16:
                    _bench_resolvers[key] = resolver
    try:
        answer = resolver.resolve(name, TYPE_MX, use_cache=False)
    except (NXDomainError, NoDataError):
        return []
    ordered = sorted(answer.records, key=lambda record: record.data.preference)
    return [r.data.exchange or "." for r in ordered]


# --- Command line ---


def usage_parser(**options):
    """An argparse.ArgumentParser(**options) whose usage errors exit with EXIT_USAGE (64,
    sysexits.h EX_USAGE) instead of argparse's 2; so do its subcommands' parsers, given
    parser_class=type(parser). The CLIs of spf, dkim, mta and mailbox_store use it. It lives
    here rather than in plumbing, which every CLI could import too, because plumbing loads
    ssl and socketserver, which a one-off `python3 spf.py` must not pay for.
    argparse is imported here, not at the top: only the command line needs it."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, "%s: error: %s\n" % (self.prog, message))

    return Parser(**options)
