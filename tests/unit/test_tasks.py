import pytest

from service.config import TaskConfig
from service.tasks import build_prompt, parse_answer

SENTIMENT = TaskConfig(
    kind="classification", labels=["positive", "negative"], instruction="Classify the sentiment."
)
MC = TaskConfig(kind="multiple_choice", labels=["A", "B", "C", "D"])


def test_classification_prompt_lists_labels_and_text():
    p = build_prompt(SENTIMENT, "Loved it", SENTIMENT.labels)
    assert p.text.startswith("Classify the sentiment.")
    assert "positive, negative" in p.text
    assert "Text: Loved it" in p.text
    assert p.text.endswith("Answer:")
    assert p.answers == p.labels == ["positive", "negative"]


def test_multiple_choice_with_letter_options_asks_for_a_letter():
    p = build_prompt(MC, "2+2? A) 3 B) 4 C) 5 D) 6", MC.labels)
    assert p.answers == ["A", "B", "C", "D"]
    assert "Question: 2+2?" in p.text


def test_multiple_choice_with_text_options_enumerates_them():
    p = build_prompt(MC, "Capital of France?", ["Paris", "Rome", "Oslo"])
    assert "A. Paris\nB. Rome\nC. Oslo\n" in p.text
    assert p.answers == ["A", "B", "C"]
    assert p.label_for("B") == "Rome"


def test_custom_template_and_unknown_placeholders_survive():
    task = TaskConfig(
        kind="classification",
        labels=["yes", "no"],
        template="Q: {text}\nOptions: {choices} {unknown}\nA:",
    )
    p = build_prompt(task, "Is it?", ["yes", "no"])
    assert p.text == "Q: Is it?\nOptions: yes, no {unknown}\nA:"


def test_query_text_with_braces_is_not_formatted():
    p = build_prompt(SENTIMENT, "{instruction} {text} }{", SENTIMENT.labels)
    assert "Text: {instruction} {text} }{" in p.text


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("positive", "positive"),
        (" Positive.", "positive"),
        ("NEGATIVE", "negative"),
        ("  negative  \n", "negative"),
        ("The sentiment is negative!", "negative"),
        ("Positive. Actually negative", None),
        ("positive or negative", None),
        ("", None),
        ("positivity", None),
        ("négatif", None),
        ("积极", None),
        ("neutral", None),
        ("x" * 10_000, None),
        ("bla " * 1000 + "negative", "negative"),
    ],
)
def test_parse_classification(output, expected):
    assert parse_answer(output, build_prompt(SENTIMENT, "t", SENTIMENT.labels)) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("B", "Rome"),
        ("(b).", "Rome"),
        ("The answer is C", "Oslo"),
        ("answer: a", "Paris"),
        ("Rome", "Rome"),
        ("A or B", None),
        ("I think so", None),  # the article-like "I" is no option
        ("Paris, not Rome", None),
    ],
)
def test_parse_multiple_choice(output, expected):
    assert parse_answer(output, build_prompt(MC, "t", ["Paris", "Rome", "Oslo"])) == expected
