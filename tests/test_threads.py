"""The thread budget: the count chosen for given cores, ranks, engine, neighbours and overrides; that the
stages apply and record it; two trains started together on one machine both finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from stages.core import neighbours, threads
from stages.core.errors import UsageError
from stages.core.neighbours import CpuSnapshot, Look, busy_between
from stages.core.threads import ThreadBudget, choose_threads, engine_competes
from tests.conftest import ROOT, demo_records, read_jsonl_text, write_jsonl
from tests.isolation import BUDGET_NAMES

ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLEUBERI_THREADS", threads.OURS, "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def no_budget_yet(monkeypatch):
    """Each test starts as a process no budget has touched: none of the variables a budget reads or writes,
    whatever pytest was started with (a BLEUBERI_CHILD_THREADS equal to the OMP_NUM_THREADS a test sets
    would make the test's value look like bleuberi's own), and no budget applied. What a test changes
    (these variables, torch's thread count, the budget) tests/conftest.py puts back afterwards."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name in BUDGET_NAMES:
        monkeypatch.setattr(threads, name, None)


# (cores, local world size, other bleuberi processes, local engine, busy cores of other processes)
#   -> (threads, engine share); the expected counts follow the rules in stages/core/threads.py, by hand.
BUDGETS = [
    ((2, 1, 0, False, 0.0), (2, None)),  # alone on a quiet 2-core machine: torch's own default, kept
    ((2, 1, 0, False, 0.05), (2, None)),  # background noise is not a neighbour
    ((2, 1, 0, False, 0.49), (2, None)),  # less than half a core busy
    ((2, 1, 0, False, 0.5), (1, None)),  # half a core, rounded up: one core is not free
    ((2, 1, 0, False, 1.0), (1, None)),  # one busy single-threaded neighbour
    ((2, 1, 0, False, 2.0), (1, None)),  # the machine full: never below 1
    ((2, 1, 0, False, 7.0), (1, None)),
    ((2, 1, 1, False, 0.0), (1, None)),  # another bleuberi started with it (both idle while they look)
    ((2, 1, 3, False, 0.0), (1, None)),  # never below 1
    ((8, 1, 1, False, 0.0), (4, None)),
    ((8, 1, 2, False, 0.0), (2, None)),  # 8 // 3
    ((8, 1, 1, False, 4.0), (4, None)),  # the peer's own load is not counted twice
    ((2, 2, 0, False, 0.0), (1, None)),  # torchrun: 2 local ranks share 2 cores
    ((16, 4, 0, False, 0.0), (4, None)),
    ((16, 4, 3, False, 3.0), (4, None)),  # the 3 sibling ranks are peers too, not others
    ((16, 4, 4, False, 0.0), (3, None)),  # siblings and one other process: 16 // 5
    ((16, 1, 0, False, 13.0), (3, None)),  # 13 busy: 3 free
    ((3, 4, 0, False, 0.0), (1, None)),  # more ranks than cores: 1 each
    ((2, 1, 0, True, 0.0), (1, 1)),  # a concurrent local engine: half each
    ((16, 1, 0, True, 0.0), (8, 8)),
    ((3, 1, 0, True, 0.0), (1, 1)),  # an odd core is left over
    ((1, 1, 0, True, 0.0), (1, 1)),  # one core: 1 each, however crowded
    ((16, 2, 1, True, 0.0), (4, 4)),  # 8 per rank, half of them to the engine
    ((16, 1, 1, True, 0.0), (4, 4)),  # 8 for this process, half of them to its engine
    ((16, 1, 0, True, 10.0), (6, 6)),  # 6 cores free: each takes 6 of them
]


@pytest.mark.parametrize(("situation", "expected"), BUDGETS)
def test_the_budget_for_each_situation(situation, expected) -> None:
    cores, ranks, peers, engine, busy = situation
    budget = choose_threads(
        cores, local_world_size=ranks, peers=peers, local_engine=engine, busy_cores=busy, environ={}
    )
    assert (budget.threads, budget.engine_threads) == expected
    assert budget.cores == cores


# (override, environment) -> (threads, reason) on 2 cores with one busy neighbour (the budget alone: 1)
OVERRIDES = [
    ((None, {}), (1, "other processes busy on 1.0 cores")),
    ((3, {}), (3, "--threads")),  # the flag is taken as given, even above the cores
    ((3, {"BLEUBERI_THREADS": "2"}), (3, "--threads")),  # the flag before the variable
    ((None, {"BLEUBERI_THREADS": "2"}), (2, "$BLEUBERI_THREADS")),
    ((None, {"BLEUBERI_THREADS": "2", "OMP_NUM_THREADS": "1"}), (2, "$BLEUBERI_THREADS")),
    ((None, {"OMP_NUM_THREADS": "2"}), (2, "$OMP_NUM_THREADS")),  # the user's OpenMP setting is kept
    # the value bleuberi set for its own children is not the user's: the budget decides
    ((None, {"OMP_NUM_THREADS": "2", threads.OURS: "2"}), (1, "other processes busy on 1.0 cores")),
    # torchrun's default of 1 per rank is not the user's either (but a user's 2 under torchrun is)
    ((None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}), (1, "other processes busy on 1.0 cores")),
    ((None, {"OMP_NUM_THREADS": "2", "LOCAL_WORLD_SIZE": "2"}), (2, "$OMP_NUM_THREADS")),
]


@pytest.mark.parametrize(("request_", "expected"), OVERRIDES)
def test_overrides_and_their_order(request_, expected) -> None:
    override, environ = request_
    budget = choose_threads(2, busy_cores=1.0, override=override, environ=environ)
    assert (budget.threads, budget.reason) == expected


def test_torchrun_default_gives_way_to_the_split() -> None:
    environ = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}
    assert choose_threads(16, local_world_size=2, environ=environ).threads == 8


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", ""])
def test_a_bad_count_is_a_usage_error_naming_its_source(bad) -> None:
    if bad:
        with pytest.raises(UsageError, match=r"BLEUBERI_THREADS="):
            choose_threads(2, environ={"BLEUBERI_THREADS": bad})
    else:  # empty: not set
        assert choose_threads(2, environ={"BLEUBERI_THREADS": bad}).threads == 2
    with pytest.raises(UsageError, match="--threads 0"):
        choose_threads(2, override=0, environ={})


def test_the_log_line() -> None:
    assert ThreadBudget(1, 2, None, "2 local ranks").line() == "threads: 1 of 2 cores (2 local ranks)"
    assert ThreadBudget(2, 2).line() == "threads: 2 of 2 cores"


ENGINES = [
    (("vllm", [], "cpu", True), True),  # vLLM in this process, sampling while the trainer trains
    (("vllm", [], "cpu", False), False),  # sync: the engine and the trainer take turns
    (("vllm", [], "cuda", True), False),  # on a GPU
    (("server", ["http://127.0.0.1:8000/v1"], "cpu", True), True),
    (("server", "http://localhost:8000/v1", "cpu", True), True),  # one URL as a string
    (("server", ["http://[::1]:8000/v1"], "cpu", True), True),
    (("server", ["http://gpu-box:8000/v1", "http://127.0.0.1:9/v1"], "cpu", True), True),
    (("server", ["http://gpu-box:8000/v1"], "cpu", True), False),  # another machine
    (("server", ["http://127.0.0.1:8000/v1"], "cuda", True), False),  # a GPU server next to a GPU trainer
    (("transformers", [], "cpu", True), False),
]


@pytest.mark.parametrize(("setting", "expected"), ENGINES)
def test_which_engines_compete_for_the_cores(setting, expected) -> None:
    assert engine_competes(*setting) is expected


def test_busy_cores_are_other_processes_cpu_time_over_the_window() -> None:
    start = CpuSnapshot(when=10.0, busy=100.0, own=5.0)
    # 2 s; all processes used 4 CPU-seconds on our cores, 1 of them ours: others kept 1.5 cores busy
    assert busy_between(start, CpuSnapshot(when=12.0, busy=104.0, own=6.0)) == pytest.approx(1.5)
    # our own work alone is not a neighbour
    assert busy_between(start, CpuSnapshot(when=12.0, busy=104.0, own=9.0)) == 0.0


LINUX = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc and flock")

# A child that registers as a bleuberi process in FOLDER (when given), then, until it is killed, waits on its
# stdin ("idle": no CPU time from then on, though it spun SPIN seconds of CPU before, as a notebook that
# trained an hour ago) or, told to go by a line on its stdin, spins ("busy"), and says "spun" once it has
# spun for SPIN seconds of CPU. What the tests below see is CPU time, never how long anything took: a
# loaded machine makes them slower, not wrong.
SPIN = 0.5
CHILD = f"""
import sys, time
from pathlib import Path
from stages.core import neighbours

def spin():
    start = time.process_time()
    while time.process_time() - start < {SPIN}:
        pass

if sys.argv[2] == "idle":
    spin()
if sys.argv[1]:
    neighbours.register(Path(sys.argv[1]))
print("registered", flush=True)
if sys.argv[2] == "idle":
    sys.stdin.read()
sys.stdin.readline()
spin()
print("spun", flush=True)
while True:
    pass
"""


def _child(folder, mode: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder or ""), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "registered"
    return child


def _spin(child: subprocess.Popen) -> None:
    """Tell a busy child to go, and wait until it has spun SPIN seconds of CPU."""
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "spun"


def _stop(*children: subprocess.Popen) -> None:
    for child in children:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


@LINUX
def test_the_cpu_time_of_other_processes_is_measured_as_busy_cores() -> None:
    """Between two snapshots, a child spun for SPIN CPU-seconds: the cores other processes kept busy, times the
    window, hold at least that (others may add). Two ticks of slack: /proc/stat counts in whole ticks."""
    before = neighbours.snapshot()
    neighbour = _child(None, "busy")
    try:
        _spin(neighbour)
        after = neighbours.snapshot()
    finally:
        _stop(neighbour)
    others = busy_between(before, after) * (after.when - before.when)
    assert others >= SPIN - 2 / os.sysconf("SC_CLK_TCK"), (others, SPIN)


@LINUX
def test_registered_peers_are_seen_while_alive(tmp_path) -> None:
    started = time.time()
    child = _child(tmp_path, "idle")
    try:
        peers = neighbours.live_peers(tmp_path)
        # its age: since it registered, which was after the test started it
        assert list(peers) == [child.pid] and 0 <= peers[child.pid] <= time.time() - started
    finally:
        _stop(child)
    assert neighbours.live_peers(tmp_path) == {}  # the lock died with it
    os.utime(tmp_path / str(child.pid), (0, 0))  # an old file whose lock nobody holds: removed
    assert neighbours.live_peers(tmp_path) == {} and not (tmp_path / str(child.pid)).exists()


@LINUX
def test_a_peer_counts_when_it_computes_or_has_just_started(tmp_path, monkeypatch) -> None:
    """Two registered children, one waiting on its stdin, one spinning between the looks. Both count while
    they are new; once they are not, only the one that used CPU between the looks. The window is set to one
    second after the looks, in which the busy one spun SPIN > ACTIVE_SHARE x 1 s of CPU: the counts do not
    depend on how long the looks took on a loaded machine."""
    monkeypatch.setattr(neighbours, "registry", lambda: tmp_path)
    idle, busy = _child(tmp_path, "idle"), _child(tmp_path, "busy")
    try:
        before = neighbours.look()
        _spin(busy)
        after = neighbours.look()
    finally:
        _stop(idle, busy)
    one_second = replace(after, cpu=replace(after.cpu, when=before.cpu.when + 1.0))
    assert SPIN > neighbours.ACTIVE_SHARE
    monkeypatch.setattr(neighbours, "RECENT_SECONDS", float("inf"))  # both just registered: both count, busy or not
    assert neighbours.compare(before, one_second)[0] == 2
    monkeypatch.setattr(neighbours, "RECENT_SECONDS", 0.0)  # as if they had registered long ago
    assert neighbours.compare(before, one_second)[0] == 1  # not the idle one (a notebook that trained an hour ago)


def test_apply_sets_torch_and_the_children_environment(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's
    monkeypatch.setattr(threads, "look_around", lambda: pytest.fail("an override needs no look around"))
    said: list[str] = []
    budget = threads.apply_thread_budget(2, say=said.append)
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the user's value is theirs to keep
    assert said == [f"threads: 2 of {threads.available_cores()} cores (--threads)"]
    assert threads.apply_thread_budget(2, say=said.append) is budget and len(said) == 1  # once per request
    # without an override a later stage keeps what the process chose (bleuberi run's stages, eval's systems)
    assert threads.apply_thread_budget(None, say=said.append) is budget and len(said) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.apply_thread_budget(1)
    assert torch.get_num_threads() == 1
    assert (os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]) == ("1", "1")


def test_the_vllm_engine_gets_its_share(monkeypatch) -> None:
    from stages.engines import vllm_engine

    for name in ("OMP_NUM_THREADS", "BLEUBERI_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    monkeypatch.setattr(threads, "look_around", lambda: (0, 0.0))
    monkeypatch.setattr(threads, "_set_torch_threads", lambda count: None)
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    assert threads.apply_thread_budget().threads == 6
    budget = threads.apply_thread_budget(local_engine=True)  # async rollouts: chosen again, with the split
    assert (budget.threads, budget.engine_threads) == (3, 3)
    vllm_engine._cpu_environment()
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_a_process_that_chose_alone_gives_cores_back_and_takes_them_again(monkeypatch) -> None:
    """recheck() between batches: the others since the last look decide, no waiting, at most every 5 s."""
    for name in ("OMP_NUM_THREADS", "BLEUBERI_THREADS"):
        monkeypatch.delenv(name, raising=False)
    clock = [100.0]
    seen = [(0, 0.0)]  # what the next comparison of two looks finds: (peers, busy cores)
    applied: list[int] = []
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "_set_torch_threads", applied.append)
    monkeypatch.setattr(time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    monkeypatch.setattr(neighbours, "snapshot", lambda: CpuSnapshot(clock[0], 0.0, 0.0))
    monkeypatch.setattr(neighbours, "look", lambda: Look(CpuSnapshot(clock[0], 0.0, 0.0)))
    monkeypatch.setattr(neighbours, "compare", lambda before, after: seen[0])
    said: list[str] = []
    assert threads.apply_thread_budget(say=said.append).threads == 4  # alone
    seen[0] = (1, 1.0)  # another bleuberi came, keeping a core busy
    clock[0] += 1.0
    assert threads.recheck() is None  # too soon
    clock[0] += 5.0
    assert threads.recheck().threads == 2 and applied[-1] == 2
    assert said[-1] == "threads: 2 of 4 cores (1 other bleuberi process), was 4"
    clock[0] += 6.0
    assert threads.recheck() is None  # still there: unchanged, nothing logged
    seen[0] = (0, 0.0)  # gone
    clock[0] += 6.0
    assert threads.recheck().threads == 4 and applied[-1] == 4
    answers: list[object] = []
    clock[0] += 6.0
    seen[0] = (1, 1.0)
    worker = threading.Thread(target=lambda: answers.append(threads.recheck()))
    worker.start()
    worker.join()
    assert answers == [None]  # another thread's count is its own (the async rollout thread)
    monkeypatch.setenv("BLEUBERI_THREADS", "3")
    assert threads.recheck() is None  # a count the user gave is never changed


def test_an_override_is_never_rechecked(monkeypatch) -> None:
    monkeypatch.setattr(threads, "_set_torch_threads", lambda count: None)
    threads.apply_thread_budget(2)
    monkeypatch.setattr(neighbours, "look", lambda: pytest.fail("an override needs no look"))
    assert threads.recheck() is None


def test_score_workers_take_one_thread(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    threads.one_thread_per_worker()
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1


# --- the stages apply it -------------------------------------------------------------------------------


def _train_args(model, data, out) -> list[str]:
    return [
        "train",
        *("-i", str(data), "-o", str(out), "--model", str(model)),
        *("--num-generations", "4", "--per-device-train-batch-size", "8", "--max-completion-length", "4"),
        *("--max-steps", "1", "--save-steps", "1"),
    ]


@pytest.mark.parametrize(
    ("flag", "environ", "expected"), [(["--threads", "2"], {}, 2), ([], {"BLEUBERI_THREADS": "2"}, 2)]
)
def test_train_applies_and_records_the_count(runner, tiny_model, tmp_path, monkeypatch, flag, environ, expected):
    import stages.train.grpo as update
    from bleuberi_cli.app import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the budget alone would give 1: the override must win
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    seen: list[int] = []
    original = update.grpo_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(update, "grpo_loss", spy)
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    result = runner.invoke(app, [*_train_args(tiny_model, data, tmp_path / "run"), *flag])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {expected}
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["threads"]["threads"] == expected
    assert recorded["config"]["threads"] == expected  # the flag, or the variable's value (typer reads it)
    assert f"threads: {expected} of" in result.stderr


def test_a_run_resumes_with_another_thread_count(runner, tiny_model, tmp_path, monkeypatch) -> None:
    from bleuberi_cli.app import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    args = _train_args(tiny_model, data, tmp_path / "run")
    first = runner.invoke(app, [*args, "--threads", "2"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, [*args[:-4], "--max-steps", "2", "--save-steps", "1", "--resume", "--threads", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"]["threads"] == 1


def test_generate_honours_threads(runner, tiny_model, tmp_path, monkeypatch) -> None:
    from bleuberi_cli.app import app
    from stages.engines.generator import Generator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen: list[int] = []
    original = Generator.generate

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", spy)
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    args = ["generate", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "3", "--threads", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(read_jsonl_text(result.stdout)) == 2
    assert seen == [2]
    assert "threads: 2 of" in result.stderr and "(--threads)" in result.stderr


def test_run_sets_threads_once_for_every_stage() -> None:
    from stages.core.errors import ConfigError
    from stages.run.config_file import load_config

    config = load_config(overrides=["threads=1"])
    assert config.model.threads == 1
    assert config.train.model.threads == config.generate.model.threads == config.eval.model.threads == 1
    with pytest.raises((ConfigError, UsageError), match="threads is set at the top level"):
        load_config(overrides=["train.threads=1"])


@pytest.mark.slow
def test_two_trains_started_together_both_finish(tiny_model, tmp_path) -> None:
    """No override: each process chooses from the cores and what the other one is doing."""
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    environ = {k: v for k, v in os.environ.items() if k not in ENV_NAMES} | {"PYTHONPATH": str(ROOT)}
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bleuberi_cli", *_train_args(tiny_model, data, out), "--max-steps", "2"],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    for proc, out, stderr in zip(procs, outs, errors):
        assert proc.returncode == 0, stderr
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        chosen = json.loads((out / "config.json").read_text())["threads"]
        assert 1 <= chosen["threads"] <= chosen["cores"] == threads.available_cores()
        assert f"threads: {chosen['threads']} of {chosen['cores']} cores" in stderr
