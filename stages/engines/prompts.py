"""From a record to prompt token ids: the chat template (or a plain fallback), a system prompt, and
left truncation. Every engine gets its prompts from here, so all of them see the same ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.core.records import prompt_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The documented fallback for tokenizers without a chat template: an optional system text, then
    "User: ...", "Assistant: ..." turns separated by blank lines, ending with "Assistant:"."""
    parts = []
    for turn in messages:
        if turn["role"] == "system":
            parts.append(turn["content"])
        else:
            parts.append(f"{turn['role'].capitalize()}: {turn['content']}")
    parts.append("Assistant:")
    return "\n\n".join(parts)


def cut_left(ids: list[int], max_length: int | None) -> list[int]:
    """Keep the last `max_length` ids: the end holds the question and the answer cue."""
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[len(ids) - max_length :]


@dataclass
class PromptEncoder:
    """Turns a record's prompt into token ids: chat template, optional system prompt, left truncation."""

    tokenizer: PreTrainedTokenizerBase
    system_prompt: str | None = None
    max_prompt_length: int | None = None
    truncated: int = 0  # prompts cut from the left to fit max_prompt_length

    def turns(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """The chat turns the model sees: the record's, after the system prompt when one is set."""
        turns = list(messages)
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        turns = self.turns(messages)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(plain_prompt(turns))["input_ids"]
        cut = cut_left(ids, self.max_prompt_length)
        self.truncated += cut is not ids
        return cut

    def encode(self, record: dict[str, Any]) -> list[int]:
        return self.encode_messages(prompt_messages(record))
