"""Every input file, model, adapter and what each metric needs, checked before a command's first
expensive step (loading a model, generating, training): a typo in the last argument costs a second, not
the minutes of work that came before it (`eval --adapter runs/typo` used to generate with the base model
for 37 s first). Outputs too: a folder given where a file goes (`generate -o adir` once generated everything and
then lost it at the final rename), a path under a file, a place that cannot be written, a full disk.

    preflight(inputs=[path], outputs=[Output(output)], models=[config.model.model], adapters=[config.adapter],
              needs=[spec.needs() for spec in config.rewards])

Nothing is loaded: files and folders are looked at, the embedded model's package is found (not
converted), and a hub id is resolved as loading would (the local cache, else whether the hub answers).
What a metric needs comes from the metric itself (`Needs`, made by `stages.metrics`), so this module
knows no metric by name; a metric that must reach a live service from its first score (a judge) gives
a probe, called here: the endpoint answers and serves its model.
"""

from __future__ import annotations

import errno
import os
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import InputError, UsageError, WriteFailed


@dataclass(frozen=True)
class Needs:
    """What must exist before something can run: models (embedded names, folders, hub ids), servers
    (http(s) URLs), files, and probes (checks of a live service that raise one line when it fails)."""

    models: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    probes: tuple[Callable[[], None], ...] = ()


def check_input(path: str | os.PathLike[str] | None) -> None:
    """A record file (or `datasets` folder) that exists; stdin (None or "-") always does."""
    if path is None or str(path) == "-":
        return
    if not Path(path).exists():
        raise InputError(str(path), None, "no such file")


@dataclass(frozen=True)
class Output:
    """A path a command will write: a file (`example` is a name the message offers when a folder is given)
    or, with `folder`, a folder it creates or fills. None or "-" is stdout."""

    path: str | os.PathLike[str] | None
    flag: str = "-o"
    folder: bool = False
    example: str = "out.jsonl"


def check_output(output: Output) -> None:
    """A path the command can write once its work is done, checked before the work: the wrong kind of path
    (a folder for a file, a file for a folder, a path under a file) is a usage mistake (exit 2); a place
    that cannot be written (read-only, no permission, a full disk) is one line, exit 1. Nothing is created:
    writability is tried with a file made and removed at once in the nearest folder that exists."""
    if output.path is None or str(output.path) == "-":
        return
    path, flag = Path(output.path).expanduser(), output.flag
    if output.folder and path.exists() and not path.is_dir():
        raise UsageError(f"{path}: {flag} takes a folder, and this is a file")
    if not output.folder and path.is_dir():
        raise UsageError(
            f"{path}: {flag} takes a file name, and this is a folder (name a file: {path / output.example})"
        )
    nearest = path if output.folder else path.parent
    while not os.path.lexists(nearest) and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UsageError(f"{path}: {flag} cannot be written: {nearest} is a file, not a folder")
    _check_writable(path, nearest)


def _check_writable(path: Path, folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".bleuberi-probe.")
    except OSError as error:
        raise WriteFailed(str(path), _cannot_create(error, folder)) from None
    os.close(fd)
    os.unlink(probe)
    disk = os.statvfs(folder)
    if disk.f_blocks > 0 and disk.f_bavail == 0:  # a pseudo file system (no blocks at all) is not "full"
        raise WriteFailed(str(path), f"no space left on device ({folder})")


def _cannot_create(error: OSError, folder: Path) -> str:
    reasons = {
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
    }
    reason = reasons.get(error.errno or 0, "files cannot be created there")
    return f"{reason} ({folder})"


def check_model(name: str | None) -> None:
    """An embedded name whose package is installed, a local model folder, or a hub id loading would find."""
    from stages.core import models

    if not name:
        return
    if name in models.EMBEDDED:
        models.embedded_gguf(models.EMBEDDED[name])  # the package and its file; the conversion waits for the load
        return
    models.resolve_model(name)


def check_adapter_folder(path: str | None) -> None:
    from stages.core.models import check_adapter

    if path:
        check_adapter(path)


def check_server(url: str) -> None:
    """An http(s) URL with a host (whether it answers is the first request's to say: servers start late)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{url!r} is not an http(s) URL")


def check_needs(needs: Needs) -> None:
    for name in needs.models:
        check_model(name)
    for url in needs.servers:
        check_server(url)
    for path in needs.files:
        if not Path(path).expanduser().is_file():
            raise InputError(path, None, "no such file")
    for probe in needs.probes:  # last: the cheap local checks fail first
        probe()


def preflight(
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    outputs: Iterable[Output] = (),
    models: Iterable[str | None] = (),
    adapters: Iterable[str | None] = (),
    needs: Iterable[Needs] = (),
) -> None:
    """All of a command's checks, inputs and outputs first. Raises InputError, WriteFailed or ModelError
    (exit 1), or UsageError (exit 2)."""
    for path in inputs:
        check_input(path)
    for output in outputs:
        check_output(output)
    for name in models:
        check_model(name)
    for adapter in adapters:
        check_adapter_folder(adapter)
    for need in needs:
        check_needs(need)


__all__ = [
    "Needs",
    "Output",
    "check_adapter_folder",
    "check_input",
    "check_model",
    "check_needs",
    "check_output",
    "preflight",
]
