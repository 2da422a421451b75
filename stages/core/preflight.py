"""Every input file, model, adapter and what each metric needs, checked before a command's first
expensive step (loading a model, generating, training): a typo in the last argument costs a second, not
the minutes of work that came before it (`eval --adapter runs/typo` used to generate with the base model
for 37 s first).

    preflight(inputs=[path], models=[config.model.model], adapters=[config.adapter],
              needs=[spec.needs() for spec in config.rewards])

Nothing is loaded: files and folders are looked at, the embedded model's package is found (not
converted), and a hub id is resolved as loading would (the local cache, else whether the hub answers).
What a metric needs comes from the metric itself (`Needs`, made by `stages.metrics`), so this module
knows no metric by name.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import InputError, UsageError


@dataclass(frozen=True)
class Needs:
    """What must exist before something can run: models (embedded names, folders, hub ids), servers
    (http(s) URLs) and files."""

    models: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


def check_input(path: str | os.PathLike[str] | None) -> None:
    """A record file (or `datasets` folder) that exists; stdin (None or "-") always does."""
    if path is None or str(path) == "-":
        return
    if not Path(path).exists():
        raise InputError(str(path), None, "no such file")


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


def preflight(
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    models: Iterable[str | None] = (),
    adapters: Iterable[str | None] = (),
    needs: Iterable[Needs] = (),
) -> None:
    """All of a command's checks, inputs first. Raises InputError or ModelError (exit 1)."""
    for path in inputs:
        check_input(path)
    for name in models:
        check_model(name)
    for adapter in adapters:
        check_adapter_folder(adapter)
    for need in needs:
        check_needs(need)


__all__ = ["Needs", "check_adapter_folder", "check_input", "check_model", "check_needs", "preflight"]
