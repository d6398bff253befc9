"""dnsmx.py - a small dig: where mail for a domain goes, or any record, asked over the wire.

Prints the delivery plan of RFC 5321 5.1 for a domain (MX hosts by preference with their
addresses, the implicit MX, the null MX of RFC 7505), or the A, AAAA, TXT, PTR, CNAME, NS or
SOA records of a name in dig's presentation format. The resolver itself, which builds and
parses the packets by hand, is dnsstub.py; this file is only its command line.

Run: python3 dnsmx.py [--server HOST[:PORT]] [--tcp] [--timeout S] [--attempts N] [--short]
                      [--explain] NAME [TYPE]

Speed: a run should cost no more than dig's (bench/dns_bench.py). Python compiles the script
it is given at every run, and caches only imported modules, so the resolver lives in
dnsstub.py and this file stays small; and the options are read by hand, because importing
argparse (with re, gettext and locale) would cost a quarter of the run.
"""

import sys

from dnsstub import (CLASS_IN, EXIT_USAGE, TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_MX, TYPE_NS,
                     TYPE_PTR, TYPE_SOA, TYPE_TXT, DNSError, DNSNameError, NullMXError,
                     Resolver, dotted, normalize_name, reverse_name, type_code)

__all__ = ["main", "parse_arguments", "format_record", "format_rdata", "UsageError"]

EXIT_FOUND = 0                   # an answer (a null MX is one)
EXIT_NOT_FOUND = 1               # permanent: NXDOMAIN, NODATA, bad name
EXIT_TEMPORARY = 2               # temporary: SERVFAIL, REFUSED, timeout, malformed reply
# EXIT_USAGE (64, sysexits.h EX_USAGE): a bad command line.

PROG = "dnsmx.py"
USAGE = """\
usage: dnsmx.py [-h] [--server HOST[:PORT]] [--tcp] [--timeout S] [--attempts N] [--short]
                [--explain] NAME [TYPE]
"""
HELP = USAGE + """
Look up where mail for a domain goes (MX, RFC 5321 5.1), or any A, AAAA, TXT, PTR, CNAME, NS
or SOA record, like a small dig.

positional arguments:
  NAME                  domain name, or an IP address for PTR
  TYPE                  MX (default: the delivery plan), A, AAAA, TXT, PTR, CNAME, NS, SOA
                        or TYPEnnn

options:
  -h, --help            show this help message and exit
  --server HOST[:PORT]  nameserver to ask instead of those in /etc/resolv.conf; IPv6 as
                        [::1]:53; may be repeated
  --tcp                 ask over TCP only
  --timeout S           seconds to wait for each try (default: resolv.conf, else 5)
  --attempts N          tries per server (default: resolv.conf, else 2)
  --short               print only the data, like dig +short
  --explain             print each lookup and RFC 5321 5.1 decision as it is taken

Exit status: 0 found (a null MX too: the record is printed), 1 no such name or record
(NXDOMAIN, NODATA, no MX host with an address), 2 temporary failure (SERVFAIL, REFUSED,
timeout, malformed reply), 64 bad command line.
"""

# Options without a value, and options with one: {flag: (attribute, conversion, its name)}.
SWITCHES = {"--tcp": "tcp", "--short": "short", "--explain": "explain"}
VALUED = {"--server": ("server", str, None), "--timeout": ("timeout", float, "float"),
          "--attempts": ("attempts", int, "int")}


# --- Command line ---


class UsageError(ValueError):
    """A command line that cannot be run; the text says why, as argparse would."""


class Arguments:
    """What parse_arguments() read: attributes named after the options, and help."""

    def __init__(self):
        self.name = None
        self.rtype = "MX"
        self.server = None       # a list when --server was given, in the order given
        self.tcp = self.short = self.explain = self.help = False
        self.timeout = self.attempts = None


def parse_arguments(argv):
    """Read ARGV (without the program name) into an Arguments; raise UsageError.

    The grammar is argparse's for the options in HELP, each written in full: `--opt VALUE`
    or `--opt=VALUE`, switches anywhere, `--` ends the options, NAME then an optional TYPE.
    """
    args = Arguments()
    positional = []
    items = iter(argv)
    for item in items:
        if item == "--":
            positional.extend(items)
            break
        if not item.startswith("-") or item == "-":
            positional.append(item)
            continue
        flag, equals, value = item.partition("=")
        if flag in ("-h", "--help") and not equals:
            args.help = True
        elif flag in SWITCHES and not equals:
            setattr(args, SWITCHES[flag], True)
        elif flag in VALUED:
            attribute, convert, kind = VALUED[flag]
            if not equals:
                value = next(items, None)
                if value is None or value.startswith("--"):
                    raise UsageError("argument %s: expected one argument" % flag)
            try:
                value = convert(value)
            except ValueError:
                raise UsageError("argument %s: invalid %s value: %r"
                                 % (flag, kind, value)) from None
            if attribute == "server":
                args.server = (args.server or []) + [value]
            else:
                setattr(args, attribute, value)
        else:
            raise UsageError("unrecognized arguments: %s" % item)
    if args.help:
        return args
    if not positional:
        raise UsageError("the following arguments are required: NAME")
    if len(positional) > 2:
        raise UsageError("unrecognized arguments: %s" % " ".join(positional[2:]))
    args.name = positional[0]
    if len(positional) == 2:
        args.rtype = positional[1]
    return args


# --- Presentation, as dig prints ---


def _escape_text(octets):
    """A TXT character-string quoted the way dig prints it."""
    out = ['"']
    for octet in octets:
        if octet == 0x22 or octet == 0x5C:
            out.append("\\" + chr(octet))
        elif 0x20 <= octet <= 0x7E:
            out.append(chr(octet))
        else:
            out.append("\\%03d" % octet)
    out.append('"')
    return "".join(out)


def format_rdata(record):
    """The data part of a record as dig prints it."""
    data = record.data
    if record.rtype in (TYPE_A, TYPE_AAAA):
        return data
    if record.rtype in (TYPE_CNAME, TYPE_PTR, TYPE_NS):
        return dotted(data)
    if record.rtype == TYPE_MX:
        return "%d %s" % (data.preference, dotted(data.exchange))
    if record.rtype == TYPE_TXT:
        return " ".join(_escape_text(string) for string in data)
    if record.rtype == TYPE_SOA:
        return "%s %s %d %d %d %d %d" % (dotted(data.mname), dotted(data.rname), data.serial,
                                         data.refresh, data.retry, data.expire, data.minimum)
    return "\\# %d %s" % (len(data), data.hex().upper())          # RFC 3597 5


def format_record(record):
    """One line like dig's answer section: name TTL IN TYPE data, tab-separated."""
    rclass = "IN" if record.rclass == CLASS_IN else "CLASS%d" % record.rclass
    return "%s\t%d\t%s\t%s\t%s" % (dotted(record.name), record.ttl, rclass,
                                   record.type_name, format_rdata(record))


def _print_mx_plan(resolver, name, args, explain, out):
    try:
        plan = resolver.mx_hosts(name, explain=explain)
    except NullMXError:
        # RFC 7505: a null MX is a record that was found; the domain accepts no mail, which
        # is the answer, so the exit status is EXIT_FOUND. The record is printed as dig would.
        answer = resolver.resolve(name, TYPE_MX)
        for record in answer.cnames + answer.records:
            out(format_rdata(record) if args.short else format_record(record))
        if not args.short:
            out("%s null MX: accepts no mail (RFC 7505)" % dotted(normalize_name(name)))
        return
    if args.short:
        for host in plan:
            out("%d %s %s" % (host.preference, dotted(host.name), " ".join(host.addresses)))
        return
    if plan[0].implicit:
        out("%s has no MX records: implicit MX, delivery goes to the domain itself "
            "(RFC 5321 5.1)" % dotted(plan[0].name))
    else:
        out("%s delivery plan (RFC 5321 5.1), hosts in the order delivery tries them; "
            "IPv4 addresses before IPv6:" % dotted(normalize_name(name)))
    for index, host in enumerate(plan, 1):
        out("%d. %s preference %d%s: %s" % (
            index, dotted(host.name), host.preference, " (implicit MX)" if host.implicit
            else "", ", ".join(host.addresses)))


def _print_records(resolver, name, rtype, args, explain, out):
    answer = resolver.resolve(name, rtype, explain=explain)
    for record in answer.cnames + answer.records:
        out(format_rdata(record) if args.short else format_record(record))


def main(argv=None):
    """Command line: print the delivery plan or the records; return the exit status."""
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write("%s%s: error: %s\n" % (USAGE, PROG, exc))
        return EXIT_USAGE
    if args.help:
        sys.stdout.write(HELP)
        return EXIT_FOUND

    def out(line):
        sys.stdout.write(line + "\n")

    def explain(step):
        out("; " + step)

    try:
        rtype = type_code(args.rtype)
        if args.timeout is not None and not 0 < args.timeout <= 3600:
            raise ValueError("--timeout must be between 0 and 3600 seconds")
        if args.attempts is not None and not 1 <= args.attempts <= 100:
            raise ValueError("--attempts must be between 1 and 100")
        resolver = Resolver(args.server, timeout=args.timeout, attempts=args.attempts,
                            tcp=args.tcp)
    except ValueError as exc:
        sys.stderr.write("dnsmx: %s\n" % exc)
        return EXIT_USAGE
    name = args.name
    try:
        if rtype == TYPE_PTR and (":" in name or name.replace(".", "").isdigit()):
            try:
                name = reverse_name(name)
            except DNSNameError:
                pass
        if rtype == TYPE_MX:
            _print_mx_plan(resolver, name, args, explain if args.explain else None, out)
        else:
            _print_records(resolver, name, rtype, args, explain if args.explain else None, out)
        sys.stdout.flush()
    except DNSError as exc:
        sys.stdout.flush()
        sys.stderr.write("dnsmx: %s\n" % exc)
        return EXIT_NOT_FOUND if exc.permanent else EXIT_TEMPORARY
    except KeyboardInterrupt:
        sys.stderr.write("dnsmx: interrupted\n")
        return EXIT_TEMPORARY
    except BrokenPipeError:
        return EXIT_FOUND
    return EXIT_FOUND


if __name__ == "__main__":
    raise SystemExit(main())
