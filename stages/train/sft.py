"""`--algo sft`: the paper's supervised baseline on the same data, loader, checkpoints and outputs.

One example per (prompt, reference) pair; the loss is the mean negative log-likelihood of the answer
tokens (the reference followed by the end-of-sequence token), never of the prompt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stages.engines.generator import Generator
from stages.train.config import TrainConfig
from stages.train.distributed import Distributed
from stages.train.logprobs import completion_logprobs, pack
from stages.train.rollout import TrainPrompt


@dataclass
class SftExample:
    record_id: str
    prompt_ids: list[int]
    answer_ids: list[int]


def sft_examples(prompts: list[TrainPrompt], generator: Generator, max_answer_length: int) -> list[SftExample]:
    eos = generator.tokenizer.eos_token_id
    examples = []
    for prompt in prompts:
        for reference in prompt.references:
            answer = generator.tokenizer(reference, add_special_tokens=False)["input_ids"] + [eos]
            examples.append(SftExample(prompt.record_id, prompt.ids, answer[:max_answer_length]))
    return examples


def sft_update(
    model: Any,
    trainable: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    examples: list[SftExample],
    *,
    config: TrainConfig,
    dist: Distributed,
    device: torch.device,
    pad_id: int,
    autocast: Callable[[], contextlib.AbstractContextManager[None]],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    local_tokens = sum(len(e.answer_ids) for e in examples)
    (global_tokens,) = dist.sum([float(local_tokens)], device)
    size = config.micro_batch or config.per_device_train_batch_size
    model.train()
    nll = 0.0
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        batch = pack([e.prompt_ids for e in chunk], [e.answer_ids for e in chunk], pad_id, device)
        with autocast():
            logp = completion_logprobs(model, batch, 1.0)
        loss = -(logp * batch.completion_mask).sum() / max(global_tokens, 1.0)
        loss.backward()
        nll += float(loss.detach())
    dist.sum_gradients(trainable)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (nll,) = dist.sum([nll], device)
    seconds = time.perf_counter() - t0
    return {
        "loss": round(nll, 6),
        "answer_tokens": int(global_tokens),
        "grad_norm": round(float(grad_norm), 6),
        "tokens_per_second": round(global_tokens / max(seconds, 1e-9), 1),
    }
