"""GRPO with rollouts from an engine of its own: adapter-only sync per step, async rollouts, the base check.

The engine here is a second copy of the base model that reads each adapter the trainer publishes from
disk, as vLLM does: the trainer's side of the contract is tested fast and exactly, without vLLM.
(tests/test_engine_vllm_real.py runs the real vLLM server.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.core.errors import ModelError, UsageError
from stages.engines.base import ENGINES, AdapterRef, EngineOptions, EngineSpec, EngineTarget, Sample, SamplingParams
from stages.engines.transformers_engine import sample
from stages.train.config import TrainConfig
from stages.train.loop import train
from tests.conftest import demo_records, small_train_config


class FileSyncedEngine:
    """A separate model that samples with whatever adapter folder it was last pointed at."""

    name = "file-synced"
    samples_with_live_policy = False  # an engine of its own: it holds the base model, gets adapters
    text_only = False

    def __init__(self, model_path: str, stop_ids: set[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.stop_ids = stop_ids
        self.adapter: AdapterRef | None = None
        self.calls: list[int | None] = []  # the adapter version each sampling call used
        self.loaded: list[str] = []

    def sample(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        self.calls.append(self.adapter.version if self.adapter else None)
        return sample(self.model, prompts, seeds, sampling, stop_ids=self.stop_ids, pad_id=min(self.stop_ids))

    def set_adapter(self, adapter: AdapterRef | None) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        assert adapter is not None and adapter.name not in self.loaded, "an adapter name was reused"
        if self.adapter is None:  # the first version: wrap the base model, as vLLM adds a LoRA slot
            self.model = PeftModel.from_pretrained(self.model, str(adapter.path))
        else:
            set_peft_model_state_dict(self.model, load_file(str(adapter.path / "adapter_model.safetensors")))
        self.loaded.append(adapter.name)
        self.adapter = adapter

    def sample_messages(self, turns, seeds, sampling):
        raise AssertionError("training never sends chat turns")

    def close(self) -> None:
        pass


def register(monkeypatch, start) -> None:
    """Add an engine to the registry, as a new engine module would: one entry."""
    monkeypatch.setitem(ENGINES, FileSyncedEngine.name, EngineSpec(start, samples_with_live_policy=False))


@pytest.fixture
def engines(monkeypatch, tiny_model) -> list[FileSyncedEngine]:
    """Every engine the trainer asks for is a FileSyncedEngine on the tiny model."""
    made: list[FileSyncedEngine] = []

    def start(options: EngineOptions, target: EngineTarget) -> FileSyncedEngine:
        made.append(FileSyncedEngine(target.model.path, target.stop_ids))
        return made[-1]

    register(monkeypatch, start)
    return made


def own_engine() -> EngineOptions:
    """Options naming the FileSyncedEngine (valid once it is registered)."""
    return EngineOptions(FileSyncedEngine.name)


def config(model: Path, **overrides) -> TrainConfig:
    """tests/test_train.py's small run, smaller: G=2, 6 tokens, a large lr (engines must see the update)."""
    settings = {"device": "cpu", "num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 6}
    return small_train_config(model, **{**settings, "learning_rate": 5e-2, "save_steps": 100, **overrides})


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_each_step_samples_with_the_adapter_of_the_step_before(engines, tiny_model, tmp_path) -> None:
    records = demo_records("pool", 4)
    exact = config(tiny_model, engine=own_engine(), vllm_importance_sampling_correction=False)
    result = train(records, exact, tmp_path / "engine")
    [engine] = engines
    # The probe (base model, no adapter), then steps 1..3 with the adapters after steps 0, 1, 2.
    assert engine.calls == [None, 0, 1, 2]
    assert len(engine.loaded) == 4 and len(set(engine.loaded)) == 4  # a new name per version (3 + final)
    # Same seeds, same weights read back from disk: exactly the run whose rollouts came from the policy itself.
    train(records, config(tiny_model), tmp_path / "policy")
    ours, theirs = adapter(tmp_path / "engine"), adapter(tmp_path / "policy")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(step["logprob_drift_max"] < 1e-4 for step in result.metrics)
    assert not (tmp_path / "engine" / "engine-adapters").exists()  # the sync folders are cleaned up
    # by default an engine of its own gets the importance correction: against an engine this exact its
    # weights are 1 to the drift (< 1e-4), so the adapter is the same but for that: Adam's normalised
    # steps carry a relative change of the gradient of 1e-4 into the weights at about that size
    corrected = train(records, config(tiny_model, engine=own_engine()), tmp_path / "corrected")
    assert all(step["mismatch_kl"] < 1e-8 and step["mismatch_clip_fraction"] == 0 for step in corrected.metrics)
    near = adapter(tmp_path / "corrected")
    scale = max(float(t.abs().max()) for t in theirs.values())
    assert all(torch.allclose(near[k], theirs[k], rtol=0, atol=1e-3 * scale) for k in near)


def test_async_rollouts_are_one_step_stale(engines, tiny_model, tmp_path) -> None:
    records = demo_records("pool", 6)
    # chrF: a random model's samples differ in reward, so every step updates the adapter the next one samples from
    settings = config(tiny_model, engine=own_engine(), async_rollouts=True, max_steps=4, reward=["chrf"])
    result = train(records, settings, tmp_path / "run")
    [engine] = engines
    # Step 1 samples now (adapter 0); step 2 was sampled during step 1 with adapter 0; step 3 during
    # step 2 with adapter 1; step 4 during step 3 with adapter 2: never more than one step behind.
    assert engine.calls == [None, 0, 0, 1, 2]
    assert len(result.metrics) == 4
    # Off-policy samples: the stale sampler's log-probs drift from the trainer's own (the ratio's old policy).
    assert any(step["logprob_drift_max"] > 1e-4 for step in result.metrics[1:])


def test_an_engine_serving_another_model_is_refused(monkeypatch, tiny_model, tmp_path) -> None:
    from tests.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=7)

    register(monkeypatch, lambda options, target: FileSyncedEngine(str(other), target.stop_ids))
    with pytest.raises(ModelError, match="does not serve the trainer's base model"):
        train(demo_records("pool", 2), config(tiny_model, engine=own_engine()), tmp_path / "run")


def test_async_rollouts_need_an_engine_of_their_own(tiny_model) -> None:
    with pytest.raises(UsageError, match="async_rollouts needs an engine of its own"):
        config(tiny_model, async_rollouts=True)


def test_nucleus_sampling_refuses_a_behaviour_policy_from_the_engine(tiny_model) -> None:
    for option in ({"async_rollouts": True}, {"vllm_importance_sampling_correction": True}):
        with pytest.raises(UsageError, match="vLLM renormalises its log-probs over the nucleus"):
            config(tiny_model, engine=EngineOptions("vllm"), top_p=0.9, **option)
        config(tiny_model, engine=EngineOptions("vllm"), top_p=1.0, **option)  # the full distribution: allowed
    config(tiny_model, engine=EngineOptions("vllm"), top_p=0.9)  # on-policy: the loss never uses the engine's log-probs


def test_engine_importance_weights_follow_trls_modes() -> None:
    from stages.train.loss import engine_importance_weights, engine_log_ratio

    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-2.5, -2.0, -0.25]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    log_ratio = engine_log_ratio(trainer, engine, mask)
    assert log_ratio.tolist() == [[1.5, 0.0, 0.0]]  # the masked token counts nowhere
    # per token: exp(1.5) = 4.48 (over the cap 3), exp(0) = 1, masked token: exp(0) = 1
    truncated = engine_importance_weights(log_ratio, "token_truncate", 3.0)
    assert torch.allclose(truncated.weights, torch.tensor([[3.0, 1.0, 1.0]]))
    assert truncated.capped().tolist() == [[True, False, False]]  # the ratio the cap changed
    masked = engine_importance_weights(log_ratio, "token_mask", 3.0)
    assert torch.allclose(masked.weights, torch.tensor([[0.0, 1.0, 1.0]]))
    # per sequence: exp(1.5 + 0) = 4.48 -> 3 (truncate) or 0 (mask), one weight for the row
    sequence = engine_importance_weights(log_ratio, "sequence_truncate", 3.0)
    assert torch.allclose(sequence.weights, torch.tensor([[3.0]])) and sequence.per_sequence
    kept = engine_importance_weights(log_ratio, "sequence_mask", 5.0)
    assert torch.allclose(kept.weights, torch.tensor([[4.4817]]), atol=1e-4) and not kept.capped().any()


def test_rewards_under_several_ranks_need_no_model_in_the_engine(tiny_model) -> None:
    """With an engine of its own (vLLM, a server) the generator holds no model: the ranks' agreement on reward
    errors and the batch std run on the policy's device, not on the engine's model."""
    from transformers import AutoTokenizer

    from stages.engines.generator import Generator
    from stages.score import Scorer
    from stages.train.data import TrainPrompt
    from stages.train.distributed import Distributed
    from stages.train.grpo import score_rollout

    class TwoRanks(Distributed):  # this rank's numbers stand for both ranks' (each has the same ones)
        def sum(self, values, device):
            assert device == torch.device("cpu")
            return [2 * v for v in values]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    engine = FileSyncedEngine(str(tiny_model), {tokenizer.eos_token_id})
    generator = Generator(tokenizer, engine, {tokenizer.eos_token_id})
    with pytest.raises(UsageError):
        generator.model  # noqa: B018 - an engine of its own: no model here
    ids = tokenizer.encode("The cat sat on the mat.", add_special_tokens=False)
    samples = [Sample(ids, [0.0] * len(ids), True), Sample(ids[:3], [0.0] * 3, False)]
    prompts = [TrainPrompt("a", ids, ["The cat sat on the mat."])]
    rollout = score_rollout(
        generator, Scorer(["bleu"]), prompts, samples, group_size=2, scale_rewards="batch", skip_zero_std=False,
        dist=TwoRanks(rank=0, world_size=2), device=torch.device("cpu"),
    )  # fmt: skip
    assert rollout.rewards[0] == pytest.approx(1.0) and rollout.advantages[0] > 0 > rollout.advantages[1]
