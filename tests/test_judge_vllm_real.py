"""`judge-url:` against a real vLLM server serving the default model (SmolLM2-135M-Instruct) as the judge:
score a file, the same again from the cache, a GRPO step with bleu and the judge z-mixed, eval with the judge
as a metric (skipped without vLLM).

Slow: one vLLM server for the module, started by the fixtures of tests/test_engine_vllm_real.py (~25-50 s on
2 CPU cores). What a 135M judge says is not checked here (docs/rewards.md measures that: in free text it
rarely writes a grade; with structured outputs it grades nearly everything 10); what is checked is that its
replies arrive, are read or counted as nulls, cached, and reach score, train and eval.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from bleuberi_cli.app import app
from tests import test_engine_vllm_real as vllm_real
from tests.conftest import demo_records, read_jsonl_text, train_args, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="no vllm installed in this environment (the README's test command installs it)",
    ),
]

RECORDS = 6
# The module-scoped vLLM server of the engine tests, started once for this module too (its fixtures, reused).
model_dir, server_url = vllm_real.model_dir, vllm_real.server_url


@pytest.fixture
def judge_env(monkeypatch, tmp_path) -> str:
    """The judge's cache in the test's own folder; returns it."""
    cache = tmp_path / "judge-cache"
    monkeypatch.setenv("BLEUBERI_JUDGE_CACHE", str(cache))
    return str(cache)


def answered(count: int) -> list[dict]:
    """Held-out records answered twice: with their own reference, and with the next record's (a wrong answer)."""
    rows = demo_records("heldout", count)
    return [
        {**row, "completions": [row["references"][0], rows[(i + 1) % count]["references"][0]]}
        for i, row in enumerate(rows)
    ]


def test_score_a_file_then_again_from_the_cache(runner, server_url, judge_env, tmp_path) -> None:
    path = write_jsonl(tmp_path / "answered.jsonl", answered(RECORDS))
    spec = f"judge-url:{server_url}#smol"
    first = runner.invoke(app, ["score", "-i", str(path), "-m", spec, "-m", "bleu"])
    assert first.exit_code == 0, first.output
    out = read_jsonl_text(first.stdout)
    grades = [g for row in out for g in row["scores"][spec]]
    assert len(grades) == 2 * RECORDS and all(g is None or 0.0 <= g <= 1.0 for g in grades)
    nulls = grades.count(None)
    assert f"judge: {2 * RECORDS} requests, 0 answered from the cache, {nulls} null" in first.stderr
    cached = [json.loads(p.read_text()) for p in (tmp_path / "judge-cache").rglob("*.json")]
    assert len(cached) == 2 * RECORDS and all(c["request"]["model"] == "smol" for c in cached)
    assert any(c["reply"].strip() for c in cached)  # the server's own words, kept as it gave them
    again = runner.invoke(app, ["score", "-i", str(path), "-m", spec, "-m", "bleu"])
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    assert f"judge: 0 requests, {2 * RECORDS} answered from the cache, {nulls} null" in again.stderr


def test_a_grpo_step_with_bleu_and_the_judge_z_mixed(
    runner, server_url, judge_env, tiny_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("BLEUBERI_JUDGE_FORMAT", "json")  # structured outputs: the small judge's every reply is read
    rows = [{k: r[k] for k in ("id", "prompt", "references")} for r in demo_records("heldout", 2)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = f"judge-url:{server_url}#smol"
    args = train_args(data, tmp_path / "run", tiny_model, reward="bleu", per_device_train_batch_size=8)
    result = runner.invoke(app, [*args, "--reward", spec, "--reward-combine", "zscore"])
    assert result.exit_code == 0, result.output
    [step] = read_jsonl_text(result.stdout)
    assert 0 < step["judge_requests"] <= 8 and step["judge_cache_hits"] == 0
    assert step["judge_nulls"] == 0 and 0 < step["judge_seconds"] <= step["score_seconds"]
    assert set(step["rewards"]) == {"bleu", spec, "combined"} and step["reward_combine"] == "zscore"
    assert f"judge {step['judge_requests']} requests, 0 cached, {step['judge_nulls']} nulls" in result.stderr


def test_eval_with_the_judge_as_a_metric(runner, server_url, judge_env, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BLEUBERI_JUDGE_FORMAT", "json")  # eval needs every answer graded
    rows = demo_records("heldout", RECORDS)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", rows)
    own = write_jsonl(tmp_path / "own.jsonl", [{"id": r["id"], "completion": r["references"][0]} for r in rows])
    other = [{"id": r["id"], "completion": rows[(i + 1) % RECORDS]["references"][0]} for i, r in enumerate(rows)]
    swapped = write_jsonl(tmp_path / "swapped.jsonl", other)
    spec = f"judge-url:{server_url}#smol"
    args = ["eval", "-i", str(heldout), "--answers", f"swapped={swapped}", "--answers", f"own={own}"]
    result = runner.invoke(app, [*args, "--baseline", "swapped", "--metric", spec, "--metric", "bleu"])
    assert result.exit_code == 0, result.output  # eval needs a grade for every answer: a null would fail it
    out = read_jsonl_text(result.stdout)
    for system in ("own", "swapped"):
        assert all(0.0 <= row["evaluation"][system]["scores"][spec] <= 1.0 for row in out)
    assert f"{spec}: " in result.stderr and " requests, " in result.stderr
