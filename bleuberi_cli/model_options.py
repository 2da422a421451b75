"""Options shared by the commands that load a model (generate, train, eval)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        metavar="NAME|PATH|HUB-ID",
        help="Causal LM: 'smollm2-135m' (embedded, offline), a local folder, or a Hugging Face hub id.",
        envvar="BLEUBERI_MODEL",
    ),
]
DeviceOpt = Annotated[
    Literal["auto", "cpu", "cuda", "mps"],
    typer.Option("--device", help="Where to run: auto picks cuda, then mps, then cpu."),
]
DtypeOpt = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    typer.Option("--dtype", help="Weight dtype; auto = bfloat16 on CUDA, float32 elsewhere."),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow a model repository to run its own Python code. Off unless you trust the source.",
    ),
]
SystemPromptOpt = Annotated[
    str | None,
    typer.Option("--system-prompt", metavar="TEXT", help="A system turn put before prompts that have none."),
]
