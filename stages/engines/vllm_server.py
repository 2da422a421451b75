"""A local vLLM OpenAI server started for bleuberi: the command line its flags must have, start and stop.

The flags are the ones the `server` engine needs (checked on vLLM 0.32, see stages/engines/server.py):
runtime LoRA loading (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`), log-probs after the
temperature (`--logprobs-mode processed_logprobs`), and on the CPU no chunked prefill (a seeded request
prefilled in chunks kills the CPU engine). Benchmarks and tests start their servers through here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def vllm_server_command(
    model: str, port: int, *, served_name: str = "smol", max_lora_rank: int = 16, dtype: str = "float32"
) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` for `model` on 127.0.0.1:`port`."""
    import torch

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", served_name, "--dtype", dtype, "--max-model-len", "2048",
               "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--logprobs-mode", "processed_logprobs",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if not torch.cuda.is_available():
        command.append("--no-enable-chunked-prefill")  # seeded requests kill the CPU engine otherwise
    return command


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str  # the base URL, ending in /v1
    log: Path
    start_seconds: float

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process_group(self.process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def start_vllm_server(
    model: str, log: Path, *, port: int, max_lora_rank: int = 16, deadline: float = 600.0
) -> LocalServer:
    """Start the server in its own process group, its output to `log`, and wait until /v1/models answers;
    RuntimeError (with the log's tail) if it exits or does not answer within `deadline` seconds."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default is a fraction of RAM
    start = time.monotonic()
    with open(log, "wb") as sink:
        command = vllm_server_command(model, port, max_lora_rank=max_lora_rank)
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    while not _answers(url + "/models"):
        if process.poll() is not None or time.monotonic() - start > deadline:
            stop_process_group(process)
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the vLLM server did not come up (exit {process.poll()}); log {log}:\n{tail}")
        time.sleep(1)
    return LocalServer(process, url, log, time.monotonic() - start)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server and its engine processes (its own process group): SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
