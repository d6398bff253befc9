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
from dataclasses import dataclass

import yaml

import dnsmx

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
            raise dnsmx.CNAMELoopError("CNAME chain from %s loops" % name, name)
        if key in self.timeouts:
            raise dnsmx.DNSTimeoutError("no answer for %s %s (TIMEOUT)" % (name, rtype), name)
        if key in self.names:
            raise dnsmx.NoDataError("%s has no %s record (NODATA)" % (name, rtype), name)
        raise dnsmx.NXDomainError("%s does not exist (NXDOMAIN)" % name, name)

    def txt(self, name):
        return self.answer(name, "TXT")

    def a(self, name):
        return self.answer(name, "A")

    def aaaa(self, name):
        return self.answer(name, "AAAA")

    def mx(self, name):
        return [host for _, host in sorted(self.answer(name, "MX"), key=lambda mx: mx[0])]

    def ptr(self, ip):
        return self.answer(dnsmx.reverse_name(ip), "PTR")
