"""A vLLM OpenAI server for the benchmarks: started on a free port (stages/engines/vllm_server.py has the
command line and the start), killed at exit, its RSS polled."""

from __future__ import annotations

import atexit
import contextlib
import socket
import subprocess
import threading
from pathlib import Path

from stages.engines.vllm_server import LocalServer, start_vllm_server, stop_process_group

VllmServer = LocalServer  # the name engine_bench uses

SERVER_START_DEADLINE = 600.0
_SERVERS: list[subprocess.Popen] = []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, log: Path, *, max_lora_rank: int, deadline: float = SERVER_START_DEADLINE) -> LocalServer:
    """Start a vLLM OpenAI server on a free port (stopped at exit at the latest) and wait until it answers."""
    server = start_vllm_server(model, log, port=_free_port(), max_lora_rank=max_lora_rank, deadline=deadline)
    _SERVERS.append(server.process)
    return server


def stop_server(process: subprocess.Popen) -> None:
    stop_process_group(process)
    if process in _SERVERS:
        _SERVERS.remove(process)


atexit.register(lambda: [stop_server(process) for process in list(_SERVERS)])


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
