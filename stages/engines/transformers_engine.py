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

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stages.core.errors import UsageError
from stages.engines.base import AdapterRef, EngineOptions, EngineTarget, Sample, SamplingParams
from stages.engines.decoder import Decoder, StaticCache
from stages.engines.prefill import ModelForward, TokenRows, prefill, prefill_in_groups

SeedRows = Sequence[Sequence[int]]  # seeds[i][k]: the seed of prompt i's k-th sample

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def _forward_parameters(model: PreTrainedModel) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # look through PEFT wrappers
    return set(inspect.signature(base.forward).parameters)


def cache_keyword(model: PreTrainedModel) -> str:
    """The name `model.forward` takes its KV cache by: `cache` from transformers 5.24 (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _pick_tokens(
    logits: torch.Tensor, sampling: SamplingParams, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, and its log-probability under the temperature-scaled distribution. Each row's token
    is where its own uniform number (`uniforms`, one per row, from that row's random stream) falls in the
    cumulative distribution: no per-row work, and a row's token depends on its stream alone."""
    import torch

    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    probs = logprobs.exp()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token is always kept).
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    assert uniforms is not None
    cumulative = probs.cumsum(dim=-1)
    where = uniforms[:, None].to(cumulative.dtype) * cumulative[:, -1:]  # the mass kept need not sum to 1
    tokens = torch.searchsorted(cumulative, where, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _uniforms(seeds: SeedRows, steps: int, device: torch.device) -> torch.Tensor:
    """(rows, steps) uniform numbers in [0, 1): row r's from its own generator, seeded from seeds (one row per
    sample, prompt by prompt), drawn once per batch instead of once per row and step."""
    import torch

    rows = []
    for seed_row in seeds:
        for seed in seed_row:
            generator = torch.Generator(device=device).manual_seed(seed)
            rows.append(torch.rand(steps, generator=generator, device=device, dtype=torch.float64))
    return torch.stack(rows)


class _DecodeState:
    """What each row (one per sample) has produced: its tokens and their log-probs, and whether it stopped, kept
    in tensors so a step records every row at once."""

    def __init__(self, rows: int, steps: int, device: torch.device) -> None:
        import torch

        self.tokens = torch.zeros((rows, max(steps, 1)), dtype=torch.long, device=device)
        self.logps = torch.zeros((rows, max(steps, 1)), dtype=torch.float32, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.active = torch.arange(rows, device=device)  # original row of each row still in the batch
        self.running = torch.ones(rows, dtype=torch.bool, device=device)  # which of those still decode

    def record(self, step: int, picked: torch.Tensor, logp: torch.Tensor, stop: torch.Tensor) -> bool:
        """One token for each running row; whether any row still runs (one host sync per step)."""
        import torch

        rows = self.active[self.running]
        self.tokens[rows, step] = picked[self.running]
        self.logps[rows, step] = logp[self.running]
        self.count[rows] += 1
        ends = torch.isin(picked, stop) & self.running
        self.stopped[self.active[ends]] = True
        self.running &= ~ends
        return bool(self.running.any())

    def samples(self, n: int) -> list[list[Sample]]:
        tokens, logps, counts, stopped = (
            self.tokens.tolist(),
            self.logps.tolist(),
            self.count.tolist(),
            self.stopped.tolist(),
        )
        rows = [Sample(tokens[r][: counts[r]], logps[r][: counts[r]], stopped[r]) for r in range(len(counts))]
        return [rows[p * n : (p + 1) * n] for p in range(len(rows) // n)]


def sample(
    model: PreTrainedModel,
    prompts: TokenRows,
    seeds: SeedRows,
    sampling: SamplingParams,
    *,
    stop_ids: set[int],
    pad_id: int,
) -> list[list[Sample]]:
    """Sample len(seeds[i]) completions for each tokenised prompt i. Returns samples[prompt][k].

    Prompts are left-padded into one batch; the caller chooses batch sizes (and sorts by length).
    """
    n = len(seeds[0])
    if any(len(s) != n for s in seeds) or len(seeds) != len(prompts):
        raise ValueError("seeds must give the same number of samples for every prompt")
    from stages.core.precision import float32_logits

    was_training = model.training
    model.eval()
    try:
        forward = ModelForward(model, cache_keyword(model), "logits_to_keep" in _forward_parameters(model), pad_id)
        with float32_logits(model):  # as the trainer computes them (stages/core/precision.py)
            state = _decode(forward, prompts, seeds, sampling, stop_ids)
    finally:
        model.train(was_training)
    return state.samples(n)


def _decode(
    forward: ModelForward, prompts: TokenRows, seeds: SeedRows, sampling: SamplingParams, stop_ids: set[int]
) -> _DecodeState:
    """One prefill per prompt, its cache shared by its n samples, then token by token until every row stops:
    through the Llama-family decoder (stages/engines/decoder.py) where the model is one, else through the
    model's own forward."""
    import torch

    model = forward.model
    device = next(model.parameters()).device
    fsdp = is_sharded(model)
    n = len(seeds[0])
    decoder = None if fsdp else Decoder.of(model, max(len(p) for p in prompts) + sampling.max_new_tokens)
    # FSDP keeps the weights it gathers in buffers it reuses for training: no inference tensors then
    with torch.no_grad() if fsdp else torch.inference_mode():
        uniforms = None if sampling.temperature == 0 else _uniforms(seeds, sampling.max_new_tokens, device)
        state = _DecodeState(len(prompts) * n, sampling.max_new_tokens, device)
        stop = torch.tensor(sorted(stop_ids), device=device)
        if decoder is not None:
            logits, static, position = prefill_in_groups(forward, decoder, prompts, n, sampling.max_new_tokens)
            _decoder_loop(decoder, static, logits, position, uniforms, state, stop, sampling)
        else:
            cache, logits, attention = prefill(forward, prompts, n)
            _forward_loop(forward, cache, logits, attention, n, uniforms, state, stop, sampling)
    return state


def _decoder_loop(
    decoder: Decoder,
    static: StaticCache,
    logits: torch.Tensor,
    position: torch.Tensor,
    uniforms: torch.Tensor | None,
    state: _DecodeState,
    stop: torch.Tensor,
    sampling: SamplingParams,
) -> None:
    """Decode steps through `decoder`, on a cache written in place; finished rows leave the batch in groups
    (a copy of the cache), once a quarter of it has finished."""
    matmuls = decoder.matmuls()
    for step in range(sampling.max_new_tokens):
        picked, logp = _pick_tokens(logits, sampling, None if uniforms is None else uniforms[state.active, step])
        if not state.record(step, picked, logp, stop) or step + 1 == sampling.max_new_tokens:
            return
        if int(state.running.sum()) <= 0.75 * len(state.running):  # drop finished rows from batch and cache
            keep = state.running.nonzero()[:, 0]
            static.keep(keep)
            picked, position = picked[keep], position[keep]
            state.active, state.running = state.active[keep], state.running[keep]
        logits = decoder.head(decoder.step(picked, position, static, matmuls))
        position = position + 1


def _forward_loop(
    forward: ModelForward,
    cache: Any,
    logits: torch.Tensor,
    attention: torch.Tensor,
    n: int,
    uniforms: torch.Tensor | None,
    state: _DecodeState,
    stop: torch.Tensor,
    sampling: SamplingParams,
) -> None:
    """Decode steps through the model's forward on its own cache, for any architecture (and in lockstep with
    the other ranks when the model is sharded); finished rows leave the batch and the cache as they finish."""
    import torch
    import torch.distributed as dist

    if n > 1:
        cache.batch_repeat_interleave(n)
    model = forward.model
    lockstep = _Lockstep(model, forward.pad_id) if _holds_shards_now(model) and dist.get_world_size() > 1 else None
    position = attention.sum(-1)
    for step in range(sampling.max_new_tokens):
        picked, logp = _pick_tokens(logits, sampling, None if uniforms is None else uniforms[state.active, step])
        if not state.record(step, picked, logp, stop) or step + 1 == sampling.max_new_tokens:
            break
        if not bool(state.running.all()):
            keep = state.running.nonzero()[:, 0]
            cache.batch_select_indices(keep)
            picked, attention, position = picked[keep], attention[keep], position[keep]
            state.active, state.running = state.active[keep], state.running[keep]
        attention = torch.cat([attention, attention.new_ones((len(state.active), 1))], dim=-1)
        if lockstep:
            lockstep.busy(True)
        out = model(
            input_ids=picked[:, None],
            attention_mask=attention,
            position_ids=position[:, None],
            use_cache=True,
            **{forward.cache_arg: cache},
        )
        position = position + 1
        logits = out.logits[:, -1, :]
    if lockstep:
        lockstep.wait_for_others()


def _holds_shards_now(model: PreTrainedModel) -> bool:
    """Sharded by FSDP and holding shards now (not gathered whole for sampling: stages/train/sharding.py)."""
    return is_sharded(model) and _holds_shards(model)


class _Lockstep:
    """A model sharded over ranks (FSDP) gathers each layer's weights from every rank in each forward pass,
    so all ranks must run the same number of them, while each decodes its own prompts, which stop after
    different numbers of tokens. Before each decode step every rank says whether it still has rows; a rank
    that has none runs a one-token forward pass with no cache for as long as another rank decodes."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        import torch

        self.model = model
        self.device = next(model.parameters()).device
        self.idle_input = torch.full((1, 1), pad_id, dtype=torch.long, device=self.device)

    def busy(self, here: bool) -> bool:
        """Whether any rank still decodes (every rank calls this once per decode step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(here)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def wait_for_others(self) -> None:
        while self.busy(False):
            self.model(input_ids=self.idle_input, use_cache=False)


def is_sharded(model: PreTrainedModel) -> bool:
    """Whether parts of the model are FSDP units (`train --parallel fsdp`; stages/train/sharding.py)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _holds_shards(model: PreTrainedModel) -> bool:
    """Whether some of the model's weights are shards now (each forward pass gathers them: collective)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class TransformersEngine:
    """Samples with a transformers model held in this process: the reference engine.

    In training the model is the live policy (the PEFT-wrapped model), so it always samples with the
    newest adapter weights and `set_adapter` has nothing to do. Started for generate or eval, it holds
    the model with its adapter (merged into the weights in float32; see `start`).
    """

    name = "transformers"
    samples_with_live_policy = True
    text_only = False

    def __init__(self, model: PreTrainedModel, *, stop_ids: set[int], pad_id: int) -> None:
        self.model = model
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.cache_bytes_per_token = cache_bytes_per_token(model)

    def sample(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        return sample(self.model, prompts, seeds, sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)

    def sample_messages(
        self, turns: Sequence[Sequence[dict[str, str]]], seeds: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Sample]]:
        raise UsageError("the transformers engine samples token ids; chat turns are encoded by the Generator")

    def set_adapter(self, adapter: AdapterRef | None) -> None:
        pass

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def cache_bytes_per_token(model: PreTrainedModel) -> int | None:
    """What one token of a batch adds to the key/value cache: each layer's keys and values, in the dtype the
    projections give them (float32 under bleuberi's precision policy, whatever the weights' dtype). None when
    the config does not say (a batch is then sized by rows only)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    weights = next(base.parameters()).dtype
    hooked = any(getattr(m, "_bleuberi_float32_activations", False) for m in base.modules())
    size = 4 if weights == torch.float32 or hooked else torch.finfo(weights).bits // 8
    return 2 * layers * kv_heads * head_dim * size


def start(options: EngineOptions, target: EngineTarget) -> TransformersEngine:
    """The trainer's live policy when there is one; else the model loaded here with its adapter.

    In float32 the adapter is merged into the weights (plain matmuls while sampling). In bf16/fp16 it is
    not: merged, `W + BA` is rounded to the weights' precision, and a trained adapter's update is below
    half an ulp in most entries (the demo's adapter merged in bf16: 36% of the entries change, the update
    is off by 61%, the model moves 7-10% less than in float32). It stays a LoRA instead, under the
    trainer's precision policy (float32 activations between the matmuls), with or without an adapter, so
    an eval's base and trained systems are computed the same way as each other and as the policy that
    was trained (the casts cost a bf16 greedy decode on a 2-core CPU 10%)."""
    import torch

    from stages.core.models import attach_adapter, load_model, resolve_device, resolve_dtype
    from stages.core.precision import float32_activations

    model = target.live_policy
    if model is None:
        device = resolve_device(target.device)
        dtype = resolve_dtype(target.dtype, device)
        model = load_model(target.model, device=device, dtype=dtype, trust_remote_code=target.trust_remote_code)
        if target.adapter is not None:
            model = attach_adapter(model, str(target.adapter), merge=dtype == torch.float32)
        float32_activations(model)  # nothing to do in float32
    return TransformersEngine(model, stop_ids=target.stop_ids, pad_id=target.pad_id)
