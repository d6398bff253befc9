"""The Maildir store: addresses, users, aliases, delivery, the POP3 mailbox and the CLI."""

import io
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import mailbox_store
from mailbox_store import AddressError, AliasLoop, MailboxBusy, Store, UnknownUser, canonical_address

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "spool"), ["example.com"], hostname="mx.example.com")


@pytest.fixture
def fast_hash(monkeypatch):
    """Cheap scrypt parameters, for tests that add many users; the format is unchanged."""
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 4)


def cli(spool, *args, stdin=""):
    return subprocess.run([sys.executable, os.path.join(ROOT, "mailbox_store.py"), "--spool", str(spool)]
                          + list(args), input=stdin.encode(), capture_output=True, timeout=60)


# --- Addresses ---

def test_canonical_address_lowercases_domain_and_local_part():
    assert canonical_address("Alice.Smith+News@Example.COM") == "alice.smith+news@example.com"
    assert canonical_address("o'neil@[127.0.0.1]") == "o'neil@[127.0.0.1]"
    assert canonical_address("jos\u00e9@b\u00fccher.example") == "jos\u00e9@b\u00fccher.example"


@pytest.mark.parametrize("address", [
    "../../etc/passwd@x", "a/b@x", "a\\b@x", "a\0b@x", "a\nb@x", "a\x7fb@x", ".hidden@x",
    "a..b@x", "trailing.@x", "no-at-sign", "two@at@x", "@x", "a@", "a@../x", "a@x/y", "a@.x",
    "a@x..y", "a@-x.com", "a b@x", "\"quoted\"@x", "a@x\0", "x" * 65 + "@x", "a@[a/b]",
])
def test_bad_addresses_are_refused(address):
    with pytest.raises(AddressError):
        canonical_address(address)


def test_path_traversal_never_reaches_outside_the_store(store, tmp_path):
    for address in ("../../etc/passwd@x", "a/b@example.com", "..@example.com"):
        with pytest.raises(AddressError):
            store.deliver(address, b"Subject: x\r\n\r\nbody\r\n", "")
        with pytest.raises(AddressError):
            store.add_user(address, "pw")
        assert store.authenticate(address, "pw") is None
        assert not store.recipient_exists(address)
    result = cli(tmp_path / "spool", "add-user", "../../etc/passwd@x", stdin="pw\n")
    assert result.returncode == 1 and b"passwd@x" in result.stderr
    assert not os.path.exists(tmp_path / "etc")


# --- Users and passwords ---

def test_users_file_holds_scrypt_hashes_with_their_parameters_and_mode_0600(store):
    store.add_user("alice@example.com", "correct horse")
    path = os.path.join(store.spool_dir, "users")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = open(path).read()
    assert "correct horse" not in text
    address, _, hashed = text.strip().rpartition(":")
    assert address == "alice@example.com"
    assert hashed.startswith("$scrypt$n=%d,r=8,p=%d$" % (mailbox_store.SCRYPT_N,
                                                        mailbox_store.SCRYPT_P))


def test_new_hashes_use_scrypt_n_2_14_r_8_p_8_outside_the_test_suite(tmp_path):
    assert cli(tmp_path / "spool", "add-user", "alice@example.com", stdin="pw\n").returncode == 0
    hashed = open(os.path.join(str(tmp_path / "spool"), "users")).read().strip().split(":", 1)[1]
    assert hashed.startswith("$scrypt$n=16384,r=8,p=8$")
    assert mailbox_store.verify_password("pw", hashed)


def users_line(store, address):
    with open(os.path.join(store.spool_dir, "users")) as f:
        return [line.rstrip("\n") for line in f if line.startswith(address + ":")]


def test_pbkdf2_hash_becomes_scrypt_at_the_next_login_and_a_wrong_password_changes_nothing(store):
    salt = b"0123456789abcdef"
    key = mailbox_store.hashlib.pbkdf2_hmac("sha256", b"secret", salt, 1000, 32)
    old = "$pbkdf2-sha256$i=1000$%s$%s" % (mailbox_store._b64(salt), mailbox_store._b64(key))
    os.makedirs(store.spool_dir)
    with open(os.path.join(store.spool_dir, "users"), "w") as f:
        f.write("# users\nalice@example.com:%s\nbob@example.com:%s\n" % (old, old))
    assert store.authenticate("alice@example.com", "wrong") is None
    assert users_line(store, "alice@example.com") == ["alice@example.com:" + old]
    assert store.authenticate("alice", "secret") == "alice@example.com"
    (line,) = users_line(store, "alice@example.com")
    assert line.startswith("alice@example.com:$scrypt$n=%d,r=8,p=%d$"
                           % (mailbox_store.SCRYPT_N, mailbox_store.SCRYPT_P))
    assert store.authenticate("alice@example.com", "secret") == "alice@example.com"
    assert users_line(store, "bob@example.com") == ["bob@example.com:" + old]    # untouched
    assert open(os.path.join(store.spool_dir, "users")).read().startswith("# users\n")


def test_a_failed_hash_upgrade_does_not_fail_the_login(store, monkeypatch, caplog):
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 4)
    store.add_user("alice@example.com", "secret")
    (before,) = users_line(store, "alice@example.com")
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 5)

    def broken(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(mailbox_store, "write_atomically", broken)
    with caplog.at_level(logging.WARNING, logger="mailbox_store"):
        assert store.authenticate("alice@example.com", "secret") == "alice@example.com"
    assert users_line(store, "alice@example.com") == [before]
    assert "cannot upgrade the password hash" in caplog.text and "secret" not in caplog.text


def test_hash_upgrade_leaves_a_password_changed_meanwhile_alone(store, monkeypatch):
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 4)
    store.add_user("alice@example.com", "old")
    monkeypatch.setattr(mailbox_store, "SCRYPT_N", 2 ** 5)
    real = mailbox_store.hash_password

    def change_first(password):            # an admin's passwd lands before the rewrite
        monkeypatch.setattr(mailbox_store, "hash_password", real)
        store.set_password("alice@example.com", "new")
        return real(password)
    monkeypatch.setattr(mailbox_store, "hash_password", change_first)
    assert store.authenticate("alice@example.com", "old") == "alice@example.com"
    assert store.authenticate("alice@example.com", "new") == "alice@example.com"
    assert store.authenticate("alice@example.com", "old") is None


def test_same_password_gets_a_different_salt(store):
    one, two = mailbox_store.hash_password("pw"), mailbox_store.hash_password("pw")
    assert one != two
    assert mailbox_store.verify_password("pw", one) and mailbox_store.verify_password("pw", two)


def test_pbkdf2_is_used_where_scrypt_is_missing(monkeypatch):
    monkeypatch.delattr(mailbox_store.hashlib, "scrypt")
    hashed = mailbox_store.hash_password("pw")
    assert hashed.startswith("$pbkdf2-sha256$i=600000$")
    assert mailbox_store.verify_password("pw", hashed)
    assert not mailbox_store.verify_password("pW", hashed)


@pytest.mark.parametrize("stored", [
    "", "plaintext", "$scrypt$n=3,r=8,p=1$c2FsdA$a2V5", "$scrypt$n=1073741824,r=8,p=1$c2FsdA$a2V5",
    "$pbkdf2-sha256$i=999999999$c2FsdA$a2V5", "$md5$x$y$z", "$scrypt$garbage$!!$??",
])
def test_malformed_or_costly_hashes_never_match(stored):
    assert mailbox_store.verify_password("pw", stored) is False


def test_authenticate_with_address_or_unambiguous_local_part(store, fast_hash):
    store.add_user("alice@example.com", "secret")
    store.add_user("bob@example.com", "pw")
    store.add_user("bob@example.org", "pw")
    assert store.authenticate("alice@example.com", "secret") == "alice@example.com"
    assert store.authenticate("ALICE@Example.Com", "secret") == "alice@example.com"
    assert store.authenticate("alice", "secret") == "alice@example.com"
    assert store.authenticate("alice", "Secret") is None
    assert store.authenticate("bob", "pw") is None           # two bobs: ambiguous
    assert store.authenticate("bob@example.org", "pw") == "bob@example.org"
    assert store.authenticate("carol", "pw") is None
    assert store.authenticate("alice@example.com", "") is None


def test_unknown_user_costs_one_hash_like_a_wrong_password(store, monkeypatch):
    store.add_user("alice@example.com", "secret")
    calls = []
    real = mailbox_store._derive
    monkeypatch.setattr(mailbox_store, "_derive", lambda *a: calls.append(a[1]) or real(*a))
    store.authenticate("alice@example.com", "wrong")
    store.authenticate("nobody@example.com", "wrong")
    store.authenticate("bad/address@example.com", "wrong")
    assert len(calls) == 3
    assert all(c.startswith("$scrypt$n=16384,r=8,p=1$") for c in calls)


def test_concurrent_add_user_loses_nobody(tmp_path):
    spool = tmp_path / "spool"
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "mailbox_store.py"), "--spool",
                               str(spool), "add-user", "user%d@example.com" % i],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(8)]
    for proc in procs:
        proc.communicate(b"pw%d\n" % procs.index(proc), timeout=60)
        assert proc.returncode == 0
    store = Store(str(spool))
    assert sorted(store.list_users()) == sorted("user%d@example.com" % i for i in range(8))
    assert store.authenticate("user5@example.com", "pw5") == "user5@example.com"


def test_store_sees_users_and_aliases_changed_by_another_process(store, fast_hash):
    assert not store.recipient_exists("carol@example.com")
    assert cli(store.spool_dir, "add-user", "carol@example.com", stdin="pw\n").returncode == 0
    assert store.recipient_exists("carol@example.com")
    assert store.authenticate("carol", "pw") == "carol@example.com"
    assert cli(store.spool_dir, "add-alias", "sales", "carol").returncode == 0
    assert store.expand("sales@example.com") == ["carol@example.com"]
    assert cli(store.spool_dir, "del-user", "carol@example.com").returncode == 0
    assert not store.recipient_exists("carol@example.com")


def tables_of(store):
    """What a store knows of users: users, by_local, user_domains."""
    tables = store._tables()
    return tables.users, tables.by_local, tables.user_domains


def test_add_user_appends_and_a_running_store_reads_only_the_new_line(store, fast_hash,
                                                                      monkeypatch):
    for i in range(20):
        store.add_user("user%d@example.com" % i, "pw")
    tables_of(store)
    other = Store(store.spool_dir)                       # another process writing
    inode = os.stat(store.users_path).st_ino
    other.add_user("late@example.org", "pw")
    assert os.stat(store.users_path).st_ino == inode      # appended, not rewritten
    parsed = []
    plain = mailbox_store._parse_users
    monkeypatch.setattr(mailbox_store, "_parse_users",
                        lambda lines, first=1: parsed.extend(lines) or plain(lines, first))
    assert store.recipient_exists("late@example.org") and store.is_local_domain("example.org")
    assert store.authenticate("late", "pw") == "late@example.org"
    assert len(parsed) == 1                                # the new line only
    monkeypatch.setattr(mailbox_store, "_parse_users", plain)
    assert tables_of(store) == tables_of(Store(store.spool_dir))    # same as a full parse


def test_users_read_in_steps_agree_with_one_full_parse(store, fast_hash):
    """Appends, duplicates in other case, comments, bad lines, a shared local part."""
    store.add_user("alice@example.com", "pw")
    steps = ["# a comment\n", "ALICE@example.com:$x$\n", "alice@example.org:$y$\n",
             "not an address:$z$\n", "bob@example.net:nohash\n", "\n", "bob@example.net:$b$\n"]
    for step in steps:
        tables_of(store)
        with open(store.users_path, "a") as f:
            f.write(step)
        assert tables_of(store) == tables_of(Store(store.spool_dir))
    users, by_local, _ = tables_of(store)
    assert users["alice@example.com"].startswith("$scrypt$")          # the first line wins
    assert by_local["alice"] == ["alice@example.com", "alice@example.org"]


def test_passwd_and_del_user_are_read_from_the_lines_they_changed(store, fast_hash,
                                                                  monkeypatch):
    for i in range(30):
        store.add_user("user%d@example.com" % i, "pw")
    store.add_user("solo@example.org", "pw")
    tables_of(store)
    other = Store(store.spool_dir)
    parsed = []
    plain = mailbox_store._parse_users
    counting = lambda lines, *a, **k: parsed.extend(lines) or plain(lines, *a, **k)  # noqa: E731
    other.set_password("user7@example.com", "new")
    monkeypatch.setattr(mailbox_store, "_parse_users", counting)
    assert store.authenticate("user7", "new") == "user7@example.com"
    assert [line.split(":")[0] for line in parsed] == ["user7@example.com"] * 2   # old, new
    for address in ("user12@example.com", "solo@example.org"):
        monkeypatch.setattr(mailbox_store, "_parse_users", plain)
        other.delete_user(address)
        del parsed[:]
        monkeypatch.setattr(mailbox_store, "_parse_users", counting)
        assert address not in store.list_users()
        assert [line.split(":")[0] for line in parsed] == [address]            # old only
    assert not store.is_local_domain("example.org")
    monkeypatch.setattr(mailbox_store, "_parse_users", plain)
    assert tables_of(store) == tables_of(Store(store.spool_dir))


@pytest.mark.parametrize("edit", [
    ("alice@example.com:$a$\n", "alice@example.com:$A$\n"),               # passwd
    ("alice@example.com:$a$\n", ""),                                        # del-user
    ("bob@example.com:$b$\n", ""),                                          # bob's 1st line
    ("carol@example.com:$c$\n", "carol@example.com:$c$\ndan@example.com:$d$\n"),   # insert
    ("# note\n", "# another note\n"),                                      # a comment
    ("alice@example.com:$a$\n", "Alice@Example.com:$a$\n"),               # case
    ("carol@example.com:$c$\n", "carol@example.com:$c$\ncarol@EXAMPLE.com:$x$\n"),
    ("alice@example.com:$a$\nbob@example.com:$b$\n",                       # swapped
     "bob@example.com:$b$\nalice@example.com:$a$\n"),
    ("eve@example.com:$e$\n", "eve@example.com:nohash\n"),                 # broken
])
def test_users_after_any_rewrite_agree_with_one_full_parse(store, edit):
    os.makedirs(store.spool_dir)
    text = ("# note\nalice@example.com:$a$\nbob@example.com:$b$\ncarol@example.com:$c$\n"
            "bob@example.com:$b2$\neve@example.com:$e$\nzed@example.net:$z$\n")
    with open(store.users_path, "w") as f:
        f.write(text)
    tables_of(store)
    assert edit[0] in text
    mailbox_store.write_atomically(store.users_path, text.replace(edit[0], edit[1], 1))
    assert tables_of(store) == tables_of(Store(store.spool_dir))


def test_users_after_random_rewrites_agree_with_one_full_parse(store):
    import random
    chooser = random.Random(7)
    os.makedirs(store.spool_dir)
    pool = ["u%d@example.com:$h%d$" % (n % 12, n) for n in range(40)] + [
        "# c", "", "U3@Example.com:$x$", "bad line", "v@example.org:nohash"]
    lines = [chooser.choice(pool) for _ in range(30)]
    for _ in range(120):
        mailbox_store.write_atomically(store.users_path, "".join(l + "\n" for l in lines))
        assert tables_of(store) == tables_of(Store(store.spool_dir))
        at = chooser.randrange(len(lines) + 1)
        action = chooser.choice(["set", "delete", "insert", "append"])
        if action == "set" and at < len(lines):
            lines[at] = chooser.choice(pool)
        elif action == "delete" and at < len(lines) and len(lines) > 1:
            del lines[at]
        elif action == "insert":
            lines.insert(at, chooser.choice(pool))
        else:
            lines.append(chooser.choice(pool))


def test_a_rewrite_or_an_edit_in_place_is_read_whole(store, fast_hash):
    store.add_user("alice@example.com", "old")
    store.add_user("bob@example.com", "pw")
    assert store.authenticate("alice", "old")
    other = Store(store.spool_dir)
    other.set_password("alice@example.com", "new")                    # rename: new inode
    assert store.authenticate("alice", "new") and not store.authenticate("alice", "old")
    other.delete_user("bob@example.com")
    assert not store.recipient_exists("bob@example.com")
    # An editor writing in place: same inode, the file grows, but its start changed.
    with open(store.users_path, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace("alice@", "carol@") + "dave@example.com:$d$\n")
    assert not store.recipient_exists("alice@example.com")
    assert store.recipient_exists("carol@example.com") and store.recipient_exists("dave@example.com")
    assert tables_of(store) == tables_of(Store(store.spool_dir))


def test_a_torn_last_line_is_ignored_and_cut_off_by_the_next_writer(store, fast_hash, caplog):
    store.add_user("alice@example.com", "pw")
    assert store.recipient_exists("alice@example.com")
    with open(store.users_path, "a") as f:                # a crash in the middle of a write
        f.write("bob@example.com:$scrypt$n=16")
    assert not store.recipient_exists("bob@example.com")
    assert "no line end" in caplog.text
    assert not Store(store.spool_dir).recipient_exists("bob@example.com")
    store.add_user("carol@example.com", "pw")
    with open(store.users_path) as f:
        lines = f.read().split("\n")
    assert [line.split(":")[0] for line in lines] == ["alice@example.com", "carol@example.com", ""]
    assert store.recipient_exists("carol@example.com") and not store.recipient_exists("bob@example.com")
    assert tables_of(store) == tables_of(Store(store.spool_dir))
    with open(store.users_path, "a") as f:
        f.write("bob@example.com:$scrypt$n=16")
    store.set_password("alice@example.com", "new")        # a rewrite drops it too
    assert "bob@" not in open(store.users_path).read()
    store.add_user("bob@example.com", "pw")               # the name was never taken
    assert store.authenticate("bob", "pw") == "bob@example.com"


def test_add_user_refuses_an_existing_user_whatever_its_case_in_the_file(store, fast_hash):
    os.makedirs(store.spool_dir)
    with open(store.users_path, "w") as f:
        f.write("  Alice@Example.COM:$x$\n")
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("alice@example.com", "pw")
    store.add_user("alice@example.co", "pw")              # a prefix of a line is not a user


def test_store_is_local_for_configured_and_user_domains(store, fast_hash):
    assert store.is_local_domain("EXAMPLE.com")
    assert not store.is_local_domain("example.org")
    store.add_user("x@example.org", "pw")
    assert store.is_local_domain("example.org")


# --- Aliases and expansion ---

def write_aliases(store, text):
    os.makedirs(store.spool_dir, exist_ok=True)
    with open(os.path.join(store.spool_dir, "aliases"), "w") as f:
        f.write(text)


@pytest.fixture
def people(store, fast_hash):
    for user in ("alice@example.com", "bob@example.com", "carol@example.org"):
        store.add_user(user, "pw")
    return store


def test_aliases_expand_recursively_with_bare_names_and_remote_targets(people):
    write_aliases(people, "# team\nstaff: alice, sales\nsales: bob@example.com,\n"
                          "  friend@remote.example\ninfo@example.org: staff@example.com\n")
    assert people.expand("staff@example.com") == [
        "alice@example.com", "bob@example.com", "friend@remote.example"]
    # Bare names apply to every local domain; alice@example.org does not exist and is skipped.
    assert people.expand("staff@example.org") == ["bob@example.com", "friend@remote.example"]
    assert people.expand("info@example.org") == [
        "alice@example.com", "bob@example.com", "friend@remote.example"]
    assert people.expand("Friend@Remote.Example") == ["Friend@remote.example"]


def test_bare_alias_targets_stay_in_the_domain_being_expanded(people):
    write_aliases(people, "office: carol\n")
    assert people.expand("office@example.org") == ["carol@example.org"]
    with pytest.raises(UnknownUser):
        people.expand("office@example.com")       # no carol@example.com: nobody to reach


def test_sub_address_reaches_the_user_and_an_exact_entry_wins(people):
    assert people.expand("alice+lists@example.com") == ["alice@example.com"]
    write_aliases(people, "alice+work: bob\n")
    assert people.expand("alice+work@example.com") == ["bob@example.com"]
    assert people.expand("bob+a+b@example.com") == ["bob@example.com"]
    with pytest.raises(UnknownUser):
        people.expand("+tag@example.com")


def test_alias_that_names_its_user_keeps_a_copy(people):
    write_aliases(people, "alice: alice, bob\n")
    assert people.expand("alice@example.com") == ["alice@example.com", "bob@example.com"]


def test_alias_loops_without_a_mailbox_and_deep_chains_raise_alias_loop(people):
    write_aliases(people, "a: b\nb: c\nc: a\n")
    with pytest.raises(AliasLoop):
        people.expand("a@example.com")
    with pytest.raises(AliasLoop):                # not hidden as "no such recipient"
        people.recipient_exists("a@example.com")
    write_aliases(people, "".join("l%d: l%d\n" % (i, i + 1) for i in range(30)) + "l30: alice\n")
    with pytest.raises(AliasLoop):
        people.expand("l0@example.com")
    assert people.expand("l15@example.com") == ["alice@example.com"]


def test_aliases_that_list_each_other_reach_every_member_once(people, caplog):
    write_aliases(people, "a: b, alice, x@remote.example\nb: a, bob, y@remote.example\n"
                          "c: a, b, carol@example.org\n")
    with caplog.at_level("WARNING", logger="mailbox_store"):
        assert sorted(people.expand("a@example.com")) == [
            "alice@example.com", "bob@example.com", "x@remote.example", "y@remote.example"]
    assert "alias loop a@example.com -> b@example.com -> a@example.com cut" in caplog.text
    assert sorted(people.expand("b@example.com")) == sorted(people.expand("a@example.com"))
    assert sorted(people.expand("c@example.com")) == [
        "alice@example.com", "bob@example.com", "carol@example.org", "x@remote.example",
        "y@remote.example"]
    assert people.recipient_exists("a@example.com")
    assert "a@example.com" in people.sender_addresses("alice@example.com")


def test_an_alias_reached_twice_is_expanded_once_without_false_warnings(people, caplog):
    write_aliases(people, "all: left, right\nleft: team\nright: team\nteam: alice, gone\n")
    with caplog.at_level("WARNING", logger="mailbox_store"):
        assert people.expand("all@example.com") == ["alice@example.com"]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["alias team@example.com: target <gone@example.com> has no mailbox, skipped"]


def test_alias_expansion_past_the_recipient_bound_raises_alias_too_big(people, monkeypatch):
    monkeypatch.setattr(mailbox_store, "MAX_ALIAS_RECIPIENTS", 5)
    write_aliases(people, "five: %s\nsix: five, z@remote.example\n"
                  % ", ".join("u%d@remote.example" % n for n in range(5)))
    assert len(people.expand("five@example.com")) == 5
    with pytest.raises(mailbox_store.AliasTooBig, match="more than 5"):
        people.expand("six@example.com")
    with pytest.raises(AliasLoop):                # callers refusing loops refuse it too
        people.recipient_exists("six@example.com")


def test_unknown_local_user_raises_and_remote_passes(people):
    with pytest.raises(UnknownUser):
        people.expand("nobody@example.com")
    assert not people.recipient_exists("nobody@example.com")
    assert people.recipient_exists("anyone@elsewhere.example")


def test_bad_alias_lines_are_skipped_not_fatal(people):
    write_aliases(people, "no colon here\npipe: |/bin/sh\nok: alice\nbad/name: bob\n")
    assert people.expand("ok@example.com") == ["alice@example.com"]
    assert not people.recipient_exists("pipe@example.com")


def test_postmaster_and_abuse_prefer_an_explicit_alias(people):
    write_aliases(people, "postmaster: bob\nabuse@example.org: alice@example.com\n")
    assert people.expand("postmaster@example.com") == ["bob@example.com"]
    assert people.expand("Postmaster@example.com") == ["bob@example.com"]
    assert people.expand("abuse@example.com") == ["bob@example.com"]   # abuse follows postmaster
    assert people.expand("abuse@example.org") == ["alice@example.com"]
    assert people.expand("postmaster") == ["bob@example.com"]           # RFC 5321 4.5.1


def test_postmaster_falls_back_to_the_first_user_of_the_domain(people):
    assert people.expand("postmaster@example.com") == ["alice@example.com"]
    assert people.expand("postmaster@example.org") == ["carol@example.org"]
    assert people.expand("abuse@example.org") == ["carol@example.org"]


def test_postmaster_of_a_domain_without_users_reaches_the_first_user(people):
    people.domains.append("empty.example")
    assert people.expand("postmaster@empty.example") == ["alice@example.com"]


def test_postmaster_without_any_user_gets_a_mailbox_kept_for_later(store, fast_hash):
    assert store.expand("abuse@example.com") == ["postmaster@example.com"]
    path = store.deliver("postmaster@example.com", b"Subject: x\n\nhi\n", "")
    store.add_user("postmaster@example.com", "pw")
    with store.open_mailbox("postmaster@example.com") as mailbox:
        assert mailbox.messages[0].path == path


def test_sender_addresses_include_aliases_that_reach_the_user(people):
    write_aliases(people, "sales: alice, bob\nboss@example.org: alice@example.com\nother: bob\n")
    assert people.sender_addresses("alice@example.com") == {
        "alice@example.com", "sales@example.com", "boss@example.org"}
    assert people.sender_addresses("carol@example.org") == {"carol@example.org"}


def test_cli_alias_management_refuses_loops(store, fast_hash):
    spool = store.spool_dir
    store.add_user("alice@example.com", "pw")
    assert cli(spool, "add-alias", "team", "alice", "x@remote.example").returncode == 0
    assert cli(spool, "add-alias", "team", "alice", "y@remote.example").returncode == 0
    assert cli(spool, "list-aliases").stdout == b"team: alice, x@remote.example, y@remote.example\n"
    assert cli(spool, "add-alias", "a", "b").returncode == 0
    loop = cli(spool, "add-alias", "b", "a")
    assert loop.returncode == 1 and b"loop" in loop.stderr
    assert cli(spool, "add-alias", "c", "|/bin/sh").returncode == 1
    assert cli(spool, "del-alias", "team").returncode == 0
    assert cli(spool, "del-alias", "team").returncode == 1
    assert cli(spool, "list-aliases").stdout == b"a: b\n"


def test_cli_keeps_comments_of_a_hand_edited_aliases_file(store):
    write_aliases(store, "# site aliases\nold: x@remote.example\n\n# end\n")
    store.add_alias("new", ["y@remote.example"])
    store.delete_alias("old")
    assert open(os.path.join(store.spool_dir, "aliases")).read() == (
        "# site aliases\n\n# end\nnew: y@remote.example\n")


# --- Delivery ---

def test_delivery_writes_maildir_name_with_sizes_and_prepends_headers(people):
    message = b"Subject: hi\r\n\r\nline\r\n.dot\r\n"
    path = people.deliver("alice@example.com", message, "sender@remote.example")
    maildir = os.path.join(people.spool_dir, "mail", "example.com", "alice", "Maildir")
    assert os.path.dirname(path) == os.path.join(maildir, "new")
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    data = open(path, "rb").read()
    assert data == (b"Return-Path: <sender@remote.example>\r\nDelivered-To: alice@example.com\r\n"
                    + message)
    name = os.path.basename(path)
    seconds, micro, host_sizes = name.split(".", 2)
    assert seconds.isdigit() and micro.startswith("M") and "P%dQ" % os.getpid() in micro
    assert host_sizes.endswith(",S=%d,W=%d" % (len(data), len(data)))
    assert people.mailbox_usage("alice@example.com") == (1, len(data))


def test_delivery_keeps_lf_messages_as_they_came(people):
    path = people.deliver("alice@example.com", b"Subject: hi\n\nbody\n", "")
    data = open(path, "rb").read()
    assert data == b"Return-Path: <>\nDelivered-To: alice@example.com\nSubject: hi\n\nbody\n"
    assert path.endswith(",S=%d,W=%d" % (len(data), len(data) + 5))


def test_delivery_to_unknown_user_raises(people):
    with pytest.raises(UnknownUser):
        people.deliver("nobody@example.com", b"x\r\n", "")


def test_return_path_cannot_inject_headers(people):
    path = people.deliver("alice@example.com", b"x\r\n", "a@b>\r\nX-Evil: 1")
    assert open(path, "rb").read().startswith(b"Return-Path: <a@bX-Evil: 1>\r\nDelivered-To:")


def test_hostname_slash_and_colon_are_escaped_in_names(tmp_path, fast_hash):
    store = Store(str(tmp_path), ["example.com"], hostname="odd/host:name")
    store.add_user("a@example.com", "pw")
    name = os.path.basename(store.deliver("a@example.com", b"x\n", ""))
    assert ".odd\\057host\\072name,S=" in name and ":" not in name


def test_parallel_deliveries_get_unique_names(people):
    paths = []

    def deliver():
        for _ in range(50):
            paths.append(people.deliver("bob@example.com", b"Subject: x\r\n\r\nhi\r\n", ""))
    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(paths)) == 200
    assert people.mailbox_usage("bob@example.com")[0] == 200


def test_delivery_failure_leaves_nothing_behind(people, monkeypatch):
    people.deliver("alice@example.com", b"first\r\n", "")
    maildir = people.maildir_path("alice@example.com")
    before = os.listdir(os.path.join(maildir, "new"))

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mailbox_store.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        people.deliver("alice@example.com", b"x\r\n", "")
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    assert os.listdir(os.path.join(maildir, "new")) == before


def test_maildir_deliver_writes_any_maildir_durably_with_both_sizes_in_the_name(tmp_path):
    maildir = str(tmp_path / "not" / "yet" / "Maildir")
    message = b"Subject: lf\n\nbody\n"
    path = mailbox_store.maildir_deliver(maildir, message, hostname="odd/host:name")
    assert os.path.dirname(path) == os.path.join(maildir, "new")
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    assert open(path, "rb").read() == message
    name = os.path.basename(path)
    assert ".odd\\057host\\072name," in name and ":" not in name
    assert name.endswith(",S=%d,W=%d" % (len(message), mailbox_store.crlf_size(message)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"a", b"\r\n", b"."]), max_size=30),
       st.lists(st.integers(0, 40), max_size=5))
def test_crlf_size_counted_in_blocks_agrees_with_the_whole_count(parts, cuts):
    data = b"".join(parts)
    sizes, start = mailbox_store.CRLFSize(), 0
    for cut in sorted(cuts):
        sizes.add(data[start:cut])
        start = max(start, cut)
    sizes.add(data[start:])
    assert (sizes.size, sizes.crlf_size) == (len(data), mailbox_store.crlf_size(data))
    assert mailbox_store.crlf_size(data) == len(data.replace(b"\r\n", b"\n").replace(
        b"\n", b"\r\n")) + (2 if data and not data.endswith(b"\n") else 0)


def test_maildir_deliver_copies_blocks_and_names_the_file_with_their_sizes(tmp_path):
    maildir = str(tmp_path / "Maildir")
    blocks = [b"Subject: split\r", b"\n\r\nbody\n", b"last line without an end"]
    path = mailbox_store.maildir_deliver(maildir, iter(blocks), hostname="h")
    message = b"".join(blocks)
    assert open(path, "rb").read() == message
    assert path.endswith(",S=%d,W=%d" % (len(message), mailbox_store.crlf_size(message)))
    assert os.listdir(os.path.join(maildir, "tmp")) == []


def test_a_failed_block_delivery_leaves_nothing_in_the_maildir(tmp_path):
    maildir = str(tmp_path / "Maildir")

    def blocks():
        yield b"Subject: cut\r\n\r\n"
        raise OSError(5, "the queue file went away")
    with pytest.raises(OSError):
        mailbox_store.maildir_deliver(maildir, blocks(), hostname="h")
    assert os.listdir(os.path.join(maildir, "tmp")) == os.listdir(os.path.join(maildir, "new")) == []


def test_store_delivers_blocks_with_return_path_in_the_first_line_ending(people):
    path = people.deliver("alice@example.com", iter([b"Subject: x\r\n\r\nbo", b"dy\r\n"]),
                          "carol@example.com")
    assert open(path, "rb").read() == (b"Return-Path: <carol@example.com>\r\n"
                                       b"Delivered-To: alice@example.com\r\n"
                                       b"Subject: x\r\n\r\nbody\r\n")


def test_store_delivery_goes_through_maildir_deliver(people, monkeypatch):
    calls = []
    real = mailbox_store.maildir_deliver

    def recording(maildir, message, hostname=None, *once):
        calls.append((maildir, hostname))
        return real(maildir, message, hostname, *once)
    monkeypatch.setattr(mailbox_store, "maildir_deliver", recording)
    people.deliver("alice@example.com", b"x\r\n", "")
    assert calls == [(people.maildir_path("alice@example.com"), "mx.example.com")]


def test_a_snapshot_gives_one_view_of_users_and_aliases_to_its_thread_only(people, tmp_path):
    other = Store(people.spool_dir, ["example.com"])            # another process, say
    seen_elsewhere = []
    with people.snapshot():
        other.add_user("dave@example.com", "pw")
        with pytest.raises(UnknownUser):
            people.expand("dave@example.com")                   # as it was when it began
        thread = threading.Thread(target=lambda: seen_elsewhere.append(people.expand("dave@example.com")))
        thread.start()
        thread.join(10)
    assert seen_elsewhere == [["dave@example.com"]]
    assert people.expand("dave@example.com") == ["dave@example.com"]


def test_a_maildir_missing_a_folder_gets_it_back_with_the_next_delivery(people):
    first = people.deliver("bob@example.com", b"Subject: 1\r\n\r\none\r\n", "")
    maildir = people.maildir_path("bob@example.com")
    os.rename(first, os.path.join(maildir, "cur", os.path.basename(first)))
    os.rmdir(os.path.join(maildir, "new"))
    second = people.deliver("bob@example.com", b"Subject: 2\r\n\r\ntwo\r\n", "")
    assert os.listdir(os.path.join(maildir, "new")) == [os.path.basename(second)]
    assert os.listdir(os.path.join(maildir, "tmp")) == []


class FsyncLog:
    """Stands in for the directory fsync: slow enough for writers to pile up, and each
    begin and end stamped on one clock shared with the callers."""

    def __init__(self, seconds=0.05, fail=False):
        self.seconds = seconds
        self.fail = fail
        self.lock = threading.Lock()
        self.clock = 0
        self.fsyncs = []               # (begin, end) stamps of each fsync

    def stamp(self):
        with self.lock:
            self.clock += 1
            return self.clock

    def __call__(self, path):
        begin = self.stamp()
        time.sleep(self.seconds)       # a slow disk, the thing played
        end = self.stamp()
        self.fsyncs.append((begin, end))
        if self.fail:
            raise OSError(5, "Input/output error")


def sync_from_threads(path, fsync_log, count):
    """count threads call fsync_dir(path) at once: [(called, returned, error or None)]."""
    calls = []
    barrier = threading.Barrier(count)

    def writer():
        barrier.wait(10)
        called = fsync_log.stamp()
        try:
            mailbox_store.fsync_dir(path)
            error = None
        except OSError as exc:
            error = exc
        calls.append((called, fsync_log.stamp(), error))
    threads = [threading.Thread(target=writer) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return calls


def test_concurrent_directory_fsyncs_are_shared_yet_each_writer_waits_for_one_begun_after_it(
        tmp_path, monkeypatch):
    fsync_log = FsyncLog()
    monkeypatch.setattr(mailbox_store, "_fsync_now", fsync_log)
    calls = sync_from_threads(str(tmp_path), fsync_log, 12)
    assert len(calls) == 12 and all(error is None for _, _, error in calls)
    assert len(fsync_log.fsyncs) < 12              # shared: typically 2 or 3 for 12 writers
    for called, returned, _ in calls:              # each is covered by an fsync begun after it
        assert any(called < begin and end < returned for begin, end in fsync_log.fsyncs)
    assert mailbox_store._syncs == {}              # nothing kept once nobody waits


def test_a_failed_directory_fsync_fails_every_writer_it_was_to_cover(tmp_path, monkeypatch):
    fsync_log = FsyncLog(fail=True)
    monkeypatch.setattr(mailbox_store, "_fsync_now", fsync_log)
    calls = sync_from_threads(str(tmp_path), fsync_log, 8)
    assert len(calls) == 8
    assert all(isinstance(error, OSError) and error.errno == 5 for _, _, error in calls)
    assert mailbox_store._syncs == {}


def test_directory_fsync_from_many_threads_on_a_real_disk(tmp_path):
    folders = [str(tmp_path / name) for name in "ab"]
    for folder in folders:
        os.mkdir(folder)
    errors = []

    def writer(n):
        try:
            for i in range(20):
                folder = folders[(n + i) % 2]
                open(os.path.join(folder, "%d-%d" % (n, i)), "wb").close()
                mailbox_store.fsync_dir(folder)
        except OSError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and mailbox_store._syncs == {}
    assert sum(len(os.listdir(folder)) for folder in folders) == 120
    with pytest.raises(FileNotFoundError):
        mailbox_store.fsync_dir(str(tmp_path / "missing"))


def test_make_dirs_creates_relative_paths_and_their_parents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mailbox_store.make_dirs(os.path.join("a", "b", "c"))
    assert os.path.isdir(tmp_path / "a" / "b" / "c")
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700


# --- Mailbox (the POP3 side) ---

SAMPLES = [
    b"Subject: crlf\r\n\r\nbody\r\n",
    b"Subject: lf\n\nbody\n.starts with dot\n",
    b"Subject: mixed\r\n\nbare\rcr\n",
    b"Subject: 8bit\r\n\r\n\xe9t\xe9 \x00\xff\r\n",
    b"Subject: no final newline\n\nlast line",
    b"Subject: ends in cr\r\n\r\nx\r",
]


def crlf_reference(data):
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out + b"\r\n" if out and not out.endswith(b"\n") else out


@pytest.mark.parametrize("message", SAMPLES)
def test_mailbox_size_is_exactly_what_read_yields(people, message):
    path = people.deliver("alice@example.com", message, "s@x")
    with people.open_mailbox("alice@example.com") as mailbox:
        info = mailbox.messages[0]
        sent = b"".join(mailbox.read(1))
    assert len(sent) == info.size
    assert sent == crlf_reference(open(path, "rb").read())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_crlf_conversion_is_exact_across_block_boundaries(data, block_size):
    blocks = [data[start:start + block_size] for start in range(0, len(data), block_size)]
    sent = b"".join(mailbox_store._crlf_blocks(blocks))
    assert sent == crlf_reference(data)
    assert len(sent) == mailbox_store.crlf_size(data)


@pytest.mark.parametrize("block_size", [4, 100])
def test_file_blocks_read_to_the_end_of_what_was_listed_and_past_it(tmp_path, block_size):
    path = tmp_path / "message"
    path.write_bytes(b"0123456789" * 3)
    for listed in (30, 10, 50):          # as listed; smaller (the file grew), larger (shrank)
        fd = os.open(str(path), os.O_RDONLY)
        try:
            assert b"".join(mailbox_store._file_blocks(fd, block_size, listed)) == b"0123456789" * 3
        finally:
            os.close(fd)


def test_file_blocks_go_on_after_a_short_read_before_the_listed_size():
    read_end, write_end = os.pipe()      # a pipe gives short reads before its end
    try:
        os.write(write_end, b"first part ")
        blocks = mailbox_store._file_blocks(read_end, 100, 22)
        assert next(blocks) == b"first part "
        os.write(write_end, b"second part")
        os.close(write_end)
        write_end = None
        assert b"".join(blocks) == b"second part"
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def test_foreign_maildir_files_get_measured_sizes_and_stable_uids(people):
    maildir = people.maildir_path("alice@example.com")
    people.deliver("alice@example.com", b"x\n", "")
    os.makedirs(os.path.join(maildir, "cur"), exist_ok=True)
    foreign = os.path.join(maildir, "cur", "1.procmail-" + "x" * 80 + ":2,S")
    with open(foreign, "wb") as f:
        f.write(b"From: a\n\nb\n")
    with people.open_mailbox("alice@example.com") as mailbox:
        infos = mailbox.listing()
        uids = [i.uid for i in infos]
        assert [i.size for i in infos if i.path == foreign] == [len(crlf_reference(b"From: a\n\nb\n"))]
    for uid in uids:
        assert 0 < len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)
    with people.open_mailbox("alice@example.com") as mailbox:
        assert [i.uid for i in mailbox.listing()] == uids


def settle(maildir):
    """new/ and cur/ last changed a minute ago, as in a Maildir nobody wrote to lately."""
    past = time.time() - 60
    for sub in ("new", "cur"):
        os.utime(os.path.join(maildir, sub), (past, past))


def opened(store, user="alice@example.com"):
    """(names with folder, sizes, file sizes, uids) an open mailbox lists."""
    with store.open_mailbox(user) as mailbox:
        return [(os.path.basename(os.path.dirname(i.path)), os.path.basename(i.path), i.size,
                 i.file_size, i.uid) for i in mailbox.listing()]


def plain(maildir):
    listing = mailbox_store._scan(maildir)
    return [("cur" if listing.in_cur[n] else "new", name, listing.sizes[n], listing.file_sizes[n],
             mailbox_store._uid_for(mailbox_store._unique_part(name)))
            for n, name in enumerate(listing.names)]


# --- One delivery, one file: a delivery id names the file the same at every attempt ---

ONCE = dict(delivery_id="018A5F3C2B1D04E7A2R1a2b3c4d", arrival=1700000000.25)


def test_a_delivery_id_names_the_file_the_same_at_every_attempt(people):
    maildir = people.maildir_path("alice@example.com")
    path = people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "a@b.test", **ONCE)
    assert os.path.basename(path).startswith(
        "1700000000.M250000I018A5F3C2B1D04E7A2R1a2b3c4d.mx.example.com,S=")
    # The attempt repeated after a crash that came before its result was recorded.
    with pytest.raises(mailbox_store.AlreadyDelivered) as again:
        people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "a@b.test", **ONCE)
    assert again.value.path == path
    assert os.listdir(os.path.join(maildir, "new")) == [os.path.basename(path)]
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    # Another recipient's (or another host's) delivery of the same message is its own.
    other = people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "a@b.test",
                           delivery_id="018A5F3C2B1D04E7A2R99999999", arrival=ONCE["arrival"])
    assert other != path
    uids = [uid for *_, uid in opened(people)]
    assert uids == sorted(os.path.basename(p).split(",")[0] for p in (path, other))
    assert all(mailbox_store.UIDL_PATTERN.match(uid) for uid in uids)
    with pytest.raises(ValueError):
        people.deliver("alice@example.com", b"x\r\n", "", delivery_id="no/slash", arrival=1.0)


def test_a_delivery_a_reader_moved_to_cur_is_found_there_past_a_stale_index(people):
    maildir = people.maildir_path("alice@example.com")
    path = people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "", **ONCE)
    settle(maildir)
    assert len(opened(people)) == 1                    # writes an index that is trusted
    # A reader files it as seen: cur/ changes after the index was written.
    seen = os.path.join(maildir, "cur", os.path.basename(path) + ":2,S")
    os.rename(path, seen)
    with pytest.raises(mailbox_store.AlreadyDelivered) as again:
        people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "",
                       look_in_cur=True, **ONCE)
    assert again.value.path == seen
    # Found through an index that lists cur/ as it is now, too.
    settle(maildir)
    assert len(opened(people)) == 1
    with pytest.raises(mailbox_store.AlreadyDelivered) as again:
        people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "",
                       look_in_cur=True, **ONCE)
    assert again.value.path == seen
    # Without look_in_cur only new/ is looked at (one stat): the documented limit.
    people.deliver("alice@example.com", b"Subject: once\r\n\r\nbody\r\n", "", **ONCE)
    assert len(opened(people)) == 2


def foreign_file(maildir, sub, name, data):
    """A message another Maildir writer (procmail, Dovecot) leaves: no sizes in the name."""
    with open(os.path.join(maildir, sub, name), "wb") as f:
        f.write(data)


def test_a_settled_maildir_is_listed_from_its_index_without_reading_a_file(people, monkeypatch):
    maildir = people.maildir_path("alice@example.com")
    for number in range(5):
        people.deliver("alice@example.com", b"m%d\n" % number, "")
    foreign_file(maildir, "new", "100.foreign", b"a\nb\n")
    settle(maildir)
    first = opened(people)                                  # lists, measures, writes the index
    assert first == plain(maildir) and len(first) == 6
    assert os.path.exists(os.path.join(maildir, mailbox_store.INDEX_FILE))
    monkeypatch.setattr(mailbox_store, "_scan", lambda *a: pytest.fail("listed again"))
    monkeypatch.setattr(mailbox_store, "_measure", lambda *a: pytest.fail("read a file"))
    assert opened(people) == first


def test_the_index_follows_every_change_another_maildir_writer_makes(people, monkeypatch):
    maildir = people.maildir_path("alice@example.com")
    for number in range(4):
        people.deliver("alice@example.com", b"m%d\n" % number, "")
    foreign_file(maildir, "new", "100.foreign", b"a\nb\n")
    foreign_file(maildir, "cur", "101.foreign:2,S", b"c\n")
    settle(maildir)
    assert opened(people) == plain(maildir)
    reads = []
    real_measure = mailbox_store._measure
    monkeypatch.setattr(mailbox_store, "_measure", lambda path: reads.append(path) or real_measure(path))
    new = sorted(n for n in os.listdir(os.path.join(maildir, "new")) if ",W=" in n)
    changes = [
        lambda: people.deliver("alice@example.com", b"late\n", ""),                    # adds
        lambda: foreign_file(maildir, "new", "102.foreign", b"new\r\n"),              # adds, no W=
        lambda: os.rename(os.path.join(maildir, "new", new[0]),                         # reads
                          os.path.join(maildir, "cur", new[0] + ":2,S")),
        lambda: os.rename(os.path.join(maildir, "cur", "101.foreign:2,S"),              # flags
                          os.path.join(maildir, "cur", "101.foreign:2,RS")),
        lambda: os.unlink(os.path.join(maildir, "new", new[1])),                        # deletes
        lambda: os.rename(os.path.join(maildir, "new", "100.foreign"),                  # no W=,
                          os.path.join(maildir, "cur", "100.foreign:2,S")),             # moved
    ]
    ours = []
    for change in changes:
        change()
        settle(maildir)
        expected = plain(maildir)                           # reads every foreign file
        del reads[:]
        assert opened(people) == expected
        assert opened(people) == expected                   # from the index this time
        ours += reads
    assert [os.path.basename(p) for p in ours] == ["102.foreign"]     # read once, when new
    # Same name, other content (a writer that broke the Maildir rule): measured again.
    foreign_file(maildir, "new", "102.foreign", b"longer\nthan before\n")
    settle(maildir)
    listed = opened(people)
    assert listed == plain(maildir)
    assert [i[2] for i in listed if i[1] == "102.foreign"] == [len(b"longer\r\nthan before\r\n")]


def test_a_maildir_changed_twice_in_one_timestamp_tick_is_listed_again(people):
    maildir = people.maildir_path("alice@example.com")
    people.deliver("alice@example.com", b"one\n", "")
    assert len(opened(people)) == 1                 # new/ changed just now: index not trusted
    before = os.stat(os.path.join(maildir, "new"))
    people.deliver("alice@example.com", b"two\n", "")
    os.utime(os.path.join(maildir, "new"), ns=(before.st_atime_ns, before.st_mtime_ns))
    assert len(opened(people)) == 2 and opened(people) == plain(maildir)


def test_a_name_with_a_line_feed_is_listed_without_an_index(people):
    maildir = people.maildir_path("alice@example.com")
    people.deliver("alice@example.com", b"one\n", "")
    foreign_file(maildir, "new", "100.odd\nname", b"two\n")
    settle(maildir)
    assert opened(people) == plain(maildir) and len(opened(people)) == 2
    assert not os.path.exists(os.path.join(maildir, mailbox_store.INDEX_FILE))


@pytest.mark.parametrize("damage", ["torn", "garbage", "empty", "other count"])
def test_a_damaged_index_is_ignored(people, damage):
    maildir = people.maildir_path("alice@example.com")
    for number in range(3):
        people.deliver("alice@example.com", b"m%d\n" % number, "")
    settle(maildir)
    expected = opened(people)
    path = os.path.join(maildir, mailbox_store.INDEX_FILE)
    data = open(path, "rb").read()
    damaged = {"torn": data[:-5], "garbage": b"\x00" * len(data), "empty": b"",
               "other count": data.replace(b" 3 ", b" 2 ", 1)}[damage]
    with open(path, "wb") as f:
        f.write(damaged)
    assert opened(people) == expected


def test_messages_take_a_view_each_and_the_marks_live_in_the_mailbox(people):
    for number in range(3):
        people.deliver("alice@example.com", b"m%d\n" % number, "")
    with people.open_mailbox("alice@example.com") as mailbox:
        assert mailbox.delete(2) and not mailbox.delete(2) and mailbox.message(2) is None
        b"".join(mailbox.read(1))
        assert mailbox.marked() == (1, 1)
        assert [(i.number, i.deleted, i.retrieved) for i in mailbox.messages] == [
            (1, False, True), (2, True, False), (3, False, False)]
        assert mailbox.stat() == (2, mailbox.messages[0].size + mailbox.messages[2].size)
        mailbox.reset()
        assert mailbox.marked() == (0, 1) and len(mailbox.listing()) == 3


def test_top_gives_header_blank_line_and_n_body_lines(people):
    people.deliver("alice@example.com", b"Subject: t\nX: y\n\none\ntwo\nthree\n", "")
    people.deliver("alice@example.com", b"Subject: t\n\nonly", "")
    with people.open_mailbox("alice@example.com") as mailbox:
        head = b"Return-Path: <>\r\nDelivered-To: alice@example.com\r\nSubject: t\r\n"
        assert b"".join(mailbox.read(1, 0)) == head + b"X: y\r\n\r\n"
        assert b"".join(mailbox.read(1, 2)) == head + b"X: y\r\n\r\none\r\ntwo\r\n"
        assert b"".join(mailbox.read(1, 99)) == head + b"X: y\r\n\r\none\r\ntwo\r\nthree\r\n"
        assert b"".join(mailbox.read(2, 5)) == head + b"\r\nonly\r\n"
        assert not mailbox.messages[0].retrieved


def test_second_open_is_busy_until_the_first_closes(people):
    first = people.open_mailbox("alice@example.com")
    with pytest.raises(MailboxBusy):
        people.open_mailbox("ALICE@example.com")
    first.close()
    people.open_mailbox("alice@example.com").close()


def test_lock_of_a_killed_process_does_not_block_the_mailbox(people):
    code = ("import sys, mailbox_store; s = mailbox_store.Store(sys.argv[1]);"
            "m = s.open_mailbox('alice@example.com'); print('locked', flush=True);"
            "sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, people.spool_dir], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxBusy):
            people.open_mailbox("alice@example.com")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    people.open_mailbox("alice@example.com").close()


def test_commit_removes_deleted_and_files_retrieved_as_seen(people):
    for n in range(3):
        people.deliver("alice@example.com", b"Subject: %d\n\n" % n, "")
    with people.open_mailbox("alice@example.com") as mailbox:
        uids = [i.uid for i in mailbox.messages]
        assert mailbox.delete(1) and not mailbox.delete(1) and not mailbox.delete(9)
        assert mailbox.stat() == (2, sum(i.size for i in mailbox.messages[1:]))
        mailbox.reset()
        assert mailbox.stat()[0] == 3
        mailbox.delete(2)
        b"".join(mailbox.read(3))
        assert mailbox.commit() == 1
    maildir = people.maildir_path("alice@example.com")
    assert len(os.listdir(os.path.join(maildir, "new"))) == 1
    assert [n.endswith(":2,S") for n in os.listdir(os.path.join(maildir, "cur"))] == [True]
    with people.open_mailbox("alice@example.com") as mailbox:
        assert [i.uid for i in mailbox.messages] == [uids[0], uids[2]]


def test_message_moved_by_another_client_is_still_read(people):
    path = people.deliver("alice@example.com", b"Subject: x\n\nhi\n", "")
    with people.open_mailbox("alice@example.com") as mailbox:
        cur = os.path.join(os.path.dirname(os.path.dirname(path)), "cur")
        os.rename(path, os.path.join(cur, os.path.basename(path) + ":2,RS"))
        assert b"".join(mailbox.read(1)).endswith(b"hi\r\n")
        mailbox.delete(1)
        assert mailbox.commit() == 1
    assert os.listdir(cur) == []


# --- CLI ---

def test_cli_user_lifecycle(tmp_path):
    spool = tmp_path / "spool"
    added = cli(spool, "add-user", "Dave@Example.com", stdin="first pw\n")
    assert added.returncode == 0 and b"dave@example.com" in added.stdout
    again = cli(spool, "add-user", "dave@example.com", stdin="pw\n")
    assert again.returncode == 1 and b"already exists" in again.stderr
    store = Store(str(spool))
    store.deliver("dave@example.com", b"Subject: x\r\n\r\nhi\r\n", "")
    listing = cli(spool, "list-users").stdout.decode()
    assert listing.startswith("dave@example.com 1 messages ")
    assert cli(spool, "passwd", "dave@example.com", stdin="second pw\n").returncode == 0
    assert store.authenticate("dave", "second pw") == "dave@example.com"
    assert cli(spool, "passwd", "nobody@example.com", stdin="x\n").returncode == 1
    assert cli(spool, "del-user", "dave@example.com").returncode == 0
    assert os.path.isdir(store.maildir_path("dave@example.com"))
    assert cli(spool, "add-user", "dave@example.com", stdin="pw\n").returncode == 0
    assert cli(spool, "del-user", "dave@example.com", "--purge").returncode == 0
    assert not os.path.exists(os.path.dirname(store.maildir_path("dave@example.com")))
    missing = cli(spool, "del-user", "dave@example.com")
    assert missing.returncode == 1 and b"no such user" in missing.stderr


def test_cli_refuses_empty_password_and_bad_usage(tmp_path):
    spool = tmp_path / "spool"
    empty = cli(spool, "add-user", "e@example.com", stdin="\n")
    assert empty.returncode == 1 and b"empty" in empty.stderr
    assert cli(spool, "frobnicate").returncode == 64      # EX_USAGE, as every CLI here
    assert cli(spool, "add-user").returncode == 64


def test_cli_prompts_twice_on_a_terminal(monkeypatch, tmp_path, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    answers = iter(["one", "two", "same", "same"])
    monkeypatch.setattr(mailbox_store.getpass, "getpass", lambda prompt: next(answers))
    monkeypatch.setattr(mailbox_store.sys, "stdin", Terminal())
    spool = str(tmp_path / "spool")
    assert mailbox_store.main(["--spool", spool, "add-user", "t@example.com"]) == 1
    assert "do not match" in capsys.readouterr().err
    assert mailbox_store.main(["--spool", spool, "add-user", "t@example.com"]) == 0
    assert Store(spool).authenticate("t@example.com", "same") == "t@example.com"


# --- The cache of verified logins ---

def counting_verifications(monkeypatch):
    calls = []
    real = mailbox_store.verify_password

    def verify(password, stored):
        calls.append(password)
        return real(password, stored)
    monkeypatch.setattr(mailbox_store, "verify_password", verify)
    return calls


def test_a_repeated_login_is_verified_once_and_a_wrong_password_every_time(people, monkeypatch):
    calls = counting_verifications(monkeypatch)
    assert people.authenticate("alice@example.com", "pw") == "alice@example.com"
    assert people.authenticate("alice", "pw") == "alice@example.com"
    assert len(calls) == 1
    for _ in range(3):
        assert people.authenticate("alice@example.com", "wrong") is None
    assert len(calls) == 4                 # every guess pays a full hash
    assert people.authenticate("bob@example.com", "pw") == "bob@example.com"
    assert len(calls) == 5                 # the same password, another user: not cached


def test_a_new_password_voids_the_cached_login(people, monkeypatch):
    assert people.authenticate("alice@example.com", "pw")
    people.set_password("alice@example.com", "new-pw")
    calls = counting_verifications(monkeypatch)
    assert people.authenticate("alice@example.com", "pw") is None
    assert people.authenticate("alice@example.com", "new-pw") == "alice@example.com"
    assert len(calls) == 2


def test_a_cached_login_expires():
    now = [1000.0]
    cache = mailbox_store._LoginCache(ttl=60, size=2, clock=lambda: now[0])
    cache.remember("a@x.test", "pw", "HASH")
    assert cache.verified("a@x.test", "pw", "HASH")
    assert not cache.verified("a@x.test", "pw", "OTHER HASH")
    cache.remember("a@x.test", "pw", "HASH")
    now[0] += 61
    assert not cache.verified("a@x.test", "pw", "HASH")
    for user in ("b@x.test", "c@x.test", "d@x.test"):
        cache.remember(user, "pw", "HASH")
    assert len(cache.entries) == 2 and not cache.verified("b@x.test", "pw", "HASH")
    assert all(b"pw" not in key for key in cache.entries)     # HMACs, not passwords
