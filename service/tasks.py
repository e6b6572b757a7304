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
>>> parse_answer("not positive", p) is None
True

Query text is only ever a value in the template, never a template: braces in it stay as they
are. Whatever it says, the answer is one of the labels or a parse error.

An open task's prompt is the text itself (after its ``instruction``, or in its ``template``)
and has no answers: the model's text is the answer, generated freely.

>>> chat = TaskConfig(kind="open")
>>> build_prompt(chat, "Write a haiku about rain.", []).text
'Write a haiku about rain.'
>>> build_prompt(chat, "rain", []).open
True
>>> build_prompt(TaskConfig(kind="open", template="Q: {text} A:"), "2+2?", []).text
'Q: 2+2? A:'
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
    content_free: str | None = None  # the same prompt for a content-free input (calibration)

    @property
    def open(self) -> bool:
        """An open task's prompt: no answer set, the model's text is the answer."""
        return not self.answers

    def label_for(self, answer: str) -> str:
        return self.labels[self.answers.index(answer)]


def _letters_only(options: list[str]) -> bool:
    return all(len(o) == 1 and o.upper() in LETTERS for o in options)


def build_prompt(task: TaskConfig, text: str, options: list[str]) -> Prompt:
    """The prompt for one query. ``options`` is the allowed label set for this query (none
    for an open task)."""
    if task.kind == "open":
        return _open_prompt(task, text)
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

    def fill(value: str) -> str:
        return template.format_map(
            _Defaults(
                instruction=instruction,
                text=value,
                choices=", ".join(answers),
                labels=", ".join(options),
                listing=listing,
            )
        )

    return Prompt(
        text=fill(text), answers=answers, labels=list(options), content_free=fill(CONTENT_FREE)
    )


def _open_prompt(task: TaskConfig, text: str) -> Prompt:
    """An open task's prompt: its template with the text, else the text after its
    instruction, else the text alone."""
    if task.template is not None:
        prompt = task.template.format_map(_Defaults(text=text, instruction=task.instruction or ""))
    elif task.instruction:
        prompt = f"{task.instruction}\n\n{text}"
    else:
        prompt = text
    return Prompt(text=prompt, answers=[], labels=[])


#: The content-free input of contextual calibration (Zhao et al., 2021).
CONTENT_FREE = "N/A"


class _Defaults(dict):
    """format_map helper: unknown placeholders in a user template stay as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _norm(s: str) -> str:
    return " ".join(s.casefold().split())


_PUNCT = " .,:;!?\"'()[]*`"
_NEGATIONS = {"not", "no", "never", "neither", "nor", "without", "hardly"}


def _negated(text: str, start: int) -> bool:
    """Whether one of the three words before ``start`` negates what follows."""
    words = re.findall(r"[\w']+", text[max(0, start - 60) : start])[-3:]
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def _mentions(lowered: str, prompt: Prompt) -> list[tuple[int, int, str]]:
    """Spans (start, end, label) where an answer or a label is mentioned as a whole word."""
    spans = []
    for answer, label in zip(prompt.answers, prompt.labels, strict=True):
        for candidate in {_norm(answer), _norm(label)}:
            word = re.escape(candidate)
            if len(candidate) == 1:
                # a lone letter counts only alone ("B", "(B).") or after "answer is"/"answer:"
                found = re.fullmatch(rf"\W*({word})\W*", lowered) or re.search(
                    rf"\banswer\s*(?:is|:)\s*\(?({word})(?!\w)", lowered
                )
                matches = [found] if found else []
            else:
                matches = list(re.finditer(rf"(?<!\w)({word})(?!\w)", lowered))
            spans.extend((m.start(1), m.end(1), label) for m in matches)
    # "very positive" mentions the label "very positive", not also "positive"
    return [
        s
        for s in spans
        if not any(o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0] for o in spans)
    ]


def parse_answer(output: str, prompt: Prompt) -> str | None:
    """Map a model's raw output to a label, or None (a parse error) — never a guess.

    Tried in order: the exact answer; the answer (or label) ignoring case, spaces and
    surrounding punctuation; the one label mentioned as a whole word. Two different labels
    mentioned ("Positive. Actually negative"), a negated mention ("not positive") or no
    mention at all give None.
    """
    if output in prompt.answers:
        return prompt.label_for(output)
    cleaned = _norm(output).strip(_PUNCT)
    for answer in prompt.answers:
        if _norm(answer) == cleaned:
            return prompt.label_for(answer)
    for label in prompt.labels:
        if _norm(label) == cleaned:
            return label
    lowered = _norm(output)
    spans = _mentions(lowered, prompt)
    if len({label for _, _, label in spans}) != 1:
        return None
    if any(_negated(lowered, start) for start, _, _ in spans):
        return None
    return spans[0][2]
