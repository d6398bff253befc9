"""Test support for spf.py: the RFC 7208 test suite's loader and an in-memory resolver.

The suite (tests/data/spf/rfc7208-tests.yml, with its licence beside it) is a YAML stream of
scenarios, each with `zonedata` (the DNS the scenario assumes) and `tests`. It is read with
PyYAML (requirements-dev.txt; tests only). ZoneResolver serves a scenario's zonedata through
spf's resolver interface, following the conventions of the suite's reference driver:

- an SPF (type 99) record also stands as a TXT record, unless the name has any TXT entry of
  its own ("TXT: NONE" says "no TXT records here");
- "TIMEOUT" at a name makes every question about it that has no record time out;
- a list value of TXT/SPF is one record of several strings, joined without separator;
- names are case-insensitive; CNAMEs are followed, and a CNAME loop is a temporary error.
"""

import os
import socket
import struct
import threading
from dataclasses import dataclass

import yaml

import dnsstub
from dnsmasq_server import udp_and_tcp_sockets

SUITE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "data", "spf", "rfc7208-tests.yml")
MAX_CNAME_CHAIN = 8


@dataclass
class SuiteCase:
    scenario: str
    name: str
    helo: str
    host: str
    mailfrom: str
    results: tuple
    explanation: object          # None when the test does not check it
    spec: str
    zonedata: dict

    @property
    def id(self):
        return "%s/%s" % (self.scenario.lower().replace(" ", "-"), self.name)


def load_suite(path=SUITE_PATH):
    """Every test of every scenario, in file order."""
    with open(path, "rb") as handle:
        scenarios = [doc for doc in yaml.safe_load_all(handle) if doc]
    cases = []
    for scenario in scenarios:
        for name, test in scenario["tests"].items():
            result = test["result"]
            cases.append(SuiteCase(
                scenario["description"], name, str(test["helo"]), str(test["host"]),
                str(test["mailfrom"]),
                tuple(result) if isinstance(result, list) else (result,),
                test.get("explanation"), str(test.get("spec", "")),
                scenario.get("zonedata") or {}))
    return cases


def _octets(text):
    """YAML "\\xEF" escapes arrive as code points below 256: give back those octets."""
    text = str(text)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _key(name):
    return name.lower().rstrip(".")


class ZoneResolver:
    """spf's resolver interface over a zone held in memory. `queries` logs each question
    as (TYPE, name), so tests can count lookups."""

    def __init__(self, zonedata=None):
        self.records = {}        # (name, TYPE) -> list of answers
        self.names = set()       # names that exist
        self.timeouts = set()    # names that answer nothing in time
        self.queries = []
        for name, entries in (zonedata or {}).items():
            self.add_zone_entries(name, entries)

    def add(self, name, rtype, value):
        self.names.add(_key(name))
        self.records.setdefault((_key(name), rtype), []).append(value)

    def add_zone_entries(self, name, entries):
        key = _key(name)
        self.names.add(key)
        spf_texts = []
        has_txt = False
        for entry in entries:
            if entry == "TIMEOUT":
                self.timeouts.add(key)
                continue
            for rtype, value in entry.items():
                if rtype in ("TXT", "SPF"):
                    has_txt = has_txt or rtype == "TXT"
                    if value == "NONE":
                        continue
                    strings = value if isinstance(value, list) else [value]
                    text = b"".join(_octets(string) for string in strings)
                    if rtype == "TXT":
                        self.add(key, "TXT", text)
                    else:
                        spf_texts.append(text)
                elif rtype == "MX":
                    self.add(key, "MX", (int(value[0]), str(value[1]).rstrip(".")))
                elif rtype in ("A", "AAAA", "PTR", "CNAME"):
                    self.add(key, rtype, str(value).rstrip("."))
        if not has_txt:
            for text in spf_texts:
                self.add(key, "TXT", text)

    def answer(self, name, rtype):
        self.queries.append((rtype, name))
        key = _key(name)
        for _ in range(MAX_CNAME_CHAIN):
            if (key, rtype) in self.records:
                return list(self.records[(key, rtype)])
            cname = self.records.get((key, "CNAME"))
            if not cname:
                break
            key = _key(cname[0])
        else:
            raise dnsstub.CNAMELoopError("CNAME chain from %s loops" % name, name)
        if key in self.timeouts:
            raise dnsstub.DNSTimeoutError("no answer for %s %s (TIMEOUT)" % (name, rtype), name)
        if key in self.names:
            raise dnsstub.NoDataError("%s has no %s record (NODATA)" % (name, rtype), name)
        raise dnsstub.NXDomainError("%s does not exist (NXDOMAIN)" % name, name)

    def txt(self, name):
        return self.answer(name, "TXT")

    def a(self, name):
        return self.answer(name, "A")

    def aaaa(self, name):
        return self.answer(name, "AAAA")

    def mx(self, name):
        return [host for _, host in sorted(self.answer(name, "MX"), key=lambda mx: mx[0])]

    def ptr(self, ip):
        return self.answer(dnsstub.reverse_name(ip), "PTR")


# --- The same zones over the wire: a nameserver on loopback for the real dnsstub path ---

TYPE_CODES = {"A": 1, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}
TYPE_NAMES = {code: name for name, code in TYPE_CODES.items()}
MAX_UDP = 1232                   # what dnsstub advertises in EDNS (RFC 6891)


def _wire_name(name):
    """A zone name as wire labels; each character is one octet (names are ASCII here)."""
    labels = [label for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes((len(label),)) + _octets(label) for label in labels) + b"\0"


def _rdata(rtype, value):
    if rtype == "A":
        return socket.inet_aton(value)
    if rtype == "AAAA":
        return socket.inet_pton(socket.AF_INET6, value)
    if rtype == "MX":
        return struct.pack("!H", value[0]) + _wire_name(value[1])
    if rtype == "TXT":
        chunks = [value[n:n + 255] for n in range(0, len(value), 255)] or [b""]
        return b"".join(bytes((len(chunk),)) + chunk for chunk in chunks)
    return _wire_name(value)                         # PTR, CNAME


class ZoneServer:
    """A nameserver on 127.0.0.1 (UDP and TCP on one port) that answers from a
    ZoneResolver, so a zone reaches spf through dnsstub and real packets. A CNAME chain is
    answered as the records at its end, owned by the name asked; a CNAME loop is SERVFAIL;
    "TIMEOUT" names get no answer. Set `zone` to switch zones between tests."""

    def __init__(self, zone=None):
        self.zone = zone or ZoneResolver()
        self.udp, self.tcp = udp_and_tcp_sockets()
        self.port = self.udp.getsockname()[1]
        self.tcp.listen(16)
        self.udp.settimeout(0.05)
        self.tcp.settimeout(0.05)
        self.running = True
        self.threads = [threading.Thread(target=self.serve_udp, daemon=True),
                        threading.Thread(target=self.serve_tcp, daemon=True)]
        for thread in self.threads:
            thread.start()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def reply(self, query, udp=True):
        """The reply packet to a query, or None for no answer (a timeout). Over UDP a reply
        larger than dnsstub's EDNS payload is cut to its question with TC set (RFC 7766)."""
        end = 12
        labels = []
        while end < len(query) and query[end]:
            labels.append(query[end + 1:end + 1 + query[end]].decode("latin-1"))
            end += query[end] + 1
        question = query[12:end + 5]
        qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
        flags, answers = 0x8180, []                 # QR RD RA, NOERROR
        try:
            rtype = TYPE_NAMES[qtype]
            answers = self.zone.answer(".".join(labels), rtype)
        except dnsstub.DNSTimeoutError:
            return None
        except dnsstub.CNAMELoopError:
            flags |= 2                               # SERVFAIL
        except dnsstub.NXDomainError:
            flags |= 3
        except (dnsstub.NoDataError, KeyError):
            pass
        records = []
        for value in answers:
            try:
                rdata = _rdata(rtype, value)
            except (OSError, ValueError):
                continue                             # not an address of that family
            records.append(b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 60, len(rdata)) + rdata)
        packet = (query[:2] + struct.pack("!5H", flags, 1, len(records), 0, 0) + question
                  + b"".join(records))
        if udp and len(packet) > MAX_UDP:
            return query[:2] + struct.pack("!5H", flags | 0x0200, 1, 0, 0, 0) + question
        return packet

    def serve_udp(self):
        while self.running:
            try:
                query, client = self.udp.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            packet = self.reply(query)
            if packet is not None:
                self.udp.sendto(packet, client)

    def serve_tcp(self):
        while self.running:
            try:
                connection, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    length = struct.unpack("!H", connection.recv(2))[0]
                    packet = self.reply(connection.recv(length), udp=False)
                    if packet is not None:
                        connection.sendall(struct.pack("!H", len(packet)) + packet)
                except (OSError, struct.error):
                    continue

    def close(self):
        self.running = False
        for thread in self.threads:
            thread.join(2)
        self.udp.close()
        self.tcp.close()
