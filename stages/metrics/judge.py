"""`judge-url:URL[#MODEL]`: an LLM judge behind an OpenAI-compatible chat endpoint grades each completion
against the record's references, a score on 0..1 (the rung between BLEU and a reward model).

URL is the endpoint's base (`http://127.0.0.1:8000/v1`); `#MODEL` the served model, else the one base
model `/models` lists. One chat request per completion: the template (stages/metrics/judge_prompt.py)
filled with the prompt, the references and the completion; the reply's grade N on LOW..HIGH becomes
(N - LOW) / (HIGH - LOW). A reply without a readable grade is a null, never a 0: counted, the first few
shown on stderr, and handled as a `py:` reward's None (an error in `eval`, which needs every answer).
Settings come from $BLEUBERI_JUDGE_* (docs/rewards.md). Requests go through the one HTTP client
(stages/core/http.py: retries with backoff, timeouts, no redirects, the key to its own host only), at
most CONCURRENCY at once; replies are cached on disk, keyed by everything that changes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.core.errors import BleuberiError, ConfigError, UsageError
from stages.core.http import JsonClient, ServerError
from stages.core.preflight import Needs
from stages.metrics.base import Batch, BatchMetric, Usage
from stages.metrics.judge_prompt import Template, instruction_text, load_template, parse_score, references_text

ENV = "BLEUBERI_JUDGE_"
NULLS_SHOWN = 3  # replies without a score shown on stderr per judge; the rest are counted


class JudgeError(BleuberiError):
    """A judge that cannot be used: it does not serve the model, or its replies left answers unscored in eval."""


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge is asked, from $BLEUBERI_JUDGE_* (docs/rewards.md); every field has a default."""

    key: str | None = None
    template: str | None = None  # a file; None: the default template
    references: Literal["all", "first"] = "all"
    format: Literal["text", "json"] = "text"  # json: the server must answer {"score": N} (structured outputs)
    low: float = 0.0
    high: float = 10.0
    temperature: float = 0.0
    max_tokens: int = 32
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 3
    cache: str | None = None  # a folder; None: $BLEUBERI_CACHE/judge-url; "off": no cache

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JudgeSettings:
        env = {k[len(ENV) :]: v for k, v in (os.environ if environ is None else environ).items() if k.startswith(ENV)}
        references = env.get("REFERENCES", "all")
        if references not in ("all", "first"):
            raise ConfigError(f"${ENV}REFERENCES must be all or first, got {references!r}")
        reply_format = env.get("FORMAT", "text")
        if reply_format not in ("text", "json"):
            raise ConfigError(f"${ENV}FORMAT must be text or json, got {reply_format!r}")
        low, high = _scale(env.get("SCALE", "0..10"))
        return cls(
            key=env.get("KEY") or None,
            template=env.get("TEMPLATE") or None,
            references=references,  # type: ignore[arg-type]
            format=reply_format,  # type: ignore[arg-type]
            low=low,
            high=high,
            temperature=_number(env, "TEMPERATURE", 0.0, float, 0),
            max_tokens=_number(env, "MAX_TOKENS", 32, int, 1),
            concurrency=_number(env, "CONCURRENCY", 8, int, 1),
            timeout=_number(env, "TIMEOUT", 60.0, float, 0.001),
            retries=_number(env, "RETRIES", 3, int, 0),
            cache=env.get("CACHE") or None,
        )


def _number(env: Mapping[str, str], name: str, default: Any, kind: type, minimum: float) -> Any:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # also NaN
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"${ENV}{name} must be {what} >= {minimum:g}, got {text!r}")
    return value


def _scale(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("..")
    try:
        ends = (float(low), float(high)) if sep else None
    except ValueError:
        ends = None
    if ends is None or not ends[0] < ends[1]:
        raise ConfigError(f"${ENV}SCALE must be LOW..HIGH with LOW < HIGH (e.g. 0..10, 1..5), got {text!r}")
    return ends


def split_target(argument: str) -> tuple[str, str | None]:
    """`http://h:8000/v1#smol` -> (`http://h:8000/v1`, `smol`); a `/chat/completions` URL is cut to its base."""
    url, _, model = argument.partition("#")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"judge-url needs an http(s) URL: judge-url:URL[#MODEL][:WEIGHT], got {argument!r}")
    if not parts.path.strip("/"):
        raise UsageError(
            f"judge-url:{argument}: give the endpoint's base URL with its path (e.g. http://host:8000/v1); a "
            "trailing :NUMBER is read as the weight, so a port must be followed by a path"
        )
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    return base, model or None


def probe(argument: str) -> None:
    """Preflight: the endpoint answers and serves the judge's model (one line naming the URL if not)."""
    JudgeReward(argument).served()


class ReplyCache:
    """Judge replies on disk, one JSON file per request key (never pickle); no folder: no cache. A cache that
    cannot be written is said once and left off: the grades still come, only a rerun asks again."""

    def __init__(self, folder: Path | None, notice: Callable[[str], None]) -> None:
        self.folder, self.notice = folder, notice
        self._lock = threading.Lock()  # replies are written from the request threads

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if self.folder is None:
            return None
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, or unreadable: asked again and written anew
            return None
        reply = data.get("reply") if isinstance(data, dict) else None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, reply: str, request: dict[str, Any]) -> None:
        folder = self.folder
        if folder is None:
            return
        from stages.core.files import atomic_path

        try:
            with atomic_path(self.path(key)) as tmp:
                tmp.write_text(json.dumps({"reply": reply, "request": request}), encoding="utf-8")
        except (OSError, BleuberiError) as error:  # BleuberiError: WriteFailed, a full disk
            with self._lock:
                said, self.folder = self.folder is None, None
            if not said:
                self.notice(f"the judge's cache {folder} cannot be written ({error}); going on without it")


def print_notice(message: str) -> None:
    sys.stderr.write(f"bleuberi: warning: {message}\n")  # stdout carries only records


class JudgeReward(BatchMetric):
    name = "judge-url"
    argument = "URL[#MODEL]"
    description = "LLM judge behind an OpenAI-compatible chat endpoint, given the references: its grade, 0..1"
    argument_names = "servers"
    needs_prompt = True  # the judge reads the instruction
    in_process = True  # holds a connection pool: never copied into `score --jobs` workers
    prefetches = True
    scale = (0.0, 1.0)

    @classmethod
    def needs(cls, argument: str | None) -> Needs:
        if not argument:
            return Needs()
        return Needs(servers=(split_target(argument)[0],), probes=(functools.partial(probe, argument),))

    def __init__(
        self,
        argument: str | None = None,
        *,
        device: str = "auto",
        settings: JudgeSettings | None = None,
        backoff: float = 0.5,
        notice: Callable[[str], None] = print_notice,
    ) -> None:
        if not argument:
            raise UsageError("judge-url needs an endpoint: judge-url:URL[#MODEL] (e.g. http://127.0.0.1:8000/v1)")
        self.base_url, self.model = split_target(argument)
        self.name = f"judge-url:{argument}"  # type: ignore[misc]
        self.settings = settings or JudgeSettings.from_env()
        self.template: Template = load_template(self.settings.template)
        s = self.settings
        self.client = JsonClient(self.base_url, api_key=s.key, timeout=s.timeout, retries=s.retries, backoff=backoff)
        self.notice = notice
        self.cache = ReplyCache(_cache_folder(s.cache), notice)
        self.totals = Usage()
        self._identity: dict[str, Any] | None = None
        self._prefetched: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._shown = 0  # nulls shown on stderr so far

    # --- the served model -----------------------------------------------------------------------------

    def served(self) -> dict[str, Any]:
        """The judge model's identity, {"id", "root"}: the name requests use and, where the server lists it,
        the path of its weights (so a cache outlives a port, never a change of model)."""
        if self._identity is not None:
            return self._identity
        try:
            reply = self.client.call("GET", "models")
        except ServerError as error:
            raise JudgeError(f"{self.name}: the judge does not answer: {error}") from None
        data = reply.get("data") if isinstance(reply, dict) else None
        entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if data else []
        names = [m["id"] for m in entries]
        listing = f"{self.client.url('models')} lists {', '.join(names) or 'no model'}"
        if self.model is not None and self.model not in names:
            raise JudgeError(f"{self.name}: model {self.model!r} is not served: {listing}")
        bases = [m for m in entries if not m.get("parent")]  # vLLM lists loaded adapters with their parent
        if self.model is None and len(bases) != 1:
            raise JudgeError(f"{self.name}: {listing}: name one as judge-url:{self.base_url}#MODEL")
        entry = next(m for m in entries if m["id"] == self.model) if self.model else bases[0]
        self._identity = {"id": entry["id"], "root": entry.get("root")}
        return self._identity

    # --- scoring --------------------------------------------------------------------------------------

    def score_prepared(self, hypothesis: str, prepared: Any) -> float:
        raise UsageError(f"{self.name} reads the prompt: use sentence_scores(..., messages=...)")

    def prefetch(self, batches: Sequence[Batch]) -> None:
        """Ask for every completion of `batches` at once (bounded by the concurrency); `score_batch` reads them."""
        start = time.perf_counter()
        self._prefetched = {}
        requests = dict(pair for batch in batches for pair in self.requests(batch))
        self._prefetched = self._replies(requests)
        self.totals.seconds += time.perf_counter() - start

    def score_batch(self, batch: Batch) -> list[float | None]:
        if not batch.completions:
            return []
        start = time.perf_counter()
        requests = self.requests(batch)
        known = {key: self._prefetched[key] for key, _ in requests if key in self._prefetched}
        known.update(self._replies({key: body for key, body in requests if key not in known}))
        scores: list[float | None] = []
        unscored: list[tuple[int, str, str]] = []  # (completion, why, reply)
        for i, (key, _) in enumerate(requests):
            parsed = parse_score(known[key], self.settings.low, self.settings.high)
            scores.append(parsed.score)
            if parsed.score is None:
                unscored.append((i, parsed.problem, known[key]))
        self.totals.nulls += len(unscored)
        self.totals.seconds += time.perf_counter() - start
        if unscored:
            self._report_nulls(batch, unscored)
        return scores

    def requests(self, batch: Batch) -> list[tuple[str, dict[str, Any]]]:
        """(cache key, request body) per completion of `batch`."""
        if batch.messages is None:
            raise UsageError(f"{self.name} reads the prompt: score records (their prompt), not bare strings")
        identity, s = self.served(), self.settings
        pairs = []
        for completion, references, messages in zip(batch.completions, batch.references, batch.messages):
            shown = list(references[:1] if s.references == "first" else references)
            values = {
                "instruction": instruction_text(messages),
                "references": references_text(shown),
                "answer": completion,
                "low": f"{s.low:g}",
                "high": f"{s.high:g}",
            }
            body: dict[str, Any] = {"messages": self.template.render(values), "temperature": s.temperature}
            body["max_tokens"] = s.max_tokens
            if s.format == "json":
                body["response_format"] = self.json_format()
            if s.temperature > 0:
                body["seed"] = 0  # a sampled grade is still the same on a rerun (and from the cache)
            key = hashlib.sha256(json.dumps([identity, body], sort_keys=True).encode()).hexdigest()
            pairs.append((key, {"model": identity["id"], **body}))
        return pairs

    def json_format(self) -> dict[str, Any]:
        """OpenAI's structured outputs: the reply must be {"score": N}, N a whole number on the scale (the
        server enforces it as it decodes: vLLM, SGLang, llama.cpp's server, OpenAI)."""
        score = {"type": "integer", "minimum": math.ceil(self.settings.low), "maximum": math.floor(self.settings.high)}
        schema = {"type": "object", "properties": {"score": score}, "required": ["score"]}
        schema["additionalProperties"] = False
        return {"type": "json_schema", "json_schema": {"name": "grade", "schema": schema, "strict": True}}

    def _replies(self, requests: dict[str, dict[str, Any]]) -> dict[str, str]:
        """The reply to each request: from the cache, else asked (at most `concurrency` at once)."""
        replies: dict[str, str] = {}
        for key in requests:
            cached = self.cache.get(key)
            if cached is not None:
                replies[key] = cached
        self.totals.cache_hits += len(replies)
        missing = [(key, body) for key, body in requests.items() if key not in replies]
        if len(missing) <= 1 or self.settings.concurrency == 1:
            replies.update((key, self._ask(key, body)) for key, body in missing)
            return replies
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="bleuberi-judge")
        futures = [(key, self._pool.submit(self._ask, key, body)) for key, body in missing]
        try:
            replies.update((key, future.result()) for key, future in futures)
        finally:
            for _, future in futures:  # after a failure, nothing more is sent
                future.cancel()
        return replies

    def _ask(self, key: str, body: dict[str, Any]) -> str:
        """One request: the reply's text ("" for a reply without text), cached at once."""
        with self._lock:
            self.totals.requests += 1
        reply = self.client.call("POST", "chat/completions", body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ServerError(self.client.url("chat/completions"), "malformed reply: no 'choices' list")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        text = content if isinstance(content, str) else ""
        self.cache.put(key, text, body)
        return text

    def _report_nulls(self, batch: Batch, unscored: list[tuple[int, str, str]]) -> None:
        """eval needs every answer scored: one error line. Elsewhere the first few replies are shown."""
        if not batch.missing_ok:
            first, why, reply = unscored[0]
            raise JudgeError(
                f"{self.name}: no score for {len(unscored)} of {len(batch.completions)} answers (first: "
                f"{_where(batch, first)}: {why}: {_snippet(reply)}); every answer needs one here: ask for structured "
                f"outputs (${ENV}FORMAT=json), a stricter template or a larger judge"
            )
        for i, why, reply in unscored:
            if self._shown >= NULLS_SHOWN:
                return
            self._shown += 1
            more = "; further nulls are counted, not shown" if self._shown == NULLS_SHOWN else ""
            self.notice(f"{self.name}: null for {_where(batch, i)}: {why}: {_snippet(reply)}{more}")

    def usage(self) -> Usage:
        return Usage(self.totals.requests, self.totals.cache_hits, self.totals.nulls, self.totals.seconds)

    def signature(self) -> str:
        s = self.settings
        model = self._identity["id"] if self._identity else self.model or "served"
        return (
            f"judge-url|model:{model}|template:{self.template.source}@sha256:{self.template.sha256[:12]}"
            f"|references:{s.references}|scale:{s.low:g}..{s.high:g}|temperature:{s.temperature:g}"
            f"|max_tokens:{s.max_tokens}|format:{s.format}"
        )


def _cache_folder(setting: str | None) -> Path | None:
    if setting == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    from stages.core.models import cache_root

    return cache_root() / "judge-url"


def _where(batch: Batch, index: int) -> str:
    record = batch.record_id(index)
    return f"record {record!r}" if record is not None else f"completion {index + 1}"


def _snippet(reply: str, limit: int = 80) -> str:
    text = " ".join(reply.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
