#!/usr/bin/env python3
"""floor.py - the least a threaded Python server can do, as a yardstick beside the peers.

Two servers that keep the project's design (one thread a connection, socketserver, worker
processes sharing one listening port) and its durability, and do nothing else: no command
is checked, no address parsed, no line counted, no header added, nothing logged, no other
process told. Measured beside Postfix or Dovecot in the same run (smtp_bench.py --floor,
pop3_bench.py --floor), they show how far any Python server of this shape can go on this
machine, and so what a ratio target asks of the language rather than of the code:

  smtp   every DATA is unstuffed, written into MAILDIR/tmp/, fsynced and renamed into new/
         before the 250 (a 250 answers every other command). With --spool, the message is first
         written over this thread's own spool file and fsynced before the 250, and put into
         the Maildir only after the 250 is sent: two durable files a message, as in a mail
         system with a queue (the name's directory is not fsynced in either mode).
  pop3   any user and password; the listing is made at PASS from MAILDIR's cur/ and new/;
         RETR opens, reads and closes the file, turns LF into CRLF, stuffs dots and sends
         the reply in one call.

Each listens on 127.0.0.1 (port 0: any free one, printed as "listening on 127.0.0.1 port
N") with --processes worker processes (default: one per CPU) that share the socket, until
SIGTERM or SIGINT. Loopback only.

    python3 bench/floor.py smtp --maildir DIR [--spool DIR] [--port N] [--processes N]
    python3 bench/floor.py pop3 --maildir DIR [--port N] [--processes N]
"""

import argparse
import itertools
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time

import peers

HOST = peers.HOST
READ_BLOCK = 65536
MAX_MESSAGE = 1 << 24                     # octets a RETR reads of one file


class FloorServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):    # a client gone is not news
            super().handle_error(request, client_address)


def lines(sock):
    """Yield the command lines the client sends (without CRLF); after send(True), yield
    the message that follows a DATA instead, unstuffed, up to the lone dot."""
    buffer = b""
    while True:
        buffer = received_until(sock, buffer, b"\r\n")
        if buffer is None:
            return
        line, _, buffer = buffer.partition(b"\r\n")
        if (yield line):
            buffer = received_until(sock, buffer, b"\r\n.\r\n")
            if buffer is None:
                return
            message, _, buffer = buffer.partition(b"\r\n.\r\n")
            message = b"\r\n" + message + b"\r\n"
            if b"\r\n." in message:
                message = message.replace(b"\r\n..", b"\r\n.")
            yield message[2:]


def received_until(sock, buffer, marker):
    """buffer with what the client sends until it holds marker; None if the client leaves."""
    while marker not in buffer:
        block = sock.recv(READ_BLOCK)
        if not block:
            return None
        buffer += block
    return buffer


def write_durably(path, data, over=False):
    """Write data into a new file at path, or over the file there (over=True), and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if over else os.O_EXCL), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if over:
            os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


class SmtpFloor(socketserver.BaseRequestHandler):
    maildir = spool = None
    counter = itertools.count(1)

    def handle(self):
        sock = self.request
        sock.sendall(b"220 floor ESMTP\r\n")
        reader = lines(sock)
        for line in reader:
            verb = line[:4].upper()
            if verb == b"DATA":
                sock.sendall(b"354 go ahead\r\n")
                try:
                    message = reader.send(True)
                except StopIteration:         # the client left mid-message
                    return
                self.store(sock, message)
            elif verb == b"QUIT":
                sock.sendall(b"221 2.0.0 bye\r\n")
                return
            elif verb == b"EHLO":
                sock.sendall(b"250-floor\r\n250 PIPELINING\r\n")
            else:
                sock.sendall(b"250 2.0.0 ok\r\n")

    def store(self, sock, message):
        name = "%d.P%dT%dQ%d.floor" % (time.time(), os.getpid(), threading.get_ident(),
                                       next(self.counter))
        if self.spool:
            queue_file = os.path.join(self.spool, "%d.%d" % (os.getpid(), threading.get_ident()))
            write_durably(queue_file, message, over=True)
            sock.sendall(b"250 2.0.0 queued\r\n")
        temporary = os.path.join(self.maildir, "tmp", name)
        write_durably(temporary, message)
        os.rename(temporary, os.path.join(self.maildir, "new", name))
        if not self.spool:
            sock.sendall(b"250 2.0.0 delivered\r\n")


class Pop3Floor(socketserver.BaseRequestHandler):
    maildir = None

    def handle(self):
        sock = self.request
        sock.sendall(b"+OK floor\r\n")
        files, sizes = [], []
        for line in lines(sock):
            verb = line[:4].upper()
            if verb == b"RETR":
                fd = os.open(files[int(line[5:]) - 1], os.O_RDONLY)
                try:
                    text = os.read(fd, MAX_MESSAGE)
                finally:
                    os.close(fd)
                text = text.replace(b"\n", b"\r\n")
                if b"\n." in text:
                    text = text.replace(b"\n.", b"\n..")
                if text.startswith(b"."):
                    text = b"." + text
                sock.sendall(b"+OK\r\n" + text + b".\r\n")
            elif verb == b"PASS":
                files = sorted(os.path.join(self.maildir, sub, name) for sub in ("cur", "new")
                               for name in os.listdir(os.path.join(self.maildir, sub)))
                sizes = [os.stat(path).st_size for path in files]
                sock.sendall(b"+OK\r\n")
            elif verb == b"LIST":
                sock.sendall(b"+OK\r\n" + b"".join(b"%d %d\r\n" % (number, size) for number, size
                                                   in enumerate(sizes, 1)) + b".\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"+OK bye\r\n")
                return
            else:
                sock.sendall(b"+OK\r\n")


def serve(kind, maildir, port, processes, spool=None):
    """Listen, fork the other worker processes, serve until SIGTERM or SIGINT."""
    handler = SmtpFloor if kind == "smtp" else Pop3Floor
    handler.maildir = os.path.abspath(maildir)
    if kind == "smtp":
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(handler.maildir, sub), exist_ok=True)
        if spool:
            handler.spool = os.path.abspath(spool)
            os.makedirs(handler.spool, exist_ok=True)
    server = FloorServer((HOST, port), handler)
    print("floor %s listening on %s port %d" % (kind, HOST, server.server_address[1]), flush=True)
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            children = None
            break
        children.append(pid)

    def stop(*_):
        for pid in children or []:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


class Floor(peers.OwnProcess):
    """A floor server started as a process of its own (its workers are its children), on
    a free port; stop() ends the process we started, which ends its workers."""

    def __init__(self, kind, maildir, processes=None, spool=None, log_path=None):
        self.kind = kind
        self.maildir = os.path.abspath(maildir)
        self.command = [sys.executable, os.path.abspath(__file__), kind, "--maildir",
                        self.maildir, "--processes", str(processes or os.cpu_count() or 1)]
        if spool:
            self.command += ["--spool", os.path.abspath(spool)]
        self.log_path = log_path
        self.process = None
        self.port = None

    def start(self, timeout=30.0):
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log)
        finally:
            if self.log_path:
                log.close()
        ready = threading.Timer(timeout, self.process.kill)
        ready.start()
        try:
            line = self.process.stdout.readline().decode()
        finally:
            ready.cancel()
        if "port" not in line:
            self.stop()
            raise RuntimeError("floor %s did not start" % self.kind)
        self.port = int(line.rsplit(None, 1)[1])
        return self


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("smtp", "pop3"))
    parser.add_argument("--maildir", required=True, help="the Maildir written (smtp) or read (pop3)")
    parser.add_argument("--spool", help="smtp: a folder for each thread's spool file; the "
                        "message is durable there before the 250 and in the Maildir after it")
    parser.add_argument("--port", type=int, default=0, help="default 0: a free port")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="worker processes sharing the listener (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.spool and args.kind != "smtp":
        parser.error("--spool is for smtp")
    serve(args.kind, args.maildir, args.port, max(1, args.processes), args.spool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
