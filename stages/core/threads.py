"""How many intra-op threads this process gives torch: a budget from the cores it may use.

torch starts one intra-op thread per core in every process, and its OpenMP threads spin while they
wait for each other. Two such processes on the same cores thrash: a decode-shaped matmul took 8.5x
longer with 2 threads than with 1 beside one other job on 2 cores. So each process sizes its pool:

    budget = choose_threads(cores=2, local_world_size=1, busy_cores=1.0)   # 1 thread: a neighbour is busy
    apply_thread_budget(override=None, say=print)                          # measures, chooses, applies

The rules, in order (the first that applies wins):
1. `--threads N` (the `threads` option of every stage), then `$BLEUBERI_THREADS`, then an
   `OMP_NUM_THREADS` the user set: exactly that many threads.
2. The cores this process may use (its CPU affinity) are split evenly among torchrun's local ranks
   (`LOCAL_WORLD_SIZE`).
3. A local engine that samples while this process trains (`--async-rollouts` with vLLM in this
   process on the CPU, or a server on 127.0.0.1/localhost/::1 while training on the CPU) gets half of
   them, rounded down; the trainer takes the same count, so an odd core is left over for both processes'
   Python work. At least 1 each. An engine that only samples between training steps shares nothing: it
   and the trainer never compute at once.
4. Cores that other processes kept busy while this one started (measured from /proc/stat on the same
   cores, minus this process's own CPU time, rounded half up) are not counted as free: the count is
   at most the free cores.
5. Never below 1.
Alone on a quiet 2-core machine a process keeps 2 threads, as torch would.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from stages.core.errors import UsageError

ENV = "BLEUBERI_THREADS"
# What we set OMP_NUM_THREADS to for child processes, so a later choice in this process (or a child
# bleuberi) does not take our own value for the user's.
OURS = "BLEUBERI_CHILD_THREADS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Shortest window over which other processes' CPU use is measured; startup usually gives a longer one.
MIN_WINDOW = 0.25


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


def user_omp_threads(environ: Mapping[str, str]) -> str | None:
    """OMP_NUM_THREADS as the user set it: None when unset, when bleuberi set it for its children, or when
    it is the 1 torchrun sets for every rank of a multi-process launch (the budget splits the cores instead)."""
    value = environ.get("OMP_NUM_THREADS")
    if not value or environ.get(OURS) == value:
        return None
    if value.strip() == "1" and local_world_size(environ) > 1:
        return None
    return value


def choose_threads(
    cores: int,
    *,
    local_world_size: int = 1,
    local_engine: bool = False,
    busy_cores: float = 0.0,
    override: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadBudget:
    """The thread count for a process that may use `cores` cores (see the module's rules)."""
    environ = os.environ if environ is None else environ
    cores = max(1, cores)
    if override is not None:
        if override < 1:
            raise UsageError(f"--threads {override}: expected a whole number of threads >= 1")
        return ThreadBudget(override, cores, reason="--threads")
    for name, value in ((ENV, environ.get(ENV)), ("OMP_NUM_THREADS", user_omp_threads(environ))):
        if value:
            return ThreadBudget(parse_count(value, name), cores, reason=f"${name}")
    ranks = max(1, local_world_size)
    share = max(1, cores // ranks)
    notes = [f"{ranks} local ranks"] if ranks > 1 else []
    engine = None
    if local_engine:
        engine = max(1, share // 2)
        share = engine
        notes.append(f"{engine} left to the local engine")
    busy = int(max(0.0, busy_cores) + 0.5)  # rounded half up: a half-busy neighbour still spins us off a core
    if busy and share > cores - busy:
        share = max(1, cores - busy)
        engine = share if engine else None  # the engine shares this process's cores, or the free ones
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
    if not url:
        return False
    host = urlsplit(url).hostname or ""
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
    return backend == "server" and any(is_loopback(u if isinstance(u, str) else None) for u in urls)


# --- measuring what other processes use ---------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    when: float  # time.monotonic()
    busy: float  # CPU seconds spent on this process's cores, by every process, since boot
    own: float  # CPU seconds this process has used


def snapshot() -> CpuSnapshot | None:
    """The CPU time spent on this process's cores (from /proc/stat), or None where it cannot be read."""
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
    except (AttributeError, OSError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: all but idle and iowait are work
    busy = sum(sum(int(v) for i, v in enumerate(f[1:9]) if i not in (3, 4)) for f in lines if f[0] in allowed)
    times = os.times()
    return CpuSnapshot(time.monotonic(), busy / ticks, times.user + times.system)


_mark: CpuSnapshot | None = snapshot()  # at import: the window then spans this process's start-up


def mark() -> None:
    """Start the measuring window now (the CLI calls it first thing, before the heavy imports)."""
    global _mark
    _mark = snapshot()


def others_busy_cores(since: CpuSnapshot | None = None) -> float:
    """How many cores other processes kept busy (on this process's cores) since `since` (default: the
    mark). A window shorter than MIN_WINDOW is extended by waiting. 0.0 where /proc/stat is missing."""
    start = since or _mark or snapshot()
    if start is None:
        return 0.0
    wait = MIN_WINDOW - (time.monotonic() - start.when)
    if wait > 0:
        time.sleep(wait)
    end = snapshot()
    return 0.0 if end is None else busy_between(start, end)


def busy_between(start: CpuSnapshot, end: CpuSnapshot) -> float:
    """Cores kept busy by other processes between two snapshots: all CPU time on our cores, less ours."""
    seconds = max(end.when - start.when, 1e-6)
    return max(0.0, (end.busy - start.busy) - (end.own - start.own)) / seconds


# --- applying it ----------------------------------------------------------------------------------------

_current: ThreadBudget | None = None
_current_key: tuple[int | None, int, bool] | None = None  # (override, local ranks, local engine) it was made for


def current_budget() -> ThreadBudget | None:
    """The budget last applied in this process (None: none yet)."""
    return _current


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    value = environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def apply_thread_budget(
    override: int | None = None,
    *,
    local_engine: bool = False,
    say: Callable[[str], None] | None = None,
) -> ThreadBudget:
    """Choose this process's thread count and give it to torch; say it in one line.

    Once per process: a later call without an override keeps the count already applied (a stage that
    loads several models, or `bleuberi run`'s stages after the run chose), unless it asks for a local
    engine's share where the first did not. The count also goes to OMP_NUM_THREADS and MKL_NUM_THREADS
    for the processes this one starts (unless the user set OMP_NUM_THREADS).
    """
    global _current, _current_key
    key = (override, local_world_size(), local_engine)
    if _current is not None and _current_key is not None and _same_request(key, _current_key):
        return _current
    needs_measure = override is None and not os.environ.get(ENV) and not user_omp_threads(os.environ)
    busy = others_busy_cores() if needs_measure else 0.0
    budget = choose_threads(
        available_cores(), local_world_size=key[1], local_engine=local_engine, busy_cores=busy, override=override
    )
    _set_torch_threads(budget.threads)
    set_child_threads(budget.threads)
    _current, _current_key = budget, key
    if say is not None:
        say(budget.line())
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
