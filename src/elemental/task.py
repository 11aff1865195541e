"""The Task: the single source of every prompt and of the label tokens (DESIGN §2, §4).

The trainer, both classifier backends and the exported manifest all render prompts through this
class, so the prompt a model is trained on is byte-identical to the one it is asked at inference,
in Python and on the phone.

Prompt layout (SmolVLM2's chat template with the text before the image, so the fixed instruction's
KV cache can be reused for every photo):

    <|im_start|>User: {instruction}<image><end_of_utterance>\\nAssistant:

and the answer is " {label}<end_of_utterance>".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from .config import TaskConfig
from .errors import ElementalError

BOS = "<|im_start|>"
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"

PromptKind = Literal["label", "explain", "context"]


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Task:
    """A closed label set plus the prompts that ask for a label (or a reason, in training)."""

    labels: tuple[str, ...]
    instruction: str
    explain_instruction: str

    @classmethod
    def from_config(cls, cfg: TaskConfig) -> Task:
        return cls(
            labels=tuple(cfg.labels),
            instruction=cfg.instruction.format(labels=", ".join(cfg.labels)),
            explain_instruction=cfg.explain_instruction.format(labels=", ".join(cfg.labels)),
        )

    # -- prompts -------------------------------------------------------------------------------
    def user_text(self, kind: PromptKind = "label", reason: str | None = None) -> str:
        """The user's words before the image, for one of the three prompt kinds of DESIGN §2."""
        if kind == "label":
            return self.instruction
        if kind == "explain":
            return self.explain_instruction
        if reason is None:
            raise ValueError("a context prompt needs a reason")
        return f"{self.instruction} Context: {reason.strip()}"

    def prompt(self, kind: PromptKind = "label", reason: str | None = None, image: str = IMAGE_TOKEN) -> str:
        """The full prompt string up to and including "Assistant:", with `image` where the photo goes."""
        return f"{BOS}User: {self.user_text(kind, reason)}{image}{END_OF_UTTERANCE}\nAssistant:"

    def prompt_parts(self) -> tuple[str, str]:
        """The label prompt split at the image: (text before, text after). The manifest ships these."""
        before, after = self.prompt("label").split(IMAGE_TOKEN)
        return before, after

    def label_answer(self, label: str) -> str:
        """The training target for a label: the label alone, then the end-of-utterance token."""
        self.check_label(label)
        return f" {label}{END_OF_UTTERANCE}"

    @staticmethod
    def reason_answer(reason: str) -> str:
        return f" {' '.join(reason.split())}{END_OF_UTTERANCE}"

    # -- labels --------------------------------------------------------------------------------
    def check_label(self, label: str) -> None:
        if label not in self.labels:
            raise ElementalError(f"label {label!r} is not one of the task's labels {list(self.labels)}")

    def label_token_ids(self, tokenizer: _Tokenizer) -> list[list[int]]:
        """Token ids of " {label}" for every label, as the model emits them after "Assistant:"."""
        return [list(tokenizer.encode(f" {label}", add_special_tokens=False)) for label in self.labels]

    def first_tokens_unique(self, tokenizer: _Tokenizer) -> bool:
        """True when one forward pass decides the label: every label starts with its own token."""
        firsts = [ids[0] for ids in self.label_token_ids(tokenizer)]
        return len(set(firsts)) == len(firsts)
