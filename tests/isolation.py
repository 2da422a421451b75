"""What keeps each test independent of the ones before it (issue 27), wired in by tests/conftest.py.

Every test runs in the process the others ran in, so whatever one leaves there reaches the next: the
environment (a stage's thread budget writes OMP_NUM_THREADS, MKL_NUM_THREADS and BLEUBERI_CHILD_THREADS
for its children; an in-process vLLM adds LD_PRELOAD and a dozen more), torch's thread count and its
`set_num_threads` (vLLM swaps it for a no-op), the budget stages/core/threads.py applied once per
process, the current directory, the random generators. `ProcessState` is taken before each test and
each module and put back after them: a module's own fixtures (a real vLLM engine) keep what they set up
until the module ends, and no longer.

Tests that apply no budget of their own (library calls on a tiny model) run with the thread count
`baseline_threads()` chose by the budget's rules once, before the first test: left to itself, that count was
whatever the last stage run in the process had chosen.

No test writes into the checkout: `Checkout` lists it (names, sizes and times of every file and folder,
less the caches below) before and after each test and names what appeared, changed or went away; a
folder whose time changed while its names did not saw a file made and removed again.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The budget stages/core/threads.py applied, and what it last saw: module globals, None until a stage applies one.
BUDGET_NAMES = ("_current", "_current_key", "_last_look", "_say")

# Never part of the checkout's listing: version control, virtual environments, and caches that Python, pytest,
# ruff and an editable install write on their own (none of them is a test's output).
SKIPPED_NAMES = frozenset({".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "venv"})
SKIPPED_PREFIXES = (".venv",)
SKIPPED_SUFFIXES = (".egg-info",)


@dataclass
class TorchState:
    threads: int
    set_num_threads: Any  # the function itself: an in-process vLLM replaces it with one that does nothing
    default_dtype: Any
    rng: Any


@dataclass
class ProcessState:
    """What a test may leave in this process, as it was; `restore()` puts it back."""

    environ: dict[str, str]
    cwd: str
    torch: TorchState | None  # None: torch was not imported yet
    budget: tuple[Any, ...] | None  # stages.core.threads' globals; None: not imported yet
    registration: int | None  # stages.core.neighbours' lock that says "this process computes here"
    python_rng: Any
    numpy_rng: Any  # None: numpy was not imported yet

    @classmethod
    def take(cls) -> ProcessState:
        torch, threads, neighbours, numpy = (sys.modules.get(name) for name in _MODULES)
        return cls(
            environ=dict(os.environ),
            cwd=os.getcwd(),
            torch=None if torch is None else _torch_state(torch),
            budget=None if threads is None else tuple(getattr(threads, name) for name in BUDGET_NAMES),
            registration=None if neighbours is None else neighbours._registration,
            python_rng=random.getstate(),
            numpy_rng=None if numpy is None else numpy.random.get_state(),
        )

    def restore(self) -> list[str]:
        """Put everything back; the names of what had changed (for the tests of this module)."""
        torch, threads, neighbours, numpy = (sys.modules.get(name) for name in _MODULES)
        changed = []
        if dict(os.environ) != self.environ:
            changed.append("environ")
            for name in set(os.environ) - set(self.environ):
                del os.environ[name]
            for name, value in self.environ.items():
                if os.environ.get(name) != value:
                    os.environ[name] = value
        if os.getcwd() != self.cwd:
            changed.append("cwd")
            os.chdir(self.cwd)
        if torch is not None and self.torch is not None:
            changed += _restore_torch(torch, self.torch)
        if threads is not None:
            # A module imported during the test starts as a fresh process has it: no budget applied yet.
            budget = self.budget or (None,) * len(BUDGET_NAMES)
            if tuple(getattr(threads, name) for name in BUDGET_NAMES) != budget:
                changed.append("thread budget")
                for name, value in zip(BUDGET_NAMES, budget):
                    setattr(threads, name, value)
        if neighbours is not None and neighbours._registration != self.registration:
            # The test registered this process as a bleuberi process computing here: other processes (a
            # later test's children, a neighbour) would count it. Closing the descriptor drops the flock.
            changed.append("registration")
            if neighbours._registration is not None:
                os.close(neighbours._registration)
            neighbours._registration = self.registration
        if random.getstate() != self.python_rng:
            changed.append("random")
            random.setstate(self.python_rng)
        if numpy is not None and self.numpy_rng is not None:
            numpy.random.set_state(self.numpy_rng)  # compared only by cost: always put back
        return changed


_MODULES = ("torch", "stages.core.threads", "stages.core.neighbours", "numpy")


def _torch_state(torch: Any) -> TorchState:
    return TorchState(torch.get_num_threads(), torch.set_num_threads, torch.get_default_dtype(), torch.get_rng_state())


def _restore_torch(torch: Any, saved: TorchState) -> list[str]:
    changed = []
    if torch.set_num_threads is not saved.set_num_threads:
        changed.append("torch.set_num_threads")
        torch.set_num_threads = saved.set_num_threads
    if torch.get_num_threads() != saved.threads:
        changed.append("torch threads")
        torch._C.set_num_threads(saved.threads)  # torch's own: the module-level one may be vLLM's no-op
    if torch.get_default_dtype() != saved.default_dtype:
        changed.append("torch default dtype")
        torch.set_default_dtype(saved.default_dtype)
    if not torch.equal(torch.get_rng_state(), saved.rng):
        changed.append("torch rng")
        torch.set_rng_state(saved.rng)
    return changed


def baseline_threads() -> str:
    """Give torch the count a bleuberi process starting now would choose (cores, the other processes
    busy on them, $BLEUBERI_THREADS or a user's $OMP_NUM_THREADS), without recording a budget: each test
    that runs a stage still chooses its own. Returns the budget's log line."""
    import torch

    from stages.core import neighbours, threads

    peers, busy = 0, 0.0
    if threads.overridden(None, os.environ) is None:  # a count the user gave needs no look
        before = neighbours.look()
        time.sleep(threads.LOOK_SECONDS)
        peers, busy = neighbours.compare(before, neighbours.look())
    budget = threads.choose_threads(threads.available_cores(), peers=peers, busy_cores=busy)
    torch._C.set_num_threads(budget.threads)
    return budget.line()


# --- the checkout ------------------------------------------------------------------------------------------


def skipped(name: str) -> bool:
    return name in SKIPPED_NAMES or name.startswith(SKIPPED_PREFIXES) or name.endswith(SKIPPED_SUFFIXES)


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "folder" or "link"
    mtime_ns: int
    size: int
    names: frozenset[str] = frozenset()  # a folder's entries, the skipped ones included


class Checkout:
    """A listing of the files and folders under `root`, less the skipped names (and what is under them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries = self._list()

    def _list(self) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        for folder, folders, files in os.walk(self.root):
            relative = os.path.relpath(folder, self.root)
            stat = os.lstat(folder)
            entries[relative] = Entry("folder", stat.st_mtime_ns, 0, frozenset(folders + files))
            folders[:] = sorted(name for name in folders if not skipped(name))
            for name in files:
                if skipped(name):
                    continue
                path = os.path.join(folder, name)
                stat = os.lstat(path)
                kind = "link" if os.path.islink(path) else "file"
                entries[os.path.normpath(os.path.join(relative, name))] = Entry(kind, stat.st_mtime_ns, stat.st_size)
        return entries

    def changes(self) -> list[str]:
        """What is different since the last listing (one line each), and list again from now."""
        before, after = self.entries, self._list()
        self.entries = after
        found = [f"{path}: created" for path in sorted(after.keys() - before.keys())]
        found += [f"{path}: removed" for path in sorted(before.keys() - after.keys())]
        for path in sorted(before.keys() & after.keys()):
            old, new = before[path], after[path]
            if old == new:
                continue
            if new.kind != "folder":
                found.append(f"{path}: changed")
            elif old.names == new.names and old.mtime_ns != new.mtime_ns:
                # Same names, newer folder: something was written there and removed (or renamed over a file).
                found.append(f"{path}/: a file was created and removed in it")
        return found
