"""pop3d.py - POP3 access to local Maildirs (RFC 1939, 2449, 2595, 3206, 5034).

Reads mailboxes through mailbox_store (in --store, by default the spool): logs a user in
(USER/PASS or AUTH PLAIN), holds the exclusive maildrop lock for the session (a lock other
hosts sharing the store see too), lists, streams and deletes messages. Deletions
happen only on QUIT (the UPDATE state); a dropped connection deletes nothing.
STLS upgrades a connection to TLS (RFC 2595); --pop3s-listen adds an implicit-TLS listener.
The process's anvil (plumbing.Anvil) counts failed logins and bad commands per client
address across sessions: a penalised address waits its turn before its password is
checked. A user name that is not valid UTF-8 is an ordinary failed login.

Message numbers are fixed for the session. STAT and LIST give exactly the octets RETR sends
before byte-stuffing: every line ends in CRLF (mail stored with LF is converted) and a
message without a final newline gets one, counted. RETR and TOP stream the file block by
block, converting line ends and stuffing dots as they go (a CR or a line start split
between blocks is carried over), so a 50 MB message never sits in memory; a file gone
before sending starts is -ERR [SYS/TEMP], one that fails half-way closes the connection
rather than end a cut message with ".". UIDL ids are the Maildir file names' unique part
(see mailbox_store), stable across sessions and flag renames. Messages sent move from new/
to cur/ with the Seen flag at QUIT. APOP is left out: it needs the plaintext password on
the server, and the store keeps only salted hashes.

Run: python3 pop3d.py --spool /var/spool/mail --listen 0.0.0.0:110
"""

import logging
import os
import socket
import sys

import mailbox_store
import plumbing

__all__ = ["DEFAULTS", "HELP", "POP3Handler", "POP3Server", "main", "parse_message_number", "split_command"]

DEFAULTS = {
    "spool": "",                    # plumbing.spool_path: $MAILTOOLKIT_SPOOL, else ./mailspool
    "store": "",                    # plumbing.store_path: the spool itself
    "listen": "127.0.0.1:1110",
    "pop3s_listen": "",
    "domain": [],
    "hostname": "",
    "tls_cert": "",
    "tls_key": "",
    "idle_timeout": 600.0,          # RFC 1939 3: the autologout timer is at least 10 minutes
    "allow_plaintext_auth": False,
    "max_connections": 200,
    "max_per_address": 50,
    **plumbing.SERVER_DEFAULTS,    # processes, failed logins and errors slowed, stress mode
    "cpus": "",
    "user": "",
    "syslog": False,
    "verbose": False,
}

HELP = dict(plumbing.SERVER_HELP, **{  # the help of the keys plumbing.SHARED_HELP does not know
    "pop3s_listen": "HOST:PORT of an implicit-TLS POP3 listener (RFC 8314), e.g. 0.0.0.0:995",
    "allow_plaintext_auth": "allow USER/PASS and AUTH without TLS from any address "
                            "(default: only over TLS or from loopback)",
})

POP3_PORT = 110                    # RFC 1939 3
POP3S_PORT = 995                   # RFC 8314 7.3
MAX_COMMAND_LINE = 255             # RFC 2449 4: octets, including the CRLF
MAX_AUTH_LINE = plumbing.MAX_SASL_RESPONSE + 20   # RFC 5034 4: AUTH lines may be longer
MAX_AUTH_FAILURES = 3              # failed logins before the connection is closed
MAX_ERRORS = 20                    # bad commands before the connection is closed
SEND_BUFFER = 256 * 1024           # message bytes gathered before a send

# --- Replies ---
OK_GREETING = "+OK %s POP3 server ready"
OK = "+OK"
OK_CAPA = "+OK capability list follows"
OK_SEND_PASS = "+OK send your password"
OK_LOGGED_IN = "+OK logged in, %d messages (%d octets)"
OK_STAT = "+OK %d %d"
OK_LIST = "+OK %d messages (%d octets)"
OK_SCAN = "+OK %d %d"
OK_UIDL_ALL = "+OK unique-id listing follows"
OK_UID = "+OK %d %s"
OK_RETR = "+OK %d octets"
OK_TOP = "+OK top of message follows"
OK_DELE = "+OK message %d deleted"
OK_RSET = "+OK maildrop has %d messages (%d octets)"
OK_STLS = "+OK begin TLS negotiation"
OK_MECHANISMS = "+OK SASL mechanisms follow"
OK_QUIT = "+OK %s POP3 server signing off"
OK_QUIT_UPDATED = "+OK %s POP3 server signing off (%d messages deleted)"
CONTINUE_EMPTY = "+ "
ERR_UNKNOWN = "-ERR unknown command"
ERR_WRONG_STATE = "-ERR command not valid in this state"
ERR_SYNTAX = "-ERR syntax error"
ERR_LINE_TOO_LONG = "-ERR command line too long"
ERR_BARE_CR = "-ERR command line ends in a bare CR; use CRLF"
ERR_TOO_MANY_ERRORS = "-ERR too many errors, closing connection"
ERR_NO_SUCH_MESSAGE = "-ERR no such message"
ERR_NEED_USER = "-ERR send USER first"
ERR_PLAINTEXT = "-ERR [AUTH] plaintext authentication disallowed without TLS, use STLS"
ERR_AUTH_FAILED = "-ERR [AUTH] authentication failed"
ERR_AUTH_CLOSING = "-ERR [AUTH] authentication failed, closing connection"
ERR_AUTH_THROTTLED = "-ERR [SYS/TEMP] too many failed logins from your address, try again later"
ERR_AUTH_CANCELLED = "-ERR authentication cancelled"
ERR_AUTH_MALFORMED = "-ERR malformed SASL response"
ERR_MECHANISM = "-ERR unsupported authentication mechanism"
ERR_IN_USE = "-ERR [IN-USE] maildrop is locked by another session"
ERR_MAILDROP = "-ERR [SYS/TEMP] cannot open maildrop, try again later"
ERR_STORE_UNAVAILABLE = "-ERR [SYS/TEMP] mailbox store unavailable, try again later"
ERR_MAILDROP_BROKEN = "-ERR [SYS/PERM] maildrop is damaged, contact the administrator"
ERR_MESSAGE_GONE = "-ERR [SYS/TEMP] message is unavailable, try again later"
ERR_UPDATE_FAILED = "-ERR [SYS/TEMP] some deleted messages were not removed"
ERR_STLS = "-ERR STLS not available"
ERR_AUTOLOGOUT = "-ERR autologout: idle for too long"
ERR_STOPPING = "-ERR [SYS/TEMP] server shutting down"
ERR_INTERNAL = "-ERR [SYS/TEMP] internal error"
BUSY = "-ERR [SYS/TEMP] too many connections"

# Maildrop errors that retrying will not cure (RFC 3206 4 [SYS/PERM]).
PERMANENT_ERRORS = (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)

# RFC 1939 4: commands valid in one state only; CAPA, NOOP and QUIT are checked by the handler.
AUTHORIZATION_VERBS = frozenset({"USER", "PASS", "AUTH", "STLS"})
TRANSACTION_VERBS = frozenset({"STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "NOOP"})

log = logging.getLogger("pop3d")


# --- Pure helpers ---

def split_command(data):
    """Split a command line into (upper-case keyword, argument text)."""
    text = data.decode("utf-8", "surrogateescape")
    verb, _, arg = text.lstrip(" ").partition(" ")
    return verb.upper(), arg


def parse_message_number(text):
    """A message number (RFC 1939 5: decimal, no sign), or None."""
    text = text.strip(" ")
    if not text.isdigit() or not text.isascii() or len(text) > 9:
        return None
    return int(text)


def stuff_blocks(blocks):
    """RFC 1939 3: double a "." that starts a line; blocks may split lines anywhere."""
    at_line_start = True
    for block in blocks:
        if not block:
            continue
        # "." in block is a memchr(); base64 attachments have no dots, so no replace() pass.
        stuffed = block.replace(b"\n.", b"\n..") if b"." in block else block
        if at_line_start and block[:1] == b".":
            stuffed = b"." + stuffed
        at_line_start = block.endswith(b"\n")
        yield stuffed


# --- Protocol handler ---

class POP3Handler(plumbing.ConnectionHandler):
    """One POP3 session: AUTHORIZATION, then TRANSACTION, then UPDATE on QUIT."""

    timeout_reply = ERR_AUTOLOGOUT
    stopping_reply = ERR_STOPPING
    crash_reply = ERR_INTERNAL
    log = log

    def setup(self):
        super().setup()
        # Replies are gathered into whole writes already; Nagle would only hold back the
        # tail of each one until the client's delayed ACK.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def session(self):
        self.login_name = None         # from USER, waiting for PASS
        self.mailbox = None            # a mailbox_store.Mailbox once logged in
        self.auth_failures = 0
        self.errors = 0
        self.closing = False
        self.write(OK_GREETING % self.server.hostname)
        try:
            while not self.closing:
                line = self.reader.readline(MAX_AUTH_LINE)
                if line is None:
                    return
                reply = self.dispatch(line)
                if reply is not None:
                    self.pause(self.reply_delay())     # the anvil slows an erring address
                    self.write(reply)
        finally:
            if self.mailbox is not None:
                self.mailbox.close()
                # Let the listing go now (100,000 messages: about 12 MB), not whenever a
                # collection finds this handler's reference cycles.
                self.mailbox = None

    @property
    def cleartext_allowed(self):
        # RFC 2595 3.1 and Dovecot's default: no password over an unprotected remote link.
        return self.tls or self.is_loopback or self.server.allow_plaintext_auth

    def dispatch(self, line):
        if line.ending == b"\r":
            self.discard_rest_of_line()
            return self.error(ERR_BARE_CR)
        verb, arg = split_command(line.data)
        if line.too_long or (len(line.data) + 2 > MAX_COMMAND_LINE and verb != "AUTH"):
            return self.error(ERR_LINE_TOO_LONG)
        handler = getattr(self, "pop3_" + verb, None) if verb.isalpha() and verb.isascii() else None
        if handler is None:
            return self.error(ERR_UNKNOWN)
        if (verb in AUTHORIZATION_VERBS and self.mailbox is not None) or (
                verb in TRANSACTION_VERBS and self.mailbox is None):
            return self.error(ERR_WRONG_STATE)
        return handler(arg)

    def discard_rest_of_line(self):
        """A bare CR ends no command (RFC 1939 3: CRLF does): what follows it up to the
        next LF is part of the same refused line, never a command of its own."""
        while not self.closing:
            line = self.reader.readline(MAX_AUTH_LINE)
            if line is None or not line.ending:
                self.closing = True
            elif line.ending != b"\r":
                return

    def error(self, reply):
        self.count_error()
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.closing = True
            return ERR_TOO_MANY_ERRORS
        return reply

    def write_multiline(self, first, lines):
        """A multi-line response, RFC 1939 3: lines dot-stuffed, then a lone "."."""
        self.write(first)
        for text in lines:
            self.write("." + text if text.startswith(".") else text)
        self.write(".")

    # -- AUTHORIZATION state --

    def pop3_CAPA(self, arg):
        """RFC 2449 5: what this server offers in the current state."""
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.mailbox is None:
            if self.cleartext_allowed:
                capabilities += ["USER", "SASL PLAIN"]
            if self.server.tls_context is not None and not self.tls:
                capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION pop3d.py")
        self.write_multiline(OK_CAPA, capabilities)

    def pop3_STLS(self, arg):
        """RFC 2595 4: upgrade to TLS; the client starts over with CAPA."""
        if self.server.tls_context is None or self.tls:
            return self.error(ERR_STLS)
        self.start_tls(OK_STLS)
        self.login_name = None
        return None

    def pop3_USER(self, arg):
        if not self.cleartext_allowed:
            return self.error(ERR_PLAINTEXT)
        name = arg.strip(" ")
        if not name or len(name) > 255:
            return self.error(ERR_SYNTAX)
        self.login_name = name
        return OK_SEND_PASS

    def pop3_PASS(self, arg):
        if not self.cleartext_allowed:
            return self.error(ERR_PLAINTEXT)
        if self.login_name is None:
            return self.error(ERR_NEED_USER)
        name, self.login_name = self.login_name, None
        # RFC 1939 7: the password is the rest of the line and may contain spaces.
        return self.login(name, arg, "USER")

    def pop3_AUTH(self, arg):
        """RFC 5034: AUTH PLAIN, with an initial response or after a "+ " challenge."""
        mechanism, _, initial = arg.strip(" ").partition(" ")
        if not mechanism:
            self.write_multiline(OK_MECHANISMS, ["PLAIN"] if self.cleartext_allowed else [])
            return None
        if mechanism.upper() != "PLAIN":
            return self.error(ERR_MECHANISM)
        if not self.cleartext_allowed:
            return self.error(ERR_PLAINTEXT)
        self.login_name = None
        response = initial.strip(" ")
        if not response:
            self.write(CONTINUE_EMPTY)
            line = self.reader.readline(MAX_AUTH_LINE)
            if line is None:
                self.closing = True
                return None
            if line.ending == b"\r":
                self.discard_rest_of_line()
                return self.error(ERR_AUTH_MALFORMED)
            if line.too_long:
                return self.error(ERR_AUTH_MALFORMED)
            response = line.data.decode("ascii", "replace").strip()
        if response == "*":
            return ERR_AUTH_CANCELLED          # RFC 5034 4: the client gave up
        try:
            authzid, authcid, password = plumbing.decode_plain(response)
        except plumbing.SASLError:
            return self.error(ERR_AUTH_MALFORMED)
        if authzid and authzid.lower() != authcid.lower():
            self.checked_login(authcid, lambda: None)  # counted as a failure all the same
            return self.fail_login(authcid, "PLAIN", "authorization identity not allowed")
        return self.login(authcid, password, "PLAIN")

    def login(self, name, password, method):
        """Authenticate, then take the maildrop lock and enter the TRANSACTION state."""
        if self.server.store_unavailable():
            # Not the user's fault: no failed login is counted against the address.
            log.error("login refused unchecked: client=[%s], user=%r, method=%s "
                      "(the store's users file is missing)", self.client_ip, name, method)
            return ERR_STORE_UNAVAILABLE
        try:
            user = self.checked_login(
                name, lambda: self.server.store.authenticate(name, password))
        except plumbing.LoginThrottled:
            log.warning("login refused unchecked: client=[%s], user=%r, method=%s "
                        "(anvil: too many failed logins from this address)",
                        self.client_ip, name, method)
            self.closing = True
            return ERR_AUTH_THROTTLED
        if user is None:
            return self.fail_login(name, method, "bad credentials")
        try:
            mailbox = self.server.store.open_mailbox(user)
        except mailbox_store.MailboxBusy:
            log.info("login refused: client=[%s], user=<%s>, method=%s (maildrop in use)",
                     self.client_ip, user, method)
            return ERR_IN_USE
        except (OSError, mailbox_store.UnknownUser) as exc:
            log.error("user=<%s>: cannot open maildrop: %s", user, exc)
            # RFC 3206 4: SYS/PERM when it will not go away without an administrator.
            return ERR_MAILDROP_BROKEN if isinstance(exc, PERMANENT_ERRORS) else ERR_MAILDROP
        self.mailbox = mailbox
        count, octets = mailbox.stat()
        log.info("login: client=[%s], user=<%s>, method=%s, tls=%s, messages=%d, size=%d",
                 self.client_ip, user, method, "yes" if self.tls else "no", count, octets)
        return OK_LOGGED_IN % (count, octets)

    def fail_login(self, name, method, reason):
        """Log, wait longer after each failure, and close after MAX_AUTH_FAILURES."""
        self.auth_failures += 1
        log.warning("login failed: client=[%s], user=%r, method=%s, failures=%d (%s)",
                    self.client_ip, name, method, self.auth_failures, reason)
        self.flush()
        self.pause(self.server.failure_delay(self.auth_failures))
        if self.auth_failures >= self.server.max_auth_failures:
            self.closing = True
            return ERR_AUTH_CLOSING
        return ERR_AUTH_FAILED

    # -- TRANSACTION state --

    def message(self, arg):
        number = parse_message_number(arg)
        return None if number is None else self.mailbox.message(number)

    def pop3_STAT(self, arg):
        return OK_STAT % self.mailbox.stat()

    def pop3_LIST(self, arg):
        if arg.strip(" "):
            info = self.message(arg)
            return OK_SCAN % (info.number, info.size) if info else self.error(ERR_NO_SUCH_MESSAGE)
        count, octets = self.mailbox.stat()
        self.write_multiline(OK_LIST % (count, octets),
                             ["%d %d" % (i.number, i.size) for i in self.mailbox.listing()])
        return None

    def pop3_UIDL(self, arg):
        """RFC 1939 7: unique-ids stable across sessions (from the Maildir file names)."""
        if arg.strip(" "):
            info = self.message(arg)
            return OK_UID % (info.number, info.uid) if info else self.error(ERR_NO_SUCH_MESSAGE)
        self.write_multiline(OK_UIDL_ALL,
                             ["%d %s" % (i.number, i.uid) for i in self.mailbox.listing()])
        return None

    def pop3_RETR(self, arg):
        info = self.message(arg)
        if info is None:
            return self.error(ERR_NO_SUCH_MESSAGE)
        return self.send_message(OK_RETR % info.size, info.number, None)

    def pop3_TOP(self, arg):
        number, _, lines = arg.strip(" ").partition(" ")
        info = self.message(number)
        count = parse_message_number(lines)
        if count is None:
            return self.error(ERR_SYNTAX)
        if info is None:
            return self.error(ERR_NO_SUCH_MESSAGE)
        return self.send_message(OK_TOP, info.number, count)

    def send_message(self, first, number, body_lines):
        """Stream a message in blocks, dot-stuffed, ended by "." (RFC 1939 3)."""
        blocks = stuff_blocks(self.mailbox.read(number, body_lines))
        try:
            block = next(blocks, b"")
        except OSError as exc:
            log.warning("user=<%s>: message %d unavailable: %s", self.mailbox.user, number, exc)
            return ERR_MESSAGE_GONE
        self.write(first)
        while block:
            self.output += block
            if len(self.output) >= SEND_BUFFER:
                self.flush()
            try:
                block = next(blocks, b"")
            except OSError as exc:
                # Too late for -ERR: the client must not take a cut message as whole.
                log.warning("user=<%s>: message %d read failed: %s", self.mailbox.user, number, exc)
                self.output.clear()
                self.closing = True
                return None
        return "."

    def pop3_DELE(self, arg):
        info = self.message(arg)
        if info is None or not self.mailbox.delete(info.number):
            return self.error(ERR_NO_SUCH_MESSAGE)
        return OK_DELE % info.number

    def pop3_RSET(self, arg):
        self.mailbox.reset()
        return OK_RSET % self.mailbox.stat()

    def pop3_NOOP(self, arg):
        return OK

    def pop3_QUIT(self, arg):
        """RFC 1939 6: in TRANSACTION, enter UPDATE: remove what was deleted, then close."""
        self.closing = True
        if self.mailbox is None:
            return OK_QUIT % self.server.hostname
        deleted, retrieved = self.mailbox.marked()
        try:
            self.mailbox.commit()
        except OSError as exc:
            log.error("user=<%s>: update failed: %s", self.mailbox.user, exc)
            return ERR_UPDATE_FAILED
        count, octets = self.mailbox.stat()
        log.info("logout: client=[%s], user=<%s>, retrieved=%d, deleted=%d, left=%d, size=%d",
                 self.client_ip, self.mailbox.user, retrieved, deleted, count, octets)
        return OK_QUIT_UPDATED % (self.server.hostname, deleted)


# --- Server ---

class POP3Server(plumbing.ThreadedServer):
    """A POP3 listener over a mailbox_store.Store; start it on port 0 in tests.

    POP3Server((host, port), config) takes a dict with any keys of DEFAULTS (the rest keep
    their defaults), as smtp_in.SMTPServer does: POP3Server(("127.0.0.1", 0), {"spool": DIR,
    "idle_timeout": 10}). store is a mailbox_store.Store (made from the config when None);
    tls_context overrides tls_cert/tls_key; implicit_tls makes a POP3S listener (RFC 8314);
    anvil is shared between listeners; failure_delay(failures) gives the pause before a
    failed login's reply.
    """

    busy_reply = BUSY
    handler_class = POP3Handler

    def __init__(self, address, config=None, *, store=None, tls_context=None,
                 implicit_tls=False, anvil=None, failure_delay=plumbing.auth_failure_delay,
                 max_auth_failures=MAX_AUTH_FAILURES, bind_and_activate=True):
        settings = plumbing.settings_of(DEFAULTS, config)
        if store is None:
            store = mailbox_store.Store(
                plumbing.store_path(settings["store"], plumbing.spool_path(settings["spool"])),
                settings["domain"], settings["hostname"] or None)
        if tls_context is None and settings["tls_cert"]:
            tls_context = plumbing.server_tls_context(settings["tls_cert"],
                                                      settings["tls_key"] or settings["tls_cert"])
        if implicit_tls and tls_context is None:
            raise ValueError("an implicit TLS listener needs tls_cert and tls_key")
        self.store = store
        self.store_apart = plumbing.store_is_apart(settings["store"], settings["spool"])
        self.hostname = settings["hostname"] or store.hostname
        self.allow_plaintext_auth = bool(settings["allow_plaintext_auth"])
        self.max_auth_failures = max_auth_failures
        self.failure_delay = failure_delay
        super().__init__(address, self.handler_class,
                         max_connections=int(settings["max_connections"]),
                         max_per_address=int(settings["max_per_address"]),
                         idle_timeout=float(settings["idle_timeout"]),
                         tls_context=tls_context, implicit_tls=implicit_tls,
                         stress_threshold=float(settings["stress_threshold"]),
                         stress_idle_timeout=float(settings["stress_idle_timeout"]),
                         stress_session_timeout=float(settings["stress_session_timeout"]),
                         anvil=anvil if anvil is not None else plumbing.Anvil.from_config(settings),
                         bind_and_activate=bind_and_activate)


    def store_unavailable(self):
        """True when the store lives apart from the spool (an NFS mount, say) and its users
        file is missing: the mount is gone, and no login can be checked (RFC 3206 SYS/TEMP)."""
        return self.store_apart and not os.path.exists(self.store.users_path)


def main(argv=None):
    try:
        config = plumbing.daemon_settings(
            "pop3d", "POP3 server over the Maildir store (RFC 1939).", DEFAULTS, HELP, argv)
        anvil = plumbing.Anvil.from_config(config)     # one for every listener and process
        processes = plumbing.worker_processes(config)
    except ValueError as exc:
        print("pop3d: %s" % exc, file=sys.stderr)
        return 1
    logger = plumbing.setup_logging("pop3d", config["syslog"], config["verbose"])
    if bool(config["tls_cert"]) != bool(config["tls_key"]):
        print("pop3d: --tls-cert and --tls-key go together", file=sys.stderr)
        return 1
    if config["pop3s_listen"] and not config["tls_cert"]:
        print("pop3d: --pop3s-listen needs --tls-cert and --tls-key", file=sys.stderr)
        return 1
    try:
        store = mailbox_store.Store(config["store"], config["domain"], config["hostname"] or None)
        tls_context = None
        if config["tls_cert"]:
            tls_context = plumbing.server_tls_context(config["tls_cert"], config["tls_key"])
    except (OSError, ValueError) as exc:
        print("pop3d: %s" % exc, file=sys.stderr)
        return 1
    servers = []
    for key, port, implicit in (("listen", POP3_PORT, False), ("pop3s_listen", POP3S_PORT, True)):
        if not config[key]:
            continue
        try:
            servers.append(POP3Server(plumbing.parse_hostport(config[key], port), config,
                                      store=store, tls_context=tls_context,
                                      implicit_tls=implicit, anvil=anvil))
        except (OSError, ValueError) as exc:
            print("pop3d: cannot listen on %s: %s" % (config[key], exc), file=sys.stderr)
            for server in servers:
                server.server_close()
            return 1
    if not servers:
        print("pop3d: nothing to listen on", file=sys.stderr)
        return 1
    try:
        plumbing.drop_privileges(config["user"])
    except ValueError as exc:
        print("pop3d: %s" % exc, file=sys.stderr)
        return 1
    plumbing.log_config(logger, config)
    for server in servers:
        logger.info("listening on %s port %d%s", server.server_address[0], server.port,
                    " (implicit TLS)" if server.implicit_tls else "")

    def reload():
        plumbing.reload_tls(servers, config["tls_cert"], config["tls_key"])
    return plumbing.serve_until_signalled(servers, on_reload=reload, processes=processes,
                                          cpus=config["cpus"])


if __name__ == "__main__":
    sys.exit(main())
