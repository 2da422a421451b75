"""`bleuberi train` with the paper's other rewards and TRL's loss options, end to end on tiny models."""

from __future__ import annotations

import json

import orjson
import pytest
import torch

from bleuberi_cli.app import app
from stages.train.config import TrainConfig
from tests.conftest import demo_records, write_jsonl
from tests.test_rewards_rm import build_tiny_rm


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return build_tiny_rm(tmp_path_factory.mktemp("rm"))


def test_bleu_plus_rm_reasoning_cispo_run(runner, tiny_model, tiny_rm, tmp_path, monkeypatch) -> None:
    import stages.train.grpo as grpo

    losses = []  # what the loss function was called with: the options must reach the loss, not only config.json
    original = grpo.grpo_loss

    def spy(logp, old, ref, advantages, mask, config, denominator, sampling_weight=None, entropy_mask=None):
        losses.append((config, entropy_mask, mask))
        return original(logp, old, ref, advantages, mask, config, denominator, sampling_weight, entropy_mask)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    out = tmp_path / "run"
    args = ["train", "-i", str(data), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
    args += ["--num-generations", "4", "--per-device-train-batch-size", "8", "--max-completion-length", "8"]
    args += ["--max-steps", "2", "--save-steps", "5", "--lr", "1e-3"]
    args += ["--reward", "bleu", "--reward", f"rm:{tiny_rm}", "--reward-combine", "zscore", "--reasoning"]
    args += ["--loss-type", "cispo", "--importance-sampling-level", "sequence", "--top-entropy-quantile", "0.5"]
    args += ["--use-bias-correction-kl"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    # TRL's warning about sequence-level ratios with a token-level loss, once, before training
    assert result.stderr.count("warning: importance_sampling_level=sequence with loss_type=cispo") == 1
    steps = [orjson.loads(line) for line in (out / "metrics.jsonl").read_bytes().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert step["reward_combine"] == "zscore"
        assert set(step["rewards"]) == {"bleu", f"rm:{tiny_rm}", "format", "combined"}
        # z-scores within each group average to 0 over the batch, whatever the raw rewards were
        assert step["rewards"]["combined"]["mean"] == pytest.approx(0.0, abs=1e-6)
        assert step["rewards"]["format"]["mean"] == 0.0  # a random tiny model never writes <think> tags
    recorded = json.loads((out / "config.json").read_text())
    saved = recorded["config"]
    assert saved["reward"] == ["bleu", f"rm:{tiny_rm}"] and saved["reasoning"] is True
    signatures = recorded["reward_signatures"]  # what each reward was, so a changed one is seen
    assert set(signatures) == {"bleu", f"rm:{tiny_rm}", "format"} and str(tiny_rm) in signatures[f"rm:{tiny_rm}"]
    assert len(losses) == 2  # one micro-batch per step
    for config, entropy_mask, mask in losses:
        assert (config.loss_type, config.importance_sampling_level) == ("cispo", "sequence")
        assert config.use_bias_correction_kl is True and config.top_entropy_quantile == 0.5
        assert config.epsilon_high == 5.0  # cispo's ratio cap when --epsilon-high is not given
        # the top half of the active tokens by entropy (ties can keep a few more), never an inactive one
        active = int(mask.sum())
        assert entropy_mask is not None and active // 2 <= int(entropy_mask.sum()) < active
        assert not (entropy_mask & ~mask.bool()).any()


def test_reasoning_mode_puts_the_format_request_in_the_policys_prompt(tiny_model) -> None:
    from stages.train.policy import load_policy

    record = {"id": "a", "prompt": "Name the largest planet.", "references": ["Jupiter."]}
    generator = load_policy(TrainConfig.of(model=str(tiny_model), reasoning=True), torch.device("cpu")).generator
    text = generator.tokenizer.decode(generator.encoder.encode(record))
    assert text.startswith("<|im_start|>system\n") and "<think>" in text and "<answer>" in text
    plain = load_policy(TrainConfig.of(model=str(tiny_model)), torch.device("cpu")).generator
    assert "<think>" not in plain.tokenizer.decode(plain.encoder.encode(record))
