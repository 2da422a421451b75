"""What a training output folder may hold, and whether a new run may write into it.

A fresh run into a folder that already holds a run is refused: the old checkpoints have higher step
numbers, so `save_total_limit` would delete each new checkpoint as it is written and a later `--resume`
would load the old run's weights. `--resume` continues it, `--overwrite` removes it first.

A resumed run is checked against the checkpoint's own record of its settings (trainer_state.json),
not against config.json, which a later run may have rewritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from stages.core.errors import UsageError
from stages.train.checkpoint import list_checkpoints

# What a training run writes into its folder; only these are "a run", and only these --overwrite removes.
RUN_OUTPUTS = ("checkpoints", "adapter", "metrics.jsonl", "config.json", "reward.png", "tensorboard")

# Options that may differ between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {
    "max_steps",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "device",
    "threads",
    "server_url",
    "server_model",
    "api_key_env",
    "concurrency",
}


def existing_run(output_dir: Path) -> list[str]:
    """The saved work in `output_dir`: complete checkpoints and a final adapter (empty: no run to lose).

    metrics.jsonl and config.json alone (a run killed before its first checkpoint) hold nothing to resume.
    """
    found = []
    if list_checkpoints(output_dir / "checkpoints"):  # a staging folder cut by a kill is not one
        found.append("checkpoints")
    if (output_dir / "adapter").is_dir() and any((output_dir / "adapter").iterdir()):
        found.append("adapter")
    return found


def prepare_fresh_run(output_dir: Path, *, overwrite: bool) -> None:
    """Refuse a folder holding a run unless `overwrite`, which removes that run's outputs (only ours)."""
    found = existing_run(output_dir)
    if found and not overwrite:
        raise UsageError(
            f"{output_dir} already holds a training run ({', '.join(found)}): continue it with --resume, "
            "or start over with --overwrite (removes it)"
        )
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_resume(checkpoint: Path, output_dir: Path, config: dict[str, Any], digest: str) -> None:
    """Refuse to resume `checkpoint` with other settings or other data than it was trained with.

    Checkpoints record their run's settings and data hash; older ones without that record are checked
    against config.json.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    source = checkpoint / "trainer_state.json"
    before, saved_digest = state.get("config"), state.get("input_sha256")
    if before is None:
        source = output_dir / "config.json"
        if not source.is_file():
            return
        saved = json.loads(source.read_text())
        before, saved_digest = saved.get("config", {}), saved.get("input", {}).get("sha256")
    changed = sorted(k for k in config if k not in RESUMABLE_CHANGES and before.get(k, config[k]) != config[k])
    if changed:
        raise UsageError(f"cannot resume with different settings: {', '.join(changed)} (see {source})")
    if saved_digest not in (None, digest):
        raise UsageError(f"cannot resume on different training data (input hash differs from {source})")
