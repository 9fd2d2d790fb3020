"""Stop a demo server once the process that started it has gone.

A Jupyter kernel that nbval or a user shuts down is killed before Python's
exit handlers run, so the embedded server it started would keep running.
``demo.start_server`` starts this module as a detached watcher:

    python -m fkrunbook.reaper OWNER_PID SERVER_FOLDER

It polls the owner every half second, then sends the postmaster SIGQUIT
(immediate shutdown; the data is thrown away) and deletes the folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

POLL_SECONDS = 0.5


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def stop_server(folder: Path) -> None:
    """Stop the postmaster of ``folder/data`` and delete ``folder``."""
    pid = postmaster_pid(folder / "data")
    if pid is not None and process_alive(pid):
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    owner, folder = int(argv[0]), Path(argv[1])
    while process_alive(owner) and folder.exists():
        time.sleep(POLL_SECONDS)
    if folder.exists():
        stop_server(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
