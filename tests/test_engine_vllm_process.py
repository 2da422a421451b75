"""The in-process vllm engine gives the process back as it found it when it closes (issue 27).

vLLM changes the process it starts in (tests/test_engine_vllm_real.py shows it with the real one: LD_PRELOAD,
LOCAL_WORLD_SIZE and a dozen more in os.environ, `torch.set_num_threads` replaced by a no-op). Here a
stand-in package named vllm, put first on sys.path, does the same on import and on `LLM(...)`, so that what
`close()` puts back is checked in the fast loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from stages.engines import vllm_engine
from stages.engines.vllm_engine import VllmEngine

STAND_IN = """
import os

import torch

os.environ["STAND_IN_IMPORTED"] = "1"  # as vllm/env_override.py does on import (LD_LIBRARY_PATH, ...)
os.environ["LD_LIBRARY_PATH"] = "/stand-in/lib:" + os.environ.get("LD_LIBRARY_PATH", "")


def _no_op(count):
    pass


class LLM:
    def __init__(self, **args):
        if args["model"] == "broken":
            os.environ["LD_PRELOAD"] = "/stand-in/libgomp.so"
            raise RuntimeError("the engine could not start")
        # as vLLM's CPU platform and worker do when an engine starts
        os.environ["LD_PRELOAD"] = "/stand-in/libgomp.so"
        os.environ["LOCAL_WORLD_SIZE"] = "1"
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        torch._C.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
        torch.set_num_threads = _no_op
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch) -> None:
    package = tmp_path / "stand-in" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(package.parent))
    # Whether or not an earlier test imported the real vllm: the stand-in is imported now, and afterwards
    # sys.modules is as it was (setitem records the entry, or its absence, to put back).
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.delitem(sys.modules, "vllm")
    monkeypatch.setattr(vllm_engine, "_import_environment", None)  # as in a process that never imported it
    monkeypatch.setattr(vllm_engine, "_on_cpu", lambda: True)
    for name in ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_WORKER_MULTIPROC_METHOD", "STAND_IN_IMPORTED"):
        monkeypatch.delenv(name, raising=False)


Process = tuple[dict[str, str], int, object]


def _process() -> Process:
    return dict(os.environ), torch.get_num_threads(), torch.set_num_threads


def _changed(before: Process) -> list[str]:
    """What differs from `before`: the variables' names, "threads", "set_num_threads" (values left out:
    a failure message should not print the whole environment)."""
    environ, threads, set_num_threads = _process()
    names = sorted(name for name in environ.keys() | before[0].keys() if environ.get(name) != before[0].get(name))
    return names + ["threads"] * (threads != before[1]) + ["set_num_threads"] * (set_num_threads is not before[2])


def test_close_puts_back_what_the_start_changed(stand_in) -> None:
    before = _process()
    engine = VllmEngine(Path("model"), enable_lora=False)
    assert {"LD_PRELOAD", "STAND_IN_IMPORTED", "VLLM_ENABLE_V1_MULTIPROCESSING", "threads", "set_num_threads"} <= set(
        _changed(before)
    )  # what the stand-in and the engine's own settings change, for the engine's life
    engine.close()
    assert _changed(before) == []


def test_what_was_set_while_the_engine_ran_is_kept(stand_in) -> None:
    """A value changed since the start is someone else's (the user's, a thread budget recheck): kept."""
    before = _process()
    engine = VllmEngine(Path("model"), enable_lora=False)
    os.environ["LOCAL_WORLD_SIZE"] = "4"
    engine.close()
    assert _changed(before) == ["LOCAL_WORLD_SIZE"] and os.environ["LOCAL_WORLD_SIZE"] == "4"


def test_a_later_engine_gets_what_the_import_set_again(stand_in) -> None:
    before = _process()
    VllmEngine(Path("model"), enable_lora=False).close()
    assert _changed(before) == []  # STAND_IN_IMPORTED, which the import set, gone too
    second = VllmEngine(Path("model"), enable_lora=False)  # vllm is imported already: its import runs no more
    assert os.environ.get("STAND_IN_IMPORTED") == "1"
    assert os.environ.get("LD_LIBRARY_PATH", "").startswith("/stand-in/lib:")
    second.close()
    assert _changed(before) == []


def test_a_start_that_fails_leaves_nothing(stand_in) -> None:
    before = _process()
    with pytest.raises(RuntimeError, match="could not start"):
        VllmEngine(Path("broken"), enable_lora=False)
    assert _changed(before) == []


def test_the_stand_in_is_gone_afterwards(stand_in, monkeypatch) -> None:
    VllmEngine(Path("model"), enable_lora=False).close()
    assert sys.modules["vllm"].__file__.endswith("stand-in/vllm/__init__.py")
    monkeypatch.undo()
    assert "vllm" not in sys.modules or "stand-in" not in str(sys.modules["vllm"].__file__)
