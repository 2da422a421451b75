"""Every input file, model, adapter and model-based metric a command names, checked before its first
expensive step (loading a model, generating, training): a typo in the last argument costs a second, not
the minutes of work that came before it (`eval --adapter runs/typo` used to generate with the base model
for 37 s first).

    preflight(inputs=[path], models=[config.model], adapters=[config.adapter], specs=config.reward)

Nothing is loaded: files and folders are looked at, the embedded model's package is found (not
converted), and a hub id is resolved as loading would (the local cache, else whether the hub answers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from stages.core.errors import InputError


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
        models._embedded_gguf(models.EMBEDDED[name])  # the package and its file; the conversion waits for the load
        return
    models.resolve_model(name)


def check_adapter_folder(path: str | None) -> None:
    from stages.core.models import check_adapter

    if path:
        check_adapter(path)


def check_metric_models(specs: Iterable[str]) -> None:
    """The models behind metric and reward specs: rm:PATH, bertscore/emb:ENCODER (or the default encoder's
    package). Names themselves were checked when the config was built; `py:` files when their metric was."""
    from stages.metrics import parse_weighted
    from stages.metrics.neural import DEFAULT_ENCODER, _encoder_and_layer, default_encoder_path

    for spec in specs:
        name, _ = parse_weighted(spec)
        kind, _, argument = name.partition(":")
        if kind == "rm" and argument:
            check_model(argument)
        elif kind in ("bertscore", "emb"):
            encoder, _ = _encoder_and_layer(argument or None)
            if encoder == DEFAULT_ENCODER:
                default_encoder_path()
            else:
                check_model(encoder)


def preflight(
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    models: Iterable[str | None] = (),
    adapters: Iterable[str | None] = (),
    specs: Iterable[str] = (),
) -> None:
    """All of a command's checks, inputs first. Raises InputError or ModelError (exit 1)."""
    for path in inputs:
        check_input(path)
    for name in models:
        check_model(name)
    for adapter in adapters:
        check_adapter_folder(adapter)
    check_metric_models(specs)


__all__ = ["check_adapter_folder", "check_input", "check_metric_models", "check_model", "preflight"]
