"""Stopping a peer daemon (Postfix, Dovecot) that the bench started and that wrote a pid file.

The bench scripts import it from their own folder: `from pidfile import stop_by_pid_file`.
"""

import os
import signal
import time


def stop_by_pid_file(path, timeout=10.0):
    """SIGTERM the process whose pid is the first word of the file at path, and wait up to
    timeout seconds for it to go. A missing or unreadable file, or a process already gone,
    is nothing to stop."""
    try:
        with open(path) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)            # ProcessLookupError once it is gone
            time.sleep(0.1)
    except (OSError, ValueError, IndexError):
        pass
