"""Issue 27: a test gets the process as the one before it found it, and writes nothing into the checkout.

The inner sessions below (pytester, in this process) run their tests in file order, so that one test can
leave something behind and the next can look for it: once with tests/conftest.py's fixtures, once without
them, which shows what they prevent.
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
from pathlib import Path

import numpy
import pytest
import torch

from stages.core import neighbours, threads
from tests.isolation import BUDGET_NAMES, Checkout, ProcessState, baseline_threads

WIRED = "from tests.conftest import isolated, isolated_module, pytest_sessionfinish, pytest_sessionstart\n"

# What the real failure was (the README's test command, 1 failed): a stage run in the process on a busy
# 2-core machine applied a budget of 1 thread, which left OMP_NUM_THREADS=1 and BLEUBERI_CHILD_THREADS=1
# in os.environ; a later test set OMP_NUM_THREADS=1 as a user would, and the budget took it for its own.
LEAKING = """
import os
import random

import torch

from stages.core import threads

START = os.getcwd()
SET_NUM_THREADS = torch.set_num_threads
THREADS = torch.get_num_threads()


def test_a_stage_applies_a_budget_of_one(tmp_path):
    threads.apply_thread_budget(1)
    os.environ["LEFT_BEHIND"] = "1"
    os.chdir(tmp_path)
    torch.set_num_threads = lambda count: None  # as an in-process vLLM engine does


def test_a_users_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads.apply_thread_budget(2)
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_nothing_was_left():
    assert "LEFT_BEHIND" not in os.environ and os.getcwd() == START
    assert torch.set_num_threads is SET_NUM_THREADS and torch.get_num_threads() == THREADS
    assert threads.current_budget() is None
"""


def _inner_run(pytester: pytest.Pytester, tmp_path: Path, conftest: str, tests: str, *args: str) -> pytest.RunResult:
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_inner=tests)
    # The inner basetemp outside the inner checkout: its tmp_path is not the checkout.
    return pytester.runpytest("-p", "no:cacheprovider", "--basetemp", str(tmp_path / "basetemp"), *args)


@pytest.fixture
def leaky_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the budget reads, as in a process no budget has touched yet."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV, threads.OURS, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name in BUDGET_NAMES:
        monkeypatch.setattr(threads, name, None)


def test_what_one_test_leaves_does_not_reach_the_next(pytester, tmp_path, leaky_environment) -> None:
    isolated = _inner_run(pytester, tmp_path, WIRED, LEAKING)
    isolated.assert_outcomes(passed=3)


def test_without_the_fixtures_the_leak_fails_the_next_tests(pytester, tmp_path, leaky_environment) -> None:
    """The same tests without tests/conftest.py's fixtures: the issue's failure, and the rest left behind."""
    leaked = _inner_run(pytester, tmp_path, "", LEAKING)
    leaked.assert_outcomes(passed=1, failed=2)
    assert "assert '2' == '1'" in leaked.stdout.str()  # OMP_NUM_THREADS, as in the issue


def test_process_state_puts_back_everything_it_took(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(neighbours, "_registration", None)
    monkeypatch.setattr(threads, "_current", None)
    state = ProcessState.take()
    threads_before, set_num_threads, dtype = torch.get_num_threads(), torch.set_num_threads, torch.get_default_dtype()
    draws = (random.random(), numpy.random.random(), torch.rand(1).item())
    random.setstate(state.python_rng)
    numpy.random.set_state(state.numpy_rng)
    torch.set_rng_state(state.torch.rng)

    os.environ["ISOLATION_PROBE"] = "1"
    removed = sorted(os.environ.keys() - {"ISOLATION_PROBE"})[0]
    del os.environ[removed]
    os.chdir(tmp_path)
    torch._C.set_num_threads(1 if threads_before > 1 else 2)
    torch.set_num_threads = lambda count: None
    torch.set_default_dtype(torch.float64)
    threads._current = threads.ThreadBudget(1, 1)
    neighbours.register(tmp_path)
    assert neighbours._registration is not None
    random.random()
    numpy.random.random()
    torch.rand(1)

    changed = state.restore()
    assert set(changed) == {
        "environ", "cwd", "torch.set_num_threads", "torch threads", "torch default dtype", "torch rng",
        "thread budget", "registration", "random",
    }  # fmt: skip
    assert "ISOLATION_PROBE" not in os.environ and removed in os.environ
    assert os.getcwd() == state.cwd
    assert (torch.get_num_threads(), torch.set_num_threads, torch.get_default_dtype()) == (
        threads_before, set_num_threads, dtype
    )  # fmt: skip
    assert threads.current_budget() is None and neighbours._registration is None
    probe = os.open(tmp_path / str(os.getpid()), os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the registration's lock went with its descriptor
    finally:
        os.close(probe)
    assert (random.random(), numpy.random.random(), torch.rand(1).item()) == draws  # the same draws again
    assert state.restore() == ["torch rng", "random"]  # the draws just made; nothing else had changed


def test_process_state_gives_a_module_imported_during_the_test_a_fresh_budget(monkeypatch) -> None:
    """A test that first imports stages.core.threads leaves it as a new process would find it."""
    state = ProcessState.take()
    state.budget = None  # as if the module had not been imported when it was taken
    monkeypatch.setattr(threads, "_current", threads.ThreadBudget(1, 1))
    assert "thread budget" in state.restore()
    assert all(getattr(threads, name) is None for name in BUDGET_NAMES)


def test_each_test_starts_with_the_sessions_thread_count(request) -> None:
    """Chosen once by the budget's rules (tests/conftest.py), and put back after every test that changed it."""
    line = request.config.stash[sys.modules["tests.conftest"].BASELINE]
    count = int(line.split()[1])  # "threads: N of M cores ..."
    assert 1 <= count <= threads.available_cores() and torch.get_num_threads() == count


def test_the_baseline_follows_the_budgets_overrides(monkeypatch) -> None:
    monkeypatch.setenv("BLEUBERI_THREADS", "1")
    monkeypatch.setattr(neighbours, "look", lambda: pytest.fail("a count the user gave needs no look"))
    assert baseline_threads() == f"threads: 1 of {threads.available_cores()} cores ($BLEUBERI_THREADS)"
    assert torch.get_num_threads() == 1 and threads.current_budget() is None  # no budget recorded


# --- the checkout -----------------------------------------------------------------------------------------


def _tree(root: Path) -> Path:
    for folder in ("stages", ".git", ".venv-test", "bleuberi.egg-info", "stages/__pycache__"):
        (root / folder).mkdir(parents=True)
    (root / "stages" / "a.py").write_text("x = 1\n")
    for path in (root / "stages", root):
        os.utime(path, (0, 0))  # old: a change is newer whatever the file system's clock granularity
    return root


def test_the_checkout_listing_sees_what_a_test_writes(tmp_path) -> None:
    root = _tree(tmp_path)
    checkout = Checkout(root)
    assert "stages/a.py" in checkout.entries and not any(".git" in path for path in checkout.entries)
    # what is not the checkout's: version control, the virtual environment, caches
    for path in (".git/index", ".venv-test/x", "bleuberi.egg-info/PKG-INFO", "stages/__pycache__/a.pyc"):
        (root / path).write_text("written")
    assert checkout.changes() == []
    (root / "stages" / "__pycache__").rename(root / "stages" / "cache")  # now an ordinary folder
    assert checkout.changes() == ["stages/cache: created", "stages/cache/a.pyc: created"]
    (root / "runs").mkdir()  # git-ignored, but a test's output all the same
    (root / "runs" / "out.jsonl").write_text("{}\n")
    (root / "stages" / "a.py").write_text("x = 22\n")
    (root / "stages" / "cache" / "a.pyc").unlink()
    assert checkout.changes() == [
        "runs: created", "runs/out.jsonl: created", "stages/cache/a.pyc: removed", "stages/a.py: changed",
    ]  # fmt: skip
    os.utime(root / "stages", (0, 0))
    checkout = Checkout(root)
    (root / "stages" / "_probe.py").write_text("def f(): ...\n")  # written and removed again within a test
    (root / "stages" / "_probe.py").unlink()
    assert checkout.changes() == ["stages/: a file was created and removed in it"]


GUARDED = """
import pytest
from pathlib import Path


@pytest.fixture(scope="session")
def late():
    yield
    Path("late.txt").write_text("after the last test")


def test_writes_into_the_checkout(late):
    Path("probe.txt").write_text("x")


def test_makes_and_removes_a_file():
    Path("sub", "probe.py").write_text("x")
    Path("sub", "probe.py").unlink()


def test_writes_to_its_tmp_path_and_a_cache(tmp_path):
    (tmp_path / "out.jsonl").write_text("{}")
    Path("sub", "__pycache__").mkdir()
    Path("sub", "__pycache__", "x.pyc").write_text("x")
"""


def test_a_test_that_writes_into_the_checkout_fails(pytester, tmp_path) -> None:
    (pytester.path / "sub").mkdir()
    os.utime(pytester.path / "sub", (0, 0))
    result = _inner_run(pytester, tmp_path, WIRED, GUARDED)
    result.assert_outcomes(passed=3, errors=2)  # the two writers' teardowns, each naming what it wrote
    out = result.stdout.str()
    assert "ERROR at teardown of test_writes_into_the_checkout" in out and "probe.txt: created" in out
    assert "ERROR at teardown of test_makes_and_removes_a_file" in out
    assert "sub/: a file was created and removed in it" in out
    assert "test_writes_to_its_tmp_path_and_a_cache" not in out  # passed, not named
    # the session fixture wrote after the last test: the run fails all the same
    assert "ERROR: the tests wrote into the checkout" in out and "late.txt: created" in out
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_the_session_fails_when_only_a_session_fixture_writes(pytester, tmp_path) -> None:
    tests = GUARDED.split("def test_writes_into_the_checkout")[0] + "def test_needs_it(late):\n    pass\n"
    result = _inner_run(pytester, tmp_path, WIRED, tests)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED and "late.txt: created" in result.stdout.str()


def test_hypothesis_keeps_its_files_out_of_the_checkout() -> None:
    from hypothesis.configuration import storage_directory

    where = Path(storage_directory(intent_to_write=False).path).resolve()
    root = Path(__file__).resolve().parent.parent
    assert root not in where.parents and where == Path(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]).resolve()
