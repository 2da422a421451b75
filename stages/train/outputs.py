"""What a training run leaves behind: metrics.jsonl, config.json, reward.png, adapter/, a merged model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from stages.core.files import atomic_folder, atomic_path


def write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


class StepLog:
    """metrics.jsonl, one record per logged step. On resume, records after the checkpoint are dropped
    (they will be produced again), so the file never holds a step twice."""

    def __init__(self, path: Path, *, enabled: bool, first_step: int) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled and path.exists():
            kept = []
            for line in path.read_bytes().splitlines():
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if isinstance(record, dict) and record.get("step", 0) <= first_step:
                        kept.append(record)
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))
            self.records = kept
        elif enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "ab") as f:
                f.write(orjson.dumps(record) + b"\n")


def plot_metrics(metrics_path: Path, target: Path, say: Callable[[str], None]) -> None:
    """reward.png: reward (mean +/- std) and KL per step. Skipped, with a note, without matplotlib."""
    records = [orjson.loads(line) for line in metrics_path.read_bytes().splitlines() if line.strip()]
    if not records or ("reward_mean" not in records[0] and "loss" not in records[0]):
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("reward.png skipped: pip install 'bleuberi[plot]' for plots")
        return
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    if "reward_mean" in records[0]:
        mean = [r["reward_mean"] for r in records]
        std = [r["reward_std"] for r in records]
        top.plot(steps, mean, color="#1b9e77", label="reward mean")
        top.fill_between(
            steps,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color="#1b9e77",
            alpha=0.2,
            label="± std",
        )
        top.set_ylabel("reward")
        top.legend(loc="best")
        bottom.plot(steps, [r["kl"] for r in records], color="#d95f02")
        bottom.set_ylabel("KL to base")
    else:
        top.plot(steps, [r["loss"] for r in records], color="#1b9e77")
        top.set_ylabel("SFT loss (NLL/token)")
        bottom.plot(steps, [r["grad_norm"] for r in records], color="#d95f02")
        bottom.set_ylabel("grad norm")
    bottom.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# Beside adapter_config.json, whose base_model_name_or_path is where the base was loaded from (for the
# embedded model, a cache folder on this machine): the model as the user named it, to load it elsewhere,
# and the dtypes: the base's as it was trained, and the adapter's (float32 whatever the base's).
BASE_MODEL_FILE = "bleuberi_base_model.json"


def save_adapter(
    model: Any, tokenizer: Any, target: Path, *, model_name: str | None = None, state_dict: dict[str, Any] | None = None
) -> None:
    """The final LoRA: loads with PeftModel.from_pretrained and `bleuberi generate --adapter`. `state_dict`:
    the LoRA weights gathered whole from a sharded policy (stages/train/sharding.py)."""

    with atomic_folder(target) as folder:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(folder)
        if model_name is not None:
            loaded_from = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            record = {"model": model_name, "loaded_from": loaded_from, **_dtypes(model)}
            (folder / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _dtypes(model: Any) -> dict[str, str]:
    """The base model's weight dtype and the adapter's (trainable) weight dtype, as names."""
    base = next(p.dtype for p in model.parameters() if not p.requires_grad)
    adapter = next(p.dtype for p in model.parameters() if p.requires_grad)
    return {"base_dtype": str(base).removeprefix("torch."), "adapter_dtype": str(adapter).removeprefix("torch.")}


def save_merged(model: Any, tokenizer: Any, target: Path) -> None:
    """A full model with the adapter folded in (safetensors), for plain transformers."""
    merged = model.merge_and_unload()

    with atomic_folder(target) as folder:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)


def save_merged_from_disk(model: Any, tokenizer: Any, target: Path, *, base: str, adapter: Path, remote: bool) -> None:
    """`save_merged` for a sharded policy, which no rank holds whole: the base model (`--model`) is loaded
    again into CPU memory in the dtype it was trained in, and the saved adapter folded into it."""
    import torch

    from stages.core.models import attach_adapter, load_model, resolve_model

    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    loaded = load_model(resolve_model(base), device=torch.device("cpu"), dtype=dtype, trust_remote_code=remote)
    save_merged(attach_adapter(loaded, str(adapter), merge=False), tokenizer, target)
