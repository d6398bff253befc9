"""dkim.py - DKIM signing and verifying (RFC 6376, 8301, 8463) and DMARC (RFC 7489).

DKIM: sign() computes the DKIM-Signature header field of a message with an RSA-SHA256
(RFC 8017 PKCS#1 v1.5) or Ed25519-SHA256 (RFC 8463, RFC 8032) key; verify() checks every
DKIM-Signature of a message (the first MAX_SIGNATURES), fetching each key record over DNS
at SELECTOR._domainkey.DOMAIN through dnsstub. Both read the message once, as bytes or as an
iterable of blocks: the header section is kept (bounded), the body is canonicalised and
hashed as it streams by (BodyHasher), never copied whole. The cryptography is written here
by hand on Python integers and hashlib: a bounded ASN.1 DER reader for PEM/DER keys
(PKCS#1, PKCS#8, SubjectPublicKeyInfo), RSA with CRT and 2048-bit key generation
(Miller-Rabin over `secrets`), and Ed25519 in extended coordinates. Ed25519 signing runs a
Montgomery ladder with arithmetic swaps: no branch and no table index depends on the
secret scalar, although Python's integers themselves are not constant-time.

Results per signature (RFC 8601 2.7.1): pass, fail (hashes or signature do not match),
policy (a valid signature over only the first l= octets of a longer body: not trusted for
the message), temperror (the key record could not be had now), permerror (bad syntax, bad
or revoked key, rsa-sha1 (RFC 8301 3.1), an RSA key under 1024 bits (RFC 8301 3.2), an
expired signature...), and none for a message without a signature.

DMARC: evaluate_dmarc() finds the policy record at _dmarc.<From domain>, else at the
organisational domain (RFC 7489 3.2) taken from the Public Suffix List shipped in
data/public_suffix_list.dat, checks strict or relaxed alignment of SPF and DKIM
(aspf=, adkim=), and returns pass, fail, none, temperror or permerror with the policy to
apply (p=, sp=, pct=). DMARC lives here because it only combines DKIM's results with
SPF's and needs nothing but DNS: a separate file would be one more role for one function.
Aggregate and failure reports (rua=, ruf=) are out of scope: the tags are parsed and kept,
nothing is sent.

authentication_results_fragments() renders the dkim= and dmarc= parts of an
Authentication-Results field (RFC 8601), to be joined with spf.py's spf= part; their
values are quoted by spf.authres_value(), one rule for the whole field.

A library and an admin CLI, not a daemon. keygen writes SPOOL/dkim/DOMAIN/SELECTOR.key;
the rest reads stdin and DNS only.
Run: python3 dkim.py keygen --domain D --selector S [--algorithm rsa|ed25519] [--spool DIR]
     python3 dkim.py sign --domain D --selector S [--key FILE | --spool DIR] < message
     python3 dkim.py verify [--dns HOST[:PORT]] < message
     python3 dkim.py dmarc --from DOMAIN [--spf-result R --spf-domain D] [--dkim-domain D]
"""

import base64
import functools
import hashlib
import hmac
import os
import random
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import dnsstub
import plumbing
import spf

__all__ = [
    # errors and data types
    "DKIMError", "DERError", "RSAPublicKey", "RSAPrivateKey", "Ed25519PublicKey",
    "Ed25519PrivateKey", "KeyRecord", "Signature", "DKIMResult", "DMARCRecord", "DMARCResult",
    # parsing
    "parse_tag_list", "parse_signature", "parse_key_record", "parse_dmarc_record",
    "parse_header", "split_message", "DERReader", "der_walk", "pem_decode", "pem_encode",
    "read_private_key", "read_public_key",
    # keys and cryptography
    "generate_rsa_key", "generate_ed25519_key", "private_key_pem", "public_key_der",
    "rsa_sign", "rsa_verify", "ed25519_public_key", "ed25519_sign", "ed25519_verify",
    # canonicalisation, signing, verifying
    "BodyHasher", "canonicalize_header", "complete_signature", "sign", "verify", "DNSResolver",
    "key_record_text", "dns_records",
    # DMARC and reporting
    "organizational_domain", "from_domain", "evaluate_dmarc", "aligned",
    "authentication_results_fragments", "authentication_results_header",
    "to_crlf", "spool_key", "main",
    # constants
    "DEFAULT_TIMEOUT",
]

# --- Constants ---

RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")  # RFC 8601 2.7.1
DMARC_RESULTS = ("none", "pass", "fail", "temperror", "permerror")                # RFC 8601 2.7.1
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")     # RFC 6376 3.3, RFC 8463 3; rsa-sha1: RFC 8301
CANONICALIZATIONS = ("simple", "relaxed")         # RFC 6376 3.4

# What sign() signs when no list is given (those present), From over-signed (RFC 6376 8.15).
DEFAULT_SIGNED_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To",
                          "MIME-Version", "Content-Type", "Content-Transfer-Encoding")

MIN_RSA_BITS = 1024               # RFC 8301 3.2: smaller keys MUST NOT be used to verify
MAX_RSA_BITS = 8192               # larger keys refused: bounds the cost of one verification
MAX_RSA_EXPONENT_BITS = 64        # e is 65537 in practice; a huge e would make verify slow
DEFAULT_RSA_BITS = 2048           # RFC 8301 3.2: signers SHOULD use at least 2048 bits
RSA_EXPONENT = 65537
MILLER_RABIN_ROUNDS = 40          # error below 2^-80 even for adversarial numbers
MAX_KEY_RECORD = 4096             # octets of one key record, its strings joined
MAX_SIGNATURE_HEADER = 8192       # octets of one DKIM-Signature field, name and folding included
MAX_SIGNATURES = 5                # DKIM-Signature fields checked per message; the rest ignored
MAX_KEY_LOOKUPS = 5               # key record lookups per message (each name asked once)
MAX_DMARC_LOOKUPS = 2             # RFC 7489 6.6.3: the From domain, then the organisational one
DEFAULT_TIMEOUT = 10.0            # seconds of DNS per message for verify() and evaluate_dmarc()
MAX_TAGS = 64                     # tags in one tag-list (RFC 6376 3.2)
MAX_TAG_VALUE = 4096              # characters of one tag's value
MAX_BASE64 = 2048                 # base64 characters of b= (8192-bit RSA: 1368) or of bh=
MAX_SIGNED_FIELDS = 100           # names in h=
MAX_HEADER_SECTION = 1 << 20      # octets of header section kept for signing and verifying
MAX_HEADER_FIELDS = 5000          # header fields of one message
MAX_KEY_FILE = 64 * 1024          # octets of a PEM or DER private key file
MAX_DER_DEPTH = 8                 # nesting of ASN.1 constructed values
MAX_DOMAIN_LENGTH = 253           # RFC 1035 2.3.4, in text form without the final dot
MAX_BODY_LENGTH_TAG = 10 ** 15    # l= values past this are refused (RFC 6376 3.5: 76 digits)
MAX_TIMESTAMP = 10 ** 12          # t= and x= (RFC 6376 3.5: at least 40 bits; 12 digits kept)
BLOCK_SIZE = 64 * 1024            # octets canonicalised at a time by BodyHasher
MAX_PENDING_LINE = 64 * 1024      # octets of one unfinished body line held back
DNS_STRING = 255                  # RFC 1035 3.3.14: octets of one TXT character-string
HEADER_WIDTH = 78                 # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
MAX_HEADER_VALUE = 255            # characters of message-supplied text put into a header
HEADER_B_LENGTH = 8               # RFC 6008 2: characters of b= in header.b
MAX_CLI_MESSAGE = 64 << 20        # octets `sign` reads from stdin (it must print it back)
PEM_LINE = 64                     # RFC 7468 2: base64 characters per PEM line

DKIM_SUBDIR = "dkim"              # SPOOL/dkim/DOMAIN/SELECTOR.key
KEY_SUFFIX = ".key"
KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
RECOMMENDED_SPF = "v=spf1 mx -all"
RECOMMENDED_DMARC = "v=DMARC1; p=quarantine; adkim=r; aspf=r"

PUBLIC_SUFFIX_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                  "public_suffix_list.dat")
DMARC_POLICIES = ("none", "quarantine", "reject")             # RFC 7489 6.3 p=

EXIT_PASS = 0                     # verify: every signature passed; dmarc: pass
EXIT_NOT_PASS = 1                 # anything else (and none: no signature at all)
EXIT_USAGE = 64                   # sysexits.h EX_USAGE, as spf.py and dnsmx.py

# ASN.1 (X.690) tags and the object identifiers of the keys read and written.
DER_INTEGER = 0x02
DER_BIT_STRING = 0x03
DER_OCTET_STRING = 0x04
DER_NULL = 0x05
DER_OID = 0x06
DER_SEQUENCE = 0x30
OID_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")     # 1.2.840.113549.1.1.1 (RFC 8017 A.1)
OID_ED25519 = bytes.fromhex("2b6570")                        # 1.3.101.112 (RFC 8410 3)
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")  # RFC 8017 9.2 note 1

# Ed25519 (RFC 8032 5.1): the curve -x^2 + y^2 = 1 + d x^2 y^2 over GF(2^255 - 19).
ED_P = 2 ** 255 - 19
ED_D = -121665 * pow(121666, ED_P - 2, ED_P) % ED_P
ED_L = 2 ** 252 + 27742317777372353535851937790883648493    # order of the base point
ED_SQRT_M1 = pow(2, (ED_P - 1) // 4, ED_P)                   # a square root of -1
ED_BY = 4 * pow(5, ED_P - 2, ED_P) % ED_P                    # base point: y = 4/5, x even
ED_SCALAR_BITS = 256              # ladder steps: every scalar is below 2^255

# --- Grammar ---

_WSP = re.compile(rb"[ \t]+")
# The WSP runs relaxed body canonicalisation changes: a tab, or two or more characters.
# A lone space stays as it is, so the common case costs no replacement (4x faster on text).
_WSP_TO_SPACE = re.compile(rb"\t[ \t]*| [ \t]+")
_FWS = re.compile(r"[ \t\r\n]+")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")                         # RFC 6376 3.2
_TAG_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]*(?:[ \t\r\n]+[\x21-\x3a\x3c-\x7e]+)*\Z")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")   # RFC 1035 2.3.4: 63
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")                     # RFC 5322 2.2
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)

# --- Errors and data types ---


class DKIMError(ValueError):
    """Input that RFC 6376 (or RFC 7489) does not allow: a permerror where it is judged."""


class DERError(DKIMError):
    """ASN.1 DER that cannot be read: bad lengths, nesting, tags; says where."""


@dataclass(frozen=True)
class RSAPublicKey:
    n: int
    e: int

    @property
    def bits(self):
        return self.n.bit_length()


@dataclass(frozen=True)
class RSAPrivateKey:
    """An RSA key with its CRT values (RFC 8017 3.2, second representation)."""

    n: int
    e: int
    d: int
    p: int
    q: int
    dp: int
    dq: int
    qinv: int

    @property
    def bits(self):
        return self.n.bit_length()

    @property
    def public(self):
        return RSAPublicKey(self.n, self.e)

    algorithm = "rsa-sha256"
    key_type = "rsa"


@dataclass(frozen=True)
class Ed25519PublicKey:
    key: bytes                    # 32 octets (RFC 8032 5.1.5)


@dataclass(frozen=True)
class Ed25519PrivateKey:
    seed: bytes = field(repr=False)   # the 32-octet private key of RFC 8032 5.1.5

    @functools.cached_property
    def public(self):
        """Worked out once per key object: it costs as much as a signature."""
        return Ed25519PublicKey(ed25519_public_key(self.seed))

    algorithm = "ed25519-sha256"
    key_type = "ed25519"


@dataclass(frozen=True)
class KeyRecord:
    """A DKIM key record (RFC 6376 3.6.1); `key` is None for a revoked key (empty p=)."""

    key_type: str = "rsa"                     # k=
    key: object = None                        # RSAPublicKey or Ed25519PublicKey
    hashes: tuple = ()                        # h=; () means any
    services: tuple = ("*",)                  # s=
    flags: tuple = ()                         # t=: "y" testing, "s" strict identity

    @property
    def testing(self):
        return "y" in self.flags

    @property
    def strict(self):
        return "s" in self.flags


@dataclass(frozen=True)
class Signature:
    """A parsed DKIM-Signature field (RFC 6376 3.5)."""

    algorithm: str
    domain: str                               # d=, lower-cased
    selector: str                             # s=
    signed_headers: tuple                     # h=, lower-cased, in order
    body_hash: bytes                          # bh=
    signature: bytes                          # b=
    b_text: str                               # b= as base64 text, for header.b
    header_canon: str = "simple"
    body_canon: str = "simple"
    identity: str = ""                        # i=, default "@" + d
    length: Optional[int] = None              # l=
    timestamp: Optional[int] = None           # t=
    expiration: Optional[int] = None          # x=
    raw: bytes = field(default=b"", repr=False)   # the whole field as in the message


@dataclass
class DKIMResult:
    """What verify() found for one signature (or result none for an unsigned message)."""

    result: str                               # one of RESULTS
    reason: str = ""
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    b_text: str = ""
    testing: bool = False                     # the key record says t=y
    length: Optional[int] = None              # l=, when the signature has one
    body_length: Optional[int] = None         # the canonical body length seen


@dataclass(frozen=True)
class DMARCRecord:
    """A DMARC policy record (RFC 7489 6.3)."""

    policy: str                               # p=
    subdomain_policy: Optional[str] = None    # sp=
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: str = ""                             # kept, not used: reports are out of scope
    ruf: str = ""


@dataclass
class DMARCResult:
    """The DMARC verdict for a message and the policy its author domain asks for."""

    result: str                               # one of DMARC_RESULTS
    from_domain: str = ""
    policy: str = "none"                      # what the domain asks: p=, or sp= below it
    disposition: str = "none"                 # what to apply after pct= sampling
    record_domain: str = ""                   # where the record was found
    organizational_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    dkim_domain: str = ""                     # d= of the aligned passing signature
    pct: int = 100
    reason: str = ""


# --- Tag lists (RFC 6376 3.2) ---


def parse_tag_list(text, max_tags=MAX_TAGS):
    """Parse a tag=value list into a dict; DKIMError for bad syntax, a repeated tag, more
    than MAX_TAGS tags or a value over MAX_TAG_VALUE characters. Values lose their
    surrounding whitespace; FWS inside values is kept for the caller to judge."""
    tags = {}
    offset = 0
    parts = text.split(";")
    if len(parts) > max_tags + 1:
        raise DKIMError("more than %d tags" % max_tags)
    for index, part in enumerate(parts):
        if not part.strip(" \t\r\n"):
            if index == len(parts) - 1:           # a final ";" is allowed
                break
            raise DKIMError("empty tag at offset %d" % offset)
        name, equals, value = part.partition("=")
        name = name.strip(" \t\r\n")
        value = value.strip(" \t\r\n")
        if not equals or not _TAG_NAME.match(name):
            raise DKIMError("bad tag %r at offset %d" % (part.strip()[:20], offset))
        if len(value) > MAX_TAG_VALUE:
            raise DKIMError("tag %s= longer than %d characters" % (name, MAX_TAG_VALUE))
        if not _TAG_VALUE.match(value):
            raise DKIMError("bad character in tag %s= at offset %d" % (name, offset))
        if name in tags:
            raise DKIMError("tag %s= appears twice (RFC 6376 3.2)" % name)
        tags[name] = value
        offset += len(part) + 1
    return tags


def _base64_value(value, name, limit=MAX_BASE64):
    """A base64 tag value (RFC 6376 2.4) decoded; FWS inside is ignored."""
    text = _FWS.sub("", value)
    if len(text) > limit:
        raise DKIMError("%s= longer than %d base64 characters" % (name, limit))
    if not _BASE64.match(text):
        raise DKIMError("%s= is not valid base64" % name)
    return base64.b64decode(text), text


def _is_domain(name):
    """A domain name of LDH labels (underscores allowed, as in _domainkey), bounded."""
    if not 0 < len(name) <= MAX_DOMAIN_LENGTH:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _is_subdomain(name, domain):
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def _number(value, name, limit):
    if not value.isdigit() or not value.isascii() or len(value) > len(str(limit)):
        raise DKIMError("%s= is not a number up to %d" % (name, limit))
    number = int(value)
    if number > limit:
        raise DKIMError("%s= is larger than %d" % (name, limit))
    return number


def parse_signature(raw, now=None):
    """Parse a DKIM-Signature field (bytes, name and CRLF included) into a Signature,
    checking what RFC 6376 6.1.1 asks before any DNS lookup: DKIMError otherwise. NOW
    (seconds since the epoch) is the time x= is compared with; None skips that check."""
    if len(raw) > MAX_SIGNATURE_HEADER:
        raise DKIMError("DKIM-Signature longer than %d octets" % MAX_SIGNATURE_HEADER)
    text = raw.decode("utf-8", "replace")
    value = text.partition(":")[2]
    tags = parse_tag_list(value)
    missing = [name for name in ("v", "a", "b", "bh", "d", "h", "s") if name not in tags]
    if missing:
        raise DKIMError("required tag %s= missing (RFC 6376 6.1.1)" % missing[0])
    if tags["v"] != "1":
        raise DKIMError("v=%s is not version 1 (RFC 6376 3.5)" % tags["v"][:10])
    algorithm = tags["a"].lower()
    if algorithm == "rsa-sha1":
        raise DKIMError("rsa-sha1 signatures are not accepted (RFC 8301 3.1)")
    if algorithm not in ALGORITHMS:
        raise DKIMError("unknown algorithm a=%s" % algorithm[:30])
    header_canon, _, body_canon = tags.get("c", "simple/simple").lower().partition("/")
    body_canon = body_canon or "simple"
    if header_canon not in CANONICALIZATIONS or body_canon not in CANONICALIZATIONS:
        raise DKIMError("unknown canonicalization c=%s" % tags["c"][:30])
    domain = tags["d"].lower().rstrip(".")
    if not _is_domain(domain) or "." not in domain:
        raise DKIMError("d=%s is not a domain name" % tags["d"][:60])
    selector = tags["s"].lower()
    if not _is_domain(selector) or len(selector) + len(domain) + 12 > MAX_DOMAIN_LENGTH:
        raise DKIMError("s=%s is not a selector (RFC 6376 3.1)" % tags["s"][:60])
    names = tuple(_FWS.sub("", name).lower() for name in tags["h"].split(":"))
    if len(names) > MAX_SIGNED_FIELDS:
        raise DKIMError("h= lists more than %d fields" % MAX_SIGNED_FIELDS)
    if "" in names or not all(_FIELD_NAME.match(name.encode("utf-8")) for name in names):
        raise DKIMError("h= holds an empty or bad field name")
    if "from" not in names:
        raise DKIMError("h= does not sign From (RFC 6376 5.4)")
    body_hash, _ = _base64_value(tags["bh"], "bh")
    if len(body_hash) != hashlib.sha256().digest_size:
        raise DKIMError("bh= is not a SHA-256 hash")
    signature, b_text = _base64_value(tags["b"], "b")
    if not signature:
        raise DKIMError("b= is empty")
    identity = tags.get("i", "@" + domain)
    if "@" not in identity or not _is_subdomain(identity.rpartition("@")[2], domain):
        raise DKIMError("i=%s is not in the domain of d= (RFC 6376 3.5)" % identity[:60])
    query = tags.get("q", "dns/txt")
    if "dns/txt" not in [_FWS.sub("", method).lower() for method in query.split(":")]:
        raise DKIMError("q=%s has no dns/txt (RFC 6376 3.5)" % query[:30])
    length = _number(tags["l"], "l", MAX_BODY_LENGTH_TAG) if "l" in tags else None
    timestamp = _number(tags["t"], "t", MAX_TIMESTAMP) if "t" in tags else None
    expiration = _number(tags["x"], "x", MAX_TIMESTAMP) if "x" in tags else None
    if timestamp is not None and expiration is not None and expiration < timestamp:
        raise DKIMError("x= is before t= (RFC 6376 3.5)")
    if expiration is not None and now is not None and expiration < now:
        raise DKIMError("signature expired (x=, RFC 6376 3.5)")
    return Signature(algorithm, domain, selector, names, body_hash, signature, b_text,
                     header_canon, body_canon, identity, length, timestamp, expiration, raw)


def parse_key_record(data):
    """Parse a key record (RFC 6376 3.6.1), bytes or str, into a KeyRecord; DKIMError when
    it cannot be used. A revoked key (empty p=) parses, with key None."""
    if len(data) > MAX_KEY_RECORD:
        raise DKIMError("key record longer than %d octets" % MAX_KEY_RECORD)
    if isinstance(data, bytes):
        if not data.isascii():
            raise DKIMError("key record is not ASCII")
        data = data.decode("ascii")
    tags = parse_tag_list(data)
    if "v" in tags and (tags["v"] != "DKIM1" or not data.lstrip(" \t").startswith("v")):
        raise DKIMError("v= must be DKIM1 and come first (RFC 6376 3.6.1)")
    key_type = tags.get("k", "rsa").lower()
    hashes = tuple(h.strip().lower() for h in tags["h"].split(":")) if "h" in tags else ()
    if hashes and "sha256" not in hashes:
        raise DKIMError("key record h= does not allow sha256")
    services = tuple(s.strip().lower() for s in tags.get("s", "*").split(":"))
    if "*" not in services and "email" not in services:
        raise DKIMError("key record s= is not for email (RFC 6376 3.6.1)")
    flags = tuple(t.strip().lower() for t in tags.get("t", "").split(":") if t.strip())
    if "p" not in tags:
        raise DKIMError("key record has no p= (RFC 6376 3.6.1)")
    if not _FWS.sub("", tags["p"]):
        return KeyRecord(key_type, None, hashes, services, flags)
    der, _ = _base64_value(tags["p"], "p", MAX_KEY_RECORD)
    if key_type == "rsa":
        key = read_public_key(der)
        if not isinstance(key, RSAPublicKey):
            raise DKIMError("k=rsa but p= holds another kind of key")
    elif key_type == "ed25519":
        if len(der) != 32:                    # RFC 8463 4: the bare 32-octet public key
            raise DKIMError("k=ed25519 key is not 32 octets (RFC 8463 4)")
        key = Ed25519PublicKey(der)
    else:
        raise DKIMError("unknown key type k=%s" % key_type[:20])
    return KeyRecord(key_type, key, hashes, services, flags)


def _check_rsa_key(key):
    if key.bits < MIN_RSA_BITS:
        raise DKIMError("RSA key of %d bits, under %d (RFC 8301 3.2)" % (key.bits, MIN_RSA_BITS))
    if key.bits > MAX_RSA_BITS:
        raise DKIMError("RSA key of %d bits, over %d" % (key.bits, MAX_RSA_BITS))
    if key.e < 3 or key.e % 2 == 0 or key.e.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise DKIMError("RSA public exponent is not usable")


# --- ASN.1 DER (X.690 8, 10) and PEM (RFC 7468) ---


class DERReader:
    """Reads DER values from DATA[offset:end]; every length is checked against what is
    left, and constructed values nest at most MAX_DER_DEPTH deep."""

    def __init__(self, data, offset=0, end=None, depth=0):
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end
        self.depth = depth

    def at_end(self):
        return self.offset >= self.end

    def read(self, expected=None):
        """(tag, start, stop) of the next value; DERError if it is not EXPECTED."""
        start = self.offset
        if self.end - self.offset < 2:
            raise DERError("truncated at offset %d" % start)
        tag = self.data[self.offset]
        if tag & 0x1F == 0x1F:
            raise DERError("multi-octet tag at offset %d" % start)
        length = self.data[self.offset + 1]
        self.offset += 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4:
                raise DERError("indefinite or oversized length at offset %d" % start)
            if self.end - self.offset < count:
                raise DERError("truncated length at offset %d" % start)
            length = int.from_bytes(self.data[self.offset:self.offset + count], "big")
            self.offset += count
        if length > self.end - self.offset:
            raise DERError("length %d at offset %d runs past the end" % (length, start))
        if expected is not None and tag != expected:
            raise DERError("tag 0x%02x at offset %d, expected 0x%02x" % (tag, start, expected))
        value_start = self.offset
        self.offset += length
        return tag, value_start, self.offset

    def value(self, expected):
        _, start, stop = self.read(expected)
        return bytes(self.data[start:stop])

    def sequence(self):
        """A reader over the next SEQUENCE's contents."""
        if self.depth >= MAX_DER_DEPTH:
            raise DERError("nested deeper than %d at offset %d" % (MAX_DER_DEPTH, self.offset))
        _, start, stop = self.read(DER_SEQUENCE)
        return DERReader(self.data, start, stop, self.depth + 1)

    def integer(self):
        """A non-negative INTEGER."""
        value = self.value(DER_INTEGER)
        if not value or value[0] & 0x80:
            raise DERError("empty or negative INTEGER before offset %d" % self.offset)
        return int.from_bytes(value, "big")

    def finish(self):
        if self.offset != self.end:
            raise DERError("%d octets left over at offset %d" % (self.end - self.offset,
                                                                 self.offset))


def der_walk(data, depth=0):
    """The whole DER tree of DATA as nested lists of (tag, bytes or list); DERError on
    anything malformed. For inspection and tests; keys are read with DERReader."""
    reader = data if isinstance(data, DERReader) else DERReader(data, depth=depth)
    items = []
    while not reader.at_end():
        tag, start, stop = reader.read()
        if tag & 0x20:                        # constructed (X.690 8.1.2.5)
            if reader.depth >= MAX_DER_DEPTH:
                raise DERError("nested deeper than %d at offset %d" % (MAX_DER_DEPTH, start))
            items.append((tag, der_walk(DERReader(reader.data, start, stop, reader.depth + 1))))
        else:
            items.append((tag, bytes(reader.data[start:stop])))
    return items


def _der(tag, content):
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _der_integer(value):
    return _der(DER_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def pem_decode(text):
    """(label, DER bytes) of the first PEM block in TEXT (RFC 7468); DKIMError if none."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    match = _PEM.search(text)
    if match is None:
        raise DKIMError("no PEM block (-----BEGIN ...-----)")
    label, body = match.group(1), match.group(2)
    if "ENCRYPTED" in label or "Proc-Type:" in body:
        raise DKIMError("encrypted private keys are not supported")
    body = re.sub(r"\s+", "", body)
    if not _BASE64.match(body):
        raise DKIMError("PEM %s block is not valid base64" % label)
    return label, base64.b64decode(body)


def pem_encode(label, der):
    """DER bytes as a PEM block (RFC 7468 2), str with a final newline."""
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + PEM_LINE] for i in range(0, len(text), PEM_LINE)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def _rsa_private_from_pkcs1(reader):
    """RSAPrivateKey (RFC 8017 A.1.2) from a reader over its SEQUENCE."""
    version = reader.integer()
    if version != 0:
        raise DERError("RSAPrivateKey version %d: multi-prime keys are not supported" % version)
    n, e, d, p, q, dp, dq, qinv = (reader.integer() for _ in range(8))
    reader.finish()
    if p * q != n or p < 3 or q < 3:
        raise DKIMError("RSA private key: n is not p * q")
    return RSAPrivateKey(n, e, d, p, q, dp, dq, qinv)


def read_private_key(data):
    """An RSAPrivateKey or Ed25519PrivateKey from PEM (str or bytes) or DER bytes: PKCS#1
    RSAPrivateKey (RFC 8017 A.1.2) or PKCS#8 PrivateKeyInfo (RFC 5208 5, RFC 8410 7)."""
    if len(data) > MAX_KEY_FILE:
        raise DKIMError("key file larger than %d octets" % MAX_KEY_FILE)
    if isinstance(data, str) or b"-----BEGIN" in data:
        _, data = pem_decode(data)
    top = DERReader(data).sequence()
    tag, _, _ = DERReader(top.data, top.offset, top.end).read()
    if tag != DER_INTEGER:
        raise DERError("not a private key")
    probe = DERReader(top.data, top.offset, top.end, top.depth)
    probe.integer()
    tag, _, _ = DERReader(probe.data, probe.offset, probe.end).read()
    if tag == DER_INTEGER:                    # PKCS#1: version, then n
        return _rsa_private_from_pkcs1(top)
    version = top.integer()                   # PKCS#8: version, algorithm, key
    if version not in (0, 1):
        raise DERError("PrivateKeyInfo version %d" % version)
    algorithm = top.sequence()
    oid = algorithm.value(DER_OID)
    key = top.value(DER_OCTET_STRING)
    if oid == OID_RSA_ENCRYPTION:
        return _rsa_private_from_pkcs1(DERReader(key, depth=top.depth).sequence())
    if oid == OID_ED25519:
        inner = DERReader(key, depth=top.depth)
        seed = inner.value(DER_OCTET_STRING)          # RFC 8410 7: CurvePrivateKey
        inner.finish()
        if len(seed) != 32:
            raise DKIMError("Ed25519 private key is not 32 octets")
        return Ed25519PrivateKey(seed)
    raise DKIMError("private key of an unsupported algorithm")


def read_public_key(data):
    """An RSAPublicKey or Ed25519PublicKey from DER (or PEM): SubjectPublicKeyInfo
    (RFC 5280 4.1, RFC 8410 4) or PKCS#1 RSAPublicKey (RFC 8017 A.1.1)."""
    if isinstance(data, str) or b"-----BEGIN" in data[:64]:
        _, data = pem_decode(data)
    outer = DERReader(data)
    top = outer.sequence()
    outer.finish()
    tag, _, _ = DERReader(top.data, top.offset, top.end).read()
    if tag == DER_INTEGER:                    # RSAPublicKey
        n, e = top.integer(), top.integer()
        top.finish()
        return RSAPublicKey(n, e)
    algorithm = top.sequence()
    oid = algorithm.value(DER_OID)
    bits = top.value(DER_BIT_STRING)
    top.finish()
    if not bits or bits[0] != 0:
        raise DERError("public key BIT STRING with unused bits")
    if oid == OID_RSA_ENCRYPTION:
        inner = DERReader(bits, 1, depth=top.depth)
        key = inner.sequence()
        inner.finish()
        n, e = key.integer(), key.integer()
        key.finish()
        return RSAPublicKey(n, e)
    if oid == OID_ED25519:
        if len(bits) != 33:
            raise DKIMError("Ed25519 public key is not 32 octets")
        return Ed25519PublicKey(bits[1:])
    raise DKIMError("public key of an unsupported algorithm")


def private_key_pem(key):
    """KEY as PEM text: PKCS#1 "RSA PRIVATE KEY" for RSA (what OpenDKIM and dkimpy read),
    PKCS#8 "PRIVATE KEY" for Ed25519 (RFC 8410 7)."""
    if isinstance(key, RSAPrivateKey):
        der = _der(DER_SEQUENCE, b"".join(_der_integer(v) for v in (
            0, key.n, key.e, key.d, key.p, key.q, key.dp, key.dq, key.qinv)))
        return pem_encode("RSA PRIVATE KEY", der)
    der = _der(DER_SEQUENCE, _der_integer(0) + _der(DER_SEQUENCE, _der(DER_OID, OID_ED25519))
               + _der(DER_OCTET_STRING, _der(DER_OCTET_STRING, key.seed)))
    return pem_encode("PRIVATE KEY", der)


def public_key_der(key):
    """The public key as published in p=: SubjectPublicKeyInfo DER for RSA (as every
    signer publishes it), the bare 32 octets for Ed25519 (RFC 8463 4)."""
    if isinstance(key, (RSAPrivateKey, Ed25519PrivateKey)):
        key = key.public
    if isinstance(key, Ed25519PublicKey):
        return key.key
    rsa_key = _der(DER_SEQUENCE, _der_integer(key.n) + _der_integer(key.e))
    algorithm = _der(DER_SEQUENCE, _der(DER_OID, OID_RSA_ENCRYPTION) + _der(DER_NULL, b""))
    return _der(DER_SEQUENCE, algorithm + _der(DER_BIT_STRING, b"\x00" + rsa_key))


# --- RSA (RFC 8017) ---


@functools.lru_cache(maxsize=1)
def _small_primes(limit=2000):
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for number in range(2, int(limit ** 0.5) + 1):
        if sieve[number]:
            sieve[number * number::number] = bytearray(len(sieve[number * number::number]))
    return tuple(number for number in range(limit) if sieve[number])


def _probably_prime(n, rounds=MILLER_RABIN_ROUNDS):
    """Miller-Rabin with random bases from `secrets` (FIPS 186-4 C.3.1)."""
    if n < 2:
        return False
    for prime in _small_primes():
        if n % prime == 0:
            return n == prime
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(2 + secrets.randbelow(n - 3), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _random_prime(bits, e):
    """A prime of exactly BITS bits with its top two bits set (so p*q has 2*BITS bits) and
    gcd(e, p - 1) = 1."""
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % e and _probably_prime(candidate):
            return candidate


def generate_rsa_key(bits=DEFAULT_RSA_BITS, e=RSA_EXPONENT):
    """A new RSA private key of BITS bits (RFC 8017 3.2), e = 65537."""
    if bits < MIN_RSA_BITS or bits > MAX_RSA_BITS or bits % 2:
        raise ValueError("RSA key size must be an even number of bits from %d to %d"
                         % (MIN_RSA_BITS, MAX_RSA_BITS))
    while True:
        p, q = _random_prime(bits // 2, e), _random_prime(bits // 2, e)
        if p != q:
            break
    if p < q:
        p, q = q, p
    lam = (p - 1) * (q - 1) // _gcd(p - 1, q - 1)
    d = pow(e, -1, lam)
    return RSAPrivateKey(p * q, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _emsa_pkcs1_v15(digest, size):
    """EMSA-PKCS1-v1_5 encoding of a SHA-256 DIGEST to SIZE octets (RFC 8017 9.2)."""
    info = SHA256_DIGEST_INFO + digest
    if size < len(info) + 11:
        raise DKIMError("RSA key too short for SHA-256")
    return b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info


def rsa_sign(key, digest):
    """RSASSA-PKCS1-v1_5 signature of a SHA-256 DIGEST (RFC 8017 8.2.1), with the CRT
    (RFC 8017 5.1.2 2.b) and the result checked with the public key before it is used."""
    size = (key.n.bit_length() + 7) // 8
    m = int.from_bytes(_emsa_pkcs1_v15(digest, size), "big")
    m1 = pow(m, key.dp, key.p)
    m2 = pow(m, key.dq, key.q)
    s = m2 + (key.qinv * (m1 - m2) % key.p) * key.q
    if pow(s, key.e, key.n) != m:
        raise DKIMError("RSA private key is inconsistent")
    return s.to_bytes(size, "big")


def rsa_verify(key, digest, signature):
    """True when SIGNATURE is KEY's RSASSA-PKCS1-v1_5 signature of the SHA-256 DIGEST
    (RFC 8017 8.2.2: the expected encoding is rebuilt and compared whole)."""
    size = (key.n.bit_length() + 7) // 8
    if len(signature) > size:
        return False
    s = int.from_bytes(signature, "big")
    if s >= key.n:
        return False
    em = pow(s, key.e, key.n).to_bytes(size, "big")
    return hmac.compare_digest(em, _emsa_pkcs1_v15(digest, size))


# --- Ed25519 (RFC 8032 5.1) ---
# Points are extended homogeneous coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z.


def _ed_add(P, Q):
    """RFC 8032 5.1.4 addition; complete on this curve, so doubling and the neutral
    element need no special case (and no branch)."""
    A = (P[1] - P[0]) * (Q[1] - Q[0]) % ED_P
    B = (P[1] + P[0]) * (Q[1] + Q[0]) % ED_P
    C = 2 * P[3] * Q[3] * ED_D % ED_P
    D = 2 * P[2] * Q[2] % ED_P
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F % ED_P, G * H % ED_P, F * G % ED_P, E * H % ED_P)


def _ed_double(P):
    """RFC 8032 5.1.4 doubling."""
    A = P[0] * P[0] % ED_P
    B = P[1] * P[1] % ED_P
    C = 2 * P[2] * P[2] % ED_P
    H = A + B
    E = H - (P[0] + P[1]) * (P[0] + P[1])
    G = A - B
    F = C + G
    return (E * F % ED_P, G * H % ED_P, F * G % ED_P, E * H % ED_P)


_ED_ZERO = (0, 1, 1, 0)


def _ed_ladder(scalar, P):
    """[scalar]P by a Montgomery ladder: the same additions and doublings for every
    scalar below 2^256, the two points swapped by masks rather than branches."""
    R0, R1 = _ED_ZERO, P
    for i in range(ED_SCALAR_BITS - 1, -1, -1):
        mask = -((scalar >> i) & 1)           # 0 or -1 (all ones)
        R0, R1 = _ed_cswap(R0, R1, mask)
        R1 = _ed_add(R0, R1)
        R0 = _ed_double(R0)
        R0, R1 = _ed_cswap(R0, R1, mask)
    return R0


def _ed_cswap(P, Q, mask):
    swapped_p, swapped_q = [], []
    for a, b in zip(P, Q):
        t = mask & (a ^ b)
        swapped_p.append(a ^ t)
        swapped_q.append(b ^ t)
    return tuple(swapped_p), tuple(swapped_q)


def _ed_multiply(scalar, P):
    """[scalar]P by double-and-add: for public scalars (verification) only."""
    Q = _ED_ZERO
    while scalar:
        if scalar & 1:
            Q = _ed_add(Q, P)
        P = _ed_double(P)
        scalar >>= 1
    return Q


def _ed_encode(P):
    """RFC 8032 5.1.2: y with the low bit of x in the top bit, little-endian."""
    zinv = pow(P[2], ED_P - 2, ED_P)
    x, y = P[0] * zinv % ED_P, P[1] * zinv % ED_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _ed_decode(data):
    """RFC 8032 5.1.3; None for a string that is not a point."""
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= ED_P:
        return None
    u, v = (y * y - 1) % ED_P, (ED_D * y * y + 1) % ED_P
    x = u * pow(v, 3, ED_P) * pow(u * pow(v, 7, ED_P), (ED_P - 5) // 8, ED_P) % ED_P
    if v * x * x % ED_P == (-u) % ED_P:
        x = x * ED_SQRT_M1 % ED_P
    elif v * x * x % ED_P != u:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = ED_P - x
    return (x, y, 1, x * y % ED_P)


def _ed_base():
    x2 = (ED_BY * ED_BY - 1) * pow(ED_D * ED_BY * ED_BY + 1, ED_P - 2, ED_P) % ED_P
    x = pow(x2, (ED_P + 3) // 8, ED_P)
    if x * x % ED_P != x2:
        x = x * ED_SQRT_M1 % ED_P
    if x & 1:
        x = ED_P - x
    return (x, ED_BY, 1, x * ED_BY % ED_P)


ED_B = _ed_base()


def _ed_secret(seed):
    """RFC 8032 5.1.5: the clamped scalar and the prefix from SHA-512 of the seed."""
    digest = hashlib.sha512(seed).digest()
    a = int.from_bytes(digest[:32], "little")
    a = (a & ((1 << 254) - 8)) | (1 << 254)
    return a, digest[32:]


def ed25519_public_key(seed):
    """The 32-octet public key of a 32-octet Ed25519 private key (RFC 8032 5.1.5)."""
    return _ed_encode(_ed_ladder(_ed_secret(seed)[0], ED_B))


def ed25519_sign(seed, message, public=None):
    """The 64-octet Ed25519 signature of MESSAGE (RFC 8032 5.1.6)."""
    a, prefix = _ed_secret(seed)
    public = public or _ed_encode(_ed_ladder(a, ED_B))
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % ED_L
    R = _ed_encode(_ed_ladder(r, ED_B))
    k = int.from_bytes(hashlib.sha512(R + public + message).digest(), "little") % ED_L
    return R + ((r + k * a) % ED_L).to_bytes(32, "little")


def ed25519_verify(public, message, signature):
    """True when SIGNATURE is PUBLIC's Ed25519 signature of MESSAGE (RFC 8032 5.1.7,
    the cofactorless check [S]B = R + [k]A, S below L)."""
    if len(signature) != 64 or len(public) != 32:
        return False
    A = _ed_decode(public)
    R = _ed_decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if A is None or R is None or s >= ED_L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(),
                       "little") % ED_L
    return _ed_encode(_ed_multiply(s, ED_B)) == _ed_encode(_ed_add(R, _ed_multiply(k, A)))


def generate_ed25519_key():
    """A new Ed25519 private key (RFC 8032 5.1.5: 32 random octets)."""
    return Ed25519PrivateKey(secrets.token_bytes(32))


# --- Messages and canonicalisation (RFC 6376 3.4) ---


def to_crlf(data):
    """DATA (bytes) with every line ending made CRLF, as on the wire (RFC 5322 2.1)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def split_message(message):
    """(header section, body blocks) of MESSAGE: bytes, or an iterable of byte blocks.

    The header section (each field with its CRLF, up to and without the empty line) is
    read up to MAX_HEADER_SECTION octets (DKIMError past it); the body blocks are an
    iterator that yields the rest as it comes, never joined.
    """
    if isinstance(message, (bytes, bytearray, memoryview)):
        if isinstance(message, memoryview):
            message = message.tobytes()
        if message[:2] == b"\r\n":
            return b"", iter([memoryview(message)[2:]])
        end = message.find(b"\r\n\r\n", 0, MAX_HEADER_SECTION + 4)   # searched, not copied
        if end < 0:
            if len(message) > MAX_HEADER_SECTION:
                raise DKIMError("header section longer than %d octets" % MAX_HEADER_SECTION)
            return bytes(message), iter(())
        return bytes(message[:end + 2]), iter([memoryview(message)[end + 4:]])
    blocks = iter(message)
    header = bytearray()
    for block in blocks:
        start = max(0, len(header) - 3)       # a CRLFCRLF may straddle two blocks
        header += block
        if header[:2] == b"\r\n":
            return b"", _chain(bytes(header[2:]), blocks)
        end = header.find(b"\r\n\r\n", start)
        if end >= 0:
            return bytes(header[:end + 2]), _chain(bytes(header[end + 4:]), blocks)
        if len(header) > MAX_HEADER_SECTION:
            raise DKIMError("header section longer than %d octets" % MAX_HEADER_SECTION)
    return bytes(header), iter(())


def _chain(first, rest):
    if first:
        yield first
    yield from rest


def parse_header(header):
    """The fields of a header section (bytes) as (name, raw) pairs, raw being the whole
    field with its continuation lines and CRLF (RFC 5322 2.2); DKIMError past
    MAX_HEADER_FIELDS. A line that is no field (no colon) keeps the name "" and is never
    signed."""
    fields = []
    for line in header.split(b"\r\n")[:-1] if header.endswith(b"\r\n") else \
            header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        if len(fields) >= MAX_HEADER_FIELDS:
            raise DKIMError("more than %d header fields" % MAX_HEADER_FIELDS)
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not _FIELD_NAME.match(name):
            name = b""
        fields.append((name.decode("latin-1"), [line]))
    return [(name, b"\r\n".join(lines) + b"\r\n") for name, lines in fields]


def canonicalize_header(raw, method):
    """One header field (bytes, with its CRLF) canonicalised (RFC 6376 3.4.1, 3.4.2)."""
    if method == "simple":
        return raw
    name, _, value = raw.partition(b":")
    value = _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


class BodyHasher:
    """SHA-256 of a body canonicalised with METHOD (RFC 6376 3.4.3, 3.4.4), fed in blocks
    of any size: lines, whitespace runs and trailing empty lines are handled across block
    boundaries, and only one unfinished line (at most MAX_PENDING_LINE octets) is held.
    LENGTH (l=) stops hashing after that many canonical octets; `length` counts them all.
    """

    def __init__(self, method="simple", length=None):
        if method not in CANONICALIZATIONS:
            raise ValueError("unknown body canonicalization %r" % method)
        self.method = method
        self.limit = length
        self.hash = hashlib.sha256()
        self.length = 0                       # canonical octets, hashed or not
        self.hashed = 0
        self.pending = b""                    # the unfinished last line
        self.empty_lines = 0                  # empty lines held back: dropped at the end
        self.midline = False                  # part of the current line is already out

    def update(self, block):
        """Feed the next BLOCK of the body (bytes, bytearray or memoryview)."""
        view = memoryview(block)
        for start in range(0, len(view), BLOCK_SIZE):
            self._update(self.pending + bytes(view[start:start + BLOCK_SIZE]))

    def _update(self, data):
        cut = data.rfind(b"\r\n")
        if cut < 0:
            self.pending = data
            if len(data) > MAX_PENDING_LINE:
                self._flush_partial()
            return
        self.pending = data[cut + 2:]
        lines = data[:cut + 2]
        if self.method == "relaxed":
            # RFC 6376 3.4.4: WSP runs become one SP, then the SP at a line's end goes.
            lines = _WSP_TO_SPACE.sub(b" ", lines).replace(b" \r\n", b"\r\n")
        if self.midline:                      # the first CRLF ends the line already begun
            end = lines.find(b"\r\n") + 2
            self._emit(lines[:end])
            lines = lines[end:]
            self.midline = False
        end = len(lines)
        while end >= 2 and lines[end - 2:end] == b"\r\n" and (end == 2 or
                                                                lines[end - 4:end - 2] == b"\r\n"):
            end -= 2                          # trailing empty lines are held back
        if end:
            self._emit(b"\r\n" * self.empty_lines + lines[:end])
            self.empty_lines = 0
        self.empty_lines += (len(lines) - end) // 2

    def _flush_partial(self):
        """Hash the start of a long unfinished line, keeping back what may still change:
        a final CR (it may begin CRLF) and, for relaxed, final whitespace."""
        data = self.pending
        keep = b"\r" if data.endswith(b"\r") else b""
        data = data[:len(data) - len(keep)]
        if self.method == "relaxed":
            data = _WSP_TO_SPACE.sub(b" ", data)
            head = data.rstrip(b" ")
        else:
            head = data
        if head:
            if not self.midline:
                self._emit(b"\r\n" * self.empty_lines)
                self.empty_lines = 0
            self._emit(head)
            self.midline = True
        self.pending = data[len(head):] + keep

    def _emit(self, data):
        self.length += len(data)
        if self.limit is not None:
            data = data[:max(0, self.limit - self.hashed)]
        self.hashed += len(data)
        self.hash.update(data)

    def digest(self):
        """The body hash; the body is then complete."""
        if self.pending or self.midline:
            # RFC 6376 3.4.3, 3.4.4: a body not ending in CRLF gets one.
            self._update(self.pending + b"\r\n")
            self.pending = b""
        if self.method == "simple" and self.length == 0:
            self._emit(b"\r\n")               # RFC 6376 3.4.3: an empty body is one CRLF
        return self.hash.digest()


def _without_b_value(raw):
    """The DKIM-Signature field RAW with the value of its b= tag removed (RFC 6376 3.7)."""
    colon = raw.index(b":") + 1
    position = colon
    for part in raw[colon:].split(b";"):
        name, equals, _ = part.partition(b"=")
        if equals and _FWS.sub("", name.decode("latin-1")) == "b":
            start = position + len(name) + 1
            return raw[:start] + raw[position + len(part):]
        position += len(part) + 1
    return raw


def _header_hash_input(fields, names, signature_field, method):
    """RFC 6376 5.4.2, 3.7: the signed fields, each instance taken from the bottom up,
    then the signature field without b='s value and without its final CRLF."""
    instances = {}
    for name, raw in fields:
        instances.setdefault(name.lower(), []).append(raw)
    pieces = []
    for name in names:
        left = instances.get(name)
        if left:                              # none left: an over-signed name adds nothing
            pieces.append(canonicalize_header(left.pop(), method))
    signature = canonicalize_header(_without_b_value(signature_field), method)
    pieces.append(signature[:-2] if signature.endswith(b"\r\n") else signature)
    return b"".join(pieces)


# --- Signing ---


def sign(message, key, domain, selector, *, headers=None, canonicalization="relaxed/relaxed",
         identity=None, body_length=False, timestamp=None, expiration=None):
    """The DKIM-Signature field (bytes, ending in CRLF) to put on top of MESSAGE.

    MESSAGE is bytes with CRLF line ends, or an iterable of such blocks (header section
    first): it is read once. KEY is an RSAPrivateKey or Ed25519PrivateKey (or PEM text);
    the algorithm follows from it. HEADERS lists the fields to sign (default
    DEFAULT_SIGNED_HEADERS); each is signed as many times as it occurs, From once more so
    that no second From can be added (RFC 6376 8.15). body_length=True adds l=; timestamp
    (default now) gives t=, expiration x=. DKIMError for a message without From.
    """
    if not isinstance(key, (RSAPrivateKey, Ed25519PrivateKey)):
        key = read_private_key(key)
    if isinstance(key, RSAPrivateKey):
        _check_rsa_key(key.public)
    header_canon, _, body_canon = canonicalization.lower().partition("/")
    body_canon = body_canon or "simple"
    if header_canon not in CANONICALIZATIONS or body_canon not in CANONICALIZATIONS:
        raise ValueError("canonicalization must be simple or relaxed: %r" % canonicalization)
    domain = domain.lower().rstrip(".")
    if not _is_domain(domain) or not _is_domain(selector):
        raise ValueError("bad domain %r or selector %r" % (domain, selector))
    if identity and not _is_subdomain(identity.rpartition("@")[2], domain):
        raise ValueError("i=%s is not in the domain %s (RFC 6376 3.5)" % (identity, domain))
    header, body = split_message(message)
    fields = parse_header(header)
    counts = {}
    for name, _ in fields:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    if not counts.get("from"):
        raise DKIMError("the message has no From field (RFC 6376 5.4)")
    names = []
    for name in headers or DEFAULT_SIGNED_HEADERS:
        lower = name.lower()
        if lower not in names:
            names += [lower] * (counts.get(lower, 0) + (lower == "from"))
    hasher = BodyHasher(body_canon)
    for block in body:
        hasher.update(block)
    body_hash = base64.b64encode(hasher.digest()).decode("ascii")
    tags = [("v", "1"), ("a", key.algorithm), ("c", "%s/%s" % (header_canon, body_canon)),
            ("d", domain), ("s", selector)]
    if identity:
        tags.append(("i", identity))
    if body_length:
        tags.append(("l", str(hasher.length)))
    tags.append(("t", str(int(time.time() if timestamp is None else timestamp))))
    if expiration is not None:
        tags.append(("x", str(int(expiration))))
    tags += [("h", ":".join(names)), ("bh", body_hash)]
    field_text = _fold_tags("DKIM-Signature:", tags) + " b="
    value = complete_signature(fields, field_text.encode("ascii") + b"\r\n", key)
    b_text = base64.b64encode(value).decode("ascii")
    return (field_text + _fold_base64(b_text, len(field_text) - field_text.rfind("\n") - 1)
            + "\r\n").encode("ascii")


def complete_signature(header, unsigned_field, key):
    """The b= value (bytes) for UNSIGNED_FIELD, a DKIM-Signature field (with its CRLF)
    whose b= is empty, over HEADER: a header section (bytes) or parse_header()'s list.
    Its h= and c= tags choose the fields and the canonicalization (RFC 6376 3.7, 5.5)."""
    fields = parse_header(header) if isinstance(header, (bytes, bytearray)) else header
    tags = parse_tag_list(unsigned_field.decode("ascii").partition(":")[2])
    names = [_FWS.sub("", name).lower() for name in tags["h"].split(":")]
    method = tags.get("c", "simple").lower().partition("/")[0]
    data = _header_hash_input(fields, names, unsigned_field, method)
    digest = hashlib.sha256(data).digest()
    if isinstance(key, RSAPrivateKey):
        return rsa_sign(key, digest)
    # RFC 8463 3: Ed25519 signs the SHA-256 hash, not the data itself.
    return ed25519_sign(key.seed, digest, key.public.key)


def _fold_tags(head, tags):
    """HEAD and "tag=value;" items joined by spaces, folded (CRLF + tab) before an item
    that would pass HEADER_WIDTH; h= is folded at its colons."""
    lines = [head]
    for name, value in tags:
        item = "%s=%s;" % (name, value)
        if len(lines[-1]) + 1 + len(item) <= HEADER_WIDTH:
            lines[-1] += " " + item
            continue
        if name == "h":
            pieces = item.split(":")
            lines.append("\t" + pieces[0])
            for piece in pieces[1:]:
                if len(lines[-1]) + 1 + len(piece) > HEADER_WIDTH:
                    lines[-1] += ":"
                    lines.append("\t" + piece)
                else:
                    lines[-1] += ":" + piece
        else:
            lines.append("\t" + item)
    return "\r\n".join(lines)


def _fold_base64(text, column):
    """b='s base64 folded with CRLF + tab, which the hash ignores (RFC 6376 3.5 b=)."""
    room = max(HEADER_WIDTH - column, 8)
    pieces = [text[:room]]
    text = text[room:]
    while text:
        pieces.append(text[:HEADER_WIDTH - 1])
        text = text[HEADER_WIDTH - 1:]
    return "\r\n\t".join(pieces)


# --- Verifying ---


class DNSResolver:
    """Key and policy lookups through dnsstub: txt(name) gives each TXT record's strings
    joined (RFC 6376 3.6.2.2), as bytes, CNAMEs followed. It raises a dnsstub.DNSError whose
    `permanent` flag tells no such record (True) from a failure (False). `resolver` is a
    dnsstub.Resolver, None for dnsstub's default one; until(deadline) cuts lookups off there.
    Any object with a txt(name) method can stand in."""

    def __init__(self, resolver=None, deadline=None):
        self.resolver = resolver
        self.deadline = deadline

    def until(self, deadline):
        return DNSResolver(self.resolver, deadline)

    def txt(self, name):
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise dnsstub.DNSTimeoutError("no time left for %s" % name)
        return (self.resolver or dnsstub.default_resolver()).txt(name, raw=True, lifetime=left)


def _resolver_for(resolver, deadline):
    if resolver is None or isinstance(resolver, dnsstub.Resolver):
        resolver = DNSResolver(resolver)
    bounded = getattr(resolver, "until", None)
    return bounded(deadline) if bounded is not None else resolver


class _Lookups:
    """The TXT lookups of one message: each name asked once, at most LIMIT names, none
    after the deadline. ask() returns the records or raises _Outcome."""

    def __init__(self, resolver, deadline, limit):
        self.resolver = _resolver_for(resolver, deadline)
        self.deadline = deadline
        self.limit = limit
        self.memo = {}

    def ask(self, name):
        key = name.lower()
        if key not in self.memo:
            if len(self.memo) >= self.limit:
                self.memo[key] = _Outcome("permerror", "more than %d DNS lookups for this "
                                                       "message" % self.limit)
            elif time.monotonic() > self.deadline:
                self.memo[key] = _Outcome("temperror", "DNS time budget spent")
            else:
                try:
                    self.memo[key] = list(self.resolver.txt(name))
                except dnsstub.DNSError as exc:
                    self.memo[key] = _Outcome("permerror" if exc.permanent else "temperror",
                                              "%s: %s" % (name, exc))
        answer = self.memo[key]
        if isinstance(answer, _Outcome):
            raise answer
        return answer


class _Outcome(Exception):
    """Ends the check of one signature with RESULT."""

    def __init__(self, result, reason):
        super().__init__(reason)
        self.result = result
        self.reason = reason


def verify(message, resolver=None, *, now=None, timeout=DEFAULT_TIMEOUT,
           max_signatures=MAX_SIGNATURES):
    """Check the DKIM signatures of MESSAGE (RFC 6376 6); a list of DKIMResult, one per
    signature checked (the first MAX_SIGNATURES from the top; the rest are ignored), or
    [DKIMResult("none")] when there is none.

    MESSAGE is bytes with CRLF line ends, or an iterable of such blocks (a spooled file
    read in blocks, say); it is read once, and its body streamed only when some signature
    got as far as its key (a caller feeding blocks must not count on the body being read).
    RESOLVER: a DNSResolver, a dnsstub.Resolver or anything with
    txt(name); None asks dnsstub's default resolver. NOW is the time for x= (default the
    clock); TIMEOUT the DNS time for the whole message. Nothing in the message or in DNS
    makes this raise, but a header section past MAX_HEADER_SECTION is a permerror."""
    now = time.time() if now is None else now
    deadline = time.monotonic() + timeout
    try:
        header, body = split_message(message)
        fields = parse_header(header)
    except DKIMError as exc:
        return [DKIMResult("permerror", str(exc))]
    raws = [raw for name, raw in fields if name.lower() == "dkim-signature"][:max_signatures]
    if not raws:
        return [DKIMResult("none", "no DKIM-Signature")]
    lookups = _Lookups(resolver, deadline, MAX_KEY_LOOKUPS)
    checks = []
    for raw in raws:
        result = DKIMResult("permerror")
        checks.append((result, None, None))
        try:
            signature = parse_signature(raw, now)
            result.domain, result.selector = signature.domain, signature.selector
            result.algorithm, result.identity = signature.algorithm, signature.identity
            result.b_text, result.length = signature.b_text, signature.length
            record = _key_for(signature, lookups)
            result.testing = record.testing
        except DKIMError as exc:
            result.reason = str(exc)
            _fill_from_raw(result, raw)
            continue
        except _Outcome as outcome:
            result.result, result.reason = outcome.result, outcome.reason
            continue
        checks[-1] = (result, signature, record)
    hashers = {}
    for _, signature, _ in checks:
        if signature is not None:
            key = (signature.body_canon, signature.length)
            hashers.setdefault(key, BodyHasher(signature.body_canon, signature.length))
    if hashers:
        for block in body:
            for hasher in hashers.values():
                hasher.update(block)
        digests = {key: hasher.digest() for key, hasher in hashers.items()}
    for result, signature, record in checks:
        if signature is None:
            continue
        hasher = hashers[(signature.body_canon, signature.length)]
        result.body_length = hasher.length
        result.result, result.reason = _check(signature, record, fields, hasher,
                                              digests[(signature.body_canon, signature.length)])
        if record.testing:
            note = "key in testing mode (t=y)"
            result.reason = "%s; %s" % (result.reason, note) if result.reason else note
    return [result for result, _, _ in checks]


def _fill_from_raw(result, raw):
    """Best-effort d= and s= of a signature that did not parse, for the report."""
    try:
        tags = parse_tag_list(raw.decode("latin-1").partition(":")[2])
    except DKIMError:
        return
    for name, attribute in (("d", "domain"), ("s", "selector")):
        value = tags.get(name, "").lower()
        if _is_domain(value):
            setattr(result, attribute, value)


def _key_for(signature, lookups):
    """The usable key record for SIGNATURE (RFC 6376 6.1.2); DKIMError or _Outcome."""
    name = "%s._domainkey.%s" % (signature.selector, signature.domain)
    try:
        records = lookups.ask(name)
    except _Outcome as outcome:
        if outcome.result == "permerror" and name in outcome.reason:
            raise _Outcome("permerror", "no key record: %s" % outcome.reason) from None
        raise
    if not records:
        raise _Outcome("permerror", "no key record at %s" % name)
    try:
        record = parse_key_record(records[0])
    except DKIMError as exc:
        raise _Outcome("permerror", "key record at %s: %s" % (name, exc)) from None
    if record.key is None:
        raise _Outcome("permerror", "key revoked (empty p=) at %s" % name)
    wanted = signature.algorithm.partition("-")[0]
    if record.key_type != wanted:
        raise _Outcome("permerror", "key type k=%s does not match a=%s"
                       % (record.key_type, signature.algorithm))
    if isinstance(record.key, RSAPublicKey):
        _check_rsa_key(record.key)
    if record.strict and signature.identity.rpartition("@")[2].lower() != signature.domain:
        raise _Outcome("permerror", "key is t=s but i= is a subdomain of d= (RFC 6376 3.6.1)")
    return record


def _check(signature, record, fields, hasher, body_hash):
    """(result, reason) for a signature whose key is in hand and body hashed."""
    if signature.length is not None and signature.length > hasher.length:
        return "fail", "l=%d is longer than the body (%d octets)" % (signature.length,
                                                                      hasher.length)
    if not hmac.compare_digest(body_hash, signature.body_hash):
        return "fail", "body hash did not verify"
    data = _header_hash_input(fields, signature.signed_headers, signature.raw,
                              signature.header_canon)
    digest = hashlib.sha256(data).digest()
    if isinstance(record.key, RSAPublicKey):
        good = rsa_verify(record.key, digest, signature.signature)
    else:
        good = ed25519_verify(record.key.key, digest, signature.signature)
    if not good:
        return "fail", "signature did not verify"
    if signature.length is not None and signature.length < hasher.length:
        # RFC 6376 8.2: text after l= octets could be anything; RFC 8601 2.7.1 policy.
        return "policy", "body partly signed (l=%d of %d octets)" % (signature.length,
                                                                     hasher.length)
    return "pass", ""


# --- Key records and DNS text for publishing ---


def key_record_text(key):
    """The text of the key record for KEY (RFC 6376 3.6.1): v=DKIM1; k=...; p=..."""
    p = base64.b64encode(public_key_der(key)).decode("ascii")
    key_type = "ed25519" if isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)) else "rsa"
    return "v=DKIM1; k=%s; p=%s" % (key_type, p)


def _zone_strings(text):
    """TEXT as zone-file character-strings of at most DNS_STRING octets each."""
    pieces = [text[i:i + DNS_STRING] for i in range(0, len(text), DNS_STRING)]
    return " ".join('"%s"' % piece for piece in pieces)


def dns_records(key, domain, selector):
    """The zone-file lines to publish for KEY: the DKIM key record (split into strings
    of at most 255 octets, RFC 1035 3.3.14) and the SPF and DMARC records recommended."""
    domain = domain.lower().rstrip(".")
    text = key_record_text(key)
    return [
        "%s._domainkey.%s. IN TXT ( %s )" % (selector, domain, _zone_strings(text)),
        "%s. IN TXT %s" % (domain, _zone_strings(RECOMMENDED_SPF)),
        "_dmarc.%s. IN TXT %s" % (domain, _zone_strings(RECOMMENDED_DMARC)),
    ]


# --- Signing keys in the spool ---

_spool_keys = {}                  # path -> (mtime_ns, size, key): keys read, by path and mtime
_spool_keys_lock = threading.Lock()


def spool_key(spool, domain):
    """(selector, private key) to sign mail from DOMAIN with, or None when it has no key:
    the newest SPOOL/dkim/DOMAIN/SELECTOR.key by mtime (a key just made by keygen takes
    over at once; the older ones stay for their records to be withdrawn later). A key is
    read once per path and mtime. Raises DKIMError for a broken key, OSError when the
    folder or file cannot be read."""
    domain = (domain or "").lower().rstrip(".")
    if not _is_domain(domain):
        return None
    folder = os.path.join(spool, DKIM_SUBDIR, domain)
    candidates = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return None
    for name in names:
        selector = name[:-len(KEY_SUFFIX)]
        if name.endswith(KEY_SUFFIX) and _is_domain(selector):
            try:
                st = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            candidates.append((st.st_mtime_ns, selector, st))
    if not candidates:
        return None
    _, selector, st = max(candidates)
    path = os.path.join(folder, selector + KEY_SUFFIX)
    with _spool_keys_lock:
        cached = _spool_keys.get(path)
    if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
        return selector, cached[2]
    with open(path, "rb") as handle:
        data = handle.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise DKIMError("%s: longer than %d octets" % (path, MAX_KEY_FILE))
    try:
        key = read_private_key(data)
    except ValueError as exc:             # DKIMError, or base64 and text decoding
        raise DKIMError("%s: %s" % (path, exc)) from None
    with _spool_keys_lock:
        _spool_keys[path] = (st.st_mtime_ns, st.st_size, key)
    return selector, key


# --- DMARC (RFC 7489) ---


@functools.lru_cache(maxsize=4)
def _public_suffixes(path):
    """(rules, wildcards, exceptions) of the Public Suffix List at PATH, in A-labels."""
    rules, wildcards, exceptions = set(), set(), set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split()[0] if line.split() else ""
            if not line or line.startswith("//"):
                continue
            try:
                line = ".".join(label if label.isascii() else label.encode("idna").decode()
                                for label in line.lower().split("."))
            except UnicodeError:
                line = line.lower()
            if line.startswith("!"):
                exceptions.add(line[1:])
            elif line.startswith("*."):
                wildcards.add(line[2:])
            else:
                rules.add(line)
    return frozenset(rules), frozenset(wildcards), frozenset(exceptions)


def organizational_domain(domain, psl=None):
    """The organisational domain of DOMAIN (RFC 7489 3.2): its public suffix (the Public
    Suffix List's longest matching rule, default "*") plus one more label; DOMAIN itself
    when it is a public suffix."""
    labels = domain.lower().rstrip(".").split(".")
    rules, wildcards, exceptions = _public_suffixes(psl or PUBLIC_SUFFIX_LIST)
    suffix = 1                                # the default rule "*"
    for count in range(len(labels), 0, -1):
        name = ".".join(labels[-count:])
        if name in exceptions:
            suffix = count - 1
            break
        if name in rules:
            suffix = max(suffix, count)
            break
        if count > 1 and ".".join(labels[-count + 1:]) in wildcards:
            suffix = max(suffix, count)
            break
    if suffix >= len(labels):
        return ".".join(labels)
    return ".".join(labels[-suffix - 1:])


def aligned(domain, author_domain, mode="r", psl=None):
    """RFC 7489 3.1: strict (s) alignment is equality, relaxed (r) the same
    organisational domain."""
    domain, author_domain = domain.lower().rstrip("."), author_domain.lower().rstrip(".")
    if not domain or not author_domain:
        return False
    if mode == "s":
        return domain == author_domain
    return organizational_domain(domain, psl) == organizational_domain(author_domain, psl)


def parse_dmarc_record(text):
    """A DMARCRecord from a record's text (RFC 7489 6.3, 6.4); DKIMError when it is not a
    DMARC record or p= is missing or unknown without a rua= to fall back on (6.6.3)."""
    if isinstance(text, bytes):
        if len(text) > MAX_KEY_RECORD or not text.isascii():
            raise DKIMError("not a DMARC record (too long or not ASCII)")
        text = text.decode("ascii")
    tags = parse_tag_list(text)
    if not text.lstrip().startswith("v") or tags.get("v") != "DMARC1":
        raise DKIMError("not a DMARC1 record (RFC 7489 6.4: v=DMARC1 first)")
    policy = tags.get("p", "").lower()
    if policy not in DMARC_POLICIES:
        if "rua" not in tags:
            raise DKIMError("p=%s is not none, quarantine or reject" % policy[:20])
        policy = "none"                       # RFC 7489 6.6.3: a rua= makes it p=none
    subdomain_policy = tags.get("sp", "").lower() or None
    if subdomain_policy is not None and subdomain_policy not in DMARC_POLICIES:
        subdomain_policy = None
    modes = {}
    for name in ("adkim", "aspf"):
        value = tags.get(name, "r").lower()
        modes[name] = value if value in ("r", "s") else "r"
    pct = tags.get("pct", "100")
    pct = min(int(pct), 100) if pct.isdigit() and len(pct) <= 3 else 100
    return DMARCRecord(policy, subdomain_policy, modes["adkim"], modes["aspf"], pct,
                       tags.get("rua", ""), tags.get("ruf", ""))


def from_domain(message):
    """The RFC5322.From domain of MESSAGE (bytes or its header section), lower-cased;
    DKIMError when there is not exactly one From field with one address (RFC 7489 6.6.1)."""
    header, _ = split_message(message)
    values = [raw.partition(b":")[2] for name, raw in parse_header(header)
              if name.lower() == "from"]
    if len(values) != 1:
        raise DKIMError("%d From fields (RFC 7489 6.6.1)" % len(values))
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)           # quoted display names
    text = re.sub(r"\((?:[^()\\]|\\.)*\)", " ", text)          # comments (not nested)
    if "<" in text:
        addresses = re.findall(r"<([^<>]*)>", text)
    else:
        addresses = [part for part in text.split(",") if part.strip()]
    if len(addresses) != 1:
        raise DKIMError("From must hold one address (RFC 7489 6.6.1)")
    domain = addresses[0].strip().rpartition("@")[2].strip().lower().rstrip(".")
    if not _is_domain(domain):
        raise DKIMError("From address has no usable domain")
    return domain


def _dmarc_record(lookups, name):
    """The DMARC record at NAME, None when there is none; _Outcome for errors."""
    try:
        answers = lookups.ask(name)
    except _Outcome as outcome:
        if outcome.result == "permerror":     # NXDOMAIN, NODATA: no record
            return None
        raise
    texts = [answer for answer in answers
             if re.match(rb"v[ \t]*=[ \t]*DMARC1[ \t]*(;|\Z)", answer)]
    if not texts:
        return None
    if len(texts) > 1:
        # RFC 7489 6.6.3: several records, no policy.
        raise _Outcome("none", "%d DMARC records at %s" % (len(texts), name))
    try:
        return parse_dmarc_record(texts[0])
    except DKIMError as exc:
        raise _Outcome("permerror", "%s: %s" % (name, exc)) from None


def evaluate_dmarc(author_domain, spf_result, spf_domain, dkim_results, resolver=None, *,
                   sample=None, timeout=DEFAULT_TIMEOUT, psl=None):
    """The DMARC result for a message whose From domain is AUTHOR_DOMAIN (RFC 7489 6.6).

    SPF_RESULT is the SPF result (a string, or an spf.SPFResult) for SPF_DOMAIN, the MAIL
    FROM (or HELO) domain; DKIM_RESULTS what verify() returned. pass needs an aligned SPF
    pass or an aligned DKIM pass (policy results, l= covering part of the body, do not
    count). The policy is p=, or sp= when the record was found at the organisational
    domain above AUTHOR_DOMAIN; on a fail, pct= samples it (6.6.4): SAMPLE (0-99, default
    random) at or past pct applies the next milder policy instead.
    """
    author_domain = (author_domain or "").lower().rstrip(".")
    outcome = DMARCResult("none", author_domain)
    if not _is_domain(author_domain):
        outcome.reason = "no usable From domain"
        return outcome
    spf_result = getattr(spf_result, "result", spf_result) or "none"
    organization = organizational_domain(author_domain, psl)
    outcome.organizational_domain = organization
    lookups = _Lookups(resolver, time.monotonic() + timeout, MAX_DMARC_LOOKUPS)
    try:
        record, where = _dmarc_record(lookups, "_dmarc." + author_domain), author_domain
        if record is None and organization != author_domain:
            record, where = _dmarc_record(lookups, "_dmarc." + organization), organization
    except _Outcome as stop:
        outcome.result, outcome.reason = stop.result, stop.reason
        return outcome
    if record is None:
        outcome.reason = "no DMARC record for %s" % author_domain
        return outcome
    outcome.record_domain = where
    outcome.pct = record.pct
    if where != author_domain and record.subdomain_policy:
        outcome.policy = record.subdomain_policy        # RFC 7489 6.3 sp=
    else:
        outcome.policy = record.policy
    outcome.spf_aligned = (spf_result == "pass"
                           and aligned(spf_domain or "", author_domain, record.aspf, psl))
    for result in dkim_results or ():
        if result.result == "pass" and aligned(result.domain, author_domain, record.adkim, psl):
            outcome.dkim_aligned = True
            outcome.dkim_domain = result.domain
            break
    if outcome.spf_aligned or outcome.dkim_aligned:
        outcome.result = "pass"
        outcome.reason = "aligned %s pass" % ("DKIM" if outcome.dkim_aligned else "SPF")
        return outcome
    outcome.result = "fail"
    outcome.reason = "no aligned SPF or DKIM pass"
    outcome.disposition = outcome.policy
    if record.pct < 100:
        drawn = random.randrange(100) if sample is None else sample
        if drawn >= record.pct:               # RFC 7489 6.6.4: the next milder policy
            milder = {"reject": "quarantine", "quarantine": "none"}
            outcome.disposition = milder.get(outcome.policy, "none")
            outcome.reason += "; pct=%d sampled out" % record.pct
    return outcome


# --- Authentication-Results (RFC 8601) ---


def _clip(text, limit=MAX_HEADER_VALUE):
    """Text from a message or from DNS made safe for a header: printable, bounded."""
    text = "".join(char for char in str(text) if char.isprintable())
    return text if len(text) <= limit else text[:limit] + "..."


def _comment(text):
    return "(%s)" % re.sub(r"([()\\])", r"\\\1", _clip(text))


def authentication_results_fragments(dkim_results, dmarc_result=None):
    """The resinfo parts for DKIM (RFC 8601 2.7.1, RFC 6008) and DMARC (RFC 7489 11.2):
    "dkim=pass header.d=D header.s=S header.b=B", "dmarc=pass header.from=D
    policy.dmarc=P"; a reason for a result other than pass goes in a comment."""
    parts = []
    for result in dkim_results or ():
        items = ["dkim=" + result.result]
        if result.reason and result.result != "pass":
            items.append(_comment(result.reason))
        if result.domain:
            items.append("header.d=" + spf.authres_value(result.domain, address=True))
        if result.selector:
            items.append("header.s=" + spf.authres_value(result.selector, address=True))
        if result.b_text:
            items.append("header.b=" + spf.authres_value(result.b_text[:HEADER_B_LENGTH],
                                                         address=True))
        parts.append(" ".join(items))
    if dmarc_result is not None:
        items = ["dmarc=" + dmarc_result.result]
        if dmarc_result.result == "fail" and dmarc_result.disposition != dmarc_result.policy:
            items.append(_comment("pct sampled: %s applied" % dmarc_result.disposition))
        elif dmarc_result.reason and dmarc_result.result not in ("pass", "fail"):
            items.append(_comment(dmarc_result.reason))
        items.append("header.from=" + spf.authres_value(dmarc_result.from_domain or "unknown",
                                                           address=True))
        if dmarc_result.record_domain:
            items.append("policy.dmarc=" + dmarc_result.policy)
        parts.append(" ".join(items))
    return parts


def authentication_results_header(hostname, fragments):
    """An Authentication-Results field (RFC 8601 2.2) of FRAGMENTS (spf=, dkim=, dmarc=
    parts) with HOSTNAME as authserv-id; folded with CRLF + tab, no final CRLF."""
    if not fragments:
        fragments = ["none"]                  # RFC 8601 2.2: no authentication done
    return "Authentication-Results: %s;\r\n\t%s" % (spf.authres_value(hostname),
                                                    ";\r\n\t".join(fragments))


# --- Command line ---


def _argument_parser():
    parser = dnsstub.usage_parser(prog="dkim.py",
                    description="DKIM keys, signing and verifying (RFC 6376, 8463) and DMARC "
                                "checks (RFC 7489).",
                    epilog="Exit status: 0 success (verify: every signature passed; dmarc: "
                           "pass), 1 otherwise, 64 bad command line.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=type(parser))
    commands.required = True
    spool_help = "the spool whose dkim/ folder holds the keys (default: $%s, else %s)" % (
        plumbing.SPOOL_ENV, plumbing.LOCAL_SPOOL)

    keygen = commands.add_parser("keygen", help="make a key pair and print the DNS records",
                                 description="Write a new private key to SPOOL/dkim/DOMAIN/"
                                             "SELECTOR.key and print the records to publish.")
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=)")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                        help="key type (default rsa)")
    keygen.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS, metavar="N",
                        help="RSA key size (default %d)" % DEFAULT_RSA_BITS)
    keygen.add_argument("--spool", default="", metavar="DIR", help=spool_help)
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")

    signer = commands.add_parser("sign", help="sign the message on stdin",
                                 description="Print the message read from stdin with a "
                                             "DKIM-Signature on top.")
    signer.add_argument("--domain", required=True, help="the signing domain (d=)")
    signer.add_argument("--selector", required=True, help="the selector (s=)")
    signer.add_argument("--key", metavar="FILE", help="the private key (PEM); default "
                        "SPOOL/dkim/DOMAIN/SELECTOR.key")
    signer.add_argument("--spool", default="", metavar="DIR", help=spool_help)
    signer.add_argument("--canonicalization", default="relaxed/relaxed", metavar="H/B",
                        help="header/body canonicalization (default relaxed/relaxed)")

    verifier = commands.add_parser("verify", help="verify the message on stdin",
                                   description="Print one line per DKIM signature of the "
                                               "message read from stdin.")
    dmarc = commands.add_parser("dmarc", help="evaluate DMARC for a From domain",
                                description="Print the DMARC result for a From domain given "
                                            "the SPF and DKIM results.")
    dmarc.add_argument("--from", dest="from_domain", required=True, metavar="DOMAIN",
                       help="the RFC5322.From domain")
    dmarc.add_argument("--spf-result", default="none", metavar="RESULT",
                       help="the SPF result: pass, fail, ... (default none)")
    dmarc.add_argument("--spf-domain", default="", metavar="DOMAIN",
                       help="the domain SPF checked (MAIL FROM or HELO)")
    dmarc.add_argument("--dkim-domain", action="append", default=[], metavar="DOMAIN",
                       help="d= of a passing DKIM signature; may be repeated")
    for sub in (verifier, dmarc):
        sub.add_argument("--dns", action="append", metavar="HOST[:PORT]",
                         help="nameserver to ask instead of those in /etc/resolv.conf; "
                              "may be repeated")
        sub.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                         help="seconds of DNS per message (default %g)" % DEFAULT_TIMEOUT)
    return parser


def _key_path(spool, domain, selector):
    domain = domain.lower().rstrip(".")
    if not _is_domain(domain) or not _is_domain(selector):
        raise ValueError("bad domain %r or selector %r" % (domain, selector))
    return os.path.join(spool, DKIM_SUBDIR, domain, selector + ".key")


def _keygen(args):
    spool = plumbing.find_spool(args.spool)
    plumbing.become_spool_owner(spool)
    path = _key_path(spool, args.domain, args.selector)
    if os.path.exists(path) and not args.force:
        raise ValueError("%s exists (give --force to replace it)" % path)
    key = generate_ed25519_key() if args.algorithm == "ed25519" else generate_rsa_key(args.bits)
    for folder in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
        os.makedirs(folder, mode=KEY_DIR_MODE, exist_ok=True)
        os.chmod(folder, KEY_DIR_MODE)
    temporary = "%s.tmp%d" % (path, os.getpid())
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(private_key_pem(key))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    print("; private key written to %s" % path)
    print("; publish these records in the zone of %s:" % args.domain.lower().rstrip("."))
    for line in dns_records(key, args.domain, args.selector):
        print(line)
    return 0


def _read_stdin(limit):
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise ValueError("message larger than %d octets" % limit)
    return data


def _sign(args):
    if args.key:
        path = args.key
    else:
        path = _key_path(plumbing.find_spool(args.spool), args.domain, args.selector)
    with open(path, "rb") as handle:
        key = read_private_key(handle.read(MAX_KEY_FILE + 1))
    data = _read_stdin(MAX_CLI_MESSAGE)
    crlf = b"\n" not in data.replace(b"\r\n", b"")
    message = data if crlf else to_crlf(data)
    header = sign(message, key, args.domain, args.selector,
                  canonicalization=args.canonicalization)
    sys.stdout.buffer.write((header if crlf else header.replace(b"\r\n", b"\n")) + data)
    sys.stdout.flush()
    return 0


def _stdin_blocks():
    """stdin in blocks, bare LF line ends made CRLF (a CR at a block's end is held)."""
    held = b""
    while True:
        block = sys.stdin.buffer.read(BLOCK_SIZE)
        if not block:
            if held:
                yield held
            return
        block = held + block
        held = b"\r" if block.endswith(b"\r") else b""
        yield to_crlf(block[:len(block) - len(held)])


def _resolver(args):
    if not 0 < args.timeout <= 3600:
        raise ValueError("--timeout must be between 0 and 3600 seconds")
    return DNSResolver(dnsstub.Resolver(args.dns, timeout=min(args.timeout, 5.0),
                                        lifetime=args.timeout))


def _verify(args):
    resolver = _resolver(args)
    results = verify(_stdin_blocks(), resolver, timeout=args.timeout)
    for result in results:
        line = result.result
        if result.domain:
            line += " d=%s s=%s a=%s" % (result.domain, result.selector,
                                         result.algorithm or "?")
        if result.reason:
            line += " (%s)" % _clip(result.reason)
        print(line)
    return EXIT_PASS if all(r.result == "pass" for r in results) else EXIT_NOT_PASS


def _dmarc(args):
    resolver = _resolver(args)
    dkim_results = [DKIMResult("pass", domain=domain.lower()) for domain in args.dkim_domain]
    result = evaluate_dmarc(args.from_domain, args.spf_result, args.spf_domain, dkim_results,
                            resolver, timeout=args.timeout)
    line = "%s policy=%s disposition=%s" % (result.result, result.policy, result.disposition)
    if result.record_domain:
        line += " record=_dmarc.%s" % result.record_domain
    if result.reason:
        line += " (%s)" % _clip(result.reason)
    print(line)
    return EXIT_PASS if result.result == "pass" else EXIT_NOT_PASS


def main(argv=None):
    """Command line: keygen, sign, verify or dmarc; the exit status tells the outcome."""
    parser = _argument_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help (0) or a usage error (EXIT_USAGE)
        return exc.code
    handler = {"keygen": _keygen, "sign": _sign, "verify": _verify, "dmarc": _dmarc}
    try:
        return handler[args.command](args)
    except BrokenPipeError:
        return plumbing.reader_went_away()
    except (ValueError, OSError) as exc:
        sys.stderr.write("dkim: %s\n" % exc)
        return EXIT_NOT_PASS
    except KeyboardInterrupt:
        sys.stderr.write("dkim: interrupted\n")
        return EXIT_NOT_PASS


if __name__ == "__main__":
    sys.exit(main())
