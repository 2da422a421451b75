"""Outputs get the permissions a plain open()/mkdir() would give under the umask, not mkstemp's 0600
or mkdtemp's 0700, so a shared group can read an adapter or a report (issue 9, item 6)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bleuberi_cli.app import app
from tests.conftest import demo_records, train_args, write_jsonl


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    found = {}
    for path in [root, *root.rglob("*")]:
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


def test_every_output_follows_the_umask(runner, tiny_model, tmp_path, umask_002) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    out = tmp_path / "run"
    args = train_args(data, out, tiny_model)
    assert runner.invoke(app, args).exit_code == 0
    scored = runner.invoke(
        app, ["score", "-i", str(out / "metrics.jsonl"), "--skip-invalid", "-o", str(out / "s.jsonl")]
    )
    assert scored.exit_code == 0, scored.stderr
    found = modes(out)
    assert {"adapter", "adapter/adapter_model.safetensors", "checkpoints/step-1", "config.json", "s.jsonl"} <= set(
        found
    )
    for name, mode in found.items():
        expected = 0o775 if (out / name).is_dir() else 0o664
        assert mode == oct(expected), f"{name}: {mode}"
