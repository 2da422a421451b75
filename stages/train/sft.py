"""`--algo sft`: the paper's supervised baseline on the same data, loader, checkpoints and outputs.

One example per (prompt, reference) pair; the loss is the mean negative log-likelihood of the answer
tokens (the reference followed by the end-of-sequence token), never of the prompt.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from stages.engines.generator import Generator
from stages.train.config import TrainConfig
from stages.train.data import SftExample, TrainPrompt
from stages.train.distributed import Distributed
from stages.train.logprobs import completion_logprobs, pack

if TYPE_CHECKING:
    from stages.train.policy import Policy


def sft_examples(prompts: list[TrainPrompt], generator: Generator, max_answer_length: int) -> list[SftExample]:
    """What SFT steps draw from: one example per (prompt, reference), each answer the reference's tokens and
    the end-of-sequence token, cut at `max_answer_length`."""
    eos = generator.tokenizer.eos_token_id
    examples = []
    for prompt in prompts:
        for reference in prompt.references:
            answer = generator.tokenizer(reference, add_special_tokens=False)["input_ids"] + [eos]
            examples.append(SftExample(prompt.record_id, prompt.ids, answer[:max_answer_length]))
    return examples


def sft_update(policy: Policy, examples: list[SftExample], *, config: TrainConfig, dist: Distributed) -> dict[str, Any]:
    """One optimizer step on this rank's `examples`: the answer tokens' mean negative log-likelihood over
    every rank, one forward and backward pass per micro-batch; returns the step's metrics."""
    t0 = time.perf_counter()
    device = policy.device
    local_tokens = sum(len(e.answer_ids) for e in examples)
    (global_tokens,) = dist.sum([float(local_tokens)], device)
    size = config.micro_batch or config.per_device_train_batch_size
    policy.model.train()
    nll = 0.0
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        batch = pack([e.prompt_ids for e in chunk], [e.answer_ids for e in chunk], policy.generator.pad_id, device)
        with policy.autocast():
            logp = completion_logprobs(policy.model, batch, 1.0)
        loss = -(logp * batch.completion_mask).sum() / max(global_tokens, 1.0)
        policy.backward(loss, last=start + size >= len(examples))
        nll += float(loss.detach())
    grad_norm = policy.apply_gradients(dist, config.max_grad_norm)
    (nll,) = dist.sum([nll], device)
    seconds = time.perf_counter() - t0
    return {
        "loss": round(nll, 6),
        "answer_tokens": int(global_tokens),
        "grad_norm": round(grad_norm, 6),
        "tokens_per_second": round(global_tokens / max(seconds, 1e-9), 1),
    }
