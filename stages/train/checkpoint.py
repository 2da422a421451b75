"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `checkpoints/step-N/` holding
- `adapter_model.safetensors` + `adapter_config.json`: the LoRA weights (a normal PEFT folder);
- `optimizer.safetensors`: AdamW moments per trainable parameter, in parameter order;
- `rng.safetensors`: torch's CPU and CUDA generator states;
- `trainer_state.json`: step, optimizer hyper-parameters and step counts, python/numpy RNG states.
No pickle anywhere: resuming never unpickles data from disk. The learning-rate schedule is a pure
function of the step, so the step restores it; data order and sampling seeds derive from (seed, step).
The folder is written under a temporary name and renamed, so `--resume latest` only ever sees
complete checkpoints.

Under `--parallel fsdp` the adapter and the optimizer moments are sharded over the ranks: every rank
takes part in gathering them whole, rank 0 writes the same files as a DDP run, and on resume each rank
keeps its own part of them. A checkpoint is therefore the same whatever the world size and parallelism.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stages.core.errors import UsageError
from stages.core.files import atomic_folder
from stages.train.sharding import gathered_adapter, is_sharded, load_adapter, shard_like, whole

STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """AdamW's state per trainable parameter, whole (sharded moments are gathered: collective under FSDP)."""
    tensors = {}
    for i, param in enumerate(trainable):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{i}.{key}"] = whole(value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter], path: Path) -> None:
    for name, value in load_file(str(path)).items():
        index, key = name.split(".", 1)
        param = trainable[int(index)]
        # AdamW keeps its step count as a CPU tensor and the moments beside their parameter (sharded as it is)
        optimizer.state[param][key] = value if key == "step" else shard_like(value, param)


@dataclass
class TrainerState:
    step: int
    extra: dict[str, Any]


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    extra: dict[str, Any],
    keep_last: int | None = None,
    write: bool = True,
) -> Path:
    """Write checkpoints/step-N atomically; optionally keep only the newest `keep_last` checkpoints. Every
    rank calls it (a sharded policy is gathered by all ranks together); only the one with `write` writes."""
    target = folder / f"step-{step}"
    if not write and not is_sharded(model):
        return target
    adapter = gathered_adapter(model)
    moments = _optimizer_tensors(optimizer, trainable)
    if not write:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # A checkpoint of the same step from an earlier, interrupted attempt is replaced.
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True, state_dict=adapter)
        save_file(moments, str(staging / "optimizer.safetensors"))
        rng_tensors, rng_plain = _rng_state()
        save_file(rng_tensors, str(staging / "rng.safetensors"))
        state = {
            "step": step,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            "rng": rng_plain,
            **extra,
        }
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if keep_last:
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """`latest` (the newest under output_dir/checkpoints) or an explicit checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise UsageError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return path


def load_checkpoint(
    path: Path, *, model: Any, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter]
) -> TrainerState:
    """Restore adapter weights, optimizer state and RNG states; returns the step and saved extras."""
    from peft import set_peft_model_state_dict

    adapter = load_file(str(path / "adapter_model.safetensors"))
    if is_sharded(model):
        load_adapter(model, adapter, str(path))
    elif getattr(set_peft_model_state_dict(model, adapter), "unexpected_keys", None):
        raise UsageError(f"{path}: the checkpoint's adapter does not fit this model/LoRA configuration")
    _load_optimizer(optimizer, trainable, path / "optimizer.safetensors")
    state = json.loads((path / "trainer_state.json").read_text())
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    extra = {k: v for k, v in state.items() if k not in ("step", "param_groups", "rng")}
    return TrainerState(step=int(state["step"]), extra=extra)
