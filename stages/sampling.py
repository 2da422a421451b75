"""Batched sampling from a causal LM with a KV cache: the engine under `generate`, `train` and `eval`.

Why not `model.generate`? Three things it does not give us:
- one prefill per prompt for n samples (the KV cache is copied n ways afterwards, where
  `num_return_sequences` runs the prompt n times);
- a random stream per sample, seeded from (seed, record id, sample index), so a sample does not depend
  on which other prompts share its batch: a resumed run reproduces an uninterrupted one;
- the log-probability of every sampled token (under the temperature-scaled distribution that GRPO
  optimises), which the trainer reuses instead of a second forward pass.
Rows that have finished are dropped from the batch and the cache as they finish.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Sample:
    token_ids: list[int]  # the completion, up to and including the first end-of-sequence token
    logprobs: list[float]  # log p of each token under softmax(logits / temperature); 0.0 when greedy
    finished: bool  # True: ended by an end-of-sequence token; False: cut at max_new_tokens


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. run seed, record id, sample index), stable across runs."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if not ids:
        raise ValueError("the model and tokenizer define no end-of-sequence token")
    return ids


def _forward_parameters(model: PreTrainedModel) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # look through PEFT wrappers
    return set(inspect.signature(base.forward).parameters)


def _pick_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, and its log-probability under the temperature-scaled distribution."""
    import torch

    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = logprobs.exp()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token is always kept).
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = torch.stack(
        [torch.multinomial(probs[row], 1, generator=generators[row])[0] for row in range(probs.shape[0])]
    )
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def sample(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    stop_ids: set[int],
    pad_id: int,
) -> list[list[Sample]]:
    """Sample len(seeds[i]) completions for each tokenised prompt i. Returns samples[prompt][k].

    Prompts are left-padded into one batch; the caller chooses batch sizes (and sorts by length).
    """
    import torch
    from transformers import DynamicCache

    n = len(seeds[0])
    if any(len(s) != n for s in seeds) or len(seeds) != len(prompts):
        raise ValueError("seeds must give the same number of samples for every prompt")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    accepted = _forward_parameters(model)
    # transformers 5.x renamed `past_key_values` to `cache`; pass whichever this model takes.
    cache_arg = "cache" if "cache" in accepted else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                **{cache_arg: cache},
                **extra,
            )
            logits = out.logits[:, -1, :]
            if n > 1:  # one prefill per prompt, then n copies of its cache
                cache.batch_repeat_interleave(n)
                logits = logits.repeat_interleave(n, dim=0)
                attention = attention.repeat_interleave(n, dim=0)
            rows = logits.shape[0]
            generators = [torch.Generator(device=device).manual_seed(s) for seed_row in seeds for s in seed_row]
            next_position = attention.sum(-1)
            stop = torch.tensor(sorted(stop_ids), device=device)
            tokens: list[list[int]] = [[] for _ in range(rows)]
            logps: list[list[float]] = [[] for _ in range(rows)]
            finished = [False] * rows
            active = list(range(rows))  # original row of each row still in the batch
            for _ in range(params.max_new_tokens):
                picked, picked_logp = _pick_tokens(logits, params, [generators[r] for r in active])
                done = torch.isin(picked, stop)
                for i, (token, logp, is_done) in enumerate(zip(picked.tolist(), picked_logp.tolist(), done.tolist())):
                    row = active[i]
                    tokens[row].append(token)
                    logps[row].append(logp)
                    finished[row] = is_done
                keep = [i for i, is_done in enumerate(done.tolist()) if not is_done]
                if not keep:
                    break
                if len(keep) < len(active):  # drop finished rows from the batch and the cache
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    picked, attention, next_position = picked[index], attention[index], next_position[index]
                    active = [active[i] for i in keep]
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
                out = model(
                    input_ids=picked[:, None],
                    attention_mask=attention,
                    position_ids=next_position[:, None],
                    use_cache=True,
                    **{cache_arg: cache},
                )
                next_position = next_position + 1
                logits = out.logits[:, -1, :]
    finally:
        model.train(was_training)
    return [
        [Sample(tokens[p * n + k], logps[p * n + k], finished[p * n + k]) for k in range(n)]
        for p in range(len(prompts))
    ]
