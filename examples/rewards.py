"""Your own rewards for bleuberi, written as for TRL's GRPOTrainer (docs/rewards.md, "Your own reward").

Use them wherever a metric or reward name goes, with an optional weight after them:

    bleuberi score -i generated.jsonl -m bleu -m py:examples/rewards.py:length_band
    bleuberi train -i hard.jsonl -o runs/x --reward bleu --reward py:examples/rewards.py:no_lists:0.3

Each function is called once per batch (a record's completions, a GRPO group, a system's answers) with
keyword arguments: `completions` (strings), `prompts` (the prompt text, or the chat turns of a `messages`
record), `references` (a list per completion), `completion_ids` (token ids in training, else None) and
every other record field as a list. It returns one float per completion, or None for "no reward".
A function that names only some arguments is given only those; `**kwargs` takes the rest.
"""

from __future__ import annotations

import asyncio
import re

# Markdown list items: "- x", "* x", "+ x", "• x", "1. x", "2) x" at the start of a line.
LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S", re.MULTILINE)


def length_band(completions: list[str], references: list[list[str]], **kwargs: object) -> list[float]:
    """1 when the answer has between half and 1.5 times the words of its closest reference, falling off
    linearly outside that band: to 0 for an empty answer, and to 0 at three times the reference's length."""
    rewards = []
    for completion, refs in zip(completions, references):
        words = len(completion.split())
        target = min((len(r.split()) for r in refs), key=lambda n: abs(n - words))
        ratio = words / max(target, 1)
        if ratio < 0.5:
            rewards.append(ratio / 0.5)
        elif ratio <= 1.5:
            rewards.append(1.0)
        else:
            rewards.append(max(0.0, (3.0 - ratio) / 1.5))
    return rewards


def no_lists(completions: list[str], **kwargs: object) -> list[float]:
    """A format check: 1 for an answer in prose, 0 for one that has a bulleted or numbered list."""
    return [0.0 if LIST_ITEM.search(completion) else 1.0 for completion in completions]


async def no_echo(prompts: list[object], completions: list[str], **kwargs: object) -> list[float | None]:
    """An `async def` reward shaped like one that asks a remote judge: one request per completion, all in
    flight at once (bleuberi awaits it). The judge here is local: 0 when the answer repeats the whole
    prompt, else 1; chat prompts are not judged (None: no reward for that completion)."""

    async def judge(prompt: object, completion: str) -> float | None:
        await asyncio.sleep(0)  # where a real judge would `await client.post(url, json=...)`
        if not isinstance(prompt, str):
            return None
        asked = _words(prompt)
        return 0.0 if asked and f" {asked} " in f" {_words(completion)} " else 1.0

    return list(await asyncio.gather(*(judge(p, c) for p, c in zip(prompts, completions))))


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))
