"""The admin tools as an operator types them: they find the spool, fail loudly on a wrong
one, take their options before or after the command, and end quietly in a pipe."""

import os
import subprocess
import sys

import pytest

import plumbing
from support import ROOT

PASSWORD = "s3cret-pass"


def tool(*argv, stdin=b"", cwd=None, env=None):
    environment = dict(os.environ)
    environment.pop(plumbing.SPOOL_ENV, None)
    environment.update(env or {})
    return subprocess.run([sys.executable] + list(argv), input=stdin, capture_output=True,
                          timeout=60, cwd=cwd, env=environment)


def mta(*argv, **options):
    return tool(os.path.join(ROOT, "mta.py"), *argv, **options)


def store(*argv, **options):
    return tool(os.path.join(ROOT, "mailbox_store.py"), *argv, **options)


@pytest.fixture
def spool(tmp_path):
    path = str(tmp_path / "spool")
    result = store("--spool", path, "add-user", "alice@example.com", stdin=(PASSWORD + "\n").encode())
    assert result.returncode == 0, result.stderr
    return path


@pytest.mark.parametrize("argv", [["queue"], ["flush"], ["delete", "--all"], ["queue", "--json"]])
def test_mta_refuses_a_missing_spool(tmp_path, argv):
    missing = str(tmp_path / "nonexistent")
    result = mta("--spool", missing, *argv)
    assert result.returncode == 1
    assert result.stderr.decode() == "mta: no spool at %s (no such folder)\n" % missing
    assert not os.path.exists(missing)


def test_mta_refuses_a_folder_that_is_not_a_spool(tmp_path):
    result = mta("--spool", str(tmp_path), "queue")
    assert result.returncode == 1
    assert b"is not a spool" in result.stderr and b"Mail queue is empty" not in result.stdout


@pytest.mark.parametrize("argv", [["list-users"], ["list-aliases"], ["del-user", "a@b.test"],
                                  ["passwd", "a@b.test"]])
def test_mailbox_store_refuses_a_missing_spool(tmp_path, argv):
    missing = str(tmp_path / "nonexistent")
    result = store("--spool", missing, *argv, stdin=b"pw\n")
    assert (result.returncode, result.stderr.decode()) == (
        1, "mailbox_store: no spool at %s (no such folder)\n" % missing)
    assert not os.path.exists(missing)


def test_add_user_alone_may_start_a_new_spool_and_says_so(tmp_path):
    path = str(tmp_path / "new-spool")
    result = store("--spool", path, "add-user", "bob@example.com", stdin=b"pw-for-bob\n")
    assert result.returncode == 0
    assert result.stderr.decode() == "mailbox_store: created a new spool at %s\n" % path
    assert os.path.isfile(os.path.join(path, "users"))


def test_without_spool_the_tools_use_the_environment_then_refuse(spool, tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    os.mkdir(elsewhere)
    listed = store("list-users", cwd=elsewhere, env={plumbing.SPOOL_ENV: spool})
    assert listed.returncode == 0 and listed.stdout.startswith(b"alice@example.com ")
    queued = mta("sendmail", "alice@example.com", stdin=b"Subject: x\n\nhi\n", cwd=elsewhere,
                 env={plumbing.SPOOL_ENV: spool})
    assert queued.returncode == 0, queued.stderr
    assert len(os.listdir(os.path.join(spool, "queue", "incoming"))) == 1
    if os.path.exists(plumbing.SYSTEM_SPOOL):
        pytest.skip("%s exists on this machine" % plumbing.SYSTEM_SPOOL)
    lost = mta("sendmail", "alice@example.com", stdin=b"Subject: x\n\nhi\n", cwd=elsewhere)
    assert lost.returncode == 78          # EX_CONFIG: sendmail speaks sysexits
    assert b"no spool in ./mailspool or /var/spool/mailtoolkit" in lost.stderr
    assert os.listdir(elsewhere) == []    # no stray ./mailspool that no daemon reads
    assert store("list-users", cwd=elsewhere).returncode == 1


def test_options_may_follow_the_command(spool):
    listed = store("list-users", "--spool", spool)
    assert listed.returncode == 0 and b"alice@example.com" in listed.stdout
    queued = mta("sendmail", "--spool", spool, "--domain", "example.com", "alice",
                 stdin=b"Subject: x\n\nhi\n")
    assert queued.returncode == 0, queued.stderr
    listing = mta("queue", "--spool", spool)
    assert listing.returncode == 0 and b"<alice@example.com>" in listing.stdout


def test_sendmail_gives_a_bare_name_the_first_local_domain(spool):
    result = mta("--spool", spool, "sendmail", "-f", "cron", "alice", stdin=b"Subject: x\n\nhi\n")
    assert result.returncode == 0, result.stderr
    listing = mta("--spool", spool, "queue").stdout.decode()
    assert "<cron@example.com>" in listing and "<alice@example.com>" in listing


def test_sendmail_reads_the_domains_run_all_wrote_for_the_router(spool):
    os.makedirs(os.path.join(spool, "run"), exist_ok=True)
    with open(os.path.join(spool, "run", "mta.ini"), "w") as f:
        f.write("[mta]\nspool = %s\ndomain = example.org, example.com\n" % spool)
    result = mta("--spool", spool, "sendmail", "someone", stdin=b"Subject: x\n\nhi\n")
    assert result.returncode == 0, result.stderr
    assert "<someone@example.org>" in mta("--spool", spool, "queue").stdout.decode()


def test_sendmail_with_no_local_domain_known_refuses_a_bare_name(tmp_path):
    path = str(tmp_path / "spool")
    os.makedirs(os.path.join(path, "queue"))
    result = mta("--spool", path, "sendmail", "-f", "root@example.com", "alice",
                 stdin=b"Subject: x\n\nhi\n")
    assert result.returncode == 64
    assert b"no local domain to add to 'alice'" in result.stderr


def test_a_listing_cut_short_by_its_reader_ends_quietly(spool):
    for n in range(30):
        assert mta("--spool", spool, "sendmail", "-f", "x@example.com", "alice@example.com",
                   stdin=b"Subject: %d\n\nhi\n" % n).returncode == 0
    for command in ([sys.executable, os.path.join(ROOT, "mta.py"), "--spool", spool, "queue",
                     "--json"],
                    [sys.executable, os.path.join(ROOT, "mailbox_store.py"), "--spool", spool,
                     "list-users"]):
        shell = "%s | head -c 1 >/dev/null" % " ".join(command)
        result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True,
                                timeout=60)
        assert b"Traceback" not in result.stderr and b"Broken pipe" not in result.stderr, result.stderr
