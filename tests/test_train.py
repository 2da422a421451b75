"""`bleuberi train` on tiny models: it learns, writes its outputs, resumes exactly, runs data-parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch
from safetensors.torch import load_file

from bleuberi_cli.app import app
from stages.train.config import TrainConfig
from stages.train.loop import lr_at, train
from tests.conftest import ROOT, demo_records, read_jsonl_text, write_jsonl

LEARN_RECORDS = [
    {"id": "a", "prompt": "name the largest planet", "references": ["jupiter is the largest planet"]},
    {"id": "b", "prompt": "what is the capital of france", "references": ["the capital of france is paris"]},
]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> Path:
    """A tiny model whose vocabulary is a few dozen words, so random samples hit reference words."""
    from tests.tiny_model import build_tiny_model

    words = " ".join(r["prompt"] + " " + r["references"][0] for r in LEARN_RECORDS).split()
    words += ["user", "assistant", "system"] + [f"w{i}" for i in range(20)]
    return build_tiny_model(tmp_path_factory.mktemp("words") / "model", words=words)


def small_config(model: Path, **overrides) -> TrainConfig:
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
    return TrainConfig(**{**settings, **overrides})


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_short_run_raises_the_bleu_reward(word_model, tmp_path) -> None:
    config = small_config(word_model, max_steps=30, max_grad_norm=1.0, temperature=1.0, save_steps=100)
    result = train(LEARN_RECORDS, config, tmp_path / "run")
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.02, rewards  # fixed seeds: measured 0.044 -> 0.086
    assert result.metrics[-1]["kl"] > 0  # the policy moved away from the base model


def test_train_command_outputs(runner, tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=6))
    out = tmp_path / "run"
    args = [
        "train",
        "-i",
        str(data),
        "-o",
        str(out),
        "--model",
        str(tiny_model),
        "--num-generations",
        "4",
        "--per-device-train-batch-size",
        "8",
        "--max-completion-length",
        "8",
        "--max-steps",
        "3",
        "--save-steps",
        "2",
        "--lr",
        "1e-3",
        "--reward",
        "bleu",
        "--reward",
        "rouge-l:0.5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    stdout_records = read_jsonl_text(result.stdout)
    file_records = [orjson.loads(line) for line in (out / "metrics.jsonl").read_bytes().splitlines()]
    assert stdout_records == file_records and [r["step"] for r in file_records] == [1, 2, 3]
    for key in (
        "reward_mean",
        "reward_std",
        "rewards",
        "advantage_std",
        "kl",
        "loss",
        "clip_fraction",
        "grad_norm",
        "lr",
        "completion_length_mean",
        "completion_length_max",
        "truncation_rate",
        "seconds",
        "tokens_per_second",
        "zero_std_groups",
    ):
        assert key in file_records[-1], key
    assert set(file_records[0]["rewards"]) == {"bleu", "rouge-l", "combined"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (out / "reward.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["reward"] == ["bleu", "rouge-l:0.5"] and config["total_steps"] == 3
    assert len(config["input"]["sha256"]) == 64 and "torch" in config["packages"]
    assert "done: 3 steps" in result.stderr

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out / "adapter"))
    generated = runner.invoke(
        app,
        [
            "generate",
            "-i",
            str(data),
            "--model",
            str(tiny_model),
            "--adapter",
            str(out / "adapter"),
            "--max-new-tokens",
            "4",
            "-q",
        ],
    )
    assert generated.exit_code == 0 and len(read_jsonl_text(generated.stdout)) == 6


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bleuberi_cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train_args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return [
        "train",
        "-i",
        str(data),
        "-o",
        str(out),
        "--model",
        str(model),
        "--num-generations",
        "4",
        "--per-device-train-batch-size",
        "8",
        "--max-completion-length",
        "6",
        "--max-steps",
        str(steps),
        "--save-steps",
        "2",
        "--lr",
        "5e-3",
        "--save-total-limit",
        "10",
        "-q",
    ]


def test_sigkill_then_resume_ends_with_the_same_adapter(tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=8))
    straight = tmp_path / "straight"
    subprocess.run(
        _cli(*_train_args(tiny_model, data, straight, 7)), env=_env(), check=True, timeout=300, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*_train_args(tiny_model, data, killed, 7)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    for line in proc.stdout:
        if orjson.loads(line)["step"] == 5:  # step-4 is checkpointed; step 5 is done but not saved
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "adapter").exists()
    resumed = subprocess.run(
        _cli(*_train_args(tiny_model, data, killed, 7), "--resume"), env=_env(), capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert next(orjson.loads(x)["step"] for x in resumed.stdout.splitlines()) in (5, 7)
    a, b = adapter_tensors(straight / "adapter"), adapter_tensors(killed / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [orjson.loads(x)["step"] for x in (killed / "metrics.jsonl").read_bytes().splitlines()]
    assert steps == list(range(1, 8))  # no step logged twice


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=8))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(*_train_args(tiny_model, data, out, 50)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for line in proc.stdout:
        if orjson.loads(line)["step"] == 3:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"interrupted; saved" in err
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert saved[-1] >= 3 and saved[-1] < 50


def test_resume_refuses_changed_settings(tiny_model, tmp_path) -> None:
    records = demo_records(count=4)
    train(records, small_config(tiny_model, max_steps=2), tmp_path / "run")
    from stages.core.errors import UsageError

    with pytest.raises(UsageError, match="learning_rate"):
        train(records, small_config(tiny_model, max_steps=4, learning_rate=1e-3), tmp_path / "run", resume="latest")
    with pytest.raises(UsageError, match="different training data"):
        train(demo_records(count=5), small_config(tiny_model, max_steps=4), tmp_path / "run", resume="latest")
    more = train(records, small_config(tiny_model, max_steps=4), tmp_path / "run", resume="latest")
    assert [m["step"] for m in more.metrics] == [1, 2, 3, 4]


def test_merge_to_writes_a_plain_transformers_model(tiny_model, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(
        demo_records(count=4),
        small_config(tiny_model, max_steps=2),
        tmp_path / "run",
        merge_to=str(tmp_path / "merged"),
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(result.adapter))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_sft_lowers_the_answer_loss(word_model, tmp_path) -> None:
    config = small_config(
        word_model,
        algo="sft",
        per_device_train_batch_size=2,
        max_steps=25,
        learning_rate=2e-2,
        max_grad_norm=1.0,
        save_steps=100,
    )
    result = train(LEARN_RECORDS, config, tmp_path / "sft")
    losses = [m["loss"] for m in result.metrics]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics[0]["answer_tokens"] == 13  # (5 + 1) + (6 + 1): each answer ends with <|im_end|>


def test_gradient_checkpointing_gives_the_same_update(tiny_model, tmp_path) -> None:
    records = demo_records(count=4)
    plain = train(records, small_config(tiny_model, max_steps=2, gradient_checkpointing=False), tmp_path / "a")
    checkpointed = train(records, small_config(tiny_model, max_steps=2, gradient_checkpointing=True), tmp_path / "b")
    a, b = adapter_tensors(plain.adapter), adapter_tensors(checkpointed.adapter)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_processes_match_one_process(tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=8))
    common = [
        "--model",
        str(tiny_model),
        "--num-generations",
        "4",
        "--max-completion-length",
        "6",
        "--max-steps",
        "3",
        "--lr",
        "5e-3",
        "-q",
        "-i",
        str(data),
    ]
    single = subprocess.run(
        _cli("train", "-o", str(tmp_path / "one"), "--per-device-train-batch-size", "8", *common),
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "bleuberi_cli",
        "train",
        "-o",
        str(tmp_path / "two"),
        "--per-device-train-batch-size",
        "4",
        *common,
    ]
    double = subprocess.run(launcher, env=_env(), capture_output=True, timeout=300)
    assert double.returncode == 0, double.stderr
    a, b = adapter_tensors(tmp_path / "one" / "adapter"), adapter_tensors(tmp_path / "two" / "adapter")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    one = [orjson.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_bytes().splitlines()]
    two = [orjson.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["reward_mean"] for r in one] == pytest.approx([r["reward_mean"] for r in two])


def test_bad_training_input(runner, tiny_model, tmp_path) -> None:
    model = ["--model", str(tiny_model), "--num-generations", "4", "--per-device-train-batch-size", "8"]
    no_refs = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "Say hi."}])
    result = runner.invoke(app, ["train", "-i", str(no_refs), "-o", str(tmp_path / "r1"), *model])
    assert result.exit_code == 1 and f"{no_refs}:1: field 'references': missing" in result.stderr
    long_prompt = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "prompt": "word " * 200, "references": ["ok"]}])
    result = runner.invoke(
        app,
        [
            "train",
            "-i",
            str(long_prompt),
            "-o",
            str(tmp_path / "r2"),
            *model,
            "--max-prompt-length",
            "16",
            "--drop-long",
        ],
    )
    assert result.exit_code == 1 and "no usable training prompts" in result.stderr
    result = runner.invoke(
        app,
        [
            "train",
            "-i",
            str(long_prompt),
            "-o",
            str(tmp_path / "r3"),
            *model,
            "--max-prompt-length",
            "16",
            "--max-steps",
            "1",
            "--max-completion-length",
            "4",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "1 cut from the left" in result.stderr
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["input"]["prompts_truncated"] == 1
    result = runner.invoke(
        app,
        [
            "train",
            "-i",
            str(long_prompt),
            "-o",
            str(tmp_path / "r4"),
            "--model",
            str(tiny_model),
            "--num-generations",
            "3",
            "--per-device-train-batch-size",
            "8",
        ],
    )
    assert result.exit_code == 2 and "multiple of num_generations" in result.stderr


def test_skip_zero_std_and_mask_truncated(tiny_model) -> None:
    from stages.engines.base import Sample
    from stages.train.rollout import Rollout, TrainPrompt
    from stages.train.update import micro_batches

    samples = [
        Sample([5, 6, 2], [-1.0, -1.0, -1.0], True),
        Sample([5, 6, 7], [-1.0] * 3, False),
        Sample([8, 2], [-1.0, -1.0], True),
        Sample([9, 9, 9], [-1.0] * 3, False),
    ]
    rewards = torch.tensor([0.5, 0.5, 0.1, 0.9])
    rollout = Rollout(
        [TrainPrompt("a", [1, 3], ["r"]), TrainPrompt("b", [1, 4], ["r"])],
        samples,
        ["x"] * 4,
        rewards,
        {},
        torch.tensor([0.0, 0.0, -1.0, 1.0]),
        torch.tensor([True, False]),
        2,
        keep=[2, 3],
    )
    [mb] = micro_batches(rollout, size=8, pad_id=2, device=torch.device("cpu"), mask_truncated=True)
    assert mb.rows == [2, 3]
    assert mb.batch.completion_mask.tolist() == [[1, 1, 0], [0, 0, 0]]


def test_learning_rate_schedules() -> None:
    config = TrainConfig(learning_rate=1.0, warmup_ratio=0.1)
    assert [lr_at(s, 20, config) for s in (0, 1, 2, 10, 19)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    linear = TrainConfig(learning_rate=1.0, warmup_ratio=0.0, lr_scheduler_type="linear")
    assert [lr_at(s, 4, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = TrainConfig(learning_rate=1.0, warmup_ratio=0.0, lr_scheduler_type="cosine")
    assert lr_at(2, 4, cosine) == pytest.approx(0.5)
