"""Rewards: the RuleAnnotator's rules on hand-worked values, deterministic ranking, any text accepted; the
verifiable checkers on hand examples; sources by name and import path, their weighted sum, and failures
that name the source."""
from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from llmsys.rlhf.rewards import (
    FORMAT_MAX_WORDS,
    RewardError,
    RewardRegistry,
    RewardSpec,
    RuleAnnotator,
    annotator_score,
    answer_format,
    build_reward,
    content_words,
    exact_answer,
    final_number,
    import_reward,
    parse_answer,
    words,
)

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


# -- verifiable checkers ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,number", [
    ("68", "68"), ("  68  ", "68"), ("The answer is 68.", "68"), ("68.\n", "68"), ("42.0", "42.0"),
    ("1,234", "1234"), ("It is 1,234,567.", "1234567"), ("1,234.5", "1234.5"), ("12,34", "34"), ("1,2345", "2345"),
    ("-3", "-3"), ("x=-3", "-3"), ("\u22125", "-5"), ("7-3", "3"), ("23 + 45 = 68", "68"), ("5 - 3", "3"),
    ("1 234", "234"), ("68apples", "68"), (".5", "5"), ("1e3", "3"), ("3.14.15", "15"), ("-0", "0"),
])
def test_final_number_is_the_last_number(text, number):
    assert final_number(text) == Decimal(number)


@pytest.mark.parametrize("text", ["", "no digits here", "-", "., -"])
def test_final_number_none_without_digits(text):
    assert final_number(text) is None


def test_parse_answer():
    assert parse_answer("42") == parse_answer("42.0") == parse_answer(42) == parse_answer(42.0) == Decimal(42)
    assert parse_answer(" -1,234 ") == Decimal(-1234) and parse_answer(0.1) == Decimal("0.1")
    for bad in ("42 apples", "forty", "", True, None, math.nan, [42]):
        with pytest.raises(RewardError):
            parse_answer(bad)


def test_exact_answer_on_hand_examples():
    responses = ["68", "The answer is 68.", "68.0", "It is 67.", "", "68 or 69", "6 8", "-68", "1,068"]
    expected = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert exact_answer(["q"] * 9, responses, [{"answer": "68"}] * 9) == expected
    # Numeric answers, negative and decimal ones, and thousands commas on either side.
    assert exact_answer(["q"] * 4, ["-7", "2.50", "1234", "1,234"],
                        [{"answer": -7}, {"answer": "2.5"}, {"answer": "1,234"}, {"answer": 1234}]) == [1.0] * 4


def test_exact_answer_refuses_rows_it_cannot_judge():
    with pytest.raises(RewardError, match=r"metadata\[1\] has no 'answer' field.*fields present: 'op'"):
        exact_answer(["q", "q"], ["1", "2"], [{"answer": "1"}, {"op": "+"}])
    with pytest.raises(RewardError, match=r"metadata\[0\]: answer 'sixty' is not one number"):
        exact_answer(["q"], ["60"], [{"answer": "sixty"}])


def test_format_on_hand_examples():
    good = ["68", " 68 ", "68.", "The answer is 68.", "23 + 45 = 68", "-3", "2.5",
            " ".join(["w"] * (FORMAT_MAX_WORDS - 1) + ["1"])]
    bad = ["", "   ", "sixty-eight", "68 apples", "68!", "68..", "(68)", "68\nThanks",
           " ".join(["w"] * FORMAT_MAX_WORDS + ["1"])]
    assert answer_format(["q"] * len(good), good, [{}] * len(good)) == [1.0] * len(good)
    assert answer_format(["q"] * len(bad), bad, [{}] * len(bad)) == [0.0] * len(bad)


def test_annotator_source_is_the_annotators_score_and_needs_finished():
    annotator = RuleAnnotator()
    responses = ["Use the reset link, please.", "reset reset reset reset"]
    meta = [{"finished": True}, {"finished": False, "answer": "x"}]
    assert annotator_score([PROMPT] * 2, responses, meta) == [
        annotator.score(PROMPT, responses[0], True), annotator.score(PROMPT, responses[1], False)]
    with pytest.raises(RewardError, match=r"metadata\[0\] has no 'finished' field"):
        annotator_score([PROMPT], ["Hi."], [{}])
    with pytest.raises(RewardError, match=r"metadata\[0\]\['finished'\] is 1, expected true or false"):
        annotator_score([PROMPT], ["Hi."], [{"finished": 1}])


# -- sources and their weighted sum ----------------------------------------------------------------

PLUGINS = "tests.rlhf.reward_plugins"
BATCH = (["What is 23 + 45?"] * 3, ["68", "The answer is 67.", "sixty-eight"],
         [{"answer": "68", "finished": True}, {"answer": "68", "finished": True}, {"answer": "68", "finished": False}])


def test_weighted_sum_and_per_source_scores():
    reward = RewardRegistry().combine([RewardSpec("exact_answer", 1.0), RewardSpec("format", 0.5),
                                       RewardSpec(f"{PLUGINS}:brevity", -2.0)])
    assert reward.names == ("exact_answer", "format", f"{PLUGINS}:brevity")
    scores = reward(*BATCH)
    assert torch.equal(scores.per_source["exact_answer"], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(scores.per_source["format"], torch.tensor([1.0, 1.0, 0.0]))
    brevity = torch.tensor([1 / 2, 1 / 5, 1 / 2])
    assert torch.allclose(scores.per_source[f"{PLUGINS}:brevity"], brevity)
    assert torch.allclose(scores.total, torch.tensor([1.0 + 0.5, 0.5, 0.0]) - 2.0 * brevity)
    assert scores.total.dtype == torch.float32 and scores.total.shape == (3,)


def test_a_zero_weight_source_is_scored_but_does_not_count():
    scores = RewardRegistry().combine([RewardSpec("exact_answer", 1.0), RewardSpec("annotator", 0.0)])(*BATCH)
    assert torch.equal(scores.total, scores.per_source["exact_answer"])
    assert scores.per_source["annotator"].tolist() == pytest.approx(annotator_score(*BATCH))


def test_combine_takes_config_entries_with_source_and_weight():
    class Entry:  # the shape of the config's grpo.rewards entries
        def __init__(self, source, weight):
            self.source, self.weight = source, weight

    reward = RewardRegistry().combine([Entry("format", 2.0)])
    assert reward(*BATCH).total.tolist() == [2.0, 2.0, 0.0]


@pytest.mark.parametrize("function,expected", [
    ("as_tensor", [2.0, 17.0, 11.0]),
    ("as_array", [0.0, 1.0, 0.0]),
    ("Scorer.constant", [0.25] * 3),
])
def test_plugins_may_return_tensors_arrays_and_live_in_classes(function, expected):
    batch = (BATCH[0], BATCH[1], [{"hard": False}, {"hard": True}, {}])
    assert RewardRegistry().combine([RewardSpec(f"{PLUGINS}:{function}")])(*batch).total.tolist() == expected


def test_build_reward_registers_the_run_sources_and_scores_unpack_as_a_pair():
    def reward_model(prompts, responses, metadata):  # what a trainer's wrapper of its model looks like
        return torch.tensor([0.5, -0.5, 1.5])

    reward = build_reward([RewardSpec("reward_model", 0.5), RewardSpec("exact_answer")], reward_model=reward_model)
    total, per_source = reward(*BATCH)
    assert total.tolist() == [1.25, -0.25, 0.75] and list(per_source) == ["reward_model", "exact_answer"]
    with pytest.raises(RewardError, match="unknown reward source 'reward_model'"):
        build_reward([RewardSpec("reward_model")], reward_model=None)  # no model loaded: not registered
    with pytest.raises(RewardError, match="reward 'tokenizer': str is not callable"):
        build_reward([RewardSpec("format")], tokenizer="not a reward")


def test_the_trainer_registers_reward_model_at_run_time():
    registry = RewardRegistry()
    with pytest.raises(RewardError, match=r"unknown reward source 'reward_model'; expected one of exact_answer, "
                                          r"format, annotator or an import path"):
        registry.combine([RewardSpec("reward_model")])
    registry.register("reward_model", lambda prompts, responses, metadata: torch.arange(len(responses)) * 0.5)
    reward = registry.combine([RewardSpec("reward_model", 2.0), RewardSpec("exact_answer")])
    assert reward(*BATCH).total.tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(RewardError, match="'reward_model' is already registered"):
        registry.register("reward_model", len)
    with pytest.raises(RewardError, match="not an identifier"):
        registry.register("my:model", len)
    assert "reward_model" not in RewardRegistry().names  # a registration belongs to its registry


@pytest.mark.parametrize("function,message", [
    ("raises", r"reward 'tests.rlhf.reward_plugins:raises' raised KeyError: 'label'"),
    ("wrong_length", r"reward 'tests.rlhf.reward_plugins:wrong_length' returned shape \(4,\) for 3 responses"),
    ("nan_score", r"reward 'tests.rlhf.reward_plugins:nan_score' returned a non-finite score nan for response 2"),
    ("huge", r"reward 'tests.rlhf.reward_plugins:huge' returned a non-finite score 1e\+300 for response 0"),
    ("scalar", r"reward 'tests.rlhf.reward_plugins:scalar' returned float that is not a list of numbers"),
    ("matrix", r"reward 'tests.rlhf.reward_plugins:matrix' returned shape \(3, 1\) for 3 responses"),
    ("text", r"reward 'tests.rlhf.reward_plugins:text' returned list that is not a list of numbers"),
])
def test_a_failing_plugin_is_named(function, message):
    reward = RewardRegistry().combine([RewardSpec("format"), RewardSpec(f"{PLUGINS}:{function}")])
    with pytest.raises(RewardError, match=message):
        reward(*BATCH)


def test_a_builtin_that_cannot_judge_a_row_is_named():
    reward = RewardRegistry().combine([RewardSpec("annotator")])
    with pytest.raises(RewardError, match=r"reward 'annotator' raised RewardError: metadata\[0\] has no 'finished'"):
        reward(["q"], ["1"], [{"answer": "1"}])


@pytest.mark.parametrize("source,message", [
    ("no_such_module_xyz:score", (r"reward source 'no_such_module_xyz:score': cannot import module "
                                  r"'no_such_module_xyz' \(No module named 'no_such_module_xyz'\)")),
    (f"{PLUGINS}:missing", (r"reward source 'tests.rlhf.reward_plugins:missing': 'tests.rlhf.reward_plugins' "
                            r"has no attribute 'missing'")),
    (f"{PLUGINS}:Scorer.missing", r"'Scorer' has no attribute 'missing'"),
    (f"{PLUGINS}:NOT_CALLABLE", r"reward source 'tests.rlhf.reward_plugins:NOT_CALLABLE' is a int, not a callable"),
    (f"{PLUGINS}:", r"is not an import path; expected package.module:function"),
    ("os:system; rm", r"is not an import path"),
    ("exact", r"unknown reward source 'exact'"),
])
def test_a_bad_source_fails_when_combined(source, message):
    with pytest.raises(RewardError, match=message):
        RewardRegistry().combine([RewardSpec(source)])


def test_import_reward_returns_the_function():
    from tests.rlhf import reward_plugins

    assert import_reward(f"{PLUGINS}:brevity") is reward_plugins.brevity


def test_bad_combinations():
    registry = RewardRegistry()
    with pytest.raises(RewardError, match="listed twice"):
        registry.combine([RewardSpec("format"), RewardSpec("format", 2.0)])
    with pytest.raises(RewardError, match="no reward source given"):
        registry.combine([])
    for weight in (math.nan, math.inf, "1", True):
        with pytest.raises(RewardError, match="is not a finite number"):
            RewardSpec("format", weight)
    reward = registry.combine([RewardSpec("format")])
    with pytest.raises(RewardError, match="as many prompts, responses and metadata rows, got 3, 3 and 2"):
        reward(BATCH[0], BATCH[1], BATCH[2][:2])
    with pytest.raises(RewardError, match=r"metadata\[0\] is a str"):
        reward(["q"], ["1"], ["answer"])
    with pytest.raises(RewardError, match="overflows float32"):
        registry.combine([RewardSpec("format", 3e38), RewardSpec(f"{PLUGINS}:Scorer.constant", 3e38)])(*BATCH)
    assert np.isclose(float(registry.combine([RewardSpec("format", 1e-3)])(*BATCH).total[0]), 1e-3)
