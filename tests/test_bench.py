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
