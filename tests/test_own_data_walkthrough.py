"""docs/own-data.md's walkthrough, run as written in a fresh folder (issue 33): a file the project did not
write for it (long prompts included) is split, answered, scored, selected, trained on and evaluated. Only
the model and the sizes are swapped for small ones, and each swap must find its text, so an edit of the page
that this test no longer matches fails here instead of going untested."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import orjson
import pytest

from tests.conftest import ROOT, demo_records, write_jsonl

PAGE = ROOT / "docs" / "own-data.md"


def walkthrough() -> str:
    return re.search(r"<!-- own-data-walkthrough -->\n```bash\n(.*?)```", PAGE.read_text(), re.S).group(1)


def swap(text: str, old: str, new: str) -> str:
    assert old in text, f"the walkthrough no longer contains {old!r}"
    return text.replace(old, new)


def own_file() -> list[dict]:
    """Records in Alpaca's schema (instruction / input / output), two with an input far over the limit."""
    rows = [{"instruction": r["prompt"], "input": "", "output": r["references"][0]} for r in demo_records("pool", 10)]
    for row in rows[:2]:
        row["input"] = "The cat sat on the mat. " * 60
    return rows


@pytest.mark.slow
def test_the_own_data_walkthrough_runs_as_written(tiny_model, tmp_path) -> None:
    write_jsonl(tmp_path / "mine.jsonl", own_file())
    script = walkthrough()
    for step in ("generate", "train", "eval"):
        script = swap(script, f"bleuberi {step} ", f"bleuberi {step} --model {tiny_model} ")
    for old, new in [
        ("--held-out 40", "--held-out 3"),
        ("-n 64", "-n 3"),
        ("--max-steps 30", "--max-steps 2"),
        ("--per-device-train-batch-size 16", "--per-device-train-batch-size 8"),
        ("--max-completion-length 128", "--max-completion-length 4"),
    ]:
        script = swap(script, old, new)
    script = script.replace("--max-new-tokens 128", "--max-new-tokens 4")
    script = script.replace("--max-prompt-length 512", "--max-prompt-length 64")
    script = script.replace("bleuberi ", f"{sys.executable} -m bleuberi_cli ")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = ["bash", "-euo", "pipefail", "-c", script]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=900)
    err = done.stderr.decode()
    assert done.returncode == 0, err[-3000:]
    pool = [orjson.loads(line) for line in (tmp_path / "data/pool.jsonl").read_bytes().splitlines()]
    heldout = [orjson.loads(line) for line in (tmp_path / "data/heldout.jsonl").read_bytes().splitlines()]
    assert len(heldout) == 3 and len(pool) == 7 and not {r["id"] for r in pool} & {r["id"] for r in heldout}
    assert "over 64 tokens cut (start and end kept)" in err  # the long inputs were cut, and said so
    assert (tmp_path / "runs/mine/adapter/adapter_model.safetensors").is_file()
    assert "| trained |" in (tmp_path / "runs/mine/report.md").read_text()
