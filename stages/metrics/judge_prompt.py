"""The judge's prompt and the reading of its reply, for `judge-url:` (stages/metrics/judge.py).

A template is chat turns whose contents hold placeholders in double braces: `{{instruction}}` (the
record's prompt), `{{references}}` (its reference answers), `{{answer}}` (the completion graded),
`{{low}}` and `{{high}}` (the scale's ends). The default is one user turn (`DEFAULT_TEMPLATE`); a file
replaces it: a `.json` file holds a list of `{"role", "content"}` turns, any other file is the text of
one user turn. Placeholders are filled in one pass, so an answer that itself contains `{{references}}`
is sent as written, never expanded.

A reply is read by `parse_score`, which knows the shapes judges write: JSON (`{"score": 7}`), MT-Bench's
`[[7]]`, a label (`score: 7`, `Rating: 7/10`, `**Score:** 7`), a fraction of the scale's top (`7/10`),
or the number alone. Anything else is no score (None), never a guess: the answer being graded often
holds numbers of its own, and a judge that rambles has not followed the template.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import ConfigError

Turns = list[dict[str, str]]

DEFAULT_TEMPLATE = """\
Grade an answer to an instruction by comparing it with the reference answer, which is correct.

### Instruction
{{instruction}}

### Reference answer
{{references}}

### Answer to grade
{{answer}}

### Rubric
{{high}}: the answer says what the reference says: correct, complete, and it follows the instruction.
Middle scores: partly right; something important is missing or wrong.
{{low}}: wrong, off-topic or empty.
Judge meaning and correctness, not wording or length: a correct answer in other words deserves {{high}}.

Reply with the score only: a whole number from {{low}} to {{high}}."""

PLACEHOLDERS = ("instruction", "references", "answer", "low", "high")
REQUIRED = ("references", "answer")  # a reference-guided judge sees both
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


@dataclass(frozen=True)
class Template:
    """Chat turns with placeholders; `source` names where they came from, `sha256` what they are."""

    turns: tuple[tuple[str, str], ...]  # (role, content)
    source: str = "default"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.turns).encode()).hexdigest()

    def render(self, values: dict[str, str]) -> Turns:
        """The turns with every placeholder filled from `values`, in one pass."""
        return [
            {"role": role, "content": _PLACEHOLDER.sub(lambda m: values[m.group(1)], content)}
            for role, content in self.turns
        ]


def check_template(turns: Sequence[tuple[str, str]], source: str) -> Template:
    """A template whose placeholders are all known and include the answer and the references."""
    used = {name for _, content in turns for name in _PLACEHOLDER.findall(content)}
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        known = ", ".join("{{" + name + "}}" for name in PLACEHOLDERS)
        raise ConfigError(f"judge template {source}: unknown placeholder {{{{{unknown[0]}}}}} (known: {known})")
    missing = [name for name in REQUIRED if name not in used]
    if missing:
        raise ConfigError(
            f"judge template {source}: it must show the judge {{{{{missing[0]}}}}} (a reference-guided judge "
            "sees the answer and the references)"
        )
    return Template(tuple(turns), source)


def load_template(path: str | None) -> Template:
    """The default template, or the one in `path` (a `.json` list of chat turns, else one user turn's text)."""
    if path is None:
        return check_template([("user", DEFAULT_TEMPLATE)], "default")
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"judge template {path}: cannot read it ({error.strerror or error})") from None
    if file.suffix.lower() != ".json":
        return check_template([("user", text.strip("\n"))], path)
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"judge template {path}: not JSON ({error})") from None
    if not isinstance(data, list) or not data or not all(_is_turn(turn) for turn in data):
        raise ConfigError(f'judge template {path}: a .json template is a list of {{"role", "content"}} turns')
    return check_template([(turn["role"], turn["content"]) for turn in data], path)


def _is_turn(turn: object) -> bool:
    return isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)


def instruction_text(messages: Turns) -> str:
    """The prompt as the judge reads it: a single user turn as it is, a conversation as `role: content` turns."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{turn['role']}: {turn['content']}" for turn in messages)


def references_text(references: Sequence[str]) -> str:
    """One reference as it is; several numbered, each a correct answer."""
    if len(references) == 1:
        return references[0]
    return "\n\n".join(f"Reference {i}:\n{text}" for i, text in enumerate(references, 1))


# --- reading a reply --------------------------------------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_THINKING = re.compile(r"<think>.*?</think>", re.S | re.I)  # a reasoning model's thoughts hold drafts of scores
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(rf"\[\[\s*({_NUMBER})\s*\]\]")
_OUT_OF = r"\s*(?:/|out of)\s*(\d+)"  # "7/10", "7 out of 10"
_LABEL = re.compile(rf"\b(?:score|rating|grade)\b[\s*_]*(?:is|of|=|:)?[\s*_]*({_NUMBER})(?:{_OUT_OF})?", re.I)
_FRACTION = re.compile(rf"({_NUMBER}){_OUT_OF}\b", re.I)
_BARE = re.compile(rf"^[\s*_\"'`]*({_NUMBER})[\s*_\"'`.]*$")
JSON_KEYS = ("score", "rating", "grade")


@dataclass(frozen=True)
class Parsed:
    """What a reply says: `score` on 0..1, or None and `problem` (why there is none)."""

    score: float | None
    problem: str = ""


def parse_score(reply: str, low: float, high: float) -> Parsed:
    """The reply's score mapped from low..high onto 0..1; None when it has none, or one outside the scale."""
    text = _THINKING.sub(" ", reply)
    raw = _from_json(text)
    if raw is None:
        raw = _last(_BRACKETS, text)
    if raw is None:
        raw = _labelled(text, high)
    if raw is None:
        raw = _fraction(text, high)
    if raw is None:
        bare = _BARE.match(text)
        raw = float(bare.group(1)) if bare else None
    if raw is None or not math.isfinite(raw):
        return Parsed(None, "no score in the reply")
    if not low <= raw <= high:
        return Parsed(None, f"score {raw:g} is outside {low:g}..{high:g}")
    return Parsed((raw - low) / (high - low))


def _last(pattern: re.Pattern[str], text: str) -> float | None:
    found = pattern.findall(text)
    return float(found[-1]) if found else None


def _from_json(text: str) -> float | None:
    """The last JSON object with a score, rating or grade key (any case) whose value is a number."""
    for candidate in reversed(_JSON_OBJECT.findall(text)):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        for key, value in data.items():
            if str(key).lower() in JSON_KEYS and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                try:
                    return float(value)
                except ValueError:
                    continue
    return None


def _labelled(text: str, high: float) -> float | None:
    """The last `score: N` (or `N/high` after the label); a fraction of another scale is converted to this one."""
    found = _LABEL.findall(text)
    if not found:
        return None
    number, denominator = found[-1]
    return _scaled(float(number), denominator, high)


def _fraction(text: str, high: float) -> float | None:
    """The last `N/D` or `N out of D` whose D is the scale's top (another D is a count, not a grade)."""
    found = [(n, d) for n, d in _FRACTION.findall(text) if float(d) == high]
    return float(found[-1][0]) if found else None


def _scaled(number: float, denominator: str, high: float) -> float:
    if not denominator or float(denominator) in (0.0, high):
        return number
    return number / float(denominator) * high
