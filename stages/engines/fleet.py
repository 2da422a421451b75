"""Several OpenAI-compatible servers behind one `server` engine: requests spread over them, and a
server that fails is left out while the others carry on.

Each request goes to the live server with the fewest requests in flight (ties: the one sent fewest
so far), at most `per_server` at a time on each. Since every sample carries its own seed, which server
answers does not change the result, as long as they serve the same model (the engine checks the
names at start).

A server is dropped when a request to it still fails after the HTTP client's own retries with a
failure a retry could fix (refused or dropped connection, timeout, HTTP 429/5xx): that request goes
to another live server, and one notice says which server was left out. A dropped server stays out for
the engine's lifetime (it may come back with other weights or without our adapter). Errors that are
the request's own fault (other 4xx, a reply we cannot read) are raised at once: another server would
give the same answer. When no server is left, the last failure is raised, as one line.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from stages.core.http import JsonClient, ServerError

T = TypeVar("T")


def print_notice(message: str) -> None:
    """The default notice: one line on stderr (stdout carries only records)."""
    sys.stderr.write(f"bleuberi: warning: {message}\n")


@dataclass
class Server:
    client: JsonClient
    in_flight: int = 0
    sent: int = 0
    alive: bool = True

    @property
    def url(self) -> str:
        return self.client.base_url


class ServerFleet:
    """The servers of one engine; `call` runs a request on one of them, failing over to the others."""

    def __init__(
        self, clients: Sequence[JsonClient], *, per_server: int, notice: Callable[[str], None] = print_notice
    ) -> None:
        if not clients:
            raise ValueError("a fleet needs at least one server")
        self.servers = [Server(client) for client in clients]
        self.per_server = per_server
        self.notice = notice
        self.last_failure: ServerError | None = None
        self._changed = threading.Condition()

    @property
    def live(self) -> list[Server]:
        return [server for server in self.servers if server.alive]

    @property
    def first(self) -> JsonClient:
        """The first configured server's client (for messages that name an endpoint before any request)."""
        return self.servers[0].client

    def call(self, request: Callable[[JsonClient], T]) -> T:
        """`request` on a live server; on a server failure, on another one, until none is left."""
        while True:
            server = self._acquire()
            try:
                return request(server.client)
            except ServerError as error:
                if not error.transient:
                    raise
                self.drop(server, error)
            finally:
                self._release(server)

    def on_each(self, action: Callable[[JsonClient], T]) -> list[T]:
        """`action` on every live server at once (adapter loads, model lists); a server that fails is
        dropped. Returns the answers of the servers that answered, in the order the servers were given."""
        live = self.live
        if not live:
            raise self._none_left()
        with ThreadPoolExecutor(len(live), thread_name_prefix="bleuberi-fleet") as pool:
            futures = [pool.submit(action, server.client) for server in live]
            wait(futures)
        results = []
        for server, future in zip(live, futures):
            error = future.exception()
            if error is None:
                results.append(future.result())
            elif isinstance(error, ServerError) and error.transient:
                self.drop(server, error)
            else:
                raise error
        if not self.live:
            raise self._none_left()
        return results

    def drop(self, server: Server, error: ServerError) -> None:
        """Leave `server` out from now on; say so once (the last one's failure is the error instead)."""
        with self._changed:
            if not server.alive:
                return  # another request saw it fail first and said so
            server.alive = False
            self.last_failure = error
            left = len(self.live)
            self._changed.notify_all()  # requests waiting for a free slot: one may now have none left
        if left:
            others = "the other server continues" if left == 1 else f"the other {left} servers continue"
            self.notice(f"server {server.url} left out: {error.cause}; {others}")

    def _acquire(self) -> Server:
        with self._changed:
            while True:
                live = self.live
                if not live:
                    raise self._none_left()
                free = [server for server in live if server.in_flight < self.per_server]
                if free:
                    server = min(free, key=lambda s: (s.in_flight, s.sent))
                    server.in_flight += 1
                    server.sent += 1
                    return server
                self._changed.wait()

    def _release(self, server: Server) -> None:
        with self._changed:
            server.in_flight -= 1
            self._changed.notify()

    def _none_left(self) -> ServerError:
        """A new error for each caller (threads must not share one exception's traceback)."""
        last = self.last_failure
        assert last is not None, "a server is only dropped with its failure"
        cause = last.cause
        if len(self.servers) > 1:
            cause += f"; no server is left (all {len(self.servers)} failed)"
        return ServerError(last.url, cause, status=last.status, body=last.body, transient=True)
