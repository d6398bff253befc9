"""A scriptable SMTP sink on 127.0.0.x for the smtp_out tests and bench.

It plays the remote MX: a real socket server (plumbing.ThreadedServer) whose replies a test
sets per stage, which can stall, drop the connection or fail the TLS handshake, and which
records every message exactly as it arrived (after removing the dot-stuffing).
"""

import base64
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import plumbing


@dataclass
class Received:
    """One message as the sink saw it."""
    mail_from: str
    mail_params: str
    rcpt_to: list
    data: bytes
    helo: str
    tls: bool
    auth_user: Optional[str]
    connection: int


@dataclass
class Script:
    """What the sink answers; every field may be changed while it runs."""
    greeting: str = "220 sink.test ESMTP"
    name: str = "sink.test"            # the domain that begins the reply to EHLO or HELO
    ehlo: bool = True
    extensions: list = field(default_factory=lambda: [
        "PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"])
    mail_reply: str = "250 2.1.0 OK"
    rcpt_replies: dict = field(default_factory=dict)     # address -> reply line
    rcpt_default: str = "250 2.1.5 OK"
    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"
    end_reply: str = "250 2.0.0 OK queued"
    stall: Optional[str] = None        # "greeting", "mail", "end": never answer there
    tls_break: bool = False            # answer 220 to STARTTLS, then close instead of TLS
    starttls_reply: str = ""           # a refusal to answer STARTTLS with instead of 220
    users: dict = field(default_factory=dict)            # AUTH user -> password
    stall_seconds: float = 30.0
    end_delay: float = 0.0             # seconds between the final dot and the reply


class SinkHandler(plumbing.ConnectionHandler):

    def session(self):
        server = self.server
        script = server.script
        with server.lock:
            server.sessions += 1
            server.active += 1
            server.max_active = max(server.max_active, server.active)
            self.number = server.sessions
        try:
            self.conversation(server, script)
        finally:
            with server.lock:
                server.active -= 1

    def conversation(self, server, script):
        self.helo, self.auth_user = "", None
        if script.stall == "greeting":
            return self.stall()
        self.write(script.greeting)
        if not script.greeting.startswith("220"):
            return
        mail_from, params, rcpt_to = None, "", []
        while True:
            line = self.reader.readline(4096)
            if line is None:
                return
            if self.reader.buffer and not self.offers("PIPELINING"):
                server.pipelining_violations += 1
            text = line.data.decode("utf-8", "replace")
            server.commands.append(text if not text.upper().startswith("AUTH") else "AUTH")
            verb = text.split(" ", 1)[0].upper()
            if verb == "EHLO" and script.ehlo:
                self.helo = text[5:]
                lines = [script.name] + list(script.extensions)
                if server.tls_context is not None and not self.tls:
                    lines.append("STARTTLS")
                if script.users:
                    lines.append("AUTH PLAIN LOGIN")
                for i, item in enumerate(lines):
                    self.write("250%s%s" % ("-" if i < len(lines) - 1 else " ", item))
            elif verb == "HELO":
                self.helo = text[5:]
                self.write("250 " + script.name)
            elif verb == "STARTTLS" and server.tls_context is not None:
                if script.starttls_reply:
                    self.write(script.starttls_reply)
                    continue
                if script.tls_break:
                    self.write("220 2.0.0 go ahead")
                    self.flush()
                    return
                self.start_tls("220 2.0.0 Ready to start TLS")
            elif verb == "AUTH":
                self.write(self.auth(text))
            elif verb == "MAIL":
                if script.stall == "mail":
                    return self.stall()
                reply = script.mail_reply
                if reply.startswith("250"):
                    address, _, params = text[10:].partition(">")
                    mail_from, params, rcpt_to = address.lstrip("<"), params.strip(), []
                self.write(reply)
            elif verb == "RCPT":
                address = text[8:].strip().strip("<>")
                reply = script.rcpt_replies.get(address, script.rcpt_default)
                if mail_from is None:
                    reply = "503 5.5.1 MAIL first"
                if reply.startswith("250"):
                    rcpt_to.append(address)
                self.write(reply)
            elif verb == "DATA":
                if mail_from is None or not rcpt_to:
                    self.write("554 5.5.1 No valid recipients")
                    continue
                self.write(script.data_reply)
                if not script.data_reply.startswith("354"):
                    continue
                data = self.read_data()
                if data is None:
                    return
                if script.stall == "end":
                    return self.stall()
                if script.end_delay:
                    time.sleep(script.end_delay)       # a slow server, the peer played
                reply = script.end_reply
                if reply.startswith("250"):
                    server.record(Received(mail_from, params, rcpt_to, data, self.helo,
                                           self.tls, self.auth_user, self.number))
                mail_from, rcpt_to = None, []
                self.write(reply)
            elif verb == "RSET":
                mail_from, rcpt_to = None, []
                self.write("250 2.0.0 OK")
            elif verb == "NOOP":
                self.write("250 2.0.0 OK")
            elif verb == "QUIT":
                self.write("221 2.0.0 Bye")
                return
            else:
                self.write("502 5.5.2 Command not recognized")

    def offers(self, keyword):
        return any(e.split(" ")[0] == keyword for e in self.server.script.extensions)

    def read_data(self):
        chunks = []
        while True:
            line = self.reader.readline(1 << 20)
            if line is None:
                return None
            if line.data == b"." and line.ending == b"\r\n":
                return b"".join(chunks)
            data = line.data[1:] if line.data.startswith(b".") else line.data
            chunks.append(data + line.ending)

    def auth(self, text):
        parts = text.split()
        users = self.server.script.users
        try:
            if parts[1].upper() == "PLAIN":
                response = parts[2] if len(parts) > 2 else self.challenge("")
                _, user, password = plumbing.decode_plain(response)
            else:
                user = plumbing.decode_base64(self.challenge("VXNlcm5hbWU6")).decode()
                password = plumbing.decode_base64(self.challenge("UGFzc3dvcmQ6")).decode()
        except (plumbing.SASLError, IndexError, UnicodeDecodeError):
            return "501 5.5.2 bad AUTH"
        if users.get(user) != password:
            return "535 5.7.8 Authentication credentials invalid"
        self.auth_user = user
        return "235 2.7.0 Authentication successful"

    def challenge(self, text):
        self.write("334 " + text)
        line = self.reader.readline(4096)
        return line.data.decode() if line is not None else "*"

    def stall(self):
        """Say nothing more for stall_seconds, or until the sink stops."""
        self.flush()
        self.server.stopping.wait(self.server.script.stall_seconds)


class Sink(plumbing.ThreadedServer):
    """Start with Sink.start(host="127.0.0.1", tls_files=..., implicit_tls=...)."""

    def __init__(self, address, script=None, **options):
        super().__init__(address, SinkHandler, idle_timeout=10, **options)
        self.script = script or Script()
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.received = []
        self.commands = []
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.pipelining_violations = 0

    @classmethod
    def start(cls, host="127.0.0.1", port=0, script=None, tls_files=None, **options):
        if tls_files is not None:
            options["tls_context"] = plumbing.server_tls_context(*tls_files)
        server = cls((host, port), script, **options)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server

    def record(self, message):
        with self.arrived:
            self.received.append(message)
            self.arrived.notify_all()

    def wait_for(self, count, timeout=10.0):
        """Wait until count messages arrived; return the list."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def close(self):
        self.stop(grace=0.2)


@dataclass
class MemoryRecipient:
    address: str
    result: Optional[tuple] = None     # (status, reply, dsn, relay, remote_mta)


@dataclass
class MemoryEnvelope:
    sender: str
    arrival: float = 0.0


class MemoryClaim:
    """What smtp_out.OutboundDaemon needs of an mta.Claim, in memory: for tests of the
    worker pool and for the bench, without a spool."""

    def __init__(self, queue_id, sender, recipients, message):
        self.queue_id = queue_id
        self.envelope = MemoryEnvelope(sender)
        self.message = message
        self.recipients = [MemoryRecipient(r) for r in recipients]
        self.groups = {}
        for recipient in self.recipients:
            self.groups.setdefault(recipient.address.rpartition("@")[2], []).append(recipient)
        self.lock = threading.Lock()

    def _set(self, recipient, status, reply, dsn, relay, remote_mta):
        with self.lock:
            recipient.result = (status, reply, dsn, relay, remote_mta)

    def delivered(self, recipient, reply, remote_mta="", relay=""):
        self._set(recipient, "delivered", reply, None, relay, remote_mta)

    def deferred(self, recipient, reply, dsn=None, remote_mta="", relay=""):
        self._set(recipient, "deferred", reply, dsn, relay, remote_mta)

    def failed(self, recipient, reply, dsn=None, remote_mta="", relay=""):
        self._set(recipient, "failed", reply, dsn, relay, remote_mta)

    def statuses(self):
        return [r.result[0] if r.result else None for r in self.recipients]


def plain_token(user, password):
    return base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
