"""JSON over HTTP on the standard library: the client under the `server` engine.

Why not `requests`/`httpx`: one more dependency for a few POSTs to a local inference server. Why not
plain `urllib.request.urlopen`: it follows redirects (carrying the Authorization header to wherever
it is sent) and it has no retries. Here:
- transient failures (refused or dropped connections, timeouts, HTTP 429 and 5xx) are retried with
  exponential backoff; other 4xx are our request's fault and are not;
- redirects are never followed: a 3xx is an error naming its target, so an API key only ever goes to
  the host the user configured;
- every failure is one `ServerError` whose message is one line naming the URL and the cause.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from stages.core.errors import BleuberiError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ServerError(BleuberiError):
    """An HTTP endpoint that failed (unreachable, an error status, an unreadable reply)."""

    def __init__(
        self, url: str, cause: str, *, status: int | None = None, body: str = "", transient: bool = False
    ) -> None:
        self.url, self.cause, self.status, self.body = url, cause, status, body
        self.transient = transient  # a failure a later retry may fix (callers with their own retry loop)
        super().__init__(f"{url}: {cause}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib then raises HTTPError with the 3xx status."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port filled in from the scheme: what 'the same host' means."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def first_line(body: str, limit: int = 300) -> str:
    """The message of an error reply: OpenAI-style JSON `error.message` / `message`, else the first line."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        message = message or data.get("message") or data.get("detail")
        if isinstance(message, str):
            body = message
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    text = lines[0] if lines else "(empty body)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Transient(Exception):
    cause: str
    status: int | None = None
    body: str = ""


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out: no reply in time"
    if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return "the server closed the connection"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host ({reason})"
    return f"{type(reason).__name__}: {reason}"


def _once(method: str, url: str, data: bytes | None, headers: dict[str, str], timeout: float) -> bytes:
    """One attempt. Raises _Transient for what a retry may fix, ServerError for what it will not."""
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace") if error.fp is not None else ""
        if 300 <= error.code < 400:
            target = error.headers.get("Location", "(no Location header)")
            raise ServerError(
                url,
                f"HTTP {error.code} redirect to {target} refused: redirects are not followed, so credentials "
                "are only sent to the configured host; configure the final URL instead",
                status=error.code,
            ) from None
        if error.code in RETRY_STATUSES:
            raise _Transient(f"HTTP {error.code}", error.code, body) from None
        raise ServerError(url, f"HTTP {error.code}: {first_line(body)}", status=error.code, body=body) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Transient(_describe(error)) from None


def request_bytes(
    method: str,
    url: str,
    payload: Any = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 0.5,
) -> bytes:
    """The reply body of `method url` (payload sent as JSON), retrying transient failures."""
    data = None if payload is None else json.dumps(payload).encode()
    sent = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        sent["Content-Type"] = "application/json"
    last = _Transient("no attempt made")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            return _once(method, url, data, sent, timeout)
        except _Transient as error:
            last = error
    detail = f": {first_line(last.body)}" if last.body else ""
    tries = f" after {retries} retries" if retries else ""
    raise ServerError(url, f"{last.cause}{tries}{detail}", status=last.status, body=last.body, transient=True)


def request_json(method: str, url: str, payload: Any = None, **settings: Any) -> Any:
    """The decoded JSON reply of `method url`; `settings` and the retries and errors as for `request_bytes`."""
    body = request_bytes(method, url, payload, **settings)
    try:
        return json.loads(body)
    except ValueError:
        raise ServerError(url, f"reply is not JSON: {first_line(body.decode('utf-8', 'replace'), 80)}") from None


class JsonClient:
    """Requests under one base URL; an API key is attached only to URLs on that base's scheme, host and port."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ServerError(base_url, "the URL must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def url(self, path: str) -> str:
        return path if "://" in path else f"{self.base_url}/{path.lstrip('/')}"

    def headers_for(self, url: str) -> dict[str, str]:
        if self.api_key and origin(url) == origin(self.base_url):
            return {"Authorization": f"Bearer {self.api_key}"}
        return {}

    def call(self, method: str, path: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """JSON reply of `method path` (a path under the base URL, or a full URL)."""
        url = self.url(path)
        return request_json(
            method,
            url,
            payload,
            headers=self.headers_for(url),
            timeout=timeout or self.timeout,
            retries=self.retries,
            backoff=self.backoff,
        )

    def call_text(self, method: str, path: str, payload: Any = None) -> str:
        """Text reply (vLLM answers /v1/load_lora_adapter with plain text, not JSON)."""
        url = self.url(path)
        body = request_bytes(
            method,
            url,
            payload,
            headers=self.headers_for(url),
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
        )
        return body.decode("utf-8", "replace")
