"""An exclusive lock on an output folder for the whole of a run (train, run).

Two runs into one folder would interleave metrics.jsonl and mix checkpoints, so the second one stops at
once, naming the holder. The lock is `fcntl.flock` on `FOLDER/.bleuberi.lock`: the kernel releases it
when its process dies, so a lock left by a killed run never blocks the next one. The file holds the
holder's pid, host and start time, for the message only.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import BleuberiError

LOCK_NAME = ".bleuberi.lock"


class FolderLocked(BleuberiError):
    """Another live process holds the folder's lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock on `folder` (created if needed) for the block; raise FolderLocked if it is taken."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLocked(
                f"{folder} is in use by another bleuberi process ({_holder(path)}); "
                "wait for it to finish or use another folder"
            ) from None
        # The previous holder unlinks the file as it releases it; if we locked that unlinked file, retry.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked, so nobody can lock the file we are removing
        os.close(fd)
