"""How many intra-op threads this process gives torch: a budget from the cores it may use.

torch starts one intra-op thread per core in every process, and its OpenMP threads spin while they
wait for each other. Two such processes on the same cores thrash: a decode-shaped matmul took 8.5x
longer with 2 threads than with 1 beside one other job on 2 cores. So each process sizes its pool:

    budget = choose_threads(cores=2, busy_cores=1.0)   # 1 thread: a neighbour keeps a core busy
    apply_thread_budget(override=None, say=print)      # looks around, chooses, applies, logs one line

The rules, in order:
1. `--threads N` (the `threads` option of every stage), then `$BLEUBERI_THREADS`, then an
   `OMP_NUM_THREADS` the user set: exactly that many threads. Nothing else applies.
2. The cores this process may use (its CPU affinity) are split evenly among torchrun's local ranks
   (`LOCAL_WORLD_SIZE`), and among the other bleuberi processes computing on this machine.
3. A local engine that samples while this process trains (`--async-rollouts` with vLLM in this
   process on the CPU, or a server on 127.0.0.1/localhost/::1 while training on the CPU) gets half,
   rounded down; the trainer takes as many, at least 1 each. An engine that samples only between
   training steps shares nothing: it and the trainer never compute at once.
4. Cores that other processes keep busy now (from /proc/stat over a short look, less this process's
   own CPU time, rounded half up) are not free: the count is at most the free cores.
5. Never below 1.
Alone on a quiet 2-core machine a process keeps 2 threads, as torch would.

What the other processes do is seen by stages/core/neighbours.py. A process that chose alone gives
cores back when others come (and takes them again when they have gone): `recheck()` between batches
and steps.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from stages.core import neighbours
from stages.core.errors import UsageError

ENV = "BLEUBERI_THREADS"
# What we set OMP_NUM_THREADS to for child processes, so a later choice in this process (or a child
# bleuberi) does not take our own value for the user's.
OURS = "BLEUBERI_CHILD_THREADS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOK_SECONDS = 0.3  # how long a process watches the others before it chooses
RECHECK_SECONDS = 5.0  # the shortest time between two rechecks


@dataclass(frozen=True)
class ThreadBudget:
    """The intra-op thread count chosen for this process, and why."""

    threads: int
    cores: int
    engine_threads: int | None = None  # the share left to a local engine that samples concurrently
    reason: str = ""

    def line(self) -> str:
        """The one log line, e.g. `threads: 1 of 2 cores (2 local ranks)`."""
        return f"threads: {self.threads} of {self.cores} cores" + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, object]:
        return {
            "threads": self.threads,
            "cores": self.cores,
            "engine_threads": self.engine_threads,
            "reason": self.reason,
        }


def parse_count(value: str, source: str) -> int:
    """A thread count from an environment variable: a whole number >= 1, else a usage error naming it."""
    try:
        count = int(value.strip())
    except ValueError:
        raise UsageError(f"{source}={value!r}: expected a whole number of threads >= 1") from None
    if count < 1:
        raise UsageError(f"{source}={value!r}: expected a whole number of threads >= 1")
    return count


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    value = (os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def user_omp_threads(environ: Mapping[str, str]) -> str | None:
    """OMP_NUM_THREADS as the user set it: None when unset, when bleuberi set it for its children, or when
    it is the 1 torchrun sets for every rank of a multi-process launch (the budget splits the cores instead)."""
    value = environ.get("OMP_NUM_THREADS")
    if not value or environ.get(OURS) == value:
        return None
    if value.strip() == "1" and local_world_size(environ) > 1:
        return None
    return value


def overridden(override: int | None, environ: Mapping[str, str]) -> ThreadBudget | None:
    """Rule 1: the count the user gave (flag, BLEUBERI_THREADS, OMP_NUM_THREADS), or None."""
    if override is not None:
        if override < 1:
            raise UsageError(f"--threads {override}: expected a whole number of threads >= 1")
        return ThreadBudget(override, 0, reason="--threads")
    for name, value in ((ENV, environ.get(ENV)), ("OMP_NUM_THREADS", user_omp_threads(environ))):
        if value:
            return ThreadBudget(parse_count(value, name), 0, reason=f"${name}")
    return None


def choose_threads(
    cores: int,
    *,
    local_world_size: int = 1,
    peers: int = 0,
    local_engine: bool = False,
    busy_cores: float = 0.0,
    override: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadBudget:
    """The thread count for a process that may use `cores` cores (rules in the module's docstring).
    `peers`: other bleuberi processes computing on these cores, this process's torchrun siblings among
    them (they register too); `busy_cores`: what all other processes keep busy now."""
    cores = max(1, cores)
    given = overridden(override, os.environ if environ is None else environ)
    if given is not None:
        return ThreadBudget(given.threads, cores, reason=given.reason)
    ranks = max(1, local_world_size)
    share, notes = max(1, cores // ranks), [f"{ranks} local ranks"] if ranks > 1 else []
    others = max(0, peers - (ranks - 1))  # the siblings are peers too
    if others:
        share = min(share, max(1, cores // (ranks + others)))
        notes.append(f"{others} other bleuberi process{'es' if others > 1 else ''}")
    engine = None
    if local_engine:
        share = engine = max(1, share // 2)
        notes.append(f"{engine} left to the local engine")
    busy = int(max(0.0, busy_cores) + 0.5)  # rounded half up: half a busy core still preempts our threads
    if busy and share > cores - busy:
        share = max(1, cores - busy)
        engine = share if engine else None
        notes.append(f"other processes busy on {busy_cores:.1f} cores")
    return ThreadBudget(share, cores, engine, ", ".join(notes))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def is_loopback(url: str | None) -> bool:
    """Is this server URL on this machine (127.0.0.1, localhost, ::1)?"""
    host = (urlsplit(url).hostname or "") if url else ""
    return host in LOOPBACK or host.startswith("127.")


def engine_competes(backend: str, server_urls: object, device_type: str, concurrent: bool) -> bool:
    """Does a local engine compute on this machine's cores at the same time as this process does?

    Only when it samples while the trainer trains (`concurrent`: async rollouts) and both are on the CPU:
    vLLM in this process, or a server on the loopback address (a GPU server does not use our cores).
    """
    if not concurrent or device_type != "cpu":
        return False
    if backend == "vllm":
        return True
    urls = server_urls if isinstance(server_urls, (list, tuple)) else [server_urls]
    return backend == "server" and any(is_loopback(u) for u in urls if isinstance(u, str))


# --- applying it ----------------------------------------------------------------------------------------

_current: ThreadBudget | None = None
_current_key: tuple[int | None, int, bool] | None = None  # (override, local ranks, local engine) it was made for
_last_look: neighbours.Look | None = None  # what recheck() compares with
_say: Callable[[str], None] | None = None  # where apply_thread_budget logged: rechecks log there too


def look_around(seconds: float = LOOK_SECONDS) -> tuple[int, float]:
    """Watch for `seconds`: (bleuberi peers computing or choosing now, cores other processes keep busy)."""
    global _last_look
    before = neighbours.look()
    time.sleep(seconds)
    _last_look = neighbours.look()
    return neighbours.compare(before, _last_look)


def current_budget() -> ThreadBudget | None:
    """The budget last applied in this process (None: none yet)."""
    return _current


def apply_thread_budget(
    override: int | None = None,
    *,
    local_engine: bool = False,
    say: Callable[[str], None] | None = None,
) -> ThreadBudget:
    """Choose this process's thread count and give it to torch; say it in one line.

    Once per process: a later call without an override keeps the count already applied (a stage that
    loads several models, or `bleuberi run`'s stages after the run chose), unless it asks for a local
    engine's share where the first did not. The process registers as computing here. The count also
    goes to OMP_NUM_THREADS and MKL_NUM_THREADS for the processes it starts (unless the user set
    OMP_NUM_THREADS). Choosing without an override watches the others for LOOK_SECONDS.
    """
    global _current, _current_key, _say
    key = (override, local_world_size(), local_engine)
    if _current is not None and _current_key is not None and _same_request(key, _current_key):
        return _current
    neighbours.register()
    peers, busy = (0, 0.0) if overridden(override, os.environ) else look_around()
    budget = choose_threads(
        available_cores(),
        local_world_size=key[1],
        peers=peers,
        local_engine=local_engine,
        busy_cores=busy,
        override=override,
    )
    _set_torch_threads(budget.threads)
    set_child_threads(budget.threads)
    _current, _current_key, _say = budget, key, say
    if say is not None:
        say(budget.line())
    return budget


def recheck() -> ThreadBudget | None:
    """Between batches or steps: choose again from what the other processes did since the last look,
    without waiting, so a process that started alone gives cores back when another one comes (and takes
    them again when it has gone). Only for a budget chosen without an override and without a local
    engine's share, from the main thread, at most every RECHECK_SECONDS. The new budget when it changed."""
    global _current, _last_look
    key, last = _current_key, _last_look
    if _current is None or key is None or key[0] is not None or key[2] or last is None or last.cpu is None:
        return None
    now = neighbours.snapshot()  # cheap: the full look only when it is time
    if now is None or now.when - last.cpu.when < RECHECK_SECONDS:
        return None
    if threading.current_thread() is not threading.main_thread() or overridden(None, os.environ):
        return None  # another thread's count is its own; a variable set since then decides
    _last_look = neighbours.look()
    peers, busy = neighbours.compare(last, _last_look)
    budget = choose_threads(available_cores(), local_world_size=key[1], peers=peers, busy_cores=busy)
    if budget.threads == _current.threads:
        return None
    _set_torch_threads(budget.threads)
    set_child_threads(budget.threads)
    if _say is not None:
        _say(f"{budget.line()}, was {_current.threads}")
    _current = budget
    return budget


def _same_request(key: tuple[int | None, int, bool], applied: tuple[int | None, int, bool]) -> bool:
    """The same override, ranks and engine; or no override at all, for the same ranks and engine."""
    return key == applied or (key[0] is None and key[1:] == applied[1:])


def set_child_threads(count: int) -> None:
    """OMP_NUM_THREADS (and MKL's) for the processes this one starts, unless the user set it: theirs stays."""
    if user_omp_threads(os.environ):
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(count)
    os.environ[OURS] = str(count)


def _set_torch_threads(count: int) -> None:
    import torch

    # torch._C's own function: an in-process vLLM engine replaces `torch.set_num_threads` with a no-op.
    torch._C.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # allowed once, before any inter-op work; later, the pool stays
        torch._C.set_num_interop_threads(count)


def one_thread_per_worker() -> None:
    """For a worker of a pool that has one worker per core: one intra-op thread, set before torch loads
    (a metric that imports it later) and on torch itself where it is loaded already."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", OURS):
        os.environ[name] = "1"
    if "torch" in sys.modules:
        _set_torch_threads(1)
