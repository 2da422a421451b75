"""bench/gpu_check.py, the GPU acceptance script, on the CPU: `--device cpu --tiny` runs every code path (build,
sampling, GRPO under torchrun with ddp and fsdp, the bf16-vs-fp32 drift) so that the script is right the first
time it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
MODES = ("ddp", "fsdp")  # `train --parallel`, each under torchrun with one process

pytestmark = pytest.mark.skipif(
    Version(version("transformers")) < Version("5"),
    reason="bench/gpu_check.py builds its tokenizer with transformers 5's Qwen2Tokenizer(vocab=, merges=) "
    f"(here: transformers {version('transformers')})",
)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLEUBERI_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The table's body rows as cells (the header and the |---| line left out)."""
    rows = [line.strip("|").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]


def test_every_word_is_one_token_and_the_saved_tokenizer_reloads_the_same(tmp_path) -> None:
    """transformers 5 reloads a Qwen2 folder's tokenizer as its byte-level Qwen2Tokenizer, whatever was saved: the
    script's tokenizer must encode the same ids and decode the same words after that reload."""
    from transformers import AutoTokenizer, Qwen2Config

    gpu_check = load_script()
    vocab = 2000  # 3 specials + 256 bytes + 1741 words: " a".." z", " aa".." zz", then three letters
    tokenizer = gpu_check.build_tokenizer(vocab)
    words = gpu_check.words_of(vocab)
    assert len(tokenizer) == vocab and len(words) == vocab - 259
    assert words[:2] == ["a", "b"] and words[26] == "aa" and words[702] == "aaa"
    picks = [0, 25, 26, 701, 702, len(words) - 1]
    text = " " + " ".join(words[k] for k in picks)
    expected = [259 + k for k in picks]  # specials, then the 256 bytes, then the words in order
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    Qwen2Config(vocab_size=vocab).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == expected
    assert reloaded.decode(expected) == text
    assert (reloaded.eos_token_id, reloaded.pad_token_id, reloaded.bos_token_id) == (2, 2, 1)
    assert gpu_check.reload_problem(tokenizer, tmp_path, vocab) is None


def test_records_have_a_reference_of_an_answers_length_and_a_long_one() -> None:
    gpu_check = load_script()
    records = gpu_check.make_records(3, 4000, 20, seed=1, answer_words=6)
    assert [r["id"] for r in records] == ["p0", "p1", "p2"]
    assert all(len(r["prompt"].split()) == 28 for r in records)  # 8 more than asked: the encoder cuts from the left
    assert all([len(ref.split()) for ref in r["references"]] == [6, 100] for r in records)  # 100 = 4000 // 40
    assert records == gpu_check.make_records(3, 4000, 20, seed=1, answer_words=6)  # seeded


def test_exit_code_and_verdict_from_the_parts() -> None:
    gpu_check = load_script()
    ok, skipped = gpu_check.Result("sample", "tiny"), gpu_check.Result("grpo", "tiny", "fsdp", "skipped")
    assert gpu_check.verdict([ok, ok]) == (0, "ok: all 2 part(s) passed")
    assert gpu_check.verdict([ok, skipped]) == (3, "incomplete: 1 part(s) skipped (grpo tiny fsdp); the other 1 passed")
    timed_out = gpu_check.Result("grpo", "qwen2.5-7b", "ddp", "timed out")
    assert gpu_check.verdict([ok, skipped, timed_out])[0] == 1
    code, line = gpu_check.verdict([gpu_check.Result("drift", "tiny", "bf16 vs fp32", "FAIL"), ok])
    assert (code, line) == (1, "FAILED: 1 of 2 part(s) (drift tiny bf16 vs fp32)")


def test_the_table_shows_figures_of_passed_parts_only() -> None:
    gpu_check = load_script()
    figures = {"seconds": 1.234, "sample_seconds": 1.0, "update_seconds": 0.2, "tokens_per_second": 2048.0}
    passed = gpu_check.Result("grpo", "qwen2.5-7b", "ddp", figures={**figures, "peak_gb": 40.5}, detail="3 steps")
    failed = gpu_check.Result("grpo", "qwen2.5-7b", "fsdp", "FAIL", figures=figures, detail="RuntimeError: x")
    build = gpu_check.Result("build", "qwen2.5-7b", figures={"weights_gb": 14.2, "tokens_per_second": None})
    rows = table_rows(gpu_check.render_table([passed, failed, build]))
    assert rows[0] == ["grpo", "qwen2.5-7b", "ddp", "ok", "2,048.0", "1.23", "1.00", "0.20", "40.5", "3 steps"]
    assert rows[1] == ["grpo", "qwen2.5-7b", "fsdp", "FAIL", "-", "-", "-", "-", "-", "RuntimeError: x"]
    assert rows[2][4:9] == ["-", "-", "-", "-", "14.2"]  # a build's peak column is its weights


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch", "12"], "--batch 12 must be a multiple of --generations 8"),
        (["--shapes", "qwen2.5-70b"], "--shapes qwen2.5-70b: choose from"),
        (["--parallel", "ddp,zero"], "--parallel ddp,zero: choose from ddp, fsdp"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--device", "tpu"], "--device tpu"),
    ],
)
def test_impossible_options_are_one_line_and_exit_2(args, named, tmp_path) -> None:
    done = run_script(*args, tmp_path=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and named in done.stderr


def test_a_missing_package_is_named_in_one_line(monkeypatch, capsys) -> None:
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "NEEDED", (*gpu_check.NEEDED, "no_such_package_for_gpu_check"))
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no_such_package_for_gpu_check" in err


def test_cuda_asked_for_without_a_gpu_is_a_usage_error(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert load_script().main(["--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_a_check_that_fails_exits_1_and_says_which(tmp_path) -> None:
    """A drift bound of 0 cannot hold in bf16: the part fails, the table says so, the exit code is 1."""
    done = run_script("--device", "cpu", "--tiny", "--parts", "drift", "--max-drift", "0", tmp_path=tmp_path)
    assert done.returncode == 1, done.stderr
    (row,) = table_rows(done.stdout)
    assert row[:4] == ["drift", "tiny", "bf16 vs fp32", "FAIL"] and row[-1].startswith("over --max-drift 0.0")
    assert done.stdout.splitlines()[-1] == "gpu_check: FAILED: 1 of 1 part(s) (drift tiny bf16 vs fp32)"


@pytest.mark.slow
def test_parts_that_no_longer_fit_the_budget_are_skipped_with_exit_3(tmp_path) -> None:
    done = run_script("--device", "cpu", "--tiny", "--parts", "drift", "--budget-seconds", "0.5", tmp_path=tmp_path)
    assert done.returncode == 3, done.stderr
    (row,) = table_rows(done.stdout)
    assert row[3] == "skipped" and row[-1].endswith("needs at least 2 s")


@pytest.mark.slow
def test_tiny_run_on_the_cpu_passes_every_part_and_reports_its_figures(tmp_path) -> None:
    out = tmp_path / "figures.json"
    done = run_script("--device", "cpu", "--tiny", "--parallel", ",".join(MODES), "--json", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("bleuberi GPU acceptance on cpu")
    assert lines[-1] == f"gpu_check: ok: all {3 + len(MODES)} part(s) passed"
    assert all(line.startswith("| ") or line.startswith("|---") for line in lines[1:-1])  # logs went to stderr
    rows = table_rows(done.stdout)
    expected = [("build", "-"), ("sample", "-"), *(("grpo", mode) for mode in MODES), ("drift", "bf16 vs fp32")]
    assert [(r[0], r[2]) for r in rows] == expected
    assert all(r[1] == "tiny" and r[3] == "ok" for r in rows)

    record = json.loads(out.read_text())
    assert out.read_text().count("\n") == 1 and record["exit_code"] == 0
    results = {(r["part"], r["mode"]): r["figures"] for r in record["results"]}
    sample = results[("sample", "-")]
    assert sample["rows"] == 2 * 8 and sample["prompt_tokens"] == [16, 16]  # --tiny: 2 prompts x G=8, 16 tokens
    assert 2 * 8 <= sample["tokens"] <= 2 * 8 * 8
    assert sample["tokens_per_second"] == pytest.approx(sample["tokens"] / sample["seconds"], rel=1e-3, abs=0.1)
    assert rows[1][4] == f"{sample['tokens_per_second']:,.1f}"
    for mode, row in zip(MODES, rows[2:]):
        grpo = results[("grpo", mode)]
        steps = grpo["raw"]["steps"]
        assert [s["step"] for s in steps] == [1, 2]
        assert grpo["seconds"] == statistics.median(s["seconds"] for s in steps[1:])  # the steps after the first
        assert row[5] == f"{grpo['seconds']:,.2f}"
        assert any(s["grad_norm"] > 0 for s in steps) and grpo["raw"]["adapter_saved"]
    drift = results[("drift", "bf16 vs fp32")]
    assert 0 < drift["logprob_diff_mean"] <= drift["logprob_diff_max"]
    assert drift["loss_diff"] == pytest.approx(abs(drift["loss_bf16"] - drift["loss_fp32"]))
    assert 0 < drift["tokens"] <= 2 * 8 * 8  # --batch 16 / G 8 = 2 prompts x 8 samples x <= 8 tokens


def test_a_grpo_child_past_the_budget_is_stopped_with_all_it_started(monkeypatch, tmp_path) -> None:
    """The child (torchrun and its worker) runs in a session of its own: at the budget's end the whole session
    is stopped and the part reads "timed out" (a failure)."""
    gpu_check = load_script()
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Recorded)
    monkeypatch.setattr(gpu_check, "remaining", lambda args: 1.0)  # torchrun alone takes longer to start
    args = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    result = gpu_check.part_grpo(args, "tiny", "ddp", tmp_path / "no-model", tmp_path)
    assert (result.status, result.detail) == ("timed out", "stopped after 1 s (the budget's end)")
    (child,) = started
    assert child.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(child.pid, 0)  # nothing of its session is left
    assert gpu_check.verdict([result])[0] == 1
