"""Capture real dnsmasq answers as parser fixtures: tests/fixtures/dns/*.bin + manifest.json.

The queries are put together here with struct, independently of dnsmx.py, and sent to a
dnsmasq started with the records of ZONE; each reply is stored byte for byte (TCP replies
without their length prefix). The tests parse these files, so the parser is checked against
another implementation's encoder, not only against its own.

Run: python3 tests/capture_dns_fixtures.py [--out tests/fixtures/dns]
"""

import argparse
import json
import os
import socket
import struct
import sys

from dnsmasq_server import (cname, host_record, mx_host, null_mx, ptr_record, raw_record,
                            start_dnsmasq, txt_record)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "fixtures", "dns")
BIG_TXT = ["%s" % (letter * 250) for letter in "abcdef"]      # 1506 octets: beyond 1232

# The records every DNS test serves; tests/test_dnsmx.py uses the same list.
ZONE = [
    mx_host("example.test", "mx1.example.test", 10),
    mx_host("example.test", "mx2.example.test", 10),
    mx_host("example.test", "mx3.example.test", 20),     # mx3 has no address at all
    host_record("mx1.example.test", "127.0.0.11", "::11"),
    host_record("mx2.example.test", "127.0.0.12"),
    mx_host("backup.test", "mx1.example.test", 10),
    mx_host("backup.test", "far.example.test", 30),
    host_record("far.example.test", "127.0.0.30"),
    host_record("implicit.test", "127.0.0.20", "::20"),
    host_record("v6only.test", "::21"),
    null_mx("nullmx.test"),
    host_record("nullmx.test", "127.0.0.22"),            # an address, yet no mail
    cname("alias.test", "mx1.example.test"),
    cname("a2.test", "alias.test"),
    mx_host("mxcname.test", "alias.test", 5),             # MX target is a CNAME
    cname("c1.test", "c2.test"), cname("c2.test", "c3.test"), cname("c3.test", "c4.test"),
    cname("c4.test", "implicit.test"),
] + [cname("long%d.test" % n, "long%d.test" % (n + 1)) for n in range(10)] + [
    host_record("long10.test", "127.0.0.40"),
    txt_record("txt.test", "v=spf1 ip4:127.0.0.0/8", " -all"),
    txt_record("txt.test", "second record"),
    txt_record("big.test", *BIG_TXT),
    ptr_record("99.0.0.127.in-addr.arpa", "mx1.example.test"),
    mx_host("dangling.test", "mx.outside.example", 10),   # NXDOMAIN here, REFUSED by auth
    mx_host("partial.test", "mx1.example.test", 10),
    mx_host("partial.test", "mx.outside.example", 20),
    raw_record("raw.test", 65280, b"\x01\x02\x03"),
    raw_record("binary.test", 16, b"\x05a\"\\\xffb"),     # TXT with a quote, backslash, 0xff
]

# (file stem, name, type, transport, EDNS) asked of the plain (recursive-style) dnsmasq.
LOCAL_QUERIES = [
    ("mx_example", "example.test", 15, "udp", True),
    ("mx_null", "nullmx.test", 15, "udp", True),
    ("mx_cname_target", "mxcname.test", 15, "udp", True),
    ("nxdomain", "nope.test", 1, "udp", True),
    ("nodata_aaaa", "mx2.example.test", 28, "udp", True),
    ("a_cname_chain", "a2.test", 1, "udp", True),
    ("aaaa", "mx1.example.test", 28, "udp", True),
    ("txt_multi", "txt.test", 16, "udp", True),
    ("txt_binary", "binary.test", 16, "udp", True),
    ("ptr", "99.0.0.127.in-addr.arpa", 12, "udp", True),
    ("unknown_type", "raw.test", 65280, "udp", True),
    ("txt_big_udp_truncated", "big.test", 16, "udp", True),
    ("txt_big_tcp", "big.test", 16, "tcp", True),
    ("a_no_edns", "mx2.example.test", 1, "udp", False),
]

# The same records served by dnsmasq as the authoritative server of "test".
AUTH_QUERIES = [
    ("auth_mx_example", "example.test", 15, "udp", True),
    ("auth_nxdomain_soa", "nope.test", 15, "udp", True),
    ("auth_nodata_soa", "implicit.test", 15, "udp", True),
    ("auth_cname_one_link", "a2.test", 15, "udp", True),
    ("auth_soa", "test", 6, "udp", True),
    ("auth_refused", "outside.example", 1, "udp", True),
]


def encode_query(qid, name, rtype, edns):
    """A query written out field by field (RFC 1035 4.1, RFC 6891 6.1.2)."""
    qname = b"".join(bytes((len(label),)) + label.encode("ascii")
                     for label in name.split(".") if label) + b"\x00"
    header = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    opt = struct.pack("!BHHIH", 0, 41, 1232, 0, 0) if edns else b""
    return header + qname + struct.pack("!2H", rtype, 1) + opt


def ask(server, query, transport):
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.sendto(query, (server.host, server.port))
            return sock.recvfrom(65535)[0]
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        sock.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = sock.recv(65535)
            if not chunk:
                break
            data += chunk
        return data[2:]


def capture(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    manifest = {}
    for mode, queries in (("local", LOCAL_QUERIES), ("auth", AUTH_QUERIES)):
        with start_dnsmasq(ZONE, auth_zone="test" if mode == "auth" else None) as server:
            for index, (stem, name, rtype, transport, edns) in enumerate(queries):
                qid = 0x1000 + len(manifest)
                reply = ask(server, encode_query(qid, name, rtype, edns), transport)
                with open(os.path.join(out_dir, stem + ".bin"), "wb") as handle:
                    handle.write(reply)
                manifest[stem] = {"name": name, "type": rtype, "id": qid, "transport": transport,
                                  "edns": edns, "server": "dnsmasq " + mode}
    with open(os.path.join(out_dir, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.write("\n")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the fixtures")
    args = parser.parse_args(argv)
    manifest = capture(args.out)
    print("captured %d replies into %s" % (len(manifest), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
