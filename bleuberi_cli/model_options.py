"""Options shared by the commands that load a model or talk to an engine (generate, train, eval)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from stages.core.models import DEFAULT_MODEL

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        metavar="NAME|PATH|HUB-ID",
        help=f"Causal LM: '{DEFAULT_MODEL}' (embedded, offline), a local folder, or a Hugging Face hub id.",
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
BackendOpt = Annotated[
    Literal["transformers", "vllm", "server"],
    typer.Option(
        "--backend",
        help=(
            "Who samples: transformers (in this process, the exact reference), vllm (vLLM in this process, "
            "CPU or GPU), or server (an OpenAI-compatible endpoint at --server-url: vllm serve, SGLang, ...)."
        ),
    ),
]
ServerUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--server-url",
        metavar="URL",
        help="Base URL of the server, ending in /v1, e.g. http://127.0.0.1:8000/v1.",
        envvar="BLEUBERI_SERVER_URL",
    ),
]
ServerModelOpt = Annotated[
    str | None,
    typer.Option("--server-model", metavar="NAME", help="The served model's name (default: the one it lists)."),
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key-env",
        metavar="VAR",
        help="Environment variable holding the server's API key; sent to that host only, never on a redirect.",
    ),
]
ChatOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--server-chat-only",
        help="The server has only /v1/chat/completions: answers come back as text, with no token ids "
        "(fine for generate and eval; training needs token ids).",
    ),
]
ConcurrencyOpt = Annotated[
    int, typer.Option("--concurrency", metavar="N", help="Requests in flight to the server at once.")
]
