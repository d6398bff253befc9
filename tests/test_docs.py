"""The documents stay true to the code: every flag documented, the settings reference and
the sample config written from the code, links that resolve, no stray files."""

import configparser
import glob
import os
import re
import subprocess
import sys

import pytest

from support import ROOT

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Every command a user types, and its subcommands.
COMMANDS = [
    ["run_all.py"], ["smtp_in.py"], ["mta.py"], ["mta.py", "queue"], ["mta.py", "flush"],
    ["mta.py", "delete"], ["mta.py", "sendmail"], ["smtp_out.py"], ["pop3d.py"],
    ["mailbox_store.py"], ["mailbox_store.py", "del-user"], ["dnsmx.py"], ["spf.py"],
    ["mail_client.py", "send"], ["mail_client.py", "fetch"],
    ["dkim.py"], ["dkim.py", "keygen"], ["dkim.py", "sign"], ["dkim.py", "verify"],
    ["dkim.py", "dmarc"],
]


def documents():
    text = ""
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text += f.read()
    return text


def help_flags(command):
    result = subprocess.run([sys.executable, os.path.join(ROOT, command[0])] + command[1:]
                            + ["--help"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, COLUMNS="200"))
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", result.stdout)) - {"-h", "--help"}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_flag_of_every_command_is_documented(command):
    text = documents()
    missing = sorted(flag for flag in help_flags(command)
                     if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text))
    assert not missing, "%s: not in README.md or docs/: %s" % (" ".join(command), missing)


def test_the_settings_reference_and_the_sample_config_match_the_code():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_reference.py"),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_key_of_the_sample_config_is_accepted(tmp_path):
    with open(os.path.join(ROOT, "examples", "mailtoolkit.ini"), encoding="utf-8") as f:
        sample = f.read()
    uncommented = re.sub(r"(?m)^# ([a-z][a-z0-9_]*) =", r"\1 =", sample)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(uncommented)
    assert sum(len(parser[s]) for s in parser.sections()) > 60
    path = tmp_path / "every-key.ini"
    path.write_text(uncommented)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_all.py"), "--config", str(path), "--check",
         "--print-config", "--spool", str(tmp_path / "spool"), "--smtp", "", "--submission", "",
         "--pop3", ""], capture_output=True, text=True, timeout=60)
    assert "no such" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "[mta]" in result.stdout


def test_relative_links_and_anchors_resolve():
    def anchors(path):
        with open(path, encoding="utf-8") as f:
            headings = re.findall(r"(?m)^#+ (.*)$", f.read())
        return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}

    broken = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"(?s)```.*?```", "", f.read())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(resolved):
                broken.append("%s: %s" % (os.path.relpath(path, ROOT), target))
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append("%s: %s (no such heading)" % (os.path.relpath(path, ROOT), target))
    assert not broken, broken


def test_no_stray_patch_or_backup_files_are_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30).stdout.split()
    assert not [name for name in tracked if name.endswith((".orig", ".rej", ".bak", "~"))]


def test_every_test_named_in_rfc_coverage_exists():
    with open(os.path.join(ROOT, "RFC-COVERAGE.md"), encoding="utf-8") as f:
        named = set(re.findall(r"tests/(test_\w+)\.py::(test_\w+)", f.read()))
    assert len(named) > 100
    missing = []
    for module, test in sorted(named):
        with open(os.path.join(ROOT, "tests", module + ".py"), encoding="utf-8") as f:
            if not re.search(r"(?m)^def %s\(" % test, f.read()):
                missing.append("%s::%s" % (module, test))
    assert not missing


# Flags the documents name that belong to other programs (certbot, py-spy, swaks, curl,
# useradd, systemctl, aiosmtpd's peer), or are arrows in the README's picture.
OTHER_PROGRAMS_FLAGS = {"--deploy-hook", "--gil", "--header", "--mail-from", "--mail-rcpt",
                        "--upload-file", "--home-dir", "--shell", "--system", "--now",
                        "--executor", "--password", "--spool--", "--stdin--"}


def test_every_flag_the_documents_name_exists():
    import glob
    known = set()
    commands = COMMANDS + [["dkim.py", name] for name in ("keygen", "sign", "verify", "dmarc")]
    commands += [[os.path.relpath(path, ROOT)] for path in glob.glob(os.path.join(ROOT, "bench", "*.py"))
                 if "def main" in open(path, encoding="utf-8").read()]
    commands.append(["bench/peers.py", "install"])
    for command in commands:
        known |= help_flags(command)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", documents()))
    assert sorted(named - known - OTHER_PROGRAMS_FLAGS - {"--help"}) == []
