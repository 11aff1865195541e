"""Reading the teacher's answers: leniently (code fences, content parts, words around the JSON), checked strictly.

The schema is sent with every request but never trusted: local servers may not enforce it, so every
answer is validated here against the task's labels, and what is wrong with it is said in one line
whose first word is the rejection's code (`invalid_json`, `off_list`, `confidence`, ...).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from openai.types.chat import ChatCompletion

from ...task import Task

MAX_REASON_CHARS = 300

@dataclass(frozen=True)
class Answer:
    element: str
    reason: str
    confidence: float


@dataclass(frozen=True)
class Verdict:
    """What one completion amounted to: an answer, or a problem (plus the text to show on a re-ask)."""

    answer: Answer | None
    problem: str | None
    text: str
    tokens_in: int
    tokens_out: int


def judge_completion(task: Task, completion: ChatCompletion) -> Verdict:
    """Validate a completion against the task; the schema is checked again here, never trusted."""
    usage = completion.usage
    tin = int(usage.prompt_tokens or 0) if usage else 0
    tout = int(usage.completion_tokens or 0) if usage else 0
    if not completion.choices:
        return Verdict(None, "empty: the answer has no choices", "", tin, tout)
    choice = completion.choices[0]
    message = choice.message
    refusal = getattr(message, "refusal", None)
    if refusal:
        return Verdict(None, f"refusal: {one_line(refusal, 120)}", refusal, tin, tout)
    text = _content_text(message.content)
    answer, problem = parse_answer(task, text)
    if answer is None and choice.finish_reason == "length":
        problem = f"truncated: the answer hit the token limit before its JSON ended ({problem})"
    return Verdict(answer, problem, text, tin, tout)


def _content_text(content: Any) -> str:
    """A message's text: a string, or (some servers) a list of content parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, dict) else getattr(p, "text", "") for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return str(content)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _json_object(text: str) -> Any:
    """The JSON in `text`, read leniently: inside a ``` fence, or the first object with words around it.

    Raises json.JSONDecodeError for the text as a whole when no object can be read.
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as whole:
        start = stripped.find("{")
        if start < 0:
            raise whole from None
        try:
            return json.JSONDecoder().raw_decode(stripped, start)[0]
        except json.JSONDecodeError:
            raise whole from None


def parse_answer(task: Task, text: str) -> tuple[Answer | None, str | None]:
    """Parse and check one answer's JSON text: (answer, None) or (None, "code: what is wrong")."""
    if not text.strip():
        return None, "empty: the answer has no content"
    try:
        data = _json_object(text)
    except json.JSONDecodeError as e:
        return None, f"invalid_json: not JSON ({e.msg} at char {e.pos})"
    if not isinstance(data, dict):
        return None, f"invalid_json: expected a JSON object, got {type(data).__name__}"
    element = data.get("element")
    if element not in task.labels:
        return None, f"off_list: element {_short_repr(element)} is not one of {list(task.labels)}"
    confidence = data.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        return None, f"confidence: {_short_repr(confidence)} is not a number"
    if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
        return None, f"confidence: {confidence!r} is outside 0..1"
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return None, "reason: missing or empty"
    return Answer(element=element, reason=one_line(reason, MAX_REASON_CHARS), confidence=float(confidence)), None


def one_line(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _short_repr(value: Any) -> str:
    return one_line(repr(value), 60)


def reject_code(reject_reason: str | None) -> str:
    return (reject_reason or "unknown").split(":", 1)[0]

