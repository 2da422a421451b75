"""The README's recipe, run as written in a fresh folder (issue 9, item 11): only the model, the data
and the sizes are swapped for small ones, and each swap must find its text, so an edit of the README
that this test no longer matches fails here instead of going untested."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, demo_records, write_jsonl


def recipe_block() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- recipe-command -->\n```bash\n(.*?)```", text, re.S).group(1)


def swap(text: str, old: str, new: str) -> str:
    assert old in text, f"the README recipe no longer contains {old!r}"
    return text.replace(old, new)


@pytest.mark.slow
def test_the_readme_recipe_runs_as_written(tiny_model, tmp_path) -> None:
    script = recipe_block()
    data = tmp_path / "examples" / "data"
    data.mkdir(parents=True)
    write_jsonl(data / "pool.jsonl", demo_records("pool", count=6))
    write_jsonl(data / "heldout.jsonl", demo_records(count=3))
    for step in ("generate", "train", "eval"):
        script = swap(script, f"bleuberi {step} ", f"bleuberi {step} --model {tiny_model} ")
    for old, new in [
        ("-n 64", "-n 2"),
        ("--max-steps 30", "--max-steps 2"),
        ("--per-device-train-batch-size 16", "--per-device-train-batch-size 8"),
    ]:
        script = swap(script, old, new)
    script = swap(script, "--max-completion-length 48", "--max-completion-length 4")
    script = script.replace("--max-new-tokens 48", "--max-new-tokens 4")
    script = script.replace("bleuberi ", f"{sys.executable} -m bleuberi_cli ")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (tmp_path / "runs/x/adapter/adapter_model.safetensors").is_file()
    assert [line.count(b'"step"') for line in (tmp_path / "runs/x.metrics.jsonl").read_bytes().splitlines()] == [1, 1]
    assert "| trained |" in (tmp_path / "runs/x.report.md").read_text()
