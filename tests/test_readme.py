"""The README's first message, step by step, as a new user types it (on other ports)."""

import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from support import ROOT, free_ports, require_tool, wait_for

README = os.path.join(ROOT, "README.md")
PORTS = (2525, 2587, 1110)             # the embedded defaults the walkthrough names


def first_message_block():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## A first message, step by step"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_first_message_walkthrough_works_as_written():
    require_tool("swaks")
    require_tool("curl")
    block = first_message_block()
    for port in PORTS:
        assert "127.0.0.1:%d" % port in block or "%d)" % port in block
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    folder = tempfile.mkdtemp(prefix="readme-")
    log = open(os.path.join(folder, "run_all.log"), "wb")
    run_all = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "run_all.py"), "--smtp", "127.0.0.1:%d" % ports[2525],
         "--submission", "127.0.0.1:%d" % ports[2587], "--pop3", "127.0.0.1:%d" % ports[1110],
         "--dns", "127.0.0.254"],      # SPF and DMARC ask where nothing answers: nothing leaves
        cwd=folder, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    try:
        wait_for(lambda: b"Next steps:" in open(os.path.join(folder, "run_all.log"), "rb").read(),
                 20, "run_all to start")
        script = re.sub(r"(?<![\w/])python3 (\w+\.py)",
                        lambda m: "%s %s" % (sys.executable, os.path.join(ROOT, m.group(1))), block)
        script = re.sub(r"\b(2525|2587|1110)\b", lambda m: str(ports[int(m.group(1))]), script)
        script = script.replace("python3 -c", sys.executable + " -c")
        result = subprocess.run(["bash", "-e", "-c", script], cwd=folder, capture_output=True,
                                timeout=180)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert b"(3, " in result.stdout                    # poplib's STAT after three messages

        def four_messages():
            client = poplib.POP3("127.0.0.1", ports[1110], timeout=10)
            try:
                client.user("alice@localhost")
                client.pass_("s3cret-pass")
                return client.stat()[0] == 4
            finally:
                client.quit()
        wait_for(four_messages, 20, "the fourth message, sent with mail_client")
        assert os.listdir(os.path.join(folder, "Maildir", "new")) or \
            os.listdir(os.path.join(folder, "Maildir", "cur"))
    finally:
        run_all.send_signal(signal.SIGTERM)
        try:
            run_all.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(run_all.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
