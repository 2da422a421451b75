"""A vLLM OpenAI server for the benchmarks: started on a free port, killed at exit, its RSS polled.

The command line is the one the project notes found to work with bleuberi on vLLM 0.32 (see
stages/engines/server.py): runtime LoRA loading, processed log-probs, and on the CPU no chunked prefill.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVER_START_DEADLINE = 600.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def server_command(model: str, port: int, max_lora_rank: int) -> list[str]:
    """The vLLM 0.32 OpenAI server as the project notes found it works with bleuberi (see stages/engines/server.py)."""
    import torch

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", "smol", "--dtype", "float32", "--max-model-len", "2048",
               "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--logprobs-mode", "processed_logprobs",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if not torch.cuda.is_available():
        command.append("--no-enable-chunked-prefill")  # seeded requests kill the CPU engine otherwise
    return command


@dataclass
class VllmServer:
    process: subprocess.Popen
    url: str
    log: Path
    start_seconds: float

    def alive(self) -> bool:
        return self.process.poll() is None


_SERVERS: list[subprocess.Popen] = []


def stop_server(process: subprocess.Popen) -> None:
    """Stop a server and its engine processes (its own process group)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process in _SERVERS:
        _SERVERS.remove(process)


def _stop_all_servers() -> None:
    for process in list(_SERVERS):
        stop_server(process)


atexit.register(_stop_all_servers)


def start_server(model: str, log: Path, *, max_lora_rank: int, deadline: float = SERVER_START_DEADLINE) -> VllmServer:
    """Start a vLLM OpenAI server on a free port and wait until /v1/models answers."""
    port = _free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    start = time.monotonic()
    with open(log, "wb") as sink:
        command = server_command(model, port, max_lora_rank)
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _SERVERS.append(process)
    url = f"http://127.0.0.1:{port}/v1"
    while not _answers(url + "/models"):
        if process.poll() is not None or time.monotonic() - start > deadline:
            stop_server(process)
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the vLLM server did not come up (exit {process.poll()}); log {log}:\n{tail}")
        time.sleep(1)
    return VllmServer(process, url, log, time.monotonic() - start)


class TreeRssPoller:
    """The largest summed RSS of a process and its descendants, polled in a thread (psutil)."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every, self.peak_mb = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
                self.peak_mb = max(self.peak_mb, total / 2**20)
            except psutil.Error:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> TreeRssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
