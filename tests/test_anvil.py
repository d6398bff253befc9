"""The anvil, stress mode and the error boundary of plumbing, alone and inside smtp_in and
pop3d, over real sockets on 127.0.0.0/8 (Linux lets a client bind 127.0.0.2 as its source)."""

import base64
import logging
import resource
import smtplib
import socket
import threading
import time

import pytest

import mailbox_store
import plumbing
import pop3d
import smtp_in
from support import SLACK, wait_for
from smtpin_support import RawClient, USERS
from smtpin_support import spool, start_smtp, store_template  # noqa: F401  (fixtures)

ALICE, ALICE_PASSWORD = "alice@example.com", USERS["alice@example.com"]


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def plain(login, password):
    return base64.b64encode(("\0%s\0%s" % (login, password)).encode()).decode()


# --- The anvil alone, on a hand-moved clock ---

def test_penalty_doubles_from_its_start_up_to_the_cap():
    anvil = plumbing.Anvil(penalty=0.5, max_penalty=15)
    assert [anvil.penalty(n) for n in range(8)] == [0, 0.5, 1, 2, 4, 8, 15, 15]
    assert plumbing.Anvil(penalty=0).penalty(5) == 0


def test_failed_logins_space_the_checks_of_that_address_only():
    clock = Clock()
    anvil = plumbing.Anvil(penalty=0.5, max_penalty=15, clock=clock)
    waits = []
    for _ in range(4):
        wait, allowed = anvil.login_turn("192.0.2.1")
        assert allowed
        waits.append(wait)
        clock.now += wait                                       # the session waits its turn
        anvil.login_done("192.0.2.1", "alice", False)
    assert waits == [0, 0.5, 1, 2]
    assert anvil.failures("192.0.2.1") == 4
    assert anvil.login_turn("192.0.2.1") == (4.0, True)       # its turn: 4 s after the last
    anvil.login_done("192.0.2.1", "alice", True)
    assert anvil.login_turn("192.0.2.2") == (0.0, True)       # another address never waits
    assert anvil.login_done("192.0.2.2", "bob", True) == 0.0


def test_after_a_failure_a_burst_of_checks_queues_as_failures_would_and_far_turns_are_refused():
    clock = Clock()
    anvil = plumbing.Anvil(penalty=0.5, max_penalty=4, clock=clock)
    anvil.login_turn("192.0.2.1")
    anvil.login_done("192.0.2.1", "x", False)
    clock.now += 0.5                                            # that failure's own turn
    turns = [anvil.login_turn("192.0.2.1") for _ in range(5)]
    assert turns[:4] == [(0.0, True), (0.5, True), (1.5, True), (3.5, True)]
    assert turns[4] == (4.0, False)                            # 7.5 s away: not checked
    for _ in range(4):
        anvil.login_done("192.0.2.1", "x", False)


def test_an_address_that_never_failed_may_check_a_few_passwords_at_once():
    clock = Clock()
    anvil = plumbing.Anvil(penalty=0.5, max_penalty=15, clock=clock)
    turns = [anvil.login_turn("192.0.2.1") for _ in range(6)]
    assert turns[:plumbing.ANVIL_FREE_CHECKS] == [(0.0, True)] * plumbing.ANVIL_FREE_CHECKS
    assert turns[4:] == [(0.0, True), (0.5, True)]              # the 6th waits: a queue again
    for _ in range(6):
        anvil.login_done("192.0.2.1", "alice", True)
    assert anvil.failures("192.0.2.1") == 0


def test_one_login_at_a_time_never_waits():
    clock = Clock()
    anvil = plumbing.Anvil(clock=clock)
    for _ in range(20):
        assert anvil.login_turn("192.0.2.1") == (0.0, True)
        anvil.login_done("192.0.2.1", "alice", True)


def test_failures_are_forgotten_after_the_forget_time():
    clock = Clock()
    anvil = plumbing.Anvil(penalty=1, forget=60, clock=clock)
    for _ in range(4):
        anvil.login_turn("192.0.2.1")
        anvil.login_done("192.0.2.1", "alice", False)
        anvil.error("192.0.2.1")
    clock.now += 59
    assert anvil.failures("192.0.2.1") == 4 and anvil.errors("192.0.2.1") == 4
    clock.now += 1
    assert anvil.failures("192.0.2.1") == 0 and anvil.errors("192.0.2.1") == 0
    assert anvil.login_turn("192.0.2.1") == (0.0, True)
    assert not anvil.records or all(r.failures == 0 for r in anvil.records.values())


def test_errors_past_the_soft_limit_slow_every_reply():
    anvil = plumbing.Anvil(penalty=0.5, max_penalty=15, soft_errors=3, clock=Clock())
    delays = []
    for _ in range(6):
        anvil.error("192.0.2.1")
        delays.append(anvil.reply_delay("192.0.2.1"))
    assert delays == [0, 0, 0, 0.5, 1, 2]
    assert anvil.reply_delay("192.0.2.2") == 0


def test_a_login_name_that_failed_slows_its_failures_from_any_address():
    anvil = plumbing.Anvil(penalty=0.5, clock=Clock())
    waits = []
    for number in range(4):
        ip = "198.51.100.%d" % number
        anvil.login_turn(ip)
        waits.append(anvil.login_done(ip, "Alice@Example.com", False))
    assert waits == [0, 0.5, 1, 2]
    anvil.login_turn("198.51.100.9")
    assert anvil.login_done("198.51.100.9", "alice@example.com", True) == 0.0


def test_exempt_networks_are_never_counted_and_loopback_is_not_exempt_by_default():
    anvil = plumbing.Anvil(exempt=["192.0.2.0/24", "2001:db8::/32"], clock=Clock())
    for ip in ("192.0.2.7", "2001:db8::1", "::ffff:192.0.2.8"):
        anvil.login_turn(ip)
        assert anvil.login_done(ip, "x", False) == 0.0
        anvil.error(ip)
        assert anvil.failures(ip) == 0 and anvil.errors(ip) == 0
    anvil.login_turn("127.0.0.1")
    anvil.login_done("127.0.0.1", "x", False)
    assert anvil.failures("127.0.0.1") == 1


def test_ipv6_clients_are_counted_by_their_64():
    anvil = plumbing.Anvil(clock=Clock())
    anvil.error("2001:db8:1:2::1")
    anvil.error("2001:db8:1:2:ffff::9")
    assert anvil.errors("2001:db8:1:2::77") == 2
    assert anvil.errors("2001:db8:1:3::1") == 0


def test_the_anvil_remembers_a_bounded_number_of_records(monkeypatch):
    monkeypatch.setattr(plumbing, "ANVIL_MAX_RECORDS", 50)
    anvil = plumbing.Anvil(clock=Clock())
    for number in range(200):
        anvil.error("10.0.%d.%d" % (number // 256, number % 256))
    assert len(anvil.records) == 50
    assert anvil.errors("10.0.0.199") == 1 and anvil.errors("10.0.0.1") == 0


def test_connections_are_counted_per_listener_in_all_and_per_address():
    anvil = plumbing.Anvil()
    assert [anvil.connect("[::]:25", "10.0.0.1", 3, 2) for _ in range(3)] == [1, 2, None]
    assert anvil.connect("[::]:25", "10.0.0.2", 3, 2) == 3
    assert anvil.connect("[::]:25", "10.0.0.3", 3, 2) is None          # 3 in all
    assert anvil.connect("[::]:110", "10.0.0.1", 3, 2) == 1            # another listener
    assert anvil.disconnect("[::]:25", "10.0.0.1") == 2
    assert anvil.connect("[::]:25", "10.0.0.3", 3, 2) == 3
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        anvil.disconnect("[::]:25", ip)
    assert anvil.in_use["[::]:25"] == 0 and not any(
        key[0] == "[::]:25" for key in anvil.per_address)                # nothing left over


def test_anvil_settings_come_from_a_role_config():
    anvil = plumbing.Anvil.from_config({"anvil_penalty": "2", "anvil_max_penalty": "9",
                                        "anvil_soft_errors": "4", "anvil_forget": "30",
                                        "anvil_exempt": ["10.0.0.0/8"]})
    assert (anvil.penalty_start, anvil.max_penalty, anvil.soft_errors, anvil.forget) == (2, 9, 4, 30)
    assert anvil.client_key("10.1.2.3") is None
    with pytest.raises(ValueError):
        plumbing.Anvil.from_config({"anvil_exempt": ["not-a-network"]})
    for role in (smtp_in, pop3d):
        for key in plumbing.SERVER_HELP:
            assert key in role.DEFAULTS, (role.__name__, key)


# --- SMTP submission and POP3 under a guessing attack ---

def submission(start_smtp, **config):
    settings = dict(submission=True, anvil_exempt=[], anvil_penalty=0.4, anvil_max_penalty=3.0)
    settings.update(config)
    return start_smtp(**settings)


@pytest.fixture
def pauses(monkeypatch):
    """[(client address, seconds)] of every penalty wait a session begins: what a client
    waited because of the anvil, read without timing it."""
    begun = []
    real_pause = plumbing.ConnectionHandler.pause

    def pause(self, seconds):
        if seconds > 0:
            begun.append((self.client_ip, seconds))
        return real_pause(self, seconds)

    monkeypatch.setattr(plumbing.ConnectionHandler, "pause", pause)
    return begun


def timed_auth(port, login, password, source="127.0.0.1"):
    """(seconds, reply code) of one AUTH PLAIN on a fresh connection from source."""
    client = RawClient(port, timeout=20, source=source)
    assert client.reply()[0] == 220
    assert client.command("EHLO client.example.org")[0] == 250
    started = time.monotonic()
    code, _ = client.command("AUTH PLAIN " + plain(login, password))
    elapsed = time.monotonic() - started
    client.close()
    return elapsed, code


def test_failed_logins_get_slower_across_connections_but_not_for_another_address(
        start_smtp, pauses):
    server = submission(start_smtp)
    last_waits = []
    for number in range(5):
        del pauses[:]
        elapsed, code = timed_auth(server, ALICE, "guess%d" % number)
        waits = [seconds for _, seconds in pauses]
        # The address's turn (if it must wait one), the login name's penalty last, then
        # auth_failure_delay for the first failure of a session: all on the clock.
        assert code == 535 and elapsed >= sum(waits) + plumbing.auth_failure_delay(1) - 0.05
        last_waits.append(waits[-1] if waits else 0)
    assert last_waits == [0, 0.4, 0.8, 1.6, 3.0]        # doubling, up to anvil_max_penalty
    assert server.anvil.failures("127.0.0.1") == 5
    del pauses[:]
    assert timed_auth(server, ALICE, ALICE_PASSWORD, source="127.0.0.2")[1] == 235
    assert pauses == []                                  # another address never waits
    assert timed_auth(server, ALICE, ALICE_PASSWORD)[1] == 235     # its turn, then in
    assert all(seconds <= 3.0 for _, seconds in pauses), pauses
    del pauses[:]
    with smtplib.SMTP(source_address=("127.0.0.2", 0)) as client:
        client.connect("127.0.0.1", server.port)
        client.ehlo("client.example.org")
        client.login("bob@example.com", USERS["bob@example.com"])
    assert pauses == []


def test_a_turn_too_far_away_is_refused_with_454_unchecked(start_smtp, pauses):
    server = submission(start_smtp, anvil_penalty=1.0, anvil_max_penalty=2.0)
    assert timed_auth(server, ALICE, "guess")[1] == 535
    for _ in range(2):                         # two checks queued by other connections
        assert server.anvil.login_turn("127.0.0.1")[1]
    client = RawClient(server, timeout=10)
    client.reply()
    client.command("EHLO client.example.org")
    del pauses[:]
    started = time.monotonic()
    assert client.command("AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD)) == (
        454, [smtp_in.R454_AUTH_THROTTLED])
    assert pauses == [("127.0.0.1", 2.0)]      # anvil_max_penalty, not the turn's 3 s or more
    assert 1.9 <= time.monotonic() - started < 2.0 + SLACK
    assert client.at_eof()


def test_a_server_shutdown_cuts_a_penalty_wait_short(start_smtp, pauses):
    server = submission(start_smtp, anvil_penalty=10.0, anvil_max_penalty=30.0)
    for _ in range(2):
        server.anvil.login_turn("127.0.0.1")
        server.anvil.login_done("127.0.0.1", ALICE, False)
    client = RawClient(server, timeout=30)
    client.reply()
    client.command("EHLO client.example.org")
    client.send("AUTH PLAIN %s\r\n" % plain(ALICE, "guess"))
    wait_for(lambda: pauses, 10, "the session to begin its 20 s wait")
    started = time.monotonic()
    server.stop(grace=10)
    assert client.reply() == (421, [smtp_in.R421_SHUTTING_DOWN])
    assert time.monotonic() - started < SLACK          # at once: not after the wait or the grace


def test_unknown_recipients_past_the_soft_limit_slow_every_reply(start_smtp, pauses):
    server = start_smtp(anvil_exempt=[], anvil_soft_errors=3, anvil_penalty=0.3)
    client = RawClient(server, timeout=10)
    client.reply()
    client.command("EHLO client.example.org")
    client.command("MAIL FROM:<a@example.org>")
    times, waits = [], []
    for number in range(5):
        del pauses[:]
        started = time.monotonic()
        assert client.command("RCPT TO:<nobody%d@example.com>" % number)[0] == 550
        times.append(time.monotonic() - started)
        waits.append([seconds for _, seconds in pauses])
    assert waits == [[], [], [], [0.3], [0.6]]
    assert times[3] >= 0.28 and times[4] >= 0.55, times
    del pauses[:]
    started = time.monotonic()
    assert client.command("RCPT TO:<bob@example.com>")[0] == 250     # slowed as well
    assert time.monotonic() - started >= 0.55 and pauses == [("127.0.0.1", 0.6)]
    assert server.anvil.errors("127.0.0.1") == 5
    del pauses[:]
    other = RawClient(server, timeout=10, source="127.0.0.2")
    assert other.reply()[0] == 220 and other.command("EHLO x.example.org")[0] == 250
    assert pauses == []                                              # another address: never


@pytest.fixture
def pop3_store(tmp_path, monkeypatch):
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 4)     # cheap hashes, same format
    store = mailbox_store.Store(str(tmp_path / "spool"), ["example.com"], hostname="mx.example.com")
    store.add_user(ALICE, "alice pw")
    return store


@pytest.fixture
def start_pop3(pop3_store):
    servers = []

    def start(**options):
        options.setdefault("failure_delay", lambda failures: 0)
        options.setdefault("idle_timeout", 10)
        keywords = {key: options.pop(key) for key in list(options) if key not in pop3d.DEFAULTS}
        server = pop3d.POP3Server(("127.0.0.1", 0), options, store=pop3_store, **keywords)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0.2)


class Pop3Raw:
    def __init__(self, server, source="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def line(self):
        return self.file.readline().decode("utf-8", "replace").rstrip("\r\n")

    def command(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode() + b"\r\n")
        return self.line()

    def close(self):
        self.file.close()
        self.sock.close()


def test_pop3_user_name_of_bad_utf8_is_an_ordinary_failed_login(start_pop3, caplog):
    caplog.set_level(logging.INFO)
    server = start_pop3(anvil=plumbing.Anvil(penalty=0.01))
    client = Pop3Raw(server)
    assert client.command(b"USER \xff@x\r\n") == pop3d.OK_SEND_PASS
    assert client.command("PASS x") == pop3d.ERR_AUTH_FAILED
    assert client.command(b"USER \xc3(\r\n") == pop3d.OK_SEND_PASS
    assert client.command(b"PASS \xff\xfe\r\n") == pop3d.ERR_AUTH_FAILED
    client.close()
    assert server.anvil.failures("127.0.0.1") == 2
    assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert sum("login failed" in r.getMessage() for r in caplog.records) == 2


def test_pop3_failed_logins_slow_that_address_only(start_pop3, pauses):
    server = start_pop3(anvil=plumbing.Anvil(penalty=0.3, max_penalty=5))
    times, last_waits = [], []
    for number in range(4):
        client = Pop3Raw(server)
        client.command("USER " + ALICE)
        del pauses[:]
        started = time.monotonic()
        assert client.command("PASS guess%d" % number) == pop3d.ERR_AUTH_FAILED
        times.append(time.monotonic() - started)
        last_waits.append(pauses[-1][1] if pauses else 0)
        client.close()
    assert last_waits == [0, 0.3, 0.6, 1.2]
    assert times[3] >= 1.1, times
    del pauses[:]
    client = Pop3Raw(server, source="127.0.0.2")
    client.command("USER " + ALICE)
    assert client.command("PASS alice pw").startswith("+OK logged in")
    assert pauses == []
    client.close()


def test_pop3_bare_cr_makes_one_refused_line(start_pop3):
    server = start_pop3(anvil=plumbing.Anvil(exempt=["127.0.0.1"]))
    client = Pop3Raw(server)
    assert client.command(b"XXXX\rUSER " + ALICE.encode() + b"\r\n") == pop3d.ERR_BARE_CR
    assert client.command("PASS alice pw") == pop3d.ERR_NEED_USER      # no USER ran
    assert client.command("AUTH PLAIN") == "+ "
    assert client.command(b"*\rUSER " + ALICE.encode() + b"\r\n") == pop3d.ERR_AUTH_MALFORMED
    assert client.command("PASS alice pw") == pop3d.ERR_NEED_USER
    client.close()


# --- Stress mode ---

def test_under_stress_idle_sessions_get_the_short_timeout(start_smtp, caplog):
    caplog.set_level(logging.INFO)
    server = start_smtp(max_connections=5, idle_timeout=30, stress_threshold=0.8,
                        stress_idle_timeout=1.0)
    first = RawClient(server, timeout=10)
    assert first.reply()[0] == 220
    assert not server.stressed
    others = [RawClient(server, timeout=10) for _ in range(3)]       # 4 of 5: stress
    for client in others:
        assert client.reply()[0] == 220
    # The others stay busy, so that stress lasts until the waiting one is cut; idle, they
    # could time out first on a busy machine and end the stress.
    done, replies = threading.Event(), []

    def keep_busy():
        while not done.wait(0.1):
            replies.extend(client.command("NOOP")[0] for client in others)
    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        started = time.monotonic()
        assert first.reply() == (421, [smtp_in.R421_TIMEOUT])      # the waiting one, too
        assert time.monotonic() - started < 1.0 + SLACK              # not 30 s
    finally:
        done.set()
        busy.join(20)
    assert all(code == 250 for code in replies), replies
    for client in others:                      # under 3 of 5 in use, stress ends
        client.close()
    assert wait_for(lambda: not server.stressed)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stress:")]
    assert len(messages) == 2
    assert messages[0].startswith("stress: entering stress mode, 4 of 5 connections")
    assert messages[1].startswith("stress: leaving stress mode")
    calm = RawClient(server, timeout=10)
    assert calm.reply()[0] == 220
    time.sleep(1.5)                            # idle past the 1 s of stress: what is tested
    assert calm.command("NOOP")[0] == 250                            # 30 s again


def test_under_stress_the_session_limit_shrinks(start_smtp):
    server = start_smtp(max_connections=2, stress_threshold=0.5, stress_idle_timeout=5,
                        stress_session_timeout=1.0)
    client = RawClient(server, timeout=10)
    assert client.reply()[0] == 220
    started = time.monotonic()
    while time.monotonic() - started < 30:
        code, lines = client.command("NOOP")
        if code != 250:
            break
        time.sleep(0.1)                        # a busy client, never idle for 5 s: the test
    assert code == 421 and time.monotonic() - started < 1.0 + SLACK


# --- Early talkers ---

def test_a_client_that_talks_before_the_greeting_is_refused_every_time(start_smtp):
    server = start_smtp(greet_pause=0.3)
    refused = []

    def talk():
        client = RawClient(server, timeout=10)
        client.send("EHLO spam.example\r\nMAIL FROM:<a@example.org>\r\n")
        refused.append(client.reply() == (554, [smtp_in.R554_EARLY_TALKER]))
        client.close()

    for _ in range(3):
        threads = [threading.Thread(target=talk) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    assert refused == [True] * 30


def test_early_talkers_are_refused_with_more_than_1024_descriptors_open(start_smtp):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        if hard != resource.RLIM_INFINITY and hard < 4096:
            pytest.skip("needs 4096 file descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    server = start_smtp(greet_pause=0.3, max_connections=2000, max_per_address=2000)
    idle = []
    try:
        while len(idle) < 600:                 # 1200 descriptors: client and server ends
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        assert wait_for(lambda: server.active_connections() == 600, 10)
        client = RawClient(server, timeout=10)
        client.send("EHLO spam.example\r\n")
        assert client.reply() == (554, [smtp_in.R554_EARLY_TALKER])
        polite = RawClient(server, timeout=10)
        assert polite.reply()[0] == 220
        assert polite.command("NOOP")[0] == 250
    finally:
        for sock in idle:
            sock.close()
        if soft < 4096:
            wait_for(lambda: server.active_connections() < 10, 10)


# --- Unexpected errors: one line each, and not a flood ---

class CrashingHandler(plumbing.ConnectionHandler):
    crash_reply = "-ERR internal"

    def session(self):
        self.write("+OK ready")
        self.flush()
        line = self.reader.readline(100)
        raise ValueError("cannot handle %r\nsecond line" % line.data)


def test_internal_errors_log_one_line_each_and_a_flood_is_cut(monkeypatch, caplog):
    monkeypatch.setattr(plumbing, "_crash_log_limit", plumbing._LogLimit(5, 60.0))
    caplog.set_level(logging.INFO)
    server = plumbing.ThreadedServer(("127.0.0.1", 0), CrashingHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for number in range(30):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                reader = sock.makefile("rb")
                assert reader.readline() == b"+OK ready\r\n"
                sock.sendall(b"\xff%d\r\n" % number)
                assert reader.readline() == b"-ERR internal\r\n"
    finally:
        server.stop(grace=0.5)
    lines = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(lines) == 5
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert lines[0].getMessage().startswith(
        "internal error in session with [127.0.0.1]: ValueError: \"cannot handle b'\\\\xff0'")


def test_the_log_limit_counts_what_it_suppressed():
    clock = Clock()
    limit = plumbing._LogLimit(2, 60.0, clock)
    assert [limit.take() for _ in range(4)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    clock.now += 60
    assert limit.take() == (True, 2)
    assert limit.take() == (True, 0)


def test_the_traceback_is_logged_at_debug_only(monkeypatch):
    monkeypatch.setattr(plumbing, "_crash_log_limit", plumbing._LogLimit(5, 60.0))
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test_anvil.debug")
    logger.addHandler(Keep())
    logger.propagate = False
    try:
        logger.setLevel(logging.DEBUG)
        plumbing.log_internal_error(logger, KeyError("x"), "here")
        logger.setLevel(logging.INFO)
        plumbing.log_internal_error(logger, KeyError("y"), "here")
    finally:
        logger.handlers.clear()
    assert records[0].exc_info is not None and records[1].exc_info is None
