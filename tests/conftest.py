"""Shared fixtures. Unit tests build tiny models themselves; only tests marked `slow` load the real default."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest
from typer.testing import CliRunner

from tests import ordering
from tests.isolation import Checkout, ProcessState, baseline_threads

if TYPE_CHECKING:
    from stages.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# --- isolation and order (tests/isolation.py and tests/ordering.py say why) ------------------------------------

CHECKOUT = pytest.StashKey[Checkout]()
HYPOTHESIS_HOME = pytest.StashKey[str]()
BASELINE = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    ordering.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    ordering.configure(config)
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
        # Hypothesis keeps its example database (failures it replays on the next run) and caches in
        # ./.hypothesis, the checkout: a run would then depend on files an earlier one left there.
        config.stash[HYPOTHESIS_HOME] = tempfile.mkdtemp(prefix="bleuberi-hypothesis-")
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = config.stash[HYPOTHESIS_HOME]


def pytest_unconfigure(config: pytest.Config) -> None:
    if HYPOTHESIS_HOME in config.stash:
        shutil.rmtree(config.stash[HYPOTHESIS_HOME], ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Listed before collection, so that what importing the test modules writes is seen too.
    session.config.stash[CHECKOUT] = Checkout(session.config.rootpath)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (by parametrized fixtures) and deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ordering.reorder(config, items)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    ordering.summary(terminalreporter, config)
    if BASELINE in config.stash:
        terminalreporter.write_line(f"torch for tests without a budget of their own: {config.stash[BASELINE]}")


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session: pytest.Session) -> None:
    """What the session's own fixtures wrote into the checkout (no test's teardown saw it) fails the run."""
    if CHECKOUT not in session.config.stash:
        return
    changes = session.config.stash[CHECKOUT].changes()
    if changes:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        say = reporter.write_line if reporter else print
        say(f"ERROR: the tests wrote into the checkout {session.config.rootpath}: " + "; ".join(changes))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def threads_for_the_session(request: pytest.FixtureRequest) -> Iterator[None]:
    """Chosen once, before every module's snapshot: the count each test starts with (tests/isolation.py)."""
    import torch

    before = torch.get_num_threads()
    request.config.stash[BASELINE] = baseline_threads()
    yield
    torch._C.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def isolated_module() -> Iterator[None]:
    """What a module's own fixtures set up (a vLLM engine's environment) stays until the module ends."""
    state = ProcessState.take()
    yield
    state.restore()


@pytest.fixture(autouse=True)
def isolated(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test gets the process as the test before it found it, and may not write into the checkout."""
    state = ProcessState.take()
    yield
    state.restore()
    checkout = request.config.stash.get(CHECKOUT, None)
    changes = checkout.changes() if checkout is not None else []
    if changes:
        pytest.fail(f"the test wrote into the checkout {checkout.root}: " + "; ".join(changes), pytrace=False)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else orjson.dumps(row))
            f.write(b"\n")
    return path


def read_jsonl_text(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def sacrebleu_means(records: list[dict]) -> dict[str, float]:
    """Per system of eval's records, the mean sentence BLEU (0..1) of its answers, computed by sacrebleu itself:
    what eval's summary must report as `metrics.bleu.mean`."""
    import statistics

    import sacrebleu

    systems = records[0]["evaluation"] if records else {}
    return {
        system: statistics.fmean(
            sacrebleu.sentence_bleu(r["evaluation"][system]["completion"], r["references"]).score / 100 for r in records
        )
        for system in systems
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (built once per session)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    from tests.tiny_model import make_lora_adapter

    return make_lora_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "adapter")


def demo_records(name: str = "heldout", count: int | None = None) -> list[dict]:
    rows = [orjson.loads(line) for line in (EXAMPLES / "data" / f"{name}.jsonl").read_bytes().splitlines()]
    return rows[:count] if count else rows


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a stand-in or a real server started by a test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The sizes a tiny training run needs: fast on the tiny model, still a real GRPO step.
TINY_TRAIN = {"num-generations": 4, "per-device-train-batch-size": 4, "max-completion-length": 4, "max-steps": 1}


def train_args(data: Path, out: Path, model: Path | str, **options: object) -> list[str]:
    """`bleuberi train` argv on a tiny model: TINY_TRAIN's sizes, overridden or extended by `options`
    (max_steps=3 -> --max-steps 3; True -> a bare flag; None -> left out)."""
    settings = {**TINY_TRAIN, **{name.replace("_", "-"): value for name, value in options.items()}}
    args = ["train", "-i", str(data), "-o", str(out), "--model", str(model)]
    for name, value in settings.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None and value is not False:
            args += [f"--{name}", str(value)]
    return args


def run_make(tmp_path: Path, model: Path, *targets: str, **changed: str):
    """examples/Makefile on a tiny model: pool and held-out files in `tmp_path`, outputs in `tmp_path/out`;
    `changed` overrides its variables (N="3")."""
    import subprocess
    import sys

    variables = {
        "MODEL": str(model),
        "POOL": str(tmp_path / "pool.jsonl"),
        "HELDOUT": str(tmp_path / "heldout.jsonl"),
        "N": "4",
        "STEPS": "2",
        "TOKENS": "4",
        "OUT": str(tmp_path / "out"),
        "BLEUBERI": f"{sys.executable} -m bleuberi_cli",
        **changed,
    }
    command = ["make", "-f", str(EXAMPLES / "Makefile"), "-C", str(EXAMPLES), *targets]
    command += [f"{key}={value}" for key, value in variables.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def torchrun(processes: int = 2) -> list[str]:
    """`python -m torch.distributed.run` with `processes` local ranks on a free port; append the script or
    `-m module` and its arguments."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]  # fmt: skip


def reply(handler, status: int, payload: bytes, **headers: str) -> None:
    """Answer a test server's request: status, headers (Content_Type -> Content-Type), length, body."""
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def serve(handler: type):
    """A threading HTTP server on a free 127.0.0.1 port, serving `handler` from a daemon thread."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve_in_background(server)
    return server


def serve_in_background(server) -> None:
    """Run `server.serve_forever` in a daemon thread, polling every 20 ms: shutdown() waits for the next
    poll, 0.5 s by default, in the teardown of every test that starts a server."""
    import threading

    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


def tiny_overrides(model) -> list[str]:
    """`bleuberi run` settings that make a whole run take seconds on the tiny model."""
    return [
        f"model={model}",
        "device=cpu",
        "data.max_pool=6",
        "data.max_heldout=3",
        "select.num=2",
        "generate.max_new_tokens=4",
        "train.max_steps=3",
        "train.save_steps=1",
        "train.per_device_train_batch_size=4",
        "train.max_completion_length=4",
        "eval.max_new_tokens=4",
        "eval.bootstrap_resamples=20",
    ]


def run_args(run_dir: Path, model: Path | str, *settings: str) -> list[str]:
    """`bleuberi run -o RUN_DIR` with the tiny overrides, then `settings`, each as `--set KEY=VALUE`."""
    args = ["run", "-o", str(run_dir)]
    for item in [*tiny_overrides(model), *settings]:
        args += ["--set", item]
    return args


def small_train_config(model: Path | str, **overrides: object) -> TrainConfig:
    """A few GRPO steps on a tiny model (tests/test_train.py's run; other tests change what they need)."""
    from stages.train.config import TrainConfig

    settings = {
        "model": str(model),
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "max_completion_length": 8,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "save_steps": 2,
        "warmup_ratio": 0.0,
    }
    return TrainConfig.of(**{**settings, **overrides})
