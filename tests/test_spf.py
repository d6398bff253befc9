"""Tests for spf.py: the public RFC 7208 test suite, hostile records, the header and reply
helpers, and real DNS through dnsstub against a dnsmasq the test starts (library and CLI)."""

import email.parser
import email.policy
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnsstub
import spf
from support import ROOT, SLACK, require_tool
from dnsmasq_server import host_record, mx_host, start_dnsmasq, txt_record
from spf_support import ZoneResolver, ZoneServer, load_suite


def zone(records):
    """A ZoneResolver from {name: [{TYPE: value}, ...]}, the suite's zonedata shape."""
    return ZoneResolver(records)


def check(ip, sender, records, helo="mx.client.example", **options):
    return spf.check_sender(ip, sender, helo, zone(records) if isinstance(records, dict)
                            else records, receiver="mx.receiver.example", **options)


def timed(function, *args, **kwargs):
    start = time.monotonic()
    result = function(*args, **kwargs)
    return result, time.monotonic() - start


# --- The RFC 7208 test suite (tests/data/spf, release 2014.04) ---

SUITE = load_suite()

# RFC 7208 7.4 writes the nibbles of an IPv6 %{i} in lower case, as this module does; the
# suite's expected text for this test alone has them in upper case. DNS names are compared
# without regard to case (RFC 4343), so this one explanation is compared case-insensitively.
CASE_INSENSITIVE_EXPLANATIONS = {"v-macro-ip6"}


def check_suite_case(case, resolver):
    """Run one test of the suite through resolver; assert its result and explanation."""
    result = spf.check_sender(case.host, case.mailfrom, case.helo, resolver,
                              receiver="receiver.example.org")
    trace = "\n".join(result.trace)
    assert result.result in case.results, "%s (spec %s)\n%s" % (case.id, case.spec, trace)
    if case.explanation is not None and result.result == "fail":
        expected = "" if case.explanation == "DEFAULT" else case.explanation
        if case.name in CASE_INSENSITIVE_EXPLANATIONS:
            assert result.explanation.lower() == expected.lower(), trace
        else:
            assert result.explanation == expected, trace


@pytest.mark.parametrize("case", SUITE, ids=[case.id for case in SUITE])
def test_rfc7208_suite(case):
    check_suite_case(case, ZoneResolver(case.zonedata))


@pytest.fixture(scope="module")
def zone_server():
    server = ZoneServer()
    yield server
    server.close()


@pytest.mark.parametrize("case", SUITE, ids=[case.id for case in SUITE])
def test_rfc7208_suite_through_dnsmx_and_real_packets(case, zone_server):
    # The same suite, each lookup a real query through dnsstub to a nameserver on loopback:
    # names a macro fills with spaces or "%" (macro-mania-in-domain) must be asked as such.
    zone_server.zone = ZoneResolver(case.zonedata)
    check_suite_case(case, spf.DNSResolver(dnsstub.Resolver(
        [zone_server.address], timeout=0.3, attempts=1, cache_size=0)))


def test_suite_is_loaded_whole():
    assert len(SUITE) == 203
    assert len({case.scenario for case in SUITE}) == 16
    assert len({case.id for case in SUITE}) == len(SUITE)


# --- Hostile records: each ends in permerror after a bounded number of lookups, never a
# hang or a traceback ---


def test_include_loop_is_permerror_after_one_lookup_each():
    resolver = zone({"a.example": [{"TXT": "v=spf1 include:b.example -all"}],
                     "b.example": [{"TXT": "v=spf1 include:c.example -all"}],
                     "c.example": [{"TXT": "v=spf1 include:a.example -all"}]})
    result = check("192.0.2.1", "x@a.example", resolver)
    assert result.result == "permerror"
    assert "loop" in result.problem
    assert len(resolver.queries) == 3


def test_redirect_to_itself_is_permerror():
    result = check("192.0.2.1", "x@a.example",
                   {"a.example": [{"TXT": "v=spf1 redirect=A.EXAMPLE."}]})
    assert result.result == "permerror" and "loop" in result.problem


def test_eleventh_dns_term_is_permerror_and_never_asked():
    names = ["h%d.example" % n for n in range(11)]
    records = {"a.example": [{"TXT": "v=spf1 " + " ".join("a:" + n for n in names) + " -all"}]}
    records.update({name: [{"A": "198.51.100.1"}] for name in names})
    resolver = zone(records)
    result = check("192.0.2.1", "x@a.example", resolver)
    assert result.result == "permerror"
    assert "more than 10 DNS-querying terms" in result.problem
    assert result.dns_terms == 11
    assert ("A", "h10.example") not in resolver.queries
    assert len(resolver.queries) == 1 + 10


def test_a_chain_of_eleven_includes_is_permerror():
    records = {"i%d.example" % n: [{"TXT": "v=spf1 include:i%d.example" % (n + 1)}]
               for n in range(20)}
    resolver = zone(records)
    result = check("192.0.2.1", "x@i0.example", resolver)
    assert result.result == "permerror"
    assert len(resolver.queries) == 11          # i0 ... i10, and i11 is never asked


def test_void_lookups_past_two_are_permerror():
    record = "v=spf1 " + " ".join("exists:nx%d.example" % n for n in range(8)) + " -all"
    resolver = zone({"a.example": [{"TXT": record}]})
    result = check("192.0.2.1", "x@a.example", resolver)
    assert result.result == "permerror" and "void" in result.problem
    assert result.void_lookups == 3
    assert len(resolver.queries) == 1 + 3


def test_mx_with_many_hosts_is_permerror_before_any_address_lookup():
    records = {"a.example": [{"TXT": "v=spf1 mx -all"}]
               + [{"MX": [n, "mx%d.example" % n]} for n in range(50)]}
    resolver = zone(records)
    result = check("192.0.2.1", "x@a.example", resolver)
    assert result.result == "permerror"
    assert [q for q in resolver.queries if q[0] == "A"] == []


def test_ptr_looks_at_ten_names_at_most():
    records = {"a.example": [{"TXT": "v=spf1 ptr -all"}],
               "1.2.0.192.in-addr.arpa": [{"PTR": "h%d.a.example" % n} for n in range(40)]}
    records.update({"h%d.a.example" % n: [{"A": "198.51.100.1"}] for n in range(40)})
    resolver = zone(records)
    result = check("192.0.2.1", "x@a.example", resolver)
    assert result.result == "fail"
    assert len([q for q in resolver.queries if q[0] == "A"]) == 10


def long_record(terms, last, length=5000):
    """A v=spf1 record of at least LENGTH characters: TERMS, then LAST and -all."""
    text = "v=spf1"
    for term in terms:
        if len(text) + len(last) + 6 >= length:
            break
        text += " " + term
    return text + " " + last + " -all"


HOSTS = ["a:host%d.example.test" % n for n in range(400)]
ADDRESSES = ["ip4:198.51.%d.%d" % (n // 250, n % 250) for n in range(400)]


@pytest.mark.parametrize("record", [
    long_record(HOSTS, "a"),                               # 400 DNS terms
    long_record(ADDRESSES, "a:oops%"),                     # a bad macro in the last term
    long_record(ADDRESSES, "a:\xe9.example"),              # not 7-bit ASCII (RFC 7208 3.1)
    long_record(["junk"] * 1000, "a")], ids=["dns-terms", "syntax-at-the-end", "not-ascii",
                                             "unknown-mechanisms"])
def test_five_thousand_character_record_is_permerror_within_the_lookup_limit(record):
    assert len(record) >= 5000
    records = {"long.example": [{"TXT": record}]}
    records.update({"host%d.example.test" % n: [{"A": "198.51.100.1"}] for n in range(400)})
    resolver = zone(records)
    result = check("192.0.2.200", "x@long.example", resolver)
    assert result.result == "permerror", result.trace[-3:]
    assert len(resolver.queries) <= 11


def test_macros_expanding_past_the_limit_are_permerror_without_a_query():
    sender = "x" * 60 + "@" + ".".join(["l" * 60] * 3) + ".example"
    record = "v=spf1 exists:" + "%{s}" * 30 + ".example -all"
    resolver = zone({sender.partition("@")[2]: [{"TXT": record}]})
    result = check("192.0.2.1", sender, resolver)
    assert result.result == "permerror" and "macro expansion" in result.problem
    assert len(resolver.queries) == 1


def test_a_record_of_thousand_macros_is_permerror():
    record = "v=spf1 a:" + "%{i}" * 1200 + ".example -all"
    result = check("192.0.2.1", "x@m.example", {"m.example": [{"TXT": record}]})
    assert result.result == "permerror"


def test_long_expansion_is_cut_from_the_left_to_253_characters():
    # RFC 7208 7.3: the expanded name loses labels on the left until it fits.
    record = "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.%{l}.x.example -all"
    local = "a" * 40
    resolver = zone({"m.example": [{"TXT": record}]})
    result = check("192.0.2.1", local + "@m.example", resolver)
    asked = [name for rtype, name in resolver.queries if rtype == "A"]
    assert result.result == "fail"
    assert asked == [".".join([local] * 5) + ".x.example"]
    assert len(asked[0]) <= 253


def test_a_label_longer_than_63_from_a_macro_is_never_asked():
    resolver = zone({"m.example": [{"TXT": "v=spf1 exists:%{l}.m.example -all"}]})
    result = check("192.0.2.1", "q" * 64 + "@m.example", resolver)
    assert result.result == "fail"
    assert [q for q in resolver.queries if q[0] == "A"] == []


def test_huge_explanation_is_dropped_but_the_fail_stands():
    records = {"m.example": [{"TXT": "v=spf1 -all exp=why.m.example"}],
               "why.m.example": [{"TXT": "%{s}" * 300}]}
    result = check("192.0.2.1", "x" * 60 + "@m.example", records)
    assert result.result == "fail" and result.explanation == ""


def test_slow_dns_ends_in_temperror_at_the_time_limit():
    class SlowResolver(ZoneResolver):
        def answer(self, name, rtype):
            time.sleep(0.05)        # a slow nameserver: at least 0.05 s per lookup
            return super().answer(name, rtype)

    records = {"i%d.example" % n: [{"TXT": "v=spf1 include:i%d.example" % (n + 1)}]
               for n in range(9)}
    resolver = SlowResolver(records)
    result, elapsed = timed(check, "192.0.2.1", "x@i0.example", resolver, timeout=0.2)
    assert result.result == "temperror" and "within" in result.problem
    # Asked in the first 0.2 s, so at most 5 of the chain's 10: none after the limit.
    assert len(resolver.queries) <= 5, resolver.queries
    assert elapsed < 0.2 + SLACK


def test_servfail_of_a_term_is_temperror_and_of_an_explanation_is_ignored():
    records = {"a.example": [{"TXT": "v=spf1 a:down.example -all"}],
               "down.example": ["TIMEOUT"],
               "b.example": [{"TXT": "v=spf1 -all exp=down.example"}]}
    assert check("192.0.2.1", "x@a.example", records).result == "temperror"
    result = check("192.0.2.1", "x@b.example", records)
    assert (result.result, result.explanation) == ("fail", "")


TERM = st.one_of(
    st.sampled_from(["a", "mx", "ptr", "all", "-all", "~all", "?all", "+all", "a/24", "mx//64",
                     "ip4:192.0.2.0/24", "ip6:2001:db8::/32", "include:b.example",
                     "exists:%{i}.b.example", "redirect=b.example", "exp=e.example",
                     "a:%{l1r-}.%{d2}", "ptr:%{d}", "%{p}", "foo=%{h}", "%%", "%{", "=",
                     "ip4:", "a:b.example/33", "include:%{o}", "exists:%{c}.x"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x17f), max_size=12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms=st.lists(TERM, max_size=12), local=st.text(max_size=20), helo=st.text(max_size=20),
       ip=st.sampled_from(["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"]))
def test_arbitrary_records_give_a_result_never_an_exception(terms, local, helo, ip):
    records = {"a.example": [{"TXT": "v=spf1 " + " ".join(terms)}],
               "b.example": [{"TXT": "v=spf1 " + " ".join(reversed(terms))},
                             {"A": "192.0.2.1"}, {"MX": [0, "a.example"]}],
               "e.example": [{"TXT": " ".join(terms)}],
               "1.2.0.192.in-addr.arpa": [{"PTR": "b.example"}]}
    result = spf.check_sender(ip, local + "@a.example", helo, zone(records))
    assert result.result in spf.RESULTS
    for header in (spf.received_spf_header(result),
                   spf.authentication_results_header("mx.receiver.example", result)):
        assert_one_header_field(header)


# --- Macros (RFC 7208 7.4 examples) ---

MACRO_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%{S}", "strong-bad%40email.example.com"),
    ("%%%_%-", "% %20"),
]


@pytest.mark.parametrize("text, expected", MACRO_EXAMPLES)
def test_macro_examples_of_rfc_7208_section_7_4(text, expected):
    assert spf.expand_macros(text, "192.0.2.3", "email.example.com",
                             "strong-bad@email.example.com", resolver=zone({})) == expected


def test_macro_ip6_example_of_rfc_7208_section_7_4():
    assert spf.expand_macros("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01", "email.example.com",
                             "strong-bad@email.example.com", resolver=zone({})) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


def test_explanation_only_macros_need_explanation_text():
    with pytest.raises(spf.SPFSyntaxError):
        spf.expand_macros("%{c}", "192.0.2.3", "example.com", "a@example.com")
    assert spf.expand_macros("%{c} %{r}", "2001:DB8::1", "example.com", "a@example.com",
                             resolver=zone({}), explanation=True,
                             receiver="mx.example.org") == "2001:db8::1 mx.example.org"


@pytest.mark.parametrize("text", ["%{l0}", "%{x}", "%", "%{l", "abc%d"])
def test_bad_macro_strings_are_syntax_errors(text):
    with pytest.raises(spf.SPFSyntaxError):
        spf.expand_macros(text, "192.0.2.3", "example.com", "a@example.com")


# --- Parsing ---


def test_parse_record_keeps_each_directive_and_modifier():
    record = spf.parse_record("v=spf1 -a:%{d}/24//64 ~mx ip6:2001:DB8::/32 redirect=x.example")
    a, mx, ip6 = record.directives
    assert (a.text, a.qualifier, a.mechanism, a.cidr4, a.cidr6) == (
        "-a:%{d}/24//64", "-", "a", 24, 64)
    assert (mx.qualifier, mx.target, mx.cidr4, mx.cidr6) == ("~", (), 32, 128)
    assert (ip6.network, ip6.cidr6) == (0x20010DB8 << 96, 32)
    assert record.redirect == ("x.example",) and record.exp is None


def test_names_of_mechanisms_and_modifiers_are_case_insensitive():
    record = spf.parse_record("V=SPF1 IP4:192.0.2.0/24 -ALL Exp=%{D}.example Redirect=x.example")
    assert [d.mechanism for d in record.directives] == ["ip4", "all"]
    assert record.exp is not None and record.redirect == ("x.example",)


@pytest.mark.parametrize("text", [
    "v=spf1 a:example.com:8080", "v=spf1 ip4:1.2.3.4/33", "v=spf1 include", "v=spf1 mx/032",
    "v=spf1 exp=a.example exp=b.example", "v=spf1 all:x", "v=spf1 a:museum",
    "v=spf1 \ta", "v=spf1 ip6::::1", "v=spf2 -all"])
def test_parse_record_refuses_bad_records(text):
    with pytest.raises(spf.SPFSyntaxError):
        spf.parse_record(text)


# --- Identity, header fields and replies ---


def test_identity_is_mail_from_or_helo_for_the_null_sender():
    assert spf.spf_identity("a@Example.NET", "mx.client.example") == (
        "mailfrom", "Example.NET", "a@Example.NET")
    assert spf.spf_identity("<>", "mx.client.example") == (
        "helo", "mx.client.example", "postmaster@mx.client.example")
    assert spf.spf_identity("", "mx.client.example").identity == "helo"


def test_null_sender_is_checked_against_the_helo_name():
    records = {"mx.client.example": [{"TXT": "v=spf1 a -all"}, {"A": "192.0.2.9"}]}
    result = check("192.0.2.9", "", records)
    assert (result.result, result.identity, result.domain) == (
        "pass", "helo", "mx.client.example")
    assert "smtp.helo=mx.client.example" in spf.authentication_results_header("h.example",
                                                                               result)
    assert 'envelope-from="";' in spf.received_spf_header(result)


def assert_one_header_field(header):
    """HEADER is one field: folded lines only, each short, nothing after it."""
    lines = header.split("\r\n")
    assert all(line[:1] in ("\t", "") for line in lines[1:])
    assert all(len(line) <= 998 for line in lines)
    assert "\n" not in header.replace("\r\n", "") and "\r" not in header.replace("\r\n", "")
    message = email.parser.Parser(policy=email.policy.compat32).parsestr(
        header + "\r\n\r\nbody\r\n")
    assert len(message.keys()) == 1
    return message


def test_received_spf_header_carries_the_rfc_7208_section_9_1_keys():
    records = {"example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]}
    result = check("192.0.2.1", "myname@example.com", records, helo="foo.example.com")
    header = spf.received_spf_header(result, "mybox.example.org")
    message = assert_one_header_field(header)
    value = " ".join(message["Received-SPF"].split())
    assert value == (
        "pass (mybox.example.org: domain of myname@example.com designates 192.0.2.1 as "
        "permitted sender) receiver=mybox.example.org; client-ip=192.0.2.1; "
        'envelope-from="myname@example.com"; helo=foo.example.com; identity=mailfrom; '
        'mechanism="ip4:192.0.2.0/24";')


def test_received_spf_header_names_the_problem_of_a_permerror():
    result = check("192.0.2.1", "a@bad.example", {"bad.example": [{"TXT": "v=spf1 a:museum"}]})
    header = spf.received_spf_header(result)
    assert header.startswith("Received-SPF: permerror (mx.receiver.example: ")
    assert 'problem="bad.example: ' in header


def test_hostile_helo_and_sender_cannot_break_out_of_the_headers():
    records = {"example.com": [{"TXT": "v=spf1 -all"}]}
    helo = 'evil"\r\nX-Injected: yes\\ (x'
    result = check("192.0.2.1", 'a"b\r\nX-Other: 1@example.com', records, helo=helo)
    for header in (spf.received_spf_header(result),
                   spf.authentication_results_header("mx.receiver.example", result)):
        message = assert_one_header_field(header)
        assert "X-Injected" not in message.keys() and "X-Other" not in message.keys()


def test_header_lines_stay_short_for_the_longest_hostile_inputs():
    records = {"example.com": [{"TXT": "v=spf1 include:%{l}.example.com -all"}]}
    result = check("192.0.2.1", "(" * 300 + "\\" * 300 + "@example.com", records,
                   helo='"' * 600, timeout=5)
    assert result.result == "permerror"
    for header in (spf.received_spf_header(result, "r" * 600),
                   spf.authentication_results_header("h" * 600, result)):
        assert_one_header_field(header)


def test_authentication_results_header_per_rfc_8601():
    records = {"example.net": [{"TXT": "v=spf1 -all"}]}
    result = check("192.0.2.1", "user@example.net", records)
    assert spf.authentication_results_header("mx.example.org", result) == (
        "Authentication-Results: mx.example.org; spf=fail\r\n\tsmtp.mailfrom=user@example.net")
    odd = check("192.0.2.1", '"odd user"@example.net', records)
    assert 'smtp.mailfrom="\\"odd user\\"@example.net"' in \
        spf.authentication_results_header("mx.example.org", odd)


def test_authentication_results_values_are_tokens_addresses_or_quoted_strings():
    # RFC 8601 2.2: value = token / quoted-string (RFC 2045 5.1); a pvalue may also be a bare
    # [[local-part] "@"] domain-name, whose domain-name has two labels or more (RFC 6376 3.5).
    value = spf.authres_value
    assert value("mx.example.org") == "mx.example.org"
    assert value("Ab+9xYzQ", address=True) == "Ab+9xYzQ"
    assert value("ab/c+Z==", address=True) == '"ab/c+Z=="'        # "/" and "=" are tspecials
    assert value("a/b=c@example.com", address=True) == "a/b=c@example.com"
    assert value("@example.com", address=True) == "@example.com"
    assert value("user@example.com") == '"user@example.com"'       # "@" only in a pvalue
    assert value("user@localhost", address=True) == '"user@localhost"'
    assert value("[192.0.2.1]", address=True) == '"[192.0.2.1]"'
    assert value("") == '""'
    assert value('say "hi" \\ bye\r\n') == '"say \\"hi\\" \\\\ bye"'
    assert value("d\u00f6rte@example.com", address=True) == '"d\u00f6rte@example.com"'
    assert value("x/" * 300) == '"%s..."' % ("x/" * 300)[:spf.MAX_HEADER_VALUE]


@given(text=st.text(max_size=300), address=st.booleans())
def test_an_authentication_results_value_is_one_line_and_reads_back(text, address):
    value = spf.authres_value(text, address=address)
    assert not set(value) & set("\r\n\x00")
    quoted = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', value)
    if quoted:
        value = re.sub(r"\\(.)", r"\1", quoted.group(1))
    else:
        assert not set(value) & set(' ;()"\\')
    printable = "".join(char for char in text if char.isprintable())
    assert value == printable or value == printable[:spf.MAX_HEADER_VALUE] + "..."


def test_smtp_reply_refuses_fail_and_defers_temperror_only():
    records = {"plain.example": [{"TXT": "v=spf1 -all"}],
               "exp.example": [{"TXT": "v=spf1 -all exp=why.exp.example"}],
               "why.exp.example": [{"TXT": "See https://exp.example/spf?ip=%{i}"}],
               "soft.example": [{"TXT": "v=spf1 ~all"}],
               "broken.example": [{"TXT": "v=spf1 mx:"}],
               "down.example": ["TIMEOUT"]}
    reply = spf.smtp_reply(check("192.0.2.1", "a@plain.example", records))
    assert reply == spf.R550_SPF_FAIL % (
        "plain.example does not allow 192.0.2.1 to send mail for it (SPF)")
    reply = spf.smtp_reply(check("192.0.2.1", "a@exp.example", records))
    assert reply == ("550 5.7.23 exp.example says: See https://exp.example/spf?ip=192.0.2.1")
    assert spf.smtp_reply(check("192.0.2.1", "a@down.example", records)) == \
        spf.R451_SPF_TEMPERROR
    for sender in ("a@soft.example", "a@broken.example", "a@none.example"):
        assert spf.smtp_reply(check("192.0.2.1", sender, records)) is None


def test_smtp_reply_keeps_a_long_explanation_within_a_reply_line():
    records = {"exp.example": [{"TXT": "v=spf1 -all exp=why.exp.example"}],
               "why.exp.example": [{"TXT": "%{l} " * 60}]}
    reply = spf.smtp_reply(check("192.0.2.1", "x" * 60 + "@exp.example", records))
    assert reply.startswith("550 5.7.23 exp.example says: xxx") and reply.endswith("...")
    assert len(reply) + 2 <= 512                      # RFC 5321 4.5.3.1.5


def test_check_host_refuses_a_client_address_that_is_not_one():
    with pytest.raises(ValueError):
        spf.check_host("not-an-ip", "example.com", "a@example.com", "h", zone({}))


def test_trace_shows_each_term_and_each_lookup():
    records = {"example.com": [{"TXT": "v=spf1 ip4:198.51.100.0/24 mx -all"},
                               {"MX": [10, "mx.example.com"]}],
               "mx.example.com": [{"A": "192.0.2.25"}]}
    result = check("192.0.2.25", "a@example.com", records)
    assert result.trace == [
        "check_host(192.0.2.25, example.com, a@example.com), helo mx.client.example",
        'TXT example.com: "v=spf1 ip4:198.51.100.0/24 mx -all"',
        "  ip4:198.51.100.0/24: no match",
        "  mx: DNS-querying term 1 of 10",
        "  MX example.com: mx.example.com",
        "  A mx.example.com: 192.0.2.25",
        "  mx: match, pass",
        "result: pass"]


# --- Real DNS: dnsmasq on loopback, through dnsstub's network path ---

ZONE = [
    txt_record("example.test", "v=spf1 mx include:_spf.partner.test -all"),
    mx_host("example.test", "mx.example.test", 10),
    host_record("mx.example.test", "192.0.2.10", "2001:db8::10"),
    txt_record("_spf.partner.test", "v=spf1 ip4:198.51.100.0/24 include:deep.partner.test ~all"),
    txt_record("deep.partner.test", "v=spf1 ip6:2001:db8:5::/48 -all"),
    txt_record("strict.test", "v=spf1 -all exp=why.strict.test"),
    txt_record("why.strict.test", "%{i} may not send mail for %{d}"),
    txt_record("helo.test", "v=spf1 a -all"),
    host_record("helo.test", "192.0.2.77"),
    # A record of 5,000 characters in strings of 250: a TCP answer, and 300 DNS terms
    # naming hosts that exist.
    txt_record("long.test", *(lambda text: [text[n:n + 250] for n in range(0, len(text), 250)])(
        long_record(["a:h%d.hosts.test" % n for n in range(300)], "a"))),
    "--address=/hosts.test/198.51.100.1",          # every name below hosts.test has an A
]


@pytest.fixture(scope="module")
def dns():
    require_tool("dnsmasq", "dnsmasq-base")
    with start_dnsmasq(ZONE) as server:
        yield server


@pytest.fixture
def real_resolver(dns):
    return spf.DNSResolver(dnsstub.Resolver([dns.address], timeout=2.0, attempts=1))


def test_real_dns_pass_through_mx(real_resolver):
    result = spf.check_sender("2001:db8::10", "alice@example.test", "mx.example.test",
                              real_resolver)
    assert (result.result, result.mechanism) == ("pass", "mx")


def test_real_dns_fail_with_explanation(real_resolver):
    result = spf.check_sender("203.0.113.5", "bob@strict.test", "h.example", real_resolver)
    assert (result.result, result.explanation) == (
        "fail", "203.0.113.5 may not send mail for strict.test")


def test_real_dns_include_chain(real_resolver):
    result = spf.check_sender("2001:db8:5::1", "carol@example.test", "h.example", real_resolver)
    assert (result.result, result.mechanism) == ("pass", "include:_spf.partner.test")
    assert result.dns_terms == 3
    assert any("TXT deep.partner.test" in line for line in result.trace)
    outside = spf.check_sender("203.0.113.9", "carol@example.test", "h.example", real_resolver)
    assert (outside.result, outside.mechanism) == ("fail", "-all")


def test_real_dns_null_sender_checks_helo(real_resolver):
    result = spf.check_sender("192.0.2.77", "", "helo.test", real_resolver)
    assert (result.result, result.identity) == ("pass", "helo")


def test_real_dns_long_record_over_tcp_is_permerror(real_resolver):
    records = real_resolver.txt("long.test")
    assert len(records) == 1 and len(records[0]) >= 5000
    result = spf.check_sender("192.0.2.1", "a@long.test", "h.example", real_resolver)
    assert result.result == "permerror" and "more than 10" in result.problem


def test_real_dns_unreachable_server_is_temperror_within_its_timeout():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % sock.getsockname()[1]    # bound, never answers
        resolver = spf.DNSResolver(dnsstub.Resolver([dead], timeout=0.3, attempts=1))
        result, elapsed = timed(spf.check_sender, "192.0.2.1", "a@example.test", "h.example",
                                resolver)
    assert result.result == "temperror"
    assert elapsed < 0.3 + SLACK


def test_real_dns_check_ends_at_its_time_limit_however_long_each_lookup_may_take():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % sock.getsockname()[1]    # bound, never answers
        # Each lookup alone may take 2 x 10 s; the check as a whole has 0.3 s.
        resolver = spf.DNSResolver(dnsstub.Resolver([dead], timeout=10, attempts=2))
        result, elapsed = timed(spf.check_sender, "192.0.2.1", "a@example.test", "h.example",
                                resolver, timeout=0.3)
    assert result.result == "temperror"
    assert elapsed < 0.3 + SLACK


class ServfailServer:
    """A scripted UDP nameserver on loopback that answers every question SERVFAIL."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                query, client = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            end = 12
            while end < len(query) and query[end]:
                end += query[end] + 1
            question = query[12:end + 5]                 # QNAME, QTYPE, QCLASS
            header = query[:2] + struct.pack("!5H", 0x8182, 1, 0, 0, 0)  # QR RD RA, SERVFAIL
            self.sock.sendto(header + question, client)

    def stop(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def test_real_dns_servfail_is_temperror():
    server = ServfailServer()
    try:
        resolver = spf.DNSResolver(dnsstub.Resolver([server.address], timeout=30, attempts=1))
        result, elapsed = timed(spf.check_sender, "192.0.2.1", "a@example.test", "h.example",
                                resolver)
    finally:
        server.stop()
    assert result.result == "temperror" and "SERVFAIL" in result.problem
    assert elapsed < SLACK                 # at the answer, not after the 30 s timeout


# --- The command line, as a subprocess against dnsmasq ---


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "spf.py"] + list(args), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_pass_exits_0(dns):
    done = run_cli("--ip", "192.0.2.10", "--sender", "alice@example.test", "--dns", dns.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "pass: domain of alice@example.test designates 192.0.2.10 as permitted sender",
        "mechanism: mx"]


def test_cli_fail_exits_1_with_the_explanation(dns):
    done = run_cli("--ip", "203.0.113.5", "--sender", "bob@strict.test", "--dns", dns.address)
    assert done.returncode == 1, done.stderr
    assert "explanation: 203.0.113.5 may not send mail for strict.test" in done.stdout


def test_cli_explain_prints_each_term_and_lookup(dns):
    done = run_cli("--ip", "2001:db8:5::1", "--sender", "carol@example.test", "--helo",
                   "h.example", "--dns", dns.address, "--explain")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for expected in ('; TXT example.test: "v=spf1 mx include:_spf.partner.test -all"',
                     ";   MX example.test: mx.example.test",
                     ";   AAAA mx.example.test: 2001:db8::10",
                     ";   include:_spf.partner.test: DNS-querying term 2 of 10",
                     ";       ip6:2001:db8:5::/48: match, pass",
                     "; result: pass"):
        assert expected in lines
    assert lines[-2].startswith("pass: ")


def test_cli_null_sender_and_none_and_permerror_exit_codes(dns):
    assert run_cli("--ip", "192.0.2.77", "--sender", "<>", "--helo", "helo.test",
                   "--dns", dns.address).returncode == 0
    assert run_cli("--ip", "192.0.2.1", "--sender", "a@nothing.test",
                   "--dns", dns.address).returncode == 4
    done = run_cli("--ip", "192.0.2.1", "--sender", "a@long.test", "--dns", dns.address)
    assert done.returncode == 5 and done.stdout.startswith("permerror: ")


def test_cli_unreachable_dns_is_temperror_exit_6():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        done = run_cli("--ip", "192.0.2.1", "--sender", "a@example.test", "--timeout", "0.5",
                       "--dns", "127.0.0.1:%d" % sock.getsockname()[1])
    assert done.returncode == 6
    assert done.stdout.startswith("temperror: ")


@pytest.mark.parametrize("args", [
    ["--ip", "999.1.1.1", "--sender", "a@example.test"],
    ["--ip", "192.0.2.1", "--sender", "<>"],
    ["--ip", "192.0.2.1", "--sender", "a@example.test", "--dns", "not a server"],
    ["--ip", "192.0.2.1", "--sender", "a@example.test", "--timeout", "-1"],
    ["--sender", "a@example.test"],
])
def test_cli_bad_arguments_exit_64_without_a_traceback(args):
    done = run_cli(*args)
    assert done.returncode == 64
    assert "Traceback" not in done.stderr and done.stderr.strip()


def test_cli_help_exits_0():
    done = run_cli("--help")
    assert done.returncode == 0 and "Exit status" in done.stdout
