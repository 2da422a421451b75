"""Prefill: the prompts of a batch through the model's own forward pass, into the cache decoding starts from.

The start every prompt shares (a chat template's system turn) runs once, and the prompts go in groups of
at most PREFILL_TOKENS tokens, each padded to its own longest, so a large decode batch pads little and its
activations stay small (stages/engines/transformers_engine.py decodes from here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.engines.decoder import Decoder, StaticCache, prefilled

if TYPE_CHECKING:
    import torch

TokenRows = Sequence[Sequence[int]]  # one list of token ids per prompt


@dataclass(frozen=True)
class ModelForward:
    """How this model's own forward pass is called: its cache argument's name, whether it can compute the
    logits of the last position only, and the padding id."""

    model: Any
    cache_arg: str
    last_logits_only: bool
    pad_id: int

    def __call__(self, cache: Any, **inputs: Any) -> Any:
        extra = {"logits_to_keep": 1} if self.last_logits_only else {}
        return self.model(use_cache=True, **{self.cache_arg: cache}, **inputs, **extra)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Prompts as one left-padded batch: input ids, attention mask, position ids."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


def prefill(forward: ModelForward, prompts: Sequence[Sequence[int]], n: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One forward pass over the left-padded prompts. Returns the cache (one row per prompt), the next-token
    logits and the attention mask, those two with one row per sample (each prompt's row repeated n times)."""
    from transformers import DynamicCache

    input_ids, attention, positions = left_padded(prompts, forward.pad_id, next(forward.model.parameters()).device)
    cache = DynamicCache(config=forward.model.config)
    logits = forward(cache, input_ids=input_ids, attention_mask=attention, position_ids=positions).logits[:, -1, :]
    return cache, *_per_sample(logits, attention, n)


def _per_sample(logits: torch.Tensor, attention: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's next-token logits and attention mask, repeated for its n samples."""
    if n == 1:
        return logits, attention
    return logits.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)


# Prompt tokens (rows x longest prompt) per prefill pass of the decoder: prompts come longest first, so each
# pass pads little, and its activations stay small however large the decode batch is. 512: once the shared
# start is out, what is left of a prompt varies more in length (the demo's held-out set: 5 to 42 tokens), and
# 2,048 padded it to 1.84x its tokens (512: 1.19x); the held-out set prefills in 2.4-2.6 s instead of 3.9, the
# pool (1.29x -> 1.09x) in 8.1-8.8 s instead of 10.0-10.3, the answers byte-identical (2-core AMD EPYC).
PREFILL_TOKENS = 512

# Tokens every prompt of a batch must start with before they are prefilled once for all (a chat template's
# system turn: 24 of the demo's ~43 tokens per prompt); shorter shared starts are not worth a pass of their own.
SHARED_PREFIX_MIN = 8


def prefill_in_groups(
    forward: ModelForward, decoder: Decoder, prompts: TokenRows, n: int, new_tokens: int
) -> tuple[torch.Tensor, StaticCache, torch.Tensor]:
    """Prefill consecutive groups of prompts, each padded to its own longest prompt, into one cache for the
    whole batch (every row right-aligned). The start every prompt shares (a system turn) is prefilled once,
    and each group's prompts from where they differ. Returns the next-token logits, the cache and each
    row's next position, one row per sample."""
    import torch

    width = max(len(p) for p in prompts)
    shared = shared_start(prompts)
    prefix = _prefill_prefix(forward, prompts[0][:shared]) if shared else None
    rests = [p[shared:] for p in prompts]
    logits, static = [], None
    for start, stop in _prefill_groups(rests):
        if prefix is None:
            cache, group_logits, attention = prefill(forward, rests[start:stop], n)
        else:
            cache, group_logits, attention = _prefill_after(forward, prefix, rests[start:stop], n)
        keys, values = prefilled(cache)
        if n > 1:
            keys = [k.repeat_interleave(n, dim=0) for k in keys]
            values = [v.repeat_interleave(n, dim=0) for v in values]
        if static is None:
            shape = (len(keys), len(prompts) * n, keys[0].shape[1], keys[0].shape[3], width + new_tokens)
            static = StaticCache(shape, width, keys[0].dtype, keys[0].device)
        static.place(slice(start * n, stop * n), keys, values, attention)
        logits.append(group_logits)
    assert static is not None
    position = torch.tensor([len(p) for p in prompts for _ in range(n)], device=static.valid.device)
    return torch.cat(logits), static, position


def _prefill_groups(prompts: TokenRows) -> list[tuple[int, int]]:
    """Consecutive (start, stop) groups of at most PREFILL_TOKENS tokens once padded (one prompt at least)."""
    groups, start = [], 0
    while start < len(prompts):
        stop = start + 1
        while (
            stop < len(prompts)
            and (stop + 1 - start) * max(len(p) for p in prompts[start : stop + 1]) <= PREFILL_TOKENS
        ):
            stop += 1
        groups.append((start, stop))
        start = stop
    return groups


def shared_start(prompts: TokenRows) -> int:
    """How many tokens every prompt starts with, each keeping one of its own at least (its prefill gives the
    next-token logits); 0 for one prompt, or a shared start under SHARED_PREFIX_MIN."""
    if len(prompts) < 2:
        return 0
    first, shared = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        same = 0
        while same < shared and prompt[same] == first[same]:
            same += 1
        shared = same
    return shared if shared >= SHARED_PREFIX_MIN else 0


def _prefill_prefix(forward: ModelForward, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values of `prefix`, one row, at positions 0, 1, ..."""
    from transformers import DynamicCache

    cache = DynamicCache(config=forward.model.config)
    input_ids, attention, positions = left_padded([prefix], forward.pad_id, next(forward.model.parameters()).device)
    forward(cache, input_ids=input_ids, attention_mask=attention, position_ids=positions)
    return list(zip(*prefilled(cache)))


def _prefill_after(
    forward: ModelForward, prefix: list[tuple[torch.Tensor, torch.Tensor]], rests: TokenRows, n: int
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """`_prefill` of prompts that all start with the prefilled `prefix`, given the rest of each: the rests,
    left-padded, attend to the prefix's keys and values (copied to each row) as if they followed it, the
    padding between masked. The cache and attention mask cover prefix and rest."""
    import torch
    from transformers import DynamicCache

    input_ids, attention, positions = left_padded(rests, forward.pad_id, prefix[0][0].device)
    rows, shared = len(rests), prefix[0][0].shape[2]
    cache = DynamicCache(config=forward.model.config)
    for layer, (keys, values) in enumerate(prefix):
        cache.update(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(), layer)
    attention = torch.cat([attention.new_ones((rows, shared)), attention], dim=-1)
    logits = forward(cache, input_ids=input_ids, attention_mask=attention, position_ids=positions + shared).logits
    return cache, *_per_sample(logits[:, -1, :], attention, n)
