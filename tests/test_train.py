"""`bleuberi train` on tiny models: it learns, writes its outputs, resumes exactly, runs data-parallel."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

import stages.train.grpo as grpo_module
from bleuberi_cli.app import app
from stages.engines.base import Sample
from stages.train.config import TrainConfig
from stages.train.data import Rollout
from stages.train.loop import lr_at, train
from tests.conftest import ROOT, demo_records, read_jsonl_text, small_train_config, torchrun, train_args, write_jsonl

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


small_config = small_train_config


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_short_run_raises_the_bleu_reward(word_model, tmp_path) -> None:
    config = small_config(word_model, max_steps=30, max_grad_norm=1.0, temperature=1.0, save_steps=100)
    result = train(LEARN_RECORDS, config, tmp_path / "run")
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5

    # A rise beyond noise, judged by the run's own spread: a step's mean reward over its 8 samples has
    # standard error reward_std / sqrt(8); a mean of 5 steps has sqrt(sum of their squares) / 5.
    def standard_error(steps: list[dict]) -> float:
        return math.sqrt(sum(m["reward_std"] ** 2 / 8 for m in steps)) / len(steps)

    noise = math.hypot(standard_error(result.metrics[:5]), standard_error(result.metrics[-5:]))
    assert last - first > 2 * noise, (first, last, noise, rewards)
    assert result.metrics[-1]["kl"] > 0  # the policy moved away from the base model


def test_train_command_outputs(runner, tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=6))
    out = tmp_path / "run"
    sizes = {"per_device_train_batch_size": 8, "max_completion_length": 8, "max_steps": 3, "save_steps": 2}
    args = [*train_args(data, out, tiny_model, **sizes, lr="1e-3", reward="bleu"), "--reward", "rouge-l:0.5"]
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
    sizes = {"per_device_train_batch_size": 8, "max_completion_length": 6, "max_steps": steps, "save_steps": 2}
    return [*train_args(data, out, model, **sizes, lr="5e-3", save_total_limit=10), "-q"]


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert b"Traceback" not in err and re.search(rb"interrupted at step \d+ of 50; saved", err)
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


def saved_for_backward(run: Callable[[], Any]) -> tuple[Any, int]:
    """What `run` returns, and the bytes of every tensor autograd kept for a backward pass while it ran."""
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return run(), saved[0]


def test_gradient_checkpointing_keeps_less_for_backward_and_gives_the_same_update(tiny_model, tmp_path) -> None:
    """Proven by its effect, on whichever transformers API turns it on: the decoder layers' activations are
    not kept for the backward pass (they are recomputed there), and the adapter comes out the same."""
    records = demo_records(count=4)
    settings = {"max_steps": 2, "reward": ["chrf"]}  # chrF: a random model's samples differ, so the update moves

    def run(checkpointing: bool, folder: str) -> tuple[Any, int]:
        config = small_config(tiny_model, **settings, gradient_checkpointing=checkpointing)
        return saved_for_backward(lambda: train(records, config, tmp_path / folder))

    (plain, plain_bytes), (checkpointed, checkpointed_bytes) = run(False, "a"), run(True, "b")
    # measured: 23.4 MB kept without, 1.8 MB with (transformers 4.56.2 to 5.25, torch 2.6 and 2.13)
    assert 4 * checkpointed_bytes < plain_bytes, (checkpointed_bytes, plain_bytes)
    a, b = adapter_tensors(plain.adapter), adapter_tensors(checkpointed.adapter)
    # the update did something (LoRA B starts at zero), so equal adapters mean equal updates
    assert any(t.abs().max() > 1e-4 for k, t in a.items() if "lora_B" in k)
    # to float rounding: without checkpointing the rows of a group share their prompt's forward pass
    # (stages/train/logprobs.py), with it every row runs whole; measured 1.4e-5 apart at most, of 0.18
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_two_processes_match_one_process(tiny_model, tmp_path, scale_rewards) -> None:
    """The same global batch on one process or two gives the same adapter. With scale_rewards=batch the
    advantages divide by the std of the whole batch, which two processes get by an all-reduce."""
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=8))
    common = [
        "--reward",
        "chrf",  # chrF: a random model's samples differ in reward (BLEU ties them at 0 by chance), so both move
        "--scale-rewards",
        scale_rewards,
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
        *torchrun(2),
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
    # to float rounding, which AdamW's normalised steps (lr 5e-3) turn into up to 2e-5 here: one process runs
    # both prompts of a micro-batch in one prompt pass, two processes one each (stages/train/logprobs.py)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    one = [orjson.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_bytes().splitlines()]
    two = [orjson.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["reward_mean"] for r in one] == pytest.approx([r["reward_mean"] for r in two])
    # the advantages' scale, which AdamW would hide from the adapter: the batch std is the whole batch's
    assert [r["advantage_std"] for r in one] == pytest.approx([r["advantage_std"] for r in two], rel=1e-5)
    assert [r["advantage_std"] for r in one] == pytest.approx([r["advantage_std"] for r in two], abs=1e-5)
    assert any(r["advantage_std"] > 0 for r in one)  # some signal: the adapters moved
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in a.items() if "lora_B" in k)


BATCH_SCALED_ADVANTAGES = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from stages.engines.base import Sample
from stages.engines.generator import Generator
from stages.score import Scorer
from stages.train.distributed import Distributed
from stages.train.data import TrainPrompt
from stages.train.grpo import score_rollout

model_dir, out_dir, reference = sys.argv[1], sys.argv[2], sys.argv[3]
groups = json.loads(sys.argv[4])
dist = Distributed.from_env("cpu")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
generator = Generator.for_model(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
mine = groups[dist.rank * 2 : (dist.rank + 1) * 2]  # two prompts per rank, two samples per prompt
prompts = [TrainPrompt(str(i), tokenizer.encode("Say it."), [reference]) for i in range(len(mine))]
samples = []
for group in mine:
    for text in group:
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        samples.append(Sample(ids, [0.0] * len(ids), True))
rollout = score_rollout(
    generator, Scorer(["bleu"]), prompts, samples, group_size=2, scale_rewards="batch", skip_zero_std=False, dist=dist
)
with open(f"{out_dir}/rank{dist.rank}.json", "w") as f:
    json.dump({"completions": rollout.completions, "advantages": rollout.advantages.tolist()}, f)
dist.close()
"""


@pytest.mark.slow
def test_batch_scaled_advantages_under_torchrun_are_the_whole_batchs(tiny_model, tmp_path) -> None:
    """Two ranks, two groups each: every advantage is (r - its group's mean) / (std of all 8 rewards + 1e-4)."""
    reference = "The cat sat on the mat."
    groups = [
        ["The cat sat on the mat.", "The cat sat on a mat."],  # rank 0: rewards close together
        ["The cat sat on the mat.", "The dog sat on the mat."],
        ["The dog ran in the park.", "The cat sat on the mat."],  # rank 1: far apart
        ["Jupiter is the largest planet.", "The cat sat on the mat."],
    ]
    script = tmp_path / "advantages.py"
    script.write_text(BATCH_SCALED_ADVANTAGES)
    launcher = torchrun(2)
    done = subprocess.run(
        [*launcher, str(script), str(tiny_model), str(tmp_path), reference, json.dumps(groups)],
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["completions"] + ranks[1]["completions"] == [t for g in groups for t in g]
    rewards = [sacrebleu.sentence_bleu(t, [reference]).score / 100 for g in groups for t in g]
    mean = sum(rewards) / 8
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 7)  # unbiased, over the whole batch
    expected = []
    for g in range(4):
        pair = rewards[2 * g : 2 * g + 2]
        expected += [(r - sum(pair) / 2) / (std + 1e-4) for r in pair]
    got = ranks[0]["advantages"] + ranks[1]["advantages"]
    assert got == pytest.approx(expected, abs=1e-5)
    # rank 0 dividing by its own std would give other numbers: the check can tell the two apart
    local = rewards[:4]
    local_std = math.sqrt(sum((r - sum(local) / 4) ** 2 for r in local) / 3)
    assert max(abs(e * (std + 1e-4) / (local_std + 1e-4) - e) for e in expected[:4]) > 0.1


def test_bad_training_input(runner, tiny_model, tmp_path) -> None:
    sizes = {"per_device_train_batch_size": 8, "max_completion_length": None, "max_steps": None}
    no_refs = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "Say hi."}])
    result = runner.invoke(app, train_args(no_refs, tmp_path / "r1", tiny_model, **sizes))
    assert result.exit_code == 1 and f"{no_refs}:1: field 'references': missing" in result.stderr
    long_prompt = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "prompt": "word " * 200, "references": ["ok"]}])
    dropped = train_args(long_prompt, tmp_path / "r2", tiny_model, **sizes, max_prompt_length=16, long_prompts="skip")
    result = runner.invoke(app, dropped)
    assert result.exit_code == 1 and "no usable training prompts (every one is over" in result.stderr
    cut = train_args(long_prompt, tmp_path / "r3", tiny_model, per_device_train_batch_size=8, max_prompt_length=16)
    result = runner.invoke(app, cut)
    assert result.exit_code == 0, result.stderr
    assert "1 prompt over 16 tokens cut (start and end kept): y (" in result.stderr
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["input"]["prompts_cut"] == ["y"]
    result = runner.invoke(app, train_args(long_prompt, tmp_path / "r4", tiny_model, **sizes, num_generations=3))
    assert result.exit_code == 2 and "multiple of --num-generations" in result.stderr


@pytest.fixture(scope="module")
def tiny_generator(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.engines.generator import Generator

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return Generator.for_model(model, AutoTokenizer.from_pretrained(tiny_model))


@pytest.mark.parametrize("skip_zero_std", [True, False])
def test_skip_zero_std_and_mask_truncated(tiny_generator, skip_zero_std) -> None:
    """Real rewards (BLEU on decoded samples) through score_rollout, then the loss batch."""
    from stages.score import Scorer
    from stages.train.data import TrainPrompt
    from stages.train.distributed import Distributed
    from stages.train.grpo import score_rollout

    tokenizer, eos = tiny_generator.tokenizer, tiny_generator.tokenizer.eos_token_id
    reference = "The cat sat on the mat."
    cat = tokenizer.encode(reference, add_special_tokens=False)
    dog = tokenizer.encode("The dog ran in the park.", add_special_tokens=False)
    samples = [
        Sample([*dog, eos], [-0.5] * (len(dog) + 1), True),  # prompt a: the same answer twice,
        Sample(dog, [-0.5] * len(dog), False),  # once cut at the length limit: equal rewards
        Sample([*cat, eos], [-0.25] * (len(cat) + 1), True),  # prompt b: the reference itself
        Sample(dog[:5], [-1.0] * 5, False),  # and the start of another sentence, cut
    ]
    prompts = [TrainPrompt(name, tokenizer.encode(f"Say it, {name}."), [reference]) for name in ("a", "b")]
    rollout = score_rollout(
        tiny_generator,
        Scorer(["bleu"]),
        prompts,
        samples,
        group_size=2,
        scale_rewards="group",
        skip_zero_std=skip_zero_std,
        dist=Distributed(),
    )

    def bleu(ids: list[int]) -> float:
        return sacrebleu.sentence_bleu(tokenizer.decode(ids), [reference]).score / 100

    dog_bleu, cut_bleu = bleu(dog), bleu(dog[:5])
    assert 0 < dog_bleu < 1 and cut_bleu < 1  # the reference scores 1; these do not
    assert rollout.rewards.tolist() == pytest.approx([dog_bleu, dog_bleu, 1.0, cut_bleu], abs=1e-6)
    assert rollout.zero_std.tolist() == [True, False]
    # group b: rewards 1 and c; mean (1 + c) / 2; unbiased std of two values |1 - c| / sqrt(2)
    advantage = ((1 - cut_bleu) / 2) / ((1 - cut_bleu) / math.sqrt(2) + 1e-4)  # just under 1 / sqrt(2)
    assert rollout.advantages.tolist() == pytest.approx([0.0, 0.0, advantage, -advantage], abs=1e-5)
    assert rollout.keep == ([2, 3] if skip_zero_std else [0, 1, 2, 3])

    _check_loss_batches(
        rollout, samples, tiny_generator.pad_id, n_cat=len(cat) + 1, n_dog=len(dog), advantage=advantage
    )


def _check_loss_batches(
    rollout: Rollout, samples: list[Sample], pad: int, *, n_cat: int, n_dog: int, advantage: float
) -> None:
    """The loss batch of a scored rollout, with and without truncated completions masked: `n_cat` tokens
    in the reference with its end token, `n_dog` in the other sentence without."""
    from stages.train.batches import micro_batches

    cpu = torch.device("cpu")
    [kept] = micro_batches(rollout, size=8, pad_id=pad, device=cpu, mask_truncated=True)
    [whole] = micro_batches(rollout, size=8, pad_id=pad, device=cpu, mask_truncated=False)
    assert kept.rows == whole.rows == rollout.keep
    masks = {  # row -> (mask with truncated rows left out, mask without)
        0: ([1] * (n_dog + 1), [1] * (n_dog + 1)),
        1: ([0] * n_dog, [1] * n_dog),
        2: ([1] * n_cat, [1] * n_cat),
        3: ([0] * 5, [1] * 5),
    }
    width = kept.batch.completion_mask.shape[1]
    assert width == max(len(samples[r].token_ids) for r in rollout.keep)

    def padded(values: list[int]) -> list[int]:
        return values + [0] * (width - len(values))

    assert kept.batch.completion_mask.tolist() == [padded(masks[r][0]) for r in rollout.keep]
    assert whole.batch.completion_mask.tolist() == [padded(masks[r][1]) for r in rollout.keep]
    expected_advantages = [0.0, 0.0, advantage, -advantage]
    assert kept.advantages.tolist() == pytest.approx([expected_advantages[r] for r in rollout.keep], abs=1e-5)
    # the sampling pass's log-probs, in completion positions, zero beyond each completion
    assert kept.sampled_logp.tolist() == [padded(samples[r].logprobs) for r in rollout.keep]


def test_skip_zero_std_in_a_training_run(tiny_model, tmp_path, monkeypatch) -> None:
    """Per step, the loss pass sees exactly the rows of groups whose rewards differ."""
    rows_seen: list[int] = []
    original = grpo_module.grpo_loss

    def spy(logp, *args, **kwargs):
        rows_seen.append(logp.shape[0])
        return original(logp, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    per_step: list[tuple[float, int]] = []  # (share of zero-std groups, rows in the loss pass)

    def on_step(metrics: dict) -> None:
        per_step.append((metrics["zero_std_groups"], sum(rows_seen)))
        rows_seen.clear()

    config = small_config(tiny_model, max_steps=4, skip_zero_std=True, max_completion_length=6, learning_rate=5e-3)
    train(demo_records(count=8), config, tmp_path / "run", on_step=on_step)
    assert len(per_step) == 4
    assert any(0 < share < 1 for share, _ in per_step)  # some groups were left out, some kept
    for share, rows in per_step:
        assert rows == round(8 * (1 - share))  # 2 groups of 4 per step


def test_the_ratios_old_policy_is_the_trainers_forward_before_the_first_update(tiny_model) -> None:
    """Every update's ratio is taken against the trainer's own log-probs from before the step's first
    update: not the sampler's (here 0.3 nats off, as a bf16 sampler or a stale engine is), not the
    reference's (the adapter off), not recomputed at each update. The importance weights and the drift
    are taken against the same log-probs. Expected values come from the model's plain full-vocabulary
    forward, not from the trainer's chunked head."""
    from stages.train.batches import MicroBatch
    from stages.train.distributed import Distributed
    from stages.train.grpo import policy_update
    from stages.train.logprobs import pack
    from stages.train.policy import load_policy

    temperature, gap, cap = 0.9, 0.3, 2.0
    config = TrainConfig.of(
        model=str(tiny_model), device="cpu", num_iterations=2, beta=0.1, learning_rate=1e-2, temperature=temperature,
        vllm_importance_sampling_correction=True, vllm_importance_sampling_clip_max=cap,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = load_policy(config, torch.device("cpu"))
    for name, p in policy.model.named_parameters():  # a trained adapter: the reference is not the policy
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    tokenizer = policy.generator.tokenizer
    prompts = [tokenizer.encode("The cat sat"), tokenizer.encode("Jupiter is")]
    completions = [tokenizer.encode(" on the mat."), tokenizer.encode(" the largest planet in the sky")]
    batch = pack(prompts, completions, policy.generator.pad_id, torch.device("cpu"))
    mask = batch.completion_mask.bool()

    def full_softmax_logprobs() -> torch.Tensor:
        out = torch.zeros(batch.completion_ids.shape)
        with torch.no_grad():
            for row, (prompt, completion) in enumerate(zip(prompts, completions)):
                logits = policy.model(input_ids=torch.tensor([prompt + completion])).logits[0] / temperature
                picked = torch.log_softmax(logits[len(prompt) - 1 : -1].double(), -1)
                out[row, : len(completion)] = picked.gather(-1, torch.tensor(completion)[:, None])[:, 0].float()
        return out

    policy.model.train()
    before = full_softmax_logprobs()
    with policy.model.disable_adapter():
        reference = full_softmax_logprobs()
    assert (before - reference)[mask].abs().max() > 1e-2  # the adapter matters: a mix-up would show
    sampled = (before - gap) * mask  # the sampler's log-probs: 0.3 nats below the trainer's on every token
    micro_batch = MicroBatch([0, 1], batch, torch.tensor([1.0, -1.0]), sampled)
    calls = []
    original = grpo_module.grpo_loss

    def spy(logp, old_logp, ref_logp, *rest):
        sampling_weight = rest[4]  # after advantages, mask, the loss settings and the denominator
        calls.append((logp.detach().clone(), old_logp.clone(), ref_logp.clone(), sampling_weight.clone()))
        return original(logp, old_logp, ref_logp, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_module, "grpo_loss", spy)
        stats = policy_update(policy, [micro_batch], config, Distributed())
    assert len(calls) == 2  # one micro-batch, two updates
    (first, first_old, first_ref, first_weight), (second, second_old, second_ref, second_weight) = calls
    for old, ref, weight in ((first_old, first_ref, first_weight), (second_old, second_ref, second_weight)):
        assert torch.allclose(old[mask], before[mask], atol=1e-5)  # the trainer's, before any update
        assert torch.allclose(ref[mask], reference[mask], atol=1e-5)
        assert torch.allclose(weight[mask], torch.full_like(weight[mask], math.exp(gap)), rtol=1e-5)  # under the cap
    assert torch.equal(first[mask], first_old[mask])  # the first update's own forward: the ratio is exactly 1
    assert (second - second_old)[mask].abs().max() > 1e-3  # the first update moved the policy; old stayed
    # the drift: |trainer - sampler| = 0.3 on each token; k3 = e^0.3 - 0.3 - 1 per token; no weight over the cap
    assert stats.logprob_drift_mean == pytest.approx(gap, rel=1e-5)
    assert stats.logprob_drift_max == pytest.approx(gap, rel=1e-5)
    assert stats.mismatch_kl == pytest.approx(math.exp(gap) - gap - 1, rel=1e-4)
    assert stats.mismatch_clip_fraction == 0.0


def test_learning_rate_schedules() -> None:
    config = TrainConfig.of(learning_rate=1.0, warmup_ratio=0.1)
    assert [lr_at(s, 20, config) for s in (0, 1, 2, 10, 19)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    linear = TrainConfig.of(learning_rate=1.0, warmup_ratio=0.0, lr_scheduler_type="linear")
    assert [lr_at(s, 4, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = TrainConfig.of(learning_rate=1.0, warmup_ratio=0.0, lr_scheduler_type="cosine")
    assert lr_at(2, 4, cosine) == pytest.approx(0.5)


def test_off_a_terminal_each_logged_step_is_a_line_on_stderr(runner, tiny_model, tmp_path) -> None:
    """A log file (CI, nohup) sees training progress step by step, not minutes of silence; -q silences it."""
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    result = runner.invoke(app, train_args(data, tmp_path / "run", tiny_model, max_steps=2))
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: step")]
    assert [line.split(" | ")[0] for line in lines] == ["train: step 1/2", "train: step 2/2"]
    assert all("reward_mean" in line and "kl" in line for line in lines)
    quiet = runner.invoke(app, [*train_args(data, tmp_path / "quiet", tiny_model, max_steps=2), "-q"])
    assert quiet.exit_code == 0 and "train: step" not in quiet.stderr
