"""Reward models as metrics: `rm:PATH` (a local model) and `rm-url:URL` (a model behind HTTP).

Both score the conversation, not the references: the record's prompt turns (its `prompt` as one user
turn, or its `messages`; not a `--system-prompt` the policy was given) followed by the completion as
the assistant turn. Scores are the reward model's raw output (a logit, unbounded, often -10..10), not
0..1: with `--reward-combine sum` an RM's logits outweigh 0..1 metrics unless its weight is small (or
the others' large); `--reward-combine zscore` standardises each reward within its group first (the
paper's BLEU+RM). A single RM reward needs neither: group-relative advantages remove its scale.

`rm:PATH`: a Hugging Face sequence-classification model with one output label, from a local folder
(or a hub id already in the local cache), safetensors weights only. The conversation goes through the
RM's own chat template (plain text joined by blank lines when it has none), tokens as the template
writes them. Loaded on first use, bfloat16 on a CUDA GPU (float32 elsewhere); batched, right-padded,
with a padding id that no conversation of the batch contains, so each score is read at the
conversation's own last token: batched scores equal one-at-a-time scores.

`rm-url:URL`: POST URL with `{"batch_conversations": [[{"role": ..., "content": ...}, ...], ...]}` (one
conversation per completion; up to 64 per request) and expect `{"scores": [float, ...]}`, one per
conversation, in order: the protocol of the paper's own RM server. It goes through the project's one
HTTP client (stages/core/http.py): timeouts, retries with backoff on connection failures, timeouts,
429 and 5xx; redirects are refused; `$BLEUBERI_RM_KEY`, when set, is sent as `Authorization: Bearer`
to that URL's host only. `$BLEUBERI_RM_TIMEOUT` (seconds, default 60) and `$BLEUBERI_RM_RETRIES`
(default 3) tune it. A reply that is not that JSON is an error, not retried.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.errors import ModelError, UsageError
from stages.metrics.base import Messages, Metric, PromptTurns, ReferenceLists, _check_corpus, right_padded

REQUEST_CONVERSATIONS = 64


def conversation(messages: Messages | None, completion: str, metric: str) -> Messages:
    if messages is None:
        raise UsageError(f"{metric} scores conversations: it needs the prompt (score records, not bare strings)")
    return [*messages, {"role": "assistant", "content": completion}]


class _ConversationMetric(Metric):
    needs_prompt = True
    in_process = True
    scale = None  # raw reward-model scores

    def prepare(self, references: Sequence[str]) -> None:
        return None  # references are not used

    def score_prepared(self, hypothesis: str, prepared: Any) -> float:
        raise UsageError(f"{self.name} scores conversations: it needs the prompt (use sentence_scores(messages=...))")

    def sentence_scores(
        self, hypotheses: Sequence[str], references: Sequence[str], *, messages: Messages | None = None
    ) -> list[float]:
        return self.score_conversations([conversation(messages, h, self.name) for h in hypotheses])

    def paired_scores(
        self, hypotheses: Sequence[str], references: ReferenceLists, messages: PromptTurns = None
    ) -> list[float]:
        _check_corpus(hypotheses, references)
        if messages is None:
            raise UsageError(f"{self.name} scores conversations: it needs the prompts")
        return self.score_conversations([conversation(m, h, self.name) for h, m in zip(hypotheses, messages)])

    def score_conversations(self, conversations: list[Messages]) -> list[float]:
        raise NotImplementedError


class RewardModel(_ConversationMetric):
    name = "rm"
    argument = "PATH"
    description = "reward model: raw logit of a local sequence-classification RM on the conversation"
    argument_names = "models"

    def __init__(self, argument: str | None = None, *, device: str = "auto", batch_size: int = 8) -> None:
        if not argument:
            raise UsageError("rm needs a model: rm:PATH (a sequence-classification reward model folder)")
        folder = Path(argument).expanduser()
        looks_local = folder.exists() or argument.startswith((".", "/", "~")) or argument.count("/") > 1
        if looks_local and not (folder / "config.json").is_file():
            raise ModelError(f"rm:{argument}: no reward model there (a model folder needs a config.json)")
        self.path = argument
        self.name = f"rm:{argument}"  # type: ignore[misc]
        self.device = device
        self.batch_size = batch_size
        self._loaded: tuple[Any, Any, Any] | None = None  # model, tokenizer, device

    def _load(self) -> tuple[Any, Any, Any]:
        if self._loaded is not None:
            return self._loaded
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from stages.core.models import quiet_transformers, resolve_model
        from stages.core.precision import reward_model_dtype
        from stages.metrics.neural import metric_device

        quiet_transformers()
        resolved = resolve_model(self.path)
        device = metric_device(self.device)
        dtype = reward_model_dtype(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
            model = AutoModelForSequenceClassification.from_pretrained(
                resolved.path, dtype=dtype, use_safetensors=True, local_files_only=resolved.local_files_only
            )
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"cannot load the reward model {self.path!r}: {first}") from None
        if model.config.num_labels != 1:
            raise ModelError(
                f"rm:{self.path}: a reward model has one output label, this one has {model.config.num_labels}"
            )
        model.to(device).eval()
        self._loaded = (model, tokenizer, device)
        return self._loaded

    def token_ids(self, conversation: Messages) -> list[int]:
        _model, tokenizer, _device = self._load()
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        else:
            text = "\n\n".join(turn["content"] for turn in conversation)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def score_conversations(self, conversations: list[Messages]) -> list[float]:
        import torch

        model, tokenizer, device = self._load()
        encoded = [self.token_ids(c) for c in conversations]
        scores: list[float] = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        text_config = model.config.get_text_config()
        saved_pad = text_config.pad_token_id
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                pad = _unused_id([encoded[i] for i in rows], tokenizer.pad_token_id, model.config.vocab_size)
                # transformers reads the score at the rightmost token that is not the pad id: with an id no
                # conversation contains, that is each conversation's own last token.
                text_config.pad_token_id = pad
                ids, mask = right_padded([encoded[i] for i in rows], pad)
                with torch.inference_mode():
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for r, i in enumerate(rows):
                    scores[i] = float(logits[r, 0].float())
        finally:
            text_config.pad_token_id = saved_pad
        return scores

    def signature(self) -> str:
        return f"rm|model:{self.path}|score:raw-logit|template:rm-chat-template|dtype:bf16-on-cuda,fp32-elsewhere"


def _unused_id(sequences: list[list[int]], preferred: int | None, vocab_size: int) -> int:
    used = {token for sequence in sequences for token in sequence}
    if preferred is not None and preferred not in used:
        return preferred
    return next(i for i in range(vocab_size) if i not in used)


class RemoteReward(_ConversationMetric):
    name = "rm-url"
    argument = "URL"
    description = "reward model behind HTTP: POST {batch_conversations} -> {scores} (raw RM scores)"
    KEY_ENV = "BLEUBERI_RM_KEY"
    argument_names = "servers"

    def __init__(
        self,
        argument: str | None = None,
        *,
        device: str = "auto",
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float = 0.5,
    ) -> None:
        from stages.core.http import JsonClient

        url = argument or ""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"rm-url needs an http(s) URL: rm-url:URL[:WEIGHT], got {url!r}")
        if not parts.path:
            raise UsageError(
                f"rm-url:{url}: give the endpoint's full URL with its path (e.g. http://host:8000/score); "
                "a trailing :NUMBER is read as the weight, so a port must be followed by a path"
            )
        self.url = url
        self.name = f"rm-url:{url}"  # type: ignore[misc]
        try:
            timeout = float(os.environ.get("BLEUBERI_RM_TIMEOUT", "60")) if timeout is None else timeout
            retries = int(os.environ.get("BLEUBERI_RM_RETRIES", "3")) if retries is None else retries
        except ValueError:
            raise UsageError(
                "$BLEUBERI_RM_TIMEOUT must be a number of seconds, $BLEUBERI_RM_RETRIES an integer"
            ) from None
        key = os.environ.get(self.KEY_ENV) or None
        self.client = JsonClient(url, api_key=key, timeout=timeout, retries=retries, backoff=backoff)

    def score_conversations(self, conversations: list[Messages]) -> list[float]:
        from stages.core.http import ServerError

        scores: list[float] = []
        for start in range(0, len(conversations), REQUEST_CONVERSATIONS):
            batch = conversations[start : start + REQUEST_CONVERSATIONS]
            reply = self.client.call("POST", self.url, {"batch_conversations": batch})
            values = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(values, list) or len(values) != len(batch):
                got = f"{len(values)} scores" if isinstance(values, list) else "no 'scores' list"
                raise ServerError(
                    self.url, f"malformed reply: expected {{'scores': [{len(batch)} numbers]}}, got {got}"
                )
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ServerError(self.url, f"malformed reply: score {value!r} is not a finite number")
            scores.extend(float(v) for v in values)
        return scores

    def signature(self) -> str:
        return f"rm-url|url:{self.url}|protocol:batch_conversations->scores|score:raw"
