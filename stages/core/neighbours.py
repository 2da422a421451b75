"""What else computes on this process's cores: the thread budget's eyes (stages/core/threads.py).

Two sources, compared between two looks:
- /proc/stat: CPU time spent on this process's cores by every process, less this process's own: the
  cores other processes keep busy, whoever they are;
- a registry of bleuberi processes: each one that applies a thread budget holds an flock on a file
  named by its pid (the system releases it when the process dies). A peer counts when it used CPU
  between the looks, or registered moments ago: it is then looking too, idle, so two commands started
  together see each other, which a CPU sample alone would miss. An idle one (a notebook that trained an
  hour ago) does not count.
Where /proc or flock are missing (macOS, Windows) nothing is seen: the budget is then the cores alone.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RECENT_SECONDS = 3.0  # a peer registered this recently is choosing too (counted even while idle)
ACTIVE_SHARE = 0.1  # a peer that used a tenth of a core between two looks is computing


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
            rows = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
    except (AttributeError, OSError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal: all but idle and iowait are work
    busy = sum(sum(int(v) for i, v in enumerate(r[1:9]) if i not in (3, 4)) for r in rows if r[0] in allowed)
    times = os.times()
    return CpuSnapshot(time.monotonic(), busy / ticks, times.user + times.system)


def busy_between(start: CpuSnapshot, end: CpuSnapshot) -> float:
    """Cores kept busy by other processes between two snapshots: all CPU time on our cores, less ours."""
    seconds = max(end.when - start.when, 1e-6)
    return max(0.0, (end.busy - start.busy) - (end.own - start.own)) / seconds


def registry() -> Path:
    """Where bleuberi processes on this machine register (one folder per user)."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"bleuberi-{user}" / "threads"


_registration: int | None = None  # the descriptor whose lock says "this process computes here"


def register(folder: Path | None = None) -> None:
    """Hold an flock on `<registry>/<pid>` for the rest of this process's life (once)."""
    global _registration
    if _registration is not None:
        return
    try:
        import fcntl

        folder = folder or registry()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / str(os.getpid())
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.utime(path)  # registered now (a file left by a dead process of the same pid is older)
    except (ImportError, OSError):  # no flock here, or a registry we cannot write: others do not see us
        return
    _registration = fd


def live_peers(folder: Path | None = None) -> dict[int, float]:
    """The other registered processes still alive: {pid: seconds since they registered}. An old file
    whose lock nobody holds was left by a process that died: removed."""
    try:
        import fcntl

        entries = list((folder or registry()).iterdir())
    except (ImportError, OSError):
        return {}
    peers = {}
    for path in entries:
        if not path.name.isdigit() or int(path.name) == os.getpid():
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        age = time.time() - os.fstat(fd).st_mtime
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if age > RECENT_SECONDS:  # its holder is gone (a newer file may be about to be locked: left)
                path.unlink(missing_ok=True)
        except OSError:
            peers[int(path.name)] = age
        finally:
            os.close(fd)
    return peers


def process_cpu(pid: int) -> float | None:
    """CPU seconds used by a process (all its threads), from /proc; None when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass(frozen=True)
class Look:
    """One look: the CPU counters, and each live peer's (seconds since it registered, CPU seconds)."""

    cpu: CpuSnapshot | None
    peers: dict[int, tuple[float, float | None]] = field(default_factory=dict)


def look() -> Look:
    return Look(snapshot(), {pid: (age, process_cpu(pid)) for pid, age in live_peers().items()})


def compare(before: Look, after: Look) -> tuple[int, float]:
    """Between two looks: (bleuberi peers that computed, or registered just now; cores others kept busy)."""
    if before.cpu is None or after.cpu is None:
        return len([age for age, _ in after.peers.values() if age < RECENT_SECONDS]), 0.0
    seconds = max(after.cpu.when - before.cpu.when, 1e-6)
    counted = 0
    for pid, (age, used) in after.peers.items():
        was = before.peers.get(pid, (0.0, None))[1]
        active = used is not None and was is not None and used - was >= ACTIVE_SHARE * seconds
        counted += active or age < RECENT_SECONDS
    return counted, busy_between(before.cpu, after.cpu)
