"""The `server` engine: sampling from an OpenAI-compatible server (vLLM's `api_server`) over HTTP.

Prompts go out as token ids and completions come back as token ids (`return_token_ids`, a vLLM
extension), so the trainer's tokenizer stays the single source of truth. Each sample is its own
`n=1` request with its own seed: a sample then depends only on (prompt, seed, adapter), not on what
else is in flight, and vLLM refuses `n > 1` for greedy sampling anyway.

What the server must be started with (checked on vLLM 0.32, see the project notes):
- `--logprobs-mode processed_logprobs`: otherwise the returned log-probs are of the raw logits, not of
  softmax(logits / temperature) that the Sample contract (and GRPO) needs;
- `--enable-lora --max-lora-rank R` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` for `set_adapter`;
- on CPU, `--no-enable-chunked-prefill`: a seeded request whose prompt is prefilled in chunks kills
  the CPU engine ("CPU Generator does not use offset").

Several servers of one model may stand behind one engine (`--server-url` repeated): each request goes
to one of them, and one that fails is left out while the others carry on (stages/engines/fleet.py).
Every request carries everything that decides its answer (prompt ids, seed, adapter name), so which
server answers does not change it.

Token ids are kept as the server returns them: vLLM includes the end-of-sequence token that stopped a
sample (finish_reason "stop"), which is the Sample convention. `finished` is finish_reason == "stop".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from stages.core.errors import ConfigError, UsageError
from stages.core.http import JsonClient, ServerError
from stages.core.models import adapter_rank
from stages.engines.base import AdapterRef, EngineOptions, EngineTarget, Sample, SamplingParams, lora_rank_slot
from stages.engines.fleet import ServerFleet, print_notice

T = TypeVar("T")
ENGINE_DIED_HINT = (
    " (the vLLM engine died; on CPU, seeded requests kill it unless the server runs with "
    "--no-enable-chunked-prefill: restart it with that flag)"
)


def rank_hint(rank: int | None) -> str:
    """The --max-lora-rank value that fits `rank` (vLLM accepts only a few values)."""
    if rank is None:
        return "a larger --max-lora-rank"
    return f"--max-lora-rank {lora_rank_slot(rank)}"


def _sample_from_choice(url: str, choice: dict[str, Any], greedy: bool) -> Sample:
    """A Sample from one /v1/completions choice; a reply without token ids is an error, not an empty sample."""
    token_ids = choice.get("token_ids")
    if not isinstance(token_ids, list):
        raise ServerError(
            url,
            "the reply has no token_ids: the server does not return token ids "
            "(vLLM does with return_token_ids); use the text-only mode",
        )
    finished = _finished(url, choice)
    if greedy:
        return Sample(list(token_ids), [0.0] * len(token_ids), finished)
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if not isinstance(logprobs, list) or len(logprobs) != len(token_ids) or None in logprobs:
        raise ServerError(url, f"the reply has {len(token_ids)} token ids but no matching token_logprobs")
    return Sample(list(token_ids), [float(x) for x in logprobs], finished)


def _finished(url: str, choice: dict[str, Any]) -> bool:
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise ServerError(url, f"unexpected finish_reason {reason!r}")
    return reason == "stop"


class ServerEngine:
    """Samples from one or several OpenAI-compatible servers serving the same model (see the module
    docstring for the flags they need, and stages/engines/fleet.py for spreading and failover)."""

    name = "server"
    samples_with_live_policy = False
    cache_bytes_per_token = None  # the server sizes its own cache

    def __init__(
        self,
        base_urls: str | Sequence[str],
        model: str | None = None,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 3,
        *,
        backoff: float = 0.5,
        stop_ids: set[int] | None = None,
        chat_only: bool = False,
        notice: Callable[[str], None] = print_notice,
    ) -> None:
        self.text_only = chat_only  # only /v1/chat/completions: text answers, no token ids
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)  # checked by EngineOptions
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ConfigError(f"the API key variable {api_key_env} is not set")
        clients = [JsonClient(url, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff) for url in urls]
        self.fleet = ServerFleet(clients, per_server=concurrency, notice=notice)
        self.stop_ids = sorted(stop_ids) if stop_ids else None
        self.base_model = self._choose_model(model)
        self.served = self.base_model  # the `model` field of requests: the base, or the loaded adapter
        self.adapter: AdapterRef | None = None
        self._pool = ThreadPoolExecutor(concurrency * len(clients), thread_name_prefix="bleuberi-server")

    # --- models -------------------------------------------------------------------------------------

    def _choose_model(self, model: str | None) -> str:
        """The model every server must list: `model`, else the one base model the first server lists."""
        listings = self.fleet.on_each(lambda client: (client, _models_on(client)))
        first, entries = listings[0]
        names = [m["id"] for m in entries]
        if model is not None and model not in names:
            raise ConfigError(
                f"{first.url('models')} does not list model {model!r}; it lists: {', '.join(names) or '(none)'}"
            )
        bases = [m["id"] for m in entries if not m.get("parent")]
        if model is None and len(bases) != 1:
            raise ConfigError(
                f"{first.url('models')} lists {len(bases)} base models "
                f"({', '.join(bases) or 'none'}): choose one with the server model option"
            )
        chosen = model if model is not None else bases[0]
        for client, other in listings[1:]:
            listed = [m["id"] for m in other]
            if chosen not in listed:
                raise ConfigError(
                    f"{client.url('models')} does not list model {chosen!r}, which {first.base_url} serves; it "
                    f"lists: {', '.join(listed) or '(none)'}; every server must serve the same model"
                )
        return chosen

    # --- sampling -----------------------------------------------------------------------------------

    def _run_all(self, jobs: list[Callable[[], T]]) -> list[T]:
        """Run jobs on the pool, in order; the first failure cancels what has not started and is raised."""
        futures: list[Future[T]] = [self._pool.submit(job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def sample(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        if self.text_only:
            raise UsageError(
                f"{self.fleet.first.url('chat/completions')} is used as a chat endpoint (text only, no token ids): "
                "fine for generate and eval, not for training"
            )
        if len(prompts) != len(seeds):
            raise ValueError("one list of seeds per prompt")
        jobs = [(prompt, seed) for prompt, row in zip(prompts, seeds) for seed in row]
        return _regroup(self._run_all([lambda p=p, s=s: self._complete(p, s, params) for p, s in jobs]), seeds)

    def _sampling_fields(self, seed: int, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "n": 1}
        if params.temperature > 0:  # a seed on greedy requests only risks the CPU seed crash
            body.update(seed=seed, top_p=params.top_p)
        return body

    def _complete(self, prompt: Sequence[int], seed: int, params: SamplingParams) -> Sample:
        body = {
            "model": self.served,
            "prompt": list(prompt),
            "return_token_ids": True,
            **self._sampling_fields(seed, params),
        }
        if params.temperature > 0:
            body["logprobs"] = 0  # the sampled token's log-prob only
        if self.stop_ids:
            body["stop_token_ids"] = self.stop_ids
        greedy = params.temperature == 0

        def on(client: JsonClient) -> Sample:
            reply = _post(client, "completions", body)
            return _sample_from_choice(client.url("completions"), _first_choice(client, reply), greedy)

        return self.fleet.call(on)

    def sample_messages(
        self, messages_list: Sequence[Sequence[dict[str, str]]], seeds: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        """Text-only mode for servers without token-id completions: /v1/chat/completions, the server's
        chat template. Samples carry `text` and no token ids or log-probs."""
        jobs = [(messages, seed) for messages, row in zip(messages_list, seeds) for seed in row]
        return _regroup(self._run_all([lambda m=m, s=s: self._chat(m, s, params) for m, s in jobs]), seeds)

    def _chat(self, messages: Sequence[dict[str, str]], seed: int, params: SamplingParams) -> Sample:
        body = {"model": self.served, "messages": list(messages), **self._sampling_fields(seed, params)}

        def on(client: JsonClient) -> Sample:
            reply = _post(client, "chat/completions", body)
            url = client.url("chat/completions")
            choice = _first_choice(client, reply, "chat/completions")
            content = (choice.get("message") or {}).get("content")
            if not isinstance(content, str):
                raise ServerError(url, "the reply has no message content")
            return Sample([], [], _finished(url, choice), text=content)

        return self.fleet.call(on)

    # --- adapters -----------------------------------------------------------------------------------

    def set_adapter(self, adapter: AdapterRef | None) -> None:
        """Load the new version on every live server, send later requests to it, then unload the
        previous version on each."""
        previous = self.adapter
        if adapter is not None and (previous is None or adapter.name != previous.name):
            self.fleet.on_each(lambda client: _load(client, adapter))
        self.adapter = adapter
        self.served = adapter.name if adapter is not None else self.base_model
        if previous is not None and (adapter is None or previous.name != adapter.name):
            self.fleet.on_each(lambda client: _unload(client, previous.name))

    def close(self) -> None:
        """Unload our adapter (best effort: a server may be gone) and stop the request threads."""
        if self.adapter is not None:
            for server in self.fleet.live:
                with contextlib.suppress(ServerError):  # the server may be gone
                    _unload(server.client, self.adapter.name)
            self.adapter, self.served = None, self.base_model
        self._pool.shutdown(wait=False, cancel_futures=True)


def _models_on(client: JsonClient) -> list[dict[str, Any]]:
    reply = client.call("GET", "models")
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list):
        raise ServerError(client.url("models"), "reply has no 'data' list")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _post(client: JsonClient, path: str, body: dict[str, Any]) -> Any:
    try:
        return client.call("POST", path, body)
    except ServerError as error:
        if error.status == 500 and "EngineCore" in error.body:  # a dead vLLM engine: that server is gone
            raise ServerError(
                error.url, error.cause + ENGINE_DIED_HINT, status=500, body=error.body, transient=True
            ) from None
        raise


def _load(client: JsonClient, adapter: AdapterRef) -> None:
    url = client.url("load_lora_adapter")
    try:
        client.call_text("POST", "load_lora_adapter", {"lora_name": adapter.name, "lora_path": str(adapter.path)})
    except ServerError as error:
        message = error.cause
        if "max_lora_rank" in message or "max-lora-rank" in message:
            rank = adapter_rank(adapter.path)
            raise ServerError(
                url,
                f"adapter {adapter.path} has rank {rank}, more than the server allows: "
                f"restart the server with {rank_hint(rank)}",
                status=error.status,
            ) from None
        if "already been loaded" in message:
            return  # same name, same version: names are never reused for other weights
        if error.status == 404 and "lora" not in error.body.lower():
            raise ServerError(
                url,
                "the server has no runtime LoRA loading: start it with --enable-lora and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1",
                status=404,
            ) from None
        if error.status == 404:
            raise ServerError(
                url,
                f"the server cannot read {adapter.path}: the adapter folder must exist at that "
                "path on the server's machine",
                status=404,
            ) from None
        raise


def _unload(client: JsonClient, name: str) -> None:
    try:
        client.call_text("POST", "unload_lora_adapter", {"lora_name": name})
    except ServerError as error:
        if error.status != 404:  # already gone is fine
            raise


# The HTTP client's retries on one server before it is left out (module values, so tests can shorten them).
RETRIES = 3
BACKOFF = 0.5


def start(options: EngineOptions, target: EngineTarget) -> ServerEngine:
    """A client of the servers `options` names; the adapter loaded on each if given."""
    engine = ServerEngine(
        options.server_url,
        model=options.server_model,
        api_key_env=options.api_key_env,
        concurrency=options.concurrency,
        retries=RETRIES,
        backoff=BACKOFF,
        stop_ids=target.stop_ids,
        chat_only=options.chat_only,
    )
    if target.adapter is not None:
        engine.set_adapter(AdapterRef.for_folder(target.adapter))
    return engine


def _regroup(flat: list[Sample], seeds: Sequence[Sequence[int]]) -> list[list[Sample]]:
    """One flat list of samples, request after request, back into one list per prompt."""
    out, start = [], 0
    for row in seeds:
        out.append(flat[start : start + len(row)])
        start += len(row)
    return out


def _first_choice(client: JsonClient, reply: Any, path: str = "completions") -> dict[str, Any]:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(client.url(path), "the reply has no choices")
    return choices[0]
