"""A stand-in judge: an OpenAI-compatible server on 127.0.0.1 (`/v1/models`, `/v1/chat/completions`) for the
fast tests of `judge-url:` (tests/test_judge_url.py).

It grades by a rule of its own, from the default template's sections: 10 when the answer equals a
reference, 5 when it shares a word with one (case-insensitive, punctuation aside), else 0; so a test knows each score
without asking the metric. `reply` replaces the grader (garbage, other shapes); `hang` stalls every chat
request that long; `redirect_to` answers every request with a 302 there. It keeps every request with its
Authorization header and counts the chat requests it answers at once (`in_flight.peak`); `in_flight.gather`
holds each chat request until that many have come at once (tests/in_flight.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.conftest import reply as send
from tests.conftest import serve_in_background
from tests.in_flight import InFlight

SECTION = re.compile(r"### Reference answer\n(?P<refs>.*)\n\n### Answer to grade\n(?P<answer>.*)\n\n### Rubric", re.S)


def grade(content: str) -> int:
    """The stand-in's rule, on a user turn written from the default template."""
    match = SECTION.search(content)
    assert match, content
    answer, refs = match["answer"].strip(), match["refs"]
    references = [r.split(":\n", 1)[1] for r in refs.split("\n\n")] if refs.startswith("Reference 1:\n") else [refs]
    if answer in references:
        return 10
    words = set(re.findall(r"\w+", answer.lower()))
    return 5 if any(words & set(re.findall(r"\w+", r.lower())) for r in references) else 0


class JudgeStandin:
    def __init__(self, models: tuple[dict[str, Any], ...] = ({"id": "judge", "root": "/models/judge"},)) -> None:
        self.models = [dict(m, object="model", parent=None) for m in models]
        self.reply: Callable[[dict[str, Any]], str] = lambda body: f"score: {grade(body['messages'][-1]['content'])}"
        self.hang = 0.0
        self.slow = 0.0
        self.redirect_to: str | None = None
        self.requests: list[dict[str, Any]] = []  # {"path", "body", "auth"}
        self.lock = threading.Condition()
        self.in_flight = InFlight(self.lock)  # chat requests answered at once
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        serve_in_background(self.server)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def chats(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/chat/completions"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, path: str, body: Any) -> tuple[int, Any]:
        if self.redirect_to:
            return 302, self.redirect_to
        if path == "/v1/models":
            return 200, {"object": "list", "data": self.models}
        if path != "/v1/chat/completions":
            return 404, {"detail": "Not Found"}
        with self.in_flight.held():
            time.sleep(self.hang or self.slow)
            content = self.reply(body)
        message = {"role": "assistant", "content": content}
        return 200, {"object": "chat.completion", "model": body["model"], "choices": [{"index": 0, "message": message}]}

    def _handler(self) -> type:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve(None)

            def do_POST(self) -> None:
                self._serve(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def _serve(self, body: Any) -> None:
                path = self.path.split("?")[0]
                with standin.lock:
                    standin.requests.append({"path": path, "body": body, "auth": self.headers.get("Authorization")})
                status, payload = standin._answer(path, body)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client timed out
                    if status == 302:
                        send(self, 302, b"", Location=payload)
                    else:
                        send(self, status, json.dumps(payload).encode(), Content_Type="application/json")

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        return Handler
