"""`train --parallel fsdp`: the policy sharded over the ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`),
so that each rank holds 1/world of the frozen base model instead of all of it.

What is sharded, and why:
- each decoder layer is one FSDP unit, its frozen base weights and its LoRA weights together: gathered
  just before the layer runs (forward, the recomputation of gradient checkpointing, backward), freed after;
- the input embeddings are one more unit (gathered for the forward pass only: no gradient reaches them),
  and the decoder itself (its final norm) the outermost one;
- the output head stays whole on every rank (frozen, replicated). The chunked log-prob function
  (stages/train/logprobs.py) reads `head.weight` in its forward and again in its backward, and the
  float32 copy of a bf16 head (stages/core/precision.py) is made once from the whole weight and kept:
  a sharded head would have to be gathered around every micro-batch twice, and its float32 copy rebuilt
  each time. It is a small share of a large model (Llama-3-70B: 1.05 B of 70.6 B parameters). With tied
  embeddings (small models) the input embeddings are the head's tensor and stay whole with it.

Loading: rank 0 reads the weights into CPU memory; every other rank builds the model on the meta device
(no memory). After sharding, each tensor is broadcast from rank 0 and each rank keeps its shard, so no
GPU ever holds the whole model; rank 0 holds it in CPU memory until the broadcast is done.

Gradients: each rank sums its own micro-batches, then FSDP reduce-scatters each unit's LoRA gradients
after the backward of the step's last one (`gradient_sync`; the same sums in the same order as DDP's).
They are summed, not averaged (the loss denominators already count the whole batch on all ranks, as with
DDP's all-reduce), in float32: the LoRA weights and their gradients are float32 whatever the base's
dtype, so no mixed-precision policy is needed (each unit gathers its bf16 base weights as bf16 and its
LoRA as float32, and computes as the unsharded policy does).

Every forward pass is collective: all ranks run the same number of them. The update pads the ranks'
micro-batches to the same count (`policy_update` in stages/train/grpo.py).

Sampling with the live policy (the transformers engine) decodes one token per forward pass. Gathering
every layer for every token is what a sharded model costs per forward pass, and for a decode step it is
all of the work (measured on 2 CPU processes: a step 3.9x DDP's). So by default each round of sampling
gathers the whole model once, decodes with it like the unsharded policy (no collectives per token), and
frees it (`whole_while_sampling`; TRL gathers a ZeRO-3 model for generation the same way). Every rank then
holds the whole base while it samples: for a base that does not fit one device, `--no-gather-for-sampling`
keeps it sharded (the ranks decode in lockstep, stages/engines/transformers_engine.py), or rollouts come
from a vLLM server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from stages.core.errors import ModelError, UsageError
from stages.engines.transformers_engine import is_sharded  # every forward pass is then collective

if TYPE_CHECKING:
    from stages.core.models import ResolvedModel
    from stages.train.distributed import Distributed


def load_base(resolved: ResolvedModel, *, dtype: torch.dtype, ranks: Distributed, trust_remote_code: bool) -> Any:
    """The base model to shard: its weights on rank 0 (CPU memory), an empty copy on the meta device elsewhere."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.core.models import load_model, quiet_transformers

    if ranks.is_main:
        return load_model(resolved, device=torch.device("cpu"), dtype=dtype, trust_remote_code=trust_remote_code)
    quiet_transformers()
    config = AutoConfig.from_pretrained(
        resolved.path, local_files_only=resolved.local_files_only, trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def shard(model: Any, device: torch.device, ranks: Distributed) -> None:
    """Shard the PEFT-wrapped policy in place: every decoder layer and the decoder as FSDP units, the head
    whole; then fill every rank from rank 0's weights and align the ranks' random states on rank 0's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model()
    decoder = base.get_decoder()
    in_decoder = {id(p) for p in decoder.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in in_decoder]
    if outside:
        raise UsageError(f"--parallel fsdp trains LoRA weights inside the decoder only, not {outside[0]}")
    # kept whole: the head and, when tied to it, the input embeddings
    kept = {p for p in base.get_output_embeddings().parameters() if id(p) in in_decoder}
    # rank 0's full tensors, by name, before sharding replaces them (the other ranks have meta tensors)
    full = _named_tensors(model) if ranks.is_main else {}
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    # the input embeddings a unit of their own (gathered for the forward pass only: no gradient reaches them),
    # unless they are the head's tensor; the decoder's own unit (its final norm) comes last, around them all
    separate = [] if kept else [base.get_input_embeddings()]
    units = [fully_shard(module, mesh=mesh) for module in [*decoder_layers(base, decoder), *separate]]
    units.append(fully_shard(decoder, mesh=mesh, ignored_params=kept or None))
    for unit in units:
        # Summed, not averaged: the loss is normalised over the whole batch already. As a plain SUM
        # (a divide factor of 1 is otherwise a pre-multiplied sum, which gloo lacks).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    _materialise(model, device, ranks)
    _fill_from_rank0(model, full, device)
    full.clear()
    _same_random_state(device)


def decoder_layers(base: Any, decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of the decoder: the outermost modules of the classes transformers never splits
    across devices (`_no_split_modules`)."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers: dict[str, torch.nn.Module] = {}
    for path, module in decoder.named_modules():
        if type(module).__name__ in names and not any(path.startswith(f"{outer}.") for outer in layers):
            layers[path] = module
    if not layers:
        raise ModelError(f"{type(base).__name__}: --parallel fsdp cannot find its decoder layers (_no_split_modules)")
    return list(layers.values())


def _materialise(model: torch.nn.Module, device: torch.device, ranks: Distributed) -> None:
    """Give every tensor storage on `device`. Rank 0: the shards are there already (fully_shard moved them);
    the whole head moves from CPU memory. Other ranks: every tensor built on the meta device gets
    (uninitialised) memory, tied weights staying tied."""
    if ranks.is_main:
        for tensor in [*model.parameters(), *model.buffers()]:
            if not _is_dtensor(tensor) and tensor.device != device:
                tensor.data = tensor.data.to(device)
        return
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)  # FSDP units lay out their shards; to_empty gives each module its own tensor
    for (first, first_name), *others in owners.values():
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]


def _fill_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Every parameter and buffer (non-persistent ones too: rotary frequencies are computed, not loaded)
    broadcast from rank 0, one tensor at a time; each rank keeps its shard of a sharded one."""
    targets = _named_tensors(model)
    with torch.no_grad():
        for name, target in targets.items():
            shape, dtype = tuple(target.shape), target.dtype
            source = full.get(name)
            value = source.detach().to(device) if source is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(value, src=0)
            _copy_whole_into(target, value)


def _copy_whole_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """A whole tensor copied into `target`, or into this rank's part of it when it is sharded."""
    if _is_dtensor(target):
        target.to_local().copy_(shard_like(value, target).to_local())
    else:
        target.copy_(value)


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, in the same order on every rank, as tensors sharing their storage
    (not the parameters themselves: fully_shard moves a parameter to the GPU by replacing its data, and
    rank 0's whole CPU copy must stay where it is)."""
    named = {**dict(model.named_buffers()), **model.state_dict(keep_vars=True)}
    return {name: tensor.detach() for name, tensor in named.items()}


def _same_random_state(device: torch.device) -> None:
    """Rank 0 drew the LoRA weights as a single process would; every rank continues from its random state."""
    state = torch.get_rng_state().to(device)
    dist.broadcast(state, src=0)
    torch.set_rng_state(state.cpu())


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_like(value: torch.Tensor, like: Any) -> Any:
    """A whole tensor (the same on every rank) laid out as `like`: a DTensor keeps this rank's part (no
    communication); a plain tensor goes to its device."""
    from torch.distributed.tensor import distribute_tensor

    if not _is_dtensor(like):
        return value.to(like.device)
    return distribute_tensor(
        value.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None
    )


def whole(tensor: Any) -> torch.Tensor:
    """A DTensor gathered whole (collective: every rank calls it); a plain tensor as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def gathered_adapter(model: Any) -> dict[str, torch.Tensor] | None:
    """For a sharded policy, its LoRA weights gathered whole on rank 0's CPU, by parameter name (collective:
    every rank calls it; the others get {}); None for a policy that is not sharded (peft reads its own)."""
    if not is_sharded(model):
        return None
    main = dist.get_rank() == 0
    gathered = {}
    for name, param in model.named_parameters():  # the same order on every rank
        if param.requires_grad:
            value = whole(param.detach()).cpu()
            if main:
                gathered[name] = value
    return gathered


def load_adapter(model: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter tensors saved by peft (names without the adapter name) into a sharded policy."""
    adapter = getattr(model, "active_adapter", "default")
    trainable = {name.replace(f".{adapter}", ""): p for name, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(tensors):
        raise UsageError(f"{where}: the checkpoint's adapter does not fit this model/LoRA configuration")
    with torch.no_grad():
        for name, param in trainable.items():
            _copy_whole_into(param, tensors[name])


@contextmanager
def whole_while_sampling(model: Any) -> Iterator[None]:
    """Gather every FSDP unit of `model` once (collective), keep it whole through any number of forward
    passes, then free the gathered weights and restore resharding after each forward pass (the decoder, the
    outermost unit, keeps its weights between forward and backward, as fully_shard sets it by default)."""
    units = [module for module in model.modules() if is_fsdp(module)]  # outermost first
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for position, unit in enumerate(units):
            unit.reshard()
            unit.set_reshard_after_forward(position > 0, recurse=False)


def gradient_sync(model: Any, on: bool) -> None:
    """Whether the next backward pass reduce-scatters the gradients (off: each rank accumulates its own)."""
    for module in model.modules():
        if is_fsdp(module):
            module.set_requires_gradient_sync(on, recurse=False)


def gradient_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s total norm as a number (over sharded gradients it is a DTensor)."""
    return float(whole(norm))
