"""A throwaway dnsmasq on 127.0.0.1 for tests and benches: real DNS answers, no system resolver.

Records are ordinary dnsmasq options, written by hand or with the helpers below. Every name
not given is NXDOMAIN (`--local=/#/`), so nothing is ever forwarded off the host.

    from dnsmasq_server import start_dnsmasq, mx_host, host_record, null_mx

    with start_dnsmasq([mx_host("example.test", "mx.example.test", 10),
                        host_record("mx.example.test", "127.0.0.2", "::2"),
                        null_mx("nomail.test")]) as dns:
        resolver = dnsstub.Resolver([dns.address])        # "127.0.0.1:PORT"

As a pytest fixture:

    @pytest.fixture(scope="module")
    def dns():
        require_tool("dnsmasq", "dnsmasq-base")
        with start_dnsmasq([...]) as server:
            yield server

`auth_zone="test"` runs dnsmasq as the authoritative server of that zone instead: negative
answers then carry the zone's SOA (for RFC 2308 negative caching), answers carry no
additional section, and a CNAME chain is answered one link per query. dnsmasq refuses CNAME
loops on its command line, so a loop needs a scripted server.

The server is stopped by its own process id (stop(), or leaving the with block).
"""

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["DnsServer", "start_dnsmasq", "dnsmasq_path", "mx_host", "host_record",
           "txt_record", "cname", "ptr_record", "null_mx", "raw_record"]

DNSMASQ_CANDIDATES = ("/usr/sbin/dnsmasq", "/sbin/dnsmasq")
READY_TIMEOUT = 5.0              # seconds for dnsmasq to start answering
STOP_TIMEOUT = 5.0               # seconds between SIGTERM and SIGKILL
START_TRIES = 5                  # fresh ports tried when the chosen one is taken


@dataclass
class DnsServer:
    """A running dnsmasq; `address` is the HOST:PORT form dnsstub and --dns options take."""

    host: str
    port: int
    process: subprocess.Popen
    command: list
    log_path: str = field(repr=False)

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def log(self):
        """What dnsmasq wrote to stderr (start-up lines; queries with log_queries=True)."""
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read(1 << 20)
        except OSError:
            return ""

    def stop(self):
        """Stop this dnsmasq (and only it) and remove its log file."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def dnsmasq_path():
    """Path of the dnsmasq binary, or None when it is not installed."""
    found = shutil.which("dnsmasq")
    if found:
        return found
    return next((path for path in DNSMASQ_CANDIDATES if os.access(path, os.X_OK)), None)


# --- Record options ---


def mx_host(domain, target, preference=10):
    return "--mx-host=%s,%s,%d" % (domain, target, preference)


def host_record(name, *addresses, ttl=None):
    """A, AAAA and the matching PTR records for NAME (dnsmasq --host-record)."""
    return "--host-record=%s,%s%s" % (name, ",".join(addresses),
                                      "" if ttl is None else ",%d" % ttl)


def txt_record(name, *strings):
    """One TXT record with one character-string per argument (each at most 255 octets)."""
    for string in strings:
        if "," in string or len(string) > 255:
            raise ValueError("dnsmasq TXT strings cannot hold commas or exceed 255 octets")
    return "--txt-record=%s,%s" % (name, ",".join(strings))


def cname(alias, target):
    return "--cname=%s,%s" % (alias, target)


def ptr_record(name, target):
    return "--ptr-record=%s,%s" % (name, target)


def raw_record(name, rtype, rdata):
    """Any record type with RDATA given as bytes (dnsmasq --dns-rr)."""
    return "--dns-rr=%s,%d,%s" % (name, rtype, rdata.hex())


def null_mx(domain):
    """RFC 7505 null MX: preference 0, exchange the root (a single zero octet)."""
    return raw_record(domain, 15, b"\x00\x00\x00")


# --- Start-up ---


def udp_and_tcp_sockets(host="127.0.0.1"):
    """(udp, tcp) sockets bound to one free port on host, as a DNS server needs: a port free
    for UDP may be taken for TCP, so another is tried then."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP on %s" % host)


def _free_port(host):
    """A port free for both UDP and TCP right now (dnsmasq needs both)."""
    udp, tcp = udp_and_tcp_sockets(host)
    with udp, tcp:
        return udp.getsockname()[1]


def _probe(host, port, timeout):
    """True once the server answers a query for "." SOA with anything at all."""
    query = struct.pack("!6H", 0x5EED, 0, 1, 0, 0, 0) + b"\x00" + struct.pack("!2H", 6, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, (host, port))
            sock.recvfrom(4096)
            return True
        except OSError:
            return False


def start_dnsmasq(records=(), *, ttl=300, auth_zone=None, host="127.0.0.1", port=None,
                  log_queries=False, extra_args=(), binary=None, ready_timeout=READY_TIMEOUT):
    """Start dnsmasq serving RECORDS (dnsmasq options) on HOST and a free port; return a
    DnsServer once it answers. TTL is the TTL of every local record (--local-ttl)."""
    if not host.startswith("127."):
        raise ValueError("tests stay on loopback: %r" % host)
    binary = binary or dnsmasq_path()
    if binary is None:
        raise FileNotFoundError("dnsmasq not installed (apt-get install dnsmasq-base)")
    zone_args = []
    if auth_zone:
        zone_args = ["--auth-server=ns.%s,%s" % (auth_zone, host), "--auth-zone=%s" % auth_zone,
                     "--auth-soa=1,hostmaster.%s,1200,120,604800" % auth_zone,
                     "--auth-ttl=%d" % ttl]
    last_log = ""
    for _ in range(1 if port else START_TRIES):
        chosen = port or _free_port(host)
        command = [binary, "--conf-file=/dev/null", "--pid-file", "--no-resolv", "--no-hosts",
                   "--bind-interfaces", "--listen-address=%s" % host, "--port=%d" % chosen,
                   "--keep-in-foreground", "--log-facility=-", "--local=/#/",
                   "--local-ttl=%d" % ttl]
        command += zone_args + (["--log-queries"] if log_queries else [])
        command += list(extra_args) + list(records)
        handle, log_path = tempfile.mkstemp(prefix="dnsmasq-", suffix=".log")
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=handle)
        os.close(handle)
        server = DnsServer(host, chosen, process, command, log_path)
        deadline = time.monotonic() + ready_timeout
        while process.poll() is None and time.monotonic() < deadline:
            if _probe(host, chosen, 0.05):
                return server
        last_log = server.log()
        server.stop()
        if "in use" not in last_log:
            break
    raise RuntimeError("dnsmasq did not start: %s" % last_log.strip()[-2000:])

