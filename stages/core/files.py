"""Files and folders written so that a reader never sees half of one: write beside the target under a
temporary name, then rename. A failure or a kill leaves the old target as it was.

Temporary names start with a dot and the target's name (`.NAME.XXXX.tmp` for files, `.NAME.XXXX` for
folders), so our own leftovers can be told apart from anything else (`remove_leftovers` for a folder we
lock; `remove_stale_temp_files` for one file's, by the flock each writer holds on its temporary file). Permissions
are those a plain `open()` / `mkdir()` would give under the current umask (mkstemp and mkdtemp would
give 0600/0700), also for what libraries write into a staging folder through their own temp files.
A full disk becomes one `WriteFailed` naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import WriteFailed

# Out of space on the device, or over the user's quota: one line naming the path, not a traceback.
OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


def out_of_space(error: BaseException) -> str | None:
    """The cause when `error` means the disk (or quota) is full, else None. Libraries writing in native
    code (safetensors) raise their own types, so their message is checked too."""
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
        return os.strerror(error.errno).lower()
    text = str(error)
    for cause in ("No space left on device", "Disk quota exceeded"):
        if cause in text:
            return cause.lower()
    return None


def kept_note(target: Path) -> str:
    """What a failed atomic write left: the earlier target, untouched."""
    return f" (the earlier {target.name} is kept)" if target.exists() else ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_temp_file(target: Path) -> tuple[int, Path]:
    """An open descriptor and path of a new temporary file beside `target` (umask permissions). The
    descriptor holds an flock on the file until it is closed (the system drops it when the process dies),
    which tells `remove_stale_temp_files` that a live writer still owns it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file made a moment ago: no one else holds it
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, Path(tmp)


# A temporary file younger than this is left alone even when unlocked: it may be between its creation
# and its flock (a few microseconds) in another process.
STALE_AFTER_SECONDS = 1.0


def remove_stale_temp_files(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the `.NAME.XXXXXXXX.tmp` files that killed writers of `target` left beside it. One that a
    live process still writes (it holds the file's flock) is kept, so two commands writing the same
    output never remove each other's work. Called when a write of `target` succeeds."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp$")
    removed = []
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            if pattern.match(path.name) and unowned(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def unowned(path: Path) -> bool:
    """A regular file whose flock no process holds (an empty one only when not recent: it may be between
    its creation and its flock in another process; one with content is past that)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        if info.st_size == 0 and time.time() - info.st_mtime < STALE_AFTER_SECONDS:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # BlockingIOError: a live writer holds it
        return False
    finally:
        os.close(fd)


def open_permissions(folder: Path) -> None:
    """Give everything under `folder` the permissions open()/mkdir() would: libraries that write through
    their own temporary files (safetensors) leave them 0600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure removed."""
    target = Path(path)
    fd, tmp = new_temp_file(target)  # kept open until the end: its flock marks the file as ours
    try:
        yield tmp
        if tmp.is_file():  # a library may have replaced our file with its own 0600 one
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if cause := out_of_space(error):
            raise WriteFailed(str(target), cause + kept_note(target)) from error
        raise
    finally:
        os.close(fd)
    remove_stale_temp_files(target)  # what killed writers of this target left


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it becomes `path`.

    An existing `path` is replaced, or with `keep_existing` kept (another process that wrote the same
    content first wins the race, and our copy is dropped).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        open_permissions(staging)
        if keep_existing:
            publish_folder(staging, target)
        else:
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    except Exception as error:
        if cause := out_of_space(error):
            raise WriteFailed(str(target), cause + kept_note(target)) from error
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# Our temporary names: `.NAME.` + mkstemp/mkdtemp's 8 random characters (+ `.tmp` for files).
_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp)?$")


def remove_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and staging folders a killed process left in `folder` (only ours,
    by name). Call it only while no other process may be writing there (under the folder's lock)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _LEFTOVER.match(path.name)
        if not match:
            continue
        if match.group(1) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
        elif not match.group(1) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(path)
    return removed


def publish_folder(staging: Path, target: Path) -> None:
    """Rename a finished folder into place. If another process got there first, keep theirs."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir() or not any(target.iterdir()):  # not a lost race: a real failure
            raise
        shutil.rmtree(staging, ignore_errors=True)
