"""Optional judges for `eval`, both off by default and both usable offline.

- `RewardModelJudge`: a local Hugging Face sequence-classification reward model scores each
  (prompt, response); systems are compared with the base by that reward.
- `HttpJudge`: an OpenAI-compatible chat-completions endpoint gives a pairwise verdict. The order of
  the two answers is decided by a seeded coin per pair (position bias cancels out over a data set),
  failed requests are retried with exponential backoff, and verdicts are cached on disk keyed by the
  exact request, so a rerun sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.core.errors import ModelError, UsageError
from stages.core.files import atomic_path
from stages.core.http import JsonClient, ServerError
from stages.core.records import prompt_messages, prompt_text
from stages.engines.base import derive_seed


class RewardModelJudge:
    """Scores (prompt, response) pairs with a local reward model: one logit per pair, higher is better."""

    def __init__(
        self, path: str, *, device: str = "auto", batch_size: int = 8, trust_remote_code: bool = False
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from stages.core.models import quiet_transformers, resolve_device
        from stages.core.precision import reward_model_dtype

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"{path}: --judge-model needs a local model folder with a config.json")
        quiet_transformers()
        self.name = str(path)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=reward_model_dtype(self.device), use_safetensors=True, trust_remote_code=trust_remote_code
            ).to(self.device)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load the reward model {path!r}: {error}") from None
        if self.model.config.num_labels != 1:
            raise ModelError(
                f"{path}: a reward model has one output label, this one has {self.model.config.num_labels}"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()

    def text(self, record: dict[str, Any], response: str) -> str:
        """The conversation as the reward model reads it: its chat template, else prompt and response."""
        turns = [*prompt_messages(record), {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return f"{prompt_text(record)}\n\n{response}"

    def score(self, items: Sequence[tuple[dict[str, Any], str]]) -> list[float]:
        import torch

        rewards: list[float] = []
        for start in range(0, len(items), self.batch_size):
            texts = [self.text(record, response) for record, response in items[start : start + self.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            rewards.extend(float(x) for x in logits[:, 0].float().cpu())
        return rewards


JUDGE_SYSTEM = (
    "You are a careful, impartial judge of answers to instructions. Compare the two answers below for "
    "helpfulness, correctness and how well they follow the instruction. Ignore their order and length "
    "as such. Reply with exactly one of: A, B, tie."
)
_VERDICT = re.compile(r"^\W*(?:\[\[)?\s*(A|B|TIE)\s*(?:\]\])?\W*$", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' (also '[[A]]', 'b.', 'Tie'), normalised to 'A'/'B'/'tie'; None if unreadable."""
    match = _VERDICT.match(reply.strip())
    if not match:
        return None
    word = match.group(1).upper()
    return "tie" if word == "TIE" else word


class JudgeUnavailable(ModelError):
    """The judge endpoint did not answer after every retry."""


class HttpJudge:
    """Pairwise verdicts from an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "judge",
        key_env: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        cache_dir: str | Path | None = None,
        seed: int = 42,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-url must start with http:// or https://, got {url!r}")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model = model
        self.key: str | None = None
        if key_env:
            self.key = os.environ.get(key_env)
            if not self.key:
                raise UsageError(f"--judge-key-env {key_env}: that environment variable is not set")
        self.timeout, self.retries, self.backoff, self.seed = timeout, retries, backoff, seed
        if cache_dir is None:
            from stages.core.models import cache_root

            cache_dir = cache_root() / "judge"
        self.cache_dir = Path(cache_dir)
        self.requests = self.cache_hits = self.invalid = 0

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "invalid": self.invalid}

    def compare(self, record: dict[str, Any], candidate: str, baseline: str) -> str | None:
        """'win', 'tie' or 'loss' for `candidate` against `baseline`; None when no reply could be read."""
        swap = derive_seed(self.seed, "judge-order", record["id"], candidate, baseline) % 2 == 1
        first, second = (baseline, candidate) if swap else (candidate, baseline)
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM},
            {
                "role": "user",
                "content": f"Instruction:\n{prompt_text(record)}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}",
            },
        ]
        verdict = self._verdict(messages)
        if verdict is None:
            return None
        if verdict == "tie":
            return "tie"
        candidate_won = (verdict == "A") != swap
        return "win" if candidate_won else "loss"

    def _verdict(self, messages: list[dict[str, str]]) -> str | None:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 8}
        key = hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()
        cached = self.cache_dir / key[:2] / f"{key}.json"
        if cached.is_file():
            self.cache_hits += 1
            return json.loads(cached.read_text())["verdict"]
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._post(body)
            except _TransientFailure as error:
                failure = str(error)
                continue
            failure = ""
            verdict = parse_verdict(reply) if reply is not None else None
            if verdict is not None:
                with atomic_path(cached) as tmp:
                    tmp.write_text(json.dumps({"verdict": verdict, "reply": reply}))
                return verdict
        if failure:  # the endpoint never answered the last try: a configuration problem, not a verdict
            raise JudgeUnavailable(f"judge endpoint {self.url} failed {self.retries + 1} times; last: {failure}")
        self.invalid += 1  # unreadable replies are counted and left out of the rates, never cached
        return None

    def _post(self, body: dict[str, Any]) -> str | None:
        """The reply text; None for a reply without readable text. Raises _TransientFailure to retry."""
        # The project's one HTTP client: it never follows a redirect, so the key only reaches this host.
        # Its own retries are off: this loop also retries unreadable replies, and counts attempts.
        client = JsonClient(self.url, api_key=self.key, timeout=self.timeout, retries=0)
        self.requests += 1
        try:
            payload = json.loads(client.call_text("POST", self.url, body))
        except ServerError as error:
            if error.transient:
                raise _TransientFailure(error.cause) from None
            if error.status is not None and 300 <= error.status < 400:
                raise JudgeUnavailable(f"judge endpoint {error}") from None
            # our request is wrong (4xx): retrying will not help
            raise JudgeUnavailable(f"judge endpoint {self.url} refused the request: HTTP {error.status}") from None
        except json.JSONDecodeError:
            return None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None


class _TransientFailure(Exception):
    """A timeout, a refused connection or a server error: worth another try."""
