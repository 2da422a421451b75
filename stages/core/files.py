"""Files and folders written so that a reader never sees half of one: write beside the target under a
temporary name, then rename. A failure or a kill leaves the old target as it was.

Temporary names start with a dot and the target's name (`.NAME.XXXX.tmp` for files, `.NAME.XXXX` for
folders), so our own leftovers can be told apart from anything else. Permissions are those a plain
`open()` / `mkdir()` would give under the current umask (mkstemp and mkdtemp would give 0600/0700).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_temp_file(target: Path) -> tuple[int, Path]:
    """An open descriptor and path of a new temporary file beside `target` (umask permissions)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure removed."""
    target = Path(path)
    fd, tmp = new_temp_file(target)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
        if keep_existing:
            publish_folder(staging, target)
        else:
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_folder(staging: Path, target: Path) -> None:
    """Rename a finished folder into place. If another process got there first, keep theirs."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir() or not any(target.iterdir()):  # not a lost race: a real failure
            raise
        shutil.rmtree(staging, ignore_errors=True)
