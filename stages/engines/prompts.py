"""From a record to prompt token ids: the chat template (or a plain fallback), a system prompt, and what
happens to a prompt over `max_prompt_length` (`long_prompts`). Every engine gets its prompts from here,
so all of them see the same ids.

Over-long prompts: `cut-left` keeps the last tokens (TRL's way; the instruction at the start is lost),
`cut-right` the first ones and `cut-middle` the first and the last (the instruction and the question); those
two cut inside the text of the last user turn and apply the chat template again, so the prompt still ends
with the template's answer cue. `skip` and `error` are decided by `PromptEncoder.check` before any work.
Every cut or skipped prompt is recorded by record id (`PromptCuts`), so each stage can name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stages.core.errors import InputError
from stages.core.records import prompt_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stages.core.options import LongPrompts

CUT_MARK = " [...] "  # where text was taken out of a prompt (cut-middle; cut-right ends with it)
NAMED_IN_LINES = 5  # ids named in a stage's line about cut prompts (the records name all of them)


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


class PromptTooLong(InputError):
    """A prompt over the limit under `--long-prompts error` (or skip, when a caller did not check first)."""

    def __init__(self, record_id: str, tokens: int, limit: int, how: str) -> None:
        self.record_id, self.tokens = record_id, tokens
        super().__init__(
            f"record {record_id!r}",
            None,
            f"its prompt is {tokens} tokens, over --max-prompt-length {limit} (--long-prompts {how}): raise the limit, "
            "or choose --long-prompts cut-middle, cut-left, cut-right or skip",
        )


@dataclass
class PromptCuts:
    """The prompts over the limit, by record id, with their length in tokens before the cut."""

    how: str
    limit: int | None
    cut: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def note(self, record_id: str) -> dict[str, Any] | None:
        """What a cut record's output says of its prompt: `prompt_cut` {tokens, kept, how}."""
        if record_id not in self.cut:
            return None
        return {"tokens": self.cut[record_id], "kept": self.limit, "how": self.how}

    def lines(self, what: str = "prompts") -> list[str]:
        """One line each for the cut and the skipped prompts: how many, and the first few ids with their lengths."""
        done = [("cut", self.cut, f"{_HOW[self.how]}"), ("skipped", self.skipped, "left out")]
        return [
            f"{len(found)} {what if len(found) > 1 else what[:-1]} over {self.limit} tokens {verb} ({action}): "
            + _named(found)
            for verb, found, action in done
            if found
        ]


_HOW = {
    "cut-middle": "start and end kept",
    "cut-left": "the end kept",
    "cut-right": "the start kept",
    "skip": "left out",
    "error": "refused",
}


def _named(found: dict[str, int]) -> str:
    shown = [f"{record_id} ({tokens} tokens)" for record_id, tokens in list(found.items())[:NAMED_IN_LINES]]
    more = len(found) - len(shown)
    return ", ".join(shown) + (f" and {more} more (every one is named in its record's prompt_cut)" if more else "")


@dataclass
class PromptEncoder:
    """Turns a record's prompt into token ids: chat template, optional system prompt, and a prompt over
    `max_prompt_length` treated as `long_prompts` says (`cuts` records which)."""

    tokenizer: PreTrainedTokenizerBase
    system_prompt: str | None = None
    max_prompt_length: int | None = None
    long_prompts: LongPrompts = "cut-middle"
    cuts: PromptCuts = field(init=False)

    def __post_init__(self) -> None:
        self.cuts = PromptCuts(self.long_prompts, self.max_prompt_length)

    @property
    def truncated(self) -> int:
        """How many prompts were cut so far."""
        return len(self.cuts.cut)

    def turns(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """The chat turns the model sees: the record's, after the system prompt when one is set."""
        turns = list(messages)
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def _ids(self, turns: Sequence[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(plain_prompt(turns))["input_ids"]

    def encode_messages(self, messages: Sequence[dict[str, str]], record_id: str | None = None) -> list[int]:
        turns = self.turns(messages)
        ids, limit = self._ids(turns), self.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.long_prompts in ("skip", "error"):
            raise PromptTooLong(record_id or "?", len(ids), limit, self.long_prompts)
        self.cuts.cut[record_id if record_id is not None else f"<prompt {len(self.cuts.cut) + 1}>"] = len(ids)
        if self.long_prompts == "cut-left":
            return cut_left(ids, limit)
        return self._cut_text(turns, ids, limit) or cut_left(ids, limit)

    def encode(self, record: dict[str, Any]) -> list[int]:
        return self.encode_messages(prompt_messages(record), record.get("id"))

    def check(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every prompt encoded once, before any work (it only tokenises): the records to work on. Under `skip`
        those whose prompt fits (`cuts.skipped` has the others); under `error` all of them, or a PromptTooLong
        naming the first that does not fit and how many do not; under a cut, all of them (`cuts.cut` says which
        will be cut)."""
        if self.max_prompt_length is None:
            return list(records)
        kept, over = [], {}
        for record in records:
            try:
                self.encode(record)
            except PromptTooLong as error:
                over[error.record_id] = error.tokens
            else:
                kept.append(record)
        if over and self.long_prompts == "error":
            first, tokens = next(iter(over.items()))
            error = PromptTooLong(first, tokens, self.max_prompt_length, "error")
            error.message += f" ({len(over)} prompts are over it: {_named(over)})" if len(over) > 1 else ""
            raise error
        self.cuts.skipped.update(over)
        return kept

    def _cut_text(self, turns: list[dict[str, str]], ids: list[int], limit: int) -> list[int] | None:
        """`ids` cut to `limit` inside the text of the last user turn (cut-right: its start kept; cut-middle:
        its start and its end), the template applied again; None when that turn cannot give enough."""
        last = max((i for i, turn in enumerate(turns) if turn["role"] == "user"), default=None)
        if last is None:
            return None
        content = self.tokenizer(turns[last]["content"], add_special_tokens=False)["input_ids"]
        budget = len(content) - (len(ids) - limit)
        for _ in range(4):  # the text tokenises a little differently once cut: take off what is still over
            if budget < 1:
                return None
            text = self._shortened(content, budget)
            cut = self._ids([*turns[:last], {**turns[last], "content": text}, *turns[last + 1 :]])
            if len(cut) <= limit:
                return cut
            budget -= len(cut) - limit
        return None

    def _shortened(self, content: list[int], budget: int) -> str:
        decode = self.tokenizer.decode
        if self.long_prompts == "cut-right":
            return decode(content[:budget]).rstrip("\ufffd").rstrip() + CUT_MARK.rstrip()
        head = (budget + 1) // 2
        start = decode(content[:head]).rstrip("\ufffd")  # a character split between tokens is dropped, not garbled
        end = decode(content[len(content) - (budget - head) :]).lstrip("\ufffd") if budget > head else ""
        return start.rstrip() + CUT_MARK + end.lstrip()
