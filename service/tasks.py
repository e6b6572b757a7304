"""Prompts for each task kind and parsing of answers into the allowed label set.

>>> from service.config import TaskConfig
>>> task = TaskConfig(kind="classification", labels=["positive", "negative"])
>>> p = build_prompt(task, "I loved it", task.labels)
>>> p.answers
['positive', 'negative']
>>> parse_answer(" Positive.", p)
'positive'
>>> parse_answer("positive or negative", p) is None
True
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from service.config import TaskConfig

LETTERS = string.ascii_uppercase

CLASSIFICATION_TEMPLATE = """{instruction}
Answer with exactly one of: {choices}.

Text: {text}
Answer:"""

MULTIPLE_CHOICE_TEMPLATE = """{instruction}

Question: {text}
{listing}Answer with the letter of the correct option ({choices}).
Answer:"""


@dataclass(frozen=True)
class Prompt:
    """A prompt plus what the model may answer and how an answer maps to a label.

    ``answers`` are the strings the model is asked to produce (labels, or option letters for
    multiple choice); ``labels[i]`` is the label that ``answers[i]`` stands for.
    """

    text: str
    answers: list[str]
    labels: list[str]

    def label_for(self, answer: str) -> str:
        return self.labels[self.answers.index(answer)]


def _letters_only(options: list[str]) -> bool:
    return all(len(o) == 1 and o.upper() in LETTERS for o in options)


def build_prompt(task: TaskConfig, text: str, options: list[str]) -> Prompt:
    """The prompt for one query. ``options`` is the allowed label set for this query."""
    if task.kind == "multiple_choice" and not _letters_only(options):
        if len(options) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} options")
        answers = list(LETTERS[: len(options)])
        listing = "".join(f"{a}. {opt}\n" for a, opt in zip(answers, options, strict=True))
    else:
        answers = list(options)
        listing = ""
    instruction = task.instruction or (
        "Choose the correct option." if task.kind == "multiple_choice" else "Classify the text."
    )
    template = task.template or (
        MULTIPLE_CHOICE_TEMPLATE if task.kind == "multiple_choice" else CLASSIFICATION_TEMPLATE
    )
    prompt = template.format_map(
        _Defaults(
            instruction=instruction,
            text=text,
            choices=", ".join(answers),
            labels=", ".join(options),
            listing=listing,
        )
    )
    return Prompt(text=prompt, answers=answers, labels=list(options))


class _Defaults(dict):
    """format_map helper: unknown placeholders in a user template stay as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _norm(s: str) -> str:
    return " ".join(s.casefold().split())


def parse_answer(output: str, prompt: Prompt) -> str | None:
    """Map a model's raw output to a label, or None (a parse error) — never a guess.

    Tried in order: the exact answer; the answer ignoring case, surrounding spaces and trailing
    punctuation; the one answer (or label) mentioned as a whole word. Two different answers
    mentioned is ambiguous and gives None.
    """
    if output in prompt.answers:
        return prompt.label_for(output)
    cleaned = _norm(output).strip(" .,:;!?\"'()[]*")
    for answer in prompt.answers:
        if _norm(answer) == cleaned:
            return prompt.label_for(answer)
    for i, label in enumerate(prompt.labels):
        if _norm(label) == cleaned:
            return prompt.labels[i]
    mentioned: set[str] = set()
    lowered = _norm(output)
    for answer, label in zip(prompt.answers, prompt.labels, strict=True):
        for candidate in {_norm(answer), _norm(label)}:
            word = re.escape(candidate)
            if len(candidate) == 1:
                # a lone letter counts only alone ("B", "(B).") or after "answer is"/"answer:"
                found = re.fullmatch(rf"\W*{word}\W*", lowered) or re.search(
                    rf"\banswer\s*(?:is|:)\s*\(?{word}(?!\w)", lowered
                )
            else:
                found = re.search(rf"(?<!\w){word}(?!\w)", lowered)
            if found:
                mentioned.add(label)
    if len(mentioned) == 1:
        return mentioned.pop()
    return None
