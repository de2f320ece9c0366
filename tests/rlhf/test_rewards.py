"""RuleAnnotator: each rule on hand-worked values, deterministic ranking, any text accepted."""
from __future__ import annotations

import math

import pytest

from llmsys.rlhf.rewards import RuleAnnotator, content_words, words

PROMPT = "How do I reset my password?"  # content words: {reset, password}


@pytest.fixture
def annotator() -> RuleAnnotator:
    return RuleAnnotator()


def test_words_and_content_words():
    assert words("Don’t PANIC, it's 42!") == ["don't", "panic", "it's", "42"]
    assert content_words(PROMPT) == {"reset", "password"}


@pytest.mark.parametrize("response,finished,expected,terms", [
    # 5 words, ends with ".", all distinct; uses "reset" (1 of 2 prompt content words) and "please".
    ("Use the reset link, please.", True, 0.25 + 0.5, {"on_topic": 0.25, "polite": 0.5}),
    # 20 distinct words: 8 beyond the target of 12 at 0.1 each.
    (" ".join(f"word{i}" for i in range(20)) + ".", True, -0.8, {"length": -0.8}),
    # 4 words, 1 distinct (-2 * 3/4), no final punctuation, on topic (+0.25), no end-of-turn.
    ("reset reset reset reset", False, -1.5 - 0.5 + 0.25 - 1.0,
     {"repetition": -1.5, "punctuation": -0.5, "on_topic": 0.25, "unfinished": -1.0}),
    # No word at all; nothing to end with punctuation either.
    ("", True, -3.0 - 0.5, {"empty": -3.0, "punctuation": -0.5}),
    # Rude word and a leaked template token (which also leaves ">" as the last character).
    ("Shut up, idiot.<|im_end|>", True, -1.0 - 1.0 - 0.5, {"rude": -1.0, "junk": -1.0, "punctuation": -0.5}),
    # A role header line is template junk too.
    ("Sure.\nassistant: done.", True, -1.0, {"junk": -1.0}),
])
def test_score_hand_worked(annotator, response, finished, expected, terms):
    breakdown = annotator.breakdown(PROMPT, response, finished)
    assert {key: value for key, value in breakdown.items() if value != 0.0} == pytest.approx(terms)
    assert annotator.score(PROMPT, response, finished) == pytest.approx(expected)


def test_short_function_words_do_not_count_as_repetition(annotator):
    # "i" and "be" repeat, as in any sentence; the words of 3+ characters are all distinct.
    assert annotator.breakdown("you are pedantic", "i am more uptight than i should be.")["repetition"] == 0.0


def test_rank_is_a_deterministic_permutation_with_stable_ties(annotator):
    long = " ".join(f"word{i}" for i in range(20)) + "."
    responses = [long, "Use the reset link, please.", "reset reset reset reset", "Use the reset link, please."]
    assert annotator.rank(PROMPT, responses) == [1, 3, 0, 2]
    assert annotator.rank(PROMPT, responses) == annotator.rank(PROMPT, list(responses))
    # An unfinished generation ranks below the same text finished.
    assert annotator.rank(PROMPT, ["Reset it.", "Reset it."], finished=[False, True]) == [1, 0]
    with pytest.raises(ValueError, match="finished has 1 flags for 2 responses"):
        annotator.rank(PROMPT, ["a", "b"], finished=[True])


@pytest.mark.parametrize("text", ["日本語のテキスト", "😀🚀", "```\nprint('x')\n```", "\x00\t\r\n", "word " * 5000,
                                  "<|pad|><|pad|>", "   "])
def test_accepts_any_text(annotator, text):
    assert math.isfinite(annotator.score(text, text, finished=False))


def test_mean_score(annotator):
    prompts = [PROMPT, PROMPT]
    responses = ["Use the reset link, please.", ""]
    assert annotator.mean_score(prompts, responses) == pytest.approx((0.75 - 3.5) / 2)
    assert annotator.mean_score(prompts, responses, finished=[True, False]) == pytest.approx((0.75 - 4.5) / 2)
    with pytest.raises(ValueError, match="as many prompts as responses"):
        annotator.mean_score(prompts, responses[:1])
