"""A stand-in for vLLM 0.32's OpenAI server, for fast tests of the `server` engine and the HTTP client.

Replies have the JSON shape vLLM 0.32 returns (recorded from a real server: see the project notes);
tokens are deterministic functions of (prompt ids, seed, adapter), so tests can check that seeds,
adapters and token ids travel correctly. Faults are switched on per test: HTTP 500s, a slow reply, a
non-JSON reply, a redirect, a dead vLLM engine, and dying mid-run (socket closed, then refused). It
counts the requests it is answering at once (`in_flight.peak`), to check concurrency limits;
`in_flight.gather` holds each request until that many have come at once (tests/in_flight.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import serve_in_background
from tests.in_flight import InFlight

EOS = 2
EOS_TEXT = "<|im_end|>"
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def _rng(*parts: object) -> random.Random:
    return random.Random(hashlib.sha256(repr(parts).encode()).digest())


def _error(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Standin:
    """Threaded HTTP server on 127.0.0.1 (free port). `url` is the base URL ending in /v1."""

    def __init__(self, models: tuple[str, ...] = ("smol",), *, max_lora_rank: int = 16, runtime_lora: bool = True):
        self.base_models = list(models)
        self.vocab_size = 5000  # sampled ids are below this (set it to a test model's vocabulary)
        self.max_lora_rank = max_lora_rank
        self.runtime_lora = runtime_lora
        self.adapters: dict[str, str] = {}  # name -> path
        self.log: list[dict[str, Any]] = []  # every request: method, path, body, headers (lower-case keys)
        self.lock = threading.Condition()
        # faults
        self.fail_next = 0  # this many requests get HTTP `fail_status`
        self.fail_status = 500
        self.slow = 0.0  # seconds to wait before replying
        self.malformed = False  # reply 200 with a body that is not JSON
        self.redirect_to: str | None = None  # reply 302 to this URL
        self.engine_dead = False  # every request gets vLLM's HTTP 500 for a dead engine
        self.die_after: int | None = None  # after this many more completions, close the socket and stop
        self.in_flight = InFlight(self.lock)  # requests answered at once (to check concurrency limits)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Standin:
        serve_in_background(self.server)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()
        self.server.server_close()

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        return [entry for entry in self.log if entry["path"] == path]

    # --- the model ------------------------------------------------------------------------------

    def tokens(self, prompt: list[int], seed: int | None, model: str, max_tokens: int, greedy: bool):
        """Deterministic completion: (token ids, log-probs, finish_reason). EOS ends it, and is kept."""
        rng = _rng(tuple(prompt), None if greedy else seed, model)
        ids, logprobs = [], []
        for _ in range(max_tokens):
            token = EOS if rng.random() < 0.12 else rng.randrange(3, self.vocab_size)
            ids.append(token)
            logprobs.append(-round(rng.random() * 3, 6))
            if token == EOS:
                return ids, logprobs, "stop"
        return ids, logprobs, "length"

    def model_entries(self) -> list[dict[str, Any]]:
        created = int(time.time())
        permission = [
            {
                "id": "modelperm-0",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ]
        entries = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": f"/models/{name}",
                "parent": None,
                "max_model_len": 2048,
                "permission": permission,
            }
            for name in self.base_models
        ]
        entries += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": path,
                "parent": self.base_models[0],
                "max_model_len": None,
                "permission": permission,
            }
            for name, path in self.adapters.items()
        ]
        return entries

    def completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model") or self.base_models[0]
        if model not in self.base_models and model not in self.adapters:
            return 404, _error(
                f"The model `{model}` does not exist. Valid aliases: {', '.join(self.base_models)}.",
                "NotFoundError",
                404,
                "model",
            )
        prompt, n = body.get("prompt"), int(body.get("n", 1))
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return 400, _error("this stand-in takes token-id prompts only", "BadRequestError", 400)
        greedy = (body.get("temperature") if body.get("temperature") is not None else 1.0) == 0
        if greedy and n > 1:
            return 400, _error(f"n must be 1 when using greedy sampling, got {n}.", "BadRequestError", 400)
        choices = []
        for index in range(n):
            seed = body.get("seed")
            seed = None if seed is None else seed + index
            ids, logprobs, reason = self.tokens(prompt, seed, model, int(body.get("max_tokens", 16)), greedy)
            if seed is None and not greedy:  # unseeded sampling is not reproducible
                ids, logprobs, reason = self.tokens(
                    [*prompt, random.randrange(10**9)], 0, model, int(body.get("max_tokens", 16)), False
                )
            choices.append(self._choice(index, body, prompt, ids, logprobs, reason))
        usage = {
            "prompt_tokens": len(prompt),
            "total_tokens": len(prompt) + sum(len(c["token_ids"] or []) for c in choices),
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
        return 200, {
            "id": "cmpl-standin",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": "vllm-0.32.0-standin",
            "usage": usage,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def _choice(
        self, index: int, body: dict[str, Any], prompt: list[int], ids: list[int], logprobs: list[float], reason: str
    ) -> dict[str, Any]:
        words = [EOS_TEXT if t == EOS else f" t{t}" for t in ids]
        logprob_block = None
        if body.get("logprobs") is not None:
            offsets = [sum(len(w) for w in words[:i]) for i in range(len(words))]
            logprob_block = {
                "text_offset": offsets,
                "token_logprobs": logprobs,
                "tokens": words,
                "top_logprobs": [{w: lp} for w, lp in zip(words, logprobs)],
            }
        want_ids = bool(body.get("return_token_ids"))
        return {
            "index": index,
            "text": "".join(w for w in words if w != EOS_TEXT),
            "logprobs": logprob_block,
            "finish_reason": reason,
            "stop_reason": None,
            "token_ids": ids if want_ids else None,
            "prompt_logprobs": None,
            "prompt_token_ids": prompt if want_ids else None,
            "routed_experts": None,
        }

    def chat(self, body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model") or self.base_models[0]
        if model not in self.base_models and model not in self.adapters:
            return 404, _error(f"The model `{model}` does not exist.", "NotFoundError", 404, "model")
        rng = _rng(json.dumps(body.get("messages"), sort_keys=True), body.get("seed"), model)
        words = [f"w{rng.randrange(100)}" for _ in range(rng.randrange(1, int(body.get("max_tokens", 16)) + 1))]
        reason = "stop" if len(words) < int(body.get("max_tokens", 16)) else "length"
        message = {
            "role": "assistant",
            "content": " ".join(words),
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reason,
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
        }
        return 200, {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {},
            "prompt_logprobs": None,
            "prompt_token_ids": None,
        }

    def load_adapter(self, body: dict[str, Any]) -> tuple[int, Any]:
        name, path = body.get("lora_name"), body.get("lora_path")
        if name in self.adapters:
            return 400, _error(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True.",
                "InvalidUserInput",
                400,
            )
        config = Path(str(path)) / "adapter_config.json"
        if not config.is_file():
            return 404, _error(f"Loading lora {name} failed: No adapter found for <path>", "NotFoundError", 404)
        rank = int(json.loads(config.read_text()).get("r", 0))
        if rank > self.max_lora_rank:
            return 500, _error(
                "Call to add_lora method failed: Worker failed with error 'LoRA rank "
                f"{rank} is greater than max_lora_rank {self.max_lora_rank}.', please check the "
                "stack trace above for the root cause",
                "InternalServerError",
                500,
            )
        self.adapters[name] = str(path)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("lora_name")
        if name not in self.adapters:
            return 404, _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.adapters[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to `standin`; `_handler` makes a subclass bound to one stand-in."""

    standin: Standin

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        self._serve(body)

    def _serve(self, body: Any) -> None:
        with self.standin.in_flight.held():
            self._answer(body)

    def _answer(self, body: Any) -> None:
        path = self.path.split("?")[0]
        with self.standin.lock:
            self.standin.log.append(
                {
                    "method": self.command,
                    "path": path,
                    "body": body,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
            status, reply = self._route(path, body)
        if status == 0:  # die: close the socket without a reply, then stop listening
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            threading.Thread(target=self.standin.stop, daemon=True).start()
            return
        if self.standin.slow:
            time.sleep(self.standin.slow)
        self._reply(status, reply)

    def _route(self, path: str, body: Any) -> tuple[int, Any]:
        if self.standin.redirect_to:
            return 302, self.standin.redirect_to
        if (
            path.endswith("/completions")
            and not path.endswith("chat/completions")
            and self.standin.die_after is not None
        ):
            if self.standin.die_after == 0:
                return 0, None
            self.standin.die_after -= 1
        if self.standin.engine_dead:
            return 500, _error(ENGINE_DEAD, "InternalServerError", 500)
        if self.standin.fail_next > 0:
            self.standin.fail_next -= 1
            return self.standin.fail_status, _error(
                "Internal Server Error\ntraceback follows", "InternalServerError", self.standin.fail_status
            )
        if self.standin.malformed:
            return 200, b"<html>not json</html>"
        if body is None and self.command == "POST":
            return 400, _error("body is not JSON", "BadRequestError", 400)
        return self._dispatch(path, body)

    def _dispatch(self, path: str, body: Any) -> tuple[int, Any]:
        if path == "/v1/models" and self.command == "GET":
            return 200, {"object": "list", "data": self.standin.model_entries()}
        if path == "/v1/completions":
            return self.standin.completions(body)
        if path == "/v1/chat/completions":
            return self.standin.chat(body)
        if path == "/v1/load_lora_adapter" and self.standin.runtime_lora:
            return self.standin.load_adapter(body)
        if path == "/v1/unload_lora_adapter" and self.standin.runtime_lora:
            return self.standin.unload_adapter(body)
        return 404, {"detail": "Not Found"}

    def _reply(self, status: int, reply: Any) -> None:
        headers: dict[str, str] = {}
        if status == 302:
            headers["Location"], payload = reply, b""
        elif isinstance(reply, bytes):
            payload = reply
        elif isinstance(reply, str):  # vLLM's adapter endpoints answer plain text, no content type
            payload = reply.encode()
        else:
            payload, headers["Content-Type"] = json.dumps(reply).encode(), "application/json"
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client timed out
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


def _handler(standin: Standin) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"standin": standin})
