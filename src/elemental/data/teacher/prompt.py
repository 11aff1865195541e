"""What the teacher is asked: the system prompt, the answer's JSON schema, the photo as sent, the prompt version.

The prompt version is a hash of everything here that changes an answer; it is part of the label
cache's key, so editing a prompt or the label list re-labels instead of reusing stale answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Literal

from ...images import bounded, encode_jpeg, open_image_bytes
from ...task import Task

DEFAULT_MAX_SIDE = 512
DEFAULT_DETAIL = "low"
JPEG_QUALITY = 85
SCHEMA_NAME = "element_label"

SYSTEM_PROMPT = (
    "You label photos for an image classifier. Choose exactly one label from this list: {labels}. "
    "Answer with a JSON object: \"element\" (one label from the list, spelled exactly), \"reason\" "
    "(one short sentence saying what in the photo shows it) and \"confidence\" (a number from 0 to 1: "
    "how sure you are). If the photo fits no label well, pick the closest one with a low confidence."
)
REASK_PROMPT = (
    "That answer was invalid ({problem}). Reply again with only a JSON object with \"element\" (one of: "
    "{labels}), \"reason\" (one short sentence) and \"confidence\" (a number from 0 to 1)."
)

Detail = Literal["low", "high", "auto"]

def answer_schema(task: Task) -> dict[str, Any]:
    """The strict JSON schema of one answer: the label must be one of the task's labels."""
    return {
        "type": "object",
        "properties": {
            "element": {"type": "string", "enum": list(task.labels)},
            "reason": {"type": "string", "description": "One short sentence: what in the photo shows the label."},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["element", "reason", "confidence"],
        "additionalProperties": False,
    }


def response_format(task: Task) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": answer_schema(task)}}


def system_prompt(task: Task) -> str:
    return SYSTEM_PROMPT.format(labels=", ".join(task.labels))


def prompt_version(task: Task, *, detail: Detail = DEFAULT_DETAIL, max_side: int = DEFAULT_MAX_SIDE) -> str:
    """A short hash of everything that changes the teacher's answer except the model (a cache key part).

    Changing a prompt, the labels, the schema or how the photo is sent gives a new version, so old
    answers are not reused for a question that is no longer the one being asked.
    """
    spec = {
        "system": system_prompt(task),
        "user": task.user_text("label"),
        "reask": REASK_PROMPT,
        "schema": response_format(task),
        "labels": list(task.labels),
        "detail": detail,
        "max_side": max_side,
        "jpeg_quality": JPEG_QUALITY,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def teacher_jpeg(image: bytes, max_side: int = DEFAULT_MAX_SIDE, name: str = "photo") -> bytes:
    """The exact JPEG the teacher is sent: upright RGB, long side ≤ `max_side`; deterministic bytes.

    Downscaling first is most of the cost saving: a 512-px low-detail image is a fixed small number
    of input tokens however large the original was.
    """
    rgb = open_image_bytes(image, name, max_side=max_side)  # upright sRGB; errors name the photo
    return encode_jpeg(bounded(rgb, max_side), quality=JPEG_QUALITY)


def chat_messages(task: Task, jpeg: bytes, detail: Detail = DEFAULT_DETAIL) -> list[dict[str, Any]]:
    """System prompt, then the task's instruction and the photo as a data URL."""
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return [
        {"role": "system", "content": system_prompt(task)},
        {"role": "user", "content": [
            {"type": "text", "text": task.user_text("label")},
            {"type": "image_url", "image_url": {"url": url, "detail": detail}},
        ]},
    ]


def reask_messages(task: Task, bad_answer: str, problem: str) -> list[dict[str, Any]]:
    return [
        {"role": "assistant", "content": bad_answer or "(no answer)"},
        {"role": "user", "content": REASK_PROMPT.format(problem=problem, labels=", ".join(task.labels))},
    ]

