"""Tests for dnsstub.py, the resolver, and dnsmx.py, its command line.

Real answers come from dnsmasq started on 127.0.0.1 (tests/dnsmasq_server.py) or from its
replies captured in tests/fixtures/dns (tests/capture_dns_fixtures.py); small scripted
servers play only the peers that misbehave. Servers are always given explicitly: the system
resolver is never asked.
"""

import copy
import json
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnsmx
import dnsstub
from capture_dns_fixtures import BIG_TXT, ZONE
from support import SLACK, require_tool, wait_for
from dnsmasq_server import start_dnsmasq, udp_and_tcp_sockets

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures", "dns")
with open(os.path.join(FIXTURES, "manifest.json")) as _handle:
    MANIFEST = json.load(_handle)

FAST = dict(timeout=2.0, attempts=1)      # live dnsmasq answers in microseconds


def fixture_bytes(stem):
    with open(os.path.join(FIXTURES, stem + ".bin"), "rb") as handle:
        return handle.read()


# --- Servers ---


@pytest.fixture(scope="module")
def dns_local():
    """dnsmasq answering like a recursive server: whole CNAME chains, additional section."""
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def dns_auth():
    """dnsmasq as the authoritative server of "test": SOA in negative answers, one CNAME
    link per answer, no additional section."""
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE, auth_zone="test") as server:
        yield server


@pytest.fixture
def resolver(dns_local):
    return dnsstub.Resolver([dns_local.address], **FAST)


@pytest.fixture
def auth_resolver(dns_auth):
    return dnsstub.Resolver([dns_auth.address], **FAST)


class ScriptedServer:
    """A misbehaving DNS peer on 127.0.0.1: `udp_reply(query)` returns a list of
    (socket, payload) with socket "right" (the port asked) or "wrong" (another port);
    `tcp_reply(query)` returns raw stream bytes, or None to stall."""

    def __init__(self, udp_reply=None, tcp_reply=None):
        self.udp_reply = udp_reply
        self.tcp_reply = tcp_reply
        self.queries = []
        self.clients = []
        self.tcp_queries = []
        self._stop = threading.Event()
        self.udp, self.tcp = udp_and_tcp_sockets()
        self.port = self.udp.getsockname()[1]
        self.wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wrong.bind(("127.0.0.1", 0))
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True)]
        if tcp_reply is None:
            self.tcp.close()
            self.tcp = None
        else:
            self.tcp.listen(8)
            self.threads.append(threading.Thread(target=self._serve_tcp, daemon=True))
        for thread in self.threads:
            thread.start()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def _serve_udp(self):
        self.udp.settimeout(0.02)
        while not self._stop.is_set():
            try:
                query, client = self.udp.recvfrom(65535)
            except socket.timeout:
                continue
            self.queries.append(query)
            self.clients.append(client)
            for which, payload in (self.udp_reply(query) if self.udp_reply else ()):
                sock = self.udp if which == "right" else self.wrong
                sock.sendto(payload, client)

    def _serve_tcp(self):
        self.tcp.settimeout(0.02)
        held = []
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            conn.settimeout(1)
            try:
                length = struct.unpack("!H", conn.recv(2))[0]
                query = conn.recv(length)
            except (OSError, struct.error):
                conn.close()
                continue
            self.tcp_queries.append(query)
            stream = self.tcp_reply(query)
            if stream is None:
                held.append(conn)            # stall: keep it open, say nothing
                continue
            conn.sendall(stream)
            conn.close()
        for conn in held:
            conn.close()

    def close(self):
        self._stop.set()
        for thread in self.threads:
            thread.join(2)
        for sock in (self.udp, self.wrong, self.tcp):
            if sock is not None:
                sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def query_id(query):
    return struct.unpack("!H", query[:2])[0]


def question_of(query):
    """The question section of a query (name, type, class), as bytes."""
    end = 12
    while query[end]:
        end += 1 + query[end]
    return query[12:end + 5]


def with_id(reply, qid):
    return struct.pack("!H", qid) + reply[2:]


def wire_name(name):
    return b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")
                    if label) + b"\x00"


def make_reply(query, answers=(), rcode=0, flags=0x8180, qid=None):
    """A reply written out field by field: the query's question, uncompressed answers
    given as (name, type, ttl, rdata)."""
    body = b"".join(wire_name(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata
                    for name, rtype, ttl, rdata in answers)
    header = struct.pack("!6H", query_id(query) if qid is None else qid, flags | rcode, 1,
                         len(answers), 0, 0)
    return header + question_of(query) + body


def unused_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Data types ---


def test_data_types_are_frozen_values_compared_by_their_fields():
    mx = dnsstub.MX(10, "mx.test")
    assert mx == dnsstub.MX(10, "mx.test") and hash(mx) == hash(dnsstub.MX(10, "mx.test"))
    assert mx != dnsstub.MX(20, "mx.test") and mx != (10, "mx.test")
    assert repr(mx) == "MX(preference=10, exchange='mx.test')"
    with pytest.raises(AttributeError):
        mx.preference = 20
    assert pickle.loads(pickle.dumps(mx)) == mx and copy.deepcopy(mx) == mx
    answer = dnsstub.Answer("a.test", dnsstub.TYPE_A, "a.test", ())
    assert (answer.cnames, answer.additional, answer.ttl, answer.from_cache) == ((), (), 0, False)
    assert dnsstub.MXHost("mx.test", 10, ()).implicit is False


def test_nameservers_compare_by_host_and_port_and_resolv_conf_is_mutable():
    server = dnsstub.parse_server("127.0.0.1:5353")
    assert server.sockaddr == ("127.0.0.1", 5353)
    assert server == dnsstub.Nameserver("127.0.0.1", 5353)          # family, sockaddr left out
    assert hash(server) == hash(dnsstub.Nameserver("127.0.0.1", 5353))
    assert repr(server) == "Nameserver(host='127.0.0.1', port=5353)"
    conf = dnsstub.ResolvConf([server])
    conf.rotate = True
    assert conf == dnsstub.ResolvConf([server], rotate=True)


# --- Names ---


def test_normalize_name_drops_trailing_dot_and_case():
    assert dnsstub.normalize_name("Example.TEST.") == "example.test"
    assert dnsstub.normalize_name(".") == ""
    assert dnsstub.normalize_name("_dmarc.Example.test") == "_dmarc.example.test"


def test_non_ascii_name_is_idna_encoded():
    assert dnsstub.normalize_name("Bücher.test") == "xn--bcher-kva.test"
    assert dnsstub.build_query("bücher.test", "MX", 1)[1] == \
        dnsstub.build_query("xn--bcher-kva.test", "MX", 1)[1]


@pytest.mark.parametrize("name, reason", [
    ("a" * 64 + ".test", "label longer than 63"),
    (".".join(["abcdefghi"] * 26), "longer than 255"),
    ("a..test", "empty label"),
    ("name.ends.in\\", "lone backslash"),
    ("xn--.\u00fc" + "x" * 70 + ".test", "IDNA"),
])
def test_bad_names_are_refused_before_sending(name, reason):
    def nxdomain(query):
        return [("right", make_reply(query, rcode=dnsstub.NXDOMAIN))]

    with ScriptedServer(nxdomain) as server:
        resolver = dnsstub.Resolver([server.address], timeout=2, attempts=1)
        with pytest.raises(dnsstub.DNSNameError, match=reason) as caught:
            resolver.resolve(name, "A")
        # A name that is sent, after: once it is answered, whatever was sent before it has
        # been read too.
        with pytest.raises(dnsstub.NXDomainError):
            resolver.resolve("after.test", "A")
        assert [question_of(query) for query in server.queries] == [wire_name("after.test")
                                                                     + b"\x00\x01\x00\x01"]
    assert caught.value.permanent and isinstance(caught.value, ValueError)


def test_name_of_exactly_255_octets_is_accepted():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])          # 64*3 + 62 + 1 = 255 on the wire
    assert len(dnsstub.build_query(name, "A", 1)[1]) == 12 + 255 + 4 + 11


def test_escaped_names_round_trip():
    assert dnsstub.normalize_name("a\\.b.test") == "a\\.b.test"
    assert dnsstub.normalize_name("\\065bc.test") == "abc.test"
    assert dnsstub.build_query("a\\.b.test", "A", 1)[1][12:22] == b"\x03a.b\x04test\x00"
    for name in ("a;b.test", "A\\059B.test", "x(y).test", "a\\.b.test"):
        # The key of a name must be what the parser makes of the same name on the wire.
        parsed = dnsstub.parse_message(dnsstub.build_query(name, "A", 1)[1]).questions[0][0]
        assert dnsstub.normalize_name(name) == parsed.lower()


def test_spaces_and_control_octets_are_sent_as_those_octets():
    # RFC 2181 11: any octet may stand in a label; an SPF macro can put a space there.
    assert dnsstub.normalize_name("Macro%Percent  Space.test") == "macro%percent\\032\\032space.test"
    assert dnsstub.normalize_name("a\tb\x7f.test") == "a\\009b\\127.test"
    with ScriptedServer(lambda query: []) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.2, attempts=1)
        with pytest.raises(dnsstub.DNSTimeoutError):
            resolver.resolve("a b\x01c.test", "TXT")
        assert b"\x05a b\x01c\x04test\x00" in server.queries[0]
    parsed = dnsstub.parse_message(dnsstub.build_query("A B.test", "A", 1)[1]).questions[0][0]
    assert parsed.lower() == dnsstub.normalize_name("A B.test")


def test_reverse_names_for_ipv4_and_ipv6():
    assert dnsstub.reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert dnsstub.reverse_name("2001:db8::1") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa")
    with pytest.raises(dnsstub.DNSNameError):
        dnsstub.reverse_name("example.test")


def test_record_types_by_name_and_number():
    assert dnsstub.type_code("mx") == 15 and dnsstub.type_code("TYPE65280") == 65280
    assert dnsstub.type_name(28) == "AAAA" and dnsstub.type_name(99) == "TYPE99"
    with pytest.raises(ValueError):
        dnsstub.type_code("BOGUS")


# --- Wire format: queries ---


def test_query_has_random_id_rd_one_question_and_edns_1232():
    ids = set()
    for _ in range(32):
        qid, packet = dnsstub.build_query("example.test", "MX")
        ids.add(qid)
    message = dnsstub.parse_message(packet)
    assert len(ids) > 16
    assert message.flags == dnsstub.FLAG_RD
    assert message.questions == (("example.test", 15, 1),)
    assert message.opt.rclass == 1232 and message.opt.ttl == 0 and message.opt.name == ""


def test_query_is_understood_by_dnsmasq(dns_local):
    qid, packet = dnsstub.build_query("mx2.example.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(packet, (dns_local.host, dns_local.port))
        reply = dnsstub.parse_message(sock.recv(4096))
    assert reply.id == qid and reply.answers[0].data == "127.0.0.12"


# --- Wire format: parsing captured replies ---


@pytest.mark.parametrize("stem", sorted(MANIFEST))
def test_captured_reply_parses_with_its_question(stem):
    entry = MANIFEST[stem]
    message = dnsstub.parse_message(fixture_bytes(stem))
    assert message.id == entry["id"]
    assert message.flags & dnsstub.FLAG_QR
    assert message.questions == ((entry["name"], entry["type"], 1),)
    assert (message.opt is not None) == entry["edns"] or message.rcode == dnsstub.REFUSED


def test_parse_mx_with_additional_addresses():
    message = dnsstub.parse_message(fixture_bytes("mx_example"))
    assert sorted((r.data.preference, r.data.exchange) for r in message.answers) == [
        (10, "mx1.example.test"), (10, "mx2.example.test"), (20, "mx3.example.test")]
    assert all(r.ttl == 300 and r.rtype == dnsstub.TYPE_MX for r in message.answers)
    assert {(r.name, r.data) for r in message.additional} == {
        ("mx1.example.test", "127.0.0.11"), ("mx1.example.test", "::11"),
        ("mx2.example.test", "127.0.0.12")}


def test_parse_null_mx():
    record, = dnsstub.parse_message(fixture_bytes("mx_null")).answers
    assert record.data == dnsstub.MX(0, "")
    assert dnsmx.format_record(record) == "nullmx.test.\t300\tIN\tMX\t0 ."


def test_parse_negative_answers_with_and_without_soa():
    nxdomain = dnsstub.parse_message(fixture_bytes("auth_nxdomain_soa"))
    assert nxdomain.rcode == dnsstub.NXDOMAIN and nxdomain.answers == ()
    soa = nxdomain.authority[0].data
    assert soa == dnsstub.SOA("ns.test", "hostmaster.test", 1, 1200, 120, 604800, 300)
    nodata = dnsstub.parse_message(fixture_bytes("auth_nodata_soa"))
    assert nodata.rcode == dnsstub.NOERROR and nodata.answers == ()
    assert nodata.authority[0].rtype == dnsstub.TYPE_SOA
    assert dnsstub.parse_message(fixture_bytes("nxdomain")).authority == ()


def test_parse_cname_chain_txt_ptr_aaaa_and_unknown_type():
    chain = dnsstub.parse_message(fixture_bytes("a_cname_chain")).answers
    assert [(r.type_name, r.name, r.data) for r in chain] == [
        ("CNAME", "a2.test", "alias.test"), ("CNAME", "alias.test", "mx1.example.test"),
        ("A", "mx1.example.test", "127.0.0.11")]
    txt = dnsstub.parse_message(fixture_bytes("txt_multi")).answers
    assert sorted(r.data for r in txt) == [(b"second record",),
                                           (b"v=spf1 ip4:127.0.0.0/8", b" -all")]
    assert dnsstub.parse_message(fixture_bytes("txt_binary")).answers[0].data == (b'a"\\\xffb',)
    assert dnsstub.parse_message(fixture_bytes("ptr")).answers[0].data == "mx1.example.test"
    assert dnsstub.parse_message(fixture_bytes("aaaa")).answers[0].data == "::11"
    raw, = dnsstub.parse_message(fixture_bytes("unknown_type")).answers
    assert (raw.rtype, raw.data) == (65280, b"\x01\x02\x03")
    assert dnsmx.format_record(raw) == "raw.test.\t300\tIN\tTYPE65280\t\\# 3 010203"


def test_parse_truncated_udp_reply_and_whole_tcp_reply():
    truncated = dnsstub.parse_message(fixture_bytes("txt_big_udp_truncated"))
    assert truncated.truncated and truncated.answers == ()
    whole = dnsstub.parse_message(fixture_bytes("txt_big_tcp"))
    assert not whole.truncated
    assert whole.answers[0].data == tuple(s.encode() for s in BIG_TXT)


def test_parse_soa_answer_with_ns_authority():
    message = dnsstub.parse_message(fixture_bytes("auth_soa"))
    assert message.answers[0].data.mname == "ns.test"
    assert [(r.type_name, r.name, r.data) for r in message.authority] == [
        ("NS", "test", "ns.test")]


def test_edns_extended_rcode_and_a_second_opt():
    opt = struct.pack("!BHHIH", 0, 41, 1232, 1 << 24, 0)      # extended RCODE 1 -> 16
    packet = struct.pack("!6H", 7, 0x8180, 0, 0, 0, 1) + opt
    assert dnsstub.parse_message(packet).rcode == 16              # BADVERS, RFC 6891 9
    high = packet[:-6] + struct.pack("!IH", 0xFF << 24, 0)      # top TTL bit: still RCODE
    assert dnsstub.parse_message(high).rcode == 0xFF0
    twice = struct.pack("!6H", 7, 0x8180, 0, 0, 0, 2) + opt + opt
    with pytest.raises(dnsstub.DNSFormatError, match="OPT record repeated"):
        dnsstub.parse_message(twice)


def test_parse_reply_without_edns_and_refused():
    assert dnsstub.parse_message(fixture_bytes("a_no_edns")).opt is None
    assert dnsstub.parse_message(fixture_bytes("auth_refused")).rcode == dnsstub.REFUSED


@pytest.mark.parametrize("stem", sorted(MANIFEST))
def test_every_cut_of_a_captured_reply_raises_format_error(stem):
    data = fixture_bytes(stem)
    for length in range(len(data)):
        with pytest.raises(dnsstub.DNSFormatError):
            dnsstub.parse_message(data[:length])


def _answer_with_name(name_bytes):
    """Header + question for a.test A + one answer whose owner is NAME_BYTES."""
    question = wire_name("a.test") + struct.pack("!2H", 1, 1)
    return (struct.pack("!6H", 7, 0x8180, 1, 1, 0, 0) + question + name_bytes
            + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x7f\x00\x00\x01")


@pytest.mark.parametrize("name_bytes, reason", [
    (b"\xc0\x18", "does not point backwards"),                 # to itself (offset 24)
    (b"\x01b\xc0\x18", "does not point backwards"),            # back to its own start
    (b"\xc0\x30", "does not point backwards"),                 # forwards
    (b"\xc0\x02", "does not point backwards"),                 # into the header
    (b"\x40" + b"a" * 64 + b"\x00", "unknown label type"),      # 64-octet label
    (b"\x80\x00", "unknown label type"),
    (b"\x3fa", "runs past the end"),
])
def test_hostile_names_are_rejected(name_bytes, reason):
    with pytest.raises(dnsstub.DNSFormatError, match=reason):
        dnsstub.parse_message(_answer_with_name(name_bytes))


def test_pointer_chains_must_go_strictly_backwards():
    # The answer's owner at offset 24: "b" + pointer to the question's a.test at 12.
    legal = _answer_with_name(b"\x01b\xc0\x0c")
    assert dnsstub.parse_message(legal).answers[0].name == "b.a.test"
    with pytest.raises(dnsstub.DNSFormatError, match="cut short"):
        dnsstub.parse_message(legal[:27])                # ends inside the pointer
    # Two names pointing at each other can never both point backwards.
    question = wire_name("a.test") + struct.pack("!2H", 1, 1)
    body = (b"\x01x\xc0\x2a" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x7f\x00\x00\x01"
            + b"\x01y\xc0\x18" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x7f\x00\x00\x01")
    packet = struct.pack("!6H", 7, 0x8180, 1, 2, 0, 0) + question + body
    with pytest.raises(dnsstub.DNSFormatError, match="backwards"):
        dnsstub.parse_message(packet)


def test_names_longer_than_255_octets_are_rejected():
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"   # 257 octets
    with pytest.raises(dnsstub.DNSFormatError, match="longer than 255"):
        dnsstub.parse_message(_answer_with_name(long_name))


class _ForgetfulNames(dict):
    """A read_name() memo that keeps nothing: every name is read by the plain walk."""

    def __setitem__(self, offset, value):
        pass


def parse_both_ways(data, monkeypatch):
    """parse_message(data) as it is and with the memo of names turned off: each as the
    Message, or the text of the DNSFormatError it raised."""
    outcomes = []
    for forgetful in (False, True):
        if forgetful:
            class PlainReader(dnsstub.PacketReader):
                __slots__ = ()

                def __init__(self, data, offset=0):
                    super().__init__(data, offset)
                    self._names = _ForgetfulNames()
            monkeypatch.setattr(dnsstub, "PacketReader", PlainReader)
        try:
            outcomes.append(dnsstub.parse_message(data))
        except dnsstub.DNSFormatError as exc:
            outcomes.append(str(exc))
    monkeypatch.undo()
    return outcomes


def _owner_chain(label, count):
    """A reply of COUNT answers, each owner LABEL + a pointer to the previous owner (the
    first to the question's a.test): one label and one pointer more each time."""
    question = wire_name("a.test") + struct.pack("!2H", 1, 1)
    body = b""
    previous = 12
    for _ in range(count):
        start = 12 + len(question) + len(body)
        body += (bytes((len(label),)) + label + struct.pack("!H", 0xC000 | previous)
                 + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x7f\x00\x00\x01")
        previous = start
    return struct.pack("!6H", 7, 0x8180, 1, count, 0, 0) + question + body


@pytest.mark.parametrize("label, count, reason", [
    (b"x", 64, None),                      # 64 pointers in the last name: the limit
    (b"x", 65, "too many compression pointers"),
    (b"x" * 63, 3, None),                  # 8 + 3 * 64 = 200 octets
    (b"x" * 63, 4, "longer than 255"),     # 264 octets
    (b"x" * 50, 5, "longer than 255"),
])
def test_names_through_earlier_names_keep_both_bounds(label, count, reason, monkeypatch):
    data = _owner_chain(label, count)
    remembered, plain = parse_both_ways(data, monkeypatch)
    assert remembered == plain
    if reason is None:
        assert remembered.answers[-1].name == ".".join(
            [label.decode()] * count + ["a", "test"])
    else:
        assert reason in remembered


@pytest.mark.parametrize("stem", sorted(MANIFEST))
def test_names_read_through_earlier_names_equal_the_plain_walk(stem, monkeypatch):
    remembered, plain = parse_both_ways(fixture_bytes(stem), monkeypatch)
    assert remembered == plain and not isinstance(remembered, str)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(MANIFEST)), st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_replies_parse_alike_with_and_without_the_memo(monkeypatch, stem, changes):
    data = bytearray(fixture_bytes(stem))
    for position, value in changes:
        if position < len(data):
            data[position] = value
    remembered, plain = parse_both_ways(bytes(data), monkeypatch)
    assert remembered == plain


def test_rdata_must_fill_its_length_exactly():
    good = _answer_with_name(b"\x00")
    bad = good[:-6] + struct.pack("!H", 5) + b"\x7f\x00\x00\x01\x00"
    with pytest.raises(dnsstub.DNSFormatError, match="A record of 5 octets"):
        dnsstub.parse_message(bad)
    mx = good[:-14] + struct.pack("!HHIH", 15, 1, 60, 6) + b"\x00\x0a\x01m\x00\x00"
    with pytest.raises(dnsstub.DNSFormatError, match="does not fill"):
        dnsstub.parse_message(mx)


def test_ttl_with_top_bit_set_counts_as_zero():
    packet = _answer_with_name(b"\x00")
    packet = packet[:-10] + struct.pack("!I", 0x80000000) + packet[-6:]
    assert dnsstub.parse_message(packet).answers[0].ttl == 0


def test_parser_refuses_non_bytes():
    with pytest.raises(dnsstub.DNSFormatError):
        dnsstub.parse_message("not bytes")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_arbitrary_bytes_raise_only_format_error(data):
    try:
        dnsstub.parse_message(data)
    except dnsstub.DNSFormatError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(MANIFEST)), st.lists(
    st.tuples(st.integers(0, 1600), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 1600))
def test_mutated_captured_replies_raise_only_format_error(stem, changes, cut):
    data = bytearray(fixture_bytes(stem))
    for position, value in changes:
        if position < len(data):
            data[position] = value
    try:
        message = dnsstub.parse_message(bytes(data[:max(cut, 12)]))
    except dnsstub.DNSFormatError:
        return
    for record in message.answers + message.authority + message.additional:
        dnsmx.format_record(record)          # whatever parsed can also be printed


# --- Live lookups against dnsmasq ---


def test_mx_hosts_by_preference_with_equal_preferences_shuffled(resolver):
    orders = set()
    for _ in range(64):
        plan = resolver.mx_hosts("example.test")
        assert [host.preference for host in plan] == [10, 10]
        orders.add(tuple(host.name for host in plan))
    assert orders == {("mx1.example.test", "mx2.example.test"),
                      ("mx2.example.test", "mx1.example.test")}


def test_mx_hosts_carry_ipv4_then_ipv6_addresses_and_skip_hosts_without_any(resolver):
    plan = {host.name: host for host in resolver.mx_hosts("Example.TEST.")}
    assert plan["mx1.example.test"].addresses == ("127.0.0.11", "::11")
    assert plan["mx2.example.test"].addresses == ("127.0.0.12",)
    assert "mx3.example.test" not in plan                     # no address at all: skipped
    assert not any(host.implicit for host in plan.values())


def test_mx_hosts_look_up_addresses_when_the_additional_section_is_empty(auth_resolver):
    plan = auth_resolver.mx_hosts("example.test")
    assert sorted((h.name, h.addresses) for h in plan) == [
        ("mx1.example.test", ("127.0.0.11", "::11")), ("mx2.example.test", ("127.0.0.12",))]


def test_lower_preference_is_tried_first(resolver):
    plan = resolver.mx_hosts("backup.test")
    assert [(h.name, h.preference, h.addresses) for h in plan] == [
        ("mx1.example.test", 10, ("127.0.0.11", "::11")),
        ("far.example.test", 30, ("127.0.0.30",))]


def test_implicit_mx_when_the_domain_has_no_mx(resolver, auth_resolver):
    for each in (resolver, auth_resolver):
        assert each.mx_hosts("implicit.test") == [
            dnsstub.MXHost("implicit.test", 0, ("127.0.0.20", "::20"), implicit=True)]
    v6, = resolver.mx_hosts("v6only.test")
    assert v6.implicit and v6.addresses == ("::21",)


def test_implicit_mx_uses_the_canonical_name_at_the_end_of_a_cname_chain(resolver):
    host, = resolver.mx_hosts("c1.test")
    assert (host.name, host.implicit, host.addresses) == (
        "implicit.test", True, ("127.0.0.20", "::20"))


def test_null_mx_is_permanent_with_its_own_class(resolver):
    with pytest.raises(dnsstub.NullMXError) as caught:
        resolver.mx_hosts("nullmx.test")                # it has an A record: still no mail
    assert caught.value.permanent and caught.value.status == "5.1.10"
    assert isinstance(caught.value, dnsstub.DNSPermanentError)


def test_nxdomain_domain_is_permanent(resolver):
    with pytest.raises(dnsstub.NXDomainError) as caught:
        resolver.mx_hosts("nope.test")
    assert caught.value.permanent and caught.value.status == "5.1.2"
    assert caught.value.name == "nope.test" and caught.value.rcode == dnsstub.NXDOMAIN


def test_domain_without_mx_or_address_is_permanent(resolver):
    with pytest.raises(dnsstub.NoAddressError) as caught:
        resolver.mx_hosts("txt.test")
    assert caught.value.permanent and caught.value.status == "5.4.4"
    with pytest.raises(dnsstub.NoAddressError):
        resolver.mx_hosts("dangling.test")               # its only MX host does not exist


def test_mx_host_that_fails_for_now_makes_the_lookup_temporary(auth_resolver):
    # The authoritative dnsmasq refuses names outside its zone: a temporary failure.
    with pytest.raises(dnsstub.DNSTemporaryError) as caught:
        auth_resolver.mx_hosts("dangling.test")
    assert not caught.value.permanent and caught.value.rcode == dnsstub.REFUSED
    plan = auth_resolver.mx_hosts("partial.test")
    assert [host.name for host in plan] == ["mx1.example.test"]
    assert auth_resolver.cache.get(("partial.test", "mx_hosts")) is None   # not kept


def test_mx_pointing_to_a_cname_is_tolerated(resolver):
    host, = resolver.mx_hosts("mxcname.test")
    assert (host.name, host.preference, host.addresses) == ("alias.test", 5,
                                                            ("127.0.0.11", "::11"))


def test_nodata_is_permanent_and_names_the_record_type(resolver):
    with pytest.raises(dnsstub.NoDataError) as caught:
        resolver.resolve("mx2.example.test", "AAAA")
    assert caught.value.permanent and caught.value.rtype == dnsstub.TYPE_AAAA
    assert "NODATA" in str(caught.value)


def test_cname_chain_in_one_reply(resolver):
    answer = resolver.resolve("A2.test", "A")
    assert answer.canonical_name == "mx1.example.test"
    assert [r.data for r in answer.cnames] == ["alias.test", "mx1.example.test"]
    assert answer.data == ["127.0.0.11"] and answer.ttl == 300


def test_cname_chain_over_several_queries(auth_resolver):
    answer = auth_resolver.resolve("c1.test", "AAAA")
    assert answer.canonical_name == "implicit.test" and answer.data == ["::20"]
    assert len(answer.cnames) == 4


def test_cname_chain_longer_than_the_limit_is_refused(resolver, auth_resolver):
    for each in (resolver, auth_resolver):
        with pytest.raises(dnsstub.CNAMELoopError) as caught:
            each.resolve("long0.test", "A")
        assert not caught.value.permanent


def test_cname_asked_for_itself_is_not_followed(resolver):
    answer = resolver.resolve("alias.test", "CNAME")
    assert answer.data == ["mx1.example.test"] and answer.cnames == ()


def test_large_txt_answer_goes_over_tcp(resolver):
    steps = []
    answer = resolver.resolve("big.test", "TXT", explain=steps.append)
    assert answer.records[0].data == tuple(s.encode() for s in BIG_TXT)
    assert any("truncated (TC)" in step and "TCP" in step for step in steps)
    assert resolver.txt("big.test") == ["".join(BIG_TXT)]


def test_txt_joins_strings_per_record_and_keeps_raw_bytes_safe(resolver):
    assert sorted(resolver.txt("txt.test")) == ["second record", "v=spf1 ip4:127.0.0.0/8 -all"]
    assert resolver.txt("binary.test", raw=True) == [b'a"\\\xffb']
    assert resolver.txt("binary.test") == ['a"\\\ufffdb']


def test_aaaa_and_ptr_lookups(resolver):
    assert resolver.resolve("mx1.example.test", "AAAA").data == ["::11"]
    assert resolver.ptr("127.0.0.99") == ["mx1.example.test"]
    assert resolver.ptr("127.0.0.11") == ["mx1.example.test"]
    assert resolver.ptr("::11") == ["mx1.example.test"]


def test_tcp_only_resolver(dns_local):
    tcp = dnsstub.Resolver([dns_local.address], tcp=True, **FAST)
    assert tcp.resolve("mx2.example.test", "A").data == ["127.0.0.12"]


def test_resolve_mx_returns_target_names_by_preference(dns_local):
    port = dns_local.port
    assert dnsstub.resolve_mx("example.test", "127.0.0.1", port) == [
        "mx2.example.test", "mx1.example.test", "mx3.example.test"]
    assert dnsstub.resolve_mx("nullmx.test", "127.0.0.1", port) == ["."]
    assert dnsstub.resolve_mx("nope.test", "127.0.0.1", port) == []
    assert dnsstub.resolve_mx("implicit.test", "127.0.0.1", port) == []


def test_module_functions_use_the_default_resolver(dns_local, monkeypatch):
    monkeypatch.setattr(dnsstub, "_default_resolver", None)
    dnsstub.set_default_resolver(dnsstub.Resolver([dns_local.address], **FAST))
    assert [h.name for h in dnsstub.mx_hosts("backup.test")][0] == "mx1.example.test"
    assert dnsstub.resolve("mx2.example.test", "A").data == ["127.0.0.12"]
    assert dnsstub.ptr("127.0.0.99") == ["mx1.example.test"]
    assert "second record" in dnsstub.txt("txt.test")
    assert dnsstub.default_resolver().servers[0].port == dns_local.port


# --- Agreement with dig on the same server ---

DIG_QUESTIONS = [("mx1.example.test", "A"), ("mx1.example.test", "AAAA"), ("a2.test", "A"),
                 ("txt.test", "TXT"), ("binary.test", "TXT"), ("big.test", "TXT"),
                 ("99.0.0.127.in-addr.arpa", "PTR"), ("raw.test", "TYPE65280"),
                 ("alias.test", "CNAME")]


def run_dig(server, *args):
    dig = require_tool("dig", "bind9-dnsutils")
    result = subprocess.run([dig, "@" + server.host, "-p", str(server.port), "+time=2",
                             "+tries=1"] + list(args), capture_output=True, text=True,
                            timeout=20)
    return [" ".join(line.split()) for line in result.stdout.splitlines() if line.strip()]


def run_cli(*args, timeout=20):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dnsmx.py")] + list(args),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name, rtype", DIG_QUESTIONS)
def test_records_printed_like_dig(dns_local, name, rtype):
    expected = run_dig(dns_local, "+noall", "+answer", name, rtype)
    ours = run_cli("--server", dns_local.address, name, rtype)
    assert ours.returncode == 0, ours.stderr
    assert [" ".join(line.split()) for line in ours.stdout.splitlines()] == expected
    short = run_cli("--server", dns_local.address, "--short", name, rtype)
    assert [" ".join(l.split()) for l in short.stdout.splitlines()] == run_dig(
        dns_local, "+short", name, rtype)


def test_mx_records_agree_with_dig(dns_local, resolver):
    expected = sorted(run_dig(dns_local, "+short", "example.test", "MX"))
    answer = resolver.resolve("example.test", "MX")
    assert sorted(dnsmx.format_rdata(r) for r in answer.records) == expected


# --- Hostile and broken servers ---


def test_unmatched_datagrams_are_ignored_and_the_real_answer_taken():
    good = fixture_bytes("a_no_edns")                  # mx2.example.test A -> 127.0.0.12
    poisoned = good.replace(b"\x7f\x00\x00\x0c", b"\x06\x06\x06\x06")
    other_question = fixture_bytes("aaaa")

    def reply(query):
        qid = query_id(query)
        return [("right", os.urandom(40)),
                ("right", with_id(poisoned, (qid + 1) & 0xFFFF)),          # wrong ID
                ("right", with_id(other_question, qid)),                     # wrong question
                ("right", with_id(poisoned, qid)[:2] + b"\x01\x00" + poisoned[4:]),  # not QR
                ("wrong", with_id(poisoned, qid)),                           # wrong port
                ("right", with_id(good, qid))]

    with ScriptedServer(reply) as server:
        resolver = dnsstub.Resolver([server.address], timeout=2, attempts=1)
        assert resolver.resolve("mx2.example.test", "A").data == ["127.0.0.12"]


def test_question_is_compared_without_regard_to_case():
    good = fixture_bytes("a_no_edns")

    def reply(query):
        shouted = with_id(good, query_id(query)).replace(b"\x03mx2\x07example",
                                                         b"\x03MX2\x07ExAmPlE")
        return [("right", shouted)]

    with ScriptedServer(reply) as server:
        answer = dnsstub.Resolver([server.address], **FAST).resolve("mx2.example.test", "A")
        assert answer.data == ["127.0.0.12"]


def test_random_bytes_only_end_in_a_temporary_timeout():
    rng = random.Random(4)

    def reply(query):
        return [("right", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
                for _ in range(5)]

    with ScriptedServer(reply) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.5, attempts=2)
        started = time.monotonic()
        with pytest.raises(dnsstub.DNSTimeoutError) as caught:
            resolver.resolve("example.test", "MX")
        assert time.monotonic() - started < 2 * 0.5 + SLACK
    assert not caught.value.permanent


@pytest.mark.parametrize("damage", ["truncated", "pointer loop", "garbage after question"])
def test_malformed_reply_to_our_question_is_a_temporary_format_error(damage):
    good = fixture_bytes("mx_example")

    def reply(query):
        data = with_id(good, query_id(query))
        if damage == "truncated":
            data = data[:len(data) - 7]
        elif damage == "pointer loop":
            first_answer = 12 + len(question_of(query))
            data = data[:first_answer] + struct.pack("!H", 0xC000 | first_answer) \
                + data[first_answer + 2:]
        else:
            data = data[:12 + len(question_of(query))] + b"\xff" * 40
        return [("right", data)]

    with ScriptedServer(reply) as server:
        resolver = dnsstub.Resolver([server.address], timeout=1, attempts=2)
        with pytest.raises(dnsstub.DNSFormatError) as caught:
            resolver.mx_hosts("example.test")
        assert len(server.queries) == 2                   # each try got the same junk
    assert not caught.value.permanent


def test_server_that_never_answers_fails_temporarily_within_the_bound():
    with ScriptedServer(lambda query: []) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.2, attempts=2)
        started = time.monotonic()
        with pytest.raises(dnsstub.DNSTimeoutError) as caught:
            resolver.mx_hosts("example.test")
        elapsed = time.monotonic() - started
        wait_for(lambda: len(server.queries) >= 2, 10, "the server to read both tries")
        assert len(server.queries) == 2                  # attempts, and no more
    assert 0.35 < elapsed < 2 * 0.2 + SLACK
    assert not caught.value.permanent and caught.value.status == "4.4.3"


def test_each_call_may_cut_its_time_shorter_than_the_resolvers_lifetime():
    with ScriptedServer(lambda query: []) as server:
        resolver = dnsstub.Resolver([server.address], timeout=10.0, attempts=2)    # 20 s
        calls = [lambda: resolver.resolve("example.test", "A", lifetime=0.2),
                 lambda: resolver.query("example.test", "MX", lifetime=0.2),
                 lambda: resolver.txt("example.test", lifetime=0.2),
                 lambda: resolver.ptr("192.0.2.1", lifetime=0.2),
                 lambda: resolver.mx_hosts("example.test", lifetime=0.2),
                 lambda: resolver.resolve("example.test", "A", lifetime=0)]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(dnsstub.DNSTimeoutError) as caught:
                call()
            assert time.monotonic() - started < 0.2 + SLACK
            assert not caught.value.permanent
        dnsstub.set_default_resolver(resolver)
        try:
            started = time.monotonic()
            with pytest.raises(dnsstub.DNSTimeoutError):
                dnsstub.txt("example.test", lifetime=0.2)
            assert time.monotonic() - started < 0.2 + SLACK
        finally:
            dnsstub.set_default_resolver(None)


def test_closed_port_fails_fast_and_temporarily():
    resolver = dnsstub.Resolver(["127.0.0.1:%d" % unused_udp_port()], timeout=30, attempts=1)
    started = time.monotonic()
    with pytest.raises(dnsstub.DNSTemporaryError):
        resolver.resolve("example.test", "MX")
    assert time.monotonic() - started < SLACK        # at the ICMP refusal, not the 30 s timeout


def test_servfail_is_temporary_and_the_next_server_is_asked(dns_local):
    def servfail(query):
        return [("right", make_reply(query, rcode=dnsstub.SERVFAIL))]

    with ScriptedServer(servfail) as server:
        alone = dnsstub.Resolver([server.address], **FAST)
        with pytest.raises(dnsstub.DNSTemporaryError, match="SERVFAIL") as caught:
            alone.resolve("mx2.example.test", "A")
        assert caught.value.rcode == dnsstub.SERVFAIL and not caught.value.permanent
        both = dnsstub.Resolver([server.address, dns_local.address], **FAST)
        assert both.resolve("mx2.example.test", "A").data == ["127.0.0.12"]


def test_refused_is_temporary(auth_resolver):
    with pytest.raises(dnsstub.DNSTemporaryError, match="REFUSED"):
        auth_resolver.resolve("outside.example", "A")


def test_cname_loop_is_refused():
    def loop(query):
        asked = question_of(query)
        own, other = ("loop1.test", "loop2.test") if b"loop1" in asked else \
            ("loop2.test", "loop1.test")
        return [("right", make_reply(query, [(own, 5, 60, wire_name(other))]))]

    def loop_in_one_reply(query):
        return [("right", make_reply(query, [("loop1.test", 5, 60, wire_name("loop2.test")),
                                             ("loop2.test", 5, 60, wire_name("loop1.test"))]))]

    for script in (loop, loop_in_one_reply):
        with ScriptedServer(script) as server:
            resolver = dnsstub.Resolver([server.address], **FAST)
            with pytest.raises(dnsstub.CNAMELoopError) as caught:
                resolver.resolve("loop1.test", "A")
            assert len(server.queries) <= dnsstub.MAX_CNAME_CHAIN + 1
        assert not caught.value.permanent


def test_oversized_udp_answer_is_asked_again_over_tcp():
    big = fixture_bytes("txt_big_tcp")

    def udp(query):
        return [("right", with_id(big, query_id(query)))]      # 1555 octets, TC clear

    def tcp(query):
        data = with_id(big, query_id(query))
        return struct.pack("!H", len(data)) + data

    with ScriptedServer(udp, tcp) as server:
        answer = dnsstub.Resolver([server.address], **FAST).resolve("big.test", "TXT")
        assert len(server.tcp_queries) == 1
    assert b"".join(answer.records[0].data) == "".join(BIG_TXT).encode()


@pytest.mark.parametrize("behaviour", ["stall", "short", "wrong id"])
def test_broken_tcp_fallback_is_temporary_and_bounded(behaviour):
    truncated = fixture_bytes("txt_big_udp_truncated")
    big = fixture_bytes("txt_big_tcp")

    def udp(query):
        return [("right", with_id(truncated, query_id(query)))]

    def tcp(query):
        if behaviour == "stall":
            return None
        if behaviour == "short":
            return struct.pack("!H", len(big)) + with_id(big, query_id(query))[:100]
        data = with_id(big, query_id(query) ^ 1)
        return struct.pack("!H", len(data)) + data

    with ScriptedServer(udp, tcp) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.3, attempts=1)
        started = time.monotonic()
        with pytest.raises(dnsstub.DNSTemporaryError):
            resolver.resolve("big.test", "TXT")
        assert time.monotonic() - started < 0.3 + SLACK


def test_server_without_edns_is_asked_again_without_it():
    plain = fixture_bytes("a_no_edns")

    def reply(query):
        if struct.unpack("!H", query[10:12])[0]:                  # carries an OPT record
            return [("right", make_reply(query, rcode=dnsstub.FORMERR))]
        return [("right", with_id(plain, query_id(query)))]

    with ScriptedServer(reply) as server:
        answer = dnsstub.Resolver([server.address], **FAST).resolve("mx2.example.test", "A")
        assert answer.data == ["127.0.0.12"] and len(server.queries) == 2


def test_each_query_uses_a_fresh_source_port_and_id():
    seen = []

    def reply(query):
        seen.append(query_id(query))
        return []

    with ScriptedServer(reply) as server:
        # A generous lifetime, so that a slow machine still makes all four tries.
        resolver = dnsstub.Resolver([server.address], timeout=0.05, attempts=4, lifetime=10)
        with pytest.raises(dnsstub.DNSTimeoutError):
            resolver.resolve("example.test", "MX")
        wait_for(lambda: len(seen) >= 4, 10, "the server to read all four queries")
        ports = {client[1] for client in server.clients}
    assert len(seen) == 4 and len(set(seen)) >= 3 and len(ports) == 4


# --- Servers and resolv.conf ---


@pytest.mark.parametrize("text, host, port", [
    ("127.0.0.1", "127.0.0.1", 53), ("127.0.0.1:5353", "127.0.0.1", 5353),
    ("::1", "::1", 53), ("[::1]", "::1", 53), ("[::1]:5353", "::1", 5353),
    ("[2001:db8::1]:53", "2001:db8::1", 53),
])
def test_server_addresses(text, host, port):
    server = dnsstub.parse_server(text)
    assert (server.host, server.port) == (host, port)
    assert str(server) in (text, text + ":53", "[%s]:53" % text)


@pytest.mark.parametrize("text", ["ns.example.test", "127.0.0.1:0", "127.0.0.1:70000",
                                  "[::1", "[::1]x", "127.0.0.1:port", ""])
def test_bad_server_addresses(text):
    with pytest.raises(ValueError):
        dnsstub.parse_server(text)


def test_resolv_conf_servers_and_options(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("# comment\nsearch example.test\nnameserver 127.0.0.2\n"
                    "nameserver ::1 ; trailing comment\nnameserver bogus\n"
                    "nameserver 127.0.0.3\nnameserver 127.0.0.4\n"
                    "options ndots:2 timeout:3 attempts:9 rotate\n")
    conf = dnsstub.read_resolv_conf(str(path))
    assert [str(s) for s in conf.servers] == ["127.0.0.2:53", "[::1]:53", "127.0.0.3:53"]
    assert (conf.timeout, conf.attempts, conf.rotate) == (3.0, 5, True)
    resolver = dnsstub.Resolver(resolv_conf=str(path))
    assert resolver.timeout == 3.0 and resolver.lifetime == 3.0 * 5 * 3


def test_missing_resolv_conf_means_the_local_host(tmp_path):
    conf = dnsstub.read_resolv_conf(str(tmp_path / "absent"))
    assert [str(s) for s in conf.servers] == ["127.0.0.1:53"]
    assert (conf.timeout, conf.attempts, conf.rotate) == (5.0, 2, False)


def test_rotate_spreads_queries_over_servers():
    good = fixture_bytes("a_no_edns")

    def reply(query):
        return [("right", with_id(good, query_id(query)))]

    with ScriptedServer(reply) as first, ScriptedServer(reply) as second:
        for rotate, expected in ((False, (4, 0)), (True, (2, 2))):
            first.queries.clear()
            second.queries.clear()
            resolver = dnsstub.Resolver([first.address, second.address], cache_size=0,
                                        rotate=rotate, **FAST)
            for _ in range(4):
                resolver.resolve("mx2.example.test", "A")
            assert (len(first.queries), len(second.queries)) == expected


# --- Cache ---


def test_answers_come_from_the_cache_while_the_server_is_gone():
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.3, attempts=1)
        first = resolver.resolve("mx2.example.test", "A")
        plan = resolver.mx_hosts("backup.test")
    assert not first.from_cache
    again = resolver.resolve("mx2.example.test", "A")
    assert again.from_cache and again.data == ["127.0.0.12"] and 0 < again.ttl <= 300
    assert [h.name for h in resolver.mx_hosts("backup.test")] == [h.name for h in plan]


def test_negative_answers_are_cached_for_the_soa_minimum():
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE, auth_zone="test", ttl=120) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.3, attempts=1)
        with pytest.raises(dnsstub.NXDomainError) as first:
            resolver.resolve("nope.test", "A")
        with pytest.raises(dnsstub.NoDataError):
            resolver.resolve("mx2.example.test", "AAAA")
    assert first.value.ttl == 120                      # min(SOA TTL, SOA MINIMUM)
    with pytest.raises(dnsstub.NXDomainError) as cached:
        resolver.resolve("nope.test", "A")
    assert 0 < cached.value.ttl <= 120
    with pytest.raises(dnsstub.NoDataError):
        resolver.resolve("mx2.example.test", "AAAA")


def test_negative_answers_without_soa_are_not_cached():
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE) as server:
        resolver = dnsstub.Resolver([server.address], timeout=0.3, attempts=1)
        with pytest.raises(dnsstub.NXDomainError):
            resolver.resolve("nope.test", "A")
    with pytest.raises(dnsstub.DNSTemporaryError):
        resolver.resolve("nope.test", "A")


def test_cached_entries_expire_with_their_ttl(resolver):
    now = [1000.0]
    resolver.cache.clock = lambda: now[0]
    assert not resolver.resolve("mx2.example.test", "A").from_cache
    now[0] += 299
    assert resolver.resolve("mx2.example.test", "A").from_cache
    now[0] += 2
    assert not resolver.resolve("mx2.example.test", "A").from_cache


def test_zero_ttl_answers_are_not_cached():
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE, ttl=0) as server:
        resolver = dnsstub.Resolver([server.address], **FAST)
        resolver.mx_hosts("example.test")
        resolver.resolve("mx2.example.test", "A")
        assert len(resolver.cache) == 0


def test_cache_is_a_bounded_lru():
    cache = dnsstub.TTLCache(maxsize=2)
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    assert cache.get("a")[0] == 1                      # a is now the most recent
    cache.put("c", 3, 60)
    assert cache.get("b") is None and cache.get("a")[0] == 1 and cache.get("c")[0] == 3
    cache.put("d", 4, 10 ** 9)
    assert cache.get("d")[1] <= dnsstub.MAX_CACHE_TTL and len(cache) == 2
    disabled = dnsstub.TTLCache(maxsize=0)
    disabled.put("a", 1, 60)
    assert disabled.get("a") is None


def test_cache_is_safe_to_share_between_threads(resolver):
    cache = dnsstub.TTLCache(maxsize=50)
    errors = []

    def hammer(seed):
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                key = rng.randrange(200)
                if rng.random() < 0.5:
                    cache.put(key, key, rng.choice((0.001, 60)))
                else:
                    found = cache.get(key)
                    assert found is None or found[0] == key
        except Exception as exc:         # collected and reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    threads += [threading.Thread(target=lambda: [resolver.mx_hosts("backup.test")
                                                 for _ in range(50)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(cache) <= 50


def test_explain_says_what_came_from_the_cache(resolver):
    resolver.mx_hosts("example.test")
    steps = []
    resolver.mx_hosts("example.test", explain=steps.append)
    assert any(step.startswith("cache: delivery plan") for step in steps)


# --- Command line ---


def test_cli_prints_the_delivery_plan(dns_local):
    result = run_cli("--server", dns_local.address, "backup.test")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert "delivery plan" in lines[0]
    assert lines[1:] == ["1. mx1.example.test. preference 10: 127.0.0.11, ::11",
                         "2. far.example.test. preference 30: 127.0.0.30"]
    short = run_cli("--server", dns_local.address, "--short", "backup.test", "MX")
    assert short.stdout.splitlines() == ["10 mx1.example.test. 127.0.0.11 ::11",
                                         "30 far.example.test. 127.0.0.30"]


def test_cli_says_implicit_mx(dns_local):
    result = run_cli("--server", dns_local.address, "implicit.test")
    assert result.returncode == 0
    assert "implicit MX" in result.stdout and "127.0.0.20, ::20" in result.stdout


@pytest.mark.parametrize("args", [["nullmx.test"], ["nullmx.test", "MX"]])
def test_cli_prints_a_null_mx_record_and_exits_0(dns_local, args):
    result = run_cli("--server", dns_local.address, *args)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == ["nullmx.test.\t300\tIN\tMX\t0 .",
                                          "nullmx.test. null MX: accepts no mail (RFC 7505)"]
    short = run_cli("--server", dns_local.address, "--short", *args)
    assert short.returncode == 0 and short.stdout == "0 .\n"


@pytest.mark.parametrize("args, status, reason", [
    (["nope.test"], 1, "NXDOMAIN"),
    (["nope.test", "A"], 1, "NXDOMAIN"),
    (["mx2.example.test", "AAAA"], 1, "NODATA"),
    (["a" * 64 + ".test"], 1, "label longer than 63"),
])
def test_cli_permanent_failures_exit_1(dns_local, args, status, reason):
    result = run_cli("--server", dns_local.address, *args)
    assert result.returncode == status and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and reason in result.stderr


def test_cli_temporary_failure_exits_2_without_traceback():
    with ScriptedServer(lambda query: []) as server:
        result = run_cli("--server", server.address, "--timeout", "0.2", "--attempts", "1",
                         "example.test")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    garbage = run_cli("--server", "127.0.0.1:%d" % unused_udp_port(), "--timeout", "0.2",
                      "example.test", "A")
    assert garbage.returncode == 2 and "Traceback" not in garbage.stderr


def test_cli_explain_prints_each_decision(dns_local):
    result = run_cli("--server", dns_local.address, "--explain", "example.test")
    steps = [line for line in result.stdout.splitlines() if line.startswith("; ")]
    text = "\n".join(steps)
    for expected in ("look up the MX records", "MX set found: 3", "sorted by preference",
                     "from the additional section", "mx3.example.test. has no address",
                     "IPv4 first, then IPv6", "shuffled equal preference 10"):
        assert expected in text
    implicit = run_cli("--server", dns_local.address, "--explain", "c1.test")
    assert "CNAME" in implicit.stdout or "implicit MX" in implicit.stdout
    assert "no MX records: implicit MX" in implicit.stdout


def test_cli_tcp_ptr_and_short(dns_local):
    result = run_cli("--server", dns_local.address, "--tcp", "--short", "127.0.0.99", "PTR")
    assert result.returncode == 0 and result.stdout == "mx1.example.test.\n"


@pytest.mark.parametrize("args", [[], ["--server", "ns.example.test", "x.test"],
                                  ["x.test", "BOGUS"], ["--timeout", "-1", "x.test"],
                                  ["--bogus-flag", "x.test"]])
def test_cli_usage_errors_exit_64(args):
    result = run_cli(*args)
    assert result.returncode == dnsmx.EXIT_USAGE and "Traceback" not in result.stderr


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--server", "--tcp", "--timeout", "--short", "--explain", "Exit status"):
        assert flag in result.stdout


def test_options_are_read_as_argparse_reads_them():
    args = dnsmx.parse_arguments(["--server=127.0.0.1:5353", "x.test", "--short",
                                  "--server", "[::1]:53", "TXT", "--timeout", "0.5",
                                  "--attempts=3", "--tcp", "--explain"])
    assert (args.server, args.name, args.rtype) == (["127.0.0.1:5353", "[::1]:53"], "x.test",
                                                    "TXT")
    assert (args.timeout, args.attempts, args.tcp, args.short, args.explain) == (
        0.5, 3, True, True, True)
    plain = dnsmx.parse_arguments(["x.test"])
    assert (plain.server, plain.rtype, plain.timeout, plain.attempts, plain.short) == (
        None, "MX", None, None, False)
    assert dnsmx.parse_arguments(["--", "-x.test", "A"]).name == "-x.test"
    assert dnsmx.parse_arguments(["--timeout", "-1", "x.test"]).timeout == -1.0
    assert dnsmx.parse_arguments(["x.test", "-h"]).help


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: NAME"),
    (["--server"], "argument --server: expected one argument"),
    (["--server", "--tcp", "x.test"], "argument --server: expected one argument"),
    (["--timeout", "soon", "x.test"], "argument --timeout: invalid float value: 'soon'"),
    (["--attempts=2.5", "x.test"], "argument --attempts: invalid int value: '2.5'"),
    (["x.test", "A", "extra"], "unrecognized arguments: extra"),
    (["--tcp=yes", "x.test"], "unrecognized arguments: --tcp=yes"),
    (["--serv", "127.0.0.1", "x.test"], "unrecognized arguments: --serv"),
])
def test_a_bad_command_line_says_what_is_wrong_and_exits_64(args, message, capsys):
    assert dnsmx.main(args) == dnsmx.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: dnsmx.py ")
    assert captured.err.endswith("dnsmx.py: error: %s\n" % message)


def test_main_returns_status_in_process(dns_local, capsys):
    assert dnsmx.main(["--server", dns_local.address, "--short", "mx2.example.test", "A"]) == 0
    assert capsys.readouterr().out == "127.0.0.12\n"
    assert dnsmx.main(["--server", dns_local.address, "nope.test"]) == 1


# --- Start-up cost ---

# What a CLI run must not import. dataclasses alone (inspect, ast, dis, tokenize) was 20 ms
# of an 80 ms run; typing, random, shutil (bz2, lzma) and the IDNA codec that getaddrinfo()
# loads for a host given as text cost milliseconds each; argparse (re, gettext, locale) and
# socket.py (enum, selectors) were together 9 of a 26 ms run, more than dig's whole lookup.
HEAVY_MODULES = ("dataclasses", "inspect", "ast", "dis", "tokenize", "typing", "random",
                 "argparse", "re", "gettext", "locale", "socket", "enum", "selectors",
                 "threading", "shutil", "encodings.idna")


def heavy_modules_imported(code):
    """The HEAVY_MODULES that CODE imports after it sets `before = set(sys.modules)`, in a
    fresh interpreter without site hooks (-I -S): nothing this machine adds is counted."""
    program = ("import sys\nsys.path.insert(0, %r)\n%s\n"
               "sys.stderr.write('\\n' + ' '.join(sorted(set(%r) & set(sys.modules) - before)))"
               % (ROOT, code, HEAVY_MODULES))
    result = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr.rsplit("\n", 1)[-1].split()


def test_importing_dnsstub_imports_no_heavy_module():
    assert heavy_modules_imported("before = set(sys.modules)\nimport dnsstub") == []


@pytest.mark.parametrize("args", [["example.test", "MX"], ["--short", "mx1.example.test", "A"],
                                  ["--bogus-flag", "x.test"]])
def test_a_cli_run_imports_no_heavy_module(dns_local, args):
    code = ("before = set(sys.modules)\nimport dnsmx\n"
            "dnsmx.main(['--server', %r] + %r)" % (dns_local.address, args))
    assert heavy_modules_imported(code) == []


# --- The hand-written data types behave as the frozen dataclasses they stand for ---

DATA_TYPE_SAMPLES = {
    "MX": (10, "mx.example.com"),
    "SOA": ("ns.example.com", "admin.example.com", 1, 2, 3, 4, 5),
    "Record": ("example.com", dnsstub.TYPE_A, dnsstub.CLASS_IN, 300, "192.0.2.1"),
    "Message": (7, 0x8180, 0, (), (), (), (), None),
    "Answer": ("example.com", dnsstub.TYPE_A, "example.com", (), (), (), 60, False),
    "MXHost": ("mx.example.com", 10, ("192.0.2.1",), False),
    "Nameserver": ("127.0.0.1", 5353, socket.AF_INET, ("127.0.0.1", 5353)),
    "ResolvConf": (["127.0.0.1"], 5.0, 2, False),
}


@pytest.mark.parametrize("name", sorted(DATA_TYPE_SAMPLES))
def test_each_data_type_behaves_as_its_plain_dataclass(name):
    import dataclasses
    import pickle
    fast = getattr(dnsstub, name)
    compared = fast._compared or fast.__slots__
    frozen = issubclass(fast, dnsstub._Frozen)
    plain = dataclasses.make_dataclass(
        name, [(field, object, dataclasses.field(compare=field in compared, repr=field in compared))
               for field in fast.__slots__], frozen=frozen, eq=True)
    values = DATA_TYPE_SAMPLES[name]
    a, b = fast(*values), plain(*values)
    assert repr(a) == repr(b)
    assert a == fast(*values) and (b == plain(*values))
    assert all(getattr(a, field) == getattr(b, field) for field in fast.__slots__)
    changed = list(values)
    changed[fast.__slots__.index(compared[0])] = "changed"
    assert (a == fast(*changed)) == (b == plain(*changed)) is False
    if not compared == fast.__slots__:             # a field left out of comparison
        other = list(values)
        other[fast.__slots__.index(next(f for f in fast.__slots__ if f not in compared))] = "x"
        assert (a == fast(*other)) == (b == plain(*other)) is True
    if frozen:
        assert hash(a) == hash(fast(*values)) and hash(b) == hash(plain(*values))
        for value in (a, b):
            with pytest.raises(AttributeError):
                setattr(value, fast.__slots__[0], None)
    assert pickle.loads(pickle.dumps(a)) == a


def test_records_made_by_the_parser_are_plain_records():
    values = DATA_TYPE_SAMPLES["Record"]
    fast, plain = dnsstub._new_record(*values), dnsstub.Record(*values)
    assert type(fast) is dnsstub.Record
    assert fast == plain and hash(fast) == hash(plain) and repr(fast) == repr(plain)
    assert pickle.loads(pickle.dumps(fast)) == plain
    with pytest.raises(AttributeError):
        fast.ttl = 0
