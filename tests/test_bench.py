"""The bench scripts stand alone: each answers --help, and nothing tracked points outside the
repository for the peers (bench/peers.py sets them up). Fast; no peer is started."""

import glob
import os
import subprocess
import sys

import pytest

from support import ROOT

BENCH_SCRIPTS = sorted(path for path in glob.glob(os.path.join(ROOT, "bench", "*.py"))
                       if "__main__" in open(path, encoding="utf-8").read())
# Spelled in pieces, so that this file does not match itself.
OUTSIDE_PATHS = [b"../" + b"shared", b"shared" + b"/bench"]


def tracked_files():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                timeout=30)
    except OSError:
        pytest.skip("git not installed")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_names_a_harness_outside_the_repository():
    offenders = []
    for name in tracked_files():
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        offenders += ["%s: %s" % (name, needle.decode()) for needle in OUTSIDE_PATHS if needle in data]
    assert not offenders, offenders


def test_every_bench_script_is_found():
    names = {os.path.basename(path) for path in BENCH_SCRIPTS}
    assert {"run_bench.py", "peers.py", "smtp_bench.py", "smtp_out_bench.py", "pop3_bench.py",
            "dns_bench.py"} <= names, names


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=os.path.basename)
def test_bench_script_answers_help(script):
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize("spool", [False, True], ids=["one-file", "with-spool"])
def test_floor_servers_store_and_serve_a_message(tmp_path, spool):
    """bench/floor.py's yardsticks do the work they stand for: smtplib's message is in
    new/ once the 250 came (with --spool, soon after it), and poplib reads a message of
    LF lines back as it was, its leading dot stuffed on the wire."""
    import poplib
    import smtplib
    import time
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import floor
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    maildir = tmp_path / "Maildir"
    text = "Subject: floor\r\n\r\nline one\r\n.starts with a dot\r\n"
    with floor.Floor("smtp", maildir, processes=2,
                     spool=tmp_path / "spool" if spool else None) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@bench.test", ["b@bench.test"], text)
        until = time.monotonic() + 10
        while not os.listdir(maildir / "new") and time.monotonic() < until:
            time.sleep(0.01)
    stored = [(maildir / "new" / name).read_bytes() for name in os.listdir(maildir / "new")]
    assert len(stored) == 1 and b"line one\r\n.starts" in stored[0], stored
    unix = b"Subject: floor\n\nline one\n.starts with a dot\n"
    (maildir / "cur" / "1.unix:2,").write_bytes(unix)
    os.unlink(maildir / "new" / os.listdir(maildir / "new")[0])
    with floor.Floor("pop3", maildir, processes=1) as server:
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("anyone")
        client.pass_("anything")
        assert client.list()[1] == [b"1 %d" % len(unix)]
        assert client.retr(1)[1] == [b"Subject: floor", b"", b"line one", b".starts with a dot"]
        client.quit()
